//! Rendering snapshots for people (a table) and programs (one JSON object per line).
use std::fmt::Write as _;

use crate::collect::{CgroupSample, Snapshot};

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn opt(v: Option<f64>, precision: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.precision$}"))
}

/// The busiest `top` cgroups of a snapshot as a fixed-width table with a summary line.
#[must_use]
pub fn table(snap: &Snapshot, top: usize) -> String {
    let mut out = String::new();
    let secs = snap.interval_ns as f64 / 1e9;
    let busy: f64 = snap.cgroups.iter().map(|c| c.cpu_percent).sum();
    let m = &snap.machine;
    let psi = |p: &Option<crate::cgroupfs::Pressure>| opt(p.map(|p| p.some.avg10), 1);
    let _ = writeln!(
        out,
        "── {secs:.2} s · {} CPUs {busy:.0} % busy · mem avail {:.0}/{:.0} MiB · swap used {:.0} MiB · \
         PSI some cpu {} mem {} io {} · {} cgroups · eBPF dropped {} lost {} evicted {} · OOM kills {}",
        snap.cpus,
        mib(m.mem_available_bytes),
        mib(m.mem_total_bytes),
        mib(m.swap_total_bytes.saturating_sub(m.swap_free_bytes)),
        psi(&m.cpu_pressure),
        psi(&m.memory_pressure),
        psi(&m.io_pressure),
        snap.tracked_cgroups,
        snap.ebpf.dropped(),
        snap.ebpf.events_lost,
        snap.ebpf.cgroup_evictions,
        snap.ebpf.oom_victims,
    );
    let _ = writeln!(
        out,
        "{:>6} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>6}  CGROUP",
        "CPU%", "RUNQp99", "INVOL/s", "RECLAIM", "MEM", "TREND", "FORK/s", "MEMPSI"
    );
    let _ = writeln!(
        out,
        "{:>6} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>6}",
        "", "ms", "", "ms/s", "MiB", "MiB/s", "", "avg10"
    );
    for c in snap.cgroups.iter().take(top) {
        row(&mut out, c, secs);
    }
    if let Some(gpu) = &snap.gpu {
        gpu_table(&mut out, gpu, snap);
    }
    for v in &snap.events.oom_victims {
        let _ = writeln!(
            out,
            "!! kernel OOM killer chose pid {} in {}",
            v.pid,
            printable(v.cgroup.as_deref().unwrap_or("(gone)"))
        );
    }
    out
}

fn row(out: &mut String, c: &CgroupSample, secs: f64) {
    let path = c.path.as_deref().unwrap_or("(deleted)");
    let _ = writeln!(
        out,
        "{:>6.1} {:>8} {:>7.0} {:>8.1} {:>8} {:>7} {:>7.0} {:>6}  {}",
        c.cpu_percent,
        opt(c.runq.p99_us.map(|us| us / 1000.0), 2),
        c.involuntary_switches as f64 / secs,
        c.reclaim_ms_per_s,
        opt(c.files.memory_current.map(mib), 0),
        opt(c.memory_trend_mib_per_s, 1),
        c.forks_per_s,
        opt(c.files.memory_pressure.map(|p| p.some.avg10), 1),
        printable(path),
    );
}

/// One line per GPU, then its processes with their CPU next to their GPU use (incident
/// A's columns: CPU per process, GPU utilisation, GPU memory).
fn gpu_table(out: &mut String, gpu: &crate::gpu::GpuSnapshot, snap: &Snapshot) {
    let o = |v: Option<u32>| v.map_or_else(|| "-".into(), |v| v.to_string());
    for d in &gpu.devices {
        if d.lost {
            let _ = writeln!(
                out,
                "GPU {} {} ({}): LOST (fell off the bus)",
                d.index, d.name, d.uuid
            );
            continue;
        }
        let _ = writeln!(
            out,
            "GPU {} {}: util {} % · mem {} / {} MiB ({} %) · mem util {} % · {} °C · {} W",
            d.index,
            printable(&d.name),
            o(d.util_percent),
            opt(d.memory_used_bytes.map(mib), 0),
            opt(d.memory_total_bytes.map(mib), 0),
            opt(d.memory_percent(), 0),
            o(d.memory_util_percent),
            o(d.temperature_c),
            opt(d.power_watts, 0),
        );
    }
    if gpu.processes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "{:>4} {:>8} {:>6} {:>8} {:>4} {:>4}  {:<15} CGROUP",
        "GPU", "PID", "CPU%", "GPUMiB", "SM%", "MEM%", "COMM"
    );
    for p in &gpu.processes {
        let cpu = snap
            .processes
            .binary_search_by_key(&p.pid, |q| q.pid)
            .ok()
            .and_then(|i| snap.processes[i].cpu_percent);
        let state = match p.state {
            crate::gpu::ProcState::Running => "",
            crate::gpu::ProcState::Zombie => " (zombie)",
            crate::gpu::ProcState::Gone => " (gone)",
        };
        let _ = writeln!(
            out,
            "{:>4} {:>8} {:>6} {:>8} {:>4} {:>4}  {:<15} {}{state}",
            p.device,
            p.pid,
            opt(cpu, 1),
            opt(p.used_bytes.map(mib), 0),
            o(p.sm_util_percent),
            o(p.mem_util_percent),
            printable(p.comm.as_deref().unwrap_or("?")),
            printable(p.cgroup.as_deref().unwrap_or("-")),
        );
    }
}

