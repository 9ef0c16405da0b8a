//! Loading and attaching cgsentry's eBPF programs, and reading their maps.
//!
//! A registry of probes (kunai): each with its tracepoint and whether the agent can
//! run without it. One generic loop loads and attaches them; an optional probe that
//! fails is a warning, a required one an error naming the probe.
use std::collections::HashMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    programs::TracePoint,
};
use monitor_common::{
    CGROUP_CPU_MAP, CGROUP_CPU_MAX_ENTRIES, CPU_SLICE_MAP, CgroupCpu, CpuSlice,
    NEXT_PID_OFFSET_GLOBAL, STATS_MAP, Stat,
};
use tracing::{info, warn};

use crate::preflight::Environment;

/// The object built by monitor/build.rs from `monitor-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// One program of the object and where it attaches.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Function name in `monitor-ebpf`.
    pub program: &'static str,
    pub category: &'static str,
    pub tracepoint: &'static str,
    /// Without a required probe the agent refuses to start.
    pub required: bool,
}

/// Every probe cgsentry knows. Later collectors add rows here, not plumbing.
pub const PROBES: &[ProbeSpec] = &[ProbeSpec {
    program: "sched_switch",
    category: "sched",
    tracepoint: "sched_switch",
    required: true,
}];

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {program} is not in the eBPF object (build mismatch)")]
    MissingProgram { program: &'static str },
    #[error("eBPF map {0} is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error("eBPF program {program} ({category}:{tracepoint}): {source}")]
    Program {
        program: &'static str,
        category: &'static str,
        tracepoint: &'static str,
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

/// The loaded, attached programs and their maps. Dropping it detaches everything.
pub struct Probes {
    // Maps are taken out of `ebpf` so they can be read without borrowing it.
    cgroup_cpu: PerCpuHashMap<MapData, u64, CgroupCpu>,
    cpu_slice: PerCpuArray<MapData, CpuSlice>,
    stats: PerCpuArray<MapData, u64>,
    /// Names of the probes that attached.
    pub attached: Vec<&'static str>,
    cgroup_map_capacity: u32,
    // Last: the programs (and their links) outlive the maps above while dropping.
    ebpf: Ebpf,
}

/// Knobs of [`Probes::load`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Capacity of the per-cgroup map (default [`CGROUP_CPU_MAX_ENTRIES`]).
    pub cgroup_map_capacity: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            cgroup_map_capacity: CGROUP_CPU_MAX_ENTRIES,
        }
    }
}

impl Probes {
    /// Loads the object with `env`'s tracepoint layout and attaches every probe.
    ///
    /// # Errors
    /// The object does not load, or a required probe does not attach.
    pub fn load(env: &Environment, options: LoadOptions) -> Result<Self, ProbeError> {
        let mut ebpf = EbpfLoader::new()
            .override_global(NEXT_PID_OFFSET_GLOBAL, &env.next_pid_offset, true)
            .map_max_entries(CGROUP_CPU_MAP, options.cgroup_map_capacity)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;
        let mut attached = Vec::new();
        for spec in PROBES {
            match attach(&mut ebpf, spec) {
                Ok(()) => attached.push(spec.program),
                Err(e) if spec.required => return Err(e),
                Err(e) => warn!("optional probe not attached, continuing without it: {e}"),
            }
        }
        info!(probes = ?attached, "eBPF programs attached");
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
        };
        let map_err = |map| {
            move |source| ProbeError::Map {
                map,
                source: Box::new(source),
            }
        };
        let cgroup_cpu = PerCpuHashMap::try_from(take(&mut ebpf, CGROUP_CPU_MAP)?)
            .map_err(map_err(CGROUP_CPU_MAP))?;
        let cpu_slice = PerCpuArray::try_from(take(&mut ebpf, CPU_SLICE_MAP)?)
            .map_err(map_err(CPU_SLICE_MAP))?;
        let stats =
            PerCpuArray::try_from(take(&mut ebpf, STATS_MAP)?).map_err(map_err(STATS_MAP))?;
        Ok(Self {
            cgroup_cpu,
            cpu_slice,
            stats,
            attached,
            cgroup_map_capacity: options.cgroup_map_capacity,
            ebpf,
        })
    }

    /// The object, for attaching the eBPF logger.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// On-CPU time per cgroup since load, summed over CPUs. Entries that vanish while
    /// iterating (removed concurrently) are skipped.
    #[must_use]
    pub fn cgroup_cpu(&self) -> HashMap<u64, CgroupCpu> {
        let mut out = HashMap::new();
        for item in &self.cgroup_cpu {
            let Ok((id, per_cpu)) = item else { continue };
            let sum = per_cpu
                .iter()
                .fold(CgroupCpu::default(), |acc, v| CgroupCpu {
                    on_cpu_ns: acc.on_cpu_ns.wrapping_add(v.on_cpu_ns),
                    switches: acc.switches.wrapping_add(v.switches),
                });
            out.insert(id, sum);
        }
        out
    }

    /// Forgets a cgroup (deleted): keeps the map from filling with dead ids.
    pub fn forget_cgroup(&mut self, id: u64) {
        // Already gone is fine: another path removed it or it was never inserted.
        let _ = self.cgroup_cpu.remove(&id);
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
            cgroup_map_capacity: self.cgroup_map_capacity,
        }
    }
}

/// Counters of what the eBPF programs could not record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EbpfStats {
    /// Slices lost because the per-cgroup map was full.
    pub cgroup_map_full: u64,
    /// Slices skipped because the clock went backwards.
    pub clock_backwards: u64,
    /// Tracepoint records that could not be read.
    pub read_errors: u64,
    /// Map updates that failed for another reason than a full map.
    pub update_errors: u64,
    /// Capacity of the per-cgroup map.
    pub cgroup_map_capacity: u32,
}

fn attach(ebpf: &mut Ebpf, spec: &ProbeSpec) -> Result<(), ProbeError> {
    let err = |source| ProbeError::Program {
        program: spec.program,
        category: spec.category,
        tracepoint: spec.tracepoint,
        source: Box::new(source),
    };
    let program: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .ok_or(ProbeError::MissingProgram {
            program: spec.program,
        })?
        .try_into()
        .map_err(err)?;
    program.load().map_err(err)?;
    program
        .attach(spec.category, spec.tracepoint)
        .map_err(err)?;
    Ok(())
}
