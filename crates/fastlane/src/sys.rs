//! Every call into the operating system that Rust's standard library does
//! not wrap: the crate's only `unsafe` code, each call written once, behind
//! a safe function that states its contract.
//!
//! * threads: the kernel id, the nice value, the CPU-time clock;
//! * processes: signals, pipes, descriptors kept across `exec`, and the
//!   descriptors a supervisor hands its workers;
//! * sockets: shutting one by its descriptor, and reading into hyper's
//!   buffer without zeroing it first;
//! * the allocator: giving free memory back.
//!
//! Why not a crate such as rustix: it covers pipes, signals and priorities,
//! but not `pthread_getcpuclockid` or `malloc_trim`, so two styles of FFI
//! would remain; these few calls on `libc`, each with its reason, are
//! simpler to audit in one place.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The calling thread's kernel id (its `tid`, what `/proc` and
/// `setpriority` name a thread by); 0 where there is none.
pub(crate) fn thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions and cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) as i32 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// The nice value of thread `tid` (0: the calling thread); 0 where threads
/// have none. An error (a thread that has exited) reads as 0 too.
pub(crate) fn nice(tid: i32) -> i32 {
    #[cfg(target_os = "linux")]
    {
        let Ok(who) = libc::id_t::try_from(tid) else { return 0 };
        // SAFETY: plain integers, read-only. -1 is both a valid value and the
        // error return, which is why errors are not told apart here.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, who) }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = tid;
        0
    }
}

/// Sets the nice value of thread `tid` (0: the calling thread); whether it
/// could (an unprivileged process cannot raise a priority back).
pub(crate) fn set_nice(tid: i32, nice: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(who) = libc::id_t::try_from(tid) else { return false };
        // SAFETY: plain integers; affects only that thread's nice value.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, nice);
        false
    }
}

/// A clock of the CPU time a thread has used, readable from any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuClock(i32);

impl CpuClock {
    /// The calling thread's CPU-time clock, where the OS has one.
    pub(crate) fn of_current_thread() -> Option<CpuClock> {
        #[cfg(target_os = "linux")]
        {
            let mut clock: libc::clockid_t = 0;
            // SAFETY: the calling thread's own handle and a valid out-pointer.
            let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
            (rc == 0).then_some(CpuClock(clock))
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }

    /// The clock as a number, to keep in an atomic (never 0 for a clock).
    pub(crate) fn raw(self) -> i32 {
        self.0
    }

    /// The clock a [`raw`](Self::raw) number stands for; `None` for 0.
    pub(crate) fn from_raw(raw: i32) -> Option<CpuClock> {
        (raw != 0).then_some(CpuClock(raw))
    }

    /// The CPU time used so far, in nanoseconds; `None` once the thread has
    /// exited (its clock is gone).
    pub(crate) fn now_ns(self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: a valid out-pointer; a clock of a thread that has exited
            // makes clock_gettime fail with EINVAL, which is handled.
            let rc = unsafe { libc::clock_gettime(self.0, &mut ts) };
            (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// Returns the allocator's free memory to the OS, where the allocator can.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions; it takes each arena's
        // lock while it works, so it is safe beside other threads'
        // allocations.
        unsafe { libc::malloc_trim(0) };
    }
}

/// Shuts both directions of the socket `fd`, which the caller keeps open
/// (so that the number cannot meanwhile name another file): its peer sees
/// the end, and a task blocked on it wakes up.
pub(crate) fn shutdown_socket(fd: RawFd) {
    // SAFETY: plain integers; on a descriptor that is not a socket it fails
    // with ENOTSOCK, which changes nothing.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Reads from `fd` into the unfilled part of `buf`, without zeroing it
/// first, and marks what was read as filled. `look` sees the bytes read
/// before that. Returns how many.
pub(crate) fn read_into(
    fd: RawFd,
    buf: &mut hyper::rt::ReadBufCursor<'_>,
    look: impl FnOnce(&[u8]),
) -> io::Result<usize> {
    // SAFETY: the kernel only writes into the unfilled part of the buffer
    // (never de-initializes it), at most its length, and the pointer stays
    // valid for the duration of the call.
    let rc = unsafe {
        let unfilled = buf.as_mut();
        libc::read(fd, unfilled.as_mut_ptr().cast(), unfilled.len())
    };
    let n = usize::try_from(rc).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: `read` initialized the first `n` bytes of the unfilled part;
    // they are only looked at, before `advance`.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_mut().as_ptr().cast(), n) };
    look(bytes);
    // SAFETY: `read` initialized exactly `n` bytes of the unfilled part.
    unsafe { buf.advance(n) };
    Ok(n)
}

/// A pipe whose two ends close on `exec` (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: a valid two-element out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just opened both descriptors, and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Makes `cmd`'s child keep `fds` open across its `exec` (they are
/// close-on-exec in this process, so that no other child inherits them).
pub(crate) fn keep_open_in_child(cmd: &mut std::process::Command, fds: [RawFd; 2]) {
    // SAFETY: runs in the child between fork and exec and only calls fcntl,
    // which is async-signal-safe, on descriptors the child has inherited.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for fd in fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Sends signal `sig` to process `pid` (a child of ours); whether it went.
pub(crate) fn send_signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: plain integers. The caller names its own child, which it has
    // not reaped yet, so the PID cannot have been reused.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Takes the descriptor whose number is in the environment variable `var`
/// (set by a fastlane supervisor for the worker it starts): `None` if it
/// is not set, not a number, or was taken before. Each variable must have
/// its own `taken` flag, so that a descriptor gets at most one owner.
pub(crate) fn take_inherited_fd(var: &str, taken: &AtomicBool) -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(var).ok()?.parse().ok()?;
    if fd < 0 || taken.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the supervisor opened this descriptor for this process and
    // named it in `var`; the flag makes this the only owner in the process.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
