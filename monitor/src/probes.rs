//! Loading and attaching cgsentry's eBPF programs, and reading their maps.
//!
//! A registry of probes (kunai): each program with the tracepoints it attaches to and
//! whether the agent can run without it. One generic loop loads and attaches them; an
//! optional probe that fails is a warning, a required one an error naming the probe.
use std::{collections::HashMap, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePoint,
};
use monitor_common::{
    CGROUP_STATS_MAP, CGROUP_STATS_MAX_ENTRIES, CPU_SLICE_MAP, CgroupStats, CpuSlice, EVENTS_MAP,
    STATS_MAP, Stat, offsets,
};
use tracing::{info, warn};

use crate::{
    events::{DecodeError, ProcEvent},
    preflight::{Environment, field_offset},
};

/// The object built by monitor/build.rs from `monitor-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// One program of the object and the tracepoints it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Function name in `monitor-ebpf`.
    pub program: &'static str,
    /// `(category, name)` of each tracepoint.
    pub tracepoints: &'static [(&'static str, &'static str)],
    /// Without a required probe the agent refuses to start.
    pub required: bool,
    /// What is lost without it (for the warning).
    pub provides: &'static str,
    /// A variant reading fields at the offsets found in tracefs, attached instead of
    /// `program` when this kernel's layout differs from the compiled one.
    pub portable: Option<&'static str>,
}

/// Every probe cgsentry knows. New collectors add rows here, not plumbing. Program
/// names are unique within 15 characters (the kernel keeps no more).
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "sched_switch",
        tracepoints: &[("sched", "sched_switch")],
        required: true,
        provides: "CPU time per cgroup",
        portable: Some("sched_switch_p"),
    },
    ProbeSpec {
        program: "sched_wakeup",
        tracepoints: &[("sched", "sched_wakeup"), ("sched", "sched_wakeup_new")],
        required: false,
        provides: "run-queue latency after wakeups",
        portable: Some("sched_wakeup_p"),
    },
    ProbeSpec {
        program: "proc_fork",
        tracepoints: &[("sched", "sched_process_fork")],
        required: false,
        provides: "fork counts and events",
        portable: None,
    },
    ProbeSpec {
        program: "proc_exec",
        tracepoints: &[("sched", "sched_process_exec")],
        required: false,
        provides: "exec counts and events",
        portable: None,
    },
    ProbeSpec {
        program: "proc_exit",
        tracepoints: &[("sched", "sched_process_exit")],
        required: false,
        provides: "exit counts and events",
        portable: None,
    },
    ProbeSpec {
        program: "reclaim_begin",
        tracepoints: &[
            ("vmscan", "mm_vmscan_direct_reclaim_begin"),
            ("vmscan", "mm_vmscan_memcg_reclaim_begin"),
        ],
        required: false,
        provides: "reclaim stalls",
        portable: None,
    },
    ProbeSpec {
        program: "reclaim_end",
        tracepoints: &[
            ("vmscan", "mm_vmscan_direct_reclaim_end"),
            ("vmscan", "mm_vmscan_memcg_reclaim_end"),
        ],
        required: false,
        provides: "reclaim stalls",
        portable: None,
    },
    ProbeSpec {
        program: "oom_mark_victim",
        tracepoints: &[("oom", "mark_victim")],
        required: false,
        provides: "kernel OOM kill events",
        portable: None,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {program} is not in the eBPF object (build mismatch)")]
    MissingProgram { program: &'static str },
    #[error("eBPF map {0} is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error("tracepoint {category}:{name} does not exist in this kernel ({path} is missing)")]
    MissingTracepoint {
        category: &'static str,
        name: &'static str,
        path: String,
    },
    #[error("eBPF program {program} ({category}:{name}): {source}")]
    Program {
        program: &'static str,
        category: &'static str,
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("reading eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// Knobs of [`Probes::load`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Capacity of the per-cgroup map (default [`CGROUP_STATS_MAX_ENTRIES`]).
    pub cgroup_map_capacity: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            cgroup_map_capacity: CGROUP_STATS_MAX_ENTRIES,
        }
    }
}

/// Tracepoint field offsets of this kernel, from tracefs' format files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub switch_prev_state: u32,
    pub switch_next_pid: u32,
    pub wakeup_pid: u32,
    pub fork_child_pid: u32,
    pub oom_victim_pid: u32,
}

