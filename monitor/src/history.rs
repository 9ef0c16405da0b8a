//! The last five minutes, in memory (for `cgsentry top`'s sparklines) and in a file for
//! people who watch files (incident C's `watch cat metrics.txt`): one line per tick,
//! newest last — available memory, swap used, and the busiest and largest cgroups with
//! CPU, memory and memory trend. The file is rewritten whole every tick (a temporary
//! file renamed over it), so a reader never sees half a line; `tail -F` and `watch`
//! both follow it.
use std::{collections::VecDeque, fmt::Write as _, path::PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::collect::Snapshot;

pub const DEFAULT_PATH: &str = "/var/lib/cgsentry/history.txt";
/// How far back the history goes.
pub const SPAN_MS: u128 = 5 * 60 * 1000;
/// Cgroups kept per tick: the busiest by CPU and the largest by memory.
const PER_TICK: usize = 6;

/// One cgroup in one tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub cgroup: String,
    pub cpu_percent: f64,
    pub memory_bytes: Option<u64>,
    pub trend_mib_per_s: Option<f64>,
}

/// One tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub timestamp_ms: u128,
    pub mem_available_bytes: u64,
    pub swap_used_bytes: u64,
    pub cgroups: Vec<Row>,
}

#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<Entry>,
    file: Option<PathBuf>,
    failing: bool,
}

/// `HH:MM:SS` (UTC) of a Unix time in ms.
#[must_use]
pub fn hms(ms: u128) -> String {
    let s = crate::eventlog::rfc3339(ms);
    s.get(11..19).unwrap_or(&s).to_owned()
}

fn mib(b: u64) -> u64 {
    b >> 20
}

impl History {
    /// `file`: where to write it (`None`: memory only).
    #[must_use]
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            entries: VecDeque::new(),
            file,
            failing: false,
        }
    }

    #[must_use]
    pub fn entries(&self) -> &VecDeque<Entry> {
        &self.entries
    }

    /// Series of one cgroup over the history (oldest first): CPU percent and memory
    /// bytes, 0 in ticks where it was not among the rows.
    #[must_use]
    pub fn series(&self, cgroup: &str) -> (Vec<u64>, Vec<u64>) {
        self.entries
            .iter()
            .map(|e| {
                e.cgroups
                    .iter()
                    .find(|r| r.cgroup == cgroup)
                    .map_or((0, 0), |r| {
                        #[expect(
                            clippy::cast_possible_truncation,
                            clippy::cast_sign_loss,
                            reason = "a percentage"
                        )]
                        let cpu = r.cpu_percent.max(0.0).round() as u64;
                        (cpu, r.memory_bytes.unwrap_or(0))
                    })
            })
            .unzip()
    }

    /// Adds a tick, drops what is older than [`SPAN_MS`], rewrites the file.
    pub fn push(&mut self, snap: &Snapshot) {
        let mut rows: Vec<&crate::collect::CgroupSample> = snap
            .cgroups
            .iter()
            .filter(|c| c.path.as_deref().is_some_and(|p| p != "/"))
            .take(PER_TICK / 2)
            .collect();
        let mut by_mem: Vec<&crate::collect::CgroupSample> = snap
            .cgroups
            .iter()
            .filter(|c| c.path.as_deref().is_some_and(|p| p != "/"))
            .collect();
        by_mem.sort_by_key(|c| std::cmp::Reverse(c.files.memory_current.unwrap_or(0)));
        for c in by_mem {
            if rows.len() >= PER_TICK {
                break;
            }
            if !rows.iter().any(|r| r.id == c.id) {
                rows.push(c);
            }
        }
        let m = &snap.machine;
        self.entries.push_back(Entry {
            timestamp_ms: snap.timestamp_ms,
            mem_available_bytes: m.mem_available_bytes,
            swap_used_bytes: m.swap_total_bytes.saturating_sub(m.swap_free_bytes),
            cgroups: rows
                .into_iter()
                .map(|c| Row {
                    cgroup: c.path.clone().unwrap_or_default(),
                    cpu_percent: c.cpu_percent,
                    memory_bytes: c.files.memory_current,
                    trend_mib_per_s: c.memory_trend_mib_per_s,
                })
                .collect(),
        });
        while self
            .entries
            .front()
            .is_some_and(|e| snap.timestamp_ms.saturating_sub(e.timestamp_ms) > SPAN_MS)
        {
            self.entries.pop_front();
        }
        self.write();
    }

    /// The file's text.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = String::from(
            "# cgsentry: the last 5 minutes, one line per tick, newest last (rewritten every tick)\n\
             # time(UTC)  available  swap-used  | cgroup CPU% memory trend(MiB/s) | ...\n",
        );
        for e in &self.entries {
            let _ = write!(
                out,
                "{}  {:>6} MiB  {:>5} MiB",
                hms(e.timestamp_ms),
                mib(e.mem_available_bytes),
                mib(e.swap_used_bytes)
            );
            for r in &e.cgroups {
                let _ = write!(
                    out,
                    "  | {} {:.0}% {} {}",
                    crate::report::printable(&r.cgroup),
                    r.cpu_percent,
                    r.memory_bytes
                        .map_or_else(|| "-".into(), |b| format!("{}MiB", mib(b))),
                    r.trend_mib_per_s
                        .map_or_else(|| "-".into(), |t| format!("{t:+.1}"))
                );
            }
            out.push('\n');
        }
        out
    }

    fn write(&mut self) {
        let Some(path) = &self.file else { return };
        let tmp = path.with_extension("tmp");
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, self.text()))
            .and_then(|()| std::fs::rename(&tmp, path));
        match result {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                warn!("history file {}: {e}", path.display());
                self.failing = true;
            }
            Err(_) => {}
        }
    }
}
