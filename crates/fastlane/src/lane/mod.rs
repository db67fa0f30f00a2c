//! Lanes: separate, bounded places for each kind of work.
//!
//! * the **async lane** is the runtime that runs `async fn` handlers;
//! * the **blocking lane** ([`sync`], [`blocking`]) runs synchronous code: a
//!   blocking database driver, file I/O, `std::thread::sleep`. Its threads
//!   mostly wait, so there are many of them (64 by default);
//! * the **CPU lane** ([`cpu`], [`compute`]) runs computation. It has one
//!   thread per core, at a lower OS priority (nice +10 by default), so heavy
//!   computation takes the cores only when I/O and fast requests don't need
//!   them.
//!
//! Each lane has a thread cap and a queue limit. Work that finds both taken is
//! refused at once: a request gets `503 Service Unavailable` with
//! `Retry-After`, and [`blocking`]/[`compute`] return a [`LaneError`] that
//! converts into that response. An unbounded queue would only turn overload
//! into timeouts for everyone.

mod error;
mod handler;
mod pool;
pub(crate) mod priority;

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

pub(crate) use error::panic_message;
pub use error::LaneError;
pub use handler::{cpu, sync, LaneHandler};

use pool::{Pool, PoolConfig};

use crate::metrics::{LaneGauges, LaneSizes};

/// Sizes of the blocking and CPU lanes.
///
/// # Examples
///
/// ```
/// let lanes = fastlane::LaneConfig {
///     blocking_threads: 16,
///     ..fastlane::LaneConfig::default()
/// };
/// assert_eq!(lanes.blocking_threads, 16);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneConfig {
    /// Threads of the blocking lane. Default 64: blocking work mostly waits
    /// (on a socket, a disk, a sleep), so a thread costs little more than its
    /// stack, and 64 covers a typical blocking connection pool with room to
    /// spare. FastAPI's pool has 40.
    pub blocking_threads: usize,
    /// Jobs that may wait for a blocking thread before new ones are refused.
    /// Default 128: a short burst waits, a flood is answered `503` at once.
    pub blocking_queue: usize,
    /// Threads of the CPU lane. Default: the number of cores, since more
    /// threads than cores cannot compute any faster.
    pub cpu_threads: usize,
    /// Jobs that may wait for a CPU thread. Default: 8 per core.
    pub cpu_queue: usize,
    /// How much to lower the CPU lane's priority (nice value added, 0 to 19).
    /// Default 10: low enough that the I/O threads win every contest for a
    /// core, high enough that computation still progresses under load.
    pub cpu_nice: i32,
}

impl Default for LaneConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            blocking_threads: 64,
            blocking_queue: 128,
            cpu_threads: cores,
            cpu_queue: cores * 8,
            cpu_nice: 10,
        }
    }
}

/// Which lane a piece of work runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LaneKind {
    Blocking,
    Cpu,
}

/// A handle on a server's blocking and CPU lanes. Cheap to clone.
///
/// Inside a fastlane server, handlers and background tasks reach their
/// server's lanes through [`blocking`] and [`compute`]; `Lanes` is for code
/// that wants an explicit handle (a job consumer, a test).
#[derive(Debug, Clone)]
pub struct Lanes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blocking: Pool,
    cpu: Pool,
    config: LaneConfig,
}

tokio::task_local! {
    /// The lanes of the server whose request or background task is running.
    static CURRENT: Lanes;
}

/// Lanes for code running outside any server's tasks (see [`Lanes::current`]).
static FALLBACK: RwLock<Option<Lanes>> = RwLock::new(None);
static DEFAULT: OnceLock<Lanes> = OnceLock::new();

impl Lanes {
    /// Creates lanes of the given sizes. Threads start on demand.
    pub fn new(config: LaneConfig) -> Self {
        Self::with_gauges(config, LaneGauges::default())
    }

    pub(crate) fn with_gauges(config: LaneConfig, gauges: LaneGauges) -> Self {
        let blocking = Pool::new(
            PoolConfig {
                name: "blocking",
                max_threads: config.blocking_threads,
                queue_limit: config.blocking_queue,
                nice: 0,
                keep_alive: Duration::from_secs(10),
            },
            gauges.blocking,
        );
        let cpu = Pool::new(
            PoolConfig {
                name: "cpu",
                max_threads: config.cpu_threads,
                queue_limit: config.cpu_queue,
                nice: config.cpu_nice.clamp(0, 19),
                // Computation comes in bursts; keeping threads around avoids
                // re-creating (and re-nicing) them for every burst.
                keep_alive: Duration::from_secs(60),
            },
            gauges.cpu,
        );
        Self { inner: Arc::new(Inner { blocking, cpu, config }) }
    }

