//! `fastlane serve`: a FastAPI app (`tests/asgi/app.py`) served as it is,
//! over real sockets, with the Python of the test virtualenv.
//!
//! The virtualenv comes from `.ci/python-env` (pinned FastAPI, uvicorn...);
//! `.ci/run` makes it and passes it as `FASTLANE_TEST_PYTHON`. Without it
//! every test here says it was skipped and passes.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

/// The test virtualenv's Python, or `None` (the test says it skipped).
fn python(test: &str) -> Option<PathBuf> {
    let from_env = std::env::var_os("FASTLANE_TEST_PYTHON").map(PathBuf::from);
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv/bin/python");
    let python = from_env.or_else(|| local.exists().then_some(local));
    if python.is_none() {
        eprintln!(
            "skipped {test}: no Python with FastAPI (run `bash .ci/python-env` and set FASTLANE_TEST_PYTHON to the \
             python it prints; .ci/run does both)"
        );
    }
    python
}

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
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["serve", app, "--port", "0", "--python"])
            .arg(python)
            .arg("--app-dir")
            .arg(apps_dir())
            .args(extra)
            .env("RUST_LOG", "info")
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
        support::send_signal(self.child.id(), libc::SIGTERM);
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
    let Some(python) = python("fastapi_features_work_over_the_live_server") else { return };
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
    assert_eq!(json(&get(&served.url("/dependency")))["value"], "the resource");
    assert_eq!(json(&get(&served.url("/events"))), serde_json::json!(["opened", "closed"]));
    let state = json(&get(&served.url("/state")));
    assert_eq!(state, serde_json::json!({"app_state": "lifespan", "lifespan_state": "lifespan state"}));

    // BackgroundTasks, sync and async, run after the response.
    let scheduled = send(Method::POST, &served.url("/background?tag=bg1"), None);
    assert_eq!(json(&scheduled), serde_json::json!({"scheduled": "bg1"}));
    assert!(served.wait_for_log("sync background task bg1 done", Duration::from_secs(5)), "{}", served.log());
    assert!(
        served.wait_for_log("async background task bg1 done", Duration::from_secs(5)),
        "{}",
        served.log()
    );

    // The request body streams through `receive` while the response streams back.
    let echoed = send(
        Method::POST,
        &served.url("/echo-stream"),
        Some(("application/octet-stream", Bytes::from(vec![7u8; 300_000]))),
    );
    assert_eq!(echoed.body.len(), 300_000);

    // One access line per request, with the path.
    assert!(served.wait_for_log("GET /items/3 200", Duration::from_secs(2)), "{}", served.log());
    let (code, log) = served.stop(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("lifespan shutdown in"), "{log}");
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
    let Some(python) = python("test1_answers_at_once_while_test2_blocks_its_event_loop") else { return };
    // One worker, as `uvicorn main:app` runs: the blocked loop is its only one.
    let served = Served::start(&python, "app:app", &[]);
    let url = served.url("/test2?secs=8");
    let blocked = std::thread::spawn(move || {
        let sent = Instant::now();
        let response = get(&url);
        (response.status.as_u16(), sent.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
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
    let (status, took) = blocked.join().unwrap();
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
    assert!(log.contains("started a worker (a spare"), "{log}");
}

#[test]
fn two_requests_that_await_asyncio_sleep_finish_together() {
    let Some(python) = python("two_requests_that_await_asyncio_sleep_finish_together") else { return };
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
    let Some(python) = python("a_blocking_background_task_kills_nothing_and_finishes") else { return };
    // gunicorn -t 10 kills this worker and loses the task; here nothing is killed.
    let served = Served::start(&python, "app:app", &["--timeout", "10"]);
    let pid = json(&get(&served.url("/pid")))["pid"].clone();
    assert_eq!(send(Method::POST, &served.url("/background?tag=b&block=15"), None).status, 200);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        let sent = Instant::now();
        assert_eq!(get(&served.url("/fast")).status, 200);
        assert!(sent.elapsed() < Duration::from_secs(1), "/fast took {:?} during the task", sent.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        served.wait_for_log("blocking background task done after 15", Duration::from_secs(10)),
        "{}",
        served.log()
    );
    let log = served.log();
    assert!(log.contains("a background task of POST /background blocked the event loop"), "{log}");
    assert!(!log.contains("exited unexpectedly"), "{log}");
    // The worker that ran the task is the one that answered first: never replaced.
    std::thread::sleep(Duration::from_millis(100));
    let pids: Vec<_> = (0..6).map(|_| json(&get(&served.url("/pid")))["pid"].clone()).collect();
    assert!(pids.contains(&pid), "{pid} is gone: {pids:?}");
}

#[test]
fn a_worker_that_dies_is_replaced_and_its_request_gets_502() {
    let Some(python) = python("a_worker_that_dies_is_replaced_and_its_request_gets_502") else { return };
    let served = Served::start(&python, "app:app", &[]);
    let before = json(&get(&served.url("/pid")))["pid"].clone();
    let crashed = get(&served.url("/crash"));
    assert_eq!(crashed.status, 502, "{}", crashed.text());
    assert!(crashed.text().contains("exited while serving this request"), "{}", crashed.text());
    assert!(served.wait_for_log("exited unexpectedly", Duration::from_secs(5)), "{}", served.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = get(&served.url("/pid"));
        if response.status == 200 {
            assert_ne!(json(&response)["pid"], before);
            break;
        }
        assert!(Instant::now() < deadline, "no worker replaced the one that died:\n{}", served.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_drains_background_tasks_and_reports_what_the_grace_period_cut() {
    let Some(python) = python("sigterm_drains_background_tasks_and_reports_what_the_grace_period_cut") else {
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
    let Some(python) = python("apps_that_cannot_start_say_why_and_exit_non_zero") else { return };
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
    assert!(String::from_utf8_lossy(&output.stderr).contains("could not run /nonexistent/python"));
}

#[test]
fn the_scope_is_the_one_uvicorn_gives() {
    let Some(python) = python("the_scope_is_the_one_uvicorn_gives") else { return };
    let served = Served::start(&python, "app:app", &["--root-path", "/api"]);
    let port = free_port();
    let mut uvicorn = Command::new(&python)
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
    let peer = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "uvicorn did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for path in ["/scope?a=1&b=%20x", "/scope", "/scope?q=caf%C3%A9"] {
        let ours = json(&get(&served.url(path)));
        let theirs = json(&get(&format!("{peer}{path}")));
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
    let _ = uvicorn.kill();
    let _ = uvicorn.wait();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
