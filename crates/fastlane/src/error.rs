//! [`Error`]: what can go wrong starting or running a server, and
//! [`ErrorChain`], which prints an error with its causes.
//!
//! An error's `Display` says what went wrong at its own level and leaves the
//! cause to `source()` (the Rust API guidelines' rule, which keeps a cause
//! from being printed twice when a caller walks the chain): print the whole
//! story with [`ErrorChain`].

use std::fmt;
use std::net::SocketAddr;

/// Errors from starting or running a [`Server`](crate::Server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listening address could not be bound (in use, no permission, ...).
    #[error("could not listen on {addr}")]
    Bind {
        /// The address that was asked for.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The host in the configuration is not an IP address or a resolvable name.
    #[error("invalid listening address `{0}`")]
    Address(String),
    /// The configuration is not usable; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An I/O error of the listener.
    #[error("listener error on {addr}")]
    Listener {
        /// The listener's address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Installing the SIGINT/SIGTERM handlers failed.
    #[error("could not install signal handlers")]
    Signal(#[source] std::io::Error),
    /// The TLS certificate or key could not be used; the source names the file.
    #[error("could not set up TLS")]
    Tls(#[source] crate::TlsError),
}

/// Prints an error and each of its causes, `: `-separated, the way a
/// command-line tool or a log line shows it:
/// `could not listen on 127.0.0.1:80: Permission denied (os error 13)`.
///
/// ```
/// let err = fastlane::Error::Signal(std::io::Error::other("no signalfd"));
/// assert_eq!(fastlane::ErrorChain(&err).to_string(), "could not install signal handlers: no signalfd");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let err = Error::Bind { addr: "127.0.0.1:1".into(), source: std::io::Error::other("in use") };
        assert_eq!(err.to_string(), "could not listen on 127.0.0.1:1");
        assert_eq!(ErrorChain(&err).to_string(), "could not listen on 127.0.0.1:1: in use");
    }
}
