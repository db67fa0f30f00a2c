//! The worker pool: starts the zygote (the Python process that imports the
//! app once), forks workers from it, chooses a worker for each request,
//! starts spares while every worker is stalled, replaces workers that die,
//! and stops them all at shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::frame;
use crate::worker::{self, FrameReader, Worker};
use crate::{AppConfig, StartError};

/// The worker's source, written next to the socket at start-up so that its
/// tracebacks name a real file.
const WORKER_SOURCE: &str = include_str!("../python/fastlane_worker.py");

/// A path that stalled a loop stays suspect this long after its last stall
/// ended: it may not take the last responsive worker meanwhile.
const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// Time a worker has for its lifespan shutdown once its work is done.
const LIFESPAN_SHUTDOWN: Duration = Duration::from_secs(5);

/// The most suspect paths remembered (a bound on memory, whatever the URLs).
const SUSPECTS_KEPT: usize = 1024;

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) stalls: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) spares_started: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

/// A fork asked for and not yet answered.
#[derive(Debug, Default)]
struct Pending {
    watchdog: Option<std::os::unix::net::UnixStream>,
    ready: Option<oneshot::Sender<Result<Arc<Worker>, String>>>,
}

/// What every request, the monitor and the companion share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: AppConfig,
    pub(crate) dir: PathBuf,
    pub(crate) workers: RwLock<Vec<Arc<Worker>>>,
    /// Signalled when a worker may have become able to take a request.
    pub(crate) available: Notify,
    /// Frames to the zygote; dropped (closing its socket, so it exits) at the end.
    zygote: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    next_number: AtomicU32,
    /// Forks asked for and not yet ready or failed.
    starting: AtomicUsize,
    pending: Mutex<HashMap<u32, Pending>>,
    pub(crate) stopping: AtomicBool,
    /// `GET /path` → when it last stalled a loop (`None`: stalling now).
    suspects: Mutex<HashMap<String, Option<Instant>>>,
    pub(crate) stats: Stats,
    /// Workers that died soon after starting, in a row: the backoff of the next.
    crashes: AtomicU32,
    /// Where the pool's tasks run (the monitor thread starts spares too).
    runtime: tokio::runtime::Handle,
}

