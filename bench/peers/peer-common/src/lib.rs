//! What the Rust benchmark peers share, so that they run exactly the same
//! work: the query parameters of the demo's routes and the CPU busy loop
//! (the same loop as fastlane's demo).

use std::time::{Duration, Instant};

use serde::Deserialize;

/// `?secs=`
#[derive(Deserialize)]
pub struct Secs {
    pub secs: Option<f64>,
}

/// `?ms=`
#[derive(Deserialize)]
pub struct Ms {
    pub ms: Option<u64>,
}

/// `?chunks=&secs=`
#[derive(Deserialize)]
pub struct Chunks {
    pub chunks: Option<u32>,
    pub secs: Option<f64>,
}

/// The body of `POST /profile`.
#[derive(Deserialize)]
pub struct Profile {
    pub name: String,
    pub work_ms: Option<u64>,
}

/// `?action=&secs=`
#[derive(Deserialize)]
pub struct Action {
    pub action: Option<u8>,
    pub secs: Option<f64>,
}

/// A duration in seconds with a default, capped at 60 s like the demo.
pub fn secs(v: Option<f64>, default: f64) -> Duration {
    Duration::from_secs_f64(v.unwrap_or(default).clamp(0.0, 60.0))
}

/// Milliseconds with a default, capped at 60 s like the demo.
pub fn millis(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default).min(60_000))
}

/// Keeps one core busy for `d` (xorshift, as in fastlane's demo).
pub fn burn(d: Duration) -> u64 {
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
