//! The worker pool: starts the zygote (the Python process that imports the
//! app once), forks workers from it, chooses a worker for each request,
//! starts spares while every worker is stalled, replaces workers that die,
//! and stops them all at shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Notify};

use crate::frame;
use crate::wire::{self, FrameReader, Outbox};
use crate::worker::{self, InFlight, Worker};
use crate::zygote::{self, Launch, Zygote};
use crate::{AppConfig, StartError};

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
    /// Requests a blocked loop had not started, taken back and served elsewhere.
    pub(crate) moved: AtomicU64,
}

/// A fork asked for and not yet answered.
#[derive(Debug, Default)]
struct Pending {
    watchdog: Option<std::os::unix::net::UnixStream>,
    ready: Option<oneshot::Sender<Result<Arc<Worker>, String>>>,
    /// The zygote it was forked from.
    generation: u32,
}

/// A zygote's socket once it has said HELLO, for a reload waiting for it.
type ZygoteConnection = (FrameReader, tokio::net::unix::OwnedWriteHalf);

/// What every request, the monitor and the companion share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: AppConfig,
    pub(crate) dir: PathBuf,
    pub(crate) workers: RwLock<Vec<Arc<Worker>>>,
    /// Signalled when a worker may have become able to take a request.
    pub(crate) available: Notify,
    /// How to start a zygote (again, at a reload).
    launch: Launch,
    /// The zygotes by generation: the current one forks new workers, older
    /// ones stay until their workers are gone (they are their parent).
    zygotes: Mutex<HashMap<u32, Arc<Zygote>>>,
    /// The current zygote's generation: 0, then one more per reload.
    generation: AtomicU32,
    /// A reload's new zygote connects through the shared listener: its socket
    /// goes here.
    new_zygote: Mutex<Option<oneshot::Sender<ZygoteConnection>>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    next_number: AtomicU32,
    /// Forks asked for and not yet ready or failed.
    starting: AtomicUsize,
    pending: Mutex<HashMap<u32, Pending>>,
    pub(crate) stopping: AtomicBool,
    /// `GET /path` → when it last stalled a loop (`None`: stalling now).
    suspects: Mutex<HashMap<String, Option<Instant>>>,
    /// Blocked loops by the route that blocked them, for `/_fastlane/stalls`.
    pub(crate) stall_rows: Mutex<HashMap<(String, String), fastlane::StallRow>>,
    pub(crate) stats: Stats,
    /// Workers that died soon after starting, in a row: the backoff of the next.
    crashes: AtomicU32,
    /// Where the pool's tasks run (the monitor thread starts spares too).
    runtime: tokio::runtime::Handle,
}

