//! One Python worker process as the front sees it: its socket (a writer
//! task, a reader task), its requests in flight, and what the monitor knows
//! of its event loop.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::frame;

/// Requests a worker may hold that it has not started. A loop that blocks
/// strands at most this many behind it; the rest go to other workers.
pub(crate) const UNSTARTED_SLOTS: usize = 16;

/// What the worker said about one request, for the request's own task.
#[derive(Debug)]
pub(crate) enum Event {
    /// `http.response.start` (the marshal payload, decoded by the receiver).
    Start(Bytes),
    /// Response body; more follows when the flag is set.
    Chunk(Bytes, bool),
    /// The app wants more request body.
    WantBody,
    /// The app failed after starting its response.
    Reset,
    /// The worker went away.
    Lost,
}

/// A request in flight on a worker.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) method: http::Method,
    pub(crate) path: String,
    pub(crate) since: Instant,
    /// Its response has ended; what runs now is its background work.
    pub(crate) answered: bool,
}

/// One worker process.
#[derive(Debug)]
pub(crate) struct Worker {
    /// Its number in the logs (`worker 2`): 1, 2, ... in start order.
    pub(crate) number: u32,
    pub(crate) pid: u32,
    out: mpsc::UnboundedSender<Bytes>,
    pub(crate) requests: Mutex<HashMap<u32, Entry>>,
    next_id: AtomicU32,
    /// Requests sent and not done (background tasks included).
    pub(crate) in_flight: AtomicUsize,
    /// Requests sent that the worker has not said it started.
    pub(crate) unstarted: AtomicUsize,
    /// The monitor saw its loop stop ticking and it has not ticked since.
    pub(crate) stalled: AtomicBool,
    /// Told to stop (shutdown, or a spare retiring): no new requests.
    pub(crate) closing: AtomicBool,
    /// Its socket has closed.
    pub(crate) gone: AtomicBool,
    ticks: File,
    /// The watchdog thread's socket, for the loop's stack during a stall.
    pub(crate) watchdog: Mutex<Option<std::os::unix::net::UnixStream>>,
    pub(crate) started: Instant,
    /// What the worker reported when it stopped: the work it cut.
    pub(crate) bye: Mutex<Option<Vec<String>>>,
}

impl Worker {
    pub(crate) fn new(
        number: u32,
        pid: u32,
        out: mpsc::UnboundedSender<Bytes>,
        ticks: File,
        watchdog: Option<std::os::unix::net::UnixStream>,
    ) -> Self {
        Self {
            number,
            pid,
            out,
            requests: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            in_flight: AtomicUsize::new(0),
            unstarted: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            ticks,
            watchdog: Mutex::new(watchdog),
            started: Instant::now(),
            bye: Mutex::new(None),
        }
    }

    /// Sends a frame (queued for the writer task; dropped if the worker is gone).
    pub(crate) fn send(&self, frame: Bytes) {
        let _ = self.out.send(frame);
    }

    /// Asks the worker to stop within `grace`; it takes no new requests.
    pub(crate) fn retire(&self, grace: std::time::Duration) {
        self.closing.store(true, Ordering::Relaxed);
        let ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        self.send(frame::encode_u32(frame::SHUTDOWN, 0, ms));
    }

    /// Whether a new request may go to this worker now.
    pub(crate) fn takes_requests(&self) -> bool {
        !self.stalled.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed)
            && !self.gone.load(Ordering::Relaxed)
            && self.unstarted.load(Ordering::Relaxed) < UNSTARTED_SLOTS
    }

    /// Registers a request and returns its id; the caller sends it.
    pub(crate) fn register(
        &self,
        method: http::Method,
        path: String,
    ) -> (u32, mpsc::UnboundedReceiver<Event>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::unbounded_channel();
        let entry = Entry { events, method, path, since: Instant::now(), answered: false };
        self.requests.lock().expect("worker requests lock").insert(id, entry);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.unstarted.fetch_add(1, Ordering::Relaxed);
        (id, rx)
    }

    /// The loop's tick counter, read from the file the worker maps.
    pub(crate) fn ticks(&self) -> Option<u64> {
        let mut buf = [0u8; 8];
        self.ticks.read_exact_at(&mut buf, 0).ok()?;
        Some(u64::from_le_bytes(buf))
    }

    /// `GET /x` of request `id`, if it is still in flight.
    pub(crate) fn describe(&self, id: u32) -> Option<(String, bool)> {
        let requests = self.requests.lock().expect("worker requests lock");
        requests.get(&id).map(|e| (format!("{} {}", e.method, e.path), e.answered))
    }

    /// The requests in flight, oldest first, as `GET /x`.
    pub(crate) fn in_flight_list(&self) -> Vec<String> {
        self.in_flight_entries().into_iter().map(|(what, _)| what).collect()
    }

    /// The requests in flight, oldest first, as `GET /x` and whether their
    /// response has ended (background work runs).
    pub(crate) fn in_flight_entries(&self) -> Vec<(String, bool)> {
        let requests = self.requests.lock().expect("worker requests lock");
        let mut list: Vec<_> =
            requests.values().map(|e| (e.since, format!("{} {}", e.method, e.path), e.answered)).collect();
        list.sort();
        list.into_iter().map(|(_, what, answered)| (what, answered)).collect()
    }
}

