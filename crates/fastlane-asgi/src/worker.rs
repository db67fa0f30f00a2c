//! One Python worker process as the front sees it: its socket (a writer
//! task, a reader task), its requests in flight, and what the monitor knows
//! of its event loop.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::frame;
use crate::mailbox::{Event, Mailbox};
use crate::wire::{FrameReader, Outbox};

/// Requests a worker may hold that it has not started. A loop that blocks
/// strands at most this many behind it; the rest go to other workers.
pub(crate) const UNSTARTED_SLOTS: usize = 16;

/// Offsets in the file shared with a worker (little endian `u64`s).
const TICKS_AT: u64 = 0;
const STARTED_AT: u64 = 8;
const REVOKED_AT: u64 = 16;

/// A request in flight on a worker.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) events: Arc<Mailbox>,
    /// `GET /path`: what the logs show, and what suspects are kept under.
    pub(crate) key: String,
    pub(crate) since: Instant,
    /// Its response has ended; what runs now is its background work.
    pub(crate) answered: bool,
    /// The id of the request (its access log line's, its response's).
    pub(crate) request_id: Option<fastlane::RequestId>,
}

/// A request in flight on a worker, as the logs name it.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    /// `GET /path`.
    pub(crate) line: String,
    /// Its response has ended; what runs now is its background work.
    pub(crate) answered: bool,
    pub(crate) request_id: Option<fastlane::RequestId>,
}

impl Entry {
    fn in_flight(&self) -> InFlight {
        InFlight { line: self.key.clone(), answered: self.answered, request_id: self.request_id.clone() }
    }
}