impl Layout {
    /// Whether the hot programs' compiled offsets are this kernel's: then the direct
    /// (no `bpf_probe_read_kernel`) variants can be attached.
    #[must_use]
    pub fn matches_compiled(&self) -> bool {
        self.switch_prev_state == offsets::DEFAULT_SWITCH_PREV_STATE
            && self.switch_next_pid == offsets::DEFAULT_SWITCH_NEXT_PID
            && self.wakeup_pid == offsets::DEFAULT_WAKEUP_PID
    }

    /// Reads the offsets under `tracefs/events`; a missing file or field keeps the
    /// 6.1/6.18 default and says so.
    #[must_use]
    pub fn from_tracefs(tracefs: &Path) -> Self {
        let get = |event: &str, field: &str, default: u32| {
            let path = tracefs.join("events").join(event).join("format");
            let found = std::fs::read_to_string(&path)
                .ok()
                .and_then(|f| field_offset(&f, field));
            found.unwrap_or_else(|| {
                warn!(
                    "{}: no field {field}; assuming offset {default}",
                    path.display()
                );
                default
            })
        };
        Self {
            switch_prev_state: get(
                "sched/sched_switch",
                "prev_state",
                offsets::DEFAULT_SWITCH_PREV_STATE,
            ),
            switch_next_pid: get(
                "sched/sched_switch",
                "next_pid",
                offsets::DEFAULT_SWITCH_NEXT_PID,
            ),
            wakeup_pid: get("sched/sched_wakeup", "pid", offsets::DEFAULT_WAKEUP_PID),
            fork_child_pid: get(
                "sched/sched_process_fork",
                "child_pid",
                offsets::DEFAULT_FORK_CHILD_PID,
            ),
            oom_victim_pid: get("oom/mark_victim", "pid", offsets::DEFAULT_OOM_VICTIM_PID),
        }
    }
}

/// The loaded, attached programs and their maps. Dropping it detaches everything.
pub struct Probes {
    // Maps are taken out of `ebpf` so they can be read without borrowing it.
    cgroup_stats: PerCpuHashMap<MapData, u64, CgroupStats>,
    cpu_slice: PerCpuArray<MapData, CpuSlice>,
    stats: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    /// Programs that attached (to at least one tracepoint).
    pub attached: Vec<&'static str>,
    /// Tracepoints that could not be attached, with why.
    pub missing: Vec<String>,
    cgroup_map_capacity: u32,
    // Last: the programs (and their links) outlive the maps above while dropping.
    ebpf: Ebpf,
}

