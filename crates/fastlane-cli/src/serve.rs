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
    /// The Python to run the app with [default: the active virtualenv's, else python3 on the PATH].
    #[arg(long, env = "FASTLANE_PYTHON", value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Most worker processes, spares included: spares start while every worker's event loop is
    /// blocked, and stop after 30 s idle [default: 4 × --workers].
    #[arg(long, env = "FASTLANE_MAX_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_workers: Option<u32>,
    /// The ASGI root_path: the prefix under which a proxy mounts the app.
    #[arg(long, default_value = "", value_name = "PATH")]
    pub root_path: String,
    /// Event loop of each worker: auto (uvloop when installed, as uvicorn), asyncio or uvloop.
    #[arg(long = "loop", default_value = "auto", value_parser = ["auto", "asyncio", "uvloop"])]
    pub event_loop: String,
    /// The server's flags (address, limits, logs; --workers counts Python workers here).
    #[command(flatten)]
    pub serve: fastlane::ServeArgs,
}

/// The largest request body `serve` takes unless told: uploads are common
/// in FastAPI apps, and uvicorn sets no limit at all.
const SERVE_BODY_LIMIT: usize = 100 * 1024 * 1024;

/// Runs `fastlane serve` until SIGINT/SIGTERM; non-zero if the app could not
/// start or the shutdown cut work.
pub async fn run(command: ServeCommand) -> ExitCode {
    let ServeCommand { app, factory, app_dir, python, max_workers, root_path, event_loop, mut serve } =
        command;
    fastlane::init_logging_with(&serve.log_config());
    if serve.max_requests.is_some() || serve.max_requests_jitter.is_some() {
        eprintln!("fastlane serve: --max-requests is not supported for Python workers yet");
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
    let body_limit = serve.body_limit.take().unwrap_or(SERVE_BODY_LIMIT);
    let mut config = serve.into_config();
    config.body_limit = body_limit;
    // One front process owns the port; the workers are Python processes.
    config.workers = 1;

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
    let app_config = fastlane_asgi::AppConfig {
        factory,
        app_dir,
        python,
        workers,
        max_workers,
        root_path,
        event_loop,
        stall_threshold: config.isolation.stall_threshold,
        body_limit,
        ..fastlane_asgi::AppConfig::new(app.clone())
    };
    let pool = match fastlane_asgi::Pool::start(app_config).await {
        Ok(pool) => pool,
        Err(err) => {
            eprintln!("fastlane serve: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "serving {app} with {workers} worker{} (pids {:?}), up to {max_workers} while event loops are blocked",
        if workers == 1 { "" } else { "s" },
        pool.worker_pids()
    );
    let server = fastlane::Server::new(pool.router_for(local)).config(config).jobs(pool.companion());
    let server = match server.from_listener(listener) {
        Ok(server) => server,
        Err(err) => {
            pool.stop(Duration::from_secs(5)).await;
            eprintln!("fastlane serve: {err}");
            return ExitCode::FAILURE;
        }
    };
    match server.serve().await {
        Ok(report) if report.is_clean() && pool.cut().is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("fastlane serve: {err}");
            ExitCode::FAILURE
        }
    }
}
