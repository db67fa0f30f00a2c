//! The watched executor: isolation of `async fn` handlers that block by
//! mistake.
//!
//! Why not run handlers on tokio's workers? A tokio worker that is stuck in a
//! poll (a `std::thread::sleep`, a blocking driver, a busy loop inside an
//! `async fn`) stalls every task queued behind it, and tokio has no way to
//! notice or to hand those tasks to another thread. Go's runtime does (its
//! `sysmon` hands a blocked thread's work to a fresh one), and so do we:
//!
//! * connection tasks (hyper + the router + the handlers), streaming bodies
//!   and async background tasks run on *runner* threads fed from one shared
//!   queue; the runners enter the tokio runtime, so tokio I/O, timers,
//!   `tokio::spawn` and task-locals keep working inside handlers;
//! * each runner publishes when its current poll began and which route it is
//!   polling ([`slot`]);
//! * a *monitor* thread looks at the runners every millisecond. A poll older
//!   than the stall threshold is a stall: the monitor marks the runner stuck,
//!   records the stall against the route and logs it, and makes sure an idle
//!   runner is there to take the queue (starting one if needed, up to a cap);
//! * a stuck runner that burns CPU (its thread CPU clock advances) is given
//!   the lowest OS priority, so it cannot take the cores from healthy ones;
//!   it retires when its poll returns, since an unprivileged process cannot
//!   raise a priority back;
//! * when the poll returns the runner reports how long the stall lasted, and
//!   spare runners retire after a while without work.
//!
//! A task is never tied to a runner for long: whichever runner is free takes
//! the next task from the shared queue, so one stuck poll holds up one task,
//! its own, and for a millisecond or two at most the tasks its runner was
//! about to run.
//!
//! The connections' sockets are watched by the runners themselves
//! ([`reactor`]), one epoll set per healthy runner, connections dealt out in
//! turn: an idle runner waits for the readiness of its set and runs the tasks
//! it wakes itself, so a request is not handed from thread to thread, and a
//! connection stays on one core. If that runner's current poll runs longer
//! than a tick (1 ms), or another runner is idle, the monitor moves the tasks
//! it has not started to the shared queue.
//!
//! This file holds the [`IsolationConfig`], the executor's shared state and
//! [`Routed`]; the rest is in:
//!
//! * `queue.rs`: the shared queue and the wake-up policy (which runner comes
//!   for a task, spares while runners are stuck);
//! * `runner.rs`: a runner thread's loop and the end of a stall;
//! * `monitor.rs`: the monitor thread; `slot.rs`: what a runner publishes;
//! * `reactor.rs` and `frames.rs`: the runners' own I/O and the deadlines
//!   they enforce;
//! * `budget.rs`: the threads stalling routes may hold (the routes and
//!   their stall record are the crate's `routes` module);
//! * `model.rs` (tests only): a loom model of the hand-overs between
//!   runners (a stuck runner's batch, the poller role).

pub(crate) mod budget;
pub(crate) mod frames;
#[cfg(test)]
mod model;
mod monitor;
mod queue;
pub(crate) mod reactor;
mod runner;
pub(crate) mod slot;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::routes::{Phase, RouteInfo, RouteTable};
use budget::{Budget, Gate};
use queue::{Queue, Role};
use reactor::Reactor;
use slot::Slot;
pub(crate) use slot::{enter_body, enter_request, enter_route, request_deadline_changed};

/// How the isolation of async handlers is set up.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let isolation = fastlane::IsolationConfig {
///     stall_threshold: Duration::from_millis(20),
///     ..fastlane::IsolationConfig::default()
/// };
/// let config = fastlane::Config { isolation, ..fastlane::Config::default() };
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationConfig {
    /// Run handlers on the watched executor. Default on. Off, connections run
    /// on tokio's workers as in plain axum, and a blocking `async fn`
    /// handler stalls the requests that share its thread.
    pub enabled: bool,
    /// A poll longer than this is a stall. Default 10 ms: a healthy poll of a
    /// request takes microseconds, so 10 ms is two orders of magnitude above
    /// anything legitimate, and above the few milliseconds for which the OS
    /// may preempt a healthy thread on a loaded machine, so preemption alone
    /// rarely looks like a stall. Fast requests do not wait for it: while a
    /// stall is going on the executor keeps idle runners ready.
    pub stall_threshold: Duration,
    /// Runner threads kept for healthy work. Default: the number of cores,
    /// like tokio's workers.
    pub runners: usize,
    /// The most runner threads alive at once, stuck ones included. Default
    /// 256: each stuck thread costs a stack (mostly untouched virtual memory)
    /// and a kernel task; 256 handlers blocked at once is far past a bug
    /// that needs fixing, and the cap keeps a flood of them from exhausting
    /// the process.
    ///
    /// The routes that stall may hold all but `runners + 2` of them (the
    /// *stall budget*): the rest are kept for the routes that behave. When
    /// the budget is spent, new requests for a route that is stalling (or
    /// stalled in the last 10 s) get `503` with `Retry-After` at once, and
    /// work already accepted for such routes (background tasks, jobs, later
    /// polls of a request) waits for a thread, in turn, instead of taking
    /// one from the others.
    pub max_threads: usize,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { enabled: true, stall_threshold: Duration::from_millis(10), runners: cores, max_threads: 256 }
    }
}

/// While any stall is going on, keep this many runners idle: a new request
/// may itself block, and the next one must still find a free runner at once.
/// Also the threads the stall budget leaves beyond `runners`: a route that
/// stalls for the first time is only known once it has (it holds no permit),
/// and the reserve absorbs such surprises without touching the runners.
const SPARES_WHILE_STALLING: usize = 2;

