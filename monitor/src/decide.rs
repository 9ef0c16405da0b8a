//! Decisions: findings plus policy, over time. Pure logic, no kernel access.
//!
//! For each (cgroup, rule) with a live finding, [`Decider`] climbs the rule's ladder one
//! step at a time: the first step once the finding has lasted its `after_sec`, each next
//! step `after_sec` after the previous one while the finding persists (the cooldown) —
//! or sooner when the finding says the limit is nearer: never more than half the time
//! left until the limit.
//! When the finding has been absent for the rule's `release_after_quiet_sec`, the ladder
//! is released in two stages: [`ReleaseStage::Relax`] (thaw, give room, keep the caps)
//! and, after as long again without the finding and without the cgroup pressing on its
//! cap ([`Decider::hold`]), [`ReleaseStage::Full`], which undoes everything. A finding
//! that comes back while relaxed re-takes the last step at once. Protected cgroups get `notify` decisions only, saying
//! what was held back and why. A cgroup the operator released (`cgsentry release`) is
//! held off for the time asked ([`Decider::hold_off`]): its findings are still made and
//! reported, but no ladder starts on it until then. The act stage (containment) carries
//! decisions out.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{
    cgroupfs::CgroupId,
    detect::{Finding, FindingKind},
    policy::{Action, PolicySet, ProcessRef, Step},
    safety::Safety,
};

/// One step to take now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub cgroup_id: CgroupId,
    pub cgroup: String,
    pub finding: FindingKind,
    pub rule: String,
    /// Index of the step in the rule's ladder.
    pub step: usize,
    /// What to do (`notify` when protection held the step back).
    pub action: Action,
    /// The step's parameters (limits, grace).
    pub params: Step,
    /// Log it, do not do it.
    pub dry_run: bool,
    /// Protect entries that held an intervening step back to `notify`.
    pub protected_by: Vec<String>,
    /// Why a safety invariant held an intervening step back to `notify` (the root, the
    /// agent's own cgroup and its ancestors, init, the quarantine parent, a parent
    /// cgroup under a rule without `scope = "subtree"`: see [`crate::safety`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Why, in one line: the finding's summary and the ladder's position.
    pub reason: String,
}

/// How far a release goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseStage {
    /// Thaw and give room (a wider `memory.high`); other limits stay.
    Relax,
    /// Undo everything.
    #[default]
    Full,
}

/// Undo (part of) what a rule did to a cgroup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub cgroup_id: CgroupId,
    pub cgroup: String,
    pub rule: String,
    #[serde(default)]
    pub stage: ReleaseStage,
    /// Steps that had been taken (the highest last).
    pub steps_taken: usize,
    pub quiet_sec: f64,
    pub dry_run: bool,
}

/// Where one rule stands on one cgroup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LadderState {
    pub cgroup: String,
    pub rule: String,
    pub finding: FindingKind,
    /// Steps taken so far (0: the finding is live, no step due yet).
    pub steps_taken: usize,
    pub first_seen: f64,
    pub last_seen: f64,
    /// When the last step was taken.
    pub stepped_at: f64,
    pub release_after_quiet_sec: u64,
    pub dry_run: bool,
    /// Relaxed (first release stage done); quiet again → full release.
    #[serde(default)]
    pub relaxed: bool,
    /// When the next step is due, besides its cooldown.
    #[serde(default)]
    pub due: Due,
}

/// What sets the time of a ladder's next step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Due {
    /// Its `after_sec` (shortened when the limit is near).
    #[default]
    Cooldown,
    /// The finding came back while relaxed: at once.
    Relapsed,
    /// It was held back (protection, or a safety invariant): tried again a cooldown
    /// later, taken once nothing holds it back any more. A held step does not climb.
    Held,
}

/// Everything decided in one tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub decisions: Vec<Decision>,
    pub releases: Vec<Release>,
}

/// A cgroup the operator released and asked to be left alone until `until`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldOff {
    pub cgroup: String,
    /// Agent-clock second when ladders may start again.
    pub until: f64,
}

