//! [`ApiError`]: the JSON error body every answer of fastlane's own has
//! (`{"error": ..., "status": ...}`, with the field when one is to blame).

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

/// An HTTP error with a JSON body that says what was wrong.
///
/// Every error fastlane itself answers with (bad query values, a full lane,
/// a timeout, a panic, a body too large) is an `ApiError`, so clients always
/// get the same shape:
///
/// ```json
/// {"error": "invalid value for `secs`: must be at most 60", "field": "secs", "status": 422}
/// ```
///
/// Handlers can return it too.
///
/// # Examples
///
/// ```
/// use axum::response::IntoResponse;
/// use fastlane::ApiError;
///
/// let response = ApiError::unprocessable("secs", "must be at most 60").into_response();
/// assert_eq!(response.status(), 422);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
    retry_after: Option<Duration>,
}

/// The JSON body of every error the server answers, and of a handler's `ApiError`.
// Its schema is the one `/openapi.json` shows (feature `openapi`).
#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "openapi", schemars(rename = "ApiError"))]
#[cfg_attr(feature = "openapi", schemars(example = serde_json::json!({
    "error": "invalid value for `secs`: must be at most 60", "field": "secs", "status": 422
})))]
pub(crate) struct Body<'a> {
    /// What was wrong, in a sentence.
    error: &'a str,
    /// The query, path or body field to blame, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    /// The HTTP status again, for clients that only keep the body.
    status: u16,
}

impl ApiError {
    /// An error with any status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), field: None, retry_after: None }
    }

    /// `400 Bad Request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// `422 Unprocessable Entity` for a value that parsed but is not
    /// acceptable; names the field.
    pub fn unprocessable(field: impl Into<String>, message: impl AsRef<str>) -> Self {
        let field = field.into();
        let message = format!("invalid value for `{field}`: {}", message.as_ref());
        Self { field: Some(field), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, message) }
    }

    /// `503 Service Unavailable` with `Retry-After: 1`: the server is
    /// overloaded right now and says so at once instead of queueing.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// `500 Internal Server Error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// Names the field the error is about.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Sets the `Retry-After` header (whole seconds, rounded up).
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The field the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: &self.message, field: self.field.as_deref(), status: self.status.as_u16() };
        // Serializing a struct of strings cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}
