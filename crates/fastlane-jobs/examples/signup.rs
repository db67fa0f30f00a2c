//! Durable jobs inside a fastlane server: `cargo run -p fastlane-jobs --example signup`,
//! then `curl -H 'content-type: application/json' -d '{"email": "ada@example.com"}' localhost:8000/signup` and
//! `curl localhost:8000/jobs/1`. Stop it and start it again: nothing is lost.
//! The store is `signup-jobs.db` in the working directory, or the URL in
//! `FASTLANE_JOBS_URL` (as for `fastlane demo`).
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use fastlane::extract::Json as JsonBody;
use fastlane_jobs::{JobContext, JobError, JobInfo, Jobs, NewJob, Registry};
use serde::Deserialize;

#[derive(Deserialize)]
struct Signup {
    email: String,
}

// The job: an async handler with a typed payload. A blocking one would be
// registered with `register_blocking` and run on the blocking lane.
async fn send_welcome(email: String, ctx: JobContext) -> Result<(), JobError> {
    for step in 1..=4u8 {
        tokio::time::sleep(Duration::from_millis(500)).await; // talking to a mail server
        ctx.progress(step * 25, format!("step {step} of 4"));
    }
    if email.ends_with(".invalid") {
        return Err(JobError::Permanent(format!("no mail server for {email}")));
    }
    Ok(())
}

// Answers at once; the mail goes out even if this process dies first. A body
// that is not `{"email": ...}` gets a JSON 422 naming the field.
async fn signup(
    State(jobs): State<Jobs>,
    JsonBody(s): JsonBody<Signup>,
) -> Result<String, fastlane_jobs::Error> {
    let job = NewJob::new("send_welcome", s.email.clone().into()).unique_key(format!("welcome:{}", s.email));
    Ok(format!("job {}\n", jobs.enqueue(job).await?))
}

async fn show(State(jobs): State<Jobs>, Path(id): Path<i64>) -> Result<Json<JobInfo>, fastlane_jobs::Error> {
    Ok(Json(jobs.get(id).await?))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    fastlane::init_logging();
    let registry = Registry::new().register("send_welcome", send_welcome);
    let url = std::env::var("FASTLANE_JOBS_URL").unwrap_or_else(|_| "sqlite://signup-jobs.db".to_owned());
    let jobs = Jobs::new(fastlane_jobs::connect(&url).await?, registry);
    let app =
        Router::new().route("/signup", post(signup)).route("/jobs/{id}", get(show)).with_state(jobs.clone());
    // The worker runs inside the server and stops with it (SIGTERM drains).
    fastlane::Server::new(app).jobs(jobs.consumer()).serve().await?;
    Ok(())
}
