//! fastlane's own HTTP/1 for the connections the runners serve: the common
//! request is read, answered and written here; anything else goes to hyper.
//!
//! Why not hyper for all of it? Its dispatcher (a state machine, buffers
//! and a body channel around httparse) was the largest cost of a
//! hello-world request that could go without giving anything up: this loop
//! does the same parse with the same parser (httparse), builds the same
//! `http::Request`, and writes the answer as hyper would (status line,
//! headers, `content-length` or chunked framing, `date`, the same
//! keep-alive rules for HTTP/1.0 and 1.1), for 1,230 fewer instructions
//! and about a sixth less CPU a request (docs/DESIGN.md has the figures).
//!
//! What is answered here is deliberately narrow: a whole, well-formed head
//! of HTTP/1.0 or 1.1, no `Transfer-Encoding`, `Upgrade` or `Expect`, not
//! `CONNECT`, at most one `Content-Length`, and a body (if any) of at most
//! 64 KiB that has arrived with the head. Anything else (an HTTP/2 preface,
//! a malformed or oversized head, a chunked, large or late body, an
//! upgrade, `100-continue`) is
//! handed to hyper with every byte read so far ([`Ended::ToHyper`]), and
//! hyper serves the rest of the connection: its answers there (400, 431,
//! `100 Continue`, upgrades, request smuggling checks) stay hyper's, on the
//! same bytes.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body::Body as _;
use tokio::sync::watch;

use super::service::ConnectionService;
use crate::executor::reactor::Connection;
use crate::request_id::{self, RequestId};
use crate::shutdown::{poll_stopped, stopped};

/// The most header lines a request may have here (hyper's default limit,
/// which answers 431 past it).
const MAX_HEADERS: usize = 100;

/// The longest head read here; a longer one is hyper's to judge.
const MAX_HEAD: usize = 64 * 1024;

/// The largest request body waited for here (and never more than the
/// server's body limit, which the route layer then enforces with 413 at
/// once, as it does for hyper's requests).
const MAX_BODY: u64 = 64 * 1024;

/// The read buffer grows by this much when it has less than
/// [`MIN_SPARE`] left. Reads go into the room there is: growing it for
/// every read would copy the unread bytes to a fresh buffer each time while
/// the last request (which holds on to its part of the old one) is
/// answered.
const READ_SIZE: usize = 8 * 1024;
const MIN_SPARE: usize = 1024;

/// Bytes read ahead (pipelined requests) while a request is answered; past
/// that the connection reads on once the answer is written.
const MAX_AHEAD: usize = 64 * 1024;

/// A response body frame this small goes out in the same `send` as the
/// head (copied behind it); a larger one is sent from where it is.
const COPY_LIMIT: usize = 16 * 1024;

/// How a connection served here ended.
pub(super) enum Ended {
    /// Closed: by the client, after a response that closes it, or at
    /// shutdown.
    Closed,
    /// hyper serves the rest: the connection, the bytes read from it that
    /// no request here used, and the connection's service.
    ToHyper(Connection, Bytes, ConnectionService),
}

