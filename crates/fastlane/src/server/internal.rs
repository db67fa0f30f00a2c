//! fastlane's own endpoints, when internal endpoints are on
//! (`Config::expose_internal`): `GET /metrics`, `GET /_fastlane/stalls` and
//! `GET /_fastlane/worker`, answered before the app's router sees the request.

use axum::response::{IntoResponse, Response};

use super::ServerState;

/// The answer of fastlane's own endpoints, when exposed and asked for,
/// with the request's id (`x-request-id`) as every answer has.
pub(super) fn internal_endpoint<B>(state: &ServerState, req: &http::Request<B>) -> Option<Response> {
    if !state.config.expose_internal || req.method() != http::Method::GET {
        return None;
    }
    let mut response = answer(state, req.uri().path())?;
    crate::RequestId::for_headers(req.headers()).set_header(response.headers_mut());
    if state.config.compression {
        response = compressed(response, req.headers().get(http::header::ACCEPT_ENCODING));
    }
    Some(response)
}

/// `response` through the app's compression (these answers do not pass
/// the router's layers): a scrape of `/metrics` is tens of kilobytes of text.
fn compressed(response: Response, accept: Option<&http::HeaderValue>) -> Response {
    use futures_util::FutureExt;
    use tower::{Layer, ServiceExt};
    let mut request = http::Request::new(axum::body::Body::empty());
    if let Some(accept) = accept {
        request.headers_mut().insert(http::header::ACCEPT_ENCODING, accept.clone());
    }
    let mut response = Some(response);
    // Called once, by `oneshot`.
    let answer = tower::service_fn(move |_: http::Request<axum::body::Body>| {
        let response = response.take().unwrap_or_default();
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    });
    // The inner service answers at once, so the layer's future is ready on
    // its first poll.
    match super::compression().layer(answer).oneshot(request).now_or_never() {
        Some(Ok(response)) => response.map(axum::body::Body::new),
        Some(Err(never)) => match never {},
        None => unreachable!("a ready service answered later"),
    }
}

fn answer(state: &ServerState, path: &str) -> Option<Response> {
    match path {
        "/metrics" => Some(metrics_response(state)),
        "/_fastlane/stalls" => {
            let mut rows = state.routes.stall_rows();
            rows.extend(state.stall_sources.0.iter().flat_map(|source| source()));
            crate::routes::worst_first(&mut rows);
            Some(axum::Json(rows).into_response())
        }
        "/_fastlane/worker" => {
            let body = serde_json::json!({ "worker": crate::worker_id(), "pid": std::process::id() });
            Some(axum::Json(body).into_response())
        }
        _ => None,
    }
}

fn metrics_response(state: &ServerState) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.render_metrics(),
    )
        .into_response()
}
