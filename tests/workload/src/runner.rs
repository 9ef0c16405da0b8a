//! `workload vm-run SCENARIO`: runs one scenario inside the VM (as init's child) and
//! prints one `RESULT {json}` line with what it observed. Progress lines start with
//! `vm-run:`; workloads' and the agent's lines are echoed with their name.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::{
    cgroup::spawn_in_cgroup,
    scenario::{Role, Scenario},
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn say(msg: &str) {
    println!("vm-run: {msg}");
}

/// A scenario's cgroup path as the bytes it stands for: the agent's own text form
/// (`%XX` is byte XX, so that a scenario can name a cgroup whose name is not UTF-8, and
/// its metrics carry the same text the agent prints).
fn path_bytes(text: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt as _;
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        if let (b'%', Some(h), Some(l)) = (b[i], hex(i + 1), hex(i + 2)) {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

fn cgroup_dir(rel: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(path_bytes(rel.trim_start_matches('/')))
}

/// Creates `rel` and enables the controllers in every ancestor on the way.
fn make_cgroup(rel: &str) -> Result<()> {
    let mut dir = PathBuf::from(CGROUP_ROOT);
    for part in rel.trim_start_matches('/').split('/') {
        // Ignored: the controllers may already be on, or not exist in this kernel.
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids +io");
        dir.push(path_bytes(part));
        if !dir.exists() {
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Starts `program args` inside cgroup `rel`, output piped.
fn spawn_in(rel: &str, program: &str, args: &[String]) -> Result<Child> {
    spawn_as(rel, program, args, None)
}

/// [`spawn_in`], as user `uid` (and group `uid`) when given.
fn spawn_as(rel: &str, program: &str, args: &[String], uid: Option<u32>) -> Result<Child> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    spawn_in_cgroup(&mut cmd, &cgroup_dir(rel))
        .with_context(|| format!("starting {program} in {rel}"))
}

/// The `workload` binary, or a link to it named `comm` (the process then has that
/// name, which is what other guards' regexes see).
fn workload_program(comm: Option<&str>) -> Result<String> {
    const BIN: &str = "/bin/workload";
    let Some(comm) = comm else {
        return Ok(BIN.into());
    };
    let dir = Path::new("/run/comm");
    std::fs::create_dir_all(dir)?;
    let link = dir.join(comm);
    if !link.exists() {
        std::os::unix::fs::symlink(BIN, &link)
            .with_context(|| format!("linking {} to {BIN}", link.display()))?;
    }
    Ok(link.display().to_string())
}

/// A heartbeat's figures: its status field and the run's metric (the worst of them if
/// there are several heartbeats).
const HEARTBEAT: [(&str, &str); 2] = [
    ("max_gap_ms", "heartbeat_max_gap_ms"),
    ("stalled_ms", "heartbeat_stalled_ms"),
];

/// How far a heartbeat's status line may trail the beats it reports (the pipe, the
/// runner's pump thread), and an operator command's effects its exit.
const STATUS_SLACK: Duration = Duration::from_millis(300);

/// A heartbeat's largest gap, in ms, but those that may overlap an operator command
/// (`busy`: when each ran, since the runner started): each status line reports the
/// largest gap since the one before (`recent_max_gap_ms`), so a gap it reports lies
/// within the line's second, stretched back by that gap.
fn max_gap_outside(lines: &[(Duration, Value)], busy: &[(Duration, Duration)]) -> f64 {
    let mut worst = 0.0f64;
    let mut prev: Option<Duration> = None;
    for (at, v) in lines {
        let Some(gap) = v["recent_max_gap_ms"].as_f64() else {
            continue;
        };
        // The first line's second began a second before it.
        let from = prev
            .unwrap_or_else(|| at.saturating_sub(Duration::from_secs(1)))
            .saturating_sub(Duration::from_secs_f64(gap / 1e3) + STATUS_SLACK);
        prev = Some(*at);
        let overlaps = busy
            .iter()
            .any(|&(a, b)| a <= *at && from <= b + STATUS_SLACK);
        if !overlaps {
            worst = worst.max(gap);
        }
    }
    worst
}

/// JSON lines of one process, with the time they arrived (since the runner started).
type Lines = Arc<Mutex<Vec<(Duration, Value)>>>;

/// Echoes a child's output lines with a prefix and keeps the JSON ones.
fn pump(
    name: String,
    stream: impl std::io::Read + Send + 'static,
    sink: Option<Lines>,
    t0: Instant,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            match (&sink, serde_json::from_str::<Value>(&line)) {
                (Some(sink), Ok(v)) => {
                    // Agent ticks are long: keep what the metrics read, print a short trace.
                    let v = if name == "agent" {
                        let top = &v["cgroups"][0];
                        println!(
                            "[agent] tick: top {} {:.0} %",
                            top["path"],
                            top["cpu_percent"].as_f64().unwrap_or(0.0)
                        );
                        agent_tick_kept(&v)
                    } else {
                        println!("[{name}] {line}");
                        v
                    };
                    sink.lock().unwrap().push((t0.elapsed(), v));
                }
                _ => println!("[{name}] {line}"),
            }
        }
    })
}

/// What the run's metrics read of one agent tick (a tick of a host with thousands of
/// cgroups is megabytes; ninety of them kept whole would not fit in the VM).
fn agent_tick_kept(v: &Value) -> Value {
    let pick = |v: &Value, keys: &[&str]| -> Value {
        Value::Object(
            keys.iter()
                .filter_map(|k| v.get(*k).map(|x| ((*k).to_owned(), x.clone())))
                .collect(),
        )
    };
    let each = |list: &Value, keys: &[&str]| -> Value {
        Value::Array(
            list.as_array()
                .into_iter()
                .flatten()
                .map(|x| pick(x, keys))
                .collect(),
        )
    };
    json!({
        "cgroups": each(&v["cgroups"], &["path", "cpu_percent", "forks", "reclaim_stall_ms"]),
        "findings": Value::Array(
            v["findings"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| json!({"finding": pick(&f["finding"], &["kind", "cgroup"])}))
                .collect()
        ),
        "decisions": each(&v["decisions"], &["action", "cgroup"]),
        "actions": each(&v["actions"], &["action", "cgroup"]),
        "policy_errors": v["policy_errors"].clone(),
        "ebpf": v["ebpf"].clone(),
        "events": {"oom_victims": v["events"]["oom_victims"].clone()},
    })
}

struct Running {
    name: String,
    cgroup: String,
    role: Role,
    child: Child,
    exit: Option<(Duration, ExitStatus)>,
    lines: Lines,
    pumps: Vec<std::thread::JoinHandle<()>>,
    /// When it was started, since the run started.
    started: Duration,
    /// On a Debian image: `started` is the unit's own start (see
    /// [`crate::systemd::unit_started_ago`]).
    unit_started: bool,
}

impl Running {
    /// The agent, an observer from the run's start.
    fn agent(
        cgroup: &str,
        child: Child,
        lines: Lines,
        pumps: Vec<std::thread::JoinHandle<()>>,
    ) -> Self {
        Self {
            name: "agent".into(),
            cgroup: cgroup.to_owned(),
            role: Role::Observer,
            child,
            exit: None,
            lines,
            pumps,
            started: Duration::ZERO,
            unit_started: false,
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

fn read_kv(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()?.trim_end_matches(':') == key).then(|| it.next()?.parse().ok())?
    })
}

fn cgroup_value(rel: &str, file: &str, key: Option<&str>) -> Option<u64> {
    let path = cgroup_dir(rel).join(file);
    match key {
        Some(k) => read_kv(path.to_str()?, k),
        None => std::fs::read_to_string(path).ok()?.trim().parse().ok(),
    }
}

fn uptime_s() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// How long a child may take to be gone after SIGKILL. A task that outlives it is stuck in the
/// kernel (a vCPU spinning with the task's context, seen under TCG as a soft lockup);
/// waiting on it would hang the runner, and with it the whole VM until its timeout.
const REAP_WITHIN: Duration = Duration::from_secs(10);

/// Waits up to `within` for `child` to exit.
fn reap(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup v2 path process `pid` is in now (`None` once it is gone).
fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_owned())
}

