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

pub(crate) mod budget;
pub(crate) mod frames;
mod monitor;
pub(crate) mod reactor;
pub(crate) mod slot;
pub(crate) mod stalls;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_task::Runnable;

use crate::metrics::Metrics;
use budget::{Budget, Gate};
use reactor::Reactor;
pub(crate) use slot::{enter_request, enter_route, request_deadline_changed, Phase};
use slot::{Slot, CURRENT, STUCK};
pub use stalls::StallRow;
pub(crate) use stalls::{worst_first, RouteInfo, RouteTable, NO_ROUTE};

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

#[derive(Debug, Default)]
struct Queue {
    tasks: VecDeque<Runnable>,
    threads: usize,
    /// Runners asleep on `work_ready`.
    idle: usize,
    /// Of those, how many have been notified and not yet woken up: spares
    /// a second notification for a runner that is already on its way.
    waking: usize,
    /// The poller role of each reactor.
    roles: Vec<Role>,
    shutdown: bool,
}

/// The poller role of one reactor.
#[derive(Debug, Default, Clone, Copy)]
struct Role {
    /// A runner holds it: it waits for I/O, or is dispatching what it got.
    /// It counts as idle too.
    held: bool,
    /// Its holder has been asked (through the reactor) to come back for the
    /// queue; spares repeated wake-ups until it does.
    woken: bool,
}

impl Queue {
    /// Runners free to take work: asleep, or waiting for I/O.
    fn waiting(&self) -> usize {
        self.idle + self.roles.iter().filter(|r| r.held).count()
    }

    /// A free poller role: the one the runner held last if it is free (its
    /// connections stay on its core), else the first free one.
    fn free_role(&self, last: usize) -> Option<usize> {
        match self.roles.get(last) {
            Some(role) if !role.held => Some(last),
            _ => self.roles.iter().position(|r| !r.held),
        }
    }

    /// Claims a sleeping runner that nobody has notified yet; the caller
    /// notifies `work_ready`.
    fn claim_sleeper(&mut self) -> bool {
        let free = self.idle > self.waking;
        if free {
            self.waking += 1;
        }
        free
    }
}

thread_local! {
    /// While a runner dispatches I/O events, the tasks they wake for its
    /// executor (named by address) collect here instead of the shared queue:
    /// the runner runs the first itself and queues the rest.
    static DISPATCH: RefCell<Option<(usize, Vec<Runnable>)>> = const { RefCell::new(None) };
}

