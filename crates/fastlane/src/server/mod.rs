//! The server: accepts connections, serves an axum `Router` over HTTP/1.1
//! and HTTP/2, and shuts down gracefully.
//!
//! Every connection runs as a tokio task with the server's lanes in scope.
//! Shutdown (SIGINT/SIGTERM, or [`ServerHandle::shutdown`]) stops accepting,
//! asks every connection to finish its current requests (HTTP/1.1: close
//! after the response; HTTP/2: GOAWAY), waits for requests and background
//! tasks up to the grace period, and reports whatever it had to cut.
//!
//! This file holds the [`Server`] builder, the accept loop and each
//! connection's task; the rest is in:
//!
//! * `config.rs`: [`Config`] and [`ServeArgs`] (the flags);
//! * `state.rs`: what connections, requests and background tasks share;
//! * `service.rs`: the service hyper calls for each request of a connection;
//! * `internal.rs`: `/metrics` and `/_fastlane/*`;
//! * `middleware.rs`: the per-request layer (access log, metrics, timeouts,
//!   panics), `timeout.rs` per-route timeouts, `proxy.rs` proxy headers;
//! * `tls.rs`: HTTPS (rustls; the certificate and key, and their reload);
//! * `sniff.rs` and `timer.rs`: deadlines of connections on tokio's I/O;
//! * `tracker.rs`: what is in flight;
//! * `heartbeat.rs`: a worker process's heartbeat to its supervisor;
//! * `companion.rs`: long-running work beside the requests (a job consumer).

pub(crate) mod companion;
mod config;
mod heartbeat;
mod http1;
mod internal;
mod middleware;
mod proxy;
mod service;
mod sniff;
mod state;
mod timeout;
mod timer;
mod tls;
mod tracker;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::Router;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use config::{Config, ServeArgs, TlsConfig};
pub use proxy::{ClientInfo, ForwardedAllowIps};
pub(crate) use state::{RequestState, ServerState};
pub use timeout::{RouteTimeout, SetTimeout};
pub use tls::TlsError;

use crate::executor::reactor::IdleWatch;
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use crate::shutdown::{poll_stopped, stopped, ShutdownReport};
use crate::supervisor::worker::WorkerEnv;
use crate::supervisor::SupervisorConfig;
use crate::{Error, Lanes};
use companion::Companion;
use service::ConnectionService;
use sniff::{Action, Deadlines, Sniffing};

/// On shutdown, a connection younger than this is left to receive its first
/// request before it is asked to close. Older idle keep-alive connections
/// close at once.
const NEW_CONNECTION_SETTLE: Duration = Duration::from_millis(250);

