//! One HTTP request, handed to a worker: its head (and small body) as a
//! frame, the rest of its body when the app asks, and the response back as
//! an HTTP body that grants the worker credit as the client takes it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fastlane::ApiError;
use http::StatusCode;
use http_body::Frame;

use crate::frame::{self, RequestHead};
use crate::mailbox::Event;
use crate::mailbox::Mailbox;
use crate::pool::{Pick, Shared};
use crate::worker::Worker;

/// A body of at most this many bytes, with its length declared, is read
/// before the request goes out, in the same frame.
const INLINE_BODY: u64 = 64 * 1024;

/// How long a request waits for a worker whose loop is free before `503`.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// The server's address, for the scope's `server`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerAddr(pub(crate) SocketAddr);

/// Serves `req` with a worker.
pub(crate) async fn dispatch(
    shared: Arc<Shared>,
    server: ServerAddr,
    req: axum::extract::Request,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let request_id = pass_request_id(&mut parts);
    let path = parts.uri.path();
    let key = format!("{} {}", parts.method, path);

    // A small body whose length is declared goes out with the head.
    let limit = shared.config.body_limit;
    let declared =
        parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (inline, mut rest) = if http_body::Body::is_end_stream(&body) {
        (Bytes::new(), None)
    } else if declared.is_some_and(|n| n <= INLINE_BODY) {
        match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
            Ok(collected) => (collected.to_bytes(), None),
            Err(err) => return bad_body(&err.to_string()),
        }
    } else {
        (Bytes::new(), Some(body))
    };

    let decoded = percent_decode(path);
    let payload =
        frame::request_payload(&request_head(&parts, &decoded, server, false, rest.is_some(), &inline));
    // Its header values and URI hold on to hyper's read buffer: let go of
    // them now, so that hyper reads the connection's next request into the
    // same buffer rather than a new one.
    drop(parts);
    // Once, or again when a worker whose loop blocked gave it back unstarted.
    loop {
        let (worker, suspect) = match choose(&shared, &key).await {
            Ok(chosen) => chosen,
            Err(response) => return response,
        };
        let (id, events) =
            worker.dispatch(frame::REQUEST, key.clone(), suspect, &payload, request_id.clone());
        let exchange = Exchange { worker, id, events, body: rest, sent: 0, limit, finished: false };
        match exchange.response().await {
            Outcome::Response(response) => return response,
            Outcome::Revoked(body) => rest = body,
            Outcome::Accepted(..) => {
                return bad_gateway("the app accepted a WebSocket on an HTTP request".into())
            }
        }
    }
}

/// The request's id ([`fastlane::RequestId`]), also given to the app as its
/// `x-request-id` header: the one the client sent when the server kept it,
/// else the one the server made (replacing a malformed one), so that the
/// app's logs can name the request as the server's do.
pub(crate) fn pass_request_id(parts: &mut http::request::Parts) -> Option<fastlane::RequestId> {
    let id = fastlane::RequestId::current()?;
    if let Ok(value) = http::HeaderValue::from_str(id.as_str()) {
        parts.headers.insert(http::HeaderName::from_static("x-request-id"), value);
    }
    Some(id)
}

/// The scope's fields of a request, for its frame: `decoded` is its path,
/// percent-decoded. The client and scheme are the server's
/// [`fastlane::ClientInfo`]: behind a trusted proxy, the forwarded ones.
pub(crate) fn request_head<'a>(
    parts: &'a http::request::Parts,
    decoded: &'a str,
    server: ServerAddr,
    websocket: bool,
    more_body: bool,
    body: &'a [u8],
) -> RequestHead<'a> {
    let info = fastlane::ClientInfo::current();
    let client = info.map(|c| (c.addr.ip().to_string(), c.addr.port()));
    let scheme = match (websocket, info.is_some_and(|c| c.https)) {
        (false, false) => "http",
        (false, true) => "https",
        (true, false) => "ws",
        (true, true) => "wss",
    };
    let http_version = match parts.version {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    };
    RequestHead {
        method: parts.method.as_str(),
        path: decoded,
        raw_path: parts.uri.path().as_bytes(),
        query: parts.uri.query().unwrap_or("").as_bytes(),
        headers: &parts.headers,
        client,
        server: (server.0.ip().to_string(), server.0.port()),
        scheme,
        http_version,
        more_body,
        body,
    }
}

/// How an exchange with a worker ended.
pub(crate) enum Outcome {
    Response(Response),
    /// The worker gave the request back unstarted; here is its body.
    Revoked(Option<Body>),
    /// The app accepted a WebSocket (the accept's payload); the exchange
    /// goes on over the upgraded connection.
    Accepted(Box<Exchange>, bytes::Bytes),
}

