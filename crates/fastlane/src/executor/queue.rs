//! The shared queue and the wake-up policy: where a task goes when it is
//! woken (the runner dispatching its I/O, or the shared queue), which runner
//! comes for it (one about to start, a sleeper, or the holder of a poller
//! role), and how the monitor keeps the sockets watched and spares at hand
//! while runners are stuck.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_task::Runnable;

use super::slot::Slot;
use super::{monitor, Shared, SPARES_WHILE_STALLING};

/// The shared queue and the counts the wake-up policy decides on, behind
/// the executor's one lock. Generic over the task only so that the model
/// (`executor/model.rs`) can run the same decisions on plain numbers.
#[derive(Debug)]
pub(super) struct Queue<T = Runnable> {
    pub(super) tasks: VecDeque<T>,
    pub(super) threads: usize,
    /// Runners asleep on `work_ready`.
    pub(super) idle: usize,
    /// Of those, how many have been notified and not yet woken up: spares
    /// a second notification for a runner that is already on its way.
    pub(super) waking: usize,
    /// The poller role of each reactor.
    pub(super) roles: Vec<Role>,
    pub(super) shutdown: bool,
}

/// The poller role of one reactor.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Role {
    /// A runner holds it: it waits for I/O, or is dispatching what it got.
    /// It counts as idle too.
    pub(super) held: bool,
    /// Its holder has been asked (through the reactor) to come back for the
    /// queue; spares repeated wake-ups until it does.
    pub(super) woken: bool,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self { tasks: VecDeque::new(), threads: 0, idle: 0, waking: 0, roles: Vec::new(), shutdown: false }
    }
}

impl<T> Queue<T> {
    /// Runners free to take work: asleep, or waiting for I/O.
    pub(super) fn waiting(&self) -> usize {
        self.idle + self.roles.iter().filter(|r| r.held).count()
    }

    /// A free poller role: the one the runner held last if it is free (its
    /// connections stay on its core), else the first free one.
    pub(super) fn free_role(&self, last: usize) -> Option<usize> {
        match self.roles.get(last) {
            Some(role) if !role.held => Some(last),
            _ => self.roles.iter().position(|r| !r.held),
        }
    }

    /// Claims a sleeping runner that nobody has notified yet; the caller
    /// notifies `work_ready`.
    pub(super) fn claim_sleeper(&mut self) -> bool {
        let free = self.idle > self.waking;
        if free {
            self.waking += 1;
        }
        free
    }

    /// Who comes for a task just queued, recorded here before the caller
    /// sends the wake-up (so that `waking` and a role's `woken` never claim
    /// a wake-up that was not sent). A runner about to start takes it, if
    /// fewer than `runners` run and this thread `may_start` one (a thread
    /// started from a low-priority thread would inherit its priority: that
    /// start is left to the monitor, within a tick; asked only then, as it
    /// is a system call and the shared queue's lock is held); else a
    /// sleeper nobody has notified yet; else the holder of a poller role not
    /// yet asked to come back; else nobody (every runner is busy or already
    /// on its way).
    pub(super) fn wake_for_new_task(&mut self, runners: usize, may_start: impl FnOnce() -> bool) -> Wake {
        if self.threads < runners && may_start() {
            self.threads += 1;
            Wake::Start
        } else if self.claim_sleeper() {
            Wake::Sleeper
        } else if let Some(index) = self.roles.iter().position(|r| r.held && !r.woken) {
            self.roles[index].woken = true;
            Wake::Poller(index)
        } else {
            Wake::Nobody
        }
    }

    /// Sleepers to wake (claimed here) so that every free poller role gets a
    /// holder: sockets nobody polls would go unwatched while every awake
    /// runner is busy or stuck.
    pub(super) fn claim_pollers(&mut self) -> usize {
        let free = self.roles.iter().filter(|r| !r.held).count();
        (0..free).take_while(|_| self.claim_sleeper()).count()
    }

