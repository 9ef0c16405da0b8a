//! What the agent does for its operators after each tick: the event log, metrics, the
//! history file, notifications, and the control socket's view. Nothing here may stop or
//! slow the control loop: files that cannot be written are reported once, the network
//! and hooks are served by other threads and tasks.
use std::collections::HashMap;

use serde::Serialize;

use crate::{
    collect::Snapshot,
    control::{Active, SharedRef, Status},
    detect::{FindingKind, Severity},
    eventlog::EventLog,
    explain::Judged,
    history::History,
    metrics::{Exposition, Metrics, SelfStats},
    notify::{Message, Notifier},
    report::Judgement,
};

/// Where the outputs go (`None`: off).
#[derive(Debug, Default)]
pub struct Outputs {
    pub event_log: Option<EventLog>,
    pub exposition: Option<Exposition>,
    pub metrics_addr: Option<String>,
    pub history_file: Option<std::path::PathBuf>,
    pub shared: Option<SharedRef>,
    /// The control socket's file, removed when the agent stops.
    pub socket_path: Option<std::path::PathBuf>,
}

pub struct Ops {
    out: Outputs,
    metrics: Metrics,
    history: History,
    notifier: Notifier,
    /// Findings of the last tick: (cgroup, kind) → severity.
    live: HashMap<(String, FindingKind), Severity>,
    started_ms: u128,
    ticks: u64,
    gpu: String,
}

#[derive(Serialize)]
struct FindingEvent<'a> {
    #[serde(flatten)]
    judged: &'a Judged,
}

#[derive(Serialize)]
struct Cleared<'a> {
    cgroup: &'a str,
    kind: FindingKind,
}

#[derive(Serialize)]
struct DecisionEvent<'a> {
    #[serde(flatten)]
    decision: &'a crate::decide::Decision,
    /// The finding behind it, with its evidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    finding: Option<&'a crate::detect::Finding>,
    #[serde(skip_serializing_if = "crate::identity::Identity::is_empty")]
    identity: crate::identity::Identity,
}

impl Ops {
    #[must_use]
    pub fn new(out: Outputs) -> Self {
        let history = History::new(out.history_file.clone());
        Self {
            out,
            metrics: Metrics::default(),
            history,
            notifier: Notifier::start(),
            live: HashMap::new(),
            started_ms: crate::eventlog::now_ms(),
            ticks: 0,
            gpu: "off".into(),
        }
    }

