//! CPU time of processes from `/proc/PID/stat` (utime + stime), as ../shared/peer_bench/load.py
//! reads it: the server's cost per request is the difference over the measured window divided by
//! the requests finished in it. With descendants, every live descendant's time is added, and the
//! reaped children's (cutime + cstime) of the process itself.

use std::collections::HashMap;

/// Clock ticks per second of `/proc/*/stat` times: USER_HZ, which the kernel fixes at 100 on every
/// architecture dynamix builds for (the value `sysconf(_SC_CLK_TCK)` returns).
pub(super) const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/PID/stat` used here.
struct Stat {
    parent: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: children already reaped.
    reaped: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        parent: u32::try_from(number(1)?).ok()?,
        own: number(11)? + number(12)?,
        reaped: number(13)? + number(14)?,
    })
}

/// CPU ticks used so far by `pid` (and its descendants when `children`); `None` once it is gone.
pub(super) fn ticks(pid: u32, children: bool) -> Option<u64> {
    let this = stat(pid)?;
    if !children {
        return Some(this.own);
    }
    let mut total = this.own + this.reaped;
    let mut by_parent: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(s) = stat(child) {
            by_parent.entry(s.parent).or_default().push(child);
        }
    }
    let mut todo = by_parent.remove(&pid).unwrap_or_default();
    while let Some(next) = todo.pop() {
        if let Some(s) = stat(next) {
            total += s.own;
        }
        todo.extend(by_parent.remove(&next).unwrap_or_default());
    }
    Some(total)
}

/// CPU ticks used so far by this process.
pub(super) fn own_ticks() -> Option<u64> {
    ticks(std::process::id(), false)
}

/// The 1-minute load average, to show how busy the machine was before the run.
pub(super) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_time_grows_with_work() {
        let before = own_ticks().expect("/proc/self/stat");
        // Spin until a tick is charged (10 ms of CPU), however busy the machine is.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while own_ticks() == Some(before) && started.elapsed().as_secs() < 60 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
        assert!(own_ticks().expect("still here") > before);
        assert!(ticks(std::process::id(), true).is_some());
        assert!(ticks(u32::MAX, false).is_none(), "no such process");
    }
}
