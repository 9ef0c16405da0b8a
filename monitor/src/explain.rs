//! What the agent currently thinks, for people: the state file the agent rewrites every
//! tick (`<state_dir>/state.json`) and `cgsentry explain`, which reads and renders it —
//! the findings, their evidence, the rule that matched, protection, and where the
//! ladder stands.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    decide::{Decider, Decision, LadderState, Release},
    detect::Finding,
    policy::{Action, Diagnostic, PolicySet, ProcessRef},
};

/// Default directory of the state file.
pub const DEFAULT_STATE_DIR: &str = "/run/cgsentry";

/// One finding with the policy's judgement of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    pub finding: Finding,
    pub rule: Option<String>,
    pub rule_source: Option<PathBuf>,
    pub ladder_len: usize,
    pub protected_by: Vec<String>,
    pub severe_enough: bool,
    pub dry_run: bool,
    /// Where the ladder stands for this cgroup and rule.
    pub ladder: Option<LadderState>,
    /// The next step and the earliest second it can be taken (agent clock).
    pub next: Option<(Action, f64)>,
    /// Rules for this finding and cgroup passed over because their GPU conditions do
    /// not hold (later rules win, so these would otherwise have applied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_unmet: Vec<String>,
    /// Released by the operator with a hold-off: no ladder starts before this second
    /// (agent clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_off_until: Option<f64>,
    /// Container and pod of the finding's cgroup, read from its path.
    #[serde(default, skip_serializing_if = "crate::identity::Identity::is_empty")]
    pub identity: crate::identity::Identity,
    /// Why no step beyond `notify` is taken on this cgroup whatever the rule says (a
    /// safety invariant: see [`crate::safety`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A decision with the agent-clock second it was taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logged<T> {
    pub at: f64,
    #[serde(flatten)]
    pub item: T,
}

/// The agent's view, rewritten every tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Wall clock of the tick, ms since the epoch.
    pub timestamp_ms: u128,
    /// Agent clock (seconds since start) of the tick.
    pub t: f64,
    pub interval_ms: u64,
    pub policy_files: Vec<PathBuf>,
    pub rules: usize,
    pub dry_run: bool,
    /// The last reload's problems (the previous good set stays in force), as
    /// `file:line:col: message`.
    pub policy_errors: Vec<String>,
    pub findings: Vec<Judged>,
    /// The latest decisions and releases, newest last.
    pub decisions: Vec<Logged<Decision>>,
    pub releases: Vec<Logged<Release>>,
}

/// Decisions and releases kept in the state file.
pub const KEEP_DECISIONS: usize = 50;

/// Judges `findings` against `policy` and the ladders in progress.
#[must_use]
pub fn judge_all(
    findings: &[(Finding, Vec<ProcessRef<'_>>)],
    policy: &PolicySet,
    decider: &Decider,
) -> Vec<Judged> {
    findings
        .iter()
        .map(|(f, procs)| {
            let verdict = policy.judge_in(f, procs, decider.safety().is_delegated(&f.cgroup));
            let rule = policy.rule_for(f, procs);
            let ladder = rule.and_then(|r| {
                decider
                    .states()
                    .find(|l| l.rule == r.name && l.cgroup == f.cgroup)
                    .cloned()
            });
            let next = rule.and_then(|r| {
                let taken = ladder.as_ref().map_or(0, |l| l.steps_taken);
                let step = r.ladder.get(taken)?;
                let since = ladder.as_ref().map_or(0.0, |l| {
                    if taken == 0 {
                        l.first_seen
                    } else {
                        l.stepped_at
                    }
                });
                Some((step.action, since + step.after_sec as f64))
            });
            let gpu_unmet = policy
                .rule
                .iter()
                .rev()
                .take_while(|r| rule.is_none_or(|chosen| !std::ptr::eq(*r, chosen)))
                .filter(|r| {
                    r.finding == f.kind && r.matcher.matches(&f.cgroup, procs) && !r.gpu.holds(f)
                })
                .map(|r| r.name.clone())
                .collect();
            Judged {
                refused: rule.and_then(|r| decider.safety().refusal(&f.cgroup, r.scope)),
                held_off_until: decider.held_off_until(f.cgroup_id),
                identity: crate::identity::of(&f.cgroup),
                finding: f.clone(),
                rule: verdict.rule,
                gpu_unmet,
                rule_source: rule.map(|r| r.source.clone()),
                ladder_len: rule.map_or(0, |r| r.ladder.len()),
                protected_by: verdict.protected_by,
                severe_enough: verdict.severe_enough,
                dry_run: verdict.dry_run,
                ladder,
                next,
            }
        })
        .collect()
}

/// Writes `state` to `<dir>/state.json` atomically (temporary file, then rename).
///
/// # Errors
/// The directory cannot be created or written.
pub fn write_state(dir: &Path, state: &State) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".state.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join("state.json"))
}

/// What `explain` was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    /// A cgroup and everything below it.
    Cgroup(String),
    /// A process: its cgroup, as the process table or /proc says.
    Pid(u32),
}

