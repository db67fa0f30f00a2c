//! The seed articles' scenarios against the demo app, over real sockets.

use std::time::{Duration, Instant};

use fastlane::{client, Config, LaneConfig, Server, SpawnedServer};
use fastlane_cli::demo;

async fn start(config: Config) -> SpawnedServer {
    let config = Config { port: 0, expose_internal: true, ..config };
    Server::new(demo::app()).config(config).bind().await.expect("bind 127.0.0.1:0").spawn()
}

#[tokio::test]
async fn test1_answers_at_once_while_four_sync_handlers_sleep() {
    let server = start(Config::default()).await;
    let sleepers: Vec<_> =
        (0..4).map(|_| tokio::spawn(client::get_owned(server.url("/slow/sync?secs=5")))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let response = client::get(&server.url("/test1")).await.unwrap();
    assert_eq!(response.text(), "test1");
    assert!(started.elapsed() < Duration::from_secs(1), "/test1 took {:?}", started.elapsed());
    for sleeper in sleepers {
        assert_eq!(sleeper.await.unwrap().unwrap().status, 200);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn test1_answers_at_once_while_four_async_handlers_block_in_test2() {
    // The seeds' bug itself: `/test2` is an async fn calling
    // std::thread::sleep. Isolation keeps /test1 fast anyway.
    let server = start(Config::default()).await;
    let blockers: Vec<_> =
        (0..4).map(|_| tokio::spawn(client::get_owned(server.url("/test2?secs=5")))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(client::get(&server.url("/test1")).await.unwrap().text(), "test1");
    assert!(started.elapsed() < Duration::from_secs(1), "/test1 took {:?}", started.elapsed());
    for blocker in blockers {
        assert_eq!(blocker.await.unwrap().unwrap().text(), "test2");
    }
    // Each stall's end is recorded when its runner's poll returns, which can
    // be just after the client has read the response.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stalls = loop {
        let stalls: serde_json::Value =
            client::get(&server.url("/_fastlane/stalls")).await.unwrap().json().unwrap();
        if stalls[0]["count"] == 4 || Instant::now() > deadline {
            break stalls;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stalls[0]["route"], "/test2", "{stalls}");
    assert_eq!(stalls[0]["count"], 4, "{stalls}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_sync_requests_overlap() {
    let server = start(Config::default()).await;
    let probe = fastlane_cli::probe::ProbeConfig {
        urls: vec![server.url("/slow/sync?secs=2")],
        total: 2,
        concurrency: 2,
        timeout: Duration::from_secs(30),
        progress: false,
    };
    let result = fastlane_cli::probe::run(&probe).await;
    assert!(result.samples.iter().all(|s| s.outcome == Ok(200)), "{result:?}");
    assert_eq!(result.max_overlap(), 2, "{}", result.table());
    assert!(result.wall < Duration::from_millis(3500), "took {:?}", result.wall);
    assert!(result.verdict().starts_with("overlapped"));
    assert_eq!(result.svg().matches("<rect x=").count(), 2 + 3, "two bars and the legend's three keys");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn profile_answers_before_its_background_computation_ends_and_it_runs() {
    let server = start(Config::default()).await;
    let started = Instant::now();
    let response =
        client::post_json(&server.url("/profile"), &serde_json::json!({"name": "ada", "work_ms": 1500}))
            .await
            .unwrap();
    assert_eq!((response.status.as_u16(), response.text().as_str()), (200, "{}"));
    assert!(started.elapsed() < Duration::from_millis(1000), "answered after {:?}", started.elapsed());
    // The computation is still going on when the answer arrives...
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("fastlane_background_tasks_pending 1"), "{metrics}");
    // ...and it completes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
        if metrics.contains(r#"fastlane_background_tasks_total{lane="cpu",outcome="ok"} 1"#) {
            break;
        }
        assert!(Instant::now() < deadline, "the background computation never finished:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1400));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_blocking_lane_answers_503_fast() {
    let lanes = LaneConfig { blocking_threads: 2, blocking_queue: 0, ..LaneConfig::default() };
    let server = start(Config { lanes, ..Config::default() }).await;
    let busy: Vec<_> =
        (0..2).map(|_| tokio::spawn(client::get_owned(server.url("/slow/sync?secs=2")))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let response = client::get(&server.url("/slow/sync?secs=2")).await.unwrap();
    assert_eq!(response.status, 503);
    assert!(response.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    assert_eq!(client::get(&server.url("/fast")).await.unwrap().text(), "ok");
    for b in busy {
        assert_eq!(b.await.unwrap().unwrap().status, 200);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_a_json_error_naming_the_field() {
    let server = start(Config::default()).await;
    let cases = [
        ("/test2?secs=abc", 422, Some("secs")),
        ("/test2?secs=61", 422, Some("secs")),
        ("/test2?secs=-1", 422, Some("secs")),
        ("/slow/sync?secs=nope", 422, Some("secs")),
        ("/cpu/offload?ms=-5", 422, Some("ms")),
        ("/cpu/async-blocking?ms=999999", 422, Some("ms")),
        ("/stream/blocking?chunks=0", 422, Some("chunks")),
        ("/?action=9", 422, Some("action")),
        ("/?action=x", 422, Some("action")),
    ];
    for (path, status, field) in cases {
        let response = client::get(&server.url(path)).await.unwrap();
        assert_eq!(response.status, status, "{path}: {}", response.text());
        let body: serde_json::Value = response.json().unwrap_or_else(|e| panic!("{path}: not JSON ({e})"));
        assert_eq!(body["field"].as_str(), field, "{path}: {body}");
        assert!(!body["error"].as_str().unwrap().is_empty());
    }
    let json_cases = [
        (serde_json::json!({"work_ms": 5}), 422, Some("name")),
        (serde_json::json!({"name": 5}), 422, Some("name")),
        (serde_json::json!({"name": "a", "work_ms": "soon"}), 422, Some("work_ms")),
        (serde_json::json!({"name": "a", "work_ms": 3_600_000}), 422, Some("work_ms")),
    ];
    for (body, status, field) in json_cases {
        let response = client::post_json(&server.url("/profile"), &body).await.unwrap();
        assert_eq!(response.status, status, "{body}: {}", response.text());
        let json: serde_json::Value = response.json().unwrap();
        assert_eq!(json["field"].as_str(), field, "{body}: {json}");
    }
    let broken =
        client::request(http::Method::POST, &server.url("/profile"), Some(("application/json", "{".into())))
            .await
            .unwrap();
    assert_eq!(broken.status, 400);
    assert!(broken.json::<serde_json::Value>().is_ok());
    let no_type =
        client::request(http::Method::POST, &server.url("/profile"), Some(("text/plain", "{}".into())))
            .await
            .unwrap();
    assert_eq!(no_type.status, 415);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_demo_route_answers() {
    let server = start(Config::default()).await;
    for (path, expected) in [
        ("/fast", "ok"),
        ("/test1", "test1"),
        ("/test2?secs=0.1", "test2"),
        ("/ping?secs=0.1", "pong"),
        ("/slow/async-blocking?secs=0.1", "slept 0.100 s blocking the async lane"),
        ("/slow/sync?secs=0.1", "slept 0.100 s on the blocking lane"),
        ("/slow/async?secs=0.1", "waited 0.100 s asynchronously"),
        ("/stream/blocking?chunks=3&secs=0.05", "chunk 0\nchunk 1\nchunk 2\n"),
        ("/?action=1&secs=0.1", "sync-blocking background task scheduled on the blocking lane (0.1 s)\n"),
        ("/?action=2&secs=0.1", "async background task that blocks scheduled (0.1 s)\n"),
        ("/?action=3&secs=0.1", "async background task that sleeps scheduled (0.1 s)\n"),
    ] {
        let response = client::get(&server.url(path)).await.unwrap();
        assert_eq!((response.status.as_u16(), response.text().as_str()), (200, expected), "{path}");
    }
    for path in ["/cpu/async-blocking?ms=50", "/cpu/offload?ms=50"] {
        let response = client::get(&server.url(path)).await.unwrap();
        assert!(response.text().starts_with("computed 50 ms"), "{path}: {}", response.text());
    }
    assert!(server.shutdown().await.unwrap().is_clean());
}
