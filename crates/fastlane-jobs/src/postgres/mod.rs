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

use crate::common::{finish_method, insert_jobs_sql, record_attempts_sql, store_methods};
use crate::job::{
    after_failure, batch_rows, claimed_in_order, done_rows, in_batch_order, ms_after, now_ms, Attempt,
    Claimed, ClaimedRow, Done, JobId, JobInfo, JobState, JobSummary, Lease, NewJob, Stats,
};
use crate::limits::{limit_fns, limit_methods};
use crate::retention::retention_methods;
use crate::scheduler::schedule_methods;
use crate::workflow::workflow_fns;
use crate::{Error, Store};

/// A pruning batch skips rows another consumer's pruner holds, so that
/// pruners on many hosts share the work instead of queueing for the same rows.
macro_rules! skip_locked {
    () => {
        " FOR UPDATE SKIP LOCKED"
    };
}

/// The store's size: its tables with their indexes and TOAST.
const STORE_BYTES: &str =
    "SELECT CAST(pg_total_relation_size('fastlane_jobs') + pg_total_relation_size('fastlane_attempts') \
     + pg_total_relation_size('fastlane_schedules') + pg_total_relation_size('fastlane_queues') AS BIGINT)";

/// A schedule's row is locked while a scheduler looks at it, so that a
/// second one waits and then sees the tick taken.
macro_rules! lock_row {
    () => {
        " FOR UPDATE"
    };
}

/// One key of a batch's JSON row, as the column's type.
macro_rules! field {
    ($name:literal, $type:literal) => {
        concat!("CAST(r ->> '", $name, "' AS ", $type, ")")
    };
}

/// The JSON rows of a batch (`$1`), in the batch's order.
macro_rules! job_rows {
    () => {
        " FROM jsonb_array_elements(CAST($1 AS JSONB)) WITH ORDINALITY AS e(r, n) ORDER BY n"
    };
}

/// The elements of a JSON array (text), as a table with a `value` column.
macro_rules! json_ids {
    ($array:literal) => {
        concat!("jsonb_array_elements_text(CAST(", $array, " AS JSONB))")
    };
}

/// ` = ANY(...)`: the column before it is one of the ids of a JSON array (a
/// bound parameter). An array, not an `IN (SELECT ...)`: PostgreSQL plans
/// the semi-join from its guess of the table's size and scans the table
/// once it has grown past the guess (seen in the chains benchmark); an
/// array is looked up in the key's index, however big the table.
macro_rules! id_among {
    ($array:literal) => {
        concat!(
            " = ANY(ARRAY(SELECT CAST(value AS BIGINT) FROM jsonb_array_elements_text(CAST(",
            $array,
            " AS JSONB))))"
        )
    };
}

/// Each waiting job of a workflow batch gets its `depends_on` list.
const SET_DEPENDS_ON: &str = "UPDATE fastlane_jobs j SET depends_on = CAST(x.ids AS TEXT) \
     FROM jsonb_to_recordset(CAST($1 AS JSONB)) AS x(id BIGINT, ids JSONB) WHERE j.id = x.id";

/// Each job waited for gets its new waiters added to `dependents`.
const ADD_DEPENDENTS: &str = "UPDATE fastlane_jobs j \
     SET dependents = CAST(COALESCE(CAST(j.dependents AS JSONB), CAST('[]' AS JSONB)) || x.ids AS TEXT) \
     FROM jsonb_to_recordset(CAST($1 AS JSONB)) AS x(id BIGINT, ids JSONB) WHERE j.id = x.id";

workflow_fns!(sqlx::PgConnection);
limit_fns!(sqlx::PgConnection);

