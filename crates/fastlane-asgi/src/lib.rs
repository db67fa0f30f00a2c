//! fastlane-asgi: serves an unchanged ASGI app (FastAPI, Starlette) behind
//! the fastlane server, so that an endpoint that blocks its event loop stalls
//! no other request.
//!
//! # How
//!
//! * The front (this crate, in the `fastlane` process) owns the sockets and
//!   speaks HTTP through [`fastlane::Server`]; every request is handed to a
//!   Python worker process over a Unix socket (`dispatch.rs`; the frames in
//!   `frame.rs`, the socket's bytes in `wire.rs`, each request's events in
//!   `mailbox.rs`), and so is each WebSocket (`websocket.rs`).
//! * Each worker runs the app on one event loop, as uvicorn does, so the
//!   app's loop-bound clients and pools work as they always have. Workers are
//!   forked from a zygote that imported the app once (`zygote.rs`,
//!   `python/fastlane_worker.py`); the pool chooses a worker per request,
//!   starts spares and replaces the dead (`pool.rs`, `worker.rs`); a reload
//!   starts a new zygote (`reload.rs` watches the files for `--reload`).
//! * A monitor thread reads each loop's tick (`monitor.rs`): a loop that has
//!   not ticked for the stall threshold gets no new requests, the requests it
//!   has not started go elsewhere, its Python stack is logged with the request
//!   and the fix, a loop that spins the CPU runs at a lower priority, and
//!   while every worker is stalled a spare starts, up to
//!   [`AppConfig::max_workers`].
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = fastlane_asgi::AppConfig::new("main:app");
//! let pool = fastlane_asgi::Pool::start(config).await?;
//! let server = fastlane::Server::new(pool.router()).companion(pool.companion());
//! server.serve().await?;
//! # Ok(())
//! # }
//! ```

mod dispatch;
mod frame;
mod mailbox;
mod monitor;
mod pool;
mod reload;
mod websocket;
mod wire;
mod worker;
mod zygote;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastlane::{Companion, CompanionFuture, CompanionMetric, MetricKind, MetricsSource};
use tokio::sync::watch;

/// What to serve and how many workers to run it on.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The app as `module:attribute` (`main:app`).
    pub app: String,
    /// `app` names a function that returns the app (uvicorn's `--factory`).
    pub factory: bool,
    /// The directory the module is imported from. Default: the current one.
    pub app_dir: PathBuf,
    /// The Python to run. Default: the active virtualenv's (`$VIRTUAL_ENV`),
    /// else `python3` on the PATH.
    pub python: Option<PathBuf>,
    /// Worker processes kept running. Default 1.
    pub workers: usize,
    /// Most worker processes, spares included: while every worker's loop is
    /// stalled, spares start up to this many. Default 4 × `workers`.
    pub max_workers: usize,
    /// A spare (a worker beyond `workers`) with no request for this long
    /// stops. Default 30 s.
    pub spare_idle: Duration,
    /// The scope's `root_path` (the app is mounted under a prefix by a proxy).
    pub root_path: String,
    /// `auto` (uvloop when installed, as uvicorn), `asyncio` or `uvloop`.
    pub event_loop: String,
    /// A loop that has not come back for this long is stalled. Default 10 ms.
    pub stall_threshold: Duration,
    /// Time for the import and for each worker's lifespan startup. Default 60 s.
    pub start_timeout: Duration,
    /// Largest request body, in bytes (`413` beyond). Default 100 MiB.
    pub body_limit: usize,
    /// At a reload, the old workers' time to finish their requests and
    /// background tasks. Default 30 s (the server's grace period).
    pub grace_period: Duration,
}

impl AppConfig {
    /// The defaults, for `app` (`module:attribute`).
    pub fn new(app: impl Into<String>) -> Self {
        Self {
            app: app.into(),
            factory: false,
            app_dir: PathBuf::from("."),
            python: None,
            workers: 1,
            max_workers: 4,
            spare_idle: Duration::from_secs(30),
            root_path: String::new(),
            event_loop: "auto".into(),
            stall_threshold: Duration::from_millis(10),
            start_timeout: Duration::from_secs(60),
            body_limit: 100 * 1024 * 1024,
            grace_period: Duration::from_secs(30),
        }
    }
}

/// Why the app could not be served; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No Python was found.
    #[error("no Python found: activate the app's virtualenv, or pass --python PATH")]
    NoPython,
    /// The Python could not be run.
    #[error("could not run {python} (pass --python with the path of the app's Python)")]
    Spawn {
        /// The Python tried.
        python: PathBuf,
        /// Why it did not run.
        source: std::io::Error,
    },
    /// The Python exited before it could say why.
    #[error("{} exited before loading the app ({}); its messages are above", python.display(), status.map_or_else(|| "no status".to_owned(), |s| s.to_string()))]
    Exited {
        /// The Python run.
        python: PathBuf,
        /// How it exited.
        status: Option<std::process::ExitStatus>,
    },
    /// The app could not be imported or is not an ASGI app.
    #[error("{0}")]
    App(String),
    /// A worker's lifespan startup failed.
    #[error("{0}")]
    Startup(String),
    /// The import or a startup took longer than the start timeout.
    #[error("the app did not start within {0:?}")]
    Timeout(Duration),
    /// A file or socket of the front could not be made.
    #[error("could not prepare the workers' socket")]
    Io(#[source] std::io::Error),
}

