//! The README's example app: `cargo run -p fastlane --example quickstart`.
use axum::{extract::Path, routing::get, Router};
use fastlane::{Background, Server};

// A plain fn that blocks (a sync driver, a file): runs on the blocking lane.
fn report(Path(id): Path<u32>) -> String {
    std::thread::sleep(std::time::Duration::from_millis(200));
    format!("report {id}")
}

// Answers at once; the computation runs afterwards on the CPU lane.
async fn signup(bg: Background) -> &'static str {
    bg.spawn_cpu(|| {
        std::hint::black_box((0..50_000_000u64).sum::<u64>());
    });
    "welcome"
}

#[tokio::main]
async fn main() -> Result<(), fastlane::Error> {
    fastlane::init_logging();
    let app = Router::new().route("/reports/{id}", get(fastlane::sync(report))).route("/signup", get(signup));
    let report = Server::new(app).serve().await?; // 127.0.0.1:8000, SIGTERM drains
    std::process::exit(if report.is_clean() { 0 } else { 1 })
}
