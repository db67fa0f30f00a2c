//! What a runner thread publishes about itself for the monitor.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_task::Runnable;

use crate::routes::Phase;
use crate::RequestId;

/// Set in [`Slot::poll_started`] by the monitor when it judges the current
/// poll stuck. Packing the flag into the same word as the start time makes
/// "this poll, and not the next one, is stuck" a single compare-and-swap.
pub(crate) const STUCK: u64 = 1 << 63;

/// One runner thread's public state.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Nanoseconds since the executor's epoch at which the current poll
    /// began, plus one (so that 0 means "not polling"); [`STUCK`] is or-ed in
    /// by the monitor.
    pub(crate) poll_started: AtomicU64,
    /// The route being polled ([`NO_ROUTE`] outside a request).
    route: AtomicU32,
    phase: AtomicU8,
    /// The route and phase when the poll was judged stuck: what the stall is
    /// reported against when it ends.
    pub(crate) stuck_route: AtomicU32,
    pub(crate) stuck_phase: AtomicU8,
    /// Permits of the stall budget held by the current poll (see
    /// [`super::budget`]): a poll that sticks while holding one is already
    /// counted there.
    pub(crate) permits: AtomicU32,
    /// The monitor charged this runner's stuck poll to the stall budget (it
    /// held no permit); the charge is given back when the poll returns.
    pub(crate) charged: AtomicBool,
    /// The request being polled: its timeout, and when it expires
    /// ([`crate::coarse::now_ms`]); 0 for none. With the `stuck_` copies
    /// taken when the poll is judged stuck, the stall report can say that
    /// the timeout could not fire while the thread was blocked.
    deadline_ms: AtomicU64,
    timeout_ms: AtomicU64,
    pub(crate) stuck_deadline_ms: AtomicU64,
    pub(crate) stuck_timeout_ms: AtomicU64,
    /// The request whose handler is being polled, if one is (set with the
    /// route by [`enter_request`]); and its copy taken when the poll was
    /// judged stuck, for the stall's two log lines.
    request: Mutex<Option<RequestId>>,
    /// Whether `request` holds the request being polled: cleared without
    /// the lock when a request's poll ends (the runner is the only writer),
    /// so that a poll costs one lock, not two.
    request_set: AtomicBool,
    pub(crate) stuck_request: Mutex<Option<RequestId>>,
    /// The monitor lowered this thread's priority; it retires after the poll.
    pub(crate) demoted: AtomicBool,
    /// The stuck poll was burning CPU (not sleeping or waiting on I/O).
    pub(crate) cpu_bound: AtomicBool,
    /// The current poll panicked and the panic hook is running (with
    /// `RUST_BACKTRACE` set, writing a backtrace takes a while): a stall now
    /// is the panic's, not the handler's (see [`mark_panicking`]).
    pub(crate) panicking: AtomicBool,
    /// The monitor's bookkeeping for the CPU check: thread CPU time and wall
    /// time (ns) when last looked at.
    pub(crate) cpu_mark: AtomicU64,
    pub(crate) wall_mark: AtomicU64,
    /// The monitor's looks in a row that found the stuck poll on a CPU.
    pub(crate) cpu_looks: AtomicU8,
    /// The thread's CPU time and the wall time (ns) when its poll was judged
    /// stuck: the stall's report says "computing" when the thread was on a
    /// CPU for over half the stall from there.
    pub(crate) stall_cpu_ns: AtomicU64,
    pub(crate) stall_wall_ns: AtomicU64,
    /// The kernel's id of the thread (for setpriority) and its CPU-time
    /// clock (for clock_gettime); both 0 until the runner has started.
    pub(crate) tid: AtomicI32,
    pub(crate) cpu_clock: AtomicI32,
    /// Tasks woken by this runner's last I/O poll, beyond the one it ran
    /// first: its own work next, so that a connection stays on one core.
    /// The monitor moves them to the shared queue if the runner's current
    /// poll runs long (see `monitor::share_local`).
    pub(crate) local: Mutex<VecDeque<Runnable>>,
}

impl Slot {
    pub(crate) fn route(&self) -> u32 {
        self.route.load(Ordering::Relaxed)
    }

    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Copies what is being polled now into the `stuck_` fields.
    pub(crate) fn note_stuck_deadline(&self) {
        self.stuck_deadline_ms.store(self.deadline_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        self.stuck_timeout_ms.store(self.timeout_ms.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(crate) fn stuck_phase(&self) -> Phase {
        Phase::from_u8(self.stuck_phase.load(Ordering::Relaxed))
    }

    /// Copies the request being polled now (if any) into `stuck_request`.
    pub(crate) fn note_stuck_request(&self) -> Option<RequestId> {
        let request = match self.request_set.load(Ordering::Acquire) {
            true => lock(&self.request).clone(),
            false => None,
        };
        lock(&self.stuck_request).clone_from(&request);
        request
    }

    /// Takes the request the stuck poll was for.
    pub(crate) fn take_stuck_request(&self) -> Option<RequestId> {
        lock(&self.stuck_request).take()
    }

    pub(crate) fn local(&self) -> std::sync::MutexGuard<'_, VecDeque<Runnable>> {
        // Nothing panics while holding it (tasks run after it is released).
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Nothing panics while these locks are held; a poisoned one is still good.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The slot of the runner this thread is, if it is one.
    pub(crate) static CURRENT: RefCell<Option<Arc<Slot>>> = const { RefCell::new(None) };
}

/// Wraps the process's panic hook (once) so that a runner that panics says
/// so in its slot before the hook runs: the stall report of a poll held by a
/// slow hook (a backtrace being written) then names the panic instead of
/// blaming the handler for blocking or computing. A hook an app sets later
/// replaces this one; its panics are then reported as plain stalls.
pub(crate) fn mark_panicking() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = CURRENT.try_with(|current| {
                if let Ok(Some(slot)) = current.try_borrow().as_deref() {
                    slot.panicking.store(true, Ordering::Relaxed);
                }
            });
            previous(info);
        }));
    });
}

