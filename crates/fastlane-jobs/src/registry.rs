//! The job types a worker can run: the [`Registry`] (a handler and a
//! payload type per name, async or on fastlane's blocking and CPU lanes),
//! what a handler is given ([`JobContext`]) and how it fails ([`JobError`]),
//! and [`enqueue_checked`], which refuses an unknown name or a bad payload
//! when the job is enqueued.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::job::{JobId, Lease, NewJob};
use crate::{Error, Schedule, Store};

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

/// A job waited for, with what it returned (`None`: nothing).
pub(crate) type DependencyResult = (JobId, Option<serde_json::Value>);

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
    /// What the jobs it waited for returned, in order; `None` for a job
    /// that waited for none (no allocation per job on the hot path).
    results: Option<Arc<[DependencyResult]>>,
}

/// Where a handler's progress reports go.
pub(crate) trait ProgressSink: Send + Sync + std::fmt::Debug {
    fn report(&self, id: JobId, token: i64, percent: u8, message: String);
}

/// Progress written to the store, in the background.
#[derive(Debug)]
pub(crate) struct StoreProgress<S: Store>(pub(crate) S);

impl<S: Store> ProgressSink for StoreProgress<S> {
    fn report(&self, id: JobId, token: i64, percent: u8, message: String) {
        let store = self.0.clone();
        tokio::spawn(async move {
            if let Err(err) = store.progress(Lease { job: id, token }, percent, &message).await {
                tracing::warn!("job {id}: progress not recorded: {}", fastlane::ErrorChain(&err));
            }
        });
    }
}

impl JobContext {
    /// The context of attempt `attempt` (fencing token `token`) of job `id`.
    pub(crate) fn new(
        id: JobId,
        attempt: u32,
        token: i64,
        cancelled: Arc<AtomicBool>,
        progress: Arc<dyn ProgressSink>,
    ) -> Self {
        Self { id, attempt, token, cancelled, progress, results: None }
    }

    /// With the results of the jobs it waited for.
    pub(crate) fn with_results(mut self, results: Vec<DependencyResult>) -> Self {
        self.results = (!results.is_empty()).then(|| results.into());
        self
    }

    /// The jobs it waited for ([`NewJob::after`], a workflow's earlier
    /// steps), each with what it returned (`None` for nothing), in the
    /// order they were given. Empty for a job that waited for none.
    pub fn dependency_results(&self) -> &[(JobId, Option<serde_json::Value>)] {
        self.results.as_deref().unwrap_or_default()
    }

    /// The results of the jobs it waited for, read as `T`, in order: a
    /// chord's final step gets every member's. A result that does not fit
    /// `T` fails the attempt for good, naming the job (a retry would read
    /// the same).
    pub fn results<T: DeserializeOwned>(&self) -> Result<Vec<T>, JobError> {
        self.dependency_results()
            .iter()
            .map(|(id, value)| {
                serde_json::from_value(value.clone().unwrap_or(serde_json::Value::Null)).map_err(|e| {
                    JobError::Permanent(format!(
                        "the result of job {id}, which it waited for, does not fit: {e}"
                    ))
                })
            })
            .collect()
    }

    /// The result of the one job it waited for, read as `T`: a chain's step
    /// gets the step before's. Fails the attempt for good if it waited for
    /// none or for several (use [`results`](Self::results)).
    pub fn result<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        match self.dependency_results().len() {
            1 => Ok(self.results::<T>()?.remove(0)),
            n => Err(JobError::Permanent(format!(
                "it waited for {n} jobs, not one: read their results with `results`"
            ))),
        }
    }

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

/// A handler's attempt, started; on success, what it returned as JSON
/// (`None` for nothing: `()`).
pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<Option<serde_json::Value>, JobError>> + Send>>;
/// Checks a payload against a job type's payload type.
type Validator = Arc<dyn Fn(&serde_json::Value) -> Result<(), String> + Send + Sync>;
/// A job type's handler: reads the payload and starts the attempt.
pub(crate) type Handler =
    Arc<dyn Fn(serde_json::Value, JobContext) -> Result<BoxFuture, String> + Send + Sync>;

