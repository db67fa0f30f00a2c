//! A route's stall record ([`StallStats`]), its row in
//! `GET /_fastlane/stalls` ([`StallRow`]), and the stall message: what
//! blocked, where, and what to do about it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{RouteInfo, NO_ROUTE};

/// What kind of work a poll does for its route, as a tag for the stall
/// message (the executor publishes it per runner as a `u8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// The connection itself (reading the next request, writing a response).
    Connection = 0,
    /// A request's handler (and its extractors and middleware).
    Handler = 1,
    /// A streaming response body.
    Body = 2,
    /// A background task scheduled by a request.
    Background = 3,
    /// A durable job's handler, run by a worker inside the server.
    Job = 4,
}

impl Phase {
    /// The phase a `u8` stands for (as a runner publishes it).
    pub(crate) fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Handler,
            2 => Phase::Body,
            3 => Phase::Background,
            4 => Phase::Job,
            _ => Phase::Connection,
        }
    }
}

/// The stall record of one route. Atomics: written by runner threads and the
/// monitor, read by the status endpoint, never behind a lock.
#[derive(Debug, Default)]
pub(crate) struct StallStats {
    count: AtomicU64,
    ongoing: AtomicU32,
    last_us: AtomicU64,
    worst_us: AtomicU64,
    total_us: AtomicU64,
    rejected: AtomicU64,
    /// [`crate::coarse::now_ms`] when the last stall ended (0: never).
    last_ended_ms: AtomicU64,
}

/// A route that stalled less than this long ago is still suspect: its next
/// requests may stall too, and run under the stall budget.
const SUSPECT_FOR_MS: u64 = 10_000;

impl StallStats {
    pub(crate) fn began(&self) {
        self.ongoing.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.last_ended_ms.store(crate::coarse::now_ms().max(1), Ordering::Relaxed);
        self.ongoing.fetch_sub(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.last_us.store(us, Ordering::Relaxed);
        self.worst_us.fetch_max(us, Ordering::Relaxed);
        self.total_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Stalls of this route going on right now.
    pub(crate) fn ongoing(&self) -> u32 {
        self.ongoing.load(Ordering::Relaxed)
    }

    /// The route is stalling now, or stalled within the last
    /// [`SUSPECT_FOR_MS`]: its polls run under the stall budget (see
    /// `executor/budget.rs`). Two atomic loads: asked on every poll of a request.
    pub(crate) fn suspect(&self) -> bool {
        if self.ongoing.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let ended = self.last_ended_ms.load(Ordering::Relaxed);
        ended != 0 && crate::coarse::now_ms().saturating_sub(ended) < SUSPECT_FOR_MS
    }

    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// The `GET /_fastlane/stalls` row of `method route`, if it has stalled.
    pub(crate) fn row(&self, method: &http::Method, route: &str) -> Option<StallRow> {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 && self.ongoing() == 0 {
            return None;
        }
        let ms = |us: &AtomicU64| us.load(Ordering::Relaxed) as f64 / 1000.0;
        Some(StallRow {
            method: method.to_string(),
            route: route.to_owned(),
            count,
            ongoing: self.ongoing(),
            last_ms: ms(&self.last_us),
            worst_ms: ms(&self.worst_us),
            total_ms: ms(&self.total_us),
            rejected: self.rejected.load(Ordering::Relaxed),
            at: None,
        })
    }
}

/// One row of `GET /_fastlane/stalls`: a route whose handlers (or tasks)
/// have stalled, made by the server for its own routes and by a
/// [`Companion`](crate::Companion) for what it runs (an ASGI app's blocked
/// event loops).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StallRow {
    /// `GET`.
    pub method: String,
    /// The route template (`/items/{id}`), or the path when there is none.
    pub route: String,
    /// Stalls that have ended.
    pub count: u64,
    /// Stalls going on now.
    pub ongoing: u32,
    /// How long the last stall that ended lasted.
    pub last_ms: f64,
    /// The longest stall.
    pub worst_ms: f64,
    /// All the stalls together.
    pub total_ms: f64,
    /// Requests answered 503 because this route was stalling at the cap.
    pub rejected: u64,
    /// Where the last stall was stuck, when known (a Python app's
    /// `main.py:25 in test2: time.sleep(secs)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl StallRow {
    /// A row for `method route` with nothing counted yet.
    pub fn new(method: impl Into<String>, route: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            route: route.into(),
            count: 0,
            ongoing: 0,
            last_ms: 0.0,
            worst_ms: 0.0,
            total_ms: 0.0,
            rejected: 0,
            at: None,
        }
    }

    /// Counts a stall that has ended after `lasted`.
    pub fn ended(&mut self, lasted: Duration) {
        let ms = lasted.as_secs_f64() * 1000.0;
        self.count += 1;
        self.last_ms = ms;
        self.worst_ms = self.worst_ms.max(ms);
        self.total_ms += ms;
    }
}

