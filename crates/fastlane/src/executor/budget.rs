//! The stall budget: how many runner threads the routes that stall may hold
//! at once, so that the others always have threads left.
//!
//! Isolation replaces a stuck runner with a fresh thread, up to
//! [`IsolationConfig::max_threads`](super::IsolationConfig). Without a
//! budget, a flood of blocking requests (or of blocking background tasks)
//! takes every thread up to that cap, and then nothing is left for the
//! routes that behave: the whole server stops, as in plain axum, only later.
//!
//! So the routes that have stalled recently ([`StallStats::suspect`]) run
//! each poll under a permit of this budget, sized to leave the healthy
//! runners (and a reserve) free. A thread stuck outside any permit (a route
//! stalling for the first time, before anyone knew) is charged to the
//! budget by the monitor while it stays stuck. When the budget is spent:
//!
//! * a new request for a suspect route is refused at once (`503`,
//!   `Retry-After`): it is the route that stalls that is refused, not the
//!   others;
//! * work already accepted (a later poll of an admitted request, a
//!   background task, a job) waits for a permit, first come first served,
//!   with its task parked: it runs later, and holds no thread meanwhile.
//!
//! A permit is held for one poll only, so a suspect route whose requests
//! mostly await (and block only now and then) is not limited in how many it
//! has in flight, only in how many threads it can hold at once.
//!
//! [`StallStats::suspect`]: crate::routes::StallStats::suspect

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::slot::CURRENT;

/// Runner threads the stalls may hold at once.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    /// Permits held plus stuck threads charged; may exceed `limit` (a
    /// charge is never refused: the thread is stuck already).
    used: AtomicUsize,
    waiters: Mutex<VecDeque<Arc<Ticket>>>,
    /// `waiters.len()`, readable without the lock.
    waiting: AtomicUsize,
}

