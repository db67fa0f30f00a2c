//! A graceful shutdown: the signal every part waits on ([`stopped`]) and
//! what it reports (the requests and background tasks it had to cut, if any),
//! shared by the server and the supervisor.

use std::fmt;
use std::time::Duration;

/// One request or background task that was still running when the grace
/// period of a graceful shutdown ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CutWork {
    /// `"request"` or `"background task"`.
    pub kind: &'static str,
    /// The HTTP method of the request (for a task: of the request that
    /// scheduled it).
    pub method: String,
    /// The matched route of the request (for a task: of the request that
    /// scheduled it).
    pub route: String,
    /// The lane it ran on: `"async"`, `"blocking"` or `"cpu"`.
    pub lane: &'static str,
    /// How long it had been running; `None` if it never started.
    pub running_for: Option<Duration>,
    /// How long it waited before it started (for a lane that was full).
    pub waiting_for: Duration,
}

impl fmt::Display for CutWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} ({} lane)", self.kind, self.method, self.route, self.lane)?;
        match self.running_for {
            Some(d) => write!(f, ", had run {:.1} s", d.as_secs_f64()),
            None => write!(f, ", never started (waited {:.1} s)", self.waiting_for.as_secs_f64()),
        }
    }
}

/// What a graceful shutdown left unfinished.
///
/// [`Server::serve`](crate::Server::serve) returns it; a command-line app
/// should exit non-zero when [`is_clean`](Self::is_clean) is false (the
/// `fastlane` binary does), so that a supervisor or CI sees that work was cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Requests still being handled when the grace period ended.
    pub requests: Vec<CutWork>,
    /// Background tasks still scheduled or running when the grace period
    /// ended.
    pub tasks: Vec<CutWork>,
    /// How long the drain took.
    pub drained_in: Duration,
    /// With `--workers`: workers that ended their drain with work cut, or
    /// had to be killed (each one logged its own cuts).
    pub workers_failed: usize,
}

impl ShutdownReport {
    /// True when everything in flight finished within the grace period.
    pub fn is_clean(&self) -> bool {
        self.requests.is_empty() && self.tasks.is_empty() && self.workers_failed == 0
    }

    /// Every cut request and task.
    pub fn cut(&self) -> impl Iterator<Item = &CutWork> {
        self.requests.iter().chain(self.tasks.iter())
    }
}

/// Completes once shutdown has been asked for.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, before any other await:
    // holding it would make the connection future `!Send`.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Whether shutdown has begun, for a connection's task, which is polled at
/// every request: `shutdown` ([`stopped`] on the same channel) is polled
/// once, to register the task's waker, and after that only when `changed`
/// (a clone of the receiver) says the channel has changed, an atomic load.
/// Polling `shutdown` takes the channel's lock, which every connection
/// shares. `registered` is the caller's memory of that first poll; once
/// this has said `true`, the caller must not ask again (`shutdown` has
/// completed).
pub(crate) fn poll_stopped<F: std::future::Future<Output = ()>>(
    cx: &mut std::task::Context<'_>,
    shutdown: std::pin::Pin<&mut F>,
    changed: &mut tokio::sync::watch::Receiver<bool>,
    registered: &mut bool,
) -> bool {
    if *registered && !changed.has_changed().unwrap_or(true) {
        return false;
    }
    *registered = true;
    changed.borrow_and_update();
    shutdown.poll(cx).is_ready()
}
