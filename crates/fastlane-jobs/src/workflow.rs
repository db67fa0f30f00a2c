//! Workflows: jobs that wait for other jobs. A chain (each step runs with
//! the result of the one before), a chord (a final step that runs once when
//! every member of a group has succeeded), or any graph of dependencies,
//! built with [`NewJob::after`] and [`NewJob::after_nth`], and enqueued
//! together with [`concat`].
//!
//! # How it is kept
//!
//! A job that waits is stored `waiting`, with `deps_left` (how many of the
//! jobs it waits for have yet to succeed) and `depends_on` (their ids, in
//! order); each job waited for lists its waiters in `dependents`. The
//! statement that records a success (fenced by the attempt's token, so it
//! happens once per job) also takes one off `deps_left` of each waiter and
//! makes the waiter due when it reaches zero: a final step is released by
//! exactly one success, the last, in the same transaction as that success.
//! A job waited for that ends dead or cancelled cancels its waiters (and
//! theirs, level by level) in the transaction that ends it; a job enqueued
//! after one that already failed is cancelled at once. Nothing waits on a
//! job that can no longer succeed.
//!
//! On PostgreSQL, an enqueue that waits for stored jobs locks their rows
//! (`FOR UPDATE`, in id order) before it reads their states and adds itself
//! to their `dependents`; a success or failure of one of them either comes
//! first (the enqueue then sees it) or waits for the enqueue's commit (and
//! then reads the new `dependents` off the row it updates). Each level of a
//! cancellation is read off the rows it updates for the same reason.

use std::collections::HashMap;

use crate::job::{Dependency, JobId, JobState, NewJob, Plan};
use crate::Error;

/// A batch in which each job waits for the one before: B runs with A's
/// result, C with B's, and a step that ends dead or cancelled cancels the
/// rest. Enqueue it with [`Store::enqueue_many`](crate::Store::enqueue_many)
/// (one transaction; with other workflows through [`concat`]); the last id
/// is the chain's end.
///
/// ```
/// use fastlane_jobs::{chain, NewJob};
/// use serde_json::json;
///
/// let steps = chain([
///     NewJob::new("fetch", json!({"url": "https://example.com"})),
///     NewJob::new("parse", json!(null)),
///     NewJob::new("store", json!(null)),
/// ]);
/// assert_eq!(steps.len(), 3);
/// ```
pub fn chain(jobs: impl IntoIterator<Item = NewJob>) -> Vec<NewJob> {
    jobs.into_iter().enumerate().map(|(i, job)| if i == 0 { job } else { job.after_nth(i - 1) }).collect()
}

/// A group whose members run in parallel, and a final step (`then`) that
/// runs once, when every member has succeeded, with their results in the
/// members' order (Celery's chord). A member that ends dead or cancelled
/// cancels the final step. Enqueue it with
/// [`Store::enqueue_many`](crate::Store::enqueue_many) (one transaction;
/// with other workflows through [`concat`]); the last id is the final
/// step's.
///
/// ```
/// use fastlane_jobs::{chord, NewJob};
/// use serde_json::json;
///
/// let batch = chord((0..10).map(|i| NewJob::new("resize", json!({"page": i}))), NewJob::new("bind", json!(null)));
/// assert_eq!(batch.len(), 11);
/// ```
pub fn chord(members: impl IntoIterator<Item = NewJob>, then: NewJob) -> Vec<NewJob> {
    let mut batch: Vec<NewJob> = members.into_iter().collect();
    let then = (0..batch.len()).fold(then, NewJob::after_nth);
    batch.push(then);
    batch
}

/// Several workflows (chains, chords, batches of their own) as one batch,
/// to enqueue in one transaction: each part's [`NewJob::after_nth`]
/// positions are moved by where the part lands.
///
/// ```
/// use fastlane_jobs::{chain, concat, NewJob};
///
/// let step = || NewJob::new("step", serde_json::Value::Null);
/// let batch = concat([chain([step(), step()]), chain([step(), step(), step()])]);
/// assert_eq!(batch.len(), 5); // two chains, enqueued together
/// ```
pub fn concat(parts: impl IntoIterator<Item = Vec<NewJob>>) -> Vec<NewJob> {
    let mut batch = Vec::new();
    for part in parts {
        let offset = batch.len();
        batch.extend(part.into_iter().map(|mut job| {
            for dep in &mut job.after {
                if let Dependency::InBatch(i) = dep {
                    *i += offset;
                }
            }
            job
        }));
    }
    batch
}

