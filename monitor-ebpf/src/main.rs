//! cgsentry's kernel side. Tracepoints only (stable formats: one object for 6.1 and 6.18).
//!
//! `sched:sched_switch` charges the time since the previous switch on this CPU to the
//! cgroup of the task leaving it (`bpf_get_current_cgroup_id()`: at this tracepoint,
//! `current` is still the previous task). Every map is per-CPU: no atomics, no
//! cross-CPU cache-line bouncing on the hottest path of the kernel. Nothing is logged
//! per event: drops are counted in `STATS`, and only the first drop on a CPU is logged.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use monitor_common::{CGROUP_CPU_MAX_ENTRIES, CgroupCpu, CpuSlice, DEFAULT_NEXT_PID_OFFSET, Stat};

#[map(name = "CGROUP_CPU")]
static CGROUP_CPU: PerCpuHashMap<u64, CgroupCpu> =
    PerCpuHashMap::with_max_entries(CGROUP_CPU_MAX_ENTRIES, 0);

#[map(name = "CPU_SLICE")]
static CPU_SLICE: PerCpuArray<CpuSlice> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Set by the loader from tracefs' `sched_switch/format` (see `monitor-common`).
#[unsafe(no_mangle)]
static NEXT_PID_OFFSET: u32 = DEFAULT_NEXT_PID_OFFSET;

/// `BPF_ANY`. Two CPUs can miss the lookup of the same new cgroup at once (the keys of a
/// per-CPU hash are shared): with `BPF_NOEXIST` the second insert would fail. From a
/// program, an update of a per-CPU hash writes only this CPU's slot, so `BPF_ANY` is
/// right in that race too: the other CPU's slot keeps its own value.
const BPF_ANY: u64 = 0;
/// `-E2BIG`: the map is full.
const E2BIG: i64 = -7;

#[tracepoint(category = "sched", name = "sched_switch")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[tracepoint] macro's signature"
)]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    match try_sched_switch(&ctx) {
        Ok(()) => 0,
        Err(stat) => {
            // The first occurrence on a CPU is worth one line in the agent's log.
            if count(stat) == 1 {
                match stat {
                    Stat::CgroupMapFull => warn!(
                        &ctx,
                        "sched_switch: cgroup map full, CPU time of new cgroups is dropped"
                    ),
                    Stat::ClockBackwards => warn!(&ctx, "sched_switch: clock went backwards"),
                    Stat::ReadError => warn!(&ctx, "sched_switch: tracepoint record unreadable"),
                    Stat::UpdateError => warn!(&ctx, "sched_switch: cgroup map update failed"),
                }
            }
            0
        }
    }
}

fn try_sched_switch(ctx: &TracePointContext) -> Result<(), Stat> {
    let now = unsafe { bpf_ktime_get_ns() };
    let offset = unsafe { core::ptr::read_volatile(&raw const NEXT_PID_OFFSET) };
    let next_pid: u32 = unsafe { ctx.read_at(offset as usize) }.map_err(|_| Stat::ReadError)?;
    let slice = CPU_SLICE.get_ptr_mut(0).ok_or(Stat::ReadError)?;
    // SAFETY: per-CPU value of a per-CPU array; preemption is off in tracepoints.
    let start = unsafe { (*slice).start_ns };
    unsafe {
        (*slice).start_ns = now;
        (*slice).pid = next_pid;
    }
    if start == 0 {
        return Ok(()); // first switch seen on this CPU: nothing to charge yet
    }
    // The low 32 bits are the thread id; 0 is the idle task, whose time is not charged.
    #[expect(clippy::cast_possible_truncation, reason = "low half is the thread id")]
    let prev_pid = bpf_get_current_pid_tgid() as u32;
    if prev_pid == 0 {
        return Ok(());
    }
    let delta = now.checked_sub(start).ok_or(Stat::ClockBackwards)?;
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if let Some(value) = CGROUP_CPU.get_ptr_mut(cgroup) {
        // SAFETY: this CPU's copy of a per-CPU value; preemption is off in tracepoints.
        unsafe {
            (*value).on_cpu_ns += delta;
            (*value).switches += 1;
        }
        return Ok(());
    }
    let value = CgroupCpu {
        on_cpu_ns: delta,
        switches: 1,
    };
    CGROUP_CPU.insert(cgroup, value, BPF_ANY).map_err(|e| {
        if i64::from(e) == E2BIG {
            Stat::CgroupMapFull
        } else {
            Stat::UpdateError
        }
    })
}

/// Bumps a health counter; returns its new value on this CPU.
fn count(stat: Stat) -> u64 {
    match STATS.get_ptr_mut(stat as u32) {
        Some(counter) => unsafe {
            *counter += 1;
            *counter
        },
        None => 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
