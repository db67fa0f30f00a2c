//! `--workers N`: a supervisor process and N worker processes on one port.
//!
//! The supervisor binds the port, then starts N copies of the current
//! program (same arguments) that inherit the listening socket, so all of them
//! accept from one queue: a worker that dies loses only the requests it was
//! handling, never the connections waiting to be accepted.
//!
//! Why the supervisor cannot be fooled by a blocked handler: gunicorn's
//! arbiter judges a worker by a heartbeat that the worker's *event loop*
//! sends, so one async task that blocks for longer than `--timeout` gets the
//! worker killed (SIGABRT, "WORKER TIMEOUT") and its work lost. A fastlane
//! worker's heartbeat comes from a thread of its own that asks the *I/O
//! runtime* to run a tiny task; a handler or background task that blocks is
//! isolated on its own runner thread and does not stop that. Only a worker
//! whose runtime itself stops answering is hung, and before it is killed the
//! supervisor logs what it was running.
//!
//! Signals: SIGTERM/SIGINT drain every worker within the grace period;
//! SIGHUP starts a new set of workers and, once they are ready, drains the
//! old ones (a graceful reload).

pub(crate) mod worker;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::shutdown::{stopped, ShutdownReport};
use crate::Error;
use worker::{ENV_HEARTBEAT_FD, ENV_ID, ENV_LISTEN_FD, ENV_RESTARTS};

/// A worker that dies younger than this is crash-looping: its restart waits.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// The first and the longest wait before restarting a crash-looping worker.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long new workers of a reload get to report ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// What the heartbeat thread of a worker last said.
#[derive(Debug, Default)]
struct Beat {
    last_alive: Option<Instant>,
    running: Vec<String>,
}

#[derive(Debug)]
struct Worker {
    id: u32,
    child: Child,
    started: Instant,
    beat: Arc<Mutex<Beat>>,
}

impl Worker {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn last_alive(&self) -> Option<Instant> {
        self.beat.lock().unwrap_or_else(|p| p.into_inner()).last_alive
    }

    fn running(&self) -> Vec<String> {
        self.beat.lock().unwrap_or_else(|p| p.into_inner()).running.clone()
    }
}

/// What the supervisor needs of the server's [`Config`](crate::Config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SupervisorConfig {
    /// Worker processes to keep running (`--workers`).
    pub(crate) workers: usize,
    /// How long a worker's I/O runtime may go without answering its heartbeat.
    pub(crate) worker_timeout: Duration,
    /// How long workers have to drain at shutdown and reload.
    pub(crate) grace_period: Duration,
}

struct Supervisor {
    config: SupervisorConfig,
    listen_fd: RawFd,
    active: Vec<Worker>,
    retiring: Vec<Worker>,
    /// Worker ids waiting to be restarted, and when.
    restarts_due: Vec<(u32, Instant)>,
    backoff: HashMap<u32, Duration>,
    restarts: u64,
    failed: usize,
}

/// Runs the supervisor until shutdown; the listener stays open here and is
/// shared by every worker.
pub(crate) async fn supervise(
    listener: tokio::net::TcpListener,
    config: SupervisorConfig,
    signal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    mut stop: watch::Receiver<bool>,
) -> Result<ShutdownReport, Error> {
    use tokio::signal::unix::{signal as unix_signal, SignalKind};
    let mut hangup = unix_signal(SignalKind::hangup()).map_err(Error::Signal)?;
    let mut sup = Supervisor {
        listen_fd: listener.as_raw_fd(),
        config,
        active: Vec::new(),
        retiring: Vec::new(),
        restarts_due: Vec::new(),
        backoff: HashMap::new(),
        restarts: 0,
        failed: 0,
    };
    for id in 1..=sup.config.workers as u32 {
        sup.start(id)?;
    }
    tracing::info!(workers = sup.config.workers, pid = std::process::id(), "supervisor running");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            () = stopped(&mut stop) => break,
            _ = hangup.recv() => sup.reload().await,
            _ = tick.tick() => sup.check(),
        }
    }
    // Closed before the drain: the workers close their copies as they stop
    // accepting, and with ours gone too the socket stops listening, so a
    // new connection is refused at once instead of waiting in the accept
    // queue of a socket nobody will accept from again. (The drain starts no
    // worker, so the descriptor is not needed any more.)
    drop(listener);
    let report = sup.shutdown().await;
    Ok(ShutdownReport { drained_in: report, workers_failed: sup.failed, ..Default::default() })
}

