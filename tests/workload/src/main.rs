//! `workload`: behaviours cgsentry must see and contain, each parameterised and
//! printing JSON status lines, plus `vm-run`, the in-VM scenario runner.
use std::path::PathBuf;

use anyhow::Result;
use cgsentry_workload::{behaviours, keeper, runner};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "workload",
    about = "Test workloads for cgsentry (VM scenarios and host tests)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Grow memory steadily and never free it.
    Leak {
        /// Growth rate; 0 = as fast as possible.
        #[arg(long, default_value_t = 50.0)]
        mib_per_s: f64,
        /// Allocation step.
        #[arg(long, default_value_t = 4)]
        chunk_mib: usize,
        /// Stop growing here (0 = never) and hold.
        #[arg(long, default_value_t = 0)]
        max_mib: usize,
    },
    /// Burn CPU in busy loops.
    Spin {
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Run time; 0 = until SIGTERM.
        #[arg(long, default_value_t = 0.0)]
        seconds: f64,
    },
    /// Incident D: a process pool handed far more work than the machine holds, at once.
    PoolExplosion {
        #[arg(long, default_value_t = 200)]
        jobs: usize,
        /// Arguments of each job, allocated up front by the parent (the queue).
        #[arg(long, default_value_t = 20)]
        mib_each: usize,
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// How long one job takes (a worker holds its working memory that long). Jobs
        /// that take real time are what lets the queue outgrow the machine.
        #[arg(long, default_value_t = 2000)]
        hold_ms: u64,
    },
    /// A legitimate rise then plateau (compiler, model load), then exit 0.
    Spike {
        #[arg(long)]
        to: usize,
        #[arg(long, default_value_t = 2.0)]
        rise_s: f64,
        #[arg(long, default_value_t = 10.0)]
        hold_s: f64,
    },
    /// The "did the machine freeze" meter: allocate and touch fresh memory every
    /// period, report the largest gap between beats.
    Heartbeat {
        #[arg(long, default_value_t = 100)]
        period_ms: u64,
        #[arg(long, default_value_t = 4)]
        mib: usize,
    },
    /// Context-switch throughput: two processes pinned to CPU 0 ping-pong a byte.
    Pingpong {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Park idle processes across many cgroups until SIGTERM (agent cost benchmark).
    Park {
        /// Parent directory of the cgroups to create (inside a cgroup v2 mount).
        #[arg(long)]
        root: PathBuf,
        #[arg(long, default_value_t = 1000)]
        cgroups: usize,
        #[arg(long, default_value_t = 10_000)]
        processes: usize,
    },
    /// Create COUNT cgroups under ROOT, each entered once by a short-lived process,
    /// then exit 0 (fills a per-cgroup eBPF map as any delegated user could).
    CgroupFlood {
        /// Parent directory of the cgroups (inside a cgroup v2 mount).
        #[arg(long)]
        root: PathBuf,
        #[arg(long, default_value_t = 4200)]
        count: usize,
    },
    /// Hold COUNT idle TCP connections to ADDR, reopening closed ones, until SIGTERM.
    ConnFlood {
        #[arg(long, default_value = "127.0.0.1:9464")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Run a scenario file inside the VM and print `RESULT {json}`.
    VmRun { scenario: PathBuf },
    /// In the VM, before anything else: hold every tracepoint of SUBSYSTEMS open and
    /// CFS bandwidth on until power-off, so that no kernel text is patched mid-scenario
    /// (it can wedge QEMU's multi-threaded TCG; see the source).
    KeepTracepoints {
        #[arg(required = true)]
        subsystems: Vec<String>,
        #[arg(long, default_value = "/sys/kernel/tracing")]
        tracefs: PathBuf,
        /// The capped, empty cgroup that keeps CFS bandwidth in use.
        #[arg(long, default_value = "/sys/fs/cgroup/vm-keeper")]
        cgroup: PathBuf,
    },
}

fn main() -> Result<()> {
    behaviours::install_stop_handler();
    let command = Cli::parse().command;
    let runner = matches!(command, Cmd::VmRun { .. });
    run(command)?;
    // A behaviour stopped by SIGTERM/SIGINT (a guard such as earlyoom killing it) did
    // not finish: say so in the exit status, as a default handler would have (128 + 15),
    // so that the runner does not count it as having survived.
    if !runner && behaviours::stopping() {
        std::process::exit(143);
    }
    Ok(())
}

fn run(command: Cmd) -> Result<()> {
    match command {
        Cmd::Leak {
            mib_per_s,
            chunk_mib,
            max_mib,
        } => behaviours::leak(mib_per_s, chunk_mib.max(1), max_mib),
        Cmd::Spin { threads, seconds } => {
            behaviours::spin(threads, seconds);
            Ok(())
        }
        Cmd::PoolExplosion {
            jobs,
            mib_each,
            workers,
            hold_ms,
        } => behaviours::pool_explosion(jobs, mib_each, workers, hold_ms),
        Cmd::Spike { to, rise_s, hold_s } => behaviours::spike(to, rise_s, hold_s),
        Cmd::Heartbeat { period_ms, mib } => behaviours::heartbeat(period_ms, mib.max(1)),
        Cmd::Pingpong { seconds } => behaviours::pingpong(seconds),
        Cmd::Park {
            root,
            cgroups,
            processes,
        } => behaviours::park(&root, cgroups, processes),
        Cmd::CgroupFlood { root, count } => behaviours::cgroup_flood(&root, count),
        Cmd::ConnFlood { addr, count } => behaviours::conn_flood(addr, count),
        Cmd::VmRun { scenario } => runner::vm_run(&scenario),
        Cmd::KeepTracepoints {
            subsystems,
            tracefs,
            cgroup,
        } => keeper::keep(&tracefs, &subsystems, &cgroup),
    }
}
