//! HTTP/2 at the edges, over real sockets: clients that never finish their
//! preface or a header block are cut after the header-read timeout (the
//! HTTP/2 form of slowloris), idle connections are closed gracefully, and
//! streams in progress are never cut.

mod support;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use fastlane::Config;
use http_body_util::{BodyExt, Empty};
use support::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A GET of `/slow` in HPACK: `:method GET`, `:scheme http`, `:path` as a
/// literal, all without Huffman coding.
fn get_slow_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 5];
    block.extend_from_slice(b"/slow");
    block
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "over h2" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            "slow"
        }),
    )
}

fn short_timeout() -> Config {
    Config { header_read_timeout: Duration::from_millis(500), ..Config::default() }
}

/// The same, served on the runners' reactor and on tokio's I/O
/// (`--no-isolation`), whose connections' tasks apply the deadlines.
fn both_isolation_modes() -> [Config; 2] {
    [true, false].map(|enabled| Config {
        isolation: fastlane::IsolationConfig { enabled, ..Default::default() },
        ..short_timeout()
    })
}

/// Reads until the server closes `conn`; returns how long that took.
async fn closed_within(conn: &mut TcpStream, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let mut rest = Vec::new();
    match tokio::time::timeout(limit, conn.read_to_end(&mut rest)).await {
        Ok(_) => started.elapsed(),
        Err(_) => panic!("{what}: still open after {limit:?}"),
    }
}

#[tokio::test]
async fn connections_that_never_finish_their_preface_or_a_header_block_are_cut() {
    for config in both_isolation_modes() {
        never_finished_preface_or_header_block(config).await;
    }
}

async fn never_finished_preface_or_header_block(config: Config) {
    let isolated = config.isolation.enabled;
    let server = start(app(), config).await;
    let settings = frame(SETTINGS, 0, 0, &[]);
    let half_headers = frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_slow_block());
    let half_headers = &half_headers[..half_headers.len() / 2];
    let mut preface_and_half_headers = PREFACE.to_vec();
    preface_and_half_headers.extend_from_slice(&settings);
    preface_and_half_headers.extend_from_slice(half_headers);
    let mut open_block = PREFACE.to_vec();
    open_block.extend_from_slice(&settings);
    open_block.extend(frame(HEADERS, END_STREAM, 1, &get_slow_block())); // no END_HEADERS
    let kinds: [(&str, Vec<u8>); 4] = [
        ("`PRI ` only", b"PRI ".to_vec()),
        ("the preface without SETTINGS", PREFACE.to_vec()),
        ("half a HEADERS frame", preface_and_half_headers),
        ("a header block without END_HEADERS", open_block),
    ];
    let mut clients = Vec::new();
    for (what, bytes) in kinds {
        for _ in 0..25 {
            let addr = server.local_addr();
            let bytes = bytes.clone();
            clients.push(tokio::spawn(async move {
                let mut conn = TcpStream::connect(addr).await.unwrap();
                conn.write_all(&bytes).await.unwrap();
                let label = format!("isolation {isolated}, {what}");
                (what, closed_within(&mut conn, Duration::from_secs(5), &label).await)
            }));
        }
    }
    for client in clients {
        let (what, took) = client.await.unwrap();
        assert!(took >= Duration::from_millis(300), "isolation {isolated}, {what}: cut after only {took:?}");
    }
    // The server is still there for everyone else.
    assert_eq!(fastlane::client::get(&server.url("/")).await.unwrap().text(), "over h2");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_late_header_block_is_cut_even_beside_a_stream_in_progress() {
    for config in both_isolation_modes() {
        late_header_block_beside_a_busy_stream(config).await;
    }
}

async fn late_header_block_beside_a_busy_stream(config: Config) {
    let isolated = config.isolation.enabled;
    let server = start(app(), config).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    // Stream 1: a whole request, whose handler takes 1.5 s.
    bytes.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_slow_block()));
    // Stream 3: a header block that never ends.
    bytes.extend(frame(HEADERS, END_STREAM, 3, &get_slow_block()));
    conn.write_all(&bytes).await.unwrap();
    let took = closed_within(&mut conn, Duration::from_secs(5), "open header block").await;
    assert!(
        took < Duration::from_millis(1400),
        "isolation {isolated}: cut only after {took:?}: the busy stream sheltered it"
    );
    server.shutdown().await.unwrap();
}

/// An HTTP/2 connection with prior knowledge; the handle ends with it.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>, tokio::task::JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let app = Router::new().route("/", get(|| async { "over h2" }));
    let server = start(app, Config::default()).await;

    let (mut sender, _conn) = h2_connect(server.local_addr()).await;
    let req = http::Request::get(server.url("/")).body(Empty::<bytes::Bytes>::new()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"over h2");
    drop(sender);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn streams_in_progress_are_never_cut_and_an_idle_connection_is_closed_gracefully() {
    for config in both_isolation_modes() {
        long_stream_then_idle(config).await;
    }
}

async fn long_stream_then_idle(config: Config) {
    let isolated = config.isolation.enabled;
    let server = start(app(), config).await;
    let (mut sender, conn) = h2_connect(server.local_addr()).await;
    // A stream three times as long as the timeout.
    let req = http::Request::get(server.url("/slow")).body(Empty::new()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(&response.into_body().collect().await.unwrap().to_bytes()[..], b"slow");
    // Then idle: the server sends GOAWAY and the connection ends cleanly.
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(closed.is_ok(), "isolation {isolated}: the idle connection was not closed");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "isolation {isolated}: closed after only {took:?}");
    assert!(sender.ready().await.is_err(), "the client learnt that the connection is gone");
    server.shutdown().await.unwrap();
}