/// The body limit axum's extractors apply when no `DefaultBodyLimit` is set.
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves an axum [`Router`] with lanes, limits, metrics and graceful
/// shutdown.
///
/// # Examples
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let app = Router::new()
///         .route("/", get(|| async { "hello" }))
///         .route("/report", get(fastlane::sync(|| {
///             std::thread::sleep(std::time::Duration::from_secs(1)); // blocking is fine here
///             "report"
///         })));
///     let report = fastlane::Server::new(app).serve().await?;
///     std::process::exit(if report.is_clean() { 0 } else { 1 });
/// }
/// ```
#[must_use = "a server does nothing until `serve` is awaited"]
pub struct Server {
    router: Router,
    config: Config,
    shutdown: Option<ShutdownSignal>,
    companions: Vec<Box<dyn Companion>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `router` with the default [`Config`].
    pub fn new(router: Router) -> Self {
        Self { router, config: Config::default(), shutdown: None, companions: Vec::new() }
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Shuts down gracefully when `signal` completes, instead of on
    /// SIGINT/SIGTERM.
    pub fn shutdown_on<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// Runs `n` worker processes under a supervisor (see
    /// [`Config::workers`]): the same as `--workers n`.
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// Runs a [`Companion`] inside the server: in every worker process, with
    /// the handlers' isolation, stopped and drained with the server's grace
    /// period at shutdown. Call it once per companion.
    pub fn companion(mut self, companion: impl Companion) -> Self {
        self.companions.push(Box::new(companion));
        self
    }

    /// Runs a durable job consumer (`fastlane_jobs::Consumer`) inside the
    /// server: [`companion`](Self::companion), under the name a reader of
    /// `Server::new(app).jobs(jobs.consumer())` expects.
    pub fn jobs(self, consumer: impl Companion) -> Self {
        self.companion(consumer)
    }

    /// Binds the configured address and returns the bound server, whose
    /// [`local_addr`](BoundServer::local_addr) is known (useful with port 0).
    ///
    /// In a worker process started by a supervisor, it takes the socket the
    /// supervisor handed down instead of binding.
    pub async fn bind(self) -> Result<BoundServer, Error> {
        self.config.validate()?;
        if WorkerEnv::from_env().is_some() {
            let listener = WorkerEnv::listener()
                .map_err(|source| Error::Bind { addr: "inherited listener".into(), source })?;
            return self.from_listener(listener);
        }
        let addr = format!("{}:{}", self.config.host, self.config.port);
        let listener = TcpListener::bind(&addr).await.map_err(|source| Error::Bind { addr, source })?;
        self.from_listener(listener)
    }

    /// Serves on an already bound listener (inherited from a supervisor, or
    /// bound by a test).
    pub fn from_listener(self, listener: TcpListener) -> Result<BoundServer, Error> {
        self.config.validate()?;
        let local_addr =
            listener.local_addr().map_err(|source| Error::Bind { addr: "listener".into(), source })?;
        let worker = WorkerEnv::from_env();
        let mode = match worker {
            Some(_) => Mode::Worker,
            None if self.config.workers > 1 => Mode::Supervisor,
            None => Mode::Single,
        };
        // Read now, in every mode, so that a bad file is an error at start
        // (a supervisor's workers would otherwise fail one after another).
        let tls = self.config.tls.as_ref().map(tls::Tls::new).transpose().map_err(Error::Tls)?;
        let sources = self.companions.iter().filter_map(|c| c.metrics()).collect();
        let stall_sources = state::StallSources(self.companions.iter().filter_map(|c| c.stalls()).collect());
        let metrics = Metrics::new((&self.config.lanes).into(), worker.map(|w| (w.id, w.restarts)), sources);
        let lanes = Lanes::with_gauges(self.config.lanes.clone(), metrics.lane_gauges());
        lanes.install_fallback();
        let runtime = tokio::runtime::Handle::current();
        let routes = Arc::new(RouteTable::new(metrics.clone()));
        // The supervisor serves no request: no runners, no monitor.
        let isolate = self.config.isolation.enabled && !matches!(mode, Mode::Supervisor);
        let executor = isolate.then(|| {
            Executor::new(
                self.config.isolation.clone(),
                self.config.header_read_timeout,
                runtime.clone(),
                routes.clone(),
                metrics.clone(),
            )
        });
        let state = Arc::new(ServerState {
            config: self.config,
            lanes,
            metrics,
            tracker: Default::default(),
            runtime,
            routes,
            executor,
            stall_sources,
            tls,
        });
        // Companions' own pages (a job dashboard), only where internal
        // endpoints are: they show and change what the app's users do not.
        let mut router = self.router;
        if state.config.expose_internal {
            for routes in self.companions.iter().filter_map(|c| c.routes()) {
                router = router.merge(routes);
            }
        }
        // axum's extractors already refuse bodies over 2 MiB; a layer (one
        // more boxed service per request) is only worth it for another limit.
        let router = if state.config.body_limit == AXUM_DEFAULT_BODY_LIMIT {
            router
        } else {
            router.layer(DefaultBodyLimit::max(state.config.body_limit))
        };
        // `with_state` turns every route's boxed handler into a service once,
        // here; a router called without it does that on every request (as
        // `axum::serve` knows, which calls it too).
        let router = router.layer(middleware::TrackLayer { state: state.clone() });
        // Outside the per-request layer, so that what it logs and times is
        // the handler's response, compressed on its way out. (A layer put
        // outside the per-request one changes what the runners' HTTP/1 may
        // write into the head itself: see
        // `ConnectionService::route_layer_outermost`.)
        let router = if state.config.compression { router.layer(compression()) } else { router };
        let router = router.with_state(());
        let (stop_tx, _) = watch::channel(false);
        Ok(BoundServer {
            listener,
            local_addr,
            router,
            state,
            signal: self.shutdown,
            stop: Arc::new(stop_tx),
            mode,
            companions: self.companions,
        })
    }

    /// Binds and serves until shut down; returns what the shutdown cut.
    pub async fn serve(self) -> Result<ShutdownReport, Error> {
        self.bind().await?.serve().await
    }
}

/// A server that is listening; [`serve`](Self::serve) runs it.
#[must_use = "a bound server does nothing until `serve` is awaited"]
pub struct BoundServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    state: Arc<ServerState>,
    signal: Option<ShutdownSignal>,
    stop: Arc<watch::Sender<bool>>,
    mode: Mode,
    companions: Vec<Box<dyn Companion>>,
}

