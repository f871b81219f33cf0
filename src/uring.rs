//! The io_uring data plane (`[listen] io = "io_uring"`): after the 101, a session whose two
//! sockets are plain TCP moves them from tokio's epoll to a ring of its worker's own; the frame
//! pumps above are the epoll ones, unchanged.
//!
//! - Reads: one multishot receive per socket stays armed; the kernel takes a buffer from a
//!   ring of provided buffers only when bytes arrive. The pump, woken in the same loop turn,
//!   reads straight out of the buffers it got; whatever it left unread by the driver's next
//!   turn is copied out to the socket and the buffers go back, so a parked session holds no
//!   buffer and a session that is not read (its sink is full) pins none of the shared ones
//!   past one turn. Past [`RECV_CAP`] unread bytes the receive is cancelled, and armed again
//!   once the pump has read them: the kernel's socket buffer and TCP hold the rest back, as on
//!   epoll.
//! - Writes: bytes are copied into the socket's send queue and one send per socket is in flight
//!   (order holds; what comes meanwhile coalesces behind it); writes wait once
//!   [`SEND_BUDGET`] bytes are pending, the backpressure the socket buffer gives on epoll.
//!   Large writes with nothing pending try one direct `send` first.
//! - Every operation queued in a loop turn goes to the kernel in one `io_uring_enter`, made by
//!   a driver task that runs after the sessions of the turn; completions are reaped when the
//!   ring's eventfd fires in tokio's event loop.
//!
//! Only plain TCP moves: rustls reads and writes through buffers of its own, so a TLS session
//! on the ring would gain nothing but another copy; TLS sessions stay on epoll.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Submission queue entries; more completions than this may be outstanding (the kernel keeps
/// the overflow).
const RING_ENTRIES: u32 = 1024;
/// Provided buffers per ring, and their size: few enough to stay in cache when handed out in
/// rotation (measured: 4,096 missed it and lost at 64 KiB; 256 kept level with epoll).
const BUFFERS: u16 = 256;
const BUFFER_BYTES: usize = 16 * 1024;
const BUFFER_GROUP: u16 = 0;
/// Provided buffers that pumps may read straight from until the next turn; past this many, a
/// receive is copied out at once, so the kernel never runs short for the others.
const HELD_BUFFERS: u16 = BUFFERS / 2;
/// Unread bytes past which a socket's receive is stopped until the pump reads them (what the
/// frame reader may hold of one frame before it streams it).
const RECV_CAP: usize = crate::frames::STREAM_BYTES;
/// Bytes a socket may have queued and in flight before writes wait.
const SEND_BUDGET: usize = 256 * 1024;
/// Writes at least this large, with nothing pending, try a direct send first.
const DIRECT_SEND_BYTES: usize = 16 * 1024;
/// How long sends still in flight when a session drops its socket may take to finish.
const LINGER: Duration = Duration::from_secs(5);

/// What a completion's user data says besides the socket (the low bits of its pointer).
const RECV: u64 = 0;
const SEND: u64 = 1;
const UNTRACKED: u64 = 2;
const TAG_BITS: u64 = 3;

/// Whether this kernel lets a ring be set up with what the data plane needs; if not (seccomp
/// in containers, an old kernel), one line says why and sessions run on epoll.
pub(crate) fn usable() -> bool {
    match RingParts::new(8, 8) {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(%error, "io_uring is not available here: sessions run on epoll");
            false
        }
    }
}

/// One worker thread's ring, its provided buffers and the state its driver keeps.
pub(crate) struct Ring {
    state: Mutex<RingState>,
    /// The provided buffers' memory (fixed for the ring's life): read without the lock.
    memory: SharedMemory,
}

struct SharedMemory(*mut u8);
// SAFETY: the memory lives as long as the ring (it is never freed: see `ProvidedBuffers`);
// a buffer is read by one socket at a time, between the kernel filling it and it going back.
unsafe impl Send for SharedMemory {}
unsafe impl Sync for SharedMemory {}

struct RingState {
    ring: IoUring,
    buffers: ProvidedBuffers,
    /// The driver, to wake when entries wait to be submitted.
    driver: Option<Waker>,
    unsubmitted: bool,
    /// Reused between turns: the completions reaped.
    reaped: Vec<(u64, i32, u32)>,
    /// Sockets that were handed provided buffers since the last turn: what their pumps have
    /// not read by the next turn is copied out, and the buffers go back.
    holders: Vec<Arc<Socket>>,
    /// Provided buffers held by sockets (at most [`HELD_BUFFERS`]).
    held: u16,
}

