//! cgsentry's kernel side. Tracepoints only (stable formats; field offsets come from
//! tracefs at load time, so one object serves 6.1 and 6.18).
//!
//! - `sched_switch` charges the time since the previous switch on this CPU to the
//!   cgroup of the task leaving it (`bpf_get_current_cgroup_id()`: at this tracepoint
//!   `current` is still the previous task), counts involuntary switches, and charges
//!   the leaving task's run-queue wait (measured when it was switched in).
//! - `sched_wakeup(_new)` and preemption stamp when a task became runnable.
//! - `sched_process_fork|exec|exit` count per cgroup and feed a ring buffer.
//! - `vmscan` direct/memcg reclaim begin/end measure reclaim stalls per cgroup.
//! - `oom:mark_victim` counts kernel OOM kills and reports the victim.
//!
//! Program names stay unique within 15 characters (the kernel's name length), so
//! `bpftool` and `bpf_stats` tell them apart.
//!
//! Every counter map is per-CPU: no atomics, no cache-line bouncing. Nothing is logged
//! per event: problems are counted in `STATS`, and only the first on a CPU is logged.
#![no_std]
#![no_main]
#![allow(
    clippy::inline_always,
    reason = "hot-path helpers: BPF-to-BPF calls cost more than inlining these few lines"
)]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::{map, tracepoint},
    maps::{Array, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use monitor_common::{
    CGROUP_STATS_MAX_ENTRIES, CgroupStats, CpuSlice, EVENT_VERSION, EVENTS_BYTES, EventHeader,
    EventKind, PID_SLOTS, PidStamp, ProcEvent, Stat, offsets, runq_bucket,
};

/// LRU: when full, a new cgroup evicts the least recently updated one instead of
/// being dropped (thousands of idle cgroups must not blind the agent to the next one).
#[map(name = "CGROUP_STATS")]
static CGROUP_STATS: LruPerCpuHashMap<u64, CgroupStats> =
    LruPerCpuHashMap::with_max_entries(CGROUP_STATS_MAX_ENTRIES, 0);

#[map(name = "CPU_SLICE")]
static CPU_SLICE: PerCpuArray<CpuSlice> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "WAKEUP")]
static WAKEUP: Array<PidStamp> = Array::with_max_entries(PID_SLOTS, 0);

#[map(name = "RECLAIM")]
static RECLAIM: Array<PidStamp> = Array::with_max_entries(PID_SLOTS, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

// Tracepoint field offsets, overridden by the loader (see `monitor_common::offsets`).
#[unsafe(no_mangle)]
static OFF_SWITCH_PREV_STATE: u32 = offsets::DEFAULT_SWITCH_PREV_STATE;
#[unsafe(no_mangle)]
static OFF_SWITCH_NEXT_PID: u32 = offsets::DEFAULT_SWITCH_NEXT_PID;
#[unsafe(no_mangle)]
static OFF_WAKEUP_PID: u32 = offsets::DEFAULT_WAKEUP_PID;
#[unsafe(no_mangle)]
static OFF_FORK_CHILD_PID: u32 = offsets::DEFAULT_FORK_CHILD_PID;
#[unsafe(no_mangle)]
static OFF_OOM_VICTIM_PID: u32 = offsets::DEFAULT_OOM_VICTIM_PID;

/// `BPF_NOEXIST`: a new cgroup's entry is added zeroed only if no other CPU added it
/// first (two CPUs can miss the lookup of the same new cgroup at once: the keys of a
/// per-CPU hash are shared); either way this CPU's slot is then updated through a
/// lookup. So each entry is counted once in [`Stat::CgroupInserts`], and the agent's
/// eviction count is exact.
const BPF_NOEXIST: u64 = 1;
/// `-EEXIST`: another CPU added the entry between our lookup and insert.
const EEXIST: i64 = -17;
/// `BPF_RB_NO_WAKEUP`: do not wake the reader on submit.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// `-E2BIG`: the map is full.
const E2BIG: i64 = -7;
/// Task state bits of `prev_state` (`TASK_REPORT`, with `TASK_REPORT_IDLE`): none set
/// means the task left the CPU while runnable, i.e. it was preempted.
const TASK_STATE_MASK: i64 = 0xff;

/// Reads a `u32` global the loader may have overridden (volatile: not folded by LLVM).
#[inline(always)]
fn global(g: &'static u32) -> usize {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(g) as usize }
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: usize) -> Result<T, Stat> {
    // SAFETY: bpf_probe_read_kernel of the tracepoint record; a bad offset fails cleanly.
    unsafe { ctx.read_at::<T>(offset) }.map_err(|_| Stat::ReadError)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Low 32 bits: thread id; high: process id.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "splitting the helper's u64"
)]
fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    (id as u32, (id >> 32) as u32)
}

