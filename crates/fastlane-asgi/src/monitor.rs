//! The monitor: a thread of the front that reads every worker's loop tick
//! each millisecond. A loop that has not ticked for the stall threshold is
//! stalled: it gets no new requests, its watchdog thread is asked for the
//! loop's Python stack, and the stall is logged twice, once while it lasts
//! (where, and what to do) and once when it ends (how long, and who waited).
//! It also retires spare workers that have been idle for a while.
//!
//! Nothing here depends on a Python loop answering: the tick is a counter in
//! a shared file, and the stack comes from another thread of the worker.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::frame;
use crate::pool::Shared;
use crate::worker::{InFlight, Worker};

/// How often the ticks are read.
const PERIOD: Duration = Duration::from_millis(1);

/// How long the watchdog has to answer with the stack. A loop in pure
/// Python hands the GIL over every 5 ms; a C call that holds it does not.
const STACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts the monitor thread for `shared`; it ends with the pool.
pub(crate) fn start(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("fastlane-asgi-monitor".into())
        .spawn(move || run(weak))
        .expect("the monitor thread starts");
}

/// What the monitor knows of one worker's loop.
struct Seen {
    ticks: u64,
    changed: Instant,
    idle_since: Option<Instant>,
    stall: Option<Stall>,
    /// The loop thread's run-queue wait (ns) when its tick was first seen
    /// overdue by half the threshold: the wait since is not held against it.
    overdue: Option<u64>,
}

/// A stall in progress.
struct Stall {
    since: Instant,
    /// When it was seen, and the loop thread's CPU time then.
    seen: (Instant, Option<u64>),
    /// Shared with the thread that asks for the stack: whichever of the two
    /// learns last (the stack, or the end) writes what is left to write.
    shared: Arc<Mutex<StallLog>>,
    /// Whether the pool has been told, so that it may start a spare.
    told: bool,
}

/// What has been learnt of a stall so far.
#[derive(Default)]
struct StallLog {
    report: Option<Report>,
    /// The stall ended before its stack came: how long it lasted.
    ended: Option<Duration>,
}

/// What a stall report says: where the loop was and for which request.
#[derive(Debug, Default, Clone)]
struct Report {
    /// `GET /test2`, with the route template when the app told it.
    request: Option<String>,
    /// Its id, as its response and access log line carry it.
    request_id: Option<fastlane::RequestId>,
    /// The method and route (the template when the app told it, else the
    /// path) the stall is counted under in `/_fastlane/stalls`.
    route: Option<(String, String)>,
    /// The request's response had ended: a background task blocked.
    background: bool,
    /// `main.py:14 in test2: time.sleep(8)`, innermost app frame first.
    frames: Vec<String>,
    /// Why there is no stack.
    no_stack: Option<String>,
    /// The loop thread was in the loop's own wait or the worker's own code,
    /// running no code of the app: the tick was late because of a busy
    /// machine or a burst of requests, not because the app held the loop.
    idle: bool,
    /// The loop was importing this module (at its first use).
    importing: Option<String>,
}

