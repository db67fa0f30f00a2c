//! `--workers N`: a supervisor and worker processes, with real signals.

mod support;

use rustix::process::Signal;

use std::time::{Duration, Instant};

use fastlane_cli::mixed::{self, MixedConfig};
use support::{get, send_signal, Demo};

/// Steady load: GET /fast at 50 requests/s (fresh connection each) for
/// `secs`, on a thread of its own; returns the failures.
fn steady_load(demo: &Demo, secs: f64) -> std::thread::JoinHandle<mixed::MixedResult> {
    let config = MixedConfig {
        fast_url: demo.url("/fast"),
        rate: 50.0,
        duration: Duration::from_secs_f64(secs),
        load_url: None,
        load_concurrency: 0,
        timeout: Duration::from_secs(10),
        honor_retry_after: false,
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(mixed::run(&config))
    })
}

fn worker_pid(demo: &Demo) -> (u64, u32) {
    let who: serde_json::Value = get(&demo.url("/_fastlane/worker")).json().unwrap();
    (who["worker"].as_u64().expect("answered by a worker"), who["pid"].as_u64().unwrap() as u32)
}

#[test]
fn sigkill_of_one_worker_fails_at_most_its_in_flight_requests_and_it_is_replaced() {
    let demo = Demo::start(&["--workers", "2"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    let load = steady_load(&demo, 5.0);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, pid) = worker_pid(&demo);
    assert_ne!(pid, demo.pid(), "the supervisor itself must not serve");
    let started_before = demo.count_log("worker started");
    send_signal(pid, Signal::KILL);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(2);
    while demo.count_log("worker started") == started_before {
        assert!(Instant::now() < deadline, "no replacement worker within 2 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let restored_in = killed.elapsed();
    let result = load.join().unwrap();
    assert!(result.fast.errors <= 3, "{} requests failed: {:?}", result.fast.errors, result.fast);
    assert!(result.fast.sent >= 240, "{:?}", result.fast);
    eprintln!(
        "replacement up {restored_in:?} after the SIGKILL; {} of {} failed",
        result.fast.errors, result.fast.sent
    );
    // /metrics says which worker answered, and the newest worker carries the
    // supervisor's restart count (scrapes land on either worker: ask a few times).
    let mut restarts_seen = false;
    for _ in 0..40 {
        let metrics = get(&demo.url("/metrics")).text();
        assert!(metrics.contains(r#"fastlane_http_requests_total{worker=""#), "no worker label:\n{metrics}");
        restarts_seen = metrics
            .lines()
            .any(|l| l.starts_with("fastlane_supervisor_worker_restarts{worker=") && l.ends_with(" 1"));
        if restarts_seen {
            break;
        }
    }
    assert!(restarts_seen, "no worker reported the restart");
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

#[test]
fn sighup_reloads_the_workers_without_failing_a_request() {
    let demo = Demo::start(&["--workers", "2"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    let (_, old_pid) = worker_pid(&demo);
    let load = steady_load(&demo, 5.0);
    std::thread::sleep(Duration::from_millis(1500));
    send_signal(demo.pid(), Signal::HUP);
    assert!(demo.wait_for_log("old worker drained and exited", Duration::from_secs(10)).is_some());
    let result = load.join().unwrap();
    assert_eq!(result.fast.errors, 0, "{:?}", result.fast);
    // The workers answering now are new processes.
    for _ in 0..6 {
        assert_ne!(worker_pid(&demo).1, old_pid);
    }
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

#[test]
fn a_background_task_blocking_longer_than_the_timeout_does_not_get_its_worker_killed() {
    // The seed article: gunicorn -t 10 killed the worker whose async
    // background task blocked for 15 s, and the task was lost. Same shape,
    // shorter: --timeout 2, a task that blocks its thread for 5 s.
    let demo = Demo::start(&["--workers", "2", "--timeout", "2"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    let response = get(&demo.url("/?action=2&secs=5"));
    assert_eq!(response.status, 200);
    assert!(
        demo.wait_for_log("action 2 done", Duration::from_secs(15)).is_some(),
        "the task did not complete"
    );
    assert_eq!(demo.count_log("worker hung"), 0);
    assert_eq!(demo.count_log("worker died"), 0);
    // The stall's end is logged right after the task's own last line.
    assert!(demo
        .wait_for_log("blocked its thread for 5.0 s in an async background task", Duration::from_secs(5))
        .is_some());
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

#[test]
fn sigterm_drains_every_worker_and_the_exit_code_reports_cuts() {
    let demo = Demo::start(&["--workers", "2", "--grace-period", "1"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    assert_eq!(get(&demo.url("/?action=1&secs=20")).status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let (code, log) = demo.wait_after_term();
    let log = log.join("\n");
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("shutdown cut background task GET / (blocking lane)"), "{log}");
}

#[test]
fn max_requests_recycles_workers_without_failing_requests() {
    let demo = Demo::start(&["--workers", "2", "--max-requests", "20", "--max-requests-jitter", "5"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    let load = steady_load(&demo, 3.0);
    let result = load.join().unwrap();
    assert_eq!(result.fast.errors, 0, "{:?}", result.fast);
    assert!(demo.count_log("max requests reached: recycling this worker") >= 1);
    assert!(demo.wait_for_log("worker exited (recycled)", Duration::from_secs(5)).is_some());
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

#[test]
fn a_worker_whose_runtime_hangs_is_replaced_after_its_running_work_is_logged() {
    let demo = Demo::start(&["--workers", "2", "--timeout", "2"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    // Both workers answer their heartbeats before the request: the one that
    // hangs must be the one that took it.
    assert!(demo.wait_for_count("worker ready", 2, Duration::from_secs(30)), "the workers never got ready");
    let url = demo.url("/debug/hang-runtime?secs=30");
    // The request hangs with its worker; don't wait for it.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), fastlane::client::get(&url)).await
        });
    });
    let started = demo.count_log("worker started");
    let hung = demo.wait_for_log("worker hung", Duration::from_secs(10));
    assert!(hung.is_some(), "the supervisor never saw the hung worker");
    let hung = demo.lines_with("worker hung");
    assert_eq!(hung.len(), 1, "{hung:?}");
    assert!(hung[0].contains("it was running: request GET /debug/hang-runtime"), "{}", hung[0]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while demo.count_log("worker started") == started {
        assert!(Instant::now() < deadline, "no replacement for the hung worker");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The other worker and the replacement serve.
    for _ in 0..4 {
        assert_eq!(get(&demo.url("/fast")).text(), "ok");
    }
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

/// The pid in the newest "worker started worker=ID pid=PID" log line.
fn started_pid(demo: &Demo, id: u32) -> Option<u32> {
    let needle = format!("worker started worker={id} pid=");
    let log = demo.log.lock().unwrap();
    let line = log.iter().rev().find(|l| l.contains(&needle))?;
    line.split(&needle).nth(1)?.split_whitespace().next()?.parse().ok()
}

#[test]
fn a_worker_that_keeps_dying_young_is_restarted_with_growing_delays() {
    let demo = Demo::start(&["--workers", "2"]);
    assert!(demo.wait_for_log("supervisor running", Duration::from_secs(10)).is_some());
    let mut delays = Vec::new();
    for _ in 0..3 {
        let pid = started_pid(&demo, 1).expect("worker 1 started");
        let before = demo.count_log("worker started worker=1 ");
        send_signal(pid, Signal::KILL);
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(10);
        while demo.count_log("worker started worker=1 ") == before {
            assert!(Instant::now() < deadline, "worker 1 was not restarted");
            std::thread::sleep(Duration::from_millis(5));
        }
        delays.push(killed.elapsed());
    }
    // 0.5 s, then 1 s, then 2 s (each restart died young: under 5 s).
    assert!(delays[0] >= Duration::from_millis(400) && delays[0] < Duration::from_millis(1500), "{delays:?}");
    assert!(delays[1] >= Duration::from_millis(900) && delays[1] < Duration::from_millis(2500), "{delays:?}");
    assert!(
        delays[2] >= Duration::from_millis(1900) && delays[2] < Duration::from_millis(4000),
        "{delays:?}"
    );
    // Worker 2 was never touched and served throughout.
    assert_eq!(get(&demo.url("/fast")).text(), "ok");
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

#[test]
fn during_a_graceful_drain_new_connections_are_refused_at_once() {
    use std::io::{Read, Write};
    let demo = Demo::start(&["--workers", "2"]);
    assert!(demo.wait_for_count("worker ready", 2, Duration::from_secs(10)));
    let url = demo.url("/slow/async?secs=3");
    let slow = std::thread::spawn(move || get(&url).status);
    std::thread::sleep(Duration::from_millis(300));
    let addr = demo.url("").trim_start_matches("http://").to_owned();
    demo.signal(Signal::TERM);
    assert!(demo.wait_for_log("supervisor shutting down", Duration::from_secs(5)).is_some());
    std::thread::sleep(Duration::from_millis(200));
    // The slow request is still draining; a new client learns at once that
    // nobody will serve it (refused, or reset if it got into the backlog).
    let started = Instant::now();
    let outcome = match std::net::TcpStream::connect(&addr) {
        Err(err) => format!("refused: {err}"),
        Ok(mut conn) => {
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = conn.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n");
            let mut buf = [0u8; 64];
            match conn.read(&mut buf) {
                Ok(0) => "closed".to_owned(),
                Ok(n) => panic!("served during the drain: {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(err) => format!("error: {err}"),
            }
        }
    };
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the new connection waited {took:?} ({outcome})");
    assert_eq!(slow.join().unwrap(), 200, "the request in flight finished its drain");
    let (code, _) = demo.wait(Duration::from_secs(20));
    assert_eq!(code, Some(0));
}
