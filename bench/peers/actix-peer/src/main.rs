//! The demo's routes on actix-web, written the way its docs suggest:
//! `web::block` for sync work. The seeds' bug (`std::thread::sleep` in an
//! async fn) is left in, as in the demo. Usage: `actix-peer PORT`.

use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::StreamExt;
use peer_common::{burn, millis, secs, Action, Chunks, Ms, Profile, Secs};

async fn fast() -> &'static str {
    "ok"
}

async fn test1() -> &'static str {
    "test1"
}

async fn test2(q: web::Query<Secs>) -> &'static str {
    std::thread::sleep(secs(q.secs, 8.0));
    "test2"
}

async fn ping(q: web::Query<Secs>) -> &'static str {
    println!("Hello");
    std::thread::sleep(secs(q.secs, 5.0));
    println!("bye");
    "pong"
}

async fn slow_async_blocking(q: web::Query<Secs>) -> &'static str {
    std::thread::sleep(secs(q.secs, 1.0));
    "slept"
}

async fn slow_sync(q: web::Query<Secs>) -> &'static str {
    let d = secs(q.secs, 1.0);
    let _ = web::block(move || std::thread::sleep(d)).await;
    "slept"
}

async fn slow_async(q: web::Query<Secs>) -> &'static str {
    actix_web::rt::time::sleep(secs(q.secs, 1.0)).await;
    "waited"
}

async fn cpu_async_blocking(q: web::Query<Ms>) -> &'static str {
    burn(millis(q.ms, 100));
    "computed"
}

async fn cpu_offload(q: web::Query<Ms>) -> &'static str {
    let d = millis(q.ms, 100);
    let _ = web::block(move || burn(d)).await;
    "computed"
}

async fn stream_blocking(q: web::Query<Chunks>) -> HttpResponse {
    let d = secs(q.secs, 1.0);
    let stream = futures_util::stream::iter(0..q.chunks.unwrap_or(3).min(1000)).map(move |i| {
        std::thread::sleep(d);
        Ok::<_, actix_web::Error>(bytes::Bytes::from(format!("chunk {i}\n")))
    });
    HttpResponse::Ok().streaming(stream)
}

async fn profile(p: web::Json<Profile>) -> HttpResponse {
    let d = millis(p.work_ms, 2000);
    actix_web::rt::spawn(async move {
        let _ = web::block(move || burn(d)).await;
    });
    HttpResponse::Ok().json(serde_json::json!({}))
}

async fn action(q: web::Query<Action>) -> &'static str {
    let d = secs(q.secs, 15.0);
    match q.action {
        Some(1) => drop(actix_web::rt::spawn(async move {
            let _ = web::block(move || std::thread::sleep(d)).await;
        })),
        Some(2) => drop(actix_web::rt::spawn(async move { std::thread::sleep(d) })),
        Some(3) => drop(actix_web::rt::spawn(actix_web::rt::time::sleep(d))),
        _ => {}
    }
    "scheduled"
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8002);
    HttpServer::new(|| {
        App::new()
            .route("/fast", web::get().to(fast))
            .route("/test1", web::get().to(test1))
            .route("/test2", web::get().to(test2))
            .route("/ping", web::get().to(ping))
            .route("/slow/async-blocking", web::get().to(slow_async_blocking))
            .route("/slow/sync", web::get().to(slow_sync))
            .route("/slow/async", web::get().to(slow_async))
            .route("/cpu/async-blocking", web::get().to(cpu_async_blocking))
            .route("/cpu/offload", web::get().to(cpu_offload))
            .route("/stream/blocking", web::get().to(stream_blocking))
            .route("/profile", web::post().to(profile))
            .route("/", web::get().to(action))
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await
}
