//! Request ids over real sockets: taken from `X-Request-Id` or `traceparent`
//! when well-formed, made otherwise, returned in the response, and on the
//! request's log lines (the handler's own events and the access log).
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

async fn hello(id: RequestId) -> String {
    tracing::warn!("handler says hello");
    id.to_string()
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
    let app = Router::new().route("/hello", get(hello));
    let server = support::start(app, Config::default()).await;
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

    // Answers fastlane gives itself carry it too (here a 404 of no route).
    let (id, _) = get_with(addr, "/nowhere", "X-Request-Id: lost-1\r\n").await;
    assert_eq!(id.as_deref(), Some("lost-1"));
    assert!(server.shutdown().await.unwrap().is_clean());
}
