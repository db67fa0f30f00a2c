//! WebSocket connections of an ASGI app: the handshake goes to a worker as
//! a `websocket` scope; when the app accepts, the front answers `101` and
//! relays messages both ways between the client and the worker for the
//! connection's life.
//!
//! Flow control: the front reads a client's messages only while the app has
//! taken all but [`WINDOW`] of those sent to it, and the app's messages go
//! out under the same byte credit as response bodies, so neither a fast
//! client nor a slow one grows the memory of either side without bound.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fastlane::ApiError;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::dispatch::{self, Exchange, Outcome, ServerAddr};
use crate::frame;
use crate::mailbox::Event;
use crate::pool::Shared;

/// Client messages sent to the worker and not yet taken by the app.
const WINDOW: u32 = 16;

/// Whether a request asks to become a WebSocket.
pub(crate) fn is_handshake(headers: &HeaderMap) -> bool {
    headers.get(http::header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

fn refused(status: StatusCode, message: &str) -> Response {
    ApiError::new(status, message.to_owned()).into_response()
}

/// Serves a WebSocket handshake (RFC 6455 §4.2) with a worker.
pub(crate) async fn dispatch(
    shared: Arc<Shared>,
    server: ServerAddr,
    mut req: axum::extract::Request,
) -> Response {
    if req.method() != http::Method::GET {
        return refused(StatusCode::BAD_REQUEST, "a WebSocket handshake must be a GET request");
    }
    let Some(key) = req.headers().get(http::header::SEC_WEBSOCKET_KEY).cloned() else {
        return refused(StatusCode::BAD_REQUEST, "the WebSocket handshake has no Sec-WebSocket-Key header");
    };
    if req.headers().get(http::header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        let mut response = refused(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is served (Sec-WebSocket-Version: 13)",
        );
        response
            .headers_mut()
            .insert(http::header::SEC_WEBSOCKET_VERSION, http::HeaderValue::from_static("13"));
        return response;
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _) = req.into_parts();
    let request_id = dispatch::pass_request_id(&mut parts);
    let path = parts.uri.path();
    let key_line = format!("WEBSOCKET {path}");
    let decoded = dispatch::percent_decode(path);
    let payload = frame::request_payload(&dispatch::request_head(&parts, &decoded, server, true, false, b""));
    let limit = shared.config.body_limit;
    loop {
        let (worker, suspect) = match dispatch::choose(&shared, &key_line).await {
            Ok(chosen) => chosen,
            Err(response) => return response,
        };
        let (id, events) =
            worker.dispatch(frame::WS_CONNECT, key_line.clone(), suspect, &payload, request_id.clone());
        let exchange = Exchange::new(worker, id, events, limit);
        let (exchange, accept) = match exchange.response().await {
            Outcome::Response(response) => return response,
            Outcome::Revoked(_) => continue,
            Outcome::Accepted(exchange, accept) => (exchange, accept),
        };
        let (protocol, headers) = match frame::decode_accept(&accept) {
            Ok(accept) => accept,
            Err(err) => {
                tracing::error!("the app's websocket.accept is invalid: {err}; answered 500");
                return ApiError::internal(format!("the app's websocket.accept is invalid: {err}"))
                    .into_response();
            }
        };
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let map = response.headers_mut();
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) =
                (http::HeaderName::from_bytes(&name), http::HeaderValue::from_maybe_shared(value))
            {
                map.append(name, value);
            }
        }
        map.insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
        map.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        let accept_key = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        if let Ok(value) = http::HeaderValue::from_str(&accept_key) {
            map.insert(http::header::SEC_WEBSOCKET_ACCEPT, value);
        }
        if let Some(protocol) = protocol.and_then(|p| http::HeaderValue::from_str(&p).ok()) {
            map.insert(http::header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        tokio::spawn(relay(on_upgrade, *exchange, limit));
        return response;
    }
}

/// Relays messages between the upgraded connection and the worker until
/// either side closes.
async fn relay(on_upgrade: hyper::upgrade::OnUpgrade, mut exchange: Exchange, limit: usize) {
    let (worker, id) = (exchange.worker.clone(), exchange.id);
    let gone = |code: u16| worker.send(frame::WS_GONE, id, &code.to_le_bytes());
    let Ok(upgraded) = on_upgrade.await else {
        gone(1006);
        exchange.finished = true;
        return;
    };
    let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
    let io = hyper_util::rt::TokioIo::new(upgraded);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (mut sink, mut stream) = ws.split();
    let mut window = WINDOW;
    loop {
        tokio::select! {
            message = stream.next(), if window > 0 => match message {
                Some(Ok(Message::Text(text))) => {
                    window -= 1;
                    worker.send(frame::WS_TEXT, id, text.as_bytes());
                }
                Some(Ok(Message::Binary(data))) => {
                    window -= 1;
                    worker.send(frame::WS_BYTES, id, &data);
                }
                Some(Ok(Message::Close(close))) => {
                    gone(close.map_or(1005, |c| u16::from(c.code)));
                    // tungstenite has queued the close reply: send it.
                    let _ = sink.close().await;
                    break;
                }
                // Pings are answered by tungstenite; pongs need nothing.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    gone(1006);
                    break;
                }
            },
            event = exchange.events.take() => match event {
                Some(Event::WsMessage(data, text)) => {
                    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    let message = if text {
                        match Utf8Bytes::try_from(data) {
                            Ok(text) => Message::Text(text),
                            Err(_) => Message::Binary(Bytes::new()),
                        }
                    } else {
                        Message::Binary(data)
                    };
                    if sink.send(message).await.is_err() {
                        gone(1006);
                        break;
                    }
                    worker.send_u32(frame::CREDIT, id, n);
                }
                Some(Event::WsTaken(n)) => window = window.saturating_add(n),
                Some(Event::WsClose(payload)) => {
                    let code = payload.get(..2).map_or(1000, |c| u16::from_le_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    break;
                }
                Some(Event::Lost) | Some(Event::Reset) | None => {
                    let frame = CloseFrame { code: CloseCode::Error, reason: "the app's worker went away".into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    break;
                }
                Some(_) => {}
            },
        }
    }
    // The worker knows (it closed, or was told the client went away).
    exchange.finished = true;
}
