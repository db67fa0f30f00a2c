//! Lowering a thread's OS scheduling priority.
//!
//! Why per thread: on Linux the nice value belongs to a thread (a task in
//! kernel terms), so `setpriority(PRIO_PROCESS, gettid(), n)` lowers only the
//! calling thread. That lets CPU-lane threads yield the cores to the I/O
//! runtime and to fast requests without touching the rest of the process.

/// Adds `delta` to the calling thread's nice value (lower priority). A no-op
/// for `delta <= 0` and on platforms without per-thread priorities.
#[allow(unsafe_code)]
pub(crate) fn lower_current_thread(delta: i32) {
    if delta <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; getpriority/setpriority take
        // plain integers and only affect the calling thread's nice value.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            let target = (current + delta).min(19);
            if libc::setpriority(libc::PRIO_PROCESS, tid, target) != 0 {
                tracing::debug!("could not lower the priority of a lane thread");
            }
        }
    }
}

/// The calling thread's nice value (Linux), for tests and status output.
#[allow(unsafe_code, dead_code)]
pub(crate) fn current_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as above, read-only.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            Some(libc::getpriority(libc::PRIO_PROCESS, tid))
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}
