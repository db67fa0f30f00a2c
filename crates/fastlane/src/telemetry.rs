//! Logging set-up for binaries.

/// Installs a `tracing` subscriber that prints to stderr, filtered by
/// `RUST_LOG` (default: `info` for everything). Call it once at the start of
/// `main`; a second call does nothing.
///
/// Request lines look like `GET /users/{id} 200 1.3ms`: the seed article's
/// `log_requests` middleware, built in.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
