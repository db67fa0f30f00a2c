//! The worker: fetches jobs, runs their handlers, keeps their leases alive,
//! records the outcome, and on shutdown gives back what it could not finish.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::job::{Claimed, JobId, JobState, NewJob};
use crate::{Error, Store};

/// How a handler's attempt ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Try again later (with backoff), while attempts are left.
    Retry(String),
    /// Do not try again: the job is dead.
    Permanent(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retry(m) => write!(f, "{m} (will retry)"),
            JobError::Permanent(m) => write!(f, "{m} (permanent)"),
        }
    }
}

impl std::error::Error for JobError {}

/// What a running handler can see and do.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job.
    pub id: JobId,
    /// This attempt's number, from 1.
    pub attempt: u32,
    token: i64,
    cancelled: Arc<AtomicBool>,
    progress: Arc<dyn ProgressSink>,
}

trait ProgressSink: Send + Sync + std::fmt::Debug {
    fn report(&self, id: JobId, token: i64, percent: u8, message: String);
}

#[derive(Debug)]
struct StoreProgress<S: Store>(S);

impl<S: Store> ProgressSink for StoreProgress<S> {
    fn report(&self, id: JobId, token: i64, percent: u8, message: String) {
        let store = self.0.clone();
        tokio::spawn(async move {
            if let Err(err) = store.progress(id, token, percent, &message).await {
                tracing::warn!("job {id}: progress not recorded: {err}");
            }
        });
    }
}

impl JobContext {
    /// True once the job has been cancelled (the worker looks every second,
    /// and at every heartbeat): a
    /// long handler should check it and return early.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Reports progress (percent, message); recorded in the background.
    pub fn progress(&self, percent: u8, message: impl Into<String>) {
        self.progress.report(self.id, self.token, percent, message.into());
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;
/// Checks a payload against a job type's payload type.
type Validator = Arc<dyn Fn(&serde_json::Value) -> Result<(), String> + Send + Sync>;
type Handler = Arc<dyn Fn(serde_json::Value, JobContext) -> Result<BoxFuture, String> + Send + Sync>;

/// The job types a worker can run, by name, with a payload type each.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
    /// Checks a payload against the type's payload type, at enqueue time.
    validators: HashMap<String, Validator>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("jobs", &self.handlers.keys().collect::<Vec<_>>()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an async handler for jobs named `name` with payload `P`.
    pub fn register<P, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.handlers.insert(
            name.to_owned(),
            Arc::new(move |payload, ctx| {
                let payload: P = serde_json::from_value(payload).map_err(|e| e.to_string())?;
                let handler = handler.clone();
                Ok(Box::pin(async move { handler(payload, ctx).await }) as BoxFuture)
            }),
        );
        self.validators.insert(
            name.to_owned(),
            Arc::new(|payload| {
                serde_json::from_value::<P>(payload.clone())
                    .map(drop)
                    .map_err(|e| payload_error::<P>(payload, e))
            }),
        );
        self
    }

    /// Registers a blocking handler, run on fastlane's blocking lane.
    pub fn register_blocking<P, F>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P, JobContext) -> Result<(), JobError> + Clone + Send + Sync + 'static,
    {
        self.register(name, move |payload: P, ctx: JobContext| {
            let handler = handler.clone();
            async move { lane_outcome(fastlane::blocking(move || handler(payload, ctx)).await) }
        })
    }

    /// Registers a CPU-heavy handler, run on fastlane's CPU lane.
    pub fn register_cpu<P, F>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P, JobContext) -> Result<(), JobError> + Clone + Send + Sync + 'static,
    {
        self.register(name, move |payload: P, ctx: JobContext| {
            let handler = handler.clone();
            async move { lane_outcome(fastlane::compute(move || handler(payload, ctx)).await) }
        })
    }

    /// Checks that `job` names a registered type and that its payload
    /// deserializes; the error names the problem.
    pub fn check(&self, job: &NewJob) -> Result<(), Error> {
        let Some(validate) = self.validators.get(&job.name) else {
            let mut known: Vec<_> = self.validators.keys().cloned().collect();
            known.sort();
            return Err(Error::Invalid(format!("unknown job `{}` (known: {})", job.name, known.join(", "))));
        };
        validate(&job.payload).map_err(|e| Error::Invalid(format!("payload of `{}`: {e}", job.name)))
    }
}

