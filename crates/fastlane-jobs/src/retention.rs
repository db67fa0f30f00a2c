//! Retention: finished jobs (and their attempts) deleted after an age, in
//! small batches, by every consumer; and the store's size, for
//! `fastlane jobs stats` and `/metrics`.
//!
//! A job store that is never pruned grows until someone notices: at 30,000
//! jobs a second that is 2.6 billion rows a day. Each consumer runs a pruner
//! ([`run`]) every [`Retention::interval`]: it deletes expired jobs a batch
//! at a time, each batch its own short transaction, oldest first (a partial
//! index on `finished_at` of finished jobs finds them without a scan), and
//! yields between batches, so enqueues and claims go on between them
//! instead of waiting behind one long delete. On PostgreSQL the batch skips
//! rows another consumer's pruner has locked, so pruners on many hosts
//! share the work instead of queueing for the same rows. A job's attempts go
//! with it (`ON DELETE CASCADE`).

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::job::now_ms;
use crate::Store;

/// How long finished jobs are kept, and how a consumer prunes them
/// ([`ConsumerConfig::retention`](crate::ConsumerConfig::retention)).
///
/// The defaults are River's: succeeded and cancelled jobs a day, dead jobs
/// a week (they wait for a person to look at them and retry them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Succeeded jobs, from when they finished. Default 24 h.
    pub succeeded: Duration,
    /// Cancelled jobs, from when they were cancelled. Default 24 h.
    pub cancelled: Duration,
    /// Dead jobs (failed for good), from their last attempt. Default 7 days.
    pub dead: Duration,
    /// Jobs deleted in one transaction. Default 1,000: a few milliseconds of
    /// the store's write lock on SQLite.
    pub batch: usize,
    /// How often each consumer prunes. Default 1 minute.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            succeeded: Duration::from_secs(24 * 3600),
            cancelled: Duration::from_secs(24 * 3600),
            dead: Duration::from_secs(7 * 24 * 3600),
            batch: 1000,
            interval: Duration::from_secs(60),
        }
    }
}

impl Retention {
    /// The finish times (Unix ms) before which succeeded, cancelled and dead
    /// jobs are deleted, at `now`.
    pub(crate) fn cutoffs(&self, now: i64) -> [i64; 3] {
        let before = |age: Duration| now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        [before(self.succeeded), before(self.cancelled), before(self.dead)]
    }
}

/// How big a job store is: what `fastlane jobs stats` prints and `/metrics`
/// exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TableSizes {
    /// Rows of `fastlane_jobs`.
    pub jobs: u64,
    /// Rows of `fastlane_attempts`: attempts that ended other than in
    /// success (a succeeded attempt is read off its job's row).
    pub attempts: u64,
    /// Rows of `fastlane_schedules`.
    pub schedules: u64,
    /// Bytes the store takes: the SQLite file (its pages), or the three
    /// tables with their indexes on PostgreSQL.
    pub bytes: u64,
}

/// How many jobs ended in one stretch of time ([`Store::activity`](crate::Store::activity)):
/// what a dashboard's throughput chart draws.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Activity {
    /// The stretch's start (Unix ms, a multiple of its length).
    pub start_ms: i64,
    /// Jobs that succeeded in it.
    pub succeeded: u64,
    /// Jobs that died in it (failed for good).
    pub dead: u64,
    /// Jobs cancelled in it.
    pub cancelled: u64,
}

/// Between two batches: enough for the enqueues and claims that queued
/// behind one to go.
const BETWEEN_BATCHES: Duration = Duration::from_millis(20);

/// What the pruner tells its consumer (for its counters).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pruning {
    /// A batch deleted this many jobs.
    Pruned(u64),
    /// The store's size after a round.
    Measured(TableSizes),
}

