//! A bounded thread pool: the engine under the blocking and the CPU lane.
//!
//! Why our own pool and not tokio's `spawn_blocking`? tokio's blocking pool
//! has one global size (512 threads by default) and an unbounded queue: when
//! it is exhausted, work queues silently, which is exactly the FastAPI
//! threadpool-exhaustion failure we exist to avoid. Each lane here has its own
//! thread cap *and* a queue limit, so overload is answered at once with a
//! `503` instead of a growing queue, and the CPU lane can run its threads at a
//! lower OS priority.
//!
//! Admission uses a tokio semaphore with `threads + queue_limit` permits: a
//! request takes a permit with `try_acquire` (full ⇒ rejected now), a
//! background task waits for one (background work must not be lost). The
//! permit travels with the job and is released only when the job has really
//! finished, even if the caller stopped waiting (timeout, client gone):
//! a thread still running abandoned work is still busy.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::error::{panic_message, LaneError};
use crate::metrics::PoolGauges;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How a pool is shaped.
#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub(crate) name: &'static str,
    pub(crate) max_threads: usize,
    pub(crate) queue_limit: usize,
    /// Added to the thread's nice value (Linux: per thread); 0 leaves it.
    pub(crate) nice: i32,
    /// An idle thread beyond the first exits after this long without work,
    /// so a burst does not leave dozens of parked threads behind.
    pub(crate) keep_alive: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: PoolConfig,
    admission: Arc<Semaphore>,
    state: Mutex<State>,
    work_ready: Condvar,
    gauges: PoolGauges,
}

struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    shutdown: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("queued", &self.queue.len())
            .field("threads", &self.threads)
            .field("idle", &self.idle)
            .field("shutdown", &self.shutdown)
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(config: PoolConfig, gauges: PoolGauges) -> Self {
        let max_threads = config.max_threads.max(1);
        let permits = max_threads.saturating_add(config.queue_limit);
        let config = PoolConfig { max_threads, ..config };
        Self {
            shared: Arc::new(Shared {
                admission: Arc::new(Semaphore::new(permits)),
                config,
                state: Mutex::new(State { queue: VecDeque::new(), threads: 0, idle: 0, shutdown: false }),
                work_ready: Condvar::new(),
                gauges,
            }),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        self.shared.config.name
    }

    /// Runs `f` on the pool if there is room now, else fails with
    /// [`LaneError::is_full`] without waiting.
    pub(crate) fn try_run<F, T>(&self, f: F) -> Result<oneshot::Receiver<Result<T, LaneError>>, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.shared.admission.clone().try_acquire_owned() {
            Ok(permit) => self.submit(permit, f),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.shared.gauges.rejected.inc();
                Err(LaneError::full(self.name()))
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(LaneError::shutdown(self.name())),
        }
    }

    /// Runs `f` on the pool, waiting for room if the lane is full.
    pub(crate) async fn run_when_ready<F, T>(&self, f: F) -> Result<T, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .shared
            .admission
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LaneError::shutdown(self.name()))?;
        let rx = self.submit(permit, f)?;
        rx.await.unwrap_or_else(|_| Err(LaneError::shutdown(self.name())))
    }

    fn submit<F, T>(
        &self,
        permit: OwnedSemaphorePermit,
        f: F,
    ) -> Result<oneshot::Receiver<Result<T, LaneError>>, LaneError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let name = self.name();
        let gauges = self.shared.gauges.clone();
        let job: Job = Box::new(move || {
            let result = catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
                let message = panic_message(&*payload);
                tracing::error!(lane = name, panic = %message, "work on the {name} lane panicked; the thread lives on");
                LaneError::panicked(name, message)
            });
            // Counted and released before the caller hears of the result, so
            // that what it reads next (metrics, a free slot) is up to date.
            gauges.busy.dec();
            gauges.completed.inc();
            // The permit is released only now that the work has finished.
            drop(permit);
            // The receiver may be gone (caller timed out): nothing to do then.
            let _ = tx.send(result);
        });

        let mut state = self.lock();
        if state.shutdown {
            return Err(LaneError::shutdown(name));
        }
        state.queue.push_back(job);
        self.shared.gauges.queued.inc();
        // Start a thread when nobody idle can take the job, up to the cap.
        if state.idle < state.queue.len() && state.threads < self.shared.config.max_threads {
            state.threads += 1;
            drop(state);
            self.spawn_thread();
        } else {
            drop(state);
            self.shared.work_ready.notify_one();
        }
        Ok(rx)
    }

    fn spawn_thread(&self) {
        let shared = Arc::clone(&self.shared);
        let name = format!("fastlane-{}", shared.config.name);
        let spawned = std::thread::Builder::new().name(name).spawn(move || worker(shared));
        if let Err(err) = spawned {
            // The queued job is still there and any live thread will take it;
            // with no thread at all it waits for the next successful start.
            tracing::error!(lane = self.name(), error = %err, "could not start a lane thread");
            self.lock().threads -= 1;
        }
    }

    /// Stops accepting work; running and queued jobs still finish.
    pub(crate) fn close(&self) {
        self.shared.admission.close();
        self.lock().shutdown = true;
        self.shared.work_ready.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (jobs run unlocked and
        // inside catch_unwind), so a poisoned lock still holds sane state.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn worker(shared: Arc<Shared>) {
    super::priority::lower_current_thread(shared.config.nice);
    shared.gauges.threads.inc();
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.queue.pop_front() {
            drop(state);
            shared.gauges.queued.dec();
            shared.gauges.busy.inc();
            // The job itself counts itself done (see `submit`).
            job();
            state = shared.lock();
            continue;
        }
        if state.shutdown {
            break;
        }
        state.idle += 1;
        let (next, timeout) = shared
            .work_ready
            .wait_timeout(state, shared.config.keep_alive)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state = next;
        state.idle -= 1;
        // Keep one thread warm so a lone request does not pay a thread start.
        if timeout.timed_out() && state.queue.is_empty() && state.threads > 1 {
            break;
        }
    }
    state.threads -= 1;
    drop(state);
    shared.gauges.threads.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize, queue: usize) -> Pool {
        Pool::new(
            PoolConfig {
                name: "test",
                max_threads: threads,
                queue_limit: queue,
                nice: 0,
                keep_alive: Duration::from_millis(50),
            },
            PoolGauges::default(),
        )
    }

    #[tokio::test]
    async fn runs_work_and_returns_its_value() {
        let pool = pool(2, 2);
        let rx = pool.try_run(|| 40 + 2).unwrap();
        assert_eq!(rx.await.unwrap().unwrap(), 42);
    }

    #[tokio::test]
    async fn rejects_when_threads_and_queue_are_taken() {
        let pool = pool(1, 1);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let running = pool.try_run(move || release_rx.recv().ok()).unwrap();
        let queued = pool.try_run(|| ()).unwrap();
        let err = pool.try_run(|| ()).unwrap_err();
        assert!(err.is_full(), "{err}");
        assert_eq!(pool.shared.gauges.rejected.get(), 1);
        release_tx.send(()).unwrap();
        running.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        // Room again once the work is done.
        pool.try_run(|| ()).unwrap().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_the_thread_survives() {
        let pool = pool(1, 0);
        let err = pool.try_run(|| panic!("boom")).unwrap().await.unwrap().unwrap_err();
        assert!(err.is_panic());
        assert_eq!(err.panic_message(), Some("boom"));
        assert_eq!(pool.try_run(|| 7).unwrap().await.unwrap().unwrap(), 7);
    }

    #[tokio::test]
    async fn waiting_submission_gets_in_after_the_lane_frees_up() {
        let pool = pool(1, 0);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let running = pool.try_run(move || release_rx.recv().ok()).unwrap();
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run_when_ready(|| 5).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        release_tx.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), 5);
    }

    #[tokio::test]
    async fn many_jobs_from_many_tasks_all_complete() {
        let pool = pool(4, 10_000);
        let mut handles = Vec::new();
        for i in 0..2_000u64 {
            let pool = pool.clone();
            handles.push(tokio::spawn(async move { pool.run_when_ready(move || i * 2).await.unwrap() }));
        }
        let mut sum = 0;
        for h in handles {
            sum += h.await.unwrap();
        }
        assert_eq!(sum, (0..2_000u64).map(|i| i * 2).sum::<u64>());
        assert_eq!(pool.shared.gauges.completed.get(), 2_000);
        assert_eq!(pool.shared.gauges.queued.get(), 0);
    }
}
