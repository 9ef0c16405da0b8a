//! `cargo xtask bench`: what cgsentry costs the machine it guards. Writes
//! BENCHMARKS.md and target/bench/results.json. Numbers, not pass/fail: targets are
//! printed beside them, and a miss is reported as one.
//!
//! 1. Context-switch throughput: `workload pingpong` (two processes pinned to CPU 0)
//!    with no programs, with the agent attached, and with the reference: a bpftrace
//!    one-liner counting `sched_switch` per cgroup. Alternating runs, medians.
//! 2. Cost per program: `kernel.bpf_stats_enabled=1`, the agent attached, ping-pong and a
//!    fork/exec loop as load, then `bpftool prog show` `run_time_ns` / `run_cnt`; the
//!    bpftrace one-liner the same way.
//! 3. Agent cost: 10, 100 and 1,000 cgroups with 10,000 parked processes (`workload
//!    park`), the agent at 1 s ticks; CPU time and RSS from /proc over a window, and how
//!    they grow with the number of cgroups (least-squares slope).
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
    /// Cgroup counts for the agent-cost runs (the last one is also measured with
    /// `--json`).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
    pub cgroups: Vec<usize>,
    /// Parked processes in every agent-cost run.
    #[arg(long, default_value_t = 10_000)]
    pub processes: usize,
    /// Runs of each containment scenario in the VM (0: skip that section).
    #[arg(long, default_value_t = 5)]
    pub vm_runs: u32,
    /// Guards in the containment section (none, earlyoom, earlyoom-c, nohang,
    /// nohang-psi, systemd-oomd, cgsentry); default: all. Each table runs those of its
    /// own that are named. A subset is a partial run (see `--only-vm`).
    #[arg(long, value_delimiter = ',')]
    pub guards: Vec<String>,
    /// Containment tables by the image their VMs boot (busybox: flat cgroups, the
    /// guards that need no systemd; debian: Debian 12 with systemd, systemd-oomd);
    /// default: both. A subset is a partial run.
    #[arg(long, value_delimiter = ',')]
    pub images: Vec<String>,
    /// Only the containment section. A partial run (this, or a subset of guards)
    /// writes target/bench/partial.md and partial.json, not BENCHMARKS.md.
    #[arg(long)]
    pub only_vm: bool,
}

impl BenchArgs {
    /// The guards to run, in table order; an unknown name is an error.
    fn guards(&self) -> Result<Vec<&'static str>> {
        if let Some(bad) = self.guards.iter().find(|g| !GUARDS.contains(&g.as_str())) {
            bail!("unknown guard {bad:?}: one of {}", GUARDS.join(", "));
        }
        Ok(GUARDS
            .iter()
            .copied()
            .filter(|g| self.guards.is_empty() || self.guards.iter().any(|x| x == g))
            .collect())
    }

    /// The containment tables to run, in order; an unknown image is an error.
    fn sections(&self) -> Result<Vec<&'static Section>> {
        if let Some(bad) = self
            .images
            .iter()
            .find(|i| !SECTIONS.iter().any(|s| s.image == i.as_str()))
        {
            bail!("unknown image {bad:?}: busybox or debian");
        }
        Ok(SECTIONS
            .iter()
            .filter(|s| self.images.is_empty() || self.images.iter().any(|i| i == s.image))
            .collect())
    }

    fn partial(&self) -> bool {
        self.only_vm || !self.guards.is_empty() || !self.images.is_empty()
    }
}

/// One containment table: the image its VMs boot, its workloads, the guards it runs
/// (in table order), what it says above its rows.
#[derive(Debug)]
struct Section {
    image: &'static str,
    workloads: &'static [(
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    )],
    guards: &'static [&'static str],
    title: &'static str,
    intro: &'static str,
}

const SECTIONS: &[Section] = &[
    Section {
        image: "busybox",
        workloads: CONTAINMENT,
        guards: &[
            "none",
            "earlyoom",
            "earlyoom-c",
            "nohang",
            "nohang-psi",
            "cgsentry",
        ],
        title: "Containment in the VM, side by side",
        intro: "Debian's 6.1 cloud kernel under QEMU TCG (2 vCPUs, 1 GiB, pure cgroup v2), the same workloads under each guard, {runs} runs each, **median / worst**. `leak`: 20 MiB/s with no memory.max beside a heartbeat service; `pool`: incident D, 200 x 20 MiB jobs at once with throttled swap beside a heartbeat. Processes are named as on incidents C and D's machines: the service or heartbeat `omnimind`, the leaker `pytest`, the pool `validator`. `none`: no guard; `earlyoom`: Debian's earlyoom 1.7 with its defaults (SIGTERM at ≤ 10 % memory and ≤ 10 % swap free, SIGKILL at 5 %); `earlyoom-c`: the same with incident C's `--avoid '^(omnimind|pytest|code)$'`; `nohang`: Debian's nohang 0.2.0, `nohang --monitor` with its shipped config (SIGTERM at ≤ 5 % memory and ≤ 10 % swap free); `nohang-psi`: the same with `psi_checking_enabled = True` (acts when memory `full_avg10` > 40 for 30 s); `cgsentry`: the shipped policies. Another guard's files (nohang's Python: about 20 MiB) live in the VM's initramfs, which is RAM, so its VM gets that much more memory. A run under another guard stops once the heartbeat has stalled 30 s. \"expectations met\" is the scenario's own checks (cgsentry only).",
    },
    Section {
        image: "debian",
        workloads: DEBIAN_CONTAINMENT,
        guards: &["none", "earlyoom", "nohang", "systemd-oomd", "cgsentry"],
        title: "Containment on a real distribution: Debian 12 with systemd-oomd, earlyoom and nohang",
        intro: "The same kernel and VM booting Debian 12 (systemd 252 as PID 1, journald, the workloads as systemd units), {runs} runs each, **median / worst**. The workloads are a logged-in user's: alice (uid 1000, lingering) runs them as scopes in her manager's app.slice, where the distributions' systemd-oomd defaults apply. `user-leak` (tests/scenarios/debian-user): 20 MiB/s in `leak.scope` beside her editor's heartbeat scope, no swap; `user-pool` (debian-user-pool): incident D's pool as `pool.scope` with throttled swap beside a heartbeat service in system.slice. `none`: no guard (systemd-oomd.service masked, cgsentry not enabled); `earlyoom` and `nohang`: Debian's packages, installed in the image but not enabled, started for the run as their own services (`systemctl start earlyoom.service` with /etc/default/earlyoom's `-r 3600`: SIGTERM at ≤ 10 % memory and ≤ 10 % swap free; `nohang.service`: `--monitor` with /etc/nohang/nohang.conf in hostcritical.slice), systemd-oomd masked, their actions the `sending SIG… to process` / `Sending … to the victim` lines of their journal; `systemd-oomd`: Debian's package as it ships, which is Fedora's default configuration (`ManagedOOMSwap=kill` on -.slice with `SwapUsedLimit=90%`, `ManagedOOMMemoryPressure=kill` at `ManagedOOMMemoryPressureLimit=50%` for `DefaultMemoryPressureDurationSec=20s` on user@.service; `oomctl` lists both), its actions are the `Killed …` lines of its journal, each one cgroup killed whole; `cgsentry`: the installed cgsentry.service on the shipped policies, with systemd-oomd running beside it as shipped (the scenario as CI runs it). A run under another guard stops once the heartbeat has stalled 30 s. \"expectations met\" is the scenario's own checks (cgsentry only).",
    },
];

