//! Every call into the operating system that Rust's standard library does
//! not wrap, each written once, behind a function that states its contract.
//!
//! * threads: the kernel id, the nice value, the CPU-time clock;
//! * processes: signals, pipes, descriptors kept across `exec`, and the
//!   descriptors a supervisor hands its workers;
//! * sockets: shutting one by its descriptor, and reading into hyper's
//!   buffer without zeroing it first;
//! * the allocator: giving free memory back;
//! * the process's exit: work to do when it exits.
//!
//! Calls go through rustix, whose functions are safe (typed descriptors,
//! `OwnedFd`s, errors as `io::Error`), wherever it has them. `libc` remains
//! for the three it lacks, `pthread_getcpuclockid`, glibc's `malloc_trim` and
//! `atexit`. The `unsafe` left here is where a contract rustix cannot check is
//! ours: those three calls, a descriptor named by number (a socket kept open by
//! protocol, one inherited from a supervisor), the child side of `fork`, and
//! telling hyper how much of its buffer a read filled.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) use rustix::process::Signal;

/// The calling thread's kernel id (its `tid`, what `/proc` and
/// `setpriority` name a thread by); 0 where there is none.
pub(crate) fn thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::gettid().as_raw_nonzero().get()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// The thread `tid` names (0: the calling thread), as rustix takes it.
#[cfg(target_os = "linux")]
fn thread(tid: i32) -> Option<rustix::process::Pid> {
    match tid {
        0 => None,
        tid => rustix::process::Pid::from_raw(tid),
    }
}

/// The nice value of thread `tid` (0: the calling thread); 0 where threads
/// have none. An error (a thread that has exited) reads as 0 too.
pub(crate) fn nice(tid: i32) -> i32 {
    #[cfg(target_os = "linux")]
    {
        // On Linux a "process" priority named by a thread id is that
        // thread's own.
        rustix::process::getpriority_process(thread(tid)).unwrap_or(0)
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
        rustix::process::setpriority_process(thread(tid), nice).is_ok()
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

/// Runs `f` when the process exits normally (`main` returns or
/// `std::process::exit`), not when it is killed or aborts. `f` must not
/// panic: a panic cannot unwind out of an exit handler, so the process aborts.
pub(crate) fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: atexit only records the pointer; `f` is a plain function that
    // lives as long as the program.
    unsafe { libc::atexit(f) == 0 }
}

/// Shuts both directions of the socket `fd`, which the caller keeps open
/// (so that the number cannot meanwhile name another file): its peer sees
/// the end, and a task blocked on it wakes up.
pub(crate) fn shutdown_socket(fd: RawFd) {
    // SAFETY: the caller keeps the descriptor open for the duration of the
    // call (see above). On one that is not a socket it fails with ENOTSOCK,
    // which changes nothing.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
}

/// Reads from the socket `fd` into the unfilled part of `buf`, without
/// zeroing it first, and marks what was read as filled. `look` sees the
/// bytes read before that. Returns how many.
///
/// `recv` rather than `read`: on a socket they do the same, but `read` goes
/// through the file layer first (descriptor position, permission hooks),
/// a visible share of a hello-world request's time in the kernel.
pub(crate) fn read_into(
    fd: BorrowedFd<'_>,
    buf: &mut hyper::rt::ReadBufCursor<'_>,
    look: impl FnOnce(&[u8]),
) -> io::Result<usize> {
    // SAFETY: rustix's recv only writes initialized bytes into the slice,
    // never de-initializes any.
    let unfilled = unsafe { buf.as_mut() };
    let ((read, _), _) = rustix::net::recv(fd, unfilled, rustix::net::RecvFlags::empty())?;
    let n = read.len();
    look(read);
    // SAFETY: the read initialized exactly the first `n` bytes of the
    // unfilled part.
    unsafe { buf.advance(n) };
    Ok(n)
}

/// Reads from the socket `fd` into the spare capacity of `buf` (grown by
/// `grow` bytes first if it has none), without zeroing it, and appends what
/// was read to `buf`. `look` sees the bytes read. Returns how many were
/// read and how many could have been.
pub(crate) fn recv_appending(
    fd: BorrowedFd<'_>,
    buf: &mut bytes::BytesMut,
    grow: usize,
    look: impl FnOnce(&[u8]),
) -> io::Result<(usize, usize)> {
    if buf.capacity() == buf.len() {
        buf.reserve(grow.max(1));
    }
    let spare = buf.spare_capacity_mut();
    let asked = spare.len();
    let ((read, _), _) = rustix::net::recv(fd, spare, rustix::net::RecvFlags::empty())?;
    let n = read.len();
    look(read);
    // SAFETY: the first `n` bytes of the spare capacity were just
    // initialized by the read.
    unsafe { buf.set_len(buf.len() + n) };
    Ok((n, asked))
}

/// Writes `bufs` to the socket `fd`, in order, as far as it takes them;
/// returns how many bytes it took.
///
/// A response's head and a short body (most answers) are copied into one
/// buffer of the thread's own and sent with one `send`: `writev` goes
/// through the file layer and copies in the array of pieces first, which
/// costs more than the copy. Longer ones go with `sendmsg`. `MSG_NOSIGNAL`:
/// a peer that went away is an error (`EPIPE`), never a signal.
pub(crate) fn send_vectored(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    /// The most copied into one `send`.
    const FLAT: usize = 4096;
    thread_local! {
        // Kept (not a zeroed array on the stack each time: zeroing 4 KiB
        // cost more than the copy).
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let flags = rustix::net::SendFlags::NOSIGNAL;
    let len: usize = bufs.iter().map(|b| b.len()).sum();
    match bufs {
        [] => Ok(0),
        [one] => Ok(rustix::net::send(fd, one, flags)?),
        _ if len <= FLAT => BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.clear();
            for buf in bufs {
                buffer.extend_from_slice(buf);
            }
            Ok(rustix::net::send(fd, &buffer, flags)?)
        }),
        _ => {
            let mut control = rustix::net::SendAncillaryBuffer::default();
            Ok(rustix::net::sendmsg(fd, bufs, &mut control, flags)?)
        }
    }
}

/// A pipe whose two ends close on `exec` (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Makes `cmd`'s child keep `fds` open across its `exec` (they are
/// close-on-exec in this process, so that no other child inherits them).
pub(crate) fn keep_open_in_child(cmd: &mut std::process::Command, fds: [RawFd; 2]) {
    // SAFETY: runs in the child between fork and exec and only calls fcntl,
    // which is async-signal-safe, on descriptors the child has inherited
    // (open there until its exec).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for fd in fds {
                let fd = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

/// Sends `signal` to process `pid` (a child of ours, which the caller has
/// not reaped yet, so that the PID cannot have been reused); whether it went.
pub(crate) fn send_signal(pid: u32, signal: Signal) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    rustix::process::kill_process(pid, signal).is_ok()
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