/// Applies `f` to this CPU's stats of `cgroup`, creating the entry when missing.
#[inline(always)]
fn with_stats(cgroup: u64, f: impl FnOnce(&mut CgroupStats)) -> Result<(), Stat> {
    if let Some(value) = CGROUP_STATS.get_ptr_mut(cgroup) {
        // SAFETY: this CPU's copy of a per-CPU value; preemption is off in tracepoints.
        f(unsafe { &mut *value });
        return Ok(());
    }
    // The new-entry path only (rare): the agent counts evictions from the inserts.
    match CGROUP_STATS.insert(cgroup, CgroupStats::default(), BPF_NOEXIST) {
        Ok(()) => {
            count(Stat::CgroupInserts);
        }
        Err(e) if i64::from(e) == EEXIST => {}
        Err(e) if i64::from(e) == E2BIG => return Err(Stat::CgroupMapFull),
        Err(_) => return Err(Stat::UpdateError),
    }
    let value = CGROUP_STATS.get_ptr_mut(cgroup).ok_or(Stat::UpdateError)?;
    // SAFETY: as above.
    f(unsafe { &mut *value });
    Ok(())
}

#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
fn slot(map: &Array<PidStamp>, pid: u32) -> Option<*mut PidStamp> {
    map.get_ptr_mut(pid & (PID_SLOTS - 1))
}

/// Stamps `pid` with `ts` in a pid-indexed array.
#[inline(always)]
fn stamp(map: &Array<PidStamp>, pid: u32, ts: u64) {
    if let Some(s) = slot(map, pid) {
        // SAFETY: a valid array element; a concurrent writer of the same slot loses
        // one sample at worst.
        unsafe {
            (*s).ts_ns = ts;
            (*s).pid = pid;
        }
    }
}

/// Takes `pid`'s stamp: the time since it, if the slot still holds this pid.
#[inline(always)]
fn take_stamp(map: &Array<PidStamp>, pid: u32, now: u64) -> Option<u64> {
    let s = slot(map, pid)?;
    // SAFETY: as in `stamp`.
    unsafe {
        if (*s).pid != pid || (*s).ts_ns == 0 {
            return None;
        }
        let since = (*s).ts_ns;
        (*s).ts_ns = 0;
        now.checked_sub(since)
    }
}

/// Bumps a counter; returns its new value on this CPU.
#[inline(always)]
fn count(stat: Stat) -> u64 {
    match STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        Some(counter) => unsafe {
            *counter += 1;
            *counter
        },
        None => 0,
    }
}

/// Counts a problem; the first one on a CPU is worth one line in the agent's log.
fn report(ctx: &TracePointContext, stat: Stat) -> u32 {
    if count(stat) == 1 {
        match stat {
            Stat::CgroupMapFull => warn!(ctx, "cgroup map full: data of new cgroups is dropped"),
            Stat::ClockBackwards => warn!(ctx, "clock went backwards between two switches"),
            Stat::ReadError => warn!(ctx, "a tracepoint record was unreadable"),
            Stat::UpdateError => warn!(ctx, "a cgroup map update failed"),
            Stat::EventsLost => warn!(ctx, "lifecycle ring buffer full: events lost"),
            Stat::OomVictims | Stat::CgroupInserts => {}
        }
    }
    0
}

