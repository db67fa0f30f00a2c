//! Where log lines go: into a bounded buffer that a thread of its own writes
//! to stderr, so that a slow disk or a full pipe never makes a request (or a
//! runner, or the monitor) wait on a `write`; a line that does not fit is
//! dropped and counted instead.
//!
//! The writer thread takes every line that came while it slept and writes
//! them with one `write`, which under load is one system call for many
//! requests rather than one each. A line waits at most [`GATHER`] before it
//! is written. Lines still in the buffer when the process exits are written
//! then (the pipe is flushed at exit), unless it is killed.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes of lines that may wait for the writer thread; past it, lines are
/// dropped. 1 MiB is some 8,000 access lines: a second of a busy server's
/// log while stderr is stuck.
const CAPACITY: usize = 1 << 20;

/// How long the writer thread lets lines gather after the first one of a
/// batch comes: long enough to write many in one call under load, short
/// enough that a person watching the log sees no delay.
const GATHER: Duration = Duration::from_millis(2);

/// How long [`flush`] waits for the writer at exit before giving up on it
/// (stderr may be a pipe nobody reads).
const FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// The process's log pipe, once logging is set up.
static PIPE: OnceLock<Pipe> = OnceLock::new();

/// Log lines dropped so far because stderr did not take them
/// (`fastlane_log_lines_dropped_total`); 0 before logging is set up.
pub(crate) fn dropped() -> u64 {
    PIPE.get().map_or(0, |pipe| pipe.dropped.load(Ordering::Relaxed))
}