fn run(weak: Weak<Shared>) {
    let mut seen: HashMap<u32, Seen> = HashMap::new();
    let mut last_housekeeping = Instant::now();
    loop {
        std::thread::sleep(PERIOD);
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopping.load(Ordering::Relaxed) && shared.snapshot().is_empty() {
            return;
        }
        let now = Instant::now();
        let workers = shared.snapshot();
        shared.recount_tainted(&workers);
        for worker in &workers {
            let Some(ticks) = worker.ticks() else { continue };
            let entry = seen.entry(worker.number).or_insert(Seen {
                ticks,
                changed: now,
                idle_since: None,
                stall: None,
                overdue: None,
            });
            if ticks != entry.ticks {
                entry.ticks = ticks;
                entry.changed = now;
                entry.overdue = None;
                if let Some(stall) = entry.stall.take() {
                    worker.stalled.store(false, Ordering::Relaxed);
                    worker.long_stall.store(false, Ordering::Relaxed);
                    if worker.demoted.load(Ordering::Relaxed) {
                        shared.nice(worker, 0);
                    }
                    shared.available.notify_waiters();
                    ended(&shared, worker, stall, now);
                }
            } else if let Some(stall) = &mut entry.stall {
                take_back(&shared, worker, ticks);
                demote_if_spinning(&shared, worker, stall, now);
                // A spare only for a stall that lasts twice the threshold: a
                // loop that is merely slow to tick on a loaded machine is back
                // by then, and a spare would only add a process to the load.
                if !stall.told && is_long(&shared, now.duration_since(stall.since)) {
                    stall.told = true;
                    worker.long_stall.store(true, Ordering::Relaxed);
                    // Its path is suspect from now on, if the stack has come
                    // (else `began` marks it when it does).
                    let log = stall.shared.lock().expect("stall log lock");
                    if let Some(request) =
                        log.report.as_ref().filter(|r| !r.idle).and_then(|r| r.request.as_deref())
                    {
                        shared.mark_suspect(request_key(request), None);
                    }
                    drop(log);
                    shared.stalled();
                }
            } else if !worker.gone.load(Ordering::Relaxed)
                && held(
                    worker,
                    &mut entry.overdue,
                    now.duration_since(entry.changed),
                    shared.config.stall_threshold,
                )
            {
                worker.stalled.store(true, Ordering::Relaxed);
                shared.stats.stalls.fetch_add(1, Ordering::Relaxed);
                let log = Arc::new(Mutex::new(StallLog::default()));
                let seen = (now, worker.loop_cpu_ns());
                entry.stall = Some(Stall { since: entry.changed, seen, shared: log.clone(), told: false });
                let (asker, stuck, since) = (shared.clone(), worker.clone(), entry.changed);
                // The answer may take a while (or never come): not on this thread.
                let _ = std::thread::Builder::new()
                    .name("fastlane-asgi-stack".into())
                    .spawn(move || began(&asker, &stuck, since, &log));
                take_back(&shared, worker, ticks);
            }
            let busy = worker.in_flight.load(Ordering::Relaxed) > 0;
            entry.idle_since = match (busy, entry.idle_since) {
                (true, _) => None,
                (false, None) => Some(now),
                (false, since) => since,
            };
        }
        if now.duration_since(last_housekeeping) >= Duration::from_secs(1) {
            last_housekeeping = now;
            seen.retain(|number, _| workers.iter().any(|w| w.number == *number));
            retire_idle_spare(&shared, &workers, &seen, now);
        }
    }
}

/// Sends what a blocked loop has not started to other workers (the loop's
/// tick counter read `ticks` a moment ago and has not moved since the stall
/// began).
fn take_back(shared: &Shared, worker: &Worker, ticks: u64) {
    if worker.unstarted.load(Ordering::Relaxed) == 0 {
        return;
    }
    if let Some(n) = worker.revoke_unstarted(ticks).filter(|&n| n > 0) {
        shared.stats.moved.fetch_add(n as u64, Ordering::Relaxed);
        tracing::debug!(worker = worker.number, "took back {n} requests its blocked loop had not started");
    }
}

/// Whether a stall that has lasted `lasted` is a long one: twice the
/// threshold, the bar for a spare and for suspecting the stalled path. A
/// loop on a loaded machine can be late by more than the threshold and back
/// a moment later; a spare for it would only add to the load.
fn is_long(shared: &Shared, lasted: Duration) -> bool {
    lasted >= shared.config.stall_threshold * 2
}

/// Whether a loop whose last tick was `age` ago has been held for the
/// threshold: by a blocking call or a spin, not by the machine. On a busy
/// machine (`wrk` and the front on two cores) a loop thread can wait for a
/// CPU past the threshold and tick a moment after it gets one; moving its
/// requests or starting spares would only add to the load. So the time its
/// thread spends runnable but not running (the kernel's schedstat, read from
/// half the threshold on) does not count: a blocked loop (asleep in a call)
/// and a spinning one (on the CPU) are stalled at the threshold, one that
/// shares a CPU a little later, one that only waits for a CPU never.
fn held(worker: &Worker, overdue: &mut Option<u64>, age: Duration, threshold: Duration) -> bool {
    if age <= threshold / 2 {
        return false;
    }
    let Some((_, wait)) = worker.loop_sched() else { return age > threshold };
    let since = *overdue.get_or_insert(wait);
    let waited = Duration::from_nanos(wait.saturating_sub(since));
    let held = age.saturating_sub(waited) > threshold;
    if held {
        tracing::debug!(
            worker = worker.number,
            "worker {}'s loop has not ticked for {:?}, {:?} of it waiting for a CPU: stalled",
            worker.number,
            age,
            waited
        );
    }
    held
}