/// What this process is.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// One process serves (the default).
    Single,
    /// `--workers N`: this process only supervises the workers.
    Supervisor,
    /// A worker started by a supervisor.
    Worker,
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

/// A server running on its own task; see [`BoundServer::spawn`].
#[derive(Debug)]
pub struct SpawnedServer {
    addr: SocketAddr,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<Result<ShutdownReport, Error>>,
}

impl SpawnedServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its handle.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// Shuts it down gracefully and waits for the drain to end.
    pub async fn shutdown(self) -> Result<ShutdownReport, Error> {
        self.handle.shutdown();
        match self.task.await {
            Ok(result) => result,
            // The serve task panicked or was aborted: resume the panic here.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}

/// Controls a running server from elsewhere (a test, an admin task).
#[derive(Debug, Clone)]
pub struct ServerHandle {
    stop: Arc<watch::Sender<bool>>,
    state: Arc<ServerState>,
}

impl ServerHandle {
    /// Starts a graceful shutdown, as SIGTERM would.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// The server's lanes.
    pub fn lanes(&self) -> Lanes {
        self.state.lanes.clone()
    }

    /// The metrics in Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics(&self) -> String {
        self.state.render_metrics()
    }

    /// Reads the TLS certificate and key files again, as SIGHUP does: the
    /// handshakes from now on present the new certificate, the connections
    /// already open keep theirs. On an error (a file missing, a key that is
    /// not the certificate's) the old certificate stays. Without TLS,
    /// nothing happens.
    pub fn reload_tls(&self) -> Result<(), Error> {
        match &self.state.tls {
            Some(tls) => tls.reload().map_err(Error::Tls),
            None => Ok(()),
        }
    }
}

/// SIGHUP reloads the certificate and key (the files a renewal, such as
/// certbot's, has just replaced).
fn reload_tls_on_hangup(handle: ServerHandle) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).map_err(Error::Signal)?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match handle.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate and key"),
                Err(err) => tracing::error!("SIGHUP: {}; the old certificate stays", crate::ErrorChain(&err)),
            }
        }
    });
    Ok(())
}