/// Finds the Python to run: `--python`, else the active virtualenv's, else
/// `python3` on the PATH.
fn find_python(config: &AppConfig) -> Result<PathBuf, StartError> {
    if let Some(python) = &config.python {
        return Ok(python.clone());
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let python = Path::new(&venv).join("bin").join("python");
        if python.exists() {
            return Ok(python);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["python3", "python"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(StartError::NoPython)
}

/// A private directory for the socket and the tick files.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let dir = std::env::temp_dir().join(format!("fastlane-serve-{}-{nanos:x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

impl Shared {
    /// Starts the zygote and the first workers; returns once they all serve.
    pub(crate) async fn start(config: AppConfig) -> Result<Arc<Self>, StartError> {
        let python = find_python(&config)?;
        let dir = private_dir().map_err(StartError::Io)?;
        let started = Self::start_in(config, python, dir.clone()).await;
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    async fn start_in(config: AppConfig, python: PathBuf, dir: PathBuf) -> Result<Arc<Self>, StartError> {
        let script = dir.join("fastlane_worker.py");
        std::fs::write(&script, WORKER_SOURCE).map_err(StartError::Io)?;
        let socket = dir.join("front.sock");
        let listener = UnixListener::bind(&socket).map_err(StartError::Io)?;
        let settings = serde_json::json!({
            "socket": socket,
            "dir": dir,
            "app": config.app,
            "factory": config.factory,
            "app_dir": config.app_dir,
            "root_path": config.root_path,
            "loop": config.event_loop,
        });
        let mut child = tokio::process::Command::new(&python)
            .arg(&script)
            .arg(settings.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|source| StartError::Spawn { python: python.clone(), source })?;
        let zygote_pid = child.id().unwrap_or(0);

        // The zygote connects, then says whether the app imported.
        let deadline = tokio::time::sleep(config.start_timeout);
        tokio::pin!(deadline);
        let sock = tokio::select! {
            accepted = listener.accept() => accepted.map_err(StartError::Io)?.0,
            status = child.wait() => return Err(StartError::Exited { python, status: status.ok() }),
            () = &mut deadline => return Err(StartError::Timeout(config.start_timeout)),
        };
        let (read, write) = sock.into_split();
        let mut reader = FrameReader::new(read);
        let import = async {
            let _hello = reader.next().await;
            reader.next().await
        };
        let answer = tokio::select! {
            answer = import => answer,
            status = child.wait() => return Err(StartError::Exited { python, status: status.ok() }),
            () = &mut deadline => return Err(StartError::Timeout(config.start_timeout)),
        };
        match answer {
            Some((frame::READY, _, _)) => {}
            Some((frame::FAILED, _, message)) => {
                return Err(StartError::App(String::from_utf8_lossy(&message).trim_end().to_owned()))
            }
            _ => return Err(StartError::Exited { python, status: child.wait().await.ok() }),
        }
        tracing::debug!(app = %config.app, python = %python.display(), "the app imported in the zygote (pid {zygote_pid})");

        let (zygote_tx, zygote_rx) = mpsc::unbounded_channel();
        tokio::spawn(worker::write_frames(write, zygote_rx));
        let shared = Arc::new(Self {
            config,
            dir,
            workers: RwLock::new(Vec::new()),
            available: Notify::new(),
            zygote: Mutex::new(Some(zygote_tx)),
            next_number: AtomicU32::new(1),
            starting: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            suspects: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            crashes: AtomicU32::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(zygote_reports(shared.clone(), reader, child));
        tokio::spawn(accept_workers(shared.clone(), listener));

        let forks: Vec<_> = (0..shared.config.workers).map(|_| shared.fork()).collect();
        for ready in forks {
            let outcome = tokio::time::timeout(shared.config.start_timeout, ready).await;
            match outcome {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(message))) => {
                    shared.stop_processes();
                    return Err(StartError::Startup(message));
                }
                Ok(Err(_)) | Err(_) => {
                    shared.stop_processes();
                    return Err(StartError::Timeout(shared.config.start_timeout));
                }
            }
        }
        crate::monitor::start(&shared);
        Ok(shared)
    }

    /// Asks the zygote for a new worker; the receiver learns whether it started.
    fn fork(&self) -> oneshot::Receiver<Result<Arc<Worker>, String>> {
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.starting.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().expect("pending lock").entry(number).or_default().ready = Some(tx);
        self.to_zygote(frame::encode(frame::FORK, number, b""));
        rx
    }

    fn to_zygote(&self, frame: Bytes) {
        if let Some(zygote) = self.zygote.lock().expect("zygote lock").as_ref() {
            let _ = zygote.send(frame);
        }
    }

    /// Starts a worker in the background (a spare, or a replacement).
    fn fork_in_background(self: &Arc<Self>, why: &'static str) {
        let ready = self.fork();
        let shared = self.clone();
        self.runtime.spawn(async move {
            match tokio::time::timeout(shared.config.start_timeout, ready).await {
                Ok(Ok(Ok(worker))) => {
                    tracing::info!(worker = worker.number, pid = worker.pid, "started a worker ({why})")
                }
                Ok(Ok(Err(message))) => tracing::error!("a new worker failed to start: {message}"),
                Ok(Err(_)) | Err(_) => {
                    tracing::error!("a new worker did not start within {:?}", shared.config.start_timeout)
                }
            }
        });
    }

    /// The workers now.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Worker>> {
        self.workers.read().expect("workers lock").clone()
    }

    /// Whether requests to `key` (`GET /path`) stalled a loop lately.
    pub(crate) fn is_suspect(&self, key: &str) -> bool {
        let suspects = self.suspects.lock().expect("suspects lock");
        match suspects.get(key) {
            Some(None) => true,
            Some(Some(ended)) => ended.elapsed() < SUSPECT_FOR,
            None => false,
        }
    }

    /// Marks `key` as stalling (`ended: None`) or as having stalled until now.
    pub(crate) fn mark_suspect(&self, key: &str, ended: Option<Instant>) {
        let mut suspects = self.suspects.lock().expect("suspects lock");
        if suspects.len() >= SUSPECTS_KEPT && !suspects.contains_key(key) {
            suspects.retain(|_, ended| ended.map_or(true, |at| at.elapsed() < SUSPECT_FOR));
            if suspects.len() >= SUSPECTS_KEPT {
                return;
            }
        }
        suspects.insert(key.to_owned(), ended);
    }

    /// A worker for a request, or why none can take it now. A suspect path
    /// never takes the last responsive worker.
    pub(crate) fn pick(&self, suspect: bool) -> Pick {
        let workers = self.workers.read().expect("workers lock");
        let mut best: Option<&Arc<Worker>> = None;
        let mut open = 0;
        for worker in workers.iter().filter(|w| w.takes_requests()) {
            open += 1;
            let load = worker.in_flight.load(Ordering::Relaxed);
            if best.map_or(true, |b| load < b.in_flight.load(Ordering::Relaxed)) {
                best = Some(worker);
            }
        }
        match best {
            Some(worker) if !suspect || open >= 2 => Pick::Worker(worker.clone()),
            _ => Pick::None { alive: workers.iter().filter(|w| !w.gone.load(Ordering::Relaxed)).count() },
        }
    }

    /// Called by the monitor when a loop stalls: if no worker can take a
    /// request now, a spare starts before the next request has to wait for it.
    pub(crate) fn stalled(self: &Arc<Self>) {
        if let Pick::None { alive } = self.pick(false) {
            self.want_spare(alive);
        }
    }

    /// Starts a spare if every worker is stalled or full and the cap allows.
    /// Returns whether one is starting (now or already).
    pub(crate) fn want_spare(self: &Arc<Self>, alive: usize) -> bool {
        if self.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let starting = self.starting.load(Ordering::Relaxed);
        if starting > 0 {
            return true;
        }
        if alive >= self.config.max_workers {
            return false;
        }
        self.stats.spares_started.fetch_add(1, Ordering::Relaxed);
        self.fork_in_background("a spare: every worker's loop was stalled or full");
        true
    }

    /// A worker's socket closed: forget it, and replace it unless stopping.
    fn gone(self: &Arc<Self>, worker: &Arc<Worker>) {
        self.workers.write().expect("workers lock").retain(|w| !Arc::ptr_eq(w, worker));
        self.available.notify_waiters();
        if self.stopping.load(Ordering::Relaxed) || worker.closing.load(Ordering::Relaxed) {
            return;
        }
        let lived = worker.started.elapsed();
        tracing::error!(
            worker = worker.number,
            pid = worker.pid,
            "worker {} (pid {}) exited unexpectedly after {}; starting another",
            worker.number,
            worker.pid,
            fastlane::HumanDuration(lived)
        );
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        // A worker that dies at start keeps dying: wait longer each time.
        let crashes = if lived < Duration::from_secs(5) {
            self.crashes.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.crashes.store(0, Ordering::Relaxed);
            0
        };
        let backoff = Duration::from_millis(100u64 << crashes.min(7)).min(Duration::from_secs(10));
        let shared = self.clone();
        tokio::spawn(async move {
            if crashes > 0 {
                tokio::time::sleep(backoff).await;
            }
            if !shared.stopping.load(Ordering::Relaxed) {
                shared.fork_in_background("a replacement");
            }
        });
    }

    /// SIGKILL for a worker that did not stop (sent by the zygote, its parent).
    pub(crate) fn kill(&self, worker: &Worker) {
        self.to_zygote(frame::encode(frame::KILL, worker.pid, b""));
    }

    /// Stops the workers: their requests and background tasks get `grace`,
    /// their lifespan shutdown a few seconds more. A worker still running
    /// work past the grace period (its loop blocked, so it cannot cancel
    /// anything itself) is killed, and its work reported as cut.
    pub(crate) async fn shutdown(&self, grace: Duration) -> Vec<String> {
        self.stopping.store(true, Ordering::Relaxed);
        let workers = self.snapshot();
        for worker in &workers {
            worker.retire(grace);
        }
        let started = tokio::time::Instant::now();
        // A responsive worker cancels its own work at `grace`: give its
        // report a moment to arrive before deciding it is stuck.
        let work_deadline = started + grace + Duration::from_secs(1);
        let deadline = work_deadline + LIFESPAN_SHUTDOWN;
        let mut cut = Vec::new();
        let mut killed = vec![false; workers.len()];
        loop {
            let now = tokio::time::Instant::now();
            let mut waiting = false;
            for (worker, killed) in workers.iter().zip(killed.iter_mut()) {
                if worker.gone.load(Ordering::Relaxed) || *killed {
                    continue;
                }
                let running = worker.in_flight_entries();
                if (now >= work_deadline && !running.is_empty()) || now >= deadline {
                    let what = if running.is_empty() {
                        "its lifespan shutdown did not finish".to_owned()
                    } else {
                        let list: Vec<_> = running
                            .iter()
                            .map(|(line, answered)| {
                                if *answered {
                                    format!("a background task of {line}")
                                } else {
                                    line.clone()
                                }
                            })
                            .collect();
                        format!("its event loop stayed blocked with {} running", list.join(", "))
                    };
                    cut.push(format!("worker {} (pid {}), killed: {what}", worker.number, worker.pid));
                    self.kill(worker);
                    *killed = true;
                    continue;
                }
                waiting = true;
            }
            if !waiting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for worker in &workers {
            if let Some(list) = worker.bye.lock().expect("bye lock").take() {
                cut.extend(list.into_iter().map(|what| format!("{what} (worker {})", worker.number)));
            }
        }
        self.stop_processes();
        cut
    }

    /// Closes the zygote's socket (it exits) and removes the private directory.
    pub(crate) fn stop_processes(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.zygote.lock().expect("zygote lock").take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What [`Shared::pick`] found.
#[derive(Debug)]
pub(crate) enum Pick {
    Worker(Arc<Worker>),
    None { alive: usize },
}

/// The zygote's reports (workers that exited); when its socket closes the
/// app can no longer start workers.
async fn zygote_reports(shared: Arc<Shared>, mut reader: FrameReader, mut child: tokio::process::Child) {
    while let Some((kind, _, payload)) = reader.next().await {
        if kind == frame::EXITED {
            #[derive(serde::Deserialize)]
            struct Exited {
                pid: u32,
                code: i32,
            }
            if let Ok(exited) = serde_json::from_slice::<Exited>(&payload) {
                let level_error = !shared.stopping.load(Ordering::Relaxed) && exited.code != 0;
                if level_error {
                    tracing::warn!(
                        pid = exited.pid,
                        code = exited.code,
                        "a worker process exited with code {}",
                        exited.code
                    );
                } else {
                    tracing::debug!(pid = exited.pid, code = exited.code, "a worker process exited");
                }
            }
        }
    }
    let status = child.wait().await;
    if !shared.stopping.load(Ordering::Relaxed) {
        tracing::error!(
            ?status,
            "the zygote (the process that forks workers) exited; no new worker can start"
        );
    }
}

/// Takes the connections of new workers and of their watchdogs.
async fn accept_workers(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(err) = handshake(&shared, sock).await {
                tracing::debug!("a worker connection failed its handshake: {err}");
            }
        });
    }
}

#[derive(serde::Deserialize)]
struct Hello {
    role: String,
    number: u32,
    pid: u32,
}

async fn handshake(shared: &Arc<Shared>, sock: UnixStream) -> Result<(), String> {
    let (read, write) = sock.into_split();
    let mut reader = FrameReader::new(read);
    let (kind, _, hello) = reader.next().await.ok_or("closed before HELLO")?;
    if kind != frame::HELLO {
        return Err(format!("the first frame was of type {kind}, not HELLO"));
    }
    let hello: Hello = serde_json::from_slice(&hello).map_err(|e| e.to_string())?;
    if hello.role == "watchdog" {
        let sock = read_half_back(reader, write)?;
        let mut pending = shared.pending.lock().expect("pending lock");
        let waiting = pending.entry(hello.number).or_default();
        waiting.watchdog = Some(sock);
        // The worker may already be serving (its watchdog was slower).
        let workers = shared.workers.read().expect("workers lock");
        if let Some(worker) = workers.iter().find(|w| w.number == hello.number) {
            *worker.watchdog.lock().expect("watchdog lock") = waiting.watchdog.take();
            pending.remove(&hello.number);
        }
        return Ok(());
    }
    let answer = reader.next().await;
    let ready =
        shared.pending.lock().expect("pending lock").get_mut(&hello.number).and_then(|p| p.ready.take());
    shared.starting.fetch_sub(1, Ordering::Relaxed);
    match answer {
        Some((frame::READY, _, _)) => {}
        Some((frame::FAILED, _, message)) => {
            let message = String::from_utf8_lossy(&message).trim_end().to_owned();
            shared.pending.lock().expect("pending lock").remove(&hello.number);
            if let Some(ready) = ready {
                let _ = ready.send(Err(message));
            }
            return Ok(());
        }
        _ => {
            shared.pending.lock().expect("pending lock").remove(&hello.number);
            if let Some(ready) = ready {
                let _ = ready.send(Err(format!("worker {} exited during its startup", hello.number)));
            }
            return Ok(());
        }
    }
    let ticks =
        std::fs::File::open(shared.dir.join(format!("tick-{}", hello.number))).map_err(|e| e.to_string())?;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let watchdog = {
        let mut pending = shared.pending.lock().expect("pending lock");
        pending.remove(&hello.number).and_then(|p| p.watchdog)
    };
    let worker = Arc::new(Worker::new(hello.number, hello.pid, out_tx, ticks, watchdog));
    tokio::spawn(worker::write_frames(write, out_rx));
    shared.workers.write().expect("workers lock").push(worker.clone());
    if shared.stopping.load(Ordering::Relaxed) {
        worker.retire(Duration::ZERO);
    }
    shared.available.notify_waiters();
    if let Some(ready) = ready {
        let _ = ready.send(Ok(worker.clone()));
    }
    let notify = shared.clone();
    worker::read_frames(worker.clone(), reader, move || notify.available.notify_waiters()).await;
    shared.gone(&worker);
    Ok(())
}

/// The watchdog's socket as a blocking std stream (the monitor's threads use it).
fn read_half_back(
    reader: FrameReader,
    write: tokio::net::unix::OwnedWriteHalf,
) -> Result<std::os::unix::net::UnixStream, String> {
    let read = reader.into_inner();
    let sock = read.reunite(write).map_err(|e| e.to_string())?;
    let sock = sock.into_std().map_err(|e| e.to_string())?;
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    Ok(sock)
}