/// Serves `io`'s requests until it closes, or until one of them is not
/// for this loop (see the module's doc).
pub(super) async fn serve(
    io: Connection,
    service: ConnectionService,
    stop: &mut watch::Receiver<bool>,
    accepted: tokio::time::Instant,
    body_limit: usize,
) -> Ended {
    let mut conn = Conn {
        io,
        read: BytesMut::new(),
        write: Vec::new(),
        fields: Box::new(Fields::default()),
        spare_headers: HeaderMap::new(),
        peer_done: false,
        stopping: false,
        body_limit: MAX_BODY.min(body_limit as u64),
    };
    let mut changed = stop.clone();
    let mut shutdown = pin!(stopped(stop));
    let mut registered = false;
    let mut check_stop = |cx: &mut Context<'_>, conn: &mut Conn| {
        // Once it has completed, the future is not polled again.
        if !conn.stopping {
            conn.stopping = poll_stopped(cx, shutdown.as_mut(), &mut changed, &mut registered);
        }
    };
    loop {
        let request = match poll_fn(|cx| {
            check_stop(cx, &mut conn);
            conn.poll_request(cx, accepted)
        })
        .await
        {
            Next::Request(request) => request,
            Next::Closed => return Ended::Closed,
            Next::ToHyper => return Ended::ToHyper(conn.io, conn.read.freeze(), service),
            Next::Settle(deadline) => {
                // Shutdown began just after this connection was accepted:
                // its request is probably on the wire. Wait for it a moment.
                let mut sleep = pin!(tokio::time::sleep_until(deadline));
                let arrived = poll_fn(|cx| {
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(false);
                    }
                    match conn.poll_fill(cx) {
                        Poll::Ready(_) => Poll::Ready(true),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                if !arrived || conn.read.is_empty() {
                    return Ended::Closed;
                }
                continue;
            }
        };
        let Request { head, keep_alive, method, version } = request;
        // Answered while the socket is watched: the client going away drops
        // the handler (its request is logged as 499), as with hyper.
        let mut answer = pin!(service.serve(head));
        // Its id goes into the head unless a layer outside the route layer
        // could change the headers around it.
        let mut first = service.route_layer_outermost();
        let mut id = None;
        let response = poll_fn(|cx| {
            check_stop(cx, &mut conn);
            let polled = match std::mem::take(&mut first) {
                true => request_id::offer_head(|| answer.as_mut().poll(cx)),
                false => answer.as_mut().poll(cx),
            };
            if let Poll::Ready(Ok(response)) = polled {
                id = request_id::take_for_head();
                return Poll::Ready(Some(response));
            }
            match conn.watch_peer(cx) {
                true => Poll::Ready(None),
                false => Poll::Pending,
            }
        })
        .await;
        let Some(response) = response else { return Ended::Closed };
        let keep_alive = keep_alive && !conn.stopping;
        match conn.respond(response, id.as_ref(), &method, version, keep_alive).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                conn.close().await;
                return Ended::Closed;
            }
        }
    }
}

/// A request read off the connection, and what its answer depends on.
struct Request {
    head: http::Request<Body>,
    keep_alive: bool,
    method: Method,
    version: Version,
}

#[expect(
    clippy::large_enum_variant,
    reason = "one a request, moved once: a box would cost an allocation a request"
)]
enum Next {
    Request(Request),
    Closed,
    ToHyper,
    /// Stopping, nothing read yet, and the connection is new: wait until
    /// then for its request.
    Settle(tokio::time::Instant),
}

struct Conn {
    io: Connection,
    /// Where the request being read is, in `read`.
    fields: Box<Fields>,
    /// The last response's header map, emptied: the next request's headers
    /// go in it (as hyper does), which spares two allocations a request.
    spare_headers: HeaderMap,
    /// Bytes read and not used yet.
    read: BytesMut,
    /// The response head (and a short body behind it) being written.
    write: Vec<u8>,
    /// The client's side has ended (or failed).
    peer_done: bool,
    /// The server is shutting down: no request after the current one.
    stopping: bool,
    /// The largest body waited for here.
    body_limit: u64,
}

