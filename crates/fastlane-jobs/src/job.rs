//! The job model: what is enqueued ([`NewJob`]), an attempt handed to a
//! worker ([`Claimed`]), what is read back ([`JobInfo`], [`JobSummary`],
//! [`Stats`]), the states a job goes through ([`JobState`]) and the retry
//! [`backoff`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Error;

/// A job's id in its store.
pub type JobId = i64;

/// One attempt's hold on a running job: the job and the attempt's fencing
/// token. Every write of the attempt carries it, and a write whose token is
/// no longer the job's (its lease ended and another attempt took the job
/// over) is rejected with [`Error::Fenced`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Lease {
    /// The job.
    pub job: JobId,
    /// The attempt's fencing token.
    pub token: i64,
}

/// A successful attempt to record: its lease and the handler's return
/// value (JSON; `None` for a handler that returns nothing, `()`).
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// The attempt.
    pub lease: Lease,
    /// What the handler returned.
    pub result: Option<serde_json::Value>,
}

impl From<Lease> for Done {
    /// A success with no result.
    fn from(lease: Lease) -> Self {
        Self { lease, result: None }
    }
}

/// Where a job is in its life.
#[cfg_attr(feature = "openapi", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for the jobs it depends on to succeed (a workflow's later
    /// step); then `available`, or `scheduled` if its `run_at` is still to
    /// come.
    Waiting,
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
    pub const ALL: [JobState; 8] = [
        JobState::Waiting,
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
            JobState::Waiting => "waiting",
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
        matches!(
            self,
            JobState::Waiting
                | JobState::Scheduled
                | JobState::Available
                | JobState::Running
                | JobState::Retrying
        )
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

/// What a job waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dependency {
    /// A job already in the store.
    Stored(JobId),
    /// An earlier job of the same batch, by position.
    InBatch(usize),
}

/// How a job of a workflow batch (`workflow.rs`) is stored: waiting (for how many), due,
/// or cancelled at once because a job it waits for already failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    /// `None`: as any job (available, or scheduled for later).
    pub(crate) state: Option<JobState>,
    /// How many of the jobs it waits for have yet to succeed.
    pub(crate) deps_left: i64,
    /// Why it is cancelled at once.
    pub(crate) last_error: Option<String>,
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
    pub(crate) request_id: Option<String>,
    /// The jobs it waits for, in the order their results are handed to it.
    pub(crate) after: Vec<Dependency>,
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
            request_id: None,
            after: Vec::new(),
        }
    }

    /// The job type's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the request it is enqueued for, written on its attempts'
    /// log lines. [`Jobs::enqueue`](crate::Jobs::enqueue) sets it to the
    /// current request's ([`fastlane::RequestId::current`]) unless set here.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
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

    /// Runs only once job `id`, already stored, has succeeded; its result is
    /// handed to the handler ([`JobContext::results`](crate::JobContext::results)).
    /// Call it again for each job to wait for: the results come in that
    /// order. If the job it waits for ends dead or cancelled, this one is
    /// cancelled (and so are the jobs waiting for it), saying why.
    pub fn after(mut self, id: JobId) -> Self {
        self.after.push(Dependency::Stored(id));
        self
    }

    /// Runs only once job number `index` (from 0) of the same
    /// [`enqueue_many`](crate::Store::enqueue_many) batch, an earlier one,
    /// has succeeded: a workflow enqueued in one transaction (see [`chain`](crate::chain)
    /// and [`chord`](crate::chord)). Otherwise as [`after`](Self::after).
    pub fn after_nth(mut self, index: usize) -> Self {
        self.after.push(Dependency::InBatch(index));
        self
    }

    /// The job as one row of a batch insert, checked; `now` decides between
    /// `scheduled` and `available`, unless its dependencies decide (`plan`).
    pub(crate) fn to_row(&self, now: i64, plan: Option<&Plan>) -> Result<NewRow<'_>, Error> {
        self.validate()?;
        let run_at = self.run_at.map_or(now, unix_ms);
        let state = if run_at > now { JobState::Scheduled } else { JobState::Available };
        let state = plan.and_then(|p| p.state).unwrap_or(state);
        Ok(NewRow {
            name: &self.name,
            queue: &self.queue,
            payload: serde_json::to_string(&self.payload)
                .map_err(|e| Error::Invalid(format!("`payload`: {e}")))?,
            state: state.as_str(),
            priority: self.priority,
            run_at,
            max_attempts: i64::from(self.max_attempts),
            timeout_ms: self.timeout.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            unique_key: self.unique_key.as_deref(),
            request_id: self.request_id.as_deref(),
            created_at: now,
            deps_left: plan.map_or(0, |p| p.deps_left),
            last_error: plan.and_then(|p| p.last_error.clone()),
            finished_at: plan.and_then(|p| p.state).filter(|s| *s == JobState::Cancelled).map(|_| now),
        })
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

