//! One test suite for every job store backend (sqlx's pattern): SQLite on
//! temporary files always; PostgreSQL when `FASTLANE_TEST_PG_URL` is set
//! (each test in a schema of its own), and said to be skipped otherwise.

use std::time::Duration;

use fastlane_jobs::{Done, Error, JobState, Lease, NewJob, PgStore, Retention, SqliteStore, Store};
use serde_json::json;
use support::{postgres, unique_name, Db};

const LEASE: Duration = Duration::from_secs(15);

mod support;

/// The behaviour every store must have.
mod suite {
    use super::*;

    pub(crate) async fn list_and_retry_a_dead_job<S: Store>(store: &S) {
        let a = store.enqueue(NewJob::new("a", json!(null)).max_attempts(1)).await.unwrap();
        let b = store.enqueue(NewJob::new("b", json!(null))).await.unwrap();
        let job = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(job.id, a);
        assert_eq!(
            store.fail(Lease { job: a, token: job.token }, "boom", true).await.unwrap(),
            JobState::Dead
        );
        let all = store.list(None, 10).await.unwrap();
        assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), [b, a]);
        let dead = store.list(Some(JobState::Dead), 10).await.unwrap();
        assert_eq!((dead.len(), dead[0].last_error.as_deref()), (1, Some("boom")));
        // A pending job is left as it is.
        assert_eq!(store.retry(b).await.unwrap(), JobState::Available);
        let other = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(other.id, b);
        store.complete(Lease { job: b, token: other.token }).await.unwrap();
        assert_eq!(store.retry(a).await.unwrap(), JobState::Available);
        let again = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!((again.id, again.attempt, again.max_attempts), (a, 2, 2));
    }

    pub(crate) async fn a_jobs_request_id_is_stored_and_handed_to_its_attempt<S: Store>(store: &S) {
        let tagged = store.enqueue(NewJob::new("a", json!(null)).request_id("req-7f3a")).await.unwrap();
        let untagged = store.enqueue_many(vec![NewJob::new("b", json!(null))]).await.unwrap()[0];
        assert_eq!(store.get(tagged).await.unwrap().request_id.as_deref(), Some("req-7f3a"));
        assert_eq!(store.get(untagged).await.unwrap().request_id, None);
        let claimed = store.claim_many("default", "w", LEASE, 10).await.unwrap();
        let ids: Vec<_> = claimed.iter().map(|j| (j.id, j.request_id.as_deref())).collect();
        assert_eq!(ids, [(tagged, Some("req-7f3a")), (untagged, None)]);
    }

    pub(crate) async fn batches_keep_their_order_and_are_all_or_nothing<S: Store>(store: &S) {
        let jobs: Vec<NewJob> = (0..300).map(|i| NewJob::new("noop", json!({ "i": i }))).collect();
        let ids = store.enqueue_many(jobs).await.unwrap();
        assert_eq!(ids.len(), 300);
        for (i, id) in ids.iter().enumerate().step_by(37) {
            assert_eq!(store.get(*id).await.unwrap().payload, json!({ "i": i }), "ids follow the batch");
        }
        // A key taken by a pending job, or given twice in a batch, refuses the
        // whole batch.
        store.enqueue(NewJob::new("noop", json!(null)).unique_key("k1")).await.unwrap();
        let before = store.stats().await.unwrap()[&JobState::Available];
        for batch in [
            vec![NewJob::new("noop", json!(null)), NewJob::new("noop", json!(null)).unique_key("k1")],
            vec![
                NewJob::new("a", json!(null)).unique_key("k2"),
                NewJob::new("b", json!(null)).unique_key("k2"),
            ],
            vec![NewJob::new("noop", json!(null)), NewJob::new("", json!(null))],
        ] {
            assert!(matches!(store.enqueue_many(batch).await, Err(Error::Duplicate(_) | Error::Invalid(_))));
        }
        assert_eq!(store.stats().await.unwrap()[&JobState::Available], before, "nothing of a refused batch");
        assert!(store.enqueue_many(Vec::new()).await.unwrap().is_empty());
        // Claims come in the order the jobs are due, up to the limit.
        let urgent = store.enqueue(NewJob::new("noop", json!(null)).priority(3)).await.unwrap();
        let claimed = store.claim_many("default", "w", LEASE, 100).await.unwrap();
        assert_eq!(claimed.len(), 100);
        assert_eq!(claimed[0].id, urgent);
        assert_eq!(claimed[1..].iter().map(|j| j.id).collect::<Vec<_>>(), ids[..99]);
        // The running attempt is in the job's history before it ends.
        let running = store.get(claimed[1].id).await.unwrap();
        assert_eq!(running.attempts.len(), 1);
        assert_eq!(
            (running.attempts[0].consumer.as_str(), running.attempts[0].outcome.as_deref()),
            ("w", None)
        );
        // A batch completion records the owners and names the fenced.
        let zombie = Lease { job: claimed[2].id, token: claimed[2].token + 7 };
        let done: Vec<Done> = claimed
            .iter()
            .filter(|j| j.id != zombie.job)
            .map(|j| j.lease().into())
            .chain([zombie.into()])
            .collect();
        assert_eq!(store.complete_many(&done).await.unwrap(), [zombie]);
        assert_eq!(store.stats().await.unwrap()[&JobState::Succeeded], 99);
        let info = store.get(claimed[1].id).await.unwrap();
        assert_eq!(info.state, JobState::Succeeded);
        assert_eq!(info.attempts[0].outcome.as_deref(), Some("succeeded"));
        assert!(info.attempts[0].finished_at_ms.is_some());
        assert_eq!(store.get(zombie.job).await.unwrap().state, JobState::Running);
    }

    pub(crate) async fn an_enqueue_wakes_idle_workers<S: Store>(store: &S) {
        let wake = store.wakeups().expect("both stores wake idle workers");
        // PostgreSQL's listener connects in the background: an enqueue before
        // it listens is not seen, so try for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let woken = wake.clone().notified_owned();
            store.enqueue(NewJob::new("noop", json!(null))).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(500), woken).await.is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no wake-up after an enqueue");
        }
    }

    pub(crate) async fn concurrent_workers_never_get_the_same_job<S: Store>(store: &S) {
        for i in 0..200 {
            store.enqueue(NewJob::new("noop", json!({ "i": i }))).await.unwrap();
        }
        let mut workers = Vec::new();
        for w in 0..4 {
            let store = store.clone();
            workers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let worker = format!("w{w}");
                while let Some(job) = store.claim("default", &worker, LEASE).await.unwrap() {
                    store.complete(job.lease()).await.unwrap();
                    got.push(job.id);
                }
                got
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        let claimed = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!((claimed, all.len()), (200, 200), "a job was claimed twice or lost");
        assert_eq!(store.stats().await.unwrap()[&JobState::Succeeded], 200);
    }

    pub(crate) async fn a_job_runs_once_and_succeeds<S: Store>(store: &S) {
        let id = store.enqueue(NewJob::new("noop", json!({"n": 1}))).await.unwrap();
        assert_eq!(store.get(id).await.unwrap().state, JobState::Available);
        let job = store.claim("default", "w1", LEASE).await.unwrap().unwrap();
        assert_eq!((job.id, job.name.as_str(), job.attempt, &job.payload), (id, "noop", 1, &json!({"n": 1})));
        // Nobody else gets it while it runs.
        assert!(store.claim("default", "w2", LEASE).await.unwrap().is_none());
        assert!(!store.heartbeat(Lease { job: id, token: job.token }, LEASE).await.unwrap());
        store.progress(Lease { job: id, token: job.token }, 50, "half").await.unwrap();
        store.complete(Lease { job: id, token: job.token }).await.unwrap();
        let info = store.get(id).await.unwrap();
        assert_eq!(info.state, JobState::Succeeded);
        assert_eq!(info.attempts.len(), 1);
        assert_eq!(info.attempts[0].consumer, "w1");
        assert_eq!(info.attempts[0].outcome.as_deref(), Some("succeeded"));
    }

    pub(crate) async fn higher_priority_first_then_oldest_and_scheduled_jobs_wait<S: Store>(store: &S) {
        let low = store.enqueue(NewJob::new("a", json!(null))).await.unwrap();
        let high = store.enqueue(NewJob::new("b", json!(null)).priority(5)).await.unwrap();
        let later = store
            .enqueue(NewJob::new("c", json!(null)).priority(9).delay(Duration::from_secs(3600)))
            .await
            .unwrap();
        let other_queue = store.enqueue(NewJob::new("d", json!(null)).queue("mail")).await.unwrap();
        assert_eq!(store.get(later).await.unwrap().state, JobState::Scheduled);
        assert_eq!(store.claim("default", "w", LEASE).await.unwrap().unwrap().id, high);
        assert_eq!(store.claim("default", "w", LEASE).await.unwrap().unwrap().id, low);
        assert!(store.claim("default", "w", LEASE).await.unwrap().is_none(), "the scheduled job is not due");
        assert_eq!(store.claim("mail", "w", LEASE).await.unwrap().unwrap().id, other_queue);
    }

    pub(crate) async fn a_dead_workers_job_is_taken_over_and_the_zombie_is_fenced<S: Store>(store: &S) {
        let id = store.enqueue(NewJob::new("sleep", json!({"ms": 10}))).await.unwrap();
        let zombie = store.claim("default", "w1", Duration::from_millis(50)).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        // The lease has expired: the next claim takes the job over.
        let fresh = store.claim("default", "w2", LEASE).await.unwrap().unwrap();
        assert_eq!((fresh.id, fresh.attempt), (id, 2));
        assert_ne!(fresh.token, zombie.token);
        // The first attempt comes back to life: every write it tries is rejected.
        assert!(store.complete(Lease { job: id, token: zombie.token }).await.unwrap_err().is_fenced());
        assert!(store
            .heartbeat(Lease { job: id, token: zombie.token }, LEASE)
            .await
            .unwrap_err()
            .is_fenced());
        assert!(store
            .fail(Lease { job: id, token: zombie.token }, "late", true)
            .await
            .unwrap_err()
            .is_fenced());
        store.complete(Lease { job: id, token: fresh.token }).await.unwrap();
        let info = store.get(id).await.unwrap();
        assert_eq!(info.state, JobState::Succeeded);
        let outcomes: Vec<_> = info.attempts.iter().map(|a| a.outcome.clone().unwrap_or_default()).collect();
        assert_eq!(outcomes, ["lease expired", "succeeded"]);
    }

    pub(crate) async fn failures_retry_with_backoff_then_the_job_is_dead<S: Store>(store: &S) {
        let id = store.enqueue(NewJob::new("fail", json!(null)).max_attempts(2)).await.unwrap();
        let first = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(
            store.fail(Lease { job: id, token: first.token }, "boom", true).await.unwrap(),
            JobState::Retrying
        );
        let info = store.get(id).await.unwrap();
        assert_eq!((info.state, info.last_error.as_deref()), (JobState::Retrying, Some("boom")));
        // Not due before its backoff (at least 1 s).
        assert!(store.claim("default", "w", LEASE).await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(1400)).await;
        let second = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(second.attempt, 2);
        assert_eq!(
            store.fail(Lease { job: id, token: second.token }, "boom again", true).await.unwrap(),
            JobState::Dead
        );
        // A permanent failure is dead at once.
        let id = store.enqueue(NewJob::new("fail", json!(null))).await.unwrap();
        let job = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(
            store.fail(Lease { job: id, token: job.token }, "bad payload", false).await.unwrap(),
            JobState::Dead
        );
    }

    pub(crate) async fn unique_keys_allow_one_pending_job<S: Store>(store: &S) {
        let id = store.enqueue(NewJob::new("mail", json!(null)).unique_key("welcome:ada")).await.unwrap();
        let err =
            store.enqueue(NewJob::new("mail", json!(null)).unique_key("welcome:ada")).await.unwrap_err();
        assert!(matches!(err, Error::Duplicate(ref k) if k == "welcome:ada"), "{err}");
        let job = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        store.complete(Lease { job: id, token: job.token }).await.unwrap();
        // Done: the key is free again.
        store.enqueue(NewJob::new("mail", json!(null)).unique_key("welcome:ada")).await.unwrap();
    }

    pub(crate) async fn cancellation_of_pending_and_running_jobs<S: Store>(store: &S) {
        let pending =
            store.enqueue(NewJob::new("a", json!(null)).delay(Duration::from_secs(60))).await.unwrap();
        assert_eq!(store.cancel(pending).await.unwrap(), JobState::Cancelled);
        let running = store.enqueue(NewJob::new("b", json!(null))).await.unwrap();
        let job = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(store.cancel(running).await.unwrap(), JobState::Running);
        // The running attempt sees the request at its next heartbeat.
        assert!(store.heartbeat(Lease { job: running, token: job.token }, LEASE).await.unwrap());
        let other = store.enqueue(NewJob::new("c", json!(null))).await.unwrap();
        store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(store.cancel_requested(&[running, other, 999]).await.unwrap(), [running]);
        store.cancelled(Lease { job: running, token: job.token }).await.unwrap();
        assert_eq!(store.get(running).await.unwrap().state, JobState::Cancelled);
        assert!(matches!(store.cancel(999).await.unwrap_err(), Error::NotFound(999)));
    }

    pub(crate) async fn a_released_job_is_available_at_once_without_losing_an_attempt<S: Store>(store: &S) {
        let id = store.enqueue(NewJob::new("a", json!(null))).await.unwrap();
        let job = store.claim("default", "w1", LEASE).await.unwrap().unwrap();
        store.progress(Lease { job: id, token: job.token }, 40, "reading").await.unwrap();
        store.release(Lease { job: id, token: job.token }).await.unwrap();
        // The attempt is given back, and with it the progress it reported.
        let info = store.get(id).await.unwrap();
        assert_eq!(
            (info.state, info.attempt, info.progress, info.progress_message),
            (JobState::Available, 0, None, None)
        );
        let again = store.claim("default", "w2", LEASE).await.unwrap().unwrap();
        assert_eq!((again.id, again.attempt), (id, 1));
        assert!(store.release(Lease { job: id, token: job.token }).await.unwrap_err().is_fenced());
    }

    use fastlane_jobs::now_ms as now;

    /// Claims and completes every available job of the default queue.
    async fn run_all<S: Store>(store: &S) {
        loop {
            let claimed = store.claim_many("default", "w", LEASE, 500).await.unwrap();
            if claimed.is_empty() {
                return;
            }
            let done: Vec<Done> = claimed.iter().map(|job| job.lease().into()).collect();
            assert!(store.complete_many(&done).await.unwrap().is_empty());
        }
    }

    pub(crate) async fn finished_jobs_are_pruned_after_their_retention_with_their_attempts<S: Store>(
        store: &S,
    ) {
        const HOUR: i64 = 3_600_000;
        // Succeeds at its second attempt: its failed first one is a record
        // of its own (a success is read off the job's row).
        let ok = store.enqueue(NewJob::new("ok", json!(null))).await.unwrap();
        let first = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(store.fail(first.lease(), "flaky", true).await.unwrap(), JobState::Retrying);
        assert_eq!(store.retry(ok).await.unwrap(), JobState::Available);
        run_all(store).await;
        let outcomes: Vec<_> = store.get(ok).await.unwrap().attempts.into_iter().map(|a| a.outcome).collect();
        assert_eq!(outcomes, [Some("failed".to_owned()), Some("succeeded".to_owned())]);
        let cancelled = store.enqueue(NewJob::new("c", json!(null))).await.unwrap();
        assert_eq!(store.cancel(cancelled).await.unwrap(), JobState::Cancelled);
        let dead = store.enqueue(NewJob::new("d", json!(null)).max_attempts(1)).await.unwrap();
        let claimed = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(store.fail(claimed.lease(), "boom", true).await.unwrap(), JobState::Dead);
        // Never pruned, however old: a job waiting to run, and a running one.
        let waiting =
            store.enqueue(NewJob::new("w", json!(null)).delay(Duration::from_secs(3600))).await.unwrap();
        let running = store.enqueue(NewJob::new("r", json!(null))).await.unwrap();
        assert_eq!(store.claim("default", "w", LEASE).await.unwrap().unwrap().id, running);
        let before = store.table_sizes().await.unwrap();
        assert_eq!((before.jobs, before.attempts), (5, 2), "{before:?}");
        assert!(before.bytes > 0);

        let retention = Retention::default();
        let t = now();
        assert_eq!(store.prune(&retention, t + HOUR).await.unwrap(), 0);
        // A day later: the succeeded and the cancelled job go, with the
        // succeeded one's failed attempt; the dead one stays a week.
        assert_eq!(store.prune(&retention, t + 25 * HOUR).await.unwrap(), 2);
        for gone in [ok, cancelled] {
            assert!(matches!(store.get(gone).await, Err(Error::NotFound(_))), "{gone}");
        }
        let after = store.table_sizes().await.unwrap();
        assert_eq!((after.jobs, after.attempts), (3, 1), "{after:?}");
        assert_eq!(store.get(dead).await.unwrap().state, JobState::Dead);
        assert_eq!(store.prune(&retention, t + 8 * 24 * HOUR).await.unwrap(), 1);
        assert!(matches!(store.get(dead).await, Err(Error::NotFound(_))));
        assert_eq!(store.prune(&retention, t + 365 * 24 * HOUR).await.unwrap(), 0);
        assert_eq!(store.get(waiting).await.unwrap().state, JobState::Scheduled);
        assert_eq!(store.get(running).await.unwrap().state, JobState::Running);
        assert_eq!(store.table_sizes().await.unwrap().attempts, 0);
    }

    pub(crate) async fn pruning_goes_in_bounded_batches<S: Store>(store: &S) {
        let jobs: Vec<NewJob> = (0..2_500).map(|i| NewJob::new("noop", json!({ "i": i }))).collect();
        let ids = store.enqueue_many(jobs).await.unwrap();
        run_all(store).await;
        let retention = Retention { succeeded: Duration::ZERO, batch: 1000, ..Retention::default() };
        let later = now() + 1000;
        let mut batches = Vec::new();
        loop {
            let n = store.prune(&retention, later).await.unwrap();
            batches.push(n);
            if n == 0 {
                break;
            }
            // Between batches the store takes other work at once.
            let id = store
                .enqueue(NewJob::new("between", json!(null)).delay(Duration::from_secs(60)))
                .await
                .unwrap();
            assert_eq!(store.get(id).await.unwrap().state, JobState::Scheduled);
        }
        assert_eq!(batches, [1000, 1000, 500, 0]);
        assert!(matches!(store.get(ids[0]).await, Err(Error::NotFound(_))));
        assert_eq!(store.table_sizes().await.unwrap().jobs, 3, "the three jobs enqueued between batches");
    }

    pub(crate) async fn a_success_is_stored_with_its_result<S: Store>(store: &S) {
        let ids = store
            .enqueue_many(vec![
                NewJob::new("a", json!(null)),
                NewJob::new("b", json!(null)),
                NewJob::new("c", json!(null)),
            ])
            .await
            .unwrap();
        let claimed = store.claim_many("default", "w", LEASE, 3).await.unwrap();
        let value =
            json!({"url": "https://example.com/7.png", "sizes": [64, 128], "note": "quote \" and ünïcode"});
        let done = [
            Done { lease: claimed[0].lease(), result: Some(value.clone()) },
            Done { lease: claimed[1].lease(), result: None },
            // A zombie's result is fenced off with its success.
            Done {
                lease: Lease { job: claimed[2].id, token: claimed[2].token + 1 },
                result: Some(json!("stale")),
            },
        ];
        assert_eq!(store.complete_many(&done).await.unwrap().len(), 1);
        assert_eq!(store.get(ids[0]).await.unwrap().result, Some(value));
        assert_eq!(store.get(ids[1]).await.unwrap().result, None);
        let zombie = store.get(ids[2]).await.unwrap();
        assert_eq!((zombie.state, zombie.result), (JobState::Running, None));
        // Read back the same across processes: `wait_for_result` polls the row.
        let read: serde_json::Value =
            fastlane_jobs::wait_for_result(store, ids[0], Duration::from_secs(1)).await.unwrap();
        assert_eq!(read["sizes"], json!([64, 128]));
    }

    pub(crate) async fn dead_jobs_of_a_type_are_retried_in_bounded_steps<S: Store>(store: &S) {
        let kill = |name: &'static str| async move {
            let id = store.enqueue(NewJob::new(name, json!(null)).max_attempts(1)).await.unwrap();
            let job = store.claim("default", "w", LEASE).await.unwrap().unwrap();
            assert_eq!(store.fail(job.lease(), "boom", true).await.unwrap(), JobState::Dead);
            id
        };
        let mut mails = Vec::new();
        for _ in 0..3 {
            mails.push(kill("mail").await);
        }
        let report = kill("report").await;
        let ok = store.enqueue(NewJob::new("mail", json!(null))).await.unwrap();
        // Two at a time: oldest first.
        assert_eq!(store.retry_dead(Some("mail"), 2).await.unwrap(), 2);
        assert_eq!(store.get(mails[0]).await.unwrap().state, JobState::Available);
        assert_eq!(store.get(mails[2]).await.unwrap().state, JobState::Dead);
        assert_eq!(store.retry_dead(Some("mail"), 2).await.unwrap(), 1);
        assert_eq!(store.retry_dead(Some("mail"), 2).await.unwrap(), 0);
        assert_eq!(store.get(report).await.unwrap().state, JobState::Dead);
        // Any type; each gets one more attempt.
        assert_eq!(store.retry_dead(None, 100).await.unwrap(), 1);
        let again = store.get(report).await.unwrap();
        assert_eq!((again.state, again.max_attempts), (JobState::Available, 2));
        assert_eq!(store.get(ok).await.unwrap().state, JobState::Available);
        assert_eq!(store.stats().await.unwrap()[&JobState::Dead], 0);
    }

    pub(crate) async fn activity_counts_the_jobs_that_ended_per_stretch<S: Store>(store: &S) {
        let since = now();
        store.enqueue_many((0..5).map(|_| NewJob::new("a", json!(null))).collect()).await.unwrap();
        run_all(store).await;
        store.enqueue(NewJob::new("d", json!(null)).max_attempts(1)).await.unwrap();
        let job = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        store.fail(job.lease(), "boom", false).await.unwrap();
        let cancelled = store.enqueue(NewJob::new("c", json!(null))).await.unwrap();
        store.cancel(cancelled).await.unwrap();
        store.enqueue(NewJob::new("still waiting", json!(null))).await.unwrap();
        let minute = Duration::from_secs(60);
        let stretches = store.activity(since - 3_600_000, minute).await.unwrap();
        assert!(!stretches.is_empty() && stretches.len() <= 2, "{stretches:?}");
        assert!(
            stretches.iter().all(|s| s.start_ms % 60_000 == 0 && s.start_ms >= since - 60_000),
            "{stretches:?}"
        );
        let total = |f: fn(&fastlane_jobs::Activity) -> u64| stretches.iter().map(f).sum::<u64>();
        assert_eq!((total(|s| s.succeeded), total(|s| s.dead), total(|s| s.cancelled)), (5, 1, 1));
        // Nothing ended after now.
        assert!(store.activity(now() + 60_000, minute).await.unwrap().is_empty());
    }

    /// What the dashboard reads: counts per queue, dead jobs per type, and
    /// a running job's progress in the listing.
    pub(crate) async fn counts_per_queue_dead_per_type_and_progress_in_listings<S: Store>(store: &S) {
        store
            .enqueue_many(vec![NewJob::new("a", json!(null)), NewJob::new("a", json!(null)).queue("mail")])
            .await
            .unwrap();
        for name in ["mail", "mail", "report"] {
            store.enqueue(NewJob::new(name, json!(null)).queue("slow").max_attempts(1)).await.unwrap();
        }
        for _ in 0..3 {
            let job = store.claim("slow", "w", LEASE).await.unwrap().unwrap();
            store.fail(job.lease(), "boom", false).await.unwrap();
        }
        let running = store.claim("mail", "w", LEASE).await.unwrap().unwrap();
        store.progress(running.lease(), 40, "page 4 of 10").await.unwrap();
        let queues = store.queue_stats().await.unwrap();
        let names: Vec<&str> = queues.iter().map(|(q, _)| q.as_str()).collect();
        assert_eq!(names, ["default", "mail", "slow"]);
        assert_eq!(queues[0].1[&JobState::Available], 1);
        assert_eq!((queues[1].1[&JobState::Running], queues[1].1.len()), (1, JobState::ALL.len()));
        assert_eq!(queues[2].1[&JobState::Dead], 3);
        assert_eq!(store.dead_by_name().await.unwrap(), [("mail".to_owned(), 2), ("report".to_owned(), 1)]);
        let listed = store.list(Some(JobState::Running), 10).await.unwrap();
        assert_eq!(
            (listed[0].progress, listed[0].progress_message.as_deref()),
            (Some(40), Some("page 4 of 10"))
        );
        let dead = store.list(Some(JobState::Dead), 10).await.unwrap();
        assert!(dead.iter().all(|j| j.finished_at_ms.is_some() && j.last_error.as_deref() == Some("boom")));
    }

    pub(crate) async fn stats_name_every_state<S: Store>(store: &S) {
        store.enqueue(NewJob::new("a", json!(null))).await.unwrap();
        store.enqueue(NewJob::new("a", json!(null)).delay(Duration::from_secs(60))).await.unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.len(), 8);
        assert_eq!(stats[&JobState::Waiting], 0);
        assert_eq!(stats[&JobState::Available], 1);
        assert_eq!(stats[&JobState::Scheduled], 1);
        assert_eq!(stats[&JobState::Dead], 0);
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["available"], 1, "{json}");
    }
}