impl BoundServer {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to shut the server down from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle { stop: self.stop.clone(), state: self.state.clone() }
    }

    /// Serves on a new tokio task and returns at once: for tests and for
    /// apps that do other things beside serving.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// use axum::{routing::get, Router};
    ///
    /// let app = Router::new().route("/", get(|| async { "hi" }));
    /// let config = fastlane::Config { port: 0, ..fastlane::Config::default() };
    /// let server = fastlane::Server::new(app).config(config).bind().await?.spawn();
    /// let response = fastlane::client::get(&server.url("/")).await?;
    /// assert_eq!(response.text(), "hi");
    /// assert!(server.shutdown().await?.is_clean());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn(self) -> SpawnedServer {
        let addr = self.local_addr;
        let handle = self.handle();
        let task = tokio::spawn(self.serve());
        SpawnedServer { addr, handle, task }
    }

    /// Serves until shutdown, then drains and returns what was cut.
    pub async fn serve(self) -> Result<ShutdownReport, Error> {
        let handle = self.handle();
        let BoundServer { listener, local_addr, router, state, signal, stop, mode, companions } = self;
        let signal = match signal {
            Some(signal) => signal,
            None => os_signals()?,
        };
        match mode {
            Mode::Supervisor => {
                tracing::info!(addr = %local_addr, "fastlane listening on http://{local_addr} with {} workers", state.config.workers);
                let config = state.config.clone();
                let workers = SupervisorConfig {
                    workers: config.workers,
                    worker_timeout: config.worker_timeout,
                    grace_period: config.grace_period,
                };
                return crate::supervisor::supervise(listener, workers, signal, stop.subscribe()).await;
            }
            Mode::Worker => {
                let max = state.config.max_requests.map(|n| n + jitter(state.config.max_requests_jitter));
                heartbeat::start(state.clone(), handle.clone(), max);
            }
            Mode::Single => {}
        }
        let builders = Builders {
            timed: Arc::new(http_builder(&state, true)),
            watched: Arc::new(http_builder(&state, false)),
        };
        // Before the line that says the server is up: a SIGHUP sent once it
        // is read must find the handler (the default action ends the process).
        if state.tls.is_some() {
            reload_tls_on_hangup(handle.clone())?;
        }
        let scheme = if state.tls.is_some() { "https" } else { "http" };
        tracing::info!(addr = %local_addr, "fastlane listening on {scheme}://{local_addr}");
        let companions = companion::start_all(companions, &state, &stop);

        let mut stop_rx = stop.subscribe();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                biased;
                () = &mut signal => break,
                () = stopped(&mut stop_rx) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => start_connection(stream, peer, &builders, &router, &state, &stop),
                    Err(err) => accept_error(local_addr, err).await,
                },
            }
        }

        // Stop accepting: new connections are refused from here on.
        drop(listener);
        stop.send_replace(true);
        let grace = state.config.grace_period;
        tracing::info!(
            requests = state.tracker.requests_in_flight(),
            background_tasks = state.tracker.tasks_pending(),
            grace = %crate::telemetry::Human(grace),
            "shutting down: draining in-flight requests and background tasks"
        );
        let started = Instant::now();
        let drained = tokio::time::timeout(grace, state.tracker.idle()).await.is_ok();
        companion::stop_all(companions, grace.saturating_sub(started.elapsed())).await;
        let (requests, tasks) =
            if drained { Default::default() } else { state.tracker.snapshot(&state.routes) };
        let report = ShutdownReport { requests, tasks, drained_in: started.elapsed(), workers_failed: 0 };
        if report.is_clean() {
            tracing::info!(
                drained_in = %crate::telemetry::Human(report.drained_in),
                "shutdown complete: nothing was cut"
            );
        } else {
            for cut in report.cut() {
                tracing::error!("shutdown cut {cut}");
            }
            tracing::error!(
                requests = report.requests.len(),
                background_tasks = report.tasks.len(),
                "shutdown: the grace period of {:.1} s ended with work still running",
                grace.as_secs_f64()
            );
        }
        state.lanes.close();
        if let Some(executor) = &state.executor {
            executor.shutdown();
        }
        Ok(report)
    }
}

/// hyper's connection settings, for the two kinds of connection.
struct Builders {
    /// On tokio's I/O: hyper enforces the header-read timeout.
    timed: Arc<auto::Builder<StreamExecutor>>,
    /// On the runners' reactor, which enforces it itself (`cut_idle`).
    watched: Arc<auto::Builder<StreamExecutor>>,
}

fn http_builder(state: &Arc<ServerState>, header_timer: bool) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor { state: state.clone() });
    builder.http1().keep_alive(true);
    if !header_timer {
        // The runners' sockets: hyper copies a response's head and body
        // into one buffer, which is then sent as it is.
        builder.http1().writev(false);
    }
    if header_timer {
        // A coarse timer of our own: hyper arms this timeout on every
        // request, and tokio's timer made that cost more than the routing.
        builder.http1().timer(timer::CoarseTimer).header_read_timeout(state.config.header_read_timeout);
    }
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Spawns HTTP/2 stream tasks where connections run (the watched executor),
/// with the server's lanes in scope.
#[derive(Clone)]
struct StreamExecutor {
    state: Arc<ServerState>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.state.start_task(Box::pin(async move {
            fut.await;
        }));
    }
}

