//! Policies: what to do about a finding, and what never to touch.
//!
//! Two kinds of files, both TOML:
//! - the main file, `/etc/cgsentry/cgsentry.toml`: agent settings (`dry_run`,
//!   `policies_dir`, `quarantine_parent`) and the detectors' `[detect]` table;
//! - policy files, `<policies_dir>/*.toml` (default `/etc/cgsentry/policies.d`), merged
//!   in file-name order: `[[protect]]` entries and `[[rule]]`s. A rule with the name of
//!   an earlier one replaces it (so `90-local.toml` can override a shipped rule); for a
//!   finding, the last matching rule wins.
//!
//! `protect` always wins: a protected cgroup is never throttled, moved, frozen or killed,
//! whatever a rule says (it may still be notified about).
//!
//! Every problem is reported as `file:line:col: message`, all of them at once where the
//! file parses; a set with any error is rejected whole, so a running agent keeps its last
//! good set.
use std::{
    collections::BTreeMap,
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use globset::{Glob, GlobMatcher};
use regex::Regex;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::detect::{DetectConfig, Finding, FindingKind, GpuUse, Severity};

/// Where the main file lives unless told otherwise.
pub const DEFAULT_MAIN: &str = "/etc/cgsentry/cgsentry.toml";
/// Where policy files live unless the main file says otherwise.
pub const DEFAULT_POLICIES_DIR: &str = "/etc/cgsentry/policies.d";

/// One problem in one file, at a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no position (an unreadable file).
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// A warning: the set is accepted, the operator should look.
    pub warning: bool,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}{}",
            self.file.display(),
            self.line,
            self.col,
            if self.warning { "warning: " } else { "" },
            self.message
        )
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
    diags: Vec<Diagnostic>,
}

impl FileCtx<'_> {
    fn diagnostic(
        &self,
        span: &Range<usize>,
        message: impl Into<String>,
        warning: bool,
    ) -> Diagnostic {
        let (line, col) = line_col(self.text, span.start);
        Diagnostic {
            file: self.path.to_owned(),
            line,
            col,
            message: message.into(),
            warning,
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.diagnostic(&span, message, false);
        self.diags.push(d);
    }

    fn toml_error(&mut self, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        self.error(span, e.message().trim().to_owned());
    }
}

/// Steps of a ladder, gentlest first. A ladder only climbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Log and notify; the only step allowed on protected cgroups.
    Notify,
    /// Limit in place: `cpu.max`, `memory.high`, `pids.max`.
    Throttle,
    /// Move into `<quarantine_parent>/quarantine-<name>` with the step's limits (a
    /// systemd unit: into the transient scope `quarantine-<name>.scope` there, part
    /// of the unit it came from).
    Quarantine,
    /// `cgroup.freeze`: stopped dead, nothing lost; thawed on release.
    Freeze,
    /// SIGTERM, a grace period, then `cgroup.kill`. Last resort.
    Kill,
}

impl Action {
    const NAMES: &'static str = "notify, throttle, quarantine, freeze, kill";

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "notify" => Action::Notify,
            "throttle" => Action::Throttle,
            "quarantine" => Action::Quarantine,
            "freeze" => Action::Freeze,
            "kill" => Action::Kill,
            _ => return None,
        })
    }

    /// Whether this step changes the offender (everything but `notify`).
    #[must_use]
    pub fn intervenes(self) -> bool {
        self != Action::Notify
    }
}

fn parse_kind(s: &str) -> Option<FindingKind> {
    FindingKind::ALL.into_iter().find(|k| k.name() == s)
}

fn parse_severity(s: &str) -> Option<Severity> {
    Some(match s {
        "hint" => Severity::Hint,
        "warning" => Severity::Warning,
        "critical" => Severity::Critical,
        _ => return None,
    })
}

// ---- raw file formats (what serde reads; spans kept for messages) ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyFile {
    #[serde(default)]
    protect: Vec<RawProtect>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    name: Spanned<String>,
    cgroup: Option<Spanned<String>>,
    comm: Option<Spanned<String>>,
    exe: Option<Spanned<String>>,
    user: Option<String>,
    uid: Option<u32>,
    runtime: Option<Spanned<String>>,
    container_id: Option<Spanned<String>>,
    pod_uid: Option<Spanned<String>>,
    qos_class: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    finding: Spanned<String>,
    cgroup: Option<Spanned<String>>,
    comm: Option<Spanned<String>>,
    exe: Option<Spanned<String>>,
    user: Option<String>,
    uid: Option<u32>,
    runtime: Option<Spanned<String>>,
    container_id: Option<Spanned<String>>,
    pod_uid: Option<Spanned<String>>,
    qos_class: Option<Spanned<String>>,
    dry_run: Option<bool>,
    scope: Option<Spanned<String>>,
    min_severity: Option<Spanned<String>>,
    cooldown_sec: Option<u64>,
    release_after_quiet_sec: Option<u64>,
    gpu_device: Option<Spanned<RawDevice>>,
    gpu_memory_percent: Option<Spanned<f64>>,
    gpu_util_percent: Option<Spanned<f64>>,
    exec: Option<Spanned<Vec<String>>>,
    ladder: Spanned<Vec<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDevice {
    Index(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    action: Spanned<String>,
    after_sec: Option<u64>,
    cpu_max_percent: Option<Spanned<f64>>,
    memory_high_percent: Option<Spanned<f64>>,
    pids_max: Option<u64>,
    swap_max_mib: Option<u64>,
    cpu_weight: Option<Spanned<u64>>,
    grace_sec: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMain {
    dry_run: Option<bool>,
    policies_dir: Option<String>,
    quarantine_parent: Option<Spanned<String>>,
    detect: Option<DetectConfig>,
    notify: Option<Spanned<crate::notify::NotifyConfig>>,
}

// ---- validated, effective policy ----

/// Which cgroups (and processes in them) an entry applies to. Every given criterion
/// must hold. Process criteria (`comm`, `exe`, `user`, `uid`) hold for a rule when any
/// process of the cgroup matches (the offender is somewhere in it); for a protect entry
/// only when every process of the cgroup matches, and with the entry's `uid`/`user` —
/// root when it names none — as the real uid (see [`Matcher::protects`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Matcher {
    /// Glob on the cgroup path: `*` stays within one level, `**` crosses levels
    /// (`/user.slice/**`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Regular expression searched in the process name (anchor with `^…$`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Container and pod identity read from the cgroup path ([`crate::identity`]):
    /// `runtime`, `container_id` (a prefix of at least 12 hex digits, as `docker ps`
    /// prints it), `pod_uid`, `qos_class`. They hold for the container's cgroup and
    /// every cgroup below it.
    #[serde(flatten)]
    pub identity: crate::identity::Identity,
    #[serde(skip)]
    compiled: Compiled,
}

#[derive(Clone, Debug, Default)]
struct Compiled {
    cgroup: Option<GlobMatcher>,
    comm: Option<Regex>,
    exe: Option<Regex>,
}

/// A process as matchers see it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessRef<'a> {
    pub comm: &'a str,
    /// `/proc/PID/exe` (a path text).
    pub exe: Option<&'a str>,
    pub user: Option<&'a str>,
    /// The real uid (`/proc/PID/status`), never the owner of `/proc/PID`.
    pub uid: Option<u32>,
}

impl ProcessRef<'_> {
    /// A process that is there but could not be read (too many to read in a tick, or
    /// its cgroup's process list unreadable): it matches no process criterion, so a
    /// protect entry that needs every process of the cgroup does not hold.
    pub const UNREAD: ProcessRef<'static> = ProcessRef {
        comm: "",
        exe: None,
        user: None,
        uid: None,
    };
}

impl Matcher {
    fn has_process_criteria(&self) -> bool {
        self.comm.is_some() || self.exe.is_some() || self.user.is_some() || self.uid.is_some()
    }

    fn process_matches(&self, p: &ProcessRef<'_>) -> bool {
        self.compiled
            .comm
            .as_ref()
            .is_none_or(|r| r.is_match(p.comm))
            && self
                .compiled
                .exe
                .as_ref()
                .is_none_or(|r| p.exe.is_some_and(|e| r.is_match(e)))
            && self.user.as_deref().is_none_or(|u| p.user == Some(u))
            && self.uid.is_none_or(|u| p.uid == Some(u))
    }

    fn identity_matches(&self, path: &str) -> bool {
        let want = &self.identity;
        if want.is_empty() {
            return true;
        }
        let have = crate::identity::of(path);
        let same = |w: &Option<String>, h: &Option<String>| w.is_none() || w == h;
        same(&want.runtime, &have.runtime)
            && same(&want.pod_uid, &have.pod_uid)
            && same(&want.qos_class, &have.qos_class)
            && want.container_id.as_deref().is_none_or(|w| {
                have.container_id
                    .as_deref()
                    .is_some_and(|h| h.starts_with(w))
            })
    }

