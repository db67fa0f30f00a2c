//! The consumer against a SQLite store: handlers, retries, lanes, shutdown.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fastlane_jobs::{
    enqueue_checked, run_consumer, ConsumerConfig, Error, JobContext, JobError, JobState, NewJob, Registry,
    SqliteStore, Store,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

async fn store() -> (SqliteStore, tempdir::TempDir) {
    let dir = tempdir::TempDir::new();
    let store = SqliteStore::open(&format!("sqlite://{}", dir.0.join("jobs.db").display())).await.unwrap();
    (store, dir)
}

/// A temporary directory removed on drop (no extra dependency for it).
mod tempdir {
    pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "fastlane_jobs_worker_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

#[derive(Deserialize)]
struct Fail {
    times: u32,
}

fn registry() -> Registry {
    Registry::new()
        .register("noop", |_: serde_json::Value, _ctx: JobContext| async { Ok(()) })
        .register("sleep", |p: Sleep, _ctx: JobContext| async move {
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok(())
        })
        .register("fail", |p: Fail, ctx: JobContext| async move {
            if ctx.attempt <= p.times {
                Err(JobError::Retry(format!("failing attempt {}", ctx.attempt)))
            } else {
                Ok(())
            }
        })
        .register("panic", |_: serde_json::Value, _ctx: JobContext| async {
            // A handler that only panics names the result type it never returns.
            panic!("job bug");
            #[allow(unreachable_code)]
            Ok(())
        })
        .register("until_cancelled", |_: serde_json::Value, ctx: JobContext| async move {
            while !ctx.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err::<(), _>(JobError::Permanent("cancelled".into()))
        })
        .register_blocking("blocking", |_: serde_json::Value, _ctx: JobContext| {
            match std::thread::current().name() {
                Some("fastlane-blocking") => Ok(()),
                other => Err(JobError::Permanent(format!("ran on {other:?}"))),
            }
        })
        .register_cpu("cpu", |_: serde_json::Value, _ctx: JobContext| match std::thread::current().name() {
            Some("fastlane-cpu") => Ok(()),
            other => Err(JobError::Permanent(format!("ran on {other:?}"))),
        })
}

fn config(lease: Duration) -> ConsumerConfig {
    ConsumerConfig { lease, poll_interval: Duration::from_millis(10), ..ConsumerConfig::default() }
}

async fn wait_for_state<S: Store>(store: &S, id: i64, state: JobState, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let info = store.get(id).await.unwrap();
        if info.state == state {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} is {} after {within:?}: {info:?}", info.state);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_worker_runs_jobs_retries_failures_and_records_panics() {
    let (store, _dir) = store().await;
    let reg = registry();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(enqueue_checked(&store, &reg, NewJob::new("noop", json!({}))).await.unwrap());
    }
    let retried = enqueue_checked(&store, &reg, NewJob::new("fail", json!({"times": 1}))).await.unwrap();
    let panics =
        enqueue_checked(&store, &reg, NewJob::new("panic", json!(null)).max_attempts(1)).await.unwrap();
    let blocking = enqueue_checked(&store, &reg, NewJob::new("blocking", json!(null))).await.unwrap();
    let cpu = enqueue_checked(&store, &reg, NewJob::new("cpu", json!(null))).await.unwrap();
    // An attempt over its timeout is a retryable failure, with the reason kept.
    let slow = NewJob::new("sleep", json!({"ms": 5000})).timeout(Duration::from_millis(200)).max_attempts(1);
    let slow = enqueue_checked(&store, &reg, slow).await.unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = tokio::spawn(run_consumer(
        store.clone(),
        reg,
        config(Duration::from_secs(5)),
        stop_rx,
        Duration::from_secs(5),
    ));

