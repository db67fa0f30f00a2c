//! Isolation of async handlers that block by mistake, over real sockets.

mod support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use fastlane::{client, Background, Config, IsolationConfig};
use futures_util::StreamExt;
use support::start;

/// The seeds' bug: a blocking sleep inside an `async fn`.
async fn blocks(axum::extract::Path(ms): axum::extract::Path<u64>) -> &'static str {
    std::thread::sleep(Duration::from_millis(ms));
    "slept"
}

/// A CPU-bound busy loop inside an `async fn`.
async fn spins(axum::extract::Path(ms): axum::extract::Path<u64>) -> &'static str {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
    "spun"
}

fn app() -> Router {
    Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route("/block/{ms}", get(blocks))
        .route("/spin/{ms}", get(spins))
        .route(
            "/stream/{ms}",
            get(|axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                let chunks = futures_util::stream::iter(0..2).map(move |i| {
                    std::thread::sleep(Duration::from_millis(ms));
                    Ok::<_, std::io::Error>(format!("chunk {i}\n"))
                });
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/background/{ms}",
            get(|bg: Background, axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                bg.spawn(async move { std::thread::sleep(Duration::from_millis(ms)) });
                "scheduled"
            }),
        )
}

fn exposed() -> Config {
    Config { expose_internal: true, ..Config::default() }
}

/// Times a GET of `/fast`.
async fn fast(server: &fastlane::SpawnedServer) -> Duration {
    let started = Instant::now();
    let response = client::get(&server.url("/fast")).await.unwrap();
    assert_eq!(response.text(), "ok");
    started.elapsed()
}

