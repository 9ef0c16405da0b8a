//! `cargo xtask bench`: what cgsentry costs the machine it guards. Writes
//! BENCHMARKS.md and target/bench/results.json. Numbers, not pass/fail: targets are
//! printed beside them, and a miss is reported as one.
//!
//! 1. Context-switch throughput: `workload pingpong` (two processes pinned to CPU 0)
//!    with and without the agent attached, alternating runs, medians.
//! 2. Cost per program: `kernel.bpf_stats_enabled=1`, the agent attached, ping-pong and a
//!    fork/exec loop as load, then `bpftool prog show` `run_time_ns` / `run_cnt`.
//! 3. Agent cost: 1,000 cgroups and 10,000 parked processes (`workload park`), the agent
//!    at 1 s ticks printing JSON; CPU time and RSS from /proc over a window.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::cmd::{build_release_binaries, is_root, output, run, workspace_root};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Alternating ping-pong runs with and without the agent.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Seconds per ping-pong run.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Measurement window for the agent's own cost, seconds. The default spans one
    /// full /proc scan (every 300 ticks) so that its cost is in the average.
    #[arg(long, default_value_t = 300)]
    pub agent_window: u64,
    /// Cgroups and processes for the agent-cost run.
    #[arg(long, default_value_t = 1000)]
    pub cgroups: usize,
    #[arg(long, default_value_t = 10_000)]
    pub processes: usize,
}

fn release(bin: &str) -> PathBuf {
    workspace_root().join("target/release").join(bin)
}

/// The agent, attached and ticking (its first JSON line has arrived).
struct Agent {
    child: Child,
}

impl Agent {
    fn start(json: bool) -> Result<Self> {
        let mut child = Command::new(release("cgsentry"))
            .args(["run", "--interval", "1s"])
            .args(json.then_some("--json"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting cgsentry")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().is_some());
            // Keep draining so the agent never blocks on a full pipe.
            for _ in lines {}
        });
        if rx.recv_timeout(Duration::from_mins(1)) == Ok(true) {
            Ok(Self { child })
        } else {
            let _ = child.kill();
            bail!("cgsentry did not tick within 60 s (run it by hand to see why)")
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

fn pingpong(seconds: f64) -> Result<f64> {
    let out = output(Command::new(release("workload")).args([
        "pingpong",
        "--seconds",
        &seconds.to_string(),
    ]))
    .context("workload pingpong failed")?;
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    v["round_trips_per_s"]
        .as_f64()
        .context("no round_trips_per_s")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct BpfStatsGuard(String);

impl BpfStatsGuard {
    fn enable() -> Result<Self> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(path).context("reading bpf_stats_enabled")?;
        std::fs::write(path, "1").context("enabling bpf_stats")?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// (name, ns per event, events) of our programs, from `bpftool prog show -j`.
fn program_costs() -> Result<Vec<(String, f64, u64)>> {
    let names: Vec<String> = [
        "sched_switch",
        "sched_wakeup",
        "proc_fork",
        "proc_exec",
        "proc_exit",
        "reclaim_begin",
        "reclaim_end",
        "oom_mark_victim",
    ]
    .iter()
    .map(|n| n.chars().take(15).collect())
    .collect();
    let out = output(Command::new("bpftool").args(["prog", "show", "-j"]))
        .context("bpftool prog show failed")?;
    let progs: Vec<Value> = serde_json::from_str(&out)?;
    let mut costs: Vec<(String, f64, u64)> = progs
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            if !names.iter().any(|n| n == name) {
                return None;
            }
            let cnt = p["run_cnt"].as_u64().unwrap_or(0);
            let ns = p["run_time_ns"].as_u64().unwrap_or(0);
            Some((
                name.to_owned(),
                if cnt > 0 { ns as f64 / cnt as f64 } else { 0.0 },
                cnt,
            ))
        })
        .collect();
    costs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(costs)
}

fn cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// utime+stime (clock ticks) and `VmRSS` (KiB) of a process.
fn cpu_and_rss(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok((ticks, rss))
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear measurement script and its report"
)]
pub fn bench(args: &BenchArgs) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and creates cgroups: run it as root");
    }
    build_release_binaries()?;
    // A baseline "without programs" is only one if none of ours is loaded.
    let loaded = program_costs()?;
    if !loaded.is_empty() {
        bail!(
            "{} cgsentry programs are already loaded (another agent runs?): stop it first, \
             the baseline would be wrong",
            loaded.len()
        );
    }
    let mut md = String::new();
    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default();
    let _ = writeln!(
        md,
        "# cgsentry benchmarks\n\nMeasured by `cargo xtask bench` on {date}: kernel {kernel}, {cpus} CPUs.\nRe-run it to refresh this file; numbers vary a few percent between runs.\n"
    );

