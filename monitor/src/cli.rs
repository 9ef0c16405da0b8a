//! Command line (clap derive). Help texts teach: what, unit, default, example.
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cgsentry",
    version,
    about = "Per-cgroup resource guard: sees runaway loops, leaks and process explosions \
             in the kernel (eBPF) and contains them before the OOM killer acts",
    after_help = "Run as root. Logs go to stderr (filter with RUST_LOG, e.g. RUST_LOG=debug); \
                  tables and JSON go to stdout."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs and show the busiest cgroups every tick (Ctrl-C stops,
    /// detaching everything).
    Run(RunArgs),
    /// Validate the main file and policy files; print every error as
    /// `file:line:col: message` (exit status 1), or with `--print` the merged policy in
    /// effect.
    #[command(
        after_help = "Examples:\n  cgsentry check                         # /etc/cgsentry/cgsentry.toml and its policies.d\n  \
cgsentry check /etc/cgsentry/policies.d/50-batch-pool.toml\n  \
cgsentry check ./policies --print      # a directory of policy files, merged"
    )]
    Check(CheckArgs),
    /// Explain what the running agent sees: findings with their evidence, the rule that
    /// matched, protection, and where the action ladder stands.
    #[command(
        after_help = "Examples:\n  cgsentry explain                  # everything\n  \
cgsentry explain /user.slice      # a cgroup and everything below it\n  \
cgsentry explain 4242             # the cgroup of process 4242"
    )]
    Explain(ExplainArgs),
    /// The running agent's health: ticks, policy in force (and its errors), what it holds
    /// applied, eBPF drops, outputs, notifications.
    Status(StatusArgs),
    /// Undo at once everything the agent applied to a cgroup (limits, freeze,
    /// quarantine), whichever rule applied it, and leave the cgroup alone for a while
    /// (--hold-off): its findings are still reported, but no ladder starts on it until
    /// then; after that a finding still present starts its ladder from the first step.
    #[command(
        after_help = "Examples:\n  cgsentry release /system.slice/batch.service\n  cgsentry release /system.slice/train.service --hold-off 2h   # a run the operator vouches for\n  cgsentry release /system.slice/batch.service --hold-off 0    # undo only; lift a hold-off\n  cgsentry release --all                                       # everything, on every cgroup\n  systemctl stop cgsentry && cgsentry release --all --offline  # from the journal, no agent"
    )]
    Release(ReleaseArgs),
    /// Live view: cgroups sorted by pressure with 5-minute CPU and memory sparklines,
    /// findings, and what the agent holds applied (q, Esc or Ctrl-C quits).
    Top(TopArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    /// The cgroup (as `cgsentry status` lists it), or its quarantine cgroup.
    #[arg(
        value_name = "CGROUP",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub cgroup: Option<String>,
    /// Everything the agent holds applied, on every cgroup (each then held off as
    /// --hold-off says).
    #[arg(long)]
    pub all: bool,
    /// With --all, when no agent runs (stopped for an uninstall, or dead): undo what the
    /// journal in --journal-dir records, directly. Refused while an agent answers on
    /// the socket (it would take its steps again).
    #[arg(long, conflicts_with = "cgroup")]
    pub offline: bool,
    /// The journal an --offline release reads (the agent's --journal-dir).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cgsentry")]
    pub journal_dir: std::path::PathBuf,
    /// How long no ladder starts on the cgroup after the release (`0`: none; a finding
    /// still present starts over at once, with its first step's own delay). Also lifts
    /// or renews an earlier hold-off. Up to 7 days.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_hold_off)]
    pub hold_off: Duration,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
    /// Refresh period.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub every: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// A cgroup path (`/system.slice/app.service`, with what is below it) or a pid.
    #[arg(value_name = "CGROUP|PID")]
    pub target: Option<String>,

    /// The running agent's `--state-dir`.
    #[arg(long, value_name = "DIR", default_value = crate::explain::DEFAULT_STATE_DIR)]
    pub state_dir: std::path::PathBuf,

    /// Print the agent's state file (JSON) instead of the text.
    #[arg(long)]
    pub json: bool,

    /// Ask the agent on its control socket first (the state file is the fallback).
    /// Default: `control.sock` in the state directory.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// What to check: a main file (`cgsentry.toml`, with the policy directory it names),
    /// a directory (its `cgsentry.toml` if present, and its `*.toml` policy files or its
    /// `policies.d/`), or one policy file.
    #[arg(value_name = "PATH", default_value = crate::policy::DEFAULT_MAIN)]
    pub path: std::path::PathBuf,

    /// Print the merged, effective policy (defaults filled in) as TOML on success.
    #[arg(long)]
    pub print: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Time between ticks: `1s`, `500ms`, `2` (seconds). Between 50ms and 1h.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,

    /// Rows in the table: the N busiest cgroups.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,

    /// Print the whole snapshot as one JSON object per tick (machine, every cgroup with
    /// its eBPF counters and control files, processes, lifecycle events, and the tick's
    /// findings, decisions and releases) instead of the table.
    #[arg(long)]
    pub json: bool,

    /// With --json: only the N busiest cgroups, and every cgroup a finding, decision,
    /// release or action of the tick names (0: every cgroup). On a host with thousands
    /// of cgroups the whole tree is megabytes a tick.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub json_top: usize,

    /// The main configuration file; it names the policy directory (default: the
    /// `policies.d` next to it). Absent: built-in defaults and no rules. A broken set is
    /// logged and the last good one kept; edits are picked up within a tick, or at once
    /// on SIGHUP.
    #[arg(long, value_name = "PATH", default_value = crate::policy::DEFAULT_MAIN)]
    pub config: std::path::PathBuf,

    /// Where the agent keeps `state.json` (findings, decisions) for `cgsentry explain`.
    #[arg(long, value_name = "DIR", default_value = crate::explain::DEFAULT_STATE_DIR)]
    pub state_dir: std::path::PathBuf,

    /// Where the agent journals what it applied (limits it replaced, processes it moved,
    /// cgroups it froze), so that a restarted agent re-adopts or undoes it.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cgsentry")]
    pub journal_dir: std::path::PathBuf,

    /// Stop after N ticks (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "N")]
    pub ticks: Option<u64>,

    /// Cgroups the eBPF side can track at once. Deleted cgroups are forgotten every
    /// tick; if more than this many are active, the least recently active one's entry is
    /// evicted for each new one (its counts start over when it runs again) and counted
    /// ("evicted" in the table, `ebpf.cgroup_evictions` in JSON,
    /// `cgsentry_ebpf_cgroup_evictions_total`).
    #[arg(long, value_name = "N", default_value_t = monitor_common::CGROUP_STATS_MAX_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub cgroup_map_capacity: u32,

    /// Rescan all of /proc for the process table every N ticks. In between,
    /// fork/exec/exit events keep it current (new processes are read in the tick after
    /// they appear) and the processes of the busiest cgroups are re-read every tick.
    /// 1 = every tick (costly with thousands of processes).
    #[arg(long, value_name = "N", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub proc_scan_every: u32,

    /// Between ticks, read the available memory this often; when it falls fast enough to reach
    /// the reserve within 30 s, tick at once (and every period while it falls), so a
    /// burst like incident D's is contained within a second. `0` turns it off.
    #[arg(long, default_value = "100ms", value_parser = parse_watch)]
    pub watch_every: Duration,

    /// NVML, for GPU memory and utilisation per device, process and cgroup: a path to
    /// `libnvidia-ml.so.1`, or `off`. Default: the loader's search path. Without it
    /// (no NVIDIA driver, no GPU) the agent says so once and runs without GPU data.
    #[arg(long, value_name = "PATH|off")]
    pub nvml_lib: Option<std::path::PathBuf>,

    /// The event log: every finding (when it appears, changes or clears), decision,
    /// action, release, error and policy reload as one JSON line, with evidence.
    /// Rotated by size. `off` turns it off.
    #[arg(long, value_name = "PATH|off", default_value = crate::eventlog::DEFAULT_PATH)]
    pub event_log: std::path::PathBuf,

    /// Rotate the event log at this size (MiB).
    #[arg(long, value_name = "MiB", default_value_t = crate::eventlog::DEFAULT_MAX_MIB,
          value_parser = clap::value_parser!(u64).range(1..=10_240))]
    pub event_log_max_mib: u64,

    /// Rotated event logs kept (`events.jsonl.1` … `.N`).
    #[arg(long, value_name = "N", default_value_t = crate::eventlog::DEFAULT_KEEP,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub event_log_keep: u32,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (`OpenMetrics` text). Keep it on
    /// loopback unless a firewall guards the port; `off` turns it off.
    #[arg(long, value_name = "ADDR|off", default_value = crate::metrics::DEFAULT_LISTEN)]
    pub metrics_listen: String,

    /// The last 5 minutes, one line per tick, rewritten every tick (for `watch cat` or
    /// `tail -F`). `off` turns it off.
    #[arg(long, value_name = "PATH|off", default_value = crate::history::DEFAULT_PATH)]
    pub history_file: std::path::PathBuf,

    /// The control socket for `cgsentry status`, `explain`, `release` and `top` (mode
    /// 0600, root only). Default: `control.sock` in the state directory
    /// (`/run/cgsentry/control.sock`). `off` turns it off.
    #[arg(long, value_name = "PATH|off")]
    pub control_socket: Option<std::path::PathBuf>,
}