    for id in &ids {
        wait_for_state(&store, *id, JobState::Succeeded, Duration::from_secs(10)).await;
    }
    wait_for_state(&store, blocking, JobState::Succeeded, Duration::from_secs(10)).await;
    wait_for_state(&store, cpu, JobState::Succeeded, Duration::from_secs(10)).await;
    wait_for_state(&store, slow, JobState::Dead, Duration::from_secs(10)).await;
    let info = store.get(slow).await.unwrap();
    assert_eq!(info.attempts[0].error.as_deref(), Some("timed out after 0.2 s"), "{info:?}");
    wait_for_state(&store, panics, JobState::Dead, Duration::from_secs(10)).await;
    assert_eq!(store.get(panics).await.unwrap().last_error.as_deref(), Some("the handler panicked: job bug"));
    // The failing job comes back after its backoff (about 1 s) and succeeds.
    wait_for_state(&store, retried, JobState::Succeeded, Duration::from_secs(10)).await;
    let info = store.get(retried).await.unwrap();
    assert_eq!(info.attempts.len(), 2);
    assert_eq!(info.attempts[0].error.as_deref(), Some("failing attempt 1"));

    stop_tx.send_replace(true);
    let stats = consumer.await.unwrap();
    assert_eq!(stats.succeeded.load(Ordering::Relaxed), 23);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn an_idle_worker_starts_a_new_job_at_once_not_at_its_next_poll() {
    let (store, _dir) = store().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let config = ConsumerConfig { poll_interval: Duration::from_secs(60), ..config(Duration::from_secs(15)) };
    let consumer =
        tokio::spawn(run_consumer(store.clone(), registry(), config, stop_rx, Duration::from_secs(5)));
    // Let the consumer find the queue empty and go idle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = store.enqueue(NewJob::new("noop", json!(null))).await.unwrap();
    wait_for_state(&store, id, JobState::Succeeded, Duration::from_secs(10)).await;
    stop_tx.send_replace(true);
    assert_eq!(consumer.await.unwrap().succeeded.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn unknown_jobs_and_bad_payloads_are_refused_at_enqueue() {
    let (store, _dir) = store().await;
    let reg = registry();
    let err = enqueue_checked(&store, &reg, NewJob::new("nope", json!(null))).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)));
    assert!(err.to_string().contains("unknown job `nope`"), "{err}");
    let err = enqueue_checked(&store, &reg, NewJob::new("sleep", json!({"ms": "soon"}))).await.unwrap_err();
    assert!(err.to_string().contains("payload of `sleep`"), "{err}");
    assert_eq!(store.stats().await.unwrap()[&JobState::Available], 0);
}

#[tokio::test]
async fn shutdown_releases_unfinished_jobs_at_once() {
    let (store, _dir) = store().await;
    let reg = registry();
    let id = enqueue_checked(&store, &reg, NewJob::new("sleep", json!({"ms": 30_000}))).await.unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = tokio::spawn(run_consumer(
        store.clone(),
        reg,
        config(Duration::from_secs(15)),
        stop_rx,
        Duration::from_millis(200),
    ));
    wait_for_state(&store, id, JobState::Running, Duration::from_secs(5)).await;
    let started = Instant::now();
    stop_tx.send_replace(true);
    let stats = consumer.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(stats.released.load(Ordering::Relaxed), 1);
    // Available again now, not after the 15 s lease, and the attempt was not
    // counted.
    let info = store.get(id).await.unwrap();
    assert_eq!((info.state, info.attempt), (JobState::Available, 0), "{info:?}");
}

/// A running job sees its cancellation within about a second, long before
/// its next heartbeat (a third of a 60 s lease).
#[tokio::test]
async fn a_running_job_sees_its_cancellation_before_its_next_heartbeat() {
    let (store, _dir) = store().await;
    let reg = registry();
    let id = enqueue_checked(&store, &reg, NewJob::new("until_cancelled", json!(null))).await.unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = tokio::spawn(run_consumer(
        store.clone(),
        reg,
        config(Duration::from_secs(60)),
        stop_rx,
        Duration::from_secs(5),
    ));
    wait_for_state(&store, id, JobState::Running, Duration::from_secs(5)).await;
    let asked = Instant::now();
    assert_eq!(store.cancel(id).await.unwrap(), JobState::Running);
    wait_for_state(&store, id, JobState::Cancelled, Duration::from_secs(10)).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "seen after {:?}", asked.elapsed());
    stop_tx.send_replace(true);
    consumer.await.unwrap();
}

