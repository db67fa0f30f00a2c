//! The worker side: what the supervisor hands a worker process (its id, the
//! inherited listener, the heartbeat pipe). The heartbeat itself is the
//! server's (`server/heartbeat.rs`): it reports the server's state.
//!
//! A worker is the same program, started by the supervisor with three
//! environment variables: its id, the listening socket's descriptor and the
//! write end of a pipe back to the supervisor.

use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
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
    pub(crate) restarts: u64,
}

impl WorkerEnv {
    /// `Some` in a worker process started by a fastlane supervisor.
    pub(crate) fn from_env() -> Option<WorkerEnv> {
        fn get<T: std::str::FromStr>(key: &str) -> Option<T> {
            std::env::var(key).ok()?.parse().ok()
        }
        // All three are set by the supervisor; the descriptors are taken
        // (once) by `listener` and `heartbeat_pipe`.
        get::<RawFd>(ENV_LISTEN_FD)?;
        get::<RawFd>(ENV_HEARTBEAT_FD)?;
        Some(WorkerEnv { id: get(ENV_ID)?, restarts: get(ENV_RESTARTS).unwrap_or(0) })
    }

    /// The listening socket the supervisor bound and handed down (once).
    pub(crate) fn listener() -> std::io::Result<tokio::net::TcpListener> {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        let fd = crate::sys::take_inherited_fd(ENV_LISTEN_FD, &TAKEN).ok_or_else(|| {
            std::io::Error::other(format!("no listening socket in {ENV_LISTEN_FD} (or it was taken)"))
        })?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// The write end of the heartbeat pipe to the supervisor (once).
    pub(crate) fn heartbeat_pipe() -> Option<std::fs::File> {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        crate::sys::take_inherited_fd(ENV_HEARTBEAT_FD, &TAKEN).map(std::fs::File::from)
    }
}

/// The worker id of this process, if a fastlane supervisor started it
/// (`--workers N`); `None` in a single-process server or the supervisor.
pub fn worker_id() -> Option<u32> {
    WorkerEnv::from_env().map(|w| w.id)
}
