//! Versioned schema migrations, applied in order on open.

use sqlx::SqlitePool;

use crate::Error;

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: jobs and their attempts.
    "CREATE TABLE fastlane_jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        queue TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        run_at INTEGER NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        timeout_ms INTEGER,
        unique_key TEXT,
        token INTEGER NOT NULL DEFAULT 0,
        lease_until INTEGER,
        worker TEXT,
        progress INTEGER,
        progress_message TEXT,
        last_error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX fastlane_jobs_due ON fastlane_jobs (queue, state, priority DESC, run_at, id);
    CREATE UNIQUE INDEX fastlane_jobs_unique_pending ON fastlane_jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'retrying');
    CREATE TABLE fastlane_attempts (
        job_id INTEGER NOT NULL REFERENCES fastlane_jobs (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        worker TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        finished_at INTEGER,
        outcome TEXT,
        error TEXT,
        PRIMARY KEY (job_id, attempt)
    );",
    // 2: batch claims and completions. The attempt record is written when
    // the attempt ends (the running one is read off the job row, hence
    // `started_at`); the due-jobs index covers only pending jobs, in the
    // claim's order, so a claim never sorts; leases have their own index for
    // the rescue of a dead worker's jobs.
    "ALTER TABLE fastlane_jobs ADD COLUMN started_at INTEGER;
    DROP INDEX fastlane_jobs_due;
    CREATE INDEX fastlane_jobs_pending ON fastlane_jobs (queue, priority DESC, run_at, id)
        WHERE state IN ('scheduled', 'available', 'retrying');
    CREATE INDEX fastlane_jobs_leases ON fastlane_jobs (queue, lease_until) WHERE state = 'running';",
    // 3: the process holding a running job (`host/pid/start`), so that a
    // worker of the same host sees at once that it died.
    "ALTER TABLE fastlane_jobs ADD COLUMN owner TEXT;",
    // 4: the id of the request that enqueued the job (`X-Request-Id`), for
    // its attempts' log lines.
    "ALTER TABLE fastlane_jobs ADD COLUMN request_id TEXT;",
    // 5: schedules (scheduler.rs): how far each one's ticks are accounted
    // for, and what `fastlane jobs schedules` shows. A schedule declared
    // differently (another `spec`) is another row.
    "CREATE TABLE fastlane_schedules (
        name TEXT NOT NULL,
        job TEXT NOT NULL,
        spec TEXT NOT NULL,
        missed TEXT NOT NULL,
        last_tick INTEGER NOT NULL,
        next_tick INTEGER,
        last_job INTEGER,
        seen_at INTEGER NOT NULL,
        PRIMARY KEY (name, spec)
    );",
    // 6: retention (retention.rs) deletes finished jobs oldest first; this
    // index finds them without a scan of the jobs still to run.
    "CREATE INDEX fastlane_jobs_finished ON fastlane_jobs (finished_at)
        WHERE state IN ('succeeded', 'cancelled', 'dead');",
    // 7: what a succeeded job's handler returned (JSON text).
    "ALTER TABLE fastlane_jobs ADD COLUMN result TEXT;",
    // 8: workflows (workflow.rs). A job that waits for others is `waiting`
    // with `deps_left` of them still to succeed and their ids in
    // `depends_on`; a job waited for lists its waiters in `dependents` (JSON
    // arrays of ids). A waiting job holds its unique key as a pending one.
    "ALTER TABLE fastlane_jobs ADD COLUMN depends_on TEXT;
    ALTER TABLE fastlane_jobs ADD COLUMN dependents TEXT;
    ALTER TABLE fastlane_jobs ADD COLUMN deps_left INTEGER NOT NULL DEFAULT 0;
    DROP INDEX fastlane_jobs_unique_pending;
    CREATE UNIQUE INDEX fastlane_jobs_unique_pending ON fastlane_jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('waiting', 'scheduled', 'available', 'running', 'retrying');",
    // 9: per-queue limits (limits.rs): a rate as a token bucket, and a cap
    // on running jobs; a claim of a limited queue locks its row.
    "CREATE TABLE fastlane_queues (
        queue TEXT PRIMARY KEY,
        rate_limit INTEGER,
        rate_period_ms INTEGER,
        concurrency INTEGER,
        tokens REAL NOT NULL DEFAULT 0,
        refilled_at INTEGER NOT NULL DEFAULT 0
    );",
];

/// Brings the schema to the latest version; refuses a database that holds
/// other tables but no fastlane schema, or a newer schema than this code.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(super::classify)?;
    let has_version: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'fastlane_schema'",
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(super::classify)?;
    let version: i64 = if has_version.is_some() {
        sqlx::query_scalar("SELECT version FROM fastlane_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(super::classify)?
    } else {
        let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'")
            .fetch_one(&mut *tx)
            .await
            .map_err(super::classify)?;
        if others > 0 {
            return Err(Error::NotAJobStore(
                "this SQLite database holds other tables and no fastlane job schema; use a file of its own"
                    .into(),
            ));
        }
        sqlx::raw_sql("CREATE TABLE fastlane_schema (version INTEGER NOT NULL); INSERT INTO fastlane_schema VALUES (0);")
            .execute(&mut *tx)
            .await
            .map_err(super::classify)?;
        0
    };
    let latest = MIGRATIONS.len() as i64;
    if version > latest {
        return Err(Error::NotAJobStore(format!(
            "the job store has schema version {version}, newer than this fastlane-jobs ({latest})"
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        sqlx::raw_sql(migration).execute(&mut *tx).await.map_err(super::classify)?;
        sqlx::query("UPDATE fastlane_schema SET version = ?")
            .bind(index as i64 + 1)
            .execute(&mut *tx)
            .await
            .map_err(super::classify)?;
    }
    tx.commit().await.map_err(super::classify)?;
    Ok(())
}