impl Probes {
    /// Loads the object with this kernel's tracepoint layout and attaches every probe.
    ///
    /// # Errors
    /// The object does not load, or a required probe does not attach.
    pub fn load(env: &Environment, options: LoadOptions) -> Result<Self, ProbeError> {
        let layout = Layout::from_tracefs(&env.tracefs);
        let mut ebpf = EbpfLoader::new()
            .override_global(offsets::SWITCH_PREV_STATE, &layout.switch_prev_state, true)
            .override_global(offsets::SWITCH_NEXT_PID, &layout.switch_next_pid, true)
            .override_global(offsets::WAKEUP_PID, &layout.wakeup_pid, true)
            .override_global(offsets::FORK_CHILD_PID, &layout.fork_child_pid, true)
            .override_global(offsets::OOM_VICTIM_PID, &layout.oom_victim_pid, true)
            .map_max_entries(CGROUP_STATS_MAP, options.cgroup_map_capacity)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;
        let mut attached = Vec::new();
        let mut missing = Vec::new();
        let direct = layout.matches_compiled();
        if !direct {
            warn!(
                ?layout,
                "tracepoint layout differs from the compiled one: using the portable \
                 (slower) scheduler programs"
            );
        }
        for spec in PROBES {
            let program = match spec.portable {
                Some(portable) if !direct => portable,
                _ => spec.program,
            };
            match attach(&mut ebpf, spec, program, &env.tracefs) {
                Ok(failed) if failed.len() < spec.tracepoints.len() => {
                    attached.push(program);
                    missing.extend(failed.iter().map(ToString::to_string));
                }
                Ok(failed) | Err(failed) if !spec.required => {
                    for e in &failed {
                        warn!(
                            "optional probe not attached ({} unavailable): {e}",
                            spec.provides
                        );
                    }
                    missing.extend(failed.iter().map(ToString::to_string));
                }
                Ok(mut failed) | Err(mut failed) => {
                    return Err(failed.pop().unwrap_or(ProbeError::MissingProgram {
                        program: spec.program,
                    }));
                }
            }
        }
        for m in &missing {
            warn!("not attached: {m}");
        }
        info!(probes = ?attached, "eBPF programs attached");
        let map_err = |map| {
            move |source| ProbeError::Map {
                map,
                source: Box::new(source),
            }
        };
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(ProbeError::MissingMap(name));
        let cgroup_stats =
            PerCpuHashMap::try_from(take(CGROUP_STATS_MAP)?).map_err(map_err(CGROUP_STATS_MAP))?;
        let cpu_slice =
            PerCpuArray::try_from(take(CPU_SLICE_MAP)?).map_err(map_err(CPU_SLICE_MAP))?;
        let stats = PerCpuArray::try_from(take(STATS_MAP)?).map_err(map_err(STATS_MAP))?;
        let events = RingBuf::try_from(take(EVENTS_MAP)?).map_err(map_err(EVENTS_MAP))?;
        Ok(Self {
            cgroup_stats,
            cpu_slice,
            stats,
            events,
            attached,
            missing,
            cgroup_map_capacity: options.cgroup_map_capacity,
            ebpf,
        })
    }

    /// The object, for attaching the eBPF logger.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Counters per cgroup since load, summed over CPUs. Entries that vanish while
    /// iterating (removed concurrently) are skipped.
    #[must_use]
    pub fn cgroup_stats(&self) -> HashMap<u64, CgroupStats> {
        let mut out = HashMap::new();
        for item in &self.cgroup_stats {
            let Ok((id, per_cpu)) = item else { continue };
            let mut sum = CgroupStats::default();
            for v in per_cpu.iter() {
                add_stats(&mut sum, v);
            }
            out.insert(id, sum);
        }
        out
    }

    /// Forgets a cgroup (deleted): keeps the map from filling with dead ids. Whether
    /// an entry was removed (not already gone: evicted, or never inserted).
    pub fn forget_cgroup(&mut self, id: u64) -> bool {
        self.cgroup_stats.remove(&id).is_ok()
    }

    /// The slice running on each CPU (index = CPU number).
    ///
    /// # Errors
    /// The map cannot be read.
    pub fn cpu_slices(&self) -> Result<Vec<CpuSlice>, ProbeError> {
        self.cpu_slice
            .get(&0, 0)
            .map(|v| v.iter().copied().collect())
            .map_err(|source| ProbeError::Map {
                map: CPU_SLICE_MAP,
                source: Box::new(source),
            })
    }

    /// Every lifecycle event waiting in the ring buffer; undecodable ones come back as
    /// errors (counted by the caller), never a panic.
    pub fn drain_events(&mut self, max: usize) -> Vec<Result<ProcEvent, DecodeError>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.events.next() else {
                break;
            };
            out.push(ProcEvent::decode(&item));
        }
        out
    }

    /// The eBPF side's health counters, summed over CPUs.
    #[must_use]
    pub fn stats(&self) -> EbpfStats {
        let read = |stat: Stat| {
            self.stats
                .get(&(stat as u32), 0)
                .map_or(0, |v| v.iter().sum())
        };
        EbpfStats {
            cgroup_map_full: read(Stat::CgroupMapFull),
            clock_backwards: read(Stat::ClockBackwards),
            read_errors: read(Stat::ReadError),
            update_errors: read(Stat::UpdateError),
            events_lost: read(Stat::EventsLost),
            oom_victims: read(Stat::OomVictims),
            cgroup_inserts: read(Stat::CgroupInserts),
            cgroup_evictions: 0,
            cgroup_map_capacity: self.cgroup_map_capacity,
        }
    }
}

