//! The `fastlane` command: `demo` serves the demo app, `probe` tests
//! concurrency against any HTTP/1.1 server.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fastlane_cli::{demo, jobs, mixed, out, outln, probe, serve};
use fastlane_jobs::Store as _;

#[derive(Debug, Parser)]
#[command(name = "fastlane", version, about = "fastlane: slow work never blocks fast requests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the demo app (the seed articles' scenarios) on 127.0.0.1:8000.
    // The demo's routes sleep up to 60 s, so its request timeout is longer
    // than an app's (see `run_demo`); its help says so.
    #[command(mut_arg("request_timeout", |arg| arg.help(
        "Seconds a handler has to answer before the client gets 504; 0 disables [default: 90 in the demo]"
    )))]
    Demo {
        #[command(flatten)]
        serve: Box<fastlane::ServeArgs>,
        /// Job store for POST /jobs/{name} and the in-server job worker.
        #[arg(long, env = "FASTLANE_JOBS_URL", default_value = "sqlite://fastlane-demo-jobs.db")]
        jobs_url: String,
        /// Jobs the in-server worker runs at once (per worker process).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        job_concurrency: u32,
    },
    /// Serve an ASGI app (FastAPI, Starlette) as it is: `fastlane serve main:app`.
    #[command(mut_arg("workers", |arg| arg.help(
        "Python worker processes, each running the app on its own event loop [default: 1]"
    )))]
    #[command(mut_arg("timeout", |arg| arg.help(
        "Accepted as gunicorn's -t; a worker is never killed for a slow or blocked event loop"
    )))]
    // Flags of a Rust app's server that mean nothing here (refused if given).
    #[command(mut_arg("max_requests", |arg| arg.hide(true)))]
    #[command(mut_arg("max_requests_jitter", |arg| arg.hide(true)))]
    #[command(mut_arg("runners", |arg| arg.hide(true)))]
    #[command(mut_arg("max_threads", |arg| arg.hide(true)))]
    #[command(mut_arg("no_isolation", |arg| arg.hide(true)))]
    #[command(mut_arg("blocking_threads", |arg| arg.hide(true)))]
    #[command(mut_arg("blocking_queue", |arg| arg.hide(true)))]
    #[command(mut_arg("cpu_threads", |arg| arg.hide(true)))]
    #[command(mut_arg("cpu_queue", |arg| arg.hide(true)))]
    #[command(mut_arg("cpu_nice", |arg| arg.hide(true)))]
    #[command(mut_arg("stall_threshold_ms", |arg| arg.help(
        "Milliseconds a worker's event loop may go without coming back before it counts as blocked \
         (at least 5) [default: 10]"
    )))]
    Serve(Box<serve::ServeCommand>),
    /// Send requests concurrently and show whether they ran in parallel.
    Probe {
        /// Requests to send in all (default: one per URL).
        #[arg(short = 'n', long = "total", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        total: Option<u32>,
        /// Requests in flight at once (default: all of them).
        #[arg(short = 'c', long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: Option<u32>,
        /// Seconds before a request counts as failed.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// Write a timeline chart (SVG, one bar per request) to this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
        /// URLs to request (http:// only), used in turn.
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
    },
    /// Benchmarks (see bench/run.py for the full comparison with peers).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Durable jobs: run a worker, enqueue, inspect (sqlite://path or postgres://...).
    #[command(subcommand)]
    Jobs(JobsCommand),
}

