//! `fastlane serve`: a FastAPI app (`tests/asgi/app.py`) served as it is,
//! over real sockets, with the Python of the test virtualenv.
//!
//! The virtualenv comes from `.ci/python-env` (pinned FastAPI, uvicorn...);
//! `.ci/run` makes it and passes it as `FASTLANE_TEST_PYTHON`. Without it
//! every test here says it was skipped and passes.

mod support;

use rustix::process::Signal;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

fn apps_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/asgi")
}

/// A `fastlane serve` child process on a free port.
struct Served {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(python: &PathBuf, app: &str, extra: &[&str]) -> Served {
        Self::start_with_env(python, app, extra, &[])
    }

    fn start_with_env(python: &PathBuf, app: &str, extra: &[&str], env: &[(&str, &str)]) -> Served {
        Self::start_in(python, app, &apps_dir(), extra, env)
    }

    fn start_in(
        python: &PathBuf,
        app: &str,
        app_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["serve", app, "--port", "0", "--python"])
            .arg(python)
            .arg("--app-dir")
            .arg(app_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fastlane serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (log, addr_tx) = (log.clone(), addr_tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("fastlane listening on http://").nth(1) {
                        let _ = addr_tx.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => panic!("fastlane serve did not start:\n{}", log.lock().unwrap().join("\n")),
        };
        Served { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGTERM, then the exit code and the whole log.
    fn stop(mut self, limit: Duration) -> (Option<i32>, String) {
        support::send_signal(self.child.id(), Signal::TERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                return (status.code(), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "fastlane serve did not exit within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        support::stop_child(&mut self.child);
    }
}

fn send(method: Method, url: &str, body: Option<(&str, Bytes)>) -> fastlane::client::Response {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(fastlane::client::request(method, url, body)).expect("request")
}

fn get(url: &str) -> fastlane::client::Response {
    send(Method::GET, url, None)
}

fn json(response: &fastlane::client::Response) -> serde_json::Value {
    response.json().unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()))
}

#[test]
fn fastapi_features_work_over_the_live_server() {
    let Some(python) = support::test_python("fastapi_features_work_over_the_live_server") else { return };
    let served = Served::start(&python, "app:app", &[]);

    // Path, query and body parameters, and FastAPI's 422.
    let item = get(&served.url("/items/3?q=x&limit=5"));
    assert_eq!(json(&item), serde_json::json!({"item_id": 3, "q": "x", "limit": 5}));
    let bad = get(&served.url("/items/three"));
    assert_eq!(bad.status, 422);
    assert_eq!(json(&bad)["detail"][0]["loc"], serde_json::json!(["path", "item_id"]));
    let profile = send(
        Method::POST,
        &served.url("/profiles"),
        Some(("application/json", Bytes::from(r#"{"name":"Ada","age":36}"#))),
    );
    assert_eq!(json(&profile), serde_json::json!({"name": "Ada", "age": 36}));
    let missing = send(
        Method::POST,
        &served.url("/profiles"),
        Some(("application/json", Bytes::from(r#"{"name":"Ada"}"#))),
    );
    assert_eq!(missing.status, 422);
    assert_eq!(json(&missing)["detail"][0]["loc"], serde_json::json!(["body", "age"]));

    // A 10 MB multipart upload, streamed to the app through `receive`.
    let data: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let sample_sum = data.iter().step_by(4096).map(|&b| u64::from(b)).sum::<u64>() % 1_000_000_007;
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
    body.extend_from_slice(&data);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    let upload = send(
        Method::POST,
        &served.url("/upload"),
        Some(("multipart/form-data; boundary=XyZ", Bytes::from(body))),
    );
    assert_eq!(upload.status, 200, "{}", upload.text());
    assert_eq!(
        json(&upload),
        serde_json::json!({"filename": "big.bin", "size": 10 * 1024 * 1024, "sample_sum": sample_sum})
    );

    // A StreamingResponse arrives chunk by chunk, not at the end.
    let (first, total, text) = stream_timing(&served.addr, "/stream?n=3&delay=0.5");
    assert!(text.contains("chunk 0") && text.contains("chunk 2"), "{text}");
    assert!(first < Duration::from_millis(400), "the first chunk took {first:?}");
    assert!(total >= Duration::from_millis(900), "the stream ended after {total:?}");

    // FileResponse.
    let file = get(&served.url("/file"));
    assert_eq!(file.status, 200);
    assert_eq!(file.body.len(), 14 * 1000);
    assert!(file.headers["content-disposition"].to_str().unwrap().contains("data.txt"));

    // Middleware, exception handlers, HTTPException, an unhandled exception.
    assert_eq!(get(&served.url("/fast")).headers["x-middleware"], "ran");
    let teapot = get(&served.url("/teapot"));
    assert_eq!((teapot.status.as_u16(), json(&teapot)), (418, serde_json::json!({"handled": "teapot"})));
    let not_found = get(&served.url("/missing"));
    assert_eq!(
        (not_found.status.as_u16(), json(&not_found)),
        (404, serde_json::json!({"detail": "no such thing"}))
    );
    let boom = get(&served.url("/boom"));
    assert_eq!(boom.status, 500);
    assert!(
        served.wait_for_log("RuntimeError: boom, on purpose", Duration::from_secs(5)),
        "{}",
        served.log()
    );
    assert_eq!(get(&served.url("/fast")).status, 200, "the worker lives on after a 500");

    // Dependencies with yield close after the response; lifespan state.
    let dependency = json(&get(&served.url("/dependency")));
    assert_eq!(dependency["value"], "the resource");
    // The events are the worker's own (a spare may have started): ask until
    // that worker answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    let events = loop {
        let events = json(&get(&served.url("/events")));
        if events["pid"] == dependency["pid"] {
            break events["events"].clone();
        }
        assert!(Instant::now() < deadline, "the worker {} never answered again", dependency["pid"]);
    };
    assert_eq!(events, serde_json::json!(["opened", "closed"]));
    let state = json(&get(&served.url("/state")));
    assert_eq!(state, serde_json::json!({"app_state": "lifespan", "lifespan_state": "lifespan state"}));

    // BackgroundTasks, sync and async, run after the response.
    let scheduled = send(Method::POST, &served.url("/background?tag=bg1"), None);
    assert_eq!(json(&scheduled)["scheduled"], "bg1");
    assert!(served.wait_for_log("sync background task bg1 done", Duration::from_secs(5)), "{}", served.log());
    assert!(
        served.wait_for_log("async background task bg1 done", Duration::from_secs(5)),
        "{}",
        served.log()
    );

    // One access line per request, with the path.
    assert!(served.wait_for_log("GET /items/3 200", Duration::from_secs(2)), "{}", served.log());
    let (code, log) = served.stop(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
    // Every client here read its whole response: none is logged as cut
    // short (a body whose declared length has all come is whole, though
    // the http middleware sends an empty last message after it).
    assert!(!log.contains("cut short"), "{log}");
    assert!(log.contains("lifespan shutdown in"), "{log}");
}

#[test]
fn request_bodies_stream_in_while_responses_stream_out() {
    let Some(python) = support::test_python("request_bodies_stream_in_while_responses_stream_out") else {
        return;
    };
    let served = Served::start(&python, "echo:app", &["--workers", "2"]);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (url, body) = (served.url("/echo"), Bytes::from(body.clone()));
            std::thread::spawn(move || {
                send(Method::POST, &url, Some(("application/octet-stream", body))).body
            })
        })
        .collect();
    for handle in handles {
        assert!(handle.join().unwrap() == body, "an echoed body differs from what was sent");
    }
}

#[test]
fn a_client_that_leaves_is_an_http_disconnect_for_the_app_and_a_499_in_the_log() {
    let Some(python) =
        support::test_python("a_client_that_leaves_is_an_http_disconnect_for_the_app_and_a_499_in_the_log")
    else {
        return;
    };
    let served = Served::start(&python, "echo:app", &[]);
    // The endpoint polls `request.is_disconnected()` for up to 20 s.
    let mut sock = TcpStream::connect(&served.addr).unwrap();
    write!(sock, "GET /watch?secs=20 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = json(&get(&served.url("/left")));
        if left.as_array().is_some_and(|l| !l.is_empty()) {
            break left;
        }
        assert!(Instant::now() < deadline, "the app never saw its client leave:\n{}", served.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(left[0].as_str().unwrap().starts_with("client left after"), "{left}");
    // The access log has the request, as nginx logs a request whose client closed it.
    assert!(served.wait_for_log("GET /watch 499", Duration::from_secs(5)), "{}", served.log());
    assert!(served.log().contains("the client went away"), "{}", served.log());
}

/// Time to the first body byte, time to the end, and the text of a GET.
fn stream_timing(addr: &str, path: &str) -> (Duration, Duration, String) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent = Instant::now();
    write!(sock, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if first.is_none() && text.contains("chunk 0") {
            first = Some(sent.elapsed());
        }
    }
    (first.unwrap_or(Duration::MAX), sent.elapsed(), text)
}

#[test]
fn test1_answers_at_once_while_test2_blocks_its_event_loop() {
    let Some(python) = support::test_python("test1_answers_at_once_while_test2_blocks_its_event_loop") else {
        return;
    };
    // One worker, as `uvicorn main:app` runs: the blocked loop is its only one.
    let served = Served::start(&python, "app:app", &["--expose-internal"]);
    let url = served.url("/test2?secs=8");
    let blocked = std::thread::spawn(move || {
        let sent = Instant::now();
        let response = get(&url);
        let id = response.headers["x-request-id"].to_str().unwrap().to_owned();
        (response.status.as_u16(), sent.elapsed(), id)
    });
    std::thread::sleep(Duration::from_millis(300));
    // Listed while it lasts, by route, with where it is stuck.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ongoing = loop {
        let rows = json(&get(&served.url("/_fastlane/stalls")));
        if let Some(row) = rows.as_array().unwrap().iter().find(|r| r["route"] == "/test2") {
            break row.clone();
        }
        assert!(Instant::now() < deadline, "/_fastlane/stalls never listed /test2: {rows}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // (A fresh worker's first request may also stall it briefly while the
    // app warms up, before the sleep: a stall of its own, counted apart.)
    assert_eq!((&ongoing["method"], &ongoing["ongoing"]), (&"GET".into(), &1.into()), "{ongoing}");
    assert!(ongoing["at"].as_str().unwrap().starts_with("app.py:"), "{ongoing}");
    for _ in 0..5 {
        let sent = Instant::now();
        let response = get(&served.url("/test1"));
        assert_eq!(response.text(), "\"test1\"");
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "/test1 took {:?} while /test2 blocked",
            sent.elapsed()
        );
    }
    let (status, took, id) = blocked.join().unwrap();
    assert_eq!(status, 200);
    assert!(took >= Duration::from_secs(8), "{took:?}");
    // The report names the request, the file and line, and the fix; and its end.
    assert!(
        served.wait_for_log("was blocked 8.0s by GET /test2", Duration::from_secs(2)),
        "{}",
        served.log()
    );
    let log = served.log();
    let first = log
        .lines()
        .find(|l| {
            l.contains("GET /test2 blocked the event loop of worker 1 for") && l.contains("so far at app.py:")
        })
        .unwrap_or_else(|| panic!("{log}"));
    assert!(first.contains("in test2: time.sleep(secs)"), "{first}");
    assert!(first.contains("`def` instead of `async def`"), "{first}");
    // Both lines name the request by the id its response carried.
    let last = log.lines().find(|l| l.contains("was blocked 8.0s by GET /test2")).unwrap();
    for line in [first, last] {
        assert!(line.contains(&format!("request_id={id}")), "{line}");
    }
    assert!(log.contains("started a worker (a spare"), "{log}");
    // Counted once it has ended, with how long it lasted.
    let rows = json(&get(&served.url("/_fastlane/stalls")));
    let row =
        rows.as_array().unwrap().iter().find(|r| r["route"] == "/test2").unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(row["ongoing"], 0, "{row}");
    assert!(row["count"].as_u64().unwrap() >= 1, "{row}");
    assert!(row["worst_ms"].as_f64().unwrap() >= 7_900.0, "{row}");
    assert!(row["at"].as_str().unwrap().contains("in test2: time.sleep(secs)"), "{row}");
}

#[test]
fn a_factory_app_is_served_and_an_oversized_body_gets_413() {
    let Some(python) = support::test_python("a_factory_app_is_served_and_an_oversized_body_gets_413") else {
        return;
    };
    let served = Served::start(&python, "app:create_app", &["--factory", "--body-limit", "1000"]);
    assert_eq!(get(&served.url("/fast")).status, 200);
    // Over --body-limit: 413 with a JSON body naming the limit, before the app runs.
    let big = send(
        Method::POST,
        &served.url("/profiles"),
        Some(("application/json", Bytes::from(vec![b' '; 2000]))),
    );
    assert_eq!(big.status, 413, "{}", big.text());
    assert!(json(&big)["error"].as_str().unwrap().contains("1000"), "{}", big.text());
}

#[test]
fn requests_a_blocked_loop_has_not_started_are_served_elsewhere_and_run_once() {
    let Some(python) =
        support::test_python("requests_a_blocked_loop_has_not_started_are_served_elsewhere_and_run_once")
    else {
        return;
    };
    // One worker, so that the requests sent right behind the blocking one
    // go to the same loop before anyone can know it is blocked. An app
    // without http middleware: Starlette's runs each endpoint in a task of
    // its own, a loop turn after its request started, so that requests read
    // in the same turn as the blocking one have started by the time it
    // blocks (they wait for it, and its report names them).
    let calls = std::env::temp_dir().join(format!("fastlane-test-calls-{}", std::process::id()));
    let _ = std::fs::remove_file(&calls);
    let served = Served::start_with_env(
        &python,
        "echo:app",
        &["--expose-internal", "--max-workers", "3"],
        &[("FASTLANE_TEST_CALLS_FILE", calls.to_str().unwrap())],
    );
    let mut answered = 0;
    for round in 0..3 {
        let url = served.url("/test2?secs=2");
        let blocked = std::thread::spawn(move || get(&url).status.as_u16());
        std::thread::sleep(Duration::from_millis(2));
        let probes: Vec<_> = (0..5)
            .map(|_| {
                let url = served.url("/test1");
                std::thread::spawn(move || {
                    let sent = Instant::now();
                    let response = get(&url);
                    (response.text(), sent.elapsed())
                })
            })
            .collect();
        for probe in probes {
            let (text, took) = probe.join().unwrap();
            assert_eq!(text, "\"test1\"");
            assert!(
                took < Duration::from_millis(1500),
                "round {round}: /test1 waited {took:?} behind the blocked loop"
            );
            answered += 1;
        }
        assert_eq!(blocked.join().unwrap(), 200);
        let metrics = get(&served.url("/metrics")).text();
        let moved = metric(&metrics, "fastlane_asgi_requests_moved_total");
        if moved >= 1.0 {
            // Each request ran exactly once, on one worker or another, even
            // those the blocked loop found taken back when it came to them.
            std::thread::sleep(Duration::from_millis(300));
            let lines = std::fs::read_to_string(&calls).unwrap_or_default();
            let _ = std::fs::remove_file(&calls);
            assert_eq!(
                lines.lines().count(),
                answered,
                "/test1 ran {} times for {answered} answers",
                lines.lines().count()
            );
            return;
        }
    }
    panic!("no request was taken back from the blocked loop in 3 rounds:\n{}", served.log());
}

/// A metric's value (summed over its label sets) from Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_websocket_echoes_text_and_bytes_and_closes_with_the_apps_code() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let Some(python) =
        support::test_python("a_websocket_echoes_text_and_bytes_and_closes_with_the_apps_code")
    else {
        return;
    };
    let served = Served::start(&python, "app:app", &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let connect = |path: &str, protocols: Option<&str>| {
            let mut request = format!("ws://{}{path}", served.addr).into_client_request().unwrap();
            if let Some(protocols) = protocols {
                request.headers_mut().insert("sec-websocket-protocol", protocols.parse().unwrap());
            }
            let addr = served.addr.clone();
            async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                tokio_tungstenite::client_async(request, stream).await
            }
        };
        let (mut ws, response) = connect("/ws", Some("chat, other")).await.expect("the handshake succeeds");
        assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo: hello"));
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![3u8, 2, 1]));
        // Many messages in a row: the flow control lets them all through, in order.
        for i in 0..100 {
            ws.send(Message::text(format!("m{i}"))).await.unwrap();
        }
        for i in 0..100 {
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("echo: m{i}")));
        }
        ws.send(Message::text("close")).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => {
                assert_eq!((u16::from(frame.code), frame.reason.as_str()), (4001, "asked to"))
            }
            other => panic!("expected the app's close, got {other:?}"),
        }

        // The client closes: the app sees websocket.disconnect with its code.
        let (mut ws, _) = connect("/ws", None).await.unwrap();
        let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "bye".into(),
        };
        ws.close(Some(normal)).await.unwrap();
        // A handshake the app closes before accepting is denied with 403.
        match connect("/ws-deny", None).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
            other => panic!("expected a 403 denial, got {:?}", other.map(|(_, r)| r.status())),
        }
    });
    assert!(
        served.wait_for_log("websocket closed by the client with code 1000", Duration::from_secs(5)),
        "{}",
        served.log()
    );
}

