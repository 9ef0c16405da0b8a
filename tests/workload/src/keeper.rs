//! Holds the guest kernel's tracepoints and CFS bandwidth enabled for the VM's life, so
//! that nothing a scenario does patches kernel text while the other vCPU runs it.
//!
//! Why: under QEMU's multi-threaded TCG a guest that live-patches its own code can wedge.
//! Caught in the act (vCPUs sampled through QEMU's monitor, addresses resolved with the
//! kernel's own kallsyms): one vCPU looping in `asm_exc_int3` — the breakpoint that
//! `text_poke_bp` plants while it rewrites a jump label or static call — and the other
//! spinning in `native_queued_spin_lock_slowpath`; then RCU stalls, and silence. It
//! happened when the agent's programs detached (the last probe leaving a tracepoint flips
//! its static key and static call) and at a first `cpu.max` write (the
//! `__cfs_bandwidth_used` key). A perf event held open on every tracepoint of the
//! subsystems the agent attaches to keeps each one's perf probe registered, so the
//! agent's attach and detach only add or remove a program on an already-live probe; a
//! capped, empty cgroup keeps CFS bandwidth on. A real machine does not need any of it.
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// The fields of `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER0` (64 bytes), the
/// oldest layout every kernel accepts; all zero but type, size and config: a counting
/// event, never sampled, never read.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// Opens a counting perf event on the tracepoint with id `id`, bound to this process
/// (pid 0, any CPU); the descriptor is left open for the process's life.
fn hold(id: u64) -> std::io::Result<()> {
    let attr = PerfEventAttrV0 {
        kind: PERF_TYPE_TRACEPOINT,
        size: u32::try_from(std::mem::size_of::<PerfEventAttrV0>()).unwrap_or(64),
        config: id,
        ..PerfEventAttrV0::default()
    };
    // SAFETY: a valid attr of the size it declares; the returned fd is never closed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Holds every tracepoint of `subsystems` (under `tracefs/events/`) open.
///
/// # Errors
/// A subsystem has no events, or none could be held.
pub fn hold_tracepoints(tracefs: &Path, subsystems: &[String]) -> Result<usize> {
    let mut held = 0;
    let mut failed = Vec::new();
    for sub in subsystems {
        let dir = tracefs.join("events").join(sub);
        let entries = std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))?;
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("id")) else {
                continue; // `enable`, `filter`: files, not events
            };
            let name = format!("{sub}/{}", e.file_name().to_string_lossy());
            match text.trim().parse::<u64>().map(hold) {
                Ok(Ok(())) => held += 1,
                Ok(Err(err)) => failed.push(format!("{name}: {err}")),
                Err(err) => failed.push(format!("{name}: id {err}")),
            }
        }
    }
    if held == 0 {
        bail!("no tracepoint held: {}", failed.join("; "));
    }
    for f in failed {
        eprintln!("keep-tracepoints: not held: {f}");
    }
    Ok(held)
}

/// Creates `cgroup` (absolute path) with a `cpu.max` quota: CFS bandwidth is then in use
/// for as long as it exists.
///
/// # Errors
/// The cgroup cannot be made or capped.
pub fn hold_cfs_bandwidth(cgroup: &Path) -> Result<()> {
    std::fs::create_dir_all(cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    std::fs::write(cgroup.join("cpu.max"), "1000000 1000000")
        .with_context(|| format!("capping {}", cgroup.display()))
}

/// Holds both, says what it holds, and sleeps until the VM powers off.
///
/// # Errors
/// Nothing could be held.
pub fn keep(tracefs: &Path, subsystems: &[String], cgroup: &Path) -> Result<()> {
    let held = hold_tracepoints(tracefs, subsystems)?;
    hold_cfs_bandwidth(cgroup)?;
    println!(
        "vm-run: keeper: {held} tracepoints of {} held open, CFS bandwidth on ({})",
        subsystems.join(", "),
        cgroup.display()
    );
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attr is the kernel's version-0 layout.
    #[test]
    fn attr_is_version_0() {
        assert_eq!(std::mem::size_of::<PerfEventAttrV0>(), 64);
    }

    /// On a host with tracefs and the right to trace, a tracepoint is held; a missing
    /// subsystem is an error, not silence.
    #[test]
    fn holds_what_exists_and_says_what_does_not() {
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("events/sched").is_dir() {
            eprintln!("no tracefs here: only the error path is checked");
        } else if let Ok(n) = hold_tracepoints(tracefs, &["sched".into()]) {
            assert!(n > 5, "{n}");
        }
        let err = hold_tracepoints(tracefs, &["no-such-subsystem".into()]).unwrap_err();
        assert!(err.to_string().contains("no-such-subsystem"), "{err}");
    }
}