macro_rules! entry {
    ($name:ident, $try:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            match $try(&ctx) {
                Ok(()) => 0,
                Err(stat) => report(&ctx, stat),
            }
        }
    };
}

entry!(sched_switch, try_sched_switch_direct);
entry!(sched_switch_p, try_sched_switch_probed);
entry!(sched_wakeup, try_sched_wakeup_direct);
entry!(sched_wakeup_p, try_sched_wakeup_probed);
entry!(proc_fork, try_fork);
entry!(proc_exec, try_exec);
entry!(proc_exit, try_exit);
entry!(reclaim_begin, try_reclaim_begin);
entry!(reclaim_end, try_reclaim_end);
entry!(oom_mark_victim, try_oom_mark_victim);

/// How a program reads its tracepoint fields. [`Direct`] loads at compile-time offsets
/// straight from the record (one instruction each; the verifier accepts only constant
/// ctx offsets); [`Probed`] reads at the offsets the loader found in tracefs, through
/// `bpf_probe_read_kernel`. The loader attaches the direct programs only when this
/// kernel's formats have the compiled offsets (6.1 and 6.18 do).
trait Fields {
    fn switch(ctx: &TracePointContext) -> Result<(u32, i64), Stat>;
    fn wakeup_pid(ctx: &TracePointContext) -> Result<u32, Stat>;
}

struct Direct;
struct Probed;

impl Fields for Direct {
    #[inline(always)]
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "the record is 8-byte aligned and the offsets (32, 56) are aligned to their fields"
    )]
    fn switch(ctx: &TracePointContext) -> Result<(u32, i64), Stat> {
        let base = ctx.as_ptr().cast::<u8>();
        // SAFETY: constant offsets inside the sched_switch record (checked by the loader
        // against tracefs before it attaches this program; bounds-checked by the verifier).
        unsafe {
            let next_pid = base
                .add(offsets::DEFAULT_SWITCH_NEXT_PID as usize)
                .cast::<u32>()
                .read();
            let prev_state = base
                .add(offsets::DEFAULT_SWITCH_PREV_STATE as usize)
                .cast::<i64>()
                .read();
            Ok((next_pid, prev_state))
        }
    }

    #[inline(always)]
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "the record is 8-byte aligned and offset 24 is 4-byte aligned"
    )]
    fn wakeup_pid(ctx: &TracePointContext) -> Result<u32, Stat> {
        // SAFETY: as above, for the sched_wakeup record.
        Ok(unsafe {
            ctx.as_ptr()
                .cast::<u8>()
                .add(offsets::DEFAULT_WAKEUP_PID as usize)
                .cast::<u32>()
                .read()
        })
    }
}

impl Fields for Probed {
    #[inline(always)]
    fn switch(ctx: &TracePointContext) -> Result<(u32, i64), Stat> {
        Ok((
            read(ctx, global(&OFF_SWITCH_NEXT_PID))?,
            read(ctx, global(&OFF_SWITCH_PREV_STATE))?,
        ))
    }

    #[inline(always)]
    fn wakeup_pid(ctx: &TracePointContext) -> Result<u32, Stat> {
        read(ctx, global(&OFF_WAKEUP_PID))
    }
}

fn try_sched_switch_direct(ctx: &TracePointContext) -> Result<(), Stat> {
    sched_switch_impl::<Direct>(ctx)
}

fn try_sched_switch_probed(ctx: &TracePointContext) -> Result<(), Stat> {
    sched_switch_impl::<Probed>(ctx)
}

fn try_sched_wakeup_direct(ctx: &TracePointContext) -> Result<(), Stat> {
    stamp(&WAKEUP, Direct::wakeup_pid(ctx)?, now());
    Ok(())
}

fn try_sched_wakeup_probed(ctx: &TracePointContext) -> Result<(), Stat> {
    stamp(&WAKEUP, Probed::wakeup_pid(ctx)?, now());
    Ok(())
}