/// Starts serving an accepted connection: on the runners, registered with
/// their reactor, when isolation is on; on tokio otherwise.
fn start_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builders: &Builders,
    router: &Router,
    state: &Arc<ServerState>,
    stop: &watch::Sender<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (router, stop) = (router.clone(), stop.subscribe());
    if let Some(tls) = &state.tls {
        // The handshake, then HTTP on tokio's I/O, as a plain connection
        // without isolation (the runners' reactor reads plain sockets only;
        // the handlers still run on the runners).
        let (acceptor, builder, task_state) = (tls.acceptor().clone(), builders.timed.clone(), state.clone());
        let timeout = state.config.header_read_timeout;
        state.start_task(Box::pin(async move {
            if let Some(stream) = handshake(acceptor, stream, peer, timeout).await {
                serve_on_tokio(stream, router, peer, true, builder, task_state, stop).await;
            }
        }));
        return;
    }
    match state.executor.as_ref().and_then(|e| e.reactor()) {
        Some(reactor) => match stream.into_std().and_then(|stream| reactor.register(stream)) {
            Ok(io) => {
                let watch = io.idle_watch();
                let service = ConnectionService::new(router, state, watch.clone(), true, peer);
                let serve =
                    serve_on_runners(io, service, builders.watched.clone(), state.clone(), stop, watch);
                state.start_task(Box::pin(serve));
            }
            // The descriptor could not be moved (out of memory for the epoll
            // entry): the connection is closed, as an accept failure would.
            Err(err) => tracing::warn!(error = %err, "could not register a connection; closed it"),
        },
        None => {
            let serve =
                serve_on_tokio(stream, router, peer, false, builders.timed.clone(), state.clone(), stop);
            state.start_task(Box::pin(serve));
        }
    }
}

/// Serves a connection on tokio's I/O: hyper enforces the HTTP/1 deadline,
/// the connection task the HTTP/2 ones (see `sniff`).
async fn serve_on_tokio<S>(
    stream: S,
    router: Router,
    peer: SocketAddr,
    https: bool,
    builder: Arc<auto::Builder<StreamExecutor>>,
    state: Arc<ServerState>,
    stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let watch = IdleWatch::standalone();
    let service = ConnectionService::new(router, &state, watch.clone(), false, peer);
    let service = if https { service.over_tls() } else { service };
    let deadlines = Deadlines::new(watch.clone(), state.config.header_read_timeout);
    let io = Sniffing::new(stream, watch);
    state.tracker.connection_opened();
    let accepted = tokio::time::Instant::now();
    serve_connection(io, builder, service, stop, Watch::Task(deadlines), accepted).await;
    state.tracker.connection_closed();
}

/// Serves a connection on the runners' reactor: fastlane's own HTTP/1
/// (`http1.rs`) while its requests are of the usual kind, then hyper, which
/// reads on from the bytes already read.
async fn serve_on_runners(
    io: crate::executor::reactor::Connection,
    service: ConnectionService,
    builder: Arc<auto::Builder<StreamExecutor>>,
    state: Arc<ServerState>,
    mut stop: watch::Receiver<bool>,
    watch: IdleWatch,
) {
    state.tracker.connection_opened();
    let accepted = tokio::time::Instant::now();
    let ended = http1::serve(io, service, &mut stop, accepted, state.config.body_limit).await;
    if let http1::Ended::ToHyper(io, read, service) = ended {
        let io = http1::Replay::new(io, read);
        serve_connection(io, builder, service, stop, Watch::Reactor(watch), accepted).await;
    }
    state.tracker.connection_closed();
}

/// The TLS handshake of an HTTPS connection, within the header-read
/// timeout (a client that never finishes it holds nothing); `None` if it
/// failed.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            // A client that does not trust the certificate, a scanner
            // speaking plain HTTP: theirs to fix, not worth a warning.
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not finished within the header-read timeout; closed");
            None
        }
    }
}