    fn cgroup_matches(&self, path: &str) -> bool {
        self.compiled
            .cgroup
            .as_ref()
            .is_none_or(|g| g.is_match(path))
            && self.identity_matches(path)
    }

    /// Whether a rule's criteria hold for the cgroup at `path`, holding `processes`:
    /// process criteria when any process matches.
    #[must_use]
    pub fn matches(&self, path: &str, processes: &[ProcessRef<'_>]) -> bool {
        self.cgroup_matches(path)
            && (!self.has_process_criteria() || processes.iter().any(|p| self.process_matches(p)))
    }

    /// Whether a protect entry's criteria hold for the cgroup at `path`, holding
    /// `processes` (all of them: a process that could not be read is
    /// [`ProcessRef::UNREAD`]). Process criteria must hold for every process, and each
    /// must run with the entry's `uid`/`user` as its real uid — uid 0 when the entry
    /// names neither. So a process naming itself `sshd`, or an unprivileged copy of
    /// `/usr/sbin/sshd`, protects nothing; and a cgroup that holds a protected program
    /// next to others (an SSH login's session scope, where the root `sshd` of the
    /// session sits beside the user's shell and jobs) is not protected by it. An empty
    /// cgroup is not protected by process criteria.
    #[must_use]
    pub fn protects(&self, path: &str, processes: &[ProcessRef<'_>]) -> bool {
        if !self.cgroup_matches(path) {
            return false;
        }
        if !self.has_process_criteria() {
            return true;
        }
        let owner_named = self.uid.is_some() || self.user.is_some();
        !processes.is_empty()
            && processes
                .iter()
                .all(|p| self.process_matches(p) && (owner_named || p.uid == Some(0)))
    }

    /// Warnings about a protect entry that an unprivileged user could satisfy or that
    /// depends on more than the kernel's word.
    fn protect_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.comm.is_some() && self.exe.is_none() {
            out.push(
                "this protect entry matches a process name (comm): a process chooses its \
                 own name (prctl, a copied binary), so only the real uid stands behind it; \
                 add `exe = \"^/path/to/program$\"`, or protect the service by `cgroup`"
                    .to_owned(),
            );
        }
        if self.has_process_criteria() && self.uid.is_none() && self.user.is_none() {
            out.push(
                "process criteria in a protect entry hold only for processes whose real \
                 uid is 0 (root) when it names no `uid`/`user`, and only when every \
                 process of the cgroup matches"
                    .to_owned(),
            );
        }
        if self.user.is_some() && self.uid.is_none() {
            out.push(
                "`user` needs the name service (NSS): until a name resolves it does not \
                 match; `uid = N` holds without it"
                    .to_owned(),
            );
        }
        out
    }
}

/// Never act on what this matches.
#[derive(Clone, Debug, Serialize)]
pub struct Protect {
    pub name: String,
    #[serde(flatten)]
    pub matcher: Matcher,
    /// The file it came from.
    pub source: PathBuf,
    /// What `cgsentry check` warns about this entry, at its position.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// One step of a ladder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub action: Action,
    /// The finding must persist this long after the previous step (the cooldown).
    pub after_sec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_max_percent: Option<f64>,
    /// `memory.high` as a percent of the cgroup's memory when the step is taken
    /// (100 holds it where it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_high_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `memory.swap.max` in MiB (0: no more swap — a capped burst then cannot spill its
    /// pages onto a slow disk, which would stall everyone else's I/O).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_max_mib: Option<u64>,
    /// `cpu.weight` (1–10000, the default is 100): under contention the rest of the
    /// machine comes first; on an idle machine the offender still uses every CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// Kill: seconds between SIGTERM and SIGKILL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_sec: Option<u64>,
}

impl Step {
    /// A step of `action` with no limits, taken at once.
    #[must_use]
    pub fn bare(action: Action) -> Self {
        Self {
            action,
            after_sec: 0,
            cpu_max_percent: None,
            memory_high_percent: None,
            pids_max: None,
            swap_max_mib: None,
            cpu_weight: None,
            grace_sec: None,
        }
    }
}

/// What to do about one kind of finding in the cgroups a rule matches.
#[derive(Clone, Debug, Serialize)]
pub struct Rule {
    pub name: String,
    pub finding: FindingKind,
    #[serde(flatten)]
    pub matcher: Matcher,
    pub dry_run: bool,
    /// Whether the rule may act on a cgroup with child cgroups (`subtree`) or only on
    /// cgroups without (`cgroup`, the default; a parent's finding is then reported).
    pub scope: crate::safety::Scope,
    pub min_severity: Severity,
    pub cooldown_sec: u64,
    /// Undo everything once the finding has been absent this long.
    pub release_after_quiet_sec: u64,
    pub ladder: Vec<Step>,
    /// GPU conditions: the rule applies only while they hold.
    #[serde(skip_serializing_if = "GpuCondition::is_empty")]
    pub gpu: GpuCondition,
    /// A program run (argv, no shell) for each of this rule's decisions and releases,
    /// with the event as JSON on stdin and in `CGSENTRY_*` variables; rate-limited with
    /// the other notifications, killed after 10 s.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    pub source: PathBuf,
    /// What `cgsentry check` warns about this rule, at its position.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// Which GPU a rule's GPU conditions look at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuDevice {
    /// Any GPU on which the finding's cgroup (or a descendant) holds memory.
    #[default]
    Any,
    /// This NVML index, whether the cgroup uses it or not.
    Index(u32),
    /// This UUID (`GPU-…` or `MIG-…`).
    Uuid(String),
}

/// `gpu_memory_percent` / `gpu_util_percent` of a rule: every given threshold must be
/// reached on one device in scope ([`GpuDevice`]). Without GPU data (no NVML) a rule
/// with conditions never applies.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuCondition {
    pub device: GpuDevice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub util_percent: Option<f64>,
}

impl GpuCondition {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.memory_percent.is_none() && self.util_percent.is_none()
    }

    /// Whether the conditions hold for a finding (always, without conditions).
    #[must_use]
    pub fn holds(&self, finding: &Finding) -> bool {
        self.is_empty() || self.device_meeting(finding).is_some()
    }

    /// The first device in scope that meets every threshold.
    #[must_use]
    pub fn device_meeting<'a>(&self, finding: &'a Finding) -> Option<&'a GpuUse> {
        finding.gpus.iter().find(|g| {
            let in_scope = match &self.device {
                GpuDevice::Any => g.cgroup_bytes > 0,
                GpuDevice::Index(i) => g.device == *i,
                GpuDevice::Uuid(u) => &g.uuid == u,
            };
            in_scope
                && self
                    .memory_percent
                    .is_none_or(|t| g.memory_percent.is_some_and(|m| m >= t))
                && self
                    .util_percent
                    .is_none_or(|t| g.util_percent.is_some_and(|u| u >= t))
        })
    }
}

/// The merged, validated policy the agent runs with.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySet {
    /// Log what would be done, do nothing (every rule; a rule can also set its own).
    pub dry_run: bool,
    /// Webhook, desktop notifications, rate limits (`[notify]` of the main file).
    pub notify: crate::notify::NotifyConfig,
    pub policies_dir: PathBuf,
    pub quarantine_parent: String,
    pub detect: DetectConfig,
    pub protect: Vec<Protect>,
    pub rule: Vec<Rule>,
    /// Files read, in merge order.
    pub files: Vec<PathBuf>,
}

const DEFAULT_COOLDOWN_SEC: u64 = 30;
const DEFAULT_RELEASE_SEC: u64 = 120;
const DEFAULT_GRACE_SEC: u64 = 10;

/// The matcher fields of a `[[protect]]` or `[[rule]]` entry, as read.
struct RawWho {
    cgroup: Option<Spanned<String>>,
    comm: Option<Spanned<String>>,
    exe: Option<Spanned<String>>,
    user: Option<String>,
    uid: Option<u32>,
    runtime: Option<Spanned<String>>,
    container_id: Option<Spanned<String>>,
    pod_uid: Option<Spanned<String>>,
    qos_class: Option<Spanned<String>>,
}

/// Validates an identity criterion against what [`crate::identity`] can produce.
fn identity_value(
    ctx: &mut FileCtx<'_>,
    v: Option<Spanned<String>>,
    what: &str,
    ok: impl Fn(&str) -> bool,
    expected: &str,
) -> Option<String> {
    let v = v?;
    let span = v.span();
    let value = v.into_inner();
    if !ok(&value) {
        ctx.error(span, format!("{what} {value:?}: expected {expected}"));
    }
    Some(value)
}