    // 1. Context-switch throughput.
    eprintln!(
        "bench: ping-pong, {} alternating runs of {} s",
        args.runs, args.seconds
    );
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        without.push(pingpong(args.seconds)?);
        let agent = Agent::start(true)?;
        with.push(pingpong(args.seconds)?);
        agent.stop();
        eprintln!(
            "bench:   run {}: {:.0} without, {:.0} with the agent (round trips/s)",
            i + 1,
            without.last().unwrap_or(&0.0),
            with.last().unwrap_or(&0.0)
        );
    }
    let (base, agent_rt) = (median(without.clone()), median(with.clone()));
    let ratio = agent_rt / base;
    let _ = writeln!(
        md,
        "## Context-switch throughput\n\nPipe ping-pong between two processes pinned to CPU 0 (each round trip: two switches, two wakeups), {} alternating runs of {} s, medians.\n",
        args.runs, args.seconds
    );
    let _ = writeln!(
        md,
        "| | round trips/s |\n|---|---|\n| no programs | {base:.0} |\n| cgsentry attached (all programs) | {agent_rt:.0} |\n| **ratio** | **{ratio:.3}** (target ≥ 0.92) |\n"
    );

    // 2. Cost per program.
    eprintln!("bench: cost per program (bpf_stats)");
    let costs = {
        let _stats = BpfStatsGuard::enable()?;
        let agent = Agent::start(true)?;
        pingpong(args.seconds)?;
        run(Command::new("sh").args([
            "-c",
            "i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done",
        ]))?;
        let costs = program_costs()?;
        agent.stop();
        costs
    };
    let _ = writeln!(
        md,
        "## Cost per program\n\n`kernel.bpf_stats_enabled=1` (run_time_ns / run_cnt), load: one ping-pong run and 2,000 fork+exec+exit.\n\n| program | ns/event | events |\n|---|---|---|"
    );
    for (name, ns, cnt) in &costs {
        let target = if name == "sched_switch" {
            " (target ≤ 100)"
        } else {
            ""
        };
        let _ = writeln!(md, "| {name} | {ns:.0}{target} | {cnt} |");
    }
    md.push('\n');

    // 3. Agent cost.
    eprintln!(
        "bench: agent cost with {} cgroups and {} processes, {} s window",
        args.cgroups, args.processes, args.agent_window
    );
    let park_root = cgroup_root().join("cgsentry-bench");
    let mut park = Command::new(release("workload"))
        .args(["park", "--root"])
        .arg(&park_root)
        .args([
            "--cgroups",
            &args.cgroups.to_string(),
            "--processes",
            &args.processes.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting workload park")?;
    let parked = BufReader::new(park.stdout.take().context("park stdout")?)
        .lines()
        .next()
        .is_some();
    let measure = |json: bool| -> Result<(f64, f64, f64)> {
        if !parked {
            bail!("workload park did not park its processes");
        }
        let agent = Agent::start(json)?;
        std::thread::sleep(Duration::from_secs(5)); // warm-up: first scans, caches
        let (t0, _) = cpu_and_rss(agent.pid())?;
        let start = Instant::now();
        let mut rss_max = 0;
        while start.elapsed() < Duration::from_secs(args.agent_window) {
            std::thread::sleep(Duration::from_secs(1));
            rss_max = rss_max.max(cpu_and_rss(agent.pid())?.1);
        }
        let (t1, rss) = cpu_and_rss(agent.pid())?;
        let secs = start.elapsed().as_secs_f64();
        agent.stop();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((
            (t1 - t0) as f64 / hz / secs * 100.0,
            rss as f64 / 1024.0,
            rss_max as f64 / 1024.0,
        ))
    };
    let table_mode = measure(false);
    let json_mode = measure(true);
    if let Ok(pid) = i32::try_from(park.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = park.wait();
    let (cpu_pct, rss_mib, rss_max_mib) = table_mode?;
    let (json_cpu, json_rss, json_rss_max) = json_mode?;
    let _ = writeln!(
        md,
        "## Agent cost\n\n{} cgroups, {} idle processes, 1 s ticks, output to a pipe, {} s window after 5 s warm-up.\n\n| output | CPU (% of one core) | RSS MiB end / max |\n|---|---|---|\n| table (normal operation) | {cpu_pct:.2} | {rss_mib:.1} / {rss_max_mib:.1} |\n| `--json`: whole Snapshot every tick | {json_cpu:.2} | {json_rss:.1} / {json_rss_max:.1} |\n| target | ≤ 0.5 | ≤ 25 |\n",
        args.cgroups, args.processes, args.agent_window
    );
    if cgroup_root().ends_with("unified") {
        let _ = writeln!(
            md,
            "This host's cgroup v2 is hybrid (`/sys/fs/cgroup/unified`, no memory or pids controller): the cgroups have no `memory.*`/`pids.*` files, so neither reading them nor the per-cgroup memory series is in these numbers. Detection, decisions and the state file are (`cgsentry run` as shipped, no policy files).\n"
        );
    }

    print!("{md}");
    std::fs::write(workspace_root().join("BENCHMARKS.md"), &md)?;
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let results = json!({
        "kernel": kernel, "cpus": cpus, "date": date,
        "pingpong": {"without": without, "with": with, "ratio": ratio},
        "programs": costs.iter().map(|(n, ns, c)| json!({"name": n, "ns_per_event": ns, "events": c})).collect::<Vec<_>>(),
        "agent": {"cgroups": args.cgroups, "processes": args.processes,
                  "table": {"cpu_percent": cpu_pct, "rss_mib": rss_mib, "rss_max_mib": rss_max_mib},
                  "json": {"cpu_percent": json_cpu, "rss_mib": json_rss, "rss_max_mib": json_rss_max}},
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    eprintln!("bench: wrote BENCHMARKS.md and target/bench/results.json");
    Ok(())
}