/// Adds one CPU's counters into a sum (wrapping: counters are monotonic, deltas are
/// taken later).
pub fn add_stats(sum: &mut CgroupStats, v: &CgroupStats) {
    sum.on_cpu_ns = sum.on_cpu_ns.wrapping_add(v.on_cpu_ns);
    sum.switches = sum.switches.wrapping_add(v.switches);
    sum.involuntary = sum.involuntary.wrapping_add(v.involuntary);
    sum.runq_wait_ns = sum.runq_wait_ns.wrapping_add(v.runq_wait_ns);
    sum.runq_waits = sum.runq_waits.wrapping_add(v.runq_waits);
    sum.forks = sum.forks.wrapping_add(v.forks);
    sum.execs = sum.execs.wrapping_add(v.execs);
    sum.exits = sum.exits.wrapping_add(v.exits);
    sum.reclaim_ns = sum.reclaim_ns.wrapping_add(v.reclaim_ns);
    sum.reclaims = sum.reclaims.wrapping_add(v.reclaims);
    for (s, x) in sum.runq_hist.iter_mut().zip(v.runq_hist) {
        *s = s.wrapping_add(x);
    }
}

/// Counters of what the eBPF programs could not record, and of OOM kills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EbpfStats {
    /// Updates lost because the per-cgroup map was full.
    pub cgroup_map_full: u64,
    /// Slices skipped because the clock went backwards.
    pub clock_backwards: u64,
    /// Tracepoint records that could not be read.
    pub read_errors: u64,
    /// Map updates that failed for another reason than a full map.
    pub update_errors: u64,
    /// Lifecycle events lost to a full ring buffer.
    pub events_lost: u64,
    /// Victims chosen by the kernel OOM killer since load.
    pub oom_victims: u64,
    /// New entries in the per-cgroup map since load.
    pub cgroup_inserts: u64,
    /// Entries the full (LRU) map evicted for newer cgroups since load: inserts less
    /// the agent's own deletions less the entries there now. An evicted cgroup loses
    /// its counts up to then and is counted afresh when it runs again.
    pub cgroup_evictions: u64,
    /// Capacity of the per-cgroup map.
    pub cgroup_map_capacity: u32,
}

impl EbpfStats {
    /// Everything lost, for one "dropped" figure.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.cgroup_map_full + self.read_errors + self.update_errors + self.clock_backwards
    }
}

/// Loads `spec`'s program and attaches it to each of its tracepoints. `Ok` carries the
/// tracepoints that failed; `Err` means the program itself is unusable.
fn attach(
    ebpf: &mut Ebpf,
    spec: &ProbeSpec,
    program_name: &'static str,
    tracefs: &Path,
) -> Result<Vec<ProbeError>, Vec<ProbeError>> {
    let program_err = |(category, name): (&'static str, &'static str)| {
        move |source| ProbeError::Program {
            program: program_name,
            category,
            name,
            source: Box::new(source),
        }
    };
    let first = spec.tracepoints[0];
    let program: &mut TracePoint = ebpf
        .program_mut(program_name)
        .ok_or(ProbeError::MissingProgram {
            program: program_name,
        })
        .and_then(|p| p.try_into().map_err(program_err(first)))
        .map_err(|e| vec![e])?;
    program.load().map_err(|e| vec![program_err(first)(e)])?;
    let mut failed = Vec::new();
    for &(category, name) in spec.tracepoints {
        let dir = tracefs.join("events").join(category).join(name);
        if !dir.is_dir() {
            failed.push(ProbeError::MissingTracepoint {
                category,
                name,
                path: dir.display().to_string(),
            });
            continue;
        }
        if let Err(e) = program.attach(category, name) {
            failed.push(program_err((category, name))(e));
        }
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_are_unique_as_the_kernel_stores_them() {
        let mut names: Vec<&str> = PROBES
            .iter()
            .map(|p| &p.program[..p.program.len().min(15)])
            .collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "{names:?}");
        assert!(PROBES.iter().all(|p| !p.tracepoints.is_empty()));
        assert!(
            PROBES
                .iter()
                .any(|p| p.required && p.program == "sched_switch")
        );
    }
}
