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
use tokio::sync::{watch, Semaphore};

use crate::job::{Claimed, JobId, NewJob};
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
    /// True once the job has been cancelled (seen at the last heartbeat): a
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
                serde_json::from_value::<P>(payload.clone()).map(drop).map_err(|e| e.to_string())
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
    /// How long to wait before looking again when a queue is empty.
    pub poll_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: format!("worker-{}", std::process::id()),
            queues: vec![("default".to_owned(), 16)],
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_millis(50),
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
}

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
pub async fn run_with_stats<S: Store>(
    store: S,
    registry: Registry,
    config: WorkerConfig,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    stats: Arc<WorkerStats>,
) -> Arc<WorkerStats> {
    let mut fetchers = Vec::new();
    let (stop_tx, _) = watch::channel(false);
    let in_flight: Arc<std::sync::Mutex<HashMap<JobId, (i64, tokio::task::AbortHandle)>>> =
        Default::default();
    for (queue, concurrency) in config.queues.clone() {
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let (store, registry, config, stats, in_flight) =
            (store.clone(), registry.clone(), config.clone(), stats.clone(), in_flight.clone());
        let mut stop = stop_tx.subscribe();
        fetchers.push(tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("never closed"),
                    _ = stop.wait_for(|s| *s) => break,
                };
                let claimed = tokio::select! {
                    c = store.claim(&queue, &config.name, config.lease) => c,
                    _ = stop.wait_for(|s| *s) => break,
                };
                match claimed {
                    Ok(Some(job)) => {
                        let (store, registry, stats, lease) =
                            (store.clone(), registry.clone(), stats.clone(), config.lease);
                        let (id, token) = (job.id, job.token);
                        let in_flight_done = in_flight.clone();
                        let handle = tasks.spawn(async move {
                            run_one(store, &registry, job, lease, &stats).await;
                            in_flight_done.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            drop(permit);
                        });
                        in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (token, handle));
                    }
                    Ok(None) => {
                        drop(permit);
                        tokio::select! {
                            () = tokio::time::sleep(config.poll_interval) => {}
                            _ = stop.wait_for(|s| *s) => break,
                        }
                    }
                    Err(err) => {
                        drop(permit);
                        tracing::warn!("claim from `{queue}` failed: {err}; retrying");
                        tokio::time::sleep(config.poll_interval * 10).await;
                    }
                }
            }
            while tasks.join_next().await.is_some() {}
        }));
    }
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
        let left: Vec<(JobId, (i64, tokio::task::AbortHandle))> =
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (id, (token, abort)) in left {
            abort.abort();
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
    stats
}

/// One attempt: heartbeats while the handler runs, then the outcome.
async fn run_one<S: Store>(
    store: S,
    registry: &Registry,
    job: Claimed,
    lease: Duration,
    stats: &WorkerStats,
) {
    let cancelled = Arc::new(AtomicBool::new(false));
    let cancelled_flag = cancelled.clone();
    let ctx = JobContext {
        id: job.id,
        attempt: job.attempt,
        token: job.token,
        cancelled: cancelled.clone(),
        progress: Arc::new(StoreProgress(store.clone())),
    };
    let outcome: Result<(), JobError> = match registry.handlers.get(&job.name) {
        None => Err(JobError::Permanent(format!("no handler for job `{}` on this worker", job.name))),
        Some(handler) => match handler(job.payload.clone(), ctx) {
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
            store.complete(job.id, job.token).await.map(|()| stats.succeeded.fetch_add(1, Ordering::Relaxed))
        }
        Err(JobError::Retry(e)) => {
            store.fail(job.id, job.token, e, true).await.map(|_| stats.failed.fetch_add(1, Ordering::Relaxed))
        }
        Err(JobError::Permanent(e)) => store
            .fail(job.id, job.token, e, false)
            .await
            .map(|_| stats.failed.fetch_add(1, Ordering::Relaxed)),
    };
    if let Err(err) = written {
        if err.is_fenced() {
            stats.fenced.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!("job {}: outcome not recorded: {err}", job.id);
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
            Ok(cancel) => cancelled.store(cancel, Ordering::Relaxed),
            Err(err) if err.is_fenced() => return format!("lost the job: {err}"),
            Err(err) => tracing::warn!("job {id}: heartbeat failed: {err}"),
        }
    }
}

/// Runs the handler with its timeout; a panic is a (retryable) failure.
async fn futures_catch(future: BoxFuture, timeout: Option<Duration>) -> Result<(), JobError> {
    let caught = async {
        let handle = tokio::spawn(AssertUnwindSafe(future));
        // If this attempt is abandoned (shutdown), the handler stops too.
        let _abort = AbortOnDrop(handle.abort_handle());
        match handle.await {
            Ok(outcome) => outcome,
            Err(err) if err.is_panic() => Err(JobError::Retry("the handler panicked".into())),
            Err(err) => Err(JobError::Retry(format!("the handler was aborted: {err}"))),
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, caught)
            .await
            .unwrap_or_else(|_| Err(JobError::Retry(format!("timed out after {:.1} s", t.as_secs_f64())))),
        None => caught.await,
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
