//! Per-queue limits, kept by the store for every consumer of every host: a
//! rate (at most N jobs started per period) and a concurrency cap (at most N
//! running at once).
//!
//! # How they hold across consumers
//!
//! A limited queue has a row in `fastlane_queues` with its limits and a
//! token bucket (`tokens`, `refilled_at`). A claim from a limited queue is a
//! transaction that first locks that row (`FOR UPDATE` on PostgreSQL;
//! SQLite's `BEGIN IMMEDIATE` locks the store), refills the bucket for the
//! time since, counts the queue's running jobs (after the lock, so that it
//! sees every claim that held the lock before it), claims at most what both
//! allow, and takes the claimed jobs' tokens out of the bucket before it
//! commits. Claims of one limited queue are so serialized, however many
//! consumers make them; claims of other queues are not touched. A queue with
//! no limits pays one cached lookup per second per consumer: whether it has
//! any (a limit set elsewhere takes effect within that second).
//!
//! The bucket holds at most one period's jobs: a queue idle for a while may
//! start a period's worth at once, then goes at the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Error;

/// At most `jobs` jobs started per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rate {
    /// Jobs per period.
    pub jobs: u32,
    /// The period.
    #[serde(serialize_with = "as_ms", rename = "per_ms")]
    pub per: Duration,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Rate {
    /// Reads `50/s`, `600/m`, `1000/h` or `5/250ms`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Invalid(format!("rate `{text}`: {why} (e.g. 50/s, 600/m, 5/250ms)"));
        let (jobs, per) = text.trim().split_once('/').ok_or_else(|| bad("expected JOBS/PERIOD"))?;
        let jobs: u32 = jobs.trim().parse().map_err(|_| bad("the number of jobs is not a whole number"))?;
        let per = per.trim();
        let split = per.find(|c: char| !c.is_ascii_digit()).unwrap_or(per.len());
        let (count, unit) = per.split_at(split);
        let count: u64 = if count.is_empty() { 1 } else { count.parse().map_err(|_| bad("bad period"))? };
        let unit = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad("the period's unit is ms, s, m or h")),
        };
        let per = unit.checked_mul(u32::try_from(count).map_err(|_| bad("the period is too long"))?);
        Rate { jobs, per: per.ok_or_else(|| bad("the period is too long"))? }.checked()
    }

    fn checked(self) -> Result<Self, Error> {
        if self.jobs == 0 {
            return Err(Error::Invalid("a rate limit allows at least 1 job per period".into()));
        }
        if self.per < Duration::from_millis(1) {
            return Err(Error::Invalid("a rate limit's period is at least 1 ms".into()));
        }
        Ok(self)
    }

    /// Jobs per millisecond.
    fn per_ms(self) -> f64 {
        f64::from(self.jobs) / self.per.as_millis() as f64
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per.as_millis() {
            1000 => write!(f, "{}/s", self.jobs),
            60_000 => write!(f, "{}/m", self.jobs),
            3_600_000 => write!(f, "{}/h", self.jobs),
            ms => write!(f, "{}/{ms}ms", self.jobs),
        }
    }
}

/// A queue's limits, across every consumer of the store
/// ([`Store::set_queue_limits`](crate::Store::set_queue_limits)).
///
/// ```
/// use std::time::Duration;
/// use fastlane_jobs::{QueueLimits, Rate};
///
/// // At most 50 mails a second, and 10 sending at once, whatever runs them.
/// let limits = QueueLimits::default().rate(50, Duration::from_secs(1))?.concurrency(10)?;
/// assert_eq!(limits.rate, Some(Rate::parse("50/s")?));
/// # Ok::<(), fastlane_jobs::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueLimits {
    /// At most this many jobs started per period.
    pub rate: Option<Rate>,
    /// At most this many running at once.
    pub concurrency: Option<u32>,
}

impl QueueLimits {
    /// At most `jobs` started per `per` (at least 1 per 1 ms).
    pub fn rate(mut self, jobs: u32, per: Duration) -> Result<Self, Error> {
        self.rate = Some(Rate { jobs, per }.checked()?);
        Ok(self)
    }

    /// At most `n` (at least 1) running at once.
    pub fn concurrency(mut self, n: u32) -> Result<Self, Error> {
        if n == 0 {
            return Err(Error::Invalid("a concurrency cap allows at least 1 running job".into()));
        }
        self.concurrency = Some(n);
        Ok(self)
    }