/// A spare runner (beyond [`IsolationConfig::runners`]) retires after this
/// long without work. Long enough to ride out the gaps of a steady stream of
/// blocking requests without creating a thread for each one.
const SPARE_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The watched executor. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: IsolationConfig,
    /// Enforced on the reactor's connections by the monitor (see
    /// [`Reactor::cut_idle`]).
    header_read_timeout: Duration,
    runtime: tokio::runtime::Handle,
    routes: Arc<RouteTable>,
    metrics: Metrics,
    /// The threads the routes that stall may hold at once.
    budget: Arc<Budget>,
    epoch: Instant,
    /// The nice value of the thread that created the executor: runners are
    /// only started from threads at this priority or better.
    base_nice: i32,
    /// The connections' readiness, one epoll set per healthy runner, each
    /// polled by an idle runner; empty if the OS refused an epoll set, in
    /// which case connections stay on tokio's.
    reactors: Vec<Arc<Reactor>>,
    /// Which reactor the next accepted connection joins (round robin).
    next_reactor: AtomicUsize,
    queue: Mutex<Queue>,
    work_ready: Condvar,
    /// Live runners, for the monitor.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Mirrors of the queue's counts, readable without its lock.
    threads: AtomicUsize,
    idle: AtomicUsize,
    stuck: AtomicUsize,
    shutdown: AtomicBool,
}

impl Executor {
    /// Starts the monitor; runners start on demand.
    pub(crate) fn new(
        config: IsolationConfig,
        header_read_timeout: Duration,
        runtime: tokio::runtime::Handle,
        routes: Arc<RouteTable>,
        metrics: Metrics,
    ) -> Self {
        let config = IsolationConfig {
            runners: config.runners.max(1),
            max_threads: config.max_threads.max(config.runners.max(1) + 1),
            ..config
        };
        metrics.isolation().max_threads.set(config.max_threads as i64);
        slot::mark_panicking();
        let reactors = match (0..config.runners).map(|_| Reactor::new().map(Arc::new)).collect() {
            Ok(reactors) => reactors,
            Err(err) => {
                tracing::warn!(error = %err, "no epoll set for the runners: connections use tokio's I/O driver");
                Vec::new()
            }
        };
        let queue = Queue { roles: vec![Role::default(); reactors.len()], ..Queue::default() };
        let budget =
            Arc::new(Budget::new(config.max_threads.saturating_sub(config.runners + SPARES_WHILE_STALLING)));
        metrics.isolation().stall_budget.set(budget.limit() as i64);
        let shared = Arc::new(Shared {
            config,
            header_read_timeout,
            runtime,
            routes,
            metrics,
            budget,
            epoch: Instant::now(),
            base_nice: monitor::current_nice(),
            reactors,
            next_reactor: AtomicUsize::new(0),
            queue: Mutex::new(queue),
            work_ready: Condvar::new(),
            slots: Mutex::new(Vec::new()),
            threads: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            stuck: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        monitor::start(shared.clone());
        Self { shared }
    }

    /// Runs `future` on the runners.
    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shared = self.shared.clone();
        let (runnable, task) = async_task::spawn(future, move |runnable| shared.schedule(runnable));
        task.detach();
        runnable.schedule();
    }

    /// The threads the routes that stall may hold at once (see
    /// [`budget`]).
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.shared.budget
    }

    /// The reactor a new connection served here registers with: each in
    /// turn, so that every healthy runner has its share.
    pub(crate) fn reactor(&self) -> Option<&Arc<Reactor>> {
        let reactors = &self.shared.reactors;
        let next = self.shared.next_reactor.fetch_add(1, Ordering::Relaxed);
        reactors.get(next % reactors.len().max(1))
    }

    /// Lets the runners finish the queue and exit; stops the monitor.
    pub(crate) fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.shared.lock().shutdown = true;
        self.shared.work_ready.notify_all();
        for reactor in &self.shared.reactors {
            reactor.wake();
        }
    }
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding this lock (tasks run unlocked).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells executors apart in [`DISPATCH`] (tests run several servers in
    /// one process).
    pub(super) fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    pub(super) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX >> 2)
    }
}

pin_project_lite::pin_project! {
    /// Marks every poll of the inner future as work for a route, so that a
    /// stall inside it is reported against that route, and runs it under
    /// the stall budget while the route is suspect: accepted work of a
    /// stalling route (a background task, a job) waits for a thread rather
    /// than take one from the routes that behave.
    pub(crate) struct Routed<F> {
        #[pin]
        inner: F,
        route: Arc<RouteInfo>,
        phase: Phase,
        // The server's stall budget; `None` without isolation.
        budget: Option<Arc<Budget>>,
        gate: Gate,
    }
}

impl<F> Routed<F> {
    pub(crate) fn new(inner: F, route: Arc<RouteInfo>, phase: Phase, executor: Option<&Executor>) -> Self {
        Self { inner, route, phase, budget: executor.map(|e| e.budget().clone()), gate: Gate::default() }
    }
}

impl<F: Future> Future for Routed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _route = enter_route(this.route.id, *this.phase);
        let mut inner = this.inner;
        match this.budget {
            Some(budget) => {
                this.gate.poll(budget, this.route.stalls.suspect(), cx, |cx| inner.as_mut().poll(cx))
            }
            None => inner.poll(cx),
        }
    }
}
