//! Types and names shared by the kernel side (`monitor-ebpf`) and the agent (`monitor`).
//!
//! Rules (aya-template, kunai-common): `#[repr(C)]`, `Copy`, fixed-width fields, no
//! implicit padding (checked by the `const` assertions below), integers instead of `bool`.
//! Map names are defined once here so both sides cannot drift apart.
#![no_std]

/// Per-CPU hash map: cgroup v2 id (`u64`, the inode of the cgroup's directory) →
/// [`CgroupStats`].
pub const CGROUP_STATS_MAP: &str = "CGROUP_STATS";
/// Default capacity of [`CGROUP_STATS_MAP`]. Per-CPU maps preallocate
/// capacity × CPUs × 160 B (4096 entries: 1.3 MiB on 2 CPUs, 42 MiB on 64). The map is
/// an LRU hash: a new cgroup beyond it evicts the one least recently updated (any user
/// can create thousands of cgroups; a full map must not blind the agent to the next
/// one). New entries are counted in [`Stat::CgroupInserts`], so the agent tells
/// evictions apart (inserts − its own deletions − entries now); it removes entries of
/// deleted cgroups every tick.
pub const CGROUP_STATS_MAX_ENTRIES: u32 = 4096;

/// Per-CPU array with one [`CpuSlice`]: what runs on this CPU since when.
pub const CPU_SLICE_MAP: &str = "CPU_SLICE";

/// Array of [`PidStamp`] indexed by `pid & (PID_SLOTS - 1)`: when each task became
/// runnable (wakeup, or preemption). An array, not a hash: one bounds-checked index
/// instead of hashing and locking on the scheduler's hottest path. Two tasks whose pids
/// share a slot overwrite each other; the stored pid detects it (a lost sample, never a
/// wrong one).
pub const WAKEUP_MAP: &str = "WAKEUP";
/// Array of [`PidStamp`]: when each task entered direct or memcg reclaim.
pub const RECLAIM_MAP: &str = "RECLAIM";
/// Slots in [`WAKEUP_MAP`] and [`RECLAIM_MAP`] (a power of two).
pub const PID_SLOTS: u32 = 1 << 16;

/// Ring buffer of [`ProcEvent`]s (fork, exec, exit, OOM victim).
pub const EVENTS_MAP: &str = "EVENTS";
/// Size of [`EVENTS_MAP`] in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Per-CPU array of `u64` counters indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";

/// Run-queue wait histogram buckets: bucket 0 counts waits under 4 µs (2^12 ns),
/// bucket `i` in 1..=18 waits in [2^(11+i), 2^(12+i)) ns, bucket 19 waits of 2^30 ns
/// (1.07 s) or more.
pub const RUNQ_BUCKETS: usize = 20;

/// Bucket of a run-queue wait of `ns` nanoseconds (see [`RUNQ_BUCKETS`]). Branch-light
/// binary search: BPF has no count-leading-zeros instruction.
#[must_use]
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "runs in the eBPF scheduler hook: a BPF-to-BPF call costs more than these shifts"
)]
pub fn runq_bucket(ns: u64) -> usize {
    if ns < 1 << 12 {
        return 0;
    }
    let mut v = ns >> 12;
    let mut b = 1;
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        b += 1;
    }
    if b >= RUNQ_BUCKETS {
        RUNQ_BUCKETS - 1
    } else {
        b
    }
}

/// Lower bound in ns of histogram bucket `i` (0 for bucket 0).
#[must_use]
pub const fn runq_bucket_floor_ns(i: usize) -> u64 {
    if i == 0 { 0 } else { 1 << (11 + i) }
}

/// Byte offsets of the tracepoint fields the programs read, set by the loader from
/// tracefs' `format` files (they differ between kernels: `sched_process_fork` moved its
/// fields in 6.x). Globals in `.rodata`, so the verifier sees constants.
pub mod offsets {
    /// `sched_switch`: `prev_state` (long).
    pub const SWITCH_PREV_STATE: &str = "OFF_SWITCH_PREV_STATE";
    /// `sched_switch`: `next_pid`.
    pub const SWITCH_NEXT_PID: &str = "OFF_SWITCH_NEXT_PID";
    /// `sched_wakeup`/`sched_wakeup_new`: `pid`.
    pub const WAKEUP_PID: &str = "OFF_WAKEUP_PID";
    /// `sched_process_fork`: `child_pid`.
    pub const FORK_CHILD_PID: &str = "OFF_FORK_CHILD_PID";
    /// `oom:mark_victim`: `pid`.
    pub const OOM_VICTIM_PID: &str = "OFF_OOM_VICTIM_PID";
    /// 6.1 and 6.18 layouts, used when a format file lacks the field.
    pub const DEFAULT_SWITCH_PREV_STATE: u32 = 32;
    pub const DEFAULT_SWITCH_NEXT_PID: u32 = 56;
    pub const DEFAULT_WAKEUP_PID: u32 = 24;
    pub const DEFAULT_FORK_CHILD_PID: u32 = 44;
    pub const DEFAULT_OOM_VICTIM_PID: u32 = 8;
}

/// Everything the programs count for one cgroup on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Nanoseconds tasks of this cgroup spent on the CPU, charged when they leave it.
    pub on_cpu_ns: u64,
    /// Times a task of this cgroup left the CPU.
    pub switches: u64,
    /// Of which while still runnable (preempted): involuntary switches.
    pub involuntary: u64,
    /// Sum of run-queue waits (runnable → on CPU) of slices that ended, ns.
    pub runq_wait_ns: u64,
    /// Number of those waits.
    pub runq_waits: u64,
    /// Tasks (processes and threads) created by this cgroup's tasks.
    pub forks: u64,
    /// Successful execs in this cgroup.
    pub execs: u64,
    /// Processes (thread-group leaders) that exited in this cgroup.
    pub exits: u64,
    /// Time this cgroup's tasks were stalled in direct or memcg reclaim, ns.
    pub reclaim_ns: u64,
    /// Number of those reclaim episodes.
    pub reclaims: u64,
    /// Histogram of run-queue waits (see [`RUNQ_BUCKETS`]).
    pub runq_hist: [u32; RUNQ_BUCKETS],
}