/// A place in the queue for a permit.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// A permit was handed to this ticket by [`Budget::release`].
    granted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            waiters: Mutex::new(VecDeque::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Permits held and threads charged right now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Accepted work waiting for a permit right now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether a new request for a suspect route would find a permit now
    /// (nothing queued ahead of it, and room).
    pub(crate) fn has_room(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) == 0 && self.used.load(Ordering::Relaxed) < self.limit
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Ticket>>> {
        // Nothing panics while holding it.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a permit if one is free and nobody waits for one.
    fn try_acquire(&self, waiters: &VecDeque<Arc<Ticket>>) -> bool {
        if !waiters.is_empty() || self.used.load(Ordering::Relaxed) >= self.limit {
            return false;
        }
        self.used.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Counts a thread that got stuck without a permit.
    pub(crate) fn charge(&self) {
        let _waiters = self.lock();
        self.used.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives a permit (or a charge) back: to the first waiter if there is
    /// room for it, else to the pool.
    pub(crate) fn release(&self) {
        let mut waiters = self.lock();
        let used = self.used.fetch_sub(1, Ordering::Relaxed) - 1;
        if used < self.limit {
            if let Some(ticket) = waiters.pop_front() {
                self.waiting.store(waiters.len(), Ordering::Relaxed);
                self.used.fetch_add(1, Ordering::Relaxed);
                drop(waiters);
                ticket.granted.store(true, Ordering::Release);
                let waker = ticket.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
    }

    /// A waiter that will not use its ticket (its task was dropped): out of
    /// the queue, or the permit it was just given back.
    fn cancel(&self, ticket: &Arc<Ticket>) {
        let mut waiters = self.lock();
        if ticket.granted.load(Ordering::Acquire) {
            drop(waiters);
            self.release();
            return;
        }
        waiters.retain(|t| !Arc::ptr_eq(t, ticket));
        self.waiting.store(waiters.len(), Ordering::Relaxed);
    }

    /// Takes a permit at once if it can (`None`); otherwise queues a ticket
    /// that `waker` is woken for, and returns it.
    fn acquire_or_queue(&self, waker: &Waker) -> Option<Arc<Ticket>> {
        let mut waiters = self.lock();
        if self.try_acquire(&waiters) {
            return None;
        }
        let ticket =
            Arc::new(Ticket { granted: AtomicBool::new(false), waker: Mutex::new(Some(waker.clone())) });
        waiters.push_back(ticket.clone());
        self.waiting.store(waiters.len(), Ordering::Relaxed);
        Some(ticket)
    }
}

/// One task's (or request's) use of the budget: runs each of its polls
/// under a permit while its route is suspect.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Queued for a permit (and maybe given one since).
    ticket: Option<(Arc<Budget>, Arc<Ticket>)>,
}

impl Gate {
    /// Runs `poll` under a permit of `budget` if `suspect` (or if this gate
    /// is already queued); otherwise runs it at once. Without a permit free,
    /// parks the task until one is given to it.
    pub(crate) fn poll<T>(
        &mut self,
        budget: &Arc<Budget>,
        suspect: bool,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let permitted = match &self.ticket {
            Some((_, ticket)) => {
                if !ticket.granted.load(Ordering::Acquire) {
                    let mut waker = ticket.waker.lock().unwrap_or_else(|p| p.into_inner());
                    match waker.as_ref() {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                    drop(waker);
                    // Granted while the waker was being stored: go on.
                    if !ticket.granted.load(Ordering::Acquire) {
                        return Poll::Pending;
                    }
                }
                self.ticket = None;
                true
            }
            None if !suspect => false,
            None => match budget.acquire_or_queue(cx.waker()) {
                None => true,
                Some(ticket) => {
                    self.ticket = Some((budget.clone(), ticket));
                    return Poll::Pending;
                }
            },
        };
        if !permitted {
            return poll(cx);
        }
        let _held = Held::new(budget);
        poll(cx)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some((budget, ticket)) = self.ticket.take() {
            budget.cancel(&ticket);
        }
    }
}

/// A permit held for one poll: published on the runner's slot (so that the
/// monitor does not charge the thread a second time if the poll sticks),
/// and given back when the poll returns, or unwinds.
struct Held<'a> {
    budget: &'a Budget,
}

impl<'a> Held<'a> {
    fn new(budget: &'a Budget) -> Self {
        CURRENT.with(|c| {
            if let Some(slot) = c.borrow().as_ref() {
                slot.permits.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self { budget }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| {
            if let Some(slot) = c.borrow().as_ref() {
                slot.permits.fetch_sub(1, Ordering::Relaxed);
            }
        });
        self.budget.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    #[derive(Default)]
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn context(wakes: &Arc<CountWakes>) -> Waker {
        Waker::from(wakes.clone())
    }

    #[test]
    fn healthy_routes_never_touch_the_budget() {
        let budget = Arc::new(Budget::new(1));
        budget.charge();
        let mut gate = Gate::default();
        let wakes = Arc::new(CountWakes::default());
        let waker = context(&wakes);
        let mut cx = Context::from_waker(&waker);
        assert_eq!(gate.poll(&budget, false, &mut cx, |_| Poll::Ready(7)), Poll::Ready(7));
        assert_eq!(budget.used(), 1);
    }

    #[test]
    fn a_suspect_poll_waits_for_a_permit_in_turn_and_gives_it_back() {
        let budget = Arc::new(Budget::new(1));
        let wakes = Arc::new(CountWakes::default());
        let waker = context(&wakes);
        let mut cx = Context::from_waker(&waker);
        // A stuck thread outside any permit takes the only place.
        budget.charge();
        assert!(!budget.has_room());
        let (mut first, mut second) = (Gate::default(), Gate::default());
        let mut ran = Vec::new();
        assert!(first
            .poll(&budget, true, &mut cx, |_| {
                ran.push(1);
                Poll::Ready(())
            })
            .is_pending());
        assert!(second
            .poll(&budget, true, &mut cx, |_| {
                ran.push(2);
                Poll::Ready(())
            })
            .is_pending());
        assert!(ran.is_empty(), "nothing runs without a permit");
        // The stall ends: its place goes to the first in the queue.
        budget.release();
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "the first waiter is woken");
        assert!(second
            .poll(&budget, true, &mut cx, |_| {
                ran.push(2);
                Poll::Ready(())
            })
            .is_pending());
        assert_eq!(
            first.poll(&budget, true, &mut cx, |_| {
                ran.push(1);
                Poll::Ready(())
            }),
            Poll::Ready(())
        );
        // Its poll returned: the permit passes to the second.
        assert_eq!(
            second.poll(&budget, true, &mut cx, |_| {
                ran.push(2);
                Poll::Ready(())
            }),
            Poll::Ready(())
        );
        assert_eq!(ran, [1, 2]);
        assert_eq!(budget.used(), 0);
        assert!(budget.has_room());
    }

    #[test]
    fn a_waiter_dropped_gives_its_place_or_its_permit_back() {
        let budget = Arc::new(Budget::new(1));
        let wakes = Arc::new(CountWakes::default());
        let waker = context(&wakes);
        let mut cx = Context::from_waker(&waker);
        budget.charge();
        let mut queued = Gate::default();
        assert!(queued.poll(&budget, true, &mut cx, |_| Poll::Ready(())).is_pending());
        drop(queued);
        assert!(!budget.has_room(), "the charge still holds the place");
        budget.release();
        assert!(budget.has_room(), "the dropped waiter got nothing");

        budget.charge();
        let mut granted = Gate::default();
        assert!(granted.poll(&budget, true, &mut cx, |_| Poll::Ready(())).is_pending());
        budget.release();
        assert_eq!(budget.used(), 1, "handed to the waiter");
        drop(granted);
        assert_eq!(budget.used(), 0, "given back by the dropped waiter");
    }
}
