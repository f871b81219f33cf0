//! Socket settings shared by both sides of a session, and telling the router's own shortages
//! (descriptors, memory, ports) from a peer's failures: a local failure is never a replica's
//! fault.

use std::io;
use std::time::Duration;

/// TCP keepalive on every session socket: a peer that vanished without a FIN (power loss, a
/// dropped NAT mapping) is found by the kernel after about 60 s + 5 x 10 s of silence, even
/// when the WebSocket keepalive is turned off.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_RETRIES: u32 = 5;

/// Set up a session socket: no Nagle delay (frames are coalesced by the router), and TCP
/// keepalive. On a listening socket it is done once for all: Linux copies these options to
/// every connection it accepts.
pub fn prepare_socket<S: std::os::fd::AsFd>(socket: &S) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket.set_tcp_keepalive(&keepalive)
}

/// Whether `error` is the router running short of something of its own: descriptors
/// (EMFILE, ENFILE), memory or buffers (ENOMEM, ENOBUFS), or local ports (EADDRNOTAVAIL).
pub fn is_local_shortage(error: &io::Error) -> bool {
    if error.kind() == io::ErrorKind::OutOfMemory {
        return true;
    }
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Whether anything in `error`'s chain of causes is a local shortage.
pub fn has_local_shortage(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            if is_local_shortage(io) {
                return true;
            }
            // A wrapped error is not its wrapper's `source`: look inside.
            if io.get_ref().is_some_and(|inner| has_local_shortage(inner)) {
                return true;
            }
        }
        cause = error.source();
    }
    false
}

/// Raise the soft open-file limit to the hard one; returns the limit now in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// Descriptors in use by this process right now.
pub fn open_descriptors() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[test]
    fn shortages_are_told_from_peer_failures() {
        assert!(is_local_shortage(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_local_shortage(&io::Error::from_raw_os_error(
            libc::EADDRNOTAVAIL
        )));
        assert!(!is_local_shortage(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
        assert!(!is_local_shortage(&io::Error::from_raw_os_error(
            libc::ETIMEDOUT
        )));
        let wrapped = io::Error::other(io::Error::from_raw_os_error(libc::ENFILE));
        assert!(has_local_shortage(&wrapped));
    }

    #[tokio::test]
    async fn session_sockets_get_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        prepare_socket(&stream).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
        assert!(stream.nodelay().unwrap());
    }
}