/// Sorts stall rows worst first.
pub(crate) fn worst_first(rows: &mut [StallRow]) {
    rows.sort_by(|a, b| b.worst_ms.total_cmp(&a.worst_ms));
}

/// The stall log line: what happened, where, and what to do about it.
///
/// `cpu` is `None` while it is not yet known whether the poll is blocked
/// (asleep, waiting on I/O) or computing. A poll that `panicked` is held by
/// the panic hook (a backtrace being written), not by the handler's code.
pub(crate) fn stall_message(
    route: &RouteInfo,
    phase: Phase,
    took: Duration,
    cpu: Option<bool>,
    ended: bool,
    panicked: bool,
) -> String {
    let secs = took.as_secs_f64();
    let amount = if secs >= 1.0 { format!("{secs:.1} s") } else { format!("{:.0} ms", secs * 1000.0) };
    if panicked {
        let so_far = if ended { "" } else { " so far" };
        let who = if route.id == NO_ROUTE {
            "a connection task".to_owned()
        } else {
            format!("{} {}", route.method, route.route)
        };
        return format!(
            "{who} panicked, and the panic hook held its thread for {amount}{so_far} (writing the backtrace \
             RUST_BACKTRACE asks for is slow); the panic itself is logged apart, and a handler's is answered 500"
        );
    }
    let what = match (ended, cpu) {
        (true, Some(true)) => format!("kept its thread busy computing for {amount}"),
        (true, _) => format!("blocked its thread for {amount}"),
        (false, _) => format!("has held its thread in one poll for {amount} so far"),
    };
    let place = match phase {
        Phase::Background => "in an async background task",
        Phase::Job => "inside an async job handler",
        Phase::Body => "while producing its streaming response body",
        Phase::Handler | Phase::Connection => "inside an async handler",
    };
    let fix = match (phase, cpu) {
        (Phase::Background, Some(false)) => {
            "schedule it with Background::spawn_blocking(..), or await fastlane::blocking(..) around the blocking call"
        }
        (Phase::Background, Some(true)) => "schedule it with Background::spawn_cpu(..), or await fastlane::compute(..)",
        (Phase::Background, None) => "schedule it with Background::spawn_blocking(..) or Background::spawn_cpu(..)",
        (Phase::Job, Some(true)) => {
            "register the job with Registry::register_cpu, or await fastlane::compute(..) around the computation"
        }
        (Phase::Job, _) => {
            "register the job with Registry::register_blocking, or await fastlane::blocking(..) around the blocking call"
        }
        (Phase::Body, Some(true)) => "compute each chunk with fastlane::compute(..)",
        (Phase::Body, _) => "produce each chunk with fastlane::blocking(..), or use an async source",
        (_, Some(false)) => {
            "move the blocking call into fastlane::blocking(..) or declare the route with fastlane::sync"
        }
        (_, Some(true)) => {
            "move the computation into fastlane::compute(..) or declare the route with fastlane::cpu"
        }
        (_, None) => {
            "move blocking calls into fastlane::blocking(..) and computation into fastlane::compute(..), \
             or declare the route with fastlane::sync / fastlane::cpu"
        }
    };
    let tail = if ended { "" } else { "; other requests are served by other threads meanwhile" };
    if route.id == NO_ROUTE {
        format!("a connection task {what} outside any route{tail}")
    } else if phase == Phase::Job {
        format!("job `{}` {what} {place}: {fix}{tail}", route.route)
    } else {
        format!("{} {} {what} {place}: {fix}{tail}", route.method, route.route)
    }
}

/// Reads a companion's stall rows; called at each request of
/// `GET /_fastlane/stalls`.
pub type StallSource = Arc<dyn Fn() -> Vec<StallRow> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routes::RouteTable;

    #[test]
    fn stall_messages_name_the_place_and_the_fix() {
        let routes = RouteTable::new(Metrics::new((&crate::LaneConfig::default()).into(), None, Vec::new()));
        let get = routes.get(&http::Method::GET, "/test2");
        let message = stall_message(&get, Phase::Handler, Duration::from_secs(8), Some(false), true, false);
        assert_eq!(
            message,
            "GET /test2 blocked its thread for 8.0 s inside an async handler: move the blocking call into \
             fastlane::blocking(..) or declare the route with fastlane::sync"
        );
        let job = routes.get(&http::Method::from_bytes(b"JOB").unwrap(), "send_mail");
        let message = stall_message(&job, Phase::Job, Duration::from_millis(2500), Some(false), true, false);
        assert_eq!(
            message,
            "job `send_mail` blocked its thread for 2.5 s inside an async job handler: register the job with \
             Registry::register_blocking, or await fastlane::blocking(..) around the blocking call"
        );
        let message = stall_message(&job, Phase::Job, Duration::from_millis(40), None, false, false);
        assert!(
            message.starts_with("job `send_mail` has held its thread in one poll for 40 ms so far"),
            "{message}"
        );
    }
}