impl Target {
    /// `/path` → cgroup, digits → pid, nothing → all.
    #[must_use]
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None => Some(Target::All),
            Some(s) if s.starts_with('/') => {
                Some(Target::Cgroup(s.trim_end_matches('/').to_owned()))
            }
            Some(s) => s.parse().ok().map(Target::Pid),
        }
    }
}

fn within(path: &str, root: &str) -> bool {
    root.is_empty()
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Renders the findings about `cgroup` (and below; `None`: all) for people.
#[must_use]
pub fn render(state: &State, cgroup: Option<&str>, now_ms: u128) -> String {
    let mut out = String::new();
    let age_s = now_ms.saturating_sub(state.timestamp_ms) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "agent state {age_s:.1} s old · {} policy file(s), {} rules{}",
        state.policy_files.len(),
        state.rules,
        if state.dry_run { " · DRY RUN" } else { "" }
    );
    if age_s * 1000.0 > 5.0 * state.interval_ms.max(1000) as f64 {
        let _ = writeln!(
            out,
            "warning: the state is stale: is `cgsentry run` still running?"
        );
    }
    for e in &state.policy_errors {
        let _ = writeln!(out, "policy error (last good set in force): {e}");
    }
    let root = cgroup.unwrap_or("");
    let shown: Vec<&Judged> = state
        .findings
        .iter()
        .filter(|j| within(&j.finding.cgroup, root))
        .collect();
    if shown.is_empty() {
        let _ = writeln!(
            out,
            "no findings{}",
            cgroup.map(|c| format!(" for {c}")).unwrap_or_default()
        );
    }
    for j in shown {
        render_one(&mut out, state, j);
    }
    let recent: Vec<&Logged<Decision>> = state
        .decisions
        .iter()
        .filter(|d| within(&d.item.cgroup, root))
        .collect();
    if !recent.is_empty() {
        let _ = writeln!(out, "\nrecent decisions:");
        for d in recent.iter().rev().take(10).rev() {
            let _ = writeln!(
                out,
                "  {:>6.0} s ago  {:?}{}  {}  — {}",
                state.t - d.at,
                d.item.action,
                if d.item.dry_run { " (dry run)" } else { "" },
                d.item.cgroup,
                d.item.reason
            );
        }
    }
    for r in state
        .releases
        .iter()
        .filter(|r| within(&r.item.cgroup, root))
    {
        let _ = writeln!(
            out,
            "  {:>6.0} s ago  {}  {}  — rule {:?}, quiet for {:.0} s",
            state.t - r.at,
            match r.item.stage {
                crate::decide::ReleaseStage::Relax => "relax (thawed, room given, caps kept)",
                crate::decide::ReleaseStage::Full => "release",
            },
            r.item.cgroup,
            r.item.rule,
            r.item.quiet_sec
        );
    }
    out
}

/// The GPUs a finding's cgroup uses (what GPU conditions are judged on).
fn render_gpus(out: &mut String, f: &Finding) {
    if f.gpus.is_empty() {
        return;
    }
    {
        let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.0} %"));
        let gpus: Vec<String> = f
            .gpus
            .iter()
            .map(|g| {
                format!(
                    "{} {} mem {} util {}, this cgroup {:.0} MiB",
                    g.device,
                    g.uuid,
                    pct(g.memory_percent),
                    pct(g.util_percent),
                    g.cgroup_bytes as f64 / f64::from(1 << 20)
                )
            })
            .collect();
        let _ = writeln!(out, "  GPUs: {}", gpus.join(" · "));
    }
}

