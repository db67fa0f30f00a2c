//! Schedules on both stores: each tick enqueued once however many
//! schedulers race for it (three stores on one database, each with its own
//! connections, as three processes would have), missed ticks run once or
//! skipped, a changed declaration restarts, and a consumer runs its
//! registry's schedules in real time. SQLite always; PostgreSQL when
//! `FASTLANE_TEST_PG_URL` is set (said to be skipped otherwise).

use std::collections::BTreeMap;
use std::time::Duration;

use fastlane_jobs::{JobContext, JobState, Missed, NewJob, Registry, Schedule, Store};
use serde_json::json;

mod support;

use support::{consumers, on_both_stores, sqlite, Db};

fn noop() -> NewJob {
    NewJob::new("noop", json!({}))
}

/// Unix ms of an RFC 3339 time.
fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
}

/// The jobs a schedule enqueued, by tick (from their unique keys).
async fn jobs_by_tick<S: Store>(store: &S, schedule: &str) -> BTreeMap<i64, Vec<i64>> {
    let mut by_tick: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for summary in store.list(None, 10_000).await.unwrap() {
        let info = store.get(summary.id).await.unwrap();
        let key = info.unique_key.unwrap_or_default();
        let prefix = format!("schedule:{schedule}:");
        if let Some(tick) = key.strip_prefix(&prefix) {
            by_tick.entry(tick.parse().unwrap()).or_default().push(summary.id);
        }
    }
    by_tick
}

mod suite {
    use super::*;

    /// Three schedulers, each on its own connections, look at a 1-second
    /// schedule at every simulated second for two minutes, all at once and
    /// with clocks a few milliseconds apart: exactly one job per tick.
    pub(crate) async fn racing_schedulers_enqueue_each_tick_once<S: Store>(stores: &[S]) {
        let schedule = Schedule::every("pulse", noop(), Duration::from_secs(1)).unwrap();
        let start = ms("2026-11-27T10:00:00.500Z");
        // The first look registers the schedule: ticks count from then.
        let first = stores[0].look_at_schedule(&schedule, start).await.unwrap();
        assert_eq!((first.job, first.next_tick), (None, Some(ms("2026-11-27T10:00:01Z"))));
        for second in 1..=120 {
            let tick = start - 500 + second * 1000;
            let looks = stores.iter().enumerate().map(|(i, store)| {
                let schedule = schedule.clone();
                let store = store.clone();
                // Clocks a little apart, and each scheduler a little late.
                tokio::spawn(async move { store.look_at_schedule(&schedule, tick + 3 * i as i64).await })
            });
            let mut fired = 0;
            for look in looks.collect::<Vec<_>>() {
                let look = look.await.unwrap().unwrap();
                if let Some(_job) = look.job {
                    assert_eq!((look.tick, look.late), (Some(tick), false));
                    fired += 1;
                }
                assert_eq!(look.next_tick, Some(tick + 1000));
            }
            assert_eq!(fired, 1, "tick {second}: {fired} jobs");
        }
        let by_tick = jobs_by_tick(&stores[1], "pulse").await;
        assert_eq!(by_tick.len(), 120);
        assert!(by_tick.values().all(|ids| ids.len() == 1), "{by_tick:?}");
        let ticks: Vec<i64> = by_tick.keys().copied().collect();
        assert_eq!(ticks, (1..=120).map(|s| start - 500 + s * 1000).collect::<Vec<_>>());
        // Each job is due at its tick.
        let (tick, ids) = by_tick.iter().next().unwrap();
        let job = stores[2].get(ids[0]).await.unwrap();
        assert_eq!((job.name.as_str(), job.state), ("noop", JobState::Available));
        assert_eq!(job.run_at_ms, *tick);
    }

    /// Ticks missed while no scheduler ran: one job for all of them
    /// (run-once), or none (skip); a tick on time always runs.
    pub(crate) async fn missed_ticks_run_once_or_are_skipped<S: Store>(stores: &[S]) {
        let store = &stores[0];
        let hourly = Schedule::every("hourly", noop(), Duration::from_secs(3600)).unwrap();
        let skipping =
            Schedule::every("hourly-skip", noop(), Duration::from_secs(3600)).unwrap().missed(Missed::Skip);
        let h = |hour: i64| ms("2026-11-27T00:00:00Z") + hour * 3_600_000;
        for s in [&hourly, &skipping] {
            store.look_at_schedule(s, h(5) + 60_000).await.unwrap();
        }
        // Nothing ran from 05:01 to 09:30: 06, 07, 08 and 09 were missed.
        let late = store.look_at_schedule(&hourly, h(9) + 1_800_000).await.unwrap();
        assert_eq!((late.tick, late.late, late.next_tick), (Some(h(6)), true, Some(h(10))));
        assert!(late.job.is_some());
        let skipped = store.look_at_schedule(&skipping, h(9) + 1_800_000).await.unwrap();
        assert_eq!((skipped.job, skipped.next_tick), (None, Some(h(10))));
        // Back on time at 10:00 (a second late): both run.
        for s in [&hourly, &skipping] {
            let look = store.look_at_schedule(s, h(10) + 1000).await.unwrap();
            assert_eq!((look.tick, look.late), (Some(h(10)), false), "{}", s.name());
        }
        assert_eq!(jobs_by_tick(store, "hourly").await.keys().copied().collect::<Vec<_>>(), [h(6), h(10)]);
        assert_eq!(jobs_by_tick(store, "hourly-skip").await.keys().copied().collect::<Vec<_>>(), [h(10)]);
    }

