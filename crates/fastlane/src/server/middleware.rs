//! The per-request layer every fastlane route runs under.
//!
//! It is applied with `Router::layer`, i.e. after routing, so it knows the
//! matched route. For each request it:
//! * refuses a declared body over the limit (`413`, JSON);
//! * registers the request as in flight and gives the handler its lanes and
//!   its [`RequestState`] (background tasks, timeout);
//! * enforces the route's timeout (`504`, JSON);
//! * turns a panic in the handler into a `500` (JSON) — the connection, the
//!   thread and the server carry on;
//! * logs method, route, status and duration, and records the metrics;
//! * holds the request open until the response body is done, then starts the
//!   request's background tasks.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::Route;
use bytes::Bytes;
use http_body::{Body as _, Frame};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::proxy::{ClientInfo, OverTls};
use super::state::{RequestState, ServerState};
use super::timer::CoarseTimer;
use crate::executor::budget::Gate;
use crate::executor::{enter_body, enter_request};
use crate::lane::panic_message;
use crate::request_id::RequestId;
use crate::routes::RouteInfo;
use crate::ApiError;

/// The route label of requests that matched no route.
const UNMATCHED: &str = "<unmatched>";

/// The status logged and counted for a request whose client went away
/// before its response (nginx's "client closed request"; never sent).
const CLIENT_CLOSED: u16 = 499;

#[derive(Debug, Clone)]
pub(crate) struct TrackLayer {
    pub(crate) state: Arc<ServerState>,
}

// Only around axum's `Route`: `Track::call` relies on what its `call` does.
impl Layer<Route> for TrackLayer {
    type Service = Track;

    fn layer(&self, inner: Route) -> Self::Service {
        let shared = Arc::new(TrackShared { state: self.state.clone(), route: OnceLock::new() });
        Track { inner, shared }
    }
}

/// axum applies the layer to each route's handler (per method), so one
/// `Track` almost always sees one route: it remembers that route's info and
/// spares each request the lookup by name.
#[derive(Debug)]
pub(crate) struct TrackShared {
    state: Arc<ServerState>,
    route: OnceLock<Arc<RouteInfo>>,
}

impl TrackShared {
    fn route(&self, method: &http::Method, path: &str) -> Arc<RouteInfo> {
        if let Some(route) = self.route.get() {
            // Compared by content: a route served through a nested service
            // (or `any`) can reach one layer under several names.
            if route.method == method && *route.route == *path {
                return route.clone();
            }
            return self.state.routes.get(method, path);
        }
        self.route.get_or_init(|| self.state.routes.get(method, path)).clone()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Track {
    inner: Route,
    shared: Arc<TrackShared>,
}

impl Service<Request> for Track {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture<RouteFuture<Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let path = req.extensions().get::<MatchedPath>().map_or(UNMATCHED, MatchedPath::as_str);
        let route = self.shared.route(req.method(), path);
        let state = &self.shared.state;
        let unmatched = (path == UNMATCHED).then(|| req.uri().path().into());
        let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|peer| {
            let https = req.extensions().get::<OverTls>().is_some();
            let trusted = state.config.proxy_headers.then_some(&state.config.forwarded_allow_ips);
            ClientInfo::resolve(peer.0, https, req.headers(), trusted)
        });
        let request_id = RequestId::for_headers(req.headers());
        let span = request_id.span();
        let id_in_head = crate::request_id::claim_head();
        let request = Arc::new(RequestState::new(
            state.clone(),
            route,
            started,
            unmatched,
            client,
            request_id,
            id_in_head,
        ));

        if let Some(executor) = &state.executor {
            // This route has been stalling and the threads set aside for
            // stalls are all taken: refuse it at once, so that the routes
            // that behave keep theirs (see `executor::budget`).
            if request.route.stalls.suspect() && !executor.budget().has_room() {
                request.route.stalls.rejected();
                state.metrics.isolation().rejected.inc();
                let error = ApiError::unavailable(format!(
                    "{} {} is stalling its threads, and the {} threads set aside for stalling routes are in use; \
                     retry later",
                    request.method,
                    request.route.route,
                    executor.budget().limit()
                ));
                return ResponseFuture::answered(error.into_response(), request, span);
            }
        }

        if let Some(declared) = declared_length(&req) {
            let limit = state.config.body_limit;
            if declared > limit as u64 {
                let error = ApiError::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is {declared} bytes; the limit is {limit} bytes"),
                );
                return ResponseFuture::answered(error.into_response(), request, span);
            }
        }