fn render_one(out: &mut String, state: &State, j: &Judged) {
    let f = &j.finding;
    let _ = writeln!(
        out,
        "\n{}  {}  {:?}  (over {:.0} s)",
        f.cgroup, f.kind, f.severity, f.window_sec
    );
    let _ = writeln!(out, "  {}", f.summary);
    let evidence: Vec<String> = f
        .evidence
        .iter()
        .map(|e| format!("{} {:.2} {}", e.name, e.value, e.unit))
        .collect();
    let _ = writeln!(out, "  evidence: {}", evidence.join(" · "));
    if let Some(pid) = f.pid {
        let _ = writeln!(
            out,
            "  lead process: {pid} ({})",
            f.comm.as_deref().unwrap_or("?")
        );
    }
    render_gpus(out, f);
    for r in &j.gpu_unmet {
        let _ = writeln!(
            out,
            "  rule {r:?} passed over: its GPU conditions do not hold"
        );
    }
    match (&j.rule, &j.rule_source) {
        (Some(rule), source) => {
            let _ = writeln!(
                out,
                "  rule: {rule:?}{}",
                source
                    .as_ref()
                    .map(|s| format!(" ({})", s.display()))
                    .unwrap_or_default()
            );
        }
        (None, _) => {
            let _ = writeln!(out, "  rule: none matches: nothing will be done");
        }
    }
    if !j.protected_by.is_empty() {
        let _ = writeln!(
            out,
            "  protected by: {} (only notify)",
            j.protected_by.join(", ")
        );
    }
    if let Some(why) = &j.refused {
        let _ = writeln!(out, "  not acted on (only notify): {why}");
    }
    if j.rule.is_some() && !j.severe_enough {
        let _ = writeln!(out, "  below the rule's min_severity: nothing will be done");
    }
    if let Some(until) = j.held_off_until {
        let _ = writeln!(
            out,
            "  held off: released by the operator; no ladder starts for {:.0} s more \
             (`cgsentry release {} --hold-off 0` lifts it)",
            (until - state.t).max(0.0),
            f.cgroup
        );
        return;
    }
    if let Some(l) = &j.ladder {
        let _ = writeln!(
            out,
            "  ladder: {}/{} steps taken, the last {:.0} s ago{}",
            l.steps_taken,
            j.ladder_len,
            state.t - l.stepped_at,
            if j.dry_run {
                " (dry run: logged, not done)"
            } else {
                ""
            }
        );
    }
    match j.next {
        Some((action, at)) if j.severe_enough => {
            let wait = (at - state.t).max(0.0);
            let _ = writeln!(
                out,
                "  next: {action:?} {}",
                if wait > 0.0 {
                    format!("in {wait:.0} s if it persists")
                } else {
                    "now".to_owned()
                }
            );
        }
        None if j.rule.is_some() => {
            let _ = writeln!(
                out,
                "  next: nothing (top of the ladder; relaxed, then released, after quiet)"
            );
        }
        _ => {}
    }
}

/// Reads the state file.
///
/// # Errors
/// A message saying what is missing and what to do.
pub fn read_state(dir: &Path) -> Result<State, String> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read {}: {e}: is `cgsentry run` running (with --state-dir {})?",
            path.display(),
            dir.display()
        )
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a cgsentry state file: {e}", path.display()))
}

