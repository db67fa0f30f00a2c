//! A runner thread's life: taking the next task (its own, the shared
//! queue's, or the I/O it waits for as a poller), running it with its poll
//! published for the monitor, retiring when spare or demoted, and reporting
//! a stall when the poll that was stuck returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_task::Runnable;

use super::queue::{Queue, Role, DISPATCH};
use super::reactor::Reactor;
use super::slot::{Slot, CURRENT, STUCK};
use super::{monitor, Shared, SPARE_KEEP_ALIVE};
use crate::routes::stall_message;

impl Shared {
    /// Starts one runner; the caller has counted it in `queue.threads`.
    pub(super) fn start_runner(self: &Arc<Self>) {
        let shared = self.clone();
        let slot = Arc::new(Slot::default());
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).push(slot.clone());
        self.threads.fetch_add(1, Ordering::Relaxed);
        self.metrics.isolation().threads.inc();
        self.metrics.isolation().started.inc();
        let spawned =
            std::thread::Builder::new().name("fastlane-runner".into()).spawn(move || shared.run(slot));
        if let Err(err) = spawned {
            tracing::error!(error = %err, "could not start a runner thread");
            self.lock().threads -= 1;
            self.threads.fetch_sub(1, Ordering::Relaxed);
            self.metrics.isolation().threads.dec();
        }
    }

    /// A runner thread's life.
    pub(super) fn run(self: Arc<Self>, slot: Arc<Slot>) {
        let _runtime = self.runtime.enter();
        monitor::publish_thread_ids(&slot);
        CURRENT.with(|c| *c.borrow_mut() = Some(slot.clone()));
        let mut batch = Vec::new();
        let mut role = 0;
        while let Some(runnable) = self.next(&slot, &mut batch, &mut role) {
            slot.poll_started.store(self.now_ns() + 1, Ordering::Release);
            // A panic inside a task (hyper or a handler) must not take the
            // runner down; handler panics are already answered 500 above us.
            let _ = catch_unwind(AssertUnwindSafe(|| runnable.run()));
            let started = slot.poll_started.swap(0, Ordering::AcqRel);
            if started & STUCK != 0 {
                let began = (started & !STUCK).saturating_sub(1);
                let took = Duration::from_nanos(self.now_ns().saturating_sub(began));
                self.stall_ended(&slot, took);
            }
            slot.panicking.store(false, Ordering::Relaxed);
        }
        CURRENT.with(|c| c.borrow_mut().take());
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| !Arc::ptr_eq(s, &slot));
        // A runner that leaves (demoted after a stall) hands on what it had.
        self.share_local(&slot);
        self.threads.fetch_sub(1, Ordering::Relaxed);
        self.metrics.isolation().threads.dec();
    }

    /// The next task for a runner, or `None` when it should retire.
    ///
    /// Its own tasks first (those its last I/O poll woke), then the shared
    /// queue. With both empty, the runner takes a free poller role (the one
    /// it held last, if free) and waits for I/O; otherwise it sleeps until
    /// work is queued.
    pub(super) fn next(
        &self,
        slot: &Slot,
        batch: &mut Vec<Runnable>,
        last_role: &mut usize,
    ) -> Option<Runnable> {
        if let Some(runnable) = slot.local().pop_front() {
            return Some(runnable);
        }
        let mut queue = self.lock();
        loop {
            if slot.demoted.load(Ordering::Relaxed) {
                // Its priority is at the floor: let a fresh thread take over.
                queue.threads -= 1;
                return None;
            }
            if let Some(runnable) = queue.tasks.pop_front() {
                return Some(runnable);
            }
            if queue.shutdown {
                queue.threads -= 1;
                if queue.threads == 0 {
                    drop(queue);
                    self.abandon_connections();
                }
                return None;
            }
            if let Some(role) = queue.free_role(*last_role) {
                queue.roles[role].held = true;
                drop(queue);
                let timed_out = self.poll_io(&self.reactors[role], batch);
                queue = self.lock();
                queue.roles[role] = Role::default();
                *last_role = role;
                let mut woken = batch.drain(..);
                let mine = woken.next();
                // The other woken tasks are this runner's next work: their
                // connections' data is in this core's cache. Should one of
                // them take long, the monitor shares the rest out.
                slot.local().extend(woken);
                let retire = mine.is_none() && timed_out && self.spare_may_retire(&queue);
                if retire {
                    queue.threads -= 1;
                }
                // The poller role is not handed on here: waking a runner per
                // batch just to wait in epoll costs a context switch each
                // time; the monitor hands it on within a tick if it stays
                // free while runners sleep (`keep_polling`).
                if retire && queue.claim_sleeper() {
                    self.work_ready.notify_one();
                }
                if mine.is_some() || retire {
                    return mine;
                }
                continue;
            }
            queue.idle += 1;
            self.idle.fetch_add(1, Ordering::Relaxed);
            let (next, waited) =
                self.work_ready.wait_timeout(queue, SPARE_KEEP_ALIVE).unwrap_or_else(|p| p.into_inner());
            queue = next;
            queue.idle -= 1;
            queue.waking = queue.waking.saturating_sub(1);
            self.idle.fetch_sub(1, Ordering::Relaxed);
            if waited.timed_out() && self.spare_may_retire(&queue) {
                queue.threads -= 1;
                return None;
            }
        }
    }

    /// The last runner is leaving a shut-down executor: nobody will poll
    /// the reactor again. The connections still registered (work the grace
    /// period cut) are shut, rather than leaving their clients on a
    /// connection that never answers, and their tasks woken, which with no
    /// runner left drops them.
    pub(super) fn abandon_connections(&self) {
        for reactor in &self.reactors {
            reactor.shut_all();
        }
    }

    /// A runner that found no work for [`SPARE_KEEP_ALIVE`] may retire if
    /// it is a spare and no stall needs spares kept.
    pub(super) fn spare_may_retire(&self, queue: &Queue) -> bool {
        queue.spare_may_retire(self.config.runners, self.stuck.load(Ordering::Relaxed))
    }

    /// Waits for I/O as the poller and collects the tasks it wakes into
    /// `batch`; returns whether the wait timed out with nothing to report.
    pub(super) fn poll_io(&self, reactor: &Reactor, batch: &mut Vec<Runnable>) -> bool {
        let me = self.address();
        DISPATCH.with(|dispatch| *dispatch.borrow_mut() = Some((me, std::mem::take(batch))));
        let polled = reactor.poll(SPARE_KEEP_ALIVE);
        if let Some((_, woken)) = DISPATCH.with(|dispatch| dispatch.borrow_mut().take()) {
            *batch = woken;
        }
        match polled {
            Ok(events) => events == 0,
            Err(err) => {
                // Not expected (epoll_wait fails only on bad arguments); do
                // not spin on it.
                tracing::error!(error = %err, "the runners' I/O poll failed");
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        }
    }

    pub(super) fn stall_ended(&self, slot: &Slot, took: Duration) {
        self.stuck.fetch_sub(1, Ordering::Relaxed);
        self.metrics.isolation().stuck.dec();
        if slot.charged.swap(false, Ordering::Relaxed) {
            self.budget.release();
        }
        let request = slot.take_stuck_request();
        let route = self.routes.by_id(slot.stuck_route.load(Ordering::Relaxed));
        let Some(route) = route else { return };
        route.stall_ended(took);
        // Computing if the thread was on a CPU for over half the stall
        // (since it was judged stuck), not if one of the monitor's looks
        // found it there: a sleep followed by the work of answering is a
        // blocking stall.
        let looked = slot.cpu_bound.swap(false, Ordering::Relaxed);
        let cpu = match (monitor::thread_cpu_ns(slot), slot.stall_cpu_ns.load(Ordering::Relaxed)) {
            (Some(now), start) if start != 0 => {
                let wall = self.now_ns().saturating_sub(slot.stall_wall_ns.load(Ordering::Relaxed));
                now.saturating_sub(start) as f64 >= monitor::CPU_BOUND_SHARE * wall as f64
            }
            _ => looked,
        };
        let panicked = slot.panicking.load(Ordering::Relaxed);
        let mut message = stall_message(&route, slot.stuck_phase(), took, Some(cpu), true, panicked);
        let deadline = slot.stuck_deadline_ms.swap(0, Ordering::Relaxed);
        if deadline != 0 && crate::coarse::now_ms() > deadline {
            // The request's timeout passed while its thread was blocked:
            // the 504 could not be sent, since a timeout can only take over
            // when the handler yields at an `.await`.
            let timeout = Duration::from_millis(slot.stuck_timeout_ms.load(Ordering::Relaxed));
            message.push_str(&format!(
                "; its {} timeout passed meanwhile and could not fire: a timeout interrupts a handler only at an .await",
                crate::telemetry::Human(timeout)
            ));
        }
        tracing::warn!(
            target: "fastlane::stall",
            method = %route.method,
            route = %route.route,
            request_id = request.as_ref().map(tracing::field::display),
            ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "{message}"
        );
    }
}
