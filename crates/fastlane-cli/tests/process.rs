//! The `fastlane` binary as a user runs it: a real process, real signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `fastlane demo` child process on a free port, killed if the test fails.
struct Demo {
    child: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
}

impl Demo {
    fn start(extra: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["demo", "--port", "0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fastlane demo");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("fastlane demo on http://") {
                    let _ = addr_tx.send(rest.trim().to_owned());
                }
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("the demo printed its address");
        Demo { child, addr, stderr: err_rx }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id() as i32;
        #[allow(unsafe_code)]
        // SAFETY: sends a signal to our own child process, by its PID.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0);
    }

    /// Waits for the exit and returns (exit code, all stderr lines).
    fn wait(mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the readers drain
                let lines = self.stderr.try_iter().collect();
                return (status.code(), lines);
            }
            assert!(Instant::now() < deadline, "the demo did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> fastlane::client::Response {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(fastlane::client::get(url)).expect("request")
}

#[test]
fn sigterm_drains_running_background_tasks_and_exits_zero() {
    let demo = Demo::start(&[]);
    assert_eq!(get(&demo.url("/?action=1&secs=1.5")).status, 200);
    assert_eq!(get(&demo.url("/?action=3&secs=1.5")).status, 200);
    let sent = Instant::now();
    demo.signal(libc::SIGTERM);
    let (code, stderr) = demo.wait(Duration::from_secs(20));
    let log = stderr.join("\n");
    assert_eq!(code, Some(0), "{log}");
    assert!(sent.elapsed() >= Duration::from_millis(1000), "exited before the tasks ended:\n{log}");
    assert!(log.contains("action 1 done"), "{log}");
    assert!(log.contains("action 3 done"), "{log}");
    assert!(log.contains("nothing was cut"), "{log}");
}

#[test]
fn work_cut_by_the_grace_period_is_reported_and_the_exit_code_says_so() {
    let demo = Demo::start(&["--grace-period", "0.5"]);
    assert_eq!(get(&demo.url("/?action=1&secs=20")).status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    demo.signal(libc::SIGINT);
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
    assert!(stdout.contains("overlapped (ran in parallel): up to 2 in flight"), "{stdout}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg"));
    assert_eq!(chart.matches("<rect x=").count(), 2, "{chart}");
}
