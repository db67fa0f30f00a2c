//! The store operations whose SQL is the same on SQLite and PostgreSQL,
//! written once.
//!
//! [`store_methods!`] expands, inside each backend's `impl Store`, into the
//! one-job operations (heartbeat, progress, fail, cancel, get, list, ...).
//! Their SQL is the same text on both: numbered placeholders (`$1, $2, ...`,
//! which sqlx binds by number on SQLite as PostgreSQL does) and standard SQL
//! (`CAST`, `COALESCE`, `ON CONFLICT ... excluded`). Each backend provides a
//! `classify` function for its errors and an inherent `write_tx` that begins
//! a write transaction its way. The batch operations (enqueue, claim,
//! complete, the rescue of expired leases) differ per backend and stay in
//! their modules.

/// The statement that writes attempt records, around the `SELECT` of their
/// values (job id, attempt, worker, start, end, outcome, error), in the SQL
/// both backends speak. An attempt record is written once, when the attempt
/// ends other than in success: a running attempt, and the one that
/// succeeded, are read off the job's row (`RowAttempt`), so that claiming a
/// job is one write and completing it is one more. The upsert also closes
/// the records that schema version 1 wrote when an attempt started.
macro_rules! record_attempts_sql {
    ($select:literal) => {
        concat!(
            "INSERT INTO fastlane_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error) ",
            $select,
            " ON CONFLICT (job_id, attempt) DO UPDATE SET finished_at = excluded.finished_at, \
             outcome = excluded.outcome, error = excluded.error"
        )
    };
}

/// The insert of a batch of jobs (the JSON array of `NewRow`s, bound as `$1`)
/// in one statement, returning their ids, with the backend's `field!(NAME,
/// TYPE)` (one key of a row) and `job_rows!()` (the rows, in the batch's
/// order) in scope. `planned`: a workflow's batch, whose rows also carry how
/// many jobs each waits for and why one is cancelled at once; `plain`: any
/// other, which leaves those columns to their defaults (a little less to
/// parse per job on the hot path).
macro_rules! insert_jobs_sql {
    (plain) => {
        insert_jobs_sql!(@ ""; "")
    };
    (planned) => {
        insert_jobs_sql!(@ ", deps_left, last_error, finished_at";
            ", COALESCE(", field!("deps_left", "BIGINT"), ", 0), ", field!("last_error", "TEXT"), ", ",
            field!("finished_at", "BIGINT"))
    };
    (@ $columns:literal; $($values:tt)*) => {
        concat!(
            "INSERT INTO fastlane_jobs (name, queue, payload, state, priority, run_at, max_attempts, timeout_ms, \
             unique_key, request_id, created_at",
            $columns,
            ") SELECT ",
            field!("name", "TEXT"), ", ", field!("queue", "TEXT"), ", ", field!("payload", "TEXT"), ", ",
            field!("state", "TEXT"), ", ", field!("priority", "INTEGER"), ", ", field!("run_at", "BIGINT"), ", ",
            field!("max_attempts", "BIGINT"), ", ", field!("timeout_ms", "BIGINT"), ", ",
            field!("unique_key", "TEXT"), ", ", field!("request_id", "TEXT"), ", ", field!("created_at", "BIGINT"),
            $($values)*,
            job_rows!(),
            " RETURNING id"
        )
    };
}