/// One worker process.
#[derive(Debug)]
pub(crate) struct Worker {
    /// Its number in the logs (`worker 2`): 1, 2, ... in start order.
    pub(crate) number: u32,
    pub(crate) pid: u32,
    /// The generation of the zygote it was forked from (one more per reload).
    pub(crate) generation: u32,
    out: Arc<Outbox>,
    pub(crate) requests: Mutex<HashMap<u32, Entry>>,
    /// Ids are given out and their frames queued under this lock, so the
    /// worker receives (and starts) them in id order: "started up to N"
    /// then says which ones have not started.
    next_id: Mutex<u32>,
    /// Requests sent and not done (background tasks included).
    pub(crate) in_flight: AtomicUsize,
    /// Requests sent that the worker has not said it started.
    pub(crate) unstarted: AtomicUsize,
    /// The monitor saw its loop stop ticking and it has not ticked since.
    pub(crate) stalled: AtomicBool,
    /// Requests in flight on it whose path is suspect (counted by the
    /// monitor each millisecond): a loop about to block. Other requests go
    /// to workers without any while there are some.
    pub(crate) tainted: AtomicUsize,
    /// When it was last sent a suspect request, in ms since it started
    /// (`u64::MAX`: never).
    suspect_at: std::sync::atomic::AtomicU64,
    /// Its loop thread runs at a lowered priority (it spun the CPU).
    pub(crate) demoted: AtomicBool,
    /// Its loop has been stalled for twice the threshold (not merely slow to
    /// tick on a loaded machine): a spare may start for it.
    pub(crate) long_stall: AtomicBool,
    /// Told to stop (shutdown, or a spare retiring): no new requests.
    pub(crate) closing: AtomicBool,
    /// Its socket has closed.
    pub(crate) gone: AtomicBool,
    /// The file shared with the worker: its tick counter, the last id it
    /// started, and the range of ids taken back (see `python/fastlane_worker.py`).
    shared: File,
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
        generation: u32,
        out: Arc<Outbox>,
        shared: File,
        watchdog: Option<std::os::unix::net::UnixStream>,
    ) -> Self {
        Self {
            number,
            pid,
            generation,
            out,
            requests: Mutex::new(HashMap::new()),
            next_id: Mutex::new(1),
            in_flight: AtomicUsize::new(0),
            unstarted: AtomicUsize::new(0),
            tainted: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            suspect_at: std::sync::atomic::AtomicU64::new(u64::MAX),
            demoted: AtomicBool::new(false),
            long_stall: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            shared,
            watchdog: Mutex::new(watchdog),
            started: Instant::now(),
            bye: Mutex::new(None),
        }
    }

    /// Queues a frame for the worker (dropped if it is gone).
    pub(crate) fn send(&self, kind: u8, id: u32, payload: &[u8]) {
        self.out.push(|buf| frame::put(buf, kind, id, payload));
    }

    /// Queues a body frame.
    pub(crate) fn send_data(&self, kind: u8, id: u32, more: bool, data: &[u8]) {
        self.out.push(|buf| frame::put_data(buf, kind, id, more, data));
    }

    /// Queues a frame whose payload is one `u32`.
    pub(crate) fn send_u32(&self, kind: u8, id: u32, value: u32) {
        self.out.push(|buf| frame::put_u32(buf, kind, id, value));
    }

    /// Asks the worker to stop within `grace`; it takes no new requests.
    pub(crate) fn retire(&self, grace: std::time::Duration) {
        self.closing.store(true, Ordering::Relaxed);
        let ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        self.send_u32(frame::SHUTDOWN, 0, ms);
    }

    /// Counts its requests in flight whose key `suspect` says is suspect.
    pub(crate) fn count_tainted(&self, suspect: impl Fn(&str) -> bool) -> usize {
        let requests = self.requests.lock().expect("worker requests lock");
        requests.values().filter(|e| suspect(&e.key)).count()
    }

    /// Whether it was sent a suspect request in the last 10 s.
    pub(crate) fn hosted_suspect_lately(&self) -> bool {
        let at = self.suspect_at.load(Ordering::Relaxed);
        at != u64::MAX && (self.started.elapsed().as_millis() as u64).saturating_sub(at) < 10_000
    }

    /// Whether it runs no suspect request.
    pub(crate) fn is_clean(&self) -> bool {
        self.tainted.load(Ordering::Relaxed) == 0
    }

    /// Whether a new request may go to this worker now.
    pub(crate) fn takes_requests(&self) -> bool {
        !self.stalled.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed)
            && !self.gone.load(Ordering::Relaxed)
            && self.unstarted.load(Ordering::Relaxed) < UNSTARTED_SLOTS
    }

    /// Registers a request and sends it: `head` is its request frame.
    pub(crate) fn dispatch(
        &self,
        kind: u8,
        key: String,
        suspect: bool,
        payload: &[u8],
        request_id: Option<fastlane::RequestId>,
    ) -> (u32, Arc<Mailbox>) {
        let events = Arc::new(Mailbox::default());
        if suspect {
            // At once, before the monitor's next count: nothing else may
            // queue behind it meanwhile.
            self.tainted.fetch_add(1, Ordering::Relaxed);
            let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.suspect_at.store(now, Ordering::Relaxed);
        }
        let entry = Entry { events: events.clone(), key, since: Instant::now(), answered: false, request_id };
        let mut next_id = self.next_id.lock().expect("worker id lock");
        let id = *next_id;
        *next_id += 1;
        self.requests.lock().expect("worker requests lock").insert(id, entry);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.unstarted.fetch_add(1, Ordering::Relaxed);
        self.out.push(|buf| frame::put(buf, kind, id, payload));
        drop(next_id);
        (id, events)
    }

    /// Takes back the requests sent to this worker that it has not started
    /// (its loop is blocked): their exchanges are told to go elsewhere.
    /// Returns how many, or `None` if the worker holds the lock right now
    /// (the monitor tries again a millisecond later).
    ///
    /// Under the shared file's lock, and only while the loop's tick counter
    /// still reads `stalled_at`, the worker either has started a request (and
    /// said so in the file) or will see it revoked there when its task comes
    /// to start: never both, so it runs once.
    pub(crate) fn revoke_unstarted(&self, stalled_at: u64) -> Option<usize> {
        let next_id = self.next_id.lock().expect("worker id lock");
        let last_sent = u64::from(*next_id - 1);
        self.shared.try_lock().ok()?;
        let revoked = (|| -> std::io::Result<Option<(u64, u64)>> {
            let mut buf = [0u8; 8];
            // The loop must still be stuck: once it ticks again, its claims
            // may skip the lock (see `claim` in the worker).
            self.shared.read_exact_at(&mut buf, TICKS_AT)?;
            if u64::from_le_bytes(buf) != stalled_at {
                return Ok(None);
            }
            self.shared.read_exact_at(&mut buf, STARTED_AT)?;
            let started = u64::from_le_bytes(buf);
            if started >= last_sent {
                return Ok(None);
            }
            let mut range = [0u8; 16];
            range[..8].copy_from_slice(&(started + 1).to_le_bytes());
            range[8..].copy_from_slice(&last_sent.to_le_bytes());
            self.shared.write_all_at(&range, REVOKED_AT)?;
            Ok(Some((started + 1, last_sent)))
        })();
        let _ = self.shared.unlock();
        drop(next_id);
        let (first, last) = revoked.ok()??;
        let mut requests = self.requests.lock().expect("worker requests lock");
        let mut n = 0;
        for id in first..=last {
            let Ok(id) = u32::try_from(id) else { continue };
            if let Some(entry) = requests.remove(&id) {
                entry.events.put(Event::Revoked);
                n += 1;
            }
        }
        drop(requests);
        self.in_flight.fetch_sub(n, Ordering::Relaxed);
        let _ =
            self.unstarted.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
        Some(n)
    }

    /// CPU time its event loop thread (the process's main thread) has used,
    /// in nanoseconds, from `/proc`.
    pub(crate) fn loop_cpu_ns(&self) -> Option<u64> {
        self.loop_sched().map(|(cpu, _)| cpu)
    }

    /// The loop thread's CPU time and its time spent runnable but waiting
    /// for a CPU, in nanoseconds (the kernel's schedstat).
    pub(crate) fn loop_sched(&self) -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{0}/task/{0}/schedstat", self.pid)).ok()?;
        let mut fields = stat.split_whitespace().map(str::parse::<u64>);
        Some((fields.next()?.ok()?, fields.next()?.ok()?))
    }

    /// The loop's tick counter, read from the file the worker maps.
    pub(crate) fn ticks(&self) -> Option<u64> {
        let mut buf = [0u8; 8];
        self.shared.read_exact_at(&mut buf, TICKS_AT).ok()?;
        Some(u64::from_le_bytes(buf))
    }

    /// Request `id`, if it is still in flight.
    pub(crate) fn describe(&self, id: u32) -> Option<InFlight> {
        let requests = self.requests.lock().expect("worker requests lock");
        requests.get(&id).map(Entry::in_flight)
    }

    /// The requests in flight, oldest first, as `GET /x`.
    pub(crate) fn in_flight_list(&self) -> Vec<String> {
        self.in_flight_entries().into_iter().map(|r| r.line).collect()
    }

    /// The requests in flight, oldest first.
    pub(crate) fn in_flight_entries(&self) -> Vec<InFlight> {
        let requests = self.requests.lock().expect("worker requests lock");
        let mut list: Vec<_> = requests.values().collect();
        list.sort_by_key(|e| e.since);
        list.into_iter().map(Entry::in_flight).collect()
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
            frame::WS_ACCEPT => Event::WsAccept(payload),
            frame::WS_CLOSE => Event::WsClose(payload),
            frame::WS_TEXT => Event::WsMessage(payload, true),
            frame::WS_BYTES => Event::WsMessage(payload, false),
            frame::WS_TAKEN if payload.len() == 4 => {
                Event::WsTaken(u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]))
            }
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
                if let Some(entry) = entry {
                    entry.events.close();
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
            entry.events.put(event);
        }
    }
    worker.gone.store(true, Ordering::Relaxed);
    let lost: Vec<_> = worker.requests.lock().expect("worker requests lock").drain().collect();
    worker.in_flight.store(0, Ordering::Relaxed);
    for (_, entry) in lost {
        entry.events.put(Event::Lost);
        entry.events.close();
    }
    worker.out.close();
    changed();
}
