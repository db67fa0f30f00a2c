//! The SQLite job store: a file, no server, one writer.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: it takes SQLite's
//! write lock up front, so two processes sharing the file queue for it (busy
//! timeout) instead of failing when a read transaction tries to upgrade.
//! WAL mode lets readers (stats, `jobs show`) run beside the writer.

mod schema;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;

use crate::common::{finish_method, insert_jobs_sql, record_attempts_sql, store_methods};
use crate::job::{
    after_failure, batch_rows, claimed_in_order, done_rows, fenced_among, in_batch_order, ms_after, now_ms,
    Attempt, Claimed, ClaimedRow, Done, JobId, JobInfo, JobState, JobSummary, Lease, NewJob, Stats,
};
use crate::limits::{limit_fns, limit_methods};
use crate::retention::retention_methods;
use crate::scheduler::schedule_methods;
use crate::workflow::workflow_fns;
use crate::{Error, Store};

/// A pruning batch needs no row locks: `BEGIN IMMEDIATE` holds the store's
/// one write lock.
macro_rules! skip_locked {
    () => {
        ""
    };
}

/// The store's size: the database file's pages.
const STORE_BYTES: &str = "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()";

/// `BEGIN IMMEDIATE` already holds SQLite's one write lock: rows need no
/// lock of their own (and SQLite has no `FOR UPDATE`).
macro_rules! lock_row {
    () => {
        ""
    };
}

/// One key of a batch's JSON row; SQLite keeps its JSON type.
macro_rules! field {
    ($name:literal, $type:literal) => {
        concat!("value ->> '", $name, "'")
    };
}

/// The JSON rows of a batch (`$1`), in the batch's order.
macro_rules! job_rows {
    () => {
        " FROM json_each($1) ORDER BY key"
    };
}

/// The elements of a JSON array (text), as a table with a `value` column.
macro_rules! json_ids {
    ($array:literal) => {
        concat!("json_each(", $array, ")")
    };
}

/// ` IN (...)`: the column before it is one of the ids of a JSON array (a
/// bound parameter); SQLite looks each up by its key.
macro_rules! id_among {
    ($array:literal) => {
        concat!(" IN (SELECT value FROM json_each(", $array, "))")
    };
}

/// Each waiting job of a workflow batch gets its `depends_on` list.
const SET_DEPENDS_ON: &str = "UPDATE fastlane_jobs SET depends_on = x.ids \
     FROM (SELECT value ->> 'id' AS id, value ->> 'ids' AS ids FROM json_each(?1)) AS x \
     WHERE fastlane_jobs.id = x.id";

/// Each job waited for gets its new waiters added to `dependents`.
const ADD_DEPENDENTS: &str = "UPDATE fastlane_jobs SET dependents = (SELECT json_group_array(value) FROM \
     (SELECT value FROM json_each(COALESCE(fastlane_jobs.dependents, '[]')) UNION ALL SELECT value FROM json_each(x.ids))) \
     FROM (SELECT value ->> 'id' AS id, value ->> 'ids' AS ids FROM json_each(?1)) AS x \
     WHERE fastlane_jobs.id = x.id";

workflow_fns!(sqlx::SqliteConnection);
limit_fns!(sqlx::SqliteConnection);

/// Takes one job to wait for off each of `waiters` per time it is listed
/// (once per success of a job it waits for), and makes those left with none
/// due; returns how many became available. A released job is due from now,
/// or at its own `run_at` if it was enqueued with one still to come (a
/// job's `run_at` is its `created_at` unless given). (PostgreSQL does this in its
/// completion statement.)
async fn release_dependents(
    conn: &mut sqlx::SqliteConnection,
    waiters: &[JobId],
    now: i64,
) -> Result<u64, Error> {
    let states: Vec<String> = sqlx::query_scalar(concat!(
        "UPDATE fastlane_jobs SET ",
        crate::workflow::release_waiters!(),
        " FROM (SELECT value AS id, COUNT(*) AS n FROM json_each($2) GROUP BY value) AS x \
             WHERE fastlane_jobs.id = x.id AND fastlane_jobs.state = 'waiting' RETURNING fastlane_jobs.state"
    ))
    .bind(now)
    .bind(crate::workflow::id_array(waiters))
    .fetch_all(&mut *conn)
    .await
    .map_err(classify)?;
    Ok(states.iter().filter(|s| *s == "available").count() as u64)
}

