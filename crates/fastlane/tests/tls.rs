//! HTTPS (`Config::tls`) over real sockets, with certificates made here:
//! HTTP/1.1 and HTTP/2 chosen by ALPN, the scheme `https` given to the
//! app, a reload that new connections see while an open one goes on, a
//! reload that fails keeping the old certificate, a plain-HTTP client
//! refused, and bad files named at start.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use fastlane::{ClientInfo, Config, TlsConfig};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate
/// PEM, key PEM, certificate DER).
fn certificate() -> (String, String, CertificateDer<'static>) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names).unwrap();
    (cert.pem(), key_pair.serialize_pem(), cert.der().clone())
}

/// A fresh directory for this test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fastlane-tls-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_pair(dir: &Path, cert: &str, key: &str) -> TlsConfig {
    let (certfile, keyfile) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&certfile, cert).unwrap();
    std::fs::write(&keyfile, key).unwrap();
    TlsConfig { certfile, keyfile }
}

/// A server of `app()` over HTTPS with a fresh certificate: its scratch
/// directory (the PEM files), the server, and the certificate to trust.
async fn start_https(test: &str) -> (PathBuf, fastlane::SpawnedServer, CertificateDer<'static>) {
    let dir = scratch(test);
    let (cert, key, der) = certificate();
    let tls = write_pair(&dir, &cert, &key);
    let server = support::start(app(), Config { tls: Some(tls), ..Config::default() }).await;
    (dir, server, der)
}

fn app() -> Router {
    Router::new().route("/scheme", get(|client: ClientInfo| async move { client.scheme() }))
}

/// A client that trusts `trusted` only, offering the `alpn` protocols.
fn connector(trusted: &CertificateDer<'static>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    addr: std::net::SocketAddr,
    trusted: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector(trusted, alpn).connect(name, tcp).await
}

/// One HTTP/1.1 GET on an open connection (kept alive); the body.
async fn get_on(stream: &mut Tls, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    // The body is short: read until the head and the declared length are in.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the connection closed: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap();
            if body.len() >= length {
                return body[..length].to_owned();
            }
        }
    }
}

#[tokio::test]
async fn https_serves_http1_and_http2_by_alpn_and_tells_the_app_its_scheme() {
    let (dir, server, der) = start_https("alpn").await;

    let mut http1 = connect(server.local_addr(), &der, &[b"http/1.1"]).await.unwrap();
    assert_eq!(http1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get_on(&mut http1, "/scheme").await, "https");

    let http2 = connect(server.local_addr(), &der, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(http2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(http2),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("https://localhost/scheme")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "https");

    // A client speaking plain HTTP to the port gets no answer, and the server goes on.
    let mut plain = tokio::net::TcpStream::connect(server.local_addr()).await.unwrap();
    plain.write_all(b"GET /scheme HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await.unwrap();
    assert!(!String::from_utf8_lossy(&answer).contains("https"), "{answer:?}");
    assert_eq!(get_on(&mut http1, "/scheme").await, "https");
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections_and_keeps_open_ones() {
    let (dir, server, der_a) = start_https("reload").await;
    let addr = server.local_addr();
    let mut open = connect(addr, &der_a, &[b"http/1.1"]).await.unwrap();
    assert_eq!(get_on(&mut open, "/scheme").await, "https");

    // A renewal replaces both files; the reload picks them up.
    let (cert_b, key_b, der_b) = certificate();
    write_pair(&dir, &cert_b, &key_b);
    server.handle().reload_tls().unwrap();
    let mut fresh = connect(addr, &der_b, &[b"http/1.1"]).await.unwrap();
    assert_eq!(get_on(&mut fresh, "/scheme").await, "https");
    assert!(connect(addr, &der_a, &[b"http/1.1"]).await.is_err(), "a new connection got the old certificate");
    // The connection made before the reload goes on.
    assert_eq!(get_on(&mut open, "/scheme").await, "https");

    // A reload that fails (the key of another certificate) keeps the one in use.
    let (_, key_c, _) = certificate();
    std::fs::write(dir.join("key.pem"), key_c).unwrap();
    let err = server.handle().reload_tls().unwrap_err();
    let message = fastlane::ErrorChain(&err).to_string();
    assert!(message.contains("key.pem") && message.contains("not the key of"), "{message}");
    let mut after = connect(addr, &der_b, &[b"http/1.1"]).await.unwrap();
    assert_eq!(get_on(&mut after, "/scheme").await, "https");
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn files_that_are_not_a_certificate_and_key_are_an_error_at_start_naming_the_file() {
    let dir = scratch("bad");
    let (cert, key, _) = certificate();
    let case = |name: &str, cert: &str, key: &str| {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        write_pair(&sub, cert, key)
    };
    let cases = [
        (case("no-cert", "not pem at all", &key), "cert.pem", "no PEM block BEGIN CERTIFICATE"),
        (case("no-key", &cert, "nothing here"), "key.pem", "no PEM block BEGIN PRIVATE KEY"),
        (
            TlsConfig { certfile: dir.join("missing.pem"), keyfile: dir.join("no-key/key.pem") },
            "missing.pem",
            "No such file",
        ),
    ];
    for (tls, file, why) in cases {
        let config = Config { port: 0, tls: Some(tls), ..Config::default() };
        let Err(err) = fastlane::Server::new(app()).config(config).bind().await else {
            panic!("bind must fail for {file}");
        };
        let message = fastlane::ErrorChain(&err).to_string();
        assert!(message.starts_with("could not set up TLS: "), "{message}");
        assert!(message.contains(file) && message.contains(why), "{message}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
