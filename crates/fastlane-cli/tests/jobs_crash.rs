//! Crash test with real processes: 2,000 `sleep` jobs; worker processes are
//! SIGKILLed at random points and restarted, and one is frozen (SIGSTOP)
//! past its lease and thawed, so that its late writes are zombie writes. At
//! the end every job has succeeded exactly once, none is left running, and
//! fencing rejected every zombie write (counted by the frozen worker, checked
//! against the attempts the store recorded as taken over from it).
//!
//! The same for a workflow: a chord of 100 members whose workers are
//! SIGKILLed while it runs completes once, with all 100 results.
//!
//! On SQLite always; on PostgreSQL too when `FASTLANE_TEST_PG_URL` is set (in
//! a database of its own), said to be skipped otherwise.

mod support;

use support::PgDatabase;

use rustix::process::Signal;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOBS: u64 = 2_000;
const LEASE_SECS: &str = "2";

fn fastlane(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fastlane")).args(args).output().expect("run fastlane")
}

fn stats(url: &str) -> serde_json::Value {
    let out = fastlane(&["jobs", "stats", "--url", url, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `fastlane jobs work` process logging to a file of its own.
struct Worker {
    child: Child,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(url: &str, dir: &std::path::Path, n: usize) -> Worker {
        let log = dir.join(format!("worker-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["jobs", "work", "--url", url, "--concurrency", "32", "--lease-secs", LEASE_SECS])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start a worker");
        Worker { child, log }
    }

    fn name(&self) -> String {
        format!("consumer-{}", self.child.id())
    }

    fn signal(&self, signal: Signal) {
        support::send_signal(self.child.id(), signal);
    }

    /// SIGTERM, wait, and return the `fenced=N` of its closing line.
    fn stop(mut self) -> u64 {
        self.signal(Signal::TERM);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "worker exited with {status}");
        let log = std::fs::read_to_string(&self.log).unwrap();
        let line =
            log.lines().find(|l| l.contains("job consumer stopped")).unwrap_or_else(|| panic!("{log}"));
        let fenced = line.split("fenced=").nth(1).and_then(|rest| rest.split_whitespace().next());
        fenced.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no fenced=N in {line}"))
    }

    fn kill(mut self) {
        self.signal(Signal::KILL);
        let _ = self.child.wait();
    }
}

/// A worker left running by a failing assertion is killed with the test,
/// not left behind (`stop` and `kill` have already waited for it).
impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pseudo-random number in `0..n` (no dependency for it).
fn random(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish() % n
}

/// What the store recorded, read with SQL: succeeded jobs (a success is its
/// job's row, fenced by the attempt's token: one per job at most), and
/// attempts of `worker` that were taken over, and all taken over.
macro_rules! recorded {
    ($pool:expr, $worker:expr, $p:literal) => {{
        let pool = $pool;
        let successes: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM fastlane_jobs WHERE state = 'succeeded'")
                .fetch_one(&pool)
                .await
                .unwrap();
        let taken_over: i64 = sqlx::query_scalar(concat!(
            "SELECT COUNT(*) FROM fastlane_attempts WHERE outcome = 'lease expired' AND worker = ",
            $p
        ))
        .bind($worker)
        .fetch_one(&pool)
        .await
        .unwrap();
        let expired: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM fastlane_attempts WHERE outcome = 'lease expired'")
                .fetch_one(&pool)
                .await
                .unwrap();
        (successes, taken_over, expired)
    }};
}

/// Enqueues `count` jobs of the demo's `sleep` type, each sleeping `ms`, with the CLI.
fn enqueue_sleeps(url: &str, ms: u64, count: u64) {
    let payload = format!(r#"{{"ms": {ms}}}"#);
    let count = count.to_string();
    let out = fastlane(&["jobs", "enqueue", "--url", url, "sleep", "--payload", &payload, "--count", &count]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn crash_run(url: &str, dir: &std::path::Path) -> (String, u64) {
    enqueue_sleeps(url, 200, JOBS);
    let started = Instant::now();
    let steady = Worker::start(url, dir, 0);
    // Workers killed at random points, each replaced by the next.
    for n in 1..=3 {
        let doomed = Worker::start(url, dir, n);
        std::thread::sleep(Duration::from_millis(500 + random(1000)));
        doomed.kill();
    }
    // A worker frozen past its lease while it holds jobs: another worker
    // takes them over; thawed, its writes for them must all be rejected.
    let zombie = Worker::start(url, dir, 4);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&zombie.log).unwrap().contains("job consumer running") {
        assert!(Instant::now() < deadline, "the worker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(400));
    zombie.signal(Signal::STOP);
    std::thread::sleep(Duration::from_secs(4));
    zombie.signal(Signal::CONT);

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = stats(url);
        if s["succeeded"] == JOBS {
            assert_eq!((s["running"].as_u64(), s["dead"].as_u64()), (Some(0), Some(0)), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "not all jobs succeeded: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    let name = zombie.name();
    let fenced = zombie.stop();
    steady.stop();
    let _ = writeln!(
        std::io::stderr(),
        "crash run on {url}: all {JOBS} succeeded in {took:?}; {fenced} zombie writes fenced"
    );
    (name, fenced)
}

fn check(recorded: (i64, i64, i64), fenced: u64) {
    let (successes, taken_over, expired) = recorded;
    assert_eq!(successes, JOBS as i64, "every job succeeded");
    assert!(expired > 0, "the killed workers' jobs were taken over");
    assert!(taken_over > 0, "the frozen worker's jobs were taken over");
    // Every success it would have written for a job taken from it was
    // refused: no job's success is written by two attempts.
    assert_eq!(fenced, taken_over as u64, "every write of a taken-over attempt was rejected, and only those");
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fastlane-crash-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sqlite_workers_killed_and_frozen_lose_nothing_and_zombies_are_fenced() {
    let dir = temp_dir("sqlite");
    let db = dir.join("jobs.db");
    let url = format!("sqlite://{}", db.display());
    let (zombie, fenced) = crash_run(&url, &dir);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let recorded = rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        recorded!(pool, zombie, "?")
    });
    check(recorded, fenced);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn postgres_workers_killed_and_frozen_lose_nothing_and_zombies_are_fenced() {
    let test = "postgres_workers_killed_and_frozen_lose_nothing_and_zombies_are_fenced";
    let Some(db) = PgDatabase::create(test, "fastlane_crash") else { return };
    let dir = temp_dir("postgres");
    let (zombie, fenced) = crash_run(&db.url, &dir);
    let recorded = db.rt.block_on(async {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let recorded = recorded!(pool.clone(), zombie, "$1");
        pool.close().await;
        recorded
    });
    check(recorded, fenced);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker SIGKILLed on this host: another worker of the host sees the
/// process gone and takes its jobs over within seconds, not after the 15 s
/// lease.
fn killed_workers_jobs_are_taken_over_before_the_lease(url: &str) {
    enqueue_sleeps(url, 60_000, 5);
    let listed = String::from_utf8(fastlane(&["jobs", "list", "--url", url, "--limit", "5"]).stdout).unwrap();
    let ids: Vec<String> =
        listed.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
    assert_eq!(ids.len(), 5, "{listed}");
    let owners = || -> Vec<Option<String>> {
        ids.iter()
            .map(|id| {
                let out = fastlane(&["jobs", "show", "--url", url, id]);
                let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let running =
                    info["attempts"].as_array().unwrap().iter().rev().find(|a| a["finished_at_ms"].is_null());
                (info["state"] == "running")
                    .then(|| running.map(|a| a["consumer"].as_str().unwrap().to_owned()))
                    .flatten()
            })
            .collect()
    };
    let dir = temp_dir("takeover");
    let spawn = |n| {
        Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["jobs", "work", "--url", url, "--concurrency", "8"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("takeover-{n}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    let mut first = spawn(0);
    let first_name = format!("consumer-{}", first.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while owners().iter().any(|o| o.as_deref() != Some(first_name.as_str())) {
        assert!(Instant::now() < deadline, "the first worker did not start the jobs");
        std::thread::sleep(Duration::from_millis(100));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    let mut second = spawn(1);
    let second_name = format!("consumer-{}", second.id());
    while owners().iter().any(|o| o.as_deref() != Some(second_name.as_str())) {
        assert!(
            killed.elapsed() < Duration::from_secs(8),
            "not taken over in 8 s (the lease is 15 s): {:?}",
            owners()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ =
        writeln!(std::io::stderr(), "{url}: a killed worker's 5 jobs ran again after {:?}", killed.elapsed());
    second.kill().unwrap();
    second.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sqlite_killed_workers_jobs_are_taken_over_before_the_lease() {
    let dir = temp_dir("takeover-sqlite");
    killed_workers_jobs_are_taken_over_before_the_lease(&format!(
        "sqlite://{}",
        dir.join("jobs.db").display()
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn postgres_killed_workers_jobs_are_taken_over_before_the_lease() {
    let test = "postgres_killed_workers_jobs_are_taken_over_before_the_lease";
    let Some(db) = PgDatabase::create(test, "fastlane_takeover") else { return };
    killed_workers_jobs_are_taken_over_before_the_lease(&db.url);
}

/// Members in the chord of the crash test.
const MEMBERS: i64 = 100;

/// A chord of 100 `echo` members (each returns its number after 1 s) and
/// a `gather` final step, run by three worker processes while workers are
/// SIGKILLed and replaced: the final step succeeds once, with every
/// member's result in order; every member succeeded once; no job's attempts
/// overlap in time (none ran twice at once).
fn chord_survives_killed_workers(url: &str, dir: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ids = rt.block_on(async {
        use fastlane_jobs::Store as _;
        let store = fastlane_jobs::connect(url).await.unwrap();
        let members = (0..MEMBERS)
            .map(|i| fastlane_jobs::NewJob::new("echo", serde_json::json!({ "value": i, "ms": 1000 })));
        let then = fastlane_jobs::NewJob::new("gather", serde_json::Value::Null);
        store.enqueue_many(fastlane_jobs::chord(members, then)).await.unwrap()
    });
    let gather = *ids.last().unwrap();
    let show = || -> serde_json::Value {
        let out = fastlane(&["jobs", "show", "--url", url, &gather.to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(show()["state"], "waiting");
    // Three workers take about a third of the members each; two of them are
    // killed while they run members (1 s each), and replaced.
    let started = Instant::now();
    let mut workers: Vec<Worker> = (10..13).map(|n| Worker::start(url, dir, n)).collect();
    let mut killed = 0;
    for n in 13..15 {
        std::thread::sleep(Duration::from_millis(600 + random(300)));
        workers.remove(0).kill();
        killed += 1;
        workers.push(Worker::start(url, dir, n));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = show();
        if info["state"] == "succeeded" {
            break info;
        }
        assert_ne!(info["state"], "cancelled", "{info}");
        assert!(Instant::now() < deadline, "the chord did not complete: {info}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let expected: Vec<i64> = (0..MEMBERS).collect();
    assert_eq!(info["result"], serde_json::json!(expected), "every member's result, in order");
    let successes =
        info["attempts"].as_array().unwrap().iter().filter(|a| a["outcome"] == "succeeded").count();
    assert_eq!(successes, 1, "the final step succeeded once: {info}");
    let mut expired = 0;
    for id in &ids[..ids.len() - 1] {
        let out = fastlane(&["jobs", "show", "--url", url, &id.to_string()]);
        let member: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let attempts = member["attempts"].as_array().unwrap();
        assert_eq!(attempts.iter().filter(|a| a["outcome"] == "succeeded").count(), 1, "{member}");
        expired += attempts.iter().filter(|a| a["outcome"] == "lease expired").count();
        for pair in attempts.windows(2) {
            let (ended, next) =
                (pair[0]["finished_at_ms"].as_i64().unwrap(), pair[1]["started_at_ms"].as_i64());
            assert!(next.unwrap() >= ended, "attempts overlap: {member}");
        }
    }
    assert!(expired > 0, "the killed workers held members, which were taken over");
    for worker in workers {
        worker.stop();
    }
    let _ = writeln!(
        std::io::stderr(),
        "chord on {url}: {MEMBERS} members and the final step in {:?}, {killed} workers killed, {expired} \
         members taken over",
        started.elapsed()
    );
}

#[test]
fn sqlite_chord_of_100_completes_once_with_killed_workers() {
    let dir = temp_dir("chord-sqlite");
    chord_survives_killed_workers(&format!("sqlite://{}", dir.join("jobs.db").display()), &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn postgres_chord_of_100_completes_once_with_killed_workers() {
    let test = "postgres_chord_of_100_completes_once_with_killed_workers";
    let Some(db) = PgDatabase::create(test, "fastlane_chord") else { return };
    let dir = temp_dir("chord-postgres");
    chord_survives_killed_workers(&db.url, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}
