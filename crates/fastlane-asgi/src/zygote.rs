//! The zygote: the Python process that imports the app once and then forks
//! a worker whenever the front asks. A reload starts a new zygote (a fresh
//! import of the app's code) beside the old one, which stays until its
//! workers are gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::OwnedWriteHalf;

use crate::frame;
use crate::wire::{self, FrameReader, Outbox};
use crate::{AppConfig, StartError};

/// The worker's source, written next to the socket at start-up so that its
/// tracebacks name a real file.
const WORKER_SOURCE: &str = include_str!("../python/fastlane_worker.py");

/// How to start a zygote: the same for the first one and for each reload.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    python: PathBuf,
    script: PathBuf,
    settings: String,
}

impl Launch {
    /// Writes the worker's source into `dir` and settles the zygote's settings.
    pub(crate) fn prepare(
        config: &AppConfig,
        python: PathBuf,
        dir: &Path,
        socket: &Path,
    ) -> Result<Self, StartError> {
        let script = dir.join("fastlane_worker.py");
        std::fs::write(&script, WORKER_SOURCE).map_err(StartError::Io)?;
        let settings = serde_json::json!({
            "socket": socket,
            "dir": dir,
            "app": config.app,
            "factory": config.factory,
            "app_dir": config.app_dir,
            "root_path": config.root_path,
            "loop": config.event_loop,
            "stall_threshold_ms": config.stall_threshold.as_secs_f64() * 1000.0,
        })
        .to_string();
        Ok(Self { python, script, settings })
    }
}

/// A zygote that has imported the app.
#[derive(Debug)]
pub(crate) struct Zygote {
    /// Frames to it (`FORK`, `KILL`); closing it makes the zygote exit.
    pub(crate) out: Arc<Outbox>,
    pub(crate) pid: u32,
}

/// Starts a zygote; `connected` is its socket, after its `HELLO`, once it
/// connects. Returns it with its reader (for its reports) and its process,
/// or why the app could not be imported.
pub(crate) async fn start(
    launch: &Launch,
    connected: impl std::future::Future<Output = Option<(FrameReader, OwnedWriteHalf)>>,
    timeout: Duration,
) -> Result<(Zygote, FrameReader, tokio::process::Child), StartError> {
    let python = launch.python.clone();
    let mut child = tokio::process::Command::new(&python)
        .arg(&launch.script)
        .arg(&launch.settings)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|source| StartError::Spawn { python: python.clone(), source })?;
    let pid = child.id().unwrap_or(0);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let answer = async {
        let (mut reader, write) = connected.await?;
        let answer = reader.next().await?;
        Some((reader, write, answer))
    };
    let (reader, write, answer) = tokio::select! {
        answer = answer => match answer {
            Some(answer) => answer,
            None => return Err(StartError::Exited { python, status: child.wait().await.ok() }),
        },
        status = child.wait() => return Err(StartError::Exited { python, status: status.ok() }),
        () = &mut deadline => {
            let _ = child.start_kill();
            return Err(StartError::Timeout(timeout));
        }
    };
    match answer {
        (frame::READY, _, _) => {}
        (frame::FAILED, _, message) => {
            let _ = child.wait().await;
            return Err(StartError::App(String::from_utf8_lossy(&message).trim_end().to_owned()));
        }
        _ => return Err(StartError::Exited { python, status: child.wait().await.ok() }),
    }
    let out = Arc::new(Outbox::default());
    tokio::spawn(wire::write_out(write, out.clone()));
    Ok((Zygote { out, pid }, reader, child))
}

/// Reads a zygote's reports until it exits: workers that exited (logged
/// unless `quiet`, which also says whether its own end is expected), and
/// the outcome of each `NICE` (given to `niced` with the worker's pid).
pub(crate) async fn reports(
    mut reader: FrameReader,
    mut child: tokio::process::Child,
    quiet: impl Fn() -> bool,
    niced: impl Fn(u32, bool),
) {
    while let Some((kind, id, payload)) = reader.next().await {
        if kind == frame::NICED {
            niced(id, payload.first() == Some(&1));
            continue;
        }
        if kind != frame::EXITED {
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Exited {
            pid: u32,
            code: i32,
        }
        if let Ok(exited) = serde_json::from_slice::<Exited>(&payload) {
            if !quiet() && exited.code != 0 {
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
    let status = child.wait().await;
    if !quiet() {
        tracing::error!(
            ?status,
            "the zygote (the process that forks workers) exited; no new worker can start"
        );
    }
}
