//! The collection stage: one owned [`Snapshot`] per tick, built from the eBPF maps and
//! the cgroup tree. No later stage reads the kernel itself.
//!
//! On-CPU time is charged by the eBPF program when a task *leaves* a CPU. A task that
//! never leaves (a spinner on an otherwise idle CPU) would show 0 % for seconds and then
//! a burst. [`CpuAccountant`] therefore also credits the slice still running on each
//! CPU (from the per-CPU `CPU_SLICE` record) and pays that credit back when the slice
//! ends and the map has it, so totals stay exact and each tick shows what happened in it.
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use monitor_common::CgroupCpu;
use serde::Serialize;
use tracing::warn;

use crate::{
    cgroupfs::{CgroupId, CgroupIndex, cgroup_of_pid},
    probes::{EbpfStats, ProbeError, Probes},
};

/// What one CPU is running at the moment of a tick, as resolved by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunningSlice {
    /// Monotonic ns at which the slice started; 0 when no switch was seen yet.
    pub start_ns: u64,
    /// The cgroup of the running task; `None` for the idle task or an unknown one.
    pub cgroup: Option<CgroupId>,
}

/// CPU used by one cgroup during one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuDelta {
    pub on_cpu_ns: u64,
    pub switches: u64,
}

#[derive(Clone, Copy, Debug)]
struct Credit {
    start_ns: u64,
    cgroup: CgroupId,
    credited_ns: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Debt {
    ns: u64,
    age: u8,
}

/// A debt not repaid within this many ticks is dropped: the slice was charged to
/// another cgroup (the task moved while running), so there is nothing to repay.
const DEBT_MAX_AGE: u8 = 2;

/// Turns cumulative per-cgroup counters plus the running slices into per-tick deltas.
/// Pure logic: no kernel access, unit-tested below.
#[derive(Debug, Default)]
pub struct CpuAccountant {
    last: HashMap<CgroupId, CgroupCpu>,
    credits: Vec<Option<Credit>>,
    debts: HashMap<CgroupId, Debt>,
}

impl CpuAccountant {
    /// Deltas since the previous call. `totals` are the map's cumulative counters read
    /// *before* `slices`; `now_ns` is the monotonic clock read after both.
    pub fn tick(
        &mut self,
        totals: &HashMap<CgroupId, CgroupCpu>,
        slices: &[RunningSlice],
        now_ns: u64,
    ) -> HashMap<CgroupId, CpuDelta> {
        let mut deltas: HashMap<CgroupId, CpuDelta> = totals
            .iter()
            .map(|(id, total)| {
                let prev = self.last.get(id).copied().unwrap_or_default();
                // A counter that went backwards was re-created (entry removed and re-added):
                // everything it holds is new.
                let ns = total
                    .on_cpu_ns
                    .checked_sub(prev.on_cpu_ns)
                    .unwrap_or(total.on_cpu_ns);
                let sw = total
                    .switches
                    .checked_sub(prev.switches)
                    .unwrap_or(total.switches);
                (
                    *id,
                    CpuDelta {
                        on_cpu_ns: ns,
                        switches: sw,
                    },
                )
            })
            .collect();
        self.last.clone_from(totals);

        if self.credits.len() < slices.len() {
            self.credits.resize(slices.len(), None);
        }
        for (credit, slice) in self.credits.iter_mut().zip(slices) {
            match *credit {
                Some(ref mut c)
                    if c.start_ns == slice.start_ns && Some(c.cgroup) == slice.cgroup =>
                {
                    let extra = now_ns
                        .saturating_sub(c.start_ns)
                        .saturating_sub(c.credited_ns);
                    c.credited_ns += extra;
                    deltas.entry(c.cgroup).or_default().on_cpu_ns += extra;
                    continue;
                }
                Some(c) => {
                    // The slice ended: the map charges all of it, part of which we showed.
                    let debt = self.debts.entry(c.cgroup).or_default();
                    debt.ns += c.credited_ns;
                    debt.age = 0;
                }
                None => {}
            }
            *credit = match slice.cgroup {
                Some(cgroup) if slice.start_ns != 0 => {
                    let credited_ns = now_ns.saturating_sub(slice.start_ns);
                    deltas.entry(cgroup).or_default().on_cpu_ns += credited_ns;
                    Some(Credit {
                        start_ns: slice.start_ns,
                        cgroup,
                        credited_ns,
                    })
                }
                _ => None,
            };
        }

        self.debts.retain(|id, debt| {
            if let Some(delta) = deltas.get_mut(id) {
                let paid = debt.ns.min(delta.on_cpu_ns);
                delta.on_cpu_ns -= paid;
                debt.ns -= paid;
            }
            debt.age += 1;
            debt.ns > 0 && debt.age <= DEBT_MAX_AGE
        });
        deltas
    }

