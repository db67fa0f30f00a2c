//! What is in flight: requests, background tasks, connections.
//!
//! Graceful shutdown waits on this, and what is still here when the grace
//! period ends is what gets reported as cut. A std `Mutex` is right here: the
//! critical sections are a map insert or remove and never cross an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::report::CutWork;

#[derive(Debug)]
struct Entry {
    method: http::Method,
    route: std::sync::Arc<str>,
    lane: &'static str,
    since: Instant,
    started: Option<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    next_id: AtomicU64,
    requests: Mutex<HashMap<u64, Entry>>,
    tasks: Mutex<HashMap<u64, Entry>>,
    connections: AtomicUsize,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks; recover the data if one did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    pub(crate) fn add_request(
        &self,
        method: &http::Method,
        route: &std::sync::Arc<str>,
        now: Instant,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            method: method.clone(),
            route: route.clone(),
            lane: "async",
            since: now,
            started: Some(now),
        };
        lock(&self.requests).insert(id, entry);
        id
    }

    pub(crate) fn remove_request(&self, id: u64) {
        lock(&self.requests).remove(&id);
        self.changed.notify_waiters();
    }

    pub(crate) fn add_task(
        &self,
        method: &http::Method,
        route: &std::sync::Arc<str>,
        lane: &'static str,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            method: method.clone(),
            route: route.clone(),
            lane,
            since: Instant::now(),
            started: None,
        };
        lock(&self.tasks).insert(id, entry);
        id
    }

    pub(crate) fn task_started(&self, id: u64) {
        if let Some(entry) = lock(&self.tasks).get_mut(&id) {
            entry.started = Some(Instant::now());
        }
    }

    pub(crate) fn remove_task(&self, id: u64) {
        lock(&self.tasks).remove(&id);
        self.changed.notify_waiters();
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    pub(crate) fn requests_in_flight(&self) -> usize {
        lock(&self.requests).len()
    }

    pub(crate) fn tasks_pending(&self) -> usize {
        lock(&self.tasks).len()
    }

    fn is_idle(&self) -> bool {
        self.connections.load(Ordering::Relaxed) == 0
            && lock(&self.requests).is_empty()
            && lock(&self.tasks).is_empty()
    }

    /// Waits until no connection, request or background task is left.
    pub(crate) async fn idle(&self) {
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
            method: e.method.to_string(),
            route: e.route.to_string(),
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
