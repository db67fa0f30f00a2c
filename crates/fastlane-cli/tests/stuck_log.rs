//! A `fastlane demo` whose stderr nobody reads: the log must never make a
//! request wait. Lines that do not fit are dropped, counted in `/metrics`
//! and said in the log when it flows again.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One request on a kept-alive connection; returns the status and body.
fn request(conn: &mut BufReader<TcpStream>, path: &str) -> (u16, String) {
    let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    conn.get_mut().write_all(head.as_bytes()).expect("send");
    let mut status_line = String::new();
    if let Err(err) = conn.read_line(&mut status_line) {
        panic!(
            "no answer to {} within 10 s ({err}): the request is waiting for the log",
            &path[..path.len().min(20)]
        );
    }
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    let mut length = 0;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().expect("a length");
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn a_stderr_nobody_reads_never_makes_a_request_wait() {
    let jobs_db = support::temp_jobs_db();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["demo", "--port", "0"])
        .env("FASTLANE_JOBS_URL", format!("sqlite://{}", jobs_db.display()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        // A pipe that this test does not read until the end: once its 64 KiB
        // are full, a write to it blocks.
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fastlane demo");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).expect("stdout") > 0,
            "the demo ended before printing its address"
        );
        if let Some(rest) = line.strip_prefix("fastlane demo on http://") {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));

    // 404s of a long path: an access line of about 1 KiB each, so that the
    // pipe and the 1 MiB the log may hold are full after some 1,100 requests.
    let path = format!("/{}", "x".repeat(1000));
    let stream = TcpStream::connect(&addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = BufReader::new(stream);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..3000 {
        let asked = Instant::now();
        let (status, _) = request(&mut conn, &path);
        assert_eq!(status, 404);
        slowest = slowest.max(asked.elapsed());
    }
    eprintln!("3000 requests in {:?}, the slowest {slowest:?}", started.elapsed());
    assert!(slowest < Duration::from_secs(2), "a request waited {slowest:?} for the log");

    let (status, metrics) = request(&mut conn, "/metrics");
    assert_eq!(status, 200);
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fastlane_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fastlane_log_lines_dropped_total in\n{metrics}"));
    assert!(dropped > 0, "nothing dropped: the log held 3,000 lines of 1 KiB?");

    // Once stderr is read again, the log says where lines went missing.
    let mut stderr = child.stderr.take().unwrap();
    support::send_signal(child.id(), rustix::process::Signal::TERM);
    let mut log = String::new();
    stderr.read_to_string(&mut log).expect("read the log");
    let status = child.wait().expect("the demo exits");
    let _ = std::fs::remove_file(&jobs_db);
    assert!(status.success(), "exit {status:?}");
    assert!(log.contains("log line(s) dropped here"), "{}", &log[log.len().saturating_sub(2000)..]);
    // The lines of the stop are all out by the exit: the log is flushed then.
    assert!(log.contains("shutdown complete"), "{}", &log[log.len().saturating_sub(1000)..]);
}
