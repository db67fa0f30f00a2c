//! The SQLite job store: a file, no server, one writer.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: it takes SQLite's
//! write lock up front, so two processes sharing the file queue for it (busy
//! timeout) instead of failing when a read transaction tries to upgrade.
//! WAL mode lets readers (stats, `jobs show`) run beside the writer.

mod schema;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::job::{
    after_failure, now_ms, unix_ms, Attempt, Claimed, JobId, JobInfo, JobState, JobSummary, NewJob, Stats,
};
use crate::{Error, Store};

/// A job store in a SQLite file (`sqlite://path/to/jobs.db`), created on
/// first use.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
        Ok(Self { pool })
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
        let attempt: i64 = row.get(0);
        sqlx::query(
            "UPDATE fastlane_attempts SET finished_at = ?, outcome = ?, error = ? WHERE job_id = ? AND attempt = ?",
        )
        .bind(now)
        .bind(outcome)
        .bind(error)
        .bind(id)
        .bind(attempt)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(())
    }
}

impl Store for SqliteStore {
    /// Stores a job; returns its id.
    async fn enqueue(&self, job: NewJob) -> Result<JobId, Error> {
        job.validate()?;
        let now = now_ms();
        let run_at = job.run_at.map_or(now, unix_ms);
        let state = if run_at > now { JobState::Scheduled } else { JobState::Available };
        let payload =
            serde_json::to_string(&job.payload).map_err(|e| Error::Invalid(format!("`payload`: {e}")))?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        if let Some(key) = &job.unique_key {
            let taken: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM fastlane_jobs WHERE unique_key = ? \
                 AND state IN ('scheduled','available','running','retrying') LIMIT 1",
            )
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
            if taken.is_some() {
                return Err(Error::Duplicate(key.clone()));
            }
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO fastlane_jobs (name, queue, payload, state, priority, run_at, max_attempts, timeout_ms, \
             unique_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&job.name)
        .bind(&job.queue)
        .bind(payload)
        .bind(state.as_str())
        .bind(job.priority)
        .bind(run_at)
        .bind(i64::from(job.max_attempts))
        .bind(job.timeout.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)))
        .bind(&job.unique_key)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(id)
    }

    /// Hands the next due job of `queue` to `worker` under a lease of
    /// `lease`: the highest priority first, then the earliest. A running job
    /// whose lease has expired (its worker died) is due again: that is how a
    /// dead worker's jobs are recovered, within one lease period.
    async fn claim(&self, queue: &str, worker: &str, lease: Duration) -> Result<Option<Claimed>, Error> {
        let now = now_ms();
        let lease_until = now + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        loop {
            let row = sqlx::query(
                "SELECT id, state, attempt, max_attempts FROM fastlane_jobs WHERE queue = ? AND \
                 ((state IN ('available','scheduled','retrying') AND run_at <= ?) OR \
                  (state = 'running' AND lease_until < ?)) \
                 ORDER BY priority DESC, run_at, id LIMIT 1",
            )
            .bind(queue)
            .bind(now)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
            let Some(row) = row else {
                tx.commit().await.map_err(classify)?;
                return Ok(None);
            };
            let id: i64 = row.get("id");
            let state: String = row.get("state");
            let attempt: i64 = row.get("attempt");
            let max_attempts: i64 = row.get("max_attempts");
            if state == "running" {
                // The worker that held it is gone: close its attempt.
                sqlx::query(
                    "UPDATE fastlane_attempts SET finished_at = ?, outcome = 'lease expired' \
                     WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
                )
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
                if attempt >= max_attempts {
                    sqlx::query(
                        "UPDATE fastlane_jobs SET state = 'dead', lease_until = NULL, finished_at = ?, \
                         last_error = 'lease expired on the last attempt' WHERE id = ?",
                    )
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                    continue;
                }
            }
            let claimed = sqlx::query(
                "UPDATE fastlane_jobs SET state = 'running', attempt = attempt + 1, token = token + 1, \
                 lease_until = ?, worker = ?, progress = NULL, progress_message = NULL WHERE id = ? \
                 RETURNING name, payload, attempt, max_attempts, token, timeout_ms",
            )
            .bind(lease_until)
            .bind(worker)
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
            let attempt: i64 = claimed.get("attempt");
            sqlx::query(
                "INSERT INTO fastlane_attempts (job_id, attempt, worker, started_at) VALUES (?, ?, ?, ?)",
            )
            .bind(id)
            .bind(attempt)
            .bind(worker)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            let payload: String = claimed.get("payload");
            return Ok(Some(Claimed {
                id,
                name: claimed.get("name"),
                payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                max_attempts: u32::try_from(claimed.get::<i64, _>("max_attempts")).unwrap_or(u32::MAX),
                token: claimed.get("token"),
                timeout: claimed
                    .get::<Option<i64>, _>("timeout_ms")
                    .map(|ms| Duration::from_millis(ms as u64)),
            }));
        }
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

    /// The attempt succeeded.
    async fn complete(&self, id: JobId, token: i64) -> Result<(), Error> {
        self.finish(id, token, JobState::Succeeded, "succeeded", None, None).await
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
        sqlx::query("DELETE FROM fastlane_attempts WHERE job_id = ? AND attempt = ?")
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
             progress_message, last_error FROM fastlane_jobs WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or(Error::NotFound(id))?;
        let attempts = sqlx::query(
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
        let state: String = row.get("state");
        let payload: String = row.get("payload");
        Ok(JobInfo {
            id: row.get("id"),
            name: row.get("name"),
            queue: row.get("queue"),
            state: state.parse()?,
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
