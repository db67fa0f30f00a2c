//! A fuzz harness for the runners' reactor and the connections it serves:
//! random byte streams (HTTP/1 requests whole, cut short or mangled, HTTP/2
//! prefaces and frames, garbage), sent in pieces split at random points with
//! random pauses, ended in random ways (left open, half-closed, closed,
//! reset), against a real server over real sockets.
//!
//! What must hold for every case: the connection ends (answered or closed)
//! within its deadlines, so the server never holds a connection it will not
//! serve; and afterwards no runner is stuck, no connection is left open on
//! the server's side, and a fast request is answered at once.
//!
//! Bounded in count and time (`FASTLANE_FUZZ_CASES`, default 400;
//! `FASTLANE_FUZZ_SECS`, default 25). Every run prints its seed; a failure
//! prints the case. `FASTLANE_FUZZ_SEED=N` replays a run.

mod support;

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use axum::Router;
use fastlane::{client, Config};
use support::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server's deadlines, short so that a run covers many cases.
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(800);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// Cases in flight at once.
const PARALLEL: usize = 24;

/// xorshift64*: small, fast, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn app() -> Router {
    Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route("/echo", post(|body: Bytes| async move { body }))
        .route(
            "/block/{ms}",
            get(|axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                // The seeds' bug, in small doses: isolation must hold under
                // the fuzz too.
                std::thread::sleep(Duration::from_millis(ms.min(40)));
                "slept"
            }),
        )
        .route(
            "/stream",
            get(|| async {
                let chunks = futures_util::stream::unfold(0, |i| async move {
                    if i == 3 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Ok::<_, std::convert::Infallible>(Bytes::from(format!("chunk {i}\n"))), i + 1))
                });
                Body::from_stream(chunks)
            }),
        )
}

const PATHS: &[&str] = &["/fast", "/echo", "/block/5", "/block/40", "/stream", "/nope", "*", "/fast?x=%ZZ"];

/// One piece of a case's byte stream.
fn piece(rng: &mut Rng) -> Vec<u8> {
    let path = PATHS[rng.below(PATHS.len())];
    match rng.below(9) {
        0 | 1 => {
            let close = if rng.chance(20) { "Connection: close\r\n" } else { "" };
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{close}\r\n").into_bytes()
        }
        2 => {
            // A body of the declared length, or less (cut short).
            let len = rng.below(300);
            let sent = if rng.chance(30) { rng.below(len + 1) } else { len };
            let expect = if rng.chance(15) { "Expect: 100-continue\r\n" } else { "" };
            let mut bytes =
                format!("POST /echo HTTP/1.1\r\nHost: t\r\n{expect}Content-Length: {len}\r\n\r\n")
                    .into_bytes();
            bytes.extend(rng.bytes(sent));
            bytes
        }
        3 => {
            let mut bytes = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..rng.below(4) {
                let len = rng.below(40);
                bytes.extend(format!("{len:x}\r\n").into_bytes());
                bytes.extend(rng.bytes(len));
                bytes.extend_from_slice(b"\r\n");
            }
            if rng.chance(70) {
                bytes.extend_from_slice(b"0\r\n\r\n");
            }
            bytes
        }
        4 => {
            let n = rng.below(64);
            rng.bytes(n)
        }
        5 => {
            // A header far longer than any sane one.
            let mut bytes = format!("GET {path} HTTP/1.1\r\nX-Long: ").into_bytes();
            let n = 1000 + rng.below(100_000);
            bytes.extend(std::iter::repeat_n(b'a', n));
            bytes.extend_from_slice(b"\r\n\r\n");
            bytes
        }
        6 => format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .into_bytes(),
        _ => http2(rng),
    }
}

/// An HTTP/2 connection's start, then random frames: some well formed (a
/// GET of a known path), most not.
fn http2(rng: &mut Rng) -> Vec<u8> {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    if rng.chance(20) {
        bytes.truncate(rng.below(bytes.len()));
        return bytes;
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    if rng.chance(85) {
        bytes.extend(frame(0x4, 0, 0, &[]));
    }
    for i in 0..rng.below(5) {
        let stream = 2 * i as u32 + 1;
        match rng.below(4) {
            0 => {
                // GET /fast: :method GET, :scheme http, :path /fast (literal).
                let mut block = vec![0x82, 0x86, 0x04, 5];
                block.extend_from_slice(b"/fast");
                let flags = if rng.chance(80) { 0x4 | 0x1 } else { 0x1 };
                bytes.extend(frame(0x1, flags, stream, &block));
            }
            1 => {
                let payload = {
                    let n = rng.below(30);
                    rng.bytes(n)
                };
                bytes.extend(frame(rng.below(10) as u8, rng.below(256) as u8, stream, &payload));
            }
            2 => {
                // A frame whose length runs past what is sent.
                let mut f = frame(0x1, 0x4, stream, &rng.bytes(10));
                f[2] = 200;
                bytes.extend(f);
            }
            _ => bytes.extend({
                let n = rng.below(20);
                rng.bytes(n)
            }),
        }
    }
    bytes
}

/// How the client ends its side.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Sends everything, then waits for the server to close.
    KeepOpen,
    /// Half-closes (FIN) after sending, or partway through.
    HalfClose { partway: bool },
    /// Closes the socket outright.
    Close,
    /// Closes with a reset (SO_LINGER 0).
    Reset,
}

#[derive(Debug)]
struct Case {
    index: usize,
    bytes: Vec<u8>,
    /// (length of each piece sent, pause after it in ms)
    pieces: Vec<(usize, u64)>,
    ending: Ending,
}