/// Writes the frames queued for a worker, as many per write as are queued.
pub(crate) async fn write_frames(mut sock: OwnedWriteHalf, mut frames: mpsc::UnboundedReceiver<Bytes>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = frames.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < 1024 * 1024 {
            match frames.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if sock.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// Reads frames off a Unix socket.
#[derive(Debug)]
pub(crate) struct FrameReader {
    sock: tokio::io::BufReader<OwnedReadHalf>,
}

impl FrameReader {
    pub(crate) fn new(sock: OwnedReadHalf) -> Self {
        Self { sock: tokio::io::BufReader::with_capacity(64 * 1024, sock) }
    }

    /// The socket back (what it buffered is lost: call only between frames
    /// that the peer sends one at a time).
    pub(crate) fn into_inner(self) -> OwnedReadHalf {
        self.sock.into_inner()
    }

    /// The next frame, or `None` at the end of the stream (or a broken one).
    pub(crate) async fn next(&mut self) -> Option<(u8, u32, Bytes)> {
        let mut header = [0u8; frame::HEADER];
        self.sock.read_exact(&mut header).await.ok()?;
        let (len, kind, id) = frame::parse_header(&header);
        let mut payload = BytesMut::zeroed(len);
        self.sock.read_exact(&mut payload).await.ok()?;
        Some((kind, id, payload.freeze()))
    }
}

/// Reads a worker's frames until its socket closes; hands each to its
/// request. `changed` is called when the worker can take more requests.
pub(crate) async fn read_frames(worker: Arc<Worker>, mut reader: FrameReader, changed: impl Fn()) {
    while let Some((kind, id, payload)) = reader.next().await {
        let event = match kind {
            frame::START => Event::Start(payload),
            frame::CHUNK if !payload.is_empty() => {
                let more = payload[0] & frame::MORE != 0;
                if !more {
                    if let Some(entry) = worker.requests.lock().expect("worker requests lock").get_mut(&id) {
                        entry.answered = true;
                    }
                }
                Event::Chunk(payload.slice(1..), more)
            }
            frame::WANT_BODY => Event::WantBody,
            frame::RESET => Event::Reset,
            frame::SLOTS if payload.len() == 4 => {
                let n = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
                let _ = worker
                    .unstarted
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
                changed();
                continue;
            }
            frame::DONE => {
                let entry = worker.requests.lock().expect("worker requests lock").remove(&id);
                if entry.is_some() {
                    worker.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                changed();
                continue;
            }
            frame::BYE => {
                #[derive(serde::Deserialize)]
                struct Bye {
                    cut: Vec<String>,
                }
                let cut = serde_json::from_slice::<Bye>(&payload).map(|b| b.cut).unwrap_or_default();
                *worker.bye.lock().expect("worker bye lock") = Some(cut);
                continue;
            }
            _ => {
                tracing::debug!(kind, worker = worker.number, "unexpected frame from a worker; ignored");
                continue;
            }
        };
        let requests = worker.requests.lock().expect("worker requests lock");
        if let Some(entry) = requests.get(&id) {
            let _ = entry.events.send(event);
        }
    }
    worker.gone.store(true, Ordering::Relaxed);
    let lost: Vec<_> = worker.requests.lock().expect("worker requests lock").drain().collect();
    worker.in_flight.store(0, Ordering::Relaxed);
    for (_, entry) in lost {
        let _ = entry.events.send(Event::Lost);
    }
    changed();
}
