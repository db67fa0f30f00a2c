//! `fastlane bench mixed`: how a fast route fares while slow requests run.
//!
//! Two things happen at once for `duration`:
//! * **load**: `concurrency` clients each send the slow URL again and again
//!   (closed loop: a new one as soon as the previous answered), so that
//!   exactly that many slow requests are in flight;
//! * **probe**: the fast URL is requested at a fixed rate on a fresh
//!   connection each time (open loop: every request is sent at its scheduled
//!   time whether or not earlier ones have answered). Latency is measured
//!   from the *scheduled* send time, so a server that stalls is charged for
//!   the whole wait, not just for the part after the client got through
//!   (no coordinated omission).
//!
//! Measurement starts with the load, with no warm-up grace: a server that
//! only isolates blocking handlers after seeing a few is charged for it.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::outln;

/// What to run.
#[derive(Debug, Clone)]
pub struct MixedConfig {
    /// The fast route, probed at `rate`.
    pub fast_url: String,
    /// Probe requests per second.
    pub rate: f64,
    /// How long to probe (and load).
    pub duration: Duration,
    /// The slow route kept in flight, if any.
    pub load_url: Option<String>,
    /// How many slow requests to keep in flight.
    pub load_concurrency: usize,
    /// A probe request slower than this counts as an error.
    pub timeout: Duration,
    /// A load client refused with `503` and a `Retry-After` waits that long
    /// before it sends again, as well-behaved clients (and proxies) do;
    /// without it, it sends again at once.
    pub honor_retry_after: bool,
}

/// Latency figures of the probe, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStats {
    /// Probe requests sent.
    pub sent: usize,
    /// Failed or timed out.
    pub errors: usize,
    /// Slower than 100 ms (errors included).
    pub over_100ms: usize,
    /// Median latency of the successful ones.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank) of the successful ones.
    pub p99_ms: f64,
    /// Slowest successful one.
    pub max_ms: f64,
    /// The slowest probes (at most 5, slowest first), each as when it was
    /// sent (ms since the run began) and how long it took (ms; `null` when
    /// it failed): when in the run things went wrong, to match with the
    /// server's log.
    pub slowest: Vec<(f64, Option<f64>)>,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct MixedResult {
    /// The fast route's figures.
    pub fast: ProbeStats,
    /// Slow requests that completed with a 2xx during the run.
    pub load_ok: u64,
    /// Slow requests that failed.
    pub load_errors: u64,
    /// How long this client's own threads waited for a CPU during the run
    /// (ms, from the kernel's schedstat; `null` where there is none). On a
    /// machine shared with the server, a probe that waited here measured
    /// the client, not the server: read it beside a bad run.
    pub client_cpu_wait_ms: Option<f64>,
}

/// Runs the load and the probe; returns when both are done (the load's
/// requests in flight at the end are abandoned, not waited for).
pub async fn run(config: &MixedConfig) -> MixedResult {
    let waited_before = run_queue_wait_ns();
    let start = Instant::now() + Duration::from_millis(20);
    let deadline = start + config.duration;
    let load_ok = Arc::new(AtomicU64::new(0));
    let load_errors = Arc::new(AtomicU64::new(0));
    // The load runs on a thread and runtime of its own: sharing the probe's
    // runtime, a load that loops fast (a server refusing it at once) would
    // queue the probe's tasks behind its own, and the probe would measure
    // its own client's backlog instead of the server.
    let load = config.load_url.clone().map(|url| {
        let (ok, errors, concurrency) = (load_ok.clone(), load_errors.clone(), config.load_concurrency);
        let honor_retry_after = config.honor_retry_after;
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("fastlane bench mixed: no runtime for the load: {err}");
                    return;
                }
            };
            runtime.block_on(async move {
                for _ in 0..concurrency {
                    let (url, ok, errors) = (url.clone(), ok.clone(), errors.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep_until(start).await;
                        while Instant::now() < deadline {
                            let left =
                                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
                            let response = tokio::time::timeout(left, fastlane::client::get(&url)).await;
                            match &response {
                                Ok(Ok(r)) if r.status.is_success() => ok.fetch_add(1, Ordering::Relaxed),
                                _ => errors.fetch_add(1, Ordering::Relaxed),
                            };
                            let wait = response.ok().and_then(Result::ok).and_then(|r| retry_after(&r));
                            if let Some(wait) = wait.filter(|_| honor_retry_after) {
                                tokio::time::sleep_until(deadline.min(Instant::now() + wait)).await;
                            }
                        }
                    });
                }
                // The load stops at the deadline: dropping the runtime
                // abandons the requests still in flight (a blocking server
                // may hold them for seconds).
                tokio::time::sleep_until(deadline).await;
            });
        })
    });

    let count = (config.rate * config.duration.as_secs_f64()).round().max(1.0) as usize;
    let interval = Duration::from_secs_f64(1.0 / config.rate);
    let mut probes = Vec::with_capacity(count);
    for i in 0..count {
        let at = start + interval.mul_f64(i as f64);
        let (url, timeout) = (config.fast_url.clone(), config.timeout);
        probes.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            match tokio::time::timeout(timeout, fastlane::client::get(&url)).await {
                Ok(Ok(r)) if r.status.is_success() => Some(Instant::now().saturating_duration_since(at)),
                _ => None,
            }
        }));
    }
    let mut results = Vec::with_capacity(count);
    for (i, probe) in probes.into_iter().enumerate() {
        results.push((interval.mul_f64(i as f64), probe.await.ok().flatten()));
    }
    // Read before the load's thread ends, while it still counts.
    let client_cpu_wait_ms = run_queue_wait_ns()
        .zip(waited_before)
        .map(|(after, before)| after.saturating_sub(before) as f64 / 1e6);
    if let Some(load) = load {
        let _ = tokio::task::spawn_blocking(move || load.join()).await;
    }
    MixedResult {
        fast: stats(&results),
        load_ok: load_ok.load(Ordering::Relaxed),
        load_errors: load_errors.load(Ordering::Relaxed),
        client_cpu_wait_ms: client_cpu_wait_ms.map(|ms| (ms * 10.0).round() / 10.0),
    }
}

