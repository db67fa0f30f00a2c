//! The runners' own I/O reactor, for the connections they serve.
//!
//! Why not tokio's I/O driver? With the connections registered there, every
//! request crossed two threads: a tokio worker learned that the socket was
//! readable, queued the connection task and woke a runner, which ran it. That
//! hand-off (a futex wake-up and two context switches per request) cost a
//! third of hello-world throughput. Here the runners wait for the
//! connections' readiness themselves, as Go's scheduler polls its netpoller:
//! one idle runner at a time waits in `epoll_wait` (it holds the *poller
//! role*), and the tasks its events wake are run by that same runner, with no
//! hand-off.
//!
//! Isolation is kept because the role is given up before any task runs, and
//! never held by a runner inside user code: if a task then blocks, another
//! runner takes the role (woken for queued work, or by the monitor within a
//! millisecond when the role stays free while runners sleep), so nobody
//! else's I/O waits for the blocked one. While stalls go on, the monitor
//! keeps idle runners around for exactly this (see `ensure_spares`).
//!
//! Everything else a handler awaits (tokio timers, tokio sockets, channels)
//! stays on tokio's driver and reaches the runners through the task queue.
//!
//! The reactor also enforces the header-read timeout of its connections
//! ([`Reactor::cut_idle`]), in place of hyper's: hyper arms a timer for every
//! request head, which cost about 8 % of hello-world's CPU time (measured with
//! `bench/cpu.py`, the timer on against off). Here a connection only keeps
//! two counters up to date, and the monitor looks at all of them ten times a
//! second. hyper has no such deadline for HTTP/2 at all; for those
//! connections the reactor follows the client's frames ([`super::frames`])
//! and applies the same timeout to a preface, frame header or header block
//! that is not whole, and to a connection with no stream open (GOAWAY).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use mio::{Events, Interest, Token};

use super::frames::{FrameScanner, Sniffed};

/// The token of the reactor's own wake-up (an eventfd): never a connection's.
const WAKE_TOKEN: Token = Token(usize::MAX);

/// Readiness events taken per `epoll_wait`. A runner keeps the first task
/// and queues the rest for the others, so a big batch costs nothing extra.
const EVENTS_PER_POLL: usize = 256;

/// Connections' tokens carry a generation in their upper half, so that an
/// event fetched just before a connection closed is not delivered to the
/// next connection given the same slot.
const GENERATION_SHIFT: u32 = usize::BITS / 2;
const INDEX_MASK: usize = (1 << GENERATION_SHIFT) - 1;

/// An epoll set shared by the runners.
pub(crate) struct Reactor {
    registry: mio::Registry,
    /// Held by the runner in the poller role only, so never contended.
    poller: Mutex<Poller>,
    waker: mio::Waker,
    sources: Mutex<Sources>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor").finish_non_exhaustive()
    }
}

struct Poller {
    poll: mio::Poll,
    events: Events,
    /// The sources events were reported for, gathered under the `sources`
    /// lock and woken after it is released (a wake-up may run arbitrary
    /// code, such as dropping a task that closes a connection).
    /// (source, readable, writable, read side closed, write side closed)
    ready: Vec<(Arc<IoState>, bool, bool, bool, bool)>,
}