/// A SQLite store in a fresh temporary file, removed when dropped.
struct TempSqlite {
    store: SqliteStore,
    dir: std::path::PathBuf,
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn temp_sqlite() -> TempSqlite {
    let dir = std::env::temp_dir().join(unique_name("fastlane_jobs_test"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("jobs.db").display());
    TempSqlite { store: SqliteStore::open(&url).await.unwrap(), dir }
}

/// A PostgreSQL store in a schema of its own, and the schema to drop after;
/// `None` (and a line on stderr naming the skipped test) without
/// `FASTLANE_TEST_PG_URL`.
async fn temp_pg(test: &str) -> Option<(PgStore, Db)> {
    let db = postgres(test, 1).await?;
    let Db::Postgres(stores, _, _) = &db else { unreachable!() };
    Some((stores[0].clone(), db))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let t = temp_sqlite().await;
                    suite::$name(&t.store).await;
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some((store, db)) = temp_pg(stringify!($name)).await else { return };
                    suite::$name(&store).await;
                    db.clean_up().await;
                }
            )*
        }
    };
}

conformance!(
    a_jobs_request_id_is_stored_and_handed_to_its_attempt,
    batches_keep_their_order_and_are_all_or_nothing,
    an_enqueue_wakes_idle_workers,
    list_and_retry_a_dead_job,
    concurrent_workers_never_get_the_same_job,
    a_job_runs_once_and_succeeds,
    higher_priority_first_then_oldest_and_scheduled_jobs_wait,
    a_dead_workers_job_is_taken_over_and_the_zombie_is_fenced,
    failures_retry_with_backoff_then_the_job_is_dead,
    unique_keys_allow_one_pending_job,
    cancellation_of_pending_and_running_jobs,
    a_released_job_is_available_at_once_without_losing_an_attempt,
    stats_name_every_state,
    counts_per_queue_dead_per_type_and_progress_in_listings,
    finished_jobs_are_pruned_after_their_retention_with_their_attempts,
    pruning_goes_in_bounded_batches,
    a_success_is_stored_with_its_result,
    dead_jobs_of_a_type_are_retried_in_bounded_steps,
    activity_counts_the_jobs_that_ended_per_stretch
);

