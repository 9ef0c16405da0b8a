//! `cgsentry run`: preflight, load, then one snapshot per tick until a signal or
//! `--ticks` ends it. Dropping the collector detaches every program.
use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::MissedTickBehavior,
};
use tracing::{error, info, warn};

use crate::{
    act::{self, Actuator},
    cgroupfs::{CgroupIndex, CgroupReader},
    cli::RunArgs,
    collect::{CollectOptions, Collector, Snapshot},
    decide::{Decider, ReleaseStage},
    detect::Detector,
    explain::{self, Logged, State},
    gpu::GpuCollector,
    policy::{self, PolicySet, ProcessRef},
    preflight,
    probes::{LoadOptions, Probes},
    report,
};

/// Files that make up the policy set, with their modification time and size: a change
/// in any means "reload".
type Fingerprint = Vec<(std::path::PathBuf, Option<std::time::SystemTime>, u64)>;

fn fingerprint(main: &std::path::Path, dir: &std::path::Path) -> Fingerprint {
    let stat = |p: &std::path::Path| {
        let m = std::fs::metadata(p).ok();
        (
            p.to_owned(),
            m.as_ref().and_then(|m| m.modified().ok()),
            m.map_or(0, |m| m.len()),
        )
    };
    let mut fp = vec![stat(main), stat(dir)];
    if let Ok(files) = policy::policy_files(dir) {
        fp.extend(files.iter().map(|f| stat(f)));
    }
    fp
}

/// Detection and decisions over the snapshots, with the policy kept current: a broken
/// edit is logged and the last good set stays in force.
pub struct Guard {
    config: std::path::PathBuf,
    state_dir: std::path::PathBuf,
    policy: PolicySet,
    policy_errors: Vec<String>,
    fingerprint: Fingerprint,
    detector: Detector,
    decider: Decider,
    t: f64,
    decisions: Vec<Logged<crate::decide::Decision>>,
    releases: Vec<Logged<crate::decide::Release>>,
    state_write_failed: bool,
    actuator: Actuator,
    /// What the start-up reconcile did, reported with the first tick.
    reconciled: Vec<act::Report>,
    /// A policy set (files, or the built-in fallback) has been in force.
    loaded_once: bool,
    /// Policy reloads and manual releases, for the event log.
    events: Vec<(String, serde_json::Value)>,
    /// The last tick's view (what `explain` shows).
    state: State,
    /// Where `/proc/self/cgroup` and `/proc/1/cgroup` are read (the never-act set), and
    /// the processes policies match on.
    proc_root: std::path::PathBuf,
    warned_no_self: bool,
    reader: CgroupReader,
    /// User names, resolved off the loop.
    users: crate::procinfo::UserNames,
    /// Where [`Guard::locate`] found pids a cgroup namespace hides (`None`: not found,
    /// at that time).
    located: HashMap<u32, (Option<String>, std::time::Instant)>,
}

fn log_report(r: &act::Report) {
    if r.errors.is_empty() {
        info!(cgroup = %r.cgroup, rule = %r.rule, action = %r.action, dry_run = r.dry_run, "done: {}", r.done);
    } else {
        warn!(cgroup = %r.cgroup, rule = %r.rule, action = %r.action, dry_run = r.dry_run,
              "done: {}; failed: {}", r.done, r.errors.join("; "));
    }
}

fn cgroup_id(w: &act::Writer, rel: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(w.dir(rel)).ok().map(|m| m.ino())
}

impl Guard {
    /// Loads the policy set of `config` (on failure: no rules, errors logged), opens
    /// the journal in `journal_dir` and reconciles it: what a previous agent applied is
    /// re-adopted (its ladder continues and is released after quiet) or, if no rule of
    /// the current policy owns it any more, undone.
    #[must_use]
    pub fn new(
        config: std::path::PathBuf,
        state_dir: std::path::PathBuf,
        cgroup_root: &std::path::Path,
        journal_dir: &std::path::Path,
    ) -> Self {
        let mut g = Self {
            config,
            state_dir,
            policy: PolicySet::empty(),
            policy_errors: Vec::new(),
            fingerprint: Vec::new(),
            detector: Detector::new(crate::detect::DetectConfig::default()),
            decider: Decider::default(),
            t: 0.0,
            decisions: Vec::new(),
            releases: Vec::new(),
            state_write_failed: false,
            actuator: Actuator::open(cgroup_root, journal_dir, "cgsentry.slice"),
            reconciled: Vec::new(),
            loaded_once: false,
            events: Vec::new(),
            state: State::default(),
            proc_root: "/proc".into(),
            warned_no_self: false,
            reader: CgroupReader::new(cgroup_root),
            users: crate::procinfo::UserNames::start(),
            located: HashMap::new(),
        };
        g.reload("start");
        g.actuator
            .set_quarantine_parent(&g.policy.quarantine_parent);
        g.reconcile();
        g.restore_hold_offs();
        g
    }

    /// Hold-offs a previous agent granted that still run (by the wall clock) and whose
    /// cgroups still exist.
    fn restore_hold_offs(&mut self) {
        for (cgroup, left) in self.actuator.held_off() {
            if let Some(id) = cgroup_id(self.actuator.writer(), cgroup) {
                info!(cgroup = %cgroup, seconds_left = left, "hold-off from the journal kept");
                self.decider.hold_off(id, cgroup, self.t, left);
            }
        }
    }

