//! fastlane-jobs: durable jobs that survive crashes, for fastlane apps.
//!
//! # Layout
//!
//! * `job.rs`: the job model — [`NewJob`] (what to enqueue, with queue,
//!   priority, run-at, attempts, timeout, unique key), [`Claimed`] (an
//!   attempt handed to a consumer, with its fencing token), [`JobInfo`],
//!   [`JobState`] and the retry [`backoff`].
//! * `store.rs`: the [`Store`] trait, the one contract of every backend.
//! * `sqlite/`: [`SqliteStore`], the embedded default (a file, no server).
//! * `postgres/`: [`PgStore`], for several processes or machines
//!   (`FOR UPDATE SKIP LOCKED`, LISTEN/NOTIFY), and [`enqueue_in_tx`].
//! * `common.rs`: the one-job operations whose SQL both backends share,
//!   written once (numbered `$N` placeholders, which both drivers bind).
//!
//! * `registry.rs`: the [`Registry`] of job types (async handlers, or
//!   blocking / CPU handlers on fastlane's lanes), [`JobContext`],
//!   [`JobError`] and [`enqueue_checked`].
//! * `consumer.rs`: the consumer loop ([`run_consumer`]): per-queue concurrency,
//!   lease heartbeats, cancellation, timeouts, panics as failures, batched
//!   completion, release of unfinished jobs on shutdown.
//! * `in_server.rs`: [`Consumer`] and [`Jobs`], a consumer inside a fastlane
//!   server (`Server::jobs`) and the application's checked handle on its
//!   queue.
//!
//! * `schedule.rs`: [`Schedule`], a job enqueued at every tick of a cron
//!   expression or an interval, and the arithmetic of its ticks.
//! * `scheduler.rs`: the loop that enqueues each tick once however many
//!   consumers run it, and the store operations it uses.
//!
//! * `retention.rs`: [`Retention`], the pruning of finished jobs by every
//!   consumer in small batches; what the finished jobs say of the store
//!   ([`TableSizes`], [`Activity`]).
//!
//! * `workflow.rs`: jobs that wait for others ([`NewJob::after`], [`chain`],
//!   [`chord`]): how a waiting job is released once, and how a failure
//!   cancels what waits for it.
//!
//! * `limits.rs`: [`QueueLimits`], a queue's rate and concurrency cap,
//!   kept by every claim of every consumer.
//!
//! * `dashboard/`: [`Dashboard`], the store's web page (queues, the last
//!   hour, running, failed and dead jobs, schedules, actions), served by a
//!   fastlane server at `/_fastlane/jobs/` or by `fastlane jobs ui`.
//!
//! * `owner.rs`: which process holds a running job, so that a consumer on the
//!   same host sees at once that it died instead of waiting for its lease.
//!
//! # The life of a job
//!
//! `enqueue` stores it `available` (or `scheduled` for later). `claim` gives
//! it to one consumer under a lease and a new fencing token; the consumer renews
//! the lease with `heartbeat` while it runs, and ends the attempt with
//! `complete`, `fail` (retry with backoff, or dead) or `cancelled`. If the
//! consumer dies, the lease expires and the next `claim` takes the job over
//! with a new token, so the dead attempt's late writes are rejected as
//! [`Error::Fenced`].

mod any;
mod common;
mod consumer;
mod dashboard;
mod error;
mod in_server;
mod job;
mod limits;
mod owner;
mod postgres;
mod registry;
mod retention;
mod schedule;
mod scheduler;
mod sqlite;
mod store;
mod workflow;

pub use any::{connect, AnyStore};
pub use consumer::{
    run as run_consumer, run_with_stats as run_consumer_with_stats, ConsumerConfig, ConsumerStats,
};
pub use dashboard::Dashboard;
pub use error::Error;
pub use in_server::{wait_for_result, Consumer, Jobs, DASHBOARD_PATH};
pub use job::{
    backoff, now_ms, Attempt, Claimed, Done, JobId, JobInfo, JobState, JobSummary, Lease, NewJob, Stats,
};
pub use limits::{QueueLimits, Rate};
pub use postgres::{enqueue_in_tx, enqueue_many_in_tx, PgStore};
pub use registry::{enqueue_checked, JobContext, JobError, Registry};
pub use retention::{Activity, Retention, TableSizes};
pub use schedule::{Missed, Schedule, ScheduleInfo, ScheduleLook};
pub use sqlite::SqliteStore;
pub use store::Store;
pub use workflow::{chain, chord, concat};
