//! Background tasks and graceful shutdown.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use fastlane::{client, Background, Config};
use support::start;
use tokio::sync::mpsc;

/// Everything logged in this test process, for the tests that check what a
/// log line says. Installed once, globally, since runner and lane threads log
/// too.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || Capture(writer.clone())).finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buffer
    })
    .clone()
}

struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records the order in which things happen, across threads.
#[derive(Clone)]
struct Events(mpsc::UnboundedSender<&'static str>);

#[tokio::test]
async fn tasks_start_after_the_response_and_run_on_their_lanes() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/",
            get(|State(events): State<Events>, bg: Background| async move {
                let e = events.clone();
                bg.spawn(async move {
                    e.0.send("async task").unwrap();
                });
                let e = events.clone();
                bg.spawn_blocking(move || {
                    assert_eq!(std::thread::current().name(), Some("fastlane-blocking"));
                    e.0.send("blocking task").unwrap();
                });
                let e = events.clone();
                bg.spawn_cpu(move || {
                    assert_eq!(std::thread::current().name(), Some("fastlane-cpu"));
                    e.0.send("cpu task").unwrap();
                });
                // Give the tasks every chance to start early if they could.
                tokio::time::sleep(Duration::from_millis(100)).await;
                events.0.send("handler done").unwrap();
                "response"
            }),
        )
        .with_state(Events(tx));
    let server = start(app, Config::default()).await;
    assert_eq!(client::get(&server.url("/")).await.unwrap().text(), "response");

    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.push(tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap());
    }
    assert_eq!(seen[0], "handler done", "{seen:?}");
    let mut tasks = seen[1..].to_vec();
    tasks.sort();
    assert_eq!(tasks, ["async task", "blocking task", "cpu task"]);
    assert!(server.shutdown().await.unwrap().is_clean());
}

#[tokio::test]
async fn the_response_does_not_wait_for_a_long_task() {
    let app = Router::new().route(
        "/",
        get(|bg: Background| async move {
            bg.spawn_blocking(|| std::thread::sleep(Duration::from_secs(2)));
            "accepted"
        }),
    );
    let server = start(app, Config::default()).await;
    let started = Instant::now();
    assert_eq!(client::get(&server.url("/")).await.unwrap().text(), "accepted");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // Shutdown waits for it.
    let report = server.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(started.elapsed() >= Duration::from_millis(1900), "{:?}", started.elapsed());
}

#[tokio::test]
async fn failures_and_panics_are_counted_and_logged_with_their_route() {
    let logs = captured_logs();
    let app = Router::new()
        .route(
            "/signup/{id}",
            get(|bg: Background| async move {
                bg.spawn(async { Err::<(), _>("disk full") });
                bg.spawn(async { panic!("task bug") as () });
                bg.spawn_blocking(|| -> () { panic!("blocking task bug") });
                bg.spawn_cpu(|| Ok::<_, std::io::Error>(()));
                "ok"
            }),
        )
        .route("/fast", get(|| async { "fast" }));
    let server = start(app, Config { expose_internal: true, ..Config::default() }).await;
    assert_eq!(client::get(&server.url("/signup/7")).await.unwrap().text(), "ok");

    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = server.handle().metrics();
        if metrics.contains("fastlane_background_tasks_pending 0") && metrics.contains(r#"outcome="ok""#) {
            break metrics;
        }
        assert!(Instant::now() < deadline, "tasks did not finish:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        metrics.contains(r#"fastlane_background_tasks_total{lane="async",outcome="error"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fastlane_background_tasks_total{lane="async",outcome="panic"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fastlane_background_tasks_total{lane="blocking",outcome="panic"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"fastlane_background_tasks_total{lane="cpu",outcome="ok"} 1"#), "{metrics}");
    assert_eq!(client::get(&server.url("/fast")).await.unwrap().text(), "fast");
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    // One line per failure, naming the route that scheduled the task.
    for needles in [
        ["background task failed", "route=/signup/{id}", "disk full"],
        ["background task panicked", "route=/signup/{id}", "task bug"],
        ["background task panicked", "route=/signup/{id}", "blocking task bug"],
    ] {
        assert!(
            logs.lines().any(|l| needles.iter().all(|n| l.contains(n))),
            "no line with {needles:?} in:\n{logs}"
        );
    }
    assert!(server.shutdown().await.unwrap().is_clean());
}

#[tokio::test]
async fn shutdown_drains_requests_and_tasks_within_the_grace_period() {
    let done = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/work",
            get(|State(done): State<Arc<AtomicUsize>>, bg: Background| async move {
                bg.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_millis(400)).await;
                "worked"
            }),
        )
        .with_state(done.clone());
    let server = start(app, Config { grace_period: Duration::from_secs(10), ..Config::default() }).await;
    let url = server.url("/work");
    let in_flight = tokio::spawn(client::get_owned(url.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let report = server.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The request in flight was answered, and its task ran to the end.
    assert_eq!(in_flight.await.unwrap().unwrap().text(), "worked");
    assert_eq!(done.load(Ordering::SeqCst), 1);
    // New connections are refused once the server is down.
    assert!(client::get(&url).await.is_err());
}

#[tokio::test]
async fn what_outlives_the_grace_period_is_reported_with_its_route() {
    let app = Router::new()
        .route(
            "/reports/{id}",
            get(|bg: Background| async move {
                bg.spawn_blocking(|| std::thread::sleep(Duration::from_secs(5)));
                "queued"
            }),
        )
        .route("/hang", get(|| async { tokio::time::sleep(Duration::from_secs(30)).await }));
    let server = start(app, Config { grace_period: Duration::from_millis(500), ..Config::default() }).await;
    assert_eq!(client::get(&server.url("/reports/1")).await.unwrap().text(), "queued");
    let _hanging = tokio::spawn(client::get_owned(server.url("/hang")));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let report = server.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(!report.is_clean());
    assert_eq!(report.tasks.len(), 1, "{report:?}");
    assert_eq!(report.tasks[0].route, "/reports/{id}");
    assert_eq!(report.tasks[0].lane, "blocking");
    assert!(report.tasks[0].running_for.unwrap() >= Duration::from_millis(500));
    assert_eq!(report.requests.len(), 1, "{report:?}");
    assert_eq!(report.requests[0].route, "/hang");
    assert!(report.cut().any(|c| c.to_string().starts_with("request GET /hang (async lane), had run")));
}