/// A job enqueued in the application's own transaction exists if and only if
/// the transaction commits, and wakes workers only then.
#[tokio::test]
async fn postgres_enqueue_in_tx_commits_or_rolls_back_with_the_application() {
    let Some((store, db)) = temp_pg("enqueue_in_tx").await else { return };
    let pool = store.pool().clone();
    sqlx::raw_sql("CREATE TABLE users (email TEXT PRIMARY KEY)").execute(&pool).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO users VALUES ('ada@example.com')").execute(&mut *tx).await.unwrap();
    let gone = fastlane_jobs::enqueue_in_tx(&mut tx, NewJob::new("welcome", json!("ada"))).await.unwrap();
    // Not visible outside the transaction before it commits.
    assert!(matches!(store.get(gone).await, Err(Error::NotFound(_))));
    tx.rollback().await.unwrap();
    assert!(matches!(store.get(gone).await, Err(Error::NotFound(_))), "rolled back with the user");

    let wake = store.wakeups().unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO users VALUES ('bob@example.com')").execute(&mut *tx).await.unwrap();
    let jobs = vec![NewJob::new("welcome", json!("bob")), NewJob::new("audit", json!("bob"))];
    let ids = fastlane_jobs::enqueue_many_in_tx(&mut tx, jobs).await.unwrap();
    // Bad input is refused inside the transaction, which stays usable.
    let err = fastlane_jobs::enqueue_in_tx(&mut tx, NewJob::new("", json!(null))).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await; // the listener connects
    let woken = wake.clone().notified_owned();
    tx.commit().await.unwrap();
    for id in ids {
        assert_eq!(store.get(id).await.unwrap().state, JobState::Available);
    }
    tokio::time::timeout(Duration::from_secs(5), woken).await.expect("the commit wakes idle workers");
    db.clean_up().await;
}

