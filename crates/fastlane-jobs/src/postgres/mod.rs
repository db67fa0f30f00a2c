//! The PostgreSQL job store: shared by many processes and machines.
//!
//! `claim` locks its candidate row with `FOR UPDATE SKIP LOCKED`, so
//! concurrent workers never wait on each other's rows and never get the same
//! job. Times are stored as unix milliseconds, as in the SQLite store, so the
//! two behave identically.

mod schema;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::Notify;

use crate::job::{
    after_failure, batch_rows, claimed_in_order, done_rows, fenced_among, in_batch_order, now_ms,
    push_running_attempt, Attempt, Claimed, ClaimedRow, JobId, JobInfo, JobState, JobSummary, NewJob, Stats,
};
use crate::{Error, Store};

/// A job store in a PostgreSQL database (`postgres://...`); its tables are
/// created (and migrated) on first use, beside the application's own.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    wake: Arc<Wakeups>,
}

/// Idle workers' wake-up: one LISTEN connection per store, started by the
/// first worker that asks, turning NOTIFYs from any process into a
/// [`Notify`].
#[derive(Debug, Default)]
struct Wakeups {
    notify: Arc<Notify>,
    listening: AtomicBool,
}

/// Forwards notifications on [`CHANNEL`] to `notify` while anyone holds it;
/// reconnects after errors (waking everyone, since a notification may have
/// been missed meanwhile).
async fn listen(pool: PgPool, notify: Weak<Notify>) {
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if let Err(err) = listener.listen(CHANNEL).await {
                    tracing::warn!("job wake-ups: LISTEN failed: {err}; workers poll meanwhile");
                } else {
                    loop {
                        // Wake up now and then to see whether anyone still listens.
                        match tokio::time::timeout(Duration::from_secs(5), listener.recv()).await {
                            Ok(Ok(_)) => match notify.upgrade() {
                                Some(n) => n.notify_waiters(),
                                None => return,
                            },
                            Ok(Err(err)) => {
                                tracing::warn!("job wake-ups: connection lost: {err}; reconnecting");
                                break;
                            }
                            Err(_) if notify.strong_count() == 0 => return,
                            Err(_) => {}
                        }
                    }
                }
            }
            Err(err) => tracing::warn!("job wake-ups: cannot connect: {err}; workers poll meanwhile"),
        }
        match notify.upgrade() {
            Some(n) => n.notify_waiters(),
            None => return,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The start of every write of attempt records. An attempt record is written
/// once, when the attempt ends: a running attempt is read off its job row, so
/// that claiming a job is one write, not two.
const RECORD_ATTEMPTS: &str =
    "INSERT INTO fastlane_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error)";

/// The end of every write of attempt records; the upsert also closes the
/// records that schema version 1 wrote when an attempt started.
const ON_ATTEMPT_CONFLICT: &str =
    "ON CONFLICT (job_id, attempt) DO UPDATE SET finished_at = EXCLUDED.finished_at, \
     outcome = EXCLUDED.outcome, error = EXCLUDED.error";

/// The channel on which enqueues wake idle workers; the payload is the queue.
pub(crate) const CHANNEL: &str = "fastlane_jobs";

fn classify(err: sqlx::Error) -> Error {
    Error::Database(err)
}

impl PgStore {
    /// Connects to `url` and brings the job schema up to date.
    pub async fn open(url: &str) -> Result<Self, Error> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::InvalidUrl { url: url.to_owned(), reason: "expected postgres://...".into() });
        }
        let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
        Self::from_pool(pool).await
    }

    /// Uses the application's own pool (and so its database and
    /// `search_path`); creates or migrates the job tables there.
    pub async fn from_pool(pool: PgPool) -> Result<Self, Error> {
        schema::migrate(&pool).await?;
        Ok(Self { pool, wake: Arc::default() })
    }

    /// The connection pool, for the application's own queries and
    /// transactions (see [`enqueue_in_tx`]).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn finish(
        &self,
        id: JobId,
        token: i64,
        state: JobState,
        outcome: &str,
        error: Option<&str>,
        retry_at: Option<i64>,
    ) -> Result<(), Error> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // The fencing check: only the attempt holding the current token may
        // write; a zombie's late completion changes nothing.
        let row = sqlx::query(
            "UPDATE fastlane_jobs SET state = $1, lease_until = NULL, last_error = COALESCE($2::TEXT, last_error), \
             run_at = COALESCE($3::BIGINT, run_at), finished_at = CASE WHEN $4::BOOLEAN THEN NULL ELSE $5::BIGINT END \
             WHERE id = $6 AND token = $7 AND state = 'running' RETURNING attempt",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(retry_at)
        .bind(retry_at.is_some())
        .bind(now)
        .bind(id)
        .bind(token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let Some(row) = row else {
            return Err(Error::Fenced { job: id, token });
        };
        let _attempt: i64 = row.get(0);
        sqlx::query(&format!("{RECORD_ATTEMPTS} SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, $2, $3 FROM fastlane_jobs WHERE id = $4 {ON_ATTEMPT_CONFLICT}"))
        .bind(now)
        .bind(outcome)
        .bind(error)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(())
    }
}

