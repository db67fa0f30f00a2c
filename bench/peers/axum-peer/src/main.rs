//! The demo's routes (`axum_peer::routes`) on plain axum + tokio
//! (`axum::serve`). Usage: `axum-peer PORT`.

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8001);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    axum::serve(listener, axum_peer::routes()).await.unwrap();
}
