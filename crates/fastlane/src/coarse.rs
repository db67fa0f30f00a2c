//! A coarse clock and per-thread shard numbers, for bookkeeping on the
//! request path that must not read the system clock or share a lock line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds from [`epoch`] as of the last [`tick`]; 0 before the first.
static NOW_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Brings the clock up to date. Called by the threads that wake on their
/// own schedule anyway: the executor's monitor (every millisecond) and the
/// header timer's sweeper (every tenth of a second). Never goes back.
pub(crate) fn tick() {
    let ms = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
    NOW_MS.fetch_max(ms, Ordering::Relaxed);
}

/// Milliseconds from the clock's epoch, as of the last tick.
pub(crate) fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// The time of the last tick, or the real time if there has been none.
pub(crate) fn now() -> Instant {
    match now_ms() {
        0 => Instant::now(),
        ms => epoch() + std::time::Duration::from_millis(ms),
    }
}

/// A number for the calling thread, the same on every call: threads that
/// keep their own slab of something pick it by `thread_number() % SLABS`.
pub(crate) fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}
