//! [`Error`]: what can go wrong starting or running a server.

use std::net::SocketAddr;

/// Errors from starting or running a [`Server`](crate::Server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listening address could not be bound (in use, no permission, ...).
    #[error("could not listen on {addr}: {source}")]
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
    #[error("listener error on {addr}: {source}")]
    Listener {
        /// The listener's address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Installing the SIGINT/SIGTERM handlers failed.
    #[error("could not install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}
