//! The worker loop: fetches jobs, runs their handlers, keeps their leases
//! alive, records the outcomes in batches, and on shutdown gives back what it
//! could not finish. (The job types are in `registry.rs`; a worker inside a
//! fastlane server in `in_server.rs`.)

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::job::{Claimed, Done, JobId, JobState, Lease};
use crate::registry::{BoxFuture, JobContext, JobError, ProgressSink, Registry, StoreProgress};
use crate::retention::{Pruning, Retention};
use crate::Store;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
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
    /// How long finished jobs are kept before this consumer deletes them
    /// ([`Retention`]: succeeded and cancelled a day, dead a week, by
    /// default); `None` keeps them for ever.
    pub retention: Option<Retention>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            name: format!("consumer-{}", std::process::id()),
            queues: vec![("default".to_owned(), 16)],
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            fetch_batch: 256,
            retention: Some(Retention::default()),
        }
    }
}

/// Counts of what a worker did.
#[derive(Debug, Default)]
pub struct ConsumerStats {
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
    /// Finished jobs this consumer deleted past their retention.
    pub pruned: AtomicU64,
    /// Rows of the jobs table when the pruner last measured the store.
    pub store_jobs: AtomicU64,
    /// Rows of the attempts table, likewise.
    pub store_attempts: AtomicU64,
    /// Bytes the store takes, likewise.
    pub store_bytes: AtomicU64,
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
    config: ConsumerConfig,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> Arc<ConsumerStats> {
    run_with_stats(store, registry, config, shutdown, grace, Arc::default()).await
}

/// [`run`], counting into `stats`, which the caller can watch while the
/// worker runs.
///
/// Each queue has a fetcher that claims as many jobs as it has free slots
/// (up to [`ConsumerConfig::fetch_batch`]) in one transaction, and one
/// completer writes the successes of many jobs in one transaction: the
/// store's cost is paid per batch, not per job. Failures, which need their
/// error text and backoff, are written one by one.
pub async fn run_with_stats<S: Store>(
    store: S,
    registry: Registry,
    config: ConsumerConfig,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    stats: Arc<ConsumerStats>,
) -> Arc<ConsumerStats> {
    let (stop_tx, _) = watch::channel(false);
    let in_flight: InFlight = Arc::default();
    let total: usize = config.queues.iter().map(|(_, n)| (*n).max(1)).sum();
    let (done_tx, done_rx) = mpsc::channel(total.max(COMPLETE_BATCH));
    let completer = tokio::spawn(complete_in_batches(store.clone(), done_rx, stats.clone()));
    // Captured here: the fetchers are tokio tasks, which do not know the
    // server this worker may run in.
    let spawner = fastlane::Spawner::current();
    let scheduler = tokio::spawn(crate::scheduler::run(
        store.clone(),
        registry.schedules().to_vec(),
        stop_tx.subscribe(),
    ));
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
    let pruner = config.retention.map(|retention| {
        let stats = stats.clone();
        let report = move |event| match event {
            Pruning::Pruned(n) => {
                stats.pruned.fetch_add(n, Ordering::Relaxed);
            }
            Pruning::Measured(sizes) => {
                stats.store_jobs.store(sizes.jobs, Ordering::Relaxed);
                stats.store_attempts.store(sizes.attempts, Ordering::Relaxed);
                stats.store_bytes.store(sizes.bytes, Ordering::Relaxed);
            }
        };
        tokio::spawn(crate::retention::run(store.clone(), retention, report, stop_tx.subscribe()))
    });
    let _ = shutdown.wait_for(|s| *s).await;
    // Stop fetching and scheduling; running jobs go on.
    stop_tx.send_replace(true);
    // A look at a schedule is one transaction: let it end rather than cut it.
    let _ = scheduler.await;
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
            match store.release(Lease { job: id, token }).await {
                Ok(()) => {
                    stats.released.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => tracing::warn!("job {id}: could not release: {}", fastlane::ErrorChain(&err)),
            }
        }
        for f in fetchers {
            f.abort();
        }
    }
    sweeper.abort();
    if let Some(pruner) = pruner {
        // A batch is one short transaction: let it end rather than cut it.
        let _ = pruner.await;
    }
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
                Err(err) => {
                    tracing::debug!("looking for cancellations failed: {}", fastlane::ErrorChain(&err))
                }
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
            Err(err) => {
                tracing::debug!("looking for jobs of dead workers failed: {}", fastlane::ErrorChain(&err))
            }
        }
    }
}

