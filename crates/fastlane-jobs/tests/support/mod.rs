//! Test databases shared by the test files: `n` store handles on one fresh
//! SQLite file or PostgreSQL schema (when `FASTLANE_TEST_PG_URL` is set;
//! said to be skipped otherwise).

#![allow(dead_code, unused_macros, unused_imports)] // Each test file uses what it needs.

use std::io::Write;

use std::sync::Arc;
use std::time::Duration;

use fastlane_jobs::{ConsumerConfig, ConsumerStats, PgStore, Registry, SqliteStore, Store};

/// `n` handles on one fresh database, each with connections of its own (as
/// `n` processes would have); and what to do to clean up.
pub(crate) enum Db {
    Sqlite(Vec<SqliteStore>, std::path::PathBuf),
    Postgres(Vec<PgStore>, sqlx::PgPool, String),
}

pub(crate) fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub(crate) async fn sqlite(n: usize) -> Db {
    let dir = std::env::temp_dir().join(unique_name("fastlane_jobs_db"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("jobs.db").display());
    let mut stores = Vec::new();
    for _ in 0..n {
        stores.push(SqliteStore::open(&url).await.unwrap());
    }
    Db::Sqlite(stores, dir)
}

pub(crate) async fn postgres(test: &str, n: usize) -> Option<Db> {
    let Ok(url) = std::env::var("FASTLANE_TEST_PG_URL") else {
        let _ = writeln!(std::io::stderr(), "skipped postgres::{test}: FASTLANE_TEST_PG_URL is not set");
        return None;
    };
    let schema = unique_name("fastlane_db");
    let admin = sqlx::PgPool::connect(&url).await.expect("connect to FASTLANE_TEST_PG_URL");
    sqlx::raw_sql(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url)
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let mut stores = Vec::new();
    for _ in 0..n {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .unwrap();
        stores.push(PgStore::from_pool(pool).await.unwrap());
    }
    Some(Db::Postgres(stores, admin, schema))
}

impl Db {
    pub(crate) async fn clean_up(self) {
        match self {
            Db::Sqlite(_, dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Db::Postgres(_, admin, schema) => {
                let _ = sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await;
            }
        }
    }
}

/// A consumer of `registry` on each store (named `c0`, `c1`, ...), on
/// `queues` (name, slots), until the returned sender is told to stop.
pub(crate) fn consumers<S: Store>(
    stores: &[S],
    registry: &Registry,
    queues: &[(&str, usize)],
) -> (tokio::sync::watch::Sender<bool>, Vec<tokio::task::JoinHandle<Arc<ConsumerStats>>>) {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let queues: Vec<(String, usize)> = queues.iter().map(|(q, n)| ((*q).to_owned(), *n)).collect();
    let handles = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let config =
                ConsumerConfig { name: format!("c{i}"), queues: queues.clone(), ..ConsumerConfig::default() };
            tokio::spawn(fastlane_jobs::run_consumer(
                store.clone(),
                registry.clone(),
                config,
                shutdown.clone(),
                Duration::from_secs(5),
            ))
        })
        .collect();
    (stop, handles)
}

/// Each named `suite::NAME(stores)` as a test on SQLite and one on
/// PostgreSQL, with three handles on one fresh database.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::support::sqlite(3).await;
                    let $crate::support::Db::Sqlite(stores, _) = &db else { unreachable!() };
                    suite::$name(stores).await;
                    db.clean_up().await;
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::support::postgres(stringify!($name), 3).await else { return };
                    let $crate::support::Db::Postgres(stores, _, _) = &db else { unreachable!() };
                    suite::$name(stores).await;
                    db.clean_up().await;
                }
            )*
        }
    };
}

pub(crate) use on_both_stores;
