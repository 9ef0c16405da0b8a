//! Rendering snapshots for people (a table) and programs (one JSON object per line).
use std::fmt::Write as _;

use crate::collect::Snapshot;

/// The busiest `top` cgroups of a snapshot as a fixed-width table with a summary line.
#[must_use]
pub fn table(snap: &Snapshot, top: usize) -> String {
    let mut out = String::new();
    let secs = snap.interval_ns as f64 / 1e9;
    let busy: f64 = snap.cgroups.iter().map(|c| c.cpu_percent).sum();
    let _ = writeln!(
        out,
        "── {:.2} s tick · {} CPUs · {:.0} % busy · {} cgroups tracked · eBPF dropped {} (map {}/{})",
        secs,
        snap.cpus,
        busy,
        snap.tracked_cgroups,
        snap.ebpf.cgroup_map_full + snap.ebpf.read_errors + snap.ebpf.update_errors,
        snap.tracked_cgroups,
        snap.ebpf.cgroup_map_capacity,
    );
    let _ = writeln!(
        out,
        "{:>7} {:>10} {:>9}  CGROUP",
        "CPU%", "ON-CPU ms", "SWITCH/s"
    );
    for c in snap.cgroups.iter().take(top) {
        let path = c.path.as_deref().unwrap_or("(deleted)");
        let _ = writeln!(
            out,
            "{:>7.1} {:>10.1} {:>9.0}  {}",
            c.cpu_percent,
            c.on_cpu_ns as f64 / 1e6,
            c.switches as f64 / secs,
            printable(path),
        );
    }
    out
}

/// cgroup names may hold any byte but '/' and NUL: escape control characters so a
/// hostile name cannot rewrite the operator's terminal.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// One JSON object, no newline.
///
/// # Errors
/// Never in practice: every field serialises.
pub fn json(snap: &Snapshot) -> serde_json::Result<String> {
    serde_json::to_string(snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{collect::CgroupCpuSample, probes::EbpfStats};

    fn snap() -> Snapshot {
        let sample = |id, path: Option<&str>, ms: u64| CgroupCpuSample {
            id,
            path: path.map(str::to_owned),
            on_cpu_ns: ms * 1_000_000,
            cpu_percent: ms as f64 / 10.0,
            switches: 3,
        };
        Snapshot {
            timestamp_ms: 1,
            interval_ns: 1_000_000_000,
            cpus: 2,
            cgroups: vec![
                sample(5, Some("/busy"), 990),
                sample(6, None, 20),
                sample(7, Some("/evil\x1b[2J"), 5),
            ],
            tracked_cgroups: 3,
            vanished_cgroups: 1,
            ebpf: EbpfStats {
                cgroup_map_capacity: 16_384,
                ..EbpfStats::default()
            },
        }
    }

    #[test]
    fn table_lists_busiest_first_and_limits_rows() {
        let t = table(&snap(), 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "summary, header, two rows:\n{t}");
        assert!(
            lines[0].contains("2 CPUs") && lines[0].contains("map 3/16384"),
            "{t}"
        );
        assert!(
            lines[2].trim_start().starts_with("99.0") && lines[2].ends_with("/busy"),
            "{t}"
        );
        assert!(lines[3].ends_with("(deleted)"), "{t}");
    }

    #[test]
    fn table_escapes_control_characters() {
        let t = table(&snap(), 10);
        assert!(!t.contains('\x1b'), "{t:?}");
        assert!(t.contains(r"/evil\u{1b}[2J"), "{t}");
    }

    #[test]
    fn json_is_one_line_with_all_fields() {
        let j = json(&snap()).unwrap();
        assert!(!j.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["cgroups"][0]["path"], "/busy");
        assert_eq!(v["cgroups"][1]["path"], serde_json::Value::Null);
        assert_eq!(v["ebpf"]["cgroup_map_capacity"], 16_384);
        assert_eq!(v["interval_ns"], 1_000_000_000u64);
    }
}
