//! Connections served on the runners' own reactor, over real sockets:
//! keep-alive connections stay live while handlers block, and bodies larger
//! than the kernel's socket buffers go through whole in both directions.

mod support;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::{get, post};
use axum::Router;
use fastlane::Config;
use support::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Larger than any socket buffer the kernel grants by default, so the
/// server's writes and reads must stop at `WouldBlock` and resume.
const BIG: usize = 16 * 1024 * 1024;

fn app() -> Router {
    Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/block/{ms}",
            get(|axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                std::thread::sleep(Duration::from_millis(ms));
                "slept"
            }),
        )
        .route("/big", get(|| async { Bytes::from(pattern(BIG)) }))
        .route("/echo", post(|body: Bytes| async move { body }))
}

/// Bytes that show a misplaced or lost chunk.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Sends one request on a keep-alive connection and reads its response;
/// returns the status line and the body.
async fn exchange(conn: &mut TcpStream, request: &[u8]) -> (String, Vec<u8>) {
    conn.write_all(request).await.unwrap();
    read_response(conn).await
}

/// Reads one response with a `content-length`.
async fn read_response(conn: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "connection closed mid-response");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.unwrap();
    (head.lines().next().unwrap().to_owned(), body)
}

#[tokio::test]
async fn keep_alive_connections_opened_before_a_stall_are_served_during_it() {
    let server = start(app(), Config::default()).await;
    let get_fast = b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n";
    // Idle keep-alive connections, waiting in the reactor when the stall
    // begins: none of them may be tied to a runner that then blocks.
    let mut idle = Vec::new();
    for _ in 0..16 {
        let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
        assert_eq!(exchange(&mut conn, get_fast).await.1, b"ok");
        idle.push(conn);
    }
    let blockers: Vec<_> =
        (0..4).map(|_| tokio::spawn(fastlane::client::get_owned(server.url("/block/3000")))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, conn) in idle.iter_mut().enumerate() {
        let started = Instant::now();
        let (status, body) = exchange(conn, get_fast).await;
        let took = started.elapsed();
        assert_eq!((status.as_str(), body.as_slice()), ("HTTP/1.1 200 OK", &b"ok"[..]));
        assert!(took < Duration::from_secs(1), "keep-alive connection {i} waited {took:?} during the stall");
    }
    for blocker in blockers {
        assert_eq!(blocker.await.unwrap().unwrap().text(), "slept");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_response_bigger_than_the_socket_buffer_reaches_a_slow_reader_whole() {
    let server = start(app(), Config::default()).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    // Read nothing for a while: the server fills the socket and must park
    // on writability, then resume as this side drains it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), read_response(&mut conn)).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body.len(), BIG, "the whole body");
    assert!(body == pattern(BIG), "the body arrived in order, nothing lost");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_body_bigger_than_the_socket_buffer_is_read_whole() {
    // Under the body limit, above the socket buffer.
    let len = 1536 * 1024;
    let server = start(app(), Config::default()).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    let body = pattern(len);
    let head = format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(&body);
    // Sent in pieces with pauses, so the server reads until `WouldBlock`
    // and waits for the rest several times.
    let (mut reader, mut writer) = conn.split();
    let send = async {
        for piece in request.chunks(256 * 1024) {
            writer.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut response = Vec::new();
    let receive = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the whole echo");
            response.extend_from_slice(&chunk[..n]);
            if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                if response.len() - (at + 4) >= len {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), futures_util::future::join(send, receive)).await.unwrap();
    let at = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    assert!(response[at..] == body[..], "the echo is the body, in order");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_mid_response_does_not_disturb_the_others() {
    let server = start(app(), Config::default()).await;
    for _ in 0..8 {
        let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
        conn.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut some = [0u8; 4096];
        let _ = conn.read(&mut some).await.unwrap();
        // Dropped with most of the body unread: the server's write fails
        // and the connection ends.
    }
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    let (status, body) = exchange(&mut conn, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!((status.as_str(), body.as_slice()), ("HTTP/1.1 200 OK", &b"ok"[..]));
    let report = server.shutdown().await.unwrap();
    assert!(report.is_clean(), "the abandoned responses ended, nothing left to cut: {report:?}");
}

#[tokio::test]
async fn a_connection_cut_at_shutdown_is_closed_not_left_hanging() {
    let app = app().route(
        "/forever",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "never"
        }),
    );
    let config = Config { grace_period: Duration::from_millis(300), ..Config::default() };
    let server = start(app, config).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    conn.write_all(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = server.shutdown().await.unwrap();
    assert_eq!(report.requests.len(), 1, "the grace period cut the request: {report:?}");
    // Nobody serves this connection any more: the client must learn it now,
    // not when the handler's hour is up.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the cut connection ends instead of hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "no response, just the end: {read:?}");
}

/// A config whose header-read timeout (also the keep-alive idle limit) is
/// short enough to test.
fn short_header_timeout() -> Config {
    Config { header_read_timeout: Duration::from_millis(500), ..Config::default() }
}

/// Waits for the server to close `conn`; returns how long that took.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, conn.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was still open after {limit:?}");
    started.elapsed()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let server = start(app(), short_header_timeout()).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    assert_eq!(exchange(&mut conn, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n").await.1, b"ok");
    let took = closed_within(&mut conn, Duration::from_secs(10)).await;
    // Measured from the end of the response, to within a check (0.1 s).
    assert!(took >= Duration::from_millis(300), "closed after only {took:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_header_read_timeout_never_cuts_a_request_in_progress() {
    let app = app().route(
        "/stream",
        get(|| async {
            let chunks = futures_util::stream::unfold(0, |i| async move {
                if i == 4 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
                Some((Ok::<_, std::convert::Infallible>(Bytes::from(format!("chunk {i}\n"))), i + 1))
            });
            axum::body::Body::from_stream(chunks)
        }),
    );
    let server = start(app, short_header_timeout()).await;
    // A handler that takes three times the timeout.
    let slow = fastlane::client::get(&server.url("/block/1500")).await.unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(slow.text(), "slept");
    // A streaming body that lasts three times the timeout.
    let stream = fastlane::client::get(&server.url("/stream")).await.unwrap();
    assert_eq!(stream.text(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
    // A big response to a reader that starts reading only after three
    // times the timeout: the server waits on a full socket meanwhile.
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), read_response(&mut conn)).await.unwrap();
    assert_eq!((status.as_str(), body.len()), ("HTTP/1.1 200 OK", BIG));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_isolation_a_client_that_never_finishes_its_headers_is_disconnected_too() {
    let isolation = fastlane::IsolationConfig { enabled: false, ..Default::default() };
    let server = start(app(), Config { isolation, ..short_header_timeout() }).await;
    let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
    conn.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n").await.unwrap(); // no final CRLF
    let took = closed_within(&mut conn, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(300), "closed after only {took:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_as_soon_as_shutdown_begins() {
    for isolation in [true, false] {
        let config = Config {
            isolation: fastlane::IsolationConfig { enabled: isolation, ..Default::default() },
            ..Config::default()
        };
        let server = start(app(), config).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
            assert_eq!(exchange(&mut conn, b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n").await.1, b"ok");
            idle.push(conn);
        }
        // Past the moment new connections are given to settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let report = server.shutdown().await.unwrap();
        // The idle connections do not hold the drain up (the grace period
        // is 30 s, the header-read timeout 10 s).
        assert!(started.elapsed() < Duration::from_secs(3), "isolation {isolation}: {:?}", started.elapsed());
        assert!(report.is_clean());
        for conn in &mut idle {
            closed_within(conn, Duration::from_secs(1)).await;
        }
    }
}

/// Both ways of serving a connection: on the runners' reactor and on
/// tokio's I/O (`--no-isolation`).
fn both_isolation_modes() -> [Config; 2] {
    [true, false].map(|enabled| Config {
        isolation: fastlane::IsolationConfig { enabled, ..Default::default() },
        ..Config::default()
    })
}

/// Reads until the server closes; returns what came.
async fn read_until_closed(conn: &mut TcpStream, limit: Duration, what: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    match tokio::time::timeout(limit, conn.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => rest,
        // A reset after the answer is a close too.
        Ok(Err(_)) => rest,
        Err(_) => panic!("{what}: still open after {limit:?}, received {:?}", String::from_utf8_lossy(&rest)),
    }
}

#[tokio::test]
async fn a_body_cut_short_by_a_half_close_that_arrives_with_the_data_is_answered_at_once() {
    for config in both_isolation_modes() {
        let isolated = config.isolation.enabled;
        let server = start(app(), config).await;
        for attempt in 0..4 {
            let mut conn = TcpStream::connect(server.local_addr()).await.unwrap();
            let std = conn.into_std().unwrap();
            // The head, two of the hundred body bytes and the FIN leave in
            // one go, so the server's first read sees the data and the
            // hang-up together.
            std.set_nonblocking(false).unwrap();
            use std::io::Write;
            (&std).write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab").unwrap();
            std.shutdown(std::net::Shutdown::Write).unwrap();
            std.set_nonblocking(true).unwrap();
            conn = TcpStream::from_std(std).unwrap();
            let started = Instant::now();
            let answer = read_until_closed(&mut conn, Duration::from_secs(3), "cut body").await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "isolation {isolated}, attempt {attempt}: {answer:?} after {:?}",
                started.elapsed()
            );
        }
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn connections_half_closed_after_their_request_are_closed_at_once() {
    for config in both_isolation_modes() {
        let isolated = config.isolation.enabled;
        let server = start(app(), config).await;
        let clients: Vec<_> = (0..200)
            .map(|_| {
                let addr = server.local_addr();
                tokio::spawn(async move {
                    let mut conn = TcpStream::connect(addr).await.unwrap();
                    conn.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
                    conn.shutdown().await.unwrap();
                    // The header-read timeout is 10 s: a close within 3 s
                    // is the server noticing the hang-up, not the timeout.
                    read_until_closed(&mut conn, Duration::from_secs(3), "half-closed keep-alive").await
                })
            })
            .collect();
        let mut answered = 0;
        for client in clients {
            let answer = client.await.unwrap();
            // A half-close with a request in flight reads as the client
            // leaving (hyper's default, and uvicorn's): the answer is sent
            // if it was ready first, and the connection closes either way.
            if !answer.is_empty() {
                assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "isolation {isolated}: {answer:?}");
                assert!(answer.ends_with(b"ok"), "isolation {isolated}: {answer:?}");
                answered += 1;
            }
        }
        println!("isolation {isolated}: {answered} of 200 half-closed connections were answered before they closed");
        server.shutdown().await.unwrap();
    }
}

/// What the waiting handler reports: that it started, and that its future
/// was dropped.
#[derive(Debug, PartialEq)]
enum Life {
    Started,
    Dropped,
}

/// A handler that never answers on its own and reports when it starts and
/// when its future is dropped.
fn app_with_a_waiting_handler(life: tokio::sync::mpsc::UnboundedSender<Life>) -> Router {
    app().route(
        "/wait",
        get(move || {
            let _ = life.send(Life::Started);
            let guard = DropSignal(life.clone());
            async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(guard);
                "waited"
            }
        }),
    )
}

struct DropSignal(tokio::sync::mpsc::UnboundedSender<Life>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(Life::Dropped);
    }
}

#[tokio::test]
async fn a_handler_is_dropped_when_its_client_goes_away() {
    for config in both_isolation_modes() {
        let isolated = config.isolation.enabled;
        let (tx, mut life) = tokio::sync::mpsc::unbounded_channel();
        let server = start(app_with_a_waiting_handler(tx), config).await;
        // The client goes with its request (the FIN arrives with the data),
        // after it (a separate FIN), and by closing the socket outright.
        for way in ["half-close with the request", "half-close later", "close"] {
            let conn = TcpStream::connect(server.local_addr()).await.unwrap();
            let std = conn.into_std().unwrap();
            std.set_nonblocking(false).unwrap();
            use std::io::{Read, Write};
            (&std).write_all(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            if way == "half-close with the request" {
                // The server may read the hang-up before the handler starts
                // (then it never runs) or after (then it is dropped): either
                // way the connection closes, and no handler is left running.
                std.shutdown(std::net::Shutdown::Write).unwrap();
                let kept = std.try_clone().unwrap();
                let closed = tokio::task::spawn_blocking(move || {
                    kept.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    (&kept).read(&mut [0u8; 256])
                })
                .await
                .unwrap();
                assert!(
                    matches!(closed, Ok(0))
                        || closed.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
                    "isolation {isolated}, {way}: the connection was not closed within 3 s"
                );
                // A handler still queued would start now: give it the time.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut seen = Vec::new();
                while let Ok(event) = life.try_recv() {
                    seen.push(event);
                }
                if seen.first() == Some(&Life::Started) && seen.len() == 1 {
                    let dropped = tokio::time::timeout(Duration::from_secs(3), life.recv()).await;
                    seen.extend(dropped.ok().flatten());
                }
                assert!(
                    seen.is_empty() || seen == [Life::Started, Life::Dropped],
                    "isolation {isolated}, {way}: handler events {seen:?}"
                );
                drop(std);
                continue;
            }
            // The client goes while its handler runs (a loaded machine may
            // take a while to start it: waited for, not assumed).
            let started = tokio::time::timeout(Duration::from_secs(10), life.recv()).await;
            assert_eq!(started.ok().flatten(), Some(Life::Started), "isolation {isolated}, {way}");
            let kept = if way == "close" {
                drop(std);
                None
            } else {
                std.shutdown(std::net::Shutdown::Write).unwrap();
                Some(std)
            };
            let seen = tokio::time::timeout(Duration::from_secs(3), life.recv()).await;
            assert_eq!(
                seen.ok().flatten(),
                Some(Life::Dropped),
                "isolation {isolated}, {way}: the handler was not dropped within 3 s"
            );
            drop(kept);
        }
        server.shutdown().await.unwrap();
    }
}