/// The one-job store operations, for the backend whose `classify`, `write_tx`
/// and `id_among!` (`id` is one of a JSON array's ids) are in scope.
macro_rules! store_methods {
    () => {
        /// Extends the lease of a running attempt; returns whether the job
        /// has been asked to cancel. Fails with [`Error::Fenced`] if the
        /// attempt no longer owns the job.
        async fn heartbeat(&self, lease: Lease, lease_for: Duration) -> Result<bool, Error> {
            let Lease { job: id, token } = lease;
            let lease_until = ms_after(now_ms(), lease_for);
            let cancel: Option<i64> = sqlx::query_scalar(
                "UPDATE fastlane_jobs SET lease_until = $1 WHERE id = $2 AND token = $3 AND state = 'running' \
                 RETURNING cancel_requested"
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
        async fn progress(&self, lease: Lease, percent: u8, message: &str) -> Result<(), Error> {
            let Lease { job: id, token } = lease;
            let done = sqlx::query(
                "UPDATE fastlane_jobs SET progress = $1, progress_message = $2 \
                 WHERE id = $3 AND token = $4 AND state = 'running'"
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

        /// The attempt failed. A `retryable` failure with attempts left goes
        /// to `retrying` with exponential backoff and jitter; otherwise the
        /// job is dead.
        async fn fail(&self, lease: Lease, error: &str, retryable: bool) -> Result<JobState, Error> {
            let Lease { job: id, token } = lease;
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
        async fn cancelled(&self, lease: Lease) -> Result<(), Error> {
            let Lease { job: id, token } = lease;
            self.finish(id, token, JobState::Cancelled, "cancelled", None, None).await
        }

        /// Gives a job back without counting the attempt (a worker shutting
        /// down): it is available again at once, not after a lease expiry.
        async fn release(&self, lease: Lease) -> Result<(), Error> {
            let Lease { job: id, token } = lease;
            let mut tx = self.write_tx().await?;
            let attempt: Option<i64> = sqlx::query_scalar(
                "UPDATE fastlane_jobs SET state = 'available', attempt = attempt - 1, lease_until = NULL, \
                 progress = NULL, progress_message = NULL, run_at = $1 \
                 WHERE id = $2 AND token = $3 AND state = 'running' RETURNING attempt"
            )
            .bind(now_ms())
            .bind(id)
            .bind(token)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
            let Some(attempt) = attempt else {
                return Err(Error::Fenced { job: id, token });
            };
            // Schema version 1 wrote an attempt record at the start.
            sqlx::query(
                "DELETE FROM fastlane_attempts WHERE job_id = $1 AND attempt = $2 AND finished_at IS NULL"
            )
            .bind(id)
            .bind(attempt + 1)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            Ok(())
        }

        /// Cancels a job: a pending one at once; a running one is asked to
        /// stop (its worker tells the handler within about a second). Returns the state
        /// after.
        async fn cancel(&self, id: JobId) -> Result<JobState, Error> {
            let mut tx = self.write_tx().await?;
            let state: Option<String> = sqlx::query_scalar("SELECT state FROM fastlane_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            let state: JobState = state.ok_or(Error::NotFound(id))?.parse()?;
            let after = match state {
                JobState::Waiting | JobState::Scheduled | JobState::Available | JobState::Retrying => {
                    let now = now_ms();
                    let dependents: Option<String> = sqlx::query_scalar(
                        "UPDATE fastlane_jobs SET state = 'cancelled', finished_at = $1 WHERE id = $2 \
                         RETURNING dependents"
                    )
                    .bind(now)
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(classify)?;
                    // Nothing waits for a job that cannot succeed.
                    cancel_dependents(&mut tx, id, "cancelled", dependents, now).await?;
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
                 progress_message, last_error, worker, started_at, finished_at, request_id, unique_key, result, \
                 depends_on, dependents, deps_left FROM fastlane_jobs WHERE id = $1"
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .ok_or(Error::NotFound(id))?;
            let mut attempts: Vec<Attempt> = sqlx::query(
                "SELECT attempt, worker, started_at, finished_at, outcome, error FROM fastlane_attempts \
                 WHERE job_id = $1 ORDER BY attempt"
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?
            .into_iter()
            .map(|a| Attempt {
                attempt: u32::try_from(a.get::<i64, _>("attempt")).unwrap_or(0),
                consumer: a.get("worker"),
                started_at_ms: a.get("started_at"),
                finished_at_ms: a.get("finished_at"),
                outcome: a.get("outcome"),
                error: a.get("error"),
            })
            .collect();
            let state: JobState = row.get::<String, _>("state").parse()?;
            crate::job::RowAttempt {
                state,
                attempt: row.get("attempt"),
                consumer: row.get("worker"),
                started_at_ms: row.get("started_at"),
                finished_at_ms: row.get("finished_at"),
            }
            .add_to(&mut attempts);
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
                request_id: row.get("request_id"),
                unique_key: row.get("unique_key"),
                result: row
                    .get::<Option<String>, _>("result")
                    .map(|text| serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))),
                depends_on: crate::job::id_list(row.get::<Option<String>, _>("depends_on").as_deref()),
                waiting_for: u32::try_from(row.get::<i64, _>("deps_left")).unwrap_or(0),
                dependents: crate::job::id_list(row.get::<Option<String>, _>("dependents").as_deref()),
                attempts,
            })
        }

        async fn results(&self, ids: &[JobId]) -> Result<Vec<(JobId, Option<serde_json::Value>)>, Error> {
            let rows: Vec<(i64, Option<String>)> = sqlx::query_as(concat!(
                "SELECT id, result FROM fastlane_jobs WHERE id", id_among!("$1")
            ))
            .bind(crate::workflow::id_array(ids))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            let mut found: std::collections::HashMap<i64, Option<String>> = rows.into_iter().collect();
            Ok(ids
                .iter()
                .filter_map(|id| {
                    let text = found.remove(id)?;
                    let value = text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)));
                    Some((*id, value))
                })
                .collect())
        }

        /// Job counts by state. `scheduled` and `retrying` jobs whose time
        /// has come are counted as they are stored (they become `running`
        /// when claimed).
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
                "SELECT id, name, queue, state, attempt, last_error, progress, progress_message, finished_at \
                 FROM fastlane_jobs \
                 WHERE (CAST($1 AS TEXT) IS NULL OR state = $2) ORDER BY id DESC LIMIT $3"
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
                        progress: row.get::<Option<i64>, _>("progress").map(|p| p.clamp(0, 100) as u8),
                        progress_message: row.get("progress_message"),
                        finished_at_ms: row.get("finished_at"),
                    })
                })
                .collect()
        }

        async fn queue_stats(&self) -> Result<Vec<(String, Stats)>, Error> {
            let rows: Vec<(String, String, i64)> =
                sqlx::query_as("SELECT queue, state, COUNT(*) FROM fastlane_jobs GROUP BY queue, state ORDER BY queue")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(classify)?;
            let mut queues: Vec<(String, Stats)> = Vec::new();
            for (queue, state, count) in rows {
                if queues.last().is_none_or(|(q, _)| *q != queue) {
                    queues.push((queue.clone(), JobState::ALL.into_iter().map(|s| (s, 0)).collect()));
                }
                if let Some((_, stats)) = queues.last_mut() {
                    stats.insert(state.parse()?, u64::try_from(count).unwrap_or(0));
                }
            }
            Ok(queues)
        }

        async fn dead_by_name(&self) -> Result<Vec<(String, u64)>, Error> {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT name, COUNT(*) FROM fastlane_jobs WHERE state = 'dead' GROUP BY name ORDER BY name"
            )
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            Ok(rows.into_iter().map(|(name, n)| (name, u64::try_from(n).unwrap_or(0))).collect())
        }

        async fn retry_dead(&self, name: Option<&str>, limit: u32) -> Result<u64, Error> {
            let mut tx = self.write_tx().await?;
            let done = sqlx::query(
                "UPDATE fastlane_jobs SET state = 'available', run_at = $1, finished_at = NULL, \
                 cancel_requested = 0, \
                 max_attempts = CASE WHEN attempt >= max_attempts THEN attempt + 1 ELSE max_attempts END \
                 WHERE id IN (SELECT id FROM fastlane_jobs WHERE state = 'dead' \
                 AND ($2 IS NULL OR name = $3) ORDER BY finished_at, id LIMIT $4)"
            )
            .bind(now_ms())
            .bind(name)
            .bind(name)
            .bind(i64::from(limit.max(1)))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            Ok(done.rows_affected())
        }

        async fn retry(&self, id: JobId) -> Result<JobState, Error> {
            let mut tx = self.write_tx().await?;
            let row: Option<(String, Option<String>)> =
                sqlx::query_as("SELECT state, depends_on FROM fastlane_jobs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(classify)?;
            let (state, depends_on) = row.ok_or(Error::NotFound(id))?;
            let state: JobState = state.parse()?;
            if !matches!(state, JobState::Dead | JobState::Cancelled | JobState::Retrying) {
                return Ok(state);
            }
            // A job of a workflow cancelled before it ran waits again for
            // what it waits for, if that can still succeed.
            let deps = crate::job::id_list(depends_on.as_deref());
            let states = dependency_states(&mut tx, &deps).await?;
            let mut left = 0i64;
            for dep in &deps {
                match states.get(dep) {
                    Some(JobState::Succeeded) => {}
                    Some(failed @ (JobState::Dead | JobState::Cancelled)) => {
                        return Err(Error::Invalid(format!(
                            "job {id} waits for job {dep}, which ended {failed}: retry that one first"
                        )))
                    }
                    Some(_) => left += 1,
                    None => {
                        return Err(Error::Invalid(format!(
                            "job {id} waits for job {dep}, which no longer exists: enqueue it again"
                        )))
                    }
                }
            }
            let after = if left > 0 { JobState::Waiting } else { JobState::Available };
            sqlx::query(
                "UPDATE fastlane_jobs SET state = $1, deps_left = $2, run_at = $3, finished_at = NULL, \
                 cancel_requested = 0, \
                 max_attempts = CASE WHEN attempt >= max_attempts THEN attempt + 1 ELSE max_attempts END \
                 WHERE id = $4"
            )
            .bind(after.as_str())
            .bind(left)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            Ok(after)
        }

        async fn expire_dead_owners(&self) -> Result<u64, Error> {
            let Some(prefix) = crate::owner::host_prefix() else { return Ok(0) };
            let owners: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT owner FROM fastlane_jobs WHERE state = 'running' \
                 AND substr(owner, 1, length($1)) = $2"
            )
            .bind(&prefix)
            .bind(&prefix)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            let mut expired = 0;
            for owner in owners.iter().filter(|owner| crate::owner::is_dead_here(owner)) {
                let done =
                    sqlx::query("UPDATE fastlane_jobs SET lease_until = 0 WHERE state = 'running' AND owner = $1")
                        .bind(owner)
                        .execute(&self.pool)
                        .await
                        .map_err(classify)?;
                expired += done.rows_affected();
            }
            Ok(expired)
        }
    };
}