impl Reactor {
    pub(crate) fn new() -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = mio::Waker::new(&registry, WAKE_TOKEN)?;
        let events = Events::with_capacity(EVENTS_PER_POLL);
        Ok(Self {
            registry,
            poller: Mutex::new(Poller { poll, events, ready: Vec::new() }),
            waker,
            sources: Mutex::new(Sources::default()),
        })
    }

    /// Registers an accepted connection with this reactor.
    pub(crate) fn register(self: &Arc<Self>, stream: std::net::TcpStream) -> io::Result<Connection> {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        let state = Arc::new(IoState::new(stream.as_raw_fd()));
        let token = self.sources().insert(state.clone());
        if let Err(err) = self.registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
        {
            self.sources().remove(token);
            return Err(err);
        }
        Ok(Connection { stream, state, token, reactor: self.clone(), scanner: Some(FrameScanner::default()) })
    }

    /// Waits up to `timeout` for readiness and wakes the tasks waiting for
    /// it; returns how many events came (0: the wait timed out).
    ///
    /// Only the runner holding the poller role calls this.
    pub(crate) fn poll(&self, timeout: Duration) -> io::Result<usize> {
        let mut poller = self.poller.lock().unwrap_or_else(|p| p.into_inner());
        let Poller { poll, events, ready } = &mut *poller;
        match poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(1),
            Err(err) => return Err(err),
        }
        let mut count = 0;
        {
            let sources = self.sources();
            for event in events.iter() {
                count += 1;
                if event.token() == WAKE_TOKEN {
                    continue;
                }
                if let Some(state) = sources.get(event.token()) {
                    // Errors and hang-ups wake both sides: the next read or
                    // write reports them. A hang-up is also remembered (see
                    // `Direction::closed`).
                    let failed = event.is_error();
                    let read_closed = event.is_read_closed() || failed;
                    let write_closed = event.is_write_closed() || failed;
                    let readable = event.is_readable() || read_closed;
                    let writable = event.is_writable() || write_closed;
                    ready.push((state.clone(), readable, writable, read_closed, write_closed));
                }
            }
        }
        for (state, readable, writable, read_closed, write_closed) in ready.drain(..) {
            if readable {
                state.read.wake(read_closed);
            }
            if writable {
                state.write.wake(write_closed);
            }
        }
        Ok(count)
    }

    /// Makes the poller's current (or next) wait return at once.
    pub(crate) fn wake(&self) {
        if let Err(err) = self.waker.wake() {
            tracing::error!(error = %err, "could not wake the runners' I/O poller");
        }
    }

    /// Ends every registered connection: shuts its socket down (the client
    /// sees the connection end) and wakes its task.
    pub(crate) fn shut_all(&self) {
        let states: Vec<Arc<IoState>> = {
            let sources = self.sources();
            let states: Vec<_> = sources.entries.iter().filter_map(|(_, s)| s.clone()).collect();
            for state in &states {
                // The descriptor is still open: a connection leaves
                // `sources` (under this lock) before its socket is closed,
                // so the number cannot name another file.
                crate::sys::shutdown_socket(state.fd);
            }
            states
        };
        // Woken after the lock is released: waking may drop a task, whose
        // connection then takes the lock to leave.
        for state in states {
            state.read.wake(true);
            state.write.wake(true);
        }
    }

    /// Enforces the header-read timeout on the connections: closes those
    /// that have waited longer than `timeout` for a request (HTTP/1), or for
    /// the rest of a preface, a frame header or a header block (HTTP/2), and
    /// asks HTTP/2 connections with no stream open for that long to close
    /// gracefully (GOAWAY). Returns how many were closed.
    ///
    /// Upgraded connections (WebSocket, CONNECT) are the app's and never
    /// cut. Called by the monitor every [`IDLE_CHECK_EVERY`].
    pub(crate) fn cut_idle(&self, timeout: Duration) -> usize {
        let now = crate::coarse::now_ms();
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut asked = Vec::new();
        let cut: Vec<Arc<IoState>> = {
            let sources = self.sources();
            let mut cut = Vec::new();
            for state in sources.entries.iter().filter_map(|(_, s)| s.as_ref()) {
                match state.verdict(now, limit) {
                    Verdict::Keep => {}
                    Verdict::Cut => cut.push(state.clone()),
                    Verdict::AskToClose => asked.push(state.clone()),
                }
            }
            for state in &cut {
                // As in `shut_all`: the descriptor is still open.
                crate::sys::shutdown_socket(state.fd);
                // Once: its task will see the end at its next read.
                state.exempt.store(true, Ordering::Relaxed);
            }
            cut
        };
        for state in &cut {
            state.read.wake(true);
            state.write.wake(true);
        }
        for state in &asked {
            state.close_asked_ms.store(now.max(1), Ordering::Relaxed);
            // Its task runs, sees the request and sends GOAWAY.
            state.read.wake(false);
        }
        if !cut.is_empty() || !asked.is_empty() {
            tracing::debug!(
                closed = cut.len(),
                asked_to_close = asked.len(),
                "connections that sent no complete request (or header block) within {:.1} s",
                timeout.as_secs_f64()
            );
        }
        cut.len()
    }

    /// Connections registered now.
    pub(crate) fn connections(&self) -> usize {
        let sources = self.sources();
        sources.entries.len() - sources.free.len()
    }

    fn sources(&self) -> MutexGuard<'_, Sources> {
        // Nothing panics while holding this lock.
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The registered connections, by token: a slab whose slots carry a
/// generation.
#[derive(Default)]
struct Sources {
    entries: Vec<(usize, Option<Arc<IoState>>)>,
    free: Vec<usize>,
}

