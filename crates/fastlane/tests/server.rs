//! The server's built-in behaviour over real sockets: panics, timeouts,
//! limits, metrics (HTTP/2: tests/http2.rs).

mod support;

use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use fastlane::{client, Config, RouteTimeout};
use support::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn panics() -> &'static str {
    panic!("handler bug")
}

#[tokio::test]
async fn a_panicking_handler_gives_500_json_and_the_server_lives_on() {
    let app = Router::new()
        .route("/panic", get(panics))
        .route("/sync-panic", get(fastlane::sync(|| -> &'static str { panic!("sync bug") })))
        .route("/ok", get(|| async { "ok" }));
    let server = start(app, Config::default()).await;

    for path in ["/panic", "/sync-panic"] {
        let response = client::get(&server.url(path)).await.unwrap();
        assert_eq!(response.status, 500, "{path}");
        let body: serde_json::Value = response.json().unwrap();
        assert_eq!(body["status"], 500);
        assert!(body["error"].as_str().unwrap().contains("panicked"), "{body}");
        // The next request on the same server succeeds.
        let next = client::get(&server.url("/ok")).await.unwrap();
        assert_eq!((next.status.as_u16(), next.text().as_str()), (200, "ok"));
    }
    assert!(server.shutdown().await.unwrap().is_clean());
}

/// With `RUST_BACKTRACE=1` the panic hook writes a backtrace, which can
/// hold the thread past the stall threshold: the report must name the
/// panic, not tell the author to move a computation off the thread. Run in
/// a child process (this test binary again), since std reads
/// `RUST_BACKTRACE` once per process.
#[test]
fn a_panic_whose_backtrace_is_slow_is_reported_as_a_panic() {
    const CHILD: &str = "FASTLANE_TEST_PANIC_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return panic_child();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_whose_backtrace_is_slow_is_reported_as_a_panic",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("child status 500"), "{stdout}\n{stderr}");
    let stalls: Vec<&str> = stderr.lines().filter(|l| l.contains("fastlane::stall")).collect();
    // A 1 ms threshold and a backtrace of a test binary (its line tables
    // read on the first panic): the hook holds the thread past it.
    assert!(!stalls.is_empty(), "no stall was reported:\n{stderr}");
    for line in &stalls {
        assert!(line.contains("GET /panic panicked, and the panic hook held its thread"), "{line}");
        assert!(!line.contains("fastlane::compute") && !line.contains("fastlane::blocking"), "{line}");
    }
}

fn panic_child() {
    fastlane::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let app = Router::new().route("/panic", get(panics));
        let isolation = fastlane::IsolationConfig {
            stall_threshold: Duration::from_millis(1),
            ..fastlane::IsolationConfig::default()
        };
        let server = start(app, Config { isolation, ..Config::default() }).await;
        let response = client::get(&server.url("/panic")).await.unwrap();
        println!("child status {}", response.status.as_u16());
        // The stall's closing line comes when the runner is back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.shutdown().await.unwrap();
    });
}