impl Store for PgStore {
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let ids = enqueue_in(&mut tx, jobs).await?;
        tx.commit().await.map_err(classify)?;
        Ok(ids)
    }

    /// Hands the next due jobs of `queue` to `worker` under a lease of
    /// `lease`: the highest priority first, then the earliest. A running job
    /// whose lease has expired (its worker died) is due again: that is how a
    /// dead worker's jobs are recovered, within one lease period.
    async fn claim_many(
        &self,
        queue: &str,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claimed>, Error> {
        let now = now_ms();
        let lease_until = now + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        // Jobs whose worker is gone: their attempt ends, and they are due
        // again (or dead, if that was the last attempt). One statement, no
        // transaction: each statement is atomic, and SKIP LOCKED keeps
        // workers that rescue at the same time off each other's rows.
        sqlx::query(&format!(
            "WITH expired AS (UPDATE fastlane_jobs SET lease_until = NULL, \
               state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
               finished_at = CASE WHEN attempt >= max_attempts THEN $1 ELSE finished_at END, \
               last_error = CASE WHEN attempt >= max_attempts THEN 'lease expired on the last attempt' \
               ELSE last_error END \
             WHERE id IN (SELECT id FROM fastlane_jobs WHERE queue = $2 AND state = 'running' \
               AND lease_until < $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, attempt, worker, started_at) \
             {RECORD_ATTEMPTS} SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, \
             'lease expired', NULL FROM expired {ON_ATTEMPT_CONFLICT}"
        ))
        .bind(now)
        .bind(queue)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH picked AS (SELECT id FROM fastlane_jobs WHERE queue = $4 \
               AND state IN ('scheduled','available','retrying') AND run_at <= $3 \
               ORDER BY priority DESC, run_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) \
             UPDATE fastlane_jobs j SET state = 'running', attempt = attempt + 1, token = token + 1, \
             lease_until = $1, worker = $2, started_at = $3, owner = $6, progress = NULL, progress_message = NULL \
             FROM picked WHERE j.id = picked.id \
             RETURNING j.id, j.name, j.payload, j.attempt, j.max_attempts, j.token, j.timeout_ms, j.priority::BIGINT, j.run_at",
        )
        .bind(lease_until)
        .bind(worker)
        .bind(now)
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(crate::owner::me())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(claimed_in_order(rows))
    }

    fn wakeups(&self) -> Option<Arc<Notify>> {
        if !self.wake.listening.swap(true, Ordering::AcqRel) {
            tokio::spawn(listen(self.pool.clone(), Arc::downgrade(&self.wake.notify)));
        }
        Some(self.wake.notify.clone())
    }

    async fn expire_dead_owners(&self) -> Result<u64, Error> {
        let Some(prefix) = crate::owner::host_prefix() else { return Ok(0) };
        let owners: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT owner FROM fastlane_jobs WHERE state = 'running' \
             AND substr(owner, 1, length($1)) = $1",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut expired = 0;
        for owner in owners.iter().filter(|owner| crate::owner::is_dead_here(owner)) {
            let done = sqlx::query(
                "UPDATE fastlane_jobs SET lease_until = 0 WHERE state = 'running' AND owner = $1",
            )
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
            expired += done.rows_affected();
        }
        Ok(expired)
    }

    /// Extends the lease of a running attempt; returns whether the job has
    /// been asked to cancel. Fails with [`Error::Fenced`] if the attempt no
    /// longer owns the job.
    async fn heartbeat(&self, id: JobId, token: i64, lease: Duration) -> Result<bool, Error> {
        let lease_until = now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let cancel: Option<i64> = sqlx::query_scalar(
            "UPDATE fastlane_jobs SET lease_until = $1 WHERE id = $2 AND token = $3 AND state = 'running' \
             RETURNING cancel_requested",
        )
        .bind(lease_until)
        .bind(id)
        .bind(token)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        cancel.map(|c| c != 0).ok_or(Error::Fenced { job: id, token })
    }

    /// Records progress (0-100 %) and a message for a running attempt.
    async fn progress(&self, id: JobId, token: i64, percent: u8, message: &str) -> Result<(), Error> {
        let done = sqlx::query(
            "UPDATE fastlane_jobs SET progress = $1, progress_message = $2 WHERE id = $3 AND token = $4 AND state = 'running'",
        )
        .bind(i64::from(percent.min(100)))
        .bind(message)
        .bind(id)
        .bind(token)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 0 {
            return Err(Error::Fenced { job: id, token });
        }
        Ok(())
    }

    async fn complete_many(&self, done: &[(JobId, i64)]) -> Result<Vec<(JobId, i64)>, Error> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // The fencing check: only attempts holding the current token are
        // recorded; a zombie's late completion changes nothing. One
        // statement: the job rows and their attempt records change together.
        let recorded: Vec<i64> = sqlx::query_scalar(&format!(
            "WITH done AS (UPDATE fastlane_jobs j SET state = 'succeeded', lease_until = NULL, finished_at = $1 \
               FROM jsonb_to_recordset($2::jsonb) AS d(id BIGINT, token BIGINT) \
               WHERE j.id = d.id AND j.token = d.token AND j.state = 'running' \
               RETURNING j.id, j.attempt, j.worker, j.started_at) \
             {RECORD_ATTEMPTS} SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, \
             'succeeded', NULL FROM done {ON_ATTEMPT_CONFLICT} RETURNING job_id"
        ))
        .bind(now)
        .bind(done_rows(done))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(fenced_among(done, recorded))
    }

    /// The attempt failed. A `retryable` failure with attempts left goes to
    /// `retrying` with exponential backoff and jitter; otherwise the job is
    /// dead.
    async fn fail(&self, id: JobId, token: i64, error: &str, retryable: bool) -> Result<JobState, Error> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT attempt, max_attempts FROM fastlane_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        let (attempt, max) = row.ok_or(Error::NotFound(id))?;
        let (state, retry_at) = after_failure(attempt, max, retryable);
        self.finish(id, token, state, "failed", Some(error), retry_at).await?;
        Ok(state)
    }

    /// The running attempt saw its cancellation and stopped.
    async fn cancelled(&self, id: JobId, token: i64) -> Result<(), Error> {
        self.finish(id, token, JobState::Cancelled, "cancelled", None, None).await
    }

    /// Gives a job back without counting the attempt (a worker shutting
    /// down): it is available again at once, not after a lease expiry.
    async fn release(&self, id: JobId, token: i64) -> Result<(), Error> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let done = sqlx::query(
            "UPDATE fastlane_jobs SET state = 'available', attempt = attempt - 1, lease_until = NULL, run_at = $1 \
             WHERE id = $2 AND token = $3 AND state = 'running' RETURNING attempt",
        )
        .bind(now)
        .bind(id)
        .bind(token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let Some(row) = done else {
            return Err(Error::Fenced { job: id, token });
        };
        let attempt: i64 = row.get(0);
        // Schema version 1 wrote an attempt record at the start.
        sqlx::query(
            "DELETE FROM fastlane_attempts WHERE job_id = $1 AND attempt = $2 AND finished_at IS NULL",
        )
        .bind(id)
        .bind(attempt + 1)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    /// Cancels a job: a pending one at once; a running one is asked to stop
    /// (its worker sees it at its next heartbeat). Returns the state after.
    async fn cancel(&self, id: JobId) -> Result<JobState, Error> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM fastlane_jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let state: JobState = state.ok_or(Error::NotFound(id))?.parse()?;
        let after = match state {
            JobState::Scheduled | JobState::Available | JobState::Retrying => {
                sqlx::query("UPDATE fastlane_jobs SET state = 'cancelled', finished_at = $1 WHERE id = $2")
                    .bind(now_ms())
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                JobState::Cancelled
            }
            JobState::Running => {
                sqlx::query("UPDATE fastlane_jobs SET cancel_requested = 1 WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                JobState::Running
            }
            done => done,
        };
        tx.commit().await.map_err(classify)?;
        Ok(after)
    }

    /// A job with its attempts.
    async fn get(&self, id: JobId) -> Result<JobInfo, Error> {
        let row = sqlx::query(
            "SELECT id, name, queue, state, payload, priority, attempt, max_attempts, run_at, progress, \
             progress_message, last_error, worker, started_at FROM fastlane_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or(Error::NotFound(id))?;
        let mut attempts: Vec<Attempt> = sqlx::query(
            "SELECT attempt, worker, started_at, finished_at, outcome, error FROM fastlane_attempts \
             WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .into_iter()
        .map(|a| Attempt {
            attempt: u32::try_from(a.get::<i64, _>("attempt")).unwrap_or(0),
            worker: a.get("worker"),
            started_at_ms: a.get("started_at"),
            finished_at_ms: a.get("finished_at"),
            outcome: a.get("outcome"),
            error: a.get("error"),
        })
        .collect();
        let state: JobState = row.get::<String, _>("state").parse()?;
        push_running_attempt(
            &mut attempts,
            state,
            row.get("attempt"),
            row.get("worker"),
            row.get("started_at"),
        );
        let payload: String = row.get("payload");
        Ok(JobInfo {
            id: row.get("id"),
            name: row.get("name"),
            queue: row.get("queue"),
            state,
            payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
            priority: row.get("priority"),
            attempt: u32::try_from(row.get::<i64, _>("attempt")).unwrap_or(0),
            max_attempts: u32::try_from(row.get::<i64, _>("max_attempts")).unwrap_or(0),
            run_at_ms: row.get("run_at"),
            progress: row.get::<Option<i64>, _>("progress").map(|p| p.clamp(0, 100) as u8),
            progress_message: row.get("progress_message"),
            last_error: row.get("last_error"),
            attempts,
        })
    }

    /// Job counts by state. `scheduled` and `retrying` jobs whose time has
    /// come are counted as they are stored (they become `running` when
    /// claimed).
    async fn stats(&self) -> Result<Stats, Error> {
        let mut stats: Stats = JobState::ALL.into_iter().map(|s| (s, 0)).collect();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM fastlane_jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        for (state, count) in rows {
            stats.insert(state.parse()?, u64::try_from(count).unwrap_or(0));
        }
        Ok(stats)
    }

    async fn list(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobSummary>, Error> {
        let rows = sqlx::query(
            "SELECT id, name, queue, state, attempt, last_error FROM fastlane_jobs \
             WHERE ($1::TEXT IS NULL OR state = $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(state.map(JobState::as_str))
        .bind(state.map(JobState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|row| {
                let state: String = row.get("state");
                Ok(JobSummary {
                    id: row.get("id"),
                    name: row.get("name"),
                    queue: row.get("queue"),
                    state: state.parse()?,
                    attempt: u32::try_from(row.get::<i64, _>("attempt")).unwrap_or(0),
                    last_error: row.get("last_error"),
                })
            })
            .collect()
    }

    async fn retry(&self, id: JobId) -> Result<JobState, Error> {
        let done = sqlx::query(
            "UPDATE fastlane_jobs SET state = 'available', run_at = $1, finished_at = NULL, cancel_requested = 0, \
             max_attempts = CASE WHEN attempt >= max_attempts THEN attempt + 1 ELSE max_attempts END \
             WHERE id = $2 AND state IN ('dead', 'cancelled', 'retrying')",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 1 {
            return Ok(JobState::Available);
        }
        Ok(self.get(id).await?.state)
    }
}

/// Enqueues a job inside the application's own PostgreSQL transaction: the
/// job exists if and only if the transaction commits (and idle workers are
/// woken only then). The job tables must exist in the transaction's
/// database and `search_path`: open a [`PgStore`] on the same database (or
/// [`PgStore::from_pool`] on the application's pool) once at start-up.
///
/// # Examples
///
/// ```no_run
/// # async fn signup(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use fastlane_jobs::{enqueue_in_tx, NewJob};
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO users (email) VALUES ($1)").bind("ada@example.com").execute(&mut *tx).await?;
/// enqueue_in_tx(&mut tx, NewJob::new("welcome", "ada@example.com".into())).await?;
/// tx.commit().await?; // the user and the job, or neither
/// # Ok(())
/// # }
/// ```
pub async fn enqueue_in_tx(tx: &mut sqlx::PgConnection, job: NewJob) -> Result<JobId, Error> {
    let ids = enqueue_in(tx, vec![job]).await?;
    ids.first().copied().ok_or_else(|| Error::Invalid("the store returned no id".into()))
}

/// [`enqueue_in_tx`] for a batch, in one statement; ids in the batch's order.
pub async fn enqueue_many_in_tx(tx: &mut sqlx::PgConnection, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
    enqueue_in(tx, jobs).await
}

/// Enqueues `jobs` inside the caller's transaction.
pub(crate) async fn enqueue_in(tx: &mut sqlx::PgConnection, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let (rows, keys) = batch_rows(&jobs, now)?;
    if !keys.is_empty() {
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT unique_key FROM fastlane_jobs WHERE unique_key = ANY($1) \
             AND state IN ('scheduled','available','running','retrying') LIMIT 1",
        )
        .bind(&keys)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(key) = taken {
            return Err(Error::Duplicate(key));
        }
    }
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO fastlane_jobs (name, queue, payload, state, priority, run_at, max_attempts, timeout_ms, \
         unique_key, created_at) \
         SELECT r ->> 'name', r ->> 'queue', r ->> 'payload', r ->> 'state', (r ->> 'priority')::INTEGER, \
         (r ->> 'run_at')::BIGINT, (r ->> 'max_attempts')::BIGINT, (r ->> 'timeout_ms')::BIGINT, \
         r ->> 'unique_key', (r ->> 'created_at')::BIGINT \
         FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(r, n) ORDER BY n RETURNING id",
    )
    .bind(&rows)
    .fetch_all(&mut *tx)
    .await
    .map_err(|err| match &err {
        // Another transaction inserted the same key between our check and
        // our insert: the partial unique index has the last word.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Error::Duplicate(keys.join(", "))
        }
        _ => classify(err),
    })?;
    let mut queues: Vec<&str> = jobs.iter().map(|job| job.queue.as_str()).collect();
    queues.sort_unstable();
    queues.dedup();
    sqlx::query("SELECT pg_notify($1, q) FROM UNNEST($2::TEXT[]) AS q")
        .bind(CHANNEL)
        .bind(&queues)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    Ok(in_batch_order(ids))
}