/// cgroup names may hold any byte but '/' and NUL: escape control characters so a
/// hostile name cannot rewrite the operator's terminal.
#[must_use]
pub fn printable(s: &str) -> String {
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

/// The snapshot and the tick's findings, decisions and releases as one JSON object,
/// no newline.
///
/// # Errors
/// Never in practice: every field serialises.
pub fn json(snap: &Snapshot, judgement: &Judgement, top: usize) -> serde_json::Result<String> {
    #[derive(serde::Serialize)]
    struct Tick<'a> {
        #[serde(flatten)]
        snapshot: &'a Snapshot,
        #[serde(flatten)]
        judgement: &'a Judgement,
    }
    if top == 0 || snap.cgroups.len() <= top {
        return serde_json::to_string(&Tick {
            snapshot: snap,
            judgement,
        });
    }
    // The busiest (the snapshot is sorted by CPU time), and whatever the tick is about.
    let named: std::collections::HashSet<&str> = judgement
        .findings
        .iter()
        .map(|f| f.finding.cgroup.as_str())
        .chain(judgement.decisions.iter().map(|d| d.cgroup.as_str()))
        .chain(judgement.releases.iter().map(|r| r.cgroup.as_str()))
        .chain(judgement.actions.iter().map(|a| a.cgroup.as_str()))
        .collect();
    let mut shown = snap.clone();
    shown.cgroups = snap
        .cgroups
        .iter()
        .enumerate()
        .filter(|(i, c)| *i < top || c.path.as_deref().is_some_and(|p| named.contains(p)))
        .map(|(_, c)| c.clone())
        .collect();
    serde_json::to_string(&Tick {
        snapshot: &shown,
        judgement,
    })
}

/// What one tick found and decided (the detect and decide stages' output).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Judgement {
    pub findings: Vec<crate::explain::Judged>,
    pub decisions: Vec<crate::decide::Decision>,
    pub releases: Vec<crate::decide::Release>,
    /// What the containment stage did about them.
    pub actions: Vec<crate::act::Report>,
    /// Problems of the last policy reload (the last good set is in force meanwhile).
    pub policy_errors: Vec<String>,
}

