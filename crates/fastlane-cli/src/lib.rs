//! The `fastlane` command's logic; `main.rs` only parses and dispatches.
//! Each subcommand's module holds its flags (a `clap::Args` or
//! `clap::Subcommand` type) and its `run_command`.
//!
//! * [`demo`]: `fastlane demo`, the demo app of the seed scenarios;
//! * [`probe`]: the concurrency tester (`fastlane probe`);
//! * [`mixed`]: the fast-route-under-load benchmark (`fastlane bench mixed`);
//! * [`jobs`]: `fastlane jobs ...` (worker, enqueue, inspect, bench) and the
//!   built-in job types;
//! * [`serve`]: `fastlane serve main:app`, for ASGI (FastAPI) apps;
//! * [`outln!`] and [`out!`]: printing to stdout that survives a closed pipe.

pub mod demo;
pub mod jobs;
pub mod mixed;
pub mod probe;
pub mod serve;

/// Prints a line to stdout, as `println!` does, but ignores a write that
/// fails: `fastlane jobs show 1 | head -3` closes the pipe early, and Rust
/// ignores SIGPIPE, so `println!` would panic there. A one-shot command just
/// goes on to its exit code; a server (the demo's `/ping`) must not fall over
/// because whoever read its stdout went away.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`outln!`] without the newline.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let mut stdout = ::std::io::stdout().lock();
        let _ = ::std::write!(stdout, $($arg)*);
        let _ = stdout.flush();
    }};
}