    /// What a previous agent journaled is re-adopted, undone or dropped (see
    /// [`Actuator::reconcile`]); then what looks like cgsentry's work with no journal
    /// entry behind it is reported or released ([`Actuator::orphans`]).
    fn reconcile(&mut self) {
        let (adopt, cleaned) = self.actuator.reconcile();
        self.reconciled.extend(cleaned); // logged with the first tick's actions
        let tree = self.reader.walk();
        let all: Vec<&str> = tree.values().map(String::as_str).collect();
        let orphans = self.actuator.orphans(&all);
        self.reconciled.extend(orphans);
        for a in adopt {
            let rule = self.policy.rule.iter().find(|r| r.name == a.rule);
            // The instance the entry is about (its quarantine holds it when its own
            // cgroup is gone).
            let id = a
                .cgroup_id
                .or_else(|| cgroup_id(self.actuator.writer(), &a.cgroup));
            if let (Some(rule), Some(id)) = (rule, id) {
                let report = act::Report {
                    cgroup: a.cgroup.clone(),
                    rule: a.rule.clone(),
                    action: "adopt".into(),
                    dry_run: a.dry_run,
                    done: format!(
                        "re-adopted from the journal: {} step(s) taken{}{}; released after {} s quiet",
                        a.steps_taken,
                        a.frozen
                            .as_ref()
                            .map_or(String::new(), |f| format!(", {f} kept frozen")),
                        if a.relaxed { ", relaxed" } else { "" },
                        rule.release_after_quiet_sec
                    ),
                    errors: Vec::new(),
                };
                self.reconciled.push(report); // logged with the first tick's actions
                self.decider.adopt(
                    id,
                    crate::decide::LadderState {
                        cgroup: a.cgroup.clone(),
                        rule: a.rule.clone(),
                        finding: a.finding,
                        steps_taken: a.steps_taken,
                        first_seen: self.t,
                        last_seen: self.t,
                        stepped_at: self.t,
                        release_after_quiet_sec: rule.release_after_quiet_sec,
                        dry_run: a.dry_run,
                        relaxed: a.relaxed,
                        due: crate::decide::Due::Cooldown,
                    },
                );
                continue;
            }
            info!(cgroup = %a.cgroup, rule = %a.rule,
                  "reconcile: no rule owns this any more (or its cgroup is gone): undoing");
            let r = crate::decide::Release {
                cgroup_id: id.unwrap_or(0),
                cgroup: a.cgroup.clone(),
                rule: a.rule.clone(),
                stage: crate::decide::ReleaseStage::Full,
                steps_taken: a.steps_taken,
                quiet_sec: 0.0,
                dry_run: a.dry_run,
            };
            if let Some(report) = self.actuator.release(&r) {
                self.reconciled.push(report); // logged with the first tick's actions
            }
        }
    }

    /// `cgsentry release <cgroup>`: undoes at once everything applied to `cgroup` (or
    /// to a cgroup whose quarantine it is), whichever rule applied it, forgets the
    /// ladders, and holds the cgroup off for `hold_off_sec`: no ladder starts on it
    /// until then (its findings are still made). After that, or at once with 0, a
    /// finding still present starts its ladder again from the first step, with that
    /// step's own delay.
    ///
    /// # Errors
    /// Nothing of ours is applied there, no ladder runs there, and no hold-off is asked
    /// for on a cgroup that exists (a hold-off alone is a valid request: "leave it alone").
    pub fn release_manual(
        &mut self,
        cgroup: &str,
        hold_off_sec: u64,
    ) -> Result<crate::control::Released, String> {
        let cgroup = self
            .actuator
            .origin_of(cgroup)
            .map_or(cgroup, |(origin, _)| origin)
            .to_owned();
        // Everything applied at that path, whichever cgroup instance it was applied to.
        let applied: Vec<(String, usize, bool, u64)> = self
            .actuator
            .entries()
            .iter()
            .filter(|a| a.cgroup == cgroup)
            .map(|a| {
                (
                    a.rule.clone(),
                    a.steps_taken,
                    a.dry_run,
                    a.cgroup_id.unwrap_or(0),
                )
            })
            .collect();
        let id = cgroup_id(self.actuator.writer(), &cgroup);
        let ladders = self.decider.states().filter(|s| s.cgroup == cgroup).count();
        let held = id.and_then(|id| self.decider.held_off_until(id)).is_some();
        if applied.is_empty() && ladders == 0 && !held && (hold_off_sec == 0 || id.is_none()) {
            return Err(format!(
                "nothing is applied to {cgroup} and no ladder is running there (see `cgsentry status`){}",
                if id.is_none() { "; no such cgroup" } else { "" }
            ));
        }
        let mut reports = Vec::new();
        for (rule, steps_taken, dry_run, entry_id) in applied {
            let r = crate::decide::Release {
                cgroup_id: entry_id,
                cgroup: cgroup.clone(),
                rule,
                stage: ReleaseStage::Full,
                steps_taken,
                quiet_sec: 0.0,
                dry_run,
            };
            if let Some(mut report) = self.actuator.release(&r) {
                report.action = "release (manual)".into();
                log_report(&report);
                reports.push(report);
            }
        }
        let mut hold_off_sec = hold_off_sec;
        if let Some(id) = id {
            self.decider.forget(id);
            self.decider
                .hold_off(id, &cgroup, self.t, hold_off_sec as f64);
        } else {
            // The cgroup is gone: forget its ladders by path; nothing to hold off.
            self.decider.forget_path(&cgroup);
            hold_off_sec = 0;
        }
        if let Err(e) = self.actuator.set_held_off(&cgroup, hold_off_sec) {
            warn!(cgroup = %cgroup, "the hold-off holds, but a restarted agent will not know it: {e}");
        }
        info!(cgroup = %cgroup, hold_off_sec, "released by the operator");
        self.events.push((
            "release_manual".into(),
            serde_json::json!({ "cgroup": cgroup, "reports": reports, "hold_off_sec": hold_off_sec }),
        ));
        Ok(crate::control::Released {
            cgroup,
            reports,
            hold_off_sec,
        })
    }