/// A loop that has spun the CPU for most of the time since its stall was
/// seen (a pure-Python loop, not a blocking call) and for at least the
/// threshold gets the lowest priority until it comes back: the idle
/// scheduling class at nice 19 ([`frame::IDLE_CLASS`]), which any other
/// thread waking on its core preempts, so that the other workers, the front
/// and the rest of the machine keep their CPU time (as the Rust executor
/// demotes a runner thread that hogs its core).
fn demote_if_spinning(shared: &Shared, worker: &Worker, stall: &Stall, now: Instant) {
    if worker.demoted.load(Ordering::Relaxed) {
        return;
    }
    let (seen, Some(cpu_then)) = stall.seen else { return };
    let elapsed = now.duration_since(seen);
    if elapsed < shared.config.stall_threshold {
        return;
    }
    let Some(cpu_now) = worker.loop_cpu_ns() else { return };
    let spun = Duration::from_nanos(cpu_now.saturating_sub(cpu_then));
    if spun * 2 >= elapsed {
        shared.nice(worker, frame::IDLE_CLASS);
        tracing::debug!(
            worker = worker.number,
            "worker {}'s loop spins the CPU: lowered its priority",
            worker.number
        );
    }
}

/// Stops one spare that has been idle for the configured time
/// ([`AppConfig::spare_idle`](crate::AppConfig::spare_idle)), while no loop is
/// stalled and more workers run than `--workers` asks for.
fn retire_idle_spare(shared: &Shared, workers: &[Arc<Worker>], seen: &HashMap<u32, Seen>, now: Instant) {
    let open: Vec<_> = workers.iter().filter(|w| !w.closing.load(Ordering::Relaxed)).collect();
    let spare_idle = shared.config.spare_idle;
    if open.len() <= shared.config.workers || open.iter().any(|w| w.stalled.load(Ordering::Relaxed)) {
        return;
    }
    // The newest first: the first workers stay.
    let idle = open.iter().rev().find(|w| {
        seen.get(&w.number)
            .and_then(|s| s.idle_since)
            .is_some_and(|since| now.duration_since(since) >= spare_idle)
    });
    if let Some(worker) = idle {
        tracing::info!(
            worker = worker.number,
            pid = worker.pid,
            "stopping a spare worker, idle for {}",
            fastlane::HumanDuration(spare_idle)
        );
        worker.retire(Duration::from_secs(5));
    }
}

/// The first line of a stall: asks the watchdog for the stack and logs it
/// (with the end, if the stall ended meanwhile).
fn began(shared: &Shared, worker: &Worker, since: Instant, log: &Mutex<StallLog>) {
    let report = ask_stack(shared, worker);
    let mut log = log.lock().expect("stall log lock");
    if report.idle {
        // No code of the app held the loop: a busy machine or a burst
        // delayed the tick. Nothing to fix, and no route to suspect.
        tracing::debug!(
            worker = worker.number,
            "a tick of worker {} came late, but no code of the app held its loop",
            worker.number
        );
        log.report = Some(report);
        return;
    }
    // A path is suspect (kept off the last free loop) once it has held a
    // loop for twice the threshold, the bar a spare has to meet too: a
    // loaded machine makes the odd iteration of a busy loop run a little
    // past the threshold, and a path that is all the traffic, taken for a
    // blocker, would have every request wait for spares.
    let lasted = log.ended.unwrap_or_else(|| since.elapsed());
    if let Some(request) = report.request.as_deref().filter(|_| is_long(shared, lasted)) {
        shared.mark_suspect(request_key(request), log.ended.map(|_| Instant::now()));
    }
    count(shared, &report, |row| match log.ended {
        Some(lasted) => row.ended(lasted),
        None => row.ongoing += 1,
    });
    let (waited, so_far) = match log.ended {
        Some(lasted) => (lasted, ""),
        None => (since.elapsed(), " so far"),
    };
    let at = match (report.frames.first(), &report.no_stack) {
        (Some(frame), _) => format!(" at {frame}"),
        (None, Some(why)) => format!(" ({why})"),
        (None, None) => String::new(),
    };
    let called_from = match report.frames.len() {
        0 | 1 => String::new(),
        _ => format!(", called from {}", report.frames[1..].join(" ← ")),
    };
    tracing::warn!(
        target: "fastlane::stall",
        worker = worker.number,
        pid = worker.pid,
        request_id = report.request_id.as_ref().map(tracing::field::display),
        "{} blocked the event loop of worker {} for {}{so_far}{at}{called_from}; {}. Fix: {}",
        culprit(&report),
        worker.number,
        fastlane::HumanDuration(waited),
        if so_far.is_empty() { "it took no new requests meanwhile" } else { "it takes no new requests until it returns" },
        fix(&report)
    );
    log.report = Some(report);
}