/// Containment scenarios measured in the busybox VM, each run under every guard of
/// its table: (short name, scenario file, subject workload and its cgroup, the
/// innocent workload beside it).
const CONTAINMENT: &[(&str, &str, &str, &str, &str)] = &[
    ("leak", "contain-leak", "leaker", "/leak", "service"),
    ("pool", "contain-pool", "pool", "/pool", "heartbeat"),
];

/// The same on the Debian image, in a lingering user's session.
const DEBIAN_CONTAINMENT: &[(&str, &str, &str, &str, &str)] = &[
    (
        "user-leak",
        "debian-user",
        "leaker",
        "/user.slice/user-1000.slice/user@1000.service/app.slice/leak.scope",
        "editor",
    ),
    (
        "user-pool",
        "debian-user-pool",
        "pool",
        "/user.slice/user-1000.slice/user@1000.service/app.slice/pool.scope",
        "heartbeat",
    ),
];

/// Guards compared: none, cgsentry (the scenario as is), and the others below.
const GUARDS: &[&str] = &[
    "none",
    "earlyoom",
    "earlyoom-c",
    "nohang",
    "nohang-psi",
    "systemd-oomd",
    "cgsentry",
];

/// Another guard as the benchmark runs it: variant name, program and arguments (`args`
/// then `more`), the marker of its action lines, the files it needs in the VM.
struct OtherGuard {
    variant: &'static str,
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    more: &'static [&'static str],
    action: &'static str,
    files: &'static [&'static str],
}

const EARLYOOM_ARGS: &[&str] = &["-r", "5"];
const NOHANG_ARGS: &[&str] = &["-B", "/usr/sbin/nohang", "--monitor", "--config"];

const EARLYOOM_FILES: &[&str] = &["/usr/bin/earlyoom"];
const NOHANG_FILES: &[&str] = &[
    "/usr/bin/python3.11",
    "/usr/lib/python3.11",
    "/usr/sbin/nohang",
    "/etc/nohang",
];

/// earlyoom: its decisions as Debian ships it; its memory report every 5 s instead of
/// every second (cosmetic), so the console stays readable. "sending SIGTERM to process
/// N ..." is an action (its banner also says "sending SIG…"). nohang: `--monitor` with
/// Debian's config, Python without writing bytecode (the VM's files are RAM); "Sending
/// SIGTERM to the victim" is an action.
const OTHER_GUARDS: &[OtherGuard] = &[
    OtherGuard {
        variant: "earlyoom",
        name: "earlyoom",
        program: "/usr/bin/earlyoom",
        args: EARLYOOM_ARGS,
        more: &[],
        action: "to process",
        files: EARLYOOM_FILES,
    },
    // Incident C's settings: never kill the backend, the tests or the editor.
    OtherGuard {
        variant: "earlyoom-c",
        name: "earlyoom",
        program: "/usr/bin/earlyoom",
        args: EARLYOOM_ARGS,
        more: &["--avoid", "^(omnimind|pytest|code)$"],
        action: "to process",
        files: EARLYOOM_FILES,
    },
    OtherGuard {
        variant: "nohang",
        name: "nohang",
        program: "/usr/bin/python3.11",
        args: NOHANG_ARGS,
        more: &["/etc/nohang/nohang.conf"],
        action: "to the victim",
        files: NOHANG_FILES,
    },
    // Its PSI check on (`psi_checking_enabled = True`, written by `nohang_psi_config`).
    OtherGuard {
        variant: "nohang-psi",
        name: "nohang",
        program: "/usr/bin/python3.11",
        args: NOHANG_ARGS,
        more: &["/etc/nohang/nohang-psi.conf"],
        action: "to the victim",
        files: NOHANG_FILES,
    },
];

