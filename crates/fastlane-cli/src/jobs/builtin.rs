//! The built-in job types of the demo and of `fastlane jobs work`.

use std::time::Duration;

use fastlane_jobs::{JobContext, JobError, Registry};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepPayload {
    ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailPayload {
    times: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoPayload {
    value: serde_json::Value,
    #[serde(default)]
    ms: u64,
}

/// The built-in demo job types: `noop`; `sleep` (`{"ms": N}`, an async
/// sleep in ten steps, reporting progress after each; its result is
/// `{"slept_ms": N}`); `fail` (`{"times": N}`: fails N attempts, then
/// succeeds with `{"succeeded_at_attempt": N + 1}`); `echo` (`{"value": V,
/// "ms": N}`: sleeps N ms, 0 by default, and returns V); `gather` (any
/// payload: returns the results of the jobs it waited for, in order, as an
/// array: a workflow's final step).
pub fn demo_registry() -> Registry {
    Registry::new()
        .register("noop", |_: serde_json::Value, _ctx: JobContext| async { Ok(()) })
        .register("sleep", |p: SleepPayload, ctx: JobContext| async move {
            let total = Duration::from_millis(p.ms.min(3_600_000));
            for step in 1..=10u32 {
                tokio::time::sleep(total / 10).await;
                if ctx.is_cancelled() {
                    return Err(JobError::Permanent("cancelled".into()));
                }
                // Every step for long sleeps; short ones would only write.
                if total >= Duration::from_secs(1) {
                    let slept = total * step / 10;
                    ctx.progress(
                        (step * 10) as u8,
                        format!("slept {} of {} ms", slept.as_millis(), total.as_millis()),
                    );
                }
            }
            // The result stored with the job (`GET /jobs/{id}`, `jobs show`).
            Ok(serde_json::json!({ "slept_ms": total.as_millis() as u64 }))
        })
        .register("fail", |p: FailPayload, ctx: JobContext| async move {
            if ctx.attempt <= p.times {
                Err(JobError::Retry(format!(
                    "failing on purpose: attempt {} of the first {}",
                    ctx.attempt, p.times
                )))
            } else {
                Ok(serde_json::json!({ "succeeded_at_attempt": ctx.attempt }))
            }
        })
        .register("echo", |p: EchoPayload, _ctx: JobContext| async move {
            tokio::time::sleep(Duration::from_millis(p.ms.min(3_600_000))).await;
            Ok(p.value)
        })
        .register("gather", |_: serde_json::Value, ctx: JobContext| async move {
            let results: Vec<serde_json::Value> =
                ctx.dependency_results().iter().map(|(_, r)| r.clone().unwrap_or_default()).collect();
            Ok(results)
        })
}
