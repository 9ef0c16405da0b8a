//! Types and names shared by the kernel side (`monitor-ebpf`) and the agent (`monitor`).
//!
//! Rules (aya-template, kunai-common): `#[repr(C)]`, `Copy`, fixed-width fields, no
//! implicit padding (checked by the `const` assertions below), integers instead of `bool`.
//! Map names are defined once here so both sides cannot drift apart.
#![no_std]

/// Per-CPU hash map: cgroup v2 id (`u64`, the inode of the cgroup's directory) → [`CgroupCpu`].
pub const CGROUP_CPU_MAP: &str = "CGROUP_CPU";
/// Capacity of [`CGROUP_CPU_MAP`]. Updates for new cgroups beyond this are dropped and
/// counted in [`Stat::CgroupMapFull`]; the agent removes entries of deleted cgroups.
pub const CGROUP_CPU_MAX_ENTRIES: u32 = 16_384;

/// Per-CPU array with one [`CpuSlice`]: what runs on this CPU since when.
pub const CPU_SLICE_MAP: &str = "CPU_SLICE";

/// Per-CPU array of `u64` counters indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";

/// Global (`.rodata`) set by the loader: byte offset of `next_pid` in the
/// `sched:sched_switch` tracepoint record, read from tracefs at start so one object
/// serves every kernel whose layout differs.
pub const NEXT_PID_OFFSET_GLOBAL: &str = "NEXT_PID_OFFSET";
/// Layout of `sched_switch` on 6.1 and 6.18 (`next_pid` after the 40-byte prev part
/// and the 16-byte `next_comm`); used when tracefs gives no format.
pub const DEFAULT_NEXT_PID_OFFSET: u32 = 56;

/// On-CPU time charged to one cgroup on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCpu {
    /// Nanoseconds tasks of this cgroup spent on the CPU, charged when they leave it.
    pub on_cpu_ns: u64,
    /// Number of times a task of this cgroup left the CPU.
    pub switches: u64,
}

/// The slice currently running on one CPU, so userspace can account for time that a
/// task which has not been switched out yet (a spinner on an idle machine) has used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSlice {
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`) at the last switch on this CPU; 0 if none seen.
    pub start_ns: u64,
    /// Thread id switched in at `start_ns`; 0 is the idle task.
    pub pid: u32,
    /// Explicit padding: keeps the layout identical on both sides. Always 0.
    pub padding: u32,
}

/// Counters of the eBPF side's own health, indexes into [`STATS_MAP`].
/// Ids are fixed and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A new cgroup could not be added to [`CGROUP_CPU_MAP`] (map full): its time is lost.
    CgroupMapFull = 0,
    /// The clock went backwards between two switches on a CPU; the slice was skipped.
    ClockBackwards = 1,
    /// A tracepoint record could not be read.
    ReadError = 2,
    /// Updating the cgroup map failed for a reason other than "full".
    UpdateError = 3,
}

impl Stat {
    /// Every stat, in id order.
    pub const ALL: [Stat; 4] = [
        Stat::CgroupMapFull,
        Stat::ClockBackwards,
        Stat::ReadError,
        Stat::UpdateError,
    ];
    /// Number of slots in [`STATS_MAP`].
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a handful of stats fit in u32"
    )]
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable name for logs and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Stat::CgroupMapFull => "cgroup_map_full",
            Stat::ClockBackwards => "clock_backwards",
            Stat::ReadError => "read_error",
            Stat::UpdateError => "update_error",
        }
    }
}

const _: () = assert!(core::mem::size_of::<CgroupCpu>() == 16);
const _: () = assert!(core::mem::size_of::<CpuSlice>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: #[repr(C)], only integer fields, no padding (asserted above).
    unsafe impl aya::Pod for super::CgroupCpu {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CpuSlice {}
}