    /// `cgsentry release --all`: every cgroup with something applied is released as
    /// [`Guard::release_manual`] does, and held off for `hold_off_sec`; `between` runs
    /// after each cgroup (the agent feeds systemd's watchdog there).
    pub fn release_all(
        &mut self,
        hold_off_sec: u64,
        mut between: impl FnMut(),
    ) -> crate::control::Released {
        let mut cgroups: Vec<String> = self
            .actuator
            .entries()
            .iter()
            .map(|a| a.cgroup.clone())
            .chain(self.decider.states().map(|s| s.cgroup.clone()))
            .collect();
        cgroups.sort();
        cgroups.dedup();
        let mut all = crate::control::Released {
            cgroup: format!("(all: {} cgroup(s))", cgroups.len()),
            reports: Vec::new(),
            hold_off_sec,
        };
        for c in cgroups {
            if let Ok(r) = self.release_manual(&c, hold_off_sec) {
                all.reports.extend(r.reports);
            }
            between(); // a long list must not starve the watchdog
        }
        all
    }

    /// Cgroups held off after a manual release, with the seconds left.
    #[must_use]
    pub fn held_off(&self) -> Vec<crate::control::HeldOff> {
        let mut v: Vec<_> = self
            .decider
            .held_off()
            .filter(|(_, h)| h.until > self.t)
            .map(|(_, h)| crate::control::HeldOff {
                cgroup: h.cgroup.clone(),
                seconds_left: h.until - self.t,
            })
            .collect();
        v.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        v
    }

    /// What is never acted on (as of the last tick).
    #[must_use]
    pub fn safety(&self) -> &crate::safety::Safety {
        self.decider.safety()
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    /// The last tick's state (what `explain` shows).
    #[must_use]
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What is applied now (the journal's entries).
    #[must_use]
    pub fn applied(&self) -> &[act::Applied] {
        self.actuator.entries()
    }

    /// Events since the last call (policy reloads, manual releases).
    pub fn take_events(&mut self) -> Vec<(String, serde_json::Value)> {
        std::mem::take(&mut self.events)
    }

    /// Contains systemd units through systemd from now on.
    pub fn set_systemd(&mut self, systemd: crate::systemd::Systemd) {
        self.actuator.set_systemd(systemd);
    }

    /// The user-name resolver the agent's other readers share.
    #[must_use]
    pub fn user_names(&self) -> crate::procinfo::UserNames {
        self.users.clone()
    }

    /// Available memory the detectors count as none left, percent of RAM.
    #[must_use]
    pub fn reserve_percent(&self) -> f64 {
        self.detector.config().leak.reserve_percent
    }

    /// The cgroup of `pid` in the hierarchy the agent acts on. `/proc/PID/cgroup` says
    /// it, relative to the reader's cgroup namespace: in a container with a namespace
    /// of its own (a Kubernetes `DaemonSet`) it reads `/` for the agent and `/..`-led paths
    /// for others, while the host's tree is mounted. Then the pid is looked for in the
    /// tree's `cgroup.procs` (once; the answer is checked each tick and looked for
    /// again when it no longer holds).
    fn locate(&mut self, pid: u32) -> Option<String> {
        let said = crate::cgroupfs::cgroup_of_pid(&self.proc_root, pid)?;
        let listed = |r: &CgroupReader, c: &str| r.procs(c).is_ok_and(|p| p.contains(&pid));
        if said != "/" && !said.starts_with("/..") && self.reader.dir(&said).is_dir() {
            return Some(said);
        }
        if said == "/" && listed(&self.reader, "/") {
            return Some(said);
        }
        match self.located.get(&pid) {
            Some((Some(c), _)) if listed(&self.reader, c) => return Some(c.clone()),
            // Not found a while ago: the tree is not walked every tick for it.
            Some((None, at)) if at.elapsed() < std::time::Duration::from_mins(1) => return None,
            _ => {}
        }
        let found = self
            .reader
            .walk()
            .into_values()
            .find(|c| listed(&self.reader, c));
        let before = self
            .located
            .insert(pid, (found.clone(), std::time::Instant::now()));
        match (&found, before) {
            (Some(c), _) => {
                info!(pid, cgroup = %c, "found in the host's cgroup tree (a cgroup namespace hides it)");
            }
            (None, None) => warn!(
                pid,
                "not found in the cgroup tree (a cgroup namespace of its own?): its cgroup \
                 cannot be kept out of reach"
            ),
            (None, Some(_)) => {}
        }
        found
    }

    /// What is never acted on this tick: the root, this agent's cgroup and PID 1's
    /// (read now: a service manager may move either) with their ancestors, the
    /// quarantine parent; and which of `cgroups` (this tick's findings') are parents
    /// ([`crate::safety::counts_as_parent`]) or in a subtree a user owns.
    fn safety_now<'a>(&mut self, cgroups: impl Iterator<Item = &'a str>) -> crate::safety::Safety {
        let me = self.locate(std::process::id());
        let init = self.locate(1);
        if me.is_none() && !self.warned_no_self {
            warn!(
                "cannot read this agent's own cgroup under {}: only the root, init.scope \
                 and the quarantine parent are known to be never acted on",
                self.proc_root.display()
            );
            self.warned_no_self = true;
        }
        let mut safety = crate::safety::Safety::new(
            me.as_deref(),
            init.as_deref(),
            Some(&self.policy.quarantine_parent),
        );
        let (mut parents, mut delegated) = (Vec::new(), Vec::new());
        for c in cgroups {
            let user_owned = self.reader.delegated(c);
            let descendants = self
                .reader
                .read_keyed(c, "cgroup.stat")
                .ok()
                .flatten()
                .and_then(|k| k.get("nr_descendants").copied())
                .unwrap_or(0);
            let own = if descendants > 0 {
                self.reader.procs(c).map_or(0, |p| p.len())
            } else {
                0
            };
            if crate::safety::counts_as_parent(descendants, own, user_owned) {
                parents.push(c.to_owned());
            }
            if user_owned {
                delegated.push(c.to_owned());
            }
        }
        if self
            .policy
            .rule
            .iter()
            .any(|r| r.scope == crate::safety::Scope::Subtree)
        {
            let shielded: Vec<(String, String)> = parents
                .iter()
                .filter_map(|p| Some((p.clone(), self.shield(&safety, p)?)))
                .collect();
            safety.set_shielded(shielded);
        }
        safety.set_parents(parents);
        safety.set_delegated(delegated);
        safety
    }

    /// What protect entries and rules match on, read now from /proc for the findings'
    /// cgroups only (and only when some entry matches on processes): every process of
    /// the cgroup where the finding's processes live (`live_in`; of its subtree for a
    /// parent), with its real uid; and the cgroups not read whole.
    fn process_facts<'a>(
        &self,
        findings: &[crate::detect::Finding],
        live_in: &'a [String],
        safety: &crate::safety::Safety,
    ) -> (
        HashMap<&'a str, Vec<crate::procinfo::ProcFacts>>,
        HashSet<&'a str>,
    ) {
        let mut facts = HashMap::new();
        let mut unread = HashSet::new();
        if !self.policy.needs_processes() {
            return (facts, unread);
        }
        for (f, dir) in findings.iter().zip(live_in) {
            if facts.contains_key(dir.as_str()) {
                continue;
            }
            let (list, complete) = crate::procinfo::read_cgroup(
                &self.proc_root,
                &self.reader,
                dir,
                safety.is_parent(&f.cgroup),
                &self.users,
            );
            if !complete {
                unread.insert(dir.as_str());
            }
            facts.insert(dir.as_str(), list);
        }
        (facts, unread)
    }