/// `None` for `off`.
#[must_use]
pub fn unless_off(p: &std::path::Path) -> Option<std::path::PathBuf> {
    (p.as_os_str() != "off").then(|| p.to_owned())
}

/// `0` (off) or an interval as for `--interval`.
fn parse_watch(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_interval(s)
}

/// `1s`, `250ms`, `1m`, or a bare number of seconds (`2`, `0.5`).
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("{s:?} is not a positive duration")),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d < Duration::from_millis(50) || d > Duration::from_hours(1) {
        return Err(format!("{s:?}: the interval must be between 50ms and 1h"));
    }
    Ok(d)
}

fn parse_hold_off(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d > Duration::from_hours(7 * 24) {
        return Err(format!("{s:?}: a hold-off is at most 7 days"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_offs() {
        assert_eq!(parse_hold_off("0"), Ok(Duration::ZERO));
        assert_eq!(parse_hold_off("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_hold_off("2h"), Ok(Duration::from_hours(2)));
        assert!(parse_hold_off("8days").unwrap_err().contains("7 days"));
        assert!(parse_hold_off("soon").is_err());
        let cli = Cli::try_parse_from(["cgsentry", "release", "/a"]).unwrap();
        let Command::Release(r) = cli.command else {
            panic!("not a release: {cli:?}");
        };
        assert_eq!(r.hold_off, Duration::from_mins(10), "the default");
        assert_eq!(r.cgroup.as_deref(), Some("/a"));
        // --all instead of a cgroup; --offline only with --all; one of them is needed.
        let cli = Cli::try_parse_from(["cgsentry", "release", "--all", "--offline"]).unwrap();
        let Command::Release(r) = cli.command else {
            panic!("not a release: {cli:?}");
        };
        assert!(r.all && r.offline && r.cgroup.is_none());
        for bad in [
            &["cgsentry", "release"][..],
            &["cgsentry", "release", "/a", "--all"],
            &["cgsentry", "release", "/a", "--offline"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("10ms").unwrap_err().contains("between"));
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("soon").is_err());
        assert!(parse_interval("NaN").is_err());
        assert_eq!(parse_watch("0"), Ok(Duration::ZERO));
        assert_eq!(parse_watch("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_watch("1ms").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["cgsentry", "run", "--top", "3", "--json", "--ticks", "2"])
            .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!((args.top, args.json, args.ticks), (3, true, Some(2)));
        assert_eq!(args.interval, Duration::from_secs(1));
    }
}
