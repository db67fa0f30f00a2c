//! What is in flight: requests, background tasks, connections.
//!
//! Graceful shutdown waits on this, and what is still here when the grace
//! period ends is what gets reported as cut. A std `Mutex` is right here: the
//! critical sections are a map insert or remove and never cross an `.await`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::report::CutWork;
use crate::executor::RouteInfo;

#[derive(Debug)]
struct Entry {
    route: Arc<RouteInfo>,
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
}

impl Slab {
    fn insert(&mut self, entry: Entry) -> u64 {
        self.len += 1;
        match self.free.pop() {
            Some(index) => {
                self.entries[index] = Some(entry);
                index as u64
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u64
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(slot) = self.entries.get_mut(id as usize) {
            if slot.take().is_some() {
                self.len -= 1;
                self.free.push(id as usize);
            }
        }
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(id as usize)?.as_mut()
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().flatten()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    requests: Mutex<Slab>,
    tasks: Mutex<Slab>,
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
    pub(crate) fn add_request(&self, route: &Arc<RouteInfo>, now: Instant) -> u64 {
        let entry = Entry { route: route.clone(), lane: "async", since: now, started: Some(now) };
        lock(&self.requests).insert(entry)
    }

    pub(crate) fn remove_request(&self, id: u64) {
        lock(&self.requests).remove(id);
        self.changed_if_draining();
    }

    pub(crate) fn add_task(&self, route: &Arc<RouteInfo>, lane: &'static str) -> u64 {
        let entry = Entry { route: route.clone(), lane, since: Instant::now(), started: None };
        lock(&self.tasks).insert(entry)
    }

    pub(crate) fn task_started(&self, id: u64) {
        if let Some(entry) = lock(&self.tasks).get_mut(id) {
            entry.started = Some(Instant::now());
        }
    }

    pub(crate) fn remove_task(&self, id: u64) {
        lock(&self.tasks).remove(id);
        self.changed_if_draining();
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.changed_if_draining();
    }

    pub(crate) fn requests_in_flight(&self) -> usize {
        lock(&self.requests).len
    }

    pub(crate) fn tasks_pending(&self) -> usize {
        lock(&self.tasks).len
    }

    fn is_idle(&self) -> bool {
        self.connections.load(Ordering::Relaxed) == 0
            && lock(&self.requests).len == 0
            && lock(&self.tasks).len == 0
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
    pub(crate) fn snapshot(&self) -> (Vec<CutWork>, Vec<CutWork>) {
        let now = Instant::now();
        let describe = |e: &Entry, kind| CutWork {
            kind,
            method: e.route.method.to_string(),
            route: e.route.route.to_string(),
            lane: e.lane,
            running_for: e.started.map(|s| now.saturating_duration_since(s)),
            waiting_for: e.started.unwrap_or(now).saturating_duration_since(e.since),
        };
        let mut requests: Vec<_> = lock(&self.requests).values().map(|e| describe(e, "request")).collect();
        let mut tasks: Vec<_> = lock(&self.tasks).values().map(|e| describe(e, "background task")).collect();
        let longest_first = |a: &CutWork, b: &CutWork| {
            b.running_for.unwrap_or(Duration::ZERO).cmp(&a.running_for.unwrap_or(Duration::ZERO))
        };
        requests.sort_by(longest_first);
        tasks.sort_by(longest_first);
        (requests, tasks)
    }
}