impl Conn {
    /// Reads until a request is whole (or the connection is not for this
    /// loop).
    fn poll_request(&mut self, cx: &mut Context<'_>, accepted: tokio::time::Instant) -> Poll<Next> {
        loop {
            if !self.read.is_empty() {
                match parse(&self.read, self.body_limit, &mut self.fields) {
                    Parsed::Whole { head_len } => {
                        return Poll::Ready(match self.take_request(head_len) {
                            Some(request) => Next::Request(request),
                            None => Next::ToHyper,
                        });
                    }
                    Parsed::Body { .. } if self.peer_done => return Poll::Ready(Next::ToHyper),
                    Parsed::Body { needed } => {
                        // Only a body already on its way is waited for: one
                        // that the socket does not have yet is hyper's to
                        // read, with the handler running meanwhile (its
                        // timeout applies, as it does to every body hyper
                        // reads).
                        self.read.reserve(needed.saturating_sub(self.read.len()));
                        if self.poll_fill(cx).is_pending() {
                            return Poll::Ready(Next::ToHyper);
                        }
                        continue;
                    }
                    Parsed::Partial if self.peer_done => return Poll::Ready(Next::ToHyper),
                    Parsed::Partial => {}
                    Parsed::ToHyper => return Poll::Ready(Next::ToHyper),
                }
            } else if self.peer_done {
                return Poll::Ready(Next::Closed);
            } else if self.stopping {
                let settle = accepted + super::NEW_CONNECTION_SETTLE;
                return Poll::Ready(match tokio::time::Instant::now() < settle {
                    true => Next::Settle(settle),
                    false => Next::Closed,
                });
            }
            if self.poll_fill(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// One read onto the end of `read`; `peer_done` when the client's
    /// side ended (or failed).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.read.capacity() - self.read.len() < MIN_SPARE {
            self.read.reserve(READ_SIZE);
        }
        match self.io.poll_recv(cx, &mut self.read, READ_SIZE) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                self.peer_done = true;
                Poll::Ready(())
            }
            Poll::Ready(Ok(_)) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    /// While a request is answered: reads what the client sends next (a
    /// pipelined request, kept) to learn if it has gone. `true` once it has.
    fn watch_peer(&mut self, cx: &mut Context<'_>) -> bool {
        while !self.peer_done && self.read.len() < MAX_AHEAD {
            if self.poll_fill(cx).is_pending() {
                return false;
            }
        }
        self.peer_done
    }

    /// The request whose head is the first `head_len` bytes of `read` (its
    /// body, if any, behind it), as `fields` found it; `None` if it is
    /// hyper's after all (a target `http::Uri` refuses, which httparse lets
    /// through), with `read` as it was.
    fn take_request(&mut self, head_len: usize) -> Option<Request> {
        let head = self.read.split_to(head_len).freeze();
        let Some((uri, headers)) = self.parts_of(&head) else {
            let mut restored = BytesMut::with_capacity(head.len() + self.read.len());
            restored.extend_from_slice(&head);
            restored.extend_from_slice(&self.read);
            self.read = restored;
            return None;
        };
        let fields = &*self.fields;
        let body = match fields.length {
            0 => Body::empty(),
            n => Body::from(self.read.split_to(n as usize).freeze()),
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = fields.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = fields.version;
        *request.headers_mut() = headers;
        Some(Request {
            head: request,
            keep_alive: fields.keep_alive,
            method: fields.method.clone(),
            version: fields.version,
        })
    }

    /// The target and headers of the request whose head is `head`; `None`
    /// if `http` refuses any of them. (httparse has checked the headers'
    /// bytes by the rules `http` applies, so only a target can be refused.)
    fn parts_of(&mut self, head: &Bytes) -> Option<(Uri, HeaderMap)> {
        let fields = &*self.fields;
        let uri = Uri::from_maybe_shared(head.slice(fields.path.0..fields.path.1)).ok()?;
        // Emptied when the last answer's head was written.
        let mut headers = std::mem::take(&mut self.spare_headers);
        headers.reserve(fields.count);
        for &(name, value) in &fields.lines[..fields.count] {
            let name = HeaderName::from_bytes(&head[name.0..name.1]).ok();
            let value = HeaderValue::from_maybe_shared(head.slice(value.0..value.1)).ok();
            let (Some(name), Some(value)) = (name, value) else {
                headers.clear();
                self.spare_headers = headers;
                return None;
            };
            headers.append(name, value);
        }
        Some((uri, headers))
    }

    /// Writes `response`; `Ok(true)` if the connection goes on.
    async fn respond(
        &mut self,
        response: Response,
        request_id: Option<&(RequestId, usize)>,
        method: &Method,
        version: Version,
        keep_alive: bool,
    ) -> io::Result<bool> {
        let (mut parts, body) = response.into_parts();
        let request_id = request_id.map(|(id, at)| (id.as_bytes(), *at));
        let mut framing =
            encode_head(&mut self.write, &mut parts, &body, request_id, method, version, keep_alive);
        self.spare_headers = std::mem::take(&mut parts.headers);
        self.spare_headers.clear();
        let mut body = pin!(body);
        // The first frame goes out with the head when it is ready (always,
        // for a body of known size: a buffer); a stream's head goes first
        // if its first frame is not.
        while framing.body && !framing.ended {
            let frame = poll_fn(|cx| {
                if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                    return Poll::Ready(Some(frame));
                }
                if !self.write.is_empty() {
                    // The head, not yet sent: the client gets it now.
                    return Poll::Ready(Some(Some(Ok(http_body::Frame::data(Bytes::new())))));
                }
                // A client gone while the stream waits ends the stream.
                match self.watch_peer(cx) {
                    true => Poll::Ready(None),
                    false => Poll::Pending,
                }
            })
            .await;
            match frame {
                None | Some(Some(Err(_))) => return Ok(false),
                Some(None) => {
                    framing.ended = true;
                    if framing.chunked {
                        self.write.extend_from_slice(b"0\r\n\r\n");
                    }
                }
                // Trailers are not sent on HTTP/1 (hyper sends them only to
                // a client that asked with `TE: trailers`).
                Some(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.send_data(&mut framing, data).await?;
                    }
                }
            }
        }
        if !self.write.is_empty() {
            self.send(&[]).await?;
        }
        Ok(framing.keep_alive && framing.complete())
    }

