//! `fastlane serve main:app`: an ASGI app (FastAPI, Starlette) served by the
//! fastlane front with Python worker processes (see `fastlane-asgi`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The flags of `fastlane serve`, named as uvicorn's and gunicorn's where
/// the meaning is the same.
#[derive(Debug, clap::Args)]
pub struct ServeCommand {
    /// The ASGI app as module:attribute, e.g. main:app.
    #[arg(value_name = "APP")]
    pub app: String,
    /// APP is a function that returns the app (called once, before the workers start).
    #[arg(long)]
    pub factory: bool,
    /// Directory to import the app's module from.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub app_dir: PathBuf,
    /// The Python to run the app with [default: the active virtualenv's, else that of the virtualenv this
    /// fastlane is installed in, else python3 on the PATH].
    #[arg(long, env = "FASTLANE_PYTHON", value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Most worker processes, spares included: spares start while every worker's event loop is
    /// blocked, and stop after --spare-idle-timeout without a request [default: 4 × --workers].
    #[arg(long, env = "FASTLANE_MAX_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_workers: Option<u32>,
    /// Seconds a spare worker may go without a request before it stops.
    #[arg(long, env = "FASTLANE_SPARE_IDLE_TIMEOUT", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400), value_name = "SECS")]
    pub spare_idle_timeout: u64,
    /// The ASGI root_path: the prefix under which a proxy mounts the app.
    #[arg(long, default_value = "", value_name = "PATH")]
    pub root_path: String,
    /// Event loop of each worker: auto (uvloop when installed, as uvicorn), asyncio or uvloop.
    #[arg(long = "loop", default_value = "auto", value_parser = ["auto", "asyncio", "uvloop"])]
    pub event_loop: String,
    /// Reload the app when a .py file under --app-dir (or a --reload-dir) changes: for development.
    /// SIGHUP reloads too, at any time.
    #[arg(long)]
    pub reload: bool,
    /// Directory to watch with --reload (repeat for several) [default: --app-dir].
    #[arg(long = "reload-dir", value_name = "DIR", requires = "reload")]
    pub reload_dirs: Vec<PathBuf>,
    /// Threads of the front (the Rust side that speaks HTTP and hands requests to the workers)
    /// [default: half of --workers, rounded up, at most the number of CPUs].
    #[arg(long, env = "FASTLANE_FRONT_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub front_threads: Option<u32>,
    /// The server's flags (address, limits, logs; --workers counts Python workers here).
    #[command(flatten)]
    pub serve: fastlane::ServeArgs,
}

impl ServeCommand {
    /// How many threads the front's runtime gets.
    ///
    /// A worker spends about twice the CPU time per request the front does
    /// (FastAPI's hello world: ~50 µs in Python against ~25 µs in the front),
    /// so one front thread keeps two busy workers fed. More threads than that
    /// only take turns: each hand-off then wakes a parked thread, and on two
    /// cores with two workers the front spent 30 % more CPU per request with
    /// two threads than with one (bench/asgi.py, docs/BENCHMARKS.md).
    pub fn front_threads(&self) -> usize {
        if let Some(n) = self.front_threads {
            return n as usize;
        }
        let workers = self.serve.workers.unwrap_or(1) as usize;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        workers.div_ceil(2).clamp(1, cpus)
    }
}

/// The largest request body `serve` takes unless told: uploads are common
/// in FastAPI apps, and uvicorn sets no limit at all.
const SERVE_BODY_LIMIT: usize = 100 * 1024 * 1024;

/// The first flag given that only a Rust app's server uses: the front runs
/// no handler code (no lanes, no runner threads), and recycling Python
/// workers is not there yet. `fastlane serve --help` hides them.
fn rust_only_flag(serve: &fastlane::ServeArgs) -> Option<&'static str> {
    let given = [
        ("--max-requests", serve.max_requests.is_some()),
        ("--max-requests-jitter", serve.max_requests_jitter.is_some()),
        ("--runners", serve.runners.is_some()),
        ("--max-threads", serve.max_threads.is_some()),
        ("--no-isolation", serve.no_isolation),
        ("--blocking-threads", serve.blocking_threads.is_some()),
        ("--blocking-queue", serve.blocking_queue.is_some()),
        ("--cpu-threads", serve.cpu_threads.is_some()),
        ("--cpu-queue", serve.cpu_queue.is_some()),
        ("--cpu-nice", serve.cpu_nice.is_some()),
    ];
    given.into_iter().find_map(|(flag, set)| set.then_some(flag))
}

