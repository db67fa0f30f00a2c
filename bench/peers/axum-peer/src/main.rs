//! The demo's routes on plain axum + tokio (`axum::serve`), written the way
//! the axum docs suggest: `spawn_blocking` for sync work, nothing else. The
//! seeds' bug (`std::thread::sleep` in an async fn) is left in, as in the
//! demo. Usage: `axum-peer PORT`.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Query;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;

#[derive(Deserialize)]
struct Secs {
    secs: Option<f64>,
}

#[derive(Deserialize)]
struct Ms {
    ms: Option<u64>,
}

#[derive(Deserialize)]
struct Chunks {
    chunks: Option<u32>,
    secs: Option<f64>,
}

#[derive(Deserialize)]
struct Profile {
    #[allow(dead_code)]
    name: String,
    work_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Action {
    action: Option<u8>,
    secs: Option<f64>,
}

fn secs(v: Option<f64>, default: f64) -> Duration {
    Duration::from_secs_f64(v.unwrap_or(default).clamp(0.0, 60.0))
}

fn burn(d: Duration) -> u64 {
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while start.elapsed() < d {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    std::hint::black_box(x)
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8001);
    let app = Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route("/test1", get(|| async { "test1" }))
        .route(
            "/test2",
            get(|Query(q): Query<Secs>| async move {
                std::thread::sleep(secs(q.secs, 8.0));
                "test2"
            }),
        )
        .route(
            "/ping",
            get(|Query(q): Query<Secs>| async move {
                println!("Hello");
                std::thread::sleep(secs(q.secs, 5.0));
                println!("bye");
                "pong"
            }),
        )
        .route(
            "/slow/async-blocking",
            get(|Query(q): Query<Secs>| async move {
                std::thread::sleep(secs(q.secs, 1.0));
                "slept"
            }),
        )
        .route(
            "/slow/sync",
            get(|Query(q): Query<Secs>| async move {
                let d = secs(q.secs, 1.0);
                tokio::task::spawn_blocking(move || std::thread::sleep(d)).await.unwrap();
                "slept"
            }),
        )
        .route(
            "/slow/async",
            get(|Query(q): Query<Secs>| async move {
                tokio::time::sleep(secs(q.secs, 1.0)).await;
                "waited"
            }),
        )
        .route(
            "/cpu/async-blocking",
            get(|Query(q): Query<Ms>| async move {
                burn(Duration::from_millis(q.ms.unwrap_or(100).min(60_000)));
                "computed"
            }),
        )
        .route(
            "/cpu/offload",
            get(|Query(q): Query<Ms>| async move {
                let d = Duration::from_millis(q.ms.unwrap_or(100).min(60_000));
                tokio::task::spawn_blocking(move || burn(d)).await.unwrap();
                "computed"
            }),
        )
        .route(
            "/stream/blocking",
            get(|Query(q): Query<Chunks>| async move {
                let d = secs(q.secs, 1.0);
                let stream = futures_util::stream::iter(0..q.chunks.unwrap_or(3).min(1000)).map(move |i| {
                    std::thread::sleep(d);
                    Ok::<_, std::convert::Infallible>(format!("chunk {i}\n"))
                });
                Body::from_stream(stream)
            }),
        )
        .route(
            "/profile",
            post(|Json(p): Json<Profile>| async move {
                let d = Duration::from_millis(p.work_ms.unwrap_or(2000).min(60_000));
                tokio::task::spawn_blocking(move || burn(d));
                Json(serde_json::json!({}))
            }),
        )
        .route(
            "/",
            get(|Query(q): Query<Action>| async move {
                let d = secs(q.secs, 15.0);
                match q.action {
                    Some(1) => drop(tokio::task::spawn_blocking(move || std::thread::sleep(d))),
                    Some(2) => drop(tokio::spawn(async move { std::thread::sleep(d) })),
                    Some(3) => drop(tokio::spawn(tokio::time::sleep(d))),
                    _ => {}
                }
                "scheduled"
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    axum::serve(listener, app).await.unwrap();
}
