//! Companions: long-running work a server runs beside its requests (a
//! durable job consumer), with the same isolation and the same shutdown: the
//! [`Companion`] trait, the [`Spawner`] its tasks start with, and the
//! server's start and stop of its companions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::ServerState;
use crate::metrics::MetricsSource;
use crate::routes::StallSource;

/// A boxed companion future.
pub type CompanionFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Long-running work that a [`Server`](crate::Server) runs for its whole
/// life, such as `fastlane_jobs::Consumer` (added with
/// [`Server::jobs`](crate::Server::jobs)).
///
/// It starts when serving starts, in every worker process (never in the
/// supervisor), on the watched executor where handlers run; the tasks it
/// starts with [`spawn`] run there too, so a job handler that blocks by
/// mistake is isolated like a request handler. At shutdown `stop` turns true
/// and the companion has the server's grace period to finish; the server
/// waits for it, beside in-flight requests and background tasks.
pub trait Companion: Send + 'static {
    /// What it is, for the logs (`job consumer`).
    fn name(&self) -> String;

    /// Its numbers for `GET /metrics`, read at each scrape (with the
    /// server's `fastlane_` prefix and `worker` label). None by default.
    fn metrics(&self) -> Option<MetricsSource> {
        None
    }

    /// The stalls it has seen, for `GET /_fastlane/stalls` beside the
    /// server's own routes (an ASGI app's blocked event loops). None by
    /// default.
    fn stalls(&self) -> Option<StallSource> {
        None
    }

    /// Routes it serves on the app's own address when internal endpoints
    /// are on ([`Config::expose_internal`](crate::Config::expose_internal)),
    /// merged into the app's router (so under its middleware: request ids,
    /// access log, timeouts); under `/_fastlane/` by convention (a job
    /// consumer's dashboard is `/_fastlane/jobs/`). None by default.
    fn routes(&self) -> Option<axum::Router> {
        None
    }

    /// Runs until `stop` turns true, then finishes within `grace`.
    fn run(self: Box<Self>, stop: watch::Receiver<bool>, grace: Duration) -> CompanionFuture;
}

tokio::task_local! {
    /// The server whose companion (or a task it spawned) is running.
    static SERVER: Arc<ServerState>;
}

/// Runs `future` as a task where the current server runs its handlers (the
/// watched executor, with the server's lanes), if called from a
/// [`Companion`] or a task it spawned; otherwise on tokio, like
/// `tokio::spawn`. The task is detached: to wait for it, have it signal.
///
/// Tasks started with `tokio::spawn` do not know the server: capture a
/// [`Spawner`] first to start tasks on it from there.
pub fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    Spawner::current().spawn(future);
}

/// Where [`spawn`] would start a task, captured to be used from anywhere
/// (a tokio task, another thread).
#[derive(Clone)]
pub struct Spawner {
    server: Option<Arc<ServerState>>,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner").field("in_server", &self.server.is_some()).finish()
    }
}

impl Spawner {
    /// The current server's executor if called from a [`Companion`] or a
    /// task it spawned; otherwise tokio.
    pub fn current() -> Self {
        Self { server: SERVER.try_with(Arc::clone).ok() }
    }

    /// Starts `future` as a detached task there.
    pub fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.server {
            Some(server) => start(server.clone(), Box::pin(future)),
            None => drop(tokio::spawn(future)),
        }
    }

    /// Starts the handler of a durable job of type `name`: like
    /// [`spawn`](Self::spawn), and a poll of it that blocks its thread is
    /// reported as a stall of that job type (`job `send_mail` blocked its
    /// thread for 2.0 s inside an async job handler: ...`), listed under
    /// method `JOB` in `GET /_fastlane/stalls` and the stall metrics.
    pub fn spawn_job<F>(&self, name: &str, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.server {
            Some(server) => {
                static JOB: std::sync::LazyLock<http::Method> = std::sync::LazyLock::new(|| {
                    http::Method::from_bytes(b"JOB").expect("a valid extension method")
                });
                let route = server.routes.get(&JOB, name);
                let phase = crate::routes::Phase::Job;
                let routed = crate::executor::Routed::new(future, route, phase, server.executor.as_ref());
                start(server.clone(), Box::pin(routed));
            }
            None => drop(tokio::spawn(future)),
        }
    }
}

/// Starts `task` on `server`'s executor with the server in scope, so that
/// the tasks it spawns go there too.
pub(crate) fn start(server: Arc<ServerState>, task: CompanionFuture) {
    server.clone().start_task(Box::pin(SERVER.scope(server, task)));
}

/// Starts each companion on the server's executor; returns their names with
/// a signal of their end.
pub(crate) fn start_all(
    companions: Vec<Box<dyn Companion>>,
    state: &Arc<ServerState>,
    stop: &watch::Sender<bool>,
) -> Vec<(String, tokio::sync::oneshot::Receiver<()>)> {
    let grace = state.config.grace_period;
    companions
        .into_iter()
        .map(|companion| {
            let name = companion.name();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let run = companion.run(stop.subscribe(), grace);
            start(
                state.clone(),
                Box::pin(async move {
                    run.await;
                    let _ = done_tx.send(());
                }),
            );
            tracing::info!("{name} running");
            (name, done_rx)
        })
        .collect()
}

/// Waits for the companions, which were told to stop with the rest of the
/// server, for what is left of the grace period plus a little: a job consumer
/// out of grace gives its jobs back, which takes a few writes.
pub(crate) async fn stop_all(companions: Vec<(String, tokio::sync::oneshot::Receiver<()>)>, left: Duration) {
    for (name, done) in companions {
        match tokio::time::timeout(left + Duration::from_secs(5), done).await {
            Ok(_) => tracing::info!("{name} stopped"),
            Err(_) => tracing::error!("{name} did not stop within the grace period"),
        }
    }
}
