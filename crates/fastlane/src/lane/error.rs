//! [`LaneError`]: why a lane did not run a piece of work (full, shutting
//! down, or the work panicked), and the panic message it keeps.

use std::fmt;

/// Why a lane did not run a piece of work to completion.
///
/// Returned by [`blocking`](crate::blocking) and [`compute`](crate::compute);
/// it converts into a response ([`503`] for a full lane, `500` for a panic), so
/// a handler can simply use `?`.
///
/// [`503`]: http::StatusCode::SERVICE_UNAVAILABLE
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneError {
    lane: &'static str,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Full,
    Panicked(String),
    Shutdown,
}

impl LaneError {
    pub(crate) fn full(lane: &'static str) -> Self {
        Self { lane, kind: Kind::Full }
    }

    pub(crate) fn panicked(lane: &'static str, message: String) -> Self {
        Self { lane, kind: Kind::Panicked(message) }
    }

    pub(crate) fn shutdown(lane: &'static str) -> Self {
        Self { lane, kind: Kind::Shutdown }
    }

    /// The lane's name: `"blocking"` or `"cpu"`.
    pub fn lane(&self) -> &'static str {
        self.lane
    }

    /// The lane had no free thread and its queue was at its limit: the work
    /// was not started. Retrying later may succeed.
    pub fn is_full(&self) -> bool {
        matches!(self.kind, Kind::Full)
    }

    /// The work panicked; the lane's thread survived. The panic message is in
    /// [`panic_message`](Self::panic_message).
    pub fn is_panic(&self) -> bool {
        matches!(self.kind, Kind::Panicked(_))
    }

    /// The lane is shutting down and accepts no more work.
    pub fn is_shutdown(&self) -> bool {
        matches!(self.kind, Kind::Shutdown)
    }

    /// The panic's message, if the work panicked with a string payload.
    pub fn panic_message(&self) -> Option<&str> {
        match &self.kind {
            Kind::Panicked(m) => Some(m),
            _ => None,
        }
    }
}

impl fmt::Display for LaneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full => write!(f, "the {} lane is full (all threads busy, queue at its limit)", self.lane),
            Kind::Panicked(m) => write!(f, "work on the {} lane panicked: {m}", self.lane),
            Kind::Shutdown => write!(f, "the {} lane is shutting down", self.lane),
        }
    }
}

impl std::error::Error for LaneError {}

impl axum::response::IntoResponse for LaneError {
    fn into_response(self) -> axum::response::Response {
        use crate::ApiError;
        let err = match &self.kind {
            Kind::Full | Kind::Shutdown => ApiError::unavailable(self.to_string()),
            // The panic message may carry internals; the log has it, the client
            // gets a generic message.
            Kind::Panicked(_) => ApiError::internal(format!("work on the {} lane panicked", self.lane)),
        };
        err.into_response()
    }
}

/// Turns a panic payload into a printable message.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}
