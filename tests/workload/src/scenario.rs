//! A VM scenario, as data (`tests/scenarios/*.toml`): what the VM looks like, what runs
//! in which cgroup, when to stop, and what must be observed. Read by the in-VM runner
//! (`workload vm-run`) and by the host harness (`cargo xtask vm-test`).
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario proves, one sentence.
    pub description: String,
    #[serde(default)]
    pub vm: Vm,
    #[serde(default)]
    pub run: Run,
    /// Run `cgsentry` in the VM with these arguments, before the workloads start.
    pub agent: Option<Agent>,
    /// Another guard (earlyoom, nohang) run before the workloads instead of `cgsentry`,
    /// for side-by-side benchmarks.
    pub guard: Option<Guard>,
    #[serde(rename = "workload", default)]
    pub workloads: Vec<Workload>,
    /// Metric name → expected range or value. See `Metrics` for the names.
    #[serde(default)]
    pub expect: BTreeMap<String, Expect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Vm {
    pub mem_mib: u32,
    /// Size of a swap disk; 0: none (the kernel OOM killer then acts at once).
    pub swap_mib: u32,
    /// Throttle the swap disk to disk-like speed (20 MB/s, 500 IOPS): only then does
    /// memory exhaustion freeze the machine, as in incident D.
    pub swap_throttle: bool,
    pub cpus: u32,
    /// Hard limit for the whole VM, boot included.
    pub timeout_s: u64,
    /// What the guest runs: a busybox initramfs (fast, flat cgroups) or a real Debian
    /// with systemd as PID 1 and cgsentry installed as its service.
    pub image: Image,
    /// Debian image: units masked in it (`systemctl mask`), e.g. `systemd-oomd.service`
    /// for a run with no guard at all.
    pub masked: Vec<String>,
}

/// The guest's user space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Image {
    /// busybox as init, the runner as its child, cgroups made by the runner.
    #[default]
    Busybox,
    /// Debian 12: systemd, journald, dbus, systemd-oomd; cgsentry.service installed
    /// and enabled; workloads started as transient units (`systemd-run`), in the
    /// slice their `cgroup` names (`/system.slice/pool.service`).
    Debian,
}

impl Default for Vm {
    fn default() -> Self {
        Self {
            mem_mib: 1024,
            swap_mib: 0,
            swap_throttle: false,
            cpus: 2,
            timeout_s: 300,
            image: Image::Busybox,
            masked: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Run {
    /// Stop after this long (seconds since the workloads started).
    pub max_s: f64,
    /// Stop as soon as every `subject` workload has exited.
    pub stop_when_subjects_exit: bool,
    /// Stop as soon as a heartbeat reports a gap this long (0: never).
    pub stop_when_heartbeat_gap_ms: f64,
    /// Sampling period of memory, swap and cgroup files.
    pub sample_ms: u64,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            max_s: 30.0,
            stop_when_subjects_exit: true,
            stop_when_heartbeat_gap_ms: 0.0,
            sample_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// `cgsentry` arguments (a busybox image; a Debian image runs the installed unit).
    #[serde(default)]
    pub args: Vec<String>,
    /// Install the shipped policies (`policies/*.toml`, carried in the initramfs under
    /// /usr/share/cgsentry/policies) into /etc/cgsentry/policies.d before the agent starts.
    #[serde(default)]
    pub shipped_policies: bool,
    /// More policy files for /etc/cgsentry/policies.d: file name → content.
    #[serde(default)]
    pub policy_files: BTreeMap<String, String>,
    /// Files dropped into /etc/cgsentry/policies.d while the agent runs.
    #[serde(default, rename = "drop")]
    pub drops: Vec<DropFile>,
    /// cgroup of the agent itself.
    #[serde(default = "default_agent_cgroup")]
    pub cgroup: String,
    /// Kill the agent with SIGKILL mid-containment and start it again.
    pub restart: Option<Restart>,
    /// Commands run once each, as an operator would, while the agent runs: one table
    /// (`operator = {...}`) or several (`[[agent.operator]]`).
    #[serde(default, deserialize_with = "one_or_many")]
    pub operator: Vec<Operator>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Operator>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Operator),
        Many(Vec<Operator>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(o) => vec![o],
        OneOrMany::Many(v) => v,
    })
}

/// `program command...` (by default `cgsentry`, for instance `release /leak --hold-off
/// 60s`; or `systemctl daemon-reload`) run once, `after_s` after `when_capped`'s
/// memory.high is first below max (the agent has throttled it). Metrics, each with
/// `:<name>` when the step has a name: `operator_exit` (its exit code), `operator_s`
/// (when, since the run started), `operator_took_s` (how long it ran), `kept_limits` (the cgroup's memory.high, pids.max,
/// memory.swap.max and cpu.weight are what they were before the command),
/// `procs_after` (processes left in the cgroup and below it once the command
/// returned), `alive_after` (of the processes it had when first capped or just
/// before the command, those still alive anywhere: what `systemctl stop` must end)
/// and, on a Debian image, `unit_capped` (systemd's `MemoryHigh` of the unit
/// is set: what `systemctl status` shows).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    #[serde(default)]
    pub name: Option<String>,
    pub when_capped: String,
    #[serde(default)]
    pub after_s: f64,
    #[serde(default = "default_operator_program")]
    pub program: String,
    pub command: Vec<String>,
}

