//! fastlane's own HTTP/1 (the runners' connections) against hyper's (the
//! same server with isolation off), over real sockets: the same bytes in,
//! the same bytes out, for the requests it answers itself and for those it
//! hands to hyper (a body that is not there yet, a chunked body,
//! `100-continue`, a malformed head).

mod support;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use fastlane::Config;
use support::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn app() -> Router {
    Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route("/echo", post(|body: Bytes| async move { body }))
        .route("/empty", get(|| async { StatusCode::NO_CONTENT }))
        .route("/unchanged", get(|| async { StatusCode::NOT_MODIFIED }))
        .route("/big", get(|| async { "x".repeat(100 * 1024) }))
        .route(
            "/stream",
            get(|| async {
                let chunks = ["one ", "two ", "three"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c)));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/own-headers",
            get(|| async {
                let mut response = "mine".into_response();
                let headers = response.headers_mut();
                headers.insert(header::DATE, HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                headers.insert("x-two", HeaderValue::from_static("a"));
                headers.append("x-two", HeaderValue::from_static("b"));
                response
            }),
        )
}

/// The last request of a conversation: the server closes after answering.
const LAST: &[u8] = b"GET /fast HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

/// How a conversation's bytes are sent.
enum Send {
    /// In one write.
    Whole(Vec<u8>),
    /// One byte at a time.
    ByteByByte(Vec<u8>),
    /// In pieces, with a pause after each but the last.
    Paused(Vec<Vec<u8>>),
    /// The first piece, then the rest once the server has answered with
    /// `100 Continue`.
    AfterContinue(Vec<u8>, Vec<u8>),
}

fn conversations() -> Vec<(&'static str, Send)> {
    let get = b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n".to_vec();
    let with_last = |first: &[u8]| [first, LAST].concat();
    vec![
        ("pipelined requests in one write", Send::Whole([get.repeat(3), LAST.to_vec()].concat())),
        ("a head sent byte by byte", Send::ByteByByte(with_last(&get))),
        ("HTTP/1.0, closed after the answer", Send::Whole(b"GET /fast HTTP/1.0\r\n\r\n".to_vec())),
        (
            "HTTP/1.0 with keep-alive",
            Send::Whole(
                b"GET /fast HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /fast HTTP/1.0\r\n\r\n".to_vec(),
            ),
        ),
        ("HTTP/1.0 streamed body, ended by the close", Send::Whole(b"GET /stream HTTP/1.0\r\n\r\n".to_vec())),
        ("HEAD", Send::Whole(with_last(b"HEAD /fast HTTP/1.1\r\nHost: t\r\n\r\n"))),
        (
            "204 and 304",
            Send::Whole(with_last(b"GET /empty HTTP/1.1\r\n\r\nGET /unchanged HTTP/1.1\r\n\r\n")),
        ),
        ("a large answer", Send::Whole(with_last(b"GET /big HTTP/1.1\r\n\r\n"))),
        ("a streamed answer", Send::Whole(with_last(b"GET /stream HTTP/1.1\r\n\r\n"))),
        (
            "the app's own date, connection and repeated headers",
            Send::Whole(b"GET /own-headers HTTP/1.1\r\n\r\n".to_vec()),
        ),
        ("Connection: close", Send::Whole(LAST.to_vec())),
        (
            "Connection: close, then keep-alive",
            Send::Whole(
                b"GET /fast HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n".to_vec(),
            ),
        ),
        (
            "unknown route and method",
            Send::Whole(with_last(b"GET /nowhere HTTP/1.1\r\n\r\nBREW /fast HTTP/1.1\r\n\r\n")),
        ),
        (
            "a body in the same write",
            Send::Whole(with_last(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")),
        ),
        (
            "a body that comes later (hyper's)",
            Send::Paused(vec![
                b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\n".to_vec(),
                [b"hello".as_slice(), &get, LAST].concat(),
            ]),
        ),
        (
            "a chunked body (hyper's)",
            Send::Whole(with_last(
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            )),
        ),
        (
            "100-continue (hyper's)",
            Send::AfterContinue(
                b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".to_vec(),
                with_last(b"hello"),
            ),
        ),
        (
            "a malformed header (hyper's 400)",
            Send::Whole(b"GET /fast HTTP/1.1\r\nNo colon here\r\n\r\n".to_vec()),
        ),
        ("braces in the target", Send::Whole(with_last(b"GET /a{b} HTTP/1.1\r\n\r\n"))),
        (
            "a target http::Uri refuses (hyper's 400)",
            Send::Whole(with_last(b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n")),
        ),
        (
            "two lengths (hyper's)",
            Send::Whole(b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec()),
        ),
        ("too many headers (hyper's 431)", Send::Whole(too_many_headers())),
    ]
}

fn too_many_headers() -> Vec<u8> {
    let mut head = b"GET /fast HTTP/1.1\r\n".to_vec();
    for i in 0..120 {
        head.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Plays one conversation on a fresh connection and returns all the server
/// sent until it closed, with the values that differ between any two runs
/// (the date, the request ids) blanked.
async fn play(addr: std::net::SocketAddr, send: &Send) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    match send {
        Send::Whole(bytes) => conn.write_all(bytes).await.unwrap(),
        Send::ByteByByte(bytes) => {
            for byte in bytes {
                conn.write_all(&[*byte]).await.unwrap();
                conn.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Send::Paused(pieces) => {
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                conn.write_all(piece).await.unwrap();
            }
        }
        Send::AfterContinue(head, rest) => {
            conn.write_all(head).await.unwrap();
            let mut interim = Vec::new();
            while !interim.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "closed before 100 Continue");
                interim.push(byte[0]);
            }
            assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            conn.write_all(rest).await.unwrap();
        }
    }
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "still open after 10 s; received {:?}", String::from_utf8_lossy(&received));
    normalize(&String::from_utf8_lossy(&received))
}

fn normalize(text: &str) -> String {
    text.split("\r\n")
        .map(|line| {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("date: ") && !line.ends_with("2026 00:00:00 GMT") {
                "date: <now>".to_string()
            } else if lower.starts_with("x-request-id: ") {
                "x-request-id: <id>".to_string()
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test]
async fn the_runners_http1_answers_byte_for_byte_as_hyper_does() {
    let isolated = start(app(), Config::default()).await;
    let config = Config {
        isolation: fastlane::IsolationConfig { enabled: false, ..Default::default() },
        ..Config::default()
    };
    let plain = start(app(), config).await;
    for (name, send) in conversations() {
        let ours = play(isolated.local_addr(), &send).await;
        let hypers = play(plain.local_addr(), &send).await;
        assert!(ours.starts_with("HTTP/1."), "{name}: no answer: {ours:?}");
        assert_eq!(ours, hypers, "{name}: fastlane's own HTTP/1 (left) and hyper's (right) differ");
    }
    isolated.shutdown().await.unwrap();
    plain.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connection_handed_to_hyper_keeps_serving_in_order() {
    let server = start(app(), Config::default()).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    // Answered here, then a chunked body (hyper's from then on), then more.
    let first = b"GET /fast HTTP/1.1\r\n\r\n";
    let chunked = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    conn.write_all(
        &[first.as_slice(), chunked, b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nde", LAST].concat(),
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut received)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&received);
    let bodies: Vec<&str> =
        text.split("\r\n\r\n").skip(1).map(|rest| rest.split("HTTP/1.1").next().unwrap()).collect();
    assert_eq!(bodies, ["ok", "abc", "de", "ok"], "{text}");
    server.shutdown().await.unwrap();
}
