//! State shared by a server's connections, requests and background tasks.

use crate::RequestId;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::Config;
use super::proxy::ClientInfo;
use super::tracker::Tracker;
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::routes::{RouteInfo, RouteTable};
use crate::Lanes;

pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

#[derive(Debug)]
pub(crate) struct ServerState {
    pub(crate) config: Config,
    pub(crate) lanes: Lanes,
    pub(crate) metrics: Metrics,
    pub(crate) tracker: Tracker,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) routes: Arc<RouteTable>,
    /// The watched executor; `None` when isolation is off.
    pub(crate) executor: Option<Executor>,
    /// The companions' stall rows, listed with the routes'.
    pub(crate) stall_sources: StallSources,
    /// HTTPS, when configured.
    pub(crate) tls: Option<super::tls::Tls>,
}

/// The companions' [`StallSource`](crate::StallSource)s.
pub(crate) struct StallSources(pub(crate) Vec<crate::StallSource>);

impl std::fmt::Debug for StallSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} stall sources", self.0.len())
    }
}

impl ServerState {
    /// The metrics in Prometheus text, with the gauges that are read off
    /// the server's state (not counted per request) brought up to date.
    pub(crate) fn render_metrics(&self) -> String {
        self.metrics.set_requests_in_flight(self.tracker.requests_in_flight());
        self.metrics.set_connections_open(self.tracker.connections_open());
        if let Some(executor) = &self.executor {
            let isolation = self.metrics.isolation();
            isolation.stall_budget_used.set(i64::try_from(executor.budget().used()).unwrap_or(i64::MAX));
            isolation
                .stall_budget_waiting
                .set(i64::try_from(executor.budget().waiting()).unwrap_or(i64::MAX));
        }
        self.metrics.render()
    }

    /// Starts a task (a connection, a background task) with these lanes
    /// current: on the watched executor, or on tokio without isolation.
    pub(crate) fn start_task(&self, task: Task) {
        let task = self.lanes.scope(task);
        match &self.executor {
            Some(executor) => executor.spawn(task),
            None => drop(self.runtime.spawn(task)),
        }
    }
}

/// Sentinel values of [`RequestState::timeout`].
const TIMEOUT_UNSET: u64 = u64::MAX;
const TIMEOUT_NONE: u64 = u64::MAX - 1;

/// One request, from the moment it is routed until its response body is
/// done. Background tasks it schedules wait here until then.
pub(crate) struct RequestState {
    pub(crate) server: Arc<ServerState>,
    pub(crate) id: u64,
    pub(crate) method: http::Method,
    pub(crate) route: Arc<RouteInfo>,
    pub(crate) started: Instant,
    /// `started` on the coarse clock ([`crate::coarse::now_ms`]).
    pub(crate) started_ms: u64,
    /// The request's path when no route matched it (the app's fallback, an
    /// ASGI app behind fastlane): the access log shows it instead of the
    /// route, which is `<unmatched>` for all of them.
    pub(crate) unmatched_path: Option<Box<str>>,
    /// Who sent it ([`ClientInfo`]: the forwarded client behind a trusted
    /// proxy); `None` when the router is called without a server's
    /// connection (a test calling it directly).
    pub(crate) client: Option<ClientInfo>,
    /// The id its logs and its response carry ([`RequestId`]).
    pub(crate) request_id: RequestId,
    /// Its id goes into the answer's head, written by fastlane's own HTTP/1
    /// loop, rather than into its header map
    /// ([`offer_head`](crate::request_id::offer_head)).
    pub(crate) id_in_head: bool,
    /// A per-route timeout set by [`RouteTimeout`](crate::RouteTimeout), in
    /// milliseconds; [`TIMEOUT_UNSET`] means "use the server's".
    timeout: AtomicU64,
    /// `Some` until the response is done; then the tasks are started and
    /// later ones start at once.
    pending: Mutex<Option<Vec<Task>>>,
}

impl std::fmt::Debug for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestState")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("route", &self.route.route)
            .finish_non_exhaustive()
    }
}

impl RequestState {
    pub(crate) fn new(
        server: Arc<ServerState>,
        route: Arc<RouteInfo>,
        started: Instant,
        unmatched_path: Option<Box<str>>,
        client: Option<ClientInfo>,
        request_id: RequestId,
        id_in_head: bool,
    ) -> Self {
        let method = route.method.clone();
        let id = server.tracker.add_request(&route, started);
        Self {
            server,
            id,
            method,
            route,
            started,
            started_ms: crate::coarse::now_ms(),
            unmatched_path,
            client,
            request_id,
            id_in_head,
            timeout: AtomicU64::new(TIMEOUT_UNSET),
            pending: Mutex::new(Some(Vec::new())),
        }
    }