    /// What below the parent `cgroup` a step on its whole subtree must not reach: a
    /// cgroup never acted on, or one a protect entry holds for by its path or identity
    /// (entries that need processes are judged where the finding is).
    fn shield(&self, safety: &crate::safety::Safety, cgroup: &str) -> Option<String> {
        let mut dirs = vec![cgroup.to_owned()];
        while let Some(dir) = dirs.pop() {
            if dir != cgroup {
                if let Some(why) = safety.never(&dir) {
                    return Some(format!("{dir} ({why})"));
                }
                if let Some(p) = self
                    .policy
                    .protect
                    .iter()
                    .find(|p| p.matcher.protects(&dir, &[]))
                {
                    return Some(format!("{dir}, protected by {}", p.name));
                }
            }
            if let Ok(entries) = std::fs::read_dir(self.reader.dir(&dir)) {
                use std::os::unix::ffi::OsStrExt as _;
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let name = crate::cgroupfs::path_text(e.file_name().as_bytes());
                        dirs.push(format!("{}/{name}", dir.trim_end_matches('/')));
                    }
                }
            }
        }
        None
    }

    /// Carries out a tick's decisions and releases (and the start-up reconcile's
    /// report, on the first tick).
    fn act(&mut self, snap: &Snapshot, outcome: &crate::decide::Outcome) -> Vec<act::Report> {
        let mut actions = std::mem::take(&mut self.reconciled);
        for d in &outcome.decisions {
            let memory = snap.cgroup(&d.cgroup).and_then(|c| c.files.memory_current);
            actions.push(self.actuator.apply(d, memory));
        }
        let m = &snap.machine;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a percentage of a byte count"
        )]
        let reserve =
            (m.mem_total_bytes as f64 * self.detector.config().leak.reserve_percent / 100.0) as u64;
        let room = m.mem_available_bytes.saturating_sub(reserve);
        for r in &outcome.releases {
            actions.extend(match r.stage {
                ReleaseStage::Relax => self.actuator.relax(r, room),
                ReleaseStage::Full => self.actuator.release(r),
            });
        }
        actions.extend(self.actuator.widen_as_freed());
        actions.extend(self.actuator.enforce());
        actions.extend(self.actuator.tick());
        for a in &actions {
            log_report(a);
        }
        actions
    }

    /// Reloads the policy set; on errors keeps the current one.
    pub fn reload(&mut self, why: &str) {
        self.fingerprint = fingerprint(&self.config, &self.policy.policies_dir);
        match policy::load(&self.config) {
            Ok(set) => {
                for w in set.warnings() {
                    warn!("{w}");
                }
                info!(
                    why,
                    files = set.files.len(),
                    protect = set.protect.len(),
                    rules = set.rule.len(),
                    dry_run = set.dry_run,
                    "policy loaded"
                );
                self.detector.set_config(set.detect.clone());
                self.actuator.set_quarantine_parent(&set.quarantine_parent);
                self.fingerprint = fingerprint(&self.config, &set.policies_dir);
                self.events.push((
                    "policy_loaded".into(),
                    serde_json::json!({
                        "why": why,
                        "files": set.files,
                        "rules": set.rule.len(),
                        "protect": set.protect.len(),
                        "dry_run": set.dry_run,
                    }),
                ));
                self.policy = set;
                self.policy_errors.clear();
                self.loaded_once = true;
            }
            Err(diags) => {
                for d in &diags {
                    error!("{d}");
                }
                if self.loaded_once {
                    error!(
                        why,
                        errors = diags.len(),
                        "policy rejected: the last good set stays in force (check with `cgsentry check`)"
                    );
                } else {
                    // No last good set yet: the built-in defaults rather than no rules.
                    let set = policy::builtin(&self.config);
                    error!(
                        why,
                        errors = diags.len(),
                        rules = set.rule.len(),
                        "policy rejected at start: running the built-in defaults until the files are fixed (check with `cgsentry check`)"
                    );
                    self.detector.set_config(set.detect.clone());
                    self.actuator.set_quarantine_parent(&set.quarantine_parent);
                    // Watch the directory the main file names, for the fix.
                    self.fingerprint = fingerprint(&self.config, &set.policies_dir);
                    self.policy = set;
                    self.loaded_once = true;
                }
                self.policy_errors = explain::diagnostics_text(&diags);
                self.events.push((
                    "policy_rejected".into(),
                    serde_json::json!({
                        "why": why,
                        "errors": self.policy_errors,
                        "in_force": self.policy.files,
                    }),
                ));
            }
        }
    }

    /// Reloads if a policy file changed since the last load.
    pub fn reload_if_changed(&mut self) {
        if fingerprint(&self.config, &self.policy.policies_dir) != self.fingerprint {
            self.reload("files changed");
        }
    }

    /// Where the agent contains something now (dry runs do nothing): the detectors do
    /// not count that memory against their ancestors.
    fn contained(&self) -> Vec<String> {
        self.actuator
            .entries()
            .iter()
            .filter(|a| !a.dry_run)
            .map(|a| a.target().to_owned())
            .collect()
    }

    /// Detects, decides, logs, writes the state file; returns what this tick found and
    /// decided.
    pub fn on_snapshot(&mut self, snap: &Snapshot, interval_ms: u64) -> report::Judgement {
        self.t += snap.interval_ns as f64 / 1e9;
        self.detector.set_contained(self.contained());
        let mut findings = self.detector.observe(snap);
        // Where each finding's processes are now: a quarantined offender's are in its
        // quarantine cgroup, which the finding names before it is mapped back.
        let mut live_in: Vec<String> = Vec::with_capacity(findings.len());
        for f in &mut findings {
            live_in.push(f.cgroup.clone());
            // A quarantined offender is still the offender: its ladder continues.
            if let Some((origin, recorded)) = self
                .actuator
                .origin_of(&f.cgroup)
                .map(|(o, id)| (o.to_owned(), id))
            {
                if let Some(id) = recorded.or_else(|| cgroup_id(self.actuator.writer(), &origin)) {
                    f.cgroup_id = id;
                }
                f.summary = format!("{} (in quarantine {})", f.summary, f.cgroup);
                f.cgroup = origin;
            }
        }
        let safety = self.safety_now(findings.iter().map(|f| f.cgroup.as_str()));
        let (facts, unread) = self.process_facts(&findings, &live_in, &safety);
        let with_procs: Vec<(crate::detect::Finding, Vec<ProcessRef<'_>>)> = findings
            .into_iter()
            .zip(&live_in)
            .map(|(f, dir)| {
                let mut procs: Vec<ProcessRef<'_>> = facts
                    .get(dir.as_str())
                    .map(|l| l.iter().map(crate::procinfo::ProcFacts::as_ref).collect())
                    .unwrap_or_default();
                if unread.contains(dir.as_str()) {
                    procs.push(ProcessRef::UNREAD);
                }
                (f, procs)
            })
            .collect();
        self.actuator.set_safety(&safety);
        self.decider.set_safety(safety);
        // A relaxed offender still working against its cap is not quiet yet.
        for id in self.actuator.pressing() {
            self.decider.hold(id, self.t);
        }
        let outcome = self.decider.tick(self.t, &self.policy, &with_procs);
        for d in &outcome.decisions {
            info!(cgroup = %d.cgroup, rule = %d.rule, action = ?d.action, dry_run = d.dry_run,
                  "decision: {}", d.reason);
        }
        for r in &outcome.releases {
            info!(cgroup = %r.cgroup, rule = %r.rule, steps = r.steps_taken, dry_run = r.dry_run,
                  stage = ?r.stage, "release: quiet for {:.0} s", r.quiet_sec);
        }
        let actions = self.act(snap, &outcome);
        let judged = explain::judge_all(&with_procs, &self.policy, &self.decider);
        let judgement = report::Judgement {
            findings: judged.clone(),
            decisions: outcome.decisions.clone(),
            releases: outcome.releases.clone(),
            actions,
            policy_errors: self.policy_errors.clone(),
        };
        let t = self.t;
        self.decisions.extend(
            outcome
                .decisions
                .into_iter()
                .map(|item| Logged { at: t, item }),
        );
        self.releases.extend(
            outcome
                .releases
                .into_iter()
                .map(|item| Logged { at: t, item }),
        );
        let excess = self.decisions.len().saturating_sub(explain::KEEP_DECISIONS);
        self.decisions.drain(..excess);
        let excess = self.releases.len().saturating_sub(explain::KEEP_DECISIONS);
        self.releases.drain(..excess);
        let state = State {
            timestamp_ms: snap.timestamp_ms,
            t,
            interval_ms,
            policy_files: self.policy.files.clone(),
            rules: self.policy.rule.len(),
            dry_run: self.policy.dry_run,
            policy_errors: self.policy_errors.clone(),
            findings: judged,
            decisions: self.decisions.clone(),
            releases: self.releases.clone(),
        };
        let written = explain::write_state(&self.state_dir, &state);
        self.state = state;
        match written {
            Ok(()) => self.state_write_failed = false,
            Err(e) if !self.state_write_failed => {
                warn!(
                    "cannot write the state file under {}: {e} (`cgsentry explain` will not see this agent)",
                    self.state_dir.display()
                );
                self.state_write_failed = true;
            }
            Err(_) => {}
        }
        judgement
    }
}

