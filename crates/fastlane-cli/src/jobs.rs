//! `fastlane jobs ...`: run a job consumer with the built-in job types, enqueue,
//! inspect and benchmark a job store.
//!
//! * [`builtin`]: the job types (`noop`, `sleep`, `fail`), also the demo's;
//! * [`bench`](mod@bench): `fastlane jobs bench`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use fastlane_jobs::{now_ms, Store as _};

use crate::outln;

pub mod bench;
pub mod builtin;

pub use bench::{bench, enqueue_copies, BenchResult};
pub use builtin::demo_registry;

/// What `--url` of every `jobs` subcommand takes (one text, eight flags).
const STORE_URL_HELP: &str = "The job store: sqlite://jobs.db (a file, relative to the working directory, \
    created on first use), sqlite:///var/lib/app/jobs.db (an absolute path), or \
    postgres://user:password@host:5432/dbname (a PostgreSQL database shared by many processes)";

/// The `jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Run a job consumer with the built-in job types (noop, sleep, fail, echo, gather) until
    /// SIGTERM/SIGINT.
    Work {
        /// The job store (the help text is STORE_URL_HELP).
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
        /// Lease of each attempt, renewed every third of it: a dead consumer's
        /// jobs run again within one lease.
        #[arg(long, default_value_t = 15.0, value_parser = parse_lease)]
        lease_secs: f64,
        /// A periodic job of a built-in type, as `NAME=JOB@every 30s` (s, m, h, d) or
        /// `NAME=JOB@cron 0 3 * * * Europe/Paris` (the zone is optional, UTC by default); repeat
        /// for several. Every consumer given the same schedule enqueues each tick once between
        /// them.
        #[arg(long = "schedule", value_name = "NAME=JOB@WHEN", value_parser = parse_schedule)]
        schedules: Vec<fastlane_jobs::Schedule>,
    },
    /// Enqueue jobs (the name and payload are checked against the built-in types).
    Enqueue {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Job type: noop, sleep, fail, echo or gather.
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
        /// Run only after the job with this id has succeeded (repeat to wait for several; `gather`
        /// returns their results). If it ends dead or cancelled, this job is cancelled.
        #[arg(long = "after", value_name = "ID")]
        after: Vec<i64>,
    },
    /// Counts per state, and the size of the store's tables.
    Stats {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// One JSON object with a key per state, and `tables` (rows of each table, bytes).
        #[arg(long)]
        json: bool,
        /// Also the jobs that ended in each minute of the last hour (JSON: `per_minute`).
        #[arg(long)]
        per_minute: bool,
    },
    /// The newest jobs.
    List {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        /// How many, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job with its attempts, as JSON.
    Show {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// The job's id.
        id: i64,
    },
    /// The schedules the store knows (declared in code with Registry::schedule): their next tick, the
    /// job of their last, and when a consumer last looked at them.
    Schedules {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Serve the store's dashboard (queues, the last hour, running, failing and dead jobs, schedules;
    /// retry and cancel) until SIGTERM/SIGINT.
    Ui {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Address to listen on: this machine only unless told otherwise (the page can retry and
        /// cancel jobs).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0: any free one, printed).
        #[arg(long, default_value_t = 8089)]
        port: u16,
        /// Require this token: open the page once as /?token=TOKEN (a cookie keeps it), or send
        /// `Authorization: Bearer TOKEN`.
        #[arg(long, env = "FASTLANE_JOBS_UI_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Set a queue's limits for every consumer of the store (at most N jobs started per period, at
    /// most N running at once), or, with no --queue, list the limited queues.
    Limit {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// The queue to limit.
        #[arg(long)]
        queue: Option<String>,
        /// At most this many jobs started per period: 50/s, 600/m, 1000/h, 5/250ms.
        #[arg(long, value_parser = parse_rate, requires = "queue")]
        rate: Option<fastlane_jobs::Rate>,
        /// At most this many of its jobs running at once, across all consumers.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "queue")]
        concurrency: Option<u32>,
        /// Remove the queue's limits.
        #[arg(long, requires = "queue", conflicts_with_all = ["rate", "concurrency"])]
        none: bool,
    },
    /// Make a dead or cancelled job available again.
    Retry {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// The job's id.
        id: i64,
    },
    /// Make every dead job (of one type, with --name) available again, with one more attempt each.
    RetryDead {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Only dead jobs of this type.
        #[arg(long)]
        name: Option<String>,
    },
    /// Cancel a pending job, or ask a running one to stop.
    Cancel {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// The job's id.
        id: i64,
    },
    /// Enqueue N noop jobs, drain them with a consumer, print the rates.
    Bench {
        /// The job store (the help text is STORE_URL_HELP).
        #[arg(long, env = "FASTLANE_JOBS_URL", value_name = "URL", help = STORE_URL_HELP)]
        url: String,
        /// Jobs to enqueue and run.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        jobs: u64,
        /// Jobs run at once.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: u32,
        /// Jobs per enqueue call (one transaction each).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// A rate limit set on the benchmark's queue (e.g. 1000000/s: one it does not reach, to
        /// measure what a limit costs).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<fastlane_jobs::Rate>,
        /// Enqueue the jobs as chains of this many steps (each step waits for the one before and
        /// is handed its result); 1: independent jobs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        chain: u32,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `fastlane jobs` subcommand; an error is one line on stderr and exit code 1.
pub async fn run_command(command: JobsCommand) -> ExitCode {
    match jobs_command(command).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fastlane jobs: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A Unix time in ms as `2026-11-27 03:00:00 UTC`.
fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| format!("{ms} ms"), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// How far `ms` is from `now`: `in 2h05m`, `12s ago`.
fn relative(ms: i64, now: i64) -> String {
    let gap = Duration::from_millis(ms.abs_diff(now));
    let secs = gap.as_secs();
    let span = match secs {
        0..3600 => fastlane::HumanDuration(gap).to_string(),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs / 3600 % 24),
    };
    match ms >= now {
        true => format!("in {span}"),
        false => format!("{span} ago"),
    }
}

/// An error as one line, with its causes (a store error and what the database said).
fn chain(err: impl std::error::Error + 'static) -> String {
    fastlane::ErrorChain(&err).to_string()
}

async fn jobs_command(command: JobsCommand) -> Result<ExitCode, String> {
    let connect = |url: String| async move { fastlane_jobs::connect(&url).await.map_err(chain) };
    match command {
        JobsCommand::Work { url, concurrency, queues, grace_period, lease_secs, schedules } => {
            let mut registry = demo_registry();
            for schedule in schedules {
                registry =
                    registry.schedule(schedule).map_err(|err| format!("--schedule: {}", chain(err)))?;
            }
            fastlane::init_logging();
            let store = connect(url).await?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_term().await;
                tracing::info!("stopping: finishing running jobs, then releasing the rest");
                stop_tx.send_replace(true);
            });
            let config = fastlane_jobs::ConsumerConfig {
                queues: queues.into_iter().map(|(q, n)| (q, n.unwrap_or(concurrency as usize))).collect(),
                lease: Duration::from_secs_f64(lease_secs),
                ..fastlane_jobs::ConsumerConfig::default()
            };
            tracing::info!(consumer = %config.name, "job consumer running (noop, sleep, fail, echo, gather)");
            let stats = fastlane_jobs::run_consumer(
                store,
                registry,
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
                "job consumer stopped"
            );
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Enqueue { url, name, payload, count, queue, max_attempts, after } => {
            let payload: serde_json::Value =
                serde_json::from_str(&payload).map_err(|e| format!("--payload is not valid JSON: {e}"))?;
            let store = connect(url).await?;
            let registry = demo_registry();
            let job = fastlane_jobs::NewJob::new(name.clone(), payload.clone())
                .queue(queue.clone())
                .max_attempts(max_attempts);
            let job = after.into_iter().fold(job, fastlane_jobs::NewJob::after);
            registry.check(&job).map_err(chain)?;
            // One transaction per thousand jobs.
            let last = enqueue_copies(&store, &job, count, 1000).await.map_err(chain)?;
            let last = last.unwrap_or_default();
            if count == 1 {
                outln!("{last}");
            } else {
                outln!("enqueued {count} jobs (last id {last})");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Stats { url, json, per_minute } => {
            let store = connect(url).await?;
            let stats = store.stats().await.map_err(chain)?;
            let sizes = store.table_sizes().await.map_err(chain)?;
            let minutes = match per_minute {
                true => {
                    Some(store.activity(now_ms() - 3_600_000, Duration::from_secs(60)).await.map_err(chain)?)
                }
                false => None,
            };
            if json {
                // The counts by state, as before, and the tables' sizes.
                let mut object = serde_json::to_value(&stats).unwrap_or_default();
                object["tables"] = serde_json::to_value(sizes).unwrap_or_default();
                if let Some(minutes) = &minutes {
                    object["per_minute"] = serde_json::to_value(minutes).unwrap_or_default();
                }
                outln!("{object}");
            } else {
                for (state, count) in &stats {
                    outln!("{:<10} {count}", state.as_str());
                }
                outln!(
                    "tables     {} jobs, {} attempts, {} schedules; {:.1} MiB",
                    sizes.jobs,
                    sizes.attempts,
                    sizes.schedules,
                    sizes.bytes as f64 / 1_048_576.0
                );
                if let Some(minutes) = &minutes {
                    outln!("ended in the last hour, per minute (UTC; minutes with none left out):");
                    for m in minutes {
                        let at = chrono::DateTime::from_timestamp_millis(m.start_ms)
                            .map_or_else(String::new, |t| t.format("%H:%M").to_string());
                        outln!(
                            "  {at}  succeeded {}  dead {}  cancelled {}",
                            m.succeeded,
                            m.dead,
                            m.cancelled
                        );
                    }
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
            let jobs = connect(url).await?.list(state, limit).await.map_err(chain)?;
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
        JobsCommand::Schedules { url, json } => {
            let schedules = connect(url).await?.schedules().await.map_err(chain)?;
            if json {
                outln!("{}", serde_json::to_string(&schedules).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            if schedules.is_empty() {
                outln!("no schedules (a consumer whose registry declares one registers it when it starts)");
            }
            let now = now_ms();
            for s in schedules {
                let next = s
                    .next_tick
                    .map_or_else(|| "never".to_owned(), |t| format!("{} ({})", utc(t), relative(t, now)));
                let last_job = s.last_job.map_or_else(|| "none yet".to_owned(), |id| id.to_string());
                outln!(
                    "{}  job {}  {}  missed: {}  next: {next}  last job: {last_job}  seen: {}",
                    s.name,
                    s.job,
                    s.spec,
                    s.missed,
                    relative(s.seen_at, now)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { url, id } => {
            let job = connect(url).await?.get(id).await.map_err(chain)?;
            outln!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Retry { url, id } => {
            use fastlane_jobs::JobState::{Available, Running, Scheduled, Succeeded};
            let store = connect(url).await?;
            // A retry of a job that is waiting, running or done would do
            // nothing: say so, and fail, rather than print its state as if
            // something had happened.
            let before = store.get(id).await.map_err(chain)?.state;
            if matches!(before, Scheduled | Available | Running | Succeeded) {
                return Err(format!(
                    "job {id} is {before}: nothing to retry (retry makes a dead, cancelled or retrying job available again)"
                ));
            }
            let state = store.retry(id).await.map_err(chain)?;
            outln!("job {id}: {before} -> {state}");
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Ui { url, host, port, token } => {
            let store = connect(url.clone()).await?;
            fastlane::init_logging();
            let dashboard = fastlane_jobs::Dashboard::new().token(token);
            let open = dashboard.open_path();
            let router = dashboard.router(store);
            let config = fastlane::Config { host, port, ..fastlane::Config::default() };
            let server = fastlane::Server::new(router)
                .config(config)
                .bind()
                .await
                .map_err(|e| format!("--host/--port: {}", fastlane::ErrorChain(&e)))?;
            // With its token, as Jupyter prints its address: the one to open.
            outln!("fastlane jobs ui on http://{}{open}  (store {url})", server.local_addr());
            match server.serve().await {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(err) => Err(fastlane::ErrorChain(&err).to_string()),
            }
        }
        JobsCommand::Limit { url, queue, rate, concurrency, none } => {
            let store = connect(url).await?;
            if let Some(queue) = queue {
                if rate.is_none() && concurrency.is_none() && !none {
                    return Err("give --rate, --concurrency or --none with --queue".into());
                }
                let mut limits = fastlane_jobs::QueueLimits::default();
                limits.rate = rate;
                if let Some(n) = concurrency {
                    limits = limits.concurrency(n).map_err(chain)?;
                }
                store.set_queue_limits(&queue, limits).await.map_err(chain)?;
            }
            let limited = store.queue_limits().await.map_err(chain)?;
            if limited.is_empty() {
                outln!("no queue has limits");
            }
            for (queue, limits) in limited {
                let rate = limits.rate.map_or_else(|| "-".to_owned(), |r| r.to_string());
                let cap = limits.concurrency.map_or_else(|| "-".to_owned(), |n| n.to_string());
                outln!("{queue:<20} rate {rate:<10} concurrency {cap}");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::RetryDead { url, name } => {
            let store = connect(url).await?;
            // In steps of a thousand, each its own transaction: a store with
            // a million dead jobs is not locked for the whole of it.
            let mut total = 0;
            loop {
                let n = store.retry_dead(name.as_deref(), 1000).await.map_err(chain)?;
                total += n;
                if n < 1000 {
                    break;
                }
            }
            let of = name.map(|n| format!(" of type {n}")).unwrap_or_default();
            outln!("{total} dead job(s){of} made available again");
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Cancel { url, id } => {
            use fastlane_jobs::JobState::{Cancelled, Dead, Succeeded};
            let store = connect(url).await?;
            let before = store.get(id).await.map_err(chain)?.state;
            if matches!(before, Succeeded | Dead | Cancelled) {
                return Err(format!("job {id} is already {before}: nothing to cancel"));
            }
            let state = store.cancel(id).await.map_err(chain)?;
            let note = if state == fastlane_jobs::JobState::Running {
                " (asked to stop; its consumer tells the handler within about a second)"
            } else {
                ""
            };
            outln!("job {id}: {state}{note}");
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Bench { url, jobs: n, concurrency, batch, rate, chain: steps, json } => {
            let store = connect(url).await?;
            let shape = bench::Shape {
                batch: batch as usize,
                concurrency: concurrency as usize,
                chain: steps as usize,
                rate,
            };
            let result = bench(&store, n, shape).await.map_err(chain)?;
            if json {
                outln!("{}", serde_json::to_string(&result).unwrap_or_default());
            } else {
                let mut chains = match result.chain {
                    1 => String::new(),
                    n => format!(" in chains of {n}"),
                };
                if let Some(rate) = &result.rate {
                    chains += &format!(" on a queue limited to {rate}");
                }
                outln!(
                    "{} jobs{chains} (batches of {}, concurrency {}): enqueue {:.0} jobs/s, end to end {:.0} jobs/s ({:.2} s)",
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

/// `--rate 50/s`.
fn parse_rate(s: &str) -> Result<fastlane_jobs::Rate, String> {
    fastlane_jobs::Rate::parse(s).map_err(|e| match e {
        fastlane_jobs::Error::Invalid(why) => why,
        other => other.to_string(),
    })
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

/// `--schedule NAME=JOB@every 30s` or `NAME=JOB@cron <expression> [zone]`;
/// the job's payload is `null` (the job type must take it).
fn parse_schedule(s: &str) -> Result<fastlane_jobs::Schedule, String> {
    let form = "expected NAME=JOB@every 30s or NAME=JOB@cron 0 3 * * * [Europe/Paris]";
    let (name, rest) = s.split_once('=').ok_or_else(|| format!("`{s}`: {form}"))?;
    let (job, when) = rest.split_once('@').ok_or_else(|| format!("`{s}`: {form}"))?;
    let job = fastlane_jobs::NewJob::new(job.trim(), serde_json::Value::Null);
    let chain = |err: fastlane_jobs::Error| chain(err);
    match when.trim().split_once(char::is_whitespace) {
        Some(("every", interval)) => {
            let interval = parse_interval(interval.trim()).ok_or_else(|| {
                format!(
                    "`{s}`: `{}` is not an interval (a whole number with s, m, h or d: 30s, 5m)",
                    interval.trim()
                )
            })?;
            fastlane_jobs::Schedule::every(name.trim(), job, interval).map_err(chain)
        }
        Some(("cron", expression)) => {
            let mut fields: Vec<&str> = expression.split_whitespace().collect();
            // A last field naming a zone (`Europe/Paris`, `UTC`) is the zone.
            let zone = match fields.last() {
                Some(last) if last.contains('/') || *last == "UTC" => fields.pop(),
                _ => None,
            };
            let schedule =
                fastlane_jobs::Schedule::cron(name.trim(), job, &fields.join(" ")).map_err(chain)?;
            match zone {
                Some(zone) => schedule.time_zone(zone).map_err(chain),
                None => Ok(schedule),
            }
        }
        _ => Err(format!("`{s}`: {form}")),
    }
}

/// `30s`, `5m`, `2h`, `1d`.
fn parse_interval(s: &str) -> Option<Duration> {
    let unit = s.trim_start_matches(|c: char| c.is_ascii_digit());
    let n: u64 = s[..s.len() - unit.len()].parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
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

/// SIGTERM or SIGINT, whichever comes first (never, if neither can be listened for).
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
