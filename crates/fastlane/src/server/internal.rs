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
    let id = crate::RequestId::for_headers(req.headers());
    // The id is of characters a header value can hold (see `request_id`).
    if let Ok(value) = http::HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(crate::request_id::HEADER, value);
    }
    Some(response)
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