/// `finish`: ends a running attempt (fenced by its token) with `state`, and
/// writes its attempt record, in one transaction. An inherent method of each
/// store, used by `fail`, `cancelled` and the backends' own code.
macro_rules! finish_method {
    () => {
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
            let mut tx = self.write_tx().await?;
            // The fencing check: only the attempt holding the current token
            // may write; a zombie's late completion changes nothing.
            let ended: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE fastlane_jobs SET state = $1, lease_until = NULL, \
                 last_error = COALESCE(CAST($2 AS TEXT), last_error), \
                 run_at = COALESCE(CAST($3 AS BIGINT), run_at), \
                 finished_at = CASE WHEN $4 THEN NULL ELSE CAST($5 AS BIGINT) END \
                 WHERE id = $6 AND token = $7 AND state = 'running' RETURNING dependents"
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
            let Some(dependents) = ended else {
                return Err(Error::Fenced { job: id, token });
            };
            if matches!(state, JobState::Dead | JobState::Cancelled) {
                // Its waiters go with it, in this transaction.
                cancel_dependents(&mut tx, id, state.as_str(), dependents, now).await?;
            }
            sqlx::query(crate::common::record_attempts_sql!(
                "SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $2, $3, $4 FROM fastlane_jobs \
                 WHERE id = $5"
            ))
            .bind(now)
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
    };
}

pub(crate) use {finish_method, insert_jobs_sql, record_attempts_sql, store_methods};