struct Pipe {
    state: Mutex<State>,
    /// The writer thread waits here for the first line of a batch.
    work: Condvar,
    /// `flush` waits here for the buffer to be written.
    written: Condvar,
    /// Lines dropped because the buffer was full, over the pipe's life.
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// Dropped since the writer last said so in the log.
    unreported: u64,
    /// The writer thread is asleep on `work` and must be woken.
    idle: bool,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves plain bytes behind: still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, line: &[u8]) {
        let mut state = self.lock();
        if state.lines.len() + line.len() > CAPACITY {
            state.unreported += 1;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if state.unreported > 0 {
            // The first line after a gap: the note goes where the gap is.
            let dropped = std::mem::take(&mut state.unreported);
            note_gap(&mut state.lines, dropped);
        }
        state.lines.extend_from_slice(line);
        if state.idle {
            state.idle = false;
            drop(state);
            self.work.notify_one();
        }
    }

    /// The writer thread: sleeps until a line comes, lets more gather, and
    /// writes them all at once.
    fn run(&self, out: &mut dyn Write) {
        let mut batch = Vec::with_capacity(64 * 1024);
        loop {
            let mut state = self.lock();
            while state.lines.is_empty() && state.unreported == 0 {
                state.idle = true;
                self.written.notify_all();
                state = self.work.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            drop(state);
            std::thread::sleep(GATHER);
            let mut state = self.lock();
            std::mem::swap(&mut batch, &mut state.lines);
            let dropped = std::mem::take(&mut state.unreported);
            state.writing = true;
            drop(state);
            if dropped > 0 {
                // Nothing came after the gap yet: it is at the end.
                note_gap(&mut batch, dropped);
            }
            // A failed write (stderr closed) loses this batch, as a blocking
            // writer would have lost each line.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > 4 * CAPACITY {
                batch.shrink_to(64 * 1024);
            }
            self.lock().writing = false;
        }
    }

    /// Waits until every line pushed before the call is written, up to `limit`.
    fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        if state.idle && !state.lines.is_empty() {
            state.idle = false;
            self.work.notify_one();
        }
        while !state.lines.is_empty() || state.writing || state.unreported > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = match self.written.wait_timeout(state, left.min(Duration::from_millis(10))) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Says in the log itself that lines are missing at this point.
fn note_gap(lines: &mut Vec<u8>, dropped: u64) {
    let _ = writeln!(
        lines,
        "fastlane: {dropped} log line(s) dropped here: stderr did not take them as fast as they came \
         (fastlane_log_lines_dropped_total counts them)"
    );
}

/// The `MakeWriter` of [`init_logging_with`](crate::init_logging_with): each
/// formatted event is one `write` of a whole line into the pipe.
#[derive(Clone, Copy)]
pub(crate) struct PipeWriter(&'static Pipe);

impl std::fmt::Debug for PipeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PipeWriter")
    }
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for PipeWriter {
    type Writer = PipeWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

impl Pipe {
    fn new() -> Self {
        Self {
            state: Mutex::default(),
            work: Condvar::new(),
            written: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }
}

/// The process's pipe to stderr, its writer thread started on first use and
/// its lines written out at exit.
pub(crate) fn stderr_pipe() -> PipeWriter {
    let mut started = false;
    let pipe: &'static Pipe = PIPE.get_or_init(|| {
        started = true;
        Pipe::new()
    });
    if started {
        let spawned = std::thread::Builder::new().name("fastlane-log".into()).spawn(|| {
            if let Some(pipe) = PIPE.get() {
                pipe.run(&mut io::stderr());
            }
        });
        if let Err(err) = spawned {
            // Without its thread the pipe would fill and drop every line.
            eprintln!("fastlane: could not start the log writer thread ({err}); logging stops here");
        }
        crate::sys::at_exit(flush_at_exit);
    }
    PipeWriter(pipe)
}

extern "C" fn flush_at_exit() {
    if let Some(pipe) = PIPE.get() {
        pipe.flush(FLUSH_LIMIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    /// Output that takes nothing until the test lets it, and says when a
    /// write is waiting.
    struct Stuck {
        entered: mpsc::Sender<()>,
        gate: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.gate.recv();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_stderr_drops_and_counts_lines_without_making_anyone_wait() {
        let pipe: &'static Pipe = Box::leak(Box::new(Pipe::new()));
        let (open, gate) = mpsc::channel();
        let (entered, writing) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = Stuck { entered, gate, got: got.clone() };
        std::thread::spawn(move || pipe.run(&mut out));

        // The writer takes a first line and sticks in `write`; then three
        // times the buffer's worth of lines come, at full speed.
        pipe.push(b"first\n");
        writing.recv_timeout(Duration::from_secs(10)).expect("the writer writes the first line");
        let line = format!("{}\n", "x".repeat(99));
        let lines = 3 * CAPACITY / line.len();
        let started = Instant::now();
        for _ in 0..lines {
            pipe.push(line.as_bytes());
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "pushing {lines} lines took {took:?}");
        // The buffer kept what fits in it; the rest was dropped and counted.
        let fits = CAPACITY / line.len();
        assert_eq!(pipe.dropped.load(Ordering::Relaxed) as usize, lines - fits);

        // Once stderr takes lines again, what was kept is written, and the
        // gap is said where it is: after them.
        drop(open);
        pipe.flush(Duration::from_secs(10));
        let got = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert!(got.starts_with("first\n"), "{}", &got[..50]);
        assert_eq!(got.lines().filter(|l| l.starts_with("xxx")).count(), fits);
        let note = format!("fastlane: {} log line(s) dropped here", lines - fits);
        assert!(got.trim_end().lines().last().unwrap().starts_with(&note), "{}", &got[got.len() - 300..]);
    }

    #[test]
    fn lines_are_written_whole_and_in_order() {
        let pipe: &'static Pipe = Box::leak(Box::new(Pipe::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = mpsc::channel();
        drop(open); // Never stuck: `recv` fails at once.
        let (entered, _) = mpsc::channel();
        let mut out = Stuck { entered, gate, got: got.clone() };
        std::thread::spawn(move || pipe.run(&mut out));
        for i in 0..10_000 {
            pipe.push(format!("line {i}\n").as_bytes());
        }
        pipe.flush(Duration::from_secs(10));
        let got = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        let expected: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(got, expected);
    }
}