        // Nothing of the app's is called here but the `Clone` of its
        // middleware: this layer is only ever around axum's `Route` (see
        // `Layer`), whose `call` clones its boxed service and stores it with
        // the request in its future. The app's middleware and the handler
        // are called when that future is first polled, in
        // `ResponseFuture::poll`, with the request entered as the thread's
        // current one and their panics caught; so nothing is entered for
        // this call.
        let future = self.inner.call(req);
        ResponseFuture { state: State::Running { future }, request, sleep: None, gate: Gate::default(), span }
    }
}

/// The body's declared length: hyper has read `Content-Length` already and
/// says it as the body's exact size (no header lookup again).
fn declared_length(req: &Request) -> Option<u64> {
    req.body().size_hint().exact()
}

fn panicked(request: &RequestState, payload: &(dyn std::any::Any + Send)) -> Response {
    let message = panic_message(payload);
    tracing::error!(method = %request.method, route = %request.route.route, panic = %message, "handler panicked; answered 500");
    ApiError::internal("the handler panicked; the error has been logged").into_response()
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: F },
        Done { response: Option<Response> },
    }
}

pin_project! {
    /// The response future of [`Track`].
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        request: Arc<RequestState>,
        // Started on the first pending poll, once the route's own timeout (if
        // any) is known. A coarse sleep (a tenth of a second): most requests
        // end long before, and tokio's timer wheel would cost every pending
        // request an insertion and a removal.
        sleep: Option<Pin<Box<dyn hyper::rt::Sleep>>>,
        // Runs the handler's polls under the stall budget while its route
        // is suspect.
        gate: Gate,
        // The request's span, entered while the handler is polled.
        span: tracing::Span,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped with its handler still running: hyper saw the client
            // go away (or the grace period ended) before the response. The
            // line and the count still come, as nginx's 499 "client closed
            // request", so that an abandoned request is seen and timed.
            if let State::Running { .. } = this.state.as_ref().get_ref() {
                let elapsed = this.request.started.elapsed();
                answered(this.request, CLIENT_CLOSED, elapsed, Ending::Abandoned);
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    /// A request fastlane answers itself, without calling the handler.
    fn answered(response: Response, request: Arc<RequestState>, span: tracing::Span) -> Self {
        Self {
            state: State::Done { response: Some(response) },
            request,
            sleep: None,
            gate: Gate::default(),
            span,
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let response = match this.state.as_mut().project() {
            StateProj::Done { response } => response
                .take()
                .unwrap_or_else(|| ApiError::internal("polled after completion").into_response()),
            StateProj::Running { future } => {
                // With the deadline, so that a stall past it says why no 504 came.
                let (deadline_ms, timeout_ms) = this.request.deadline_ms();
                let _route =
                    enter_request(this.request.route.id, deadline_ms, timeout_ms, &this.request.request_id);
                let _span = this.span.enter();
                let _current = this.request.request_id.enter();
                let _request = RequestState::enter(this.request);
                let poll = |cx: &mut Context<'_>| match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(Poll::Pending) => Poll::Pending,
                    Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
                    Err(payload) => Poll::Ready(Err(payload)),
                };
                let polled = match this.request.server.executor.as_ref() {
                    Some(executor) => {
                        this.gate.poll(executor.budget(), this.request.route.stalls.suspect(), cx, poll)
                    }
                    None => poll(cx),
                };
                match polled {
                    Poll::Ready(Ok(Ok(response))) => response,
                    Poll::Ready(Ok(Err(never))) => match never {},
                    Poll::Ready(Err(payload)) => panicked(this.request, &*payload),
                    Poll::Pending => {
                        if this.sleep.is_none() {
                            // The route's timeout layer has run by now (it
                            // runs on the first poll), so this is the right
                            // deadline.
                            if let Some(timeout) = this.request.timeout() {
                                let deadline = this.request.started + timeout;
                                *this.sleep = Some(hyper::rt::Timer::sleep_until(&CoarseTimer, deadline));
                            }
                        }
                        let expired = match this.sleep.as_mut() {
                            Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
                            None => false,
                        };
                        match expired {
                            true => {
                                let timeout = this.request.timeout().unwrap_or_default();
                                tracing::warn!(
                                    method = %this.request.method,
                                    route = %this.request.route.route,
                                    timeout = %crate::telemetry::Human(timeout),
                                    "request timed out; answered 504"
                                );
                                // Drop the handler's future now: its work is abandoned.
                                this.state.set(State::Done { response: None });
                                ApiError::new(
                                    http::StatusCode::GATEWAY_TIMEOUT,
                                    format!(
                                        "the handler did not answer within {:.1} s",
                                        timeout.as_secs_f64()
                                    ),
                                )
                                .into_response()
                            }
                            _ => return Poll::Pending,
                        }
                    }
                }
            }
        };
        this.state.set(State::Done { response: None });
        Poll::Ready(Ok(finish(this.request, response)))
    }
}

/// Logs and counts the answered request and ties the request's lifetime to
/// its response body.
///
/// A body of known size is logged and counted now; a stream when it ends,
/// so that its latency is the whole response's (with the time to its
/// headers beside it).
fn finish(request: &Arc<RequestState>, mut response: Response) -> Response {
    let elapsed = request.started.elapsed();
    let size = response.body().size_hint().exact();
    // One look along the answer's few names for the two this needs: less
    // than hashing each.
    let (mut has_length, mut app_set_id) = (false, false);
    for name in response.headers().keys() {
        has_length |= *name == http::header::CONTENT_LENGTH;
        app_set_id |= *name == crate::request_id::HEADER;
    }
    if !has_length {
        set_content_length(request, size, &mut response);
    }
    // An id the app set itself is replaced where it stands.
    match request.id_in_head && !app_set_id {
        true => crate::request_id::leave_for_head(&request.request_id, response.headers()),
        false => request.request_id.set_header(response.headers_mut()),
    }
    let status = response.status().as_u16();
    let exact = size.is_some();
    let log = match exact {
        true => {
            answered(request, status, elapsed, Ending::Whole);
            None
        }
        false => Some(PendingLog { request: request.clone(), status, headers: elapsed }),
    };
    // A body of known, exact size is a buffer, not a stream: nothing can
    // block or stall while hyper writes it. If no background task waits for
    // it either, the request is done now and the body needs no wrapper.
    if exact && request.finish_if_no_tasks() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = TrackedBody { inner: body, request: Some(request.clone()), gate: Gate::default(), log };
    Response::from_parts(parts, Body::new(body))
}

/// Sets the `content-length` of an answer that has none and whose `size` is
/// known and short, as the router (axum's top-level route future) would
/// after this layer, from a static table: the router's own value is written
/// for each answer (an allocation, and a free when the answer is done).
/// Longer answers, and answers to `CONNECT` (which have none), are left to
/// the router.
fn set_content_length(request: &RequestState, size: Option<u64>, response: &mut Response) {
    let Some(digits) = size.and_then(static_length) else { return };
    if request.method == http::Method::CONNECT {
        return;
    }
    if let Ok(value) = http::HeaderValue::from_maybe_shared(Bytes::from_static(digits)) {
        response.headers_mut().insert(http::header::CONTENT_LENGTH, value);
    }
}

/// `length` in decimal, from [`STATIC_LENGTHS`], if it is there.
fn static_length(length: u64) -> Option<&'static [u8]> {
    let digits = STATIC_LENGTHS.get(usize::try_from(length).ok()?)?;
    // Leading zeros are skipped, the last digit never.
    let start = digits[..3].iter().take_while(|&&d| d == b'0').count();
    Some(&digits[start..])
}

