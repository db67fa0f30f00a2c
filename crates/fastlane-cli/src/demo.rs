//! The demo app (DESIGN §5): the seed articles' scenarios, each on the lane
//! that fits it — and, on purpose, the `async fn` + blocking-call bug they
//! are about (`/test2`, `/ping`, `/slow/async-blocking`, `/cpu/async-blocking`,
//! `/stream/blocking`, `/?action=2`), so that you can see what it does.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use fastlane::extract::{Json, Path, Query};
use fastlane::openapi::aide::openapi::{MediaType, ReferenceOr, RequestBody};
use fastlane::openapi::aide::transform::TransformOperation;
use fastlane::openapi::routing::{get_with, post_with};
use fastlane::openapi::{ApiRouter, Docs};
use fastlane::{ApiError, Background};
use schemars::JsonSchema;

use crate::outln;
use fastlane_jobs::{Jobs, NewJob};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

/// The longest sleep or computation a demo route accepts: it keeps the demo
/// safe to expose to curious clients.
pub const MAX_SECS: f64 = 60.0;

/// The demo's routes, in the order `fastlane demo` prints them.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET  /fast", "returns `ok` at once"),
    ("GET  /test1", "returns `test1` at once (must answer while /test2 runs)"),
    ("GET  /test2?secs=8", "async fn calling std::thread::sleep: the seeds' bug, left in on purpose"),
    ("GET  /ping?secs=5", "async fn: prints Hello, blocks, prints bye"),
    ("GET  /slow/async-blocking?secs=N", "async fn + std::thread::sleep(N)"),
    ("GET  /slow/sync?secs=N", "fastlane::sync handler sleeping N s on the blocking lane"),
    ("GET  /slow/async?secs=N", "tokio::time::sleep(N): the correct async wait"),
    ("GET  /cpu/async-blocking?ms=N", "async fn busy loop of N ms CPU"),
    ("GET  /cpu/offload?ms=N", "the same busy loop on the CPU lane"),
    ("GET  /stream/blocking?chunks=N&secs=S", "streaming body whose producer blocks S s before each chunk"),
    ("POST /profile", r#"{"name": "..", "work_ms": 2000}: computes in the background, answers {} at once"#),
    ("GET  /?action=N&secs=15", "background task: 1 sync-blocking, 2 async-blocking, 3 async-sleeping"),
    (
        "POST /jobs/{name}",
        r#"enqueue a durable job (noop, sleep, fail, echo, gather); body = payload, e.g. {"ms": 5000}"#,
    ),
    ("GET  /jobs/{id}", "a job's state, attempts and progress (JSON)"),
    (
        "GET  /debug/hang-runtime?secs=N",
        "blocks every tokio worker thread: a truly hung server (for --workers)",
    ),
];

/// Builds the demo router, with its OpenAPI document at `/openapi.json` and
/// Swagger UI at `/docs`.
pub fn app() -> Router {
    docs().finish(routes())
}

/// The demo router with the durable job routes, on `jobs`.
pub fn app_with_jobs(jobs: Jobs) -> Router {
    docs().finish(routes().merge(job_routes(jobs)))
}

fn docs() -> Docs {
    Docs::new("fastlane demo", env!("CARGO_PKG_VERSION")).description(
        "The seed articles' scenarios, each on the lane that fits it, and, on purpose, the \
         `async fn` + blocking-call bug they are about (`/test2`, `/ping`, `/slow/async-blocking`, \
         `/cpu/async-blocking`, `/stream/blocking`, `/?action=2`): try them here and watch `/fast` \
         keep answering.",
    )
}

/// The summary of a route in `/docs`: its line of [`ROUTES`], so that the
/// list `fastlane demo` prints and the document say the same.
fn summary(route: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|(key, _)| key.strip_prefix(route).is_some_and(|rest| rest.is_empty() || rest.starts_with('?')))
        .map_or("", |(_, text)| text)
}

