//! The job store's behaviour on SQLite (temporary files).

use std::time::Duration;

use fastlane_jobs::{Error, JobState, NewJob, SqliteStore};
use serde_json::json;

/// A store in a fresh temporary file, removed when dropped.
struct TempStore {
    store: SqliteStore,
    dir: std::path::PathBuf,
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn temp_store() -> TempStore {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fastlane-jobs-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("jobs.db").display());
    TempStore { store: SqliteStore::open(&url).await.unwrap(), dir }
}

const LEASE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_job_runs_once_and_succeeds() {
    let t = temp_store().await;
    let id = t.store.enqueue(NewJob::new("noop", json!({"n": 1}))).await.unwrap();
    assert_eq!(t.store.get(id).await.unwrap().state, JobState::Available);
    let job = t.store.claim("default", "w1", LEASE).await.unwrap().unwrap();
    assert_eq!((job.id, job.name.as_str(), job.attempt, &job.payload), (id, "noop", 1, &json!({"n": 1})));
    // Nobody else gets it while it runs.
    assert!(t.store.claim("default", "w2", LEASE).await.unwrap().is_none());
    assert!(!t.store.heartbeat(id, job.token, LEASE).await.unwrap());
    t.store.progress(id, job.token, 50, "half").await.unwrap();
    t.store.complete(id, job.token).await.unwrap();
    let info = t.store.get(id).await.unwrap();
    assert_eq!(info.state, JobState::Succeeded);
    assert_eq!(info.attempts.len(), 1);
    assert_eq!(info.attempts[0].worker, "w1");
    assert_eq!(info.attempts[0].outcome.as_deref(), Some("succeeded"));
}

#[tokio::test]
async fn higher_priority_first_then_oldest_and_scheduled_jobs_wait() {
    let t = temp_store().await;
    let low = t.store.enqueue(NewJob::new("a", json!(null))).await.unwrap();
    let high = t.store.enqueue(NewJob::new("b", json!(null)).priority(5)).await.unwrap();
    let later = t
        .store
        .enqueue(NewJob::new("c", json!(null)).priority(9).delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    let other_queue = t.store.enqueue(NewJob::new("d", json!(null)).queue("mail")).await.unwrap();
    assert_eq!(t.store.get(later).await.unwrap().state, JobState::Scheduled);
    assert_eq!(t.store.claim("default", "w", LEASE).await.unwrap().unwrap().id, high);
    assert_eq!(t.store.claim("default", "w", LEASE).await.unwrap().unwrap().id, low);
    assert!(t.store.claim("default", "w", LEASE).await.unwrap().is_none(), "the scheduled job is not due");
    assert_eq!(t.store.claim("mail", "w", LEASE).await.unwrap().unwrap().id, other_queue);
}

#[tokio::test]
async fn a_dead_workers_job_is_taken_over_and_the_zombie_is_fenced() {
    let t = temp_store().await;
    let id = t.store.enqueue(NewJob::new("sleep", json!({"ms": 10}))).await.unwrap();
    let zombie = t.store.claim("default", "w1", Duration::from_millis(50)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    // The lease has expired: the next claim takes the job over.
    let fresh = t.store.claim("default", "w2", LEASE).await.unwrap().unwrap();
    assert_eq!((fresh.id, fresh.attempt), (id, 2));
    assert_ne!(fresh.token, zombie.token);
    // The first attempt comes back to life: every write it tries is rejected.
    assert!(t.store.complete(id, zombie.token).await.unwrap_err().is_fenced());
    assert!(t.store.heartbeat(id, zombie.token, LEASE).await.unwrap_err().is_fenced());
    assert!(t.store.fail(id, zombie.token, "late", true).await.unwrap_err().is_fenced());
    t.store.complete(id, fresh.token).await.unwrap();
    let info = t.store.get(id).await.unwrap();
    assert_eq!(info.state, JobState::Succeeded);
    let outcomes: Vec<_> = info.attempts.iter().map(|a| a.outcome.clone().unwrap_or_default()).collect();
    assert_eq!(outcomes, ["lease expired", "succeeded"]);
}

#[tokio::test]
async fn failures_retry_with_backoff_then_the_job_is_dead() {
    let t = temp_store().await;
    let id = t.store.enqueue(NewJob::new("fail", json!(null)).max_attempts(2)).await.unwrap();
    let first = t.store.claim("default", "w", LEASE).await.unwrap().unwrap();
    assert_eq!(t.store.fail(id, first.token, "boom", true).await.unwrap(), JobState::Retrying);
    let info = t.store.get(id).await.unwrap();
    assert_eq!((info.state, info.last_error.as_deref()), (JobState::Retrying, Some("boom")));
    // Not due before its backoff (at least 1 s).
    assert!(t.store.claim("default", "w", LEASE).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let second = t.store.claim("default", "w", LEASE).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);
    assert_eq!(t.store.fail(id, second.token, "boom again", true).await.unwrap(), JobState::Dead);
    // A permanent failure is dead at once.
    let id = t.store.enqueue(NewJob::new("fail", json!(null))).await.unwrap();
    let job = t.store.claim("default", "w", LEASE).await.unwrap().unwrap();
    assert_eq!(t.store.fail(id, job.token, "bad payload", false).await.unwrap(), JobState::Dead);
}

#[test]
fn backoff_grows_exponentially_with_bounded_jitter() {
    for (attempt, base) in [(1u32, 1u64), (2, 2), (3, 4), (10, 512)] {
        let b = fastlane_jobs::backoff(attempt);
        assert!(b >= Duration::from_secs(base) && b <= Duration::from_secs(base) * 5 / 4, "{attempt}: {b:?}");
    }
    assert!(fastlane_jobs::backoff(40) <= Duration::from_secs(4500));
}

#[tokio::test]
async fn unique_keys_allow_one_pending_job() {
    let t = temp_store().await;
    let id = t.store.enqueue(NewJob::new("mail", json!(null)).unique_key("welcome:ada")).await.unwrap();
    let err = t.store.enqueue(NewJob::new("mail", json!(null)).unique_key("welcome:ada")).await.unwrap_err();
    assert!(matches!(err, Error::Duplicate(ref k) if k == "welcome:ada"), "{err}");
    let job = t.store.claim("default", "w", LEASE).await.unwrap().unwrap();
    t.store.complete(id, job.token).await.unwrap();
    // Done: the key is free again.
    t.store.enqueue(NewJob::new("mail", json!(null)).unique_key("welcome:ada")).await.unwrap();
}

#[tokio::test]
async fn cancellation_of_pending_and_running_jobs() {
    let t = temp_store().await;
    let pending =
        t.store.enqueue(NewJob::new("a", json!(null)).delay(Duration::from_secs(60))).await.unwrap();
    assert_eq!(t.store.cancel(pending).await.unwrap(), JobState::Cancelled);
    let running = t.store.enqueue(NewJob::new("b", json!(null))).await.unwrap();
    let job = t.store.claim("default", "w", LEASE).await.unwrap().unwrap();
    assert_eq!(t.store.cancel(running).await.unwrap(), JobState::Running);
    // The running attempt sees the request at its next heartbeat.
    assert!(t.store.heartbeat(running, job.token, LEASE).await.unwrap());
    t.store.cancelled(running, job.token).await.unwrap();
    assert_eq!(t.store.get(running).await.unwrap().state, JobState::Cancelled);
    assert!(matches!(t.store.cancel(999).await.unwrap_err(), Error::NotFound(999)));
}

#[tokio::test]
async fn a_released_job_is_available_at_once_without_losing_an_attempt() {
    let t = temp_store().await;
    let id = t.store.enqueue(NewJob::new("a", json!(null))).await.unwrap();
    let job = t.store.claim("default", "w1", LEASE).await.unwrap().unwrap();
    t.store.release(id, job.token).await.unwrap();
    let again = t.store.claim("default", "w2", LEASE).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempt), (id, 1));
    assert!(t.store.release(id, job.token).await.unwrap_err().is_fenced());
}