impl Supervisor {
    /// Starts worker `id`: this program again, with the socket and a pipe.
    fn start(&mut self, id: u32) -> Result<(), Error> {
        let spawn_error = |e: std::io::Error| Error::Config(format!("could not start worker {id}: {e}"));
        let (read_end, write_end) = crate::sys::pipe().map_err(spawn_error)?;
        let exe = std::env::current_exe().map_err(spawn_error)?;
        let mut cmd = Command::new(exe);
        cmd.args(std::env::args_os().skip(1))
            .env(ENV_ID, id.to_string())
            .env(ENV_LISTEN_FD, self.listen_fd.to_string())
            .env(ENV_HEARTBEAT_FD, write_end.as_raw_fd().to_string())
            .env(ENV_RESTARTS, self.restarts.to_string());
        crate::sys::keep_open_in_child(&mut cmd, [self.listen_fd, write_end.as_raw_fd()]);
        let spawned = cmd.spawn();
        // Our copy of the write end closes here; the child has its own.
        drop(write_end);
        let child = spawned.map_err(spawn_error)?;
        let beat = Arc::new(Mutex::new(Beat::default()));
        read_beats(read_end, id, beat.clone());
        tracing::info!(worker = id, pid = child.id(), "worker started");
        self.active.push(Worker { id, child, started: Instant::now(), beat });
        Ok(())
    }