fn routes() -> ApiRouter {
    ApiRouter::new()
        .api_route("/fast", get_with(|| async { "ok" }, |op| op.summary(summary("GET  /fast"))))
        .api_route("/test1", get_with(|| async { "test1" }, |op| op.summary(summary("GET  /test1"))))
        .api_route("/test2", get_with(test2, |op| op.summary(summary("GET  /test2"))))
        .api_route("/ping", get_with(ping, |op| op.summary(summary("GET  /ping"))))
        .api_route(
            "/slow/async-blocking",
            get_with(slow_async_blocking, |op| op.summary(summary("GET  /slow/async-blocking"))),
        )
        .api_route(
            "/slow/sync",
            get_with(fastlane::sync(slow_sync), |op| op.summary(summary("GET  /slow/sync"))),
        )
        .api_route("/slow/async", get_with(slow_async, |op| op.summary(summary("GET  /slow/async"))))
        .api_route(
            "/cpu/async-blocking",
            get_with(cpu_async_blocking, |op| op.summary(summary("GET  /cpu/async-blocking"))),
        )
        .api_route(
            "/cpu/offload",
            get_with(fastlane::cpu(cpu_offload), |op| op.summary(summary("GET  /cpu/offload"))),
        )
        .api_route(
            "/stream/blocking",
            get_with(stream_blocking, |op| {
                op.summary(summary("GET  /stream/blocking"))
                    .response_with::<200, String, _>(|r| r.description("A stream of `chunks` lines."))
            }),
        )
        .api_route("/profile", post_with(profile, |op| op.summary(summary("POST /profile"))))
        .api_route("/", get_with(action, |op| op.summary(summary("GET  /"))))
        .api_route(
            "/debug/hang-runtime",
            get_with(hang_runtime, |op| op.summary(summary("GET  /debug/hang-runtime"))),
        )
}

fn job_routes(jobs: Jobs) -> ApiRouter {
    ApiRouter::new()
        // One pattern: the segment is a job type for POST and a job id for
        // GET (the router allows one parameter name per position).
        .api_route(
            "/jobs/{job}",
            post_with(enqueue_job, |op| {
                json_payload(op)
                    .summary(summary("POST /jobs/{name}"))
                    .description("`{job}` is the job type (`noop`, `sleep`, `fail`); the body, if any, is its JSON payload.")
                    .response_with::<201, axum::Json<Enqueued>, _>(|r| r.description("The job is stored."))
            })
            .get_with(show_job, |op| {
                op.summary(summary("GET  /jobs/{id}")).description("`{job}` is the job id that enqueueing answered.")
            }),
        )
        .with_state(jobs)
}

/// The enqueue route reads its body as bytes (an empty body is a `null`
/// payload): the document says what those bytes are.
fn json_payload(mut op: TransformOperation<'_>) -> TransformOperation<'_> {
    let mut body = RequestBody {
        description: Some("The job's payload, any JSON value; empty for `null`.".to_owned()),
        required: false,
        ..Default::default()
    };
    body.content.insert("application/json".to_owned(), MediaType::default());
    op.inner_mut().request_body = Some(ReferenceOr::Item(body));
    op
}

/// The answer to an enqueue.
#[derive(Debug, Serialize, JsonSchema)]
struct Enqueued {
    /// The job's id.
    id: fastlane_jobs::JobId,
    /// Its type.
    name: String,
    /// Where to see it: `/jobs/{id}`.
    url: String,
}

/// The one path segment of `/jobs/{job}`.
#[derive(Debug, Deserialize, JsonSchema)]
struct JobSegment {
    /// The job type (POST) or the job id (GET).
    job: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct EnqueueParams {
    /// The queue to put the job on [default: `default`].
    queue: Option<String>,
    /// Higher runs first among ready jobs [default: 0].
    priority: Option<i32>,
    /// Milliseconds before the job may run [default: 0].
    delay_ms: Option<u64>,
    /// Attempts before the job is dead [default: the store's].
    max_attempts: Option<u32>,
    /// At most one live job per key: a second enqueue answers the first's id.
    unique_key: Option<String>,
}

/// `POST /jobs/{name}?queue=..&priority=..&delay_ms=..&max_attempts=..&unique_key=..`
/// with the payload as the body (JSON; empty for `null`).
async fn enqueue_job(
    State(jobs): State<Jobs>,
    Path(JobSegment { job: name }): Path<JobSegment>,
    Query(q): Query<EnqueueParams>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Enqueued>), ApiError> {
    let payload: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::unprocessable("body", format!("the payload is not JSON: {e}")))?
    };
    let mut job = NewJob::new(name.clone(), payload);
    if let Some(queue) = q.queue {
        job = job.queue(queue);
    }
    if let Some(priority) = q.priority {
        job = job.priority(priority);
    }
    if let Some(ms) = q.delay_ms {
        job = job.delay(Duration::from_millis(ms));
    }
    if let Some(n) = q.max_attempts {
        job = job.max_attempts(n);
    }
    if let Some(key) = q.unique_key {
        job = job.unique_key(key);
    }
    let id = jobs.enqueue(job).await?;
    Ok((StatusCode::CREATED, axum::Json(Enqueued { id, url: format!("/jobs/{id}"), name })))
}