/// What `--url` of every `jobs` subcommand takes (one text, eight flags).
const STORE_URL_HELP: &str = "The job store: sqlite://jobs.db (a file, relative to the working directory, \
    created on first use), sqlite:///var/lib/app/jobs.db (an absolute path), or \
    postgres://user:password@host:5432/dbname (a PostgreSQL database shared by many workers)";

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Run a worker with the built-in job types (noop, sleep, fail) until SIGTERM/SIGINT.
    Work {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Jobs run at once.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: u32,
        /// Queue to work on, as `NAME` (with --concurrency) or `NAME=N` (N at
        /// once); repeat for several queues, each with its own limit.
        #[arg(long = "queue", default_value = "default", value_parser = parse_queue)]
        queues: Vec<(String, Option<usize>)>,
        /// Seconds to let running jobs finish on shutdown before releasing them.
        #[arg(long, default_value_t = 30)]
        grace_period: u64,
        /// Lease of each attempt, renewed every third of it: a dead worker's
        /// jobs run again within one lease.
        #[arg(long, default_value_t = 15.0, value_parser = parse_lease)]
        lease_secs: f64,
    },
    /// Enqueue jobs (the name and payload are checked against the built-in types).
    Enqueue {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Job type: noop, sleep or fail.
        name: String,
        /// JSON payload, e.g. '{"ms": 100}'.
        #[arg(long, default_value = "null")]
        payload: String,
        /// How many copies.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        count: u64,
        /// Queue.
        #[arg(long, default_value = "default")]
        queue: String,
        /// Attempts before a failing job is dead.
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..))]
        max_attempts: u32,
    },
    /// Counts per state.
    Stats {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// One JSON object with a key per state.
        #[arg(long)]
        json: bool,
    },
    /// The newest jobs.
    List {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job with its attempts, as JSON.
    Show {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        id: i64,
    },
    /// Make a dead or cancelled job available again.
    Retry {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        id: i64,
    },
    /// Cancel a pending job, or ask a running one to stop.
    Cancel {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        id: i64,
    },
    /// Enqueue N noop jobs, drain them with a worker, print the rates.
    Bench {
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        jobs: u64,
        /// Jobs run at once.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: u32,
        /// Jobs per enqueue call (one transaction each).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Probe a fast URL at a fixed rate (open loop) while N slow requests are in flight.
    Mixed {
        /// The fast URL to probe.
        #[arg(long)]
        fast: String,
        /// The slow URL to keep in flight.
        #[arg(long)]
        load: Option<String>,
        /// How many slow requests to keep in flight.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: u32,
        /// Probe requests per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds after which a probe request counts as failed.
        #[arg(long, default_value_t = 20.0)]
        timeout: f64,
        /// Print one JSON object instead of a summary line.
        #[arg(long)]
        json: bool,
        /// Load clients refused with 503 wait for its Retry-After before sending
        /// again, as well-behaved clients do (without it: again at once).
        #[arg(long)]
        honor_retry_after: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("fastlane: could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Demo { serve, jobs_url, job_concurrency } => {
            runtime.block_on(run_demo(*serve, jobs_url, job_concurrency as usize))
        }
        Command::Probe { total, concurrency, timeout, svg, urls } => {
            let total = total.map_or(urls.len(), |n| n as usize);
            let config = probe::ProbeConfig {
                concurrency: concurrency.map_or(total, |c| c as usize),
                urls,
                total,
                timeout: Duration::from_secs(timeout),
                progress: true,
            };
            runtime.block_on(run_probe(config, svg))
        }
        Command::Jobs(command) => runtime.block_on(run_jobs(command)),
        Command::Serve(command) => runtime.block_on(serve::run(*command)),
        Command::Bench(BenchCommand::Mixed {
            fast,
            load,
            concurrency,
            rate,
            duration,
            timeout,
            json,
            honor_retry_after,
        }) => {
            let valid = |v: f64| v.is_finite() && v > 0.0 && v <= 3600.0;
            for (flag, value) in [("--rate", rate), ("--duration", duration), ("--timeout", timeout)] {
                if !valid(value) {
                    eprintln!("fastlane bench mixed: {flag} must be a number above 0 and at most 3600");
                    return ExitCode::from(2);
                }
            }
            let config = mixed::MixedConfig {
                fast_url: fast,
                rate,
                duration: Duration::from_secs_f64(duration),
                load_url: load,
                load_concurrency: concurrency as usize,
                timeout: Duration::from_secs_f64(timeout),
                honor_retry_after,
            };
            let result = runtime.block_on(mixed::run(&config));
            if json {
                outln!("{}", serde_json::to_string(&result).unwrap_or_default());
            } else {
                let f = &result.fast;
                outln!(
                    "fast: {} sent, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors, {} over 100 ms; load: {} ok, {} errors",
                    f.sent, f.p50_ms, f.p99_ms, f.max_ms, f.errors, f.over_100ms, result.load_ok, result.load_errors
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// The demo's request timeout: longer than its longest route (60 s).
const DEMO_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn run_demo(serve: fastlane::ServeArgs, jobs_url: String, job_concurrency: usize) -> ExitCode {
    fastlane::init_logging_with(&serve.log_config());
    let store = match fastlane_jobs::connect(&jobs_url).await {
        Ok(store) => store,
        Err(err) => {
            eprintln!("fastlane demo: --jobs-url: {err}");
            return ExitCode::FAILURE;
        }
    };
    let jobs = fastlane_jobs::Jobs::new(store, jobs::demo_registry());
    let worker = jobs.worker().config(fastlane_jobs::WorkerConfig {
        queues: vec![("default".to_owned(), job_concurrency)],
        ..fastlane_jobs::WorkerConfig::default()
    });
    let base = fastlane::Config {
        // The demo's routes sleep up to 60 s; let them finish. (Its help
        // text says 90: see `Command::Demo`.)
        request_timeout: Some(DEMO_REQUEST_TIMEOUT),
        expose_internal: true,
        ..fastlane::Config::default()
    };
    let config = serve.apply(base);
    let server =
        match fastlane::Server::new(demo::app_with_jobs(jobs)).config(config).jobs(worker).bind().await {
            Ok(server) => server,
            Err(err) => {
                eprintln!("fastlane demo: {err}");
                return ExitCode::FAILURE;
            }
        };
    let addr = server.local_addr();
    if fastlane::worker_id().is_some() {
        // The supervisor already printed the routes.
        return demo_exit(server.serve().await);
    }
    outln!("fastlane demo on http://{addr}\n");
    for (route, what) in demo::ROUTES {
        outln!("  {route:<40} {what}");
    }
    outln!("  {:<40} Prometheus metrics", "GET  /metrics");
    outln!("  {:<40} routes that stalled (JSON)", "GET  /_fastlane/stalls");
    outln!("  {:<40} which worker process answered (JSON)", "GET  /_fastlane/worker");
    outln!("\njobs: {jobs_url} (worker inside the server, {job_concurrency} at once)");
    outln!("      the store is kept across restarts (ids go on from the last run); --jobs-url for another");
    // The hint names this very binary, which need not be on the PATH.
    let me = std::env::current_exe().map_or_else(|_| "fastlane".to_owned(), |p| p.display().to_string());
    outln!("\ntry:  curl 'http://{addr}/slow/sync?secs=2' & curl 'http://{addr}/test1'");
    outln!("      curl -d '{{\"ms\": 5000}}' http://{addr}/jobs/sleep   # then GET /jobs/<the id it prints>");
    outln!("      {me} probe -n 2 -c 2 'http://{addr}/slow/sync?secs=2'\n");
    demo_exit(server.serve().await)
}

fn demo_exit(result: Result<fastlane::ShutdownReport, fastlane::Error>) -> ExitCode {
    match result {
        Ok(report) if report.is_clean() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("fastlane demo: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run_probe(config: probe::ProbeConfig, svg: Option<std::path::PathBuf>) -> ExitCode {
    for url in &config.urls {
        if !url.starts_with("http://") {
            eprintln!("fastlane probe: `{url}` is not an http:// URL (https is not supported)");
            return ExitCode::from(2);
        }
    }
    let result = probe::run(&config).await;
    out!("{}", result.table());
    outln!("\n{}", result.verdict());
    if let Some(path) = svg {
        if let Err(err) = std::fs::write(&path, result.svg()) {
            eprintln!("fastlane probe: could not write --svg {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        outln!("timeline written to {}", path.display());
    }
    if result.samples.iter().all(|s| s.outcome.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_jobs(command: JobsCommand) -> ExitCode {
    match jobs_command(command).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fastlane jobs: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn jobs_command(command: JobsCommand) -> Result<ExitCode, String> {
    let connect = |url: String| async move { fastlane_jobs::connect(&url).await.map_err(|e| e.to_string()) };
    match command {
        JobsCommand::Work { url, concurrency, queues, grace_period, lease_secs } => {
            fastlane::init_logging();
            let store = connect(url).await?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_term().await;
                tracing::info!("stopping: finishing running jobs, then releasing the rest");
                stop_tx.send_replace(true);
            });
            let config = fastlane_jobs::WorkerConfig {
                queues: queues.into_iter().map(|(q, n)| (q, n.unwrap_or(concurrency as usize))).collect(),
                lease: Duration::from_secs_f64(lease_secs),
                ..fastlane_jobs::WorkerConfig::default()
            };
            tracing::info!(worker = %config.name, "job worker running (noop, sleep, fail)");
            let stats = fastlane_jobs::run_worker(
                store,
                jobs::demo_registry(),
                config,
                stop_rx,
                Duration::from_secs(grace_period),
            )
            .await;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                succeeded = load(&stats.succeeded),
                failed = load(&stats.failed),
                fenced = load(&stats.fenced),
                released = load(&stats.released),
                "job worker stopped"
            );
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Enqueue { url, name, payload, count, queue, max_attempts } => {
            let payload: serde_json::Value =
                serde_json::from_str(&payload).map_err(|e| format!("--payload is not valid JSON: {e}"))?;
            let store = connect(url).await?;
            let registry = jobs::demo_registry();
            let job = fastlane_jobs::NewJob::new(name.clone(), payload.clone())
                .queue(queue.clone())
                .max_attempts(max_attempts);
            registry.check(&job).map_err(|e| e.to_string())?;
            // One transaction per thousand jobs.
            let last = jobs::enqueue_copies(&store, &job, count, 1000).await.map_err(|e| e.to_string())?;
            let last = last.unwrap_or_default();
            if count == 1 {
                outln!("{last}");
            } else {
                outln!("enqueued {count} jobs (last id {last})");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Stats { url, json } => {
            let stats = connect(url).await?.stats().await.map_err(|e| e.to_string())?;
            if json {
                outln!("{}", serde_json::to_string(&stats).unwrap_or_default());
            } else {
                for (state, count) in &stats {
                    outln!("{:<10} {count}", state.as_str());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::List { url, state, limit } => {
            let state = match state {
                Some(s) => Some(s.parse::<fastlane_jobs::JobState>().map_err(|_| {
                    format!("--state `{s}` is not one of scheduled, available, running, succeeded, retrying, dead, cancelled")
                })?),
                None => None,
            };
            let jobs = connect(url).await?.list(state, limit).await.map_err(|e| e.to_string())?;
            for j in jobs {
                outln!(
                    "{:>8}  {:<10} {:<12} {:<10} attempt {}{}",
                    j.id,
                    j.state.as_str(),
                    j.name,
                    j.queue,
                    j.attempt,
                    j.last_error.map(|e| format!("  ({e})")).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { url, id } => {
            let job = connect(url).await?.get(id).await.map_err(|e| e.to_string())?;
            outln!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Retry { url, id } => {
            use fastlane_jobs::JobState::{Available, Running, Scheduled, Succeeded};
            let store = connect(url).await?;
            // A retry of a job that is waiting, running or done would do
            // nothing: say so, and fail, rather than print its state as if
            // something had happened.
            let before = store.get(id).await.map_err(|e| e.to_string())?.state;
            if matches!(before, Scheduled | Available | Running | Succeeded) {
                return Err(format!(
                    "job {id} is {before}: nothing to retry (retry makes a dead, cancelled or retrying job available again)"
                ));
            }
            let state = store.retry(id).await.map_err(|e| e.to_string())?;
            outln!("job {id}: {before} -> {state}");
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Cancel { url, id } => {
            use fastlane_jobs::JobState::{Cancelled, Dead, Succeeded};
            let store = connect(url).await?;
            let before = store.get(id).await.map_err(|e| e.to_string())?.state;
            if matches!(before, Succeeded | Dead | Cancelled) {
                return Err(format!("job {id} is already {before}: nothing to cancel"));
            }
            let state = store.cancel(id).await.map_err(|e| e.to_string())?;
            let note = if state == fastlane_jobs::JobState::Running {
                " (asked to stop; its worker tells the handler within about a second)"
            } else {
                ""
            };
            outln!("job {id}: {state}{note}");
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Bench { url, jobs: n, concurrency, batch, json } => {
            let store = connect(url).await?;
            let result = jobs::bench(&store, n, batch as usize, concurrency as usize)
                .await
                .map_err(|e| e.to_string())?;
            if json {
                outln!("{}", serde_json::to_string(&result).unwrap_or_default());
            } else {
                outln!(
                    "{} jobs (batches of {}, concurrency {}): enqueue {:.0} jobs/s, end to end {:.0} jobs/s ({:.2} s)",
                    result.jobs,
                    result.batch,
                    result.concurrency,
                    result.enqueue_per_s,
                    result.jobs_per_s,
                    result.seconds
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--queue NAME` or `--queue NAME=N`.
fn parse_queue(s: &str) -> Result<(String, Option<usize>), String> {
    let (name, limit) = match s.split_once('=') {
        Some((name, n)) => {
            let n: usize = n.parse().map_err(|_| format!("`{n}` is not a number of jobs (NAME=N)"))?;
            if !(1..=10_000).contains(&n) {
                return Err(format!("{n} jobs at once is out of range (1 to 10000)"));
            }
            (name, Some(n))
        }
        None => (s, None),
    };
    if name.trim().is_empty() {
        return Err("the queue name is empty".into());
    }
    Ok((name.to_owned(), limit))
}

/// `--lease-secs`: at least 0.3 s (three heartbeats must fit), at most a day.
fn parse_lease(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if (0.3..=86_400.0).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!("{secs} s is out of range (0.3 to 86400)"))
    }
}

async fn wait_for_term() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
