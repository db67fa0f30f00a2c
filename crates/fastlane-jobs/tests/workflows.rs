//! Workflows on both stores: chains run step by step with each result, a
//! chord's final step is released once by the last of its members however
//! they race (three handles on one database, as three processes), a failure
//! cancels what waits for it (at once, transitively, and for jobs enqueued
//! after it), an enqueue racing the success it waits for never hangs, and a
//! consumer runs a chain and a chord end to end. SQLite always; PostgreSQL
//! when `FASTLANE_TEST_PG_URL` is set (said to be skipped otherwise).

mod support;

use std::time::Duration;

use fastlane_jobs::{
    chain, chord, ConsumerConfig, Done, Error, JobContext, JobError, JobState, NewJob, Registry, Retention,
    Store,
};
use serde_json::json;
use support::{on_both_stores, sqlite, Db};

const LEASE: Duration = Duration::from_secs(15);

fn job(name: &str) -> NewJob {
    NewJob::new(name, json!(null))
}

/// Claims the one job due now and completes it with `result`; returns its id.
async fn run_next<S: Store>(store: &S, result: serde_json::Value) -> i64 {
    let claimed = store.claim("default", "w", LEASE).await.unwrap().expect("a job is due");
    store.complete_many(&[Done { lease: claimed.lease(), result: Some(result) }]).await.unwrap();
    claimed.id
}

mod suite {
    use super::*;

    pub(crate) async fn a_chain_runs_step_by_step_with_each_result<S: Store>(stores: &[S]) {
        let store = &stores[0];
        let ids = store.enqueue_many(chain([job("fetch"), job("parse"), job("store")])).await.unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!((stats[&JobState::Available], stats[&JobState::Waiting]), (1, 2));
        let second = store.get(ids[1]).await.unwrap();
        assert_eq!(
            (second.state, second.depends_on.clone(), second.waiting_for),
            (JobState::Waiting, vec![ids[0]], 1)
        );
        assert_eq!(store.get(ids[0]).await.unwrap().dependents, [ids[1]]);

        // Only the first is due; each success releases the next, which is
        // handed the ids it waited for and can read their results.
        assert_eq!(run_next(store, json!({"bytes": 512})).await, ids[0]);
        let step = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!((step.id, step.depends_on.clone()), (ids[1], vec![ids[0]]));
        assert!(store.claim("default", "w", LEASE).await.unwrap().is_none(), "the third still waits");
        assert_eq!(store.results(&step.depends_on).await.unwrap(), [(ids[0], Some(json!({"bytes": 512})))]);
        store.complete_many(&[Done { lease: step.lease(), result: Some(json!(["a", "b"])) }]).await.unwrap();
        assert_eq!(run_next(store, json!(2)).await, ids[2]);
        assert_eq!(store.get(ids[2]).await.unwrap().result, Some(json!(2)));
        assert_eq!(store.stats().await.unwrap()[&JobState::Succeeded], 3);
    }

    /// 100 members completed one by one from three handles at once: the
    /// final step is released exactly once, by the last, with every result.
    pub(crate) async fn a_chords_final_step_is_released_once_by_its_last_member<S: Store>(stores: &[S]) {
        let members = (0..100).map(|i| NewJob::new("part", json!({ "i": i })));
        let ids = stores[0].enqueue_many(chord(members, job("sum"))).await.unwrap();
        let last = *ids.last().unwrap();
        let workers = stores.iter().cloned().map(|store| {
            tokio::spawn(async move {
                let mut ran = 0;
                while let Some(job) = store.claim("default", "w", LEASE).await.unwrap() {
                    if job.name == "sum" {
                        return (ran, Some(job));
                    }
                    let i = job.payload["i"].clone();
                    store.complete_many(&[Done { lease: job.lease(), result: Some(i) }]).await.unwrap();
                    ran += 1;
                }
                (ran, None)
            })
        });
        let mut ran = 0;
        let mut finals = Vec::new();
        for worker in workers {
            let (n, final_step) = worker.await.unwrap();
            ran += n;
            finals.extend(final_step);
        }
        // A worker that drained the queue before the last success may have
        // stopped early: whoever is left takes the final step now.
        if finals.is_empty() {
            finals.extend(stores[0].claim("default", "w", LEASE).await.unwrap());
        }
        assert_eq!(ran, 100);
        assert_eq!(finals.len(), 1, "the final step is claimed once");
        let final_step = finals.pop().unwrap();
        assert_eq!((final_step.id, final_step.depends_on.len()), (last, 100));
        let results = stores[1].results(&final_step.depends_on).await.unwrap();
        let values: Vec<i64> = results.iter().map(|(_, r)| r.as_ref().unwrap().as_i64().unwrap()).collect();
        assert_eq!(values, (0..100).collect::<Vec<_>>(), "every member's result, in the members' order");
        assert_eq!(stores[2].get(last).await.unwrap().waiting_for, 0);
    }

