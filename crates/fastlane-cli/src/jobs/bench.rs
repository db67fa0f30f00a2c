//! `fastlane jobs bench` and the batched enqueue it shares with `jobs enqueue`.

use std::time::{Duration, Instant};

use fastlane_jobs::{ConsumerConfig, NewJob, Store};

use super::demo_registry;

/// Enqueues `count` copies of `job`, `batch` per transaction; returns the
/// last id (none if `count` is 0).
pub async fn enqueue_copies<S: Store>(
    store: &S,
    job: &NewJob,
    count: u64,
    batch: usize,
) -> Result<Option<fastlane_jobs::JobId>, fastlane_jobs::Error> {
    let mut last = None;
    let mut left = count;
    while left > 0 {
        let n = left.min(batch.max(1) as u64);
        let ids = store.enqueue_many(vec![job.clone(); n as usize]).await?;
        last = ids.last().copied().or(last);
        left -= n;
    }
    Ok(last)
}

/// Enqueues `count` copies of `job` as chains of `steps` (the last one
/// shorter if `steps` does not divide `count`), whole chains of about
/// `batch` jobs per transaction.
async fn enqueue_chains<S: Store>(
    store: &S,
    job: &NewJob,
    count: u64,
    batch: usize,
    steps: usize,
) -> Result<(), fastlane_jobs::Error> {
    let mut left = count;
    while left > 0 {
        let mut chains = Vec::new();
        let mut size = 0;
        while left > 0 && size < batch.max(steps) {
            let n = left.min(steps as u64) as usize;
            chains.push(fastlane_jobs::chain(vec![job.clone(); n]));
            size += n;
            left -= n as u64;
        }
        store.enqueue_many(fastlane_jobs::concat(chains)).await?;
    }
    Ok(())
}

/// The result of `fastlane jobs bench`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Jobs enqueued and run.
    pub jobs: u64,
    /// Jobs per enqueue call (one transaction each).
    pub batch: usize,
    /// Steps per chain (1: independent jobs).
    pub chain: usize,
    /// The rate limit set on the benchmark's queue, if any.
    pub rate: Option<String>,
    /// Worker concurrency.
    pub concurrency: usize,
    /// Enqueue rate (jobs/s).
    pub enqueue_per_s: f64,
    /// End to end: from the first enqueue to the last job done.
    pub jobs_per_s: f64,
    /// Seconds, end to end.
    pub seconds: f64,
}

/// How `fastlane jobs bench` enqueues and runs its jobs.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Jobs per enqueue call (one transaction each).
    pub batch: usize,
    /// The worker's concurrency.
    pub concurrency: usize,
    /// Steps per chain (each waits for the one before); 1: independent jobs.
    pub chain: usize,
    /// A rate limit set on the benchmark's queue.
    pub rate: Option<fastlane_jobs::Rate>,
}

/// Enqueues `jobs` noop jobs in batches (as chains, if `shape.chain` is more
/// than 1: each step waits for the one before), on a queue of their own (with
/// `shape.rate` as its limit, if set), drains them with a worker that runs
/// from the start (as in production), and measures both.
pub async fn bench<S: Store>(
    store: &S,
    jobs: u64,
    shape: Shape,
) -> Result<BenchResult, fastlane_jobs::Error> {
    let Shape { batch, concurrency, chain, rate } = shape;
    let queue = format!("bench-{}", std::process::id());
    if let Some(rate) = rate {
        let limits = fastlane_jobs::QueueLimits::default().rate(rate.jobs, rate.per)?;
        store.set_queue_limits(&queue, limits).await?;
    }
    let done = std::sync::Arc::new(fastlane_jobs::ConsumerStats::default());
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let config = ConsumerConfig { queues: vec![(queue.clone(), concurrency)], ..ConsumerConfig::default() };
    // The worker drains while the jobs are enqueued, as in production.
    let worker = tokio::spawn(fastlane_jobs::run_consumer_with_stats(
        store.clone(),
        demo_registry(),
        config,
        stop_rx,
        Duration::from_secs(30),
        done.clone(),
    ));
    let noop = NewJob::new("noop", serde_json::Value::Null).queue(queue.clone());
    if chain > 1 {
        enqueue_chains(store, &noop, jobs, batch, chain).await?;
    } else {
        enqueue_copies(store, &noop, jobs, batch).await?;
    }
    let enqueued_in = started.elapsed();
    // The worker's own counter: no store query competing with the worker.
    let stats = loop {
        let succeeded = done.succeeded.load(std::sync::atomic::Ordering::Relaxed);
        if succeeded >= jobs {
            break succeeded;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    stop_tx.send_replace(true);
    let _ = worker.await;
    if rate.is_some() {
        store.set_queue_limits(&queue, fastlane_jobs::QueueLimits::default()).await?;
    }
    Ok(BenchResult {
        jobs: stats,
        batch,
        chain: chain.max(1),
        rate: rate.map(|r| r.to_string()),
        concurrency,
        enqueue_per_s: jobs as f64 / enqueued_in.as_secs_f64().max(1e-9),
        jobs_per_s: stats as f64 / seconds.max(1e-9),
        seconds,
    })
}
