//! Per-route timeouts.

use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use tower::{Layer, Service};

use super::state::RequestState;

/// Sets the timeout of the routes it is applied to, overriding the server's
/// [`request_timeout`](crate::Config::request_timeout). A handler that has not
/// answered in time is dropped and the client gets `504` with a JSON body; the
/// server is unaffected.
///
/// Work already handed to a lane (a [`sync`](crate::sync) handler, a
/// [`blocking`](crate::blocking) call) cannot be interrupted: its thread
/// finishes it and stays counted as busy until then.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
///
/// let app: Router = Router::new()
///     .route("/report", get(|| async { "slow report" }).layer(fastlane::RouteTimeout::new(Duration::from_secs(120))))
///     .route("/events", get(|| async { "stream" }).layer(fastlane::RouteTimeout::disabled()));
/// # let _ = app;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RouteTimeout {
    timeout: Option<Duration>,
}

impl RouteTimeout {
    /// Answer `504` after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout: Some(timeout) }
    }

    /// No timeout for these routes (long polls, streams).
    pub fn disabled() -> Self {
        Self { timeout: None }
    }
}

impl<S> Layer<S> for RouteTimeout {
    type Service = SetTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetTimeout { inner, timeout: self.timeout }
    }
}

/// The service made by [`RouteTimeout`].
#[derive(Debug, Clone)]
pub struct SetTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> Service<Request> for SetTimeout<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // Outside a fastlane server there is no deadline to change.
        // The route layer calls the route with its request current.
        if let Some(request) = RequestState::current() {
            request.set_timeout(self.timeout);
        }
        self.inner.call(req)
    }
}
