//! The demo's routes on plain axum + tokio, written the way the axum docs
//! suggest: `spawn_blocking` for sync work, nothing else. The seeds' bug
//! (`std::thread::sleep` in an async fn) is left in, as in the demo. Served
//! as they are by `axum-peer`, and with a production service's per-request
//! layers by `axum-production-peer`.

use axum::body::Body;
use axum::extract::Query;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use peer_common::{burn, millis, secs, Action, Chunks, Ms, Profile, Secs};

/// The demo's route table.
pub fn routes() -> Router {
    Router::new()
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
                burn(millis(q.ms, 100));
                "computed"
            }),
        )
        .route(
            "/cpu/offload",
            get(|Query(q): Query<Ms>| async move {
                let d = millis(q.ms, 100);
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
                let d = millis(p.work_ms, 2000);
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
        )
}