/// The other guards on the Debian image: each is the distribution's own package and
/// service (the image has them installed, not enabled), started as Debian ships it and
/// followed in its journal. earlyoom: `earlyoom.service` with /etc/default/earlyoom
/// (`-r 3600`: the same decisions as the busybox row, its memory report hourly);
/// nohang: `nohang.service` (`--monitor` with /etc/nohang/nohang.conf, in
/// hostcritical.slice). Each one's journal from this boot is followed from its start,
/// so no line between the start and the follower is lost.
const DEBIAN_GUARDS: &[OtherGuard] = &[
    OtherGuard {
        variant: "earlyoom",
        name: "earlyoom",
        program: "/bin/sh",
        args: &[
            "-c",
            "systemctl start earlyoom.service && exec journalctl --unit=earlyoom.service --boot --lines=all --follow --output=cat",
        ],
        more: &[],
        action: "to process",
        files: &[],
    },
    OtherGuard {
        variant: "nohang",
        name: "nohang",
        program: "/bin/sh",
        args: &[
            "-c",
            "systemctl start nohang.service && exec journalctl --unit=nohang.service --boot --lines=all --follow --output=cat",
        ],
        more: &[],
        action: "to the victim",
        files: &[],
    },
    // systemd-oomd runs as the Debian image's own service (the package's defaults).
    // The run follows its journal, where each kill is a line "Killed <cgroup> due to
    // memory pressure …" or "… due to swap used …"; its log shows what oomd monitors
    // 20 s in (`oomctl dump`: at the start a lingering user's manager is still
    // activating, and not yet monitored).
    OtherGuard {
        variant: "systemd-oomd",
        name: "systemd-oomd",
        program: "/bin/sh",
        args: &[
            "-c",
            "(sleep 20; oomctl dump) & exec journalctl --unit=systemd-oomd.service --follow --lines=0 --output=cat",
        ],
        more: &[],
        action: "Killed ",
        files: &[],
    },
];

/// Debian packages of the other guards, unpacked for the VM: nohang is a Python
/// script, so Python 3.11 and its standard library come too (libffi, for ctypes, from
/// the host like every other library).
const GUARD_PACKAGES: &[&str] = &[
    "earlyoom",
    "nohang",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
];

/// Writes /etc/nohang/nohang-psi.conf beside Debian's nohang.conf: the same with
/// `psi_checking_enabled = True`.
fn nohang_psi_config() -> Result<()> {
    let dir = crate::vm::guards_dir().join("etc/nohang");
    let text = std::fs::read_to_string(dir.join("nohang.conf"))?;
    let off = "psi_checking_enabled = False";
    if !text.contains(off) {
        bail!("nohang.conf has no `{off}` line: its format changed, check the PSI variant");
    }
    std::fs::write(
        dir.join("nohang-psi.conf"),
        text.replace(off, "psi_checking_enabled = True"),
    )?;
    Ok(())
}

/// One containment column: (header, metric keys with `{cg}` tried in order, whether
/// larger is worse).
const CONTAINMENT_COLUMNS: &[(&str, &[&str], bool)] = &[
    (
        "first action s after start",
        &[
            "agent_contained_after_start_s:{cg}",
            "guard_action_after_start_s:{cg}",
        ],
        true,
    ),
    (
        "MemAvailable at action MiB",
        &["mem_available_at_action_mib"],
        false,
    ),
    (
        "reaction to first reclaim stall s",
        &["agent_reaction_s:{cg}"],
        true,
    ),
    ("kills by the guard", &["guard_actions"], true),
    ("kernel OOM kills", &["oom_kills"], true),
    ("heartbeat max gap ms", &["heartbeat_max_gap_ms"], true),
    (
        "heartbeat stalled ms in all",
        &["heartbeat_stalled_ms"],
        true,
    ),
];

/// Writes the scenario `base` as run under `guard` into `dir`: `cgsentry` is the file as
/// it is; otherwise its agent and expectations are dropped (they are cgsentry's), the
/// guard added, and a run that froze the machine for 30 s is stopped. On the Debian
/// image, `none` also masks systemd-oomd.service (its package enables it).
///
/// `files_mib` sizes a guard's files (`crate::vm::guard_files_mib`); its VM gets that
/// much more memory.
fn variant(
    base: &Path,
    short: &str,
    guard: &str,
    dir: &Path,
    files_mib: &dyn Fn(&[&str]) -> Result<u32>,
) -> Result<PathBuf> {
    let text = std::fs::read_to_string(base)?;
    let out = dir.join(format!("{short}-{guard}.toml"));
    if guard == "cgsentry" {
        std::fs::write(&out, text)?;
        return Ok(out);
    }
    let mut t: toml::Table = toml::from_str(&text)?;
    let debian = t
        .get("vm")
        .and_then(|vm| vm.get("image"))
        .and_then(toml::Value::as_str)
        == Some("debian");
    let other = match guard {
        "none" => None,
        _ => Some(
            if debian { DEBIAN_GUARDS } else { OTHER_GUARDS }
                .iter()
                .find(|g| g.variant == guard)
                .with_context(|| format!("no guard {guard} on the image of {short}"))?,
        ),
    };
    t.remove("agent");
    t.remove("expect");
    if let Some(toml::Value::String(d)) = t.get_mut("description") {
        *d = format!("[{guard}] {d}");
    }
    if let Some(toml::Value::Table(run)) = t.get_mut("run") {
        run.insert(
            "stop_when_heartbeat_gap_ms".into(),
            toml::Value::Float(30_000.0),
        );
    }
    // Each guard alone: systemd-oomd (enabled by its package) runs only in its own row.
    if debian
        && guard != "systemd-oomd"
        && let Some(toml::Value::Table(vm)) = t.get_mut("vm")
    {
        vm.insert("masked".into(), vec!["systemd-oomd.service"].into());
    }
    if let Some(g) = other {
        let mut spec = toml::Table::new();
        spec.insert("name".into(), g.name.into());
        spec.insert("program".into(), g.program.into());
        spec.insert("args".into(), [g.args, g.more].concat().into());
        spec.insert("action".into(), g.action.into());
        spec.insert("files".into(), g.files.to_vec().into());
        t.insert("guard".into(), toml::Value::Table(spec));
        // Its files are in the VM's initramfs, which is RAM: the same memory to guard.
        let extra = i64::from(files_mib(g.files)?);
        let vm = t
            .entry("vm")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(vm) = vm {
            let mem = vm
                .get("mem_mib")
                .and_then(toml::Value::as_integer)
                .unwrap_or(1024);
            vm.insert("mem_mib".into(), toml::Value::Integer(mem + extra));
        }
    }
    std::fs::write(&out, toml::to_string(&t)?)?;
    Ok(out)
}