/// The job types a worker can run, by name, with a payload type each.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
    /// Checks a payload against the type's payload type, at enqueue time.
    validators: HashMap<String, Validator>,
    /// Periodic jobs, run by every consumer of this registry.
    schedules: Vec<Schedule>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("jobs", &self.handlers.keys().collect::<Vec<_>>())
            .field("schedules", &self.schedules.iter().map(Schedule::name).collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an async handler for jobs named `name` with payload `P`.
    /// What it returns on success (any `Serialize` type; `()` for nothing)
    /// is stored with the job as JSON, and read back with
    /// [`Jobs::result`](crate::Jobs::result), `GET /jobs/{id}` or
    /// `fastlane jobs show`.
    pub fn register<P, R, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, JobError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.handlers.insert(
            name.to_owned(),
            Arc::new(move |payload, ctx| {
                let payload: P = serde_json::from_value(payload).map_err(|e| e.to_string())?;
                let handler = handler.clone();
                Ok(Box::pin(async move { handler(payload, ctx).await.and_then(|r| to_result(&r)) })
                    as BoxFuture)
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

    /// Registers a blocking handler, run on fastlane's blocking lane; its
    /// result is stored as [`register`](Self::register)'s.
    pub fn register_blocking<P, R, F>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P, JobContext) -> Result<R, JobError> + Clone + Send + Sync + 'static,
    {
        self.register(name, move |payload: P, ctx: JobContext| {
            let handler = handler.clone();
            async move { lane_outcome(fastlane::blocking(move || handler(payload, ctx)).await) }
        })
    }

    /// Registers a CPU-heavy handler, run on fastlane's CPU lane; its result
    /// is stored as [`register`](Self::register)'s.
    pub fn register_cpu<P, R, F>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P, JobContext) -> Result<R, JobError> + Clone + Send + Sync + 'static,
    {
        self.register(name, move |payload: P, ctx: JobContext| {
            let handler = handler.clone();
            async move { lane_outcome(fastlane::compute(move || handler(payload, ctx)).await) }
        })
    }

    /// Adds a periodic job ([`Schedule`]), run by every consumer of this
    /// registry. Each of its ticks is enqueued once however many consumers
    /// run it, in one process or on many hosts: a consumer looks at a
    /// schedule in one write transaction that locks its row in
    /// `fastlane_schedules`, enqueues the due tick's job and moves the
    /// schedule's last tick, so the next to look finds the tick taken. Its
    /// job type must be registered first, and its payload must be one the
    /// type takes; schedule names are unique.
    ///
    /// ```
    /// use std::time::Duration;
    /// use fastlane_jobs::{JobContext, NewJob, Registry, Schedule};
    ///
    /// let registry = Registry::new()
    ///     .register("sweep", |_: serde_json::Value, _ctx: JobContext| async { Ok(()) })
    ///     .schedule(Schedule::every("sweep", NewJob::new("sweep", serde_json::Value::Null), Duration::from_secs(60))?)?;
    /// # let _ = registry;
    /// # Ok::<(), fastlane_jobs::Error>(())
    /// ```
    pub fn schedule(mut self, schedule: Schedule) -> Result<Self, Error> {
        self.check(&schedule.job).map_err(|err| {
            let why = match err {
                Error::Invalid(why) => why,
                other => other.to_string(),
            };
            Error::Invalid(format!("schedule `{}`: {why}", schedule.name))
        })?;
        if self.schedules.iter().any(|s| s.name == schedule.name) {
            return Err(Error::Invalid(format!("two schedules are named `{}`", schedule.name)));
        }
        self.schedules.push(schedule);
        Ok(self)
    }

    /// The schedules declared with [`schedule`](Self::schedule).
    pub fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }

    /// The handler of job type `name`.
    pub(crate) fn handler(&self, name: &str) -> Option<&Handler> {
        self.handlers.get(name)
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
fn lane_outcome<R>(result: Result<Result<R, JobError>, fastlane::LaneError>) -> Result<R, JobError> {
    result.unwrap_or_else(|err| Err(JobError::Retry(err.to_string())))
}

/// A handler's return value as stored: JSON, `None` for nothing (`()`). A
/// value JSON cannot hold (a map with non-string keys) fails the job for
/// good, naming why: retrying would fail the same way.
fn to_result<R: Serialize>(value: &R) -> Result<Option<serde_json::Value>, JobError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Null) => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(err) => Err(JobError::Permanent(format!("its result cannot be stored as JSON: {err}"))),
    }
}

/// Enqueues through a registry, so that unknown names and bad payloads are
/// refused at enqueue time, not discovered by a worker later.
pub async fn enqueue_checked<S: Store>(
    store: &S,
    registry: &Registry,
    mut job: NewJob,
) -> Result<JobId, Error> {
    if job.request_id.is_none() {
        // Read on the first poll, which runs inside the handler's own.
        job.request_id = fastlane::RequestId::current().map(|id| id.to_string());
    }
    registry.check(&job)?;
    store.enqueue(job).await
}