    /// One round: reap exits, restart what is due, find hung workers.
    fn check(&mut self) {
        let now = Instant::now();
        let timeout = self.config.worker_timeout;
        let mut index = 0;
        while index < self.active.len() {
            let worker = &mut self.active[index];
            if let Ok(Some(status)) = worker.child.try_wait() {
                let worker = self.active.remove(index);
                let lived = now - worker.started;
                let backoff = self.backoff.entry(worker.id).or_insert(Duration::ZERO);
                // A clean exit is a recycle (--max-requests): replace it at
                // once. Only failures that come young are a crash loop.
                *backoff = if status.success() {
                    Duration::ZERO
                } else if lived < HEALTHY_AFTER {
                    (*backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX)
                } else {
                    Duration::ZERO
                };
                if status.success() {
                    tracing::info!(
                        worker = worker.id,
                        pid = worker.pid(),
                        "worker exited (recycled); starting a new one"
                    );
                } else {
                    tracing::error!(
                        worker = worker.id,
                        pid = worker.pid(),
                        %status,
                        lived = %crate::telemetry::Human(lived),
                        restart_in = %crate::telemetry::Human(*backoff),
                        "worker died; restarting it"
                    );
                }
                self.restarts_due.push((worker.id, now + *backoff));
                continue;
            }
            // Before its first alive line a worker is starting (the app may
            // open databases or warm caches first), which is not a hang: a
            // short --timeout would otherwise kill workers that boot slowly
            // on a busy machine, again and again.
            let verdict = match worker.last_alive() {
                None => {
                    let booting = now.saturating_duration_since(worker.started);
                    (booting > timeout.max(READY_WITHIN)).then(|| {
                        format!(
                            "worker did not report ready within {:.1} s of its start",
                            booting.as_secs_f64()
                        )
                    })
                }
                Some(silent_since) => {
                    let silent = now.saturating_duration_since(silent_since);
                    (silent > timeout).then(|| {
                        let running = worker.running();
                        format!(
                            "worker hung: its I/O runtime has not answered for {:.1} s (--timeout); it was running: {}",
                            silent.as_secs_f64(),
                            if running.is_empty() { "nothing".to_owned() } else { running.join(", ") }
                        )
                    })
                }
            };
            if let Some(verdict) = verdict {
                tracing::error!(worker = worker.id, pid = worker.pid(), "{verdict}; killing it");
                let _ = worker.child.kill();
                let _ = worker.child.wait();
                let worker = self.active.remove(index);
                self.restarts_due.push((worker.id, now));
                continue;
            }
            index += 1;
        }
        self.retiring.retain_mut(|w| match w.child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(worker = w.id, pid = w.pid(), %status, "old worker drained and exited");
                false
            }
            _ => true,
        });
        let due: Vec<u32> =
            self.restarts_due.iter().filter(|(_, at)| *at <= now).map(|(id, _)| *id).collect();
        self.restarts_due.retain(|(_, at)| *at > now);
        for id in due {
            self.restarts += 1;
            if let Err(err) = self.start(id) {
                tracing::error!(error = %err, "restart failed; trying again");
                self.restarts_due.push((id, now + BACKOFF_MAX));
            }
        }
    }

    /// SIGHUP: new workers first, then the old ones drain.
    async fn reload(&mut self) {
        tracing::info!("SIGHUP: reloading workers");
        let old = std::mem::take(&mut self.active);
        for id in 1..=self.config.workers as u32 {
            if let Err(err) = self.start(id) {
                tracing::error!(error = %err, "reload: could not start a new worker; keeping the old ones");
                let new = std::mem::replace(&mut self.active, old);
                self.retiring.extend(new);
                self.signal_all_retiring(crate::sys::Signal::TERM);
                return;
            }
        }
        let deadline = Instant::now() + READY_WITHIN;
        while self.active.iter().any(|w| w.last_alive().is_none()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("reload: new workers ready; draining the old ones");
        self.retiring.extend(old);
        self.signal_all_retiring(crate::sys::Signal::TERM);
    }

    fn signal_all_retiring(&self, sig: crate::sys::Signal) {
        for w in &self.retiring {
            crate::sys::send_signal(w.pid(), sig);
        }
    }

    /// SIGTERM to every worker; waits for them up to the grace period (plus
    /// a margin for their own reports), then kills what is left.
    async fn shutdown(&mut self) -> Duration {
        let started = Instant::now();
        let mut all: Vec<Worker> = self.active.drain(..).chain(self.retiring.drain(..)).collect();
        tracing::info!(workers = all.len(), "supervisor shutting down: draining workers");
        for w in &all {
            crate::sys::send_signal(w.pid(), crate::sys::Signal::TERM);
        }
        let deadline = started + self.config.grace_period + Duration::from_secs(5);
        while !all.is_empty() {
            all.retain_mut(|w| match w.child.try_wait() {
                Ok(Some(status)) => {
                    // A worker still starting (no heartbeat yet) may die of the
                    // SIGTERM itself, before installing its handler: it had
                    // nothing in flight, so nothing was cut.
                    if !status.success() && w.last_alive().is_some() {
                        tracing::error!(worker = w.id, pid = w.pid(), %status, "worker ended its drain with work cut");
                        self.failed += 1;
                    }
                    false
                }
                _ => true,
            });
            if Instant::now() >= deadline {
                for w in &mut all {
                    tracing::error!(
                        worker = w.id,
                        pid = w.pid(),
                        "worker did not finish draining; killing it"
                    );
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    self.failed += 1;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    }
}

/// Reads a worker's status lines on a thread of its own until the pipe
/// closes (the worker exited).
fn read_beats(read_end: OwnedFd, id: u32, beat: Arc<Mutex<Beat>>) {
    let file = std::fs::File::from(read_end);
    let spawned = std::thread::Builder::new().name("fastlane-beats".into()).spawn(move || {
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let mut beat = beat.lock().unwrap_or_else(|p| p.into_inner());
            if value["alive"].as_bool() == Some(true) {
                if beat.last_alive.is_none() {
                    tracing::info!(worker = id, "worker ready");
                }
                beat.last_alive = Some(Instant::now());
            }
            beat.running = value["running"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
        }
    });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "could not start a heartbeat reader");
    }
}