/// The decimal digits of 0 to 9,999, four each with leading zeros.
static STATIC_LENGTHS: [[u8; 4]; 10_000] = {
    let mut table = [[0; 4]; 10_000];
    let mut n = 0;
    while n < table.len() {
        table[n] = [
            b'0' + (n / 1000) as u8,
            b'0' + (n / 100 % 10) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        n += 1;
    }
    table
};

/// How a request's response went, for the end of its access log line.
enum Ending<'a> {
    /// The whole response was ready with its headers.
    Whole,
    /// The body was streamed after the headers, which took `headers`;
    /// `note` says why it did not end (empty: it did).
    Streamed { headers: std::time::Duration, note: &'a str },
    /// The connection closed before the response (the client went away,
    /// or the grace period of a shutdown ended).
    Abandoned,
}

/// Counts the request in its route's metrics and writes its access log
/// line (see `telemetry::access`), with the time to the headers when the
/// body was streamed after them, and why a stream did not end.
fn answered(request: &RequestState, status: u16, elapsed: std::time::Duration, ending: Ending<'_>) {
    request.route.answered(status, elapsed);
    if !crate::telemetry::access::enabled() {
        return;
    }
    let streamed;
    let ending = match ending {
        Ending::Whole => "",
        Ending::Streamed { headers, note } => {
            let mut text = String::from(" (headers ");
            crate::telemetry::access::push_millis(&mut text, headers);
            text.push_str("ms");
            text.push_str(note);
            text.push(')');
            streamed = text;
            &streamed
        }
        Ending::Abandoned => {
            " (the client went away or the connection closed before the response; the handler was dropped)"
        }
    };
    crate::telemetry::access::log(&crate::telemetry::access::AccessLine {
        method: request.method.as_str(),
        path: request.unmatched_path.as_deref().unwrap_or(&request.route.route),
        status,
        elapsed,
        ending,
        client: request.client.map(|c| c.addr.ip()),
        request_id: &request.request_id,
    });
}

/// The access log line of a streamed response, written when the stream
/// ends, fails, or is dropped before its end (the client went away).
struct PendingLog {
    request: Arc<RequestState>,
    status: u16,
    headers: std::time::Duration,
}

impl PendingLog {
    fn write(&self, note: &str) {
        let elapsed = self.request.started.elapsed();
        answered(&self.request, self.status, elapsed, Ending::Streamed { headers: self.headers, note });
    }
}

pin_project! {
    /// A response body that finishes its request when it ends, and is
    /// polled under the stall budget while its route is suspect.
    struct TrackedBody {
        #[pin]
        inner: Body,
        request: Option<Arc<RequestState>>,
        gate: Gate,
        // The access log line of a stream, until it is written.
        log: Option<PendingLog>,
    }

    impl PinnedDrop for TrackedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(log) = this.log.take() {
                // hyper stops polling once the body says it has ended.
                let note = match this.inner.is_end_stream() {
                    true => "",
                    false => "; the body was cut short: the client went away or the connection closed",
                };
                log.write(note);
            }
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let _route = this.request.as_ref().map(|r| enter_body(r.route.id, &r.request_id));
        let mut inner = this.inner;
        let budget = this.request.as_ref().and_then(|r| Some((r.server.executor.as_ref()?, r)));
        let polled = match budget {
            Some((executor, request)) => {
                this.gate.poll(executor.budget(), request.route.stalls.suspect(), cx, |cx| {
                    inner.as_mut().poll_frame(cx)
                })
            }
            None => inner.as_mut().poll_frame(cx),
        };
        let ended = match &polled {
            Poll::Ready(None) => Some(""),
            Poll::Ready(Some(Err(_))) => Some("; the body failed before its end"),
            Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => Some(""),
            _ => None,
        };
        if let Some(note) = ended {
            if let Some(log) = this.log.take() {
                log.write(note);
            }
        }
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &polled {
            if let Some(request) = this.request.take() {
                request.finish();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_lengths_read_as_decimals() {
        for n in [0u64, 7, 10, 99, 100, 999, 1000, 4096, 9999] {
            assert_eq!(static_length(n), Some(n.to_string().as_bytes()), "{n}");
        }
        assert_eq!(static_length(10_000), None);
        assert_eq!(static_length(u64::MAX), None);
    }
}