#[inline(always)]
fn sched_switch_impl<F: Fields>(ctx: &TracePointContext) -> Result<(), Stat> {
    let now = now();
    let (next_pid, prev_state) = F::switch(ctx)?;
    let slice = CPU_SLICE.get_ptr_mut(0).ok_or(Stat::ReadError)?;
    let next_wait = if next_pid == 0 {
        0
    } else {
        take_stamp(&WAKEUP, next_pid, now).unwrap_or(0)
    };
    // SAFETY: this CPU's value of a per-CPU array; preemption is off in tracepoints.
    let (start, prev_wait) = unsafe {
        let old = ((*slice).start_ns, (*slice).wait_ns);
        (*slice).start_ns = now;
        (*slice).wait_ns = next_wait;
        (*slice).pid = next_pid;
        old
    };
    let (prev_pid, _) = current_ids();
    if start == 0 || prev_pid == 0 {
        return Ok(()); // first switch seen on this CPU, or the idle task left
    }
    let delta = now.checked_sub(start).ok_or(Stat::ClockBackwards)?;
    let preempted = prev_state & TASK_STATE_MASK == 0;
    if preempted {
        stamp(&WAKEUP, prev_pid, now); // back on the run queue right now
    }
    with_stats(current_cgroup(), |s| {
        s.on_cpu_ns += delta;
        s.switches += 1;
        s.involuntary += u64::from(preempted);
        if prev_wait != 0 {
            s.runq_wait_ns += prev_wait;
            s.runq_waits += 1;
            if let Some(b) = s.runq_hist.get_mut(runq_bucket(prev_wait)) {
                *b += 1;
            }
        }
    })
}

/// Sends a lifecycle event; a full ring buffer is counted, never waited for.
fn emit(kind: EventKind, other_pid: u32) -> Result<(), Stat> {
    let (pid, tgid) = current_ids();
    let event = ProcEvent {
        header: EventHeader {
            kind: kind as u32,
            version: EVENT_VERSION,
            ts_ns: now(),
            cgroup: current_cgroup(),
            pid,
            tgid,
        },
        other_pid,
        padding: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    let mut entry = EVENTS.reserve::<ProcEvent>(0).ok_or(Stat::EventsLost)?;
    entry.write(event);
    // The agent drains the buffer every tick: waking it per event would cost more
    // than the event itself.
    entry.submit(BPF_RB_NO_WAKEUP);
    Ok(())
}

fn try_fork(ctx: &TracePointContext) -> Result<(), Stat> {
    let child: u32 = read(ctx, global(&OFF_FORK_CHILD_PID))?;
    // Counted first: a fork storm stays visible even when the ring buffer overflows.
    with_stats(current_cgroup(), |s| s.forks += 1)?;
    emit(EventKind::Fork, child)
}

fn try_exec(_ctx: &TracePointContext) -> Result<(), Stat> {
    with_stats(current_cgroup(), |s| s.execs += 1)?;
    emit(EventKind::Exec, 0)
}

fn try_exit(_ctx: &TracePointContext) -> Result<(), Stat> {
    let (pid, tgid) = current_ids();
    if pid != tgid {
        return Ok(()); // a thread, not the process
    }
    with_stats(current_cgroup(), |s| s.exits += 1)?;
    emit(EventKind::Exit, 0)
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "the entry! macro takes fallible handlers"
)]
fn try_reclaim_begin(_ctx: &TracePointContext) -> Result<(), Stat> {
    let (pid, _) = current_ids();
    stamp(&RECLAIM, pid, now());
    Ok(())
}

fn try_reclaim_end(_ctx: &TracePointContext) -> Result<(), Stat> {
    let (pid, _) = current_ids();
    let Some(stall) = take_stamp(&RECLAIM, pid, now()) else {
        return Ok(()); // began before we attached, or the slot was reused
    };
    with_stats(current_cgroup(), |s| {
        s.reclaim_ns += stall;
        s.reclaims += 1;
    })
}

fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<(), Stat> {
    count(Stat::OomVictims);
    let victim: u32 = read(ctx, global(&OFF_OOM_VICTIM_PID))?;
    emit(EventKind::OomVictim, victim)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
