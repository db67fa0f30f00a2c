//! Shared by the integration tests: a server on 127.0.0.1:0.

use axum::Router;
use fastlane::{Config, Server, SpawnedServer};

/// Serves `app` with `config` on a free port of 127.0.0.1.
pub(crate) async fn start(app: Router, config: Config) -> SpawnedServer {
    let config = Config { port: 0, ..config };
    Server::new(app).config(config).bind().await.expect("bind 127.0.0.1:0").spawn()
}
