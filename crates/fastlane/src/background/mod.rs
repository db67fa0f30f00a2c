//! Background tasks: work that runs after the response has been sent.
//!
//! A handler takes the [`Background`] extractor and schedules work on it. The
//! work waits until the response body is complete (so the client is never
//! kept waiting for it), then runs on the lane that fits it. Every task is
//! tracked from the moment it is scheduled: graceful shutdown waits for it
//! within the grace period and reports it, with the route that scheduled it,
//! if it had to be cut. Errors and panics are logged with that route.
//!
//! Unlike FastAPI's `BackgroundTasks`, a background task that blocks cannot
//! hold up the server: `spawn_blocking` and `spawn_cpu` run on their lanes,
//! and a full lane makes the task wait for a thread rather than be dropped.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use futures_util::FutureExt;
use http::request::Parts;

use crate::executor::Routed;
use crate::lane::{panic_message, LaneKind};
use crate::metrics::TaskOutcome;
use crate::routes::Phase;
use crate::server::RequestState;
use crate::{ApiError, RequestId};

/// Schedules work to run after the response has been sent.
///
/// Requires the app to be served by [`Server`](crate::Server); anywhere else
/// the extractor answers `500` with a message saying so.
///
/// # Examples
///
/// ```
/// use axum::{routing::post, Router};
/// use fastlane::Background;
///
/// async fn signup(bg: Background) -> &'static str {
///     bg.spawn(async { /* send the welcome mail */ });
///     bg.spawn_blocking(|| { /* write the audit file with std::fs */ });
///     bg.spawn_cpu(|| { /* resize the avatar */ });
///     "welcome"
/// }
///
/// let app: Router = Router::new().route("/signup", post(signup));
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct Background {
    request: Arc<RequestState>,
}

/// What a background task may return: `()`, or a `Result` whose error is
/// logged (with the route that scheduled the task) and counted.
pub trait TaskResult: Send + 'static {
    /// `Err` with a printable message if the task failed.
    fn into_result(self) -> Result<(), String>;
}

impl TaskResult for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<T: Send + 'static, E: Display + Send + 'static> TaskResult for Result<T, E> {
    fn into_result(self) -> Result<(), String> {
        self.map(drop).map_err(|e| e.to_string())
    }
}

impl Background {
    /// Runs an async task after the response. It runs on the async lane, so
    /// it must not block: use [`spawn_blocking`](Self::spawn_blocking) or
    /// [`spawn_cpu`](Self::spawn_cpu) for that.
    #[track_caller]
    pub fn spawn<F>(&self, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskResult,
    {
        let (id, request) = self.register("async");
        let server = request.server.clone();
        let route = request.route.route.clone();
        let method = request.method.clone();
        let task = async move {
            server.tracker.task_started(id);
            let outcome = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(result) => outcome_of(result.into_result(), &method, &route),
                Err(payload) => {
                    let message = panic_message(&*payload);
                    tracing::error!(%method, %route, panic = %message, "background task panicked");
                    TaskOutcome::Panicked
                }
            };
            server.metrics.task_finished("async", outcome);
            server.tracker.remove_task(id);
        };
        // Stalls inside the task are reported against the route that
        // scheduled it, and it runs under the request's id.
        let task = UnderRequestId::new(task, &self.request.request_id);
        let executor = self.request.server.executor.as_ref();
        let routed = Routed::new(task, self.request.route.clone(), Phase::Background, executor);
        self.request.schedule(Box::pin(routed));
    }

    /// Runs a blocking closure on the blocking lane after the response. If the
    /// lane is full it waits for a thread; it is not dropped.
    #[track_caller]
    pub fn spawn_blocking<F, R>(&self, task: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: TaskResult,
    {
        self.spawn_on(LaneKind::Blocking, task);
    }

    /// Runs a computation on the CPU lane after the response. If the lane is
    /// full it waits for a thread; it is not dropped.
    #[track_caller]
    pub fn spawn_cpu<F, R>(&self, task: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: TaskResult,
    {
        self.spawn_on(LaneKind::Cpu, task);
    }

    fn spawn_on<F, R>(&self, lane: LaneKind, task: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: TaskResult,
    {
        let lane_name = match lane {
            LaneKind::Blocking => "blocking",
            LaneKind::Cpu => "cpu",
        };
        let (id, request) = self.register(lane_name);
        let server = request.server.clone();
        let route = request.route.route.clone();
        let method = request.method.clone();
        let request_id = request.request_id.clone();
        self.request.schedule(Box::pin(async move {
            let tracker_server = server.clone();
            let result = server
                .lanes
                .run_when_ready(lane, move || {
                    tracker_server.tracker.task_started(id);
                    let span = request_id.span();
                    let _span = span.enter();
                    let _current = request_id.enter();
                    task().into_result()
                })
                .await;
            let outcome = match result {
                Ok(result) => outcome_of(result, &method, &route),
                Err(err) if err.is_panic() => {
                    let message = err.panic_message().unwrap_or_default();
                    tracing::error!(%method, %route, lane = lane_name, panic = %message, "background task panicked");
                    TaskOutcome::Panicked
                }
                Err(err) => {
                    tracing::error!(%method, %route, lane = lane_name, error = %err, "background task did not run");
                    TaskOutcome::Failed
                }
            };
            server.metrics.task_finished(lane_name, outcome);
            server.tracker.remove_task(id);
        }));
    }

    fn register(&self, lane: &'static str) -> (u64, &RequestState) {
        let request = &*self.request;
        let id = request.server.tracker.add_task(&request.route, lane);
        request.server.metrics.task_scheduled();
        (id, request)
    }
}

pin_project_lite::pin_project! {
    /// A background task polled under its request's id: in its span, and
    /// as [`RequestId::current`] (which a job enqueued from it records).
    struct UnderRequestId<F> {
        #[pin]
        inner: F,
        id: RequestId,
        span: tracing::Span,
    }
}

impl<F> UnderRequestId<F> {
    fn new(inner: F, id: &RequestId) -> Self {
        Self { inner, id: id.clone(), span: id.span() }
    }
}

impl<F: Future> Future for UnderRequestId<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _span = this.span.enter();
        let _current = this.id.enter();
        this.inner.poll(cx)
    }
}

fn outcome_of(result: Result<(), String>, method: &http::Method, route: &str) -> TaskOutcome {
    match result {
        Ok(()) => TaskOutcome::Ok,
        Err(error) => {
            tracing::error!(%method, %route, %error, "background task failed");
            TaskOutcome::Failed
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Background {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match RequestState::current() {
            Some(request) => Ok(Background { request }),
            None => Err(ApiError::internal(
                "the Background extractor needs the app to be served by fastlane::Server",
            )),
        }
    }
}