/// `GET /test2`, `a background task of GET /x`, or what else blocked.
fn culprit(report: &Report) -> String {
    match &report.request {
        Some(request) if report.background => format!("a background task of {request}"),
        Some(request) => request.clone(),
        None => "a task of the app".to_owned(),
    }
}

/// The line at a stall's end: how long, and which requests waited for it.
fn ended(shared: &Shared, worker: &Worker, stall: Stall, now: Instant) {
    let lasted = now.duration_since(stall.since);
    let mut log = stall.shared.lock().expect("stall log lock");
    let Some(report) = log.report.clone() else {
        // The stack has not come yet: its line will say how long it lasted.
        log.ended = Some(lasted);
        return;
    };
    drop(log);
    if report.idle {
        return;
    }
    if let Some(request) = report.request.as_deref().filter(|_| is_long(shared, lasted)) {
        shared.mark_suspect(request_key(request), Some(now));
    }
    count(shared, &report, |row| {
        row.ongoing = row.ongoing.saturating_sub(1);
        row.ended(lasted);
    });
    let others: Vec<_> =
        worker.in_flight_list().into_iter().filter(|r| Some(r) != report.request.as_ref()).collect();
    let waited = match others.len() {
        0 => "no other request waited".to_owned(),
        n if n <= 3 => format!("{} waited for it", others.join(", ")),
        n => format!("{} and {} more waited for it", others[..3].join(", "), n - 3),
    };
    tracing::warn!(
        target: "fastlane::stall",
        worker = worker.number,
        pid = worker.pid,
        request_id = report.request_id.as_ref().map(tracing::field::display),
        "the event loop of worker {} was blocked {} by {}{}; {waited}",
        worker.number,
        fastlane::HumanDuration(lasted),
        culprit(&report),
        report.frames.first().map(|f| format!(" at {}", f.split(": ").next().unwrap_or(f))).unwrap_or_default(),
    );
}

/// `GET /items/3` and the app's route template `/items/{item_id}` → the
/// row of `/_fastlane/stalls` (`GET`, `/items/{item_id}`).
fn route_of(line: &str, template: Option<&str>) -> Option<(String, String)> {
    let (method, path) = line.split_once(' ')?;
    Some((method.to_owned(), template.unwrap_or(path).to_owned()))
}

/// Counts a stall in its route's row of `/_fastlane/stalls` (a task of no
/// request has a row of its own), with where it was stuck.
fn count(shared: &Shared, report: &Report, update: impl FnOnce(&mut fastlane::StallRow)) {
    let (method, route) =
        report.route.clone().unwrap_or_else(|| ("-".into(), "(a task of no request)".into()));
    let mut rows = shared.stall_rows.lock().expect("stall rows lock");
    let row =
        rows.entry((method.clone(), route.clone())).or_insert_with(|| fastlane::StallRow::new(method, route));
    if let Some(frame) = report.frames.first() {
        row.at = Some(frame.clone());
    }
    update(row);
}

/// `GET /items/{id}` → the key suspects are kept under: the request line as
/// the front saw it (`GET /items/3`); a report carries both.
fn request_key(request: &str) -> &str {
    request.split(" (").next().unwrap_or(request)
}