#[tokio::test]
async fn stats_name_every_state() {
    let t = temp_store().await;
    t.store.enqueue(NewJob::new("a", json!(null))).await.unwrap();
    t.store.enqueue(NewJob::new("a", json!(null)).delay(Duration::from_secs(60))).await.unwrap();
    let stats = t.store.stats().await.unwrap();
    assert_eq!(stats.len(), 7);
    assert_eq!(stats[&JobState::Available], 1);
    assert_eq!(stats[&JobState::Scheduled], 1);
    assert_eq!(stats[&JobState::Dead], 0);
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["available"], 1, "{json}");
}

#[tokio::test]
async fn bad_input_and_bad_files_get_clear_errors() {
    let t = temp_store().await;
    let err = t.store.enqueue(NewJob::new("", json!(null))).await.unwrap_err();
    assert!(err.to_string().contains("`name`"), "{err}");
    let err = t.store.enqueue(NewJob::new("a", json!(null)).max_attempts(0)).await.unwrap_err();
    assert!(err.to_string().contains("`max_attempts`"), "{err}");

    let not_sqlite = t.dir.join("notes.txt");
    std::fs::write(&not_sqlite, "this is not a database, just some text that is long enough").unwrap();
    let err = SqliteStore::open(&format!("sqlite://{}", not_sqlite.display())).await.unwrap_err();
    assert!(matches!(err, Error::NotAJobStore(_)), "{err}");

    let other_app = t.dir.join("other.db");
    {
        let url = format!("sqlite://{}?mode=rwc", other_app.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE users (id INTEGER)").execute(&pool).await.unwrap();
        pool.close().await;
    }
    let err = SqliteStore::open(&format!("sqlite://{}", other_app.display())).await.unwrap_err();
    assert!(err.to_string().contains("no fastlane job schema"), "{err}");

    let err = SqliteStore::open("mysql://localhost/jobs").await.unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    // Reopening a real store keeps its jobs (migrations are idempotent).
    let url = format!("sqlite://{}", t.dir.join("jobs.db").display());
    let reopened = SqliteStore::open(&url).await.unwrap();
    assert_eq!(reopened.stats().await.unwrap()[&JobState::Available], 0);
}
