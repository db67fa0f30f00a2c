//! Shared by the integration tests: a server on 127.0.0.1:0.

use std::time::Duration;

use axum::Router;
use fastlane::{Config, Server, SpawnedServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `app` with `config` on a free port of 127.0.0.1.
pub(crate) async fn start(app: Router, config: Config) -> SpawnedServer {
    let config = Config { port: 0, ..config };
    Server::new(app).config(config).bind().await.expect("bind 127.0.0.1:0").spawn()
}

/// Sends a GET with extra `headers` (each ending in CRLF) on a fresh plain
/// socket, as a client that sets its own headers would; the response's head
/// and body.
#[allow(dead_code)] // Each test binary compiles this module; not all send raw requests.
pub(crate) async fn raw_get(addr: std::net::SocketAddr, path: &str, headers: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}
