//! The scheduler: enqueues each tick of the registry's [`Schedule`]s once,
//! however many consumers (processes, hosts) run it.
//!
//! # How a tick is enqueued once
//!
//! Each schedule (its name and how it ticks) has a row in
//! `fastlane_schedules` holding `last_tick`: the
//! time up to which its ticks are accounted for. A scheduler looks at a
//! schedule in one write transaction of the store: it locks the row
//! (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite's `BEGIN IMMEDIATE` locks
//! the whole store), works out from `last_tick` and its clock which tick is
//! due ([`Schedule::due`]), enqueues that tick's job, and moves `last_tick`
//! to now, in that same transaction. A second scheduler looking at the same
//! moment waits for the lock, then reads the new `last_tick` and finds
//! nothing due. The job and the row's move commit together or not at all, so
//! a scheduler that dies half-way loses nothing and duplicates nothing: the
//! next one to look finds the tick still due. The job's unique key
//! (`schedule:<name>:<tick ms>`) is a second guard. No scheduler holds a
//! lease, so none has to be taken over: the schedulers that live carry on.
//!
//! Clocks: a scheduler whose clock runs ahead enqueues a tick early, by its
//! skew, and still once; keep hosts' clocks in sync (NTP) as for leases.

use std::time::Duration;

use tokio::sync::watch;

use crate::job::now_ms;
use crate::schedule::Schedule;
use crate::{Error, Store};

/// The store operations of schedules, inside a backend's `impl Store`,
/// with its `classify`, `write_tx`, `enqueue_in`, `enqueued` and `lock_row!`
/// (` FOR UPDATE`, or nothing) in scope. Numbered placeholders: the same
/// SQL on both.
macro_rules! schedule_methods {
    () => {
        async fn look_at_schedule(
            &self,
            schedule: &crate::Schedule,
            now: i64,
        ) -> Result<crate::ScheduleLook, Error> {
            let spec = schedule.spec();
            let mut tx = self.write_tx().await?;
            // A declaration is its name and its ticks (`spec`): declared
            // differently, it is another row, whose ticks count from when it
            // is first seen, so that two versions running side by side (a
            // rolling deploy) each enqueue their own ticks once.
            let last: Option<i64> = sqlx::query_scalar(concat!(
                "SELECT last_tick FROM fastlane_schedules WHERE name = $1 AND spec = $2",
                lock_row!()
            ))
            .bind(&schedule.name)
            .bind(&spec)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
            let last = last.unwrap_or(now);
            let due = schedule.due(last, now);
            let fired = match due.fire {
                Some(tick) => {
                    let job = schedule.job.clone().unique_key(format!("schedule:{}:{}", schedule.name, tick.at));
                    let job = job.run_at(std::time::UNIX_EPOCH + Duration::from_millis(tick.at.max(0) as u64));
                    match enqueue_in(&mut tx, vec![job]).await {
                        Ok(ids) => ids.first().map(|id| (tick, *id)),
                        // Another declaration of the same name took this
                        // very instant, and its job is still pending: one
                        // job for it is enough.
                        Err(Error::Duplicate(_)) => None,
                        Err(err) => return Err(err),
                    }
                }
                None => None,
            };
            sqlx::query(
                "INSERT INTO fastlane_schedules (name, job, spec, missed, last_tick, next_tick, last_job, seen_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $5) \
                 ON CONFLICT (name, spec) DO UPDATE SET job = excluded.job, \
                 missed = excluded.missed, last_tick = excluded.last_tick, next_tick = excluded.next_tick, \
                 last_job = COALESCE(excluded.last_job, fastlane_schedules.last_job), seen_at = excluded.seen_at",
            )
            .bind(&schedule.name)
            .bind(&schedule.job.name)
            .bind(&spec)
            .bind(schedule.missed.as_str())
            .bind(now.max(last))
            .bind(due.next)
            .bind(fired.map(|(_, id)| id))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            if fired.is_some() {
                self.enqueued();
            }
            Ok(crate::ScheduleLook {
                job: fired.map(|(_, id)| id),
                tick: fired.map(|(tick, _)| tick.at),
                late: fired.is_some_and(|(tick, _)| tick.late),
                next_tick: due.next,
            })
        }

        async fn schedules(&self) -> Result<Vec<crate::ScheduleInfo>, Error> {
            let rows: Vec<(String, String, String, String, i64, Option<i64>, Option<i64>, i64)> = sqlx::query_as(
                "SELECT name, job, spec, missed, last_tick, next_tick, last_job, seen_at \
                 FROM fastlane_schedules ORDER BY name, seen_at DESC",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            Ok(rows
                .into_iter()
                .map(|(name, job, spec, missed, last_tick, next_tick, last_job, seen_at)| crate::ScheduleInfo {
                    name,
                    job,
                    spec,
                    missed,
                    last_tick,
                    next_tick,
                    last_job,
                    seen_at,
                })
                .collect())
        }
    };
}

pub(crate) use schedule_methods;

/// The longest a scheduler sleeps between looks, even with no tick due:
/// so that `seen_at` stays fresh and a schedule changed in another
/// process's code is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// How long to wait after a failed look (the store unreachable) before the
/// next.
const RETRY: Duration = Duration::from_secs(1);

/// Runs `schedules` against `store` until `shutdown` turns true: looks at
/// each when its next tick comes, and enqueues what is due.
pub(crate) async fn run<S: Store>(store: S, schedules: Vec<Schedule>, mut shutdown: watch::Receiver<bool>) {
    if schedules.is_empty() {
        return;
    }
    let names: Vec<String> = schedules.iter().map(|s| format!("{} ({})", s.name, s.spec())).collect();
    tracing::info!("scheduler started: {}", names.join(", "));
    // When to look at each next; all at once to start.
    let mut wake: Vec<i64> = vec![0; schedules.len()];
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = now_ms();
        for (schedule, wake_at) in schedules.iter().zip(wake.iter_mut()) {
            if *wake_at > now {
                continue;
            }
            *wake_at = match look(&store, schedule, now).await {
                Ok(next) => next,
                Err(err) => {
                    tracing::warn!(
                        schedule = %schedule.name,
                        "could not look at the schedule; trying again in 1 s: {}",
                        fastlane::ErrorChain(&err)
                    );
                    now + RETRY.as_millis() as i64
                }
            };
        }
        let soonest = wake.iter().min().copied().unwrap_or(now);
        let sleep = Duration::from_millis(soonest.saturating_sub(now_ms()).max(0) as u64).min(MAX_SLEEP);
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// One look at a schedule; when to look again.
async fn look<S: Store>(store: &S, schedule: &Schedule, now: i64) -> Result<i64, Error> {
    let looked = store.look_at_schedule(schedule, now).await?;
    if let Some(id) = looked.job {
        match looked.late {
            false => tracing::debug!(schedule = %schedule.name, job = id, "tick enqueued"),
            true => tracing::info!(
                schedule = %schedule.name,
                job = id,
                "ticks were missed while no scheduler ran; one job enqueued for them (missed = run-once)"
            ),
        }
    }
    let max = now + MAX_SLEEP.as_millis() as i64;
    Ok(looked.next_tick.map_or(max, |next| next.min(max)))
}
