//! The PostgreSQL job store: shared by many processes and machines.
//!
//! `claim` locks its candidate row with `FOR UPDATE SKIP LOCKED`, so
//! concurrent workers never wait on each other's rows and never get the same
//! job. Times are stored as unix milliseconds, as in the SQLite store, so the
//! two behave identically.

mod schema;

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

use crate::job::{
    after_failure, now_ms, unix_ms, Attempt, Claimed, JobId, JobInfo, JobState, JobSummary, NewJob, Stats,
};
use crate::{Error, Store};

/// A job store in a PostgreSQL database (`postgres://...`); its tables are
/// created (and migrated) on first use, beside the application's own.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

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
        let attempt: i64 = row.get(0);
        sqlx::query(
            "UPDATE fastlane_attempts SET finished_at = $1, outcome = $2, error = $3 WHERE job_id = $4 AND attempt = $5",
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

impl Store for PgStore {
    /// Stores a job; returns its id.
    async fn enqueue(&self, job: NewJob) -> Result<JobId, Error> {
        job.validate()?;
        let now = now_ms();
        let run_at = job.run_at.map_or(now, unix_ms);
        let state = if run_at > now { JobState::Scheduled } else { JobState::Available };
        let payload =
            serde_json::to_string(&job.payload).map_err(|e| Error::Invalid(format!("`payload`: {e}")))?;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if let Some(key) = &job.unique_key {
            let taken: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM fastlane_jobs WHERE unique_key = $1 \
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
             unique_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
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
        .map_err(|err| match (&err, &job.unique_key) {
            // Another process inserted the same key between our check and
            // our insert: the partial unique index has the last word.
            (sqlx::Error::Database(db), Some(key)) if db.code().as_deref() == Some("23505") => {
                Error::Duplicate(key.clone())
            }
            _ => classify(err),
        })?;
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
        let mut tx = self.pool.begin().await.map_err(classify)?;
        loop {
            let row = sqlx::query(
                "SELECT id, state, attempt, max_attempts FROM fastlane_jobs WHERE queue = $1 AND \
                 ((state IN ('available','scheduled','retrying') AND run_at <= $2) OR \
                  (state = 'running' AND lease_until < $3)) \
                 ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
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
                    "UPDATE fastlane_attempts SET finished_at = $1, outcome = 'lease expired' \
                     WHERE job_id = $2 AND attempt = $3 AND finished_at IS NULL",
                )
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
                if attempt >= max_attempts {
                    sqlx::query(
                        "UPDATE fastlane_jobs SET state = 'dead', lease_until = NULL, finished_at = $1, \
                         last_error = 'lease expired on the last attempt' WHERE id = $2",
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
                 lease_until = $1, worker = $2, progress = NULL, progress_message = NULL WHERE id = $3 \
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
                "INSERT INTO fastlane_attempts (job_id, attempt, worker, started_at) VALUES ($1, $2, $3, $4)",
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

    /// The attempt succeeded.
    async fn complete(&self, id: JobId, token: i64) -> Result<(), Error> {
        self.finish(id, token, JobState::Succeeded, "succeeded", None, None).await
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
        sqlx::query("DELETE FROM fastlane_attempts WHERE job_id = $1 AND attempt = $2")
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
             progress_message, last_error FROM fastlane_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or(Error::NotFound(id))?;
        let attempts = sqlx::query(
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