fn default_operator_program() -> String {
    "/bin/cgsentry".into()
}

/// A guard other than cgsentry: `program args` in `cgroup`, started before the
/// workloads; each line of its output containing `action` is one of its actions (for
/// earlyoom: "sending SIG"). Metrics: `guard_actions`, `guard_action_s` (first, since
/// the run started), `guard_action_after_start_s:<cgroup>` (since that cgroup's
/// workload started), `mem_available_at_action_mib`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    pub name: String,
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_guard_cgroup")]
    pub cgroup: String,
    pub action: String,
    /// Files and directories the guard needs in the VM, as absolute paths in the
    /// unpacked guard packages (`cargo xtask bench` unpacks them under
    /// target/vm/guards/root); each is carried to the same path, ELF files with the
    /// host libraries they link.
    #[serde(default)]
    pub files: Vec<String>,
}

fn default_guard_cgroup() -> String {
    "/guard".into()
}

/// `kill -9` of the agent as soon as `when_frozen` is frozen, and a new agent (same
/// arguments, same journal) `after_s` later: it must reconcile what the first applied.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    pub when_frozen: String,
    #[serde(default = "default_restart_after")]
    pub after_s: f64,
}

fn default_restart_after() -> f64 {
    1.0
}

/// A policy file written `at_s` seconds after the workloads started.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropFile {
    pub at_s: f64,
    pub name: String,
    pub content: String,
}

fn default_agent_cgroup() -> String {
    "/cgsentry".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The behaviour under test; the run may stop when all subjects exited.
    #[default]
    Subject,
    /// Measures the machine (heartbeat); stopped by the runner.
    Observer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    /// cgroup v2 path relative to the root, e.g. "/leak".
    pub cgroup: String,
    /// Arguments of the `workload` binary, e.g. `["leak", "--mib-per-s", "50"]`.
    pub args: Vec<String>,
    #[serde(default)]
    pub role: Role,
    /// Delay after the run starts.
    #[serde(default)]
    pub start_after_s: f64,
    /// cgroup control files written before the workload starts, e.g.
    /// `files = { "memory.max" = "64M" }`.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Process name (`comm`, what earlyoom's and nohang's regexes match, at most 15
    /// bytes): the `workload` binary is run through a link of this name, e.g.
    /// `comm = "pytest"`. Default: `workload`.
    pub comm: Option<String>,
    /// Run as this user (uid, and the same gid) instead of root: an unprivileged
    /// user's process.
    pub uid: Option<u32>,
    /// On a Debian image, more properties of its transient unit, as `systemd-run
    /// --property` takes them: `unit_properties = ["ExecStop=/bin/sleep 8"]`.
    #[serde(default)]
    pub unit_properties: Vec<String>,
}

/// An expected metric: a range (`min`, `max`, inclusive) or an exact value.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub equals: Option<serde_json::Value>,
}

impl Expect {
    /// `None` when `value` meets the expectation, else why not.
    #[must_use]
    pub fn check(&self, name: &str, value: Option<&serde_json::Value>) -> Option<String> {
        let Some(value) = value else {
            return Some(format!("{name}: not observed"));
        };
        if let Some(want) = &self.equals
            && want != value
        {
            return Some(format!("{name}: {value} (expected {want})"));
        }
        if self.min.is_some() || self.max.is_some() {
            let Some(v) = value.as_f64() else {
                return Some(format!("{name}: {value} is not a number"));
            };
            if let Some(min) = self.min
                && v < min
            {
                return Some(format!("{name}: {v} < {min}"));
            }
            if let Some(max) = self.max
                && v > max
            {
                return Some(format!("{name}: {v} > {max}"));
            }
        }
        None
    }
}