impl Sources {
    fn insert(&mut self, state: Arc<IoState>) -> Token {
        let index = self.free.pop().unwrap_or_else(|| {
            self.entries.push((0, None));
            self.entries.len() - 1
        });
        let entry = &mut self.entries[index];
        entry.0 = (entry.0 + 1) & INDEX_MASK;
        entry.1 = Some(state);
        Token(index | entry.0 << GENERATION_SHIFT)
    }

    fn get(&self, token: Token) -> Option<&Arc<IoState>> {
        let (index, generation) = (token.0 & INDEX_MASK, token.0 >> GENERATION_SHIFT);
        match self.entries.get(index) {
            Some((g, Some(state))) if *g == generation => Some(state),
            _ => None,
        }
    }

    fn remove(&mut self, token: Token) {
        if self.get(token).is_some() {
            let index = token.0 & INDEX_MASK;
            self.entries[index].1 = None;
            self.free.push(index);
        }
    }
}

/// How often the monitor calls [`Reactor::cut_idle`]; also how late past
/// the header-read timeout a connection may be closed.
pub(crate) const IDLE_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The readiness of one connection, per direction, and what its idle watch
/// needs.
#[derive(Debug)]
struct IoState {
    /// The socket, for [`Reactor::shut_all`].
    fd: RawFd,
    read: Direction,
    write: Direction,
    /// Requests in flight: from their head until their response is done.
    busy: AtomicU32,
    /// The last write found the socket full: a response is being written.
    write_blocked: AtomicBool,
    /// [`crate::coarse::now_ms`] when the connection last began to wait for
    /// a request.
    idle_since: AtomicU64,
    /// Never cut for idling.
    exempt: AtomicBool,
    /// The connection speaks HTTP/2 (its first bytes were the preface).
    http2: AtomicBool,
    /// HTTP/2: [`crate::coarse::now_ms`] since when the client owes the rest
    /// of its preface, a frame header or a header block; 0 when it owes
    /// nothing (see [`FrameScanner`]).
    pending_since: AtomicU64,
    /// HTTP/2: when the idle watch asked the connection to close gracefully
    /// (0: not asked).
    close_asked_ms: AtomicU64,
}

/// What the idle watch does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// Shut the socket: the client is too slow, or gone.
    Cut,
    /// HTTP/2 with no stream open for too long: send GOAWAY.
    AskToClose,
}

impl IoState {
    fn new(fd: RawFd) -> Self {
        Self {
            fd,
            read: Direction::default(),
            write: Direction::default(),
            busy: AtomicU32::new(0),
            write_blocked: AtomicBool::new(false),
            idle_since: AtomicU64::new(crate::coarse::now_ms()),
            exempt: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            // An HTTP/2 connection owes its preface from the start.
            pending_since: AtomicU64::new(crate::coarse::now_ms().max(1)),
            close_asked_ms: AtomicU64::new(0),
        }
    }

    /// The idle watch's decision as of `now`, for a timeout of `limit` ms.
    fn verdict(&self, now: u64, limit: u64) -> Verdict {
        if self.exempt.load(Ordering::Relaxed) {
            return Verdict::Keep;
        }
        let since = |at: &AtomicU64| now.saturating_sub(at.load(Ordering::Relaxed));
        // Waiting for a request: none in flight, no response being written.
        let waiting = self.busy.load(Ordering::Relaxed) == 0 && !self.write_blocked.load(Ordering::Relaxed);
        if !self.http2.load(Ordering::Relaxed) {
            return if waiting && since(&self.idle_since) > limit { Verdict::Cut } else { Verdict::Keep };
        }
        // HTTP/2: a preface, frame header or header block half sent for too
        // long is cut whatever else the connection is doing (a slow stream
        // must not shelter a slowloris one).
        let pending = self.pending_since.load(Ordering::Relaxed);
        if pending != 0 && now.saturating_sub(pending) > limit {
            return Verdict::Cut;
        }
        if !waiting || since(&self.idle_since) <= limit {
            return Verdict::Keep;
        }
        match self.close_asked_ms.load(Ordering::Relaxed) {
            0 => Verdict::AskToClose,
            // Asked, and still there a timeout later: the client does not
            // close its side.
            asked if now.saturating_sub(asked) > limit => Verdict::Cut,
            _ => Verdict::Keep,
        }
    }

