//! What cgsentry never acts on, whatever a policy says: the guard must never become the
//! outage.
//!
//! - the root cgroup `/` (everything runs below it);
//! - the agent's own cgroup and every ancestor of it (throttling or freezing those
//!   stalls or freezes the guard itself, as a capped `/system.slice` did in the VM);
//! - PID 1's cgroup and its ancestors, and `/init.scope`;
//! - the quarantine parent and its ancestors (acting on it acts on every quarantined
//!   offender at once).
//!
//! And, unless the rule opts in with `scope = "subtree"`: a cgroup with child cgroups.
//! Its memory is its children's sum: several quiet services can add up to a "leak" of
//! their slice, and capping the slice caps every service in it (sshd, journald, the
//! agent). Its finding is reported (`notify`) and `explain` says why nothing more.
//!
//! Pure data: the agent fills it every tick from `/proc/self/cgroup`, `/proc/1/cgroup`,
//! the policy's quarantine parent and the findings' `cgroup.stat`; the decider holds
//! intervening steps back to `notify` with its reason, and the actuator refuses the
//! same set as a last line of defence.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Which cgroups a rule may act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Only a cgroup without child cgroups (the default): a parent's finding is
    /// reported, its children are the ones contained.
    #[default]
    Cgroup,
    /// Also a cgroup with child cgroups: the step applies to it and everything below
    /// (a slice or a pod the operator means to hold as a whole).
    Subtree,
}

impl Scope {
    pub const NAMES: &'static str = "cgroup, subtree";

    /// `cgroup` or `subtree`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cgroup" => Some(Scope::Cgroup),
            "subtree" => Some(Scope::Subtree),
            _ => None,
        }
    }
}

/// The never-act set, and what this tick's findings' cgroups are: parents, or inside a
/// subtree delegated to a non-root user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Safety {
    /// Cgroup → why it is never acted on.
    never: BTreeMap<String, String>,
    /// Cgroups made by root (a service manager, the kubelet) with child cgroups and no
    /// process of their own.
    parents: BTreeSet<String>,
    /// Cgroups at or below a directory a non-root user owns (`Delegate=`, a user's
    /// systemd, rootless containers): their names, children and layout are that
    /// user's choice.
    delegated: BTreeSet<String>,
    /// Parents that hold a cgroup never acted on or protected: no step on the whole
    /// subtree (`scope = "subtree"`) may reach it. Parent → why.
    shielded: BTreeMap<String, String>,
}

/// Whether a cgroup counts as a parent for [`Scope`]: child cgroups made by root
/// around no process of its own. A cgroup holding processes beside its children, or
/// inside a subtree a user owns, is judged as itself: an empty child made by the
/// leaking user (or a leak split over children the user made) must not turn its
/// containment into a report.
#[must_use]
pub fn counts_as_parent(descendants: u64, own_processes: usize, delegated: bool) -> bool {
    descendants > 0 && own_processes == 0 && !delegated
}

impl Default for Safety {
    /// The root alone (what holds before anything else is known).
    fn default() -> Self {
        Self::new(None, None, None)
    }
}

/// `path` and each of its ancestors below the root, deepest first.
fn with_ancestors(path: &str) -> impl Iterator<Item = &str> {
    let path = path.trim_end_matches('/');
    std::iter::successors(Some(path), |p| {
        p.rfind('/').map(|i| &p[..i]).filter(|p| !p.is_empty())
    })
    .filter(|p| !p.is_empty())
}

impl Safety {
    /// The set for an agent running in `agent_cgroup`, init in `init_cgroup`, and
    /// quarantine under `quarantine_parent` (relative or `/`-led), each with its
    /// ancestors; `/` and `/init.scope` always.
    #[must_use]
    pub fn new(
        agent_cgroup: Option<&str>,
        init_cgroup: Option<&str>,
        quarantine_parent: Option<&str>,
    ) -> Self {
        let mut never = BTreeMap::new();
        never.insert(
            "/".to_owned(),
            "the root cgroup: every process of the machine is below it".to_owned(),
        );
        never.insert(
            "/init.scope".to_owned(),
            "init.scope: PID 1, the service manager".to_owned(),
        );
        let quarantine = quarantine_parent.map(|q| format!("/{}", q.trim_matches('/')));
        for (path, own, holder) in [
            (
                agent_cgroup,
                "cgsentry's own cgroup",
                "cgsentry's own cgroup",
            ),
            (init_cgroup, "the cgroup of PID 1", "PID 1's cgroup"),
            (
                quarantine.as_deref(),
                "the quarantine parent: it holds every quarantined offender",
                "the quarantine parent",
            ),
        ] {
            let Some(path) = path.filter(|p| *p != "/") else {
                continue;
            };
            for (i, p) in with_ancestors(path).enumerate() {
                never.entry(p.to_owned()).or_insert_with(|| {
                    if i == 0 {
                        own.to_owned()
                    } else {
                        format!("it holds {holder} {path}")
                    }
                });
            }
        }
        Self {
            never,
            parents: BTreeSet::new(),
            delegated: BTreeSet::new(),
            shielded: BTreeMap::new(),
        }
    }

    /// Records which cgroups count as parents (this tick's findings' cgroups; see
    /// [`counts_as_parent`]).
    pub fn set_parents(&mut self, parents: impl IntoIterator<Item = String>) {
        self.parents = parents.into_iter().collect();
    }

