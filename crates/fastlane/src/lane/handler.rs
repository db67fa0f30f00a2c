//! `sync(handler)` and `cpu(handler)`: plain `fn` handlers that run on a lane.
//!
//! Extractors are async (they may read the body), so they run on the async
//! lane as usual; only the call of the user's function, and the conversion
//! of its result into a response, move to the lane's thread.

use std::future::Future;
use std::pin::Pin;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::handler::Handler;
use axum::response::{IntoResponse, Response};

use super::{LaneKind, Lanes};

/// A plain function handler that runs on the blocking or the CPU lane.
/// Made by [`sync`] and [`cpu`]; use it wherever axum takes a handler.
#[derive(Debug, Clone, Copy)]
pub struct LaneHandler<F> {
    f: F,
    lane: LaneKind,
}

/// Runs a synchronous handler on the blocking lane: fastlane's answer to
/// FastAPI's `def` endpoints.
///
/// The handler is a plain `fn` taking the usual axum extractors (up to 16) and
/// returning anything that implements [`IntoResponse`]. It may block freely:
/// it has a thread of its own from a bounded pool, and when that pool and its
/// queue are full the request is answered `503` with `Retry-After` at once.
///
/// # Examples
///
/// ```
/// use axum::{extract::Path, routing::get, Router};
///
/// fn read_report(Path(id): Path<u32>) -> String {
///     // A blocking driver or file read is fine here.
///     std::thread::sleep(std::time::Duration::from_millis(5));
///     format!("report {id}")
/// }
///
/// let app: Router = Router::new().route("/reports/{id}", get(fastlane::sync(read_report)));
/// # let _ = app;
/// ```
pub fn sync<F>(f: F) -> LaneHandler<F> {
    LaneHandler { f, lane: LaneKind::Blocking }
}

/// Runs a CPU-heavy synchronous handler on the CPU lane (one low-priority
/// thread per core), so computation cannot starve fast requests.
///
/// # Examples
///
/// ```
/// use axum::{extract::Query, routing::get, Router};
/// use std::collections::HashMap;
///
/// fn checksum(Query(q): Query<HashMap<String, String>>) -> String {
///     let n: u64 = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(1_000);
///     (0..n).fold(0u64, |acc, i| acc.wrapping_mul(31).wrapping_add(i)).to_string()
/// }
///
/// let app: Router = Router::new().route("/checksum", get(fastlane::cpu(checksum)));
/// # let _ = app;
/// ```
pub fn cpu<F>(f: F) -> LaneHandler<F> {
    LaneHandler { f, lane: LaneKind::Cpu }
}

async fn run_on_lane<R, G>(lanes: Lanes, lane: LaneKind, call: G) -> Response
where
    G: FnOnce() -> R + Send + 'static,
    R: IntoResponse,
{
    match lanes.run(lane, move || call().into_response()).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

impl<F, S, Res> Handler<((),), S> for LaneHandler<F>
where
    F: FnOnce() -> Res + Clone + Send + Sync + 'static,
    Res: IntoResponse + 'static,
    S: Send + Sync + 'static,
{
    type Future = Pin<Box<dyn Future<Output = Response> + Send>>;

    fn call(self, _req: Request, _state: S) -> Self::Future {
        // The server's lanes: its connection and stream tasks run with them
        // current (`ServerState::start_task`); outside a fastlane server,
        // the process's.
        let lanes = Lanes::current();
        Box::pin(run_on_lane(lanes, self.lane, self.f))
    }
}

macro_rules! impl_lane_handler {
    ([$($ty:ident),*], $last:ident) => {
        #[allow(non_snake_case, unused_mut)]
        impl<F, S, Res, M, $($ty,)* $last> Handler<(M, $($ty,)* $last,), S> for LaneHandler<F>
        where
            F: FnOnce($($ty,)* $last,) -> Res + Clone + Send + Sync + 'static,
            Res: IntoResponse + 'static,
            S: Send + Sync + 'static,
            $( $ty: FromRequestParts<S> + Send + 'static, )*
            $last: FromRequest<S, M> + Send + 'static,
        {
            type Future = Pin<Box<dyn Future<Output = Response> + Send>>;

            fn call(self, req: Request, state: S) -> Self::Future {
                Box::pin(async move {
                    let (mut parts, body) = req.into_parts();
                    let lanes = Lanes::current();
                    $(
                        let $ty = match $ty::from_request_parts(&mut parts, &state).await {
                            Ok(value) => value,
                            Err(rejection) => return rejection.into_response(),
                        };
                    )*
                    let req = Request::from_parts(parts, body);
                    let $last = match $last::from_request(req, &state).await {
                        Ok(value) => value,
                        Err(rejection) => return rejection.into_response(),
                    };
                    let f = self.f;
                    run_on_lane(lanes, self.lane, move || f($($ty,)* $last,)).await
                })
            }
        }
    };
}

impl_lane_handler!([], T1);
impl_lane_handler!([T1], T2);
impl_lane_handler!([T1, T2], T3);
impl_lane_handler!([T1, T2, T3], T4);
impl_lane_handler!([T1, T2, T3, T4], T5);
impl_lane_handler!([T1, T2, T3, T4, T5], T6);
impl_lane_handler!([T1, T2, T3, T4, T5, T6], T7);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7], T8);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8], T9);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9], T10);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9, T10], T11);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11], T12);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12], T13);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13], T14);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14], T15);
impl_lane_handler!([T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15], T16);