/// Finds the Python to run: `--python`, else the active virtualenv's, else
/// the one beside this program when `pip` installed it into a virtualenv
/// (`.venv/bin/fastlane` run without activating it), else `python3` on the
/// PATH.
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
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let bin = exe.parent()?;
        let python = bin.join("python");
        (python.exists() && bin.parent()?.join("pyvenv.cfg").exists()).then_some(python)
    });
    if let Some(python) = beside {
        return Ok(python);
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
        let socket = dir.join("front.sock");
        let listener = UnixListener::bind(&socket).map_err(StartError::Io)?;
        let launch = Launch::prepare(&config, python, &dir, &socket)?;
        // The first zygote connects before anything else does.
        let connected = async {
            let (sock, _) = listener.accept().await.ok()?;
            let (read, write) = sock.into_split();
            let mut reader = FrameReader::new(read);
            let (kind, _, _) = reader.next().await?;
            (kind == frame::HELLO).then_some((reader, write))
        };
        let (zygote, reader, child) = zygote::start(&launch, connected, config.start_timeout).await?;
        tracing::debug!(app = %config.app, "the app imported in the zygote (pid {})", zygote.pid);
        let shared = Arc::new(Self {
            config,
            dir,
            workers: RwLock::new(Vec::new()),
            available: Notify::new(),
            launch,
            zygotes: Mutex::new(HashMap::from([(0, Arc::new(zygote))])),
            generation: AtomicU32::new(0),
            new_zygote: Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
            next_number: AtomicU32::new(1),
            starting: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            suspects: Mutex::new(HashMap::new()),
            stall_rows: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            crashes: AtomicU32::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(zygote::reports(reader, child, shared.quiet_about(0), shared.on_niced()));
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
        Ok(shared)
    }

    /// Whether the zygote of `generation` may exit unremarked: the pool is
    /// stopping, or a reload has replaced it.
    fn quiet_about(self: &Arc<Self>, generation: u32) -> impl Fn() -> bool + Send + 'static {
        let shared = Arc::downgrade(self);
        move || {
            shared.upgrade().is_none_or(|shared| {
                shared.stopping.load(Ordering::Relaxed)
                    || shared.generation.load(Ordering::Relaxed) != generation
            })
        }
    }

    /// What to do with a `NICED` answer: a worker whose priority could not
    /// be raised back after it spun the CPU is replaced by a fresh one.
    fn on_niced(self: &Arc<Self>) -> impl Fn(u32, bool) + Send + 'static {
        let shared = Arc::downgrade(self);
        move |pid, done| {
            let Some(shared) = shared.upgrade() else { return };
            let Some(worker) = shared.snapshot().into_iter().find(|w| w.pid == pid) else { return };
            let restoring = !worker.demoted.load(Ordering::Relaxed);
            if done
                || !restoring
                || worker.closing.load(Ordering::Relaxed)
                || shared.stopping.load(Ordering::Relaxed)
            {
                return;
            }
            tracing::info!(
                worker = worker.number,
                pid,
                "worker {} keeps its lowered priority (raising it needs a privilege); a fresh worker takes its place",
                worker.number
            );
            worker.retire(shared.config.grace_period);
            shared.fork_in_background("in place of a worker left at a lowered priority");
        }
    }

    /// Sets the nice value of `worker`'s event loop thread (through its
    /// zygote, its parent): [`frame::IDLE_CLASS`] (the idle scheduling class)
    /// while it spins the CPU, 0 after.
    pub(crate) fn nice(&self, worker: &Worker, value: i32) {
        worker.demoted.store(value > 0, Ordering::Relaxed);
        if let Some(zygote) = self.zygote(worker.generation) {
            zygote.out.push(|buf| frame::put(buf, frame::NICE, worker.pid, &value.to_le_bytes()));
        }
    }

    /// The zygote of `generation`, if it is still there.
    fn zygote(&self, generation: u32) -> Option<Arc<Zygote>> {
        self.zygotes.lock().expect("zygotes lock").get(&generation).cloned()
    }

    /// Asks the current zygote for a new worker; the receiver learns whether it started.
    fn fork(&self) -> oneshot::Receiver<Result<Arc<Worker>, String>> {
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.starting.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = self.pending.lock().expect("pending lock");
            let entry = pending.entry(number).or_default();
            entry.ready = Some(tx);
            entry.generation = generation;
        }
        if let Some(zygote) = self.zygote(generation) {
            zygote.out.push(|buf| frame::put(buf, frame::FORK, number, b""));
        }
        rx
    }

    /// Reloads the app: a new zygote imports its code afresh, `workers` new
    /// workers start from it (lifespan startup included), and only then do
    /// the old ones stop taking requests and drain within `grace`. If the new
    /// code does not import or start, the old workers go on serving and the
    /// error says why. Returns the new workers' pids.
    pub(crate) async fn reload(self: &Arc<Self>, grace: Duration) -> Result<Vec<u32>, String> {
        let _one_at_a_time = self.reloading.lock().await;
        if self.stopping.load(Ordering::Relaxed) {
            return Err("the server is stopping".into());
        }
        let (tx, rx) = oneshot::channel();
        *self.new_zygote.lock().expect("new zygote lock") = Some(tx);
        let started = zygote::start(&self.launch, async { rx.await.ok() }, self.config.start_timeout).await;
        let (zygote, reader, child) = started.map_err(|err| fastlane::ErrorChain(&err).to_string())?;
        let old = self.generation.load(Ordering::Relaxed);
        let generation = old + 1;
        self.zygotes.lock().expect("zygotes lock").insert(generation, Arc::new(zygote));
        tokio::spawn(zygote::reports(reader, child, self.quiet_about(generation), self.on_niced()));
        self.generation.store(generation, Ordering::Relaxed);

        let forks: Vec<_> = (0..self.config.workers).map(|_| self.fork()).collect();
        let mut failure = None;
        for ready in forks {
            match tokio::time::timeout(self.config.start_timeout, ready).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(message))) => failure = Some(message),
                Ok(Err(_)) | Err(_) => {
                    failure =
                        Some(format!("a new worker did not start within {:?}", self.config.start_timeout))
                }
            }
        }
        let keep = if failure.is_some() { old } else { generation };
        self.generation.store(keep, Ordering::Relaxed);
        let leaving: Vec<_> = self.snapshot().into_iter().filter(|w| w.generation != keep).collect();
        for worker in &leaving {
            worker.retire(grace);
        }
        self.available.notify_waiters();
        // The zygotes of the workers that leave go once those are gone.
        let shared = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + grace + LIFESPAN_SHUTDOWN;
            while leaving.iter().any(|w| !w.gone.load(Ordering::Relaxed)) {
                if tokio::time::Instant::now() >= deadline {
                    for worker in leaving.iter().filter(|w| !w.gone.load(Ordering::Relaxed)) {
                        tracing::error!(
                            worker = worker.number,
                            pid = worker.pid,
                            "an old worker did not stop after the reload; killed it"
                        );
                        shared.kill(worker);
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut zygotes = shared.zygotes.lock().expect("zygotes lock");
            zygotes.retain(|&g, zygote| {
                let stays = g == shared.generation.load(Ordering::Relaxed);
                if !stays {
                    zygote.out.close();
                }
                stays
            });
        });
        match failure {
            Some(message) => Err(message),
            None => Ok(self.snapshot().iter().filter(|w| w.generation == keep).map(|w| w.pid).collect()),
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
        suspect_in(&suspects, key, Instant::now())
    }

    /// Recounts each worker's suspect requests in flight (the monitor's
    /// job, each millisecond): under one lock of the suspects, and without
    /// looking at any request while no path has ever stalled.
    pub(crate) fn recount_tainted(&self, workers: &[Arc<Worker>]) {
        let suspects = self.suspects.lock().expect("suspects lock");
        let now = Instant::now();
        for worker in workers {
            let n = if suspects.is_empty() {
                0
            } else {
                worker.count_tainted(|key| suspect_in(&suspects, key, now))
            };
            worker.tainted.store(n, Ordering::Relaxed);
        }
    }

    /// Marks `key` as stalling (`ended: None`) or as having stalled until now.
    pub(crate) fn mark_suspect(&self, key: &str, ended: Option<Instant>) {
        let mut suspects = self.suspects.lock().expect("suspects lock");
        if suspects.len() >= SUSPECTS_KEPT && !suspects.contains_key(key) {
            suspects.retain(|_, ended| ended.is_none_or(|at| at.elapsed() < SUSPECT_FOR));
            if suspects.len() >= SUSPECTS_KEPT {
                return;
            }
        }
        suspects.insert(key.to_owned(), ended);
    }

    /// A worker for a request, or why none can take it now.
    ///
    /// Requests go to the least loaded responsive worker that runs no
    /// suspect request (a *clean* one). A suspect request also needs another
    /// clean worker to remain, for the requests that behave. A request that
    /// behaves finds a responsive but tainted worker only as a last resort
    /// ([`Pick::Tainted`]), when no spare can start.
    pub(crate) fn pick(&self, suspect: bool) -> Pick {
        let workers = self.workers.read().expect("workers lock");
        // Stalling requests keep to the workers that ran them lately, and
        // the others keep away from those: the loops that block stay the
        // same few, and a fast request does not meet the next blocker on the
        // worker it used to find free.
        let rank = |w: &Worker| {
            let hosts = w.hosted_suspect_lately();
            let load = w.in_flight.load(Ordering::Relaxed);
            if suspect {
                (!hosts, load)
            } else {
                (hosts, load)
            }
        };
        let best = |clean: bool| {
            let open = workers.iter().filter(|w| w.takes_requests() && (!clean || w.is_clean()));
            let count = open.clone().count();
            (open.min_by_key(|w| rank(w)).cloned(), count)
        };
        let (clean, clean_count) = best(true);
        match clean {
            Some(worker) if !suspect || clean_count >= 2 => return Pick::Worker(worker),
            _ => {}
        }
        let alive = workers.iter().filter(|w| !w.gone.load(Ordering::Relaxed)).count();
        // A blocked or blocking loop is why nothing is free: a spare helps.
        // While a loop is stalled, only one stalled twice the threshold
        // counts (see the monitor): on a loaded machine a loop can be late by
        // more than the threshold and back a moment later, and a spare would
        // only add to the load. With none stalled now, loops kept by paths
        // that stalled lately do.
        let (mut stalling, mut long, mut tainted) = (false, false, false);
        for w in workers.iter() {
            stalling |= w.stalled.load(Ordering::Relaxed);
            long |= w.long_stall.load(Ordering::Relaxed);
            tainted |= !w.is_clean();
        }
        let stalled = long || (!stalling && tainted);
        if !suspect {
            if let (Some(worker), _) = best(false) {
                return Pick::Tainted { worker, alive, stalled };
            }
        }
        Pick::None { alive, stalled }
    }

    /// Called by the monitor when a loop stalls: if no worker can take a
    /// request now, a spare starts before the next request has to wait for it.
    pub(crate) fn stalled(self: &Arc<Self>) {
        if let Pick::None { alive, stalled } | Pick::Tainted { alive, stalled, .. } = self.pick(false) {
            self.want_spare(alive, stalled);
        }
    }

    /// Starts a spare, when no worker can take a request and a blocked loop
    /// is why (`stalled`), if the cap allows. Returns whether one is starting
    /// (now or already). Workers that are only full (busy, but their loops
    /// turn) get no spare: more processes than that do not add cores, and
    /// the request waits for a slot instead.
    pub(crate) fn want_spare(self: &Arc<Self>, alive: usize, stalled: bool) -> bool {
        if self.stopping.load(Ordering::Relaxed) || !stalled {
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
        self.fork_in_background("a spare: no worker's event loop was free, and one was blocked");
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
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        // A worker that dies soon after it starts will die again (a bad
        // deploy, a resource gone): wait longer each time, so that the
        // server does not spend its CPU forking.
        let crashes = if lived < Duration::from_secs(5) {
            self.crashes.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.crashes.store(0, Ordering::Relaxed);
            0
        };
        let backoff = match crashes {
            0 => Duration::ZERO,
            n => Duration::from_millis(100u64 << n.min(7)).min(Duration::from_secs(10)),
        };
        let when = match crashes {
            0 => "now".to_owned(),
            n => format!(
                "in {} ({n} worker{} in a row died within 5 s of starting)",
                fastlane::HumanDuration(backoff),
                if n == 1 { "" } else { "s" }
            ),
        };
        tracing::error!(
            worker = worker.number,
            pid = worker.pid,
            "worker {} (pid {}) exited unexpectedly after {}; starting another {when}",
            worker.number,
            worker.pid,
            fastlane::HumanDuration(lived)
        );
        let shared = self.clone();
        tokio::spawn(async move {
            if !backoff.is_zero() {
                tokio::time::sleep(backoff).await;
            }
            if !shared.stopping.load(Ordering::Relaxed) {
                shared.fork_in_background("a replacement");
            }
        });
    }

    /// SIGKILL for a worker that did not stop (sent by the zygote, its parent).
    pub(crate) fn kill(&self, worker: &Worker) {
        if let Some(zygote) = self.zygote(worker.generation) {
            zygote.out.push(|buf| frame::put(buf, frame::KILL, worker.pid, b""));
        }
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
                            .map(|InFlight { line, answered, .. }| {
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
        for zygote in self.zygotes.lock().expect("zygotes lock").values() {
            zygote.out.close();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `key` is suspect in `suspects` at `now`: stalling, or stalled
/// less than [`SUSPECT_FOR`] ago.
fn suspect_in(suspects: &HashMap<String, Option<Instant>>, key: &str, now: Instant) -> bool {
    match suspects.get(key) {
        Some(None) => true,
        Some(Some(ended)) => now.duration_since(*ended) < SUSPECT_FOR,
        None => false,
    }
}

/// What [`Shared::pick`] found.
#[derive(Debug)]
pub(crate) enum Pick {
    Worker(Arc<Worker>),
    /// Only a worker running a suspect request is free: use it if no spare
    /// can start.
    Tainted {
        worker: Arc<Worker>,
        alive: usize,
        stalled: bool,
    },
    /// None can take it: how many workers live, and whether a blocked (or
    /// blocking) loop is among the reasons.
    None {
        alive: usize,
        stalled: bool,
    },
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
    /// A worker's (and its watchdog's) number; a zygote has none.
    #[serde(default)]
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
    if hello.role == "zygote" {
        // A reload's: hand it over (a zygote no reload waits for is closed).
        if let Some(waiting) = shared.new_zygote.lock().expect("new zygote lock").take() {
            let _ = waiting.send((reader, write));
        }
        return Ok(());
    }
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
    let file = shared.dir.join(format!("tick-{}", hello.number));
    let file = std::fs::OpenOptions::new().read(true).write(true).open(file).map_err(|e| e.to_string())?;
    let out = Arc::new(Outbox::default());
    let (watchdog, generation) = {
        let mut pending = shared.pending.lock().expect("pending lock");
        let entry = pending.remove(&hello.number).unwrap_or_default();
        (entry.watchdog, entry.generation)
    };
    let worker = Arc::new(Worker::new(hello.number, hello.pid, generation, out.clone(), file, watchdog));
    tokio::spawn(wire::write_out(write, out));
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
    let read = reader.into_inner().ok_or("the watchdog sent more than its HELLO")?;
    let sock = read.reunite(write).map_err(|e| e.to_string())?;
    let sock = sock.into_std().map_err(|e| e.to_string())?;
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    Ok(sock)
}
