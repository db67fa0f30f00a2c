//! `--reload`: reloads the app when one of its Python files changes, for
//! development (as uvicorn's `--reload`). The tree is looked at twice a
//! second: the newest modification time and the number of `.py` files under
//! each directory, skipping virtualenvs, caches and hidden directories.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::Pool;

/// How often the files are looked at.
const EVERY: Duration = Duration::from_millis(500);

/// What a look at the tree saw: how many `.py` files, and the newest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    files: usize,
    newest: Option<(SystemTime, PathBuf)>,
}

/// Starts watching `dirs` for `pool`.
pub(crate) fn watch(pool: Pool, dirs: Vec<PathBuf>) {
    tokio::spawn(async move {
        let look = |dirs: Vec<PathBuf>| async move {
            tokio::task::spawn_blocking(move || {
                let mut seen = Seen::default();
                for dir in &dirs {
                    walk(dir, &mut seen, 0);
                }
                seen
            })
            .await
            .unwrap_or_default()
        };
        let mut last = look(dirs.clone()).await;
        tracing::info!("reloading the app when a .py file under {} changes", shown(&dirs));
        loop {
            tokio::time::sleep(EVERY).await;
            let now = look(dirs.clone()).await;
            if now == last {
                continue;
            }
            let what = match (&now.newest, now.files.cmp(&last.files)) {
                (_, std::cmp::Ordering::Less) => "a .py file was removed".to_owned(),
                (Some((_, path)), _) => format!("{} changed", path.display()),
                (None, _) => "the files changed".to_owned(),
            };
            last = now;
            tracing::info!("{what}; reloading");
            match pool.reload().await {
                Ok(pids) => tracing::info!("reloaded: new workers {pids:?}"),
                Err(err) => tracing::error!("the reload failed; the old workers go on serving: {err}"),
            }
            // Whatever changed during the reload is seen at the next look.
        }
    });
}

fn shown(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Adds what is under `dir` to `seen`.
fn walk(dir: &Path, seen: &mut Seen, depth: usize) {
    if depth > 16 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            let skipped = name.starts_with('.')
                || matches!(name.as_ref(), "__pycache__" | "node_modules" | "site-packages" | "target")
                || path.join("pyvenv.cfg").exists();
            if !skipped {
                walk(&path, seen, depth + 1);
            }
        } else if name.ends_with(".py") {
            seen.files += 1;
            if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                if seen.newest.as_ref().is_none_or(|(newest, _)| modified > *newest) {
                    seen.newest = Some((modified, path));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_to_a_py_file_is_seen_and_caches_and_venvs_are_not() {
        let dir = std::env::temp_dir().join(format!("fastlane-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pkg/__pycache__")).unwrap();
        std::fs::create_dir_all(dir.join("venv")).unwrap();
        std::fs::write(dir.join("venv/pyvenv.cfg"), "").unwrap();
        std::fs::write(dir.join("venv/lib.py"), "").unwrap();
        std::fs::write(dir.join("main.py"), "app = 1").unwrap();
        std::fs::write(dir.join("pkg/mod.py"), "").unwrap();
        std::fs::write(dir.join("pkg/__pycache__/mod.py"), "").unwrap();
        std::fs::write(dir.join("notes.txt"), "").unwrap();
        let look = || {
            let mut seen = Seen::default();
            walk(&dir, &mut seen, 0);
            seen
        };
        let before = look();
        assert_eq!(before.files, 2, "{before:?}");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("main.py"), "app = 2").unwrap();
        let after = look();
        assert_ne!(before, after);
        assert!(after.newest.unwrap().1.ends_with("main.py"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
