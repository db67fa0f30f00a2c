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

use crate::common::{finish_method, record_attempts_sql, store_methods};
use crate::job::{
    after_failure, batch_rows, claimed_in_order, done_rows, fenced_among, in_batch_order, ms_after, now_ms,
    push_running_attempt, Attempt, Claimed, ClaimedRow, Done, JobId, JobInfo, JobState, JobSummary, Lease,
    NewJob, Stats,
};
use crate::retention::retention_methods;
use crate::scheduler::schedule_methods;
use crate::{Error, Store};

/// A pruning batch skips rows another consumer's pruner holds, so that
/// pruners on many hosts share the work instead of queueing for the same rows.
macro_rules! skip_locked {
    () => {
        " FOR UPDATE SKIP LOCKED"
    };
}

/// The store's size: its three tables with their indexes and TOAST.
const STORE_BYTES: &str =
    "SELECT CAST(pg_total_relation_size('fastlane_jobs') + pg_total_relation_size('fastlane_attempts') \
     + pg_total_relation_size('fastlane_schedules') AS BIGINT)";

/// A schedule's row is locked while a scheduler looks at it, so that a
/// second one waits and then sees the tick taken.
macro_rules! lock_row {
    () => {
        " FOR UPDATE"
    };
}

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

/// The channel on which enqueues wake idle workers; the payload is the queue.
pub(crate) const CHANNEL: &str = "fastlane_jobs";

fn classify(err: sqlx::Error) -> Error {
    Error::Database(err)
}

/// PostgreSQL numbers its placeholders (`$1, $2, ...`).
impl PgStore {
    async fn write_tx(&self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, Error> {
        self.pool.begin().await.map_err(classify)
    }

    finish_method!();

    /// Jobs were committed: this process's idle workers wake at once
    /// (`enqueue_in`'s NOTIFY wakes every process's, a moment later).
    fn enqueued(&self) {
        self.wake.notify.notify_waiters();
    }

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
}

impl Store for PgStore {
    store_methods!();
    schedule_methods!();
    retention_methods!();

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let ids = enqueue_in(&mut tx, jobs).await?;
        tx.commit().await.map_err(classify)?;
        Ok(ids)
    }

    /// Hands the next due jobs of `queue` to `consumer` under a lease of
    /// `lease`: the highest priority first, then the earliest. A running job
    /// whose lease has expired (its worker died) is due again: that is how a
    /// dead worker's jobs are recovered, within one lease period.
    async fn claim_many(
        &self,
        queue: &str,
        consumer: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claimed>, Error> {
        let now = now_ms();
        let lease_until = ms_after(now, lease);
        // Jobs whose worker is gone: their attempt ends, and they are due
        // again (or dead, if that was the last attempt). One statement, no
        // transaction: each statement is atomic, and SKIP LOCKED keeps
        // workers that rescue at the same time off each other's rows.
        sqlx::query(concat!(
            "WITH expired AS (UPDATE fastlane_jobs SET lease_until = NULL, \
               state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
               finished_at = CASE WHEN attempt >= max_attempts THEN $1 ELSE finished_at END, \
               last_error = CASE WHEN attempt >= max_attempts THEN 'lease expired on the last attempt' \
               ELSE last_error END \
             WHERE id IN (SELECT id FROM fastlane_jobs WHERE queue = $2 AND state = 'running' \
               AND lease_until < $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, attempt, worker, started_at) ",
            record_attempts_sql!(
                "SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, 'lease expired', NULL \
                 FROM expired"
            )
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
             RETURNING j.id, j.name, j.payload, j.attempt, j.max_attempts, j.token, j.timeout_ms, j.priority::BIGINT, j.run_at, \
             j.request_id",
        )
        .bind(lease_until)
        .bind(consumer)
        .bind(now)
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(crate::owner::me())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(claimed_in_order(rows))
    }

    async fn cancel_requested(&self, ids: &[JobId]) -> Result<Vec<JobId>, Error> {
        sqlx::query_scalar(
            "SELECT id FROM fastlane_jobs WHERE id = ANY($1) AND state = 'running' AND cancel_requested <> 0",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)
    }

    fn wakeups(&self) -> Option<Arc<Notify>> {
        if !self.wake.listening.swap(true, Ordering::AcqRel) {
            tokio::spawn(listen(self.pool.clone(), Arc::downgrade(&self.wake.notify)));
        }
        Some(self.wake.notify.clone())
    }

    async fn complete_many(&self, done: &[Done]) -> Result<Vec<Lease>, Error> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // The fencing check: only attempts holding the current token are
        // recorded; a zombie's late completion changes nothing. One
        // statement: the job rows and their attempt records change together.
        let recorded: Vec<i64> = sqlx::query_scalar(concat!(
            "WITH done AS (UPDATE fastlane_jobs j SET state = 'succeeded', lease_until = NULL, finished_at = $1, \
               result = d.result \
               FROM jsonb_to_recordset($2::jsonb) AS d(id BIGINT, token BIGINT, result TEXT) \
               WHERE j.id = d.id AND j.token = d.token AND j.state = 'running' \
               RETURNING j.id, j.attempt, j.worker, j.started_at) ",
            record_attempts_sql!(
                "SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, 'succeeded', NULL \
                 FROM done"
            ),
            " RETURNING job_id"
        ))
        .bind(now)
        .bind(done_rows(done))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(fenced_among(done, recorded))
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
         unique_key, request_id, created_at) \
         SELECT r ->> 'name', r ->> 'queue', r ->> 'payload', r ->> 'state', (r ->> 'priority')::INTEGER, \
         (r ->> 'run_at')::BIGINT, (r ->> 'max_attempts')::BIGINT, (r ->> 'timeout_ms')::BIGINT, \
         r ->> 'unique_key', r ->> 'request_id', (r ->> 'created_at')::BIGINT \
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