/// A job store in a SQLite file (`sqlite://path/to/jobs.db`), created on
/// first use.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Wakes this process's idle workers on enqueue. SQLite has no way to
    /// tell other processes; their workers poll.
    wake: Arc<Notify>,
    /// Which queues have limits (limits.rs).
    limits: Arc<crate::limits::LimitCache>,
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

/// SQLite takes the shared statements as they are written.
impl SqliteStore {
    /// A write transaction that takes SQLite's write lock up front.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)
    }

    finish_method!();

    /// Jobs were committed: wake this process's idle workers (SQLite cannot
    /// tell other processes; theirs poll).
    fn enqueued(&self) {
        self.wake.notify_waiters();
    }

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
        // SQLite creates the file, not the directories above it; say which
        // is missing rather than pass on "unable to open database file".
        let file = options.get_filename();
        if let Some(dir) =
            file.parent().filter(|d| !d.as_os_str().is_empty() && file != Path::new(":memory:"))
        {
            if !dir.is_dir() {
                return Err(Error::NotAJobStore(format!(
                    "cannot open {url}: the directory {} does not exist (the job store file is created on first \
                     use, its directory is not)",
                    dir.display()
                )));
            }
        }
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
        Ok(Self { pool, wake: Arc::default(), limits: Arc::default() })
    }
}

/// Stores `jobs` inside the caller's write transaction; their ids in the
/// batch's order.
async fn enqueue_in(tx: &mut sqlx::SqliteConnection, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
    let now = now_ms();
    if crate::workflow::has_dependencies(&jobs) {
        return enqueue_workflow(tx, &jobs, now).await;
    }
    insert_rows(tx, &jobs, now, None).await
}

/// Inserts a checked batch (planned, if some of its jobs wait for others)
/// in one statement; the ids in the batch's order.
async fn insert_rows(
    tx: &mut sqlx::SqliteConnection,
    jobs: &[NewJob],
    now: i64,
    plans: Option<&[crate::job::Plan]>,
) -> Result<Vec<JobId>, Error> {
    let (rows, keys) = batch_rows(jobs, now, plans)?;
    if !keys.is_empty() {
        let keys = serde_json::to_string(&keys).map_err(|e| Error::Invalid(e.to_string()))?;
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT unique_key FROM fastlane_jobs WHERE unique_key IN (SELECT value FROM json_each(?)) \
             AND state IN ('waiting','scheduled','available','running','retrying') LIMIT 1",
        )
        .bind(keys)
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
    let ids: Vec<i64> = sqlx::query_scalar(sql).bind(rows).fetch_all(&mut *tx).await.map_err(classify)?;
    Ok(in_batch_order(ids))
}