    /// Drops all state about a cgroup that no longer exists.
    pub fn forget(&mut self, id: CgroupId) {
        self.last.remove(&id);
        self.debts.remove(&id);
        for credit in &mut self.credits {
            if credit.is_some_and(|c| c.cgroup == id) {
                *credit = None;
            }
        }
    }
}

/// One cgroup's CPU in one tick.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CgroupCpuSample {
    /// cgroup v2 id (inode of its directory).
    pub id: CgroupId,
    /// Path relative to the v2 root ("/" is the root); `None` when the cgroup was
    /// deleted before it could be resolved.
    pub path: Option<String>,
    /// On-CPU time in this tick, nanoseconds.
    pub on_cpu_ns: u64,
    /// CPU use in percent of one CPU (200 = two CPUs busy).
    pub cpu_percent: f64,
    /// Tasks switched out in this tick.
    pub switches: u64,
}

/// Everything one tick saw.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Wall-clock time of the tick, milliseconds since the Unix epoch.
    pub timestamp_ms: u128,
    /// Length of the tick, nanoseconds (monotonic).
    pub interval_ns: u64,
    /// CPUs the eBPF programs report on.
    pub cpus: usize,
    /// Cgroups with CPU in this tick, busiest first.
    pub cgroups: Vec<CgroupCpuSample>,
    /// Cgroups currently held in the eBPF map.
    pub tracked_cgroups: usize,
    /// Deleted cgroups forgotten in this tick.
    pub vanished_cgroups: usize,
    /// What the eBPF side could not record (cumulative).
    pub ebpf: EbpfStats,
}

/// Monotonic clock, nanoseconds: the clock of `bpf_ktime_get_ns()`.
///
/// # Panics
/// Never on Linux: `CLOCK_MONOTONIC` always exists.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// Reads the probes and the cgroup tree into snapshots.
pub struct Collector {
    probes: Probes,
    index: CgroupIndex,
    proc_root: PathBuf,
    accountant: CpuAccountant,
    last_ns: u64,
    last_map_full: u64,
}