    /// A member that dies, a step cancelled, a job enqueued after a failed
    /// one and a last attempt whose lease expires: each settles what waits
    /// for it as cancelled, naming why, with no hang.
    pub(crate) async fn a_failure_cancels_what_waits_for_it<S: Store>(stores: &[S]) {
        let store = &stores[0];
        // A chord member dies: the final step is cancelled, and so is what
        // waits for the final step.
        let mut batch = chord([job("a").max_attempts(1), job("b")], job("final"));
        batch.push(job("after-final").after_nth(2));
        let ids = store.enqueue_many(batch).await.unwrap();
        let a = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        assert_eq!(store.fail(a.lease(), "boom", false).await.unwrap(), JobState::Dead);
        for waiter in [ids[2], ids[3]] {
            let info = store.get(waiter).await.unwrap();
            assert_eq!(info.state, JobState::Cancelled, "{waiter}");
            let why = format!("cancelled: it waits for job {}, which ended dead", ids[0]);
            assert_eq!(info.last_error.as_deref(), Some(why.as_str()));
        }
        // The other member still runs; its success releases nothing.
        assert_eq!(run_next(store, json!(1)).await, ids[1]);
        assert!(store.claim("default", "w", LEASE).await.unwrap().is_none());

        // A chain's first step cancelled before it ran: the rest with it.
        let steps = store.enqueue_many(chain([job("x"), job("y"), job("z")])).await.unwrap();
        assert_eq!(store.cancel(steps[0]).await.unwrap(), JobState::Cancelled);
        for step in &steps[1..] {
            assert_eq!(store.get(*step).await.unwrap().state, JobState::Cancelled);
        }
        // Enqueued after a job that already failed: cancelled at once.
        let late = store.enqueue(job("late").after(ids[0])).await.unwrap();
        let info = store.get(late).await.unwrap();
        assert_eq!((info.state, info.last_error.is_some()), (JobState::Cancelled, true));
        // A waiting job cancelled by hand takes its own waiters along.
        let pair = store
            .enqueue_many(chain([job("p").delay(Duration::from_secs(60)), job("q"), job("r")]))
            .await
            .unwrap();
        assert_eq!(store.cancel(pair[1]).await.unwrap(), JobState::Cancelled);
        assert_eq!(store.get(pair[2]).await.unwrap().state, JobState::Cancelled);
        assert_eq!(
            store.get(pair[0]).await.unwrap().state,
            JobState::Scheduled,
            "what it waited for is untouched"
        );

        // A last attempt whose lease expires is dead, and its waiters
        // cancelled, when the next claim takes the expired lease in.
        let pair = store.enqueue_many(chain([job("slow").max_attempts(1), job("next")])).await.unwrap();
        let slow = store.claim("default", "w", Duration::from_millis(50)).await.unwrap().unwrap();
        assert_eq!(slow.id, pair[0]);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(store.claim("default", "w", LEASE).await.unwrap().is_none());
        assert_eq!(store.get(pair[0]).await.unwrap().state, JobState::Dead);
        let next = store.get(pair[1]).await.unwrap();
        assert_eq!(next.state, JobState::Cancelled);
        assert!(next.last_error.unwrap().contains("which ended dead"));
        assert_eq!(store.stats().await.unwrap()[&JobState::Waiting], 0, "nothing is left waiting");
    }

    /// An enqueue that waits for a running job, racing that job's success
    /// from another handle: the waiter is either released by the success or
    /// sees it already done. Never left waiting.
    pub(crate) async fn an_enqueue_racing_the_success_it_waits_for_never_hangs<S: Store>(stores: &[S]) {
        for round in 0..40 {
            let first = stores[0].enqueue(job("first")).await.unwrap();
            let claimed = stores[0].claim("default", "w", LEASE).await.unwrap().unwrap();
            assert_eq!(claimed.id, first);
            let (enqueuer, completer) = (stores[1].clone(), stores[2].clone());
            let waiter =
                tokio::spawn(async move { enqueuer.enqueue(job("then").after(first)).await.unwrap() });
            let done = tokio::spawn(async move {
                completer
                    .complete_many(&[Done { lease: claimed.lease(), result: Some(json!(round)) }])
                    .await
                    .unwrap()
            });
            let waiter = waiter.await.unwrap();
            assert!(done.await.unwrap().is_empty());
            let info = stores[0].get(waiter).await.unwrap();
            assert_eq!((info.state, info.waiting_for), (JobState::Available, 0), "round {round}");
            let then = stores[0].claim("default", "w", LEASE).await.unwrap().unwrap();
            assert_eq!(then.id, waiter);
            stores[0].complete(then.lease()).await.unwrap();
        }
    }