/// "median / worst" of one metric over runs, or "-" where no run had it.
fn median_worst(values: &[f64], larger_is_worse: bool) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let worst = values
        .iter()
        .copied()
        .reduce(if larger_is_worse { f64::max } else { f64::min })
        .unwrap_or(f64::NAN);
    format!("{:.1} / {worst:.1}", median(values.to_vec()))
}

/// Runs each table's scenarios under each of its guards `args.vm_runs` times (one
/// suite: every VM one after another) and renders the tables.
fn containment(args: &BenchArgs) -> Result<(String, Value)> {
    let guards = args.guards()?;
    let sections = args.sections()?;
    if sections.iter().any(|s| s.image == "busybox") {
        crate::vm::ensure_guards(GUARD_PACKAGES)?;
        nohang_psi_config()?;
    }
    let dir = workspace_root().join("target/bench/scenarios");
    std::fs::create_dir_all(&dir)?;
    let chosen = |s: &Section| -> Vec<&'static str> {
        s.guards
            .iter()
            .copied()
            .filter(|g| guards.contains(g))
            .collect()
    };
    let mut files = Vec::new();
    for section in &sections {
        for (short, base, ..) in section.workloads {
            let base = workspace_root().join(format!("tests/scenarios/{base}.toml"));
            for guard in chosen(section) {
                files.push(variant(&base, short, guard, &dir, &|f| {
                    crate::vm::guard_files_mib(f)
                })?);
            }
        }
    }
    if files.is_empty() {
        bail!("no table runs any of the guards named: see --guards and --images");
    }
    let vm_args = crate::vm::VmTestArgs {
        scenarios: files.iter().map(|f| f.display().to_string()).collect(),
        repeat: args.vm_runs,
        mem: None,
        keep_logs: None,
        tcg_threads: crate::vm::DEFAULT_TCG,
        agent: None,
        policies: None,
    };
    let (table, hangs) = crate::vm::run_suite(&vm_args)?;
    let mut md = String::new();
    let mut raw = Vec::new();
    for section in &sections {
        let guards = chosen(section);
        if guards.is_empty() {
            continue;
        }
        let intro = section.intro.replace("{runs}", &args.vm_runs.to_string());
        let _ = write!(
            md,
            "## {}\n\n{intro} {hangs} run(s) of the suite were re-run after the emulator wedged.\n\n| workload | guard | runs | expectations met | offender survived | innocent survived |",
            section.title
        );
        for (h, _, _) in CONTAINMENT_COLUMNS {
            let _ = write!(md, " {h} |");
        }
        md.push_str("\n|---|---|---|---|---|---|");
        md.push_str(&"---|".repeat(CONTAINMENT_COLUMNS.len()));
        md.push('\n');
        for (short, _, workload, cg, innocent) in section.workloads {
            for guard in &guards {
                let name = format!("{short}-{guard}");
                let runs = table.get(&name).map_or(&[][..], Vec::as_slice);
                render_row(&mut md, (short, guard, workload, cg, innocent), runs);
                raw.push(
                    json!({"image": section.image, "workload": short, "guard": guard,
                    "runs": runs.iter().map(|o| &o.metrics).collect::<Vec<_>>()}),
                );
            }
        }
        md.push('\n');
    }
    md.push_str("Not in these tables: Meta's oomd (it needs its own build and configuration, which no Debian package provides) and a faster-swap variant of the pool.\n");
    Ok((md, Value::Array(raw)))
}