    /// Records parents whose subtree holds a cgroup that must not be reached, with why.
    pub fn set_shielded(&mut self, shielded: impl IntoIterator<Item = (String, String)>) {
        self.shielded = shielded.into_iter().collect();
    }

    /// Records which cgroups are in a subtree a non-root user owns.
    pub fn set_delegated(&mut self, delegated: impl IntoIterator<Item = String>) {
        self.delegated = delegated.into_iter().collect();
    }

    /// Whether `cgroup` is in a subtree a non-root user owns (as last recorded).
    #[must_use]
    pub fn is_delegated(&self, cgroup: &str) -> bool {
        self.delegated.contains(cgroup)
    }

    /// Whether `cgroup` has child cgroups (as last recorded).
    #[must_use]
    pub fn is_parent(&self, cgroup: &str) -> bool {
        self.parents.contains(cgroup)
    }

    /// Why `cgroup` is never acted on, whatever the rule; `None` when it may be.
    #[must_use]
    pub fn never(&self, cgroup: &str) -> Option<&str> {
        let key = if cgroup.is_empty() { "/" } else { cgroup };
        self.never.get(key).map(String::as_str)
    }

    /// Why a rule of `scope` may not act on `cgroup` beyond notifying; `None` when it may.
    #[must_use]
    pub fn refusal(&self, cgroup: &str, scope: Scope) -> Option<String> {
        if let Some(why) = self.never(cgroup) {
            return Some(format!("{cgroup} is never acted on: {why}"));
        }
        if !self.parents.contains(cgroup) {
            return None;
        }
        match scope {
            Scope::Cgroup => Some(format!(
                "{cgroup} has child cgroups: only a rule with scope = \"subtree\" acts on a \
                 parent (its children are judged on their own)"
            )),
            Scope::Subtree => self
                .shielded
                .get(cgroup)
                .map(|why| format!("the subtree of {cgroup} holds {why}")),
        }
    }

    /// Every never-acted-on cgroup with why (for `status` and the actuator).
    pub fn never_set(&self) -> impl Iterator<Item = (&str, &str)> {
        self.never.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root, the agent's cgroup with every ancestor, init's, `/init.scope` and the
    /// quarantine parent with its ancestors are refused whatever the scope; their
    /// siblings and children are not.
    #[test]
    fn never_act_set() {
        let s = Safety::new(
            Some("/system.slice/cgsentry.service"),
            Some("/init.scope"),
            Some("cgsentry.slice/jail"),
        );
        for refused in [
            "/",
            "",
            "/system.slice",
            "/system.slice/cgsentry.service",
            "/init.scope",
            "/cgsentry.slice",
            "/cgsentry.slice/jail",
        ] {
            assert!(
                s.refusal(refused, Scope::Subtree).is_some(),
                "{refused:?} must be refused"
            );
        }
        for allowed in [
            "/system.slice/leaky.service",
            "/system.slice/cgsentry.service.d",
            "/system",
            "/user.slice",
            "/cgsentry.slice/jail/quarantine-leak",
            "/init.scopes",
        ] {
            assert_eq!(s.refusal(allowed, Scope::Cgroup), None, "{allowed:?}");
        }
        assert!(
            s.refusal("/system.slice", Scope::Subtree)
                .unwrap()
                .contains("holds cgsentry's own cgroup /system.slice/cgsentry.service")
        );
    }

    /// Without knowing anything else, the root is still refused.
    #[test]
    fn the_root_always() {
        let s = Safety::default();
        assert!(s.refusal("/", Scope::Subtree).is_some());
        assert!(s.never("/").unwrap().contains("root"));
        // An agent or init in the root itself adds nothing but the root.
        let s = Safety::new(Some("/"), Some("/"), None);
        assert_eq!(s.never_set().count(), 2, "/ and /init.scope");
    }

    /// A parent is root's: children, no process of its own, not in a user's subtree.
    #[test]
    fn what_counts_as_a_parent() {
        assert!(counts_as_parent(3, 0, false), "a slice with services");
        assert!(!counts_as_parent(0, 0, false), "a leaf");
        assert!(
            !counts_as_parent(1, 2, false),
            "processes beside an empty child a user made"
        );
        assert!(
            !counts_as_parent(5, 0, true),
            "a user's own subtree, split into children"
        );
    }

    /// A subtree step never reaches a cgroup below that is never acted on or protected.
    #[test]
    fn a_shielded_subtree_is_refused() {
        let mut s = Safety::default();
        s.set_parents(["/system.slice".to_owned()]);
        s.set_shielded([(
            "/system.slice".to_owned(),
            "/system.slice/ssh.service, protected by sshd".to_owned(),
        )]);
        let why = s.refusal("/system.slice", Scope::Subtree).unwrap();
        assert!(why.contains("ssh.service"), "{why}");
    }

    /// A parent is acted on only by a rule that opts in.
    #[test]
    fn parents_need_scope_subtree() {
        let mut s = Safety::default();
        s.set_parents(["/kubepods.slice/kubepods-besteffort.slice".to_owned()]);
        let why = s
            .refusal("/kubepods.slice/kubepods-besteffort.slice", Scope::Cgroup)
            .unwrap();
        assert!(why.contains("scope = \"subtree\""), "{why}");
        assert_eq!(
            s.refusal("/kubepods.slice/kubepods-besteffort.slice", Scope::Subtree),
            None
        );
    }
}