/// A job as the stores insert it: one element of the JSON array that both
/// backends expand in SQL (`json_each` / `jsonb_to_recordset`), so that a
/// batch of any size is one statement with one parameter.
#[derive(Debug, Serialize)]
pub(crate) struct NewRow<'a> {
    pub(crate) name: &'a str,
    pub(crate) queue: &'a str,
    /// The payload as JSON text (stored as text).
    pub(crate) payload: String,
    pub(crate) state: &'static str,
    pub(crate) priority: i32,
    pub(crate) run_at: i64,
    pub(crate) max_attempts: i64,
    pub(crate) timeout_ms: Option<i64>,
    pub(crate) unique_key: Option<&'a str>,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) created_at: i64,
    /// How many of the jobs it waits for have yet to succeed.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) deps_left: i64,
    /// Why a job enqueued after a failed one is cancelled at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) finished_at: Option<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Checks a batch and turns it into the JSON array of [`NewRow`]s, with the
/// unique keys it holds; a key given twice in one batch is a
/// [`Error::Duplicate`].
pub(crate) fn batch_rows<'a>(
    jobs: &'a [NewJob],
    now: i64,
    plans: Option<&[Plan]>,
) -> Result<(String, Vec<&'a str>), Error> {
    let rows = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| job.to_row(now, plans.and_then(|p| p.get(i))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut keys: Vec<&str> = rows.iter().filter_map(|r| r.unique_key).collect();
    keys.sort_unstable();
    if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Error::Duplicate(pair[0].to_owned()));
    }
    let json = serde_json::to_string(&rows).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok((json, keys))
}