    /// The lanes of the current context: those of the fastlane server whose
    /// handler or background task is running; outside of one (a task spawned
    /// with `tokio::spawn`, a test), the lanes of the most recently started
    /// server; with no server at all, lanes of the default size.
    pub fn current() -> Lanes {
        if let Ok(lanes) = CURRENT.try_with(Lanes::clone) {
            return lanes;
        }
        if let Some(lanes) = FALLBACK.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return lanes.clone();
        }
        DEFAULT.get_or_init(|| Lanes::new(LaneConfig::default())).clone()
    }

    /// The sizes these lanes were built with.
    pub fn config(&self) -> &LaneConfig {
        &self.inner.config
    }

    /// Runs `f` on the blocking lane. Fails at once with
    /// [`LaneError::is_full`] if the lane is full.
    pub async fn blocking<F, T>(&self, f: F) -> Result<T, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run(LaneKind::Blocking, f).await
    }

    /// Runs `f` on the CPU lane. Fails at once with [`LaneError::is_full`]
    /// if the lane is full.
    pub async fn compute<F, T>(&self, f: F) -> Result<T, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run(LaneKind::Cpu, f).await
    }

    pub(crate) async fn run<F, T>(&self, lane: LaneKind, f: F) -> Result<T, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool(lane);
        let rx = pool.try_run(in_this_request(f))?;
        rx.await.unwrap_or_else(|_| Err(LaneError::shutdown(pool.name())))
    }

    /// Like [`run`](Self::run) but waits for room instead of failing when the
    /// lane is full: for background work, which must not be dropped.
    pub(crate) async fn run_when_ready<F, T>(&self, lane: LaneKind, f: F) -> Result<T, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.pool(lane).run_when_ready(in_this_request(f)).await
    }

    fn pool(&self, lane: LaneKind) -> &Pool {
        match lane {
            LaneKind::Blocking => &self.inner.blocking,
            LaneKind::Cpu => &self.inner.cpu,
        }
    }

    /// Stops both lanes from accepting work; what runs goes on.
    pub(crate) fn close(&self) {
        self.inner.blocking.close();
        self.inner.cpu.close();
    }

    /// Runs `fut` with these lanes as [`Lanes::current`].
    pub(crate) fn scope<F: std::future::Future>(
        &self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> {
        CURRENT.scope(self.clone(), fut)
    }

    /// Makes these lanes the fallback for code outside any server's tasks.
    pub(crate) fn install_fallback(&self) {
        *FALLBACK.write().unwrap_or_else(|p| p.into_inner()) = Some(self.clone());
    }
}

/// `f`, to run on a lane thread as part of the request (or background task)
/// that sends it there: under its span and with its id current, so that the
/// lines it logs and the jobs it enqueues carry the id as the handler's do.
fn in_this_request<F, T>(f: F) -> impl FnOnce() -> T + Send + 'static
where
    F: FnOnce() -> T + Send + 'static,
{
    let id = crate::RequestId::current();
    let span = tracing::Span::current();
    move || {
        let _span = span.enter();
        let _id = id.as_ref().map(crate::RequestId::enter);
        f()
    }
}

/// Runs a blocking closure on the blocking lane and waits for it, from async
/// code: fastlane's `run_in_threadpool`.
///
/// Fails at once if the lane is full; the error converts into a `503`
/// response, so a handler can use `?`.
///
/// # Examples
///
/// ```
/// async fn handler() -> Result<String, fastlane::LaneError> {
///     let text = fastlane::blocking(|| {
///         std::thread::sleep(std::time::Duration::from_millis(10)); // a blocking driver
///         "done".to_string()
///     })
///     .await?;
///     Ok(text)
/// }
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// assert_eq!(handler().await?, "done");
/// # Ok::<(), fastlane::LaneError>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub async fn blocking<F, T>(f: F) -> Result<T, LaneError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Lanes::current().blocking(f).await
}

/// Runs a computation on the CPU lane (one low-priority thread per core) and
/// waits for it: fastlane's `ProcessPoolExecutor`.
///
/// # Examples
///
/// ```
/// async fn handler() -> Result<String, fastlane::LaneError> {
///     let sum = fastlane::compute(|| (0..1_000_000u64).sum::<u64>()).await?;
///     Ok(sum.to_string())
/// }
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// assert_eq!(handler().await?, "499999500000");
/// # Ok::<(), fastlane::LaneError>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub async fn compute<F, T>(f: F) -> Result<T, LaneError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Lanes::current().compute(f).await
}

impl From<&LaneConfig> for LaneSizes {
    fn from(config: &LaneConfig) -> Self {
        LaneSizes {
            blocking_threads: config.blocking_threads,
            blocking_queue: config.blocking_queue,
            cpu_threads: config.cpu_threads,
            cpu_queue: config.cpu_queue,
        }
    }
}