struct RingParts {
    ring: IoUring,
    buffers: ProvidedBuffers,
}

impl RingParts {
    fn new(entries: u32, buffers: u16) -> io::Result<RingParts> {
        // One thread submits and reaps (a worker's), and completion work runs when it enters
        // the kernel anyway, not whenever the kernel interrupts it. (DEFER_TASKRUN, which
        // runs it only in io_uring_enter, stalled sessions here: work left over past the
        // kernel's per-enter batch was not run again.)
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(entries * 8)
            .build(entries)?;
        let buffers = ProvidedBuffers::register(&ring, buffers)?;
        Ok(RingParts { ring, buffers })
    }
}

/// A ring of provided buffers (the kernel picks one when bytes arrive) and their memory.
struct ProvidedBuffers {
    entries: *mut types::BufRingEntry,
    memory: *mut u8,
    count: u16,
    tail: u16,
}

// SAFETY: only touched under the ring's lock.
unsafe impl Send for ProvidedBuffers {}

impl ProvidedBuffers {
    fn register(ring: &IoUring, count: u16) -> io::Result<ProvidedBuffers> {
        debug_assert!(count.is_power_of_two());
        let entries_layout = std::alloc::Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // Zeroed: the kernel reads the tail from the first entry. Never freed: the kernel may
        // still touch the ring while it tears a ring down, after this process let go of it;
        // one ring per worker thread, so this is bounded.
        // SAFETY: the layout has a non-zero size.
        let entries: *mut types::BufRingEntry =
            unsafe { std::alloc::alloc_zeroed(entries_layout) }.cast();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let memory = Box::leak(vec![0u8; usize::from(count) * BUFFER_BYTES].into_boxed_slice());
        // Touched now, page by page: the pool is a cost of the worker (4 MiB), paid when the
        // ring is set up rather than by whichever sessions first receive into each buffer.
        for page in (0..memory.len()).step_by(4096) {
            // SAFETY: within the slice; volatile so the writes to zeroed memory stay.
            unsafe { std::ptr::write_volatile(memory.as_mut_ptr().add(page), 0) };
        }
        // SAFETY: `entries` holds `count` entries and is never freed.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries as u64,
                count,
                BUFFER_GROUP,
                0,
            )?;
        }
        let mut buffers = ProvidedBuffers {
            entries,
            memory: memory.as_mut_ptr(),
            count,
            tail: 0,
        };
        for id in 0..count {
            buffers.give_back(id);
        }
        Ok(buffers)
    }

    /// Hand buffer `id` to the kernel again.
    fn give_back(&mut self, id: u16) {
        // SAFETY: `tail & (count - 1)` is within the ring; the kernel reads an entry only
        // once the tail (published below with release ordering) covers it.
        unsafe {
            let entry = &mut *self.entries.add(usize::from(self.tail & (self.count - 1)));
            entry.set_addr(self.memory.add(usize::from(id) * BUFFER_BYTES) as u64);
            entry.set_len(BUFFER_BYTES as u32);
            entry.set_bid(id);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

thread_local! {
    /// This thread's ring; `None` inside once setting one up failed.
    static RING: RefCell<Option<Option<Arc<Ring>>>> = const { RefCell::new(None) };
}

impl Ring {
    /// The ring of the calling thread, set up (with its driver task on the current tokio
    /// runtime) on first use; `None` if it cannot be set up (logged once per thread), or if
    /// the runtime is not single-threaded (the ring's one submitter must be this thread).
    pub(crate) fn current() -> Option<Arc<Ring>> {
        let flavor = tokio::runtime::Handle::try_current().ok()?.runtime_flavor();
        if flavor != tokio::runtime::RuntimeFlavor::CurrentThread {
            return None;
        }
        RING.with(|cell| {
            cell.borrow_mut()
                .get_or_insert_with(|| match Ring::start() {
                    Ok(ring) => Some(ring),
                    Err(error) => {
                        tracing::warn!(%error, "cannot set up an io_uring ring: this worker's sessions stay on epoll");
                        None
                    }
                })
                .clone()
        })
    }

    fn start() -> io::Result<Arc<Ring>> {
        let RingParts { ring, buffers } = RingParts::new(RING_ENTRIES, BUFFERS)?;
        // The kernel need not look the ring's descriptor up on every enter.
        let _ = ring.submitter().register_ring_fd();
        // Signalled whenever completion work waits; tokio's event loop watches it edge-
        // triggered, so it is never read.
        // SAFETY: eventfd(2) has no memory-safety preconditions.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if eventfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, owned here alone.
        let eventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(eventfd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        // SAFETY: the AsyncFd owns the descriptor it polls.
        let readable =
            unsafe { AsyncFd::register_with_interest(eventfd, tokio::io::Interest::READABLE) }?;
        let ring = Arc::new(Ring {
            memory: SharedMemory(buffers.memory),
            state: Mutex::new(RingState {
                ring,
                buffers,
                driver: None,
                unsubmitted: false,
                reaped: Vec::with_capacity(256),
                holders: Vec::new(),
                held: 0,
            }),
        });
        tokio::spawn(drive(ring.clone(), readable));
        Ok(ring)
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `entry` for the driver's next submit.
    fn push(&self, entry: squeue::Entry) {
        let mut state = self.lock();
        // SAFETY: every entry's buffers and socket are kept alive by the reference its user
        // data holds until its completion (see `Socket::op`).
        while unsafe { state.ring.submission().push(&entry) }.is_err() {
            // Full: submit what is queued now.
            if let Err(error) = state.ring.submit() {
                tracing::debug!(%error, "io_uring submit failed; retrying");
            }
        }
        state.unsubmitted = true;
        if let Some(driver) = state.driver.take() {
            driver.wake();
        }
    }

    /// Buffer `id` was copied out: back to the kernel.
    fn give_back(&self, id: u16) {
        self.lock().buffers.give_back(id);
    }

    /// The first `len` bytes of buffer `id`.
    fn buffer(&self, id: u16, len: usize) -> &[u8] {
        debug_assert!(len <= BUFFER_BYTES);
        // SAFETY: a completed receive filled `len` bytes of the buffer, which is not given
        // back to the kernel before they are copied out.
        unsafe {
            std::slice::from_raw_parts(self.memory.0.add(usize::from(id) * BUFFER_BYTES), len)
        }
    }

    /// Submit what is queued and hand out what completed.
    fn turn(&self) {
        // Buffers handed out in the last turn and still not read: copied out, given back.
        let holders = std::mem::take(&mut self.lock().holders);
        for socket in &holders {
            socket.let_go_of_buffers();
        }
        let mut reaped = {
            let mut state = self.lock();
            // Deferred completion work runs in an enter too.
            let work_waits = state.ring.submission().taskrun();
            if std::mem::take(&mut state.unsubmitted) || work_waits {
                if let Err(error) = state.ring.submit() {
                    // EBUSY / EAGAIN: the kernel is short of room; the next turn retries.
                    tracing::debug!(%error, "io_uring submit failed; retrying");
                    state.unsubmitted = true;
                }
            }
            let mut reaped = std::mem::take(&mut state.reaped);
            reaped.extend(
                state
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            reaped
        };
        for (user_data, result, flags) in reaped.drain(..) {
            complete(self, user_data, result, flags);
        }
        // Keep the list's allocation; the sockets' references go before the lock is taken
        // (a socket's last reference may go here).
        let mut holders = holders;
        holders.clear();
        let mut state = self.lock();
        state.reaped = reaped;
        if state.holders.is_empty() {
            state.holders = holders;
        }
    }

    /// Whether one more buffer may be held by a socket until the next turn; if so it is
    /// counted as held.
    fn may_hold(&self) -> bool {
        let mut state = self.lock();
        let may = state.held < HELD_BUFFERS;
        state.held += u16::from(may);
        may
    }

    /// `socket` holds provided buffers until the next turn at most.
    fn holds_buffers(&self, socket: Arc<Socket>) {
        self.lock().holders.push(socket);
    }

    /// Held buffers `ids` were read or copied out: back to the kernel.
    fn give_back_held(&self, ids: impl Iterator<Item = u16>) {
        let mut state = self.lock();
        for id in ids {
            state.held -= 1;
            state.buffers.give_back(id);
        }
    }
}

/// The ring's driver: one submit per loop turn for every session's queued operations, and the
/// completions handed to their sockets.
async fn drive(ring: Arc<Ring>, readable: AsyncFd<OwnedFd>) {
    loop {
        ring.turn();
        std::future::poll_fn(|cx| {
            {
                let mut state = ring.lock();
                if state.unsubmitted
                    || !state.ring.completion().is_empty()
                    || state.ring.submission().taskrun()
                {
                    return Poll::Ready(());
                }
                state.driver = Some(cx.waker().clone());
            }
            match readable.poll_read_ready(cx) {
                Poll::Ready(Ok(mut ready)) => {
                    ready.clear_ready();
                    Poll::Ready(())
                }
                Poll::Ready(Err(error)) => {
                    tracing::error!(%error, "io_uring ring not pollable");
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
    }
}

fn complete(ring: &Ring, user_data: u64, result: i32, flags: u32) {
    let tag = user_data & TAG_BITS;
    if tag == UNTRACKED {
        return;
    }
    // SAFETY: the user data of a RECV or SEND entry is a reference from `Socket::op`, handed
    // back by the entry's last completion (a multishot receive completes many times: all but
    // the last say more will come).
    let socket = unsafe { Arc::from_raw((user_data & !TAG_BITS) as *const Socket) };
    if cqueue::more(flags) {
        // Not the last: the entry keeps its reference.
        std::mem::forget(socket.clone());
    }
    match tag {
        RECV => socket.received(ring, result, flags),
        _ => socket.sent(result),
    }
}

/// A TCP socket driven by a ring: shared by its read half, its write half and its operations
/// in flight; closed when the last of them lets go.
pub(crate) struct Socket {
    fd: OwnedFd,
    ring: Arc<Ring>,
    state: Mutex<SocketState>,
}

#[derive(Default)]
struct SocketState {
    /// Provided buffers received into this loop turn, not yet read: (id, first unread byte,
    /// end). Their bytes come before those in `received`.
    held: Vec<(u16, usize, usize)>,
    held_bytes: usize,
    /// Received and not yet read, from `read_start` on (copied out of the provided buffers).
    received: Vec<u8>,
    read_start: usize,
    /// A multishot receive is armed.
    receiving: bool,
    /// Its cancel was sent: enough is unread.
    stopping: bool,
    read_closed: bool,
    read_error: Option<io::ErrorKind>,
    reader: Option<Waker>,
    /// Written, waiting for the send in flight.
    queued: Vec<u8>,
    /// The send in flight: its bytes and how many of them went.
    sending: Option<(Vec<u8>, usize)>,
    write_error: Option<io::ErrorKind>,
    writer: Option<Waker>,
    /// Halves still held (the socket is closed for good when none is).
    halves: u8,
}

impl SocketState {
    fn unread(&self) -> usize {
        self.held_bytes + self.received.len() - self.read_start
    }

    fn readable(&self) -> bool {
        self.unread() > 0 || self.read_closed || self.read_error.is_some()
    }

    fn pending_bytes(&self) -> usize {
        self.queued.len()
            + self
                .sending
                .as_ref()
                .map_or(0, |(bytes, done)| bytes.len() - done)
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl Socket {
    fn lock(&self) -> MutexGuard<'_, SocketState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// User data for an entry on this socket: a reference, given back by its completion.
    fn op(self: &Arc<Self>, tag: u64) -> u64 {
        Arc::into_raw(self.clone()) as u64 | tag
    }

    fn arm_receive(self: &Arc<Self>) {
        let entry = opcode::RecvMulti::new(types::Fd(self.fd.as_raw_fd()), BUFFER_GROUP)
            .build()
            .user_data(self.op(RECV));
        self.ring.push(entry);
    }

    /// Arm the receive if the pump waits for bytes and none is armed.
    fn want_bytes(self: &Arc<Self>, mut state: MutexGuard<'_, SocketState>, cx: &Context<'_>) {
        set_waker(&mut state.reader, cx);
        if !state.receiving {
            state.receiving = true;
            drop(state);
            self.arm_receive();
        }
    }

    fn received(self: Arc<Self>, ring: &Ring, result: i32, flags: u32) {
        let buffer = cqueue::buffer_select(flags);
        let mut state = self.lock();
        if !cqueue::more(flags) {
            state.receiving = false;
            state.stopping = false;
        }
        let (mut stop, mut again, mut kept, mut first_held) = (false, false, false, false);
        match (result, buffer) {
            (n, Some(id)) if n > 0 => {
                if state.halves > 0 {
                    let n = n as usize;
                    // Nothing copied out waits in front: the pump reads this buffer itself.
                    if state.received.len() == state.read_start && ring.may_hold() {
                        first_held = state.held.is_empty();
                        state.held.push((id, 0, n));
                        state.held_bytes += n;
                        kept = true;
                    } else {
                        state.received.extend_from_slice(ring.buffer(id, n));
                    }
                    if state.unread() >= RECV_CAP && state.receiving && !state.stopping {
                        state.stopping = true;
                        stop = true;
                    }
                }
            }
            (0, _) => state.read_closed = true,
            (e, _) if -e == libc::ENOBUFS => {
                // Every buffer was taken at that moment. They come back as their completions
                // are handed out, all before the next submit: receive again then, if the pump
                // still waits.
                again = state.halves > 0 && !state.receiving && state.unread() < RECV_CAP;
                if again {
                    state.receiving = true;
                }
            }
            (e, _) if -e == libc::ECANCELED => {}
            (e, _) => state.read_error = Some(io::Error::from_raw_os_error(-e).kind()),
        }
        let reader = state.reader.take();
        drop(state);
        match buffer {
            // Held: the next turn copies out what the pump did not read.
            Some(_) if kept && first_held => ring.holds_buffers(self.clone()),
            Some(_) if kept => {}
            Some(id) => ring.give_back(id),
            None => {}
        }
        if stop {
            self.cancel(RECV);
        }
        if again {
            self.arm_receive();
        }
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// Copy out what is left of the buffers held since the last turn, and give them back.
    fn let_go_of_buffers(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.held.is_empty() {
            return;
        }
        // Held bytes come first, then any copied out after them (when too many were held).
        let copied = &state.received[state.read_start..];
        let mut bytes = Vec::with_capacity(state.held_bytes + copied.len());
        for &(id, start, end) in &state.held {
            bytes.extend_from_slice(&self.ring.buffer(id, end)[start..]);
        }
        bytes.extend_from_slice(copied);
        state.received = bytes;
        state.read_start = 0;
        state.held_bytes = 0;
        self.ring
            .give_back_held(state.held.drain(..).map(|(id, ..)| id));
    }

    /// Cancel this socket's operation of kind `tag` (if any is in flight).
    fn cancel(self: &Arc<Self>, tag: u64) {
        let target = Arc::as_ptr(self) as u64 | tag;
        self.ring.push(
            opcode::AsyncCancel::new(target)
                .build()
                .user_data(UNTRACKED),
        );
    }

    fn sent(self: Arc<Self>, result: i32) {
        let mut state = self.lock();
        let next = match (result, state.sending.take()) {
            (e, _) if e < 0 => {
                state.write_error = Some(io::Error::from_raw_os_error(-e).kind());
                state.queued = Vec::new();
                None
            }
            // Nothing was in flight (cannot happen: one send at a time, taken only here).
            (_, None) => None,
            (n, Some((bytes, done))) => {
                let done = done + n as usize;
                if done < bytes.len() {
                    Some((bytes, done))
                } else if state.queued.is_empty() || state.write_error.is_some() {
                    None
                } else {
                    Some((std::mem::take(&mut state.queued), 0))
                }
            }
        };
        let entry = next
            .as_ref()
            .map(|(bytes, done)| self.send_entry(&bytes[*done..]));
        state.sending = next;
        if let Some(writer) = state.writer.take() {
            writer.wake();
        }
        drop(state);
        if let Some(entry) = entry {
            self.ring.push(entry);
        }
    }

    fn send_entry(self: &Arc<Self>, bytes: &[u8]) -> squeue::Entry {
        opcode::Send::new(
            types::Fd(self.fd.as_raw_fd()),
            bytes.as_ptr(),
            bytes.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(self.op(SEND))
    }
}

/// A plain TCP connection moved onto this thread's ring.
pub(crate) struct RingSocket(Arc<Socket>);

impl RingSocket {
    /// Take `stream` off tokio's event loop and onto `ring`.
    pub(crate) fn adopt(stream: tokio::net::TcpStream, ring: Arc<Ring>) -> io::Result<RingSocket> {
        let stream = stream.into_std()?;
        Ok(RingSocket(Arc::new(Socket {
            fd: OwnedFd::from(stream),
            ring,
            state: Mutex::new(SocketState {
                halves: 2,
                ..SocketState::default()
            }),
        })))
    }

    pub(crate) fn split(self) -> (RingHalf, RingHalf) {
        (RingHalf(self.0.clone()), RingHalf(self.0))
    }
}

/// One half of a [`RingSocket`] (both can read and write; a session reads with one and writes
/// with the other).
pub(crate) struct RingHalf(Arc<Socket>);

impl Drop for RingHalf {
    fn drop(&mut self) {
        let socket = &self.0;
        let mut state = socket.lock();
        state.halves -= 1;
        if state.halves > 0 {
            return;
        }
        let (receiving, sending) = (state.receiving, state.sending.is_some());
        state.received = Vec::new();
        state.held_bytes = 0;
        socket
            .ring
            .give_back_held(state.held.drain(..).map(|(id, ..)| id));
        drop(state);
        if receiving {
            // Nothing will read it: cancel the receive so the socket can close.
            socket.cancel(RECV);
        }
        let runtime = tokio::runtime::Handle::try_current();
        if let (true, Ok(runtime)) = (sending, runtime) {
            // What was written goes out (a Close frame may be in it), within the linger.
            let weak: Weak<Socket> = Arc::downgrade(socket);
            runtime.spawn(async move {
                tokio::time::sleep(LINGER).await;
                if let Some(socket) = weak.upgrade() {
                    socket.cancel(SEND);
                }
            });
        }
    }
}

impl RingHalf {
    /// Ready when a read would find bytes, the end, or an error; arms the receive otherwise.
    pub(crate) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let state = self.0.lock();
        if state.readable() {
            return Poll::Ready(Ok(()));
        }
        self.0.want_bytes(state, cx);
        Poll::Pending
    }
}

impl AsyncRead for RingHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.0.lock();
        let state = &mut *guard;
        if state.held_bytes > 0 {
            // Straight from the provided buffers the kernel filled this turn.
            let mut done = 0;
            for (id, start, end) in state.held.iter_mut() {
                let n = (*end - *start).min(buf.remaining());
                buf.put_slice(&self.0.ring.buffer(*id, *end)[*start..*start + n]);
                *start += n;
                state.held_bytes -= n;
                if start < end {
                    break;
                }
                done += 1;
            }
            self.0
                .ring
                .give_back_held(state.held.drain(..done).map(|(id, ..)| id));
            return Poll::Ready(Ok(()));
        }
        let mut state = guard;
        let unread = state.unread();
        if unread > 0 {
            let n = unread.min(buf.remaining());
            let start = state.read_start;
            buf.put_slice(&state.received[start..start + n]);
            state.read_start += n;
            if state.read_start == state.received.len() {
                // Drained: an idle session holds no receive buffer.
                state.received = Vec::new();
                state.read_start = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(kind) = state.read_error {
            return Poll::Ready(Err(kind.into()));
        }
        if state.read_closed {
            return Poll::Ready(Ok(()));
        }
        self.0.want_bytes(state, cx);
        Poll::Pending
    }
}

impl AsyncWrite for RingHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let socket = &self.0;
        let mut state = socket.lock();
        if let Some(kind) = state.write_error {
            return Poll::Ready(Err(kind.into()));
        }
        let pending = state.pending_bytes();
        if pending >= SEND_BUDGET {
            set_waker(&mut state.writer, cx);
            return Poll::Pending;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if pending == 0 && total >= DIRECT_SEND_BYTES {
            match SockRef::from(&socket.fd)
                .send_vectored_with_flags(bufs, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let room = SEND_BUDGET - pending;
        let mut taken = 0;
        for buf in bufs {
            let n = buf.len().min(room - taken);
            state.queued.extend_from_slice(&buf[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        if state.sending.is_none() && !state.queued.is_empty() {
            let bytes = std::mem::take(&mut state.queued);
            let entry = socket.send_entry(&bytes);
            state.sending = Some((bytes, 0));
            drop(state);
            socket.ring.push(entry);
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Written bytes are the ring's to send: nothing to wait for (errors show on the next
    /// write).
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.lock().write_error {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Once everything written has gone, half-close.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let socket = &self.0;
        let mut state = socket.lock();
        if let Some(kind) = state.write_error {
            return Poll::Ready(Err(kind.into()));
        }
        if state.pending_bytes() > 0 {
            set_waker(&mut state.writer, cx);
            return Poll::Pending;
        }
        drop(state);
        Poll::Ready(SockRef::from(&socket.fd).shutdown(std::net::Shutdown::Write))
    }
}