    /// Writes what `write` holds, then `tail`, and clears `write`.
    async fn send(&mut self, tail: &[&[u8]]) -> io::Result<()> {
        let write = std::mem::take(&mut self.write);
        let mut pieces: [&[u8]; 3] = [&write, &[], &[]];
        for (at, piece) in tail.iter().take(2).enumerate() {
            pieces[at + 1] = piece;
        }
        let result = write_all(&mut self.io, &pieces).await;
        self.write = write;
        self.write.clear();
        result
    }

    /// Writes a body frame in the framing of the response (after what
    /// `write` holds: the head, for the first). A short frame is copied
    /// behind what is there and kept for the next write or the end of the
    /// response, so that a head and its body go out in one `send`.
    async fn send_data(&mut self, framing: &mut Framing, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return match self.write.is_empty() {
                true => Ok(()),
                false => self.send(&[]).await,
            };
        }
        let data = match framing.length {
            Some(left) => {
                // Never past the length announced: what is beyond it is
                // cut, and the connection closed after the response.
                let take = (data.len() as u64).min(left);
                framing.length = Some(left - take);
                if take < data.len() as u64 {
                    framing.overflow = true;
                }
                if left == take {
                    framing.ended = true;
                }
                data.slice(..take as usize)
            }
            None => data,
        };
        if framing.chunked {
            let mut size = [0u8; 18];
            self.write.extend_from_slice(chunk_size(&mut size, data.len()));
            if data.len() > COPY_LIMIT {
                return self.send(&[&data, b"\r\n"]).await;
            }
            self.write.extend_from_slice(&data);
            self.write.extend_from_slice(b"\r\n");
        } else if data.len() > COPY_LIMIT {
            return self.send(&[&data]).await;
        } else {
            self.write.extend_from_slice(&data);
        }
        // A whole body of known size ends here: it goes out with the head
        // at the end of `respond`. A stream's frame goes now.
        match framing.ended {
            true => Ok(()),
            false => self.send(&[]).await,
        }
    }

    /// Ends the connection: the client sees the end of the response.
    async fn close(&mut self) {
        let _ = poll_fn(|cx| hyper::rt::Write::poll_shutdown(Pin::new(&mut self.io), cx)).await;
    }
}