/// One line per finding and decision, for under the table.
#[must_use]
pub fn findings(j: &Judgement) -> String {
    let mut out = String::new();
    for f in &j.findings {
        let _ = writeln!(
            out,
            "!! {} {:?} {}: {} [rule {}]",
            f.finding.kind,
            f.finding.severity,
            printable(&f.finding.cgroup),
            f.finding.summary,
            f.rule.as_deref().unwrap_or("none")
        );
    }
    for d in &j.decisions {
        let _ = writeln!(
            out,
            ">> {:?}{} {}: {}",
            d.action,
            if d.dry_run { " (dry run)" } else { "" },
            printable(&d.cgroup),
            d.reason
        );
    }
    for a in &j.actions {
        let _ = writeln!(
            out,
            "== {} {}: {}{}",
            a.action,
            printable(&a.cgroup),
            a.done,
            if a.errors.is_empty() {
                String::new()
            } else {
                format!(" (failed: {})", a.errors.join("; "))
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        collect::{CgroupFiles, Events, Machine, OomVictim, RunQueue},
        probes::EbpfStats,
    };

    fn sample(id: u64, path: Option<&str>, ms: u64) -> CgroupSample {
        CgroupSample {
            id,
            path: path.map(str::to_owned),
            on_cpu_ns: ms * 1_000_000,
            cpu_percent: ms as f64 / 10.0,
            switches: 3,
            involuntary_switches: 1,
            runq: RunQueue {
                p99_us: Some(2048.0),
                ..RunQueue::default()
            },
            memory_trend_mib_per_s: Some(1.5),
            files: std::sync::Arc::new(CgroupFiles {
                memory_current: Some(64 << 20),
                ..CgroupFiles::default()
            }),
            files_fresh: true,
            ..CgroupSample::default()
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            tick: 1,
            timestamp_ms: 1,
            interval_ns: 1_000_000_000,
            cpus: 2,
            machine: Machine {
                mem_total_bytes: 1 << 30,
                mem_available_bytes: 512 << 20,
                ..Machine::default()
            },
            cgroups: vec![
                sample(5, Some("/busy"), 990),
                sample(6, None, 20),
                sample(7, Some("/evil\x1b[2J"), 5),
            ],
            processes: std::sync::Arc::new(Vec::new()),
            processes_age_ms: 0,
            events: Events {
                oom_victims: vec![OomVictim {
                    pid: 42,
                    cgroup: Some("/leak".into()),
                    trigger_cgroup: None,
                }],
                ..Events::default()
            },
            tracked_cgroups: 3,
            vanished_cgroups: 1,
            ebpf: EbpfStats {
                cgroup_map_capacity: 4096,
                oom_victims: 1,
                ..EbpfStats::default()
            },
            gpu: None,
        }
    }

    #[test]
    fn table_lists_busiest_first_and_limits_rows() {
        let t = table(&snap(), 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines.len(),
            6,
            "summary, 2 header lines, two rows, OOM line:\n{t}"
        );
        assert!(
            lines[0].contains("2 CPUs") && lines[0].contains("mem avail 512/1024 MiB"),
            "{t}"
        );
        assert!(lines[0].contains("OOM kills 1"), "{t}");
        assert!(
            lines[3].trim_start().starts_with("99.0") && lines[3].ends_with("/busy"),
            "{t}"
        );
        assert!(
            lines[3].contains(" 2.05 ") && lines[3].contains(" 64 ") && lines[3].contains(" 1.5 "),
            "{t}"
        );
        assert!(lines[4].ends_with("(deleted)"), "{t}");
        assert!(lines[5].contains("OOM killer chose pid 42 in /leak"), "{t}");
    }

    #[test]
    fn table_escapes_control_characters() {
        let t = table(&snap(), 10);
        assert!(!t.contains('\x1b'), "{t:?}");
        assert!(t.contains(r"/evil\u{1b}[2J"), "{t}");
    }

    #[test]
    fn gpu_devices_and_processes_are_listed_with_their_cpu() {
        use crate::gpu::{GpuDevice, GpuProcess, GpuSnapshot, ProcState};
        let mut s = snap();
        let dev = |index, lost| GpuDevice {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100".into(),
            lost,
            memory_total_bytes: Some(80 << 30),
            memory_used_bytes: Some(20 << 30),
            util_percent: Some(61),
            memory_util_percent: Some(30),
            temperature_c: Some(55),
            power_watts: Some(312.4),
        };
        s.gpu = Some(std::sync::Arc::new(GpuSnapshot {
            seq: 1,
            driver: None,
            devices: vec![dev(0, false), dev(1, true)],
            processes: vec![GpuProcess {
                pid: 77,
                device: 0,
                used_bytes: Some(4000 << 20),
                graphics: false,
                sm_util_percent: Some(40),
                mem_util_percent: None,
                cgroup: Some("/ml".into()),
                comm: Some("python3".into()),
                state: ProcState::Zombie,
            }],
        }));
        let t = table(&s, 1);
        assert!(
            t.contains("GPU 0 NVIDIA H100: util 61 % · mem 20480 / 81920 MiB (25 %) · mem util 30 % · 55 °C · 312 W"),
            "{t}"
        );
        assert!(t.contains("GPU 1 NVIDIA H100 (GPU-1): LOST"), "{t}");
        let row = t.lines().find(|l| l.contains("python3")).expect(&t);
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "0", "77", "-", "4000", "40", "-", "python3", "/ml", "(zombie)"
            ],
            "{t}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&json(&s, &Judgement::default(), 0).unwrap()).unwrap();
        assert_eq!(j["gpu"]["processes"][0]["cgroup"], "/ml");
        assert_eq!(j["gpu"]["devices"][1]["lost"], true);
    }

    #[test]
    fn json_is_one_line_with_all_fields() {
        let j = json(&snap(), &Judgement::default(), 0).unwrap();
        assert!(!j.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["cgroups"][0]["path"], "/busy");
        assert_eq!(v["cgroups"][1]["path"], serde_json::Value::Null);
        assert_eq!(v["cgroups"][0]["files"]["memory_current"], 64u64 << 20);
        assert_eq!(v["cgroups"][0]["runq"]["p99_us"], 2048.0);
        assert_eq!(v["ebpf"]["cgroup_map_capacity"], 4096);
        assert_eq!(v["machine"]["mem_total_bytes"], 1u64 << 30);
        assert_eq!(v["findings"], serde_json::json!([]));
        assert_eq!(v["decisions"], serde_json::json!([]));
        assert_eq!(v["events"]["oom_victims"][0]["pid"], 42);
        assert_eq!(v["interval_ns"], 1_000_000_000u64);
    }

    /// `--json-top N`: the N busiest cgroups and every cgroup the tick's judgement
    /// names, nothing else.
    #[test]
    fn json_top_keeps_the_busiest_and_the_named() {
        let j = Judgement {
            actions: vec![crate::act::Report::new("/evil\x1b[2J", "r", "throttle")],
            ..Judgement::default()
        };
        let v: serde_json::Value = serde_json::from_str(&json(&snap(), &j, 1).unwrap()).unwrap();
        let paths: Vec<&serde_json::Value> = v["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["path"])
            .collect();
        assert_eq!(
            paths,
            [
                &serde_json::json!("/busy"),
                &serde_json::json!("/evil\x1b[2J")
            ]
        );
        let all: serde_json::Value = serde_json::from_str(&json(&snap(), &j, 0).unwrap()).unwrap();
        assert_eq!(all["cgroups"].as_array().unwrap().len(), 3);
    }
}