fn compile_matcher(ctx: &mut FileCtx<'_>, who: RawWho) -> Matcher {
    let RawWho {
        cgroup,
        comm,
        exe,
        user,
        uid,
        runtime,
        container_id,
        pod_uid,
        qos_class,
    } = who;
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let identity = crate::identity::Identity {
        runtime: identity_value(
            ctx,
            runtime,
            "runtime",
            |s| ["docker", "containerd", "cri-o", "podman", "kubernetes"].contains(&s),
            "docker, containerd, cri-o, podman or kubernetes",
        ),
        container_id: identity_value(
            ctx,
            container_id,
            "container_id",
            |s| (12..=64).contains(&s.len()) && hex(s),
            "12 to 64 hex digits (an id or its prefix, lower case)",
        )
        .map(|s| s.to_ascii_lowercase()),
        pod_uid: identity_value(
            ctx,
            pod_uid,
            "pod_uid",
            |s| s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'),
            "a pod UID like 7c1a5f2e-3b4d-4c5e-9f6a-1b2c3d4e5f60",
        ),
        qos_class: identity_value(
            ctx,
            qos_class,
            "qos_class",
            |s| ["guaranteed", "burstable", "besteffort"].contains(&s),
            "guaranteed, burstable or besteffort",
        ),
    };
    let mut m = Matcher {
        user,
        uid,
        identity,
        ..Matcher::default()
    };
    if let Some(g) = cgroup {
        let span = g.span();
        let glob = g.into_inner();
        if glob.starts_with('/') {
            match globset::GlobBuilder::new(&glob)
                .literal_separator(true)
                .build()
                .map(|g: Glob| g.compile_matcher())
            {
                Ok(c) => m.compiled.cgroup = Some(c),
                Err(e) => ctx.error(span, format!("bad cgroup glob {glob:?}: {}", e.kind())),
            }
        } else {
            ctx.error(
                span,
                format!(
                    "cgroup glob {glob:?} must start with '/' (a path below the cgroup v2 root)"
                ),
            );
        }
        m.cgroup = Some(glob);
    }
    for (field, value) in [("comm", comm), ("exe", exe)] {
        let Some(v) = value else { continue };
        let span = v.span();
        let pattern = v.into_inner();
        match Regex::new(&pattern) {
            Ok(r) => {
                if field == "comm" {
                    m.compiled.comm = Some(r);
                } else {
                    m.compiled.exe = Some(r);
                }
            }
            Err(e) => ctx.error(
                span,
                format!("bad {field} regex: {}", e.to_string().replace('\n', " ")),
            ),
        }
        if field == "comm" {
            m.comm = Some(pattern);
        } else {
            m.exe = Some(pattern);
        }
    }
    m
}

fn percent(ctx: &mut FileCtx<'_>, v: Option<Spanned<f64>>, what: &str) -> Option<f64> {
    let v = v?;
    let (span, value) = (v.span(), *v.get_ref());
    if !(value > 0.0 && value <= 10_000.0 && value.is_finite()) {
        ctx.error(
            span,
            format!("{what} must be a percentage above 0 (got {value})"),
        );
    }
    Some(value)
}

fn validate_ladder(ctx: &mut FileCtx<'_>, raw: Spanned<Vec<RawStep>>, cooldown: u64) -> Vec<Step> {
    let ladder_span = raw.span();
    let raw_ladder = raw.into_inner();
    if raw_ladder.is_empty() {
        ctx.error(ladder_span, "a rule needs at least one ladder step");
    }
    let mut ladder = Vec::new();
    for (i, step) in raw_ladder.into_iter().enumerate() {
        let action_span = step.action.span();
        let Some(action) = Action::parse(step.action.get_ref()) else {
            ctx.error(
                action_span,
                format!(
                    "unknown action {:?}: expected one of {}",
                    step.action.get_ref(),
                    Action::NAMES
                ),
            );
            continue;
        };
        if let Some(prev) = ladder.last().map(|s: &Step| s.action)
            && action <= prev
        {
            ctx.error(
                action_span.clone(),
                format!(
                    "ladder steps must climb ({}): {action:?} after {prev:?}",
                    Action::NAMES
                ),
            );
        }
        let cpu = percent(ctx, step.cpu_max_percent, "cpu_max_percent");
        let mem = percent(ctx, step.memory_high_percent, "memory_high_percent");
        let weight = step.cpu_weight.map(|w| {
            let (span, value) = (w.span(), *w.get_ref());
            if !(1..=10_000).contains(&value) {
                ctx.error(span, format!("cpu_weight must be 1 to 10000 (got {value})"));
            }
            value
        });
        if action == Action::Throttle
            && cpu.is_none()
            && mem.is_none()
            && step.pids_max.is_none()
            && step.swap_max_mib.is_none()
            && weight.is_none()
        {
            ctx.error(
                action_span.clone(),
                "a throttle step needs at least one of cpu_max_percent, cpu_weight, memory_high_percent, pids_max, swap_max_mib",
            );
        }
        if step.grace_sec.is_some() && action != Action::Kill {
            ctx.error(action_span, "grace_sec only applies to a kill step");
        }
        ladder.push(Step {
            action,
            after_sec: step.after_sec.unwrap_or(if i == 0 { 0 } else { cooldown }),
            cpu_max_percent: cpu,
            memory_high_percent: mem,
            pids_max: step.pids_max,
            swap_max_mib: step.swap_max_mib,
            cpu_weight: weight,
            grace_sec: (action == Action::Kill)
                .then(|| step.grace_sec.unwrap_or(DEFAULT_GRACE_SEC)),
        });
    }
    ladder
}

fn validate_scope(ctx: &mut FileCtx<'_>, raw: Option<Spanned<String>>) -> crate::safety::Scope {
    let Some(s) = raw else {
        return crate::safety::Scope::default();
    };
    crate::safety::Scope::parse(s.get_ref()).unwrap_or_else(|| {
        ctx.error(
            s.span(),
            format!(
                "unknown scope {:?}: expected one of {} (\"subtree\" lets the rule act on a cgroup with child cgroups)",
                s.get_ref(),
                crate::safety::Scope::NAMES
            ),
        );
        crate::safety::Scope::default()
    })
}

/// Slices that hold everything of a kind: a subtree rule matching one is warned about.
const BROAD_PARENTS: [&str; 5] = [
    "/system.slice",
    "/user.slice",
    "/machine.slice",
    "/kubepods.slice",
    "/kubepods",
];

/// A rule's `exec`: an absolute program path and its arguments.
fn validate_exec(ctx: &mut FileCtx<'_>, exec: Option<Spanned<Vec<String>>>) -> Vec<String> {
    let Some(e) = exec else {
        return Vec::new();
    };
    let span = e.span();
    let argv = e.into_inner();
    match argv.first() {
        None => ctx.error(
            span,
            "exec must name a program: [\"/path/to/hook\", \"arg\", …]",
        ),
        Some(p) if !p.starts_with('/') => ctx.error(
            span,
            format!("exec program {p:?} must be an absolute path (the agent has no useful PATH)"),
        ),
        Some(_) => {}
    }
    argv
}

/// What `check` warns about a rule (it is accepted all the same).
fn rule_warnings(
    ctx: &FileCtx<'_>,
    matcher: &Matcher,
    scope: crate::safety::Scope,
    at: &Range<usize>,
) -> Vec<Diagnostic> {
    let broad: Vec<&str> = BROAD_PARENTS
        .iter()
        .filter(|p| matcher.matches(p, &[]))
        .copied()
        .collect();
    if scope != crate::safety::Scope::Subtree || broad.is_empty() {
        return Vec::new();
    }
    vec![ctx.diagnostic(
        at,
        format!(
            "scope = \"subtree\" with a cgroup glob that takes in a whole slice ({}): one \
             finding there would act on every service or pod in it",
            broad.join(", ")
        ),
        true,
    )]
}