/// SIGHUP reloads the app (new workers with a fresh import of its code,
/// then the old ones drain), as gunicorn does.
fn reload_on_hangup(pool: fastlane_asgi::Pool, mut hangups: tokio::signal::unix::Signal) {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the app");
            match pool.reload().await {
                Ok(pids) => tracing::info!("reloaded: new workers {pids:?}; the old ones drain and stop"),
                Err(err) => tracing::error!("the reload failed; the old workers go on serving: {err}"),
            }
        }
    });
}

/// The shortest stall threshold for Python workers: their loops tick every
/// 2 ms, so a shorter one would call a loop that merely ran a few callbacks
/// stalled.
const MIN_STALL_THRESHOLD_MS: u64 = 5;

/// Runs `fastlane serve` until SIGINT/SIGTERM; non-zero if the app could not
/// start or the shutdown cut work.
pub async fn run_command(command: ServeCommand) -> ExitCode {
    let ServeCommand {
        app,
        factory,
        app_dir,
        python,
        max_workers,
        spare_idle_timeout,
        root_path,
        event_loop,
        reload,
        reload_dirs,
        front_threads: _,
        mut serve,
    } = command;
    fastlane::init_logging_with(&serve.log_config());
    if let Some(flag) = rust_only_flag(&serve) {
        eprintln!("fastlane serve: {flag} is not for Python workers (see fastlane serve --help)");
        return ExitCode::from(2);
    }
    if !root_path.is_empty() && !root_path.starts_with('/') {
        eprintln!("fastlane serve: --root-path must start with / (e.g. /api)");
        return ExitCode::from(2);
    }
    let workers = serve.workers.take().unwrap_or(1) as usize;
    let max_workers = max_workers.map_or(workers * 4, |n| n as usize);
    if max_workers < workers {
        eprintln!("fastlane serve: --max-workers ({max_workers}) must be at least --workers ({workers})");
        return ExitCode::from(2);
    }
    if serve.stall_threshold_ms.is_some_and(|ms| ms < MIN_STALL_THRESHOLD_MS) {
        eprintln!(
            "fastlane serve: --stall-threshold-ms must be at least {MIN_STALL_THRESHOLD_MS} for Python workers \
             (their loops tick every 2 ms)"
        );
        return ExitCode::from(2);
    }
    let body_limit = serve.body_limit.take().unwrap_or(SERVE_BODY_LIMIT);
    let mut config = serve.into_config();
    config.body_limit = body_limit;
    // One front process owns the port; the workers are Python processes.
    config.workers = 1;
    // The front runs no code of the app: its handler only hands requests to
    // the workers, and never blocks. The isolation that matters is between
    // the workers' event loops. On tokio's own workers, the hand-offs to and
    // from the workers' sockets stay on one thread where runners would add
    // a thread hop each way (measured: 1.4 x the requests per second).
    config.isolation.enabled = false;

    let addr = format!("{}:{}", config.host, config.port);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("fastlane serve: could not listen on {addr}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local = match listener.local_addr() {
        Ok(local) => local,
        Err(err) => {
            eprintln!("fastlane serve: {err}");
            return ExitCode::FAILURE;
        }
    };
    let watched = if reload_dirs.is_empty() { vec![app_dir.clone()] } else { reload_dirs };
    // SIGHUP's default action ends the process: take it over before anything can send it.
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            eprintln!("fastlane serve: could not listen for SIGHUP: {err}");
            return ExitCode::FAILURE;
        }
    };
    let app_config = fastlane_asgi::AppConfig {
        factory,
        app_dir,
        grace_period: config.grace_period,
        python,
        workers,
        max_workers,
        spare_idle: Duration::from_secs(spare_idle_timeout),
        root_path,
        event_loop,
        stall_threshold: config.isolation.stall_threshold,
        body_limit,
        ..fastlane_asgi::AppConfig::new(app.clone())
    };
    let pool = match fastlane_asgi::Pool::start(app_config).await {
        Ok(pool) => pool,
        Err(err) => {
            eprintln!("fastlane serve: {}", fastlane::ErrorChain(&err));
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "serving {app} with {workers} worker{} (pids {:?}), up to {max_workers} while event loops are blocked",
        if workers == 1 { "" } else { "s" },
        pool.worker_pids()
    );
    reload_on_hangup(pool.clone(), hangups);
    if reload {
        pool.reload_on_changes(watched);
    }
    let server = fastlane::Server::new(pool.router_for(local)).config(config).companion(pool.companion());
    let server = match server.from_listener(listener) {
        Ok(server) => server,
        Err(err) => {
            pool.stop(Duration::from_secs(5)).await;
            eprintln!("fastlane serve: {}", fastlane::ErrorChain(&err));
            return ExitCode::FAILURE;
        }
    };
    match server.serve().await {
        Ok(report) if report.is_clean() && pool.cut().is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("fastlane serve: {}", fastlane::ErrorChain(&err));
            ExitCode::FAILURE
        }
    }
}