/// `GET /jobs/{id}`: the job, its attempts and its progress.
async fn show_job(
    State(jobs): State<Jobs>,
    Path(JobSegment { job: id }): Path<JobSegment>,
) -> Result<axum::Json<fastlane_jobs::JobInfo>, ApiError> {
    let id: i64 = id.parse().map_err(|_| ApiError::unprocessable("id", "must be a job id (an integer)"))?;
    Ok(axum::Json(jobs.get(id).await?))
}

#[derive(Debug, Deserialize, JsonSchema)]
struct SecsParam {
    /// Seconds, at most 60 [default: the route's].
    secs: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct MsParam {
    /// Milliseconds of CPU, at most 60000 [default: 100].
    ms: Option<u64>,
}

/// A duration in seconds from the query, with a default, capped.
fn secs(field: &str, value: Option<f64>, default: f64) -> Result<Duration, ApiError> {
    let v = value.unwrap_or(default);
    if !v.is_finite() || v < 0.0 {
        return Err(ApiError::unprocessable(field, "must be a number of seconds, 0 or more"));
    }
    if v > MAX_SECS {
        return Err(ApiError::unprocessable(field, format!("must be at most {MAX_SECS} (seconds)")));
    }
    Ok(Duration::from_secs_f64(v))
}

fn millis(field: &str, value: Option<u64>, default: u64) -> Result<Duration, ApiError> {
    let v = value.unwrap_or(default);
    let max = (MAX_SECS * 1000.0) as u64;
    if v > max {
        return Err(ApiError::unprocessable(field, format!("must be at most {max} (milliseconds)")));
    }
    Ok(Duration::from_millis(v))
}

/// Keeps one core busy for `d`: the stand-in for real computation.
pub fn burn_cpu(d: Duration) -> u64 {
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while start.elapsed() < d {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    std::hint::black_box(x)
}

async fn test2(Query(q): Query<SecsParam>) -> Result<&'static str, ApiError> {
    let d = secs("secs", q.secs, 8.0)?;
    // The bug, on purpose: a blocking sleep inside an async fn.
    std::thread::sleep(d);
    Ok("test2")
}

async fn ping(Query(q): Query<SecsParam>) -> Result<&'static str, ApiError> {
    let d = secs("secs", q.secs, 5.0)?;
    outln!("Hello");
    std::thread::sleep(d);
    outln!("bye");
    Ok("pong")
}

async fn slow_async_blocking(Query(q): Query<SecsParam>) -> Result<String, ApiError> {
    let d = secs("secs", q.secs, 1.0)?;
    std::thread::sleep(d);
    Ok(format!("slept {:.3} s blocking the async lane", d.as_secs_f64()))
}

fn slow_sync(Query(q): Query<SecsParam>) -> Result<String, ApiError> {
    let d = secs("secs", q.secs, 1.0)?;
    std::thread::sleep(d);
    Ok(format!("slept {:.3} s on the blocking lane", d.as_secs_f64()))
}

async fn slow_async(Query(q): Query<SecsParam>) -> Result<String, ApiError> {
    let d = secs("secs", q.secs, 1.0)?;
    tokio::time::sleep(d).await;
    Ok(format!("waited {:.3} s asynchronously", d.as_secs_f64()))
}

async fn cpu_async_blocking(Query(q): Query<MsParam>) -> Result<String, ApiError> {
    let d = millis("ms", q.ms, 100)?;
    let x = burn_cpu(d);
    Ok(format!("computed {} ms on the async lane ({x:x})", d.as_millis()))
}