#[test]
fn backoff_grows_exponentially_with_bounded_jitter() {
    for (attempt, base) in [(1u32, 1u64), (2, 2), (3, 4), (10, 512)] {
        let b = fastlane_jobs::backoff(attempt);
        assert!(b >= Duration::from_secs(base) && b <= Duration::from_secs(base) * 5 / 4, "{attempt}: {b:?}");
    }
    assert!(fastlane_jobs::backoff(40) <= Duration::from_secs(4500));
}

#[tokio::test]
async fn bad_input_and_bad_files_get_clear_errors() {
    let t = temp_sqlite().await;
    let err = t.store.enqueue(NewJob::new("", json!(null))).await.unwrap_err();
    assert!(err.to_string().contains("`name`"), "{err}");
    let err = t.store.enqueue(NewJob::new("a", json!(null)).max_attempts(0)).await.unwrap_err();
    assert!(err.to_string().contains("`max_attempts`"), "{err}");

    let not_sqlite = t.dir.join("notes.txt");
    std::fs::write(&not_sqlite, "this is not a database, just some text that is long enough").unwrap();
    let err = SqliteStore::open(&format!("sqlite://{}", not_sqlite.display())).await.unwrap_err();
    assert!(matches!(err, Error::NotAJobStore(_)), "{err}");

    let other_app = t.dir.join("other.db");
    {
        let url = format!("sqlite://{}?mode=rwc", other_app.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE users (id INTEGER)").execute(&pool).await.unwrap();
        pool.close().await;
    }
    let err = SqliteStore::open(&format!("sqlite://{}", other_app.display())).await.unwrap_err();
    assert!(err.to_string().contains("no fastlane job schema"), "{err}");

    // Another process holding the write lock past the busy timeout (5 s).
    let url = format!("sqlite://{}", t.dir.join("jobs.db").display());
    let mut other = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut other).await.unwrap();
    let err = t.store.enqueue(NewJob::new("a", json!(null))).await.unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");
    assert!(err.to_string().contains("locked by another process"), "{err}");
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    t.store.enqueue(NewJob::new("a", json!(null))).await.unwrap();

    let err = SqliteStore::open("mysql://localhost/jobs").await.unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    // Reopening a real store keeps its jobs (migrations are idempotent).
    let reopened = SqliteStore::open(&url).await.unwrap();
    assert_eq!(reopened.stats().await.unwrap()[&JobState::Available], 1);
}