/// Writes the attempt records of jobs whose attempt has just ended other
/// than in success, from their rows (attempt number, worker, start): see
/// `record_attempts_sql`.
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
    sqlx::query(record_attempts_sql!(
        "SELECT id, attempt, COALESCE(worker, ''), COALESCE(started_at, ?1), ?1, ?2, ?3 FROM fastlane_jobs \
         WHERE id IN (SELECT value FROM json_each(?4))"
    ))
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
    store_methods!();

    schedule_methods!();
    retention_methods!();
    limit_methods!();

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.write_tx().await?;
        let ids = enqueue_in(&mut tx, jobs).await?;
        tx.commit().await.map_err(classify)?;
        self.enqueued();
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
        // Looked up before the transaction, which holds the one connection.
        let limited = is_limited(&self.pool, &self.limits, queue).await?;
        let now = now_ms();
        let lease_until = ms_after(now, lease);
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
            let ended: Vec<(JobId, String, Option<String>)> = sqlx::query_as(
                "UPDATE fastlane_jobs SET lease_until = NULL, \
                 state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END, \
                 finished_at = CASE WHEN attempt >= max_attempts THEN ?1 ELSE finished_at END, \
                 last_error = CASE WHEN attempt >= max_attempts THEN 'lease expired on the last attempt' \
                 ELSE last_error END \
                 WHERE queue = ?2 AND state = 'running' AND lease_until < ?1 RETURNING id, state, dependents",
            )
            .bind(now)
            .bind(queue)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
            // A job that died with its lease takes its waiters with it.
            for (id, state, dependents) in ended {
                if state == "dead" && dependents.is_some() {
                    cancel_dependents(&mut tx, id, &state, dependents, now).await?;
                }
            }
        }
        // A limited queue: what its rate and cap allow (see limits.rs).
        let budget = match limited {
            true => Some(claim_budget(&mut tx, queue, now, limit).await?),
            false => None,
        };
        let limit = budget.map_or(limit, |b| b.take);
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "UPDATE fastlane_jobs SET state = 'running', attempt = attempt + 1, token = token + 1, \
             lease_until = ?1, worker = ?2, started_at = ?3, owner = ?6, progress = NULL, progress_message = NULL \
             WHERE id IN (SELECT id FROM fastlane_jobs WHERE queue = ?4 \
               AND state IN ('scheduled','available','retrying') AND run_at <= ?3 \
               ORDER BY priority DESC, run_at, id LIMIT ?5) \
             RETURNING id, name, payload, attempt, max_attempts, token, timeout_ms, priority, run_at, request_id, \
             depends_on",
        )
        .bind(lease_until)
        .bind(consumer)
        .bind(now)
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(crate::owner::me())
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(budget) = budget {
            spend(&mut tx, queue, budget.tokens, rows.len(), now).await?;
        }
        tx.commit().await.map_err(classify)?;
        if let Some(budget) = budget {
            self.limits.held_back(queue, budget.retry_in.filter(|_| rows.len() == budget.take));
        }
        Ok(claimed_in_order(rows))
    }

    async fn cancel_requested(&self, ids: &[JobId]) -> Result<Vec<JobId>, Error> {
        let ids = serde_json::to_string(ids).map_err(|e| Error::Invalid(e.to_string()))?;
        sqlx::query_scalar(
            "SELECT id FROM fastlane_jobs WHERE id IN (SELECT value FROM json_each(?)) \
             AND state = 'running' AND cancel_requested <> 0",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)
    }

    fn wakeups(&self) -> Option<Arc<Notify>> {
        Some(self.wake.clone())
    }

    async fn complete_many(&self, done: &[Done]) -> Result<Vec<Lease>, Error> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        // The fencing check: only attempts holding the current token are
        // recorded; a zombie's late completion changes nothing.
        let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
            "UPDATE fastlane_jobs SET state = 'succeeded', lease_until = NULL, finished_at = ?1, result = d.result \
             FROM (SELECT value ->> 'id' AS id, value ->> 'token' AS token, value ->> 'result' AS result \
             FROM json_each(?2)) AS d \
             WHERE fastlane_jobs.id = d.id AND fastlane_jobs.token = d.token AND fastlane_jobs.state = 'running' \
             RETURNING fastlane_jobs.id, fastlane_jobs.dependents",
        )
        .bind(now)
        .bind(done_rows(done))
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        // No attempt record: the succeeded attempt is read off the row.
        let recorded: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        // The waiters of these jobs: each loses one job to wait for per
        // success, in this transaction (see workflow.rs).
        let waiters = crate::workflow::all_ids(rows.iter().filter_map(|(_, d)| d.as_deref()));
        let due = if waiters.is_empty() { 0 } else { release_dependents(&mut tx, &waiters, now).await? };
        tx.commit().await.map_err(classify)?;
        if due > 0 {
            self.enqueued();
        }
        Ok(fenced_among(done, recorded))
    }
}