/// Claims jobs of one queue and starts them, while slots are free.
struct Fetcher<S: Store> {
    spawner: fastlane::Spawner,
    store: S,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
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
    stats: Arc<ConsumerStats>,
    /// Where successes go, to be written in batches.
    done: mpsc::Sender<Done>,
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
                    tracing::warn!(
                        "claim from `{}` failed: {}; retrying",
                        self.queue,
                        fastlane::ErrorChain(&err)
                    );
                    tokio::select! {
                        () = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    continue;
                }
            };
            let drained = claimed.len() < wanted;
            let mut known = prefetch_results(&self.store, &claimed).await;
            for job in claimed {
                let permit = permits.split(1).expect("one permit per claimed job");
                let results = take_results(&mut known, &job);
                self.start(job, permit, results);
            }
            drop(permits);
            if drained {
                // The queue had fewer jobs than free slots: wait for an
                // enqueue, a job coming due, or the poll interval; or, if
                // the queue's limits held the claim back, until they allow
                // more (the next token of its rate, a slot of its cap).
                let wait = match self.store.claim_wait(&self.queue) {
                    Some(limited) => limited.min(self.config.poll_interval),
                    None => self.config.poll_interval,
                };
                let woken = async {
                    match woken {
                        Some(woken) => woken.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(wait) => {}
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
    fn start(&self, job: Claimed, permit: tokio::sync::OwnedSemaphorePermit, results: Option<DepResults>) {
        let (env, in_flight) = (self.env.clone(), self.in_flight.clone());
        let (id, token) = (job.id, job.token);
        let abandon = Arc::new(Notify::new());
        let cancelled = Arc::new(AtomicBool::new(false));
        let running = Running { token, abandon: abandon.clone(), cancelled: cancelled.clone() };
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id, running);
        self.stats.running.fetch_add(1, Ordering::Relaxed);
        let name = job.name.clone();
        // The attempt's log lines name the request that enqueued the job.
        // Only then: a span per job would cost every job of a busy queue.
        let span = match &job.request_id {
            Some(request) => {
                tracing::error_span!(target: "fastlane_jobs", "job", id = job.id, request_id = %request)
            }
            None => tracing::Span::none(),
        };
        let attempt = async move {
            tokio::select! {
                () = run_one(&env, job, cancelled, results) => {}
                // Out of grace at shutdown: the handler is dropped, and the
                // job given back by the worker.
                () = abandon.notified() => {}
            }
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            env.stats.running.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        };
        self.spawner.spawn_job(&name, tracing::Instrument::instrument(attempt, span));
    }
}

/// Writes successes in batches: whatever has finished since the last write,
/// up to [`COMPLETE_BATCH`], in one transaction. Ends when every sender is
/// gone and everything sent is written.
async fn complete_in_batches<S: Store>(store: S, mut done: mpsc::Receiver<Done>, stats: Arc<ConsumerStats>) {
    let mut batch = Vec::with_capacity(COMPLETE_BATCH);
    while done.recv_many(&mut batch, COMPLETE_BATCH).await > 0 {
        let mut tries = 0u32;
        loop {
            match store.complete_many(&batch).await {
                Ok(fenced) => {
                    let recorded = batch.len() - fenced.len();
                    stats.succeeded.fetch_add(recorded as u64, Ordering::Relaxed);
                    stats.fenced.fetch_add(fenced.len() as u64, Ordering::Relaxed);
                    for Lease { job, token } in fenced {
                        tracing::warn!(
                            "job {job}: success not recorded: attempt {token} no longer owns the job (fenced)"
                        );
                    }
                    break;
                }
                // The store is down or locked: the jobs are done, so keep
                // trying for a while; if their leases expire meanwhile they
                // run again (at least once, never lost).
                Err(err) if tries < 20 => {
                    tries += 1;
                    tracing::warn!(
                        "recording {} successes failed: {}; retrying",
                        batch.len(),
                        fastlane::ErrorChain(&err)
                    );
                    tokio::time::sleep(Duration::from_millis(100 << tries.min(4))).await;
                }
                Err(err) => {
                    tracing::warn!(
                        "recording {} successes failed: {}; they will run again",
                        batch.len(),
                        fastlane::ErrorChain(&err)
                    );
                    break;
                }
            }
        }
        batch.clear();
    }
}

/// One attempt: heartbeats while the handler runs, then the outcome.
async fn run_one<S: Store>(
    env: &AttemptEnv<S>,
    mut job: Claimed,
    cancelled: Arc<AtomicBool>,
    results: Option<DepResults>,
) {
    let AttemptEnv { store, registry, lease, stats, done, progress } = env;
    let lease = *lease;
    let cancelled_flag = cancelled.clone();
    let progress = progress.clone();
    let ctx = JobContext::new(job.id, job.attempt, job.token, cancelled.clone(), progress);
    let results = match results {
        Some(results) => Ok(results),
        None => dependency_results(store, &job).await,
    };
    let ctx = match results {
        Ok(results) => Ok(ctx.with_results(results)),
        Err(err) => Err(err),
    };
    let outcome: Result<Option<serde_json::Value>, JobError> = match (ctx, registry.handler(&job.name)) {
        (Err(err), _) => Err(err),
        (_, None) => Err(JobError::Permanent(format!("no handler for job `{}` on this consumer", job.name))),
        (Ok(ctx), Some(handler)) => match handler(std::mem::take(&mut job.payload), ctx) {
            Err(bad_payload) => {
                Err(JobError::Permanent(format!("payload does not fit `{}`: {bad_payload}", job.name)))
            }
            Ok(future) => {
                let heartbeat = heartbeat(store.clone(), job.lease(), lease, cancelled);
                let guarded = futures_catch(future, job.timeout);
                tokio::select! {
                    outcome = guarded => outcome,
                    fenced = heartbeat => Err(JobError::Retry(fenced)),
                }
            }
        },
    };
    let written = match outcome {
        // The job was cancelled while it ran and the handler gave up.
        Err(_) if cancelled_flag.load(Ordering::Relaxed) => store.cancelled(job.lease()).await.map(|()| 0),
        Ok(result) => {
            // Written by the completer, with others; counted there.
            if done.send(Done { lease: job.lease(), result }).await.is_err() {
                tracing::warn!("job {}: the consumer stopped before its success was recorded", job.id);
            }
            Ok(0)
        }
        Err(JobError::Retry(e)) => store.fail(job.lease(), &e, true).await.map(|state| {
            log_failure(&job, &e, true, state);
            stats.failed.fetch_add(1, Ordering::Relaxed)
        }),
        Err(JobError::Permanent(e)) => store.fail(job.lease(), &e, false).await.map(|state| {
            log_failure(&job, &e, false, state);
            stats.failed.fetch_add(1, Ordering::Relaxed)
        }),
    };
    if let Err(err) = written {
        if err.is_fenced() {
            stats.fenced.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!("job {}: outcome not recorded: {}", job.id, fastlane::ErrorChain(&err));
    }
}

/// What the jobs a workflow step waited for returned, in its order.
type DepResults = Vec<crate::registry::DependencyResult>;

/// The results every job of a claim waited for, read in one query (a
/// chain's steps would otherwise cost a query each). Empty if none waited,
/// or if the read failed: each job then reads its own.
async fn prefetch_results<S: Store>(
    store: &S,
    claimed: &[Claimed],
) -> HashMap<JobId, Option<serde_json::Value>> {
    let mut ids: Vec<JobId> = claimed.iter().flat_map(|job| job.depends_on.iter().copied()).collect();
    if ids.is_empty() {
        return HashMap::new();
    }
    ids.sort_unstable();
    ids.dedup();
    store.results(&ids).await.map(|found| found.into_iter().collect()).unwrap_or_default()
}

/// A job's share of [`prefetch_results`]; `None` if any is missing (its
/// attempt then reads them itself, and says what is gone).
fn take_results(known: &mut HashMap<JobId, Option<serde_json::Value>>, job: &Claimed) -> Option<DepResults> {
    job.depends_on.iter().map(|id| Some((*id, known.get(id)?.clone()))).collect()
}

/// What the jobs a workflow step waited for returned, read before its
/// handler starts (one query, only for a job that waited for some).
async fn dependency_results<S: Store>(store: &S, job: &Claimed) -> Result<DepResults, JobError> {
    if job.depends_on.is_empty() {
        return Ok(Vec::new());
    }
    let results = store.results(&job.depends_on).await.map_err(|err| {
        JobError::Retry(format!("reading the results it waits for failed: {}", fastlane::ErrorChain(&err)))
    })?;
    if results.len() < job.depends_on.len() {
        let gone: Vec<String> = job
            .depends_on
            .iter()
            .filter(|id| !results.iter().any(|(found, _)| found == *id))
            .map(ToString::to_string)
            .collect();
        return Err(JobError::Permanent(format!(
            "the jobs it waited for are gone (deleted): {}",
            gone.join(", ")
        )));
    }
    Ok(results)
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
async fn heartbeat<S: Store>(store: S, held: Lease, lease: Duration, cancelled: Arc<AtomicBool>) -> String {
    loop {
        tokio::time::sleep(lease / 3).await;
        match store.heartbeat(held, lease).await {
            Ok(cancel) => {
                if cancel {
                    cancelled.store(true, Ordering::Relaxed);
                }
            }
            Err(err) if err.is_fenced() => return format!("lost the job: {}", fastlane::ErrorChain(&err)),
            Err(err) => tracing::warn!("job {}: heartbeat failed: {}", held.job, fastlane::ErrorChain(&err)),
        }
    }
}

/// Runs the handler with its timeout; a panic is a (retryable) failure.
async fn futures_catch(
    future: BoxFuture,
    timeout: Option<Duration>,
) -> Result<Option<serde_json::Value>, JobError> {
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
    type Output = Result<Option<serde_json::Value>, JobError>;

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