/// What is wrong with a payload, in the terms of its JSON rather than of
/// the Rust type it is read into (serde says `expected struct SleepPayload`).
/// With no payload at all, what an empty object lacks says what is needed.
fn payload_error<P: DeserializeOwned>(payload: &serde_json::Value, err: serde_json::Error) -> String {
    if payload.is_null() {
        return match serde_json::from_value::<P>(serde_json::json!({})) {
            Err(missing) => format!("none was given; it must be a JSON object ({missing})"),
            Ok(_) => "none was given; it must be a JSON object (`{}` will do)".to_owned(),
        };
    }
    let message = err.to_string();
    match message.split_once("expected struct ") {
        Some((before, after)) => {
            let rest = after.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_');
            format!("{before}expected a JSON object{rest}")
        }
        None => message,
    }
}

/// A lane that is full, shutting down, or whose work panicked: try again.
fn lane_outcome(result: Result<Result<(), JobError>, fastlane::LaneError>) -> Result<(), JobError> {
    result.unwrap_or_else(|err| Err(JobError::Retry(err.to_string())))
}

/// Enqueues through a registry, so that unknown names and bad payloads are
/// refused at enqueue time, not discovered by a worker later.
pub async fn enqueue_checked<S: Store>(store: &S, registry: &Registry, job: NewJob) -> Result<JobId, Error> {
    registry.check(&job)?;
    store.enqueue(job).await
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's name in the attempt records.
    pub name: String,
    /// Queues to fetch from, with how many jobs of each may run at once.
    pub queues: Vec<(String, usize)>,
    /// The lease each attempt holds; renewed every third of it. A dead
    /// worker's jobs come back within one lease. Default 15 s.
    pub lease: Duration,
    /// How long an idle worker waits before looking again if nothing wakes
    /// it: stores wake idle workers on enqueue (PostgreSQL LISTEN/NOTIFY,
    /// SQLite within the process), so this only bounds the wait for jobs
    /// that become due (scheduled, retrying, lease expired) or are enqueued
    /// by another process on SQLite. Default 1 s.
    pub poll_interval: Duration,
    /// Most jobs fetched in one claim. Default 256.
    pub fetch_batch: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: format!("worker-{}", std::process::id()),
            queues: vec![("default".to_owned(), 16)],
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            fetch_batch: 256,
        }
    }
}

/// Counts of what a worker did.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Attempts that succeeded.
    pub succeeded: AtomicU64,
    /// Attempts that failed (retrying or dead).
    pub failed: AtomicU64,
    /// Writes rejected because another attempt owned the job.
    pub fenced: AtomicU64,
    /// Jobs given back at shutdown.
    pub released: AtomicU64,
    /// Attempts running now.
    pub running: AtomicU64,
}

/// Most successes written in one transaction.
const COMPLETE_BATCH: usize = 1024;

/// A running attempt: its token, the signal that abandons it, and the flag
/// its handler reads as `ctx.is_cancelled()`.
#[derive(Debug, Clone)]
struct Running {
    token: i64,
    abandon: Arc<Notify>,
    cancelled: Arc<AtomicBool>,
}

/// The running attempts of a worker, by job.
type InFlight = Arc<std::sync::Mutex<HashMap<JobId, Running>>>;

