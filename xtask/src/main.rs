//! `cargo xtask`: everything that *runs* things for cgsentry (aya-template convention:
//! building the eBPF object is monitor/build.rs's job, not ours).
mod bench;
mod cmd;
mod debian;
mod install;
mod setup;
mod vm;
mod wedge;

use std::{ffi::OsString, process::Command};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::cmd::{as_root, cargo, is_root, run, workspace_root};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test cgsentry",
    long_about = "Build, run and test cgsentry.\n\n\
        Every command installs what it needs first (`setup`), so on a fresh machine\n\
        `cargo xtask test` and `cargo xtask run` work alone."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing needs: Debian packages (bpftool, qemu,
    /// busybox, cpio), nightly rust-src and bpf-linker. Idempotent.
    Setup {
        /// Only report what is missing; exit non-zero if anything is.
        #[arg(long)]
        check: bool,
    },
    /// Build the agent (release), with its eBPF programs embedded.
    Build,
    /// Build and run `cgsentry run` as root (re-executed through sudo when not root).
    /// Arguments after `--` go to `cgsentry run`, e.g. `cargo xtask run -- --top 5 --json`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// README's test command: fmt, clippy (agent and eBPF), unit tests (with the fake
    /// NVML), the real-NVML test (skipped, saying so, without a GPU), the host
    /// integration tests as root, then the VM scenarios.
    Test {
        /// Skip the host integration tests (they need root and an eBPF-capable kernel).
        #[arg(long)]
        no_host: bool,
        /// Skip the VM scenarios (`vm-test`).
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot a pure cgroup v2 kernel under QEMU and run scenarios from tests/scenarios/
    /// (all by default), checking each one's expectations.
    VmTest(vm::VmTestArgs),
    /// Measure what cgsentry costs: context-switch throughput with/without its programs,
    /// ns per program run, agent CPU and RSS at 1,000 cgroups / 10,000 processes.
    /// Writes BENCHMARKS.md. Needs root.
    Bench(bench::BenchArgs),
    /// Install cgsentry for good: the release binary in /usr/local/sbin, /etc/cgsentry
    /// with the shipped policies (never overwriting edited ones), the systemd service
    /// (`OOMScoreAdjust=-1000`, bounded CPU/memory, reduced capabilities, `ProtectSystem`)
    /// and the quarantine slice; then enable and start it. `--uninstall` removes it.
    #[command(after_help = "Examples:\n  sudo -E cargo xtask install\n  \
cargo xtask install --root /tmp/pkgroot --no-systemctl   # staging for a package\n  \
sudo -E cargo xtask install --uninstall [--purge]")]
    Install(install::InstallArgs),
}

/// A main file (under target/) whose policy directory is the repository's `policies/`.
fn shipped_config() -> Result<std::path::PathBuf> {
    let dir = workspace_root().join("target/xtask-run");
    std::fs::create_dir_all(&dir)?;
    let main = dir.join("cgsentry.toml");
    std::fs::write(
        &main,
        format!(
            "# Written by `cargo xtask run` when /etc/cgsentry has no configuration.\n\
             policies_dir = {:?}\n",
            workspace_root().join("policies").display().to_string()
        ),
    )?;
    Ok(main)
}

fn main() -> std::process::ExitCode {
    // Our own error printing: a failed step is a message, not a backtrace.
    match run_task(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Install(args) => install::install(&args),
        Task::Setup { check } => setup::setup(check),
        Task::Build => build(),
        Task::Run { args } => {
            build()?;
            let bin = workspace_root().join("target/release/cgsentry");
            let mut cmd = as_root(bin);
            cmd.arg("run");
            // A first run guards: with no configuration of this machine's own, the
            // repository's shipped policies (not an agent that only watches).
            if !args.iter().any(|a| {
                a.to_str()
                    .is_some_and(|a| a == "--config" || a.starts_with("--config="))
            }) && !std::path::Path::new("/etc/cgsentry/cgsentry.toml").exists()
            {
                let main = shipped_config()?;
                eprintln!(
                    "xtask: no /etc/cgsentry: running the repository's shipped policies \
                     ({}/policies; `cargo xtask install` puts them in /etc)",
                    workspace_root().display()
                );
                cmd.arg("--config").arg(main);
            }
            cmd.args(args);
            let status = cmd::status(&mut cmd)?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { no_host, no_vm } => test(no_host, no_vm),
        Task::Bench(args) => {
            setup::ensure()?;
            bench::bench(&args)
        }
        Task::VmTest(args) => {
            setup::ensure()?;
            vm::vm_test(&args)
        }
    }
}

fn build() -> Result<()> {
    setup::ensure()?;
    run(cargo().args(["build", "--release", "--package", "monitor"]))
}

fn test(no_host: bool, no_vm: bool) -> Result<()> {
    setup::ensure()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    clippy_ebpf()?;
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--lib",
        "--bins",
    ]))?;
    // The real-NVML test: runs where a GPU is, and prints why it skipped where none is.
    run(cargo().args([
        "test",
        "--package",
        "monitor",
        "--test",
        "gpu",
        "--",
        "--nocapture",
    ]))?;
    if no_host {
        eprintln!("xtask: host integration tests skipped (--no-host)");
    } else {
        // Kernel tests are serial: they share the machine's cgroup tree and BPF programs.
        let host = [
            "test",
            "--package",
            "monitor",
            "--test",
            "host",
            "--",
            "--test-threads=1",
        ];
        if is_root() {
            run(cargo().args(host))?;
        } else {
            let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(as_root(cargo_bin).current_dir(workspace_root()).args(host))?;
        }
    }
    if no_vm {
        eprintln!("xtask: VM scenarios skipped (--no-vm)");
        return Ok(());
    }
    vm::vm_test(&vm::VmTestArgs {
        scenarios: Vec::new(),
        repeat: 1,
        mem: None,
        keep_logs: None,
        tcg_threads: vm::DEFAULT_TCG,
        agent: None,
        policies: None,
    })
}

/// Clippy on the eBPF crate, for its own target: nightly, bpfel, `-Z build-std=core`,
/// in its own target directory so it never fights the main build for the lock.
fn clippy_ebpf() -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace_root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "monitor-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"]);
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    if run(&mut cmd).is_err() {
        bail!("clippy found problems in monitor-ebpf (see above)");
    }
    Ok(())
}
