//! The worker side: what the supervisor hands a worker process (its id, the
//! inherited listener, the heartbeat pipe). The heartbeat itself is the
//! server's (`server/heartbeat.rs`): it reports the server's state.
//!
//! A worker is the same program, started by the supervisor with three
//! environment variables: its id, the listening socket's descriptor and the
//! write end of a pipe back to the supervisor.

use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

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
