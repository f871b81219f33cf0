//! splice(2) for a replica's streamed payloads: between two plain TCP sockets the bytes of a
//! large unmasked frame that need no check (binary, compressed, or their continuations) move
//! through a pipe, kernel to kernel, never copied into user space and back.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use fastwebsockets::WebSocketError;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for: a whole 1 MiB frame in one splice each way (256 KiB pipes measured
/// a smaller gain). Past the user's pipe budget (`fs.pipe-user-pages-soft`, 64 MiB, which
/// privileged processes may exceed) the kernel refuses it; such a frame is copied instead.
const PIPE_BYTES: usize = 1 << 20;

/// Pipes open at once, process-wide: past this, frames are copied. Their descriptors are
/// kept out of what sessions may use (see `admission::reserved_descriptors`), so splicing
/// never costs a connection its descriptor; 64 pipes also stay within the unprivileged pipe
/// budget (64 MiB).
pub(crate) const MAX_PIPES: usize = 64;

static PIPES_OPEN: AtomicUsize = AtomicUsize::new(0);

/// A payload shorter than this goes through user space: the pipe costs four system calls to
/// make and close.
pub(super) const SPLICE_MIN_BYTES: usize = 64 * 1024;

/// How a splice round failed.
pub(super) enum Broken {
    /// Reading the source failed, or it ended mid-frame.
    Source(WebSocketError),
    /// Writing to the sink failed: its peer is gone.
    Sink(WebSocketError),
}

/// A pipe carrying one frame's payload from a source socket to a sink socket.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes in the pipe, read from the source and not yet written to the sink.
    held: usize,
    _counted: Counted,
}

/// One of the [`MAX_PIPES`], given back when dropped.
struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        PIPES_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pipe {
    /// A fresh pipe; fails when [`MAX_PIPES`] are open, the process is out of descriptors or
    /// the pipe would be small (the caller then copies).
    pub(super) fn new() -> io::Result<Pipe> {
        if PIPES_OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            PIPES_OPEN.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other("every pipe is in use"));
        }
        // Counted from here: dropped with the pipe, or below if it cannot be made.
        let counted = Counted;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own.
        let grown =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as i32) };
        if grown < SPLICE_MIN_BYTES as i32 {
            // Over the pipe budget: a few pages a splice would cost more calls than copying.
            return Err(io::Error::other("pipe budget spent"));
        }
        let capacity = grown as usize;
        Ok(Pipe {
            read,
            write,
            capacity,
            held: 0,
            _counted: counted,
        })
    }

    /// Move payload on: with the pipe empty, wait for the source and take up to `left` bytes
    /// of it into the pipe, then try to pass them on at once; with bytes held, wait for the
    /// sink and pass them on. The bytes written to the sink. Cancel-safe: the only waits are
    /// for readiness, and what a splice moved is recorded before the next wait.
    pub(super) async fn step(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        left: usize,
    ) -> Result<usize, Broken> {
        if self.held == 0 {
            let want = left.min(self.capacity);
            loop {
                from.readable()
                    .await
                    .map_err(|e| Broken::Source(e.into()))?;
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), self.write.as_raw_fd(), want)
                }) {
                    Ok(0) => return Err(Broken::Source(WebSocketError::UnexpectedEOF)),
                    Ok(n) => {
                        self.held = n;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(Broken::Source(e.into())),
                }
            }
            // The sink is writable more often than not: no wait before the first attempt.
            return self.pass_on(to);
        }
        loop {
            to.writable().await.map_err(|e| Broken::Sink(e.into()))?;
            let passed = self.pass_on(to)?;
            if passed > 0 {
                return Ok(passed);
            }
        }
    }

    /// Write what the pipe holds to the sink without waiting; 0 when it would block.
    fn pass_on(&mut self, to: &TcpStream) -> Result<usize, Broken> {
        match to.try_io(Interest::WRITABLE, || {
            splice(self.read.as_raw_fd(), to.as_raw_fd(), self.held)
        }) {
            Ok(n) => {
                self.held -= n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(Broken::Sink(e.into())),
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; null offsets: pipe and socket ends.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_than_max_pipes_are_open_at_once() {
        let pipes: Vec<Pipe> = (0..MAX_PIPES).map(|_| Pipe::new().unwrap()).collect();
        assert!(Pipe::new().is_err(), "one pipe past the cap");
        drop(pipes);
        let again = Pipe::new().expect("pipes are given back when dropped");
        assert!(again.capacity >= SPLICE_MIN_BYTES);
    }
}