impl Collector {
    #[must_use]
    pub fn new(probes: Probes, index: CgroupIndex, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            probes,
            index,
            proc_root: proc_root.into(),
            accountant: CpuAccountant::default(),
            last_ns: monotonic_ns(),
            last_map_full: 0,
        }
    }

    /// The probes whose maps this collector reads.
    #[must_use]
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// One tick: deltas since the previous call (or since `new`).
    ///
    /// # Errors
    /// A map could not be read at all.
    pub fn collect(&mut self) -> Result<Snapshot, ProbeError> {
        let totals = self.probes.cgroup_cpu();
        let slices = self.probes.cpu_slices()?;
        let now = monotonic_ns();
        let running: Vec<RunningSlice> = slices
            .iter()
            .map(|s| RunningSlice {
                start_ns: s.start_ns,
                cgroup: (s.pid != 0)
                    .then(|| cgroup_of_pid(&self.proc_root, s.pid))
                    .flatten()
                    .and_then(|path| self.index.id_of(&path)),
            })
            .collect();
        let deltas = self.accountant.tick(&totals, &running, now);
        let interval_ns = now.saturating_sub(self.last_ns).max(1);
        self.last_ns = now;

        let ids: Vec<CgroupId> = totals.keys().chain(deltas.keys()).copied().collect();
        let paths = self.index.resolve_all(&ids);
        let mut vanished = 0;
        for (id, path) in &paths {
            if path.is_none() && totals.contains_key(id) {
                self.probes.forget_cgroup(*id);
                self.accountant.forget(*id);
                vanished += 1;
            }
        }
        let mut cgroups: Vec<CgroupCpuSample> = deltas
            .into_iter()
            .filter(|(_, d)| d.on_cpu_ns > 0 || d.switches > 0)
            .map(|(id, d)| CgroupCpuSample {
                id,
                path: paths.get(&id).cloned().flatten(),
                on_cpu_ns: d.on_cpu_ns,
                cpu_percent: d.on_cpu_ns as f64 * 100.0 / interval_ns as f64,
                switches: d.switches,
            })
            .collect();
        cgroups.sort_by(|a, b| b.on_cpu_ns.cmp(&a.on_cpu_ns).then(a.id.cmp(&b.id)));

        let ebpf = self.probes.stats();
        if ebpf.cgroup_map_full > self.last_map_full {
            warn!(
                dropped = ebpf.cgroup_map_full - self.last_map_full,
                capacity = ebpf.cgroup_map_capacity,
                tracked = totals.len(),
                "eBPF cgroup map full: CPU time of new cgroups is being dropped"
            );
            self.last_map_full = ebpf.cgroup_map_full;
        }
        Ok(Snapshot {
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            interval_ns,
            cpus: slices.len(),
            cgroups,
            tracked_cgroups: totals.len() - vanished,
            vanished_cgroups: vanished,
            ebpf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(entries: &[(u64, u64, u64)]) -> HashMap<CgroupId, CgroupCpu> {
        entries
            .iter()
            .map(|&(id, ns, sw)| {
                (
                    id,
                    CgroupCpu {
                        on_cpu_ns: ns,
                        switches: sw,
                    },
                )
            })
            .collect()
    }

    fn running(start_ns: u64, cgroup: u64) -> RunningSlice {
        RunningSlice {
            start_ns,
            cgroup: Some(cgroup),
        }
    }

    const IDLE: RunningSlice = RunningSlice {
        start_ns: 0,
        cgroup: None,
    };

    #[test]
    fn deltas_between_ticks() {
        let mut acc = CpuAccountant::default();
        let d = acc.tick(&totals(&[(1, 100, 2)]), &[IDLE], 1_000);
        assert_eq!(
            d[&1],
            CpuDelta {
                on_cpu_ns: 100,
                switches: 2
            }
        );
        let d = acc.tick(&totals(&[(1, 350, 5), (2, 10, 1)]), &[IDLE], 2_000);
        assert_eq!(
            d[&1],
            CpuDelta {
                on_cpu_ns: 250,
                switches: 3
            }
        );
        assert_eq!(
            d[&2],
            CpuDelta {
                on_cpu_ns: 10,
                switches: 1
            }
        );
    }

    #[test]
    fn counter_going_backwards_is_a_recreated_entry() {
        let mut acc = CpuAccountant::default();
        acc.tick(&totals(&[(1, 1_000, 10)]), &[], 1);
        let d = acc.tick(&totals(&[(1, 30, 1)]), &[], 2);
        assert_eq!(
            d[&1],
            CpuDelta {
                on_cpu_ns: 30,
                switches: 1
            }
        );
    }

    /// A spinner that never leaves its CPU: the map never grows, yet every tick shows
    /// the full interval, and when it finally leaves, the map's charge is not counted twice.
    #[test]
    fn running_slice_is_credited_then_repaid() {
        let mut acc = CpuAccountant::default();
        let spinner = 7;
        let d = acc.tick(&totals(&[]), &[running(500, spinner)], 1_000);
        assert_eq!(d[&spinner].on_cpu_ns, 500);
        let d = acc.tick(&totals(&[]), &[running(500, spinner)], 2_000);
        assert_eq!(d[&spinner].on_cpu_ns, 1_000);
        // It leaves at 2_500: the map now holds the whole slice (2_000 ns), the CPU idles.
        let d = acc.tick(&totals(&[(spinner, 2_000, 1)]), &[IDLE], 3_000);
        assert_eq!(
            d[&spinner],
            CpuDelta {
                on_cpu_ns: 500,
                switches: 1
            }
        );
        let total: u64 = 500 + 1_000 + 500;
        assert_eq!(total, 2_000, "sum of ticks equals what the kernel charged");
    }

    /// The switch lands between reading the map and reading the slices: the map does
    /// not have the ended slice yet, so the debt waits for it instead of being lost.
    #[test]
    fn debt_waits_for_a_late_map_charge() {
        let mut acc = CpuAccountant::default();
        acc.tick(&totals(&[]), &[running(1, 3)], 1_001); // credited 1_000
        let d = acc.tick(&totals(&[]), &[running(1_500, 4)], 2_001);
        assert_eq!(
            d.get(&3).map_or(0, |d| d.on_cpu_ns),
            0,
            "nothing to repay from yet"
        );
        assert_eq!(d[&4].on_cpu_ns, 501);
        let d = acc.tick(&totals(&[(3, 1_499, 1)]), &[running(1_500, 4)], 3_001);
        assert_eq!(
            d[&3].on_cpu_ns, 499,
            "1_499 charged minus the 1_000 shown earlier"
        );
        assert_eq!(d[&4].on_cpu_ns, 1_000);
    }

    #[test]
    fn stale_debt_expires() {
        let mut acc = CpuAccountant::default();
        acc.tick(&totals(&[]), &[running(1, 3)], 1_001);
        acc.tick(&totals(&[]), &[IDLE], 2_000); // debt 1_000 on cgroup 3
        acc.tick(&totals(&[]), &[IDLE], 3_000);
        acc.tick(&totals(&[]), &[IDLE], 4_000);
        // Three ticks later the task had moved away; cgroup 3's new work is not eaten.
        let d = acc.tick(&totals(&[(3, 700, 1)]), &[IDLE], 5_000);
        assert_eq!(d[&3].on_cpu_ns, 700);
    }

    #[test]
    fn forgotten_cgroup_leaves_no_state() {
        let mut acc = CpuAccountant::default();
        acc.tick(&totals(&[(9, 100, 1)]), &[running(10, 9)], 100);
        acc.forget(9);
        let d = acc.tick(&totals(&[(9, 40, 1)]), &[IDLE], 200);
        assert_eq!(
            d[&9],
            CpuDelta {
                on_cpu_ns: 40,
                switches: 1
            }
        );
    }

    #[test]
    fn idle_and_unresolved_cpus_credit_nobody() {
        let mut acc = CpuAccountant::default();
        let unresolved = RunningSlice {
            start_ns: 10,
            cgroup: None,
        };
        let d = acc.tick(&totals(&[]), &[IDLE, unresolved], 1_000);
        assert!(d.is_empty());
    }
}