/// A job store in a PostgreSQL database (`postgres://...`); its tables are
/// created (and migrated) on first use, beside the application's own.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    wake: Arc<Wakeups>,
    /// Which queues have limits (limits.rs).
    limits: Arc<crate::limits::LimitCache>,
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

    /// Ends the expired last attempts of jobs that others wait for: dead,
    /// their waiters cancelled, in one transaction. (`claim_many`'s rescue
    /// statement, which runs without a transaction, leaves them here, so
    /// that a crash between two statements cannot leave a waiter behind a
    /// dead job.)
    async fn expire_last_attempts(&self, queue: &str, now: i64) -> Result<(), Error> {
        let mut tx = self.write_tx().await?;
        let ended: Vec<(JobId, Option<String>)> = sqlx::query_as(concat!(
            "WITH expired AS (UPDATE fastlane_jobs SET lease_until = NULL, state = 'dead', finished_at = $1, \
               last_error = 'lease expired on the last attempt' \
             WHERE id IN (SELECT id FROM fastlane_jobs WHERE queue = $2 AND state = 'running' \
               AND lease_until < $1 AND attempt >= max_attempts AND dependents IS NOT NULL \
               FOR UPDATE SKIP LOCKED) \
             RETURNING id, attempt, worker, started_at, dependents), \
             recorded AS (",
            record_attempts_sql!(
                "SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, 'lease expired', NULL \
                 FROM expired"
            ),
            ") SELECT id, dependents FROM expired"
        ))
        .bind(now)
        .bind(queue)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        for (id, dependents) in ended {
            cancel_dependents(&mut tx, id, "dead", dependents, now).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

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
        Ok(Self { pool, wake: Arc::default(), limits: Arc::default() })
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
    limit_methods!();

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
        let last_with_waiters: bool = sqlx::query_scalar(concat!(
            "WITH expired AS (UPDATE fastlane_jobs SET lease_until = NULL, \
               state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
               finished_at = CASE WHEN attempt >= max_attempts THEN $1 ELSE finished_at END, \
               last_error = CASE WHEN attempt >= max_attempts THEN 'lease expired on the last attempt' \
               ELSE last_error END \
             WHERE id IN (SELECT id FROM fastlane_jobs WHERE queue = $2 AND state = 'running' \
               AND lease_until < $1 AND NOT (attempt >= max_attempts AND dependents IS NOT NULL) \
               FOR UPDATE SKIP LOCKED) \
             RETURNING id, attempt, worker, started_at), \
             recorded AS (",
            record_attempts_sql!(
                "SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, $1), $1, 'lease expired', NULL \
                 FROM expired"
            ),
            ") SELECT EXISTS (SELECT 1 FROM fastlane_jobs WHERE queue = $2 AND state = 'running' \
               AND lease_until < $1 AND attempt >= max_attempts AND dependents IS NOT NULL)"
        ))
        .bind(now)
        .bind(queue)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        if last_with_waiters {
            self.expire_last_attempts(queue, now).await?;
        }
        if !is_limited(&self.pool, &self.limits, queue).await? {
            let rows = claim_rows(&self.pool, queue, consumer, now, lease_until, limit).await?;
            return Ok(claimed_in_order(rows));
        }
        // A limited queue: its row locked, what its rate and cap allow, the
        // claim, and the tokens spent, in one transaction (see limits.rs).
        let mut tx = self.write_tx().await?;
        let budget = claim_budget(&mut tx, queue, now, limit).await?;
        let rows = match budget.take {
            0 => Vec::new(),
            take => claim_rows(&mut *tx, queue, consumer, now, lease_until, take).await?,
        };
        spend(&mut tx, queue, budget.tokens, rows.len(), now).await?;
        tx.commit().await.map_err(classify)?;
        self.limits.held_back(queue, budget.retry_in.filter(|_| rows.len() == budget.take));
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
        // A success that a concurrent write to its row held up is left for
        // the next pass (see `complete_pass`); what three passes leave is
        // fenced. The first pass records all but a zombie's, almost always.
        let mut left: Vec<Done> = done.to_vec();
        for _ in 0..3 {
            if left.is_empty() {
                break;
            }
            let recorded = self.complete_pass(&left).await?;
            left.retain(|d| !recorded.contains(&d.lease.job));
        }
        Ok(left.into_iter().map(|d| d.lease).collect())
    }
}

impl PgStore {
    /// One statement that records the successes of `done` whose row no one
    /// changed since the statement's snapshot; returns their ids.
    ///
    /// The fencing check: only attempts holding the current token are
    /// recorded; a zombie's late completion changes nothing. The succeeded
    /// attempt is read off the job's row: no attempt record is written. A
    /// success also takes one
    /// off each of the job's waiters (`dependents`) and makes due those left
    /// with none (see workflow.rs). A job whose row was changed after the
    /// snapshot (its `xmin` differs from the snapshot's: an enqueue added a
    /// waiter, which the snapshot cannot see, or a retry made one wait
    /// again) is not recorded in this statement; the next pass, with a new
    /// snapshot, sees the waiter.
    async fn complete_pass(&self, done: &[Done]) -> Result<std::collections::HashSet<i64>, Error> {
        let now = now_ms();
        let rows: Vec<(Option<i64>, Option<String>)> = sqlx::query_as(concat!(
            "WITH done AS (UPDATE fastlane_jobs j SET state = 'succeeded', lease_until = NULL, finished_at = $1, \
               result = d.result \
               FROM jsonb_to_recordset($2::jsonb) AS d(id BIGINT, token BIGINT, result TEXT), fastlane_jobs s \
               WHERE j.id = d.id AND s.id = d.id AND j.token = d.token AND j.state = 'running' AND j.xmin = s.xmin \
               RETURNING j.id, j.dependents), \
             released AS (UPDATE fastlane_jobs w SET ",
            crate::workflow::release_waiters!(),
            " \
               FROM (SELECT CAST(e.value AS BIGINT) AS id, COUNT(*) AS n FROM done, ",
            json_ids!("done.dependents"),
            " AS e WHERE done.dependents IS NOT NULL GROUP BY 1) AS x \
               WHERE w.id = x.id AND w.state = 'waiting' RETURNING w.queue, w.state) \
             SELECT id, CAST(NULL AS TEXT) FROM done \
             UNION ALL SELECT NULL, queue FROM released WHERE state = 'available'"
        ))
        .bind(now)
        .bind(done_rows(done))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut due: Vec<&str> = rows.iter().filter_map(|(_, queue)| queue.as_deref()).collect();
        if !due.is_empty() {
            due.sort_unstable();
            due.dedup();
            self.enqueued();
            notify_queues(&self.pool, &due).await?;
        }
        Ok(rows.iter().filter_map(|(id, _)| *id).collect())
    }
}

