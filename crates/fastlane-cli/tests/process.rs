//! The `fastlane` binary as a user runs it: a real process, real signals.

mod support;

use rustix::process::Signal;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{get, Demo};

#[test]
fn sigterm_drains_running_background_tasks_and_exits_zero() {
    let demo = Demo::start(&[]);
    let ids: Vec<String> = ["/?action=1&secs=1.5", "/?action=3&secs=1.5"]
        .into_iter()
        .map(|path| {
            let response = get(&demo.url(path));
            assert_eq!(response.status, 200);
            response.headers["x-request-id"].to_str().unwrap().to_owned()
        })
        .collect();
    let sent = Instant::now();
    demo.signal(Signal::TERM);
    let (code, stderr) = demo.wait(Duration::from_secs(20));
    let log = stderr.join("\n");
    assert_eq!(code, Some(0), "{log}");
    assert!(sent.elapsed() >= Duration::from_millis(1000), "exited before the tasks ended:\n{log}");
    assert!(log.contains("action 1 done"), "{log}");
    assert!(log.contains("action 3 done"), "{log}");
    assert!(log.contains("nothing was cut"), "{log}");
    // Each task's line names the request that scheduled it, as the lines a
    // handler logs do (blocking lane and async task alike).
    for (what, id) in ["action 1 done", "action 3 done"].into_iter().zip(&ids) {
        let line = log.lines().find(|l| l.contains(what)).unwrap();
        assert!(line.contains(&format!(" INFO request{{id={id}}}: fastlane_cli::demo: {what}")), "{line}");
    }
    // Durations read as a person writes them: `drained_in=1.4s`, never `1.5483e-5`.
    let done = log.lines().find(|l| l.contains("nothing was cut")).unwrap();
    let drained = done.split("drained_in=").nth(1).unwrap_or_default();
    assert!(drained.ends_with('s') && !drained.contains("e-"), "{done}");
}