/// Waits for a worker that may take the request. Whether its path is
/// suspect is looked at again each time: a path can become suspect while its
/// requests wait (the first of them blocked a loop meanwhile).
pub(crate) async fn choose(shared: &Arc<Shared>, key: &str) -> Result<(Arc<Worker>, bool), Response> {
    let deadline = tokio::time::Instant::now() + QUEUE_TIMEOUT;
    loop {
        let notified = shared.available.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let suspect = shared.is_suspect(key);
        let (alive, stalled, fallback) = match shared.pick(suspect) {
            Pick::Worker(worker) => return Ok((worker, suspect)),
            Pick::Tainted { worker, alive, stalled } => (alive, stalled, Some(worker)),
            Pick::None { alive, stalled } => (alive, stalled, None),
        };
        let spare = shared.want_spare(alive, stalled);
        if shared.stopping.load(Ordering::Relaxed) {
            return Err(unavailable("the server is shutting down", 1));
        }
        if let (Some(worker), false) = (fallback, spare) {
            return Ok((worker, suspect));
        }
        tokio::select! {
            () = &mut notified => {}
            // The monitor clears a stall from its own thread: look again soon
            // even if a wake-up was missed between the check and the wait.
            () = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let why = if suspect {
                format!(
                    "{key} has been blocking its worker's event loop, and for {} s no worker was free for it while \
                     keeping one for other requests (--max-workers {}); retry later",
                    QUEUE_TIMEOUT.as_secs(),
                    shared.config.max_workers
                )
            } else {
                format!("no worker's event loop was free for {} s", QUEUE_TIMEOUT.as_secs())
            };
            return Err(unavailable(&why, 5));
        }
    }
}

fn unavailable(message: &str, retry_after: u32) -> Response {
    let mut response = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message.to_owned()).into_response();
    response.headers_mut().insert(http::header::RETRY_AFTER, retry_after.into());
    response
}

fn bad_body(error: &str) -> Response {
    if error.contains("length limit exceeded") {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is over the limit (--body-limit)".to_owned(),
        )
        .into_response();
    }
    ApiError::new(StatusCode::BAD_REQUEST, format!("the request body could not be read: {error}"))
        .into_response()
}

pub(crate) fn bad_gateway(message: String) -> Response {
    ApiError::new(StatusCode::BAD_GATEWAY, message).into_response()
}

/// A request's exchange with its worker. Dropped before the response ends
/// (the client went away, or a timeout answered), it tells the worker.
pub(crate) struct Exchange {
    pub(crate) worker: Arc<Worker>,
    pub(crate) id: u32,
    pub(crate) events: Arc<Mailbox>,
    /// The request body not yet sent.
    body: Option<Body>,
    sent: usize,
    limit: usize,
    /// Nothing more to tell the worker when dropped.
    pub(crate) finished: bool,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.finished {
            self.worker.send(frame::DISCONNECT, self.id, b"");
        }
    }
}

impl Exchange {
    /// An exchange whose request went out as request `id` of `worker`.
    pub(crate) fn new(worker: Arc<Worker>, id: u32, events: Arc<Mailbox>, limit: usize) -> Self {
        Self { worker, id, events, body: None, sent: 0, limit, finished: false }
    }

    /// Waits for the response start, feeding the request body meanwhile.
    pub(crate) async fn response(mut self) -> Outcome {
        loop {
            let Some(event) = self.events.take().await else {
                return Outcome::Response(self.lost());
            };
            let response = match event {
                Event::WantBody => match self.feed().await {
                    Ok(()) => continue,
                    Err(response) => response,
                },
                Event::Start(payload) => self.start(&payload),
                Event::Chunk(..) | Event::Reset => {
                    bad_gateway("the app's response was malformed (body before start)".into())
                }
                Event::Lost => self.lost(),
                Event::Revoked => {
                    self.finished = true;
                    return Outcome::Revoked(self.body.take());
                }
                Event::WsAccept(payload) => return Outcome::Accepted(Box::new(self), payload),
                Event::WsClose(_) => {
                    // Closed before the accept: the handshake is denied, as ASGI says.
                    self.finished = true;
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "the app refused the WebSocket connection".to_owned(),
                    )
                    .into_response()
                }
                Event::WsMessage(..) | Event::WsTaken(_) => {
                    bad_gateway("the app sent a WebSocket message before accepting".into())
                }
            };
            return Outcome::Response(response);
        }
    }

    fn lost(&mut self) -> Response {
        self.finished = true;
        tracing::error!(
            worker = self.worker.number,
            "the worker exited while serving a request; answered 502"
        );
        bad_gateway(format!("the app's worker {} exited while serving this request", self.worker.number))
    }

    /// Sends the next piece of the request body.
    async fn feed(&mut self) -> Result<(), Response> {
        let Some(body) = self.body.as_mut() else {
            self.worker.send_data(frame::BODY, self.id, false, b"");
            return Ok(());
        };
        let next = std::future::poll_fn(|cx| next_data(body, cx)).await;
        self.forward(next).map_err(|error| bad_body(&error))
    }

    /// Sends what the request body gave; the error says why it was refused.
    fn forward(&mut self, next: Option<Result<Bytes, axum::Error>>) -> Result<(), String> {
        match next {
            Some(Ok(data)) => {
                self.sent += data.len();
                if self.sent > self.limit {
                    self.body = None;
                    return Err("length limit exceeded".to_owned());
                }
                self.worker.send_data(frame::BODY, self.id, true, &data);
                Ok(())
            }
            None => {
                self.body = None;
                self.worker.send_data(frame::BODY, self.id, false, b"");
                Ok(())
            }
            Some(Err(err)) => {
                self.body = None;
                Err(err.to_string())
            }
        }
    }

    /// The response, from its start: whole if the body is already here.
    fn start(mut self, payload: &[u8]) -> Response {
        let (status, headers) = match frame::decode_start(payload) {
            Ok(start) => start,
            Err(err) => {
                tracing::error!(
                    worker = self.worker.number,
                    "the app's response start is invalid: {err}; answered 500"
                );
                return ApiError::internal(format!("the app's response start is invalid: {err}"))
                    .into_response();
            }
        };
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let map = response.headers_mut();
        map.reserve(headers.len());
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(&name);
            let value = http::HeaderValue::from_maybe_shared(value);
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => {
                    tracing::error!(
                        worker = self.worker.number,
                        "the app sent an invalid response header; answered 500"
                    );
                    return ApiError::internal("the app sent an invalid response header").into_response();
                }
            }
        }
        let left = map.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // The common case: the whole body follows the start at once (with
        // an http middleware, Starlette sends it as one more chunk, then an
        // empty last one: the declared length says it is whole).
        let next = match self.events.try_take() {
            Some(Event::Chunk(data, more)) if !more || left == Some(data.len() as u64) => {
                self.finished = true;
                *response.body_mut() = Body::from(data);
                return response;
            }
            next => next,
        };
        *response.body_mut() =
            Body::new(Streaming { exchange: self, next, want_body: false, ended: false, left });
        response
    }
}

