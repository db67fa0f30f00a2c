use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Error;

/// A job's id in its store.
pub type JobId = i64;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its `run_at` time.
    Scheduled,
    /// Ready to be fetched by a worker.
    Available,
    /// Held by a worker under a lease.
    Running,
    /// Done.
    Succeeded,
    /// Failed, waiting for its next attempt (backoff).
    Retrying,
    /// Failed for good (permanent failure or out of attempts).
    Dead,
    /// Cancelled before it could finish.
    Cancelled,
}

impl JobState {
    /// Every state, in order.
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Succeeded,
        JobState::Retrying,
        JobState::Dead,
        JobState::Cancelled,
    ];

    /// The name stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Still to be done (counts for unique keys).
    pub fn is_pending(self) -> bool {
        matches!(self, JobState::Scheduled | JobState::Available | JobState::Running | JobState::Retrying)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| Error::NotAJobStore(format!("unknown job state `{s}` in the store")))
    }
}

/// A job to enqueue: a name, a JSON payload and options.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use fastlane_jobs::NewJob;
///
/// let job = NewJob::new("send_mail", serde_json::json!({"to": "ada@example.com"}))
///     .queue("mail")
///     .priority(10)
///     .delay(Duration::from_secs(60))
///     .max_attempts(5)
///     .unique_key("welcome:ada");
/// assert_eq!(job.name(), "send_mail");
/// ```
#[derive(Debug, Clone)]
#[must_use = "a job is only stored once enqueued"]
pub struct NewJob {
    pub(crate) name: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) queue: String,
    pub(crate) priority: i32,
    pub(crate) run_at: Option<SystemTime>,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) unique_key: Option<String>,
}

impl NewJob {
    /// A job of type `name` with its payload, on the `default` queue.
    pub fn new(name: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            name: name.into(),
            payload,
            queue: "default".to_owned(),
            priority: 0,
            run_at: None,
            max_attempts: 25,
            timeout: None,
            unique_key: None,
        }
    }

    /// The job type's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue (default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Higher runs first (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Not before this time.
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Not before this long from now.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = Some(SystemTime::now() + delay);
        self
    }

    /// Attempts before the job is dead (default 25, as Sidekiq; at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// How long one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No second job with this key while one is pending or running.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.name.trim().is_empty() {
            return Err(Error::Invalid("`name` must not be empty".into()));
        }
        if self.queue.trim().is_empty() {
            return Err(Error::Invalid("`queue` must not be empty".into()));
        }
        if self.max_attempts == 0 {
            return Err(Error::Invalid("`max_attempts` must be at least 1".into()));
        }
        Ok(())
    }
}

/// A job handed to a worker: the attempt's identity and the work.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Claimed {
    /// The job.
    pub id: JobId,
    /// Its type.
    pub name: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// This attempt's fencing token: every write of the attempt carries it,
    /// and a write with a stale token is rejected.
    pub token: i64,
    /// The job's per-attempt timeout.
    pub timeout: Option<Duration>,
}

/// One attempt of a job, as recorded.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Attempt {
    /// Its number, from 1.
    pub attempt: u32,
    /// The worker that ran it.
    pub worker: String,
    /// Start, unix milliseconds.
    pub started_at_ms: i64,
    /// End, unix milliseconds, if it ended.
    pub finished_at_ms: Option<i64>,
    /// `succeeded`, `failed`, `lease expired`, `released`, `cancelled`.
    pub outcome: Option<String>,
    /// The error text of a failed attempt.
    pub error: Option<String>,
}

/// A job as stored, with its attempts.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct JobInfo {
    /// The id.
    pub id: JobId,
    /// The type.
    pub name: String,
    /// The queue.
    pub queue: String,
    /// The state.
    pub state: JobState,
    /// The payload.
    pub payload: serde_json::Value,
    /// Priority.
    pub priority: i32,
    /// Attempts so far.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Not before, unix milliseconds.
    pub run_at_ms: i64,
    /// Progress of the running attempt, percent.
    pub progress: Option<u8>,
    /// Progress message.
    pub progress_message: Option<String>,
    /// The last attempt's error text.
    pub last_error: Option<String>,
    /// Every attempt.
    pub attempts: Vec<Attempt>,
}

/// One line of a job listing.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct JobSummary {
    /// The id.
    pub id: JobId,
    /// The type.
    pub name: String,
    /// The queue.
    pub queue: String,
    /// The state.
    pub state: JobState,
    /// Attempts so far.
    pub attempt: u32,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// Job counts by state; every state is present, zero or not.
pub type Stats = BTreeMap<JobState, u64>;

/// Unix milliseconds of a time.
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// What a failed attempt leads to: `retrying` at the returned time (unix ms)
/// if the failure is retryable and attempts are left, else `dead`.
pub(crate) fn after_failure(attempt: i64, max_attempts: i64, retryable: bool) -> (JobState, Option<i64>) {
    if retryable && attempt < max_attempts {
        let wait = backoff(u32::try_from(attempt).unwrap_or(u32::MAX));
        (JobState::Retrying, Some(now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2)))
    } else {
        (JobState::Dead, None)
    }
}

/// Exponential backoff with jitter before attempt `attempt + 1`: 1 s, 2 s,
/// 4 s ... capped at one hour, each plus up to 25 % at random so that jobs
/// failing together do not retry together.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(12)).min(Duration::from_secs(3600));
    let jitter_ms = random_u64() % (base.as_millis() as u64 / 4 + 1);
    base + Duration::from_millis(jitter_ms)
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