    /// Runners to start now (counted here): enough for `runners` healthy
    /// ones, and while `stuck` runners hold their threads, enough for the
    /// queued tasks plus [`SPARES_WHILE_STALLING`] idle ones; never more
    /// than `max_threads` in all.
    pub(super) fn start_spares(&mut self, stuck: usize, runners: usize, max_threads: usize) -> usize {
        let healthy = self.threads.saturating_sub(stuck);
        let mut wanted = runners.saturating_sub(healthy);
        if stuck > 0 {
            let waiting = self.waiting();
            let missing_spares = SPARES_WHILE_STALLING.saturating_sub(waiting);
            wanted = wanted.max(self.tasks.len().saturating_sub(waiting) + missing_spares);
        }
        let start = wanted.min(max_threads.saturating_sub(self.threads));
        self.threads += start;
        start
    }

    /// Whether a runner that found no work for a while may retire: it is a
    /// spare (more than `runners` run), nothing is queued, and no runner is
    /// stuck (a stall keeps its spares).
    pub(super) fn spare_may_retire(&self, runners: usize, stuck: usize) -> bool {
        self.tasks.is_empty() && self.threads > runners && stuck == 0
    }
}

thread_local! {
    /// While a runner dispatches I/O events, the tasks they wake for its
    /// executor (named by address) collect here instead of the shared queue:
    /// the runner runs the first itself and queues the rest.
    pub(super) static DISPATCH: RefCell<Option<(usize, Vec<Runnable>)>> = const { RefCell::new(None) };
}

/// What `schedule` must do after queueing a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    Nobody,
    Start,
    Sleeper,
    Poller(usize),
}

impl Shared {
    pub(super) fn schedule(self: &Arc<Self>, runnable: Runnable) {
        if let Some(runnable) = self.divert(runnable) {
            self.enqueue(runnable);
        }
    }

    /// Puts a task on the shared queue and makes sure a runner comes for it.
    pub(super) fn enqueue(self: &Arc<Self>, runnable: Runnable) {
        let mut queue = self.lock();
        if queue.shutdown && queue.threads == 0 {
            // Too late: nobody will run it. Dropping cancels the task.
            return;
        }
        queue.tasks.push_back(runnable);
        let wake = queue.wake_for_new_task(self.config.runners, || monitor::current_nice() <= self.base_nice);
        drop(queue);
        match wake {
            Wake::Start => self.start_runner(),
            Wake::Sleeper => self.work_ready.notify_one(),
            Wake::Poller(index) => self.reactors[index].wake(),
            Wake::Nobody => {}
        }
    }

    /// Moves a runner's own queued tasks to the shared queue, for any
    /// runner to take: its current poll is taking long (or is stuck), and
    /// they should not wait for it.
    pub(super) fn share_local(self: &Arc<Self>, slot: &Slot) -> usize {
        // Taken out first: the local queue's lock is never held while the
        // shared queue's is taken (the runner takes them the other way).
        let tasks: Vec<Runnable> = slot.local().drain(..).collect();
        let count = tasks.len();
        for runnable in tasks {
            self.enqueue(runnable);
        }
        count
    }

    /// Keeps a task woken by the I/O this thread is dispatching (see
    /// [`DISPATCH`]); gives it back otherwise.
    pub(super) fn divert(&self, runnable: Runnable) -> Option<Runnable> {
        let me = self.address();
        DISPATCH.with(|dispatch| match dispatch.borrow_mut().as_mut() {
            Some((executor, batch)) if *executor == me => {
                batch.push(runnable);
                None
            }
            _ => Some(runnable),
        })
    }

    /// Called by the monitor every tick: if nobody holds the poller role
    /// while runners sleep, one of them must take it, or the sockets would
    /// go unwatched while every awake runner is busy (or stuck). A tick
    /// (1 ms) bounds how long that lasts, well inside the stall threshold.
    pub(super) fn keep_polling(&self, queue: &mut Queue) {
        for _ in 0..queue.claim_pollers() {
            self.work_ready.notify_one();
        }
    }

    /// Called by the monitor: makes sure idle runners are there to take the
    /// queue while some are stuck.
    pub(super) fn ensure_spares(self: &Arc<Self>) {
        let stuck = self.stuck.load(Ordering::Relaxed);
        let mut queue = self.lock();
        self.keep_polling(&mut queue);
        let start = queue.start_spares(stuck, self.config.runners, self.config.max_threads);
        drop(queue);
        for _ in 0..start {
            self.start_runner();
        }
    }
}