/// The next data of a request body, skipping trailers.
fn next_data(body: &mut Body, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, axum::Error>>> {
    loop {
        match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => return Poll::Ready(Some(Ok(data))),
                Err(_) => continue,
            },
            Some(Err(err)) => return Poll::Ready(Some(Err(err))),
            None => return Poll::Ready(None),
        }
    }
}

use http_body::Body as _;

/// A response body coming from the worker, chunk by chunk.
struct Streaming {
    exchange: Exchange,
    /// An event taken off the channel before the body was made.
    next: Option<Event>,
    /// The app waits for request body.
    want_body: bool,
    ended: bool,
    /// Bytes still to come of a body whose length the app declared: once
    /// they have all come, the response is whole (hyper stops polling for
    /// the app's final, empty message, and the client may close at once).
    left: Option<u64>,
}

impl http_body::Body for Streaming {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            // The app may read its request while it streams its response (an echo).
            if this.want_body {
                let exchange = &mut this.exchange;
                let next = match exchange.body.as_mut() {
                    Some(body) => match next_data(body, cx) {
                        Poll::Ready(next) => Some(next),
                        Poll::Pending => None,
                    },
                    None => Some(None),
                };
                if let Some(next) = next {
                    this.want_body = false;
                    if exchange.forward(next).is_err() {
                        return Poll::Ready(Some(Err(std::io::Error::other("the request body was refused"))));
                    }
                }
            }
            let event = match this.next.take() {
                Some(event) => Some(event),
                None => match this.exchange.events.poll_take(cx) {
                    Poll::Ready(event) => event,
                    Poll::Pending => return Poll::Pending,
                },
            };
            match event {
                Some(Event::Chunk(data, more)) => {
                    let exchange = &mut this.exchange;
                    if !data.is_empty() {
                        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                        exchange.worker.send_u32(frame::CREDIT, exchange.id, n);
                    }
                    if let Some(left) = &mut this.left {
                        *left = left.saturating_sub(data.len() as u64);
                        if *left == 0 && !data.is_empty() {
                            exchange.finished = true;
                            this.ended = true;
                        }
                    }
                    if !more {
                        exchange.finished = true;
                        this.ended = true;
                    }
                    if data.is_empty() {
                        if this.ended {
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Event::WantBody) => this.want_body = true,
                Some(Event::Start(_))
                | Some(Event::WsAccept(_))
                | Some(Event::WsClose(_))
                | Some(Event::WsMessage(..))
                | Some(Event::WsTaken(_)) => {}
                Some(Event::Reset) => {
                    this.exchange.finished = true;
                    this.ended = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the app failed during its response",
                    ))));
                }
                Some(Event::Lost) | Some(Event::Revoked) | None => {
                    this.exchange.finished = true;
                    this.ended = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the app's worker exited during the response",
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// `%xx` sequences decoded, as uvicorn does (`urllib.parse.unquote`):
/// invalid UTF-8 becomes U+FFFD, a `%` not followed by two hex digits stays.
pub(crate) fn percent_decode(path: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn paths_are_decoded_as_uvicorn_decodes_them() {
        assert_eq!(percent_decode("/a%20b"), "/a b");
        assert_eq!(percent_decode("/caf%C3%A9"), "/café");
        assert_eq!(percent_decode("/bad%zz%4"), "/bad%zz%4");
        assert_eq!(percent_decode("/x%FF"), "/x\u{FFFD}");
        assert_eq!(percent_decode("/plain"), "/plain");
    }
}
