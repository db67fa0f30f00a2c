//! Versioned schema migrations for PostgreSQL, applied in order on open,
//! under an advisory lock so that processes starting together migrate once.

use sqlx::PgPool;

use crate::Error;

/// Any fixed number: the advisory lock that serializes migrations.
const MIGRATION_LOCK: i64 = 0x6661_7374_6c61_6e65; // "fastlane"

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: jobs and their attempts.
    "CREATE TABLE fastlane_jobs (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL,
        queue TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        run_at BIGINT NOT NULL,
        attempt BIGINT NOT NULL DEFAULT 0,
        max_attempts BIGINT NOT NULL,
        timeout_ms BIGINT,
        unique_key TEXT,
        token BIGINT NOT NULL DEFAULT 0,
        lease_until BIGINT,
        worker TEXT,
        progress BIGINT,
        progress_message TEXT,
        last_error TEXT,
        cancel_requested BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        finished_at BIGINT
    );
    CREATE INDEX fastlane_jobs_due ON fastlane_jobs (queue, state, priority DESC, run_at, id);
    CREATE UNIQUE INDEX fastlane_jobs_unique_pending ON fastlane_jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'retrying');
    CREATE TABLE fastlane_attempts (
        job_id BIGINT NOT NULL REFERENCES fastlane_jobs (id) ON DELETE CASCADE,
        attempt BIGINT NOT NULL,
        worker TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        finished_at BIGINT,
        outcome TEXT,
        error TEXT,
        PRIMARY KEY (job_id, attempt)
    );",
    // 2: batch claims and completions. The attempt record is written when
    // the attempt ends (the running one is read off the job row, hence
    // `started_at`); the due-jobs index covers only pending jobs, in the
    // claim's order, so a claim never sorts; leases have their own index for
    // the rescue of a dead worker's jobs.
    "ALTER TABLE fastlane_jobs ADD COLUMN started_at BIGINT;
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
        last_tick BIGINT NOT NULL,
        next_tick BIGINT,
        last_job BIGINT,
        seen_at BIGINT NOT NULL,
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
    // arrays of ids, as text). A waiting job holds its unique key as a
    // pending one.
    "ALTER TABLE fastlane_jobs ADD COLUMN depends_on TEXT;
    ALTER TABLE fastlane_jobs ADD COLUMN dependents TEXT;
    ALTER TABLE fastlane_jobs ADD COLUMN deps_left BIGINT NOT NULL DEFAULT 0;
    DROP INDEX fastlane_jobs_unique_pending;
    CREATE UNIQUE INDEX fastlane_jobs_unique_pending ON fastlane_jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('waiting', 'scheduled', 'available', 'running', 'retrying');",
    // 9: per-queue limits (limits.rs): a rate as a token bucket, and a cap
    // on running jobs; a claim of a limited queue locks its row.
    "CREATE TABLE fastlane_queues (
        queue TEXT PRIMARY KEY,
        rate_limit BIGINT,
        rate_period_ms BIGINT,
        concurrency BIGINT,
        tokens DOUBLE PRECISION NOT NULL DEFAULT 0,
        refilled_at BIGINT NOT NULL DEFAULT 0
    );",
];

/// Brings the schema to the latest version; refuses a newer one.
pub(super) async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS fastlane_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM fastlane_schema").fetch_optional(&mut *tx).await?;
    let version = match version {
        Some(v) => v,
        None => {
            sqlx::query("INSERT INTO fastlane_schema VALUES (0)").execute(&mut *tx).await?;
            0
        }
    };
    let latest = MIGRATIONS.len() as i64;
    if version > latest {
        return Err(Error::NotAJobStore(format!(
            "the job store has schema version {version}, newer than this fastlane-jobs ({latest})"
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        sqlx::raw_sql(migration).execute(&mut *tx).await?;
        sqlx::query("UPDATE fastlane_schema SET version = $1")
            .bind(index as i64 + 1)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