/// Runs the agent until SIGINT/SIGTERM or `--ticks`.
///
/// # Errors
/// Preflight or loading failed (the message says what to do), or stdout closed.
#[expect(
    clippy::too_many_lines,
    reason = "start-up, then the loop and its select arms"
)]
pub async fn run(args: RunArgs) -> Result<()> {
    raise_file_limit();
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
    let mut gpu = crate::gpu::GpuWorker::start(match args.nvml_lib.as_deref() {
        Some(p) if p.as_os_str() == "off" => GpuCollector::off(),
        lib => GpuCollector::open(lib, std::path::Path::new("/proc")),
    });
    let mut guard = Guard::new(
        args.config.clone(),
        args.state_dir.clone(),
        &env.cgroup_root,
        &args.journal_dir,
    );
    collector.set_user_names(guard.user_names());
    // On a systemd host, its units are acted on through it (limits it keeps and shows).
    if env.cgroup_root == std::path::Path::new("/sys/fs/cgroup")
        && let Some(sd) = crate::systemd::Systemd::detect()
    {
        info!("systemd units are contained through systemd's D-Bus API");
        guard.set_systemd(sd);
    }
    let interval_ms = u64::try_from(args.interval.as_millis()).unwrap_or(u64::MAX);
    let (mut ops, mut releases) = start_outputs(&args).await;
    ops.record(
        "agent_started",
        &serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "interval_ms": interval_ms,
            "policy_files": guard.policy().files,
            "rules": guard.policy().rule.len(),
            "dry_run": guard.policy().dry_run,
        }),
    );

    // systemd (Type=notify): started once the programs are attached and the journal
    // reconciled; from now on each finished tick keeps the watchdog (WatchdogSec) fed,
    // so a loop stuck anywhere gets the agent restarted.
    // Run by systemd with its output in the journal: events, not tables.
    let service = crate::preflight::stdout_is_journal();
    let mut tick_output = true;
    let mut status_line = StatusLine::default();
    // The watchdog is also fed from the loop between ticks (at half its period), so an
    // --interval longer than WatchdogSec is no reason to be killed; a loop stuck in a
    // tick feeds it from nowhere.
    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_timer = watchdog.map(|period| {
        let mut t = tokio::time::interval((period / 2).max(std::time::Duration::from_millis(100)));
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("watching"),
    ]);

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate: skip it so tick 1 spans an interval

    // Early ticks on a memory burst (see `watch`).
    let mut watch = Watch::new(args.watch_every);
    let mut done = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = watch.next() => {
                if !watch.burst(guard.reserve_percent()) {
                    continue;
                }
                ticker.reset();
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break }
            _ = sighup.recv() => { guard.reload("SIGHUP"); continue }
            Some(r) = releases.recv() => { manual_release(&mut guard, &mut ops, r); continue }
            () = async {
                match &mut watchdog_timer {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending().await,
                }
            } => { feed_watchdog(); continue }
        }
        let started = std::time::Instant::now();
        watch.ticked();
        guard.reload_if_changed();
        let mut snap = match collector.collect() {
            Ok(s) => s,
            Err(e) => {
                warn!("tick skipped: {e}");
                continue;
            }
        };
        snap.gpu = gpu.sample(&snap.processes);
        let judgement = guard.on_snapshot(&snap, interval_ms);
        ops.set_gpu_status(match gpu.status() {
            crate::gpu::GpuStatus::Ready { devices } => format!("{devices} GPU(s) through NVML"),
            crate::gpu::GpuStatus::Unavailable(why) => format!("NVML not available: {why}"),
            crate::gpu::GpuStatus::Off => "off".into(),
        });
        ops.after_tick(
            &snap,
            &judgement,
            &mut guard,
            started.elapsed().as_secs_f64(),
        );
        tracing::debug!(
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            cgroups = snap.cgroups.len(),
            processes = snap.processes.len(),
            findings = judgement.findings.len(),
            "tick"
        );
        if service && !args.json {
            // Under systemd the journal gets events, not a table a second: what the
            // agent does is said by the log lines of its decisions and actions, and by
            // the status line `systemctl status` shows.
            status_line.update(&snap, &judgement, guard.applied().len());
        } else if tick_output {
            let text = if args.json {
                report::json(&snap, &judgement, args.json_top)? + "\n"
            } else {
                report::table(&snap, args.top) + &report::findings(&judgement) + "\n"
            };
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                if e.kind() == std::io::ErrorKind::BrokenPipe && !service {
                    info!("stdout closed: stopping");
                    break;
                }
                // An unwritable output (a full disk, a journal gone) is no reason to
                // stop guarding: the ticks go on without it.
                warn!("writing the tick output failed: {e}; going on without it");
                tick_output = false;
            }
        }
        done += 1;
        if watchdog.is_some() {
            feed_watchdog();
        }
        if args.ticks.is_some_and(|n| done >= n) {
            break;
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    drop(collector);
    info!("eBPF programs detached");
    ops.record("agent_stopped", &serde_json::json!({ "ticks": done }));
    ops.close();
    Ok(())
}