/// An app in a directory of its own, whose code a test can change.
fn versioned_app(version: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fastlane-reload-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    write_version(&dir, version);
    dir
}

fn write_version(dir: &std::path::Path, version: &str) {
    let source = format!(
        "import asyncio, os\nfrom fastapi import FastAPI\n\nVERSION = {version:?}\napp = FastAPI()\n\n\n\
         @app.get('/version')\nasync def version():\n    return {{'version': VERSION, 'pid': os.getpid()}}\n\n\n\
         @app.get('/sleep')\nasync def sleep(secs: float = 1):\n    await asyncio.sleep(secs)\n    return {{'version': VERSION}}\n"
    );
    std::fs::write(dir.join("versioned.py"), source).unwrap();
}

fn serve_dir(python: &PathBuf, dir: &std::path::Path, extra: &[&str]) -> Served {
    Served::start_in(python, "versioned:app", dir, extra, &[])
}

#[test]
fn sighup_reloads_the_code_without_dropping_a_request_and_a_broken_reload_keeps_the_old_workers() {
    let Some(python) = support::test_python("sighup_reloads_the_code_without_dropping_a_request") else {
        return;
    };
    let dir = versioned_app("one");
    let served = serve_dir(&python, &dir, &["--workers", "2"]);
    let before = json(&get(&served.url("/version")));
    assert_eq!(before["version"], "one");
    // A request in flight across the reload is answered by the old code.
    let url = served.url("/sleep?secs=1.5");
    let in_flight = std::thread::spawn(move || json(&get(&url)));
    std::thread::sleep(Duration::from_millis(200));
    write_version(&dir, "two");
    support::send_signal(served.child.id(), Signal::HUP);
    assert!(served.wait_for_log("reloaded: new workers", Duration::from_secs(30)), "{}", served.log());
    let after = json(&get(&served.url("/version")));
    assert_eq!(after["version"], "two");
    assert_ne!(after["pid"], before["pid"]);
    assert_eq!(in_flight.join().unwrap()["version"], "one");

    // Code that does not import: the reload fails, the running workers stay.
    std::fs::write(dir.join("versioned.py"), "this is not python\n").unwrap();
    support::send_signal(served.child.id(), Signal::HUP);
    assert!(
        served.wait_for_log("the reload failed; the old workers go on serving", Duration::from_secs(30)),
        "{}",
        served.log()
    );
    assert_eq!(json(&get(&served.url("/version")))["version"], "two");
    let (code, log) = served.stop(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reload_follows_changes_to_the_apps_files() {
    let Some(python) = support::test_python("reload_follows_changes_to_the_apps_files") else { return };
    let dir = versioned_app("one");
    let served = serve_dir(&python, &dir, &["--reload"]);
    assert_eq!(json(&get(&served.url("/version")))["version"], "one");
    write_version(&dir, "two");
    let deadline = Instant::now() + Duration::from_secs(30);
    while json(&get(&served.url("/version")))["version"] != "two" {
        assert!(Instant::now() < deadline, "the change was not picked up:\n{}", served.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served.log().contains("versioned.py changed; reloading"), "{}", served.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_requests_that_await_asyncio_sleep_finish_together() {
    let Some(python) = support::test_python("two_requests_that_await_asyncio_sleep_finish_together") else {
        return;
    };
    let served = Served::start(&python, "app:app", &[]);
    let sent = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let url = served.url("/sleep?secs=5");
            std::thread::spawn(move || get(&url).status.as_u16())
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap(), 200);
    }
    let took = sent.elapsed();
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(8), "two 5 s sleeps took {took:?}");
}

#[test]
fn a_blocking_background_task_kills_nothing_and_finishes() {
    let Some(python) = support::test_python("a_blocking_background_task_kills_nothing_and_finishes") else {
        return;
    };
    // gunicorn -t 10 kills this worker and loses the task; here nothing is killed.
    let served = Served::start(&python, "app:app", &["--timeout", "10"]);
    let scheduled = send(Method::POST, &served.url("/background?tag=b&block=15"), None);
    assert_eq!(scheduled.status, 200);
    // The worker that took the request runs its task to the end: never replaced.
    let pid = json(&scheduled)["pid"].as_u64().unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        let sent = Instant::now();
        assert_eq!(get(&served.url("/fast")).status, 200);
        assert!(sent.elapsed() < Duration::from_secs(1), "/fast took {:?} during the task", sent.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    let done = format!("blocking background task done after 15.0 s in process {pid}");
    assert!(served.wait_for_log(&done, Duration::from_secs(10)), "{}", served.log());
    let log = served.log();
    assert!(log.contains("a background task of POST /background blocked the event loop"), "{log}");
    assert!(!log.contains("exited unexpectedly"), "{log}");
}

#[test]
fn a_worker_that_dies_is_replaced_and_its_request_gets_502() {
    let Some(python) = support::test_python("a_worker_that_dies_is_replaced_and_its_request_gets_502") else {
        return;
    };
    let served = Served::start(&python, "app:app", &[]);
    let crashed = get(&served.url("/crash"));
    assert_eq!(crashed.status, 502, "{}", crashed.text());
    assert!(crashed.text().contains("exited while serving this request"), "{}", crashed.text());
    assert!(served.wait_for_log("exited unexpectedly", Duration::from_secs(5)), "{}", served.log());
    // The dead worker's pid, from its log line; a spare may have started
    // before, so the one answering next is not necessarily its replacement.
    let log = served.log();
    let line = log.lines().find(|l| l.contains("exited unexpectedly")).unwrap();
    let dead = line.split("(pid ").nth(1).and_then(|r| r.split(')').next()).unwrap().to_owned();
    assert!(
        served.wait_for_log("started a worker (a replacement)", Duration::from_secs(10)),
        "{}",
        served.log()
    );
    for _ in 0..5 {
        let response = get(&served.url("/pid"));
        assert_eq!(response.status, 200, "{}", response.text());
        assert_ne!(json(&response)["pid"].to_string(), dead, "the dead worker answered");
    }
}

#[test]
fn workers_that_keep_dying_at_start_are_replaced_ever_more_slowly() {
    let Some(python) = support::test_python("workers_that_keep_dying_at_start_are_replaced_ever_more_slowly")
    else {
        return;
    };
    // Every worker exits 0.3 s after its lifespan startup.
    let served = Served::start_with_env(&python, "app:app", &[], &[("FASTLANE_TEST_DIE_AFTER", "0.3")]);
    for (n, wait) in [(1, "200ms"), (2, "400ms"), (3, "800ms")] {
        let line = format!("starting another in {wait} ({n} worker");
        assert!(served.wait_for_log(&line, Duration::from_secs(15)), "no {line:?} in:\n{}", served.log());
    }
    // Fewer than one replacement per 0.3 s: the delays above were waited.
    let log = served.log();
    let started = |l: &&str| l.contains("started a worker (a replacement)");
    let deaths = log.lines().filter(|l| l.contains("exited unexpectedly")).count();
    assert!(deaths <= 4, "{deaths} deaths by the third backoff:\n{log}");
    assert!(log.lines().filter(started).count() <= 3, "{log}");
}

#[test]
fn a_stall_names_the_requests_that_waited_for_it_and_is_counted() {
    let Some(python) = support::test_python("a_stall_names_the_requests_that_waited_for_it_and_is_counted")
    else {
        return;
    };
    // One worker and no spare: the request that waits is on the blocked loop.
    let served = Served::start(&python, "app:app", &["--max-workers", "1", "--expose-internal"]);
    assert_eq!(get(&served.url("/fast")).status, 200);
    let url = served.url("/sleep?secs=0.3");
    let waiting = std::thread::spawn(move || {
        let sent = Instant::now();
        (get(&url).status.as_u16(), sent.elapsed())
    });
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(get(&served.url("/test2?secs=1.5")).status, 200);
    let (status, took) = waiting.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_millis(1300),
        "/sleep took {took:?}: it did not wait for the blocked loop"
    );
    assert!(
        served.wait_for_log("by GET /test2", Duration::from_secs(5))
            && served.wait_for_log("GET /sleep waited for it", Duration::from_secs(5)),
        "{}",
        served.log()
    );
    let metrics = get(&served.url("/metrics")).text();
    assert!(metric(&metrics, "fastlane_asgi_stalls_total") >= 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "fastlane_asgi_spares_started_total"), 0.0, "{metrics}");
}

#[test]
fn a_module_imported_at_first_use_is_named_and_libraries_imports_are_done_before_the_fork() {
    let Some(python) = support::test_python(
        "a_module_imported_at_first_use_is_named_and_libraries_imports_are_done_before_the_fork",
    ) else {
        return;
    };
    let served = Served::start(&python, "app:app", &[]);
    // anyio imports its asyncio backend at first use, which was each
    // worker's first request: the zygote imports it before forking.
    assert_eq!(get(&served.url("/fast")).status, 200);
    assert_eq!(json(&get(&served.url("/lazy"))), serde_json::json!({"loaded": true}));
    assert!(served.wait_for_log("was blocked", Duration::from_secs(5)), "{}", served.log());
    let log = served.log();
    let line = log
        .lines()
        .find(|l| l.contains("GET /lazy blocked the event loop"))
        .unwrap_or_else(|| panic!("no stall line for /lazy:\n{log}"));
    assert!(line.contains("the module `lazy_heavy` is imported at its first use"), "{line}");
    assert!(!log.contains("anyio._backends"), "{log}");
}

#[test]
fn a_spare_started_for_a_blocked_loop_stops_when_idle() {
    let Some(python) = support::test_python("a_spare_started_for_a_blocked_loop_stops_when_idle") else {
        return;
    };
    let served = Served::start(&python, "app:app", &["--spare-idle-timeout", "1", "--expose-internal"]);
    let url = served.url("/test2?secs=1");
    let blocked = std::thread::spawn(move || get(&url).status.as_u16());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(&served.url("/test1")).status, 200);
    assert_eq!(blocked.join().unwrap(), 200);
    assert!(served.wait_for_log("started a worker (a spare", Duration::from_secs(5)), "{}", served.log());
    assert!(
        served.wait_for_log("stopping a spare worker, idle for 1.0s", Duration::from_secs(10)),
        "{}",
        served.log()
    );
    // Back to --workers: the gauge says one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(&served.url("/metrics")).text();
        if metric(&metrics, "fastlane_asgi_workers") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the spare never left:\n{metrics}\n{}", served.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metric(&get(&served.url("/metrics")).text(), "fastlane_asgi_spares_started_total") >= 1.0);
}

