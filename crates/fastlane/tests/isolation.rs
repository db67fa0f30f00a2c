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
    // Five threads: two runners, two spares, and a stall budget of one.
    let isolation = IsolationConfig { runners: 2, max_threads: 5, ..IsolationConfig::default() };
    let server = start(app(), Config { isolation, ..exposed() }).await;
    // One stuck handler spends the budget.
    let blockers: Vec<_> =
        (0..1).map(|_| tokio::spawn(client::get_owned(server.url("/block/2500")))).collect();
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
    // Once the stalls end, the route is served again. (The stuck thread
    // gives its place in the budget back just after its response went
    // out: a request sent the instant that response arrives may still be
    // refused, so each refusal is counted and the next try made.)
    let mut refused = 1;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let status = client::get(&server.url("/block/10")).await.unwrap().status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "the route was still refused 2 s after its stall ended");
        refused += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains(&format!("fastlane_isolation_rejected_total {refused}")), "{metrics}");
    assert!(metrics.contains("fastlane_isolation_max_threads 5"), "{metrics}");
    assert!(metrics.contains("fastlane_isolation_stall_budget 1"), "{metrics}");
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

/// A refusal at the cap: fast, with `Retry-After` and a JSON body naming the
/// route.
fn assert_refused_at_once(response: &client::Response, took: Duration, route: &str) {
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(took < Duration::from_secs(1), "the 503 took {took:?}");
    assert!(response.headers.contains_key("retry-after"));
    let body: serde_json::Value = response.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains(&format!("GET {route} is stalling")), "{body}");
}

/// Times `/fast` every 100 ms while `busy` runs; returns the slowest.
async fn slowest_fast_while<F: std::future::Future>(server: &fastlane::SpawnedServer, busy: F) -> Duration {
    let url = server.url("/fast");
    let probe = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let response = tokio::time::timeout(Duration::from_secs(10), client::get(&url))
                .await
                .expect("/fast timed out");
            assert_eq!(response.unwrap().text(), "ok");
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slowest
    };
    let (slowest, _) = tokio::join!(probe, busy);
    slowest
}

#[tokio::test]
async fn past_the_thread_cap_the_stalling_route_is_refused_at_once_and_the_others_keep_their_latency() {
    // Eight threads in all, for forty blocking requests at once.
    let isolation = IsolationConfig { runners: 2, max_threads: 8, ..IsolationConfig::default() };
    let server = start(app(), Config { isolation, ..exposed() }).await;
    let blockers: Vec<_> = (0..40)
        .map(|_| {
            let url = server.url("/block/3000");
            tokio::spawn(async move {
                let started = Instant::now();
                let response = client::get_owned(url).await;
                (response, started.elapsed())
            })
        })
        .collect();
    let slowest = slowest_fast_while(&server, async {
        let (mut served, mut refused) = (0, 0);
        for blocker in blockers {
            let (response, took) = blocker.await.unwrap();
            let response = response.expect("every blocking request is answered, none cut");
            match response.status.as_u16() {
                200 => served += 1,
                _ => {
                    assert_refused_at_once(&response, took, "/block/{ms}");
                    refused += 1;
                }
            }
        }
        // The stall budget of 8 - 2 runners - 2 spares, and the first two,
        // which stalled before anyone knew the route did.
        assert!((1..=6).contains(&served), "{served} served");
        assert_eq!(served + refused, 40);
    })
    .await;
    assert!(slowest < Duration::from_secs(1), "/fast took {slowest:?} at the cap");
    let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
    assert!(metrics.contains("fastlane_isolation_stall_budget 4"), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn blocking_background_tasks_scheduled_faster_than_they_finish_all_run_without_delaying_others() {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = done.clone();
    let app = app().route(
        "/background-counted",
        get(move |bg: Background| {
            let done = counted.clone();
            async move {
                bg.spawn(async move {
                    std::thread::sleep(Duration::from_millis(500));
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
                "scheduled"
            }
        }),
    );
    let isolation = IsolationConfig { runners: 2, max_threads: 6, ..IsolationConfig::default() };
    let server = start(app, Config { isolation, ..exposed() }).await;
    // Three bursts of twenty requests, each scheduling a task that blocks
    // for half a second: far more than six threads can run as they come.
    let mut accepted = 0;
    let slowest = slowest_fast_while(&server, async {
        for _ in 0..3 {
            let burst: Vec<_> = (0..20)
                .map(|_| {
                    let url = server.url("/background-counted");
                    tokio::spawn(async move {
                        let started = Instant::now();
                        (client::get_owned(url).await.unwrap(), started.elapsed())
                    })
                })
                .collect();
            for request in burst {
                let (response, took) = request.await.unwrap();
                match response.status.as_u16() {
                    200 => accepted += 1,
                    _ => assert_refused_at_once(&response, took, "/background-counted"),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(slowest < Duration::from_secs(1), "/fast took {slowest:?} behind the background tasks");
    assert!(accepted >= 3, "only {accepted} accepted");
    // Every accepted task runs, later.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(std::sync::atomic::Ordering::SeqCst) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), accepted, "every accepted task ran");
    let report = server.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
}