/// systemd's `STATUS=` (what `systemctl status cgsentry` shows), sent when it changes.
#[derive(Debug, Default)]
struct StatusLine {
    last: String,
}

impl StatusLine {
    fn update(&mut self, snap: &Snapshot, j: &report::Judgement, applied: usize) {
        let line = format!(
            "watching {} cgroups; {} finding(s); {} containment(s) in force",
            snap.cgroups.len(),
            j.findings.len(),
            applied
        );
        if line != self.last {
            notify_systemd(&[sd_notify::NotifyState::Status(&line)]);
            self.last = line;
        }
    }
}

/// `WATCHDOG=1`: the loop is alive (nothing without a notify socket).
fn feed_watchdog() {
    notify_systemd(&[sd_notify::NotifyState::Watchdog]);
}

/// Tells systemd (when it started us with a notify socket; nothing otherwise).
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// The soft limit on open files up to the hard one: one descriptor per cgroup
/// directory walked, per control file read, per connection served. A limit reached
/// blinds the walk (a subtree skipped) — the default soft limit (1024) is a number any
/// user reaches with connections to the metrics port or a tree of cgroups.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => warn!("cannot read the open-file limit: {e}"),
    }
}

/// `cgsentry release`, carried out between ticks.
fn manual_release(guard: &mut Guard, ops: &mut crate::ops::Ops, r: crate::control::ReleaseRequest) {
    let result = match &r.cgroup {
        Some(cgroup) => guard.release_manual(cgroup, r.hold_off_sec),
        None => Ok(guard.release_all(r.hold_off_sec, feed_watchdog)),
    };
    if let Err(e) = &result {
        ops.record(
            "error",
            &serde_json::json!({"cgroup": r.cgroup, "action": "release (manual)", "errors": [e]}),
        );
    }
    for (event, body) in guard.take_events() {
        ops.record(&event, &body);
    }
    let _ = r.reply.send(result);
}