    pub(crate) fn set_timeout(&self, timeout: Option<Duration>) {
        let value = match timeout {
            Some(d) => u64::try_from(d.as_millis()).unwrap_or(TIMEOUT_NONE - 1).min(TIMEOUT_NONE - 1),
            None => TIMEOUT_NONE,
        };
        self.timeout.store(value, Ordering::Relaxed);
        // Set while the handler is polled: the runner's published deadline
        // follows (see `RouteGuard`).
        let (deadline_ms, timeout_ms) = self.deadline_ms();
        crate::executor::request_deadline_changed(deadline_ms, timeout_ms);
    }

    /// When the timeout expires on the coarse clock, and its length, in
    /// milliseconds; (0, 0) without one.
    pub(crate) fn deadline_ms(&self) -> (u64, u64) {
        match self.timeout() {
            Some(timeout) => {
                let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX >> 1).max(1);
                (self.started_ms.saturating_add(timeout_ms), timeout_ms)
            }
            None => (0, 0),
        }
    }

    /// The timeout that applies: the route's own if it set one, else the
    /// server's.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        match self.timeout.load(Ordering::Relaxed) {
            TIMEOUT_UNSET => self.server.config.request_timeout,
            TIMEOUT_NONE => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Queues a background task until the response is done, or starts it
    /// now if it already is.
    pub(crate) fn schedule(&self, task: Task) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.as_mut() {
            Some(tasks) => tasks.push(task),
            None => {
                drop(pending);
                self.server.start_task(task);
            }
        }
    }

    /// The response is done (or will never be sent): the request leaves the
    /// in-flight list and its background tasks start.
    /// Finishes the request now if it has no background task waiting;
    /// returns whether it did. For responses whose body is already complete,
    /// this spares wrapping the body to find out when it ends.
    pub(crate) fn finish_if_no_tasks(&self) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.as_ref() {
            Some(tasks) if tasks.is_empty() => {
                *pending = None;
                drop(pending);
                self.server.tracker.remove_request(self.id);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn finish(&self) {
        let tasks = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tasks) = tasks {
            self.server.tracker.remove_request(self.id);
            for task in tasks {
                self.server.start_task(task);
            }
        }
    }
}

impl Drop for RequestState {
    fn drop(&mut self) {
        // If the response never completed (client gone, timeout), the work
        // the handler scheduled still runs: it was accepted, it is not lost.
        self.finish();
    }
}

thread_local! {
    /// The request whose route this thread is calling or whose handler it
    /// is polling (see [`RequestState::enter`]).
    static CURRENT: RefCell<Option<Arc<RequestState>>> = const { RefCell::new(None) };
}

// How handlers and the app's middleware find their request: the thread's
// current one, not an extension. Each extension is a boxed value and a hash
// insert, and a fourth one (axum inserts two, `ConnectInfo` is the third)
// grows the map: about 600 instructions of a hello-world request's 17,000.
impl RequestState {
    /// Makes `this` the thread's current request until the guard drops. The
    /// route layer does so while it calls the route and while it polls the
    /// handler: where extractors, the app's middleware and the route's
    /// timeout layer run.
    pub(crate) fn enter(this: &Arc<Self>) -> CurrentRequest {
        CurrentRequest(CURRENT.with(|c| c.replace(Some(this.clone()))))
    }

    /// The thread's current request (see [`enter`](Self::enter)).
    pub(crate) fn current() -> Option<Arc<RequestState>> {
        // Fails only while the thread is being torn down: no request then.
        CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
    }
}

/// Restores the thread's previous current request when dropped.
pub(crate) struct CurrentRequest(Option<Arc<RequestState>>);

impl Drop for CurrentRequest {
    fn drop(&mut self) {
        let previous = self.0.take();
        // The request dropped here (if this was its last handle) may drop
        // tasks that enter requests of their own: take it out first.
        let replaced = CURRENT.try_with(|c| c.replace(previous)).ok().flatten();
        drop(replaced);
    }
}

impl ClientInfo {
    /// The client of the request whose handler (or middleware of the app's,
    /// under fastlane's own layer) this thread is running, as the extractor
    /// gives it to handlers; `None` elsewhere.
    pub fn current() -> Option<ClientInfo> {
        CURRENT.try_with(|c| c.borrow().as_ref().and_then(|request| request.client)).ok().flatten()
    }
}

/// The id fastlane gave the request; outside a fastlane server (a router
/// called directly in a test), one made from the request's headers.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(RequestId::current().unwrap_or_else(|| Self::for_headers(&parts.headers)))
    }
}
