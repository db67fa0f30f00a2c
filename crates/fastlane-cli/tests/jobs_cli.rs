//! `fastlane jobs ...` as a user runs it, on a SQLite file.

mod support;

use rustix::process::Signal;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fastlane(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fastlane")).args(args).output().expect("run fastlane")
}

fn stats(url: &str) -> serde_json::Value {
    let out = fastlane(&["jobs", "stats", "--url", url, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stats --json prints one JSON object")
}

#[test]
fn enqueue_work_and_stats_through_the_cli() {
    let dir = support::TempDir::new("jobs-cli");
    let url = dir.sqlite_url();

    let out = fastlane(&["jobs", "enqueue", "--url", &url, "noop", "--count", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "fail", "--payload", r#"{"times": 1}"#]);
    assert!(out.status.success());
    // Bad input is refused at enqueue time, naming the problem.
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown job `nope`"));
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "sleep", "--payload", "{"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload is not valid JSON"));
    // No payload: what is missing, in the JSON's terms (not a Rust type name).
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "sleep"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("payload of `sleep`: none was given; it must be a JSON object (missing field `ms`)"),
        "{stderr}"
    );
    assert!(!stderr.contains("Payload"), "{stderr}");

    // One more that fails for good at its only attempt.
    let out = fastlane(&[
        "jobs",
        "enqueue",
        "--url",
        &url,
        "fail",
        "--payload",
        r#"{"times": 5}"#,
        "--max-attempts",
        "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dead_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let s = stats(&url);
    for state in ["scheduled", "available", "running", "succeeded", "retrying", "dead", "cancelled"] {
        assert!(s.get(state).is_some(), "missing {state}: {s}");
    }
    assert_eq!(s["available"], 22);
    // The tables' sizes: 22 jobs, no finished attempt yet, the file's bytes.
    let tables = &s["tables"];
    assert_eq!((tables["jobs"].as_u64(), tables["attempts"].as_u64()), (Some(22), Some(0)), "{s}");
    assert!(tables["bytes"].as_u64().unwrap() > 0, "{s}");
    let out = fastlane(&["jobs", "stats", "--url", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tables     22 jobs, 0 attempts, 0 schedules; "), "{text}");

    let worker = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["jobs", "work", "--url", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats(&url)["succeeded"] != 21 || stats(&url)["dead"] != 1 {
        assert!(Instant::now() < deadline, "jobs not done: {}", stats(&url));
        std::thread::sleep(Duration::from_millis(100));
    }
    support::send_signal(worker.id(), Signal::TERM);
    let output = worker.wait_with_output().unwrap();
    assert!(output.status.success());
    // Each failed attempt is logged, not only counted: a warning while the
    // job will run again, an error when it is dead.
    let log = String::from_utf8_lossy(&output.stderr);
    let retried = log
        .lines()
        .find(|l| l.contains("job 21 (fail) attempt 1 of 25 failed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        retried.contains("WARN") && retried.contains("failing on purpose") && retried.contains("tried again"),
        "{retried}"
    );
    let dead = log
        .lines()
        .find(|l| l.contains(&format!("job {dead_id} (fail) is dead after attempt 1 of 1")))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(dead.contains("ERROR") && dead.contains("no attempts left"), "{dead}");
    let show = fastlane(&["jobs", "show", "--url", &url, "21"]);
    let job: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 2);

    // cancel, list, retry: a pending job is cancelled at once and can be
    // made available again.
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "noop"]);
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = fastlane(&["jobs", "cancel", "--url", &url, &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("job {id}: cancelled"));
    let out = fastlane(&["jobs", "list", "--url", &url, "--state", "cancelled"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.lines().any(|l| l.split_whitespace().next() == Some(id.as_str())), "{listed}");
    // Cancelling it again does nothing: said, with a non-zero exit.
    let out = fastlane(&["jobs", "cancel", "--url", &url, &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(&format!("job {id} is already cancelled: nothing to cancel")));
    let out = fastlane(&["jobs", "retry", "--url", &url, &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("job {id}: cancelled -> available"));
    // Retrying a job that waits to run does nothing either.
    let out = fastlane(&["jobs", "retry", "--url", &url, &id]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("job {id} is available: nothing to retry"))
    );
    // What ended in the last hour, per minute: the 21 that succeeded and
    // the one that died, all in this minute or the one before.
    let out = fastlane(&["jobs", "stats", "--url", &url, "--json", "--per-minute"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let minutes = s["per_minute"].as_array().unwrap();
    let sum = |key: &str| minutes.iter().map(|m| m[key].as_u64().unwrap()).sum::<u64>();
    assert!((1..=2).contains(&minutes.len()) && (sum("succeeded"), sum("dead")) == (21, 1), "{s}");
    let out = fastlane(&["jobs", "stats", "--url", &url, "--per-minute"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ended in the last hour, per minute") && text.contains("  succeeded "), "{text}");
    // Every dead job of a type, at once: the one `fail` job that died.
    let out = fastlane(&["jobs", "retry-dead", "--url", &url, "--name", "fail"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 dead job(s) of type fail made available again"
    );
    assert_eq!(stats(&url)["dead"], 0);
    let out = fastlane(&["jobs", "retry-dead", "--url", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0 dead job(s) made available again");
    // A store in a directory that does not exist says so.
    let missing = format!("sqlite://{}", dir.path.join("no/such/dir/jobs.db").display());
    let out = fastlane(&["jobs", "stats", "--url", &missing]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no/such/dir does not exist"), "{stderr}");
    let out = fastlane(&["jobs", "cancel", "--url", &url, "99999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job with id 99999"));

    // bench: one JSON object with the rates.
    let out = fastlane(&["jobs", "bench", "--url", &url, "--jobs", "2000", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bench: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(bench["jobs"], 2000);
    assert!(bench["jobs_per_s"].as_f64().unwrap() > 0.0 && bench["enqueue_per_s"].as_f64().unwrap() > 0.0);

    // `fastlane jobs show 21 | head -1`: a reader that stops early closes
    // the pipe. The command finishes quietly (no "failed printing to
    // stdout" panic) and exits as it would have.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["jobs", "show", "--url", &url, "21"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
}

/// `jobs schedules` lists what consumers registered: the spec, the next tick,
/// the last tick's job, when a consumer last looked; `--json` for scripts.
#[test]
fn schedules_are_listed_with_their_next_tick_and_last_job() {
    use fastlane_jobs::{NewJob, Schedule, Store as _};
    let dir = support::TempDir::new("jobs-cli-schedules");
    let url = dir.sqlite_url();
    let out = fastlane(&["jobs", "schedules", "--url", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no schedules"));

    // A consumer's scheduler looks twice at an hourly schedule, a tick apart.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let job = rt.block_on(async {
        let store = fastlane_jobs::SqliteStore::open(&url).await.unwrap();
        let hourly =
            Schedule::every("cleanup", NewJob::new("noop", serde_json::json!({})), Duration::from_secs(3600))
                .unwrap();
        let now = fastlane_jobs::now_ms();
        let hour = 3_600_000;
        store.look_at_schedule(&hourly, now / hour * hour - hour + 10).await.unwrap();
        store.look_at_schedule(&hourly, now).await.unwrap().job.expect("the hour's tick")
    });
    let out = fastlane(&["jobs", "schedules", "--url", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("cleanup  job noop  every 1h  missed: run-once  next: "), "{text}");
    assert!(text.contains(" UTC (in ") && text.contains(&format!("last job: {job}  seen: ")), "{text}");
    let out = fastlane(&["jobs", "schedules", "--url", &url, "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON array");
    assert_eq!(listed[0]["name"], "cleanup");
    assert_eq!(listed[0]["last_job"], job);
    // The job is the tick's, due at the hour.
    let out = fastlane(&["jobs", "show", "--url", &url, &job.to_string()]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(shown["unique_key"].as_str().unwrap().starts_with("schedule:cleanup:"), "{shown}");
}

/// The jobs a schedule enqueued, by tick (from their unique keys).
fn jobs_by_tick(url: &str, schedule: &str) -> std::collections::BTreeMap<i64, usize> {
    use fastlane_jobs::Store as _;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = fastlane_jobs::connect(url).await.unwrap();
        let mut by_tick = std::collections::BTreeMap::new();
        for job in store.list(None, 10_000).await.unwrap() {
            let key = store.get(job.id).await.unwrap().unique_key.unwrap_or_default();
            if let Some(tick) = key.strip_prefix(&format!("schedule:{schedule}:")) {
                *by_tick.entry(tick.parse::<i64>().unwrap()).or_insert(0) += 1;
            }
        }
        by_tick
    })
}

/// Three `jobs work` processes run one 1-second schedule on one store; one
/// is SIGKILLed half-way. Every tick from the first to the last has exactly
/// one job: none twice while three schedulers race, none lost when one
/// dies (nothing to take over: the others go on).
fn three_scheduler_processes_enqueue_each_tick_once(url: &str) {
    let start = |_| {
        Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["jobs", "work", "--url", url, "--schedule", "pulse=noop@every 1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fastlane jobs work")
    };
    let mut workers: Vec<_> = (0..3).map(start).collect();
    std::thread::sleep(Duration::from_secs(6));
    workers[0].kill().unwrap();
    workers[0].wait().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    for worker in &mut workers[1..] {
        support::send_signal(worker.id(), Signal::TERM);
        assert!(worker.wait().unwrap().success());
    }
    let by_tick = jobs_by_tick(url, "pulse");
    assert!(by_tick.len() >= 8, "{by_tick:?}");
    assert!(by_tick.values().all(|n| *n == 1), "a tick enqueued twice: {by_tick:?}");
    let ticks: Vec<i64> = by_tick.keys().copied().collect();
    assert!(ticks.windows(2).all(|w| w[1] - w[0] == 1000), "a tick lost: {ticks:?}");
}

#[test]
fn three_scheduler_processes_on_one_sqlite_file() {
    let dir = support::TempDir::new("jobs-cli-sched");
    three_scheduler_processes_enqueue_each_tick_once(&dir.sqlite_url());
}

#[test]
fn three_scheduler_processes_on_one_postgres_database() {
    let test = "three_scheduler_processes_on_one_postgres_database";
    let Some(db) = support::PgDatabase::create(test, "fastlane_sched_cli") else { return };
    three_scheduler_processes_enqueue_each_tick_once(&db.url);
}

/// A rate limit of 50 jobs a second set with the CLI, held by two `fastlane
/// jobs work` processes that could each run hundreds: the succeeded count
/// grows by 50 a second (within 10 %) between the 2nd and the 8th second.
fn two_worker_processes_keep_a_rate_limit(url: &str) {
    let out = fastlane(&["jobs", "enqueue", "--url", url, "noop", "--count", "1000"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fastlane(&["jobs", "limit", "--url", url, "--queue", "default", "--rate", "50/s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut workers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_fastlane"))
                .args(["jobs", "work", "--url", url, "--concurrency", "64"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start fastlane jobs work")
        })
        .collect();
    let succeeded = || stats(url)["succeeded"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (from, started) = (succeeded(), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(6));
    let (to, took) = (succeeded(), started.elapsed());
    for worker in &mut workers {
        support::send_signal(worker.id(), Signal::TERM);
        assert!(worker.wait().unwrap().success());
    }
    let rate = (to - from) as f64 / took.as_secs_f64();
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "{url}: two worker processes under 50/s: {rate:.1} jobs/s over {took:?}"
        );
    }
    assert!(
        (45.0..=55.0).contains(&rate),
        "{rate:.1} jobs/s under a limit of 50/s ({from} -> {to} in {took:?})"
    );
}

#[test]
fn two_worker_processes_keep_a_rate_limit_on_sqlite() {
    let dir = support::TempDir::new("jobs-cli-rate");
    two_worker_processes_keep_a_rate_limit(&dir.sqlite_url());
}

#[test]
fn two_worker_processes_keep_a_rate_limit_on_postgres() {
    let test = "two_worker_processes_keep_a_rate_limit_on_postgres";
    let Some(db) = support::PgDatabase::create(test, "fastlane_rate_cli") else { return };
    two_worker_processes_keep_a_rate_limit(&db.url);
}
