//! The tokio ecosystem inside handlers that run on the watched executor.

mod support;

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use fastlane::{client, Config};
use support::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

tokio::task_local! {
    static REQUEST_TAG: &'static str;
}

async fn everything(upstream: String) -> String {
    let mut seen = Vec::new();
    // Timers.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let timed_out =
        tokio::time::timeout(Duration::from_millis(5), std::future::pending::<()>()).await.is_err();
    seen.push(format!("timeout:{timed_out}"));
    // Networking: a loopback echo.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        socket.read_exact(&mut buf).await.unwrap();
        socket.write_all(&buf).await.unwrap();
    });
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await.unwrap();
    echo.await.unwrap();
    seen.push(format!("net:{}", String::from_utf8_lossy(&reply)));
    // tokio::spawn and spawn_blocking.
    let spawned = tokio::spawn(async { 2 }).await.unwrap();
    let blocking = tokio::task::spawn_blocking(|| 3).await.unwrap();
    seen.push(format!("spawn:{}", spawned + blocking));
    // Task-locals.
    let tag = REQUEST_TAG.scope("tagged", async { REQUEST_TAG.get() }).await;
    seen.push(format!("task_local:{tag}"));
    // An HTTP client (hyper's, through fastlane::client) calling another server.
    let called = client::get(&upstream).await.unwrap().text();
    seen.push(format!("http:{called}"));
    // fastlane's own lanes.
    let lane = fastlane::blocking(|| std::thread::current().name().map(str::to_owned)).await.unwrap();
    seen.push(format!("lane:{}", lane.unwrap_or_default()));
    seen.join(" ")
}

#[tokio::test]
async fn tokio_time_net_spawn_and_task_locals_work_inside_handlers() {
    let upstream = start(Router::new().route("/up", get(|| async { "upstream" })), Config::default()).await;
    let url = upstream.url("/up");
    let server =
        start(Router::new().route("/", get(move || everything(url.clone()))), Config::default()).await;
    let response = client::get(&server.url("/")).await.unwrap();
    assert_eq!(
        response.text(),
        "timeout:true net:ping spawn:5 task_local:tagged http:upstream lane:fastlane-blocking",
    );
    server.shutdown().await.unwrap();
    upstream.shutdown().await.unwrap();
}

#[tokio::test]
async fn block_in_place_runs_in_place_and_a_long_one_is_an_isolated_stall() {
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(1000)));
                "ran in place"
            }),
        )
        .route("/fast", get(|| async { "ok" }));
    let server = start(app, Config { expose_internal: true, ..Config::default() }).await;
    let slow = tokio::spawn(client::get_owned(server.url("/")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    assert_eq!(client::get(&server.url("/fast")).await.unwrap().text(), "ok");
    assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
    assert_eq!(slow.await.unwrap().unwrap().text(), "ran in place");
    // The stall's end is recorded when the runner's poll returns, which can
    // be just after the client has read the response.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stalls = loop {
        let stalls = client::get(&server.url("/_fastlane/stalls")).await.unwrap().text();
        if stalls.contains(r#""route":"/","count":1"#) || std::time::Instant::now() > deadline {
            break stalls;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(stalls.contains(r#""route":"/","count":1"#), "{stalls}");
    server.shutdown().await.unwrap();
}