fn validate_rule(ctx: &mut FileCtx<'_>, raw: RawRule) -> Option<Rule> {
    let name_span = raw.name.span();
    let finding_span = raw.finding.span();
    let finding = parse_kind(raw.finding.get_ref());
    if finding.is_none() {
        ctx.error(
            finding_span.clone(),
            format!(
                "unknown finding {:?}: expected one of {}",
                raw.finding.get_ref(),
                FindingKind::ALL.map(FindingKind::name).join(", ")
            ),
        );
    }
    let min_severity = match raw.min_severity {
        None => Severity::Warning,
        Some(s) => parse_severity(s.get_ref()).unwrap_or_else(|| {
            ctx.error(
                s.span(),
                format!(
                    "unknown severity {:?}: expected hint, warning or critical",
                    s.get_ref()
                ),
            );
            Severity::Warning
        }),
    };
    let matcher = compile_matcher(
        ctx,
        RawWho {
            cgroup: raw.cgroup,
            comm: raw.comm,
            exe: raw.exe,
            user: raw.user,
            uid: raw.uid,
            runtime: raw.runtime,
            container_id: raw.container_id,
            pod_uid: raw.pod_uid,
            qos_class: raw.qos_class,
        },
    );
    let scope_span = raw.scope.as_ref().map(Spanned::span);
    let scope = validate_scope(ctx, raw.scope);
    let cooldown = raw.cooldown_sec.unwrap_or(DEFAULT_COOLDOWN_SEC);
    let ladder = validate_ladder(ctx, raw.ladder, cooldown);
    if let (crate::safety::Scope::Subtree, Some(span)) = (scope, scope_span.clone())
        && ladder.iter().any(|s| s.action == Action::Quarantine)
    {
        ctx.error(
            span,
            "scope = \"subtree\" cannot quarantine: a subtree is contained in place \
             (throttle, freeze, kill); quarantine moves one cgroup's own processes",
        );
    }
    if let Some(kind) = finding.filter(|k| k.notify_only())
        && ladder.iter().any(|s| s.action.intervenes())
    {
        ctx.error(
            finding_span,
            format!("{kind} is reported, never contained: its ladder can only notify"),
        );
    }
    let gpu = validate_gpu(
        ctx,
        raw.gpu_device,
        raw.gpu_memory_percent,
        raw.gpu_util_percent,
    );
    let exec = validate_exec(ctx, raw.exec);
    let warnings = rule_warnings(ctx, &matcher, scope, &name_span);
    Some(Rule {
        warnings,
        name: raw.name.into_inner(),
        finding: finding?,
        exec,
        matcher,
        dry_run: raw.dry_run.unwrap_or(false),
        scope,
        min_severity,
        cooldown_sec: cooldown,
        release_after_quiet_sec: raw.release_after_quiet_sec.unwrap_or(DEFAULT_RELEASE_SEC),
        ladder,
        gpu,
        source: ctx.path.to_owned(),
    })
}

fn validate_gpu(
    ctx: &mut FileCtx<'_>,
    device: Option<Spanned<RawDevice>>,
    memory: Option<Spanned<f64>>,
    util: Option<Spanned<f64>>,
) -> GpuCondition {
    let device = match device {
        None => GpuDevice::Any,
        Some(d) => {
            let span = d.span();
            match d.into_inner() {
                RawDevice::Index(i) => GpuDevice::Index(i),
                RawDevice::Name(n) if n == "any" => GpuDevice::Any,
                RawDevice::Name(n) if n.starts_with("GPU-") || n.starts_with("MIG-") => {
                    GpuDevice::Uuid(n)
                }
                RawDevice::Name(n) => {
                    ctx.error(
                        span,
                        format!(
                            "gpu_device {n:?}: expected an NVML index (0), a UUID (\"GPU-…\", as `nvidia-smi -L` prints) or \"any\""
                        ),
                    );
                    GpuDevice::Any
                }
            }
        }
    };
    let mut at_most_100 = |v: Option<Spanned<f64>>, what: &str| {
        let span = v.as_ref().map(Spanned::span);
        let value = percent(ctx, v, what);
        if let (Some(x), Some(span)) = (value, span)
            && x > 100.0
        {
            ctx.error(span, format!("{what} is at most 100 (got {x})"));
        }
        value
    };
    GpuCondition {
        device,
        memory_percent: at_most_100(memory, "gpu_memory_percent"),
        util_percent: at_most_100(util, "gpu_util_percent"),
    }
}

/// Parses and validates one policy file.
///
/// # Errors
/// Every problem found, with its position.
pub fn parse_policy_file(
    path: &Path,
    text: &str,
) -> Result<(Vec<Protect>, Vec<Rule>), Vec<Diagnostic>> {
    let mut ctx = FileCtx {
        path,
        text,
        diags: Vec::new(),
    };
    let raw: RawPolicyFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            ctx.toml_error(&e);
            return Err(ctx.diags);
        }
    };
    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let protect: Vec<Protect> = raw
        .protect
        .into_iter()
        .map(|p| {
            let span = p.comm.as_ref().map_or_else(|| p.name.span(), Spanned::span);
            let matcher = compile_matcher(
                &mut ctx,
                RawWho {
                    cgroup: p.cgroup,
                    comm: p.comm,
                    exe: p.exe,
                    user: p.user,
                    uid: p.uid,
                    runtime: p.runtime,
                    container_id: p.container_id,
                    pod_uid: p.pod_uid,
                    qos_class: p.qos_class,
                },
            );
            let warnings = matcher
                .protect_warnings()
                .into_iter()
                .map(|w| ctx.diagnostic(&span, w, true))
                .collect();
            Protect {
                name: p.name.get_ref().clone(),
                matcher,
                source: path.to_owned(),
                warnings,
            }
        })
        .collect();
    let mut rules = Vec::new();
    for r in raw.rule {
        let span = r.name.span();
        if let Some(first) = names.insert(r.name.get_ref().clone(), span.clone()) {
            let (line, _) = line_col(text, first.start);
            ctx.error(
                span,
                format!(
                    "rule {:?} is defined twice in this file (first on line {line})",
                    r.name.get_ref()
                ),
            );
        }
        if let Some(rule) = validate_rule(&mut ctx, r) {
            rules.push(rule);
        }
    }
    if ctx.diags.is_empty() {
        Ok((protect, rules))
    } else {
        Err(ctx.diags)
    }
}

/// The main file's settings.
#[derive(Clone, Debug)]
pub struct MainConfig {
    pub dry_run: bool,
    pub policies_dir: PathBuf,
    pub quarantine_parent: String,
    pub detect: DetectConfig,
    pub notify: crate::notify::NotifyConfig,
}

impl Default for MainConfig {
    fn default() -> Self {
        Self {
            dry_run: false,
            policies_dir: PathBuf::from(DEFAULT_POLICIES_DIR),
            quarantine_parent: "cgsentry.slice".into(),
            detect: DetectConfig::default(),
            notify: crate::notify::NotifyConfig::default(),
        }
    }
}

/// Parses the main file; a missing file means defaults.
///
/// # Errors
/// Every problem found, with its position.
pub fn parse_main(path: &Path, text: &str) -> Result<MainConfig, Vec<Diagnostic>> {
    let mut ctx = FileCtx {
        path,
        text,
        diags: Vec::new(),
    };
    let raw: RawMain = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            ctx.toml_error(&e);
            return Err(ctx.diags);
        }
    };
    let quarantine_parent = match raw.quarantine_parent {
        None => "cgsentry.slice".to_owned(),
        Some(q) => {
            let name = q.get_ref().clone();
            if name.is_empty() || name.contains("..") || name.starts_with('/') {
                ctx.error(
                    q.span(),
                    format!("quarantine_parent {name:?} must be a relative cgroup path like \"cgsentry.slice\""),
                );
            }
            name
        }
    };
    let policies_dir = raw.policies_dir.map_or_else(
        || PathBuf::from(DEFAULT_POLICIES_DIR),
        |d| {
            // Relative to the main file's directory.
            path.parent().unwrap_or(Path::new("/")).join(d)
        },
    );
    let notify = match raw.notify {
        None => crate::notify::NotifyConfig::default(),
        Some(n) => {
            let span = n.span();
            let n = n.into_inner();
            for p in n.problems() {
                ctx.error(span.clone(), format!("[notify]: {p}"));
            }
            n
        }
    };
    if ctx.diags.is_empty() {
        Ok(MainConfig {
            dry_run: raw.dry_run.unwrap_or(false),
            policies_dir,
            quarantine_parent,
            detect: raw.detect.unwrap_or_default(),
            notify,
        })
    } else {
        Err(ctx.diags)
    }
}

fn unreadable(path: &Path, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        file: path.to_owned(),
        line: 0,
        col: 0,
        message: format!("cannot read: {e}"),
        warning: false,
    }
}

