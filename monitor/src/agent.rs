//! `cgsentry run`: preflight, load, then one snapshot per tick until a signal or
//! `--ticks` ends it. Dropping the collector detaches every program.
use std::io::Write as _;

use anyhow::{Context as _, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::MissedTickBehavior,
};
use tracing::{info, warn};

use crate::{
    cgroupfs::{CgroupIndex, CgroupReader},
    cli::RunArgs,
    collect::{CollectOptions, Collector},
    preflight,
    probes::{LoadOptions, Probes},
    report,
};

/// Runs the agent until SIGINT/SIGTERM or `--ticks`.
///
/// # Errors
/// Preflight or loading failed (the message says what to do), or stdout closed.
pub async fn run(args: RunArgs) -> Result<()> {
    let env = preflight::prepare()?;
    let options = LoadOptions {
        cgroup_map_capacity: args.cgroup_map_capacity,
    };
    let mut probes = Probes::load(&env, options)?;
    spawn_ebpf_logger(&mut probes);
    let index = CgroupIndex::new(CgroupReader::new(&env.cgroup_root));
    let collect_options = CollectOptions {
        proc_scan_every: args.proc_scan_every,
    };
    let mut collector = Collector::new(probes, index, "/proc", collect_options);

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate: skip it so tick 1 spans an interval

    let mut done = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = sigint.recv() => { info!("SIGINT: stopping"); break }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break }
        }
        let snap = match collector.collect() {
            Ok(s) => s,
            Err(e) => {
                warn!("tick skipped: {e}");
                continue;
            }
        };
        let text = if args.json {
            report::json(&snap)? + "\n"
        } else {
            report::table(&snap, args.top) + "\n"
        };
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                info!("stdout closed: stopping");
                break;
            }
            return Err(e).context("writing to stdout");
        }
        done += 1;
        if args.ticks.is_some_and(|n| done >= n) {
            break;
        }
    }
    drop(collector);
    info!("eBPF programs detached");
    Ok(())
}

/// Drains aya-log records of the eBPF side (rare conditions only) into our log.
/// The logger must live as long as the programs: it owns the ring buffer's fd.
fn spawn_ebpf_logger(probes: &mut Probes) {
    let logger = match aya_log::EbpfLogger::init(probes.ebpf_mut()) {
        Ok(l) => l,
        Err(e) => {
            warn!("eBPF log not available: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for
    // as long as the logger lives, and the AsyncFd owns the logger.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log not available: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("eBPF log reader stopped: {e}");
                    return;
                }
            }
        }
    });
}