/// The slice currently running on one CPU, so userspace can account for time that a
/// task which has not been switched out yet (a spinner on an idle machine) has used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSlice {
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`) at the last switch on this CPU; 0 if none seen.
    pub start_ns: u64,
    /// Run-queue wait of the task now running, ns; 0 when unknown. Charged to the
    /// task's cgroup when it leaves the CPU (at switch-in, its cgroup is not at hand).
    pub wait_ns: u64,
    /// Thread id switched in at `start_ns`; 0 is the idle task.
    pub pid: u32,
    /// Explicit padding: keeps the layout identical on both sides. Always 0.
    pub padding: u32,
}

/// A task and a timestamp (see [`WAKEUP_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidStamp {
    pub ts_ns: u64,
    pub pid: u32,
    pub padding: u32,
}

/// Kind of a [`ProcEvent`]. Ids are fixed and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `other_pid` is the new task; `pid`/`tgid` are the parent.
    Fork = 1,
    /// `pid`/`tgid` exec'd; `comm` is the new name.
    Exec = 2,
    /// The process `tgid` exited (its leader thread).
    Exit = 3,
    /// The kernel OOM killer chose `other_pid`; `pid` and `cgroup` are of the task
    /// whose allocation triggered it.
    OomVictim = 4,
}

/// Version of [`EventHeader`]'s layout; bumped on any change of an event's layout.
pub const EVENT_VERSION: u32 = 1;

/// First bytes of every ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] id.
    pub kind: u32,
    /// [`EVENT_VERSION`] of the writer.
    pub version: u32,
    pub ts_ns: u64,
    /// cgroup v2 id of the current task.
    pub cgroup: u64,
    /// Thread id and process id of the current task.
    pub pid: u32,
    pub tgid: u32,
}

/// A process lifecycle event (see [`EventKind`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    pub header: EventHeader,
    /// Child (fork) or victim (OOM) thread id; 0 otherwise.
    pub other_pid: u32,
    pub padding: u32,
    /// `comm` of the current task (NUL-padded, any bytes).
    pub comm: [u8; 16],
}

/// Counters of the eBPF side's health and of rare kernel events, indexes into
/// [`STATS_MAP`]. Ids are fixed and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A new cgroup could not be added to [`CGROUP_STATS_MAP`] (map full): its data is lost.
    CgroupMapFull = 0,
    /// The clock went backwards between two switches on a CPU; the slice was skipped.
    ClockBackwards = 1,
    /// A tracepoint record could not be read.
    ReadError = 2,
    /// Updating the cgroup map failed for a reason other than "full".
    UpdateError = 3,
    /// A lifecycle event was lost: the ring buffer was full.
    EventsLost = 4,
    /// The kernel OOM killer chose a victim (`oom:mark_victim`).
    OomVictims = 5,
    /// A new cgroup entered [`CGROUP_STATS_MAP`] (a cgroup seen for the first time, or
    /// again after its entry was evicted or deleted).
    CgroupInserts = 6,
}

impl Stat {
    /// Every stat, in id order.
    pub const ALL: [Stat; 7] = [
        Stat::CgroupMapFull,
        Stat::ClockBackwards,
        Stat::ReadError,
        Stat::UpdateError,
        Stat::EventsLost,
        Stat::OomVictims,
        Stat::CgroupInserts,
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
            Stat::EventsLost => "events_lost",
            Stat::OomVictims => "oom_victims",
            Stat::CgroupInserts => "cgroup_inserts",
        }
    }
}

const _: () = assert!(core::mem::size_of::<CgroupStats>() == 10 * 8 + RUNQ_BUCKETS * 4);
const _: () = assert!(core::mem::size_of::<CpuSlice>() == 24);
const _: () = assert!(core::mem::size_of::<PidStamp>() == 16);
const _: () = assert!(core::mem::size_of::<EventHeader>() == 32);
const _: () = assert!(core::mem::size_of::<ProcEvent>() == 56);
const _: () = assert!(PID_SLOTS.is_power_of_two());

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): plain-old-data: #[repr(C)], only integer fields, no padding
    // (asserted above).
    unsafe impl aya::Pod for super::CgroupStats {}
    unsafe impl aya::Pod for super::CpuSlice {}
    unsafe impl aya::Pod for super::PidStamp {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(runq_bucket(0), 0);
        assert_eq!(runq_bucket(4095), 0);
        assert_eq!(runq_bucket(4096), 1);
        assert_eq!(runq_bucket(8191), 1);
        assert_eq!(runq_bucket(8192), 2);
        assert_eq!(runq_bucket(1_000_000), 8); // 1 ms is in [2^19, 2^20) = [2^(11+8), 2^(12+8))
        assert_eq!(runq_bucket((1 << 30) - 1), 18);
        assert_eq!(runq_bucket(1 << 30), 19);
        assert_eq!(runq_bucket(u64::MAX), 19);
        for i in 1..RUNQ_BUCKETS {
            assert_eq!(runq_bucket(runq_bucket_floor_ns(i)), i);
            assert_eq!(runq_bucket(runq_bucket_floor_ns(i) - 1), i - 1);
        }
    }
}