    /// No limit at all.
    pub fn is_none(&self) -> bool {
        self.rate.is_none() && self.concurrency.is_none()
    }

    /// From a `fastlane_queues` row's columns.
    pub(crate) fn from_row(rate: Option<i64>, period_ms: Option<i64>, concurrency: Option<i64>) -> Self {
        let rate = rate.zip(period_ms).map(|(jobs, ms)| Rate {
            jobs: u32::try_from(jobs).unwrap_or(u32::MAX),
            per: Duration::from_millis(u64::try_from(ms).unwrap_or(1)),
        });
        Self { rate, concurrency: concurrency.map(|n| u32::try_from(n).unwrap_or(u32::MAX)) }
    }
}

/// A limited queue's row as a claim reads it, locked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    pub(crate) limits: QueueLimits,
    pub(crate) tokens: f64,
    pub(crate) refilled_at: i64,
}

/// What a claim of a limited queue may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Budget {
    /// Jobs it may claim.
    pub(crate) take: usize,
    /// The bucket's tokens after the refill, before the claim's are taken.
    pub(crate) tokens: f64,
    /// If a limit is what holds the claim back: how long until it may take
    /// one more (the next token; a while for a full cap).
    pub(crate) retry_in: Option<Duration>,
}

/// How long a consumer waits before it tries a queue whose concurrency cap
/// is full again (a job of its own finishing wakes it sooner).
const CAP_RETRY: Duration = Duration::from_millis(50);

/// The budget of a claim that wants `wanted` jobs at `now` (Unix ms), with
/// `running` jobs of the queue running.
pub(crate) fn budget(bucket: &Bucket, running: u64, now: i64, wanted: usize) -> Budget {
    let mut take = wanted;
    let mut tokens = 0.0;
    let mut retry_in = None;
    if let Some(rate) = bucket.limits.rate {
        let elapsed = (now - bucket.refilled_at).max(0) as f64;
        tokens = (bucket.tokens + elapsed * rate.per_ms()).min(f64::from(rate.jobs));
        let whole = tokens.floor() as usize;
        if whole < take {
            take = whole;
            let missing = (take as f64 + 1.0 - tokens).max(0.0);
            retry_in = Some(Duration::from_secs_f64((missing / rate.per_ms() / 1000.0).max(0.001)));
        }
    }
    if let Some(cap) = bucket.limits.concurrency {
        let free = u64::from(cap).saturating_sub(running) as usize;
        if free < take {
            take = free;
            retry_in = Some(retry_in.map_or(CAP_RETRY, |r: Duration| r.max(CAP_RETRY)));
        }
    }
    Budget { take, tokens, retry_in }
}

/// Which queues a store handle knows to be limited, looked up again once a
/// second; and when a consumer held back by a limit should try again.
#[derive(Debug, Default)]
pub(crate) struct LimitCache {
    queues: Mutex<HashMap<String, Known>>,
}

#[derive(Debug, Clone, Copy)]
struct Known {
    checked: Instant,
    limited: bool,
    retry_at: Option<Instant>,
}

/// How long a store handle trusts what it knows of a queue's limits.
const RECHECK: Duration = Duration::from_secs(1);

impl LimitCache {
    /// Whether `queue` is limited, if looked up within the last second.
    pub(crate) fn limited(&self, queue: &str) -> Option<bool> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.get(queue).filter(|k| k.checked.elapsed() < RECHECK).map(|k| k.limited)
    }

    /// What a lookup found.
    pub(crate) fn found(&self, queue: &str, limited: bool) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let retry_at = queues.get(queue).and_then(|k| k.retry_at);
        queues.insert(queue.to_owned(), Known { checked: Instant::now(), limited, retry_at });
    }

    /// Forgets `queue` (its limits were just set through this handle).
    pub(crate) fn forget(&self, queue: &str) {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).remove(queue);
    }

    /// The last claim of `queue` was held back by a limit for `retry_in`
    /// (`None`: it was not).
    pub(crate) fn held_back(&self, queue: &str, retry_in: Option<Duration>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = queues.get_mut(queue) {
            known.retry_at = retry_in.map(|d| Instant::now() + d);
        }
    }

    /// How long until a claim of `queue` held back by a limit may get more.
    pub(crate) fn retry_in(&self, queue: &str) -> Option<Duration> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.get(queue)?.retry_at.map(|at| at.saturating_duration_since(Instant::now()))
    }
}

