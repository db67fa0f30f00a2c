//! The worker side: the inherited listener and the liveness heartbeat.
//!
//! A worker is the same program, started by the supervisor with three
//! environment variables: its id, the listening socket's descriptor and the
//! write end of a pipe back to the supervisor.

use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::{ServerHandle, ServerState};

pub(crate) const ENV_ID: &str = "FASTLANE_WORKER_ID";
pub(crate) const ENV_LISTEN_FD: &str = "FASTLANE_WORKER_LISTEN_FD";
pub(crate) const ENV_HEARTBEAT_FD: &str = "FASTLANE_WORKER_HEARTBEAT_FD";
pub(crate) const ENV_RESTARTS: &str = "FASTLANE_WORKER_RESTARTS";

/// How often a worker proves that its I/O runtime still works.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// What the supervisor told this worker process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerEnv {
    pub(crate) id: u32,
    pub(crate) listen_fd: RawFd,
    pub(crate) heartbeat_fd: RawFd,
    pub(crate) restarts: u64,
}

impl WorkerEnv {
    /// `Some` in a worker process started by a fastlane supervisor.
    pub(crate) fn from_env() -> Option<WorkerEnv> {
        fn get<T: std::str::FromStr>(key: &str) -> Option<T> {
            std::env::var(key).ok()?.parse().ok()
        }
        Some(WorkerEnv {
            id: get(ENV_ID)?,
            listen_fd: get(ENV_LISTEN_FD)?,
            heartbeat_fd: get(ENV_HEARTBEAT_FD)?,
            restarts: get(ENV_RESTARTS).unwrap_or(0),
        })
    }

    /// The listening socket the supervisor bound and handed down.
    #[allow(unsafe_code)]
    pub(crate) fn listener(&self) -> std::io::Result<tokio::net::TcpListener> {
        // SAFETY: the supervisor passed this descriptor to this process for
        // exactly this use, and nothing else in the process owns it.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(self.listen_fd) };
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    }
}

/// The worker id of this process, if a fastlane supervisor started it
/// (`--workers N`); `None` in a single-process server or the supervisor.
pub fn worker_id() -> Option<u32> {
    WorkerEnv::from_env().map(|w| w.id)
}

/// Starts the heartbeat thread. It is a plain OS thread, so no handler can
/// block it; what it reports is whether the *I/O runtime* answers: each beat
/// is a tiny task that must get through tokio's scheduler and timer within
/// the interval. A slow or stalled handler is not a missed beat (isolation
/// handles those); a runtime that stops scheduling is.
#[allow(unsafe_code)]
pub(crate) fn start_heartbeat(
    env: WorkerEnv,
    state: Arc<ServerState>,
    handle: ServerHandle,
    max_requests: Option<u64>,
) {
    // SAFETY: the supervisor passed this descriptor (a pipe's write end)
    // to this process for the heartbeat, and nothing else uses it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(env.heartbeat_fd) };
    let runtime = state.runtime.clone();
    let spawned = std::thread::Builder::new().name("fastlane-heartbeat".into()).spawn(move || loop {
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        runtime.spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = tx.send(());
        });
        let alive = rx.recv_timeout(HEARTBEAT_EVERY).is_ok();
        let line = status_line(&state, alive);
        if pipe.write_all(line.as_bytes()).is_err() {
            // The supervisor is gone: nobody would restart or reap us.
            tracing::error!("lost the supervisor; shutting down");
            handle.shutdown();
            return;
        }
        if let Some(limit) = max_requests {
            if state.tracker.requests_received() >= limit {
                tracing::info!(served = limit, "max requests reached: recycling this worker");
                handle.shutdown();
            }
        }
        std::thread::sleep(HEARTBEAT_EVERY.saturating_sub(started.elapsed()));
    });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "could not start the heartbeat thread");
    }
}

/// One line for the supervisor: alive or not, and what is in flight.
fn status_line(state: &ServerState, alive: bool) -> String {
    let (requests, tasks) = state.tracker.snapshot(&state.routes);
    let running: Vec<String> = requests
        .iter()
        .chain(tasks.iter())
        .take(10)
        .map(|c| {
            format!(
                "{} {} {} ({:.1} s)",
                c.kind,
                c.method,
                c.route,
                c.running_for.unwrap_or_default().as_secs_f64()
            )
        })
        .collect();
    let line = serde_json::json!({ "alive": alive, "running": running });
    format!("{line}\n")
}