/// Runs jobs from `store` with `registry` until `shutdown` turns true; then
/// stops fetching, lets running jobs finish for up to `grace`, and releases
/// the rest at once so that another worker can take them without waiting for
/// a lease to expire.
pub async fn run<S: Store>(
    store: S,
    registry: Registry,
    config: WorkerConfig,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> Arc<WorkerStats> {
    run_with_stats(store, registry, config, shutdown, grace, Arc::default()).await
}

/// [`run`], counting into `stats`, which the caller can watch while the
/// worker runs.
///
/// Each queue has a fetcher that claims as many jobs as it has free slots
/// (up to [`WorkerConfig::fetch_batch`]) in one transaction, and one
/// completer writes the successes of many jobs in one transaction: the
/// store's cost is paid per batch, not per job. Failures, which need their
/// error text and backoff, are written one by one.
pub async fn run_with_stats<S: Store>(
    store: S,
    registry: Registry,
    config: WorkerConfig,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    stats: Arc<WorkerStats>,
) -> Arc<WorkerStats> {
    let (stop_tx, _) = watch::channel(false);
    let in_flight: InFlight = Arc::default();
    let total: usize = config.queues.iter().map(|(_, n)| (*n).max(1)).sum();
    let (done_tx, done_rx) = mpsc::channel(total.max(COMPLETE_BATCH));
    let completer = tokio::spawn(complete_in_batches(store.clone(), done_rx, stats.clone()));
    // Captured here: the fetchers are tokio tasks, which do not know the
    // server this worker may run in.
    let spawner = fastlane::Spawner::current();
    let env = Arc::new(AttemptEnv {
        store: store.clone(),
        registry,
        lease: config.lease,
        stats: stats.clone(),
        done: done_tx,
        progress: Arc::new(StoreProgress(store.clone())),
    });
    let mut fetchers = Vec::new();
    for (queue, concurrency) in config.queues.clone() {
        let fetcher = Fetcher {
            spawner: spawner.clone(),
            store: store.clone(),
            config: config.clone(),
            stats: stats.clone(),
            in_flight: in_flight.clone(),
            env: env.clone(),
            queue,
            concurrency: concurrency.max(1),
        };
        fetchers.push(tokio::spawn(fetcher.run(stop_tx.subscribe())));
    }
    // The completer ends once the fetchers, and the attempts, have let go.
    drop(env);
    let sweeper = tokio::spawn(sweep(store.clone(), in_flight.clone(), stop_tx.subscribe()));
    let _ = shutdown.wait_for(|s| *s).await;
    // Stop fetching; running jobs go on.
    stop_tx.send_replace(true);
    let finished = tokio::time::timeout(grace, async {
        for f in &mut fetchers {
            let _ = f.await;
        }
    })
    .await
    .is_ok();
    if !finished {
        // Out of grace: abort what still runs and give it back at once.
        let left: Vec<(JobId, Running)> =
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (id, Running { token, abandon, .. }) in left {
            abandon.notify_one();
            match store.release(id, token).await {
                Ok(()) => {
                    stats.released.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => tracing::warn!("job {id}: could not release: {err}"),
            }
        }
        for f in fetchers {
            f.abort();
        }
    }
    sweeper.abort();
    // Every finished job's success is written before the worker returns.
    let _ = completer.await;
    stats
}

/// How often a worker looks for jobs held by dead processes of its host,
/// and for cancellations of the jobs it runs.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Every [`SWEEP_INTERVAL`]: tells the running handlers whose jobs were
/// cancelled (so that they see it within about a second, not at their next
/// heartbeat), and ends the leases of jobs whose worker process on this host
/// has died, waking the fetchers to take them over: a crashed worker's jobs
/// run again within about a second, not a lease.
async fn sweep<S: Store>(store: S, in_flight: InFlight, mut stop: watch::Receiver<bool>) {
    let wake = store.wakeups();
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let running: Vec<JobId> =
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        if !running.is_empty() {
            match store.cancel_requested(&running).await {
                Ok(ids) => {
                    let in_flight = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    for id in ids {
                        if let Some(job) = in_flight.get(&id) {
                            job.cancelled.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(err) => tracing::debug!("looking for cancellations failed: {err}"),
            }
        }
        match store.expire_dead_owners().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!("{n} jobs held by a worker process that died are due again");
                if let Some(wake) = &wake {
                    wake.notify_waiters();
                }
            }
            Err(err) => tracing::debug!("looking for jobs of dead workers failed: {err}"),
        }
    }
}

/// Claims jobs of one queue and starts them, while slots are free.
struct Fetcher<S: Store> {
    spawner: fastlane::Spawner,
    store: S,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    in_flight: InFlight,
    /// What each attempt it starts needs: one clone per attempt.
    env: Arc<AttemptEnv<S>>,
    queue: String,
    concurrency: usize,
}

/// What every attempt of a worker needs, shared by all of them.
struct AttemptEnv<S: Store> {
    store: S,
    registry: Registry,
    lease: Duration,
    stats: Arc<WorkerStats>,
    /// Where successes go, to be written in batches.
    done: mpsc::Sender<(JobId, i64)>,
    /// Where handlers' progress reports go.
    progress: Arc<dyn ProgressSink>,
}

impl<S: Store> Fetcher<S> {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let wake = self.store.wakeups();
        let batch = self.config.fetch_batch.clamp(1, self.concurrency);
        loop {
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = stop.wait_for(|s| *s) => break,
            };
            // Let a few more slots come free, so that a busy worker claims in
            // batches rather than one job per transaction; an idle one loses
            // at most this millisecond.
            if slots.available_permits() + 1 < batch {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let extra = slots.available_permits().min(batch - 1);
            let mut permits = first;
            if extra > 0 {
                if let Ok(more) = slots.clone().try_acquire_many_owned(extra as u32) {
                    permits.merge(more);
                }
            }
            let wanted = permits.num_permits();
            // Registered before the claim, so that an enqueue between an
            // empty claim and the wait below still wakes this fetcher.
            let woken = wake.as_ref().map(|n| n.clone().notified_owned());
            let claimed = tokio::select! {
                c = self.store.claim_many(&self.queue, &self.config.name, self.config.lease, wanted) => c,
                _ = stop.wait_for(|s| *s) => break,
            };
            let claimed = match claimed {
                Ok(jobs) => jobs,
                Err(err) => {
                    drop(permits);
                    tracing::warn!("claim from `{}` failed: {err}; retrying", self.queue);
                    tokio::select! {
                        () = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    continue;
                }
            };
            let drained = claimed.len() < wanted;
            for job in claimed {
                let permit = permits.split(1).expect("one permit per claimed job");
                self.start(job, permit);
            }
            drop(permits);
            if drained {
                // The queue had fewer jobs than free slots: wait for an
                // enqueue, a job coming due, or the poll interval.
                let woken = async {
                    match woken {
                        Some(woken) => woken.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
        // Every slot back: every attempt this fetcher started has ended.
        let _ = slots.acquire_many(u32::try_from(self.concurrency).unwrap_or(u32::MAX)).await;
    }

    /// Starts an attempt as a task of its own: where the server runs its
    /// handlers when the worker runs inside one (isolated like a request),
    /// else on tokio. It holds its slot until it ends.
    fn start(&self, job: Claimed, permit: tokio::sync::OwnedSemaphorePermit) {
        let (env, in_flight) = (self.env.clone(), self.in_flight.clone());
        let (id, token) = (job.id, job.token);
        let abandon = Arc::new(Notify::new());
        let cancelled = Arc::new(AtomicBool::new(false));
        let running = Running { token, abandon: abandon.clone(), cancelled: cancelled.clone() };
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id, running);
        self.stats.running.fetch_add(1, Ordering::Relaxed);
        let name = job.name.clone();
        self.spawner.spawn_job(&name, async move {
            tokio::select! {
                () = run_one(&env, job, cancelled) => {}
                // Out of grace at shutdown: the handler is dropped, and the
                // job given back by the worker.
                () = abandon.notified() => {}
            }
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            env.stats.running.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Writes successes in batches: whatever has finished since the last write,
/// up to [`COMPLETE_BATCH`], in one transaction. Ends when every sender is
/// gone and everything sent is written.
async fn complete_in_batches<S: Store>(
    store: S,
    mut done: mpsc::Receiver<(JobId, i64)>,
    stats: Arc<WorkerStats>,
) {
    let mut batch = Vec::with_capacity(COMPLETE_BATCH);
    while done.recv_many(&mut batch, COMPLETE_BATCH).await > 0 {
        let mut tries = 0u32;
        loop {
            match store.complete_many(&batch).await {
                Ok(fenced) => {
                    let recorded = batch.len() - fenced.len();
                    stats.succeeded.fetch_add(recorded as u64, Ordering::Relaxed);
                    stats.fenced.fetch_add(fenced.len() as u64, Ordering::Relaxed);
                    for (id, token) in fenced {
                        tracing::warn!(
                            "job {id}: success not recorded: attempt {token} no longer owns the job (fenced)"
                        );
                    }
                    break;
                }
                // The store is down or locked: the jobs are done, so keep
                // trying for a while; if their leases expire meanwhile they
                // run again (at least once, never lost).
                Err(err) if tries < 20 => {
                    tries += 1;
                    tracing::warn!("recording {} successes failed: {err}; retrying", batch.len());
                    tokio::time::sleep(Duration::from_millis(100 << tries.min(4))).await;
                }
                Err(err) => {
                    tracing::warn!("recording {} successes failed: {err}; they will run again", batch.len());
                    break;
                }
            }
        }
        batch.clear();
    }
}

/// One attempt: heartbeats while the handler runs, then the outcome.
async fn run_one<S: Store>(env: &AttemptEnv<S>, mut job: Claimed, cancelled: Arc<AtomicBool>) {
    let AttemptEnv { store, registry, lease, stats, done, progress } = env;
    let lease = *lease;
    let cancelled_flag = cancelled.clone();
    let progress = progress.clone();
    let ctx = JobContext {
        id: job.id,
        attempt: job.attempt,
        token: job.token,
        cancelled: cancelled.clone(),
        progress,
    };
    let outcome: Result<(), JobError> = match registry.handlers.get(&job.name) {
        None => Err(JobError::Permanent(format!("no handler for job `{}` on this worker", job.name))),
        Some(handler) => match handler(std::mem::take(&mut job.payload), ctx) {
            Err(bad_payload) => {
                Err(JobError::Permanent(format!("payload does not fit `{}`: {bad_payload}", job.name)))
            }
            Ok(future) => {
                let heartbeat = heartbeat(store.clone(), job.id, job.token, lease, cancelled);
                let guarded = futures_catch(future, job.timeout);
                tokio::select! {
                    outcome = guarded => outcome,
                    fenced = heartbeat => Err(JobError::Retry(fenced)),
                }
            }
        },
    };
    let written = match &outcome {
        // The job was cancelled while it ran and the handler gave up.
        Err(_) if cancelled_flag.load(Ordering::Relaxed) => {
            store.cancelled(job.id, job.token).await.map(|()| 0)
        }
        Ok(()) => {
            // Written by the completer, with others; counted there.
            if done.send((job.id, job.token)).await.is_err() {
                tracing::warn!("job {}: the worker stopped before its success was recorded", job.id);
            }
            Ok(0)
        }
        Err(JobError::Retry(e)) => store.fail(job.id, job.token, e, true).await.map(|state| {
            log_failure(&job, e, true, state);
            stats.failed.fetch_add(1, Ordering::Relaxed)
        }),
        Err(JobError::Permanent(e)) => store.fail(job.id, job.token, e, false).await.map(|state| {
            log_failure(&job, e, false, state);
            stats.failed.fetch_add(1, Ordering::Relaxed)
        }),
    };
    if let Err(err) = written {
        if err.is_fenced() {
            stats.fenced.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!("job {}: outcome not recorded: {err}", job.id);
    }
}

/// A failed attempt, once recorded: a warning while the job will be tried
/// again, an error when it is dead (the error is the handler's own).
fn log_failure(job: &Claimed, error: &str, retryable: bool, state: JobState) {
    let (id, name, attempt, max) = (job.id, job.name.as_str(), job.attempt, job.max_attempts);
    if state == JobState::Dead {
        let why = if retryable { "no attempts left" } else { "a permanent failure" };
        tracing::error!(
            target: "fastlane::jobs",
            job = id,
            name,
            attempt,
            "job {id} ({name}) is dead after attempt {attempt} of {max} ({why}): {error}"
        );
    } else {
        tracing::warn!(
            target: "fastlane::jobs",
            job = id,
            name,
            attempt,
            "job {id} ({name}) attempt {attempt} of {max} failed: {error}; it will be tried again"
        );
    }
}

/// Renews the lease every third of it; returns (ending the attempt) only if
/// the attempt lost the job.
async fn heartbeat<S: Store>(
    store: S,
    id: JobId,
    token: i64,
    lease: Duration,
    cancelled: Arc<AtomicBool>,
) -> String {
    loop {
        tokio::time::sleep(lease / 3).await;
        match store.heartbeat(id, token, lease).await {
            Ok(cancel) => {
                if cancel {
                    cancelled.store(true, Ordering::Relaxed);
                }
            }
            Err(err) if err.is_fenced() => return format!("lost the job: {err}"),
            Err(err) => tracing::warn!("job {id}: heartbeat failed: {err}"),
        }
    }
}

/// Runs the handler with its timeout; a panic is a (retryable) failure.
async fn futures_catch(future: BoxFuture, timeout: Option<Duration>) -> Result<(), JobError> {
    let caught = CatchPanic(future);
    match timeout {
        Some(t) => tokio::time::timeout(t, caught)
            .await
            .unwrap_or_else(|_| Err(JobError::Retry(format!("timed out after {:.1} s", t.as_secs_f64())))),
        None => caught.await,
    }
}

/// A handler's future with its panics turned into failures: polled in
/// place, in the attempt's own task (no task of its own to spawn per job).
struct CatchPanic(BoxFuture);

impl Future for CatchPanic {
    type Output = Result<(), JobError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let future = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string payload".to_owned());
                std::task::Poll::Ready(Err(JobError::Retry(format!("the handler panicked: {message}"))))
            }
        }
    }
}

/// A job worker to run inside a fastlane server
/// ([`Server::jobs`](fastlane::Server::jobs)): in every worker process, on
/// the executor where request handlers run, stopped with the server.
///
/// # Examples
///
/// ```no_run
/// # async fn app() -> Result<(), Box<dyn std::error::Error>> {
/// use axum::{extract::State, routing::post, Router};
/// use fastlane_jobs::{JobContext, Jobs, NewJob, Registry};
///
/// let registry = Registry::new().register("welcome", |to: String, _ctx: JobContext| async move {
///     println!("mail to {to}");
///     Ok(())
/// });
/// let jobs = Jobs::new(fastlane_jobs::connect("sqlite://jobs.db").await?, registry);
/// let app = Router::new()
///     .route("/signup", post(|State(jobs): State<Jobs>| async move {
///         jobs.enqueue(NewJob::new("welcome", "ada@example.com".into())).await.map(|id| id.to_string())
///     }))
///     .with_state(jobs.clone());
/// fastlane::Server::new(app).jobs(jobs.worker()).serve().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Worker<S: Store> {
    store: S,
    registry: Registry,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
}

impl<S: Store> Worker<S> {
    /// A worker for the job types of `registry`, with the default
    /// [`WorkerConfig`].
    pub fn new(store: S, registry: Registry) -> Self {
        Self { store, registry, config: WorkerConfig::default(), stats: Arc::default() }
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Its counters, to watch while it runs.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }
}

impl<S: Store> fastlane::Companion for Worker<S> {
    fn name(&self) -> String {
        let queues: Vec<String> = self.config.queues.iter().map(|(q, n)| format!("{q} x{n}")).collect();
        format!("job worker {} ({})", self.config.name, queues.join(", "))
    }

    fn metrics(&self) -> Option<fastlane::MetricsSource> {
        use fastlane::{CompanionMetric, MetricKind};
        let stats = self.stats.clone();
        let read = move || {
            let metric = |name, help, kind, value: &AtomicU64| CompanionMetric {
                name,
                help,
                kind,
                value: i64::try_from(value.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            };
            vec![
                metric(
                    "jobs_succeeded",
                    "Job attempts that succeeded",
                    MetricKind::Counter,
                    &stats.succeeded,
                ),
                metric(
                    "jobs_failed",
                    "Job attempts that failed (retrying or dead)",
                    MetricKind::Counter,
                    &stats.failed,
                ),
                metric(
                    "jobs_fenced",
                    "Writes of job attempts rejected because another attempt owned the job",
                    MetricKind::Counter,
                    &stats.fenced,
                ),
                metric(
                    "jobs_released",
                    "Jobs given back unfinished at shutdown",
                    MetricKind::Counter,
                    &stats.released,
                ),
                metric(
                    "jobs_running",
                    "Job attempts running now in this process",
                    MetricKind::Gauge,
                    &stats.running,
                ),
            ]
        };
        Some(Arc::new(read))
    }

    fn run(self: Box<Self>, stop: watch::Receiver<bool>, grace: Duration) -> fastlane::CompanionFuture {
        let Worker { store, registry, config, stats } = *self;
        Box::pin(async move {
            let stats = run_with_stats(store, registry, config, stop, grace, stats).await;
            tracing::info!(
                succeeded = stats.succeeded.load(Ordering::Relaxed),
                failed = stats.failed.load(Ordering::Relaxed),
                fenced = stats.fenced.load(Ordering::Relaxed),
                released = stats.released.load(Ordering::Relaxed),
                "job worker stopped"
            );
        })
    }
}

/// The application's handle on its job queue: a store and the job types it
/// knows, so that every enqueue is checked (unknown name, bad payload) when
/// it is made. Cheap to clone; give it to handlers as axum `State`.
#[derive(Debug, Clone)]
pub struct Jobs<S: Store = crate::AnyStore> {
    store: S,
    registry: Registry,
}

impl<S: Store> Jobs<S> {
    /// The queue on `store` for the job types of `registry`.
    pub fn new(store: S, registry: Registry) -> Self {
        Self { store, registry }
    }

    /// Checks and stores a job; returns its id.
    pub async fn enqueue(&self, job: NewJob) -> Result<JobId, Error> {
        enqueue_checked(&self.store, &self.registry, job).await
    }

    /// A job with its attempts and progress.
    pub async fn get(&self, id: JobId) -> Result<crate::JobInfo, Error> {
        self.store.get(id).await
    }

    /// The store, for everything else.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The job types.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A worker for these job types on this store, to run inside the server
    /// with [`Server::jobs`](fastlane::Server::jobs).
    pub fn worker(&self) -> Worker<S> {
        Worker::new(self.store.clone(), self.registry.clone())
    }
}
