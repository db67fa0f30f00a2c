//! The job dashboard over real sockets: `fastlane jobs ui` (standalone, on
//! 127.0.0.1 by default, with a token) refuses requests without the token and
//! actions without the page's anti-forgery header or from another site, and
//! its actions change the store; the demo serves the same page under
//! `/_fastlane/jobs/` (internal endpoints on). On SQLite always, on
//! PostgreSQL too when `FASTLANE_TEST_PG_URL` is set (said to be skipped
//! otherwise). The page in a real browser is `.ci/dashboard_browser.py`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{stop_child, temp_jobs_db, Demo, PgDatabase};

const TOKEN: &str = "s3cret-token";

fn fastlane(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fastlane")).args(args).output().expect("run fastlane");
    assert!(out.status.success(), "fastlane {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// One HTTP/1.1 request with `headers`, read until the server closes: the
/// status, the head's lines, the body.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    stream.write_all(format!("{request}\r\n").as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// `fastlane jobs ui` on a free port; its address.
struct Ui {
    child: Child,
    addr: String,
}

impl Ui {
    fn start(url: &str) -> Ui {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["jobs", "ui", "--url", url, "--port", "0", "--token", TOKEN])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains(&format!("/?token={TOKEN} ")), "the address to open, with its token: {line}");
        let addr = line
            .strip_prefix("fastlane jobs ui on http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Ui { child, addr }
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// The guards and actions of `fastlane jobs ui` on the store at `url`.
fn the_standalone_dashboard_guards_its_actions_and_they_change_the_store(url: &str) {
    let url = url.to_owned();
    let pending = fastlane(&["jobs", "enqueue", "--url", &url, "noop"]);
    let ui = Ui::start(&url);
    assert!(ui.addr.starts_with("127.0.0.1:"), "binds this machine only by default: {}", ui.addr);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];

    // No token, or a wrong one: 401, saying how to give it.
    for headers in
        [vec![], vec![("Authorization", "Bearer wrong")], vec![("Cookie", "fastlane_jobs_token=wrong")]]
    {
        let (status, _, body) = http(&ui.addr, "GET", "/api/overview", &headers);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("?token=TOKEN"), "{body}");
    }
    // Opening `/?token=` sets the cookie and drops the token from the address.
    let (status, head, _) = http(&ui.addr, "GET", &format!("/?token={TOKEN}"), &[]);
    assert_eq!(status, 303, "{head}");
    assert!(head.contains(&format!("fastlane_jobs_token={TOKEN}; HttpOnly; SameSite=Strict")), "{head}");
    assert!(head.to_ascii_lowercase().contains("location: /\r\n"), "{head}");
    let cookie = format!("fastlane_jobs_token={TOKEN}");
    let (status, head, page) = http(&ui.addr, "GET", "/", &[("Cookie", &cookie)]);
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-security-policy: default-src 'self'"), "{head}");
    let csrf =
        page.split("name=\"fastlane-csrf\" content=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
    assert_eq!(csrf.len(), 32, "{page}");
    for asset in ["/page.js", "/page.css"] {
        assert_eq!(http(&ui.addr, "GET", asset, &auth).0, 200, "{asset}");
    }
    let (status, _, body) = http(&ui.addr, "GET", "/api/jobs?state=bogus", &auth);
    assert_eq!(status, 400);
    assert!(body.contains("unknown state `bogus`"), "{body}");

    // Actions: refused without the page's header, with a wrong one, or from
    // another site; done with it.
    let path = format!("/api/jobs/{pending}/cancel");
    for extra in [
        vec![],
        vec![("x-fastlane-csrf", "0000")],
        vec![("x-fastlane-csrf", csrf), ("Origin", "http://evil.example")],
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().copied().chain(extra).collect();
        let (status, _, body) = http(&ui.addr, "POST", &path, &headers);
        assert_eq!(status, 403, "{body}");
    }
    let origin = format!("http://{}", ui.addr);
    let headers = [auth[0], ("x-fastlane-csrf", csrf), ("Origin", origin.as_str())];
    let (status, _, body) = http(&ui.addr, "POST", &path, &headers);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"cancelled\""), "{body}");
    let shown = fastlane(&["jobs", "show", "--url", &url, &pending]);
    assert!(shown.contains("\"state\": \"cancelled\""), "{shown}");
    // Retry it, then every dead job of a type (none).
    let (status, _, body) = http(&ui.addr, "POST", &format!("/api/jobs/{pending}/retry"), &headers);
    assert_eq!((status, body.contains("\"state\":\"available\"")), (200, true), "{body}");
    let (status, _, body) = http(&ui.addr, "POST", "/api/dead/retry?name=fail", &headers);
    assert_eq!((status, body.contains("\"retried\":0")), (200, true), "{body}");
    let (status, _, body) = http(&ui.addr, "POST", "/api/jobs/999999/retry", &headers);
    assert_eq!(status, 404, "{body}");
}

#[test]
fn the_standalone_dashboard_on_sqlite() {
    let db = temp_jobs_db();
    the_standalone_dashboard_guards_its_actions_and_they_change_the_store(&format!(
        "sqlite://{}",
        db.display()
    ));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

#[test]
fn the_standalone_dashboard_on_postgres() {
    let Some(db) = PgDatabase::create("the_standalone_dashboard_on_postgres", "fastlane_dashboard") else {
        return;
    };
    the_standalone_dashboard_guards_its_actions_and_they_change_the_store(&db.url);
}

#[test]
fn a_server_with_internal_endpoints_serves_the_dashboard_under_fastlane_jobs() {
    let demo = Demo::start(&[]);
    let addr = demo.url("").trim_start_matches("http://").to_owned();
    let (status, head, _) = http(&addr, "GET", "/_fastlane/jobs", &[]);
    assert_eq!(status, 308, "{head}");
    assert!(head.to_ascii_lowercase().contains("location: /_fastlane/jobs/"), "{head}");
    let (status, head, page) = http(&addr, "GET", "/_fastlane/jobs/", &[]);
    assert_eq!(status, 200, "{head}");
    assert!(page.contains("<script src=\"page.js\""), "the page's links are relative to it: {page}");
    assert!(head.to_ascii_lowercase().contains("x-request-id"), "under the app's middleware: {head}");
    let (status, _, body) = http(&addr, "GET", "/_fastlane/jobs/api/overview", &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"queues\""), "{body}");
    // An action from the demo's own page still needs its header.
    assert_eq!(http(&addr, "POST", "/_fastlane/jobs/api/dead/retry", &[]).0, 403);
}