fn cpu_offload(Query(q): Query<MsParam>) -> Result<String, ApiError> {
    let d = millis("ms", q.ms, 100)?;
    let x = burn_cpu(d);
    Ok(format!("computed {} ms on the CPU lane ({x:x})", d.as_millis()))
}

#[derive(Debug, Deserialize, JsonSchema)]
struct StreamParams {
    /// Lines to send, 1 to 1000 [default: 3].
    chunks: Option<u32>,
    /// Seconds the producer blocks before each line [default: 1].
    secs: Option<f64>,
}

async fn stream_blocking(Query(q): Query<StreamParams>) -> Result<Response, ApiError> {
    let chunks = q.chunks.unwrap_or(3);
    if !(1..=1000).contains(&chunks) {
        return Err(ApiError::unprocessable("chunks", "must be between 1 and 1000"));
    }
    let d = secs("secs", q.secs, 1.0)?;
    if d.as_secs_f64() * f64::from(chunks) > MAX_SECS {
        return Err(ApiError::unprocessable("secs", format!("chunks × secs must be at most {MAX_SECS} s")));
    }
    // A synchronous generator behind a streaming body: each chunk is
    // produced by a blocking sleep inside the body's poll.
    let stream = futures_util::stream::iter(0..chunks).map(move |i| {
        std::thread::sleep(d);
        Ok::<_, std::convert::Infallible>(Bytes::from(format!("chunk {i}\n")))
    });
    Ok(Body::from_stream(stream).into_response())
}

#[derive(Debug, Deserialize, JsonSchema)]
struct Profile {
    /// Whose profile to compute.
    name: String,
    /// Milliseconds of CPU the background computation takes, at most 60000 [default: 2000].
    work_ms: Option<u64>,
}

async fn profile(bg: Background, Json(p): Json<Profile>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let work = millis("work_ms", p.work_ms, 2000)?;
    let name = p.name;
    bg.spawn_cpu(move || {
        let started = Instant::now();
        burn_cpu(work);
        tracing::info!(%name, ms = started.elapsed().as_millis() as u64, "profile computed");
    });
    Ok(axum::Json(serde_json::json!({})))
}

/// What a really hung worker looks like: blocking tasks pushed onto tokio's
/// own worker threads (where fastlane's isolation does not reach: they are
/// the I/O runtime) stop the timers and the sockets of the whole process.
/// The request itself then waits on a timer that cannot fire. Under
/// `--workers`, the supervisor sees the runtime stop answering and replaces
/// the worker; without workers the server stays hung for `secs`.
async fn hang_runtime(Query(q): Query<SecsParam>) -> Result<&'static str, ApiError> {
    let d = secs("secs", q.secs, 10.0)?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    for _ in 0..workers {
        tokio::spawn(async move { std::thread::sleep(d) });
    }
    tokio::time::sleep(d).await;
    Ok("the runtime was hung")
}

#[derive(Debug, Deserialize, JsonSchema)]
struct ActionParams {
    /// 1: a sync-blocking background task, 2: an async-blocking one, 3: an async-sleeping one.
    action: Option<u8>,
    /// Seconds the background task takes, at most 60 [default: 15].
    secs: Option<f64>,
}

async fn action(bg: Background, Query(q): Query<ActionParams>) -> Result<String, ApiError> {
    let Some(action) = q.action else {
        return Ok(
            "fastlane demo: try /fast, /test1, /test2?secs=8, /slow/sync?secs=2, or /?action=1..3\n".into()
        );
    };
    let d = secs("secs", q.secs, 15.0)?;
    let what = match action {
        1 => {
            bg.spawn_blocking(move || {
                std::thread::sleep(d);
                tracing::info!("action 1 done: sync-blocking background task on the blocking lane");
            });
            "sync-blocking background task scheduled on the blocking lane"
        }
        2 => {
            bg.spawn(async move {
                // The bug, on purpose: blocking inside an async background task.
                std::thread::sleep(d);
                tracing::info!("action 2 done: async background task that blocked its thread");
            });
            "async background task that blocks scheduled"
        }
        3 => {
            bg.spawn(async move {
                tokio::time::sleep(d).await;
                tracing::info!("action 3 done: async background task that slept");
            });
            "async background task that sleeps scheduled"
        }
        _ => return Err(ApiError::unprocessable("action", "must be 1, 2 or 3")),
    };
    Ok(format!("{what} ({:.1} s)\n", d.as_secs_f64()))
}