/// Inside a server, job handlers run where request handlers run: an async job
/// that blocks its thread by mistake is isolated like a request, and `/fast`
/// keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_inside_the_server_are_isolated_and_stop_with_it() {
    let (store, _dir) = store().await;
    let registry = registry().register("blocks", |ms: u64, _ctx: JobContext| async move {
        std::thread::sleep(Duration::from_millis(ms)); // the bug, on purpose
        Ok(())
    });
    let jobs = fastlane_jobs::Jobs::new(store.clone(), registry);
    let app = axum::Router::new().route("/fast", axum::routing::get(|| async { "ok" }));
    let config = fastlane::Config { port: 0, expose_internal: true, ..fastlane::Config::default() };
    let server =
        fastlane::Server::new(app).config(config).jobs(jobs.consumer()).bind().await.unwrap().spawn();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(jobs.enqueue(NewJob::new("blocks", json!(2000))).await.unwrap());
    }
    // Wait until all four block their threads.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().await.unwrap()[&JobState::Running] < 4 {
        assert!(Instant::now() < deadline, "the jobs did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        let started = Instant::now();
        let response = fastlane::client::get(&server.url("/fast")).await.unwrap();
        assert_eq!(response.text(), "ok");
        assert!(started.elapsed() < Duration::from_secs(1), "/fast took {:?}", started.elapsed());
    }
    // The stall is reported against the job type.
    let stalls: serde_json::Value =
        fastlane::client::get(&server.url("/_fastlane/stalls")).await.unwrap().json().unwrap();
    let row = stalls.as_array().unwrap().iter().find(|r| r["route"] == "blocks").cloned();
    let row = row.unwrap_or_else(|| panic!("no stall row for the job: {stalls}"));
    assert_eq!(row["method"], "JOB", "{row}");
    for id in &ids {
        wait_for_state(&store, *id, JobState::Succeeded, Duration::from_secs(15)).await;
    }
    // The consumer's counts are in the server's /metrics.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = fastlane::client::get(&server.url("/metrics")).await.unwrap().text();
        if metrics.contains("fastlane_jobs_succeeded_total 4") {
            assert!(metrics.contains("fastlane_jobs_running 0"), "{metrics}");
            assert!(metrics.contains("# HELP fastlane_jobs_fenced"), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The consumer stops with the server: a job enqueued after is left alone.
    assert!(server.shutdown().await.unwrap().is_clean());
    let after = jobs.enqueue(NewJob::new("noop", json!(null))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.get(after).await.unwrap().state, JobState::Available);
}

/// Each queue has its own limit: a slow queue at its limit does not hold
/// back another.
#[tokio::test]
async fn each_queue_runs_at_most_its_own_limit() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        max: AtomicUsize,
    }
    let (store, _dir) = store().await;
    let gauges: Arc<[Gauge; 2]> = Arc::default();
    let seen = gauges.clone();
    let registry = Registry::new().register("track", move |queue: usize, _ctx: JobContext| {
        let gauges = seen.clone();
        async move {
            let now = gauges[queue].now.fetch_add(1, Ordering::SeqCst) + 1;
            gauges[queue].max.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            gauges[queue].now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let mut jobs = Vec::new();
    for i in 0..12 {
        jobs.push(NewJob::new("track", json!(0)).queue("narrow"));
        jobs.push(NewJob::new("track", json!(1)).queue("wide").priority(i));
    }
    let ids = store.enqueue_many(jobs).await.unwrap();
    let config = ConsumerConfig {
        queues: vec![("narrow".into(), 1), ("wide".into(), 3)],
        ..config(Duration::from_secs(15))
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer =
        tokio::spawn(run_consumer(store.clone(), registry, config, stop_rx, Duration::from_secs(5)));
    for id in &ids {
        wait_for_state(&store, *id, JobState::Succeeded, Duration::from_secs(20)).await;
    }
    stop_tx.send_replace(true);
    consumer.await.unwrap();
    assert_eq!(gauges[0].max.load(Ordering::SeqCst), 1, "narrow ran more than 1 at once");
    assert_eq!(gauges[1].max.load(Ordering::SeqCst), 3, "wide did not use its 3 slots");
}

/// A consumer prunes what it ran once it is past its retention, counts what
/// it deleted and measures the store; enqueues are not held up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_prunes_finished_jobs_past_their_retention() {
    let (store, _dir) = store().await;
    let jobs: Vec<NewJob> = (0..3_000).map(|_| NewJob::new("noop", json!(null))).collect();
    store.enqueue_many(jobs).await.unwrap();
    let retention = fastlane_jobs::Retention {
        succeeded: Duration::ZERO,
        batch: 200,
        interval: Duration::from_millis(100),
        ..fastlane_jobs::Retention::default()
    };
    let config = ConsumerConfig { retention: Some(retention), ..ConsumerConfig::default() };
    let stats = std::sync::Arc::new(fastlane_jobs::ConsumerStats::default());
    let (stop, shutdown) = watch::channel(false);
    let consumer = tokio::spawn(fastlane_jobs::run_consumer_with_stats(
        store.clone(),
        registry(),
        config,
        shutdown,
        Duration::from_secs(5),
        stats.clone(),
    ));
    // Meanwhile, enqueues answer at once (batches are short transactions).
    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let started = Instant::now();
        store.enqueue(NewJob::new("noop", json!(null))).await.unwrap();
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.pruned.load(Ordering::Relaxed) < 3_100 || stats.store_jobs.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "pruned {}", stats.pruned.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send_replace(true);
    consumer.await.unwrap();
    let sizes = store.table_sizes().await.unwrap();
    assert_eq!((sizes.jobs, sizes.attempts), (0, 0), "{sizes:?}");
    assert!(stats.store_bytes.load(Ordering::Relaxed) > 0);
    assert!(slowest < Duration::from_secs(1), "an enqueue waited {slowest:?} while the pruner ran");
}

/// What handlers return is stored and awaited: an async handler's struct,
/// a blocking one's number; a dead job says why it has no result; a wait
/// that ends first says where the job is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_stored_and_awaited() {
    #[derive(serde::Serialize, Deserialize, Debug, PartialEq)]
    struct Thumb {
        url: String,
        bytes: u32,
    }
    let (store, _dir) = store().await;
    let registry = registry()
        .register("thumb", |n: u32, _ctx: JobContext| async move {
            Ok(Thumb { url: format!("/thumbs/{n}.png"), bytes: n * 100 })
        })
        .register_blocking("square", |n: u64, _ctx: JobContext| Ok(n * n));
    let jobs = fastlane_jobs::Jobs::new(store.clone(), registry.clone());
    let (stop, shutdown) = watch::channel(false);
    let consumer = tokio::spawn(run_consumer(
        store.clone(),
        registry,
        ConsumerConfig::default(),
        shutdown,
        Duration::from_secs(5),
    ));
    let wait = Duration::from_secs(10);
    let thumb = jobs.enqueue(NewJob::new("thumb", json!(7))).await.unwrap();
    let square = jobs.enqueue(NewJob::new("square", json!(12))).await.unwrap();
    let dead = jobs.enqueue(NewJob::new("fail", json!({"times": 5})).max_attempts(1)).await.unwrap();
    let slow = jobs.enqueue(NewJob::new("sleep", json!({"ms": 3000}))).await.unwrap();
    assert_eq!(
        jobs.result::<Thumb>(thumb, wait).await.unwrap(),
        Thumb { url: "/thumbs/7.png".into(), bytes: 700 }
    );
    assert_eq!(jobs.result::<u64>(square, wait).await.unwrap(), 144);
    match jobs.result::<serde_json::Value>(dead, wait).await {
        Err(Error::Unsuccessful { state: JobState::Dead, error: Some(error), .. }) => {
            assert!(error.contains("failing attempt 1"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    match jobs.result::<()>(slow, Duration::from_millis(300)).await {
        Err(err @ Error::NotFinished { .. }) => {
            assert!(err.to_string().contains("had not finished after 0.3 s"), "{err}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // A result of the wrong type is an error naming the job.
    let err = jobs.result::<Thumb>(square, wait).await.unwrap_err().to_string();
    assert!(err.contains(&format!("the result of job {square} does not fit")), "{err}");
    stop.send_replace(true);
    consumer.await.unwrap();
}