/// Writes all of `pieces`, in order (empty ones are skipped).
async fn write_all(io: &mut Connection, pieces: &[&[u8]; 3]) -> io::Result<()> {
    let (mut piece, mut offset) = (0, 0);
    loop {
        while piece < pieces.len() && offset == pieces[piece].len() {
            piece += 1;
            offset = 0;
        }
        if piece == pieces.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
        let mut count = 0;
        for (at, part) in pieces.iter().enumerate().skip(piece) {
            let part = if at == piece { &part[offset..] } else { part };
            if !part.is_empty() {
                slices[count] = IoSlice::new(part);
                count += 1;
            }
        }
        let slices = &slices[..count];
        let mut wrote =
            poll_fn(|cx| hyper::rt::Write::poll_write_vectored(Pin::new(&mut *io), cx, slices)).await?;
        if wrote == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while wrote > 0 {
            let left = pieces[piece].len() - offset;
            if wrote < left {
                offset += wrote;
                wrote = 0;
            } else {
                wrote -= left;
                piece += 1;
                offset = 0;
            }
        }
    }
}

/// How a response's body is framed on the wire.
struct Framing {
    /// The body is sent at all (not for `HEAD`, 1xx, 204 and 304).
    body: bool,
    /// Bytes still owed by `content-length`; `None`: chunked or until close.
    length: Option<u64>,
    chunked: bool,
    /// The body ended (its last frame, or its length, was written).
    ended: bool,
    /// The body was longer than its `content-length`.
    overflow: bool,
    /// The connection may carry another request after this response.
    keep_alive: bool,
}

impl Framing {
    /// Whether the response went out whole and in its framing, so that the
    /// connection can go on: a body cut short (or too long) for its
    /// `content-length` cannot.
    fn complete(&self) -> bool {
        !self.body || (self.ended && !self.overflow && self.length.is_none_or(|left| left == 0))
    }
}