/// Claims up to `limit` due jobs of `queue` for `consumer` (one statement,
/// `FOR UPDATE SKIP LOCKED`), on the pool or in a transaction.
async fn claim_rows<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    queue: &str,
    consumer: &str,
    now: i64,
    lease_until: i64,
    limit: usize,
) -> Result<Vec<ClaimedRow>, Error> {
    sqlx::query_as(
        "WITH picked AS (SELECT id FROM fastlane_jobs WHERE queue = $4 \
               AND state IN ('scheduled','available','retrying') AND run_at <= $3 \
               ORDER BY priority DESC, run_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) \
             UPDATE fastlane_jobs j SET state = 'running', attempt = attempt + 1, token = token + 1, \
             lease_until = $1, worker = $2, started_at = $3, owner = $6, progress = NULL, progress_message = NULL \
             FROM picked WHERE j.id = picked.id \
             RETURNING j.id, j.name, j.payload, j.attempt, j.max_attempts, j.token, j.timeout_ms, j.priority::BIGINT, j.run_at, \
             j.request_id, j.depends_on",
    )
    .bind(lease_until)
    .bind(consumer)
    .bind(now)
    .bind(queue)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(crate::owner::me())
    .fetch_all(conn)
    .await
    .map_err(classify)
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
    let ids = if crate::workflow::has_dependencies(&jobs) {
        enqueue_workflow(tx, &jobs, now).await?
    } else {
        insert_rows(tx, &jobs, now, None).await?
    };
    let mut queues: Vec<&str> = jobs.iter().map(|job| job.queue.as_str()).collect();
    queues.sort_unstable();
    queues.dedup();
    notify_queues(&mut *tx, &queues).await?;
    Ok(ids)
}

/// Wakes the idle workers of `queues` in every process (delivered when the
/// transaction commits).
async fn notify_queues<'e>(conn: impl sqlx::PgExecutor<'e>, queues: &[&str]) -> Result<(), Error> {
    sqlx::query("SELECT pg_notify($1, q) FROM UNNEST($2::TEXT[]) AS q")
        .bind(CHANNEL)
        .bind(queues)
        .execute(conn)
        .await
        .map_err(classify)?;
    Ok(())
}

/// Inserts a checked batch (planned, if some of its jobs wait for others)
/// in one statement; the ids in the batch's order.
async fn insert_rows(
    tx: &mut sqlx::PgConnection,
    jobs: &[NewJob],
    now: i64,
    plans: Option<&[crate::job::Plan]>,
) -> Result<Vec<JobId>, Error> {
    let (rows, keys) = batch_rows(jobs, now, plans)?;
    if !keys.is_empty() {
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT unique_key FROM fastlane_jobs WHERE unique_key = ANY($1) \
             AND state IN ('waiting','scheduled','available','running','retrying') LIMIT 1",
        )
        .bind(&keys)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(key) = taken {
            return Err(Error::Duplicate(key));
        }
    }
    let sql = match plans {
        Some(_) => insert_jobs_sql!(planned),
        None => insert_jobs_sql!(plain),
    };
    let ids: Vec<i64> =
        sqlx::query_scalar(sql).bind(&rows).fetch_all(&mut *tx).await.map_err(|err| match &err {
            // Another transaction inserted the same key between our check and
            // our insert: the partial unique index has the last word.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                Error::Duplicate(keys.join(", "))
            }
            _ => classify(err),
        })?;
    Ok(in_batch_order(ids))
}