/// The time this process's live threads have spent runnable but waiting
/// for a CPU, in nanoseconds: the second field of each thread's
/// `/proc/self/task/<tid>/schedstat` (Linux with schedstats; `None` elsewhere).
fn run_queue_wait_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += stat.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// How long a `503` asks the client to wait (`Retry-After` in seconds).
fn retry_after(response: &fastlane::client::Response) -> Option<Duration> {
    if response.status != http::StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let secs: u64 = response.headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

/// The figures of the probes, each given as when it was sent (since the
/// start) and its latency (`None`: it failed).
fn stats(results: &[(Duration, Option<Duration>)]) -> ProbeStats {
    let mut latencies: Vec<Duration> = results.iter().filter_map(|(_, latency)| *latency).collect();
    latencies.sort();
    let errors = results.len() - latencies.len();
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    // Failures first (they are the worst), then by latency.
    let mut worst: Vec<_> = results.iter().collect();
    worst.sort_by_key(|(_, latency)| std::cmp::Reverse(latency.unwrap_or(Duration::MAX)));
    let rank = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        ms(latencies[index])
    };
    ProbeStats {
        sent: latencies.len() + errors,
        errors,
        over_100ms: errors + latencies.iter().filter(|d| **d > Duration::from_millis(100)).count(),
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        max_ms: latencies.last().map_or(f64::NAN, |d| ms(*d)),
        slowest: worst.iter().take(5).map(|(at, latency)| (ms(*at), latency.map(ms))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut results: Vec<_> =
            (1..=100).map(|i| (Duration::from_millis(i * 20), Some(Duration::from_millis(i)))).collect();
        results.push((Duration::from_millis(7), None));
        results.push((Duration::from_millis(9), None));
        let s = stats(&results);
        assert_eq!((s.sent, s.errors, s.over_100ms), (102, 2, 2));
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
        // The failures, then the slowest by latency, each with when it was sent.
        assert_eq!(
            s.slowest,
            vec![(7.0, None), (9.0, None), (2000.0, Some(100.0)), (1980.0, Some(99.0)), (1960.0, Some(98.0))]
        );
    }
}

/// The flags of `fastlane bench mixed`: probe a fast URL at a fixed rate
/// (open loop) while N slow requests are in flight.
#[derive(Debug, clap::Args)]
pub struct MixedCommand {
    /// The fast URL to probe.
    #[arg(long)]
    pub fast: String,
    /// The slow URL to keep in flight.
    #[arg(long)]
    pub load: Option<String>,
    /// How many slow requests to keep in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Probe requests per second.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds after which a probe request counts as failed.
    #[arg(long, default_value_t = 20.0)]
    pub timeout: f64,
    /// Print one JSON object instead of a summary line.
    #[arg(long)]
    pub json: bool,
    /// Load clients refused with 503 wait for its Retry-After before sending
    /// again, as well-behaved clients do (without it: again at once).
    #[arg(long)]
    pub honor_retry_after: bool,
}

/// Runs `fastlane bench mixed` and prints the result.
pub async fn run_command(command: MixedCommand) -> ExitCode {
    let MixedCommand { fast, load, concurrency, rate, duration, timeout, json, honor_retry_after } = command;
    let valid = |v: f64| v.is_finite() && v > 0.0 && v <= 3600.0;
    for (flag, value) in [("--rate", rate), ("--duration", duration), ("--timeout", timeout)] {
        if !valid(value) {
            eprintln!("fastlane bench mixed: {flag} must be a number above 0 and at most 3600");
            return ExitCode::from(2);
        }
    }
    let config = MixedConfig {
        fast_url: fast,
        rate,
        duration: Duration::from_secs_f64(duration),
        load_url: load,
        load_concurrency: concurrency as usize,
        timeout: Duration::from_secs_f64(timeout),
        honor_retry_after,
    };
    let result = run(&config).await;
    if json {
        outln!("{}", serde_json::to_string(&result).unwrap_or_default());
    } else {
        let f = &result.fast;
        outln!(
            "fast: {} sent, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors, {} over 100 ms; load: {} ok, {} errors",
            f.sent, f.p50_ms, f.p99_ms, f.max_ms, f.errors, f.over_100ms, result.load_ok, result.load_errors
        );
    }
    ExitCode::SUCCESS
}
