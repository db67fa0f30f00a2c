//! The demo's routes (`axum_peer::routes`) with what a production axum
//! service adds to every request, done the usual way, so that fastlane
//! (which does all of this itself) can be compared with an axum that does it
//! too. Usage: `axum-production-peer PORT` (access lines on stderr):
//!
//! * an id per request, taken from `x-request-id` or made, and returned
//!   (tower-http's `SetRequestId` and `PropagateRequestId`; made from a
//!   counter, as cheap as an id gets, not a random UUID);
//! * an access line per request with its id (tower-http's `TraceLayer` at
//!   `INFO`, formatted by tracing-subscriber and written to stderr by
//!   tracing-appender's non-blocking writer, buffered, which drops lines rather than
//!   make a request wait, as fastlane's does);
//! * per-route Prometheus metrics, a count by status and a latency
//!   histogram, labelled by the matched route (a `route_layer` middleware,
//!   as in axum's own Prometheus example), served at `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use http::HeaderValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8001);
    // Keeps the log writer's thread until the server ends.
    let (app, _log_writer) = wrap(axum_peer::routes());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    axum::serve(listener, app).await.unwrap();
}

/// Adds the request id, access log and metrics layers to `app`. The guard
/// keeps the log writer's thread alive.
fn wrap(app: Router) -> (Router, tracing_appender::non_blocking::WorkerGuard) {
    // Buffered: the writer thread flushes whenever its queue runs dry, so
    // under load many lines go out per `write`, as fastlane's do (stderr
    // alone would cost a system call a line).
    let (writer, guard) = tracing_appender::non_blocking(std::io::BufWriter::new(std::io::stderr()));
    tracing_subscriber::fmt().with_writer(writer).with_ansi(false).with_max_level(Level::INFO).init();

    let metrics = Arc::new(Metrics::new());
    let scrape = metrics.clone();
    let app = app
        .route("/metrics", get(move || async move { scrape.render() }))
        .route_layer(middleware::from_fn_with_state(metrics, track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<Body>| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), uri = %req.uri(), id = %id)
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(CountedId::default()));
    (app, guard)
}

/// Ids from a per-process counter: unique within the process, no system
/// call or random number per request.
#[derive(Clone, Default)]
struct CountedId(Arc<AtomicU64>);

impl MakeRequestId for CountedId {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{n:016x}")).ok().map(RequestId::new)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register("http_requests", "Requests answered, by route and status", requests.clone());
        registry.register("http_request_duration_seconds", "Time to the response, by route", latency.clone());
        Self { registry, requests, latency }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// Counts and times each request under its matched route.
async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map_or("<unmatched>", MatchedPath::as_str).to_owned();
    let method = req.method().to_string();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    metrics
        .requests
        .get_or_create(&RequestLabels { method: method.clone(), route: route.clone(), status })
        .inc();
    metrics.latency.get_or_create(&RouteLabels { method, route }).observe(started.elapsed().as_secs_f64());
    response
}