/// The store operations of limits, and the claim's budget, inside a
/// backend's module (free functions on its connection type `$conn`, and
/// methods of its `impl Store`), with its `classify`, `write_tx` and
/// `lock_row!` in scope.
macro_rules! limit_fns {
    ($conn:ty) => {
        /// Whether `queue` has limits (cached for a second by `cache`).
        async fn is_limited(
            pool: &sqlx::Pool<<$conn as sqlx::Connection>::Database>,
            cache: &crate::limits::LimitCache,
            queue: &str,
        ) -> Result<bool, Error> {
            if let Some(limited) = cache.limited(queue) {
                return Ok(limited);
            }
            let limited: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM fastlane_queues WHERE queue = $1 \
                 AND (rate_limit IS NOT NULL OR concurrency IS NOT NULL)",
            )
            .bind(queue)
            .fetch_one(pool)
            .await
            .map_err(classify)?;
            cache.found(queue, limited > 0);
            Ok(limited > 0)
        }

        /// Locks `queue`'s row until the transaction ends and works out
        /// what a claim of `wanted` jobs may take at `now`.
        async fn claim_budget(
            conn: &mut $conn,
            queue: &str,
            now: i64,
            wanted: usize,
        ) -> Result<crate::limits::Budget, Error> {
            let row: Option<(Option<i64>, Option<i64>, Option<i64>, f64, i64)> = sqlx::query_as(concat!(
                "SELECT rate_limit, rate_period_ms, concurrency, tokens, refilled_at FROM fastlane_queues \
                 WHERE queue = $1",
                lock_row!()
            ))
            .bind(queue)
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify)?;
            let Some((rate, period, cap, tokens, refilled_at)) = row else {
                return Ok(crate::limits::Budget { take: wanted, tokens: 0.0, retry_in: None });
            };
            let limits = crate::QueueLimits::from_row(rate, period, cap);
            // Counted after the lock: every claim that held it before has
            // committed, and this statement's snapshot sees its jobs.
            let running: i64 = match limits.concurrency {
                Some(_) => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM fastlane_jobs WHERE queue = $1 AND state = 'running'",
                )
                .bind(queue)
                .fetch_one(&mut *conn)
                .await
                .map_err(classify)?,
                None => 0,
            };
            let bucket = crate::limits::Bucket { limits, tokens, refilled_at };
            Ok(crate::limits::budget(&bucket, u64::try_from(running).unwrap_or(0), now, wanted))
        }

        /// Takes `claimed` tokens out of `queue`'s bucket (refilled to
        /// `tokens` at `now`).
        async fn spend(conn: &mut $conn, queue: &str, tokens: f64, claimed: usize, now: i64) -> Result<(), Error> {
            sqlx::query(
                "UPDATE fastlane_queues SET tokens = $1, refilled_at = $2 WHERE queue = $3 AND rate_limit IS NOT NULL",
            )
            .bind((tokens - claimed as f64).max(0.0))
            .bind(now)
            .bind(queue)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
            Ok(())
        }
    };
}

