//! The demo's durable jobs over real sockets: `POST /jobs/{name}` enqueues,
//! the worker inside the server runs the job, `GET /jobs/{id}` shows its
//! state, attempts and progress; a restart loses nothing.

mod support;

use rustix::process::Signal;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use support::Demo;

fn post(url: &str, body: &str) -> fastlane::client::Response {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let body = Some(("application/json", Bytes::from(body.to_owned())));
    rt.block_on(fastlane::client::request(http::Method::POST, url, body)).expect("request")
}

fn job(demo: &Demo, id: i64) -> Value {
    let response = support::get(&demo.url(&format!("/jobs/{id}")));
    assert_eq!(response.status, 200, "{}", response.text());
    response.json().unwrap()
}

/// Polls the job until `done` says so; panics with the last view after `limit`.
fn wait_for_job(demo: &Demo, id: i64, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let info = job(demo, id);
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "job {id} after {limit:?}: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn enqueue(demo: &Demo, name: &str, payload: &str) -> i64 {
    let response = post(&demo.url(&format!("/jobs/{name}")), payload);
    assert_eq!(response.status, 201, "{}", response.text());
    let body: Value = response.json().unwrap();
    assert_eq!(body["url"], format!("/jobs/{}", body["id"]));
    body["id"].as_i64().expect("an id")
}

#[test]
fn the_demo_enqueues_jobs_runs_them_inside_the_server_and_shows_progress() {
    let demo = Demo::start(&[]);
    let id = enqueue(&demo, "sleep", r#"{"ms": 3000}"#);
    // Running in the server's own worker, reporting progress as it goes.
    let running = wait_for_job(&demo, id, Duration::from_secs(10), |j| {
        j["state"] == "running" && j["progress"].as_u64().unwrap_or(0) >= 10
    });
    assert!(running["progress_message"].as_str().unwrap().starts_with("slept "), "{running}");
    assert!(running["attempts"][0]["consumer"].as_str().unwrap().starts_with("consumer-"), "{running}");
    let done = wait_for_job(&demo, id, Duration::from_secs(15), |j| j["state"] == "succeeded");
    assert_eq!(done["attempts"][0]["outcome"], "succeeded", "{done}");
    // What the handler returned is stored with the job.
    assert_eq!(done["result"], serde_json::json!({"slept_ms": 3000}), "{done}");
    assert_eq!(running["result"], Value::Null, "{running}");

    // A failing job retries with backoff and then succeeds; every attempt is kept.
    let flaky = enqueue(&demo, "fail", r#"{"times": 1}"#);
    let done = wait_for_job(&demo, flaky, Duration::from_secs(20), |j| j["state"] == "succeeded");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 2, "{done}");
    assert!(done["attempts"][0]["error"].as_str().unwrap().contains("failing on purpose"), "{done}");
    assert_eq!(done["result"], serde_json::json!({"succeeded_at_attempt": 2}), "{done}");

    // Bad input: a JSON error naming the problem, and nothing stored.
    let cases = [
        ("/jobs/nope", "null", 422, "unknown job `nope`"),
        ("/jobs/sleep", r#"{"ms": "soon"}"#, 422, "payload of `sleep`"),
        ("/jobs/sleep", "{", 422, "the payload is not JSON"),
        ("/jobs/noop?priority=high", "", 422, "priority"),
    ];
    for (path, body, status, needle) in cases {
        let response = post(&demo.url(path), body);
        assert_eq!(response.status, status, "{path} {body}: {}", response.text());
        let error: Value = response.json().expect("a JSON error");
        assert!(error.to_string().contains(needle), "{path}: {error}");
    }
    let response = support::get(&demo.url("/jobs/abc"));
    assert_eq!(
        (response.status.as_u16(), response.json::<Value>().unwrap()["field"].clone()),
        (422, "id".into())
    );
    let response = support::get(&demo.url("/jobs/999999"));
    assert_eq!(response.status, 404, "{}", response.text());
    assert!(response.text().contains("no job with id 999999"));
}

#[test]
fn a_job_cut_by_shutdown_is_given_back_at_once_and_finishes_after_a_restart() {
    let db = support::temp_jobs_db();
    let url = format!("sqlite://{}", db.display());
    let env = [("FASTLANE_JOBS_URL", url.as_str())];
    let demo = Demo::start_with_env(&["--grace-period", "0.5"], &env);
    let id = enqueue(&demo, "sleep", r#"{"ms": 4000}"#);
    wait_for_job(&demo, id, Duration::from_secs(10), |j| j["state"] == "running");
    demo.signal(Signal::TERM);
    let (_code, log) = demo.wait(Duration::from_secs(15));
    assert!(log.iter().any(|l| l.contains("job consumer stopped") && l.contains("released=1")), "{log:#?}");

    // Given back at once, not left `running` until its 15 s lease expires.
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["jobs", "show", "--url", &url, &id.to_string()])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&show.stdout).expect("jobs show prints JSON");
    assert_eq!(info["state"], "available", "released, not left running: {info}");
    // The next server runs it.
    let again = Demo::start_with_env(&[], &env);
    let done = wait_for_job(&again, id, Duration::from_secs(20), |j| j["state"] == "succeeded");
    assert_eq!(done["attempt"], 1, "a released attempt does not count: {done}");
    drop(again);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

#[test]
fn a_job_carries_the_id_of_the_request_that_enqueued_it_into_its_attempts_logs() {
    let demo = Demo::start(&[]);
    let response = post(&demo.url("/jobs/fail"), r#"{"times": 1}"#);
    assert_eq!(response.status, 201, "{}", response.text());
    let request_id = response.headers["x-request-id"].to_str().unwrap().to_owned();
    let id = response.json::<Value>().unwrap()["id"].as_i64().unwrap();
    // Stored with the job, shown by GET /jobs/{id} (and `fastlane jobs show`).
    assert_eq!(job(&demo, id)["request_id"], request_id.as_str());
    // The attempt's log line names the job and the request.
    let needle = format!("job {id} (fail) attempt 1 of");
    assert!(demo.wait_for_log(&needle, Duration::from_secs(10)).is_some(), "no line for the failed attempt");
    let line = demo.lines_with(&needle).remove(0);
    assert!(line.contains(&format!("request_id={request_id}")), "{line}");
}

/// `/metrics` reports the job store's size (measured by the consumer's
/// pruner when it starts, then every minute) and what it pruned.
#[test]
fn metrics_report_the_job_stores_size() {
    let demo = Demo::start(&[]);
    let id = enqueue(&demo, "noop", "{}");
    wait_for_job(&demo, id, Duration::from_secs(10), |j| j["state"] == "succeeded");
    let value = |metrics: &str, name: &str| -> Option<f64> {
        metrics.lines().find(|l| l.starts_with(name) && !l.starts_with('#'))?.rsplit(' ').next()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = support::get(&demo.url("/metrics")).text();
        let bytes = value(&metrics, "fastlane_jobs_store_bytes");
        if bytes.is_some_and(|b| b > 0.0) {
            assert!(value(&metrics, "fastlane_jobs_store_jobs_rows").is_some(), "{metrics}");
            assert!(value(&metrics, "fastlane_jobs_store_attempts_rows").is_some(), "{metrics}");
            assert_eq!(value(&metrics, "fastlane_jobs_pruned_total"), Some(0.0), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "no store size in /metrics:\n{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