/// Writes the status line and headers of a response (with `payload`) to a
/// request of `method` and `version` into `out`, as hyper would, and says
/// how its body goes.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &mut http::response::Parts,
    payload: &Body,
    request_id: Option<(&[u8], usize)>,
    method: &Method,
    version: Version,
    keep_alive: bool,
) -> Framing {
    let exact = payload.size_hint().exact();
    // hyper writes the length of a body that has ended before it began
    // after the map, whatever the map says (but for `HEAD`, below).
    let empty = payload.is_end_stream();
    let status = parts.status;
    let http10 = version == Version::HTTP_10;
    // hyper's rules: 1xx, 204 and 304 have no length; a `HEAD` answer keeps
    // its length but sends no body.
    let may_have_length =
        !(status.is_informational() || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED));
    let body = may_have_length && *method != Method::HEAD;
    // The app's own `content-length` counts where the body's size is not
    // known otherwise (a stream, or the emptied body of a `HEAD` answer); a
    // `transfer-encoding` of its own never does: the framing is this
    // writer's. With the size known, the app's header is kept where it is
    // if it says the same (axum sets one), which the loop below sees
    // without looking it up first.
    let length_known = body && exact.is_some();
    let declared = match may_have_length && !length_known {
        true => parts.headers.get(header::CONTENT_LENGTH).and_then(|v| parse_length(v.as_bytes())),
        false => None,
    };
    let mut framing =
        Framing { body, length: None, chunked: false, ended: false, overflow: false, keep_alive };
    let mut length_line = None;
    match (declared, exact) {
        (Some(length), _) => framing.length = Some(length),
        (None, Some(length)) => {
            if may_have_length && (length != 0 || *method != Method::HEAD) {
                length_line = Some(length);
            }
            framing.length = Some(length);
        }
        (None, None) if !body => {}
        // HTTP/1.0 has no chunks: the body ends with the connection.
        (None, None) if http10 => framing.keep_alive = false,
        (None, None) => framing.chunked = true,
    }
    if !body {
        framing.length = None;
    } else if framing.length == Some(0) {
        framing.ended = true;
    }
    let (says_close, says_keep_alive) =
        parts.headers.get_all(header::CONNECTION).iter().fold((false, false), |(close, keep), value| {
            (
                close || has_token(value.as_bytes(), b"close"),
                keep || has_token(value.as_bytes(), b"keep-alive"),
            )
        });
    if status.is_informational() || says_close {
        framing.keep_alive = false;
    }
    // The connection's fate, said as hyper says it: an HTTP/1.0 client that
    // asked to keep it is told it is kept; an HTTP/1.1 one, that it closes.
    // (Appended after the names the request id is placed among, as hyper
    // appends it after the id the route layer inserted.)
    if http10 && framing.keep_alive && !says_keep_alive {
        parts.headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    } else if !http10 && !framing.keep_alive && !says_close {
        parts.headers.append(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if !http10 && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            // A reason must be written: many parsers expect one.
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let mut wrote_date = false;
    let mut wrote_length = false;
    // The request id goes where the route layer would have inserted it:
    // after the first `at` names of the map.
    let mut id = request_id;
    let mut names = 0;
    let mut last: Option<&HeaderName> = None;
    for (name, value) in parts.headers.iter() {
        // A name's values come together: a new name starts here.
        if last != Some(name) {
            if let Some((bytes, _)) = id.filter(|&(_, at)| at == names) {
                push_request_id(out, bytes);
                id = None;
            }
            names += 1;
            last = Some(name);
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            let agrees = match length_known {
                true => !empty && parse_length(value.as_bytes()) == exact,
                false => declared.is_some(),
            };
            if !agrees || wrote_length {
                continue;
            }
            wrote_length = true;
        }
        wrote_date |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some((bytes, _)) = id {
        push_request_id(out, bytes);
    }
    if let Some(length) = length_line.filter(|_| !wrote_length) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(crate::telemetry::access::decimal(&mut [0; 20], length));
        out.extend_from_slice(b"\r\n");
    }
    if framing.chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn push_request_id(out: &mut Vec<u8>, id: &[u8]) {
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(id);
    out.extend_from_slice(b"\r\n");
}

/// A `content-length` value: digits only (no sign, no list), as hyper
/// reads one.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, digit| n * 10 + u64::from(digit - b'0')))
}

/// A chunk's size line (`1a2\r\n`), in `buf`.
fn chunk_size(buf: &mut [u8; 18], mut n: usize) -> &[u8] {
    let mut at = buf.len() - 2;
    buf[at..].copy_from_slice(b"\r\n");
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// The `date` header's value, formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(date.1.as_bytes());
    });
}

/// Whether the comma-separated header value holds `token` (any case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

/// Byte ranges into the head of what a request is made of.
#[derive(Debug)]
struct Fields {
    method: Method,
    version: Version,
    path: (usize, usize),
    lines: [((usize, usize), (usize, usize)); MAX_HEADERS],
    count: usize,
    /// The body's length (`Content-Length`, 0 without one).
    length: u64,
    keep_alive: bool,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            method: Method::GET,
            version: Version::HTTP_11,
            path: (0, 0),
            lines: [((0, 0), (0, 0)); MAX_HEADERS],
            count: 0,
            length: 0,
            keep_alive: true,
        }
    }
}

enum Parsed {
    /// The head and its body are all in the buffer.
    Whole { head_len: usize },
    /// The head is whole, its body not yet: `needed` bytes in all.
    Body { needed: usize },
    /// The head is not whole yet.
    Partial,
    /// Not for this loop: hyper's.
    ToHyper,
}