/// One row of a containment table: `(short, guard, workload, cgroup, innocent)` over
/// its runs.
fn render_row(
    md: &mut String,
    (short, guard, workload, cg, innocent): (&str, &str, &str, &str, &str),
    runs: &[crate::vm::Outcome],
) {
    let count =
        |pred: &dyn Fn(&crate::vm::Outcome) -> bool| runs.iter().filter(|o| pred(o)).count();
    let met = if guard == "cgsentry" {
        format!("{}/{}", count(&|o| o.failures.is_empty()), runs.len())
    } else {
        "-".into()
    };
    let _ = write!(
        md,
        "| {short} | {guard} | {} | {met} | {}/{} | {}/{} |",
        runs.len(),
        count(&|o| o.metrics[format!("survived:{workload}")] == json!(true)),
        runs.len(),
        count(&|o| o.metrics[format!("survived:{innocent}")] == json!(true)),
        runs.len(),
    );
    for (_, keys, larger_is_worse) in CONTAINMENT_COLUMNS {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|o| {
                keys.iter()
                    .find_map(|k| o.metrics[&k.replace("{cg}", cg)].as_f64())
            })
            .collect();
        let _ = write!(md, " {} |", median_worst(&values, *larger_is_worse));
    }
    md.push('\n');
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
        signal(&self.child, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// The reference: what a bpftrace user would write for the same data as our
/// `sched_switch` program (a per-cgroup count).
const BPFTRACE_ONE_LINER: &str = "tracepoint:sched:sched_switch { @[cgroup] = count(); }";

/// Every eBPF program loaded now, as `bpftool prog show -j` describes it (with
/// `run_time_ns`/`run_cnt` while `bpf_stats` is on).
fn loaded_programs() -> Result<Vec<Value>> {
    let out = output(Command::new("bpftool").args(["prog", "show", "-j"]))
        .context("bpftool prog show failed")?;
    Ok(serde_json::from_str(&out)?)
}

/// Nanoseconds per run (0 for a program that never ran).
fn per_event(run_time_ns: u64, run_cnt: u64) -> f64 {
    if run_cnt > 0 {
        run_time_ns as f64 / run_cnt as f64
    } else {
        0.0
    }
}

/// IDs of the eBPF programs loaded now.
fn program_ids() -> Result<Vec<u64>> {
    Ok(loaded_programs()?
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// The bpftrace one-liner, attached (its program is loaded).
struct Bpftrace {
    child: Child,
    /// The programs it loaded.
    ids: Vec<u64>,
}

impl Bpftrace {
    fn start() -> Result<Self> {
        let before = program_ids()?;
        let mut child = Command::new("bpftrace")
            .args(["-e", BPFTRACE_ONE_LINER])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting bpftrace")?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_mins(1) {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("bpftrace exited ({status}): {}", err.trim());
            }
            let ids: Vec<u64> = program_ids()?
                .into_iter()
                .filter(|id| !before.contains(id))
                .collect();
            if !ids.is_empty() {
                // Loaded; give the attach that follows the load a moment.
                std::thread::sleep(Duration::from_millis(500));
                return Ok(Self { child, ids });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        bail!("bpftrace loaded no program within 60 s")
    }

    /// ns per event and events of its programs (`bpf_stats` must be on).
    fn cost(&self) -> Result<Cost> {
        let progs = loaded_programs()?;
        let (ns, cnt) = progs
            .iter()
            .filter(|p| p["id"].as_u64().is_some_and(|id| self.ids.contains(&id)))
            .fold((0, 0), |(ns, cnt), p| {
                (
                    ns + p["run_time_ns"].as_u64().unwrap_or(0),
                    cnt + p["run_cnt"].as_u64().unwrap_or(0),
                )
            });
        Ok((per_event(ns, cnt), cnt))
    }

    fn stop(mut self) {
        signal(&self.child, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (cov, var) = points.iter().fold((0.0, 0.0), |(c, v), (x, y)| {
        (c + (x - mx) * (y - my), v + (x - mx) * (x - mx))
    });
    if var == 0.0 { 0.0 } else { cov / var }
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
fn program_costs() -> Result<Vec<ProgramCost>> {
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
    let progs = loaded_programs()?;
    let mut costs: Vec<ProgramCost> = progs
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            if !names.iter().any(|n| n == name) {
                return None;
            }
            let cnt = p["run_cnt"].as_u64().unwrap_or(0);
            let ns = p["run_time_ns"].as_u64().unwrap_or(0);
            Some((name.to_owned(), per_event(ns, cnt), cnt))
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

/// Round trips/s per condition, one entry per alternating run.
#[derive(Default)]
struct Throughput {
    without: Vec<f64>,
    agent: Vec<f64>,
    bpftrace: Vec<f64>,
}

fn throughput(args: &BenchArgs) -> Result<Throughput> {
    eprintln!(
        "bench: ping-pong, {} alternating runs of {} s (none, cgsentry, bpftrace)",
        args.runs, args.seconds
    );
    let mut t = Throughput::default();
    for i in 0..args.runs {
        t.without.push(pingpong(args.seconds)?);
        let agent = Agent::start(true)?;
        t.agent.push(pingpong(args.seconds)?);
        agent.stop();
        let bt = Bpftrace::start()?;
        t.bpftrace.push(pingpong(args.seconds)?);
        bt.stop();
        eprintln!(
            "bench:   run {}: {:.0} none, {:.0} cgsentry, {:.0} bpftrace (round trips/s)",
            i + 1,
            t.without.last().unwrap_or(&0.0),
            t.agent.last().unwrap_or(&0.0),
            t.bpftrace.last().unwrap_or(&0.0)
        );
    }
    Ok(t)
}

/// Our programs' costs and the bpftrace one-liner's (ns/event, events).
/// (ns per event, events) of one program or a set of them.
type Cost = (f64, u64);

/// A named program's [`Cost`].
type ProgramCost = (String, f64, u64);

fn costs(args: &BenchArgs) -> Result<(Vec<ProgramCost>, Cost)> {
    eprintln!("bench: cost per program (bpf_stats)");
    let _stats = BpfStatsGuard::enable()?;
    let agent = Agent::start(true)?;
    pingpong(args.seconds)?;
    run(Command::new("sh").args([
        "-c",
        "i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done",
    ]))?;
    let ours = program_costs()?;
    agent.stop();
    let bt = Bpftrace::start()?;
    pingpong(args.seconds)?;
    let reference = bt.cost()?;
    bt.stop();
    Ok((ours, reference))
}

/// One agent-cost measurement.
struct AgentRun {
    cgroups: usize,
    json: bool,
    cpu_percent: f64,
    rss_mib: f64,
    rss_max_mib: f64,
}

/// The agent's CPU and RSS over the window, with `cgroups` cgroups and the processes
/// parked in them.
fn agent_cost(args: &BenchArgs, cgroups: usize, json_too: bool) -> Result<Vec<AgentRun>> {
    eprintln!(
        "bench: agent cost with {cgroups} cgroups and {} processes, {} s window",
        args.processes, args.agent_window
    );
    let park_root = cgroup_root().join("cgsentry-bench");
    let mut park = Command::new(release("workload"))
        .args(["park", "--root"])
        .arg(&park_root)
        .args([
            "--cgroups",
            &cgroups.to_string(),
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
    let measure = |json: bool| -> Result<AgentRun> {
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
        Ok(AgentRun {
            cgroups,
            json,
            cpu_percent: (t1 - t0) as f64 / hz / secs * 100.0,
            rss_mib: rss as f64 / 1024.0,
            rss_max_mib: rss_max as f64 / 1024.0,
        })
    };
    let mut runs = vec![measure(false)];
    if json_too {
        runs.push(measure(true));
    }
    signal(&park, nix::sys::signal::Signal::SIGTERM);
    let _ = park.wait();
    runs.into_iter().collect()
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and creates cgroups: run it as root");
    }
    args.guards()?;
    crate::setup::install_missing(crate::setup::BENCH_PACKAGES)?;
    build_release_binaries()?;
    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default();
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    if args.partial() {
        if args.vm_runs == 0 {
            bail!("a partial run measures containment only: --vm-runs must be at least 1");
        }
        let (table, raw) = containment(args)?;
        let md = format!(
            "# cgsentry benchmarks (partial run)\n\nMeasured by `cargo xtask bench {}` on {date}, host kernel {kernel}, {cpus} CPUs. Containment only; BENCHMARKS.md is written by a full run.\n\n{table}",
            std::env::args().skip(2).collect::<Vec<_>>().join(" ")
        );
        print!("{md}");
        std::fs::write(dir.join("partial.md"), &md)?;
        let results = json!({"kernel": kernel, "cpus": cpus, "date": date, "containment": raw});
        std::fs::write(
            dir.join("partial.json"),
            serde_json::to_string_pretty(&results)?,
        )?;
        eprintln!("bench: wrote target/bench/partial.md and partial.json");
        return Ok(());
    }
    // A baseline "without programs" is only one if none of ours is loaded.
    let loaded = program_costs()?;
    if !loaded.is_empty() {
        bail!(
            "{} cgsentry programs are already loaded (another agent runs?): stop it first, \
             the baseline would be wrong",
            loaded.len()
        );
    }
    let bpftrace_version = output(Command::new("bpftrace").arg("--version")).unwrap_or_default();

    let t = throughput(args)?;
    let (ours, reference) = costs(args)?;
    let mut agent = Vec::new();
    let top = args.cgroups.iter().copied().max().unwrap_or(0);
    for &n in &args.cgroups {
        agent.extend(agent_cost(args, n, n == top)?);
    }
    let vm = if args.vm_runs > 0 {
        Some(containment(args)?)
    } else {
        None
    };

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# cgsentry benchmarks\n\nMeasured by `cargo xtask bench` on {date}: kernel {kernel}, {cpus} CPUs, {bpftrace_version} as the reference.\nRe-run it to refresh this file; numbers vary a few percent between runs.\n"
    );
    render_throughput(&mut md, args, &t);
    render_costs(&mut md, &ours, reference);
    render_agent(&mut md, args, &agent);
    if let Some((table, _)) = &vm {
        md.push_str(table);
    }

    print!("{md}");
    let file = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&file).unwrap_or_default();
    std::fs::write(&file, keep_written_by_hand(&md, &old))?;
    let results = json!({
        "kernel": kernel, "cpus": cpus, "date": date, "reference": bpftrace_version,
        "pingpong": {"without": t.without, "with": t.agent, "bpftrace": t.bpftrace,
                     "ratio": median(t.agent.clone()) / median(t.without.clone()),
                     "bpftrace_ratio": median(t.bpftrace.clone()) / median(t.without.clone())},
        "programs": ours.iter().map(|(n, ns, c)| json!({"name": n, "ns_per_event": ns, "events": c})).collect::<Vec<_>>(),
        "bpftrace_sched_switch": {"ns_per_event": reference.0, "events": reference.1},
        "agent": agent.iter().map(|r| json!({"cgroups": r.cgroups, "processes": args.processes,
            "json": r.json, "cpu_percent": r.cpu_percent, "rss_mib": r.rss_mib,
            "rss_max_mib": r.rss_max_mib, "window_s": args.agent_window})).collect::<Vec<_>>(),
        "containment": vm.map(|(_, raw)| raw),
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    eprintln!("bench: wrote BENCHMARKS.md and target/bench/results.json");
    Ok(())
}

/// Marks where BENCHMARKS.md's hand-written part (what limits a miss, profiles)
/// begins: a run rewrites what is above it and keeps the rest.
const BY_HAND: &str = "<!-- written by hand below: cargo xtask bench keeps it -->";

/// `generated`, then the hand-written part of `old` (from [`BY_HAND`] on), if any.
fn keep_written_by_hand(generated: &str, old: &str) -> String {
    match old.find(BY_HAND) {
        Some(at) => format!("{}\n{}", generated.trim_end(), &old[at..]),
        None => generated.to_owned(),
    }
}

fn render_throughput(md: &mut String, args: &BenchArgs, t: &Throughput) {
    let base = median(t.without.clone());
    let agent = median(t.agent.clone());
    let bt = median(t.bpftrace.clone());
    let _ = writeln!(
        md,
        "## Context-switch throughput\n\nPipe ping-pong between two processes pinned to CPU 0 (each round trip: two switches, two wakeups), {} alternating runs of {} s, medians. The reference is the bpftrace one-liner `{BPFTRACE_ONE_LINER}`: one program on sched_switch, where this load runs two of cgsentry's (sched_switch and sched_wakeup).\n",
        args.runs, args.seconds
    );
    let _ = writeln!(
        md,
        "| | round trips/s | ratio to none |\n|---|---|---|\n| no programs | {base:.0} | 1 |\n| cgsentry attached (all programs) | {agent:.0} | **{:.3}** (target ≥ 0.92) |\n| bpftrace one-liner (reference) | {bt:.0} | {:.3} |\n",
        agent / base,
        bt / base
    );
}

fn render_costs(md: &mut String, ours: &[ProgramCost], reference: Cost) {
    let _ = writeln!(
        md,
        "## Cost per program\n\n`kernel.bpf_stats_enabled=1` (run_time_ns / run_cnt), load: one ping-pong run and 2,000 fork+exec+exit; the reference under one ping-pong run.\n\n| program | ns/event | events |\n|---|---|---|"
    );
    for (name, ns, cnt) in ours {
        let target = if name == "sched_switch" {
            " (target ≤ 100)"
        } else {
            ""
        };
        let _ = writeln!(md, "| {name} | {ns:.0}{target} | {cnt} |");
    }
    let _ = writeln!(
        md,
        "| bpftrace sched_switch one-liner (reference) | {:.0} | {} |\n",
        reference.0, reference.1
    );
}

fn render_agent(md: &mut String, args: &BenchArgs, runs: &[AgentRun]) {
    let _ = writeln!(
        md,
        "## Agent cost\n\n{} parked processes spread over the cgroups, 1 s ticks, output to a pipe, {} s window after 5 s warm-up{}.\n\n| cgroups | output | CPU (% of one core) | RSS MiB end / max |\n|---|---|---|---|",
        args.processes,
        args.agent_window,
        if args.agent_window < 300 {
            " (shorter than the 300 ticks between full /proc scans: that scan's cost is not in the average)"
        } else {
            ""
        }
    );
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.1} / {:.1} |",
            r.cgroups,
            if r.json {
                "`--json`: whole Snapshot every tick"
            } else {
                "table (normal operation)"
            },
            r.cpu_percent,
            r.rss_mib,
            r.rss_max_mib
        );
    }
    let table: Vec<&AgentRun> = runs.iter().filter(|r| !r.json).collect();
    let cpu = slope(
        &table
            .iter()
            .map(|r| (r.cgroups as f64, r.cpu_percent))
            .collect::<Vec<_>>(),
    );
    let rss = slope(
        &table
            .iter()
            .map(|r| (r.cgroups as f64, r.rss_max_mib))
            .collect::<Vec<_>>(),
    );
    let _ = writeln!(
        md,
        "| target (at the top) | | ≤ 0.5 | ≤ 25 |\n\nGrowth with cgroups (least squares over the table rows): {:.3} % of a core and {:.2} MiB per 100 cgroups.\n",
        cpu * 100.0,
        rss * 100.0
    );
    if cgroup_root().ends_with("unified") {
        let _ = writeln!(
            md,
            "This host's cgroup v2 is hybrid (`/sys/fs/cgroup/unified`, no memory or pids controller): the cgroups have no `memory.*`/`pids.*` files, so neither reading them nor the per-cgroup memory series is in these numbers. Detection, decisions and the state file are (`cgsentry run` as shipped, no policy files).\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_runs_the_same_workloads_under_another_guard() {
        let dir = tempfile::tempdir().unwrap();
        let base = workspace_root().join("tests/scenarios/contain-pool.toml");
        // 1 MiB per file named: the VM's memory must grow by what the guard carries.
        let size = |files: &[&str]| Ok(u32::try_from(files.len()).unwrap());
        let load = |guard| {
            let f = variant(&base, "pool", guard, dir.path(), &size).unwrap();
            cgsentry_workload::scenario::Scenario::load(&f).unwrap()
        };
        let original = cgsentry_workload::scenario::Scenario::load(&base).unwrap();
        let e = load("earlyoom");
        assert!(e.agent.is_none() && e.expect.is_empty());
        let g = e.guard.as_ref().unwrap();
        assert_eq!(
            (g.name.as_str(), g.program.as_str()),
            ("earlyoom", "/usr/bin/earlyoom")
        );
        assert_eq!(g.files, ["/usr/bin/earlyoom"]);
        assert_eq!(e.vm.mem_mib, original.vm.mem_mib + 1);
        assert!((e.run.stop_when_heartbeat_gap_ms - 30_000.0).abs() < f64::EPSILON);
        assert_eq!(e.workloads.len(), original.workloads.len());
        assert_eq!(e.vm.swap_mib, original.vm.swap_mib);
        let c = load("earlyoom-c");
        assert!(
            c.guard
                .unwrap()
                .args
                .contains(&"^(omnimind|pytest|code)$".to_owned())
        );
        let psi = load("nohang-psi");
        assert_eq!(psi.vm.mem_mib, original.vm.mem_mib + 4);
        let g = psi.guard.unwrap();
        assert_eq!(g.name, "nohang");
        assert!(g.args.contains(&"/etc/nohang/nohang-psi.conf".to_owned()));
        let n = load("none");
        assert!(n.agent.is_none() && n.guard.is_none());
        assert_eq!(n.vm.mem_mib, original.vm.mem_mib);
        let ours = load("cgsentry");
        assert!(ours.agent.is_some() && !ours.expect.is_empty());
        assert!(variant(&base, "pool", "oomd", dir.path(), &size).is_err());
    }

    #[test]
    fn a_subset_of_guards_is_a_partial_run_in_table_order() {
        let parse = |argv: &[&str]| {
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                bench: BenchArgs,
            }
            <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.bench)
        };
        let all = parse(&["bench"]).unwrap();
        assert_eq!(all.guards().unwrap(), GUARDS);
        assert!(!all.partial());
        let some = parse(&["bench", "--guards", "cgsentry,nohang"]).unwrap();
        assert_eq!(some.guards().unwrap(), ["nohang", "cgsentry"]);
        assert!(some.partial());
        assert!(parse(&["bench", "--only-vm"]).unwrap().partial());
        let bad = parse(&["bench", "--guards", "oomd"]).unwrap();
        assert!(bad.guards().unwrap_err().to_string().contains("oomd"));
        // Tables by image: both by default, one when named (a partial run).
        let images = |a: &BenchArgs| -> Vec<&str> {
            a.sections().unwrap().iter().map(|s| s.image).collect()
        };
        assert_eq!(images(&all), ["busybox", "debian"]);
        let debian = parse(&["bench", "--images", "debian"]).unwrap();
        assert_eq!(images(&debian), ["debian"]);
        assert!(debian.partial());
        let bad = parse(&["bench", "--images", "fedora"]).unwrap();
        assert!(bad.sections().unwrap_err().to_string().contains("fedora"));
        // Every table's guards are known ones, every table runs cgsentry and none.
        for s in SECTIONS {
            assert!(s.guards.iter().all(|g| GUARDS.contains(g)), "{}", s.image);
            assert!(s.guards.contains(&"cgsentry") && s.guards.contains(&"none"));
        }
    }

    #[test]
    fn on_debian_each_guard_runs_alone_as_its_package_service_followed_in_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let size = |files: &[&str]| Ok(u32::try_from(files.len()).unwrap());
        for (short, base, workload, cg, _) in DEBIAN_CONTAINMENT {
            let base = workspace_root().join(format!("tests/scenarios/{base}.toml"));
            let load = |guard| {
                let f = variant(&base, short, guard, dir.path(), &size).unwrap();
                cgsentry_workload::scenario::Scenario::load(&f).unwrap()
            };
            let original = cgsentry_workload::scenario::Scenario::load(&base).unwrap();
            assert_eq!(
                original.vm.image,
                cgsentry_workload::scenario::Image::Debian
            );
            assert!(
                original.vm.masked.is_empty(),
                "CI runs it beside systemd-oomd"
            );
            assert!(
                original
                    .workloads
                    .iter()
                    .any(|w| w.name == *workload && w.cgroup == *cg)
            );
            let none = load("none");
            assert!(none.agent.is_none() && none.guard.is_none());
            assert_eq!(none.vm.masked, ["systemd-oomd.service"]);
            let oomd = load("systemd-oomd");
            assert!(oomd.agent.is_none() && oomd.expect.is_empty());
            assert!(oomd.vm.masked.is_empty());
            assert_eq!(oomd.vm.mem_mib, original.vm.mem_mib, "no files carried");
            let g = oomd.guard.unwrap();
            assert_eq!(g.program, "/bin/sh");
            assert!(g.args[1].starts_with("(sleep 20; oomctl dump) &"));
            assert!(g.args[1].contains("journalctl --unit=systemd-oomd.service --follow"));
            assert!(g.files.is_empty());
            // One of its kill lines (systemd 252's oomd-manager.c) is an action.
            assert!(
                "Killed /user.slice/user-1000.slice/user@1000.service/app.slice/leak.scope \
                 due to memory pressure for /user.slice/user-1000.slice/user@1000.service \
                 being 62.57% > 50.00% for > 20s with reclaim activity"
                    .contains(&g.action)
            );
            let ours = load("cgsentry");
            assert!(ours.agent.is_some() && ours.vm.masked.is_empty());
            // earlyoom and nohang: the packages' own services, alone (oomd masked),
            // followed from their start; a line of each one's kill is an action.
            for (guard, line) in [
                (
                    "earlyoom",
                    "sending SIGTERM to process 812 uid 1000 \"pytest\": badness 870, VmRSS 801 MiB",
                ),
                ("nohang", "Sending SIGTERM to the victim"),
            ] {
                let other = load(guard);
                assert!(other.agent.is_none() && other.expect.is_empty());
                assert_eq!(other.vm.masked, ["systemd-oomd.service"]);
                assert_eq!(other.vm.mem_mib, original.vm.mem_mib, "no files carried");
                let g = other.guard.unwrap();
                assert_eq!(g.program, "/bin/sh");
                assert!(
                    g.args[1].starts_with(&format!("systemctl start {guard}.service && exec journalctl --unit={guard}.service --boot --lines=all --follow")),
                    "{}",
                    g.args[1]
                );
                assert!(g.files.is_empty());
                assert!(line.contains(&g.action), "{guard}");
                // Its banner is no action.
                assert!(
                    !"sending SIGTERM when mem <= 10.00% and swap <= 10.00%,".contains(&g.action)
                );
            }
        }
        // On the busybox image the same names carry their files into the VM.
        let base = workspace_root().join("tests/scenarios/contain-leak.toml");
        let f = variant(&base, "leak", "earlyoom", dir.path(), &size).unwrap();
        let busybox = cgsentry_workload::scenario::Scenario::load(&f).unwrap();
        assert_eq!(busybox.guard.unwrap().program, "/usr/bin/earlyoom");
        assert!(variant(&base, "leak", "systemd-oomd", dir.path(), &size).is_err());
    }

    #[test]
    fn a_run_keeps_what_was_written_by_hand() {
        let old = format!("# old numbers\n\n{BY_HAND}\n## Why we miss\nprofile\n");
        let new = keep_written_by_hand("# new numbers\n", &old);
        assert_eq!(
            new,
            format!("# new numbers\n{BY_HAND}\n## Why we miss\nprofile\n")
        );
        assert_eq!(keep_written_by_hand("# new\n", "# old\n"), "# new\n");
    }

    #[test]
    fn median_and_worst_take_the_worse_side() {
        assert_eq!(median_worst(&[3.0, 1.0, 2.0], true), "2.0 / 3.0");
        assert_eq!(median_worst(&[300.0, 100.0, 200.0], false), "200.0 / 100.0");
        assert_eq!(median_worst(&[], true), "-");
    }

    #[test]
    fn slope_is_the_least_squares_fit() {
        assert!((slope(&[(10.0, 0.1), (100.0, 0.19), (1000.0, 1.09)]) - 0.001).abs() < 1e-9);
        assert!(slope(&[(5.0, 1.0), (5.0, 2.0)]).abs() < f64::EPSILON);
    }

    #[test]
    fn the_agent_table_names_a_short_window_and_the_growth() {
        let args = BenchArgs {
            runs: 1,
            seconds: 1.0,
            agent_window: 60,
            cgroups: vec![10, 1000],
            processes: 100,
            vm_runs: 0,
            guards: Vec::new(),
            images: Vec::new(),
            only_vm: false,
        };
        let run = |cgroups, cpu_percent, rss| AgentRun {
            cgroups,
            json: false,
            cpu_percent,
            rss_mib: rss,
            rss_max_mib: rss,
        };
        let mut md = String::new();
        render_agent(&mut md, &args, &[run(10, 0.1, 10.0), run(1000, 1.09, 20.0)]);
        assert!(
            md.contains("| 1000 | table (normal operation) | 1.09 | 20.0 / 20.0 |"),
            "{md}"
        );
        assert!(
            md.contains("0.100 % of a core and 1.01 MiB per 100 cgroups"),
            "{md}"
        );
        assert!(md.contains("shorter than the 300 ticks"), "{md}");
    }
}
