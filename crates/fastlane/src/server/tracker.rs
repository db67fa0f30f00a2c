//! What is in flight: requests, background tasks, connections.
//!
//! Graceful shutdown waits on this, and what is still here when the grace
//! period ends is what gets reported as cut. A std `Mutex` is right here: the
//! critical sections are a map insert or remove and never cross an `.await`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::routes::{RouteInfo, RouteTable};
use crate::shutdown::CutWork;

#[derive(Debug)]
struct Entry {
    /// The route's id in the server's [`RouteTable`]: an id, not an `Arc`,
    /// so that tracking a request does not touch a reference count that
    /// every thread serving the route shares.
    route: u32,
    lane: &'static str,
    since: Instant,
    started: Option<Instant>,
}

/// Entries addressed by their index, reused once removed: no hashing and
/// no allocation once warm.
#[derive(Debug, Default)]
struct Slab {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    len: usize,
    /// Entries ever inserted.
    added: u64,
}

impl Slab {
    fn insert(&mut self, entry: Entry) -> usize {
        self.len += 1;
        self.added += 1;
        match self.free.pop() {
            Some(index) => {
                self.entries[index] = Some(entry);
                index
            }
            None => {
                self.entries.push(Some(entry));
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, index: usize) {
        if let Some(slot) = self.entries.get_mut(index) {
            if slot.take().is_some() {
                self.len -= 1;
                self.free.push(index);
            }
        }
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Entry> {
        self.entries.get_mut(index)?.as_mut()
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().flatten()
    }
}

/// Slabs per kind of work: each thread uses its own (by a number given to
/// it on first use), so that threads serving requests side by side do not
/// take turns at one lock.
const SHARDS: usize = 8;

/// One slab per cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Shard(Mutex<Slab>);

/// A set of entries spread over [`SHARDS`] slabs. An id is `index * SHARDS
/// + shard`, so removal finds the right slab from any thread.
#[derive(Debug, Default)]
struct Sharded {
    shards: [Shard; SHARDS],
}

impl Sharded {
    fn insert(&self, entry: Entry) -> u64 {
        let shard = crate::coarse::thread_number() % SHARDS;
        let index = lock(&self.shards[shard].0).insert(entry);
        (index * SHARDS + shard) as u64
    }

    fn with<R>(&self, id: u64, f: impl FnOnce(&mut Slab, usize) -> R) -> R {
        let id = id as usize;
        f(&mut lock(&self.shards[id % SHARDS].0), id / SHARDS)
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).len).sum()
    }

    fn added(&self) -> u64 {
        self.shards.iter().map(|s| lock(&s.0).added).sum()
    }

    fn describe(&self, f: impl Fn(&Entry) -> CutWork) -> Vec<CutWork> {
        self.shards.iter().flat_map(|s| lock(&s.0).values().map(&f).collect::<Vec<_>>()).collect()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    requests: Sharded,
    tasks: Sharded,
    connections: AtomicUsize,
    changed: Notify,
    /// Set once shutdown waits on [`idle`](Self::idle): only then do
    /// removals need to wake anyone (waking costs a lock per request).
    draining: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks; recover the data if one did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    pub(crate) fn add_request(&self, route: &RouteInfo, now: Instant) -> u64 {
        self.requests.insert(Entry { route: route.id, lane: "async", since: now, started: Some(now) })
    }

    pub(crate) fn remove_request(&self, id: u64) {
        self.requests.with(id, |slab, index| slab.remove(index));
        self.changed_if_draining();
    }

    /// Requests received so far (for `--max-requests`).
    pub(crate) fn requests_received(&self) -> u64 {
        self.requests.added()
    }

    pub(crate) fn add_task(&self, route: &RouteInfo, lane: &'static str) -> u64 {
        self.tasks.insert(Entry { route: route.id, lane, since: Instant::now(), started: None })
    }

    pub(crate) fn task_started(&self, id: u64) {
        self.tasks.with(id, |slab, index| {
            if let Some(entry) = slab.get_mut(index) {
                entry.started = Some(Instant::now());
            }
        });
    }

    pub(crate) fn remove_task(&self, id: u64) {
        self.tasks.with(id, |slab, index| slab.remove(index));
        self.changed_if_draining();
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.changed_if_draining();
    }

    pub(crate) fn connections_open(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn requests_in_flight(&self) -> usize {
        self.requests.len()
    }

    pub(crate) fn tasks_pending(&self) -> usize {
        self.tasks.len()
    }

    fn is_idle(&self) -> bool {
        self.connections.load(Ordering::Relaxed) == 0 && self.requests.len() == 0 && self.tasks.len() == 0
    }

    fn changed_if_draining(&self) {
        if self.draining.load(Ordering::Acquire) {
            self.changed.notify_waiters();
        }
    }

    /// Waits until no connection, request or background task is left.
    pub(crate) async fn idle(&self) {
        self.draining.store(true, Ordering::Release);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Register before checking, so a change in between is not missed.
            changed.as_mut().enable();
            if self.is_idle() {
                return;
            }
            changed.await;
        }
    }

    /// What is still running, for the shutdown report.
    pub(crate) fn snapshot(&self, routes: &RouteTable) -> (Vec<CutWork>, Vec<CutWork>) {
        let now = Instant::now();
        let describe = |e: &Entry, kind| {
            let (method, route) = match routes.by_id(e.route) {
                Some(info) => (info.method.to_string(), info.route.to_string()),
                None => ("?".to_owned(), "?".to_owned()),
            };
            CutWork {
                kind,
                method,
                route,
                lane: e.lane,
                running_for: e.started.map(|s| now.saturating_duration_since(s)),
                waiting_for: e.started.unwrap_or(now).saturating_duration_since(e.since),
            }
        };
        let mut requests = self.requests.describe(|e| describe(e, "request"));
        let mut tasks = self.tasks.describe(|e| describe(e, "background task"));
        let longest_first = |a: &CutWork, b: &CutWork| {
            b.running_for.unwrap_or(Duration::ZERO).cmp(&a.running_for.unwrap_or(Duration::ZERO))
        };
        requests.sort_by(longest_first);
        tasks.sort_by(longest_first);
        (requests, tasks)
    }
}