/// What to do about a stall, in one sentence.
fn fix(report: &Report) -> String {
    if let Some(module) = &report.importing {
        return format!(
            "the module `{module}` is imported at its first use, on the loop, and its files are read meanwhile \
             (a library importing on demand, or an `import` inside a function): import it when the app starts, \
             at the top of a module the app imports or in its lifespan startup"
        );
    }
    if report.background {
        "make the background function a plain `def` (Starlette runs it in a thread), or move its blocking call \
         to `await asyncio.to_thread(...)`"
    } else if report.request.is_some() {
        "declare the endpoint with `def` instead of `async def` (FastAPI runs it in a thread), or wrap the \
         blocking call in `await run_in_threadpool(...)` / `await asyncio.to_thread(...)`, or use an async library"
    } else {
        "move the blocking call to `await asyncio.to_thread(...)`, or use an async library"
    }
    .to_owned()
}

#[derive(serde::Deserialize, Default)]
struct StackReply {
    #[serde(default)]
    stack: Vec<(String, u32, String, bool, String)>,
    request: Option<u32>,
    route: Option<String>,
    #[serde(default)]
    after_response: bool,
    #[serde(default)]
    idle: bool,
    error: Option<String>,
    /// The module being imported, when the loop was inside an import.
    importing: Option<String>,
}

/// Asks the worker's watchdog thread for the loop's stack.
fn ask_stack(shared: &Shared, worker: &Worker) -> Report {
    let mut guard = worker.watchdog.lock().expect("watchdog lock");
    let Some(sock) = guard.as_mut() else {
        return Report { no_stack: Some("its watchdog is not connected".into()), ..Report::default() };
    };
    let reply = (|| -> std::io::Result<Vec<u8>> {
        sock.set_read_timeout(Some(STACK_TIMEOUT))?;
        sock.write_all(&frame::encode(frame::STACK, 0, b""))?;
        let mut header = [0u8; frame::HEADER];
        sock.read_exact(&mut header)?;
        let (len, kind, _) = frame::parse_header(&header);
        if kind != frame::STACK_REPLY {
            return Err(std::io::Error::other(format!("the watchdog answered with a frame of type {kind}")));
        }
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload)?;
        Ok(payload)
    })();
    let reply: StackReply = match reply {
        Ok(payload) => serde_json::from_slice(&payload).unwrap_or_default(),
        Err(err) => {
            // A late answer would be read as the next one's: start afresh without it.
            *guard = None;
            let why = if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                "its Python stack could not be read: the loop holds the GIL (a C extension?)".to_owned()
            } else {
                format!("its Python stack could not be read: {err}")
            };
            return Report { no_stack: Some(why), ..Report::default() };
        }
    };
    drop(guard);
    let mut report = Report {
        background: reply.after_response,
        idle: reply.idle,
        importing: reply.importing,
        ..Report::default()
    };
    if let Some(err) = reply.error {
        report.no_stack = Some(format!("its Python stack could not be read: {err}"));
    }
    if let Some(id) = reply.request {
        if let Some(InFlight { line, answered, request_id }) = worker.describe(id) {
            report.route = route_of(&line, reply.route.as_deref());
            report.request = Some(match &reply.route {
                Some(route) if !line.ends_with(route.as_str()) => format!("{line} (route {route})"),
                _ => line,
            });
            report.request_id = request_id;
            report.background |= answered;
        }
    }
    if report.request.is_none() {
        // A task the request started (a streaming body's, an anyio task
        // group's) is not the request's own; with one request in flight on
        // the worker, it is that request's.
        if let [only] = worker.in_flight_entries().as_slice() {
            report.route = route_of(&only.line, None);
            report.request = Some(only.line.clone());
            report.request_id.clone_from(&only.request_id);
            report.background = only.answered;
        }
    }
    let app_dir =
        std::fs::canonicalize(&shared.config.app_dir).unwrap_or_else(|_| shared.config.app_dir.clone());
    let show = |(file, line, func, _, source): &(String, u32, String, bool, String)| {
        let path = std::path::Path::new(file);
        let file = path.strip_prefix(&app_dir).map_or_else(|_| file.clone(), |p| p.display().to_string());
        if source.is_empty() {
            format!("{file}:{line} in {func}")
        } else {
            format!("{file}:{line} in {func}: {source}")
        }
    };
    // The app's own frames are the ones to fix; library frames only when
    // there is nothing else (the app's code called no Python of its own).
    let app: Vec<_> = reply.stack.iter().filter(|f| f.3).take(3).map(show).collect();
    report.frames = if app.is_empty() { reply.stack.iter().take(3).map(show).collect() } else { app };
    report
}