    /// The agent is stopping: no stale socket is left behind.
    pub fn close(&mut self) {
        if let Some(p) = self.out.socket_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// One event, when the log is on.
    pub fn record<T: Serialize>(&mut self, event: &str, body: &T) {
        if let Some(log) = &mut self.out.event_log {
            log.record(event, body);
        }
    }

    /// The GPU line of `status` (NVML's state).
    pub fn set_gpu_status(&mut self, s: String) {
        self.gpu = s;
    }

    fn message(&self, event: &str, cgroup: &str, rule: &str, action: &str) -> Message {
        Message {
            event: event.into(),
            host: self.notifier.host().to_owned(),
            ts_ms: crate::eventlog::now_ms(),
            cgroup: cgroup.into(),
            rule: rule.into(),
            action: action.into(),
            finding: None,
            summary: String::new(),
            dry_run: false,
            identity: crate::identity::of(cgroup),
            suppressed: 0,
        }
    }

    /// Everything after a tick: log, notify, history, metrics, the socket's view.
    #[expect(clippy::too_many_lines, reason = "one output after the other")]
    pub fn after_tick(
        &mut self,
        snap: &Snapshot,
        j: &Judgement,
        guard: &mut crate::agent::Guard,
        tick_seconds: f64,
    ) {
        self.ticks += 1;
        for (event, body) in guard.take_events() {
            self.record(&event, &body);
        }
        let guard = &*guard;
        let policy = guard.policy();
        // Findings: logged when they appear, change severity, or clear.
        let mut now: HashMap<(String, FindingKind), Severity> = HashMap::new();
        for f in &j.findings {
            let key = (f.finding.cgroup.clone(), f.finding.kind);
            if self.live.get(&key) != Some(&f.finding.severity) {
                self.record("finding", &FindingEvent { judged: f });
            }
            now.insert(key, f.finding.severity);
        }
        let cleared: Vec<(String, FindingKind)> = self
            .live
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for (cgroup, kind) in cleared {
            self.record(
                "finding_cleared",
                &Cleared {
                    cgroup: &cgroup,
                    kind,
                },
            );
        }
        self.live = now;

        for d in &j.decisions {
            let finding = j
                .findings
                .iter()
                .find(|f| f.finding.cgroup == d.cgroup && f.finding.kind == d.finding)
                .map(|f| &f.finding);
            self.record(
                "decision",
                &DecisionEvent {
                    decision: d,
                    finding,
                    identity: crate::identity::of(&d.cgroup),
                },
            );
            let mut m = self.message(
                "decision",
                &d.cgroup,
                &d.rule,
                &format!("{:?}", d.action).to_lowercase(),
            );
            m.finding = Some(d.finding.to_string());
            m.summary.clone_from(&d.reason);
            m.dry_run = d.dry_run;
            self.notifier.send(&policy.notify, hook(policy, &d.rule), m);
        }
        for r in &j.releases {
            self.record("release", r);
            let mut m = self.message(
                "release",
                &r.cgroup,
                &r.rule,
                &format!("{:?}", r.stage).to_lowercase(),
            );
            m.summary = format!("quiet for {:.0} s: {:?} release", r.quiet_sec, r.stage);
            m.dry_run = r.dry_run;
            self.notifier.send(&policy.notify, hook(policy, &r.rule), m);
        }
        for a in &j.actions {
            self.record("action", a);
            if !a.errors.is_empty() {
                self.record("error", &serde_json::json!({"cgroup": a.cgroup, "rule": a.rule, "action": a.action, "errors": a.errors}));
                let mut m = self.message("action_failed", &a.cgroup, &a.rule, &a.action);
                m.summary = format!("{}; failed: {}", a.done, a.errors.join("; "));
                m.dry_run = a.dry_run;
                self.notifier.send(&policy.notify, None, m);
            }
        }

        self.history.push(snap);

        let counters = &self.notifier.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let (lines, failures) = self
            .out
            .event_log
            .as_ref()
            .map_or((0, 0), |l| (l.written, l.failed));
        let me = SelfStats {
            tick_seconds,
            rss_bytes: crate::metrics::self_rss_bytes(),
            event_log_lines: lines,
            event_log_failures: failures,
            notifications_sent: load(&counters.sent),
            notifications_failed: load(&counters.failed),
            notifications_suppressed: load(&counters.suppressed),
            policy_rules: policy.rule.len(),
            policy_errors: j.policy_errors.len(),
            gpu_available: snap.gpu.is_some(),
            held_off: guard.held_off(),
        };
        // Counted every tick, rendered only for a waiting scrape.
        if let Some(exp) = &self.out.exposition {
            if let Some(text) = self.metrics.update(snap, j, &me, exp.take_wanted()) {
                exp.publish(text);
            }
            let interval = std::time::Duration::from_millis(guard.state().interval_ms);
            exp.ticked(
                crate::eventlog::now_ms(),
                (interval * 5).max(std::time::Duration::from_secs(10)),
            );
        }
        if let Some(shared) = &self.out.shared {
            let applied = active(guard);
            let status = Status {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                started_ms: self.started_ms,
                ticks: self.ticks,
                last_tick_ms: snap.timestamp_ms,
                tick_seconds,
                interval_ms: guard.state().interval_ms,
                policy_files: policy.files.clone(),
                rules: policy.rule.len(),
                protect: policy.protect.len(),
                dry_run: policy.dry_run,
                policy_errors: j.policy_errors.clone(),
                findings: j.findings.len(),
                active: applied.clone(),
                held_off: me.held_off.clone(),
                never_act: guard
                    .safety()
                    .never_set()
                    .map(|(c, why)| (c.to_owned(), why.to_owned()))
                    .collect(),
                ebpf_dropped: snap.ebpf.dropped(),
                kernel_oom_victims: snap.ebpf.oom_victims,
                rss_bytes: me.rss_bytes,
                gpu: self.gpu.clone(),
                event_log: self
                    .out
                    .event_log
                    .as_ref()
                    .map(|l| l.path().display().to_string()),
                metrics: self
                    .out
                    .metrics_addr
                    .as_ref()
                    .map(|a| format!("http://{a}/metrics")),
                history_file: self
                    .out
                    .history_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
                notifications_sent: me.notifications_sent,
                notifications_failed: me.notifications_failed,
                notifications_suppressed: me.notifications_suppressed,
            };
            let view = crate::top::view(snap, j, &self.history, applied, policy.dry_run);
            if let Ok(mut s) = shared.write() {
                s.status = status;
                s.state.clone_from(guard.state());
                s.top = view;
            }
        }
    }
}

/// The `exec` hook of `rule`, if it has one.
fn hook<'a>(policy: &'a crate::policy::PolicySet, rule: &str) -> Option<&'a [String]> {
    policy
        .rule
        .iter()
        .find(|r| r.name == rule)
        .map(|r| r.exec.as_slice())
        .filter(|e| !e.is_empty())
}

/// What the guard holds applied, for `status` and `top`.
#[must_use]
pub fn active(guard: &crate::agent::Guard) -> Vec<Active> {
    guard
        .applied()
        .iter()
        .map(|a| Active {
            cgroup: a.cgroup.clone(),
            rule: a.rule.clone(),
            finding: a.finding.to_string(),
            steps_taken: a.steps_taken,
            relaxed: a.relaxed,
            frozen: a.frozen.clone(),
            quarantine: a.quarantine.clone(),
            limits: a.originals.keys().cloned().collect(),
            dry_run: a.dry_run,
            updated_ms: a.updated_ms,
        })
        .collect()
}
