//! Per-queue limits on both stores, held by real consumers on separate
//! handles of one database (as two processes, or two hosts on PostgreSQL):
//! a rate of 50 jobs a second within 10 %, a cap of 3 running at once never
//! exceeded, and limits set, listed and removed. SQLite always; PostgreSQL
//! when `FASTLANE_TEST_PG_URL` is set (said to be skipped otherwise).

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastlane_jobs::{Error, JobContext, JobState, NewJob, QueueLimits, Rate, Registry, Store};
use serde_json::json;
use support::{consumers, on_both_stores, sqlite, Db};

async fn succeeded<S: Store>(store: &S) -> u64 {
    store.stats().await.unwrap()[&JobState::Succeeded]
}

mod suite {
    use super::*;

    pub(crate) async fn limits_are_set_listed_and_removed<S: Store>(stores: &[S]) {
        let store = &stores[0];
        assert!(store.queue_limits().await.unwrap().is_empty());
        let limits = QueueLimits::default().rate(50, Duration::from_secs(1)).unwrap().concurrency(4).unwrap();
        store.set_queue_limits("mail", limits).await.unwrap();
        store.set_queue_limits("reports", QueueLimits::default().concurrency(1).unwrap()).await.unwrap();
        let listed = stores[1].queue_limits().await.unwrap();
        assert_eq!(
            listed,
            [
                ("mail".to_owned(), limits),
                ("reports".to_owned(), QueueLimits::default().concurrency(1).unwrap())
            ]
        );
        // Changed, then removed.
        let slower = QueueLimits::default().rate(5, Duration::from_secs(60)).unwrap();
        store.set_queue_limits("mail", slower).await.unwrap();
        assert_eq!(stores[2].queue_limits().await.unwrap()[0].1.rate, Some(Rate::parse("5/m").unwrap()));
        store.set_queue_limits("mail", QueueLimits::default()).await.unwrap();
        assert_eq!(store.queue_limits().await.unwrap().len(), 1);
        assert!(matches!(store.set_queue_limits(" ", slower).await, Err(Error::Invalid(_))));
        // A claim takes no more than a full bucket, and no more than the cap.
        store
            .set_queue_limits("limited", QueueLimits::default().rate(5, Duration::from_secs(3600)).unwrap())
            .await
            .unwrap();
        store
            .enqueue_many((0..20).map(|_| NewJob::new("noop", json!(null)).queue("limited")).collect())
            .await
            .unwrap();
        let first = store.claim_many("limited", "w", Duration::from_secs(15), 100).await.unwrap();
        assert_eq!(first.len(), 5, "one period's worth");
        assert!(store.claim_many("limited", "w", Duration::from_secs(15), 100).await.unwrap().is_empty());
        assert!(
            store.claim_wait("limited").unwrap() > Duration::from_secs(600),
            "the next token is 12 minutes away"
        );
        store.set_queue_limits("limited", QueueLimits::default().concurrency(7).unwrap()).await.unwrap();
        let more = store.claim_many("limited", "w", Duration::from_secs(15), 100).await.unwrap();
        assert_eq!(more.len(), 2, "5 run already: 2 more fit under a cap of 7");
        store.set_queue_limits("limited", QueueLimits::default()).await.unwrap();
        assert_eq!(store.claim_many("limited", "w", Duration::from_secs(15), 100).await.unwrap().len(), 13);
    }

    /// 50 jobs a second across two consumers on two handles, each of which
    /// could run thousands: measured over 6 s after the first second (which
    /// may spend a full bucket at once), within 10 %.
    pub(crate) async fn a_rate_limit_holds_across_consumers<S: Store>(stores: &[S]) {
        let store = &stores[0];
        store
            .set_queue_limits("limited", QueueLimits::default().rate(50, Duration::from_secs(1)).unwrap())
            .await
            .unwrap();
        store
            .enqueue_many((0..2000).map(|_| NewJob::new("noop", json!(null)).queue("limited")).collect())
            .await
            .unwrap();
        let registry =
            Registry::new().register("noop", |_: serde_json::Value, _ctx: JobContext| async { Ok(()) });
        let (stop, handles) = consumers(&stores[..2], &registry, &[("limited", 16)]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (from, started) = (succeeded(store).await, Instant::now());
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (to, took) = (succeeded(store).await, started.elapsed());
        stop.send_replace(true);
        let mut ran = [0, 0];
        for (i, handle) in handles.into_iter().enumerate() {
            ran[i] = handle.await.unwrap().succeeded.load(Ordering::Relaxed);
        }
        let rate = (to - from) as f64 / took.as_secs_f64();
        assert!(
            (45.0..=55.0).contains(&rate),
            "{rate:.1} jobs/s under a limit of 50/s ({from} -> {to} in {took:?})"
        );
        assert!(ran[0] > 0 && ran[1] > 0, "both consumers ran jobs: {ran:?}");
        let _ = writeln!(
            std::io::stderr(),
            "rate limit 50/s: {rate:.1} jobs/s over {took:?}, consumers ran {ran:?}"
        );
    }

    /// A cap of 3 across two consumers of 16 slots each: never more than 3
    /// run at once, and 3 do.
    pub(crate) async fn a_concurrency_cap_holds_across_consumers<S: Store>(stores: &[S]) {
        let store = &stores[0];
        store.set_queue_limits("limited", QueueLimits::default().concurrency(3).unwrap()).await.unwrap();
        store
            .enqueue_many((0..30).map(|_| NewJob::new("work", json!(null)).queue("limited")).collect())
            .await
            .unwrap();
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (n, m) = (now.clone(), most.clone());
        let registry = Registry::new().register("work", move |_: serde_json::Value, _ctx: JobContext| {
            let (now, most) = (n.clone(), m.clone());
            async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        });
        let (stop, handles) = consumers(&stores[..2], &registry, &[("limited", 16)]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while succeeded(store).await < 30 {
            assert!(Instant::now() < deadline, "the capped jobs did not all run");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send_replace(true);
        for handle in handles {
            handle.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3, "at most 3 at once, and 3 did run together");
    }
}

on_both_stores!(
    limits_are_set_listed_and_removed,
    a_rate_limit_holds_across_consumers,
    a_concurrency_cap_holds_across_consumers,
);

/// A queue without limits is not slowed: its claims take a full batch.
#[tokio::test]
async fn a_queue_without_limits_is_untouched() {
    let db = sqlite(1).await;
    let Db::Sqlite(stores, _) = &db else { unreachable!() };
    let store = &stores[0];
    store.set_queue_limits("other", QueueLimits::default().concurrency(1).unwrap()).await.unwrap();
    store.enqueue_many((0..300).map(|_| NewJob::new("noop", json!(null))).collect()).await.unwrap();
    assert_eq!(store.claim_many("default", "w", Duration::from_secs(15), 256).await.unwrap().len(), 256);
    assert_eq!(store.claim_wait("default"), None);
    db.clean_up().await;
}
