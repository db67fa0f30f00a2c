//! fastlane: an axum application server in which slow work never blocks fast
//! requests and background work is never lost.
//!
//! # Layout
//!
//! * [`Server`] (`server/`) accepts connections and serves an axum `Router`
//!   over HTTP/1.1 and HTTP/2 with request logging, metrics, limits, panic
//!   recovery and graceful shutdown. [`Config`] and [`ServeArgs`] configure it.
//! * Lanes (`lane/`): [`sync`] and [`cpu`] put plain `fn` handlers on the
//!   bounded blocking and CPU lanes; [`blocking`] and [`compute`] do the same
//!   for a closure inside an async handler. A full lane answers `503` at once.
//! * [`Background`] (`background/`) schedules work to run after the response,
//!   on the lane that fits it, drained on shutdown.
//! * [`extract`]: `Query` and `Json` whose rejections are JSON [`ApiError`]s.
//! * `metrics/`: the Prometheus registry behind `GET /metrics`.
//! * `routes/`: the app's routes, each with its stall record and metric
//!   handles, shared by the server, the executor and the companions.
//! * [`RequestId`] (`request_id.rs`): the id on a request's response, log
//!   lines and stall reports.
//! * [`Companion`] (`server/companion.rs`): long-running work beside the requests,
//!   such as a durable job consumer ([`Server::jobs`]), on the same executor.
//! * [`openapi`] (feature `openapi`, on by default): `/openapi.json` and
//!   Swagger UI at `/docs` for routes described with aide.
//! * [`client`]: a minimal HTTP/1.1 client, for tests and the probe.
//!
//! # Example
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use fastlane::{Background, Server};
//!
//! async fn hello(bg: Background) -> &'static str {
//!     bg.spawn_blocking(|| std::thread::sleep(std::time::Duration::from_secs(1)));
//!     "hello"
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let app = Router::new().route("/", get(hello));
//!     Server::new(app).serve().await?;
//!     Ok(())
//! }
//! ```

mod api_error;
mod background;
pub mod client;
mod coarse;
mod error;
mod executor;
pub mod extract;
mod lane;
mod metrics;
#[cfg(feature = "openapi")]
pub mod openapi;
mod request_id;
mod routes;
mod server;
mod shutdown;
mod supervisor;
mod sys;
mod telemetry;

pub use api_error::ApiError;
pub use background::{Background, TaskResult};
pub use error::{Error, ErrorChain};
pub use executor::IsolationConfig;
pub use lane::{blocking, compute, cpu, sync, LaneConfig, LaneError, LaneHandler, Lanes};
pub use metrics::{CompanionMetric, MetricKind, MetricsSource};
pub use request_id::RequestId;
pub use routes::StallRow;
pub use routes::StallSource;
pub use server::companion::{spawn, Companion, CompanionFuture, Spawner};
pub use server::{
    BoundServer, ClientInfo, Config, ForwardedAllowIps, RouteTimeout, ServeArgs, Server, ServerHandle,
    SetTimeout, SpawnedServer, TlsConfig, TlsError,
};
pub use shutdown::{CutWork, ShutdownReport};
pub use supervisor::worker::worker_id;
pub use telemetry::{
    init_logging, init_logging_with, Human as HumanDuration, LogConfig, LogFields, LogFormat,
};

/// The README's code blocks, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