impl Scenario {
    /// Reads and validates one scenario file.
    ///
    /// # Errors
    /// Unreadable file, TOML error (with line and column), or an inconsistent scenario.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and validates scenario text.
    ///
    /// # Errors
    /// TOML error or an inconsistent scenario.
    pub fn parse(text: &str) -> Result<Self> {
        let s: Scenario = toml::from_str(text)?;
        if s.workloads.is_empty() {
            bail!("no [[workload]]");
        }
        for w in &s.workloads {
            if !w.cgroup.starts_with('/') || w.cgroup == "/" || w.cgroup.contains("..") {
                bail!(
                    "workload {}: cgroup {:?} must be a child path like \"/leak\"",
                    w.name,
                    w.cgroup
                );
            }
            if w.args.is_empty() {
                bail!("workload {}: empty args", w.name);
            }
            if let Some(c) = &w.comm
                && (c.is_empty()
                    || c.len() > 15
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    || c.starts_with('.'))
            {
                bail!(
                    "workload {}: comm {c:?} must be 1-15 letters, digits, '-', '_' or '.'",
                    w.name
                );
            }
            if let Some(f) = w.files.keys().find(|f| f.contains('/') || !f.contains('.')) {
                bail!(
                    "workload {}: {f:?} is not a cgroup control file name",
                    w.name
                );
            }
        }
        if let Some(g) = &s.guard
            && let Some(f) = g
                .files
                .iter()
                .find(|f| !f.starts_with('/') || f.split('/').any(|c| c == ".."))
        {
            bail!("guard {}: file {f:?} must be an absolute path", g.name);
        }
        let mut names: Vec<&str> = s.workloads.iter().map(|w| w.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|p| p[0] == p[1]) {
            bail!("workload names must be unique");
        }
        if let Some(u) = s.vm.masked.first()
            && s.vm.image != Image::Debian
        {
            bail!("vm: masked unit {u:?} needs image = \"debian\"");
        }
        if let Some(u) =
            s.vm.masked
                .iter()
                .find(|u| u.is_empty() || u.contains('/') || !u.contains('.') || u.starts_with('.'))
        {
            bail!("vm: masked {u:?} is not a unit name like \"systemd-oomd.service\"");
        }
        if s.vm.mem_mib < 128 || s.vm.cpus == 0 || s.vm.timeout_s == 0 {
            bail!("vm: mem_mib ≥ 128, cpus ≥ 1 and timeout_s ≥ 1 are required");
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const MINIMAL: &str = r#"
description = "x"
[[workload]]
name = "a"
cgroup = "/a"
args = ["spin"]
"#;

    #[test]
    fn defaults_apply() {
        let s = Scenario::parse(MINIMAL).unwrap();
        assert_eq!(s.vm.mem_mib, 1024);
        assert_eq!(s.workloads[0].role, Role::Subject);
        assert!(s.agent.is_none());
        assert_eq!(s.workloads[0].comm, None);
        let named = Scenario::parse(&format!("{MINIMAL}comm = \"pytest\"\n")).unwrap();
        assert_eq!(named.workloads[0].comm.as_deref(), Some("pytest"));
    }

    #[test]
    fn rejects_bad_scenarios() {
        for (bad, why) in [
            ("description = \"x\"\n", "no [[workload]]"),
            (&format!("{MINIMAL}\nbogus = 1\n") as &str, "unknown field"),
            (&MINIMAL.replace("\"/a\"", "\"a\""), "child path"),
            (&MINIMAL.replace("\"/a\"", "\"/\""), "child path"),
            (
                &format!(
                    "{MINIMAL}[[workload]]\nname = \"a\"\ncgroup = \"/b\"\nargs = [\"spin\"]\n"
                ),
                "unique",
            ),
            (&format!("{MINIMAL}[vm]\nmem_mib = 64\n"), "mem_mib"),
            (
                &format!("{MINIMAL}files = {{ \"../x\" = \"1\" }}\n"),
                "control file",
            ),
            (&format!("{MINIMAL}comm = \"../sh\"\n"), "comm"),
            (
                &format!(
                    "{MINIMAL}[guard]\nname = \"g\"\nprogram = \"/bin/g\"\naction = \"x\"\n\
                     files = [\"/usr/../etc\"]\n"
                ),
                "absolute path",
            ),
            (
                &format!("{MINIMAL}comm = \"a-name-too-long-for-comm\"\n"),
                "comm",
            ),
            (
                &format!("{MINIMAL}[vm]\nmasked = [\"systemd-oomd.service\"]\n"),
                "needs image",
            ),
            (
                &format!("{MINIMAL}[vm]\nimage = \"debian\"\nmasked = [\"../x.service\"]\n"),
                "unit name",
            ),
        ] {
            let err = format!("{:#}", Scenario::parse(bad).unwrap_err());
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn expectations() {
        let range = Expect {
            min: Some(1.0),
            max: Some(3.0),
            equals: None,
        };
        assert_eq!(range.check("m", Some(&json!(2))), None);
        assert!(range.check("m", Some(&json!(0))).unwrap().contains("< 1"));
        assert!(range.check("m", Some(&json!(4.5))).unwrap().contains("> 3"));
        assert!(range.check("m", None).unwrap().contains("not observed"));
        assert!(
            range
                .check("m", Some(&json!("x")))
                .unwrap()
                .contains("not a number")
        );
        let eq = Expect {
            equals: Some(json!("/spin")),
            ..Expect::default()
        };
        assert_eq!(eq.check("top", Some(&json!("/spin"))), None);
        assert!(eq.check("top", Some(&json!("/"))).is_some());
    }
}