/// `*.toml` files of `dir`, sorted by file name.
///
/// # Errors
/// The directory cannot be listed.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, Diagnostic> {
    let entries = std::fs::read_dir(dir).map_err(|e| unreadable(dir, &e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

impl PolicySet {
    /// No rules, no protection: what the agent runs with until a set loads.
    #[must_use]
    pub fn empty() -> Self {
        merge(MainConfig::default(), Vec::new())
    }
}

/// Merges parsed files in order: protect entries accumulate; a rule replaces an earlier
/// one of the same name, in place.
#[must_use]
pub fn merge(main: MainConfig, parsed: Vec<(PathBuf, Vec<Protect>, Vec<Rule>)>) -> PolicySet {
    let mut set = PolicySet {
        dry_run: main.dry_run,
        notify: main.notify,
        policies_dir: main.policies_dir,
        quarantine_parent: main.quarantine_parent,
        detect: main.detect,
        protect: Vec::new(),
        rule: Vec::new(),
        files: Vec::new(),
    };
    for (file, protect, rules) in parsed {
        set.files.push(file);
        set.protect.extend(protect);
        for r in rules {
            if let Some(old) = set.rule.iter_mut().find(|o| o.name == r.name) {
                *old = r;
            } else {
                set.rule.push(r);
            }
        }
    }
    set
}

/// The shipped `00-defaults.toml`, compiled in.
pub const BUILTIN_DEFAULTS: &str = include_str!("../../policies/00-defaults.toml");

/// What the agent runs with when the policy set is broken at start (there is no last
/// good set yet): the built-in defaults — protect init, the agent, sshd and systemd's
/// services; contain leaks and explosions — over the main file's settings if that file
/// itself is fine. Better than running with no rules until someone notices.
#[must_use]
pub fn builtin(main_path: &Path) -> PolicySet {
    let main = std::fs::read_to_string(main_path)
        .ok()
        .and_then(|text| parse_main(main_path, &text).ok())
        .unwrap_or_else(|| MainConfig {
            policies_dir: main_path.parent().map_or_else(
                || PathBuf::from(DEFAULT_POLICIES_DIR),
                |p| p.join("policies.d"),
            ),
            ..MainConfig::default()
        });
    let name = PathBuf::from("<built-in 00-defaults.toml>");
    match parse_policy_file(&name, BUILTIN_DEFAULTS) {
        Ok((protect, rules)) => merge(main, vec![(name, protect, rules)]),
        // Unreachable in a tested build (a unit test parses it); no rules rather than
        // no agent.
        Err(_) => merge(main, Vec::new()),
    }
}

/// Loads the main file (absent: defaults) and every policy file of its directory.
///
/// # Errors
/// Every problem in every file; the set is only returned when there is none.
pub fn load(main_path: &Path) -> Result<PolicySet, Vec<Diagnostic>> {
    let main = match std::fs::read_to_string(main_path) {
        Ok(text) => parse_main(main_path, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => MainConfig {
            policies_dir: main_path.parent().map_or_else(
                || PathBuf::from(DEFAULT_POLICIES_DIR),
                |p| p.join("policies.d"),
            ),
            ..MainConfig::default()
        },
        Err(e) => return Err(vec![unreadable(main_path, &e)]),
    };
    let files = if main.policies_dir.exists() {
        policy_files(&main.policies_dir).map_err(|d| vec![d])?
    } else {
        Vec::new()
    };
    load_files(main, &files)
}

/// Parses and merges the given policy files over `main`.
///
/// # Errors
/// Every problem in every file.
pub fn load_files(main: MainConfig, files: &[PathBuf]) -> Result<PolicySet, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut parsed = Vec::new();
    for f in files {
        match std::fs::read_to_string(f) {
            Ok(text) => match parse_policy_file(f, &text) {
                Ok((p, r)) => parsed.push((f.clone(), p, r)),
                Err(d) => diags.extend(d),
            },
            Err(e) => diags.push(unreadable(f, &e)),
        }
    }
    if diags.is_empty() {
        Ok(merge(main, parsed))
    } else {
        Err(diags)
    }
}

/// The policy set `path` stands for (see `cgsentry check --help`).
///
/// # Errors
/// Every problem in every file.
pub fn load_path(path: &Path) -> Result<PolicySet, Vec<Diagnostic>> {
    if path.is_dir() {
        let main = path.join("cgsentry.toml");
        if main.is_file() {
            return load(&main);
        }
        let dir = if path.join("policies.d").is_dir() {
            path.join("policies.d")
        } else {
            path.to_owned()
        };
        let files = policy_files(&dir).map_err(|d| vec![d])?;
        let main = MainConfig {
            policies_dir: dir,
            ..MainConfig::default()
        };
        return load_files(main, &files);
    }
    let is_main = path.file_name().is_some_and(|n| n == "cgsentry.toml");
    if is_main || !path.exists() {
        return load(path);
    }
    let main = MainConfig {
        policies_dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
        ..MainConfig::default()
    };
    load_files(main, &[path.to_owned()])
}

/// `cgsentry check`: diagnostics on stderr, summary (and `--print`) on stdout.
#[must_use]
pub fn check(args: &crate::cli::CheckArgs) -> std::process::ExitCode {
    match load_path(&args.path) {
        Ok(set) => {
            if args.print {
                match set.to_toml() {
                    Ok(t) => print!("{t}"),
                    Err(e) => {
                        eprintln!("cgsentry: cannot print the policy: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            }
            let warnings: Vec<&Diagnostic> = set.warnings().collect();
            for w in &warnings {
                eprintln!("{w}");
            }
            eprintln!(
                "ok: {} policy file(s), {} protect entries, {} rules{}{}",
                set.files.len(),
                set.protect.len(),
                set.rule.len(),
                if set.dry_run { " (dry run)" } else { "" },
                match warnings.len() {
                    0 => String::new(),
                    n => format!(", {n} warning(s)"),
                }
            );
            std::process::ExitCode::SUCCESS
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("{} error(s): the policy set is rejected", diags.len());
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a policy set judges one finding.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// The rule that applies (the last matching one), if any.
    pub rule: Option<String>,
    /// Protect entries that match: no step beyond `notify` is taken.
    pub protected_by: Vec<String>,
    /// Whether the finding is severe enough for the rule.
    pub severe_enough: bool,
    pub dry_run: bool,
}

impl PolicySet {
    /// The protect entries holding for a cgroup and its processes (all of them; see
    /// [`Matcher::protects`]).
    #[must_use]
    pub fn protected_by(&self, path: &str, processes: &[ProcessRef<'_>]) -> Vec<&Protect> {
        self.protected_by_in(path, processes, false)
    }

    /// [`PolicySet::protected_by`] for a cgroup that may be `delegated`: inside a
    /// subtree a non-root user owns, where that user makes cgroups with any name (a
    /// glob's, a pod's, a container's), only entries that name a `uid`/`user` hold —
    /// the owner of the processes is the one thing the user cannot choose.
    #[must_use]
    pub fn protected_by_in(
        &self,
        path: &str,
        processes: &[ProcessRef<'_>],
        delegated: bool,
    ) -> Vec<&Protect> {
        self.protect
            .iter()
            .filter(|p| !delegated || p.matcher.uid.is_some() || p.matcher.user.is_some())
            .filter(|p| p.matcher.protects(path, processes))
            .collect()
    }

    /// What `cgsentry check` warns about (the set is in force all the same).
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.protect
            .iter()
            .flat_map(|p| &p.warnings)
            .chain(self.rule.iter().flat_map(|r| &r.warnings))
    }

    /// Whether any entry of this set matches on processes (else the agent need not
    /// read them for a finding).
    #[must_use]
    pub fn needs_processes(&self) -> bool {
        self.protect
            .iter()
            .any(|p| p.matcher.has_process_criteria())
            || self.rule.iter().any(|r| r.matcher.has_process_criteria())
    }

    /// The rule for a finding: the last rule for its kind that matches its cgroup.
    #[must_use]
    pub fn rule_for(&self, finding: &Finding, processes: &[ProcessRef<'_>]) -> Option<&Rule> {
        self.rule.iter().rev().find(|r| {
            r.finding == finding.kind
                && r.matcher.matches(&finding.cgroup, processes)
                && r.gpu.holds(finding)
        })
    }

    /// Rule, protection and dry-run for one finding.
    #[must_use]
    pub fn judge(&self, finding: &Finding, processes: &[ProcessRef<'_>]) -> Verdict {
        self.judge_in(finding, processes, false)
    }

    /// [`PolicySet::judge`] for a finding whose cgroup may be `delegated` (see
    /// [`PolicySet::protected_by_in`]).
    #[must_use]
    pub fn judge_in(
        &self,
        finding: &Finding,
        processes: &[ProcessRef<'_>],
        delegated: bool,
    ) -> Verdict {
        let rule = self.rule_for(finding, processes);
        Verdict {
            rule: rule.map(|r| r.name.clone()),
            protected_by: self
                .protected_by_in(&finding.cgroup, processes, delegated)
                .into_iter()
                .map(|p| p.name.clone())
                .collect(),
            severe_enough: rule.is_some_and(|r| finding.severity >= r.min_severity),
            dry_run: self.dry_run || rule.is_some_and(|r| r.dry_run),
        }
    }

    /// The effective policy as TOML (what `cgsentry check --print` shows).
    ///
    /// # Errors
    /// Never in practice: every field serialises.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"
[[protect]]
name = "sshd"
comm = "^sshd$"

[[rule]]
name = "pools"
finding = "explosion"
cgroup = "/user.slice/**"
comm = "python"

[[rule.ladder]]
action = "throttle"
pids_max = 64
memory_high_percent = 100

[[rule.ladder]]
action = "freeze"
after_sec = 5
"#;

    fn parse(text: &str) -> Result<(Vec<Protect>, Vec<Rule>), Vec<String>> {
        parse_policy_file(Path::new("p.toml"), text)
            .map_err(|d| d.iter().map(ToString::to_string).collect())
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text).expect_err("should be rejected")
    }

    fn main_defaults() -> MainConfig {
        MainConfig {
            dry_run: false,
            policies_dir: PathBuf::from("/nonexistent"),
            quarantine_parent: "cgsentry.slice".into(),
            detect: DetectConfig::default(),
            notify: crate::notify::NotifyConfig::default(),
        }
    }

    fn finding(kind: FindingKind, cgroup: &str, severity: Severity) -> Finding {
        Finding {
            kind,
            severity,
            cgroup_id: 1,
            cgroup: cgroup.into(),
            pid: None,
            comm: None,
            summary: String::new(),
            window_sec: 1.0,
            time_to_limit_sec: None,
            evidence: Vec::new(),
            gpus: Vec::new(),
        }
    }

    fn proc(comm: &str) -> ProcessRef<'_> {
        ProcessRef {
            comm,
            exe: None,
            user: Some("ci"),
            uid: Some(1000),
        }
    }

    #[test]
    fn parses_a_good_file_with_defaults_filled_in() {
        let (protect, rules) = parse(GOOD).unwrap();
        assert_eq!(protect.len(), 1);
        let r = &rules[0];
        assert_eq!(
            (r.finding, r.cooldown_sec, r.min_severity),
            (FindingKind::Explosion, 30, Severity::Warning)
        );
        assert_eq!(r.ladder[0].after_sec, 0, "the first step is immediate");
        assert_eq!(r.ladder[1].after_sec, 5);
        assert_eq!(r.ladder[0].pids_max, Some(64));
    }

    /// Each bad input names the file, line and column of the culprit.
    #[test]
    fn bad_files_get_precise_errors() {
        let cases: &[(&str, &str, &str)] = &[
            ("[[rule]\nname = 1", "p.toml:1:", "syntax"),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nbogus = 3\nladder = [{action = \"notify\"}]\n",
                "p.toml:4:1: unknown field `bogus`",
                "unknown key",
            ),
            (
                "[[protect]]\nname = \"x\"\ncomm = \"(unclosed\"\n",
                "p.toml:3:8: bad comm regex",
                "bad regex",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nladder = [{action = \"freeze\", after_sec = -5}]\n",
                "p.toml:4:",
                "negative duration",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leek\"\nladder = [{action = \"notify\"}]\n",
                "p.toml:3:11: unknown finding \"leek\"",
                "unknown finding",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nladder = [{action = \"freeze\"}, {action = \"throttle\", pids_max = 5}]\n",
                "p.toml:4:42: ladder steps must climb",
                "ladder going down",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nladder = [{action = \"throttle\"}]\n",
                "p.toml:4:21: a throttle step needs",
                "throttle without limits",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\ncgroup = \"user.slice\"\nladder = [{action = \"notify\"}]\n",
                "p.toml:4:10: cgroup glob \"user.slice\" must start with '/'",
                "relative glob",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"single_thread_saturation\"\nladder = [{action = \"notify\"}, {action = \"freeze\"}]\n",
                "p.toml:3:11: single_thread_saturation is reported, never contained",
                "acting on a hint",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"gpu_orphan\"\nladder = [{action = \"kill\"}]\n",
                "p.toml:3:11: gpu_orphan is reported, never contained",
                "killing for an orphan",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"gpu_leak\"\ngpu_memory_percent = 120\nladder = [{action = \"notify\"}]\n",
                "p.toml:4:22: gpu_memory_percent is at most 100",
                "GPU percent above 100",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"gpu_leak\"\ngpu_device = \"first\"\nladder = [{action = \"notify\"}]\n",
                "p.toml:4:14: gpu_device \"first\": expected an NVML index",
                "bad device",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nruntime = \"lxc\"\nladder = [{action = \"notify\"}]\n",
                "p.toml:4:11: runtime \"lxc\": expected docker, containerd",
                "unknown runtime",
            ),
            (
                "[[protect]]\nname = \"x\"\ncontainer_id = \"abc\"\n",
                "p.toml:3:16: container_id \"abc\": expected 12 to 64 hex digits",
                "short container id",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nexec = [\"page-me\"]\nladder = [{action = \"notify\"}]\n",
                "p.toml:4:8: exec program \"page-me\" must be an absolute path",
                "relative hook",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nladder = [{action = \"throttle\", cpu_max_percent = 0.0}]\n",
                "p.toml:4:51: cpu_max_percent must be a percentage above 0",
                "zero percent",
            ),
            (
                "[[rule]]\nname = \"x\"\nfinding = \"leak\"\nladder = [{action = \"throttle\", cpu_weight = 0}]\n",
                "p.toml:4:46: cpu_weight must be 1 to 10000",
                "zero weight",
            ),
        ];
        for (text, expected, what) in cases {
            let errs = errors(text);
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "{what}: expected {expected:?} in {errs:?}"
            );
        }
    }

    #[test]
    fn gpu_conditions_gate_a_rule_per_device_or_on_any_device_the_cgroup_uses() {
        let (_, rules) = parse(
            "[[rule]]\nname = \"plain\"\nfinding = \"gpu_leak\"\nladder = [{action = \"notify\"}]\n\
             [[rule]]\nname = \"full\"\nfinding = \"gpu_leak\"\ngpu_memory_percent = 90\nladder = [{action = \"freeze\"}]\n\
             [[rule]]\nname = \"busy gpu1\"\nfinding = \"leak\"\ngpu_device = 1\ngpu_util_percent = 50\nladder = [{action = \"notify\"}]\n\
             [[rule]]\nname = \"by uuid\"\nfinding = \"pressure\"\ngpu_device = \"GPU-bbbb\"\ngpu_memory_percent = 10\ngpu_util_percent = 10\nladder = [{action = \"notify\"}]\n",
        )
        .unwrap();
        let set = PolicySet {
            rule: rules,
            ..PolicySet::empty()
        };
        let gpu = |device, uuid: &str, mem, util, bytes| GpuUse {
            device,
            uuid: uuid.into(),
            memory_percent: Some(mem),
            util_percent: Some(util),
            cgroup_bytes: bytes,
        };
        let with = |kind, gpus: Vec<GpuUse>| Finding {
            gpus,
            ..finding(kind, "/ml", Severity::Warning)
        };
        let rule = |f: &Finding| set.rule_for(f, &[]).map(|r| r.name.as_str());
        // Device 0 is 95 % full and /ml holds memory there: "full" applies.
        let f = with(
            FindingKind::GpuLeak,
            vec![
                gpu(0, "GPU-aaaa", 95.0, 10.0, 1),
                gpu(1, "GPU-bbbb", 20.0, 80.0, 0),
            ],
        );
        assert_eq!(rule(&f), Some("full"));
        // Full, but /ml holds nothing there: "any" means a device the cgroup uses.
        let f = with(
            FindingKind::GpuLeak,
            vec![
                gpu(0, "GPU-aaaa", 50.0, 10.0, 1),
                gpu(1, "GPU-bbbb", 95.0, 80.0, 0),
            ],
        );
        assert_eq!(rule(&f), Some("plain"));
        // Without GPU data, a rule with GPU conditions never applies.
        assert_eq!(rule(&with(FindingKind::GpuLeak, Vec::new())), Some("plain"));
        // A named device counts whether the cgroup uses it or not.
        let f = with(
            FindingKind::Leak,
            vec![
                gpu(0, "GPU-aaaa", 50.0, 10.0, 1),
                gpu(1, "GPU-bbbb", 20.0, 80.0, 0),
            ],
        );
        assert_eq!(rule(&f), Some("busy gpu1"));
        let f = with(FindingKind::Leak, vec![gpu(1, "GPU-bbbb", 20.0, 49.0, 0)]);
        assert_eq!(rule(&f), None);
        // Every threshold on the same device.
        let f = with(
            FindingKind::Pressure,
            vec![gpu(1, "GPU-bbbb", 20.0, 5.0, 0)],
        );
        assert_eq!(rule(&f), None);
        let f = with(
            FindingKind::Pressure,
            vec![gpu(1, "GPU-bbbb", 20.0, 15.0, 0)],
        );
        assert_eq!(rule(&f), Some("by uuid"));
        let printed = set.to_toml().unwrap();
        assert!(printed.contains("memory_percent = 90.0"), "{printed}");
    }

    #[test]
    fn every_semantic_error_is_reported_not_just_the_first() {
        let text = "[[rule]]\nname = \"x\"\nfinding = \"nope\"\ncomm = \"[\"\nladder = [{action = \"explode\"}]\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("p.toml:3:11:"), "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("p.toml:4:8: bad comm regex")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("p.toml:5:21: unknown action \"explode\"")),
            "{errs:?}"
        );
    }

    #[test]
    fn merge_in_file_order_later_rule_of_same_name_replaces() {
        let (p1, r1) = parse(GOOD).unwrap();
        let (p2, r2) = parse(
            "[[rule]]\nname = \"pools\"\nfinding = \"explosion\"\nladder = [{action = \"notify\"}]\n\n\
             [[rule]]\nname = \"leaks\"\nfinding = \"leak\"\nladder = [{action = \"notify\"}]\n",
        )
        .unwrap();
        let set = merge(
            main_defaults(),
            vec![("00.toml".into(), p1, r1), ("90.toml".into(), p2, r2)],
        );
        assert_eq!(set.rule.len(), 2);
        assert_eq!(set.rule[0].name, "pools", "replaced in place");
        assert_eq!(set.rule[0].ladder.len(), 1, "by the later file's version");
        assert_eq!(
            set.files,
            vec![PathBuf::from("00.toml"), PathBuf::from("90.toml")]
        );
    }

    #[test]
    fn files_load_in_name_order_and_one_bad_file_rejects_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("50-b.toml"),
            "[[rule]]\nname = \"r\"\nfinding = \"leak\"\nladder = [{action = \"freeze\"}]\n",
        )
        .unwrap();
        std::fs::write(
            d.join("10-a.toml"),
            "[[rule]]\nname = \"r\"\nfinding = \"leak\"\nladder = [{action = \"notify\"}]\n",
        )
        .unwrap();
        std::fs::write(d.join("README.md"), "not a policy").unwrap();
        std::fs::write(
            d.join("cgsentry.toml"),
            "policies_dir = \".\"\ndry_run = true\n",
        )
        .unwrap();
        // The main file sits in the same directory here; it is not a policy file.
        let main = parse_main(
            &d.join("cgsentry.toml"),
            "policies_dir = \".\"\ndry_run = true\n",
        )
        .unwrap();
        let files: Vec<PathBuf> = policy_files(d)
            .unwrap()
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n != "cgsentry.toml"))
            .collect();
        let set = load_files(main.clone(), &files).unwrap();
        assert!(set.dry_run);
        assert_eq!(
            set.rule[0].ladder[0].action,
            Action::Freeze,
            "50-b.toml overrides 10-a.toml"
        );

        std::fs::write(d.join("70-broken.toml"), "[[rule]\n").unwrap();
        let files = policy_files(d).unwrap();
        let errs = load_files(main, &files).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.file.ends_with("70-broken.toml") && e.line == 1),
            "{errs:?}"
        );
    }

    /// Identity criteria match the container's cgroup and what is below it, on the
    /// path alone; a container id matches by prefix.
    #[test]
    fn rules_match_container_and_pod_identity() {
        let cid = "3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";
        let pod = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7c1a5f2e_3b4d_4c5e_9f6a_1b2c3d4e5f60.slice";
        let (protect, rules) = parse(&format!(
            "[[protect]]\nname = \"db\"\ncontainer_id = \"{}\"\n\
             [[rule]]\nname = \"be\"\nfinding = \"leak\"\nqos_class = \"besteffort\"\nruntime = \"containerd\"\n\
             exec = [\"/usr/local/bin/hook\", \"--page\"]\nladder = [{{action = \"freeze\"}}]\n\
             [[rule]]\nname = \"pod\"\nfinding = \"leak\"\npod_uid = \"7c1a5f2e-3b4d-4c5e-9f6a-1b2c3d4e5f60\"\nladder = [{{action = \"notify\"}}]\n",
            &cid[..12]
        ))
        .unwrap();
        let be = &rules[0].matcher;
        assert!(be.matches(&format!("{pod}/cri-containerd-{cid}.scope"), &[]));
        assert!(be.matches(&format!("{pod}/cri-containerd-{cid}.scope/init.scope"), &[]));
        assert!(
            !be.matches(&format!("{pod}/crio-{cid}.scope"), &[]),
            "another runtime"
        );
        assert!(
            !be.matches(&format!("/system.slice/docker-{cid}.scope"), &[]),
            "not a pod"
        );
        assert!(rules[1].matcher.matches(pod, &[]));
        assert!(!rules[1].matcher.matches("/kubepods.slice", &[]));
        let db = &protect[0].matcher;
        assert!(db.matches(&format!("/system.slice/docker-{cid}.scope"), &[]));
        assert!(!db.matches(
            &format!("/system.slice/docker-{}.scope", "0".repeat(64)),
            &[]
        ));
        assert_eq!(rules[0].exec, ["/usr/local/bin/hook", "--page"]);
        // Printed with the effective policy and read back.
        let set = merge(
            main_defaults(),
            vec![(PathBuf::from("p.toml"), protect, rules)],
        );
        let text = set.to_toml().unwrap();
        assert!(text.contains("qos_class = \"besteffort\""), "{text}");
        assert!(text.contains("container_id = \"3f2e1d0c9b8a\""), "{text}");
    }

    #[test]
    fn protect_wins_and_the_last_matching_rule_applies() {
        let (protect, rules) = parse(GOOD).unwrap();
        let set = merge(main_defaults(), vec![("p.toml".into(), protect, rules)]);
        let f = finding(
            FindingKind::Explosion,
            "/user.slice/ci.scope",
            Severity::Critical,
        );
        let v = set.judge(&f, &[proc("python3")]);
        assert_eq!(v.rule.as_deref(), Some("pools"));
        assert!(v.protected_by.is_empty() && v.severe_enough);
        // Holding nothing but root's python3 and sshd: still the rule (any process
        // matches it), and not protected (not every process is an sshd).
        let root = |comm| ProcessRef {
            uid: Some(0),
            ..proc(comm)
        };
        let v = set.judge(&f, &[root("python3"), root("sshd")]);
        assert_eq!(v.rule.as_deref(), Some("pools"));
        assert!(v.protected_by.is_empty(), "{:?}", v.protected_by);
        // Nothing but root's sshd: protected.
        let sshd_only = finding(
            FindingKind::Explosion,
            "/system.slice/ssh.service",
            Severity::Critical,
        );
        let v = set.judge(&sshd_only, &[root("sshd"), root("sshd")]);
        assert_eq!(v.protected_by, vec!["sshd".to_owned()]);
        // Outside the glob, or no python: no rule.
        let outside = finding(
            FindingKind::Explosion,
            "/system.slice/x",
            Severity::Critical,
        );
        assert_eq!(set.judge(&outside, &[proc("python3")]).rule, None);
        assert_eq!(set.judge(&f, &[proc("bash")]).rule, None);
        // `*` stays within a level, `**` crosses them.
        let deep = finding(
            FindingKind::Explosion,
            "/user.slice/a/b/c",
            Severity::Critical,
        );
        assert!(set.judge(&deep, &[proc("python3")]).rule.is_some());
        let weak = finding(FindingKind::Explosion, "/user.slice/a", Severity::Hint);
        assert!(!set.judge(&weak, &[proc("python3")]).severe_enough);
    }

    /// Protection holds only on what an unprivileged user cannot forge: every process
    /// of the cgroup must match, with the real uid the entry names (root when none).
    #[test]
    fn protection_cannot_be_forged() {
        let text = r#"
[[protect]]
name = "by name"
comm = "^sshd$"

[[protect]]
name = "by program"
exe = "^/usr/sbin/sshd$"
uid = 0

[[protect]]
name = "postgres"
user = "postgres"
exe = "^/usr/lib/postgresql/"

[[protect]]
name = "by cgroup"
cgroup = "/system.slice/ssh.service"
"#;
        let (protect, rules) = parse(text).unwrap();
        let set = merge(main_defaults(), vec![("p.toml".into(), protect, rules)]);
        let pr = |comm: &'static str,
                  exe: Option<&'static str>,
                  uid: u32,
                  user: Option<&'static str>| ProcessRef {
            comm,
            exe,
            user,
            uid: Some(uid),
        };
        let names = |cgroup: &str, procs: &[ProcessRef<'_>]| -> Vec<String> {
            set.protected_by(cgroup, procs)
                .into_iter()
                .map(|p| p.name.clone())
                .collect()
        };
        let sshd = Some("/usr/sbin/sshd");
        let cases: Vec<(&str, Vec<ProcessRef<'_>>, Vec<&str>)> = vec![
            // A user's process that calls itself sshd (prctl, or `cp /bin/bash ~/sshd`).
            (
                "/user.slice/u.scope",
                vec![pr("sshd", Some("/home/u/sshd"), 1000, Some("u"))],
                vec![],
            ),
            // The real program, started by an unprivileged user.
            (
                "/user.slice/u.scope",
                vec![pr("sshd", sshd, 1000, Some("u"))],
                vec![],
            ),
            // An SSH login's session scope: the session's root sshd beside the user's jobs.
            (
                "/user.slice/user-1000.slice/session-4.scope",
                vec![
                    pr("sshd", sshd, 0, Some("root")),
                    pr("bash", Some("/usr/bin/bash"), 1000, Some("u")),
                ],
                vec![],
            ),
            // The daemon alone in its service.
            (
                "/system.slice/ssh.service",
                vec![pr("sshd", sshd, 0, Some("root"))],
                vec!["by name", "by program", "by cgroup"],
            ),
            // A root process named sshd running something else: the name entry alone.
            (
                "/system.slice/x.service",
                vec![pr("sshd", Some("/tmp/x"), 0, None)],
                vec!["by name"],
            ),
            // The named user, resolved; unresolved (NSS not answered yet): no match.
            (
                "/system.slice/postgresql.service",
                vec![pr(
                    "postgres",
                    Some("/usr/lib/postgresql/15/bin/postgres"),
                    110,
                    Some("postgres"),
                )],
                vec!["postgres"],
            ),
            (
                "/system.slice/postgresql.service",
                vec![pr(
                    "postgres",
                    Some("/usr/lib/postgresql/15/bin/postgres"),
                    110,
                    None,
                )],
                vec![],
            ),
            // Empty, or a process that could not be read: process criteria cannot hold.
            ("/system.slice/x.service", vec![], vec![]),
            (
                "/system.slice/x.service",
                vec![pr("sshd", sshd, 0, None), ProcessRef::UNREAD],
                vec![],
            ),
        ];
        for (cgroup, procs, want) in cases {
            assert_eq!(names(cgroup, &procs), want, "{cgroup} {procs:?}");
        }
    }

    /// `scope`: known values only; a subtree cannot be quarantined; a subtree rule over
    /// a whole slice is warned about; and in a subtree a user owns, only protect
    /// entries naming a uid or user hold.
    #[test]
    fn scope_and_delegation() {
        let errs = errors(
            "[[rule]]\nname = \"r\"\nfinding = \"leak\"\nscope = \"tree\"\nladder = [{action = \"notify\"}]\n",
        );
        assert!(
            errs[0].starts_with("p.toml:4:9: unknown scope \"tree\""),
            "{errs:?}"
        );
        let errs = errors(
            "[[rule]]\nname = \"r\"\nfinding = \"leak\"\nscope = \"subtree\"\nladder = [{action = \"quarantine\"}]\n",
        );
        assert!(errs[0].contains("cannot quarantine"), "{errs:?}");
        let text = "[[rule]]\nname = \"slices\"\nfinding = \"leak\"\ncgroup = \"/**\"\nscope = \"subtree\"\nladder = [{action = \"freeze\"}]\n\n\
                    [[protect]]\nname = \"by path\"\ncgroup = \"/user.slice/**/important.scope\"\n\n\
                    [[protect]]\nname = \"by owner\"\nuid = 1000\n";
        let (protect, rules) = parse(text).unwrap();
        assert_eq!(rules[0].scope, crate::safety::Scope::Subtree);
        let set = merge(main_defaults(), vec![("p.toml".into(), protect, rules)]);
        let warnings: Vec<String> = set.warnings().map(ToString::to_string).collect();
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("p.toml:2:8: warning: scope = \"subtree\"")),
            "{warnings:#?}"
        );
        let path = "/user.slice/user-1000.slice/user@1000.service/important.scope";
        let user = ProcessRef {
            comm: "x",
            uid: Some(1000),
            ..ProcessRef::default()
        };
        let names = |delegated| -> Vec<String> {
            set.protected_by_in(path, &[user], delegated)
                .into_iter()
                .map(|p| p.name.clone())
                .collect()
        };
        assert_eq!(names(false), ["by path", "by owner"]);
        assert_eq!(
            names(true),
            ["by owner"],
            "a user names their cgroups as they like"
        );
    }

    /// `check` warns (with the position) about protect entries that go by what a
    /// process says of itself; the set is accepted all the same.
    #[test]
    fn check_warns_about_forgeable_protection() {
        let text = "[[protect]]\nname = \"x\"\ncomm = \"^sshd$\"\n\n[[protect]]\nname = \"y\"\ncgroup = \"/system.slice/ssh.service\"\n";
        let (protect, rules) = parse(text).unwrap();
        let set = merge(main_defaults(), vec![("p.toml".into(), protect, rules)]);
        let warnings: Vec<String> = set.warnings().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings[0].starts_with(
                "p.toml:3:8: warning: this protect entry matches a process name (comm)"
            ),
            "{warnings:#?}"
        );
        assert!(warnings[1].contains("real uid is 0"), "{warnings:#?}");
    }

    #[test]
    fn effective_policy_prints_as_toml_and_reads_back() {
        let (protect, rules) = parse(GOOD).unwrap();
        let set = merge(main_defaults(), vec![("p.toml".into(), protect, rules)]);
        let text = set.to_toml().unwrap();
        assert!(text.contains("name = \"pools\""), "{text}");
        assert!(text.contains("[detect.leak]"), "{text}");
        let back: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            back["rule"][0]["ladder"][1]["action"].as_str(),
            Some("freeze")
        );
    }

    /// The fallback for a broken set at start parses (the shipped file is valid) and
    /// keeps the main file's directory, so that the fix is picked up.
    #[test]
    fn builtin_defaults_parse_and_keep_the_policy_dir() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("cgsentry.toml");
        let set = builtin(&main);
        assert!(
            set.rule.iter().any(|r| r.name == "explosion"),
            "{:?}",
            set.rule
        );
        assert!(set.protect.iter().any(|p| p.name == "sshd"));
        // Nothing shipped is forgeable: the defaults protect by cgroup only.
        assert_eq!(set.warnings().count(), 0);
        assert!(
            set.protect
                .iter()
                .all(|p| p.matcher.comm.is_none() && p.matcher.cgroup.is_some()),
            "{:?}",
            set.protect
        );
        assert_eq!(set.policies_dir, dir.path().join("policies.d"));
        std::fs::write(&main, "policies_dir = \"/elsewhere\"\ndry_run = true\n").unwrap();
        let set = builtin(&main);
        assert_eq!(set.policies_dir, Path::new("/elsewhere"));
        assert!(set.dry_run);
    }

    #[test]
    fn main_file_errors_and_defaults() {
        let p = Path::new("/etc/cgsentry/cgsentry.toml");
        let m = parse_main(p, "").unwrap();
        assert_eq!(m.policies_dir, PathBuf::from(DEFAULT_POLICIES_DIR));
        assert_eq!(m.detect, DetectConfig::default());
        let m = parse_main(p, "[detect.leak]\nhorizon_sec = 60\n").unwrap();
        assert_eq!(m.detect.leak.horizon_sec, 60);
        let errs = parse_main(p, "[detect.leak]\nhorizon = 60\n").unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .starts_with("/etc/cgsentry/cgsentry.toml:2:1: unknown field `horizon`"),
            "{errs:?}"
        );
        let errs = parse_main(p, "quarantine_parent = \"../x\"\n").unwrap_err();
        assert_eq!((errs[0].line, errs[0].col), (1, 21));
    }

    proptest! {
        /// Whatever bytes an operator (or an editor crash) leaves in a policy file, the
        /// parser answers with a value or diagnostics, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse_policy_file(Path::new("f.toml"), &text);
            let _ = parse_main(Path::new("m.toml"), &text);
        }

        /// Structured near-misses: valid TOML shapes with arbitrary values.
        #[test]
        fn arbitrary_values_never_panic(
            finding in "[a-z_]{0,30}",
            action in "[a-z]{0,10}",
            glob in "\\PC{0,20}",
            regex in "\\PC{0,20}",
            after in proptest::num::i64::ANY,
            pct in proptest::num::f64::ANY,
        ) {
            let text = format!(
                "[[rule]]\nname = \"r\"\nfinding = {finding:?}\ncgroup = {glob:?}\ncomm = {regex:?}\n\
                 ladder = [{{action = {action:?}, after_sec = {after}, cpu_max_percent = {pct:?}}}]\n"
            );
            let _ = parse_policy_file(Path::new("f.toml"), &text);
        }
    }
}
