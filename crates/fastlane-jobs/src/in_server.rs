//! Jobs inside a fastlane server: the [`Consumer`] that runs as the server's
//! companion (on the executor where request handlers run, stopped with the
//! server), and [`Jobs`], the application's checked handle on its store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::consumer::{run_with_stats, ConsumerConfig, ConsumerStats};
use crate::job::{JobId, NewJob};
use crate::registry::{enqueue_checked, Registry};
use crate::{Error, Store};

/// A job consumer to run inside a fastlane server
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
/// fastlane::Server::new(app).jobs(jobs.consumer()).serve().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Consumer<S: Store> {
    store: S,
    registry: Registry,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
    dashboard: Option<crate::Dashboard>,
}

/// Where a server shows its job store's dashboard, when internal endpoints
/// are on.
pub const DASHBOARD_PATH: &str = "/_fastlane/jobs";

impl<S: Store> Consumer<S> {
    /// A worker for the job types of `registry`, with the default
    /// [`ConsumerConfig`].
    pub fn new(store: S, registry: Registry) -> Self {
        let dashboard = Some(crate::Dashboard::new().at(DASHBOARD_PATH));
        Self { store, registry, config: ConsumerConfig::default(), stats: Arc::default(), dashboard }
    }

    /// The store's dashboard, served at [`DASHBOARD_PATH`]`/` by the server
    /// when its internal endpoints are on (`Config::expose_internal`; off by
    /// default): by default with no token, since it is only there when the
    /// server's own endpoints are exposed; give one
    /// ([`Dashboard::token`](crate::Dashboard::token)), or `None` for no
    /// dashboard.
    pub fn dashboard(mut self, dashboard: Option<crate::Dashboard>) -> Self {
        self.dashboard = dashboard.map(|d| d.at(DASHBOARD_PATH));
        self
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// Its counters, to watch while it runs.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }
}

impl<S: Store> fastlane::Companion for Consumer<S> {
    fn name(&self) -> String {
        let queues: Vec<String> = self.config.queues.iter().map(|(q, n)| format!("{q} x{n}")).collect();
        format!("job consumer {} ({})", self.config.name, queues.join(", "))
    }

    fn routes(&self) -> Option<axum::Router> {
        Some(self.dashboard.clone()?.router(self.store.clone()))
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
                metric(
                    "jobs_pruned",
                    "Finished jobs this process deleted past their retention",
                    MetricKind::Counter,
                    &stats.pruned,
                ),
                metric(
                    "jobs_store_jobs_rows",
                    "Rows of the job store's jobs table, as last measured (every retention interval)",
                    MetricKind::Gauge,
                    &stats.store_jobs,
                ),
                metric(
                    "jobs_store_attempts_rows",
                    "Rows of the job store's attempts table, as last measured",
                    MetricKind::Gauge,
                    &stats.store_attempts,
                ),
                metric(
                    "jobs_store_bytes",
                    "Bytes the job store takes (the SQLite file, or the PostgreSQL tables), as last measured",
                    MetricKind::Gauge,
                    &stats.store_bytes,
                ),
            ]
        };
        Some(Arc::new(read))
    }

    fn run(self: Box<Self>, stop: watch::Receiver<bool>, grace: Duration) -> fastlane::CompanionFuture {
        let Consumer { store, registry, config, stats, .. } = *self;
        Box::pin(async move {
            let stats = run_with_stats(store, registry, config, stop, grace, stats).await;
            tracing::info!(
                succeeded = stats.succeeded.load(Ordering::Relaxed),
                failed = stats.failed.load(Ordering::Relaxed),
                fenced = stats.fenced.load(Ordering::Relaxed),
                released = stats.released.load(Ordering::Relaxed),
                "job consumer stopped"
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

    /// Waits up to `limit` for job `id` to end, and reads what its handler
    /// returned into `R` (`serde_json::Value` takes anything). A job that
    /// ended dead or cancelled is [`Error::Unsuccessful`] with its last
    /// error; one still pending or running when the wait ends is
    /// [`Error::NotFinished`]. See [`wait_for_result`].
    ///
    /// ```no_run
    /// # async fn f(jobs: fastlane_jobs::Jobs) -> Result<(), fastlane_jobs::Error> {
    /// use fastlane_jobs::NewJob;
    /// let id = jobs.enqueue(NewJob::new("thumbnail", serde_json::json!({"image": 7}))).await?;
    /// let url: String = jobs.result(id, std::time::Duration::from_secs(30)).await?;
    /// # let _ = url;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn result<R: serde::de::DeserializeOwned>(
        &self,
        id: JobId,
        limit: Duration,
    ) -> Result<R, Error> {
        wait_for_result(&self.store, id, limit).await
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
    pub fn consumer(&self) -> Consumer<S> {
        Consumer::new(self.store.clone(), self.registry.clone())
    }
}

/// How often [`wait_for_result`] looks at first; it looks less often the
/// longer it waits, up to [`WAIT_POLL_MAX`].
const WAIT_POLL_MIN: Duration = Duration::from_millis(10);
/// The longest pause between two looks of [`wait_for_result`].
const WAIT_POLL_MAX: Duration = Duration::from_millis(500);

/// Waits up to `limit` for job `id` to end, and reads its result into `R`.
///
/// It reads the job's row, every 10 ms at first and less often as the wait
/// goes on (up to every 500 ms): a result is seen within a few
/// milliseconds of a quick job's end, and a long wait costs a read or two
/// a second, not a connection held open. Works the same on both stores and
/// across processes (the job may run on any consumer).
pub async fn wait_for_result<S: Store, R: serde::de::DeserializeOwned>(
    store: &S,
    id: JobId,
    limit: Duration,
) -> Result<R, Error> {
    use crate::JobState;
    let started = tokio::time::Instant::now();
    let mut pause = WAIT_POLL_MIN;
    loop {
        let job = store.get(id).await?;
        match job.state {
            JobState::Succeeded => {
                let value = job.result.unwrap_or(serde_json::Value::Null);
                return serde_json::from_value(value).map_err(|err| {
                    Error::Invalid(format!("the result of job {id} does not fit the type asked for: {err}"))
                });
            }
            JobState::Dead | JobState::Cancelled => {
                return Err(Error::Unsuccessful { job: id, state: job.state, error: job.last_error });
            }
            state if started.elapsed() >= limit => {
                return Err(Error::NotFinished { job: id, state, waited: started.elapsed() });
            }
            _ => {}
        }
        let left = limit.saturating_sub(started.elapsed());
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(WAIT_POLL_MAX);
    }
}
