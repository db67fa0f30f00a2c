//! A loom model of the two hand-overs between runners that the unit tests
//! of `queue.rs` cannot reach, because they are about interleavings:
//!
//! * the batch hand-over: the tasks a runner's I/O poll woke wait in its
//!   local queue; while its current poll is stuck, the monitor moves them to
//!   the shared queue (`share_local`), racing with the runner taking them
//!   itself should it come back;
//! * the poller role: a runner that comes back from waiting for I/O with
//!   work gives the role up without waking anyone (a wake-up per batch
//!   would cost a context switch); if its task then sticks, the monitor's
//!   next tick (`keep_polling`) wakes a sleeper to take the role.
//!
//! The model is the runner loop of `runner.rs` (`Shared::next`), `enqueue`
//! and `share_local` of `queue.rs`, and the monitor's tick, written again
//! over loom's `Mutex` and `Condvar` and a reactor that is a queue of
//! events, but deciding with the very functions of [`Queue`] the executor
//! uses (`wake_for_new_task`, `free_role`, `claim_sleeper`,
//! `claim_pollers`). loom runs every interleaving of the threads (up to a
//! preemption bound) and checks, in each, that every task runs exactly once
//! and that no runner sleeps while work waits for it with nobody coming:
//! the test waits for the last task without ever shutting down, so a missed
//! wake-up leaves every thread blocked, which loom reports as a deadlock.

use std::collections::VecDeque;

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use super::queue::{Queue, Role, Wake};

/// The model's executor: the shared queue, its condition variable, one
/// reactor, and the record of what ran.
struct Exec {
    queue: Mutex<Queue<u32>>,
    work_ready: Condvar,
    reactor: Reactor,
    ran: Mutex<Vec<u32>>,
    ran_changed: Condvar,
    runners: usize,
}

/// The reactor: I/O events (each wakes one task) and the wake-up a poller
/// gets when asked to come back for the queue (`Reactor::wake` in
/// `reactor.rs`, an eventfd there).
#[derive(Default)]
struct Reactor {
    state: Mutex<ReactorState>,
    changed: Condvar,
}

#[derive(Default)]
struct ReactorState {
    events: VecDeque<u32>,
    woken: bool,
    shutdown: bool,
}

impl Reactor {
    /// Waits for events or a wake-up; the tasks the events woke.
    fn poll(&self) -> Vec<u32> {
        let mut state = self.state.lock().unwrap();
        while state.events.is_empty() && !state.woken && !state.shutdown {
            state = self.changed.wait(state).unwrap();
        }
        state.woken = false;
        state.events.drain(..).collect()
    }

    fn wake(&self) {
        self.state.lock().unwrap().woken = true;
        self.changed.notify_all();
    }

    /// A connection became readable: its task is woken by the next poll.
    fn deliver(&self, task: u32) {
        self.state.lock().unwrap().events.push_back(task);
        self.changed.notify_all();
    }
}

/// What a runner publishes: its local queue (`Slot::local`).
#[derive(Default)]
struct Slot {
    local: Mutex<VecDeque<u32>>,
}

impl Exec {
    fn new(runners: usize, threads: usize) -> Arc<Self> {
        let queue = Queue { threads, roles: vec![Role::default()], ..Queue::default() };
        Arc::new(Self {
            queue: Mutex::new(queue),
            work_ready: Condvar::new(),
            reactor: Reactor::default(),
            ran: Mutex::new(Vec::new()),
            ran_changed: Condvar::new(),
            runners,
        })
    }

    fn run(&self, task: u32) {
        self.ran.lock().unwrap().push(task);
        self.ran_changed.notify_all();
    }

    /// `Shared::enqueue`: queue the task, decide who comes, tell them
    /// after the lock is released.
    fn enqueue(&self, task: u32) {
        let mut queue = self.queue.lock().unwrap();
        queue.tasks.push_back(task);
        let wake = queue.wake_for_new_task(self.runners, || true);
        drop(queue);
        match wake {
            Wake::Sleeper => self.work_ready.notify_one(),
            Wake::Poller(_) => self.reactor.wake(),
            Wake::Nobody => {}
            Wake::Start => unreachable!("the model runs as many runners as it wants"),
        }
    }

    /// `Shared::share_local`: the local queue is emptied under its own
    /// lock first, then each task is queued (never both locks at once).
    fn share_local(&self, slot: &Slot) {
        let tasks: Vec<u32> = slot.local.lock().unwrap().drain(..).collect();
        for task in tasks {
            self.enqueue(task);
        }
    }

    /// The monitor's tick (`Shared::keep_polling`).
    fn keep_polling(&self) {
        let mut queue = self.queue.lock().unwrap();
        for _ in 0..queue.claim_pollers() {
            self.work_ready.notify_one();
        }
    }

