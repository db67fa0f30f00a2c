//! Response compression (`Config::compression`) over real sockets: each
//! encoding the client accepts, decoded back to the handler's bytes; small
//! bodies, server-sent events and responses that name their own encoding
//! left alone; nothing compressed when it is off.

mod support;

use std::io::Read;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use fastlane::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn text() -> String {
    (0..200).map(|i| format!("line {i} of a response worth compressing\n")).collect()
}

fn app() -> Router {
    Router::new()
        .route("/big", get(|| async { text() }))
        .route("/small", get(|| async { "tiny" }))
        .route("/events", get(|| async { ([(header::CONTENT_TYPE, "text/event-stream")], text()) }))
        .route(
            "/identity",
            get(|| async { ([(header::CONTENT_ENCODING, "identity")], text()).into_response() }),
        )
}

/// GET with `Accept-Encoding: encoding`; the response's Content-Encoding and raw body bytes.
async fn fetch(addr: std::net::SocketAddr, path: &str, encoding: &str) -> (Option<String>, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAccept-Encoding: {encoding}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The request id, once, whether the route layer is the outermost (the
    // runners' HTTP/1 writes it into the head) or compression is outside it.
    let ids = head.lines().filter(|l| l.to_ascii_lowercase().starts_with("x-request-id: ")).count();
    assert_eq!(ids, 1, "{head}");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)))
            .map(|(_, v)| v.trim().to_owned())
    };
    let mut body = raw[split + 4..].to_vec();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    }
    (header("content-encoding"), body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn decode(encoding: &str, body: &[u8]) -> String {
    let mut out = String::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(body).read_to_string(&mut out).unwrap(),
        "br" => brotli::Decompressor::new(body, 4096).read_to_string(&mut out).unwrap(),
        "zstd" => zstd::stream::read::Decoder::new(body).unwrap().read_to_string(&mut out).unwrap(),
        other => panic!("unexpected encoding {other}"),
    };
    out
}

#[tokio::test]
async fn responses_are_compressed_as_the_client_accepts_when_it_is_on() {
    let server = support::start(app(), Config { compression: true, ..Config::default() }).await;
    let addr = server.local_addr();
    for encoding in ["gzip", "br", "zstd"] {
        let (used, body) = fetch(addr, "/big", encoding).await;
        assert_eq!(used.as_deref(), Some(encoding));
        assert!(body.len() < text().len() / 4, "{encoding}: {} bytes", body.len());
        assert_eq!(decode(encoding, &body), text(), "{encoding}");
    }
    // Left as they are: a small body, a stream of events, a response that
    // names its own encoding, a client that accepts none.
    for (path, encoding) in
        [("/small", "gzip"), ("/events", "gzip"), ("/identity", "gzip"), ("/big", "identity")]
    {
        let (used, body) = fetch(addr, path, encoding).await;
        assert!(used.is_none() || used.as_deref() == Some("identity"), "{path}: {used:?}");
        assert!(body.starts_with(b"tiny") || body.starts_with(b"line 0"), "{path}");
    }
    assert!(server.shutdown().await.unwrap().is_clean());

    // fastlane's own `/metrics` (answered before the router) too.
    let config = Config { compression: true, expose_internal: true, ..Config::default() };
    let server = support::start(app(), config).await;
    let _ = fetch(server.local_addr(), "/big", "identity").await; // a route in the metrics
    let (used, body) = fetch(server.local_addr(), "/metrics", "gzip").await;
    assert_eq!(used.as_deref(), Some("gzip"));
    let metrics = decode("gzip", &body);
    assert!(metrics.contains("fastlane_http_requests_total") && metrics.ends_with("# EOF\n"), "{metrics}");
    assert!(server.shutdown().await.unwrap().is_clean());

    // Off by default.
    let server = support::start(app(), Config::default()).await;
    let (used, body) = fetch(server.local_addr(), "/big", "gzip, br, zstd").await;
    assert_eq!((used, body.len()), (None, text().len()));
    assert!(server.shutdown().await.unwrap().is_clean());
}
