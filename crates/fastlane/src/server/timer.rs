//! The timer behind hyper's header-read timeout: coarse and cheap.
//!
//! hyper arms the header-read timeout each time a keep-alive connection
//! waits for its next request head, so with tokio's timer every request pays
//! for a boxed `Sleep`, a runtime handle lookup, an insertion into the timer
//! wheel and a removal from it once the head has arrived. Counted with
//! `valgrind --tool=callgrind` under `wrk`, that was about 1,500 instructions
//! per request, more than a tenth of what plain axum spends on a whole
//! request.
//!
//! The timeout only has to cut clients that are slow or idle for seconds,
//! so a tenth of a second of precision is plenty. A sleep here registers its
//! waker in one of a few slabs (picked per thread, so that runners seldom
//! share a lock) on its first pending poll and leaves it when dropped;
//! nothing else happens on the request path, not even a read of the clock:
//! the timer's `now` is the coarse clock's last tick (`crate::coarse`,
//! ticked by each sweep and by the executor's monitor). One sweeper thread,
//! started on first use, wakes the sleeps whose deadline has passed every
//! [`SWEEP_EVERY`]. A timeout therefore ends within one sweep of its length,
//! either way.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the sweeper looks for expired sleeps; also the most a sleep
/// fires late.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Enough slabs that the runner threads rarely meet on one lock.
const SHARDS: usize = 16;

/// A [`hyper::rt::Timer`] whose sleeps fire up to [`SWEEP_EVERY`] late.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { deadline, slot: None })
    }

    fn now(&self) -> Instant {
        crate::coarse::now()
    }
}

/// A sleep of [`CoarseTimer`].
#[derive(Debug)]
struct CoarseSleep {
    deadline: Instant,
    /// Where its waker is registered: (shard, index in the shard's slab).
    slot: Option<(usize, usize)>,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.slot {
            Some((shard, index)) => {
                let mut slab = lock(shard);
                let entry = &mut slab.entries[index];
                if entry.fired {
                    return Poll::Ready(());
                }
                if !entry.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    entry.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            None => {
                // A deadline already passed is noticed by the next sweep;
                // checking here would read the clock on every request.
                let shard = crate::coarse::thread_number() % SHARDS;
                let index = lock(shard).insert(self.deadline, cx.waker().clone());
                self.slot = Some((shard, index));
                start_sweeper();
                Poll::Pending
            }
        }
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some((shard, index)) = self.slot {
            lock(shard).remove(index);
        }
    }
}

#[derive(Debug)]
struct Entry {
    deadline: Instant,
    waker: Option<Waker>,
    fired: bool,
}

/// Entries addressed by index, reused once removed: no allocation once warm.
#[derive(Debug, Default)]
struct Slab {
    entries: Vec<Entry>,
    free: Vec<usize>,
}

impl Slab {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> usize {
        let entry = Entry { deadline, waker: Some(waker), fired: false };
        match self.free.pop() {
            Some(index) => {
                self.entries[index] = entry;
                index
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, index: usize) {
        let entry = &mut self.entries[index];
        entry.waker = None;
        // A free entry never fires: the sweeper skips it by this flag.
        entry.fired = true;
        self.free.push(index);
    }

    /// Marks the expired entries fired and collects their wakers.
    fn expire(&mut self, now: Instant, wakers: &mut Vec<Waker>) {
        for entry in self.entries.iter_mut().filter(|e| !e.fired && e.deadline <= now) {
            entry.fired = true;
            wakers.extend(entry.waker.take());
        }
    }
}

/// One slab per cache line, so that two threads working on their own slabs
/// do not slow each other down.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<Slab>);

fn shards() -> &'static [Shard; SHARDS] {
    static SHARDS_: OnceLock<[Shard; SHARDS]> = OnceLock::new();
    SHARDS_.get_or_init(Default::default)
}

fn lock(shard: usize) -> MutexGuard<'static, Slab> {
    // Nothing panics while holding a slab; recover the data if it did.
    shards()[shard].0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the sweeper (once per process), which also keeps the coarse clock
/// ticking.
pub(crate) fn start_sweeper() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("fastlane-timer".into()).spawn(sweep);
        if let Err(err) = spawned {
            // Without the sweeper no header-read timeout fires; everything
            // else works. Said once, loudly.
            tracing::error!(error = %err, "could not start the timer thread: header-read timeouts are off");
        }
    });
}

fn sweep() -> ! {
    let mut wakers = Vec::new();
    loop {
        crate::coarse::tick();
        let now = Instant::now();
        for shard in 0..SHARDS {
            lock(shard).expire(now, &mut wakers);
        }
        // Woken outside the locks: a waker may run code that polls a sleep.
        for waker in wakers.drain(..) {
            waker.wake();
        }
        std::thread::sleep(SWEEP_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn a_sleep_fires_after_its_deadline_and_at_most_a_sweep_or_two_late() {
        let started = Instant::now();
        CoarseTimer.sleep(Duration::from_millis(300)).await;
        let took = started.elapsed();
        // The clock it measures from may be a sweep behind.
        assert!(took >= Duration::from_millis(300) - SWEEP_EVERY, "{took:?}");
        // Generous: the machine may be busy.
        assert!(took < Duration::from_millis(300) + 10 * SWEEP_EVERY, "{took:?}");
    }

    #[tokio::test]
    async fn a_sleep_whose_deadline_has_passed_ends_at_the_next_sweep() {
        tokio::time::timeout(10 * SWEEP_EVERY, CoarseTimer.sleep(Duration::ZERO))
            .await
            .expect("a sleep whose deadline has passed ends");
    }

    #[test]
    fn the_coarse_clock_is_never_more_than_a_sweep_or_two_behind() {
        start_sweeper();
        std::thread::sleep(3 * SWEEP_EVERY);
        let behind = Instant::now().saturating_duration_since(CoarseTimer.now());
        // Generous: the sweeper may be descheduled on a busy machine.
        assert!(behind <= 5 * SWEEP_EVERY, "{behind:?}");
    }

    #[test]
    fn the_slab_fires_expired_entries_once_and_reuses_freed_slots() {
        let mut slab = Slab::default();
        let now = Instant::now();
        let early = slab.insert(now, Waker::noop().clone());
        let late = slab.insert(now + Duration::from_secs(60), Waker::noop().clone());
        let mut wakers = Vec::new();
        slab.expire(now, &mut wakers);
        assert_eq!(wakers.len(), 1);
        assert!(slab.entries[early].fired && !slab.entries[late].fired);
        wakers.clear();
        slab.expire(now, &mut wakers);
        assert!(wakers.is_empty(), "an entry fired twice");
        slab.remove(early);
        // A freed entry is not expired again, and its slot is reused.
        slab.expire(now + Duration::from_secs(1), &mut wakers);
        assert!(wakers.is_empty());
        assert_eq!(slab.insert(now, Waker::noop().clone()), early);
    }
}