/// Reads the request at the start of `buf`, if it is one for this loop.
fn parse(buf: &[u8], body_limit: u64, fields: &mut Fields) -> Parsed {
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buf, &mut lines) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::ToHyper,
    };
    let version = match request.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Parsed::ToHyper,
    };
    let method = match request.method.map(|m| Method::from_bytes(m.as_bytes())) {
        Some(Ok(method)) if method != Method::CONNECT => method,
        _ => return Parsed::ToHyper,
    };
    let Some(path) = request.path else { return Parsed::ToHyper };
    let base = buf.as_ptr() as usize;
    let range = |part: &[u8]| {
        let start = part.as_ptr() as usize - base;
        (start, start + part.len())
    };
    fields.method = method;
    fields.version = version;
    fields.path = range(path.as_bytes());
    fields.count = request.headers.len();
    fields.keep_alive = version == Version::HTTP_11;
    let mut length = None;
    let mut close = false;
    for (i, line) in request.headers.iter().enumerate() {
        fields.lines[i] = (range(line.name.as_bytes()), range(line.value));
        let name = line.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // Digits only, once: anything else (a sign, a list, two
            // lengths) is hyper's to refuse.
            match parse_length(line.value.trim_ascii()) {
                Some(n) if length.is_none() => length = Some(n),
                _ => return Parsed::ToHyper,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::ToHyper;
        } else if name.eq_ignore_ascii_case(b"connection") {
            // Once any line asks to close, a later `keep-alive` does not
            // undo it (hyper's rule).
            if close || has_token(line.value, b"close") {
                close = true;
                fields.keep_alive = false;
            } else if has_token(line.value, b"keep-alive") {
                fields.keep_alive = true;
            }
        }
    }
    let length = length.unwrap_or(0);
    if length > body_limit {
        return Parsed::ToHyper;
    }
    fields.length = length;
    let needed = head_len + length as usize;
    match buf.len() >= needed {
        true => Parsed::Whole { head_len },
        false => Parsed::Body { needed },
    }
}

/// A connection handed to hyper: the bytes already read come first.
pub(super) struct Replay {
    io: Connection,
    read: Bytes,
}

impl Replay {
    pub(super) fn new(io: Connection, read: Bytes) -> Self {
        Self { io, read }
    }
}

impl hyper::rt::Read for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Replay {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Parsed {
        parse(head.as_bytes(), MAX_BODY, &mut Fields::default())
    }

    #[test]
    fn only_plain_requests_are_read_here() {
        assert!(matches!(parsed("GET / HTTP/1.1\r\n\r\n"), Parsed::Whole { head_len: 18 }));
        assert!(matches!(parsed("GET / HTTP/1.1\r\nHost: a"), Parsed::Partial));
        assert!(matches!(
            parsed("POST / HTTP/1.1\r\nContent-Length:  3 \r\n\r\nab"),
            Parsed::Body { needed: 43 }
        ));
        for other in [
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "CONNECT a:1 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
        ] {
            assert!(matches!(parsed(other), Parsed::ToHyper), "{other:?}");
        }
    }

    fn head_of(response: Response, method: Method, version: Version) -> (String, Framing) {
        let (mut parts, body) = response.into_parts();
        let mut out = Vec::new();
        let framing = encode_head(&mut out, &mut parts, &body, None, &method, version, true);
        let text = String::from_utf8(out).unwrap();
        let text = text.lines().filter(|l| !l.starts_with("date: ")).collect::<Vec<_>>().join("\n");
        (text, framing)
    }