/// SIGTERM, `grace`, then SIGKILL; false when the child is still there [`REAP_WITHIN`]
/// after the SIGKILL.
fn stop_child(child: &mut Child, grace: Duration) -> bool {
    let Ok(pid) = i32::try_from(child.id()) else {
        return true;
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if reap(child, grace).is_some() {
        return true;
    }
    let _ = child.kill();
    reap(child, REAP_WITHIN).is_some()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Pumps for an agent's output: its stdout (into `ticks`, when it prints JSON ticks;
/// else shown as its log, like stderr).
fn agent_pumps(
    child: &mut Child,
    ticks: Option<Lines>,
    t0: Instant,
) -> Vec<std::thread::JoinHandle<()>> {
    let out = if ticks.is_some() {
        "agent"
    } else {
        "agent-log"
    };
    vec![
        pump(out.into(), child.stdout.take().expect("piped"), ticks, t0),
        pump(
            "agent-log".into(),
            child.stderr.take().expect("piped"),
            None,
            t0,
        ),
    ]
}

/// Starts `cgsentry` as the scenario says; its JSON ticks go to `lines`.
fn start_agent(
    spec: &crate::scenario::Agent,
    lines: &Lines,
    t0: Instant,
) -> Result<(Child, Vec<std::thread::JoinHandle<()>>)> {
    let mut child = spawn_in(&spec.cgroup, "/bin/cgsentry", &spec.args)?;
    let pumps = agent_pumps(&mut child, Some(lines.clone()), t0);
    Ok((child, pumps))
}

/// Lines of a guard's output that name one of its actions, with their time since `t0`.
type Hits = Arc<Mutex<Vec<(Duration, String)>>>;

/// Echoes a guard's output lines with a prefix and keeps those containing `action`.
fn pump_text(
    name: String,
    stream: impl std::io::Read + Send + 'static,
    hits: Hits,
    action: String,
    t0: Instant,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            println!("[{name}] {line}");
            if line.contains(&action) {
                hits.lock().unwrap().push((t0.elapsed(), line));
            }
        }
    })
}

/// Starts the scenario's other guard; its action lines go to `hits`.
fn start_guard(spec: &crate::scenario::Guard, hits: &Hits, t0: Instant) -> Result<Running> {
    make_cgroup(&spec.cgroup)?;
    let mut child = spawn_in(&spec.cgroup, &spec.program, &spec.args)?;
    let streams: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped")),
        Box::new(child.stderr.take().expect("piped")),
    ];
    let pumps = streams
        .into_iter()
        .map(|s| pump_text(spec.name.clone(), s, hits.clone(), spec.action.clone(), t0))
        .collect();
    say(&format!("started guard {}: {}", spec.name, spec.program));
    Ok(Running {
        name: spec.name.clone(),
        cgroup: spec.cgroup.clone(),
        role: Role::Observer,
        child,
        exit: None,
        lines: Arc::new(Mutex::new(Vec::new())),
        pumps,
        started: Duration::ZERO,
        unit_started: false,
    })
}

/// `guard_*` metrics from the guard's action lines (times since `t0`; the run started
/// `since` after it) and the memory series.
fn guard_metrics(
    metrics: &mut serde_json::Map<String, Value>,
    hits: &[(Duration, String)],
    since: Duration,
    running: &[(String, Duration)],
    series: &[Value],
) {
    metrics.insert("guard_actions".into(), json!(hits.len()));
    let Some((first, line)) = hits.first() else {
        return;
    };
    let at = first.saturating_sub(since);
    metrics.insert("guard_action_s".into(), json!(at.as_secs_f64()));
    metrics.insert("guard_first_action".into(), json!(line));
    for (cgroup, started) in running {
        if let Some(after) = at.checked_sub(*started) {
            metrics.insert(
                format!("guard_action_after_start_s:{cgroup}"),
                json!(after.as_secs_f64()),
            );
        }
    }
    if let Some(avail) = avail_before(series, at) {
        metrics.insert("mem_available_at_action_mib".into(), json!(avail));
    }
}

/// `MemAvailable` (MiB) in the last sample at or before `at`.
fn avail_before(series: &[Value], at: Duration) -> Option<u64> {
    series
        .iter()
        .take_while(|s| {
            s["t_ms"]
                .as_u64()
                .is_some_and(|t| u128::from(t) <= at.as_millis())
        })
        .last()
        .and_then(|s| s["avail_mib"].as_u64())
}

/// memory.high below max.
fn is_capped(rel: &str) -> bool {
    std::fs::read_to_string(cgroup_dir(rel).join("memory.high")).is_ok_and(|v| v.trim() != "max")
}

/// The limits an operator step must leave as they were (see [`crate::scenario::Operator`]).
const KEPT_LIMITS: [&str; 4] = ["memory.high", "pids.max", "memory.swap.max", "cpu.weight"];

fn limits(rel: &str) -> Vec<Option<String>> {
    KEPT_LIMITS
        .iter()
        .map(|f| std::fs::read_to_string(cgroup_dir(rel).join(f)).ok())
        .collect()
}

/// Processes in `rel` and every cgroup below it (0 once it is gone).
fn procs_below(rel: &str) -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&cgroup_dir(rel), &mut out);
    out
}

/// Whether process `pid` is alive (anywhere: moved out of its cgroup counts too).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Where a scenario's operator step stands: once its condition first held, when, and
/// the processes of its cgroup then.
type OperatorState<'a> = (&'a crate::scenario::Operator, Option<(Duration, Vec<u32>)>);