#[test]
fn work_cut_by_the_grace_period_is_reported_and_the_exit_code_says_so() {
    let demo = Demo::start(&["--grace-period", "0.5"]);
    assert_eq!(get(&demo.url("/?action=1&secs=20")).status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    demo.signal(Signal::INT);
    let (code, stderr) = demo.wait(Duration::from_secs(10));
    let log = stderr.join("\n");
    assert_eq!(code, Some(1), "{log}");
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert!(log.contains("shutdown cut background task GET / (blocking lane), had run"), "{log}");
}

#[test]
fn a_bad_flag_is_named_in_the_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["demo", "--blocking-threads", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--blocking-threads"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_fastlane")).args(["probe", "https://x/"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not an http:// URL"));
}

#[test]
fn probe_shows_overlap_and_writes_the_svg_timeline() {
    let demo = Demo::start(&[]);
    let svg = std::env::temp_dir().join(format!("fastlane-probe-{}.svg", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["probe", "-n", "2", "-c", "2", "--svg"])
        .arg(&svg)
        .arg(demo.url("/slow/sync?secs=1"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("overlapped (ran in parallel): up to 2 served at once"), "{stdout}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg"));
    // Two bars and the legend's three keys; each bar's label names its URL.
    assert_eq!(chart.matches("<rect x=").count(), 2 + 3, "{chart}");
    assert_eq!(chart.matches(">/slow/sync?secs=1 200 ").count(), 2, "{chart}");
    assert!(chart.contains("time since the first request was sent"), "{chart}");
}

#[test]
fn a_streamed_response_is_logged_when_its_body_ends() {
    let demo = Demo::start(&[]);
    // Three chunks, 300 ms apart: the headers come at once, the body ends
    // after about 0.9 s; the line and the latency histogram measure to the end.
    let response = get(&demo.url("/stream/blocking?chunks=3&secs=0.3"));
    let id = response.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(response.text(), "chunk 0\nchunk 1\nchunk 2\n");
    let needle = "fastlane::request: GET /stream/blocking 200 ";
    assert!(demo.wait_for_log(needle, Duration::from_secs(5)).is_some(), "no access log line");
    let line = demo.log.lock().unwrap().iter().find(|l| l.contains(needle)).cloned().unwrap();
    let ms: f64 =
        line.split("200 ").nth(1).and_then(|rest| rest.split("ms").next()).unwrap().parse().unwrap();
    assert!(ms >= 850.0, "{line}");
    assert!(line.contains("(headers "), "{line}");
    // Its body's producer blocks 300 ms per chunk: those stalls name the
    // request as the handler's would.
    let stalls = demo.lines_with("GET /stream/blocking blocked its thread for");
    assert!(!stalls.is_empty(), "no stall line for the body");
    for stall in &stalls {
        assert!(stall.contains(&format!("request_id={id}")), "{stall}");
    }
}

#[test]
fn the_demo_prints_its_routes_and_a_curl_line_and_logs_every_request() {
    let demo = Demo::start(&[]);
    assert_eq!(get(&demo.url("/test1")).text(), "test1");
    assert_eq!(get(&demo.url("/test2?secs=x")).status, 422);
    // The seed article's `log_requests` line: method, matched route, status, duration.
    assert!(demo.wait_for_log("fastlane::request: GET /test1 200 ", Duration::from_secs(5)).is_some());
    assert!(demo.wait_for_log("fastlane::request: GET /test2 422 ", Duration::from_secs(5)).is_some());
    let out = demo.out.lock().unwrap().join("\n");
    for route in
        ["GET  /fast", "GET  /test2?secs=8", "GET  /slow/sync?secs=N", "POST /profile", "GET  /metrics"]
    {
        assert!(out.contains(route), "route `{route}` not printed:\n{out}");
    }
    assert!(out.contains("try:  curl 'http://"), "no curl line:\n{out}");
    // The probe hint names the binary that runs, which need not be on the PATH.
    let me = env!("CARGO_BIN_EXE_fastlane");
    assert!(out.contains(&format!("{me} probe -n 2")), "the hint does not name {me}:\n{out}");
    assert!(out.contains("kept across restarts"), "{out}");
    drop(out);
    let (code, _) = demo.wait_after_term();
    assert_eq!(code, Some(0));
}

#[test]
fn probe_tells_requests_that_were_answered_in_turn() {
    // Plain-axum behaviour: no isolation, one runtime thread, and /test2
    // blocks it. Both requests are sent at once; the server answers in turn.
    let demo = Demo::start_with_env(&["--no-isolation"], &[("TOKIO_WORKER_THREADS", "1")]);
    let output = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["probe", "-n", "2", "-c", "2"])
        .arg(demo.url("/test2?secs=1"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ran one after another: sent together (up to 2 in flight)"), "{stdout}");
}

#[test]
fn request_data_cannot_forge_or_flood_log_lines() {
    let demo = Demo::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let post = |name: &str| {
        let body = serde_json::json!({ "name": name, "work_ms": 1 });
        rt.block_on(fastlane::client::post_json(&demo.url("/profile"), &body)).expect("request").status
    };
    let forged = "x\n2026-11-26T00:00:00.000000Z ERROR fastlane::server: FAKE\r\u{1b}[2K";
    assert_eq!(post(forged), 200);
    assert_eq!(post(&"y".repeat(2_000_000)), 200);
    assert!(demo.wait_for_count("profile computed", 2, Duration::from_secs(10)));
    let log = demo.log.lock().unwrap().clone();
    assert!(!log.iter().any(|line| line.contains("FAKE") && !line.contains("profile computed")), "{log:?}");
    let line = log.iter().find(|l| l.contains("FAKE")).unwrap();
    assert!(
        line.contains(r#"name=x\n2026-11-26T00:00:00.000000Z ERROR fastlane::server: FAKE\r\u{1b}[2K"#),
        "{line}"
    );
    let longest = log.iter().map(String::len).max().unwrap();
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(log.iter().any(|l| l.contains("yyyy…[") && l.contains("more bytes]")), "the cut is said");
}

#[test]
fn the_demo_help_shows_the_demo_own_request_timeout() {
    let output = Command::new(env!("CARGO_BIN_EXE_fastlane")).args(["demo", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    let line = help.lines().skip_while(|l| !l.contains("--request-timeout")).nth(1).unwrap_or_default();
    assert!(line.contains("[default: 90 in the demo]"), "{help}");
}

#[test]
fn log_level_and_access_log_flags_shape_the_log() {
    // --log-level warning: the stall warning, and no INFO line at all.
    let demo = Demo::start_with_env(&["--log-level", "warning"], &[("RUST_LOG", "")]);
    assert_eq!(get(&demo.url("/test1")).status, 200);
    assert_eq!(get(&demo.url("/cpu/async-blocking?ms=60")).status, 200);
    assert!(demo.wait_for_log("fastlane::stall", Duration::from_secs(5)).is_some());
    let log = demo.log.lock().unwrap().clone();
    assert!(!log.iter().any(|l| l.contains(" INFO ")), "{log:#?}");

    // --no-access-log: every line but the request lines.
    let demo = Demo::start_with_env(&["--no-access-log"], &[("RUST_LOG", "")]);
    assert_eq!(get(&demo.url("/test1")).status, 200);
    assert_eq!(get(&demo.url("/cpu/async-blocking?ms=60")).status, 200);
    assert!(demo.wait_for_log("fastlane::stall", Duration::from_secs(5)).is_some());
    let log = demo.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.contains(" INFO ") && l.contains("fastlane listening")), "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("fastlane::request")), "{log:#?}");
}

#[test]
fn log_format_json_writes_one_object_per_line_with_the_request_id() {
    let demo = Demo::start_with_env(&["--log-format", "json"], &[("RUST_LOG", "")]);
    let response = get(&demo.url("/test1"));
    assert_eq!(response.status, 200);
    let id = response.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(get(&demo.url("/cpu/async-blocking?ms=60")).status, 200);
    assert!(demo.wait_for_log("fastlane::stall", Duration::from_secs(5)).is_some());
    let log = demo.log.lock().unwrap().clone();
    let objects: Vec<serde_json::Value> = log
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")))
        .collect();
    // The access log line: its message, and the id the response carried.
    let access =
        objects.iter().find(|o| o["target"] == "fastlane::request").unwrap_or_else(|| panic!("{log:#?}"));
    assert!(access["fields"]["message"].as_str().unwrap().starts_with("GET /test1 200 "), "{access}");
    assert_eq!(access["fields"]["request_id"], id.as_str(), "{access}");
    assert!(access["level"] == "INFO" && access["timestamp"].is_string(), "{access}");
    assert!(objects.iter().any(|o| o["target"] == "fastlane::stall" && o["level"] == "WARN"), "{log:#?}");
}

#[test]
fn one_stall_gives_one_line_while_it_lasts_and_one_when_it_ends() {
    let demo = Demo::start(&[]);
    // The seeds' bug: an async fn that blocks its thread for 2 s.
    let response = get(&demo.url("/test2?secs=2"));
    assert_eq!(response.status, 200);
    let id = response.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(demo.wait_for_log("GET /test2 blocked its thread for", Duration::from_secs(5)).is_some());
    // A moment for a late line, if the monitor wrongly repeated itself.
    std::thread::sleep(Duration::from_millis(300));
    let lines = demo.lines_with("fastlane::stall");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let (during, after) = (&lines[0], &lines[1]);
    assert!(
        during.contains("GET /test2 has held its thread in one poll for") && during.contains("so far"),
        "{during}"
    );
    assert!(after.contains("GET /test2 blocked its thread for 2.0 s"), "{after}");
    for line in &lines {
        // Short: the route, how long, and the fix, on one line; and which
        // request it was, as its response and access log line say.
        assert!(line.contains("fastlane::blocking(..)"), "{line}");
        assert!(line.contains(&format!("request_id={id}")), "{line}");
        assert!(line.len() < 450, "{} chars: {line}", line.len());
    }
}

#[test]
fn a_stall_past_the_request_timeout_says_why_no_504_came() {
    let demo = Demo::start(&["--request-timeout", "1"]);
    // The seeds' bug blocks its thread for 2 s: the 1 s timeout cannot fire.
    assert_eq!(get(&demo.url("/test2?secs=2")).status, 200);
    assert!(demo.wait_for_log("timeout passed meanwhile", Duration::from_secs(5)).is_some());
    let line = demo.lines_with("blocked its thread for").pop().unwrap();
    assert!(
        line.contains("its 1.0s timeout passed meanwhile and could not fire: a timeout interrupts a handler only at an .await"),
        "{line}"
    );
    // A sync route is timed out as promised.
    assert_eq!(get(&demo.url("/slow/sync?secs=2")).status, 504);
}

#[test]
fn sighup_reloads_the_tls_certificate_and_a_bad_one_keeps_the_old() {
    let dir = std::env::temp_dir().join(format!("fastlane-demo-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (certfile, keyfile) = (dir.join("cert.pem"), dir.join("key.pem"));
    let write = |with_its_key: bool| {
        let names = vec!["localhost".to_owned()];
        let made = rcgen::generate_simple_self_signed(names.clone()).unwrap();
        std::fs::write(&certfile, made.cert.pem()).unwrap();
        let key = match with_its_key {
            true => made.key_pair.serialize_pem(),
            false => rcgen::generate_simple_self_signed(names).unwrap().key_pair.serialize_pem(),
        };
        std::fs::write(&keyfile, key).unwrap();
    };
    write(true);
    let (cert, key) = (certfile.to_str().unwrap(), keyfile.to_str().unwrap());
    let demo = Demo::start(&["--ssl-certfile", cert, "--ssl-keyfile", key]);
    assert!(demo.wait_for_log("fastlane listening on https://", Duration::from_secs(10)).is_some());
    // A renewal (certbot replacing both files), then SIGHUP.
    write(true);
    demo.signal(Signal::HUP);
    assert!(demo
        .wait_for_log("SIGHUP: reloaded the TLS certificate and key", Duration::from_secs(10))
        .is_some());
    // A key that is not the certificate's: the error names the file, the old pair stays.
    write(false);
    demo.signal(Signal::HUP);
    assert!(demo.wait_for_log("the old certificate stays", Duration::from_secs(10)).is_some());
    // (What the handshakes present after each reload: tests/tls.rs in the fastlane crate.)
    let (code, stderr) = demo.wait_after_term();
    let log = stderr.join("\n");
    assert_eq!(code, Some(0), "{log}");
    let failed = log.lines().find(|l| l.contains("the old certificate stays")).unwrap();
    assert!(failed.contains("key.pem") && failed.contains("is not the key of"), "{failed}");
    let _ = std::fs::remove_dir_all(dir);
}