/// Opens the event log, binds the metrics endpoint and the control socket. Any of them
/// failing is logged and left off: guarding the machine matters more.
async fn start_outputs(
    args: &RunArgs,
) -> (
    crate::ops::Ops,
    tokio::sync::mpsc::Receiver<crate::control::ReleaseRequest>,
) {
    use crate::{cli::unless_off, control, eventlog, metrics};
    let event_log = unless_off(&args.event_log).map(|path| {
        eventlog::EventLog::open(eventlog::EventLogConfig {
            path,
            max_bytes: args.event_log_max_mib << 20,
            keep: args.event_log_keep,
        })
    });
    let mut exposition = None;
    let mut metrics_addr = None;
    if args.metrics_listen != "off" {
        match tokio::net::TcpListener::bind(&args.metrics_listen).await {
            Ok(listener) => {
                let addr = listener
                    .local_addr()
                    .map_or_else(|_| args.metrics_listen.clone(), |a| a.to_string());
                info!("metrics at http://{addr}/metrics");
                let text = metrics::Exposition::default();
                tokio::spawn(metrics::serve(listener, text.clone()));
                exposition = Some(text);
                metrics_addr = Some(addr);
            }
            Err(e) => warn!(
                "metrics endpoint off: cannot listen on {}: {e}",
                args.metrics_listen
            ),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut shared = None;
    let socket = args
        .control_socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("control.sock"));
    let mut socket_path = None;
    if let Some(path) = unless_off(&socket) {
        match control::bind(&path) {
            Ok(listener) => {
                info!("control socket at {}", path.display());
                let s = control::SharedRef::default();
                tokio::spawn(control::serve(listener, s.clone(), tx));
                shared = Some(s);
                socket_path = Some(path);
            }
            Err(e) => warn!("control socket off: {e}"),
        }
    }
    let ops = crate::ops::Ops::new(crate::ops::Outputs {
        event_log,
        exposition,
        metrics_addr,
        history_file: unless_off(&args.history_file),
        shared,
        socket_path,
    });
    (ops, rx)
}

/// Early ticks: `MemAvailable` read every `--watch-every`, judged by
/// [`crate::watch::MemWatch`].
struct Watch {
    every: std::time::Duration,
    timer: Option<tokio::time::Interval>,
    mem: crate::watch::MemWatch,
    started: tokio::time::Instant,
    last_tick: tokio::time::Instant,
    alarmed: bool,
}

impl Watch {
    fn new(every: std::time::Duration) -> Self {
        let timer = (!every.is_zero()).then(|| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(MissedTickBehavior::Skip);
            t
        });
        let now = tokio::time::Instant::now();
        Self {
            every,
            timer,
            mem: crate::watch::MemWatch::default(),
            started: now,
            last_tick: now,
            alarmed: false,
        }
    }

    /// The next sample is due; never, when the watch is off.
    async fn next(&mut self) {
        match &mut self.timer {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// A tick ran.
    fn ticked(&mut self) {
        self.last_tick = tokio::time::Instant::now();
    }

    /// Samples; true when a tick is due now (memory falling fast, and the last tick a
    /// watch period ago or more).
    fn burst(&mut self, reserve_percent: f64) -> bool {
        let Some((available, total)) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| crate::watch::parse_meminfo(&t))
        else {
            return false;
        };
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a percentage of a byte count"
        )]
        let reserve = (total as f64 * reserve_percent / 100.0) as u64;
        let now = tokio::time::Instant::now();
        let alarm = self.mem.observe(
            (now - self.started).as_secs_f64(),
            available,
            total,
            reserve,
        );
        match alarm {
            Some(a) if !self.alarmed => {
                info!(
                    falling_mib_per_s = a.falling_bytes_per_s / f64::from(1u32 << 20),
                    seconds_to_reserve = a.seconds_to_reserve,
                    "available memory falling fast: ticking early"
                );
                self.alarmed = true;
            }
            None if self.alarmed => {
                info!("available memory steady again: regular ticks");
                self.alarmed = false;
            }
            _ => {}
        }
        alarm.is_some() && now - self.last_tick >= self.every
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str =
        "[[rule]]\nname = \"r\"\nfinding = \"leak\"\nladder = [{action = \"notify\"}]\n";

    /// A broken edit is rejected and reported; the last good set stays in force; the
    /// fix is picked up by the next change check.
    #[test]
    fn reload_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("cgsentry.toml");
        std::fs::write(&main, "policies_dir = \"policies.d\"\n").unwrap();
        std::fs::create_dir(dir.path().join("policies.d")).unwrap();
        let file = dir.path().join("policies.d/10-a.toml");
        std::fs::write(&file, RULE).unwrap();
        let mut g = Guard::new(
            main,
            dir.path().join("state"),
            dir.path(),
            &dir.path().join("j"),
        );
        assert_eq!((g.policy.rule.len(), g.policy_errors.len()), (1, 0));

        std::fs::write(&file, format!("{RULE}[[rule]]\nname = \"oops\"\n")).unwrap();
        g.reload_if_changed();
        assert_eq!(g.policy.rule.len(), 1, "last good set kept");
        assert_eq!(g.policy_errors.len(), 1, "{:?}", g.policy_errors);
        assert!(
            g.policy_errors[0].contains("10-a.toml:5:"),
            "{:?}",
            g.policy_errors
        );

        std::fs::write(
            dir.path().join("policies.d/20-b.toml"),
            RULE.replace("\"r\"", "\"second\""),
        )
        .unwrap();
        std::fs::write(&file, RULE).unwrap();
        g.reload_if_changed();
        assert_eq!((g.policy.rule.len(), g.policy_errors.len()), (2, 0));

        // Unchanged files: no reload (the errors would otherwise be recomputed).
        let before = g.fingerprint.clone();
        g.reload_if_changed();
        assert_eq!(g.fingerprint, before);
    }

    /// Broken at start (no last good set): the built-in defaults, errors reported; a
    /// later broken edit keeps the set in force.
    #[test]
    fn broken_at_start_runs_the_builtin_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("cgsentry.toml");
        std::fs::create_dir(dir.path().join("policies.d")).unwrap();
        std::fs::write(
            dir.path().join("policies.d/10-a.toml"),
            "[[rule]]\nname = 1\n",
        )
        .unwrap();
        let g = Guard::new(
            main,
            dir.path().join("state"),
            dir.path(),
            &dir.path().join("j"),
        );
        assert!(
            g.policy.rule.iter().any(|r| r.name == "leak"),
            "{:?}",
            g.policy.rule
        );
        assert_eq!(g.policy_errors.len(), 1, "{:?}", g.policy_errors);
        // Nothing changed: no reload every tick.
        let mut g = g;
        let before = g.fingerprint.clone();
        g.reload_if_changed();
        assert_eq!(g.fingerprint, before);
        // The fix replaces the built-in set.
        std::fs::write(dir.path().join("policies.d/10-a.toml"), RULE).unwrap();
        g.reload_if_changed();
        assert_eq!((g.policy.rule.len(), g.policy_errors.len()), (1, 0));
    }

    /// `cgsentry release --hold-off` on a cgroup with nothing applied is "leave it
    /// alone": held off and listed; `--hold-off 0` lifts it; a plain release of a cgroup
    /// with nothing applied and no hold-off is refused, as is holding off one that does
    /// not exist.
    #[test]
    fn a_release_holds_off_and_is_lifted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("train")).unwrap();
        let mut g = Guard::new(
            dir.path().join("absent.toml"),
            dir.path().join("state"),
            dir.path(),
            &dir.path().join("j"),
        );
        g.take_events(); // the start's policy event
        let r = g.release_manual("/train", 600).unwrap();
        assert_eq!((r.cgroup.as_str(), r.hold_off_sec), ("/train", 600));
        let held = g.held_off();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].cgroup, "/train");
        assert!((held[0].seconds_left - 600.0).abs() < 1e-9);
        let ev = g.take_events();
        assert_eq!(ev[0].0, "release_manual");
        assert_eq!(ev[0].1["hold_off_sec"], 600);

        let r = g.release_manual("/train", 0).unwrap();
        assert_eq!(r.hold_off_sec, 0);
        assert!(g.held_off().is_empty());
        let e = g.release_manual("/train", 0).unwrap_err();
        assert!(e.contains("nothing is applied to /train"), "{e}");
        let e = g.release_manual("/gone", 600).unwrap_err();
        assert!(e.contains("no such cgroup"), "{e}");

        // A restarted agent keeps a running hold-off (from the journal), not a lifted one.
        std::fs::create_dir(dir.path().join("batch")).unwrap();
        g.release_manual("/batch", 3600).unwrap();
        g.release_manual("/train", 60).unwrap();
        g.release_manual("/train", 0).unwrap();
        let again = Guard::new(
            dir.path().join("absent.toml"),
            dir.path().join("state"),
            dir.path(),
            &dir.path().join("j"),
        );
        let held = again.held_off();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].cgroup, "/batch");
        assert!(held[0].seconds_left > 3590.0, "{held:?}");
    }

    /// `cgsentry release --all`: every cgroup with something applied is released and
    /// held off; nothing stays applied.
    #[test]
    fn release_all_undoes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Guard::new(
            dir.path().join("absent.toml"),
            dir.path().join("state"),
            dir.path(),
            &dir.path().join("j"),
        );
        for c in ["a", "b"] {
            std::fs::create_dir(dir.path().join(c)).unwrap();
            std::fs::write(dir.path().join(c).join("pids.max"), "max").unwrap();
            let d = crate::decide::Decision {
                cgroup_id: 0,
                cgroup: format!("/{c}"),
                finding: crate::detect::FindingKind::Explosion,
                rule: "r".into(),
                step: 0,
                action: crate::policy::Action::Throttle,
                params: crate::policy::Step {
                    pids_max: Some(8),
                    ..crate::policy::Step::bare(crate::policy::Action::Throttle)
                },
                dry_run: false,
                protected_by: vec![],
                refused: None,
                reason: String::new(),
            };
            let r = g.actuator.apply(&d, None);
            assert!(r.errors.is_empty(), "{r:?}");
        }
        assert_eq!(g.applied().len(), 2);
        let mut fed = 0;
        let r = g.release_all(60, || fed += 1);
        assert_eq!(fed, 2, "the watchdog is fed between cgroups");
        assert_eq!(r.reports.len(), 2, "{r:?}");
        assert!(g.applied().is_empty());
        for c in ["a", "b"] {
            let v = std::fs::read_to_string(dir.path().join(c).join("pids.max")).unwrap();
            assert_eq!(v, "max");
        }
        assert_eq!(g.held_off().len(), 2);
    }

    /// Without any configuration the agent runs with no rules rather than not at all.
    #[test]
    fn missing_configuration_means_no_rules() {
        let dir = tempfile::tempdir().unwrap();
        let g = Guard::new(
            dir.path().join("absent.toml"),
            dir.path().join("state"),
            dir.path(),
            &dir.path().join("j"),
        );
        assert!(g.policy.rule.is_empty() && g.policy_errors.is_empty());
    }
}
