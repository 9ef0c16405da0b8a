//! Containment: carrying decisions out on cgroup v2 — verified, bounded in time,
//! journaled.
//!
//! Every write is read back; `memory.high` writes (which can block while the kernel
//! reclaims) run on a helper thread and are waited for a bounded time; a freeze waits
//! for `cgroup.events` to say `frozen 1`. Everything applied is recorded in a journal
//! (`<journal_dir>/journal.json`, written atomically after each change) with the values
//! it replaced and where moved processes came from, so that a release — or a restarted
//! agent — can undo exactly that. A process that exits mid-move or a cgroup that
//! vanishes is a normal outcome, reported, never an error that stops the agent.
//!
//! Why not the cgroups-rs crate: its v2 hierarchy is hard-wired to `/sys/fs/cgroup`
//! (the host's hybrid `/sys/fs/cgroup/unified` and temp-dir tests cannot use it), it
//! brings zbus and a second nix, and its writes are neither verified nor bounded in
//! time. The files involved are few and their formats simple (cgroup-v2.rst).
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    decide::{Decision, Release},
    detect::FindingKind,
    policy::{Action, Step},
};

/// `cpu.max` period, µs.
const CPU_PERIOD_US: u64 = 100_000;
/// How long a `memory.high` write may block before we report and move on.
const MEMORY_HIGH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a freeze may take to settle before we report it as still in progress.
const FREEZE_SETTLE: Duration = Duration::from_secs(1);

/// A failed containment step. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("{path}: wrote {wrote:?} but it reads back {read:?}")]
    Verify {
        path: PathBuf,
        wrote: String,
        read: String,
    },
    #[error(
        "{path}: the write of {value:?} has not returned after {secs} s (the kernel is \
         reclaiming); it completes in the background"
    )]
    Timeout {
        path: PathBuf,
        value: String,
        secs: u64,
    },
    #[error("{path}: the cgroup is gone")]
    Gone { path: PathBuf },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("journal {path}: {source}")]
    Journal { path: PathBuf, source: io::Error },
}

fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// Writes cgroup v2 control files under an injectable root.
#[derive(Clone, Debug)]
pub struct Writer {
    root: PathBuf,
}