/// Prunes `store` by `retention` until `stop` turns true: at start, then
/// every interval; then measures the store's size. Says what it did to
/// `report`.
pub(crate) async fn run<S: Store>(
    store: S,
    retention: Retention,
    report: impl Fn(Pruning) + Send,
    mut stop: watch::Receiver<bool>,
) {
    let batch = retention.batch.max(1);
    loop {
        let mut pruned = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            match store.prune(&retention, now_ms()).await {
                Ok(n) => {
                    pruned += n;
                    report(Pruning::Pruned(n));
                    if (n as usize) < batch {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!("pruning finished jobs failed: {}", fastlane::ErrorChain(&err));
                    break;
                }
            }
            tokio::time::sleep(BETWEEN_BATCHES).await;
        }
        if pruned > 0 {
            tracing::info!(pruned, "finished jobs past their retention deleted");
        }
        match store.table_sizes().await {
            Ok(sizes) => report(Pruning::Measured(sizes)),
            Err(err) => tracing::debug!("measuring the job store failed: {}", fastlane::ErrorChain(&err)),
        }
        tokio::select! {
            () = tokio::time::sleep(retention.interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The store operations of retention, inside a backend's `impl Store`, with
/// its `classify`, `write_tx`, `skip_locked!` (` FOR UPDATE SKIP LOCKED`, or
/// nothing), `json_ids!` (the elements of a JSON array) and `STORE_BYTES` (a
/// query of the store's size) in scope.
macro_rules! retention_methods {
    () => {
        async fn prune(&self, retention: &crate::Retention, now: i64) -> Result<u64, Error> {
            let [succeeded, cancelled, dead] = retention.cutoffs(now);
            let mut tx = self.write_tx().await?;
            let done = sqlx::query(concat!(
                "DELETE FROM fastlane_jobs WHERE id IN (SELECT id FROM fastlane_jobs j \
                 WHERE state IN ('succeeded', 'cancelled', 'dead') AND finished_at < $1 \
                 AND ((state = 'succeeded' AND finished_at < $2) OR (state = 'cancelled' AND finished_at < $3) \
                 OR (state = 'dead' AND finished_at < $4)) \
                 AND (j.dependents IS NULL OR NOT EXISTS (SELECT 1 FROM ",
                // A job's result stays while a job waiting for it may still
                // run (and read it).
                json_ids!("j.dependents"),
                " AS e, fastlane_jobs w WHERE w.id = CAST(e.value AS BIGINT) \
                 AND w.state IN ('waiting', 'scheduled', 'available', 'running', 'retrying'))) \
                 ORDER BY finished_at LIMIT $5",
                skip_locked!(),
                ")"
            ))
            .bind(succeeded.max(cancelled).max(dead))
            .bind(succeeded)
            .bind(cancelled)
            .bind(dead)
            .bind(i64::try_from(retention.batch.max(1)).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            Ok(done.rows_affected())
        }

        async fn activity(&self, since: i64, bucket: Duration) -> Result<Vec<crate::Activity>, Error> {
            let size = i64::try_from(bucket.as_millis()).unwrap_or(i64::MAX).max(1);
            // Read through the partial index on `finished_at` of finished
            // jobs: the cost is the stretch's jobs, not the table's.
            let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
                "SELECT (finished_at / $1) * $1 AS start_ms, \
                 SUM(CASE WHEN state = 'succeeded' THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN state = 'dead' THEN 1 ELSE 0 END), \
                 SUM(CASE WHEN state = 'cancelled' THEN 1 ELSE 0 END) \
                 FROM fastlane_jobs WHERE state IN ('succeeded', 'cancelled', 'dead') AND finished_at >= $2 \
                 GROUP BY start_ms ORDER BY start_ms",
            )
            .bind(size)
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(rows
                .into_iter()
                .map(|(start_ms, succeeded, dead, cancelled)| crate::Activity {
                    start_ms,
                    succeeded: count(succeeded),
                    dead: count(dead),
                    cancelled: count(cancelled),
                })
                .collect())
        }

        async fn table_sizes(&self) -> Result<crate::TableSizes, Error> {
            let (jobs, attempts, schedules): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM fastlane_jobs), (SELECT COUNT(*) FROM fastlane_attempts), \
                 (SELECT COUNT(*) FROM fastlane_schedules)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
            let bytes: i64 = sqlx::query_scalar(STORE_BYTES).fetch_one(&self.pool).await.map_err(classify)?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(crate::TableSizes {
                jobs: count(jobs),
                attempts: count(attempts),
                schedules: count(schedules),
                bytes: count(bytes),
            })
        }
    };
}

pub(crate) use retention_methods;