    /// The store lists what it knows; a schedule declared with other ticks
    /// is a schedule of its own, starting when first seen; a cron schedule
    /// ticks in its time zone.
    pub(crate) async fn schedules_are_listed_and_a_changed_one_restarts<S: Store>(stores: &[S]) {
        let store = &stores[0];
        let nightly =
            Schedule::cron("nightly", noop(), "0 3 * * *").unwrap().time_zone("Europe/Paris").unwrap();
        let t0 = ms("2026-11-27T12:00:00Z");
        store.look_at_schedule(&nightly, t0).await.unwrap();
        let look = store.look_at_schedule(&nightly, ms("2026-11-28T02:00:10Z")).await.unwrap();
        // 03:00 in Paris in November is 02:00 UTC.
        assert_eq!((look.tick, look.late), (Some(ms("2026-11-28T02:00:00Z")), false));
        let listed = store.schedules().await.unwrap();
        assert_eq!(listed.len(), 1);
        let info = &listed[0];
        assert_eq!(
            (info.name.as_str(), info.job.as_str(), info.spec.as_str(), info.missed.as_str()),
            ("nightly", "noop", "cron 0 3 * * * Europe/Paris", "run-once")
        );
        assert_eq!((info.last_job, info.next_tick), (look.job, Some(ms("2026-11-29T02:00:00Z"))));
        assert_eq!(info.seen_at, ms("2026-11-28T02:00:10Z"));
        // Declared at 04:00 instead (a new version deployed), first looked
        // at two days later: a schedule of its own, whose ticks count from
        // then (the old declaration's are not owed to it).
        let moved =
            Schedule::cron("nightly", noop(), "0 4 * * *").unwrap().time_zone("Europe/Paris").unwrap();
        let look = store.look_at_schedule(&moved, ms("2026-11-30T12:00:00Z")).await.unwrap();
        assert_eq!((look.job, look.next_tick), (None, Some(ms("2026-12-01T03:00:00Z"))));
        let listed = store.schedules().await.unwrap();
        let specs: Vec<&str> = listed.iter().map(|s| s.spec.as_str()).collect();
        assert_eq!(specs, ["cron 0 4 * * * Europe/Paris", "cron 0 3 * * * Europe/Paris"]);
        // Both versions running side by side (a rolling deploy): each
        // enqueues its own ticks, once; neither resets the other.
        let old = stores[1].look_at_schedule(&nightly, ms("2026-12-01T02:00:05Z")).await.unwrap();
        assert_eq!((old.tick, old.late), (Some(ms("2026-12-01T02:00:00Z")), true));
        let new = stores[2].look_at_schedule(&moved, ms("2026-12-01T03:00:05Z")).await.unwrap();
        assert_eq!((new.tick, new.late), (Some(ms("2026-12-01T03:00:00Z")), false));
        for (store, schedule) in [(&stores[1], &nightly), (&stores[2], &moved)] {
            assert_eq!(store.look_at_schedule(schedule, ms("2026-12-01T03:00:06Z")).await.unwrap().job, None);
        }
    }
}

on_both_stores!(
    racing_schedulers_enqueue_each_tick_once,
    missed_ticks_run_once_or_are_skipped,
    schedules_are_listed_and_a_changed_one_restarts,
);

/// Three consumers of one registry with a 1-second schedule, in real time:
/// the jobs of its ticks are enqueued once each and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_run_their_registrys_schedules() {
    let db = sqlite(3).await;
    let Db::Sqlite(stores, _) = &db else { unreachable!() };
    let registry = Registry::new()
        .register("noop", |_: serde_json::Value, _ctx: JobContext| async { Ok(()) })
        .schedule(Schedule::every("pulse", noop(), Duration::from_secs(1)).unwrap())
        .unwrap();
    let (stop, consumers) = consumers(stores, &registry, &[("default", 16)]);
    tokio::time::sleep(Duration::from_millis(4_300)).await;
    stop.send_replace(true);
    for consumer in consumers {
        consumer.await.unwrap();
    }
    let by_tick = jobs_by_tick(&stores[0], "pulse").await;
    // Registered at the first look; then a tick a second (4 or 5 of them,
    // as the first look fell).
    assert!((3..=5).contains(&by_tick.len()), "{by_tick:?}");
    assert!(by_tick.values().all(|ids| ids.len() == 1), "{by_tick:?}");
    let ticks: Vec<i64> = by_tick.keys().copied().collect();
    assert!(ticks.windows(2).all(|w| w[1] - w[0] == 1000), "{ticks:?}");
    let stats = stores[0].stats().await.unwrap();
    assert_eq!(stats[&JobState::Succeeded] as usize + stats[&JobState::Available] as usize, by_tick.len());
    let listed = stores[0].schedules().await.unwrap();
    assert_eq!((listed[0].name.as_str(), listed[0].spec.as_str()), ("pulse", "every 1s"));
    db.clean_up().await;
}

/// Declarations a registry refuses, with the reason.
#[test]
fn a_registry_refuses_schedules_it_cannot_run() {
    let registry =
        Registry::new().register("noop", |_: serde_json::Value, _ctx: JobContext| async { Ok(()) });
    let unknown = Schedule::every("s", NewJob::new("mail", json!({})), Duration::from_secs(60)).unwrap();
    let err = registry.clone().schedule(unknown).unwrap_err().to_string();
    assert!(err.contains("schedule `s`") && err.contains("unknown job `mail`"), "{err}");
    let once = registry.schedule(Schedule::every("s", noop(), Duration::from_secs(60)).unwrap()).unwrap();
    let err = once.schedule(Schedule::every("s", noop(), Duration::from_secs(5)).unwrap()).unwrap_err();
    assert!(err.to_string().contains("two schedules are named `s`"), "{err}");
}