/// The `Store` methods of limits, with the backend's `classify`, `write_tx`
/// and `self.limits` (its [`LimitCache`]) in scope.
macro_rules! limit_methods {
    () => {
        async fn set_queue_limits(&self, queue: &str, limits: crate::QueueLimits) -> Result<(), Error> {
            if queue.trim().is_empty() {
                return Err(Error::Invalid("`queue` must not be empty".into()));
            }
            let mut tx = self.write_tx().await?;
            if limits.is_none() {
                sqlx::query("DELETE FROM fastlane_queues WHERE queue = $1")
                    .bind(queue)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            } else {
                let rate = limits.rate.map(|r| i64::from(r.jobs));
                let period = limits.rate.map(|r| i64::try_from(r.per.as_millis()).unwrap_or(i64::MAX));
                // A new rate starts with a full bucket; an unchanged one
                // keeps its tokens.
                sqlx::query(
                    "INSERT INTO fastlane_queues (queue, rate_limit, rate_period_ms, concurrency, tokens, refilled_at) \
                     VALUES ($1, $2, $3, $4, CAST(COALESCE($5, 0) AS DOUBLE PRECISION), $6) \
                     ON CONFLICT (queue) DO UPDATE SET concurrency = excluded.concurrency, \
                     tokens = CASE WHEN fastlane_queues.rate_limit IS NOT DISTINCT FROM excluded.rate_limit \
                       AND fastlane_queues.rate_period_ms IS NOT DISTINCT FROM excluded.rate_period_ms \
                       THEN fastlane_queues.tokens ELSE excluded.tokens END, \
                     refilled_at = CASE WHEN fastlane_queues.rate_limit IS NOT DISTINCT FROM excluded.rate_limit \
                       AND fastlane_queues.rate_period_ms IS NOT DISTINCT FROM excluded.rate_period_ms \
                       THEN fastlane_queues.refilled_at ELSE excluded.refilled_at END, \
                     rate_limit = excluded.rate_limit, rate_period_ms = excluded.rate_period_ms",
                )
                .bind(queue)
                .bind(rate)
                .bind(period)
                .bind(limits.concurrency.map(i64::from))
                .bind(rate)
                .bind(crate::now_ms())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            }
            tx.commit().await.map_err(classify)?;
            self.limits.forget(queue);
            Ok(())
        }

        async fn queue_limits(&self) -> Result<Vec<(String, crate::QueueLimits)>, Error> {
            let rows: Vec<(String, Option<i64>, Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT queue, rate_limit, rate_period_ms, concurrency FROM fastlane_queues ORDER BY queue",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            Ok(rows
                .into_iter()
                .map(|(queue, rate, period, cap)| (queue, crate::QueueLimits::from_row(rate, period, cap)))
                .collect())
        }

        fn claim_wait(&self, queue: &str) -> Option<Duration> {
            self.limits.retry_in(queue)
        }
    };
}

pub(crate) use {limit_fns, limit_methods};

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(limits: QueueLimits, tokens: f64) -> Bucket {
        Bucket { limits, tokens, refilled_at: 1_000 }
    }

    #[test]
    fn rates_read_and_print_back() {
        for (text, jobs, ms) in
            [("50/s", 50, 1000), ("600/m", 600, 60_000), ("5/250ms", 5, 250), ("2/3s", 2, 3000)]
        {
            let rate = Rate::parse(text).unwrap();
            assert_eq!((rate.jobs, rate.per), (jobs, Duration::from_millis(ms)), "{text}");
        }
        assert_eq!(Rate::parse("50/s").unwrap().to_string(), "50/s");
        assert_eq!(Rate::parse("5/250ms").unwrap().to_string(), "5/250ms");
        for bad in ["50", "x/s", "0/s", "5/0s", "5/fortnight"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_bucket_refills_at_the_rate_up_to_one_period() {
        let limits = QueueLimits::default().rate(50, Duration::from_secs(1)).unwrap();
        // Empty 100 ms ago: 5 tokens now.
        let b = budget(&bucket(limits, 0.0), 0, 1_100, 256);
        assert_eq!(b.take, 5);
        assert!((b.tokens - 5.0).abs() < 1e-9);
        // Half a token: the next is 10 ms away.
        let r = budget(&bucket(limits, 0.5), 0, 1_000, 256);
        assert_eq!((r.take, r.retry_in), (0, Some(Duration::from_millis(10))));
        // Idle for an hour: one period's worth, no more.
        assert_eq!(budget(&bucket(limits, 0.0), 0, 3_601_000, 256).take, 50);
        // Asking for fewer than there are: no hold-back.
        assert_eq!(
            budget(&bucket(limits, 20.0), 0, 1_000, 8),
            Budget { take: 8, tokens: 20.0, retry_in: None }
        );
    }

    #[test]
    fn the_cap_counts_what_runs() {
        let limits = QueueLimits::default().concurrency(10).unwrap();
        assert_eq!(budget(&bucket(limits, 0.0), 7, 1_000, 256).take, 3);
        let full = budget(&bucket(limits, 0.0), 12, 1_000, 256);
        assert_eq!((full.take, full.retry_in), (0, Some(CAP_RETRY)));
        let both = QueueLimits::default().rate(100, Duration::from_secs(1)).unwrap().concurrency(10).unwrap();
        assert_eq!(budget(&bucket(both, 100.0), 4, 1_000, 256).take, 6);
        assert!(QueueLimits::default().concurrency(0).is_err());
    }
}