/// The running workers of an app.
#[derive(Debug, Clone)]
pub struct Pool {
    shared: Arc<pool::Shared>,
    cut: Arc<Mutex<Option<Vec<String>>>>,
}

impl Pool {
    /// Imports the app and starts its workers (lifespan startup included);
    /// returns once they all serve.
    pub async fn start(config: AppConfig) -> Result<Self, StartError> {
        let shared = pool::Shared::start(config).await?;
        // The stall monitor watches the pool (and ends with it).
        monitor::start(&shared);
        Ok(Self { shared, cut: Arc::default() })
    }

    /// An axum router that hands every request to the workers; the scope's
    /// `server` is `server`.
    pub fn router_for(&self, server: std::net::SocketAddr) -> axum::Router {
        let shared = self.shared.clone();
        let server = dispatch::ServerAddr(server);
        axum::Router::new().fallback(move |req: axum::extract::Request| {
            let shared = shared.clone();
            async move {
                if websocket::is_handshake(req.headers()) {
                    websocket::dispatch(shared, server, req).await
                } else {
                    dispatch::dispatch(shared, server, req).await
                }
            }
        })
    }

    /// [`router_for`](Self::router_for) with `127.0.0.1:8000` as the scope's `server`.
    pub fn router(&self) -> axum::Router {
        self.router_for(std::net::SocketAddr::from(([127, 0, 0, 1], 8000)))
    }

    /// The companion that stops the workers with the server (lifespan
    /// shutdown, their requests and background tasks drained in the grace
    /// period); add it with [`fastlane::Server::companion`].
    pub fn companion(&self) -> impl Companion {
        PoolCompanion { pool: self.clone() }
    }

    /// What the workers cut at shutdown (empty: nothing), once stopped.
    pub fn cut(&self) -> Vec<String> {
        self.cut.lock().expect("cut lock").clone().unwrap_or_default()
    }

    /// Reloads the app without dropping a request: a fresh import of its
    /// code, new workers (lifespan startup included), then the old workers
    /// drain and stop. If the new code fails to import or start, the old
    /// workers go on serving and the error says why. Returns the new
    /// workers' pids.
    pub async fn reload(&self) -> Result<Vec<u32>, String> {
        self.shared.reload(self.shared.config.grace_period).await
    }

    /// Reloads whenever a Python file under `dirs` changes (`--reload`, for
    /// development), looking twice a second.
    pub fn reload_on_changes(&self, dirs: Vec<PathBuf>) {
        reload::watch(self.clone(), dirs);
    }

    /// Process ids of the workers now.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared.snapshot().iter().map(|w| w.pid).collect()
    }

    /// Stops the workers without a server (tests, errors at start-up).
    pub async fn stop(&self, grace: Duration) -> Vec<String> {
        let cut = self.shared.shutdown(grace).await;
        *self.cut.lock().expect("cut lock") = Some(cut.clone());
        cut
    }
}

struct PoolCompanion {
    pool: Pool,
}

impl Companion for PoolCompanion {
    fn name(&self) -> String {
        format!("ASGI app {}", self.pool.shared.config.app)
    }

    fn stalls(&self) -> Option<fastlane::StallSource> {
        let shared = Arc::downgrade(&self.pool.shared);
        Some(Arc::new(move || {
            let Some(shared) = shared.upgrade() else { return Vec::new() };
            let rows = shared.stall_rows.lock().expect("stall rows lock");
            rows.values().cloned().collect()
        }))
    }

    fn metrics(&self) -> Option<MetricsSource> {
        let shared = Arc::downgrade(&self.pool.shared);
        Some(Arc::new(move || {
            let Some(shared) = shared.upgrade() else { return Vec::new() };
            let workers = shared.snapshot();
            let stalled = workers.iter().filter(|w| w.stalled.load(Ordering::Relaxed)).count();
            let stats = &shared.stats;
            let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
            use MetricKind::{Counter, Gauge};
            [
                (Gauge, "asgi_workers", "Python worker processes serving", workers.len() as u64),
                (Gauge, "asgi_workers_stalled", "Workers whose event loop is blocked now", stalled as u64),
                (
                    Counter,
                    "asgi_stalls",
                    "Times a worker's event loop was blocked past the threshold",
                    count(&stats.stalls),
                ),
                (
                    Counter,
                    "asgi_spares_started",
                    "Spare workers started while every loop was blocked",
                    count(&stats.spares_started),
                ),
                (
                    Counter,
                    "asgi_worker_restarts",
                    "Workers that exited unexpectedly and were replaced",
                    count(&stats.restarts),
                ),
                (
                    Counter,
                    "asgi_requests_moved",
                    "Requests a blocked loop had not started, taken back and served by another worker",
                    count(&stats.moved),
                ),
                (
                    Counter,
                    "asgi_rejected",
                    "Requests answered 503 because no worker's loop was free",
                    count(&stats.rejected),
                ),
            ]
            .into_iter()
            .map(|(kind, name, help, value)| CompanionMetric {
                name,
                help,
                kind,
                value: i64::try_from(value).unwrap_or(i64::MAX),
            })
            .collect()
        }))
    }

    fn run(self: Box<Self>, mut stop: watch::Receiver<bool>, grace: Duration) -> CompanionFuture {
        Box::pin(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
            let cut = self.pool.stop(grace).await;
            for what in &cut {
                tracing::error!("shutdown cut {what}");
            }
        })
    }
}
