//! Lowering a thread's OS scheduling priority.
//!
//! Why per thread: on Linux the nice value belongs to a thread (a task in
//! kernel terms), so `setpriority(PRIO_PROCESS, gettid(), n)` lowers only the
//! calling thread. That lets CPU-lane threads yield the cores to the I/O
//! runtime and to fast requests without touching the rest of the process.

/// Adds `delta` to the calling thread's nice value (lower priority). A no-op
/// for `delta <= 0` and on platforms without per-thread priorities.
pub(crate) fn lower_current_thread(delta: i32) {
    if delta <= 0 || !cfg!(target_os = "linux") {
        return;
    }
    let tid = crate::sys::thread_id();
    let target = (crate::sys::nice(tid) + delta).min(19);
    if !crate::sys::set_nice(tid, target) {
        tracing::debug!("could not lower the priority of a lane thread");
    }
}

/// The calling thread's nice value (Linux), for tests and status output.
#[allow(dead_code)]
pub(crate) fn current_nice() -> Option<i32> {
    cfg!(target_os = "linux").then(|| crate::sys::nice(crate::sys::thread_id()))
}
