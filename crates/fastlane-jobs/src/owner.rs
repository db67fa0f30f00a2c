//! Which process holds a running job, so that a worker on the same host can
//! tell at once that the holder died, instead of waiting for its lease.
//!
//! A process is named `host/pid/start`: `host` is the kernel's boot id and
//! the PID namespace (two containers on one kernel share the boot id but not
//! the PID namespace), `start` the process's start time in clock ticks since
//! boot, so that a PID reused by a new process is not mistaken for the old
//! one. On systems without `/proc` there is no name and jobs wait for their
//! lease, as on other hosts.

use std::sync::OnceLock;

/// This process's name, if the system can tell.
pub(crate) fn me() -> Option<&'static str> {
    static ME: OnceLock<Option<String>> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        Some(format!("{}/{pid}/{}", host()?, start_time(pid)?))
    })
    .as_deref()
}

/// The prefix that every process of this host (and PID namespace) has.
pub(crate) fn host_prefix() -> Option<String> {
    me().and_then(|me| me.split('/').next()).map(|host| format!("{host}/"))
}

fn host() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let ns = ns.to_string_lossy();
    // `pid:[4026531836]` -> `4026531836`
    let inode = ns.trim_start_matches("pid:[").trim_end_matches(']');
    Some(format!("{}:{inode}", boot.trim()))
}

/// Field 22 of `/proc/PID/stat`, and whether the process is still running
/// (not a zombie waiting to be reaped).
fn stat(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the fields
    // after it start after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, !matches!(state, "Z" | "X" | "x")))
}

fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(start, _)| start)
}

/// True when `owner` names a process of this host that no longer runs.
/// Anything else (another host, this process, a name it cannot read) is
/// taken as alive: its jobs wait for their lease.
pub(crate) fn is_dead_here(owner: &str) -> bool {
    let (Some(me), Some(prefix)) = (me(), host_prefix()) else { return false };
    if owner == me || !owner.starts_with(&prefix) {
        return false;
    }
    let mut parts = owner[prefix.len()..].split('/');
    let (Some(Ok(pid)), Some(Ok(start))) =
        (parts.next().map(str::parse::<u32>), parts.next().map(str::parse::<u64>))
    else {
        return false;
    };
    match stat(pid) {
        None => true,
        Some((now_start, running)) => now_start != start || !running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_dead() {
        let me = me().expect("Linux has /proc");
        assert!(!is_dead_here(me));
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap();
        let owner = format!("{}{pid}/{start}", host_prefix().unwrap());
        child.wait().unwrap();
        assert!(is_dead_here(&owner), "an exited process is dead");
        // The same PID with another start time is another process.
        let reused = format!("{}{}/{}", host_prefix().unwrap(), std::process::id(), 1);
        assert!(is_dead_here(&reused));
        // Other hosts and unreadable names are never judged.
        assert!(!is_dead_here("another-host:1/1/1"));
        assert!(!is_dead_here(&format!("{}x/y", host_prefix().unwrap())));
    }
}