#[derive(Debug, Default)]
pub struct Decider {
    states: HashMap<(CgroupId, String), LadderState>,
    held_off: HashMap<CgroupId, HeldOff>,
    safety: Safety,
}

impl Decider {
    /// What is never acted on (and which cgroups are parents) from now on.
    pub fn set_safety(&mut self, safety: Safety) {
        self.safety = safety;
    }

    /// What is never acted on, as last set.
    #[must_use]
    pub fn safety(&self) -> &Safety {
        &self.safety
    }

    /// Ladders in progress.
    pub fn states(&self) -> impl Iterator<Item = &LadderState> {
        self.states.values()
    }

    /// One tick at time `t` (seconds): `findings` with the processes of each one's
    /// cgroup (for matching and protection).
    pub fn tick(
        &mut self,
        t: f64,
        policy: &PolicySet,
        findings: &[(Finding, Vec<ProcessRef<'_>>)],
    ) -> Outcome {
        let mut out = Outcome::default();
        self.held_off.retain(|_, h| t < h.until);
        // A relaxed cgroup still growing or stalling in reclaim is not quiet, whichever
        // rule saw it: fully releasing its caps now would hand it to the leak ladder,
        // which starts over from notify and ends in a freeze (seen in the VM: a pool
        // relaxed after its explosion, released while draining its backlog, then frozen
        // by the leak rule for minutes). Its caps stay relaxed until it settles.
        for (finding, _) in findings {
            if matches!(finding.kind, FindingKind::Leak | FindingKind::Pressure) {
                self.hold(finding.cgroup_id, t);
            }
        }
        for (finding, processes) in findings {
            if self.held_off.contains_key(&finding.cgroup_id) {
                continue; // the operator's word, for as long as they asked
            }
            let Some(rule) = policy.rule_for(finding, processes) else {
                continue;
            };
            if finding.severity < rule.min_severity {
                continue;
            }
            let dry_run = policy.dry_run || rule.dry_run;
            let state = self
                .states
                .entry((finding.cgroup_id, rule.name.clone()))
                .or_insert_with(|| LadderState {
                    cgroup: finding.cgroup.clone(),
                    rule: rule.name.clone(),
                    finding: finding.kind,
                    steps_taken: 0,
                    first_seen: t,
                    last_seen: t,
                    stepped_at: t,
                    release_after_quiet_sec: rule.release_after_quiet_sec,
                    dry_run,
                    relaxed: false,
                    due: Due::Cooldown,
                });
            if state.relaxed {
                // Back while on probation: re-take the last step now.
                state.relaxed = false;
                state.due = Due::Relapsed;
                state.steps_taken = state.steps_taken.saturating_sub(1);
            }
            state.last_seen = t;
            state.release_after_quiet_sec = rule.release_after_quiet_sec;
            state.dry_run = dry_run;
            let Some(step) = rule.ladder.get(state.steps_taken) else {
                continue; // top of the ladder: stay there until released
            };
            let since = if state.steps_taken == 0 && state.due != Due::Held {
                state.first_seen
            } else {
                state.stepped_at
            };
            // Never wait past half the time the finding says is left: a step due after
            // the limit is reached would come too late to matter. A step held back is
            // tried again a cooldown later (reported each time, not every tick).
            let wait = match state.due {
                Due::Held => step.after_sec.max(rule.cooldown_sec) as f64,
                Due::Relapsed => 0.0,
                Due::Cooldown => finding
                    .time_to_limit_sec
                    .map_or(step.after_sec as f64, |ttl| {
                        (step.after_sec as f64).min(ttl / 2.0)
                    }),
            };
            if t - since < wait {
                continue;
            }
            let (action, protected_by, refused, held) =
                held_back(&self.safety, policy, rule.scope, finding, processes, step);
            out.decisions.push(Decision {
                cgroup_id: finding.cgroup_id,
                cgroup: finding.cgroup.clone(),
                finding: finding.kind,
                rule: rule.name.clone(),
                step: state.steps_taken,
                action,
                params: step.clone(),
                dry_run,
                protected_by,
                refused,
                reason: format!(
                    "{}: {} — rule {:?} step {}/{}{held}",
                    finding.kind,
                    finding.summary,
                    rule.name,
                    state.steps_taken + 1,
                    rule.ladder.len()
                ),
            });
            if action == step.action {
                state.steps_taken += 1;
                state.due = Due::Cooldown;
            } else {
                state.due = Due::Held;
            }
            state.stepped_at = t;
        }
        out.releases = self.releases(t);
        out
    }

    /// Ladders quiet for their rule's time: relaxed (first stage) or released.
    fn releases(&mut self, t: f64) -> Vec<Release> {
        let mut out = Vec::new();
        self.states.retain(|(id, _), s| {
            let quiet = t - s.last_seen;
            if quiet < s.release_after_quiet_sec as f64 || quiet <= 0.0 {
                return true;
            }
            if s.steps_taken == 0 {
                return false;
            }
            let stage = if s.relaxed {
                ReleaseStage::Full
            } else {
                ReleaseStage::Relax
            };
            out.push(Release {
                cgroup_id: *id,
                cgroup: s.cgroup.clone(),
                rule: s.rule.clone(),
                stage,
                steps_taken: s.steps_taken,
                quiet_sec: quiet,
                dry_run: s.dry_run,
            });
            if stage == ReleaseStage::Relax {
                s.relaxed = true;
                s.last_seen = t; // the probation's quiet starts now
                return true;
            }
            false
        });
        out
    }

    /// The relaxed ladders of cgroup `id` are not quiet at `t`: it still presses on the
    /// cap it was left under (its work is running in batches), so the full release waits.
    pub fn hold(&mut self, id: CgroupId, t: f64) {
        for ((cg, _), s) in &mut self.states {
            if *cg == id && s.relaxed {
                s.last_seen = t;
            }
        }
    }

    /// Continues a ladder a previous agent had started (from its journal).
    pub fn adopt(&mut self, id: CgroupId, state: LadderState) {
        self.states.insert((id, state.rule.clone()), state);
    }

    /// Drops the ladders of a cgroup that no longer exists (nothing left to undo).
    pub fn forget(&mut self, id: CgroupId) {
        self.states.retain(|(cg, _), _| *cg != id);
    }

    /// The operator released cgroup `id` at `t`: no ladder starts on it for `for_sec`
    /// seconds (0: none is held off; a finding still there starts over at once).
    pub fn hold_off(&mut self, id: CgroupId, cgroup: &str, t: f64, for_sec: f64) {
        if for_sec > 0.0 {
            self.held_off.insert(
                id,
                HeldOff {
                    cgroup: cgroup.to_owned(),
                    until: t + for_sec,
                },
            );
        } else {
            self.held_off.remove(&id);
        }
    }

    /// Cgroups held off after a manual release (some may have lapsed since the last tick).
    pub fn held_off(&self) -> impl Iterator<Item = (&CgroupId, &HeldOff)> {
        self.held_off.iter()
    }

    /// Until when cgroup `id` is held off (agent clock), if it is.
    #[must_use]
    pub fn held_off_until(&self, id: CgroupId) -> Option<f64> {
        self.held_off.get(&id).map(|h| h.until)
    }

    /// Forgets every ladder on the cgroup at `path` (whatever its id).
    pub fn forget_path(&mut self, path: &str) {
        self.states.retain(|_, s| s.cgroup != path);
    }
}

/// The action a step becomes on this cgroup: itself, or `notify` when a safety
/// invariant refuses it (with why) or a protect entry holds (with the entries); and a
/// note for the reason saying what was held back.
fn held_back(
    safety: &Safety,
    policy: &PolicySet,
    scope: crate::safety::Scope,
    finding: &Finding,
    processes: &[ProcessRef<'_>],
    step: &Step,
) -> (Action, Vec<String>, Option<String>, String) {
    let refused = step
        .action
        .intervenes()
        .then(|| safety.refusal(&finding.cgroup, scope))
        .flatten();
    if let Some(why) = refused {
        let held = format!(" ({:?} held back: {why})", step.action);
        return (Action::Notify, Vec::new(), Some(why), held);
    }
    let delegated = safety.is_delegated(&finding.cgroup);
    let (action, by, held) = protection(policy, finding, processes, step, delegated);
    (action, by, None, held)
}

/// The action a step becomes on this cgroup: itself, or `notify` when a protect entry
/// matches (with the entries and a note saying what was held back).
fn protection(
    policy: &PolicySet,
    finding: &Finding,
    processes: &[ProcessRef<'_>],
    step: &Step,
    delegated: bool,
) -> (Action, Vec<String>, String) {
    if !step.action.intervenes() {
        return (step.action, Vec::new(), String::new());
    }
    let by: Vec<String> = policy
        .protected_by_in(&finding.cgroup, processes, delegated)
        .into_iter()
        .map(|p| p.name.clone())
        .collect();
    if by.is_empty() {
        return (step.action, by, String::new());
    }
    let held = format!(
        " ({:?} held back: protected by {})",
        step.action,
        by.join(", ")
    );
    (Action::Notify, by, held)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        detect::Severity,
        policy::{MainConfig, merge, parse_policy_file},
    };

    fn policy(text: &str, dry_run: bool) -> PolicySet {
        let (p, r) = parse_policy_file(Path::new("t.toml"), text).expect("valid policy");
        merge(
            MainConfig {
                dry_run,
                ..MainConfig::default()
            },
            vec![("t.toml".into(), p, r)],
        )
    }

    const LADDER: &str = r#"
[[protect]]
name = "sshd"
comm = "^sshd$"

[[rule]]
name = "leaks"
finding = "leak"
cgroup = "/**"
release_after_quiet_sec = 10
ladder = [
    { action = "notify" },
    { action = "throttle", after_sec = 5, memory_high_percent = 100 },
    { action = "freeze", after_sec = 5 },
]
"#;

    fn leak(cgroup: &str) -> Finding {
        Finding {
            kind: FindingKind::Leak,
            severity: Severity::Warning,
            cgroup_id: 7,
            cgroup: cgroup.into(),
            pid: None,
            comm: None,
            summary: "memory grows".into(),
            window_sec: 30.0,
            time_to_limit_sec: Some(100.0),
            evidence: Vec::new(),
            gpus: Vec::new(),
        }
    }

    fn p(comm: &str) -> ProcessRef<'_> {
        ProcessRef {
            comm,
            ..ProcessRef::default()
        }
    }

    /// (second, actions decided that second, rules released that second)
    fn run(
        policy: &PolicySet,
        comms: &[&str],
        live: impl Fn(u32) -> bool,
        secs: u32,
    ) -> Vec<(u32, Vec<Action>, Vec<ReleaseStage>)> {
        let mut d = Decider::default();
        let mut log = Vec::new();
        for s in 0..secs {
            let procs: Vec<ProcessRef<'_>> = comms.iter().map(|c| p(c)).collect();
            let findings = if live(s) {
                vec![(leak("/app"), procs)]
            } else {
                vec![]
            };
            let o = d.tick(f64::from(s), policy, &findings);
            if !o.decisions.is_empty() || !o.releases.is_empty() {
                log.push((
                    s,
                    o.decisions.iter().map(|d| d.action).collect(),
                    o.releases.iter().map(|r| r.stage).collect(),
                ));
            }
        }
        log
    }

    /// A manual release with a hold-off: no step while it lasts, though the finding
    /// persists; then the ladder starts over, its first step after its own delay; a
    /// hold-off of 0 holds nothing.
    #[test]
    fn a_held_off_cgroup_gets_no_ladder_until_the_hold_lapses() {
        let pol = policy(LADDER, false);
        let mut d = Decider::default();
        let f = leak("/app");
        let log: Vec<(u32, Action)> = (0..40)
            .flat_map(|s| {
                if s == 7 {
                    // What `release_manual` does: forget the ladders, hold the cgroup off.
                    d.forget(f.cgroup_id);
                    d.hold_off(f.cgroup_id, &f.cgroup, f64::from(s), 20.0);
                    assert_eq!(d.held_off_until(f.cgroup_id), Some(27.0));
                }
                let o = d.tick(f64::from(s), &pol, &[(f.clone(), vec![p("python")])]);
                o.decisions.into_iter().map(move |d| (s, d.action))
            })
            .collect();
        let (notify, throttle) = (Action::Notify, Action::Throttle);
        let want = [(0, notify), (5, throttle), (27, notify), (32, throttle)];
        assert_eq!(log, [&want[..], &[(37, Action::Freeze)]].concat());
        assert_eq!(d.held_off().count(), 0, "lapsed holds are dropped");
        d.hold_off(f.cgroup_id, &f.cgroup, 40.0, 0.0);
        assert_eq!(d.held_off_until(f.cgroup_id), None);
    }

    #[test]
    fn ladder_climbs_with_cooldowns_and_stops_at_the_top() {
        let log = run(&policy(LADDER, false), &["python"], |_| true, 30);
        assert_eq!(
            log,
            vec![
                (0, vec![Action::Notify], vec![]),
                (5, vec![Action::Throttle], vec![]),
                (10, vec![Action::Freeze], vec![]),
            ]
        );
    }

    /// 2 s left until the limit: every 5 s cooldown shrinks to 1 s.
    #[test]
    fn a_near_limit_shortens_the_cooldowns() {
        let pol = policy(LADDER, false);
        let mut d = Decider::default();
        let mut f = leak("/app");
        f.time_to_limit_sec = Some(2.0);
        let mut log = Vec::new();
        for s in 0..4 {
            let o = d.tick(f64::from(s), &pol, &[(f.clone(), vec![])]);
            log.extend(o.decisions.iter().map(|d| (s, d.action)));
        }
        assert_eq!(
            log,
            vec![
                (0, Action::Notify),
                (1, Action::Throttle),
                (2, Action::Freeze)
            ]
        );
    }

    /// Release in two stages, relapse, and starting over, as timelines: (finding live
    /// at second s, seconds run, expected log).
    #[test]
    fn release_timelines() {
        type Log = Vec<(u32, Vec<Action>, Vec<ReleaseStage>)>;
        type Case = (&'static str, fn(u32) -> bool, u32, Log);
        let (n, t) = (Action::Notify, Action::Throttle);
        let (relax, full) = (ReleaseStage::Relax, ReleaseStage::Full);
        let cases: [Case; 2] = [
            (
                // Live for 0..=6, quiet from 7: relaxed at 16 (quiet 10 s), fully
                // released at 26 (10 s more); live again at 30: the ladder starts over.
                "two stages, then over",
                |s| s <= 6 || s >= 30,
                32,
                vec![
                    (0, vec![n], vec![]),
                    (5, vec![t], vec![]),
                    (16, vec![], vec![relax]),
                    (26, vec![], vec![full]),
                    (30, vec![n], vec![]),
                ],
            ),
            (
                // Back at 20 while relaxed: the last step again at once, then onwards.
                "relapse",
                |s| s <= 6 || s >= 20,
                27,
                vec![
                    (0, vec![n], vec![]),
                    (5, vec![t], vec![]),
                    (16, vec![], vec![relax]),
                    (20, vec![t], vec![]),
                    (25, vec![Action::Freeze], vec![]),
                ],
            ),
        ];
        for (what, live, secs, want) in cases {
            let log = run(&policy(LADDER, false), &["python"], live, secs);
            assert_eq!(log, want, "{what}");
        }
    }

    /// A relaxed cgroup that still presses on its cap is not quiet: the full release
    /// waits until it stops.
    #[test]
    fn hold_defers_the_full_release() {
        let pol = policy(LADDER, false);
        let mut d = Decider::default();
        let mut stages = Vec::new();
        for s in 0..40 {
            let findings = if s <= 6 {
                vec![(leak("/app"), vec![p("python")])]
            } else {
                vec![]
            };
            if s < 30 {
                d.hold(7, f64::from(s)); // only relaxed ladders are held
            }
            let o = d.tick(f64::from(s), &pol, &findings);
            stages.extend(o.releases.iter().map(|r| (s, r.stage)));
        }
        assert_eq!(
            stages,
            vec![(16, ReleaseStage::Relax), (40 - 1, ReleaseStage::Full)]
        );
    }

    /// An explosion ladder, relaxed, is not fully released while the same cgroup keeps
    /// growing (a leak finding under another rule): it waits until the growth stops.
    #[test]
    fn growth_under_another_rule_defers_the_full_release() {
        let pol = policy(
            "[[rule]]\nname = \"burst\"\nfinding = \"explosion\"\ncgroup = \"/**\"\n\
             release_after_quiet_sec = 10\n[[rule.ladder]]\naction = \"throttle\"\n\
             memory_high_percent = 100\n\
             [[rule]]\nname = \"growth\"\nfinding = \"leak\"\ncgroup = \"/**\"\n\
             [[rule.ladder]]\naction = \"notify\"\n",
            false,
        );
        let mut d = Decider::default();
        let mut stages = Vec::new();
        for s in 0..60 {
            let mut findings = Vec::new();
            if s <= 2 {
                let burst = Finding {
                    kind: FindingKind::Explosion,
                    ..leak("/app")
                };
                findings.push((burst, vec![p("pool")]));
            }
            // Growing from 12 s (after the relax at 13 s would be due) to 30 s.
            if (12..=30).contains(&s) {
                findings.push((leak("/app"), vec![p("pool")]));
            }
            let o = d.tick(f64::from(s), &pol, &findings);
            stages.extend(
                o.releases
                    .iter()
                    .filter(|r| r.rule == "burst")
                    .map(|r| (s, r.stage)),
            );
        }
        // Relaxed at 12 (quiet 10 s), then held while the leak lasts: full 10 s after it.
        assert_eq!(
            stages,
            vec![(12, ReleaseStage::Relax), (40, ReleaseStage::Full)]
        );
    }

    #[test]
    fn a_short_gap_is_not_a_release() {
        let log = run(
            &policy(LADDER, false),
            &["python"],
            |s| s != 3 && s != 4,
            12,
        );
        assert_eq!(
            log,
            vec![
                (0, vec![Action::Notify], vec![]),
                (5, vec![Action::Throttle], vec![]),
                (10, vec![Action::Freeze], vec![])
            ]
        );
    }

    #[test]
    fn protection_holds_every_intervening_step_back_to_notify() {
        let pol = policy(LADDER, false);
        let mut d = Decider::default();
        let root = |comm| ProcessRef {
            uid: Some(0),
            ..p(comm)
        };
        let procs = vec![root("sshd"), root("sshd")];
        let mut all = Vec::new();
        for s in 0..12 {
            all.extend(
                d.tick(f64::from(s), &pol, &[(leak("/app"), procs.clone())])
                    .decisions,
            );
        }
        // Notify at 0, the throttle held back at 5 (not climbed: tried again a
        // cooldown, 30 s, later).
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all.iter().all(|d| d.action == Action::Notify), "{all:#?}");
        assert_eq!(all[1].protected_by, vec!["sshd".to_owned()]);
        assert_eq!(all[1].step, 1);
        assert!(
            all[1]
                .reason
                .contains("Throttle held back: protected by sshd"),
            "{}",
            all[1].reason
        );
    }

    /// A step held back while a cgroup is a parent is taken once it is not any more
    /// (tried again a cooldown later): holding back never climbs the ladder for nothing.
    #[test]
    fn a_held_step_is_taken_once_nothing_holds_it() {
        let pol = policy(LADDER, false);
        let mut d = Decider::default();
        let mut parent = Safety::default();
        parent.set_parents(["/app".to_owned()]);
        let mut log = Vec::new();
        for s in 0..80 {
            d.set_safety(if s < 20 {
                parent.clone()
            } else {
                Safety::default()
            });
            let o = d.tick(f64::from(s), &pol, &[(leak("/app"), vec![])]);
            log.extend(o.decisions.iter().map(|d| (s, d.action, d.step)));
        }
        assert_eq!(
            log,
            [
                (0, Action::Notify, 0),
                (5, Action::Notify, 1),    // the throttle, held back
                (35, Action::Throttle, 1), // a cooldown later, no longer a parent
                (40, Action::Freeze, 2),
            ]
        );
    }

    /// Whatever the policy says (`/**` matches the root too), no intervening step is
    /// taken on the root, the agent's cgroup or its ancestors, or a parent cgroup under
    /// a rule without `scope = "subtree"`: each is held back to notify with the reason.
    #[test]
    fn safety_holds_every_intervening_step_back_on_the_never_act_set() {
        let subtree = LADDER.replace(
            "release_after_quiet_sec = 10",
            "release_after_quiet_sec = 10\nscope = \"subtree\"",
        );
        for (text, cgroup, parent, want) in [
            (LADDER, "/", false, "the root cgroup"),
            (&subtree as &str, "/", false, "the root cgroup"),
            (
                LADDER,
                "/system.slice",
                false,
                "holds cgsentry's own cgroup",
            ),
            (
                &subtree,
                "/system.slice",
                false,
                "holds cgsentry's own cgroup",
            ),
            (
                LADDER,
                "/system.slice/cgsentry.service",
                false,
                "cgsentry's own cgroup",
            ),
            (LADDER, "/init.scope", false, "PID 1"),
            (LADDER, "/cgsentry.slice", false, "quarantine parent"),
            (LADDER, "/user.slice", true, "scope = \"subtree\""),
        ] {
            let pol = policy(text, false);
            let mut d = Decider::default();
            let mut safety = Safety::new(
                Some("/system.slice/cgsentry.service"),
                Some("/init.scope"),
                Some("cgsentry.slice"),
            );
            if parent {
                safety.set_parents([cgroup.to_owned()]);
            }
            d.set_safety(safety);
            let all: Vec<Decision> = (0..12)
                .flat_map(|s| {
                    d.tick(f64::from(s), &pol, &[(leak(cgroup), vec![])])
                        .decisions
                })
                .collect();
            assert_eq!(all.len(), 2, "{cgroup}: reported, not climbed: {all:#?}");
            assert!(
                all.iter().all(|d| d.action == Action::Notify),
                "{cgroup}: {all:#?}"
            );
            let why = all[1].refused.as_deref().unwrap_or_default();
            assert!(why.contains(want), "{cgroup}: {why}");
            assert!(
                all[1].reason.contains("Throttle held back"),
                "{}",
                all[1].reason
            );
        }
        // The same parent under a rule that opts in is acted on.
        let pol = policy(&subtree, false);
        let mut d = Decider::default();
        let mut safety = Safety::default();
        safety.set_parents(["/user.slice".to_owned()]);
        d.set_safety(safety);
        let actions: Vec<Action> = (0..12)
            .flat_map(|s| {
                d.tick(f64::from(s), &pol, &[(leak("/user.slice"), vec![])])
                    .decisions
            })
            .map(|d| d.action)
            .collect();
        assert_eq!(actions, [Action::Notify, Action::Throttle, Action::Freeze]);
    }

    #[test]
    fn dry_run_is_carried_on_every_decision() {
        let log_pol = policy(LADDER, true);
        let mut d = Decider::default();
        let o = d.tick(0.0, &log_pol, &[(leak("/app"), vec![p("x")])]);
        assert!(o.decisions.iter().all(|d| d.dry_run));
    }

    #[test]
    fn findings_below_the_rule_severity_or_without_a_rule_decide_nothing() {
        let pol = policy(
            r#"
[[rule]]
name = "critical leaks only"
finding = "leak"
cgroup = "/batch/**"
min_severity = "critical"
ladder = [{ action = "freeze" }]
"#,
            false,
        );
        let mut d = Decider::default();
        let mut f = leak("/batch/job");
        let o = d.tick(0.0, &pol, &[(f.clone(), vec![])]);
        assert!(o.decisions.is_empty(), "warning < critical");
        f.severity = Severity::Critical;
        let o = d.tick(1.0, &pol, &[(f, vec![])]);
        assert_eq!(o.decisions[0].action, Action::Freeze);
        let o = d.tick(2.0, &pol, &[(leak("/elsewhere"), vec![])]);
        assert!(o.decisions.is_empty(), "no rule matches /elsewhere");
    }
}