    #[test]
    fn heads_are_written_as_hyper_writes_them() {
        let (head, framing) = head_of(Response::new(Body::from("hello")), Method::GET, Version::HTTP_11);
        assert_eq!(head, "HTTP/1.1 200 OK\ncontent-length: 5\n");
        assert_eq!((framing.body, framing.length, framing.keep_alive), (true, Some(5), true));
        // An app's length that disagrees with the body is not sent.
        let mut wrong = Response::new(Body::from("hello"));
        wrong.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        assert_eq!(head_of(wrong, Method::GET, Version::HTTP_11).0, "HTTP/1.1 200 OK\ncontent-length: 5\n");
        // HEAD keeps the app's length (axum's, of the body it emptied).
        let mut head = Response::new(Body::empty());
        head.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let (text, framing) = head_of(head, Method::HEAD, Version::HTTP_11);
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 5\n");
        assert!(!framing.body);
        // An empty body's length goes after the map, as hyper writes it.
        let mut empty = Response::new(Body::empty());
        empty.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        empty.headers_mut().insert("x-a", HeaderValue::from_static("v"));
        assert_eq!(
            head_of(empty, Method::GET, Version::HTTP_11).0,
            "HTTP/1.1 200 OK\nx-a: v\ncontent-length: 0\n"
        );
        // 204: no length at all.
        let mut empty = Response::new(Body::empty());
        *empty.status_mut() = StatusCode::NO_CONTENT;
        assert_eq!(head_of(empty, Method::GET, Version::HTTP_11).0, "HTTP/1.1 204 No Content\n");
        // A stream: chunked on HTTP/1.1, until the close on HTTP/1.0.
        let stream =
            || Body::from_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from("a"))]));
        let (text, framing) = head_of(Response::new(stream()), Method::GET, Version::HTTP_11);
        assert_eq!(text, "HTTP/1.1 200 OK\ntransfer-encoding: chunked\n");
        assert!(framing.chunked && framing.keep_alive);
        let (text, framing) = head_of(Response::new(stream()), Method::GET, Version::HTTP_10);
        assert_eq!(text, "HTTP/1.0 200 OK\n");
        assert!(!framing.chunked && !framing.keep_alive);
    }

    #[test]
    fn the_request_id_goes_where_the_route_layer_would_have_inserted_it() {
        let head = |names: &[&'static str], at: usize, keep_alive: bool| {
            let mut response = Response::new(Body::from("ok"));
            for name in names {
                response.headers_mut().append(*name, HeaderValue::from_static("v"));
            }
            let (mut parts, body) = response.into_parts();
            let mut out = Vec::new();
            encode_head(
                &mut out,
                &mut parts,
                &body,
                Some((b"abc", at)),
                &Method::GET,
                Version::HTTP_11,
                keep_alive,
            );
            let text = String::from_utf8(out).unwrap();
            text.lines().filter(|l| !l.starts_with("date: ") && !l.is_empty()).collect::<Vec<_>>().join(",")
        };
        // After the handler's headers, before the length axum adds later.
        assert_eq!(
            head(&["content-type", "content-length"], 1, true),
            "HTTP/1.1 200 OK,content-type: v,x-request-id: abc,content-length: 2"
        );
        // A name's values stay together; the id after the last name, then
        // the connection's end as hyper appends it (and the length it adds
        // when the map has none).
        assert_eq!(
            head(&["a", "a", "b"], 2, false),
            "HTTP/1.1 200 OK,a: v,a: v,b: v,x-request-id: abc,connection: close,content-length: 2"
        );
        assert_eq!(head(&[], 0, true), "HTTP/1.1 200 OK,x-request-id: abc,content-length: 2");
        // An app's own `connection` gets the end beside it, before the id.
        assert_eq!(
            head(&["connection"], 1, false),
            "HTTP/1.1 200 OK,connection: v,connection: close,x-request-id: abc,content-length: 2"
        );
        // Names removed since: after the last.
        assert_eq!(head(&["a"], 5, true), "HTTP/1.1 200 OK,a: v,x-request-id: abc,content-length: 2");
    }

    #[test]
    fn chunk_sizes_are_hex() {
        assert_eq!(chunk_size(&mut [0; 18], 0), b"0\r\n");
        assert_eq!(chunk_size(&mut [0; 18], 0x1a2), b"1a2\r\n");
    }
}
