//! The job store's errors: what went wrong, by kind (a bad URL, a job that
//! does not exist, a write fenced off by a newer attempt, the database).

/// Errors of the job store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL names no supported backend, or is malformed.
    #[error("invalid job store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file or database exists but is not a fastlane job store (or is
    /// from a newer version of fastlane-jobs).
    #[error("{0}")]
    NotAJobStore(String),
    /// The database is locked by another process for longer than the busy
    /// timeout.
    #[error("the job store is locked by another process: {0}")]
    Locked(String),
    /// A write from an attempt that no longer owns the job (its lease expired
    /// and the job was given to another attempt): rejected, nothing changed.
    #[error("job {job} attempt with token {token} no longer owns the job (fenced)")]
    Fenced {
        /// The job.
        job: i64,
        /// The stale attempt's token.
        token: i64,
    },
    /// No job with this id.
    #[error("no job with id {0}")]
    NotFound(i64),
    /// A job with the same unique key is already pending or running.
    #[error("a job with unique key `{0}` is already pending or running")]
    Duplicate(String),
    /// Bad input to an enqueue call; the message names the field.
    #[error("invalid job: {0}")]
    Invalid(String),
    /// A job whose result was awaited ended without one: dead (its last
    /// error) or cancelled.
    #[error("job {job} ended {state} without a result{}", error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unsuccessful {
        /// The job.
        job: i64,
        /// How it ended.
        state: crate::JobState,
        /// Its last error, if any.
        error: Option<String>,
    },
    /// A job whose result was awaited had not ended when the wait did.
    #[error("job {job} had not finished after {:.1} s (it is {state})", waited.as_secs_f64())]
    NotFinished {
        /// The job.
        job: i64,
        /// Where it was when the wait ended.
        state: crate::JobState,
        /// How long it was awaited.
        waited: std::time::Duration,
    },
    /// Any other database error.
    #[error("job store error")]
    Database(#[from] sqlx::Error),
}

impl Error {
    /// True for a fencing rejection.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }
}

/// As an HTTP error, for handlers that enqueue or look up jobs: bad input is
/// `422`, an unknown id `404`, a taken unique key `409`, a locked or
/// unreachable store `503`.
impl From<Error> for fastlane::ApiError {
    fn from(err: Error) -> Self {
        use axum::http::StatusCode;
        let status = match &err {
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            // The job's own outcome, not the request's: the caller asked for
            // a result that does not exist (yet).
            Error::Unsuccessful { .. } | Error::NotFinished { .. } => StatusCode::CONFLICT,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Duplicate(_) | Error::Fenced { .. } => StatusCode::CONFLICT,
            Error::Locked(_) | Error::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::InvalidUrl { .. } | Error::NotAJobStore(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        fastlane::ApiError::new(status, fastlane::ErrorChain(&err).to_string())
    }
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        fastlane::ApiError::from(self).into_response()
    }
}