/// Serves a connection with hyper until it ends or shutdown closes it;
/// `accepted` is when the connection was accepted.
async fn serve_connection<I>(
    io: I,
    builder: Arc<auto::Builder<StreamExecutor>>,
    service: ConnectionService,
    mut stop: watch::Receiver<bool>,
    mut deadlines: Watch,
    accepted: tokio::time::Instant,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // Serve until the connection ends or shutdown begins. The shutdown
    // future is polled once, to register the task's waker with the channel,
    // and then only once the channel has changed (an atomic load): polling
    // it on every wake-up, as `select!` would, takes the channel's lock,
    // which every connection shares, twice per request.
    let mut changed = stop.clone();
    let shutdown = stopped(&mut stop);
    tokio::pin!(shutdown);
    let mut registered = false;
    let mut closing = false;
    let ended = std::future::poll_fn(|cx| {
        if poll_stopped(cx, shutdown.as_mut(), &mut changed, &mut registered) {
            return std::task::Poll::Ready(Ended::Shutdown);
        }
        if let std::task::Poll::Ready(result) = conn.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ended::Served(result));
        }
        // Looked at after the connection's poll, which may just have
        // learnt that it speaks HTTP/2 (and must then arm the check).
        let action = match &mut deadlines {
            Watch::Reactor(idle) if idle.close_asked() => Action::CloseGracefully,
            Watch::Reactor(_) => Action::Wait,
            Watch::Task(deadlines) => deadlines.poll(cx),
        };
        match action {
            Action::Wait => std::task::Poll::Pending,
            Action::CloseGracefully if !closing => {
                // An HTTP/2 connection idle for too long: GOAWAY, then hyper
                // closes it (the idle watch cuts it if the client does not).
                closing = true;
                conn.as_mut().graceful_shutdown();
                conn.as_mut().poll(cx).map(Ended::Served)
            }
            Action::CloseGracefully => std::task::Poll::Pending,
            Action::Cut => std::task::Poll::Ready(Ended::Cut),
        }
    })
    .await;
    let result = match ended {
        Ended::Served(result) => result,
        Ended::Cut => {
            tracing::debug!(
                "closed an HTTP/2 connection past its deadline (a preface or header block left unfinished, \
                 or no close after GOAWAY)"
            );
            Ok(())
        }
        Ended::Shutdown => {
            // hyper closes a connection that has not sent a byte yet at once.
            // A client that has just connected has its request on the wire:
            // give it a moment to arrive so that it is answered, not reset.
            let settle = tokio::time::sleep_until(accepted + NEW_CONNECTION_SETTLE);
            tokio::select! {
                result = conn.as_mut() => result,
                () = settle => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(err) = result {
        // Clients that go away mid-request are normal; not worth a warning.
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Who enforces a connection's deadlines beyond hyper's own.
enum Watch {
    /// The runners' reactor (its monitor cuts; the task is only asked to
    /// close gracefully).
    Reactor(IdleWatch),
    /// The connection's task, on tokio's I/O: the HTTP/2 deadlines.
    Task(Deadlines),
}

/// How `serve_connection`'s main loop ended.
enum Ended<T> {
    Served(T),
    Shutdown,
    Cut,
}

async fn accept_error(addr: SocketAddr, err: std::io::Error) {
    use std::io::ErrorKind::*;
    // A connection reset before accept completed is the client's business.
    if matches!(err.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
        return;
    }
    // Anything else is usually EMFILE (out of file descriptors): log it and
    // back off a little so the loop does not spin while connections close.
    let err = Error::Listener { addr, source: err };
    tracing::error!(error = %crate::ErrorChain(&err), "accept failed; retrying in 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A random number in `0..=max`, different in every worker process.
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    use std::hash::{BuildHasher, Hasher};
    // std's hasher is seeded randomly per process: enough randomness here.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish() % (max + 1)
}

fn os_signals() -> Result<ShutdownSignal, Error> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
        Ok(Box::pin(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }))
    }
    #[cfg(not(unix))]
    {
        Ok(Box::pin(async {
            let _ = tokio::signal::ctrl_c().await;
        }))
    }
}

/// The compression of [`Config::compression`]: gzip, brotli or zstd as the
/// client prefers, for bodies of 1 KiB or more (below that the frame costs
/// more than it saves), never for images, gRPC, server-sent events or a
/// response that already says how it is encoded.
pub(super) fn compression(
) -> tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate> {
    use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
    let predicate = SizeAbove::new(1024)
        .and(NotForContentType::GRPC)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::SSE);
    tower_http::compression::CompressionLayer::new().compress_when(predicate)
}