/// While alive, the current runner (if any) is marked as polling `route` in
/// `phase` (for a request's handler, with the request's deadline); dropping
/// it restores what was there before (polls nest: a connection polls a
/// request, which polls its body).
#[derive(Debug)]
pub(crate) struct RouteGuard {
    /// What to restore (route, phase, deadline, timeout); `None` off the
    /// runners (nothing was marked).
    previous: Option<(u32, u8, u64, u64)>,
    /// The request to restore, when [`enter_request`] replaced it.
    previous_request: Option<Option<RequestId>>,
}

/// Marks the current runner thread as working for `route` in `phase`.
pub(crate) fn enter_route(route: u32, phase: Phase) -> RouteGuard {
    enter(route, phase, 0, 0, None)
}

/// Marks the current runner thread as polling the handler of a request of
/// `route` whose `timeout_ms` expires at `deadline_ms` (coarse clock; 0 for
/// none): a stall past it can then say why no 504 came.
pub(crate) fn enter_request(
    route: u32,
    deadline_ms: u64,
    timeout_ms: u64,
    request: &RequestId,
) -> RouteGuard {
    enter(route, Phase::Handler, deadline_ms, timeout_ms, Some(request))
}

/// Marks the current runner thread as polling the streaming body of a
/// request of `route`: a stall names the request, as one of its handler does.
pub(crate) fn enter_body(route: u32, request: &RequestId) -> RouteGuard {
    enter(route, Phase::Body, 0, 0, Some(request))
}

/// The request being polled on this runner changed its timeout (a route's
/// own, set while its handler is polled).
pub(crate) fn request_deadline_changed(deadline_ms: u64, timeout_ms: u64) {
    CURRENT.with(|c| {
        if let Some(slot) = c.borrow().as_ref() {
            slot.deadline_ms.store(deadline_ms, Ordering::Relaxed);
            slot.timeout_ms.store(timeout_ms, Ordering::Relaxed);
        }
    });
}

fn enter(
    route: u32,
    phase: Phase,
    deadline_ms: u64,
    timeout_ms: u64,
    request: Option<&RequestId>,
) -> RouteGuard {
    CURRENT.with(|c| {
        let current = c.borrow();
        let Some(slot) = current.as_ref() else {
            return RouteGuard { previous: None, previous_request: None };
        };
        // Loads and stores, not swaps: this runner is the only writer of
        // these fields (the monitor only reads them), and a swap is a locked
        // instruction, paid on every poll of every request.
        let previous = (
            slot.route.load(Ordering::Relaxed),
            slot.phase.load(Ordering::Relaxed),
            slot.deadline_ms.load(Ordering::Relaxed),
            slot.timeout_ms.load(Ordering::Relaxed),
        );
        slot.route.store(route, Ordering::Relaxed);
        slot.phase.store(phase as u8, Ordering::Relaxed);
        slot.deadline_ms.store(deadline_ms, Ordering::Relaxed);
        slot.timeout_ms.store(timeout_ms, Ordering::Relaxed);
        // An uncontended lock per poll of a handler: the monitor takes it
        // only when it judges a poll stuck.
        let previous_request = request.map(|request| {
            let stored = lock(&slot.request).replace(request.clone());
            let was_set = slot.request_set.load(Ordering::Relaxed);
            slot.request_set.store(true, Ordering::Release);
            stored.filter(|_| was_set)
        });
        RouteGuard { previous: Some(previous), previous_request }
    })
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Some((route, phase, deadline_ms, timeout_ms)) = self.previous {
            let previous_request = self.previous_request.take();
            CURRENT.with(|c| {
                if let Some(slot) = c.borrow().as_ref() {
                    slot.route.store(route, Ordering::Relaxed);
                    slot.phase.store(phase, Ordering::Relaxed);
                    slot.deadline_ms.store(deadline_ms, Ordering::Relaxed);
                    slot.timeout_ms.store(timeout_ms, Ordering::Relaxed);
                    match previous_request {
                        Some(Some(request)) => *lock(&slot.request) = Some(request),
                        Some(None) => slot.request_set.store(false, Ordering::Release),
                        None => {}
                    }
                }
            });
        }
    }
}
