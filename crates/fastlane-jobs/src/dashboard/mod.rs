//! The job store's dashboard: one page (HTML, script and style served by the
//! binary, no CDN) and the JSON it reads and posts to. Served by a fastlane
//! server under `/_fastlane/jobs/` when internal endpoints are on (the
//! [`Consumer`](crate::Consumer)'s routes), and standalone by `fastlane jobs
//! ui`.
//!
//! # Protection
//!
//! * Actions (retry, cancel, retry every dead job of a type) are `POST`s that
//!   must carry the page's anti-forgery token in `x-fastlane-csrf` (a header
//!   a cross-site form cannot set, and a script of another site cannot read
//!   the token to send), and, when the browser names the page that sent them
//!   (`Origin`), come from the dashboard's own host.
//! * With a token ([`Dashboard::token`]), every request needs it: as
//!   `Authorization: Bearer TOKEN`, or the cookie that opening
//!   `/?token=TOKEN` once sets (HttpOnly, SameSite=Strict).
//! * The page forbids scripts from anywhere but itself
//!   (`Content-Security-Policy`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::job::{now_ms, JobId, JobState};
use crate::{Error, Store};

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// The cookie that carries the dashboard's token after `/?token=...`.
const COOKIE: &str = "fastlane_jobs_token";
/// The header that carries the page's anti-forgery token on actions.
const CSRF_HEADER: &str = "x-fastlane-csrf";

/// How a dashboard is served: under which path, and whether it needs a
/// token.
#[derive(Debug, Clone)]
pub struct Dashboard {
    base: String,
    token: Option<String>,
}

impl Default for Dashboard {
    /// At `/`, with no token.
    fn default() -> Self {
        Self { base: String::new(), token: None }
    }
}

impl Dashboard {
    /// At `/` (standalone), with no token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Under `path` (`/_fastlane/jobs`): the page is `path/`.
    pub fn at(mut self, path: &str) -> Self {
        self.base = path.trim_end_matches('/').to_owned();
        self
    }

    /// Every request needs `token` (a bearer token, or the cookie that
    /// `?token=...` sets). `None` or empty: none needed.
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// The path to open the page at: with the token as `?token=...` when one
    /// is needed (what `fastlane jobs ui` prints, as Jupyter prints its
    /// address with its token).
    pub fn open_path(&self) -> String {
        match &self.token {
            Some(token) => format!("{}/?token={}", self.base, percent_encoded(token)),
            None => format!("{}/", self.base),
        }
    }

    /// The dashboard's routes on `store`.
    pub fn router<S: Store>(self, store: S) -> Router {
        let base = self.base.clone();
        let state = Arc::new(Shared { store, config: self, csrf: random_token() });
        let at = |path: &str| format!("{base}{path}");
        let mut router = Router::new()
            .route(&at("/"), get(page::<S>))
            .route(&at("/page.js"), get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
            .route(&at("/page.css"), get(|| async { asset("text/css; charset=utf-8", STYLE) }))
            .route(&at("/api/overview"), get(overview::<S>))
            .route(&at("/api/jobs"), get(jobs::<S>))
            .route(&at("/api/jobs/{id}"), get(job::<S>))
            .route(&at("/api/jobs/{id}/retry"), post(retry::<S>))
            .route(&at("/api/jobs/{id}/cancel"), post(cancel::<S>))
            .route(&at("/api/dead/retry"), post(retry_dead::<S>));
        if !base.is_empty() {
            // The page's links are relative to `base/`.
            let page = format!("{base}/");
            router = router.route(&base, get(move || async move { Redirect::permanent(&page) }));
        }
        router.layer(axum::middleware::from_fn_with_state(state.clone(), guard::<S>)).with_state(state)
    }
}

/// What every handler of one dashboard shares.
struct Shared<S> {
    store: S,
    config: Dashboard,
    /// The page's anti-forgery token, made when the dashboard is.
    csrf: String,
}

type Ctx<S> = State<Arc<Shared<S>>>;

/// An answer with a JSON error body naming the problem (fastlane's
/// [`ApiError`](fastlane::ApiError), as the store's errors are answered).
fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    fastlane::ApiError::new(status, message.into()).into_response()
}

/// The token and anti-forgery checks, before any handler.
async fn guard<S: Store>(
    State(shared): Ctx<S>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    if let Some(token) = &shared.config.token {
        let query_token =
            request.uri().query().and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")));
        let query_token = query_token.map(percent_decoded);
        if request.method() == Method::GET && query_token.as_deref().is_some_and(|t| same(t, token)) {
            // Opened with `?token=...`: remember it, and drop it from the
            // address bar (and from the history).
            let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
            let mut to = Redirect::to(request.uri().path()).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                to.headers_mut().insert(header::SET_COOKIE, value);
            }
            return to;
        }
        if !carries(headers, token) {
            return problem(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs its token: open it once as .../?token=TOKEN, or send \
                 `Authorization: Bearer TOKEN`",
            );
        }
    }
    if request.method() == Method::POST {
        let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !csrf.is_some_and(|t| same(t, &shared.csrf)) {
            return problem(
                StatusCode::FORBIDDEN,
                format!("an action needs the page's `{CSRF_HEADER}` header (actions come from the dashboard's page)"),
            );
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            if origin_host != host {
                return problem(
                    StatusCode::FORBIDDEN,
                    format!("an action from another site ({origin}) is refused"),
                );
            }
        }
    }
    next.run(request).await
}