    /// `Shared::next`: the runner's own tasks, then the shared queue, then
    /// the poller role, else sleep. `None` once shut down.
    fn next(&self, slot: &Slot) -> Option<u32> {
        if let Some(task) = slot.local.lock().unwrap().pop_front() {
            return Some(task);
        }
        let mut queue = self.queue.lock().unwrap();
        loop {
            if let Some(task) = queue.tasks.pop_front() {
                return Some(task);
            }
            if queue.shutdown {
                return None;
            }
            if let Some(role) = queue.free_role(0) {
                queue.roles[role].held = true;
                drop(queue);
                let woken = self.reactor.poll();
                queue = self.queue.lock().unwrap();
                queue.roles[role] = Role::default();
                let mut woken = woken.into_iter();
                let mine = woken.next();
                slot.local.lock().unwrap().extend(woken);
                if mine.is_some() {
                    return mine;
                }
                continue;
            }
            queue.idle += 1;
            queue = self.work_ready.wait(queue).unwrap();
            queue.idle -= 1;
            queue.waking = queue.waking.saturating_sub(1);
        }
    }

    /// A runner thread: takes and runs tasks until shut down.
    fn runner(exec: &Arc<Self>, slot: Arc<Slot>) -> thread::JoinHandle<()> {
        let exec = exec.clone();
        thread::spawn(move || {
            while let Some(task) = exec.next(&slot) {
                exec.run(task);
            }
        })
    }

    /// Waits until `n` tasks have run (a missed wake-up blocks here).
    fn wait_for(&self, n: usize) {
        let mut ran = self.ran.lock().unwrap();
        while ran.len() < n {
            ran = self.ran_changed.wait(ran).unwrap();
        }
    }

    /// Lets the runners leave, and checks that each task ran once.
    fn finish(&self, runners: Vec<thread::JoinHandle<()>>, tasks: &[u32]) {
        self.queue.lock().unwrap().shutdown = true;
        self.work_ready.notify_all();
        self.reactor.state.lock().unwrap().shutdown = true;
        self.reactor.changed.notify_all();
        for runner in runners {
            runner.join().unwrap();
        }
        let mut ran = self.ran.lock().unwrap().clone();
        ran.sort_unstable();
        assert_eq!(ran, tasks, "each task runs exactly once");
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    // Bugs of this kind need two or three preemptions at the wrong places;
    // without a bound the search does not end in a test's time.
    builder.preemption_bound = Some(3);
    builder.check(f);
}

/// Runner A's poll woke tasks 1 and 2 (in its local queue) and it is
/// running task 0; the monitor shares 1 and 2 out while A, back from 0,
/// takes its own; runner B waits for I/O or sleeps. Each task runs once,
/// and the shared ones are not left waiting: B is woken, or A takes them.
#[test]
fn a_stuck_runners_batch_is_run_once_and_not_stranded() {
    model(|| {
        let exec = Exec::new(2, 2);
        let a = Arc::new(Slot::default());
        a.local.lock().unwrap().extend([1, 2]);
        let b = Exec::runner(&exec, Arc::new(Slot::default()));
        let runner_a = {
            let (exec, a) = (exec.clone(), a.clone());
            thread::spawn(move || {
                exec.run(0);
                while let Some(task) = exec.next(&a) {
                    exec.run(task);
                }
            })
        };
        exec.share_local(&a);
        exec.wait_for(3);
        exec.finish(vec![b, runner_a], &[0, 1, 2]);
    });
}

/// Runner A's poll woke tasks 1 and 2 and A is stuck in task 0 for good;
/// runner B waits for I/O (it holds the poller role, free since A runs a
/// task), or is on its way there. The tasks the monitor shares out must
/// reach B: its reactor is woken, since no sleeper is there to notify.
#[test]
fn a_stuck_runners_batch_reaches_the_runner_waiting_for_io() {
    model(|| {
        let exec = Exec::new(2, 2);
        let a = Slot::default();
        a.local.lock().unwrap().extend([1, 2]);
        let b = Exec::runner(&exec, Arc::new(Slot::default()));
        exec.share_local(&a);
        exec.wait_for(2);
        exec.finish(vec![b], &[1, 2]);
    });
}

/// Runner A held the poller role and came back with task 5, giving the
/// role up as it does, without waking anyone; task 5 then sticks (A is gone
/// for the model). Runner B sleeps, since the role was held when it looked.
/// The monitor's tick after that wakes B, which takes the role, so the next
/// readable connection (task 6) is served.
#[test]
fn a_poller_role_given_up_by_a_runner_that_sticks_is_taken_over() {
    model(|| {
        // A counts as a thread: it is stuck, not gone.
        let exec = Exec::new(2, 2);
        exec.queue.lock().unwrap().roles[0].held = true;
        let b = Exec::runner(&exec, Arc::new(Slot::default()));
        let runner_a = {
            let exec = exec.clone();
            thread::spawn(move || {
                // A's poll returns with task 5 (what `next` does after
                // `poll_io`); A runs it and is stuck there.
                exec.reactor.deliver(5);
                let woken = exec.reactor.poll();
                exec.queue.lock().unwrap().roles[0] = Role::default();
                for task in woken {
                    exec.run(task);
                }
            })
        };
        runner_a.join().unwrap();
        // The monitor's next tick, with the role free.
        exec.keep_polling();
        exec.reactor.deliver(6);
        exec.wait_for(2);
        exec.finish(vec![b], &[5, 6]);
    });
}
