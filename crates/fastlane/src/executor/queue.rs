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

#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) tasks: VecDeque<Runnable>,
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

impl Queue {
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
}

thread_local! {
    /// While a runner dispatches I/O events, the tasks they wake for its
    /// executor (named by address) collect here instead of the shared queue:
    /// the runner runs the first itself and queues the rest.
    pub(super) static DISPATCH: RefCell<Option<(usize, Vec<Runnable>)>> = const { RefCell::new(None) };
}

/// What `schedule` must do after queueing a task.
enum Wake {
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
        // A runner about to start takes the task; otherwise one that is
        // already there is woken. Deciding in this order keeps `waking` and
        // `poller_woken` true: they are only set when the wake-up is sent.
        // A runner started from a low-priority thread would inherit its
        // priority: that start is left to the monitor, within a tick.
        let wake = if queue.threads < self.config.runners && monitor::current_nice() <= self.base_nice {
            queue.threads += 1;
            Wake::Start
        } else if queue.claim_sleeper() {
            Wake::Sleeper
        } else if let Some(index) = queue.roles.iter().position(|r| r.held && !r.woken) {
            queue.roles[index].woken = true;
            Wake::Poller(index)
        } else {
            Wake::Nobody
        };
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
        let free = queue.roles.iter().filter(|r| !r.held).count();
        for _ in 0..free {
            if !queue.claim_sleeper() {
                break;
            }
            self.work_ready.notify_one();
        }
    }

    /// Called by the monitor: makes sure idle runners are there to take the
    /// queue while some are stuck.
    pub(super) fn ensure_spares(self: &Arc<Self>) {
        let stuck = self.stuck.load(Ordering::Relaxed);
        let mut queue = self.lock();
        self.keep_polling(&mut queue);
        let healthy = queue.threads.saturating_sub(stuck);
        let mut wanted = self.config.runners.saturating_sub(healthy);
        if stuck > 0 {
            let waiting = queue.waiting();
            let missing_spares = SPARES_WHILE_STALLING.saturating_sub(waiting);
            wanted = wanted.max(queue.tasks.len().saturating_sub(waiting) + missing_spares);
        }
        let room = self.config.max_threads.saturating_sub(queue.threads);
        let start = wanted.min(room);
        queue.threads += start;
        drop(queue);
        for _ in 0..start {
            self.start_runner();
        }
    }
}