/// The flags of `fastlane demo`: the server's, and the job store's.
#[derive(Debug, clap::Args)]
pub struct DemoCommand {
    /// The server's flags.
    #[command(flatten)]
    pub serve: fastlane::ServeArgs,
    /// Job store for POST /jobs/{name} and the in-server job consumer.
    #[arg(long, env = "FASTLANE_JOBS_URL", default_value = "sqlite://fastlane-demo-jobs.db")]
    pub jobs_url: String,
    /// Jobs the in-server worker runs at once (per worker process).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub job_concurrency: u32,
}

/// The demo's request timeout: longer than its longest route (60 s).
const DEMO_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Serves the demo until SIGTERM/SIGINT; exit code 1 if the shutdown cut work.
pub async fn run_command(command: DemoCommand) -> ExitCode {
    let DemoCommand { serve, jobs_url, job_concurrency } = command;
    let job_concurrency = job_concurrency as usize;
    fastlane::init_logging_with(&serve.log_config());
    let store = match fastlane_jobs::connect(&jobs_url).await {
        Ok(store) => store,
        Err(err) => {
            eprintln!("fastlane demo: --jobs-url: {}", fastlane::ErrorChain(&err));
            return ExitCode::FAILURE;
        }
    };
    let jobs = fastlane_jobs::Jobs::new(store, crate::jobs::demo_registry());
    let consumer = jobs.consumer().config(fastlane_jobs::ConsumerConfig {
        queues: vec![("default".to_owned(), job_concurrency)],
        ..fastlane_jobs::ConsumerConfig::default()
    });
    let base = fastlane::Config {
        // The demo's routes sleep up to 60 s; let them finish. (Its help
        // text says 90: see `Command::Demo`.)
        request_timeout: Some(DEMO_REQUEST_TIMEOUT),
        expose_internal: true,
        ..fastlane::Config::default()
    };
    let config = serve.apply(base);
    let tls = config.tls.is_some();
    let server = match fastlane::Server::new(app_with_jobs(jobs)).config(config).jobs(consumer).bind().await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("fastlane demo: {}", fastlane::ErrorChain(&err));
            return ExitCode::FAILURE;
        }
    };
    let addr = server.local_addr();
    let scheme = if tls { "https" } else { "http" };
    if fastlane::worker_id().is_some() {
        // The supervisor already printed the routes.
        return demo_exit(server.serve().await);
    }
    outln!("fastlane demo on {scheme}://{addr}\n");
    for (route, what) in ROUTES {
        outln!("  {route:<40} {what}");
    }
    outln!("  {:<40} Prometheus metrics", "GET  /metrics");
    outln!("  {:<40} routes that stalled (JSON)", "GET  /_fastlane/stalls");
    outln!("  {:<40} which worker process answered (JSON)", "GET  /_fastlane/worker");
    outln!("  {:<40} the job store's dashboard (a web page)", "GET  /_fastlane/jobs/");
    outln!("\njobs: {jobs_url} (worker inside the server, {job_concurrency} at once)");
    outln!("      the store is kept across restarts (ids go on from the last run); --jobs-url for another");
    // The hint names this very binary, which need not be on the PATH.
    let me = std::env::current_exe().map_or_else(|_| "fastlane".to_owned(), |p| p.display().to_string());
    outln!("\ntry:  curl '{scheme}://{addr}/slow/sync?secs=2' & curl '{scheme}://{addr}/test1'");
    outln!(
        "      curl -d '{{\"ms\": 5000}}' {scheme}://{addr}/jobs/sleep   # then GET /jobs/<the id it prints>"
    );
    if !tls {
        outln!("      {me} probe -n 2 -c 2 'http://{addr}/slow/sync?secs=2'\n");
    } else {
        outln!();
    }
    demo_exit(server.serve().await)
}

fn demo_exit(result: Result<fastlane::ShutdownReport, fastlane::Error>) -> ExitCode {
    match result {
        Ok(report) if report.is_clean() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("fastlane demo: {}", fastlane::ErrorChain(&err));
            ExitCode::FAILURE
        }
    }
}