    /// Follows `bytes`, just read, with the connection's frame scanner,
    /// which is dropped once the connection is known not to be HTTP/2.
    fn follow(&self, scanner: &mut Option<FrameScanner>, bytes: &[u8]) {
        let Some(following) = scanner.as_mut().filter(|_| !bytes.is_empty()) else { return };
        match following.feed(bytes) {
            Sniffed::Http1 => *scanner = None,
            sniffed => self.sniffed(sniffed),
        }
    }

    /// Notes what the scanner made of the bytes just read.
    fn sniffed(&self, sniffed: Sniffed) {
        let Sniffed::Http2 { pending } = sniffed else { return };
        self.http2.store(true, Ordering::Relaxed);
        let since = self.pending_since.load(Ordering::Relaxed);
        match (pending, since) {
            (true, 0) => self.pending_since.store(crate::coarse::now_ms().max(1), Ordering::Relaxed),
            (false, since) if since != 0 => self.pending_since.store(0, Ordering::Relaxed),
            _ => {}
        }
    }

    fn became_idle(&self) {
        self.idle_since.store(crate::coarse::now_ms(), Ordering::Relaxed);
    }

    /// Notes how a write went: blocked on a full socket, or through.
    fn wrote<T>(&self, result: Poll<T>) -> Poll<T> {
        match result {
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(_) => {
                if self.write_blocked.swap(false, Ordering::Relaxed) && self.busy.load(Ordering::Relaxed) == 0
                {
                    // The last of a response went out: the wait for the
                    // next request begins now.
                    self.became_idle();
                }
            }
        }
        result
    }
}

/// A connection's handle for the code that serves its requests: tells the
/// reactor's idle watch when a request is in flight.
#[derive(Debug, Clone)]
pub(crate) struct IdleWatch {
    state: Arc<IoState>,
}

impl IdleWatch {
    /// A request head has arrived.
    pub(crate) fn request_started(&self) {
        self.state.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's response is done (or abandoned).
    pub(crate) fn request_done(&self) {
        if self.state.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.state.became_idle();
        }
    }

    /// The connection is the app's now (upgraded: a WebSocket, a CONNECT
    /// tunnel): idle periods are not for us to cut.
    pub(crate) fn exempt(&self) {
        self.state.exempt.store(true, Ordering::Relaxed);
    }

    /// The idle watch asks the connection to close gracefully (an HTTP/2
    /// connection with no stream open for the timeout).
    pub(crate) fn close_asked(&self) -> bool {
        self.state.close_asked_ms.load(Ordering::Relaxed) != 0
    }

    /// A watch for a connection served on tokio's I/O (`--no-isolation`),
    /// outside any reactor: its task applies the HTTP/2 deadlines itself
    /// (see `server::sniff`), with the same rules.
    pub(crate) fn standalone() -> Self {
        Self { state: Arc::new(IoState::new(-1)) }
    }

    /// Follows `bytes`, just read, with the connection's frame scanner (see
    /// [`FrameScanner`]).
    pub(crate) fn follow(&self, scanner: &mut Option<FrameScanner>, bytes: &[u8]) {
        self.state.follow(scanner, bytes);
    }

    /// Notes how a write went (blocked on a full socket, or through).
    pub(crate) fn wrote<T>(&self, result: Poll<T>) -> Poll<T> {
        self.state.wrote(result)
    }

    /// The connection speaks HTTP/2.
    pub(crate) fn is_http2(&self) -> bool {
        self.state.http2.load(Ordering::Relaxed)
    }

    /// What the idle watch would do now, for a timeout of `timeout`; an
    /// [`Verdict::AskToClose`] is noted as asked.
    pub(crate) fn judge(&self, timeout: Duration) -> Verdict {
        let now = crate::coarse::now_ms();
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let verdict = self.state.verdict(now, limit);
        if verdict == Verdict::AskToClose {
            self.state.close_asked_ms.store(now.max(1), Ordering::Relaxed);
        }
        verdict
    }
}

