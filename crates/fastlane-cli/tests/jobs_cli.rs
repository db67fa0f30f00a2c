//! `fastlane jobs ...` as a user runs it, on a SQLite file.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fastlane(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fastlane")).args(args).output().expect("run fastlane")
}

fn stats(url: &str) -> serde_json::Value {
    let out = fastlane(&["jobs", "stats", "--url", url, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stats --json prints one JSON object")
}

#[test]
fn enqueue_work_and_stats_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("fastlane-jobs-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("jobs.db").display());

    let out = fastlane(&["jobs", "enqueue", "--url", &url, "noop", "--count", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "fail", "--payload", r#"{"times": 1}"#]);
    assert!(out.status.success());
    // Bad input is refused at enqueue time, naming the problem.
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown job `nope`"));
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "sleep", "--payload", "{"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload is not valid JSON"));

    let s = stats(&url);
    for state in ["scheduled", "available", "running", "succeeded", "retrying", "dead", "cancelled"] {
        assert!(s.get(state).is_some(), "missing {state}: {s}");
    }
    assert_eq!(s["available"], 21);

    let mut worker = Command::new(env!("CARGO_BIN_EXE_fastlane"))
        .args(["jobs", "work", "--url", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats(&url)["succeeded"] != 21 {
        assert!(Instant::now() < deadline, "jobs not done: {}", stats(&url));
        std::thread::sleep(Duration::from_millis(100));
    }
    #[allow(unsafe_code)]
    // SAFETY: a signal to the worker process this test started, by its PID.
    unsafe {
        libc::kill(worker.id() as i32, libc::SIGTERM);
    }
    let status = worker.wait().unwrap();
    assert!(status.success());
    let show = fastlane(&["jobs", "show", "--url", &url, "21"]);
    let job: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 2);

    // cancel, list, retry: a pending job is cancelled at once and can be
    // made available again.
    let out = fastlane(&["jobs", "enqueue", "--url", &url, "noop"]);
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = fastlane(&["jobs", "cancel", "--url", &url, &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("job {id}: cancelled"));
    let out = fastlane(&["jobs", "list", "--url", &url, "--state", "cancelled"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.lines().any(|l| l.split_whitespace().next() == Some(id.as_str())), "{listed}");
    let out = fastlane(&["jobs", "retry", "--url", &url, &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("job {id}: available"));
    let out = fastlane(&["jobs", "cancel", "--url", &url, "99999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job with id 99999"));

    // bench: one JSON object with the rates.
    let out = fastlane(&["jobs", "bench", "--url", &url, "--jobs", "2000", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bench: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(bench["jobs"], 2000);
    assert!(bench["jobs_per_s"].as_f64().unwrap() > 0.0 && bench["enqueue_per_s"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}
