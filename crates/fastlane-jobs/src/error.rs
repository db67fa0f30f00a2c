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
    /// Any other database error.
    #[error("job store error: {0}")]
    Database(#[from] sqlx::Error),
}

impl Error {
    /// True for a fencing rejection.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }
}