/// One direction of a connection: how many readiness events it has had,
/// whether it is known not to be ready, and the task waiting for it.
#[derive(Debug)]
struct Direction {
    events: AtomicU64,
    /// This side of the socket has been closed (the peer's FIN or reset, or
    /// our own shutdown): from now on every try reaches the socket, which
    /// answers at once (end of file, or an error). epoll reports a hang-up
    /// once, as an edge, often together with the last data: a short read of
    /// that data marks the socket drained, and without this the task would
    /// park for an event that never comes, leaving the connection in
    /// CLOSE-WAIT and its handler running for a client that has gone.
    closed: AtomicBool,
    /// The event count at which the socket was last found drained (a
    /// `WouldBlock`, or a short read or write); [`READY`] if it was not.
    /// While no event has come since, trying the socket is a wasted
    /// syscall.
    drained_at: AtomicU64,
    waiter: Mutex<Option<Waker>>,
}

/// [`Direction::drained_at`] when the socket is worth trying.
const READY: u64 = u64::MAX;

impl Default for Direction {
    fn default() -> Self {
        // A new connection is tried at once: its request is usually already
        // on the wire, so waiting for the first event would cost a wake-up.
        Self {
            events: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            drained_at: AtomicU64::new(READY),
            waiter: Mutex::new(None),
        }
    }
}

impl Direction {
    /// A readiness event (`closed`: a hang-up or an error came with it).
    fn wake(&self, closed: bool) {
        if closed {
            // Before the count: a task that sees the new count sees this.
            self.closed.store(true, Ordering::SeqCst);
        }
        // Count first, then look for a waiter: a task that registers itself
        // after this either is found here or sees the new count (see
        // `poll_io`).
        self.events.fetch_add(1, Ordering::SeqCst);
        let waiter = self.waiter.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(waker) = waiter {
            waker.wake();
        }
    }

    /// Runs a non-blocking `op` (which reports how many bytes it moved and
    /// whether that was all it was asked for); while the socket is drained,
    /// parks the task until the next readiness event of this direction.
    ///
    /// epoll is edge-triggered, so the one thing to get right is not to
    /// miss an edge between finding the socket drained and parking: the
    /// event count, read before the syscall and again after the waker is
    /// stored, guarantees it.
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<(usize, bool)>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let seen = self.events.load(Ordering::SeqCst);
            if self.drained_at.load(Ordering::Relaxed) != seen || self.closed.load(Ordering::SeqCst) {
                match op() {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Ok((moved, short)) => {
                        // Fewer bytes than asked: the kernel's buffer is
                        // drained (or full), so the next try would block.
                        if short && moved > 0 {
                            self.drained_at.store(seen, Ordering::Relaxed);
                        }
                        return Poll::Ready(Ok(moved));
                    }
                    Err(err) => return Poll::Ready(Err(err)),
                }
                self.drained_at.store(seen, Ordering::Relaxed);
            }
            let mut waiter = self.waiter.lock().unwrap_or_else(|p| p.into_inner());
            match waiter.as_mut() {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *waiter = Some(cx.waker().clone()),
            }
            if self.events.load(Ordering::SeqCst) == seen {
                return Poll::Pending;
            }
            // An event came in meanwhile: try again.
        }
    }
}

/// A TCP connection served on the runners, registered with their reactor.
pub(crate) struct Connection {
    stream: mio::net::TcpStream,
    state: Arc<IoState>,
    token: Token,
    reactor: Arc<Reactor>,
    /// Follows the incoming bytes while the connection may be HTTP/2; `None`
    /// once it is known not to be.
    scanner: Option<FrameScanner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("stream", &self.stream).finish_non_exhaustive()
    }
}

impl Connection {
    /// The handle for the code serving this connection's requests.
    pub(crate) fn idle_watch(&self) -> IdleWatch {
        IdleWatch { state: self.state.clone() }
    }