/// `cgsentry explain`.
#[must_use]
pub fn explain(args: &crate::cli::ExplainArgs) -> std::process::ExitCode {
    let fail = |msg: String| {
        eprintln!("cgsentry: {msg}");
        std::process::ExitCode::FAILURE
    };
    let Some(target) = Target::parse(args.target.as_deref()) else {
        return fail(format!(
            "{:?} is neither a cgroup path (starting with /) nor a pid",
            args.target.as_deref().unwrap_or_default()
        ));
    };
    // The agent itself first; its state file when the socket is off or not ours to use.
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("control.sock"));
    let state = match crate::control::request(&socket, &crate::control::Request::Explain)
        .and_then(|d| serde_json::from_value::<State>(d).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(socket_error) => match read_state(&args.state_dir) {
            Ok(s) => s,
            Err(e) => return fail(format!("{e} (control socket: {socket_error})")),
        },
    };
    if args.json {
        return match serde_json::to_string_pretty(&state) {
            Ok(t) => {
                println!("{t}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        };
    }
    let cgroup = match target {
        Target::All => None,
        Target::Cgroup(c) => Some(c),
        Target::Pid(pid) => match crate::cgroupfs::cgroup_of_pid(Path::new("/proc"), pid) {
            Some(c) => {
                println!("process {pid} is in {c}");
                Some(c)
            }
            None => {
                return fail(format!(
                    "process {pid} does not exist (or has no cgroup v2 path)"
                ));
            }
        },
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    print!("{}", render(&state, cgroup.as_deref(), now_ms));
    std::process::ExitCode::SUCCESS
}

/// Policy diagnostics as the state file carries them.
#[must_use]
pub fn diagnostics_text(diags: &[Diagnostic]) -> Vec<String> {
    diags.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::{
        detect::{Evidence, FindingKind, Severity},
        policy::{MainConfig, merge, parse_policy_file},
    };

    fn finding(cgroup: &str) -> Finding {
        Finding {
            kind: FindingKind::Leak,
            severity: Severity::Critical,
            cgroup_id: 9,
            cgroup: cgroup.into(),
            pid: Some(500),
            comm: Some("python3".into()),
            summary: "memory grows 6.00 MiB/s for 120 s; 400 MiB left: limit in 66 s".into(),
            window_sec: 120.0,
            time_to_limit_sec: Some(66.0),
            evidence: vec![Evidence {
                name: Cow::Borrowed("slope"),
                value: 6.0,
                unit: Cow::Borrowed("MiB/s"),
            }],
            gpus: Vec::new(),
        }
    }

    fn state_after(secs: u32, comms: &[&str]) -> State {
        state_held_off(secs, comms, None)
    }

    /// The state after `secs` ticks; `hold_off`: (second, seconds) of a manual release.
    fn state_held_off(secs: u32, comms: &[&str], hold_off: Option<(u32, f64)>) -> State {
        let text = "[[protect]]\nname = \"sshd\"\ncomm = \"^sshd$\"\n\n[[rule]]\nname = \"leaks\"\nfinding = \"leak\"\ncgroup = \"/app/**\"\n\
                    ladder = [{action = \"notify\"}, {action = \"throttle\", after_sec = 30, memory_high_percent = 100}, {action = \"freeze\", after_sec = 60}]\n";
        let (p, r) =
            parse_policy_file(Path::new("/etc/cgsentry/policies.d/10-app.toml"), text).unwrap();
        let policy = merge(MainConfig::default(), vec![("10-app.toml".into(), p, r)]);
        let mut decider = Decider::default();
        let procs: Vec<ProcessRef<'_>> = comms
            .iter()
            .map(|c| ProcessRef {
                comm: c,
                uid: Some(0),
                ..ProcessRef::default()
            })
            .collect();
        let findings = vec![(finding("/app/worker"), procs)];
        let mut decisions = Vec::new();
        for s in 0..=secs {
            if let Some((at, for_sec)) = hold_off
                && at == s
            {
                decider.forget(9);
                decider.hold_off(9, "/app/worker", f64::from(s), for_sec);
            }
            let o = decider.tick(f64::from(s), &policy, &findings);
            decisions.extend(o.decisions.into_iter().map(|d| Logged {
                at: f64::from(s),
                item: d,
            }));
        }
        State {
            timestamp_ms: 10_000,
            t: f64::from(secs),
            interval_ms: 1000,
            policy_files: policy.files.clone(),
            rules: policy.rule.len(),
            dry_run: false,
            policy_errors: vec![],
            findings: judge_all(&findings, &policy, &decider),
            decisions,
            releases: vec![],
        }
    }

    /// Released with a hold-off: said, with the time left and how to lift it; no
    /// ladder, no next step.
    #[test]
    fn explains_a_hold_off() {
        let state = state_held_off(40, &["python3"], Some((35, 600.0)));
        let text = render(&state, Some("/app"), 10_500);
        assert!(
            text.contains("held off: released by the operator; no ladder starts for 595 s more"),
            "{text}"
        );
        assert!(
            text.contains("`cgsentry release /app/worker --hold-off 0`"),
            "{text}"
        );
        assert!(
            !text.contains("next:") && !text.contains("ladder:"),
            "{text}"
        );
    }

    #[test]
    fn explains_finding_evidence_rule_and_ladder() {
        let state = state_after(40, &["python3"]);
        let text = render(&state, Some("/app"), 10_500);
        for want in [
            "/app/worker  leak  Critical",
            "memory grows 6.00 MiB/s",
            "evidence: slope 6.00 MiB/s",
            "lead process: 500 (python3)",
            "rule: \"leaks\" (/etc/cgsentry/policies.d/10-app.toml)",
            "ladder: 2/3 steps taken, the last 10 s ago",
            "next: Freeze in 50 s if it persists",
            "Throttle",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("stale"), "{text}");
        // Another subtree: nothing about /app.
        let other = render(&state, Some("/db"), 10_500);
        assert!(other.contains("no findings for /db"), "{other}");
        assert!(!other.contains("/app/worker"), "{other}");
    }

    #[test]
    fn explains_gpu_use_and_rules_passed_over_for_their_gpu_conditions() {
        let text = "[[rule]]\nname = \"any gpu leak\"\nfinding = \"gpu_leak\"\nladder = [{action = \"notify\"}]\n\
                    [[rule]]\nname = \"nearly full\"\nfinding = \"gpu_leak\"\ngpu_memory_percent = 90\nladder = [{action = \"freeze\"}]\n";
        let (p, r) = parse_policy_file(Path::new("50-gpu.toml"), text).unwrap();
        let policy = merge(MainConfig::default(), vec![("50-gpu.toml".into(), p, r)]);
        let mut f = finding("/ml");
        f.kind = FindingKind::GpuLeak;
        f.gpus = vec![crate::detect::GpuUse {
            device: 0,
            uuid: "GPU-aaaa".into(),
            memory_percent: Some(70.0),
            util_percent: Some(61.0),
            cgroup_bytes: 4000 << 20,
        }];
        let judged = judge_all(&[(f, vec![])], &policy, &Decider::default());
        assert_eq!(judged[0].rule.as_deref(), Some("any gpu leak"));
        assert_eq!(judged[0].gpu_unmet, ["nearly full"]);
        let state = State {
            t: 1.0,
            timestamp_ms: 1000,
            findings: judged,
            ..State::default()
        };
        let out = render(&state, None, 1000);
        for want in [
            "GPUs: 0 GPU-aaaa mem 70 % util 61 %, this cgroup 4000 MiB",
            "rule \"nearly full\" passed over: its GPU conditions do not hold",
            "rule: \"any gpu leak\"",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn explains_protection_and_staleness() {
        let state = state_after(5, &["sshd"]);
        let text = render(&state, None, 60_000);
        assert!(text.contains("protected by: sshd (only notify)"), "{text}");
        assert!(text.contains("the state is stale"), "{text}");
        // Every process must match: a python3 beside sshd is not protected by it.
        let text = render(&state_after(5, &["python3", "sshd"]), None, 10_000);
        assert!(!text.contains("protected by"), "{text}");
    }

    /// A finding on a cgroup that is never acted on says so, with why, and its
    /// decisions are notifications.
    #[test]
    fn explains_why_a_cgroup_is_never_acted_on() {
        let text = "[[rule]]\nname = \"leaks\"\nfinding = \"leak\"\ncgroup = \"/**\"\n\
                    ladder = [{action = \"throttle\", memory_high_percent = 100}]\n";
        let (p, r) = parse_policy_file(Path::new("10-all.toml"), text).unwrap();
        let policy = merge(MainConfig::default(), vec![("10-all.toml".into(), p, r)]);
        let mut decider = Decider::default();
        let mut safety = crate::safety::Safety::new(
            Some("/system.slice/cgsentry.service"),
            None,
            Some("cgsentry.slice"),
        );
        safety.set_parents(["/user.slice".to_owned()]);
        decider.set_safety(safety);
        let findings = vec![
            (finding("/system.slice"), vec![]),
            (finding("/user.slice"), vec![]),
        ];
        let o = decider.tick(0.0, &policy, &findings);
        assert!(
            o.decisions.iter().all(|d| d.action == Action::Notify),
            "{o:?}"
        );
        let state = State {
            t: 0.0,
            timestamp_ms: 1000,
            findings: judge_all(&findings, &policy, &decider),
            ..State::default()
        };
        let out = render(&state, None, 1000);
        for want in [
            "not acted on (only notify): /system.slice is never acted on: it holds cgsentry's own cgroup /system.slice/cgsentry.service",
            "not acted on (only notify): /user.slice has child cgroups",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let state = state_after(40, &["python3"]);
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), state);
        let missing = read_state(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("is `cgsentry run` running"), "{missing}");
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse(None), Some(Target::All));
        assert_eq!(
            Target::parse(Some("/a/b/")),
            Some(Target::Cgroup("/a/b".into()))
        );
        assert_eq!(Target::parse(Some("4242")), Some(Target::Pid(4242)));
        assert_eq!(Target::parse(Some("nginx")), None);
        assert!(within("/a/b", "/a") && !within("/ab", "/a") && within("/x", ""));
    }
}
