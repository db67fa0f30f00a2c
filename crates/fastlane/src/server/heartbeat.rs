//! A worker process's heartbeat to its supervisor (`--workers`): a line
//! every half second saying whether the I/O runtime answers and what is in
//! flight, and the recycling of the worker after `--max-requests`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ServerHandle, ServerState};
use crate::supervisor::worker::{WorkerEnv, HEARTBEAT_EVERY};

/// Starts the heartbeat thread. It is a plain OS thread, so no handler can
/// block it; what it reports is whether the *I/O runtime* answers: each beat
/// is a tiny task that must get through tokio's scheduler and timer within
/// the interval. A slow or stalled handler is not a missed beat (isolation
/// handles those); a runtime that stops scheduling is.
pub(super) fn start(state: Arc<ServerState>, handle: ServerHandle, max_requests: Option<u64>) {
    let Some(mut pipe) = WorkerEnv::heartbeat_pipe() else {
        tracing::error!("no heartbeat pipe from the supervisor; it will judge this worker hung");
        return;
    };
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