/// What `schedule` must do after queueing a task.
enum Wake {
    Nobody,
    Start,
    Sleeper,
    Poller(usize),
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
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding this lock (tasks run unlocked).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells executors apart in [`DISPATCH`] (tests run several servers in
    /// one process).
    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX >> 2)
    }

    fn schedule(self: &Arc<Self>, runnable: Runnable) {
        if let Some(runnable) = self.divert(runnable) {
            self.enqueue(runnable);
        }
    }

    /// Puts a task on the shared queue and makes sure a runner comes for it.
    fn enqueue(self: &Arc<Self>, runnable: Runnable) {
        let mut queue = self.lock();
        if queue.shutdown && queue.threads == 0 {
            // Too late: nobody will run it. Dropping cancels the task.
            return;
        }
        queue.tasks.push_back(runnable);
        // A runner about to start takes the task; otherwise one that is
        // already there is woken. Deciding in this order keeps `waking` and
        // `poller_woken` true: they are only set when the wake-up is sent.
        // A runner started from a low-priority thread would inherit its
        // priority: that start is left to the monitor, within a tick.
        let wake = if queue.threads < self.config.runners && monitor::current_nice() <= self.base_nice {
            queue.threads += 1;
            Wake::Start
        } else if queue.claim_sleeper() {
            Wake::Sleeper
        } else if let Some(index) = queue.roles.iter().position(|r| r.held && !r.woken) {
            queue.roles[index].woken = true;
            Wake::Poller(index)
        } else {
            Wake::Nobody
        };
        drop(queue);
        match wake {
            Wake::Start => self.start_runner(),
            Wake::Sleeper => self.work_ready.notify_one(),
            Wake::Poller(index) => self.reactors[index].wake(),
            Wake::Nobody => {}
        }
    }

    /// Moves a runner's own queued tasks to the shared queue, for any
    /// runner to take: its current poll is taking long (or is stuck), and
    /// they should not wait for it.
    fn share_local(self: &Arc<Self>, slot: &Slot) -> usize {
        // Taken out first: the local queue's lock is never held while the
        // shared queue's is taken (the runner takes them the other way).
        let tasks: Vec<Runnable> = slot.local().drain(..).collect();
        let count = tasks.len();
        for runnable in tasks {
            self.enqueue(runnable);
        }
        count
    }

    /// Keeps a task woken by the I/O this thread is dispatching (see
    /// [`DISPATCH`]); gives it back otherwise.
    fn divert(&self, runnable: Runnable) -> Option<Runnable> {
        let me = self.address();
        DISPATCH.with(|dispatch| match dispatch.borrow_mut().as_mut() {
            Some((executor, batch)) if *executor == me => {
                batch.push(runnable);
                None
            }
            _ => Some(runnable),
        })
    }

    /// Starts one runner; the caller has counted it in `queue.threads`.
    fn start_runner(self: &Arc<Self>) {
        let shared = self.clone();
        let slot = Arc::new(Slot::default());
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).push(slot.clone());
        self.threads.fetch_add(1, Ordering::Relaxed);
        self.metrics.isolation().threads.inc();
        self.metrics.isolation().started.inc();
        let spawned =
            std::thread::Builder::new().name("fastlane-runner".into()).spawn(move || shared.run(slot));
        if let Err(err) = spawned {
            tracing::error!(error = %err, "could not start a runner thread");
            self.lock().threads -= 1;
            self.threads.fetch_sub(1, Ordering::Relaxed);
            self.metrics.isolation().threads.dec();
        }
    }

    /// A runner thread's life.
    fn run(self: Arc<Self>, slot: Arc<Slot>) {
        let _runtime = self.runtime.enter();
        monitor::publish_thread_ids(&slot);
        CURRENT.with(|c| *c.borrow_mut() = Some(slot.clone()));
        let mut batch = Vec::new();
        let mut role = 0;
        while let Some(runnable) = self.next(&slot, &mut batch, &mut role) {
            slot.poll_started.store(self.now_ns() + 1, Ordering::Release);
            // A panic inside a task (hyper or a handler) must not take the
            // runner down; handler panics are already answered 500 above us.
            let _ = catch_unwind(AssertUnwindSafe(|| runnable.run()));
            let started = slot.poll_started.swap(0, Ordering::AcqRel);
            if started & STUCK != 0 {
                let began = (started & !STUCK).saturating_sub(1);
                let took = Duration::from_nanos(self.now_ns().saturating_sub(began));
                self.stall_ended(&slot, took);
            }
            slot.panicking.store(false, Ordering::Relaxed);
        }
        CURRENT.with(|c| c.borrow_mut().take());
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| !Arc::ptr_eq(s, &slot));
        // A runner that leaves (demoted after a stall) hands on what it had.
        self.share_local(&slot);
        self.threads.fetch_sub(1, Ordering::Relaxed);
        self.metrics.isolation().threads.dec();
    }

    /// The next task for a runner, or `None` when it should retire.
    ///
    /// Its own tasks first (those its last I/O poll woke), then the shared
    /// queue. With both empty, the runner takes a free poller role (the one
    /// it held last, if free) and waits for I/O; otherwise it sleeps until
    /// work is queued.
    fn next(&self, slot: &Slot, batch: &mut Vec<Runnable>, last_role: &mut usize) -> Option<Runnable> {
        if let Some(runnable) = slot.local().pop_front() {
            return Some(runnable);
        }
        let mut queue = self.lock();
        loop {
            if slot.demoted.load(Ordering::Relaxed) {
                // Its priority is at the floor: let a fresh thread take over.
                queue.threads -= 1;
                return None;
            }
            if let Some(runnable) = queue.tasks.pop_front() {
                return Some(runnable);
            }
            if queue.shutdown {
                queue.threads -= 1;
                if queue.threads == 0 {
                    drop(queue);
                    self.abandon_connections();
                }
                return None;
            }
            if let Some(role) = queue.free_role(*last_role) {
                queue.roles[role].held = true;
                drop(queue);
                let timed_out = self.poll_io(&self.reactors[role], batch);
                queue = self.lock();
                queue.roles[role] = Role::default();
                *last_role = role;
                let mut woken = batch.drain(..);
                let mine = woken.next();
                // The other woken tasks are this runner's next work: their
                // connections' data is in this core's cache. Should one of
                // them take long, the monitor shares the rest out.
                slot.local().extend(woken);
                let retire = mine.is_none() && timed_out && self.spare_may_retire(&queue);
                if retire {
                    queue.threads -= 1;
                }
                // The poller role is not handed on here: waking a runner per
                // batch just to wait in epoll costs a context switch each
                // time; the monitor hands it on within a tick if it stays
                // free while runners sleep (`keep_polling`).
                if retire && queue.claim_sleeper() {
                    self.work_ready.notify_one();
                }
                if mine.is_some() || retire {
                    return mine;
                }
                continue;
            }
            queue.idle += 1;
            self.idle.fetch_add(1, Ordering::Relaxed);
            let (next, waited) =
                self.work_ready.wait_timeout(queue, SPARE_KEEP_ALIVE).unwrap_or_else(|p| p.into_inner());
            queue = next;
            queue.idle -= 1;
            queue.waking = queue.waking.saturating_sub(1);
            self.idle.fetch_sub(1, Ordering::Relaxed);
            if waited.timed_out() && self.spare_may_retire(&queue) {
                queue.threads -= 1;
                return None;
            }
        }
    }

    /// Called by the monitor every tick: if nobody holds the poller role
    /// while runners sleep, one of them must take it, or the sockets would
    /// go unwatched while every awake runner is busy (or stuck). A tick
    /// (1 ms) bounds how long that lasts, well inside the stall threshold.
    fn keep_polling(&self, queue: &mut Queue) {
        let free = queue.roles.iter().filter(|r| !r.held).count();
        for _ in 0..free {
            if !queue.claim_sleeper() {
                break;
            }
            self.work_ready.notify_one();
        }
    }

    /// The last runner is leaving a shut-down executor: nobody will poll
    /// the reactor again. The connections still registered (work the grace
    /// period cut) are shut, rather than leaving their clients on a
    /// connection that never answers, and their tasks woken, which with no
    /// runner left drops them.
    fn abandon_connections(&self) {
        for reactor in &self.reactors {
            reactor.shut_all();
        }
    }

    /// A runner that found no work for [`SPARE_KEEP_ALIVE`] may retire if
    /// it is a spare and no stall needs spares kept.
    fn spare_may_retire(&self, queue: &Queue) -> bool {
        queue.tasks.is_empty()
            && queue.threads > self.config.runners
            && self.stuck.load(Ordering::Relaxed) == 0
    }

    /// Waits for I/O as the poller and collects the tasks it wakes into
    /// `batch`; returns whether the wait timed out with nothing to report.
    fn poll_io(&self, reactor: &Reactor, batch: &mut Vec<Runnable>) -> bool {
        let me = self.address();
        DISPATCH.with(|dispatch| *dispatch.borrow_mut() = Some((me, std::mem::take(batch))));
        let polled = reactor.poll(SPARE_KEEP_ALIVE);
        if let Some((_, woken)) = DISPATCH.with(|dispatch| dispatch.borrow_mut().take()) {
            *batch = woken;
        }
        match polled {
            Ok(events) => events == 0,
            Err(err) => {
                // Not expected (epoll_wait fails only on bad arguments); do
                // not spin on it.
                tracing::error!(error = %err, "the runners' I/O poll failed");
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        }
    }

    /// Called by the monitor: makes sure idle runners are there to take the
    /// queue while some are stuck.
    fn ensure_spares(self: &Arc<Self>) {
        let stuck = self.stuck.load(Ordering::Relaxed);
        let mut queue = self.lock();
        self.keep_polling(&mut queue);
        let healthy = queue.threads.saturating_sub(stuck);
        let mut wanted = self.config.runners.saturating_sub(healthy);
        if stuck > 0 {
            let waiting = queue.waiting();
            let missing_spares = SPARES_WHILE_STALLING.saturating_sub(waiting);
            wanted = wanted.max(queue.tasks.len().saturating_sub(waiting) + missing_spares);
        }
        let room = self.config.max_threads.saturating_sub(queue.threads);
        let start = wanted.min(room);
        queue.threads += start;
        drop(queue);
        for _ in 0..start {
            self.start_runner();
        }
    }

    fn stall_ended(&self, slot: &Slot, took: Duration) {
        self.stuck.fetch_sub(1, Ordering::Relaxed);
        self.metrics.isolation().stuck.dec();
        if slot.charged.swap(false, Ordering::Relaxed) {
            self.budget.release();
        }
        let route = self.routes.by_id(slot.stuck_route.load(Ordering::Relaxed));
        let Some(route) = route else { return };
        route.stalls.ended(took);
        self.metrics.stall_ended(&route, took);
        let cpu = slot.cpu_bound.swap(false, Ordering::Relaxed);
        let panicked = slot.panicking.load(Ordering::Relaxed);
        let mut message = stall_message(&route, slot.stuck_phase(), took, Some(cpu), true, panicked);
        let deadline = slot.stuck_deadline_ms.swap(0, Ordering::Relaxed);
        if deadline != 0 && crate::coarse::now_ms() > deadline {
            // The request's timeout passed while its thread was blocked:
            // the 504 could not be sent, since a timeout can only take over
            // when the handler yields at an `.await`.
            let timeout = Duration::from_millis(slot.stuck_timeout_ms.load(Ordering::Relaxed));
            message.push_str(&format!(
                "; its {} timeout passed meanwhile and could not fire: a timeout interrupts a handler only at an .await",
                crate::telemetry::Human(timeout)
            ));
        }
        tracing::warn!(
            target: "fastlane::stall",
            method = %route.method,
            route = %route.route,
            ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "{message}"
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_messages_name_the_place_and_the_fix() {
        let routes = RouteTable::new(Metrics::new(&crate::LaneConfig::default(), None, Vec::new()));
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
