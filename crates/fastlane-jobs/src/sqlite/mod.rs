//! The SQLite job store: a file, no server, one writer.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: it takes SQLite's
//! write lock up front, so two processes sharing the file queue for it (busy
//! timeout) instead of failing when a read transaction tries to upgrade.
//! WAL mode lets readers (stats, `jobs show`) run beside the writer.

mod schema;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;

use crate::job::{
    after_failure, batch_rows, claimed_in_order, done_rows, fenced_among, in_batch_order, now_ms,
    push_running_attempt, Attempt, Claimed, ClaimedRow, JobId, JobInfo, JobState, JobSummary, NewJob, Stats,
};
use crate::{Error, Store};

/// A job store in a SQLite file (`sqlite://path/to/jobs.db`), created on
/// first use.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Wakes this process's idle workers on enqueue. SQLite has no way to
    /// tell other processes; their workers poll.
    wake: Arc<Notify>,
}

/// Maps SQLite's "busy"/"locked" errors to [`Error::Locked`].
fn classify(err: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &err {
        let message = db.message().to_owned();
        if message.contains("database is locked") || message.contains("busy") {
            return Error::Locked(message);
        }
        if message.contains("file is not a database") {
            return Error::NotAJobStore(format!("not a SQLite database: {message}"));
        }
    }
    Error::Database(err)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `url` and brings its schema
    /// up to date.
    pub async fn open(url: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
        if !url.starts_with("sqlite:") {
            return Err(invalid("expected sqlite://path/to/jobs.db"));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| invalid(&e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL survives process crashes; a power cut may lose the
            // last transactions but never corrupts the file.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // One connection: SQLite has one writer anyway, and queueing for the
        // connection inside the process is far cheaper than SQLite's busy
        // handler, which sleeps in steps of up to 100 ms when connections of
        // one process contend for the write lock.
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.map_err(|e| {
            match classify(e) {
                Error::Database(e) => Error::NotAJobStore(format!("cannot open {url}: {e}")),
                other => other,
            }
        })?;
        schema::migrate(&pool).await?;
        Ok(Self { pool, wake: Arc::default() })
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        // The fencing check: only the attempt holding the current token may
        // write; a zombie's late completion changes nothing.
        let row = sqlx::query(
            "UPDATE fastlane_jobs SET state = ?, lease_until = NULL, last_error = COALESCE(?, last_error), \
             run_at = COALESCE(?, run_at), finished_at = CASE WHEN ? THEN NULL ELSE ? END \
             WHERE id = ? AND token = ? AND state = 'running' RETURNING attempt",
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
        record_attempts(&mut tx, &[id], now, outcome, error).await?;
        tx.commit().await.map_err(classify)?;
        Ok(())
    }
}

/// Writes the attempt records of jobs whose attempt has just ended, from
/// their rows (attempt number, worker, start). An attempt record is written
/// once, when the attempt ends: a running attempt is read off its job row, so
/// that claiming a job is one write, not two.
async fn record_attempts(
    tx: &mut sqlx::SqliteConnection,
    ids: &[JobId],
    now: i64,
    outcome: &str,
    error: Option<&str>,
) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids = serde_json::to_string(ids).map_err(|e| Error::Invalid(e.to_string()))?;
    // The upsert also closes attempt records that schema version 1 wrote when
    // the attempt started.
    sqlx::query(
        "INSERT INTO fastlane_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error) \
         SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, ?1), ?1, ?2, ?3 FROM fastlane_jobs \
         WHERE id IN (SELECT value FROM json_each(?4)) \
         ON CONFLICT (job_id, attempt) DO UPDATE SET finished_at = excluded.finished_at, \
         outcome = excluded.outcome, error = excluded.error",
    )
    .bind(now)
    .bind(outcome)
    .bind(error)
    .bind(ids)
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    Ok(())
}

impl Store for SqliteStore {
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let (rows, keys) = batch_rows(&jobs, now)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        if !keys.is_empty() {
            let keys = serde_json::to_string(&keys).map_err(|e| Error::Invalid(e.to_string()))?;
            let taken: Option<String> = sqlx::query_scalar(
                "SELECT unique_key FROM fastlane_jobs WHERE unique_key IN (SELECT value FROM json_each(?)) \
                 AND state IN ('scheduled','available','running','retrying') LIMIT 1",
            )
            .bind(keys)
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
             SELECT value ->> 'name', value ->> 'queue', value ->> 'payload', value ->> 'state', \
             value ->> 'priority', value ->> 'run_at', value ->> 'max_attempts', value ->> 'timeout_ms', \
             value ->> 'unique_key', value ->> 'created_at' FROM json_each(?) ORDER BY key RETURNING id",
        )
        .bind(rows)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.wake.notify_waiters();
        Ok(in_batch_order(ids))
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        // Jobs whose worker is gone: their attempt ends, and they are due
        // again (or dead, if that was the last attempt).
        let expired: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM fastlane_jobs WHERE queue = ? AND state = 'running' AND lease_until < ?",
        )
        .bind(queue)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        if !expired.is_empty() {
            record_attempts(&mut tx, &expired, now, "lease expired", None).await?;
            sqlx::query(
                "UPDATE fastlane_jobs SET lease_until = NULL, \
                 state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
                 finished_at = CASE WHEN attempt >= max_attempts THEN ?1 ELSE finished_at END, \
                 last_error = CASE WHEN attempt >= max_attempts THEN 'lease expired on the last attempt' \
                 ELSE last_error END \
                 WHERE queue = ?2 AND state = 'running' AND lease_until < ?1",
            )
            .bind(now)
            .bind(queue)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "UPDATE fastlane_jobs SET state = 'running', attempt = attempt + 1, token = token + 1, \
             lease_until = ?1, worker = ?2, started_at = ?3, owner = ?6, progress = NULL, progress_message = NULL \
             WHERE id IN (SELECT id FROM fastlane_jobs WHERE queue = ?4 \
               AND state IN ('scheduled','available','retrying') AND run_at <= ?3 \
               ORDER BY priority DESC, run_at, id LIMIT ?5) \
             RETURNING id, name, payload, attempt, max_attempts, token, timeout_ms, priority, run_at",
        )
        .bind(lease_until)
        .bind(worker)
        .bind(now)
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(crate::owner::me())
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(claimed_in_order(rows))
    }

    fn wakeups(&self) -> Option<Arc<Notify>> {
        Some(self.wake.clone())
    }

    async fn expire_dead_owners(&self) -> Result<u64, Error> {
        let Some(prefix) = crate::owner::host_prefix() else { return Ok(0) };
        let owners: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT owner FROM fastlane_jobs WHERE state = 'running' \
             AND substr(owner, 1, length(?1)) = ?1",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut expired = 0;
        for owner in owners.iter().filter(|owner| crate::owner::is_dead_here(owner)) {
            let done =
                sqlx::query("UPDATE fastlane_jobs SET lease_until = 0 WHERE state = 'running' AND owner = ?")
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
            "UPDATE fastlane_jobs SET lease_until = ? WHERE id = ? AND token = ? AND state = 'running' \
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
            "UPDATE fastlane_jobs SET progress = ?, progress_message = ? WHERE id = ? AND token = ? AND state = 'running'",
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        // The fencing check: only attempts holding the current token are
        // recorded; a zombie's late completion changes nothing.
        let recorded: Vec<i64> = sqlx::query_scalar(
            "UPDATE fastlane_jobs SET state = 'succeeded', lease_until = NULL, finished_at = ?1 \
             WHERE state = 'running' AND (id, token) IN \
             (SELECT value ->> 'id', value ->> 'token' FROM json_each(?2)) RETURNING id",
        )
        .bind(now)
        .bind(done_rows(done))
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        record_attempts(&mut tx, &recorded, now, "succeeded", None).await?;
        tx.commit().await.map_err(classify)?;
        Ok(fenced_among(done, recorded))
    }

    /// The attempt failed. A `retryable` failure with attempts left goes to
    /// `retrying` with exponential backoff and jitter; otherwise the job is
    /// dead.
    async fn fail(&self, id: JobId, token: i64, error: &str, retryable: bool) -> Result<JobState, Error> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT attempt, max_attempts FROM fastlane_jobs WHERE id = ?")
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let done = sqlx::query(
            "UPDATE fastlane_jobs SET state = 'available', attempt = attempt - 1, lease_until = NULL, run_at = ? \
             WHERE id = ? AND token = ? AND state = 'running' RETURNING attempt",
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
        sqlx::query("DELETE FROM fastlane_attempts WHERE job_id = ? AND attempt = ? AND finished_at IS NULL")
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM fastlane_jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let state: JobState = state.ok_or(Error::NotFound(id))?.parse()?;
        let after = match state {
            JobState::Scheduled | JobState::Available | JobState::Retrying => {
                sqlx::query("UPDATE fastlane_jobs SET state = 'cancelled', finished_at = ? WHERE id = ?")
                    .bind(now_ms())
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                JobState::Cancelled
            }
            JobState::Running => {
                sqlx::query("UPDATE fastlane_jobs SET cancel_requested = 1 WHERE id = ?")
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
             progress_message, last_error, worker, started_at FROM fastlane_jobs WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or(Error::NotFound(id))?;
        let mut attempts: Vec<Attempt> = sqlx::query(
            "SELECT attempt, worker, started_at, finished_at, outcome, error FROM fastlane_attempts \
             WHERE job_id = ? ORDER BY attempt",
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
             WHERE (? IS NULL OR state = ?) ORDER BY id DESC LIMIT ?",
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
            "UPDATE fastlane_jobs SET state = 'available', run_at = ?, finished_at = NULL, cancel_requested = 0, \
             max_attempts = CASE WHEN attempt >= max_attempts THEN attempt + 1 ELSE max_attempts END \
             WHERE id = ? AND state IN ('dead', 'cancelled', 'retrying')",
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
