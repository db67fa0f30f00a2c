//! The monitor thread: finds stuck polls, keeps spare runners, demotes hogs.
//!
//! It is a plain OS thread that never runs user code, so nothing a handler
//! does can stop it from looking.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::slot::{Slot, STUCK};
use super::Shared;
use crate::routes::stall_message;

/// How often the monitor looks. A stall is seen at most this long after it
/// crosses the threshold; waking 1000 times a second costs a few
/// microseconds of CPU per wake-up.
const TICK: Duration = Duration::from_millis(1);

/// A runner's own queued tasks (woken by its last I/O poll) go to the shared
/// queue, for any runner to take, once its current poll has run this long
/// (or at once if another runner is idle): a tick, so they wait at most a
/// couple of milliseconds behind a slow poll, while a busy runner whose
/// polls take microseconds keeps its connections.
const SHARE_AFTER_NS: u64 = 1_000_000;

/// How often a stuck thread's CPU clock is compared with the wall clock, and
/// how much of that time it must have been on a CPU to count as computing
/// (rather than asleep, or waiting in a syscall, or merely preempted).
const CPU_CHECK_EVERY_NS: u64 = 5_000_000;
pub(super) const CPU_BOUND_SHARE: f64 = 0.5;

/// Looks in a row that must find the thread on a CPU before it is demoted.
/// One is not enough: a handler that sleeps for seconds and returns is
/// followed, in the same poll, by the work of answering (the response
/// written, the access line; in a debug build several milliseconds of it),
/// which can fill a look. A hog fills every look, and is still found within
/// 10 ms. (Whether the stall's report says "computing" is judged over the
/// whole stall instead: see `Shared::stall_ended`.)
const CPU_BOUND_LOOKS: u8 = 2;

/// The nice value a CPU-hogging stuck thread gets: the lowest priority, so
/// that the scheduler runs every healthy thread first.
const DEMOTED_NICE: i32 = 19;

pub(super) fn start(shared: Arc<Shared>) {
    let spawned = std::thread::Builder::new().name("fastlane-monitor".into()).spawn(move || run(&shared));
    if let Err(err) = spawned {
        tracing::error!(error = %err, "could not start the stall monitor: stalls will not be isolated");
    }
}

fn run(shared: &Arc<Shared>) {
    let threshold_ns = u64::try_from(shared.config.stall_threshold.as_nanos()).unwrap_or(u64::MAX).max(1);
    let mut slots: Vec<Arc<Slot>> = Vec::new();
    let mut idle_checked = std::time::Instant::now();
    let mut trim = Trim::default();
    while !shared.shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        crate::coarse::tick();
        if idle_checked.elapsed() >= super::reactor::IDLE_CHECK_EVERY {
            idle_checked = std::time::Instant::now();
            let mut open = 0;
            for reactor in &shared.reactors {
                reactor.cut_idle(shared.header_read_timeout);
                open += reactor.connections();
            }
            trim.after_churn(open);
        }
        slots.clear();
        slots.extend(shared.slots.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        let now = shared.now_ns();
        let waiting = shared.lock().waiting();
        for slot in &slots {
            let started = slot.poll_started.load(Ordering::Acquire);
            if started == 0 {
                continue;
            }
            if started & STUCK == 0 {
                let began = started - 1;
                let running = now.saturating_sub(began);
                // Its own queued tasks must not wait behind a long poll, nor
                // for their turn while another runner has nothing to do.
                if running > SHARE_AFTER_NS || waiting > 0 {
                    shared.share_local(slot);
                }
                if running > threshold_ns {
                    mark_stuck(shared, slot, started, now);
                }
            } else {
                check_cpu(shared, slot, started, now);
            }
        }
        shared.ensure_spares();
    }
}

/// Gives the memory of closed connections back to the OS.
///
/// Each connection holds about 16 KB while it is open (hyper's 8 KB read
/// buffer, its write buffer, the connection's future and task). When
/// thousands close, glibc's allocator keeps what they freed in the arenas of
/// the runner threads that freed it (one arena per thread, up to eight per
/// core), and only gives back what happens to sit at the top of a heap: 5,000
/// idle keep-alive connections coming and going ten times left a server at
/// 150 MB of RSS for good. So once the open connections have fallen well
/// below their peak, the free memory of every arena is released
/// (`malloc_trim`), at most once a second, on a thread of its own so that
/// the monitor's tick is not held up while it walks the heaps.
#[derive(Debug)]
struct Trim {
    /// The most connections open since the last trim.
    peak: usize,
    last: std::time::Instant,
    running: Arc<std::sync::atomic::AtomicBool>,
}

/// Connections that must have closed (since the peak) before a trim: about
/// 8 MB of their memory.
const TRIM_AFTER_CLOSED: usize = 512;
const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(1);

impl Default for Trim {
    fn default() -> Self {
        Self { peak: 0, last: std::time::Instant::now(), running: Default::default() }
    }
}

