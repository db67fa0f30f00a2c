//! Picking the backend from a URL.

use std::time::Duration;

use crate::job::{Claimed, Done, JobId, JobInfo, JobState, JobSummary, Lease, NewJob, Stats};
use crate::{
    Activity, Error, PgStore, Retention, Schedule, ScheduleInfo, ScheduleLook, SqliteStore, Store, TableSizes,
};

/// A store of either backend, chosen by URL with [`connect`].
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// `sqlite://path/to/jobs.db`
    Sqlite(SqliteStore),
    /// `postgres://...`
    Postgres(PgStore),
}

/// Opens the store a URL names: `sqlite://path/to/jobs.db` (created on first
/// use) or `postgres://user@host/db`.
pub async fn connect(url: &str) -> Result<AnyStore, Error> {
    if url.starts_with("sqlite:") {
        Ok(AnyStore::Sqlite(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(AnyStore::Postgres(PgStore::open(url).await?))
    } else {
        Err(Error::InvalidUrl {
            url: url.to_owned(),
            reason: "expected sqlite://path/to/jobs.db or postgres://...".into(),
        })
    }
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call.await,
            AnyStore::Postgres($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, Error> {
        delegate!(self, s => s.enqueue_many(jobs))
    }

    async fn claim_many(
        &self,
        queue: &str,
        consumer: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claimed>, Error> {
        delegate!(self, s => s.claim_many(queue, consumer, lease, limit))
    }

    fn wakeups(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        match self {
            AnyStore::Sqlite(s) => s.wakeups(),
            AnyStore::Postgres(s) => s.wakeups(),
        }
    }

    async fn expire_dead_owners(&self) -> Result<u64, Error> {
        delegate!(self, s => s.expire_dead_owners())
    }

    async fn cancel_requested(&self, ids: &[JobId]) -> Result<Vec<JobId>, Error> {
        delegate!(self, s => s.cancel_requested(ids))
    }

    async fn heartbeat(&self, lease: Lease, lease_for: Duration) -> Result<bool, Error> {
        delegate!(self, s => s.heartbeat(lease, lease_for))
    }

    async fn progress(&self, lease: Lease, percent: u8, message: &str) -> Result<(), Error> {
        delegate!(self, s => s.progress(lease, percent, message))
    }

    async fn complete_many(&self, done: &[Done]) -> Result<Vec<Lease>, Error> {
        delegate!(self, s => s.complete_many(done))
    }

    async fn fail(&self, lease: Lease, error: &str, retryable: bool) -> Result<JobState, Error> {
        delegate!(self, s => s.fail(lease, error, retryable))
    }

    async fn cancelled(&self, lease: Lease) -> Result<(), Error> {
        delegate!(self, s => s.cancelled(lease))
    }

    async fn release(&self, lease: Lease) -> Result<(), Error> {
        delegate!(self, s => s.release(lease))
    }

    async fn cancel(&self, id: JobId) -> Result<JobState, Error> {
        delegate!(self, s => s.cancel(id))
    }

    async fn get(&self, id: JobId) -> Result<JobInfo, Error> {
        delegate!(self, s => s.get(id))
    }

    async fn results(&self, ids: &[JobId]) -> Result<Vec<(JobId, Option<serde_json::Value>)>, Error> {
        delegate!(self, s => s.results(ids))
    }

    async fn stats(&self) -> Result<Stats, Error> {
        delegate!(self, s => s.stats())
    }

    async fn queue_stats(&self) -> Result<Vec<(String, Stats)>, Error> {
        delegate!(self, s => s.queue_stats())
    }

    async fn dead_by_name(&self) -> Result<Vec<(String, u64)>, Error> {
        delegate!(self, s => s.dead_by_name())
    }

    async fn list(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobSummary>, Error> {
        delegate!(self, s => s.list(state, limit))
    }

    async fn retry(&self, id: JobId) -> Result<JobState, Error> {
        delegate!(self, s => s.retry(id))
    }

    async fn retry_dead(&self, name: Option<&str>, limit: u32) -> Result<u64, Error> {
        delegate!(self, s => s.retry_dead(name, limit))
    }

    async fn look_at_schedule(&self, schedule: &Schedule, now: i64) -> Result<ScheduleLook, Error> {
        delegate!(self, s => s.look_at_schedule(schedule, now))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        delegate!(self, s => s.schedules())
    }

    async fn prune(&self, retention: &Retention, now: i64) -> Result<u64, Error> {
        delegate!(self, s => s.prune(retention, now))
    }

    async fn activity(&self, since: i64, bucket: Duration) -> Result<Vec<Activity>, Error> {
        delegate!(self, s => s.activity(since, bucket))
    }

    async fn set_queue_limits(&self, queue: &str, limits: crate::QueueLimits) -> Result<(), Error> {
        delegate!(self, s => s.set_queue_limits(queue, limits))
    }

    async fn queue_limits(&self) -> Result<Vec<(String, crate::QueueLimits)>, Error> {
        delegate!(self, s => s.queue_limits())
    }

    fn claim_wait(&self, queue: &str) -> Option<Duration> {
        match self {
            AnyStore::Sqlite(s) => s.claim_wait(queue),
            AnyStore::Postgres(s) => s.claim_wait(queue),
        }
    }

    async fn table_sizes(&self) -> Result<TableSizes, Error> {
        delegate!(self, s => s.table_sizes())
    }
}