/// Runs an operator step once its condition has held for its `after_s` (see
/// [`crate::scenario::Operator`]); true once it has run.
fn operator_step(
    (op, since): &mut OperatorState<'_>,
    elapsed: Duration,
    debian: bool,
    metrics: &mut serde_json::Map<String, Value>,
    busy: &mut Vec<(Instant, Instant)>,
) -> bool {
    if since.is_none() && is_capped(&op.when_capped) {
        *since = Some((elapsed, procs_below(&op.when_capped)));
    }
    let Some((at, when_capped)) = since else {
        return false;
    };
    let at = *at;
    if elapsed.saturating_sub(at).as_secs_f64() < op.after_s {
        return false;
    }
    let key = |m: &str| match &op.name {
        Some(n) => format!("{m}:{n}"),
        None => m.to_owned(),
    };
    let shown = format!("{} {}", op.program, op.command.join(" "));
    let before = limits(&op.when_capped);
    // Its processes when it was capped and now, before the command.
    let mut procs_before = procs_below(&op.when_capped);
    procs_before.extend(when_capped.iter());
    procs_before.sort_unstable();
    procs_before.dedup();
    let began = Instant::now();
    let ran = Command::new(&op.program).args(&op.command).output();
    busy.push((began, Instant::now()));
    let took = began.elapsed().as_secs_f64();
    metrics.insert(key("operator_took_s"), json!(took));
    match ran {
        Ok(out) => {
            let code = out.status.code().unwrap_or(-1);
            say(&format!(
                "operator: `{shown}` at {:.1} s: exit {code} after {took:.1} s",
                elapsed.as_secs_f64()
            ));
            for l in String::from_utf8_lossy(&out.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
            {
                say(&format!("operator:   {l}"));
            }
            metrics.insert(key("operator_exit"), json!(code));
        }
        Err(e) => say(&format!("operator: cannot run `{shown}`: {e}")),
    }
    let after = limits(&op.when_capped);
    let left = procs_below(&op.when_capped).len();
    // What `systemctl stop` must end: every process the unit had, wherever it is now.
    let still_alive = procs_before.iter().filter(|p| alive(**p)).count();
    say(&format!(
        "operator: {} after it: {}; {left} processes ({still_alive} of its {} before alive)",
        op.when_capped,
        KEPT_LIMITS
            .iter()
            .zip(&after)
            .map(|(f, v)| format!("{f}={}", v.as_deref().map_or("-", str::trim)))
            .collect::<Vec<_>>()
            .join(" "),
        procs_before.len()
    ));
    metrics.insert(key("operator_s"), json!(elapsed.as_secs_f64()));
    metrics.insert(key("alive_after"), json!(still_alive));
    metrics.insert(key("kept_limits"), json!(before == after));
    metrics.insert(key("procs_after"), json!(left));
    if debian && let Some(unit) = op.when_capped.rsplit('/').next() {
        let shown = Command::new("systemctl")
            .args(["show", "-P", "MemoryHigh", unit])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        say(&format!(
            "operator: systemctl show -P MemoryHigh {unit}: {shown}"
        ));
        metrics.insert(
            key("unit_capped"),
            json!(!shown.is_empty() && shown != "infinity"),
        );
    }
    true
}

fn is_frozen(rel: &str) -> bool {
    std::fs::read_to_string(cgroup_dir(rel).join("cgroup.events"))
        .is_ok_and(|e| e.lines().any(|l| l.trim() == "frozen 1"))
}

/// Where a scenario's agent restart stands.
enum Restart {
    Waiting,
    Killed(Duration),
    Done,
}

/// Runs the scenario and prints `RESULT {json}`.
///
/// # Errors
/// The scenario cannot be read or a cgroup or process cannot be set up.
#[expect(
    clippy::too_many_lines,
    reason = "one linear script: setup, loop, teardown, report"
)]
pub fn vm_run(path: &Path) -> Result<()> {
    let scenario = Scenario::load(path)?;
    say(&format!(
        "booted in {:.1} s; scenario: {}",
        uptime_s(),
        scenario.description
    ));
    let t0 = Instant::now();
    let t0_wall = std::time::SystemTime::now();
    let oom_start = read_kv("/proc/vmstat", "oom_kill").unwrap_or(0);
    let debian = scenario.vm.image == crate::scenario::Image::Debian;

    let mut agent: Option<Running> = None;
    let mut drops: Vec<&crate::scenario::DropFile> = Vec::new();
    // What the run's events (agent restart, operator) add to the result.
    let mut run_metrics = serde_json::Map::new();
    let mut journal_at_start = 0;
    if debian {
        crate::systemd::swap_on();
    }
    if debian && scenario.agent.is_some() {
        // systemd started cgsentry.service (installed with the scenario's policies);
        // its log is followed, its decisions read from its event log at the end.
        let active = crate::systemd::wait_for_agent(Duration::from_mins(2))?;
        say(&format!("cgsentry.service active {active:.1} s after boot"));
        run_metrics.insert("agent_active_after_boot_s".into(), json!(active));
        let mut child = crate::systemd::follow_agent_log()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let pumps = agent_pumps(&mut child, None, t0);
        journal_at_start = crate::systemd::agent_journal_lines();
        agent = Some(Running::agent(
            "/system.slice/cgsentry.service",
            child,
            lines,
            pumps,
        ));
    } else if let Some(spec) = &scenario.agent {
        install_policies(spec)?;
        drops = spec.drops.iter().collect();
        make_cgroup(&spec.cgroup)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (mut child, pumps) = start_agent(spec, &lines, t0)?;
        // Wait for the first tick: the programs are loaded and attached.
        let deadline = Instant::now() + Duration::from_secs(90);
        while lines.lock().unwrap().is_empty() && Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                say(&format!(
                    "agent exited before its first tick: {}",
                    describe(st)
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        say(&format!(
            "agent ready after {:.1} s",
            t0.elapsed().as_secs_f64()
        ));
        agent = Some(Running::agent(&spec.cgroup, child, lines, pumps));
    }

    let hits: Hits = Arc::new(Mutex::new(Vec::new()));
    let mut guard = match &scenario.guard {
        Some(spec) => Some(start_guard(spec, &hits, t0)?),
        None => None,
    };

    for w in scenario.workloads.iter().filter(|_| !debian) {
        make_cgroup(&w.cgroup)?;
        for (file, value) in &w.files {
            std::fs::write(cgroup_dir(&w.cgroup).join(file), value)
                .with_context(|| format!("{}: writing {value:?} to {file}", w.cgroup))?;
            say(&format!("{}: {file} = {value}", w.cgroup));
        }
    }
    let run_start = Instant::now();
    let mut pending: Vec<_> = scenario.workloads.iter().collect();
    let mut running: Vec<Running> = Vec::new();
    let mut series = Vec::new();
    let mut swap_max = 0u64;
    let mut avail_min = u64::MAX;
    let mut mem_peak: BTreeMap<String, u64> = BTreeMap::new();
    let mut cpu_prev: BTreeMap<String, (u64, Duration)> = BTreeMap::new();
    let period = Duration::from_millis(scenario.run.sample_ms.max(10));
    let mut restart = Restart::Waiting;
    // Children still there after a SIGKILL (see [`REAP_WITHIN`]).
    let mut stuck: Vec<String> = Vec::new();
    let mut operators: Vec<OperatorState> = scenario
        .agent
        .iter()
        .flat_map(|a| a.operator.iter().map(|op| (op, None)))
        .collect();
    // When each operator command ran (a daemon-reload busies PID 1 for a second under
    // TCG: the heartbeat's gaps then are the test's own doing, set aside in a metric).
    let mut operator_busy: Vec<(Instant, Instant)> = Vec::new();
    let mut quiet_measured = false;
    let stop_reason = loop {
        let elapsed = run_start.elapsed();
        operators.retain_mut(|op| {
            !operator_step(op, elapsed, debian, &mut run_metrics, &mut operator_busy)
        });
        drops.retain(|d| {
            if elapsed.as_secs_f64() < d.at_s {
                return true;
            }
            let path = Path::new(POLICY_DIR).join(&d.name);
            match std::fs::write(&path, &d.content) {
                Ok(()) => say(&format!("dropped {} into {POLICY_DIR}", d.name)),
                Err(e) => say(&format!("cannot write {}: {e}", path.display())),
            }
            false
        });
        let mut i = 0;
        while i < pending.len() {
            let w = pending[i];
            if elapsed.as_secs_f64() >= w.start_after_s {
                let program = workload_program(w.comm.as_deref())?;
                let mut child = if debian {
                    crate::systemd::spawn_unit(w, &program)?
                } else {
                    spawn_as(&w.cgroup, &program, &w.args, w.uid)?
                };
                let lines = Arc::new(Mutex::new(Vec::new()));
                let pumps = vec![
                    pump(
                        w.name.clone(),
                        child.stdout.take().expect("piped"),
                        Some(lines.clone()),
                        t0,
                    ),
                    pump(
                        w.name.clone(),
                        child.stderr.take().expect("piped"),
                        None,
                        t0,
                    ),
                ];
                say(&format!(
                    "started {} in {}: {} {}",
                    w.name,
                    w.cgroup,
                    w.comm.as_deref().unwrap_or("workload"),
                    w.args.join(" ")
                ));
                if agent.is_some() && debian && w.role == Role::Subject && !quiet_measured {
                    // The journal from the agent's start to the first offender: what
                    // it writes when nothing happens.
                    quiet_measured = true;
                    let secs = t0.elapsed().as_secs_f64();
                    if secs >= 10.0 {
                        let lines =
                            crate::systemd::agent_journal_lines().saturating_sub(journal_at_start);
                        run_metrics.insert(
                            "agent_journal_lines_per_min_quiet".into(),
                            json!(lines as f64 * 60.0 / secs),
                        );
                    }
                }
                running.push(Running {
                    name: w.name.clone(),
                    cgroup: w.cgroup.clone(),
                    role: w.role,
                    child,
                    exit: None,
                    lines,
                    pumps,
                    started: run_start.elapsed(),
                    unit_started: false,
                });
                pending.remove(i);
            } else {
                i += 1;
            }
        }
        for r in &mut running {
            // (A user manager's units are not the system manager's to show: their
            // start is when they were asked for.)
            if debian
                && !r.unit_started
                && crate::systemd::user_manager_uid(&r.cgroup).is_none()
                && let Some(ago) = crate::systemd::unit_started_ago(&r.cgroup)
            {
                // The unit's own start (systemd forked it), not systemd-run's.
                let at = run_start.elapsed().saturating_sub(ago);
                say(&format!(
                    "{} started by systemd at {:.2} s (asked at {:.2} s)",
                    r.name,
                    at.as_secs_f64(),
                    r.started.as_secs_f64()
                ));
                r.started = r.started.max(at);
                r.unit_started = true;
            }
            if r.exit.is_none()
                && let Ok(Some(st)) = r.child.try_wait()
            {
                say(&format!(
                    "{} ended: {} at {:.1} s",
                    r.name,
                    describe(st),
                    elapsed.as_secs_f64()
                ));
                r.exit = Some((elapsed, st));
            }
        }
        if let (Some(spec), Some(a)) = (&scenario.agent, agent.as_mut())
            && let Some(r) = &spec.restart
        {
            match restart {
                Restart::Waiting if is_frozen(&r.when_frozen) => {
                    let _ = a.child.kill(); // SIGKILL: no chance to clean up
                    let st = reap(&mut a.child, REAP_WITHIN);
                    if st.is_none() {
                        stuck.push("agent".to_owned());
                    }
                    say(&format!(
                        "{} is frozen: killed the agent (SIGKILL, {}) at {:.1} s",
                        r.when_frozen,
                        st.map_or_else(|| "?".into(), describe),
                        elapsed.as_secs_f64()
                    ));
                    run_metrics.insert("agent_killed_s".into(), json!(elapsed.as_secs_f64()));
                    restart = Restart::Killed(elapsed);
                }
                Restart::Killed(at) if elapsed.saturating_sub(at).as_secs_f64() >= r.after_s => {
                    let (child, pumps) = start_agent(spec, &a.lines, t0)?;
                    a.child = child;
                    a.pumps.extend(pumps);
                    say(&format!(
                        "agent started again at {:.1} s; {} frozen: {}",
                        elapsed.as_secs_f64(),
                        r.when_frozen,
                        is_frozen(&r.when_frozen)
                    ));
                    run_metrics.insert(
                        format!("frozen_at_restart:{}", r.when_frozen),
                        json!(is_frozen(&r.when_frozen)),
                    );
                    run_metrics.insert("agent_restarts".into(), json!(1));
                    restart = Restart::Done;
                }
                _ => {}
            }
        }
        // Sample the machine.
        let avail = read_kv("/proc/meminfo", "MemAvailable").unwrap_or(0) / 1024;
        let swap = read_kv("/proc/meminfo", "SwapTotal")
            .unwrap_or(0)
            .saturating_sub(read_kv("/proc/meminfo", "SwapFree").unwrap_or(0))
            / 1024;
        avail_min = avail_min.min(avail);
        swap_max = swap_max.max(swap);
        let mut per_cgroup_mib = serde_json::Map::new();
        let mut per_cgroup_cpu = serde_json::Map::new();
        for r in &running {
            let mib = cgroup_value(&r.cgroup, "memory.current", None).unwrap_or(0) >> 20;
            let peak = mem_peak.entry(r.cgroup.clone()).or_default();
            *peak = (*peak).max(mib);
            per_cgroup_mib.insert(r.cgroup.clone(), json!(mib));
            let usage = cgroup_value(&r.cgroup, "cpu.stat", Some("usage_usec")).unwrap_or(0);
            let (prev_usage, prev_t) = cpu_prev
                .insert(r.cgroup.clone(), (usage, elapsed))
                .unwrap_or((usage, elapsed));
            let dt = elapsed.saturating_sub(prev_t).as_micros();
            if dt > 0 {
                let pct = (usage.saturating_sub(prev_usage) as f64) * 100.0 / dt as f64;
                per_cgroup_cpu.insert(r.cgroup.clone(), json!((pct * 10.0).round() / 10.0));
            }
        }
        series.push(
            json!({"t_ms": elapsed.as_millis(), "avail_mib": avail, "swap_mib": swap,
                           "cgroup_mib": per_cgroup_mib, "cgroup_cpu_percent": per_cgroup_cpu}),
        );

        let heartbeat_gap = running
            .iter()
            .filter_map(|r| {
                r.lines.lock().unwrap().last().and_then(|(_, v)| {
                    (v["workload"] == "heartbeat")
                        .then(|| v["max_gap_ms"].as_f64())
                        .flatten()
                })
            })
            .fold(0.0, f64::max);
        if elapsed.as_secs_f64() >= scenario.run.max_s {
            break "max_s reached";
        }
        if scenario.run.stop_when_subjects_exit
            && pending.iter().all(|w| w.role != Role::Subject)
            && running
                .iter()
                .filter(|r| r.role == Role::Subject)
                .all(|r| r.exit.is_some())
        {
            break "all subjects exited";
        }
        if scenario.run.stop_when_heartbeat_gap_ms > 0.0
            && heartbeat_gap >= scenario.run.stop_when_heartbeat_gap_ms
        {
            break "heartbeat gap threshold reached";
        }
        std::thread::sleep(period);
    };
    let duration = run_start.elapsed();
    say(&format!(
        "stopping after {:.1} s: {stop_reason}",
        duration.as_secs_f64()
    ));

    // What survived is decided now, before the runner stops anything.
    let survived: BTreeMap<String, bool> = running
        .iter()
        .map(|r| (r.name.clone(), r.exit.is_none_or(|(_, st)| st.success())))
        .collect();
    let cgroup_ooms: BTreeMap<String, u64> = running
        .iter()
        .map(|r| {
            (
                r.cgroup.clone(),
                cgroup_value(&r.cgroup, "memory.events", Some("oom_kill")).unwrap_or(0),
            )
        })
        .collect();
    let frozen_at_end: BTreeMap<String, bool> = running
        .iter()
        .map(|r| (r.cgroup.clone(), is_frozen(&r.cgroup)))
        .collect();
    let capped_at_end: BTreeMap<String, bool> = running
        .iter()
        .map(|r| (r.cgroup.clone(), is_capped(&r.cgroup)))
        .collect();
    let oom_kills = read_kv("/proc/vmstat", "oom_kill")
        .unwrap_or(0)
        .saturating_sub(oom_start);
    for r in running
        .iter_mut()
        // A unit's process is systemd's child, not ours: every one goes by its cgroup.
        .filter(|r| (r.role == Role::Subject || debian) && r.exit.is_none())
    {
        // cgroup.kill takes the whole subtree, children of a pool included; and where
        // the guard moved the process (a quarantine), that cgroup too, else a
        // quarantined workload would outlive the run.
        let _ = std::fs::write(cgroup_dir(&r.cgroup).join("cgroup.kill"), "1");
        // (The process started may be systemd-run, in the runner's own cgroup.)
        let ours = cgroup_of(std::process::id()).unwrap_or_else(|| "/".into());
        let elsewhere =
            |c: &String| c != &r.cgroup && !ours.starts_with(c.as_str()) && !c.starts_with(&ours);
        if let Some(now) = cgroup_of(r.child.id()).filter(elsewhere) {
            let _ = std::fs::write(cgroup_dir(&now).join("cgroup.kill"), "1");
        }
        if reap(&mut r.child, REAP_WITHIN).is_none() {
            stuck.push(r.name.clone());
        }
    }
    for r in running
        .iter_mut()
        .chain(agent.iter_mut())
        .chain(guard.iter_mut())
    {
        if r.exit.is_none()
            && !stuck.contains(&r.name)
            && !stop_child(&mut r.child, Duration::from_secs(10))
        {
            stuck.push(r.name.clone());
        }
        if stuck.contains(&r.name) {
            // Its pipes stay open while it is there: reading them to the end would hang.
            say(&format!(
                "{} did not exit {} s after SIGKILL: stuck in the kernel",
                r.name,
                REAP_WITHIN.as_secs()
            ));
            continue;
        }
        for p in r.pumps.drain(..) {
            let _ = p.join();
        }
    }

    let mut metrics = serde_json::Map::new();
    metrics.insert("duration_ms".into(), json!(duration.as_millis()));
    metrics.insert("stop_reason".into(), json!(stop_reason));
    if !stuck.is_empty() {
        metrics.insert("stuck_after_kill".into(), json!(stuck));
    }
    metrics.insert("oom_kills".into(), json!(oom_kills));
    metrics.insert("swap_used_max_mib".into(), json!(swap_max));
    metrics.insert("mem_available_min_mib".into(), json!(avail_min));
    let mut heartbeat: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &running {
        let exit = r.exit.map_or_else(
            || "running".to_owned(),
            |(t, st)| format!("{} at {:.1} s", describe(st), t.as_secs_f64()),
        );
        metrics.insert(format!("exit:{}", r.name), json!(exit));
        if let Some((t, _)) = r.exit {
            metrics.insert(format!("exited_s:{}", r.name), json!(t.as_secs_f64()));
        }
        metrics.insert(format!("survived:{}", r.name), json!(survived[&r.name]));
        metrics.insert(
            format!("cgroup_oom_kills:{}", r.cgroup),
            json!(cgroup_ooms[&r.cgroup]),
        );
        metrics.insert(
            format!("frozen_at_end:{}", r.cgroup),
            json!(frozen_at_end[&r.cgroup]),
        );
        metrics.insert(
            format!("capped_at_end:{}", r.cgroup),
            json!(capped_at_end[&r.cgroup]),
        );
        metrics.insert(
            format!("memory_peak_mib:{}", r.cgroup),
            json!(mem_peak.get(&r.cgroup).copied().unwrap_or(0)),
        );
        let lines = r.lines.lock().unwrap();
        // The most a leak said it held: its footprint wherever it is charged (a
        // quarantine's cgroup starts at 0 while the origin keeps what it had).
        let leaked = lines
            .iter()
            .filter(|(_, l)| l["workload"] == "leak")
            .filter_map(|(_, l)| l["mib"].as_u64())
            .max();
        if let Some(mib) = leaked {
            metrics.insert(format!("leak_mib_max:{}", r.name), json!(mib));
            // How far it grew beyond the most its own cgroup was ever charged: what a
            // quarantine (or a cgroup it was moved to) let it take on top.
            let peak = mem_peak.get(&r.cgroup).copied().unwrap_or(0);
            metrics.insert(
                format!("leak_mib_beyond_own_cgroup:{}", r.name),
                json!(mib.saturating_sub(peak)),
            );
        }
        if let Some((_, last)) = lines.last() {
            metrics.insert(format!("last:{}", r.name), last.clone());
            if last["workload"] == "heartbeat" {
                for (field, metric) in HEARTBEAT {
                    let v = last[field].as_f64().unwrap_or(0.0);
                    let worst = heartbeat.entry(metric).or_insert(v);
                    *worst = worst.max(v);
                }
                let busy: Vec<(Duration, Duration)> = operator_busy
                    .iter()
                    .map(|(a, b)| {
                        (
                            a.saturating_duration_since(t0),
                            b.saturating_duration_since(t0),
                        )
                    })
                    .collect();
                let v = max_gap_outside(&lines, &busy);
                let worst = heartbeat
                    .entry("heartbeat_max_gap_ms_outside_operators")
                    .or_insert(v);
                *worst = worst.max(v);
            }
        }
    }
    for (metric, v) in heartbeat {
        metrics.insert(metric.into(), json!(v));
    }
    metrics.extend(run_metrics);
    if debian && agent.is_some() {
        // What the agent wrote to the journal while the scenario ran, per minute.
        let lines = crate::systemd::agent_journal_lines();
        metrics.insert("agent_journal_lines".into(), json!(lines));
        let minutes = (duration.as_secs_f64() / 60.0).max(1.0 / 60.0);
        metrics.insert(
            "agent_journal_lines_per_min".into(),
            json!(lines.saturating_sub(journal_at_start) as f64 / minutes),
        );
        // What the agent cost under its unit's own CPU quota, and how often the quota
        // held it back.
        let svc = "/system.slice/cgsentry.service";
        for (key, metric) in [
            ("usage_usec", "agent_cpu_ms"),
            ("throttled_usec", "agent_cpu_throttled_ms"),
            ("nr_throttled", "agent_cpu_nr_throttled"),
        ] {
            if let Some(v) = cgroup_value(svc, "cpu.stat", Some(key)) {
                let v = if key.ends_with("usec") { v / 1000 } else { v };
                metrics.insert(metric.into(), json!(v));
            }
        }
        if let Some(a) = &agent {
            // Every cgroup the scenario names (and those above them) is one the agent
            // saw: what it never did there counts 0, as the busybox agent's ticks say.
            let mut seen: Vec<String> = vec![a.cgroup.clone()];
            for w in &scenario.workloads {
                let mut p = w.cgroup.trim_end_matches('/').to_owned();
                while !p.is_empty() {
                    seen.push(p.clone());
                    p.truncate(p.rfind('/').unwrap_or(0));
                }
            }
            // And every cgroup an expectation names (sshd's service: what the agent
            // never did there must count 0 too).
            for key in scenario.expect.keys() {
                if let Some(("agent_decisions" | "agent_findings", rest)) = key.split_once(':')
                    && let Some((_, path)) = rest.split_once(':')
                {
                    seen.push(path.to_owned());
                }
            }
            seen.sort();
            seen.dedup();
            let listed =
                json!({"cgroups": seen.iter().map(|p| json!({"path": p})).collect::<Vec<_>>()});
            let mut lines = vec![(run_start.duration_since(t0), listed)];
            lines.extend(crate::systemd::agent_events(
                Path::new(crate::systemd::EVENT_LOG),
                t0_wall,
            ));
            *a.lines.lock().unwrap() = lines;
        }
    }
    if let Some(agent) = &agent {
        agent_metrics(
            &mut metrics,
            &agent.lines.lock().unwrap(),
            run_start.duration_since(t0),
        );
    }
    if guard.is_some() {
        let started: Vec<(String, Duration)> = running
            .iter()
            .map(|r| (r.cgroup.clone(), r.started))
            .collect();
        guard_metrics(
            &mut metrics,
            &hits.lock().unwrap(),
            run_start.duration_since(t0),
            &started,
            &series,
        );
    }
    // Time to containment from the moment the offender was really started (the runner
    // starts workloads on its sampling period, so up to `sample_ms` after start_after_s).
    for r in &running {
        metrics.insert(
            format!("started_s:{}", r.name),
            json!(r.started.as_secs_f64()),
        );
        if let Some(at) = metrics
            .get(&format!("agent_contained_s:{}", r.cgroup))
            .and_then(Value::as_f64)
        {
            metrics.insert(
                format!("agent_contained_after_start_s:{}", r.cgroup),
                json!(at - r.started.as_secs_f64()),
            );
            if let Some(avail) = avail_before(&series, Duration::from_secs_f64(at.max(0.0))) {
                metrics
                    .entry("mem_available_at_action_mib")
                    .or_insert_with(|| json!(avail));
            }
        }
    }
    let result = json!({"metrics": metrics, "series": series});
    println!("RESULT {result}");
    Ok(())
}

const POLICY_DIR: &str = "/etc/cgsentry/policies.d";
const SHIPPED_POLICIES: &str = "/usr/share/cgsentry/policies";

/// The scenario's policy set in /etc/cgsentry/policies.d: the shipped files if asked
/// for, then the scenario's own.
fn install_policies(spec: &crate::scenario::Agent) -> Result<()> {
    std::fs::create_dir_all(POLICY_DIR).with_context(|| format!("creating {POLICY_DIR}"))?;
    if spec.shipped_policies {
        for entry in std::fs::read_dir(SHIPPED_POLICIES).with_context(|| {
            format!("{SHIPPED_POLICIES}: the initramfs lacks the shipped policies")
        })? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, Path::new(POLICY_DIR).join(name))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
    }
    for (name, content) in &spec.policy_files {
        std::fs::write(Path::new(POLICY_DIR).join(name), content)
            .with_context(|| format!("writing {POLICY_DIR}/{name}"))?;
    }
    let names: Vec<String> = std::fs::read_dir(POLICY_DIR)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    say(&format!("policies in {POLICY_DIR}: {}", names.join(", ")));
    Ok(())
}

/// From the agent's JSON ticks after the workloads started: how many, which cgroup
/// was most often on top, and each cgroup's median CPU %.
fn agent_metrics(
    metrics: &mut serde_json::Map<String, Value>,
    ticks: &[(Duration, Value)],
    since: Duration,
) {
    finding_metrics(metrics, ticks, since);
    let ticks: Vec<&Value> = ticks
        .iter()
        .filter(|(t, _)| *t > since + Duration::from_secs(1))
        .map(|(_, v)| v)
        .collect();
    metrics.insert("agent_ticks".into(), json!(ticks.len()));
    if let Some(last) = ticks.last() {
        let e = &last["ebpf"];
        let dropped: u64 = [
            "cgroup_map_full",
            "read_errors",
            "update_errors",
            "clock_backwards",
        ]
        .iter()
        .filter_map(|k| e[*k].as_u64())
        .sum();
        metrics.insert("agent_ebpf_dropped".into(), json!(dropped));
        metrics.insert(
            "agent_ebpf_evicted".into(),
            json!(e["cgroup_evictions"].as_u64().unwrap_or(0)),
        );
    }
    let mut tops: BTreeMap<String, usize> = BTreeMap::new();
    let mut cpu: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for tick in &ticks {
        let cgroups = tick["cgroups"].as_array().cloned().unwrap_or_default();
        if let Some(top) = cgroups.first().and_then(|c| c["path"].as_str()) {
            *tops.entry(top.to_owned()).or_default() += 1;
        }
        for c in &cgroups {
            if let Some(p) = c["path"].as_str() {
                cpu.entry(p.to_owned()).or_default();
            }
        }
        for (path, values) in &mut cpu {
            let v = cgroups
                .iter()
                .find(|c| c["path"].as_str() == Some(path))
                .and_then(|c| c["cpu_percent"].as_f64())
                .unwrap_or(0.0);
            values.push(v);
        }
    }
    // Sums over the ticks: reclaim stall and forks per cgroup, OOM kills seen.
    let mut reclaim: BTreeMap<String, f64> = BTreeMap::new();
    let mut forks: BTreeMap<String, u64> = BTreeMap::new();
    let mut victims: Vec<Value> = Vec::new();
    for tick in &ticks {
        for c in tick["cgroups"].as_array().into_iter().flatten() {
            let Some(p) = c["path"].as_str() else {
                continue;
            };
            *reclaim.entry(p.to_owned()).or_default() +=
                c["reclaim_stall_ms"].as_f64().unwrap_or(0.0);
            *forks.entry(p.to_owned()).or_default() += c["forks"].as_u64().unwrap_or(0);
        }
        victims.extend(
            tick["events"]["oom_victims"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
    }
    for (p, ms) in reclaim {
        metrics.insert(format!("agent_reclaim_ms:{p}"), json!(ms));
    }
    for (p, n) in forks {
        metrics.insert(format!("agent_forks:{p}"), json!(n));
    }
    metrics.insert("agent_oom_victims".into(), json!(victims.len()));
    if let Some(v) = victims.first() {
        metrics.insert("agent_oom_victim_cgroup".into(), v["cgroup"].clone());
    }
    if let Some((top, _)) = tops.iter().max_by_key(|(_, n)| **n) {
        metrics.insert("agent_top_cgroup".into(), json!(top));
    }
    for (path, values) in cpu {
        // Cgroups first seen late have fewer samples; pad with zeros for the ticks before.
        let mut v = vec![0.0; ticks.len().saturating_sub(values.len())];
        v.extend(values);
        metrics.insert(format!("agent_cpu_percent:{path}"), json!(median(v)));
    }
}

/// Finding kinds the agent reports (its `detect::FindingKind` names).
const FINDING_KINDS: [&str; 5] = [
    "leak",
    "runaway",
    "explosion",
    "pressure",
    "single_thread_saturation",
];

/// From every tick since the workloads started: `agent_findings:<kind>:<cgroup>` ticks
/// with that finding (0 for every cgroup the agent saw, so "never" can be asserted),
/// `agent_finding_s:<kind>:<cgroup>` seconds from the start to the first one,
/// `agent_decisions:<action>:<cgroup>` and `agent_decision_s:<action>:<cgroup>` likewise
/// for decisions, `agent_contained_s:<cgroup>` to the first decision beyond notify,
/// `agent_actions:<action>:<cgroup>` and `agent_action_s:…` for what the containment stage
/// reported (adopt, relax, release and the steps), `agent_policy_errors` the most policy errors any tick reported,
/// `agent_first_stall_s:<cgroup>` to the first tick in which the cgroup stalled in
/// reclaim (the first sign of memory pressure the agent has), `agent_reaction_s:<cgroup>`
/// from that stall to the first decision beyond notify (negative: it acted before any
/// stall), and `agent_cpu_percent_tail:<cgroup>` the median CPU % over the last 10 s of
/// ticks.
fn finding_metrics(
    metrics: &mut serde_json::Map<String, Value>,
    ticks: &[(Duration, Value)],
    since: Duration,
) {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (t, tick) in ticks.iter().filter(|(t, _)| *t >= since) {
        let secs = t.saturating_sub(since).as_secs_f64();
        for c in tick["cgroups"].as_array().into_iter().flatten() {
            if let Some(p) = c["path"].as_str() {
                if c["reclaim_stall_ms"].as_f64().is_some_and(|ms| ms > 0.0) {
                    metrics
                        .entry(format!("agent_first_stall_s:{p}"))
                        .or_insert_with(|| json!(secs));
                }
                for k in FINDING_KINDS {
                    counts.entry(format!("agent_findings:{k}:{p}")).or_default();
                }
                for a in ACTIONS {
                    counts
                        .entry(format!("agent_decisions:{a}:{p}"))
                        .or_default();
                }
            }
        }
        let errors = tick["policy_errors"].as_array().map_or(0, Vec::len) as u64;
        let worst = metrics
            .get("agent_policy_errors")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        metrics.insert("agent_policy_errors".into(), json!(worst.max(errors)));
        for f in tick["findings"].as_array().into_iter().flatten() {
            let f = &f["finding"];
            let (Some(kind), Some(cgroup)) = (f["kind"].as_str(), f["cgroup"].as_str()) else {
                continue;
            };
            *counts
                .entry(format!("agent_findings:{kind}:{cgroup}"))
                .or_default() += 1;
            metrics
                .entry(format!("agent_finding_s:{kind}:{cgroup}"))
                .or_insert_with(|| json!(secs));
        }
        for d in tick["decisions"].as_array().into_iter().flatten() {
            let (Some(action), Some(cgroup)) = (d["action"].as_str(), d["cgroup"].as_str()) else {
                continue;
            };
            *counts
                .entry(format!("agent_decisions:{action}:{cgroup}"))
                .or_default() += 1;
            metrics
                .entry(format!("agent_decision_s:{action}:{cgroup}"))
                .or_insert_with(|| json!(secs));
            if action != "notify" {
                metrics
                    .entry(format!("agent_contained_s:{cgroup}"))
                    .or_insert_with(|| json!(secs));
            }
        }
        // What the containment stage did (adopt, relax, release, and each step).
        for a in tick["actions"].as_array().into_iter().flatten() {
            let (Some(action), Some(cgroup)) = (a["action"].as_str(), a["cgroup"].as_str()) else {
                continue;
            };
            *counts
                .entry(format!("agent_actions:{action}:{cgroup}"))
                .or_default() += 1;
            metrics
                .entry(format!("agent_action_s:{action}:{cgroup}"))
                .or_insert_with(|| json!(secs));
        }
    }
    for (k, n) in counts {
        metrics.insert(k, json!(n));
    }
    let reactions: Vec<(String, f64)> = metrics
        .iter()
        .filter_map(|(k, v)| {
            let cgroup = k.strip_prefix("agent_contained_s:")?;
            let stall = metrics.get(&format!("agent_first_stall_s:{cgroup}"))?;
            Some((cgroup.to_owned(), v.as_f64()? - stall.as_f64()?))
        })
        .collect();
    for (cgroup, s) in reactions {
        metrics.insert(format!("agent_reaction_s:{cgroup}"), json!(s));
    }
    let Some(end) = ticks.last().map(|(t, _)| *t) else {
        return;
    };
    let mut tail: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (_, tick) in ticks
        .iter()
        .filter(|(t, _)| *t >= since && *t + Duration::from_secs(10) >= end)
    {
        for c in tick["cgroups"].as_array().into_iter().flatten() {
            if let (Some(p), Some(cpu)) = (c["path"].as_str(), c["cpu_percent"].as_f64()) {
                tail.entry(p.to_owned()).or_default().push(cpu);
            }
        }
    }
    for (p, v) in tail {
        metrics.insert(format!("agent_cpu_percent_tail:{p}"), json!(median(v)));
    }
}

/// Ladder actions (the agent's `policy::Action` names).
const ACTIONS: [&str; 5] = ["notify", "throttle", "quarantine", "freeze", "kill"];

#[cfg(test)]
mod tests {
    /// A gap in a second an operator command ran in is set aside; one a second after it
    /// ended is not, nor is one before it began.
    #[test]
    fn heartbeat_gaps_beside_operators() {
        let s = Duration::from_secs_f64;
        let line = |at: f64, gap: f64| (s(at), serde_json::json!({ "recent_max_gap_ms": gap }));
        let lines = vec![
            line(1.0, 120.0),
            line(2.0, 180.0),
            line(3.0, 310.0), // the reload, 2.5-2.9 s
            line(4.0, 150.0),
            line(5.0, 230.0),
        ];
        let busy = [(s(2.5), s(2.9))];
        assert!((super::max_gap_outside(&lines, &busy) - 230.0).abs() < 1e-9);
        assert!((super::max_gap_outside(&lines[..4], &busy) - 180.0).abs() < 1e-9);
        // Nothing set aside without operators; lines without the field count for nothing.
        assert!((super::max_gap_outside(&lines, &[]) - 310.0).abs() < 1e-9);
        let old = vec![(s(1.0), serde_json::json!({ "max_gap_ms": 900.0 }))];
        assert!(super::max_gap_outside(&old, &busy).abs() < 1e-9);
    }

    use super::*;

    /// `reap` gives up on a child that is still there, and `stop_child` ends one that
    /// minds SIGTERM, or one that ignores it by SIGKILL, within its grace.
    #[test]
    fn reaping_is_bounded() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let t = Instant::now();
        assert!(reap(&mut child, Duration::from_millis(200)).is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(stop_child(&mut child, Duration::from_secs(5)));
        let mut deaf = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200)); // the trap is set
        let t = Instant::now();
        assert!(stop_child(&mut deaf, Duration::from_millis(300)));
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < REAP_WITHIN,
            "{took:?}"
        );
    }

    fn tick(cgroups: &[(&str, f64)]) -> Value {
        let cgroups: Vec<Value> = cgroups
            .iter()
            .map(|(p, c)| json!({"path": p, "cpu_percent": c}))
            .collect();
        json!({"cgroups": cgroups, "ebpf": {"cgroup_map_full": 0, "read_errors": 1, "update_errors": 0, "clock_backwards": 0}})
    }

    #[test]
    fn a_guard_action_is_timed_from_the_run_and_the_workload_start() {
        let ms = Duration::from_millis;
        let series: Vec<Value> = [(0, 900), (500, 400), (1000, 90), (1500, 600)]
            .iter()
            .map(|(t, a)| json!({"t_ms": t, "avail_mib": a}))
            .collect();
        let hits = vec![
            (
                ms(3200),
                "sending SIGTERM to process 101 \"workload\"".to_owned(),
            ),
            (ms(3900), "sending SIGKILL to process 101".to_owned()),
        ];
        let mut m = serde_json::Map::new();
        // The run started 2 s after t0; /leak 0.2 s into the run, /late after the action.
        let running = vec![
            ("/leak".to_owned(), ms(200)),
            ("/late".to_owned(), ms(5000)),
        ];
        guard_metrics(&mut m, &hits, ms(2000), &running, &series);
        assert_eq!(m["guard_actions"], json!(2));
        assert_eq!(m["guard_action_s"], json!(1.2));
        assert_eq!(m["guard_action_after_start_s:/leak"], json!(1.0));
        assert!(!m.contains_key("guard_action_after_start_s:/late"));
        assert_eq!(m["mem_available_at_action_mib"], json!(90));
        assert!(
            m["guard_first_action"]
                .as_str()
                .unwrap()
                .contains("SIGTERM")
        );

        let mut none = serde_json::Map::new();
        guard_metrics(&mut none, &[], ms(0), &running, &series);
        assert_eq!(none["guard_actions"], json!(0));
        assert!(
            !none.contains_key("guard_action_s"),
            "a guard that never acted"
        );
    }

    #[test]
    fn finding_metrics_count_ticks_and_time_the_first() {
        let s = Duration::from_secs;
        let with = |kind: &str, cgroup: &str| {
            json!({"cgroups": [{"path": cgroup}, {"path": "/calm"}],
                   "findings": [{"finding": {"kind": kind, "cgroup": cgroup}}],
                   "decisions": [{"action": "freeze", "cgroup": cgroup}],
                   "actions": [{"action": "relax", "cgroup": cgroup}]})
        };
        let ticks = vec![
            (s(1), with("leak", "/early")), // before the start: ignored
            (
                s(5),
                json!({"cgroups": [{"path": "/pool", "reclaim_stall_ms": 0.0}], "findings": []}),
            ),
            (
                s(5) + Duration::from_millis(500),
                json!({"cgroups": [{"path": "/pool", "reclaim_stall_ms": 12.5}], "findings": []}),
            ),
            (s(6), with("explosion", "/pool")),
            (s(7), with("explosion", "/pool")),
        ];
        let mut m = serde_json::Map::new();
        finding_metrics(&mut m, &ticks, s(4));
        assert_eq!(m["agent_findings:explosion:/pool"], json!(2));
        assert_eq!(m["agent_finding_s:explosion:/pool"], json!(2.0));
        assert_eq!(m["agent_decision_s:freeze:/pool"], json!(2.0));
        assert_eq!(m["agent_decisions:freeze:/pool"], json!(2));
        assert_eq!(m["agent_decisions:kill:/pool"], json!(0));
        assert_eq!(m["agent_contained_s:/pool"], json!(2.0));
        assert_eq!(m["agent_first_stall_s:/pool"], json!(1.5));
        assert_eq!(m["agent_reaction_s:/pool"], json!(0.5));
        assert!(!m.contains_key("agent_reaction_s:/calm"), "never stalled");
        assert_eq!(m["agent_actions:relax:/pool"], json!(2));
        assert_eq!(m["agent_action_s:relax:/pool"], json!(2.0));
        assert_eq!(
            m["agent_findings:leak:/calm"],
            json!(0),
            "seen, never found"
        );
        assert!(!m.contains_key("agent_finding_s:leak:/early"));
    }

    #[test]
    fn agent_metrics_take_ticks_after_the_start() {
        let s = Duration::from_secs;
        let ticks = vec![
            (s(1), tick(&[("/cgsentry", 50.0)])), // before the workloads: ignored
            (s(5), tick(&[("/spin", 90.0), ("/", 1.0)])),
            (s(6), tick(&[("/spin", 100.0)])),
            (s(7), tick(&[("/", 3.0), ("/spin", 2.0)])),
        ];
        let mut m = serde_json::Map::new();
        agent_metrics(&mut m, &ticks, s(2));
        assert_eq!(m["agent_ticks"], json!(3));
        assert_eq!(m["agent_top_cgroup"], json!("/spin"));
        assert_eq!(m["agent_cpu_percent:/spin"], json!(90.0));
        // "/" was absent from one tick: that tick counts as 0 → median of [0, 1, 3].
        assert_eq!(m["agent_cpu_percent:/"], json!(1.0));
        assert_eq!(m["agent_ebpf_dropped"], json!(1));
        assert!(!m.contains_key("agent_cpu_percent:/cgsentry"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn proc_key_values() {
        let dir = std::env::temp_dir().join(format!("wl-kv-{}", std::process::id()));
        std::fs::write(
            &dir,
            "MemTotal:  1000 kB\nMemAvailable:   512 kB\noom_kill 3\n",
        )
        .unwrap();
        let p = dir.to_str().unwrap();
        assert_eq!(read_kv(p, "MemAvailable"), Some(512));
        assert_eq!(read_kv(p, "oom_kill"), Some(3));
        assert_eq!(read_kv(p, "Missing"), None);
        std::fs::remove_file(&dir).unwrap();
    }
}