impl Writer {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    #[must_use]
    pub fn dir(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// A control file's content, trimmed; `None` when the cgroup or file is gone.
    ///
    /// # Errors
    /// A read error other than "gone".
    pub fn read(&self, rel: &str, file: &str) -> Result<Option<String>, ActError> {
        let path = self.dir(rel).join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_owned())),
            Err(e) if gone(&e) => Ok(None),
            Err(source) => Err(ActError::Read { path, source }),
        }
    }

    fn write_raw(&self, rel: &str, file: &str, value: &str) -> Result<(), ActError> {
        let path = self.dir(rel).join(file);
        std::fs::write(&path, value).map_err(|source| {
            if gone(&source) {
                ActError::Gone { path: path.clone() }
            } else {
                ActError::Write {
                    path: path.clone(),
                    value: value.to_owned(),
                    source,
                }
            }
        })
    }

    /// Writes `value` and checks that the file then reads `expect` (the kernel's own
    /// rendering of the value).
    ///
    /// # Errors
    /// The write failed, or the file reads back something else.
    pub fn write_verified(
        &self,
        rel: &str,
        file: &str,
        value: &str,
        expect: &str,
    ) -> Result<(), ActError> {
        self.write_raw(rel, file, value)?;
        let read = self.read(rel, file)?.ok_or_else(|| ActError::Gone {
            path: self.dir(rel),
        })?;
        if read == expect {
            Ok(())
        } else {
            Err(ActError::Verify {
                path: self.dir(rel).join(file),
                wrote: value.to_owned(),
                read,
            })
        }
    }

    /// `cpu.max` at `percent` of one CPU (`None`: "max").
    ///
    /// # Errors
    /// See [`Writer::write_verified`].
    pub fn set_cpu_max(&self, rel: &str, percent: Option<f64>) -> Result<(), ActError> {
        let value = match percent {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a validated positive percentage of a 100 ms period"
            )]
            Some(p) => format!(
                "{} {CPU_PERIOD_US}",
                ((p / 100.0 * CPU_PERIOD_US as f64) as u64).max(1000)
            ),
            None => format!("max {CPU_PERIOD_US}"),
        };
        self.write_verified(rel, "cpu.max", &value, &value)
    }

    /// `cpu.weight`.
    ///
    /// # Errors
    /// See [`Writer::write_verified`].
    pub fn set_cpu_weight(&self, rel: &str, weight: u64) -> Result<(), ActError> {
        let v = weight.to_string();
        self.write_verified(rel, "cpu.weight", &v, &v)
    }

    /// Restores a file to the exact content it had (as read before we changed it).
    ///
    /// # Errors
    /// See [`Writer::write_verified`].
    pub fn restore(&self, rel: &str, file: &str, original: &str) -> Result<(), ActError> {
        if file == "memory.high" {
            return self.set_memory_high_raw(rel, original);
        }
        self.write_verified(rel, file, original, original)
    }

    /// `memory.high` in bytes (rounded down to pages, as the kernel keeps it), bounded in
    /// time: the write can block while the kernel reclaims down to the new limit.
    ///
    /// # Errors
    /// Failed, read back wrong, or still blocked after the timeout.
    pub fn set_memory_high(&self, rel: &str, bytes: u64) -> Result<(), ActError> {
        let page = procfs::page_size();
        self.set_memory_high_raw(rel, &(bytes / page * page).to_string())
    }

    fn set_memory_high_raw(&self, rel: &str, value: &str) -> Result<(), ActError> {
        let (tx, rx) = mpsc::channel();
        let me = self.clone();
        let (rel_owned, v) = (rel.to_owned(), value.to_owned());
        std::thread::spawn(move || {
            let _ = tx.send(me.write_verified(&rel_owned, "memory.high", &v, &v));
        });
        rx.recv_timeout(MEMORY_HIGH_TIMEOUT).unwrap_or_else(|_| {
            Err(ActError::Timeout {
                path: self.dir(rel).join("memory.high"),
                value: value.to_owned(),
                secs: MEMORY_HIGH_TIMEOUT.as_secs(),
            })
        })
    }

    /// `pids.max` (`None`: "max").
    ///
    /// # Errors
    /// See [`Writer::write_verified`].
    pub fn set_pids_max(&self, rel: &str, max: Option<u64>) -> Result<(), ActError> {
        let v = max.map_or_else(|| "max".to_owned(), |m| m.to_string());
        self.write_verified(rel, "pids.max", &v, &v)
    }

    /// `memory.current` in bytes (`None`: gone or unreadable).
    #[must_use]
    pub fn memory_current(&self, rel: &str) -> Option<u64> {
        self.read(rel, "memory.current").ok()??.parse().ok()
    }

    /// `memory.swap.max` in MiB (0: the cgroup's pages stay in RAM from now on).
    ///
    /// # Errors
    /// See [`Writer::write_verified`].
    pub fn set_swap_max(&self, rel: &str, mib: u64) -> Result<(), ActError> {
        let v = (mib << 20).to_string();
        self.write_verified(rel, "memory.swap.max", &v, &v)
    }

    /// Freezes or thaws; waits up to a second for `cgroup.events` to agree. Returns
    /// whether it settled (a task in uninterruptible sleep can delay a freeze).
    ///
    /// # Errors
    /// The write failed or reads back wrong.
    pub fn set_frozen(&self, rel: &str, frozen: bool) -> Result<bool, ActError> {
        let v = if frozen { "1" } else { "0" };
        self.write_verified(rel, "cgroup.freeze", v, v)?;
        let deadline = Instant::now() + FREEZE_SETTLE;
        loop {
            let events = self.read(rel, "cgroup.events")?.unwrap_or_default();
            let now = events
                .lines()
                .find_map(|l| l.strip_prefix("frozen "))
                .map(str::trim);
            if now == Some(v) {
                return Ok(true);
            }
            if now.is_none() || Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Processes (tgids) in the cgroup; empty when it is gone.
    ///
    /// # Errors
    /// A read error other than "gone".
    pub fn procs(&self, rel: &str) -> Result<Vec<u32>, ActError> {
        Ok(self
            .read(rel, "cgroup.procs")?
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default())
    }

    /// Moves a process into `rel`. `Ok(false)`: it exited first (ESRCH).
    ///
    /// # Errors
    /// The kernel refused (EBUSY, EINVAL, EACCES…).
    pub fn move_pid(&self, rel: &str, pid: u32) -> Result<bool, ActError> {
        match self.write_raw(rel, "cgroup.procs", &pid.to_string()) {
            Ok(()) => Ok(true),
            Err(ActError::Write { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates `rel` and its missing ancestors, enabling the cpu, memory and pids
    /// controllers (those available) on the way so that `rel` gets their files.
    ///
    /// # Errors
    /// A directory or `cgroup.subtree_control` could not be written.
    pub fn create(&self, rel: &str) -> Result<(), ActError> {
        let mut current = String::new();
        for part in rel.trim_matches('/').split('/') {
            let available = self
                .read(&current, "cgroup.controllers")?
                .unwrap_or_default();
            let enabled = self
                .read(&current, "cgroup.subtree_control")?
                .unwrap_or_default();
            let wanted: Vec<String> = ["cpu", "memory", "pids"]
                .iter()
                .filter(|c| available.split_whitespace().any(|a| a == **c))
                .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !wanted.is_empty() {
                self.write_raw(&current, "cgroup.subtree_control", &wanted.join(" "))?;
            }
            current = format!("{current}/{part}");
            let dir = self.dir(&current);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(ActError::Write {
                        path: dir,
                        value: "(mkdir)".into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes an empty cgroup; `Ok(false)` if it still has processes (EBUSY).
    ///
    /// # Errors
    /// Any other failure.
    pub fn remove(&self, rel: &str) -> Result<bool, ActError> {
        let dir = self.dir(rel);
        match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(true),
            Err(e) if gone(&e) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
            Err(source) => Err(ActError::Write {
                path: dir,
                value: "(rmdir)".into(),
                source,
            }),
        }
    }

    /// Sends `signal` to every process of the cgroup; returns how many got it.
    ///
    /// # Errors
    /// `cgroup.procs` unreadable.
    pub fn signal_all(
        &self,
        rel: &str,
        signal: nix::sys::signal::Signal,
    ) -> Result<usize, ActError> {
        let mut n = 0;
        for pid in self.procs(rel)? {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Kills every process of the cgroup at once (`cgroup.kill`, Linux 5.14+), else
    /// SIGKILL to each.
    ///
    /// # Errors
    /// Both ways failed.
    pub fn kill_all(&self, rel: &str) -> Result<(), ActError> {
        match self.write_raw(rel, "cgroup.kill", "1") {
            Ok(()) => Ok(()),
            Err(ActError::Gone { .. }) if self.dir(rel).exists() => self
                .signal_all(rel, nix::sys::signal::Signal::SIGKILL)
                .map(|_| ()),
            Err(e) => Err(e),
        }
    }
}

/// A process moved into quarantine, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub pid: u32,
    pub from: String,
}

/// What cgsentry has done to one cgroup under one rule, and how to undo it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub cgroup: String,
    pub rule: String,
    pub finding: FindingKind,
    /// Ladder steps taken (for a restarted agent to re-adopt the ladder).
    pub steps_taken: usize,
    /// Files we changed and what they held before: `(cgroup, file) → content`.
    pub originals: BTreeMap<String, String>,
    /// The quarantine cgroup, once created.
    pub quarantine: Option<String>,
    pub moved: Vec<Moved>,
    /// The cgroup we froze (the offender's or its quarantine).
    pub frozen: Option<String>,
    /// SIGTERM sent; SIGKILL due at this wall-clock time (ms since the epoch).
    pub kill_due_ms: Option<u128>,
    /// First release stage done: thawed, memory.high widened; limits still on.
    #[serde(default)]
    pub relaxed: bool,
    pub dry_run: bool,
    pub updated_ms: u128,
}

impl Applied {
    /// Where the offender's processes are now.
    #[must_use]
    pub fn target(&self) -> &str {
        self.quarantine.as_deref().unwrap_or(&self.cgroup)
    }
}

fn key(cgroup: &str, file: &str) -> String {
    format!("{cgroup}\t{file}")
}

/// All of it, persisted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub entries: Vec<Applied>,
    /// Cgroups the operator released with a hold-off (`cgsentry release --hold-off`),
    /// so that a restarted agent keeps leaving them alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_off: Vec<HeldOffEntry>,
}

/// A hold-off, by the wall clock (the agent's own clock starts over with it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldOffEntry {
    pub cgroup: String,
    /// Ms since the epoch.
    pub until_ms: u128,
}

const JOURNAL_VERSION: u32 = 1;

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// What one action did, for the log and the event stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub cgroup: String,
    pub rule: String,
    pub action: String,
    pub dry_run: bool,
    /// What was done (or would be), one line.
    pub done: String,
    /// What failed, if anything (the rest of the step was still attempted).
    pub errors: Vec<String>,
}

/// Carries out decisions and releases; owns the journal.
#[derive(Debug)]
pub struct Actuator {
    w: Writer,
    path: PathBuf,
    journal: Journal,
    quarantine_parent: String,
}

/// Share of the machine's spare memory a relaxed offender may grow into.
pub const RELAX_SHARE: f64 = 0.5;

/// `cgsentry.slice/quarantine-<name>` for an offender's path.
#[must_use]
pub fn quarantine_path(parent: &str, cgroup: &str) -> String {
    let name: String = cgroup
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    format!(
        "/{}/quarantine-{}",
        parent.trim_matches('/'),
        if name.is_empty() { "root" } else { &name }
    )
}

impl Actuator {
    /// Opens the journal in `journal_dir` (absent: empty; unreadable: kept aside as
    /// `journal.json.corrupt`, and a fresh one started).
    #[must_use]
    pub fn open(cgroup_root: &Path, journal_dir: &Path, quarantine_parent: &str) -> Self {
        let path = journal_dir.join("journal.json");
        let journal = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                let aside = journal_dir.join("journal.json.corrupt");
                warn!(
                    "{}: {e}: kept as {} and started afresh",
                    path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&path, aside);
                Journal::default()
            }),
            Err(_) => Journal::default(),
        };
        Self {
            w: Writer::new(cgroup_root),
            path,
            journal,
            quarantine_parent: quarantine_parent.to_owned(),
        }
    }

    /// Where new quarantine cgroups go (a policy reload may change it).
    pub fn set_quarantine_parent(&mut self, parent: &str) {
        parent.clone_into(&mut self.quarantine_parent);
    }

    #[must_use]
    pub fn entries(&self) -> &[Applied] {
        &self.journal.entries
    }

    /// Hold-offs still running by the wall clock: each cgroup with its seconds left.
    #[must_use]
    pub fn held_off(&self) -> Vec<(&str, f64)> {
        let now = now_ms();
        self.journal
            .held_off
            .iter()
            .filter(|h| h.until_ms > now)
            .map(|h| (h.cgroup.as_str(), (h.until_ms - now) as f64 / 1000.0))
            .collect()
    }

    /// Records (for `for_sec` > 0) or drops the hold-off of `cgroup`, with lapsed ones.
    ///
    /// # Errors
    /// The journal cannot be written (the hold-off still holds until the agent stops).
    pub fn set_held_off(&mut self, cgroup: &str, for_sec: u64) -> Result<(), ActError> {
        let now = now_ms();
        self.journal
            .held_off
            .retain(|h| h.cgroup != cgroup && h.until_ms > now);
        if for_sec > 0 {
            self.journal.held_off.push(HeldOffEntry {
                cgroup: cgroup.to_owned(),
                until_ms: now + u128::from(for_sec) * 1000,
            });
        }
        self.save()
    }

    #[must_use]
    pub fn writer(&self) -> &Writer {
        &self.w
    }

    /// The offender a quarantine cgroup stands for (so that findings about the
    /// quarantine continue the offender's ladder instead of starting a new one).
    #[must_use]
    pub fn origin_of(&self, cgroup: &str) -> Option<&str> {
        self.journal
            .entries
            .iter()
            .find(|a| a.quarantine.as_deref() == Some(cgroup))
            .map(|a| a.cgroup.as_str())
    }

    fn save(&mut self) -> Result<(), ActError> {
        self.journal.version = JOURNAL_VERSION;
        let err = |source| ActError::Journal {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.journal).map_err(io::Error::other);
        std::fs::write(&tmp, bytes.map_err(err)?).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }

    fn entry(&mut self, d: &Decision) -> &mut Applied {
        let i = self
            .journal
            .entries
            .iter()
            .position(|a| a.cgroup == d.cgroup && a.rule == d.rule)
            .unwrap_or_else(|| {
                self.journal.entries.push(Applied {
                    cgroup: d.cgroup.clone(),
                    rule: d.rule.clone(),
                    finding: d.finding,
                    steps_taken: 0,
                    originals: BTreeMap::new(),
                    quarantine: None,
                    moved: Vec::new(),
                    frozen: None,
                    kill_due_ms: None,
                    relaxed: false,
                    dry_run: d.dry_run,
                    updated_ms: now_ms(),
                });
                self.journal.entries.len() - 1
            });
        &mut self.journal.entries[i]
    }

    /// Saves a file's current content as the original to restore, once.
    fn remember(w: &Writer, a: &mut Applied, cgroup: &str, file: &str) -> Result<(), ActError> {
        let k = key(cgroup, file);
        if !a.originals.contains_key(&k)
            && let Some(v) = w.read(cgroup, file)?
        {
            a.originals.insert(k, v);
        }
        Ok(())
    }

    /// Limits of a step on `target`, originals remembered first.
    fn limits(
        w: &Writer,
        a: &mut Applied,
        target: &str,
        step: &Step,
        memory_current: Option<u64>,
        done: &mut Vec<String>,
        errors: &mut Vec<String>,
    ) {
        let mut set = |file: &str, what: String, write: &dyn Fn() -> Result<(), ActError>| {
            match Self::remember(w, a, target, file).and_then(|()| write()) {
                Ok(()) => done.push(what),
                Err(e) => errors.push(e.to_string()),
            }
        };
        // No more swap first: a memory.high below the usage then reclaims only what can
        // go without I/O and returns at once, instead of paging the offender out onto a
        // slow disk (in the writer's own context). Then no more tasks.
        if let Some(mib) = step.swap_max_mib {
            set(
                "memory.swap.max",
                format!("memory.swap.max {mib} MiB"),
                &|| w.set_swap_max(target, mib),
            );
        }
        if let Some(n) = step.pids_max {
            set("pids.max", format!("pids.max {n}"), &|| {
                w.set_pids_max(target, Some(n))
            });
        }
        if let Some(p) = step.cpu_max_percent {
            set("cpu.max", format!("cpu.max {p} %"), &|| {
                w.set_cpu_max(target, Some(p))
            });
        }
        if let Some(weight) = step.cpu_weight {
            set("cpu.weight", format!("cpu.weight {weight}"), &|| {
                w.set_cpu_weight(target, weight)
            });
        }
        if let (Some(p), Some(mem)) = (step.memory_high_percent, memory_current) {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a validated positive percentage of a byte count"
            )]
            let bytes = (mem as f64 * p / 100.0) as u64;
            set(
                "memory.high",
                format!("memory.high {} MiB", bytes >> 20),
                &|| w.set_memory_high(target, bytes),
            );
        }
    }

    /// Carries out one decision. `memory_current` is the offender's memory now (for
    /// `memory_high_percent`). Never fails as a whole: what went wrong is in the report.
    pub fn apply(&mut self, d: &Decision, memory_current: Option<u64>) -> Report {
        let mut done = Vec::new();
        let mut errors = Vec::new();
        let report = |done: Vec<String>, errors: Vec<String>| Report {
            cgroup: d.cgroup.clone(),
            rule: d.rule.clone(),
            action: format!("{:?}", d.action).to_lowercase(),
            dry_run: d.dry_run,
            done: if done.is_empty() {
                "nothing".into()
            } else {
                done.join(", ")
            },
            errors,
        };
        if d.action == Action::Notify {
            return report(vec!["notified".into()], errors);
        }
        if d.dry_run {
            return report(
                vec![format!("would {:?}: {:?}", d.action, d.params)],
                errors,
            );
        }
        let writer = self.w.clone();
        let parent = self.quarantine_parent.clone();
        let entry = self.entry(d);
        entry.steps_taken = entry.steps_taken.max(d.step + 1);
        entry.relaxed = false; // a step taken again (a relapse) tightens again
        entry.updated_ms = now_ms();
        match d.action {
            Action::Notify => {}
            Action::Throttle => {
                let target = entry.target().to_owned();
                Self::limits(
                    &writer,
                    entry,
                    &target,
                    &d.params,
                    memory_current,
                    &mut done,
                    &mut errors,
                );
            }
            Action::Quarantine => {
                let q = quarantine_path(&parent, &d.cgroup);
                match writer.create(&q) {
                    Ok(()) => {
                        entry.quarantine = Some(q.clone());
                        Self::limits(
                            &writer,
                            entry,
                            &q,
                            &d.params,
                            memory_current,
                            &mut done,
                            &mut errors,
                        );
                        let (moved, vanished) =
                            move_all(&writer, &d.cgroup, &q, &mut entry.moved, &mut errors);
                        done.push(format!(
                            "moved {moved} processes to {q} ({vanished} exited mid-move)"
                        ));
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            Action::Freeze => {
                let target = entry.target().to_owned();
                match writer.set_frozen(&target, true) {
                    Ok(settled) => {
                        entry.frozen = Some(target.clone());
                        done.push(if settled {
                            format!("froze {target}")
                        } else {
                            format!("freezing {target} (not settled within 1 s)")
                        });
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            Action::Kill => {
                let target = entry.target().to_owned();
                let grace = d.params.grace_sec.unwrap_or(10);
                if entry.frozen.is_some() {
                    // A frozen task cannot act on SIGTERM: thaw first.
                    if let Err(e) = writer.set_frozen(&target, false) {
                        errors.push(e.to_string());
                    }
                    entry.frozen = None;
                }
                match writer.signal_all(&target, nix::sys::signal::Signal::SIGTERM) {
                    Ok(n) => done.push(format!("SIGTERM to {n} processes; SIGKILL in {grace} s")),
                    Err(e) => errors.push(e.to_string()),
                }
                entry.kill_due_ms = Some(now_ms() + u128::from(grace) * 1000);
            }
        }
        if let Err(e) = self.save() {
            errors.push(e.to_string());
        }
        report(done, errors)
    }

    /// Escalates kills whose grace period ended.
    pub fn tick(&mut self) -> Vec<Report> {
        let now = now_ms();
        let mut out = Vec::new();
        for a in &mut self.journal.entries {
            if a.kill_due_ms.is_some_and(|due| due <= now) {
                a.kill_due_ms = None;
                let target = a.target().to_owned();
                let errors = self
                    .w
                    .kill_all(&target)
                    .err()
                    .map(|e| e.to_string())
                    .into_iter()
                    .collect();
                out.push(Report {
                    cgroup: a.cgroup.clone(),
                    rule: a.rule.clone(),
                    action: "kill".into(),
                    dry_run: false,
                    done: format!("grace over: killed what was left in {target}"),
                    errors,
                });
            }
        }
        if !out.is_empty()
            && let Err(e) = self.save()
        {
            warn!("{e}");
        }
        out
    }

    /// Undoes everything a rule did to a cgroup: thaw, move processes back, restore the
    /// limits it replaced, remove the quarantine cgroup.
    pub fn release(&mut self, r: &Release) -> Option<Report> {
        let i = self
            .journal
            .entries
            .iter()
            .position(|a| a.cgroup == r.cgroup && a.rule == r.rule)?;
        let a = self.journal.entries.remove(i);
        let report = undo(&self.w, &a);
        if let Err(e) = self.save() {
            warn!("{e}");
        }
        Some(report)
    }

    /// First stage of a release: the behaviour stopped while contained, so the offender
    /// gets room to finish its work — without being let loose on the machine again.
    /// Thaws it and widens a `memory.high` we set to its memory now plus
    /// [`RELAX_SHARE`] of `room` (the machine's available memory above its reserve);
    /// `cpu.max`, `cpu.weight`, `pids.max` and `memory.swap.max` stay until the full
    /// release. A pool
    /// then runs in batches under the cap instead of queueing everything at once. An
    /// entry with nothing to relax (no freeze, no `memory.high`) is released whole.
    pub fn relax(&mut self, r: &Release, room: u64) -> Option<Report> {
        let i = self
            .journal
            .entries
            .iter()
            .position(|a| a.cgroup == r.cgroup && a.rule == r.rule)?;
        let a = &mut self.journal.entries[i];
        let target = a.target().to_owned();
        let capped = a.originals.contains_key(&key(&target, "memory.high"));
        if a.relaxed || (a.frozen.is_none() && !capped) {
            return self.release(r);
        }
        let (mut done, mut errors) = (Vec::new(), Vec::new());
        let memory_current = self.w.memory_current(&target);
        if let Some(f) = a.frozen.take() {
            match self.w.set_frozen(&f, false) {
                Ok(_) => done.push(format!("thawed {f}")),
                Err(ActError::Gone { .. }) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        if let (true, Some(mem)) = (capped, memory_current) {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a share of a byte count"
            )]
            let bytes = mem + (room as f64 * RELAX_SHARE) as u64;
            match self.w.set_memory_high(&target, bytes) {
                Ok(()) => done.push(format!("memory.high widened to {} MiB", bytes >> 20)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        done.push("other limits kept until the full release".into());
        a.relaxed = true;
        a.updated_ms = now_ms();
        let report = Report {
            cgroup: a.cgroup.clone(),
            rule: a.rule.clone(),
            action: "relax".into(),
            dry_run: a.dry_run,
            done: done.join(", "),
            errors,
        };
        if let Err(e) = self.save() {
            warn!("{e}");
        }
        Some(report)
    }

    /// Cgroups (the offenders' paths) of relaxed entries whose memory is at 90 % of the
    /// `memory.high` they were left under or more: their work still runs against the cap.
    #[must_use]
    pub fn pressing(&self) -> Vec<String> {
        self.journal
            .entries
            .iter()
            .filter(|a| a.relaxed)
            .filter(|a| {
                let t = a.target();
                let high = self.w.read(t, "memory.high").ok().flatten();
                match (
                    self.w.memory_current(t),
                    high.and_then(|h| h.parse::<u64>().ok()),
                ) {
                    (Some(cur), Some(high)) => cur as f64 >= 0.9 * high as f64,
                    _ => false,
                }
            })
            .map(|a| a.cgroup.clone())
            .collect()
    }

    /// At start: entries whose cgroups are gone are dropped; the rest are returned for
    /// the caller to re-adopt (continue their ladders) or release.
    pub fn reconcile(&mut self) -> Vec<Applied> {
        let w = self.w.clone();
        let before = self.journal.entries.len();
        self.journal.entries.retain(|a| {
            w.dir(&a.cgroup).exists() || a.quarantine.as_ref().is_some_and(|q| w.dir(q).exists())
        });
        if self.journal.entries.len() != before
            && let Err(e) = self.save()
        {
            warn!("{e}");
        }
        self.journal.entries.clone()
    }
}

/// Moves every process of `from` to `to` (a few passes: processes fork while we move).
/// Returns (moved, exited mid-move).
fn move_all(
    w: &Writer,
    from: &str,
    to: &str,
    moved: &mut Vec<Moved>,
    errors: &mut Vec<String>,
) -> (usize, usize) {
    let (mut n, mut vanished) = (0, 0);
    let mut last: Vec<u32> = Vec::new();
    for _ in 0..5 {
        let pids = match w.procs(from) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e.to_string());
                break;
            }
        };
        // Done, or no progress (every move of these failed already): stop.
        if pids.is_empty() || pids == last {
            break;
        }
        last.clone_from(&pids);
        for pid in pids {
            match w.move_pid(to, pid) {
                Ok(true) => {
                    n += 1;
                    moved.push(Moved {
                        pid,
                        from: from.to_owned(),
                    });
                }
                Ok(false) => vanished += 1,
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    (n, vanished)
}

fn undo(w: &Writer, a: &Applied) -> Report {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    if let Some(f) = &a.frozen {
        match w.set_frozen(f, false) {
            Ok(_) => done.push(format!("thawed {f}")),
            Err(ActError::Gone { .. }) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(q) = &a.quarantine {
        // Everything in quarantine goes back: moved processes to where they came from,
        // children born in quarantine to the offender's cgroup.
        let back: BTreeMap<u32, &str> = a.moved.iter().map(|m| (m.pid, m.from.as_str())).collect();
        let mut n = 0;
        for pid in w.procs(q).unwrap_or_default() {
            let dest = back.get(&pid).copied().unwrap_or(&a.cgroup);
            let dest = if w.dir(dest).exists() { dest } else { "/" };
            match w.move_pid(dest, pid) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        done.push(format!("moved {n} processes back"));
        match w.remove(q) {
            Ok(true) => done.push(format!("removed {q}")),
            Ok(false) => errors.push(format!("{q} still has processes; left in place")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    for (k, original) in &a.originals {
        let Some((cgroup, file)) = k.split_once('\t') else {
            continue;
        };
        if a.quarantine.as_deref() == Some(cgroup) {
            continue; // removed with the quarantine cgroup
        }
        match w.restore(cgroup, file, original) {
            Ok(()) => done.push(format!("{file} restored to {original}")),
            Err(ActError::Gone { .. }) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    Report {
        cgroup: a.cgroup.clone(),
        rule: a.rule.clone(),
        action: "release".into(),
        dry_run: a.dry_run,
        done: if done.is_empty() {
            "nothing to undo".into()
        } else {
            done.join(", ")
        },
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decide::Decision, detect::FindingKind};

    /// A fake cgroupfs: plain files, so the kernel's side effects (processes leaving the
    /// source on a move, `frozen` in cgroup.events) are set up by hand. The kernel's
    /// behaviour itself is proven in the VM scenarios.
    fn tree() -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let app = root.join("app");
        std::fs::create_dir(&app).unwrap();
        for (f, v) in [
            ("cpu.max", "max 100000"),
            ("memory.high", "max"),
            ("pids.max", "max"),
            ("memory.swap.max", "max"),
            ("cpu.weight", "100"),
            ("cgroup.procs", "101\n102\n"),
            ("cgroup.freeze", "0"),
            ("cgroup.events", "populated 1\nfrozen 1\n"),
        ] {
            std::fs::write(app.join(f), v).unwrap();
        }
        let w = Writer::new(root);
        (dir, w)
    }

    fn decision(action: Action, step: usize, params: Step) -> Decision {
        Decision {
            cgroup_id: 1,
            cgroup: "/app".into(),
            finding: FindingKind::Leak,
            rule: "r".into(),
            step,
            action,
            params,
            dry_run: false,
            protected_by: vec![],
            reason: "test".into(),
        }
    }

    fn step(action: Action) -> Step {
        Step {
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

    #[test]
    fn throttle_is_journaled_and_release_restores_exactly() {
        let (dir, w) = tree();
        let journal = dir.path().join("journal");
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        let params = Step {
            cpu_max_percent: Some(50.0),
            memory_high_percent: Some(100.0),
            pids_max: Some(64),
            ..step(Action::Throttle)
        };
        let r = act.apply(&decision(Action::Throttle, 1, params), Some(300 << 20));
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            w.read("/app", "cpu.max").unwrap().as_deref(),
            Some("50000 100000")
        );
        assert_eq!(
            w.read("/app", "memory.high").unwrap().as_deref(),
            Some("314572800")
        );
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("64"));

        // A restarted agent finds the same journal.
        let mut again = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        assert_eq!(again.entries().len(), 1);
        assert_eq!(again.entries()[0].steps_taken, 2);
        let release = Release {
            cgroup_id: 1,
            cgroup: "/app".into(),
            rule: "r".into(),
            stage: crate::decide::ReleaseStage::Full,
            steps_taken: 2,
            quiet_sec: 120.0,
            dry_run: false,
        };
        let r = again.release(&release).expect("journaled");
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            w.read("/app", "cpu.max").unwrap().as_deref(),
            Some("max 100000")
        );
        assert_eq!(
            w.read("/app", "memory.high").unwrap().as_deref(),
            Some("max")
        );
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("max"));
        assert!(again.entries().is_empty());
        assert!(
            Actuator::open(dir.path(), &journal, "x")
                .entries()
                .is_empty(),
            "saved"
        );
    }

    /// Incident D's release: capped (memory, pids, no swap) and frozen; relaxed =
    /// thawed with room (memory.high widened by half the machine's spare memory), the
    /// other caps (pids, swap, CPU weight) kept; then the full release restores every original.
    #[test]
    fn relax_thaws_and_widens_then_release_restores() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let cap = Step {
            memory_high_percent: Some(100.0),
            pids_max: Some(64),
            swap_max_mib: Some(0),
            cpu_weight: Some(10),
            ..step(Action::Throttle)
        };
        let r = act.apply(&decision(Action::Throttle, 0, cap), Some(100 << 20));
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            w.read("/app", "memory.swap.max").unwrap().as_deref(),
            Some("0")
        );
        let r = act.apply(&decision(Action::Freeze, 1, step(Action::Freeze)), None);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            w.read("/app", "cgroup.freeze").unwrap().as_deref(),
            Some("1")
        );

        let mut release = Release {
            cgroup_id: 1,
            cgroup: "/app".into(),
            rule: "r".into(),
            stage: crate::decide::ReleaseStage::Relax,
            steps_taken: 2,
            quiet_sec: 10.0,
            dry_run: false,
        };
        std::fs::write(
            w.dir("/app").join("cgroup.events"),
            "populated 1\nfrozen 0\n",
        )
        .unwrap();
        std::fs::write(
            w.dir("/app").join("memory.current"),
            (100u64 << 20).to_string(),
        )
        .unwrap();
        let r = act.relax(&release, 400 << 20).expect("journaled");
        assert_eq!(r.action, "relax");
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            w.read("/app", "cgroup.freeze").unwrap().as_deref(),
            Some("0")
        );
        assert_eq!(
            w.read("/app", "memory.high").unwrap().as_deref(),
            Some((300u64 << 20).to_string().as_str()),
            "100 MiB + half of 400 MiB"
        );
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("64"));
        assert_eq!(
            w.read("/app", "memory.swap.max").unwrap().as_deref(),
            Some("0")
        );
        assert!(act.entries()[0].relaxed && act.entries()[0].frozen.is_none());
        assert!(act.pressing().is_empty(), "100 MiB under a 300 MiB cap");
        std::fs::write(
            w.dir("/app").join("memory.current"),
            (290u64 << 20).to_string(),
        )
        .unwrap();
        assert_eq!(act.pressing(), vec!["/app".to_owned()]);
        // Relaxed is journaled: a restarted agent knows the first stage is done.
        let again = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        assert!(again.entries()[0].relaxed);

        release.stage = crate::decide::ReleaseStage::Full;
        let r = act.release(&release).expect("journaled");
        assert!(r.errors.is_empty(), "{r:?}");
        for (file, original) in [
            ("memory.high", "max"),
            ("pids.max", "max"),
            ("memory.swap.max", "max"),
        ] {
            assert_eq!(
                w.read("/app", file).unwrap().as_deref(),
                Some(original),
                "{file}"
            );
        }
        assert!(act.entries().is_empty());
    }

    /// Nothing to relax (a cpu.max throttle): the first stage releases it whole.
    #[test]
    fn relax_without_freeze_or_memory_cap_releases_whole() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let cpu = Step {
            cpu_max_percent: Some(50.0),
            ..step(Action::Throttle)
        };
        act.apply(&decision(Action::Throttle, 0, cpu), None);
        let release = Release {
            cgroup_id: 1,
            cgroup: "/app".into(),
            rule: "r".into(),
            stage: crate::decide::ReleaseStage::Relax,
            steps_taken: 1,
            quiet_sec: 10.0,
            dry_run: false,
        };
        let r = act.relax(&release, 0).expect("journaled");
        assert_eq!(r.action, "release");
        assert_eq!(
            w.read("/app", "cpu.max").unwrap().as_deref(),
            Some("max 100000")
        );
        assert!(act.entries().is_empty());
    }

    #[test]
    fn quarantine_creates_enables_moves_and_records_origins() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let params = Step {
            cpu_max_percent: Some(100.0),
            ..step(Action::Quarantine)
        };
        let r = act.apply(&decision(Action::Quarantine, 0, params), None);
        let q = "/cgsentry.slice/quarantine-app";
        assert!(w.dir(q).is_dir(), "{r:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        let a = &act.entries()[0];
        assert_eq!(a.quarantine.as_deref(), Some(q));
        // Plain files: the source never empties, so the mover stops on no progress
        // (the same pids a second time) instead of looping.
        let pids: Vec<u32> = a.moved.iter().map(|m| m.pid).collect();
        assert_eq!(pids, vec![101, 102], "{r:?}");
        assert!(a.moved.iter().all(|m| m.from == "/app"));
        assert_eq!(act.origin_of(q), Some("/app"));
        assert_eq!(
            w.read(q, "cpu.max").unwrap().as_deref(),
            Some("100000 100000")
        );
    }

    #[test]
    fn freeze_waits_for_cgroup_events_and_dry_run_writes_nothing() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let mut d = decision(Action::Freeze, 2, step(Action::Freeze));
        d.dry_run = true;
        let r = act.apply(&d, None);
        assert!(r.done.starts_with("would Freeze"), "{r:?}");
        assert_eq!(
            w.read("/app", "cgroup.freeze").unwrap().as_deref(),
            Some("0")
        );
        assert!(act.entries().is_empty(), "a dry run journals nothing");

        d.dry_run = false;
        let r = act.apply(&d, None);
        assert_eq!(r.done, "froze /app", "{r:?}");
        assert_eq!(
            w.read("/app", "cgroup.freeze").unwrap().as_deref(),
            Some("1")
        );
        assert_eq!(act.entries()[0].frozen.as_deref(), Some("/app"));
    }

    #[test]
    fn a_vanished_cgroup_is_reported_not_fatal_and_reconcile_drops_it() {
        let (dir, _w) = tree();
        let journal = dir.path().join("j");
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        let mut d = decision(
            Action::Throttle,
            0,
            Step {
                pids_max: Some(8),
                ..step(Action::Throttle)
            },
        );
        d.cgroup = "/gone".into();
        let r = act.apply(&d, None);
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("gone"), "{r:?}");
        assert!(act.reconcile().is_empty(), "nothing left to adopt");
        assert!(
            Actuator::open(dir.path(), &journal, "x")
                .entries()
                .is_empty()
        );
    }

    #[test]
    fn a_corrupt_journal_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.json"), "{not json").unwrap();
        let act = Actuator::open(dir.path(), dir.path(), "cgsentry.slice");
        assert!(act.entries().is_empty());
        assert!(dir.path().join("journal.json.corrupt").exists());
    }

    #[test]
    fn quarantine_names() {
        assert_eq!(
            quarantine_path("cgsentry.slice", "/user.slice/job-1"),
            "/cgsentry.slice/quarantine-user.slice-job-1"
        );
        assert_eq!(quarantine_path("/a/b/", "/"), "/a/b/quarantine-root");
    }
}