/// `[{"id": .., "token": ..}, ..]`: the attempts of a batch completion.
pub(crate) fn done_rows(done: &[Done]) -> String {
    // The result goes as JSON text in a string: both stores read it back
    // with `->>` and store it as it is.
    let rows: Vec<serde_json::Value> = done
        .iter()
        .map(|d| {
            let result = d.result.as_ref().map(serde_json::Value::to_string);
            serde_json::json!({"id": d.lease.job, "token": d.lease.token, "result": result})
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// The ids a batch insert returned, in the order of the batch: both stores
/// insert the rows in array order under one lock, so ids rise with it.
pub(crate) fn in_batch_order(mut ids: Vec<JobId>) -> Vec<JobId> {
    ids.sort_unstable();
    ids
}

/// The attempts of `done` whose job is not among `recorded`: fenced.
pub(crate) fn fenced_among(done: &[Done], recorded: Vec<JobId>) -> Vec<Lease> {
    let recorded: std::collections::HashSet<JobId> = recorded.into_iter().collect();
    done.iter().map(|d| d.lease).filter(|lease| !recorded.contains(&lease.job)).collect()
}

/// The attempt a job's own row stands for, added to its recorded history:
/// the running attempt (recorded only when it ends in failure, expiry or
/// cancellation), or the attempt that succeeded (never recorded: a success
/// is one write, of the job's row). A succeeded attempt that schema version
/// 1 recorded when it started, and left open, is closed here.
pub(crate) struct RowAttempt {
    pub(crate) state: JobState,
    pub(crate) attempt: i64,
    pub(crate) consumer: Option<String>,
    pub(crate) started_at_ms: Option<i64>,
    pub(crate) finished_at_ms: Option<i64>,
}

impl RowAttempt {
    pub(crate) fn add_to(self, attempts: &mut Vec<Attempt>) {
        let outcome = match self.state {
            JobState::Running => None,
            JobState::Succeeded => Some("succeeded".to_owned()),
            _ => return,
        };
        let number = u32::try_from(self.attempt).unwrap_or(0);
        let row = Attempt {
            attempt: number,
            consumer: self.consumer.unwrap_or_default(),
            started_at_ms: self.started_at_ms.unwrap_or_default(),
            finished_at_ms: if outcome.is_some() { self.finished_at_ms } else { None },
            outcome,
            error: None,
        };
        match attempts.iter_mut().find(|a| a.attempt == number) {
            Some(open) if open.finished_at_ms.is_none() && row.outcome.is_some() => *open = row,
            Some(_) => {}
            None => attempts.push(row),
        }
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
    /// The id of the request that enqueued it, if any.
    pub request_id: Option<String>,
    /// The jobs it waited for (all succeeded), in order.
    pub depends_on: Vec<JobId>,
}

impl Claimed {
    /// This attempt's hold on the job, for its writes.
    pub fn lease(&self) -> Lease {
        Lease { job: self.id, token: self.token }
    }
}

/// A claimed job as both stores return it: id, name, payload (JSON text),
/// attempt, max attempts, token, timeout (ms), priority, run at (ms), the
/// request id, the jobs it waited for (JSON text).
pub(crate) type ClaimedRow =
    (JobId, String, String, i64, i64, i64, Option<i64>, i64, i64, Option<String>, Option<String>);

/// The claimed jobs in the order they are due (RETURNING gives no order):
/// highest priority first, then the earliest, then the oldest.
pub(crate) fn claimed_in_order(mut rows: Vec<ClaimedRow>) -> Vec<Claimed> {
    rows.sort_by_key(|row| (std::cmp::Reverse(row.7), row.8, row.0));
    rows.into_iter()
        .map(|(id, name, payload, attempt, max_attempts, token, timeout_ms, _, _, request_id, depends_on)| {
            Claimed {
                id,
                name,
                payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
                token,
                timeout: timeout_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
                request_id,
                depends_on: id_list(depends_on.as_deref()),
            }
        })
        .collect()
}

/// A list of job ids stored as JSON text (`depends_on`, `dependents`).
pub(crate) fn id_list(text: Option<&str>) -> Vec<JobId> {
    text.and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default()
}

/// One attempt of a job, as recorded.
#[cfg_attr(feature = "openapi", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Attempt {
    /// Its number, from 1.
    pub attempt: u32,
    /// The consumer that ran it (its `ConsumerConfig::name`).
    pub consumer: String,
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
#[cfg_attr(feature = "openapi", derive(schemars::JsonSchema))]
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
    /// The id of the request that enqueued it, if any.
    pub request_id: Option<String>,
    /// Its unique key, if it has one (a schedule's job: `schedule:<name>:<tick ms>`).
    pub unique_key: Option<String>,
    /// What its handler returned when it succeeded (JSON); `null` while it
    /// has not, or for a handler that returns nothing.
    pub result: Option<serde_json::Value>,
    /// The jobs it waits for (or waited for), in the order their results
    /// are handed to it.
    pub depends_on: Vec<JobId>,
    /// How many of those have yet to succeed (while it is `waiting`).
    pub waiting_for: u32,
    /// The jobs that wait for it.
    pub dependents: Vec<JobId>,
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
    /// Progress of the running attempt, percent.
    pub progress: Option<u8>,
    /// Progress message of the running attempt.
    pub progress_message: Option<String>,
    /// When it ended, unix milliseconds (succeeded, dead, cancelled).
    pub finished_at_ms: Option<i64>,
}

/// Job counts by state; every state is present, zero or not.
pub type Stats = BTreeMap<JobState, u64>;

/// Unix milliseconds of a time.
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix milliseconds now: the clock of the store's times (`run_at_ms`,
/// `ScheduleInfo`, [`Store::activity`](crate::Store::activity)) and of the
/// `now` its clock-taking operations are given.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// `at` (unix ms) plus `wait`, saturating far in the future for a wait too
/// long to count in milliseconds.
pub(crate) fn ms_after(at: i64, wait: Duration) -> i64 {
    at.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2))
}

/// What a failed attempt leads to: `retrying` at the returned time (unix ms)
/// if the failure is retryable and attempts are left, else `dead`.
pub(crate) fn after_failure(attempt: i64, max_attempts: i64, retryable: bool) -> (JobState, Option<i64>) {
    if retryable && attempt < max_attempts {
        let wait = backoff(u32::try_from(attempt).unwrap_or(u32::MAX));
        (JobState::Retrying, Some(ms_after(now_ms(), wait)))
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

/// 64 random bits, from the OS-seeded keys of std's hasher (each
/// `RandomState` a new pair) over the time.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