fn case(rng: &mut Rng, index: usize) -> Case {
    let mut bytes = Vec::new();
    for _ in 0..1 + rng.below(3) {
        bytes.extend(piece(rng));
    }
    if rng.chance(20) && !bytes.is_empty() {
        // Mangle a few bytes.
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            bytes[at] = rng.next() as u8;
        }
    }
    if rng.chance(10) {
        bytes.truncate(rng.below(bytes.len() + 1));
    }
    let mut pieces = Vec::new();
    let mut left = bytes.len();
    while left > 0 {
        let most = if rng.chance(50) { 8 } else { 4096 };
        let len = 1 + rng.below(left.min(most));
        let pause = if rng.chance(30) { rng.below(120) as u64 } else { 0 };
        pieces.push((len, pause));
        left -= len;
    }
    let ending = match rng.below(5) {
        0 | 1 => Ending::KeepOpen,
        2 => Ending::HalfClose { partway: rng.chance(30) },
        3 => Ending::Close,
        _ => Ending::Reset,
    };
    Case { index, bytes, pieces, ending }
}

/// Plays a case; returns an error saying what went wrong.
async fn play(addr: std::net::SocketAddr, case: &Case) -> Result<(), String> {
    let mut conn = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut at = 0;
    let mut paused = 0;
    let half_at = match case.ending {
        Ending::HalfClose { partway: true } => case.pieces.len() / 2,
        _ => case.pieces.len(),
    };
    for (i, (len, pause)) in case.pieces.iter().enumerate() {
        if i == half_at {
            break;
        }
        // The server may close first (a bad request): that is an end too.
        if conn.write_all(&case.bytes[at..at + len]).await.is_err() {
            return Ok(());
        }
        at += len;
        if *pause > 0 {
            tokio::time::sleep(Duration::from_millis(*pause)).await;
            paused += pause;
        }
    }
    match case.ending {
        Ending::Close => return Ok(()),
        Ending::Reset => {
            // A linger of zero never blocks the drop: it sends a reset.
            #[allow(deprecated)]
            let _ = conn.set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        Ending::HalfClose { .. } => {
            let _ = conn.shutdown().await;
        }
        Ending::KeepOpen => {}
    }
    // The longest a case may take to end once it has been sent: a request
    // held to its timeout, then the idle connection (or an HTTP/2 one asked
    // to close, then cut) held to the header-read timeout twice over, plus
    // the idle watch's period and a margin for a loaded machine.
    let deadline = REQUEST_TIMEOUT + HEADER_READ_TIMEOUT * 2 + Duration::from_secs(3);
    let started = Instant::now();
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at((started + deadline).into(), conn.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "still open {deadline:?} after the last byte was sent ({paused} ms of pauses), {received} bytes received"
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(n)) => received += n,
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn gauge(metrics: &str, name: &str) -> Option<i64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_streams_split_and_half_closed_at_random_always_end_within_their_deadlines() {
    let seed = env_number("FASTLANE_FUZZ_SEED", 0);
    let seed = if seed == 0 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    } else {
        seed
    };
    let cases = env_number("FASTLANE_FUZZ_CASES", 400) as usize;
    let budget = Duration::from_secs(env_number("FASTLANE_FUZZ_SECS", 25));
    eprintln!("fuzz seed {seed} (replay with FASTLANE_FUZZ_SEED={seed}), up to {cases} cases or {budget:?}");
    let config = Config {
        header_read_timeout: HEADER_READ_TIMEOUT,
        request_timeout: Some(REQUEST_TIMEOUT),
        expose_internal: true,
        ..Config::default()
    };
    let server = start(app(), config).await;
    let addr = server.local_addr();
    let mut rng = Rng(seed);
    let all: Vec<Case> = (0..cases).map(|i| case(&mut rng, i)).collect();
    let started = Instant::now();
    let mut played = 0;
    let mut failures = Vec::new();
    for batch in all.chunks(PARALLEL) {
        if started.elapsed() > budget {
            break;
        }
        let runs: Vec<_> = batch
            .iter()
            .map(|case| {
                let bytes = case.bytes.clone();
                let pieces = case.pieces.clone();
                let (index, ending) = (case.index, case.ending);
                tokio::spawn(async move {
                    let case = Case { index, bytes, pieces, ending };
                    let result = play(addr, &case).await;
                    (case, result)
                })
            })
            .collect();
        for run in runs {
            let (case, result) = run.await.unwrap();
            played += 1;
            if let Err(error) = result {
                failures.push(format!(
                    "case {} ({:?}, pieces {:?}): {error}\n  bytes: {:?}",
                    case.index,
                    case.ending,
                    case.pieces,
                    String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(400)])
                ));
            }
        }
    }
    eprintln!("{played} cases played in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {played} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(played >= 50, "only {played} cases in the time budget");

    // After the storm: every connection closed on the server's side too, no
    // runner stuck, and a fast request is answered at once.
    let deadline = Instant::now() + REQUEST_TIMEOUT + HEADER_READ_TIMEOUT * 2 + Duration::from_secs(3);
    let metrics = loop {
        let metrics = client::get(&server.url("/metrics")).await.unwrap().text();
        let settled = gauge(&metrics, "fastlane_http_connections_open") == Some(1)
            && gauge(&metrics, "fastlane_isolation_stuck_threads") == Some(0);
        if settled || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The one connection open is the scrape's own.
    assert_eq!(gauge(&metrics, "fastlane_http_connections_open"), Some(1), "seed {seed}:\n{metrics}");
    assert_eq!(gauge(&metrics, "fastlane_isolation_stuck_threads"), Some(0), "seed {seed}:\n{metrics}");
    let fast_started = Instant::now();
    assert_eq!(client::get(&server.url("/fast")).await.unwrap().text(), "ok");
    assert!(fast_started.elapsed() < Duration::from_secs(1), "seed {seed}");
    server.shutdown().await.unwrap();
}
