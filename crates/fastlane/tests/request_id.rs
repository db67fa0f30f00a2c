//! Request ids over real sockets: taken from `X-Request-Id` or `traceparent`
//! when well-formed, made otherwise, returned in the response (fastlane's
//! own endpoints' too), and on the request's log lines (the handler's own
//! events, its background tasks' and the access log); a background task
//! sees it as [`RequestId::current`], as a job it enqueues does.
//!
//! One test in this binary: it installs the process's log subscriber.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use fastlane::{Config, RequestId};

/// Log output, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }
}

/// Sends one request with `headers` on a fresh connection; the response's
/// `x-request-id` and its body.
async fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (Option<String>, String) {
    let (head, body) = support::raw_get(addr, path, headers).await;
    let id = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("x-request-id")))
        .map(|(_, value)| value.trim().to_owned());
    (id, body)
}

/// A handler on the blocking lane: its lines and `RequestId::current()`
/// are its request's, as an async handler's are.
fn sync_hello() -> String {
    tracing::warn!("sync handler says hello");
    RequestId::current().map(|id| id.to_string()).unwrap_or_default()
}

async fn hello(id: RequestId) -> String {
    tracing::warn!("handler says hello");
    id.to_string()
}

/// What the background tasks of `/later` saw as the current request id.
type Seen = Arc<Mutex<Vec<(&'static str, Option<String>)>>>;

fn later(seen: Seen) -> axum::routing::MethodRouter {
    get(move |background: fastlane::Background| async move {
        let (a, b) = (seen.clone(), seen.clone());
        background.spawn(async move {
            tracing::warn!("async background task says hi");
            a.lock().unwrap().push(("async", RequestId::current().map(|id| id.to_string())));
        });
        background.spawn_blocking(move || {
            tracing::warn!("blocking background task says hi");
            b.lock().unwrap().push(("blocking", RequestId::current().map(|id| id.to_string())));
        });
        "scheduled"
    })
}

#[tokio::test]
async fn request_ids_are_taken_or_made_returned_and_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let seen = Seen::default();
    let app = Router::new()
        .route("/hello", get(hello))
        .route("/later", later(seen.clone()))
        .route("/sync", get(fastlane::sync(sync_hello)));
    let server = support::start(app, Config { expose_internal: true, ..Config::default() }).await;
    let addr = server.local_addr();

    // The client's id, when well-formed, is kept: in the response, in the
    // handler's extractor, on the handler's log line and the access log line.
    let (id, body) = get_with(addr, "/hello", "X-Request-Id: order-7f3a.retry:2\r\n").await;
    assert_eq!(id.as_deref(), Some("order-7f3a.retry:2"));
    assert_eq!(body, "order-7f3a.retry:2");
    let said = captured.lines_with("handler says hello");
    assert!(said.iter().any(|l| l.contains("request{id=order-7f3a.retry:2}")), "{said:#?}");
    let access = captured.lines_with("fastlane::request: GET /hello 200");
    assert!(access.iter().any(|l| l.contains("request_id=order-7f3a.retry:2")), "{access:#?}");

    let (id, body) = get_with(addr, "/sync", "X-Request-Id: on-a-lane\r\n").await;
    assert_eq!((id.as_deref(), body.as_str()), (Some("on-a-lane"), "on-a-lane"));
    let said = captured.lines_with("sync handler says hello");
    assert!(said.iter().any(|l| l.contains("request{id=on-a-lane}")), "{said:#?}");

    // A W3C traceparent gives its trace id.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (id, body) =
        get_with(addr, "/hello", &format!("traceparent: 00-{trace}-00f067aa0ba902b7-01\r\n")).await;
    assert_eq!((id.as_deref(), body.as_str()), (Some(trace), trace));

    // None, or one that could forge a log line or a header: a new one, 32
    // hex digits, different each time.
    let (made, _) = get_with(addr, "/hello", "").await;
    let (bad, _) = get_with(addr, "/hello", "X-Request-Id: a b\"c; drop\r\n").await;
    for id in [&made, &bad] {
        let id = id.as_deref().unwrap();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(made, bad);
    assert!(captured.lines_with("a b\"c").is_empty(), "the bad id reached the log");

    // Answers fastlane gives itself carry it too: a 404 of no route, and
    // its own endpoints.
    let (id, _) = get_with(addr, "/nowhere", "X-Request-Id: lost-1\r\n").await;
    assert_eq!(id.as_deref(), Some("lost-1"));
    for path in ["/metrics", "/_fastlane/stalls", "/_fastlane/worker"] {
        let (id, _) = get_with(addr, path, "X-Request-Id: scrape-9\r\n").await;
        assert_eq!(id.as_deref(), Some("scrape-9"), "{path}");
    }

    // Background tasks run under the id of the request that scheduled them:
    // their log lines carry it, and `RequestId::current()` (which a job's
    // enqueue reads) gives it.
    let (_, body) = get_with(addr, "/later", "X-Request-Id: bg-42\r\n").await;
    assert_eq!(body, "scheduled");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while seen.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the background tasks did not run");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, [("async", Some("bg-42".to_owned())), ("blocking", Some("bg-42".to_owned()))]);
    for what in ["async background task says hi", "blocking background task says hi"] {
        let said = captured.lines_with(what);
        assert!(said.iter().any(|l| l.contains("request{id=bg-42}")), "{said:#?}");
    }
    assert!(server.shutdown().await.unwrap().is_clean());
}
