//! The blocking and CPU lanes over real sockets.

mod support;

use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use fastlane::{client, Config, LaneConfig, LaneError};
use support::start;

#[derive(Clone)]
struct AppState {
    greeting: &'static str,
}

#[derive(serde::Deserialize)]
struct Params {
    times: usize,
}

#[derive(serde::Deserialize)]
struct Payload {
    name: String,
}

fn greet(
    State(state): State<AppState>,
    Path(id): Path<u32>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    axum::Json(payload): axum::Json<Payload>,
) -> String {
    let agent = headers.get("host").map_or("?", |v| v.to_str().unwrap_or("?"));
    let thread = std::thread::current().name().unwrap_or("").to_owned();
    format!("{} {}#{id} x{} via {thread} ({})", state.greeting, payload.name, params.times, !agent.is_empty())
}

#[tokio::test]
async fn sync_handlers_take_extractors_and_run_on_the_blocking_lane() {
    let app = Router::new()
        .route("/greet/{id}", post(fastlane::sync(greet)))
        .with_state(AppState { greeting: "hello" });
    let server = start(app, Config::default()).await;
    let response = client::post_json(&server.url("/greet/7?times=2"), &serde_json::json!({"name": "ada"}))
        .await
        .unwrap();
    assert_eq!(response.text(), "hello ada#7 x2 via fastlane-blocking (true)");
    // An extractor's rejection is answered before the lane is involved.
    let response = client::post_json(&server.url("/greet/7?times=x"), &serde_json::json!({"name": "ada"}))
        .await
        .unwrap();
    assert_eq!(response.status, 400);
    server.shutdown().await.unwrap();
}

/// The calling thread's nice value.
fn my_nice() -> i32 {
    let tid = rustix::thread::gettid();
    rustix::process::getpriority_process(Some(tid)).expect("a thread's own priority")
}

#[tokio::test]
async fn cpu_work_runs_on_low_priority_threads() {
    let app = Router::new()
        .route(
            "/cpu",
            get(fastlane::cpu(|| format!("{} {}", std::thread::current().name().unwrap_or(""), my_nice()))),
        )
        .route("/compute", get(|| async { fastlane::compute(my_nice).await.map(|n| n.to_string()) }));
    let lanes = LaneConfig { cpu_nice: 7, ..LaneConfig::default() };
    let server = start(app, Config { lanes, ..Config::default() }).await;
    let base = my_nice();
    let expected = (base + 7).min(19);
    assert_eq!(client::get(&server.url("/cpu")).await.unwrap().text(), format!("fastlane-cpu {expected}"));
    assert_eq!(client::get(&server.url("/compute")).await.unwrap().text(), expected.to_string());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_lane_answers_503_at_once_and_recovers() {
    let app = Router::new()
        .route("/hold", get(fastlane::sync(|| std::thread::sleep(Duration::from_millis(1500)))))
        .route("/offload", get(|| async { fastlane::blocking(|| "ran").await }))
        .route("/fast", get(|| async { "ok" }));
    let lanes = LaneConfig { blocking_threads: 1, blocking_queue: 1, ..LaneConfig::default() };
    let server = start(app, Config { lanes, ..Config::default() }).await;

    // One request runs, one waits in the queue: the lane is full.
    let hold1 = tokio::spawn(client::get_owned(server.url("/hold")));
    let hold2 = tokio::spawn(client::get_owned(server.url("/hold")));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let refused = client::get(&server.url("/hold")).await.unwrap();
    assert_eq!(refused.status, 503);
    assert!(started.elapsed() < Duration::from_millis(500), "503 took {:?}", started.elapsed());
    assert_eq!(refused.headers.get("retry-after").unwrap(), "1");
    let body: serde_json::Value = refused.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("blocking lane is full"), "{body}");
    // `blocking()` from an async handler is refused the same way.
    assert_eq!(client::get(&server.url("/offload")).await.unwrap().status, 503);
    // Other routes are unaffected.
    assert_eq!(client::get(&server.url("/fast")).await.unwrap().status, 200);

    assert_eq!(hold1.await.unwrap().unwrap().status, 200);
    assert_eq!(hold2.await.unwrap().unwrap().status, 200);
    // Room again.
    assert_eq!(client::get(&server.url("/offload")).await.unwrap().text(), "ran");
    let metrics = server.handle().metrics();
    assert!(metrics.contains(r#"fastlane_lane_rejected_total{lane="blocking"} 2"#), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn lane_errors_are_values_a_handler_can_inspect() {
    let lanes =
        fastlane::Lanes::new(LaneConfig { blocking_threads: 1, blocking_queue: 0, ..LaneConfig::default() });
    let err: LaneError = lanes.blocking(|| -> u8 { panic!("oops") }).await.unwrap_err();
    assert!(err.is_panic() && !err.is_full());
    assert_eq!(err.panic_message(), Some("oops"));
    assert_eq!(err.lane(), "blocking");
    // The thread survived the panic.
    assert_eq!(lanes.blocking(|| 1).await.unwrap(), 1);
}

#[tokio::test]
async fn four_sync_sleepers_do_not_delay_a_fast_route() {
    let app = Router::new()
        .route("/sleep", get(fastlane::sync(|| std::thread::sleep(Duration::from_secs(3)))))
        .route("/fast", get(|| async { "ok" }));
    let server = start(app, Config::default()).await;
    let sleepers: Vec<_> = (0..4).map(|_| tokio::spawn(client::get_owned(server.url("/sleep")))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(client::get(&server.url("/fast")).await.unwrap().text(), "ok");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let started = Instant::now();
    for sleeper in sleepers {
        assert_eq!(sleeper.await.unwrap().unwrap().status, 200);
    }
    // They ran side by side: all four done about 3 s after they started.
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    server.shutdown().await.unwrap();
}