#[tokio::test]
async fn a_fast_route_answers_while_more_async_handlers_block_than_there_are_cores() {
    let server = start(app(), exposed()).await;
    let blockers: Vec<_> =
        (0..8).map(|_| tokio::spawn(client::get_owned(server.url("/block/3000")))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let took = fast(&server).await;
        assert!(took < Duration::from_secs(1), "/fast took {took:?} while 8 handlers blocked");
    }
    for b in blockers {
        assert_eq!(b.await.unwrap().unwrap().text(), "slept");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stall_is_reported_while_it_lasts_and_after_with_the_route() {
    let server = start(app(), exposed()).await;
    let blocker = tokio::spawn(client::get_owned(server.url("/block/1500")));
    tokio::time::sleep(Duration::from_millis(400)).await;

    let during: serde_json::Value =
        client::get(&server.url("/_fastlane/stalls")).await.unwrap().json().unwrap();
    let row = &during.as_array().unwrap()[0];
    assert_eq!(
        (row["method"].as_str(), row["route"].as_str()),
        (Some("GET"), Some("/block/{ms}")),
        "{during}"
    );
    assert_eq!(row["ongoing"], 1, "{during}");

    blocker.await.unwrap().unwrap();
    // The stall's end is recorded when the runner's poll returns, which can
    // be just after the client has read the response.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let after: serde_json::Value =
            client::get(&server.url("/_fastlane/stalls")).await.unwrap().json().unwrap();
        if after[0]["count"] == 1 || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let row = &after.as_array().unwrap()[0];
    assert_eq!((row["count"].as_u64(), row["ongoing"].as_u64()), (Some(1), Some(0)), "{after}");
    let worst = row["worst_ms"].as_f64().unwrap();
    assert!((1400.0..5000.0).contains(&worst), "{after}");

    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert!(
        metrics.contains(r#"fastlane_stall_duration_seconds_count{method="GET",route="/block/{ms}"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"fastlane_stall_duration_seconds_count{method="GET",route="/fast"}"#),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_blocking_stream_body_and_a_blocking_background_task_do_not_stall_fast() {
    let server = start(app(), exposed()).await;
    let stream = tokio::spawn(client::get_owned(server.url("/stream/1500")));
    for _ in 0..3 {
        assert_eq!(client::get(&server.url("/background/2000")).await.unwrap().text(), "scheduled");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let took = fast(&server).await;
        assert!(took < Duration::from_secs(1), "/fast took {took:?}");
    }
    assert_eq!(stream.await.unwrap().unwrap().text(), "chunk 0\nchunk 1\n");
    let stalls: serde_json::Value =
        client::get(&server.url("/_fastlane/stalls")).await.unwrap().json().unwrap();
    let routes: Vec<_> =
        stalls.as_array().unwrap().iter().map(|r| r["route"].as_str().unwrap().to_owned()).collect();
    assert!(routes.contains(&"/stream/{ms}".to_owned()), "{stalls}");
    assert!(routes.contains(&"/background/{ms}".to_owned()), "{stalls}");
    server.shutdown().await.unwrap();
}

/// Runner threads of this process whose nice value is above 0 (Linux).
fn demoted_runners() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "fastlane-runner")
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        // Field 19 (nice), counted after the command name's closing paren.
        .filter_map(|stat| stat.rsplit(')').next()?.split_whitespace().nth(16)?.parse::<i32>().ok())
        .filter(|nice| *nice > 0)
        .count()
}

#[tokio::test]
async fn cpu_hogs_in_async_handlers_do_not_starve_a_fast_route() {
    let server = start(app(), exposed()).await;
    let hogs: Vec<_> = (0..4).map(|_| tokio::spawn(client::get_owned(server.url("/spin/2000")))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let took = fast(&server).await;
        assert!(took < Duration::from_secs(1), "/fast took {took:?} beside 4 CPU hogs");
    }
    for h in hogs {
        assert_eq!(h.await.unwrap().unwrap().text(), "spun");
    }
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert!(!metrics.contains("fastlane_isolation_demoted_total 0"), "no hog was demoted:\n{metrics}");
    // Once their polls return, the demoted threads retire: no runner of
    // this process is left at the hogs' priority.
    let deadline = Instant::now() + Duration::from_secs(5);
    while demoted_runners() > 0 {
        assert!(Instant::now() < deadline, "{} runner threads still demoted", demoted_runners());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn at_the_thread_cap_only_the_stalling_route_gets_503() {
    let isolation = IsolationConfig { runners: 2, max_threads: 4, ..IsolationConfig::default() };
    let server = start(app(), Config { isolation, ..exposed() }).await;
    // Two stuck handlers fill the two threads allowed beyond the runners.
    let blockers: Vec<_> =
        (0..2).map(|_| tokio::spawn(client::get_owned(server.url("/block/2500")))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let refused = client::get(&server.url("/block/10")).await.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(refused.headers.contains_key("retry-after"));
    let body: serde_json::Value = refused.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("GET /block/{ms} is stalling"), "{body}");
    // Other routes go on.
    for _ in 0..3 {
        assert!(fast(&server).await < Duration::from_secs(1));
    }
    for b in blockers {
        assert_eq!(b.await.unwrap().unwrap().status, 200);
    }
    // Once the stalls end, the route is served again.
    assert_eq!(client::get(&server.url("/block/10")).await.unwrap().status, 200);
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("fastlane_isolation_rejected_total 1"), "{metrics}");
    assert!(metrics.contains("fastlane_isolation_max_threads 4"), "{metrics}");
    // The current count of runner threads is there too.
    assert!(metrics.lines().any(|l| l.starts_with("fastlane_isolation_threads ")), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_isolation_a_blocking_handler_stalls_its_thread_as_in_axum() {
    // The control, which shows that the tests above would fail without the
    // executor: the server runs on its own one-worker runtime (as axum on a
    // one-core machine), the client on the test's runtime.
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let isolation = IsolationConfig { enabled: false, ..IsolationConfig::default() };
            let server = start(app(), Config { isolation, ..Config::default() }).await;
            tx.send(server.url("")).unwrap();
            let _ = stop_rx.await;
            server.shutdown().await.unwrap();
        });
    });
    let base = rx.recv().unwrap();
    let blocker = tokio::spawn(client::get_owned(format!("{base}/block/1500")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(client::get(&format!("{base}/fast")).await.unwrap().text(), "ok");
    let took = started.elapsed();
    blocker.await.unwrap().unwrap();
    stop_tx.send(()).unwrap();
    server_thread.join().unwrap();
    assert!(took > Duration::from_millis(800), "/fast took only {took:?} without isolation");
}
