//! HTTPS with rustls: the certificate and key read from their PEM files,
//! HTTP/2 offered by ALPN beside HTTP/1.1, and a reload of both files that
//! the handshakes from then on use while the connections already open keep
//! what they agreed (SIGHUP, as nginx and gunicorn reload theirs).

use std::path::Path;
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::config::TlsConfig;

/// Why a certificate or key could not be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM block of the kind needed.
    #[error("{what} {}: {why}", path.display())]
    File {
        /// `the certificate file` or `the key file`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The key is not one rustls can sign with, or not the certificate's.
    #[error("the key file {}: {why}", path.display())]
    Key {
        /// The key file.
        path: std::path::PathBuf,
        /// What went wrong.
        why: String,
    },
}

/// The TLS side of a server: accepts handshakes with the current
/// certificate, and swaps it on [`reload`](Tls::reload).
#[derive(Clone)]
pub(crate) struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.current.config).finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the files of `config`; fails (naming the file) if they do not
    /// make a usable certificate and key.
    pub(crate) fn new(config: &TlsConfig) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = load(config, &provider)?;
        let current =
            Arc::new(Current { config: config.clone(), provider: provider.clone(), key: RwLock::new(key) });
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Key { path: config.keyfile.clone(), why: err.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // Both, the client chooses: hyper serves either on the connection.
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)), current })
    }

    /// The acceptor for new connections.
    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again. On success, handshakes from now on present
    /// the new certificate; on failure the old one stays, and the error
    /// says why.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.current.config, &self.current.provider)?;
        *self.current.key.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }
}

/// The certificate handshakes present now.
#[derive(Debug)]
struct Current {
    config: TlsConfig,
    /// What reads the key (the one the server's handshakes use).
    provider: Arc<rustls::crypto::CryptoProvider>,
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The certificate chain and signing key of `config`'s files.
fn load(
    config: &TlsConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = read_certs(&config.certfile)?;
    let key = PrivateKeyDer::from_pem_file(&config.keyfile).map_err(|err| TlsError::File {
        what: "the key file",
        path: config.keyfile.clone(),
        why: pem_error(&err, "PRIVATE KEY"),
    })?;
    let bad_key = |why: String| TlsError::Key { path: config.keyfile.clone(), why };
    let signer = provider.key_provider.load_private_key(key).map_err(|err| bad_key(err.to_string()))?;
    let key = CertifiedKey::new(certs, signer);
    // A key that is not the certificate's would fail every handshake.
    key.keys_match().map_err(|_| bad_key(format!("it is not the key of {}", config.certfile.display())))?;
    Ok(Arc::new(key))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::File { what: "the certificate file", path: path.to_owned(), why };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| bad(pem_error(&err, "CERTIFICATE")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(pem_error(&err, "CERTIFICATE")))?;
    if certs.is_empty() {
        return Err(bad("it holds no PEM block BEGIN CERTIFICATE".to_owned()));
    }
    Ok(certs)
}

/// What a PEM error means to whoever wrote the flag.
fn pem_error(err: &rustls::pki_types::pem::Error, kind: &str) -> String {
    use rustls::pki_types::pem::Error;
    match err {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => format!("it holds no PEM block BEGIN {kind}"),
        other => format!("it is not valid PEM ({other:?})"),
    }
}