/// Whether any job of a batch waits for another.
pub(crate) fn has_dependencies(jobs: &[NewJob]) -> bool {
    jobs.iter().any(|job| !job.after.is_empty())
}

/// The stored jobs a batch waits for, each once, in id order (the order
/// their rows are locked in).
pub(crate) fn stored_dependencies(jobs: &[NewJob]) -> Vec<JobId> {
    let mut ids: Vec<JobId> = jobs
        .iter()
        .flat_map(|job| job.after.iter())
        .filter_map(|dep| match dep {
            Dependency::Stored(id) => Some(*id),
            Dependency::InBatch(_) => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Why a waiting job was cancelled: `root`, which it waits for (directly or
/// through others), ended `state`.
pub(crate) fn failed_because(root: JobId, state: &str) -> String {
    format!("cancelled: it waits for job {root}, which ended {state}")
}

/// Plans each job of a batch from the states of the stored jobs it waits
/// for (`stored`, read under lock). Refuses a dependency on a job that does
/// not exist, or on a later job of the batch (or itself).
pub(crate) fn plan(jobs: &[NewJob], stored: &HashMap<JobId, JobState>) -> Result<Vec<Plan>, Error> {
    // The failure that cancels a job at once: the stored job at its root.
    let mut failed: Vec<Option<(JobId, JobState)>> = Vec::with_capacity(jobs.len());
    let mut plans = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let mut left = 0i64;
        let mut root = None;
        for dep in dedup(&job.after) {
            match dep {
                Dependency::InBatch(j) if j >= i => {
                    return Err(Error::Invalid(format!(
                        "job {i} of the batch waits for job {j} of the batch: a job can only wait for an earlier \
                         one"
                    )));
                }
                Dependency::InBatch(j) => match failed[j] {
                    Some(cause) => root = root.or(Some(cause)),
                    None => left += 1,
                },
                Dependency::Stored(id) => match stored.get(&id) {
                    None => {
                        return Err(Error::Invalid(format!(
                            "job {i} of the batch waits for job {id}, which does not exist"
                        )))
                    }
                    Some(JobState::Succeeded) => {}
                    Some(state @ (JobState::Dead | JobState::Cancelled)) => {
                        root = root.or(Some((id, *state)))
                    }
                    Some(_) => left += 1,
                },
            }
        }
        failed.push(root);
        plans.push(match root {
            Some((id, state)) => Plan {
                state: Some(JobState::Cancelled),
                deps_left: 0,
                last_error: Some(failed_because(id, state.as_str())),
            },
            None if left > 0 => Plan { state: Some(JobState::Waiting), deps_left: left, last_error: None },
            None => Plan::default(),
        });
    }
    Ok(plans)
}

/// A job's dependencies, each once, in the order first given.
fn dedup(after: &[Dependency]) -> Vec<Dependency> {
    let mut seen = Vec::with_capacity(after.len());
    for dep in after {
        if !seen.contains(dep) {
            seen.push(*dep);
        }
    }
    seen
}

/// The links of a stored batch (`ids`, in batch order), as two JSON arrays
/// of `{"id": .., "ids": [..]}`: each waiting job's `depends_on`, and the
/// waiters to add to each job's `dependents`.
pub(crate) fn links(jobs: &[NewJob], ids: &[JobId]) -> (String, String) {
    let mut depends_on = Vec::new();
    let mut dependents: HashMap<JobId, Vec<JobId>> = HashMap::new();
    for (job, &id) in jobs.iter().zip(ids) {
        if job.after.is_empty() {
            continue;
        }
        let deps: Vec<JobId> = dedup(&job.after)
            .into_iter()
            .map(|dep| match dep {
                Dependency::Stored(dep) => dep,
                Dependency::InBatch(j) => ids[j],
            })
            .collect();
        for dep in &deps {
            dependents.entry(*dep).or_default().push(id);
        }
        depends_on.push(serde_json::json!({ "id": id, "ids": deps }));
    }
    let dependents: Vec<_> =
        dependents.into_iter().map(|(id, ids)| serde_json::json!({ "id": id, "ids": ids })).collect();
    (serde_json::Value::Array(depends_on).to_string(), serde_json::Value::Array(dependents).to_string())
}

/// JSON text of a list of ids, to bind.
pub(crate) fn id_array(ids: &[JobId]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned())
}

/// The ids of several JSON arrays of ids (each job's `dependents`) as one
/// list, repeats kept.
pub(crate) fn all_ids<'a>(lists: impl IntoIterator<Item = &'a str>) -> Vec<JobId> {
    lists.into_iter().flat_map(|list| crate::job::id_list(Some(list))).collect()
}

/// The workflow operations of a backend, as free functions on its
/// connection type, with its `classify`, `id_among!` (`id` is one of a JSON
/// array's) and `lock_row!` in scope.
macro_rules! workflow_fns {
    ($conn:ty) => {
        /// The states of the stored jobs `ids` (a batch's dependencies),
        /// their rows locked until the transaction ends.
        async fn dependency_states(
            conn: &mut $conn,
            ids: &[JobId],
        ) -> Result<std::collections::HashMap<JobId, JobState>, Error> {
            if ids.is_empty() {
                return Ok(std::collections::HashMap::new());
            }
            let rows: Vec<(i64, String)> = sqlx::query_as(concat!(
                "SELECT id, state FROM fastlane_jobs WHERE id", id_among!("$1"),
                " ORDER BY id",
                lock_row!()
            ))
            .bind(crate::workflow::id_array(ids))
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
            // A new version of each row, not only a lock: a success of one
            // of them racing this transaction sees that its row changed
            // after its snapshot and records itself in a later statement,
            // which sees what this one adds (PostgreSQL's `complete_pass`).
            sqlx::query(concat!(
                "UPDATE fastlane_jobs SET dependents = dependents WHERE id", id_among!("$1")
            ))
            .bind(crate::workflow::id_array(ids))
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
            rows.into_iter().map(|(id, state)| Ok((id, state.parse()?))).collect()
        }

        /// Writes the links of a stored workflow batch: each waiting job's
        /// `depends_on`, and each job waited for's `dependents`.
        async fn link(conn: &mut $conn, jobs: &[NewJob], ids: &[JobId]) -> Result<(), Error> {
            let (depends_on, dependents) = crate::workflow::links(jobs, ids);
            sqlx::query(SET_DEPENDS_ON).bind(depends_on).execute(&mut *conn).await.map_err(classify)?;
            sqlx::query(ADD_DEPENDENTS).bind(dependents).execute(&mut *conn).await.map_err(classify)?;
            Ok(())
        }

        /// Stores a batch in which some jobs wait for others, in the
        /// caller's transaction: plans each job from its dependencies'
        /// states (locked), inserts the batch, links it. Returns the ids,
        /// and whether any job was made due.
        async fn enqueue_workflow(conn: &mut $conn, jobs: &[NewJob], now: i64) -> Result<Vec<JobId>, Error> {
            let stored = dependency_states(conn, &crate::workflow::stored_dependencies(jobs)).await?;
            let plans = crate::workflow::plan(jobs, &stored)?;
            let ids = insert_rows(conn, jobs, now, Some(&plans)).await?;
            link(conn, jobs, &ids).await?;
            Ok(ids)
        }

        /// Cancels the jobs waiting for `root`, which has just ended
        /// `state` (dead or cancelled), and the jobs waiting for those,
        /// level by level; `dependents` is `root`'s list. Returns how many.
        async fn cancel_dependents(
            conn: &mut $conn,
            root: JobId,
            state: &str,
            dependents: Option<String>,
            now: i64,
        ) -> Result<u64, Error> {
            let why = crate::workflow::failed_because(root, state);
            let mut level = dependents.map(|list| crate::workflow::all_ids([list.as_str()])).unwrap_or_default();
            let mut cancelled = 0;
            while !level.is_empty() {
                // Each level's waiters are read off the rows it updates:
                // the newest `dependents`, whatever enqueue committed first.
                let next: Vec<Option<String>> = sqlx::query_scalar(concat!(
                    "UPDATE fastlane_jobs SET state = 'cancelled', finished_at = $1, last_error = $2 WHERE id", id_among!("$3"),
                    " AND state = 'waiting' RETURNING dependents"
                ))
                .bind(now)
                .bind(&why)
                .bind(crate::workflow::id_array(&level))
                .fetch_all(&mut *conn)
                .await
                .map_err(classify)?;
                cancelled += next.len() as u64;
                level = crate::workflow::all_ids(next.iter().flatten().map(String::as_str));
            }
            Ok(cancelled)
        }
    };
}

/// The `SET` of the update that takes `x.n` successes off each waiter's
/// `deps_left` and makes due those left with none (`$1`: now): due from
/// now, or at their own `run_at` if they were enqueued with one still to
/// come (a job's `run_at` is its `created_at` unless given). One text for
/// SQLite's `release_dependents` and PostgreSQL's completion statement.
macro_rules! release_waiters {
    () => {
        "deps_left = deps_left - x.n, \
         state = CASE WHEN deps_left - x.n > 0 THEN 'waiting' \
         WHEN run_at > created_at AND run_at > $1 THEN 'scheduled' ELSE 'available' END, \
         run_at = CASE WHEN deps_left - x.n > 0 OR (run_at > created_at AND run_at > $1) THEN run_at ELSE $1 END"
    };
}

pub(crate) use {release_waiters, workflow_fns};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job() -> NewJob {
        NewJob::new("a", json!(null))
    }

    #[test]
    fn a_chain_waits_step_by_step_and_a_chord_waits_for_every_member() {
        let steps = chain([job(), job(), job()]);
        let afters: Vec<_> = steps.iter().map(|j| j.after.clone()).collect();
        assert_eq!(afters, [vec![], vec![Dependency::InBatch(0)], vec![Dependency::InBatch(1)]]);
        let batch = chord([job(), job()], job());
        assert_eq!(batch[2].after, [Dependency::InBatch(0), Dependency::InBatch(1)]);
        assert!(chord([], job())[0].after.is_empty(), "a chord of no members runs at once");
        let both = concat([chain([job(), job()]), chord([job()], job().after(7))]);
        let afters: Vec<_> = both.iter().map(|j| j.after.clone()).collect();
        assert_eq!(
            afters,
            [
                vec![],
                vec![Dependency::InBatch(0)],
                vec![],
                vec![Dependency::Stored(7), Dependency::InBatch(2)],
            ],
            "each part's positions move with it; stored ids do not"
        );
    }

    #[test]
    fn plans_follow_the_states_of_what_is_waited_for() {
        let stored: HashMap<JobId, JobState> =
            [(1, JobState::Succeeded), (2, JobState::Running), (3, JobState::Dead)].into();
        let batch = vec![
            job().after(1),                   // succeeded already: due
            job().after(2).after(2).after(1), // one left, counted once
            job().after(3),                   // dead: cancelled at once
            job().after_nth(2).after_nth(0),  // through job 2 of the batch
            job().after_nth(0).after_nth(1),  // two of the batch
        ];
        let plans = plan(&batch, &stored).unwrap();
        assert_eq!(plans[0], Plan::default());
        assert_eq!((plans[1].state, plans[1].deps_left), (Some(JobState::Waiting), 1));
        assert_eq!(plans[2].state, Some(JobState::Cancelled));
        assert_eq!(plans[2].last_error.as_deref(), Some("cancelled: it waits for job 3, which ended dead"));
        assert_eq!(plans[3].last_error, plans[2].last_error, "the root failure is named");
        assert_eq!((plans[4].state, plans[4].deps_left), (Some(JobState::Waiting), 2));
    }

    #[test]
    fn impossible_dependencies_are_refused_naming_them() {
        let stored = HashMap::new();
        let err = plan(&[job().after(9)], &stored).unwrap_err().to_string();
        assert!(err.contains("waits for job 9, which does not exist"), "{err}");
        let err = plan(&[job(), job().after_nth(1)], &stored).unwrap_err().to_string();
        assert!(err.contains("job 1 of the batch waits for job 1 of the batch"), "{err}");
    }

    #[test]
    fn links_name_both_ends() {
        let batch = chord([job(), job().after(5)], job());
        let (depends_on, dependents) = links(&batch, &[10, 11, 12]);
        let depends_on: serde_json::Value = serde_json::from_str(&depends_on).unwrap();
        assert_eq!(depends_on, json!([{"id": 11, "ids": [5]}, {"id": 12, "ids": [10, 11]}]));
        let mut dependents: Vec<serde_json::Value> = serde_json::from_str(&dependents).unwrap();
        dependents.sort_by_key(|d| d["id"].as_i64());
        assert_eq!(
            dependents,
            [json!({"id": 5, "ids": [11]}), json!({"id": 10, "ids": [12]}), json!({"id": 11, "ids": [12]})]
        );
    }
}