#[test]
fn malformed_requests_and_slow_clients_get_the_servers_limits() {
    let Some(python) = support::test_python("malformed_requests_and_slow_clients_get_the_servers_limits")
    else {
        return;
    };
    let served = Served::start(&python, "app:app", &["--timeout-keep-alive", "1"]);
    // A header line without a colon: 400, and the app never sees it.
    let mut sock = TcpStream::connect(&served.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(b"GET /fast HTTP/1.1\r\nHost x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // A client that sends half its headers and stops is cut off at the
    // header timeout, while others are served.
    let mut slow = TcpStream::connect(&served.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    slow.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    let sent = Instant::now();
    assert_eq!(get(&served.url("/fast")).status, 200);
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest);
    let took = sent.elapsed();
    assert!(
        closed.is_ok() || closed.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "not closed by the server: {closed:?} after {took:?}"
    );
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text:?}");
}

#[test]
fn sigterm_drains_background_tasks_and_reports_what_the_grace_period_cut() {
    let Some(python) =
        support::test_python("sigterm_drains_background_tasks_and_reports_what_the_grace_period_cut")
    else {
        return;
    };
    let served = Served::start(&python, "app:app", &[]);
    assert_eq!(send(Method::POST, &served.url("/background?tag=drained"), None).status, 200);
    let (code, log) = served.stop(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("sync background task drained done"), "{log}");
    assert!(log.contains("async background task drained done"), "{log}");
    assert!(log.contains("lifespan shutdown in"), "{log}");

    let served = Served::start(&python, "app:app", &["--grace-period", "1"]);
    assert_eq!(send(Method::POST, &served.url("/background?tag=cut&block=6"), None).status, 200);
    std::thread::sleep(Duration::from_millis(500));
    let (code, log) = served.stop(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("shutdown cut"), "{log}");
}

#[test]
fn apps_that_cannot_start_say_why_and_exit_non_zero() {
    let Some(python) = support::test_python("apps_that_cannot_start_say_why_and_exit_non_zero") else {
        return;
    };
    let cases = [
        ("nosuchmodule:app", "could not import module \"nosuchmodule\""),
        ("broken:app", "importing \"broken\" raised ValueError: this module fails at import, on purpose"),
        ("needs_dep:app", "its dependency \"a_package_that_is_not_installed\" is not installed"),
        ("not_asgi:app", "\"not_asgi:app\" is a int, not an ASGI app"),
        ("app:nothing", "attribute \"nothing\" not found in module \"app\""),
        ("app", "must be given as \"module:attribute\""),
        ("failing_startup:app", "the database is not reachable (on purpose)"),
    ];
    for (app, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["serve", app, "--port", "0", "--python"])
            .arg(&python)
            .arg("--app-dir")
            .arg(apps_dir())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{app}: {stderr}");
        let first = stderr
            .lines()
            .find(|l| l.starts_with("fastlane serve: "))
            .unwrap_or_else(|| panic!("{app}: {stderr}"));
        assert!(stderr.contains(expected), "{app}: expected `{expected}` in\n{stderr}");
        assert!(first.len() < 400, "{app}: the first line is too long: {first}");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["serve", "app:app", "--port", "0", "--python", "/nonexistent/python"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // What was tried, what to do, and (once) what the OS said.
    assert!(stderr.contains("could not run /nonexistent/python (pass --python"), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

#[test]
fn flags_that_mean_nothing_for_python_workers_are_refused_by_name() {
    // No Python needed: the flags are checked before anything starts.
    for (args, named) in [
        (&["--runners", "2"][..], "--runners"),
        (&["--blocking-threads", "4"], "--blocking-threads"),
        (&["--max-requests", "100"], "--max-requests"),
        (&["--stall-threshold-ms", "2"], "--stall-threshold-ms"),
        (&["--root-path", "api"], "--root-path"),
        (&["--workers", "4", "--max-workers", "2"], "--max-workers"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["serve", "app:app", "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_fastlane")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--max-workers") && help.contains("--reload") && !help.contains("--runners"),
        "{help}"
    );
}

#[test]
fn the_scope_is_the_one_uvicorn_gives() {
    let Some(python) = support::test_python("the_scope_is_the_one_uvicorn_gives") else { return };
    let served = Served::start(&python, "app:app", &["--root-path", "/api"]);
    let port = free_port();
    let uvicorn = Command::new(&python)
        .args([
            "-m",
            "uvicorn",
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--root-path",
            "/api",
        ])
        .arg("--app-dir")
        .arg(apps_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start uvicorn");
    // Stopped however the test ends (a failed assertion included).
    let _uvicorn = KillOnDrop(uvicorn);
    let peer = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "uvicorn did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for path in ["/scope?a=1&b=%20x", "/scope", "/scope?q=caf%C3%A9"] {
        let ours = json(&get(&served.url(path)));
        let theirs = json(&get(&format!("{peer}{path}")));
        // The one header fastlane adds: the request's id, the one its
        // access log line and stall reports name (uvicorn sends none).
        let mut ours = ours;
        let headers = ours["headers"].as_array_mut().unwrap();
        let at = headers.iter().position(|h| h[0] == "x-request-id").unwrap_or_else(|| panic!("{headers:?}"));
        let id = headers.remove(at)[1].as_str().unwrap().to_owned();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let without_server = |mut v: serde_json::Value| {
            // The ports differ (in `server` and the Host header); nothing else may.
            v["server"] = serde_json::Value::Null;
            for header in v["headers"].as_array_mut().unwrap() {
                if header[0] == "host" {
                    header[1] = serde_json::Value::Null;
                }
            }
            v
        };
        assert_eq!(without_server(ours.clone()), without_server(theirs.clone()), "{path}");
        assert_eq!(ours["server"][1], served.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
    }
    // The same answers to the same requests, statuses and bodies.
    for path in ["/items/7?q=a", "/items/x", "/missing", "/teapot", "/boom", "/nope", "/state"] {
        let ours = get(&served.url(path));
        let theirs = get(&format!("{peer}{path}"));
        assert_eq!((ours.status, ours.text()), (theirs.status, theirs.text()), "{path}");
    }
    // Proxy headers from 127.0.0.1, which both trust by default: the client
    // is the first untrusted hop from the right, the scheme the proxy's.
    let peer_addr = format!("127.0.0.1:{port}");
    for headers in [
        &[("X-Forwarded-For", "6.6.6.6, 5.6.7.8"), ("X-Forwarded-Proto", "https")][..],
        &[("X-Forwarded-For", "203.0.113.7")],
        &[("X-Forwarded-Proto", "https")],
    ] {
        let ours = raw_json(&served.addr, "/scope", headers);
        let theirs = raw_json(&peer_addr, "/scope", headers);
        assert_eq!(
            (&ours["client_host"], &ours["scheme"]),
            (&theirs["client_host"], &theirs["scheme"]),
            "{headers:?}"
        );
    }
    let forwarded = raw_json(&served.addr, "/scope", &[("X-Forwarded-For", "6.6.6.6, 5.6.7.8")]);
    assert_eq!(forwarded["client_host"], "5.6.7.8");
    // The access log names the client it believed.
    assert!(served.wait_for_log("client=5.6.7.8", Duration::from_secs(5)), "{}", served.log());
}

#[test]
fn proxy_headers_from_an_untrusted_peer_are_ignored() {
    let Some(python) = support::test_python("proxy_headers_from_an_untrusted_peer_are_ignored") else {
        return;
    };
    let spoofed = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https")];
    // 127.0.0.1 is not among the trusted: a client spoofing its address
    // and scheme is seen as what it is.
    let served = Served::start(&python, "app:app", &["--forwarded-allow-ips", "10.0.0.0/8, ::1"]);
    let scope = raw_json(&served.addr, "/scope", &spoofed);
    assert_eq!((&scope["client_host"], &scope["scheme"]), (&"127.0.0.1".into(), &"http".into()));
    assert!(served.wait_for_log("client=127.0.0.1", Duration::from_secs(5)), "{}", served.log());
    assert!(!served.log().contains("6.6.6.6"), "{}", served.log());
    // --no-proxy-headers ignores them from every peer.
    let off = Served::start(&python, "app:app", &["--no-proxy-headers", "--forwarded-allow-ips", "*"]);
    let scope = raw_json(&off.addr, "/scope", &spoofed);
    assert_eq!((&scope["client_host"], &scope["scheme"]), (&"127.0.0.1".into(), &"http".into()));
    // A list that is not addresses is refused, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["serve", "app:app", "--forwarded-allow-ips", "localhost"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--forwarded-allow-ips"), "{stderr}");
    assert!(stderr.contains("`localhost` is not an IP address"), "{stderr}");
}

/// A GET with extra headers over a plain socket (the test client sends
/// none of its own), and its JSON body.
fn raw_json(addr: &str, path: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no body: {response}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        support::stop_child(&mut self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