/// The decisions, as functions of the queue's counts: no thread, no timing.
#[cfg(test)]
mod tests {
    use super::*;

    fn queue(threads: usize, idle: usize, roles: usize) -> Queue {
        Queue { threads, idle, roles: vec![Role::default(); roles], ..Queue::default() }
    }

    fn task() -> Runnable {
        let (runnable, task) = async_task::spawn(async {}, |_| {});
        task.detach();
        runnable
    }

    #[test]
    fn a_task_starts_a_runner_below_the_count_unless_the_thread_may_not() {
        let mut q = queue(1, 0, 1);
        assert_eq!(q.wake_for_new_task(2, || true), Wake::Start);
        assert_eq!(q.threads, 2);
        // At the count: nobody is free, so nobody is woken; and the
        // thread's priority (a system call) is not asked.
        assert_eq!(q.wake_for_new_task(2, || panic!("asked at the count")), Wake::Nobody);
        // A low-priority thread leaves the start to the monitor.
        let mut q = queue(1, 0, 1);
        assert_eq!(q.wake_for_new_task(2, || false), Wake::Nobody);
        assert_eq!(q.threads, 1);
    }

    #[test]
    fn each_sleeper_and_each_poller_is_woken_once() {
        let mut q = queue(4, 1, 2);
        q.roles[1].held = true;
        assert_eq!(q.wake_for_new_task(4, || true), Wake::Sleeper);
        assert_eq!(q.waking, 1);
        // The sleeper is on its way: the next task asks the poller.
        assert_eq!(q.wake_for_new_task(4, || true), Wake::Poller(1));
        assert!(q.roles[1].woken);
        // Both asked already: no wake-up is sent twice.
        assert_eq!(q.wake_for_new_task(4, || true), Wake::Nobody);
        assert_eq!((q.waking, q.threads), (1, 4));
    }

    #[test]
    fn free_poller_roles_get_a_sleeper_each_while_there_are_sleepers() {
        let mut q = queue(4, 3, 2);
        assert_eq!(q.claim_pollers(), 2);
        assert_eq!(q.waking, 2);
        // The two are on their way: asking again wakes only the third.
        assert_eq!(q.claim_pollers(), 1);
        assert_eq!(q.claim_pollers(), 0);
        let mut q = queue(4, 1, 2);
        q.roles[0].held = true;
        assert_eq!(q.claim_pollers(), 1);
    }

    #[test]
    fn spares_start_for_the_stuck_and_the_queue_within_the_cap() {
        // No stall: only up to the runner count.
        let mut q = queue(2, 0, 1);
        assert_eq!(q.start_spares(0, 4, 256), 2);
        assert_eq!(q.threads, 4);
        assert_eq!(q.start_spares(0, 4, 256), 0);
        // Two of four stuck, three tasks queued, nobody waiting: the two
        // stuck ones are replaced, and there are runners for the queue plus
        // two idle spares.
        let mut q = queue(4, 0, 1);
        q.tasks.extend([task(), task(), task()]);
        assert_eq!(q.start_spares(2, 4, 256), 5);
        assert_eq!(q.threads, 9);
        // Never past the cap.
        let mut q = queue(4, 0, 1);
        q.tasks.extend([task(), task(), task()]);
        assert_eq!(q.start_spares(2, 4, 6), 2);
        assert_eq!(q.threads, 6);
        // Runners already waiting count against the spares.
        let mut q = queue(4, 2, 1);
        assert_eq!(q.start_spares(1, 4, 256), 1);
    }

    #[test]
    fn only_a_spare_retires_and_not_while_a_runner_is_stuck_or_work_waits() {
        assert!(!queue(4, 1, 1).spare_may_retire(4, 0), "not a spare");
        assert!(queue(5, 1, 1).spare_may_retire(4, 0));
        assert!(!queue(5, 1, 1).spare_may_retire(4, 1), "a stall keeps its spares");
        let mut q = queue(5, 1, 1);
        q.tasks.push_back(task());
        assert!(!q.spare_may_retire(4, 0), "work is waiting");
    }
}