    /// Reads what the socket has, as far as `buf`'s spare room goes (grown
    /// by `grow` bytes if it has none), onto the end of `buf`; `Ok(0)` is
    /// the end of the peer's data. For fastlane's own HTTP/1
    /// (`server::http1`), which keeps its bytes in a `BytesMut` rather than
    /// hyper's buffer.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
        grow: usize,
    ) -> Poll<io::Result<usize>> {
        let fd = self.stream.as_fd();
        let (state, scanner) = (&self.state, &mut self.scanner);
        state.read.poll_io(cx, || {
            let (n, asked) = crate::sys::recv_appending(fd, buf, grow, |bytes| state.follow(scanner, bytes))?;
            Ok((n, n < asked))
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the socket would remove it from the epoll set anyway; the
        // explicit removal also covers a descriptor duplicated elsewhere.
        let _ = self.reactor.registry.deregister(&mut self.stream);
        self.reactor.sources().remove(self.token);
    }
}

impl hyper::rt::Read for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.stream.as_fd();
        let len = buf.remaining();
        let (state, scanner) = (&this.state, &mut this.scanner);
        let read = state.read.poll_io(cx, || {
            // Read straight into hyper's buffer (not zeroed first); the
            // bytes are followed while the connection may be HTTP/2.
            let n = crate::sys::read_into(fd, &mut buf, |bytes| state.follow(scanner, bytes))?;
            Ok((n, n < len))
        });
        ready!(read)?;
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let fd = this.stream.as_fd();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        this.state
            .wrote(this.state.write.poll_io(cx, || crate::sys::send_vectored(fd, bufs).map(|n| (n, n < len))))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream.shutdown(Shutdown::Write) {
            // The peer has already gone: there is nothing left to shut.
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            result => Poll::Ready(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_tokens_do_not_reach_a_reused_slot() {
        let mut sources = Sources::default();
        let first = sources.insert(Arc::new(IoState::new(-1)));
        sources.remove(first);
        let second = sources.insert(Arc::new(IoState::new(-1)));
        assert_eq!(first.0 & INDEX_MASK, second.0 & INDEX_MASK, "the slot is reused");
        assert!(sources.get(first).is_none(), "an event for the closed connection is dropped");
        assert!(sources.get(second).is_some());
        sources.remove(first);
        assert!(sources.get(second).is_some(), "removing a stale token leaves the new one");
    }

    #[test]
    fn a_connection_waits_only_with_no_request_in_flight_and_no_response_blocked() {
        crate::coarse::tick();
        let state = Arc::new(IoState::new(-1));
        let watch = IdleWatch { state: state.clone() };
        let now = crate::coarse::now_ms();
        let later = now + 50;
        assert_eq!(state.verdict(later, 40), Verdict::Cut, "a new connection waits for its first request");
        assert_eq!(state.verdict(later, 60), Verdict::Keep, "within the limit");
        watch.request_started();
        assert_eq!(state.verdict(later, 40), Verdict::Keep, "a request is in flight");
        watch.request_done();
        assert_eq!(state.verdict(later, 40), Verdict::Cut);
        // A response too big for the socket's buffer is being written.
        let _ = state.wrote(Poll::<()>::Pending);
        assert_eq!(state.verdict(later, 40), Verdict::Keep);
        let _ = state.wrote(Poll::Ready(()));
        assert_eq!(state.verdict(later, 40), Verdict::Cut);
        watch.exempt();
        assert_eq!(state.verdict(later, 40), Verdict::Keep, "upgraded connections are never cut");
    }

    #[test]
    fn an_http2_connection_is_cut_for_a_late_header_block_and_asked_to_close_when_idle() {
        crate::coarse::tick();
        let state = Arc::new(IoState::new(-1));
        let watch = IdleWatch { state: state.clone() };
        let now = crate::coarse::now_ms();
        // Only the start of the preface: owed since the connection began.
        state.sniffed(Sniffed::Http2 { pending: true });
        assert_eq!(state.verdict(now + 50, 40), Verdict::Cut);
        // Preface and SETTINGS whole, a stream open.
        state.sniffed(Sniffed::Http2 { pending: false });
        watch.request_started();
        assert_eq!(state.verdict(now + 50, 40), Verdict::Keep);
        // A second stream's header block half sent: cut once it is late,
        // although the first stream is busy.
        state.sniffed(Sniffed::Http2 { pending: true });
        let pending_since = state.pending_since.load(Ordering::Relaxed);
        assert_eq!(state.verdict(pending_since + 30, 40), Verdict::Keep);
        assert_eq!(state.verdict(pending_since + 50, 40), Verdict::Cut);
        state.sniffed(Sniffed::Http2 { pending: false });
        watch.request_done();
        let idle_since = state.idle_since.load(Ordering::Relaxed);
        assert_eq!(state.verdict(idle_since + 30, 40), Verdict::Keep);
        assert_eq!(state.verdict(idle_since + 50, 40), Verdict::AskToClose, "idle: GOAWAY");
        state.close_asked_ms.store(idle_since + 50, Ordering::Relaxed);
        assert!(watch.close_asked());
        assert_eq!(state.verdict(idle_since + 60, 40), Verdict::Keep, "given time to close");
        assert_eq!(state.verdict(idle_since + 100, 40), Verdict::Cut, "and cut if it does not");
    }
}
