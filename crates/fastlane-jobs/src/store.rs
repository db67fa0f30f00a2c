//! The one trait every backend implements (sqlx's pattern: one contract,
//! one test suite, several drivers).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::job::{Claimed, Done, JobId, JobInfo, JobState, JobSummary, Lease, NewJob, Stats};
use crate::{Activity, Error, QueueLimits, Retention, Schedule, ScheduleInfo, ScheduleLook, TableSizes};

/// A durable job store. Every operation is atomic; every write of a running
/// attempt carries its fencing token and is rejected with
/// [`Error::Fenced`] once another attempt owns the job.
pub trait Store: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Stores a job; returns its id.
    fn enqueue(&self, job: NewJob) -> impl Future<Output = Result<JobId, Error>> + Send {
        async move {
            let ids = self.enqueue_many(vec![job]).await?;
            ids.first().copied().ok_or_else(|| Error::Invalid("the store returned no id".into()))
        }
    }

    /// Stores a batch of jobs in one transaction; returns their ids in the
    /// batch's order. All or nothing: if one job is invalid or its unique key
    /// is taken (by a pending job or by another job of the batch), none is
    /// stored.
    fn enqueue_many(&self, jobs: Vec<NewJob>) -> impl Future<Output = Result<Vec<JobId>, Error>> + Send;

    /// Hands the next due job of `queue` to `consumer` under a lease: highest
    /// priority first, then the earliest due. A running job whose lease has
    /// expired (its worker died) is due again, with a new attempt and token.
    fn claim(
        &self,
        queue: &str,
        consumer: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Claimed>, Error>> + Send {
        async move { Ok(self.claim_many(queue, consumer, lease, 1).await?.pop()) }
    }

    /// [`claim`](Store::claim) for up to `limit` jobs at once, in the order
    /// they are due.
    fn claim_many(
        &self,
        queue: &str,
        consumer: &str,
        lease: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Claimed>, Error>> + Send;

    /// A signal that fires when jobs may have become available (an enqueue,
    /// in this process or, where the backend can tell, in another), so that
    /// idle workers wake at once instead of polling. `None`: the store cannot
    /// tell; workers poll.
    fn wakeups(&self) -> Option<Arc<Notify>> {
        None
    }

    /// Ends at once the leases of running jobs whose worker process is known
    /// to have died: a process of this host (and PID namespace) that no
    /// longer runs. Their next claim takes them over, as after a lease
    /// expiry. Jobs held on other hosts wait for their lease. Returns how
    /// many leases were ended.
    fn expire_dead_owners(&self) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Which of the running jobs `ids` have been asked to cancel.
    fn cancel_requested(&self, ids: &[JobId]) -> impl Future<Output = Result<Vec<JobId>, Error>> + Send;

    /// Extends a running attempt's lease; returns whether the job has been
    /// asked to cancel.
    fn heartbeat(
        &self,
        lease: Lease,
        lease_for: Duration,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Records progress (0-100 %) and a message for a running attempt.
    fn progress(
        &self,
        lease: Lease,
        percent: u8,
        message: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The attempt succeeded.
    fn complete(&self, lease: Lease) -> impl Future<Output = Result<(), Error>> + Send {
        async move {
            match self.complete_many(&[lease.into()]).await?.as_slice() {
                [] => Ok(()),
                _ => Err(Error::Fenced { job: lease.job, token: lease.token }),
            }
        }
    }

    /// Many attempts succeeded: recorded in one transaction, each with its
    /// handler's result. Returns the ones that were fenced (another attempt
    /// owns the job, or it is no longer running); the others are recorded.
    fn complete_many(&self, done: &[Done]) -> impl Future<Output = Result<Vec<Lease>, Error>> + Send;

    /// The attempt failed: `retrying` (with backoff) if `retryable` and
    /// attempts are left, else `dead`. Returns the new state.
    fn fail(
        &self,
        lease: Lease,
        error: &str,
        retryable: bool,
    ) -> impl Future<Output = Result<JobState, Error>> + Send;

    /// The running attempt saw its cancellation and stopped.
    fn cancelled(&self, lease: Lease) -> impl Future<Output = Result<(), Error>> + Send;

    /// Gives a running job back at once without counting the attempt (a
    /// worker shutting down).
    fn release(&self, lease: Lease) -> impl Future<Output = Result<(), Error>> + Send;

    /// Cancels a pending job at once, or asks a running one to stop.
    /// Returns the state after.
    fn cancel(&self, id: JobId) -> impl Future<Output = Result<JobState, Error>> + Send;

    /// A job with its attempts.
    fn get(&self, id: JobId) -> impl Future<Output = Result<JobInfo, Error>> + Send;

    /// The results of the jobs `ids` (JSON; `None` for a job that has not
    /// succeeded or returned nothing), in the order asked; a job that does
    /// not exist is left out. What a workflow step's handler is given of
    /// the jobs it waited for.
    fn results(
        &self,
        ids: &[JobId],
    ) -> impl Future<Output = Result<Vec<(JobId, Option<serde_json::Value>)>, Error>> + Send;

    /// Job counts for every state.
    fn stats(&self) -> impl Future<Output = Result<Stats, Error>> + Send;

    /// Job counts for every state, per queue (the queues that hold jobs),
    /// by queue name.
    fn queue_stats(&self) -> impl Future<Output = Result<Vec<(String, Stats)>, Error>> + Send;

    /// How many dead jobs each job type has, by name (the types with any).
    fn dead_by_name(&self) -> impl Future<Output = Result<Vec<(String, u64)>, Error>> + Send;

    /// The newest jobs (of one state, if given), newest first.
    fn list(
        &self,
        state: Option<JobState>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<JobSummary>, Error>> + Send;

    /// Makes a dead, cancelled or retrying job available again now, with
    /// one more attempt allowed if it had used them all. Returns the state
    /// after (a pending or succeeded job is left as it is).
    fn retry(&self, id: JobId) -> impl Future<Output = Result<JobState, Error>> + Send;

    /// Makes up to `limit` dead jobs (of type `name`, or of any type)
    /// available again now, oldest first, each with one more attempt, in one
    /// transaction; returns how many. Call it again while it returns
    /// `limit` to retry them all in bounded steps.
    fn retry_dead(&self, name: Option<&str>, limit: u32) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Looks at `schedule` at `now` (Unix ms), in one write transaction:
    /// registers it if the store does not know it yet (its first tick is
    /// then the first after `now`) or restarts it from `now` if it was
    /// declared differently; else enqueues the job of its due tick, if one
    /// is, and accounts for its ticks up to `now`. Two schedulers looking at
    /// once are served one after the other, and the second finds the tick
    /// taken: each tick is enqueued once (see `scheduler.rs`). Consumers
    /// call it for the schedules of their registry; tests, with a clock of
    /// their own.
    fn look_at_schedule(
        &self,
        schedule: &Schedule,
        now: i64,
    ) -> impl Future<Output = Result<ScheduleLook, Error>> + Send;

    /// Every schedule the store knows, by name.
    fn schedules(&self) -> impl Future<Output = Result<Vec<ScheduleInfo>, Error>> + Send;

    /// Deletes one batch (up to `retention.batch`) of the finished jobs
    /// past their retention at `now` (Unix ms), oldest first, with their
    /// attempts, in one short transaction; returns how many. Pending and
    /// running jobs are never touched. Consumers call it in a loop (see
    /// `retention.rs`); tests, with a clock of their own.
    fn prune(&self, retention: &Retention, now: i64) -> impl Future<Output = Result<u64, Error>> + Send;

    /// How many jobs ended (succeeded, died, were cancelled) in each
    /// stretch of `bucket` since `since` (Unix ms), oldest first; stretches
    /// in which none ended are left out. Finished jobs are counted while
    /// retention keeps them.
    fn activity(
        &self,
        since: i64,
        bucket: Duration,
    ) -> impl Future<Output = Result<Vec<Activity>, Error>> + Send;

    /// Sets `queue`'s limits, for every consumer of the store: at most
    /// `rate` jobs started per period and `concurrency` running at once
    /// (see `limits.rs`). No limits removes them. A new rate starts with a
    /// full bucket (one period's jobs). Consumers of other processes see a
    /// change within a second.
    fn set_queue_limits(
        &self,
        queue: &str,
        limits: QueueLimits,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Every limited queue with its limits, by name.
    fn queue_limits(&self) -> impl Future<Output = Result<Vec<(String, QueueLimits)>, Error>> + Send;

    /// If the last claim of `queue` through this handle was held back by
    /// the queue's limits: how long until it may get more. A consumer waits
    /// that long (or until woken) rather than its poll interval.
    fn claim_wait(&self, queue: &str) -> Option<Duration> {
        let _ = queue;
        None
    }

    /// How big the store is: rows of each table, and bytes.
    fn table_sizes(&self) -> impl Future<Output = Result<TableSizes, Error>> + Send;
}
