//! A `fastlane demo` child process for the tests that need real processes.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write as _};

use rustix::process::Signal;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `fastlane demo` child process on a free port, killed if the test fails.
pub struct Demo {
    child: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line so far, for looking while the process runs.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Every stdout line so far.
    pub out: Arc<Mutex<Vec<String>>>,
    /// The demo's job store file (its own, unless the test gave one), removed
    /// with its WAL files on drop.
    jobs_db: std::path::PathBuf,
}

/// A job store file of its own for each demo process a test starts.
pub fn temp_jobs_db() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "fastlane-test-jobs-{}-{}.db",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A directory of a test's own under the system's temporary one, removed
/// when dropped (a failing test's too).
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("fastlane-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    /// The URL of a SQLite job store in it.
    pub fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self.path.join("jobs.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Demo {
    pub fn start(extra: &[&str]) -> Demo {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Demo {
        let jobs_db = temp_jobs_db();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastlane"))
            .args(["demo", "--port", "0"])
            .args(extra)
            .env("FASTLANE_JOBS_URL", format!("sqlite://{}", jobs_db.display()))
            // Before the test's own, which may replace it.
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fastlane demo");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (addr_tx, addr_rx) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let out_writer = out.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let rest = line.strip_prefix("fastlane demo on http://");
                if let Some(rest) = rest.or_else(|| line.strip_prefix("fastlane demo on https://")) {
                    let _ = addr_tx.send(rest.trim().to_owned());
                }
                out_writer.lock().unwrap().push(line);
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                log_writer.lock().unwrap().push(line.clone());
                let _ = err_tx.send(line);
            }
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("the demo printed its address");
        Demo { child, addr, stderr: err_rx, log, out, jobs_db }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stderr line contains `needle`; returns when it appeared.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Waits until `count` stderr lines contain `needle`; returns whether
    /// they did within `limit`.
    pub fn wait_for_count(&self, needle: &str, count: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.count_log(needle) < count {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// The stderr lines so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// How many stderr lines so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn signal(&self, signal: Signal) {
        send_signal(self.child.id(), signal);
    }
}

/// Sends a signal to a process this test started (directly or through the
/// demo's supervisor), by its PID.
pub fn send_signal(pid: u32, signal: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a child's PID is positive");
    rustix::process::kill_process(pid, signal).expect("the signal is sent");
}

impl Demo {
    /// SIGTERM, then [`wait`](Self::wait) up to 20 s.
    pub fn wait_after_term(self) -> (Option<i32>, Vec<String>) {
        self.signal(Signal::TERM);
        self.wait(Duration::from_secs(20))
    }

    /// Waits for the exit and returns (exit code, all stderr lines).
    pub fn wait(mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
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
        self.stop();
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.jobs_db.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Demo {
    fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Ends a child process this test started: SIGTERM first, so that a
/// supervisor (or `fastlane serve`) takes its workers down with it; SIGKILL
/// after 10 s.
pub fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        send_signal(child.id(), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn get(url: &str) -> fastlane::client::Response {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(fastlane::client::get(url)).expect("request")
}

/// The test virtualenv's Python (FastAPI, uvicorn, openapi-spec-validator:
/// `.ci/python-env`), or `None`, after saying that `test` was skipped.
pub fn test_python(test: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let from_env = std::env::var_os("FASTLANE_TEST_PYTHON").map(PathBuf::from);
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv/bin/python");
    let python = from_env.or_else(|| local.exists().then_some(local));
    if python.is_none() {
        eprintln!(
            "skipped {test}: no Python with the test packages (run `bash .ci/python-env` and set \
             FASTLANE_TEST_PYTHON to the python it prints; .ci/run does both)"
        );
    }
    python
}

/// A fresh PostgreSQL database for one test, dropped with it; `None` (and a
/// line on stderr naming the skipped test) without `FASTLANE_TEST_PG_URL`.
pub struct PgDatabase {
    pub url: String,
    name: String,
    admin: sqlx::PgPool,
    pub rt: tokio::runtime::Runtime,
}

impl PgDatabase {
    pub fn create(test: &str, prefix: &str) -> Option<PgDatabase> {
        let Ok(admin_url) = std::env::var("FASTLANE_TEST_PG_URL") else {
            let _ = writeln!(std::io::stderr(), "skipped {test}: FASTLANE_TEST_PG_URL is not set");
            return None;
        };
        let name = format!("{prefix}_{}", std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let admin = rt.block_on(async {
            let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin).await.unwrap();
            sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
            admin
        });
        let (base, _) = admin_url.rsplit_once('/').expect("a database in FASTLANE_TEST_PG_URL");
        Some(PgDatabase { url: format!("{base}/{name}"), name, admin, rt })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = self.rt.block_on(sqlx::raw_sql(&sql).execute(&self.admin));
    }
}