    /// Dependencies on jobs that do not exist, or on a later job of the
    /// batch, refuse the whole batch; a workflow's cancelled step can be
    /// retried while what it waits for can still succeed.
    pub(crate) async fn bad_dependencies_are_refused_and_cancelled_steps_retried<S: Store>(stores: &[S]) {
        let store = &stores[0];
        let err = store.enqueue_many(vec![job("a"), job("b").after(999_999)]).await.unwrap_err();
        assert!(
            matches!(&err, Error::Invalid(m) if m.contains("waits for job 999999, which does not exist")),
            "{err}"
        );
        let err = store.enqueue_many(vec![job("a").after_nth(1), job("b")]).await.unwrap_err();
        assert!(matches!(&err, Error::Invalid(m) if m.contains("can only wait for an earlier one")), "{err}");
        assert_eq!(store.stats().await.unwrap().values().sum::<u64>(), 0, "nothing of a refused batch");

        // Cancelled while its first step is pending: a retry makes it wait
        // again, and the first step's success releases it.
        let ids = store.enqueue_many(chain([job("one"), job("two")])).await.unwrap();
        assert_eq!(store.cancel(ids[1]).await.unwrap(), JobState::Cancelled);
        assert_eq!(store.retry(ids[1]).await.unwrap(), JobState::Waiting);
        run_next(store, json!("one")).await;
        assert_eq!(store.get(ids[1]).await.unwrap().state, JobState::Available);
        run_next(store, json!("two")).await;
        // Cancelled because its first step died: refused until that one
        // is retried and succeeds.
        let ids = store.enqueue_many(chain([job("one").max_attempts(1), job("two")])).await.unwrap();
        let one = store.claim("default", "w", LEASE).await.unwrap().unwrap();
        store.fail(one.lease(), "boom", false).await.unwrap();
        let err = store.retry(ids[1]).await.unwrap_err();
        assert!(err.to_string().contains(&format!("waits for job {}, which ended dead", ids[0])), "{err}");
        assert_eq!(store.retry(ids[0]).await.unwrap(), JobState::Available);
        run_next(store, json!(1)).await;
        assert_eq!(store.retry(ids[1]).await.unwrap(), JobState::Available);
    }

    /// Retention keeps a job's result while a job waiting for it may still
    /// run, and prunes both once it has.
    pub(crate) async fn results_are_kept_while_a_waiter_may_read_them<S: Store>(stores: &[S]) {
        const DAY: i64 = 86_400_000;
        let store = &stores[0];
        let ids = store
            .enqueue_many(chain([job("a"), job("b").delay(Duration::from_secs(3 * 86_400))]))
            .await
            .unwrap();
        run_next(store, json!("kept")).await;
        let later = fastlane_jobs::now_ms() + 2 * DAY;
        assert_eq!(store.prune(&Retention::default(), later).await.unwrap(), 0, "b is still to run");
        assert_eq!(
            store.get(ids[1]).await.unwrap().state,
            JobState::Scheduled,
            "released, due in three days"
        );
        assert_eq!(store.cancel(ids[1]).await.unwrap(), JobState::Cancelled);
        assert_eq!(store.prune(&Retention::default(), later).await.unwrap(), 2);
    }
}

on_both_stores!(
    a_chain_runs_step_by_step_with_each_result,
    a_chords_final_step_is_released_once_by_its_last_member,
    a_failure_cancels_what_waits_for_it,
    an_enqueue_racing_the_success_it_waits_for_never_hangs,
    bad_dependencies_are_refused_and_cancelled_steps_retried,
    results_are_kept_while_a_waiter_may_read_them,
);

/// A consumer runs a chain of 10 (each step adds one to the result before)
/// and a chord of 20 (the final step sums its members' results) end to end,
/// on SQLite.
#[tokio::test]
async fn a_consumer_runs_a_chain_and_a_chord_with_their_results() {
    let db = sqlite(1).await;
    let Db::Sqlite(stores, _) = &db else { unreachable!() };
    let store = stores[0].clone();
    let registry = Registry::new()
        .register("start", |n: i64, _ctx: JobContext| async move { Ok(n) })
        .register(
            "add_one",
            |_: serde_json::Value, ctx: JobContext| async move { Ok(ctx.result::<i64>()? + 1) },
        )
        .register("square", |n: i64, _ctx: JobContext| async move { Ok(n * n) })
        .register("sum", |_: serde_json::Value, ctx: JobContext| async move {
            Ok::<i64, JobError>(ctx.results::<i64>()?.into_iter().sum())
        });
    let steps = std::iter::once(NewJob::new("start", json!(0))).chain((0..9).map(|_| job("add_one")));
    let chain_ids = store.enqueue_many(chain(steps)).await.unwrap();
    let members = (1..=20).map(|n| NewJob::new("square", json!(n)));
    let chord_ids = store.enqueue_many(chord(members, job("sum"))).await.unwrap();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let config = ConsumerConfig { queues: vec![("default".into(), 8)], ..ConsumerConfig::default() };
    let consumer = tokio::spawn(fastlane_jobs::run_consumer(
        store.clone(),
        registry,
        config,
        stop_rx,
        Duration::from_secs(5),
    ));
    let end: i64 =
        fastlane_jobs::wait_for_result(&store, *chain_ids.last().unwrap(), Duration::from_secs(30))
            .await
            .unwrap();
    let sum: i64 =
        fastlane_jobs::wait_for_result(&store, *chord_ids.last().unwrap(), Duration::from_secs(30))
            .await
            .unwrap();
    stop_tx.send_replace(true);
    consumer.await.unwrap();
    assert_eq!(end, 9, "ten steps, each one more than the one before");
    assert_eq!(sum, (1..=20).map(|n| n * n).sum::<i64>());
    db.clean_up().await;
}