impl Trim {
    fn after_churn(&mut self, open: usize) {
        self.peak = self.peak.max(open);
        if self.peak < open + TRIM_AFTER_CLOSED || self.last.elapsed() < TRIM_AT_MOST_EVERY {
            return;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.peak = open;
        self.last = std::time::Instant::now();
        let running = self.running.clone();
        let spawned = std::thread::Builder::new().name("fastlane-trim".into()).spawn(move || {
            crate::sys::release_free_memory();
            running.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.running.store(false, Ordering::Release);
        }
    }
}

fn mark_stuck(shared: &Shared, slot: &Slot, started: u64, now: u64) {
    let route_id = slot.route();
    let phase = slot.phase();
    slot.stuck_route.store(route_id, Ordering::Relaxed);
    slot.stuck_phase.store(phase as u8, Ordering::Relaxed);
    slot.note_stuck_deadline();
    let request = slot.note_stuck_request();
    slot.cpu_bound.store(false, Ordering::Relaxed);
    slot.cpu_looks.store(0, Ordering::Relaxed);
    let cpu = thread_cpu_ns(slot).unwrap_or(0);
    slot.cpu_mark.store(cpu, Ordering::Relaxed);
    slot.wall_mark.store(now, Ordering::Relaxed);
    slot.stall_cpu_ns.store(cpu, Ordering::Relaxed);
    slot.stall_wall_ns.store(now, Ordering::Relaxed);
    // A poll stuck under a permit is counted in the stall budget already;
    // one stuck outside (a route nobody knew to stall) takes a place there
    // until it returns, so the budget keeps the healthy threads free. The
    // charge is made before the poll is marked, so that the runner, which
    // gives it back when it sees the mark, cannot miss it.
    let charge = slot.permits.load(Ordering::Relaxed) == 0;
    if charge {
        slot.charged.store(true, Ordering::Relaxed);
        shared.budget.charge();
    }
    // Only this poll: if it ended meanwhile, the swap fails and nothing is
    // recorded.
    if slot
        .poll_started
        .compare_exchange(started, started | STUCK, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        if charge && slot.charged.swap(false, Ordering::Relaxed) {
            shared.budget.release();
        }
        return;
    }
    shared.stuck.fetch_add(1, Ordering::Relaxed);
    shared.metrics.isolation().stuck.inc();
    if let Some(route) = shared.routes.by_id(route_id) {
        route.stalls.began();
        let so_far = std::time::Duration::from_nanos(now.saturating_sub(started - 1));
        tracing::warn!(
            target: "fastlane::stall",
            method = %route.method,
            route = %route.route,
            request_id = request.as_ref().map(tracing::field::display),
            "{}",
            stall_message(&route, phase, so_far, None, false, slot.panicking.load(Ordering::Relaxed))
        );
    }
}

/// Demotes a stuck thread that is burning CPU.
fn check_cpu(shared: &Shared, slot: &Slot, started: u64, now: u64) {
    if slot.demoted.load(Ordering::Relaxed) {
        return;
    }
    let wall_mark = slot.wall_mark.load(Ordering::Relaxed);
    let wall = now.saturating_sub(wall_mark);
    if wall < CPU_CHECK_EVERY_NS {
        return;
    }
    let Some(cpu) = thread_cpu_ns(slot) else { return };
    let used = cpu.saturating_sub(slot.cpu_mark.load(Ordering::Relaxed));
    slot.cpu_mark.store(cpu, Ordering::Relaxed);
    slot.wall_mark.store(now, Ordering::Relaxed);
    if (used as f64) < CPU_BOUND_SHARE * wall as f64 {
        slot.cpu_looks.store(0, Ordering::Relaxed);
        return;
    }
    // Only the monitor writes the count: a load and a store.
    let looks = slot.cpu_looks.load(Ordering::Relaxed).saturating_add(1);
    slot.cpu_looks.store(looks, Ordering::Relaxed);
    if looks < CPU_BOUND_LOOKS {
        return;
    }
    slot.cpu_bound.store(true, Ordering::Relaxed);
    // Still the same stuck poll? Then lower it. (If it just ended, the
    // runner retires at its next look at `demoted` anyway.)
    if slot.poll_started.load(Ordering::Acquire) != started {
        return;
    }
    slot.demoted.store(true, Ordering::Relaxed);
    if set_nice(slot.tid.load(Ordering::Relaxed), DEMOTED_NICE) {
        shared.metrics.isolation().demoted.inc();
    }
}

/// Records the calling runner's kernel thread id and CPU-time clock.
pub(super) fn publish_thread_ids(slot: &Slot) {
    slot.tid.store(crate::sys::thread_id(), Ordering::Relaxed);
    let clock = crate::sys::CpuClock::of_current_thread().map_or(0, crate::sys::CpuClock::raw);
    slot.cpu_clock.store(clock, Ordering::Relaxed);
}

/// The CPU time a runner thread has used, in nanoseconds.
pub(super) fn thread_cpu_ns(slot: &Slot) -> Option<u64> {
    crate::sys::CpuClock::from_raw(slot.cpu_clock.load(Ordering::Relaxed))?.now_ns()
}

/// The calling thread's nice value (0 where there is no such thing).
///
/// A new thread inherits its creator's nice value on Linux, and an
/// unprivileged process cannot raise it back: a runner started from a
/// demoted runner or from a CPU lane thread would serve fast requests at the
/// priority meant for hogs. The executor compares this with the nice value
/// of the thread that created it before starting a runner.
pub(super) fn current_nice() -> i32 {
    crate::sys::nice(0)
}

/// Sets runner thread `tid`'s nice value; whether it could.
fn set_nice(tid: i32, nice: i32) -> bool {
    // 0 would name the calling thread (the monitor): a runner that has not
    // published its id yet is left alone.
    tid > 0 && crate::sys::set_nice(tid, nice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_with_a_lowered_priority_knows_it() {
        let base = current_nice();
        let lowered = std::thread::spawn(move || {
            // Lowers only this test thread's own priority.
            let set = crate::sys::set_nice(0, (base + 5).min(19));
            (set, current_nice())
        })
        .join()
        .unwrap();
        assert!(lowered.0, "setpriority failed");
        assert!(lowered.1 > base || base == 19, "{lowered:?} vs {base}");
        assert_eq!(current_nice(), base, "only the other thread changed");
    }
}