#[tokio::test]
async fn a_slow_handler_gets_504_at_its_route_timeout() {
    let app = Router::new()
        .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(30)).await }))
        .route(
            "/patient",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                "done"
            })
            .layer(RouteTimeout::new(Duration::from_secs(10))),
        )
        .route(
            "/impatient",
            get(|| async { tokio::time::sleep(Duration::from_secs(30)).await })
                .layer(RouteTimeout::new(Duration::from_millis(100))),
        );
    let config = Config { request_timeout: Some(Duration::from_millis(400)), ..Config::default() };
    let server = start(app, config).await;

    let started = Instant::now();
    let response = client::get(&server.url("/slow")).await.unwrap();
    assert_eq!(response.status, 504);
    let body: serde_json::Value = response.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("0.4 s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A route's own, longer timeout wins over the server's.
    let response = client::get(&server.url("/patient")).await.unwrap();
    assert_eq!((response.status.as_u16(), response.text().as_str()), (200, "done"));

    // And a shorter one too.
    let started = Instant::now();
    assert_eq!(client::get(&server.url("/impatient")).await.unwrap().status, 504);
    assert!(started.elapsed() < Duration::from_millis(390), "{:?}", started.elapsed());
    assert!(server.shutdown().await.unwrap().is_clean());
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_json() {
    let app = Router::new().route("/echo", post(|body: String| async move { body.len().to_string() }));
    let config = Config { body_limit: 1024, ..Config::default() };
    let server = start(app, config).await;

    let small = client::request(
        http::Method::POST,
        &server.url("/echo"),
        Some(("text/plain", vec![b'a'; 1000].into())),
    )
    .await
    .unwrap();
    assert_eq!((small.status.as_u16(), small.text().as_str()), (200, "1000"));

    let large = client::request(
        http::Method::POST,
        &server.url("/echo"),
        Some(("text/plain", vec![b'a'; 5000].into())),
    )
    .await
    .unwrap();
    assert_eq!(large.status, 413);
    let body: serde_json::Value = large.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("limit is 1024 bytes"), "{body}");
    assert!(server.shutdown().await.unwrap().is_clean());
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = Router::new().route("/", get(|| async { "hi" }));
    let config = Config { header_read_timeout: Duration::from_millis(500), ..Config::default() };
    let server = start(app, config).await;

    let mut stream = tokio::net::TcpStream::connect(server.local_addr()).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap(); // no final CRLF
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server kept the slow client's connection open");
    // The timeout is measured on a clock that may be a tenth of a second
    // (one sweep of the coarse timer) behind.
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    // Other clients are served meanwhile and after.
    assert_eq!(client::get(&server.url("/")).await.unwrap().text(), "hi");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_are_served_only_when_exposed() {
    let app = Router::new().route("/users/{id}", get(|| async { "user" }));
    let hidden = start(app.clone(), Config::default()).await;
    assert_eq!(client::get(&hidden.url("/metrics")).await.unwrap().status, 404);
    hidden.shutdown().await.unwrap();

    let server = start(app, Config { expose_internal: true, ..Config::default() }).await;
    for id in 0..3 {
        assert_eq!(client::get(&server.url(&format!("/users/{id}"))).await.unwrap().status, 200);
    }
    client::get(&server.url("/nope")).await.unwrap();
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    // Labelled by the route pattern, not the raw path.
    assert!(
        metrics.contains(r#"fastlane_http_requests_total{method="GET",route="/users/{id}",status="200"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"route="<unmatched>",status="404""#), "{metrics}");
    assert!(metrics.contains("fastlane_http_request_duration_seconds_bucket"), "{metrics}");
    for lane in ["blocking", "cpu"] {
        for name in ["lane_busy", "lane_queued", "lane_rejected_total", "lane_max_threads"] {
            let needle = format!(r#"fastlane_{name}{{lane="{lane}"}}"#);
            assert!(metrics.contains(&needle), "missing {needle}");
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_in_flight_gauge_counts_requests_until_they_are_answered() {
    let app = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            "slow"
        }),
    );
    let server = start(app, Config { expose_internal: true, ..Config::default() }).await;
    let gauge = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("fastlane_http_requests_in_flight"))
            .and_then(|l| l.split_whitespace().last())
            .map(str::to_owned)
    };
    let slow = tokio::spawn(client::get_owned(server.url("/slow")));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
        // The /metrics request itself is not counted.
        if gauge(&metrics).as_deref() == Some("1") {
            break;
        }
        assert!(Instant::now() < deadline, "the slow request never showed as in flight:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slow.await.unwrap().unwrap().text(), "slow");
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert_eq!(gauge(&metrics).as_deref(), Some("0"), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn binding_a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = Config { port, ..Config::default() };
    let err = fastlane::Server::new(Router::new()).config(config).bind().await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
}

/// The body of a GET sent with extra headers over a plain socket.
async fn get_with_headers(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
    let (head, body) = support::raw_get(addr, path, headers).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body
}

#[tokio::test]
async fn the_client_is_taken_from_proxy_headers_only_when_the_peer_is_trusted() {
    async fn whoami(
        client: fastlane::ClientInfo,
        axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    ) -> String {
        format!("{} {} {}", client.addr, client.scheme(), peer.ip())
    }
    let app = || Router::new().route("/whoami", get(whoami));
    let spoof = "X-Forwarded-For: 6.6.6.6, 198.51.100.4\r\nX-Forwarded-Proto: https\r\n";

    // The default trusts 127.0.0.1, where this test's client is.
    let server = start(app(), Config::default()).await;
    let body = get_with_headers(server.local_addr(), "/whoami", spoof).await;
    assert_eq!(body, "198.51.100.4:0 https 127.0.0.1");
    let body =
        get_with_headers(server.local_addr(), "/whoami", "Forwarded: for=\"[2001:db8::7]\";proto=https\r\n")
            .await;
    assert_eq!(body, "[2001:db8::7]:0 https 127.0.0.1");
    let body = get_with_headers(server.local_addr(), "/whoami", "").await;
    assert!(body.starts_with("127.0.0.1:") && body.ends_with(" http 127.0.0.1"), "{body}");
    server.shutdown().await.unwrap();

    // A peer that is not trusted cannot say who it is.
    let untrusted: fastlane::ForwardedAllowIps = "10.0.0.0/8".parse().unwrap();
    let server = start(app(), Config { forwarded_allow_ips: untrusted, ..Config::default() }).await;
    let body = get_with_headers(server.local_addr(), "/whoami", spoof).await;
    assert!(body.starts_with("127.0.0.1:") && body.ends_with(" http 127.0.0.1"), "{body}");
    server.shutdown().await.unwrap();

    // Nor can anyone with proxy headers off.
    let server = start(app(), Config { proxy_headers: false, ..Config::default() }).await;
    let body = get_with_headers(server.local_addr(), "/whoami", spoof).await;
    assert!(body.starts_with("127.0.0.1:") && body.ends_with(" http 127.0.0.1"), "{body}");
    server.shutdown().await.unwrap();
}