/// `text` with every byte but letters, digits and `-._~` as `%XX`.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A query value with its `%XX` escapes (and `+`, a space) read back.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The request carries `token`, as a bearer token or the cookie.
fn carries(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim(), token));
    let cookie = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).any(|cookies| {
        cookies
            .split(';')
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .any(|t| same(t, token))
    });
    bearer || cookie
}

/// Compares two secrets in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 128 random bits as hex (the retry backoff's source of randomness).
fn random_token() -> String {
    format!("{:016x}{:016x}", crate::job::random_u64(), crate::job::random_u64())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// The page, with the anti-forgery token its script sends on actions.
async fn page<S: Store>(State(shared): Ctx<S>) -> Response {
    let html = PAGE.replace("{{csrf}}", &shared.csrf);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// Everything the page shows but the job lists: queues with their counts
/// and limits, the last hour's jobs per minute, schedules, dead jobs by
/// type, the tables' sizes.
async fn overview<S: Store>(State(shared): Ctx<S>) -> Result<Response, Error> {
    let store = &shared.store;
    let now = now_ms();
    let (queues, totals, activity) = (
        store.queue_stats().await?,
        store.stats().await?,
        store.activity(now - 3_600_000, std::time::Duration::from_secs(60)).await?,
    );
    let (limits, schedules, dead, tables) = (
        store.queue_limits().await?,
        store.schedules().await?,
        store.dead_by_name().await?,
        store.table_sizes().await?,
    );
    let mut names: Vec<String> = queues.iter().map(|(q, _)| q.clone()).collect();
    names.extend(limits.iter().map(|(q, _)| q.clone()).filter(|q| !queues.iter().any(|(n, _)| n == q)));
    names.sort();
    let queues: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let counts = queues.iter().find(|(q, _)| q == name).map(|(_, s)| s.clone()).unwrap_or_default();
            let limit = limits.iter().find(|(q, _)| q == name).map(|(_, l)| {
                serde_json::json!({
                    "rate": l.rate.map(|r| r.to_string()),
                    "concurrency": l.concurrency,
                })
            });
            serde_json::json!({ "queue": name, "counts": counts, "limits": limit })
        })
        .collect();
    let dead: Vec<serde_json::Value> =
        dead.into_iter().map(|(name, count)| serde_json::json!({ "name": name, "count": count })).collect();
    Ok(Json(serde_json::json!({
        "now_ms": now,
        "totals": totals,
        "queues": queues,
        "activity": activity,
        "schedules": schedules,
        "dead_by_name": dead,
        "tables": tables,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
}

/// The newest jobs of a state (`?state=running&limit=50`).
async fn jobs<S: Store>(State(shared): Ctx<S>, Query(query): Query<ListQuery>) -> Result<Response, Response> {
    let state = match query.state.as_deref() {
        None | Some("") => None,
        Some(name) => Some(name.parse::<JobState>().map_err(|_| {
            let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            problem(
                StatusCode::BAD_REQUEST,
                format!("`state`: unknown state `{name}` (known: {})", known.join(", ")),
            )
        })?),
    };
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let list = shared.store.list(state, limit).await.map_err(IntoResponse::into_response)?;
    Ok(Json(list).into_response())
}

/// One job with its attempts.
async fn job<S: Store>(State(shared): Ctx<S>, Path(id): Path<JobId>) -> Result<Response, Error> {
    Ok(Json(shared.store.get(id).await?).into_response())
}

async fn retry<S: Store>(State(shared): Ctx<S>, Path(id): Path<JobId>) -> Result<Response, Error> {
    let state = shared.store.retry(id).await?;
    Ok(Json(serde_json::json!({ "id": id, "state": state })).into_response())
}

async fn cancel<S: Store>(State(shared): Ctx<S>, Path(id): Path<JobId>) -> Result<Response, Error> {
    let state = shared.store.cancel(id).await?;
    Ok(Json(serde_json::json!({ "id": id, "state": state })).into_response())
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    name: Option<String>,
}

/// Every dead job (of type `?name=`), in steps of a thousand.
async fn retry_dead<S: Store>(
    State(shared): Ctx<S>,
    Query(query): Query<DeadQuery>,
) -> Result<Response, Error> {
    let mut retried = 0;
    loop {
        let n = shared.store.retry_dead(query.name.as_deref(), 1000).await?;
        retried += n;
        if n < 1000 {
            break;
        }
    }
    Ok(Json(serde_json::json!({ "name": query.name, "retried": retried })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        let odd = "a b+c/d%é";
        assert_eq!(percent_decoded(&percent_encoded(odd)), odd);
        assert_eq!(
            Dashboard::new().at("/_fastlane/jobs").token(Some("t 1".into())).open_path(),
            "/_fastlane/jobs/?token=t%201"
        );
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn the_token_is_read_from_a_bearer_header_or_the_cookie() {
        let mut headers = HeaderMap::new();
        assert!(!carries(&headers, "s3cret"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(carries(&headers, "s3cret"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; fastlane_jobs_token=s3cret; b=2"));
        assert!(carries(&headers, "s3cret"));
        assert!(!carries(&headers, "other"));
    }
}
