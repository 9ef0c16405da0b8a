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
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
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
    #[error(
        "{path}: not there: the {controller} controller is not enabled for this cgroup \
         (its parent's cgroup.subtree_control, the manager's Delegate=)"
    )]
    NoController { path: PathBuf, controller: String },
    #[error("{unit}: systemd is stopping it; {file} left as it is")]
    Stopping { unit: String, file: String },
    #[error("{unit}: {why}")]
    Systemd { unit: String, why: String },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("journal {path}: {source}")]
    Journal { path: PathBuf, source: io::Error },
    #[error("{path}: {why}; {value:?} is written when it returns")]
    Busy {
        path: PathBuf,
        value: String,
        why: &'static str,
    },
    #[error("{path}: cannot start a writer thread: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// What a failed write of `value` to control file `file` (at `path`) means: `missing`
/// when its cgroup is there and the file is not (a controller's file: that controller
/// is not enabled there; the core's `cgroup.*`: the kernel is older than the file).
fn write_error(path: &Path, file: &str, value: &str, source: io::Error, missing: bool) -> ActError {
    let controller = file.split('.').next().filter(|c| *c != "cgroup");
    let refused = gone(&source) || source.kind() == io::ErrorKind::PermissionDenied;
    match controller {
        Some(c) if missing && refused => ActError::NoController {
            path: path.to_owned(),
            controller: c.to_owned(),
        },
        // (cgroupfs refuses to create a core file the kernel lacks, with EACCES too.)
        _ if gone(&source) || (missing && refused) => ActError::Gone {
            path: path.to_owned(),
        },
        _ => ActError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        },
    }
}

/// At most this many `memory.high` writes blocked in the kernel at once (each holds a
/// thread; the unit allows the agent 64 tasks).
const MAX_BLOCKED_WRITERS: usize = 8;

/// Why a `memory.high` write was not even queued (see [`ActError::Busy`]).
const NOT_WRITTEN: &str = "too many memory.high writes are blocked in the kernel; not written";

/// The pool's queue: where jobs go in, and the receiver the workers share.
type JobQueue = (mpsc::Sender<HighJob>, Arc<Mutex<mpsc::Receiver<HighJob>>>);

/// A pool worker with nothing to do for this long goes away.
const WRITER_IDLE: Duration = Duration::from_mins(1);

/// One `memory.high` write for the pool: the cgroup, the value, where to answer.
struct HighJob {
    rel: String,
    key: PathBuf,
    value: String,
    reply: mpsc::Sender<Result<(), ActError>>,
}

/// `memory.high` writes: a pool of at most [`MAX_BLOCKED_WRITERS`] threads, started as
/// writes need them and gone after [`WRITER_IDLE`] without one (never a thread per
/// write), and per file the write in flight with the value the next caller wanted,
/// written by the same worker once its write returns (the latest wins).
#[derive(Clone, Debug, Default)]
struct InFlight(Arc<Pool>);

#[derive(Debug, Default)]
struct Pool {
    /// Files with a write in flight → the value to write next.
    files: Mutex<HashMap<PathBuf, Option<String>>>,
    /// The queue the workers take jobs from (made with the first worker).
    queue: Mutex<Option<JobQueue>>,
    workers: std::sync::atomic::AtomicUsize,
    idle: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for HighJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HighJob")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes cgroup v2 control files under an injectable root — through systemd for the
/// cgroups that are its units' own ([`crate::systemd`]).
#[derive(Clone, Debug)]
pub struct Writer {
    root: PathBuf,
    inflight: InFlight,
    systemd: Option<crate::systemd::Systemd>,
    /// systemd's runtime state, where its runtime drop-ins are
    /// ([`crate::systemd::RUN_DIR`]).
    systemd_run_dir: PathBuf,
    /// Where processes' cgroups are read (`/proc`).
    proc_root: PathBuf,
}

impl Writer {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            inflight: InFlight::default(),
            systemd: None,
            systemd_run_dir: PathBuf::from(crate::systemd::RUN_DIR),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// Where processes' cgroups are read (tests).
    #[must_use]
    pub fn with_proc_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.proc_root = dir.into();
        self
    }

    /// The cgroup process `pid` is in now; `None` when it is gone.
    #[must_use]
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        crate::cgroupfs::cgroup_of_pid(&self.proc_root, pid)
    }

    /// Where systemd's runtime drop-ins are looked for and removed (tests).
    #[must_use]
    pub fn with_systemd_run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.systemd_run_dir = dir.into();
        self
    }

    /// `unit`'s runtime drop-ins for `property`, when they are ones cgsentry may remove.
    fn runtime_dropins(&self, unit: &str, property: &str) -> Vec<PathBuf> {
        crate::systemd::runtime_dropins(&self.systemd_run_dir, unit, property)
    }

    /// Sets a unit's limits and freezes it through systemd from now on.
    pub fn set_systemd(&mut self, systemd: crate::systemd::Systemd) {
        self.systemd = Some(systemd);
    }

    /// Whether systemd is this host's init and the agent acts through it.
    #[must_use]
    pub fn systemd_here(&self) -> bool {
        self.systemd.is_some()
    }

    /// The unit PID 1 counts `rel` in, when it is not a slice (a cgroup directly below
    /// a slice belongs to no process owner): what a quarantine of it is part of.
    fn owning_unit(&self, rel: &str) -> Option<String> {
        self.unit_of(rel).or_else(|| {
            self.systemd
                .as_ref()?
                .unit_containing(rel)
                .filter(|u| u.strip_suffix(".slice").is_none())
        })
    }

    /// The systemd unit whose own cgroup `rel` is, when the agent acts on units through
    /// systemd.
    #[must_use]
    pub fn unit_of(&self, rel: &str) -> Option<String> {
        self.systemd.as_ref()?.unit_of(rel)
    }

    /// Sets `unit`'s property for `file` back to `value` (the file's text) through
    /// systemd, whatever cgroup the unit has now. `Ok(false)`: nothing to do (no
    /// systemd here, no property for that file, or the unit is no longer loaded: its
    /// runtime properties went with it).
    ///
    /// # Errors
    /// systemd refused or did not answer.
    pub fn restore_unit(&self, unit: &str, file: &str, value: &str) -> Result<bool, String> {
        use crate::systemd::Refusal;
        let (Some(sd), Some((name, v))) = (
            self.systemd.as_ref(),
            crate::systemd::property_for(file, value),
        ) else {
            return Ok(false);
        };
        match sd.set_property(unit, name, v) {
            Ok(()) => Ok(true),
            Err(Refusal::NoUnit) => Ok(false),
            Err(Refusal::Stopping) => Err(format!("{unit}: systemd is stopping it")),
            Err(Refusal::Failed(e)) => Err(e),
        }
    }

    /// `file` of `rel` set to `value` through systemd, when `rel` is a unit's own cgroup
    /// and systemd has a property (or the freezer) for that file; `None`: the caller
    /// writes the file (not a unit, no such property, or systemd refused or did not
    /// answer). A unit systemd is stopping is left alone: its stop must not wait for
    /// processes frozen or throttled behind its back.
    fn via_systemd(&self, rel: &str, file: &str, value: &str) -> Option<Result<(), ActError>> {
        use crate::systemd::Refusal;
        let sd = self.systemd.as_ref()?;
        let property = crate::systemd::property_for(file, value);
        if file != "cgroup.freeze" && property.is_none() {
            return None;
        }
        let unit = sd.unit_of(rel)?;
        let done = match property {
            Some((name, v)) => sd.set_property(&unit, name, v),
            None => sd.set_frozen(&unit, value.trim() == "1"),
        };
        match done {
            Ok(()) => Some(Ok(())),
            Err(Refusal::Stopping) => Some(Err(ActError::Stopping {
                unit,
                file: file.to_owned(),
            })),
            Err(Refusal::NoUnit) => None,
            Err(Refusal::Failed(e)) => {
                sd.warn_once(&e);
                None
            }
        }
    }

    /// `memory.high` writes still blocked in the kernel.
    #[must_use]
    pub fn blocked_writes(&self) -> usize {
        lock(&self.inflight.0.files).len()
    }

    /// Whether a `memory.high` write to `rel` is still blocked in the kernel (the file
    /// reads its old value until it returns).
    #[must_use]
    pub fn writing(&self, rel: &str, file: &str) -> bool {
        file == "memory.high"
            && lock(&self.inflight.0.files).contains_key(&self.dir(rel).join(file))
    }

    /// Who owns a control file: root, or the user the cgroup is delegated to (a user
    /// manager's cgroups, a `Delegate=` service's), who can write it.
    #[must_use]
    pub fn owner(&self, rel: &str, file: &str) -> Option<u32> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.dir(rel).join(file))
            .ok()
            .map(|m| m.uid())
    }

    /// `memory.high` writer threads alive (busy or idle).
    #[must_use]
    pub fn writer_threads(&self) -> usize {
        self.inflight
            .0
            .workers
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The directory of cgroup `rel` (a [`crate::cgroupfs::path_text`]).
    #[must_use]
    pub fn dir(&self, rel: &str) -> PathBuf {
        crate::cgroupfs::fs_path(&self.root, rel)
    }

    /// The cgroup's id (the inode of its directory); `None` when it is gone.
    #[must_use]
    pub fn id_of(&self, rel: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.dir(rel)).ok().map(|m| m.ino())
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
            // A control file that is not there (its controller is not enabled for this
            // cgroup): cgroupfs refuses the create with EACCES, which says nothing.
            let missing = path.parent().is_some_and(Path::is_dir) && !path.exists();
            write_error(&path, file, value, source, missing)
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
        match self.via_systemd(rel, file, value) {
            Some(done) => done?,
            None => self.write_raw(rel, file, value)?,
        }
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
        let value = cpu_max_text(percent);
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
        self.set_memory_high_raw(rel, &memory_high_text(bytes))
    }

    /// Writes `memory.high` through the writer pool and waits for it up to
    /// [`MEMORY_HIGH_TIMEOUT`]. While a write to this file is still blocked, the value
    /// is handed to the worker holding it (written when its write returns) instead of
    /// taking another; no more than [`MAX_BLOCKED_WRITERS`] files at once. A worker
    /// that cannot start is an error, never a panic.
    fn set_memory_high_raw(&self, rel: &str, value: &str) -> Result<(), ActError> {
        let path = self.dir(rel).join("memory.high");
        let pool = &self.inflight.0;
        {
            let mut files = lock(&pool.files);
            if let Some(next) = files.get_mut(&path) {
                *next = Some(value.to_owned());
                return Err(ActError::Busy {
                    path,
                    value: value.to_owned(),
                    why: "an earlier write is still blocked in the kernel (reclaiming)",
                });
            }
            if files.len() >= MAX_BLOCKED_WRITERS {
                return Err(ActError::Busy {
                    path,
                    value: value.to_owned(),
                    why: NOT_WRITTEN,
                });
            }
            files.insert(path.clone(), None);
        }
        let (reply, rx) = mpsc::channel();
        let job = HighJob {
            rel: rel.to_owned(),
            key: path.clone(),
            value: value.to_owned(),
            reply,
        };
        if let Err(source) = self.submit(job) {
            lock(&pool.files).remove(&path);
            return Err(ActError::Thread { path, source });
        }
        rx.recv_timeout(MEMORY_HIGH_TIMEOUT).unwrap_or_else(|_| {
            Err(ActError::Timeout {
                path,
                value: value.to_owned(),
                secs: MEMORY_HIGH_TIMEOUT.as_secs(),
            })
        })
    }

    /// Queues a job, starting a worker when none is idle (up to the bound).
    fn submit(&self, job: HighJob) -> io::Result<()> {
        use std::sync::atomic::Ordering::AcqRel;
        let pool = &self.inflight.0;
        let mut queue = lock(&pool.queue);
        let (tx, rx) = queue.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel();
            (tx, Arc::new(Mutex::new(rx)))
        });
        let need = pool.idle.load(std::sync::atomic::Ordering::Acquire) == 0
            && pool.workers.load(std::sync::atomic::Ordering::Acquire) < MAX_BLOCKED_WRITERS;
        if need {
            let (me, rx) = (self.clone(), Arc::clone(rx));
            pool.workers.fetch_add(1, AcqRel);
            let spawned = std::thread::Builder::new()
                .name("cgsentry-memhigh".into())
                .spawn(move || me.work(&rx));
            if let Err(e) = spawned {
                pool.workers.fetch_sub(1, AcqRel);
                if pool.workers.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return Err(e);
                }
            }
        }
        tx.send(job)
            .map_err(|_| io::Error::other("the writer pool is gone"))
    }

    /// A pool worker: takes jobs until none comes for [`WRITER_IDLE`].
    fn work(&self, rx: &Mutex<mpsc::Receiver<HighJob>>) {
        use std::sync::atomic::Ordering::AcqRel;
        let pool = &self.inflight.0;
        loop {
            pool.idle.fetch_add(1, AcqRel);
            let job = lock(rx).recv_timeout(WRITER_IDLE);
            pool.idle.fetch_sub(1, AcqRel);
            let Ok(mut job) = job else {
                pool.workers.fetch_sub(1, AcqRel);
                return;
            };
            loop {
                let r = self.write_verified(&job.rel, "memory.high", &job.value, &job.value);
                let _ = job.reply.send(r); // the caller may have stopped waiting
                let mut files = lock(&pool.files);
                if let Some(next) = files.get_mut(&job.key).and_then(Option::take) {
                    job.value = next;
                } else {
                    files.remove(&job.key);
                    break;
                }
            }
        }
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
        self.read_u64(rel, "memory.current")
    }

    /// A file holding one number (`None`: gone, unreadable or not a number).
    #[must_use]
    pub fn read_u64(&self, rel: &str, file: &str) -> Option<u64> {
        self.read(rel, file).ok()??.parse().ok()
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

    /// Whether this cgroup itself was frozen (`cgroup.freeze` is 1; its descendants
    /// are frozen with it, but not set).
    #[must_use]
    pub fn is_frozen(&self, rel: &str) -> bool {
        self.read(rel, "cgroup.freeze").ok().flatten().as_deref() == Some("1")
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

    /// Processes of the cgroup and of every cgroup below it (a parent's own
    /// `cgroup.procs` is empty when it enables controllers for its children).
    ///
    /// # Errors
    /// The cgroup's own `cgroup.procs` unreadable.
    pub fn procs_below(&self, rel: &str) -> Result<Vec<u32>, ActError> {
        let mut out = self.procs(rel)?;
        let mut dirs = vec![rel.to_owned()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(self.dir(&dir)) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    use std::os::unix::ffi::OsStrExt as _;
                    let name = crate::cgroupfs::path_text(e.file_name().as_bytes());
                    let child = format!("{}/{name}", dir.trim_end_matches('/'));
                    out.extend(self.procs(&child).unwrap_or_default());
                    dirs.push(child);
                }
            }
        }
        Ok(out)
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

    /// Makes quarantine `q` (`/<slice>/<name>.scope`) a transient scope unit holding
    /// `pids`, the quarantine of `origin`, part of `part_of` when given (see
    /// [`crate::systemd::Systemd::start_scope`]), and
    /// waits for its cgroup: systemd creates it as it runs the start job, just after
    /// answering.
    ///
    /// # Errors
    /// No systemd here, systemd refused or did not answer, or no cgroup within 2 s.
    pub fn start_scope(
        &self,
        q: &str,
        (origin, part_of): (&str, Option<&str>),
        pids: &[u32],
        limits: &[(&'static str, u64)],
    ) -> Result<(), ActError> {
        let (slice, name) = q.trim_start_matches('/').split_once('/').unwrap_or(("", q));
        let failed = |why: String| ActError::Systemd {
            unit: name.to_owned(),
            why,
        };
        let sd = self
            .systemd
            .as_ref()
            .ok_or_else(|| failed("no systemd to start it".into()))?;
        sd.start_scope(name, slice, (origin, part_of), pids, limits)
            .map_err(|r| failed(r.to_string()))?;
        let until = Instant::now() + Duration::from_secs(2);
        while self.id_of(q).is_none() {
            if Instant::now() >= until {
                return Err(failed(
                    "started, but its cgroup did not appear within 2 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Ends quarantine scope `q` (unit `unit`) once it and every cgroup below it are
    /// empty: systemd stops it and
    /// removes its cgroup (a scope's cgroup removed behind its back stays an active
    /// unit with no cgroup). `Ok(false)`: it still has processes (those left there
    /// must not be killed by its stop).
    ///
    /// # Errors
    /// `cgroup.procs` unreadable, or systemd refused or did not answer.
    pub fn stop_scope(&self, q: &str, unit: &str) -> Result<bool, ActError> {
        // Below it too: a process may have made cgroups of its own in there.
        match self.procs_below(q) {
            Ok(p) if !p.is_empty() => return Ok(false),
            Err(ActError::Gone { .. }) => return Ok(true),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let sd = self.systemd.as_ref().ok_or_else(|| ActError::Systemd {
            unit: unit.to_owned(),
            why: "no systemd to stop it".into(),
        })?;
        match sd.stop(unit) {
            Ok(()) | Err(crate::systemd::Refusal::NoUnit) => Ok(true),
            Err(r) => Err(ActError::Systemd {
                unit: unit.to_owned(),
                why: r.to_string(),
            }),
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

    /// Sends `signal` to every process of the cgroup and of the cgroups below it;
    /// returns how many got it.
    ///
    /// # Errors
    /// `cgroup.procs` unreadable.
    pub fn signal_all(
        &self,
        rel: &str,
        signal: nix::sys::signal::Signal,
    ) -> Result<usize, ActError> {
        let mut n = 0;
        for pid in self.procs_below(rel)? {
            if untouchable(pid) {
                continue;
            }
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// `signal` to every process of `rel` through systemd (`KillUnit`), when `rel` is a
    /// unit's own cgroup: `Some(unit)` when systemd took it; `None`: not a unit, or
    /// systemd refused or did not answer (the caller signals the processes itself).
    /// A unit being stopped is signalled too: a kill is what its stop ends in anyway.
    fn signal_unit(&self, rel: &str, signal: nix::sys::signal::Signal) -> Option<String> {
        let sd = self.systemd.as_ref()?;
        let unit = sd.unit_of(rel)?;
        match sd.kill(&unit, signal) {
            Ok(()) => Some(unit),
            Err(e) => {
                warn!("{unit}: KillUnit refused ({e}): signalling its processes directly");
                None
            }
        }
    }

    /// SIGTERM to every process of `rel`: through systemd for a unit's own cgroup, else
    /// to each. Says what was done (how many processes it reached).
    ///
    /// # Errors
    /// `cgroup.procs` unreadable.
    pub fn terminate_all(&self, rel: &str) -> Result<String, ActError> {
        let term = nix::sys::signal::Signal::SIGTERM;
        if self.unit_of(rel).is_some() {
            let n = self
                .procs_below(rel)?
                .into_iter()
                .filter(|p| !untouchable(*p))
                .count();
            if let Some(unit) = self.signal_unit(rel, term) {
                return Ok(format!(
                    "SIGTERM to {n} processes through systemd (KillUnit {unit})"
                ));
            }
        }
        let n = self.signal_all(rel, term)?;
        Ok(format!("SIGTERM to {n} processes"))
    }

    /// Kills every process of the cgroup at once: through systemd for a unit's own
    /// cgroup (`KillUnit`, SIGKILL), else `cgroup.kill` (Linux 5.14+), else SIGKILL to
    /// each. Returns how, when through systemd.
    ///
    /// # Errors
    /// Every way failed.
    pub fn kill_all(&self, rel: &str) -> Result<Option<String>, ActError> {
        if let Some(unit) = self.signal_unit(rel, nix::sys::signal::Signal::SIGKILL) {
            // systemd signals the processes one by one: what forked meanwhile (an
            // explosion) is ended by the kernel at once.
            if self.procs_below(rel).is_ok_and(|p| !p.is_empty()) {
                let _ = self.write_raw(rel, "cgroup.kill", "1");
            }
            return Ok(Some(format!("through systemd (KillUnit {unit} SIGKILL)")));
        }
        match self.write_raw(rel, "cgroup.kill", "1") {
            Ok(()) => Ok(None),
            Err(ActError::Gone { .. }) if self.dir(rel).exists() => self
                .signal_all(rel, nix::sys::signal::Signal::SIGKILL)
                .map(|_| None),
            Err(e) => Err(e),
        }
    }
}

/// PID 1 and this agent: never signalled or moved, whichever cgroup they are found in.
fn untouchable(pid: u32) -> bool {
    pid == 1 || pid == std::process::id()
}

/// A process moved into quarantine, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub pid: u32,
    pub from: String,
}

/// Control files the actuator changes: the only ones a journal may name to restore
/// (a journal is data; it never chooses which files root writes).
pub const RESTORABLE: [&str; 6] = [
    "cpu.max",
    "cpu.weight",
    "memory.high",
    "memory.max",
    "memory.swap.max",
    "pids.max",
];

/// What cgsentry has done to one cgroup under one rule, and how to undo it.
///
/// Written to the journal before each step is carried out (the intent: the originals
/// of the files it will change, the cgroup it will freeze, the quarantine it will
/// create), and again after, so that whatever the agent did — even if it was killed in
/// the middle — a restarted agent knows of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub cgroup: String,
    /// The cgroup's id (the inode of its directory) when it was first acted on: a
    /// cgroup made since at the same path (a restarted service, the next CI job) is
    /// another one, and nothing of this entry is ever done to it. `None` in journals
    /// written before ids were kept.
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    pub rule: String,
    pub finding: FindingKind,
    /// Ladder steps taken (for a restarted agent to re-adopt the ladder).
    pub steps_taken: usize,
    /// Files we changed and what they held before: `(cgroup, file) → content`.
    pub originals: BTreeMap<String, String>,
    /// The quarantine cgroup, once created.
    pub quarantine: Option<String>,
    /// Its id, once created.
    #[serde(default)]
    pub quarantine_id: Option<u64>,
    pub moved: Vec<Moved>,
    /// The cgroup we froze (the offender's or its quarantine).
    pub frozen: Option<String>,
    /// SIGTERM sent; SIGKILL due at this wall-clock time (ms since the epoch), for a
    /// restarted agent. The running agent goes by `kill_deadline`.
    pub kill_due_ms: Option<u128>,
    /// When the SIGKILL is due, by the monotonic clock (a wall-clock step neither
    /// hastens nor delays it).
    #[serde(skip)]
    pub kill_deadline: Option<Instant>,
    /// First release stage done: thawed, memory.high widened; limits still on.
    #[serde(default)]
    pub relaxed: bool,
    /// The systemd unit whose own cgroup this is, when its limits went through systemd:
    /// they are the unit's runtime properties, which outlive the cgroup (a restarted
    /// unit, or one stopped and started again, would keep them), so a release restores
    /// them by the unit's name when the cgroup is gone or was replaced.
    #[serde(default)]
    pub unit: Option<String>,
    /// The unit's runtime drop-ins (by property, see
    /// [`crate::systemd::runtime_dropins`]) that did not exist before cgsentry set the
    /// property: the release removes them once the values are restored, so that the
    /// unit's own files rule again at systemd's next reload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub own_dropins: Vec<String>,
    /// What cgsentry's writes left in force, `(cgroup, file) → content`: each tick the
    /// files of the cgroup the offender is in are compared with it
    /// ([`Actuator::enforce`]), so that a cap lifted behind cgsentry's back is put back,
    /// not silently lost.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// The offender's whole memory and swap caps, `(quarantine, file) → bytes`, where
    /// its quarantine holds them less what it left charged to its origin (see
    /// [`less_left_behind`]): as it frees those pages, the quarantine's caps are
    /// raised back towards them ([`Actuator::widen_as_freed`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub whole_caps: BTreeMap<String, u64>,
    /// The last failure to widen them, while it lasts (reported once).
    #[serde(skip)]
    pub widen_failed: Option<String>,
    /// The last drift [`Actuator::enforce`] reported, while it lasts: the same one (a
    /// file that cannot be put back, a unit systemd is stopping) is not logged again
    /// every tick.
    #[serde(skip)]
    pub last_drift: Option<String>,
    /// The processes a delegated offender's cgroup held at the last tick (at most
    /// [`SEEN_MAX`]): one that left it alive was moved out by the user (see
    /// [`Actuator::enforce`]).
    #[serde(skip)]
    pub seen: Vec<u32>,
    /// The user the offender's cgroup was delegated to when `seen` was taken (its
    /// manager may remove the cgroup once she has moved every process out).
    #[serde(skip)]
    pub delegated_to: Option<u32>,
    /// The offender's processes found outside its cgroup, with where they are: the
    /// next quarantine takes them too (see [`Actuator::enforce`]).
    #[serde(skip)]
    pub strays: Vec<Moved>,
    pub dry_run: bool,
    pub updated_ms: u128,
}

impl Applied {
    /// Where the offender's processes are now.
    #[must_use]
    pub fn target(&self) -> &str {
        self.quarantine.as_deref().unwrap_or(&self.cgroup)
    }

    /// Why this entry (read from a journal, which is data) cannot be one the agent
    /// wrote: a path that is not a cgroup path, a quarantine that is not a
    /// `quarantine-*` cgroup, a frozen cgroup that is neither of its own.
    fn malformed(&self) -> Option<&'static str> {
        if !sane_cgroup(&self.cgroup) {
            return Some("its cgroup is not a cgroup path");
        }
        if let Some(q) = &self.quarantine {
            let named = q
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("quarantine-"));
            if !sane_cgroup(q) || !named {
                return Some("its quarantine is not a quarantine-* cgroup");
            }
        }
        if let Some(f) = &self.frozen
            && f != &self.cgroup
            && Some(f) != self.quarantine.as_ref()
        {
            return Some("it froze a cgroup that is neither its own nor its quarantine");
        }
        if let Some(u) = &self.unit
            && self.cgroup.rsplit('/').next() != Some(u.as_str())
        {
            return Some("its unit is not the one its cgroup is named after");
        }
        None
    }

    /// The id this entry recorded for `cgroup` (its offender or its quarantine).
    fn recorded_id(&self, cgroup: &str) -> Option<u64> {
        if cgroup == self.cgroup {
            self.cgroup_id
        } else if self.quarantine.as_deref() == Some(cgroup) {
            self.quarantine_id
        } else {
            None
        }
    }

    /// Remembers `whole` as the offender's cap that `file` of its quarantine `q` holds
    /// less what it left behind (see [`Applied::whole_caps`]); `None`: it holds the
    /// cap itself, nothing to widen.
    fn record_whole(&mut self, q: &str, file: &str, whole: Option<u64>) {
        match whole {
            Some(bytes) => self.whole_caps.insert(key(q, file), bytes),
            None => self.whole_caps.remove(&key(q, file)),
        };
    }

    /// The offender's cap `whole` of `file`, as its quarantine `q` is to hold it: less
    /// what it left `behind` (see [`less_left_behind`]), the whole cap remembered when
    /// it is less.
    fn lowered_for(&mut self, q: &str, file: &str, whole: &str, behind: (u64, u64)) -> String {
        let value = less_left_behind(file, whole, behind);
        let less = (value != whole).then(|| whole.parse().ok()).flatten();
        self.record_whole(q, file, less);
        value
    }

    /// What a step's limits on `target` wrote replaces what was there to widen:
    /// `memory.high` (`high`, see [`Actuator::limits`]) and the step's own
    /// `memory.swap.max`. A file the step did not write keeps its record.
    fn after_limits(&mut self, target: &str, step: &Step, high: High) {
        match high {
            High::NotWritten => {}
            High::Whole => self.record_whole(target, "memory.high", None),
            High::Less { whole } => self.record_whole(target, "memory.high", Some(whole)),
        }
        if step.swap_max_mib.is_some() {
            self.record_whole(target, "memory.swap.max", None);
        }
    }

    /// Whether `cgroup` is still the one this entry acted on: it exists, and its id is
    /// the one recorded (an entry from before ids were kept trusts the path).
    fn still_ours(&self, w: &Writer, cgroup: &str) -> bool {
        let is_ours = cgroup == self.cgroup || self.quarantine.as_deref() == Some(cgroup);
        match (is_ours, w.id_of(cgroup), self.recorded_id(cgroup)) {
            (false, _, _) | (true, None, _) => false,
            (true, Some(now), Some(then)) => now == then,
            (true, Some(_), None) => true,
        }
    }
}

fn key(cgroup: &str, file: &str) -> String {
    format!("{cgroup}\t{file}")
}

/// The files cgsentry set on `cgroup` and what they should hold, from an entry's
/// [`Applied::set`]: only files of [`RESTORABLE`] (a journal is data; it never
/// chooses which files root writes).
fn guarded(set: &BTreeMap<String, String>, cgroup: &str) -> Vec<(String, String)> {
    set.iter()
        .filter_map(|(k, v)| {
            let (c, file) = k.rsplit_once('\t')?;
            (c == cgroup && RESTORABLE.contains(&file)).then(|| (file.to_owned(), v.clone()))
        })
        .collect()
}

/// What entry's offender had in place that its new quarantine `q` does not keep by
/// itself: the caps cgsentry set on the origin, less what it left `behind` (see
/// [`left_behind`], read before it moved; the tightest limits of the origin and
/// its ancestors are kept already; `cpu.weight` is not one), and its freeze (moving
/// thawed the processes: the quarantine is frozen instead, and the empty origin
/// thawed, so that the processes a release moves back do not land frozen).
fn carry_over(w: &Writer, entry: &mut Applied, q: &str, behind: (u64, u64), report: &mut Report) {
    use std::fmt::Write as _;
    let origin = entry.cgroup.clone();
    let mut noted = false;
    for (file, whole) in guarded(&entry.set, &origin) {
        let want = entry.lowered_for(q, &file, &whole, behind);
        match ensure(w, q, &file, &want) {
            Ok(true) => {
                let _ = write!(report.done, ", {file} {want} on {q}");
                if file.starts_with("memory.") {
                    noted = true;
                }
            }
            Ok(false) => {}
            Err(e) => report.errors.push(e.to_string()),
        }
        in_force(w, &mut entry.set, q, &file);
    }
    if noted {
        report.done.push_str(&behind_note(behind, &origin));
    }
    if entry.frozen.as_deref() == Some(origin.as_str()) {
        match w.set_frozen(q, true) {
            Ok(_) => {
                let _ = write!(report.done, ", froze {q}");
                entry.frozen = Some(q.to_owned());
            }
            Err(e) => report.errors.push(e.to_string()),
        }
        match w.set_frozen(&origin, false) {
            Ok(_) | Err(ActError::Gone { .. }) => {}
            Err(e) => report.errors.push(e.to_string()),
        }
    }
}

/// Makes `file` of `cgroup` hold `want` when it holds something else; `Ok(true)`:
/// it was written.
fn ensure(w: &Writer, cgroup: &str, file: &str, want: &str) -> Result<bool, ActError> {
    if w.read(cgroup, file).ok().flatten().as_deref() == Some(want) {
        return Ok(false);
    }
    w.restore(cgroup, file, want).map(|()| true)
}

/// The entry's processes a user moved out of its cgroup that are still where they
/// were found.
fn stray_pids(w: &Writer, entry: &Applied) -> Vec<u32> {
    entry
        .strays
        .iter()
        .filter(|m| stray_still_there(w, m))
        .map(|m| m.pid)
        .collect()
}

/// Whether a process found outside its offender's cgroup is still in the cgroup it
/// was found in.
fn stray_still_there(w: &Writer, stray: &Moved) -> bool {
    w.cgroup_of(stray.pid).as_deref() == Some(stray.from.as_str())
}

/// The most processes of one delegated offender remembered from tick to tick, and
/// followed out of it at once.
const SEEN_MAX: usize = 4096;

/// The processes in `escaped` (pid → the cgroup it was moved to) and those of the same
/// cgroups that descend from them (by the parent pids in `/proc/PID/stat`): a process
/// moved out took none of its children, but those it forked since were born where it
/// went. Each cgroup is read once; at most [`SEEN_MAX`].
fn with_descendants(w: &Writer, escaped: &[(u32, String)]) -> Vec<Moved> {
    use std::collections::{HashMap, HashSet};
    // The same reader of /proc/PID/stat as the collector's (a comm may hold anything).
    let parent_of = |p: u32| -> Option<u32> {
        let stat = procfs::process::Process::new_with_root(w.proc_root.join(p.to_string()))
            .ok()?
            .stat()
            .ok()?;
        u32::try_from(stat.ppid).ok()
    };
    let mut out = Vec::new();
    let mut taken = HashSet::new();
    let mut by_cgroup: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (pid, to) in escaped {
        by_cgroup.entry(to.as_str()).or_default().push(*pid);
    }
    for (cgroup, roots) in by_cgroup {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in w
            .procs(cgroup)
            .unwrap_or_default()
            .into_iter()
            .take(4 * SEEN_MAX)
        {
            if let Some(parent) = parent_of(p) {
                children.entry(parent).or_default().push(p);
            }
        }
        let mut todo: std::collections::VecDeque<u32> = roots.into();
        while let Some(p) = todo.pop_front() {
            if out.len() >= SEEN_MAX {
                return out;
            }
            if untouchable(p) || !taken.insert(p) {
                continue;
            }
            out.push(Moved {
                pid: p,
                from: cgroup.to_owned(),
            });
            todo.extend(children.remove(&p).unwrap_or_default());
        }
    }
    out
}

/// A file cgsentry set that holds something else now.
struct Drift {
    file: String,
    /// What it holds (`None`: the file is gone while its cgroup is not: its controller
    /// was turned off in the parent).
    found: Option<String>,
    want: String,
    /// Who could have changed it: the file's owner, or for a file gone, the owner of
    /// the parent's `cgroup.subtree_control` (see [`Writer::owner`]).
    owner: Option<u32>,
}

/// What changed in `target`'s files since cgsentry set them (see [`Actuator::enforce`]).
fn drifted(w: &Writer, a: &Applied, target: &str) -> Vec<Drift> {
    let mut wanted = guarded(&a.set, target);
    if a.frozen.as_deref() == Some(target) {
        wanted.push(("cgroup.freeze".into(), "1".into()));
    }
    let parent = target.rsplit_once('/').map_or("/", |(p, _)| p);
    let parent = if parent.is_empty() { "/" } else { parent };
    wanted
        .into_iter()
        .filter(|(file, _)| !w.writing(target, file))
        .filter_map(|(file, want)| {
            let found = w.read(target, &file).ok()?;
            let owner = match found {
                Some(_) => w.owner(target, &file),
                None => w.owner(parent, "cgroup.subtree_control"),
            };
            (found.as_deref() != Some(want.as_str())).then_some(Drift {
                file,
                found,
                want,
                owner,
            })
        })
        .collect()
}

/// Records in `set` what `file` of `cgroup` holds now, after cgsentry wrote it (the
/// kernel's own rendering; nothing when it cannot be read).
fn in_force(w: &Writer, set: &mut BTreeMap<String, String>, cgroup: &str, file: &str) {
    if let Ok(Some(v)) = w.read(cgroup, file) {
        set.insert(key(cgroup, file), v);
    }
}

/// Records in `set` the value `text` cgsentry wrote to `file` when it is the one to
/// keep: written, or written and then found changed (someone else's value is there:
/// a drift to undo, not a state to adopt), or for `memory.high` still blocked in the
/// kernel (or queued behind a write that is), since it lands when the reclaim ends.
fn asked(
    set: &mut BTreeMap<String, String>,
    cgroup: &str,
    file: &str,
    text: String,
    r: &Result<(), ActError>,
) {
    let keep = match r {
        Ok(()) | Err(ActError::Verify { .. } | ActError::Timeout { .. }) => true,
        Err(ActError::Busy { why, .. }) => *why != NOT_WRITTEN,
        Err(_) => false,
    };
    if keep {
        set.insert(key(cgroup, file), text);
    }
}

/// `memory.high` for `bytes`, as the kernel keeps it (rounded down to pages).
fn memory_high_text(bytes: u64) -> String {
    in_pages(bytes).to_string()
}

/// `bytes` rounded down to whole pages, as the kernel keeps a memory limit.
fn in_pages(bytes: u64) -> u64 {
    let page = procfs::page_size();
    bytes / page * page
}

/// `cpu.max` at `percent` of one CPU (`None`: "max"), as the kernel shows it.
fn cpu_max_text(percent: Option<f64>) -> String {
    match percent {
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
    }
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

impl Report {
    /// A report of `action` on `cgroup` under `rule`, nothing done yet.
    #[must_use]
    pub fn new(cgroup: &str, rule: &str, action: &str) -> Self {
        Self {
            cgroup: cgroup.to_owned(),
            rule: rule.to_owned(),
            action: action.to_owned(),
            dry_run: false,
            done: String::new(),
            errors: Vec::new(),
        }
    }
}

/// Carries out decisions and releases; owns the journal.
#[derive(Debug)]
pub struct Actuator {
    w: Writer,
    file: crate::durable::DurableFile,
    journal: Journal,
    quarantine_parent: String,
    /// Cgroups never acted on ([`crate::safety`]): the last line of defence, whatever
    /// a decision says.
    never: BTreeMap<String, String>,
}

/// Share of the machine's spare memory a relaxed offender may grow into.
pub const RELAX_SHARE: f64 = 0.5;

/// `cgsentry.slice/quarantine-<name>` for an offender's path: the path with `-` for
/// `/`, its last [`QUARANTINE_NAME_MAX`] bytes when longer (a cgroup name is at most
/// 255 bytes).
#[must_use]
pub fn quarantine_path(parent: &str, cgroup: &str) -> String {
    let name: String = cgroup
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    let mut cut = name.len().saturating_sub(QUARANTINE_NAME_MAX);
    while !name.is_char_boundary(cut) {
        cut += 1;
    }
    let name = &name[cut..];
    format!(
        "/{}/quarantine-{}",
        parent.trim_matches('/'),
        if name.is_empty() { "root" } else { name }
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
        let mut journal = journal;
        journal.entries.retain(|a| match a.malformed() {
            None => true,
            Some(why) => {
                warn!(cgroup = %a.cgroup, rule = %a.rule, "{}: entry ignored: {why}", path.display());
                false
            }
        });
        Self {
            w: Writer::new(cgroup_root),
            file: crate::durable::DurableFile::new(path),
            journal,
            quarantine_parent: quarantine_parent.to_owned(),
            never: crate::safety::Safety::default()
                .never_set()
                .map(|(c, why)| (c.to_owned(), why.to_owned()))
                .collect(),
        }
    }

    /// The never-act set from now on (the root always stays in it).
    pub fn set_safety(&mut self, safety: &crate::safety::Safety) {
        self.never = safety
            .never_set()
            .map(|(c, why)| (c.to_owned(), why.to_owned()))
            .collect();
        self.never
            .entry("/".into())
            .or_insert_with(|| "the root cgroup".into());
    }

    /// Why `cgroup` must not be acted on, if it must not.
    fn refused(&self, cgroup: &str) -> Option<String> {
        let key = if cgroup.is_empty() { "/" } else { cgroup };
        self.never
            .get(key)
            .map(|why| format!("refused: {key} is never acted on ({why})"))
    }

    /// Acts on systemd units through systemd from now on ([`crate::systemd`]).
    pub fn set_systemd(&mut self, systemd: crate::systemd::Systemd) {
        self.w.set_systemd(systemd);
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

    /// The offender a quarantine cgroup stands for, with its id (so that findings about
    /// the quarantine continue that offender's ladder instead of starting a new one,
    /// even once its own cgroup is gone or another one took its path).
    #[must_use]
    pub fn origin_of(&self, cgroup: &str) -> Option<(&str, Option<u64>)> {
        self.journal
            .entries
            .iter()
            .find(|a| a.quarantine.as_deref() == Some(cgroup))
            .map(|a| (a.cgroup.as_str(), a.cgroup_id))
    }

    /// Writes the journal durably, waiting at most [`crate::durable::SAVE_WAIT`].
    fn save(&mut self) -> Result<(), ActError> {
        self.journal.version = JOURNAL_VERSION;
        let bytes = serde_json::to_vec_pretty(&self.journal).map_err(io::Error::other);
        bytes
            .and_then(|b| self.file.save(b))
            .map_err(|source| ActError::Journal {
                path: self.file.path().to_owned(),
                source,
            })
    }

    /// The entry of `cgroup` under `rule` for the cgroup instance `id` (0: any): an
    /// entry belongs to one cgroup, not to a path — a cgroup made since at the same path
    /// (a restarted service) gets an entry of its own, and the old one's containment
    /// (its quarantine, with the offender in it) stays with the old one.
    fn find(&self, cgroup: &str, rule: &str, id: u64) -> Option<usize> {
        self.journal.entries.iter().position(|a| {
            a.cgroup == cgroup
                && a.rule == rule
                && (id == 0 || a.cgroup_id.is_none_or(|recorded| recorded == id))
        })
    }

    /// The entry of `d`, made if there is none: for the cgroup instance `id`.
    fn entry(&mut self, d: &Decision, id: u64) -> usize {
        if let Some(i) = self.find(&d.cgroup, &d.rule, id) {
            self.journal.entries[i].cgroup_id.get_or_insert(id);
            return i;
        }
        // An older entry at this path whose limits went through systemd (the unit was
        // restarted: a new cgroup, the same unit) holds the unit's own values, which
        // the new cgroup now shows as the old caps: they pass to this entry, and the
        // old one no longer restores the unit (it would lift this entry's caps).
        let mut inherited = BTreeMap::new();
        let mut unit = None;
        let mut own_dropins = Vec::new();
        for old in self
            .journal
            .entries
            .iter_mut()
            .filter(|a| a.cgroup == d.cgroup && a.cgroup_id != Some(id) && a.unit.is_some())
        {
            unit = old.unit.take();
            for (k, v) in &old.originals {
                inherited.entry(k.clone()).or_insert_with(|| v.clone());
            }
            own_dropins.append(&mut old.own_dropins);
        }
        self.journal.entries.push(Applied {
            cgroup: d.cgroup.clone(),
            cgroup_id: Some(id),
            rule: d.rule.clone(),
            finding: d.finding,
            steps_taken: 0,
            originals: inherited,
            quarantine: None,
            quarantine_id: None,
            moved: Vec::new(),
            frozen: None,
            kill_due_ms: None,
            kill_deadline: None,
            relaxed: false,
            unit,
            own_dropins,
            set: BTreeMap::new(),
            whole_caps: BTreeMap::new(),
            widen_failed: None,
            last_drift: None,
            seen: Vec::new(),
            delegated_to: None,
            strays: Vec::new(),
            dry_run: d.dry_run,
            updated_ms: now_ms(),
        });
        self.journal.entries.len() - 1
    }

    /// Saves a file's current content as the original to restore, once.
    fn remember(w: &Writer, a: &mut Applied, cgroup: &str, file: &str) -> Result<(), ActError> {
        if cgroup == a.cgroup && a.unit.is_none() {
            a.unit = w.unit_of(cgroup);
        }
        let k = key(cgroup, file);
        if !a.originals.contains_key(&k)
            && let Some(v) = w.read(cgroup, file)?
        {
            a.originals.insert(k.clone(), v);
        }
        // Set through systemd, the limit becomes a runtime drop-in: one missing just
        // before this write is cgsentry's (asked at each write, not only the first: that
        // one may have gone to the file while systemd was not answering).
        if cgroup == a.cgroup
            && let Some(unit) = &a.unit
            && let Some((property, _)) = a
                .originals
                .get(&k)
                .and_then(|v| crate::systemd::property_for(file, v))
            && !a.own_dropins.iter().any(|p| p == property)
        {
            let paths = w.runtime_dropins(unit, property);
            if !paths.is_empty() && !paths.iter().any(|p| p.exists()) {
                a.own_dropins.push(property.to_owned());
            }
        }
        Ok(())
    }

    /// The files a step's limits change, in the order they are written.
    fn limit_files(step: &Step, memory_current: Option<u64>) -> Vec<&'static str> {
        [
            (step.swap_max_mib.is_some(), "memory.swap.max"),
            (step.pids_max.is_some(), "pids.max"),
            (step.cpu_max_percent.is_some(), "cpu.max"),
            (step.cpu_weight.is_some(), "cpu.weight"),
            (
                step.memory_high_percent.is_some() && memory_current.is_some(),
                "memory.high",
            ),
        ]
        .into_iter()
        .filter_map(|(on, f)| on.then_some(f))
        .collect()
    }

    /// Limits of a step on `target` (originals remembered and journaled before); what
    /// is in force afterwards goes into `set` (see [`Applied::set`]).
    /// Returns what it did to `memory.high` (see [`High`]).
    fn limits(
        w: &Writer,
        target: &str,
        step: &Step,
        memory: Option<Footprint>,
        set: &mut BTreeMap<String, String>,
        done: &mut Vec<String>,
        errors: &mut Vec<String>,
    ) -> High {
        // The memory.high to write (last), and the whole cap when it is less.
        let mut whole = None;
        let mut high = None;
        if let (Some(p), Some(mem)) = (step.memory_high_percent, memory) {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a validated positive percentage of a byte count"
            )]
            let cap = (mem.total as f64 * p / 100.0) as u64;
            if cap < MIN_CAP {
                // A cap of nothing would stall every allocation of it for good.
                errors.push(format!(
                    "memory.high of {target} not set: {p} % of the {} bytes the offender \
                     holds is less than {} KiB",
                    mem.total,
                    MIN_CAP >> 10
                ));
            } else if mem.behind == 0 {
                high = Some((cap, format!("memory.high {} MiB", cap >> 20)));
            } else {
                whole = Some(cap);
                let bytes = quarantine_cap(cap, mem.behind);
                let what = format!(
                    "memory.high {} MiB (a cap of {} MiB less {} MiB it left charged to \
                     the cgroup it came from, an eighth of the cap at least)",
                    bytes >> 20,
                    cap >> 20,
                    mem.behind >> 20
                );
                high = Some((bytes, what));
            }
        }
        let mut put = |what: String, file: &str, text: String, r: Result<(), ActError>| {
            asked(set, target, file, text, &r);
            match r {
                Ok(()) => done.push(what),
                Err(e) => errors.push(e.to_string()),
            }
        };
        // No more swap first: a memory.high below the usage then reclaims only what can
        // go without I/O and returns at once, instead of paging the offender out onto a
        // slow disk (in the writer's own context). Then no more tasks.
        if let Some(mib) = step.swap_max_mib {
            put(
                format!("memory.swap.max {mib} MiB"),
                "memory.swap.max",
                (mib << 20).to_string(),
                w.set_swap_max(target, mib),
            );
        }
        if let Some(n) = step.pids_max {
            put(
                format!("pids.max {n}"),
                "pids.max",
                n.to_string(),
                w.set_pids_max(target, Some(n)),
            );
        }
        if let Some(p) = step.cpu_max_percent {
            put(
                format!("cpu.max {p} %"),
                "cpu.max",
                cpu_max_text(Some(p)),
                w.set_cpu_max(target, Some(p)),
            );
        }
        if let Some(weight) = step.cpu_weight {
            put(
                format!("cpu.weight {weight}"),
                "cpu.weight",
                weight.to_string(),
                w.set_cpu_weight(target, weight),
            );
        }
        let Some((bytes, what)) = high else {
            return High::NotWritten;
        };
        put(
            what,
            "memory.high",
            memory_high_text(bytes),
            w.set_memory_high(target, bytes),
        );
        whole.map_or(High::Whole, |whole| High::Less { whole })
    }

    /// Carries out one decision. `memory_current` is the offender's memory now (for
    /// `memory_high_percent`). Never fails as a whole: what went wrong is in the report.
    ///
    /// The intent is journaled before anything is written: the originals of the files
    /// the step changes, the cgroup it freezes, the quarantine it creates, the kill it
    /// starts. A journal that cannot be written is reported and the step carried out
    /// all the same (containing the offender matters more than the record).
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
        if let Some(why) = self.refused(&d.cgroup) {
            return report(Vec::new(), vec![why]);
        }
        if d.dry_run {
            return report(
                vec![format!("would {:?}: {:?}", d.action, d.params)],
                errors,
            );
        }
        // Which cgroup: the decision's (0: the one at the path now). One with an entry
        // is acted on through it even when its own directory is gone (its processes
        // are in quarantine, where systemd's empty scope no longer is); a new one only
        // while it exists.
        let id = match (d.cgroup_id, self.w.id_of(&d.cgroup)) {
            (0, Some(now)) => now,
            (0, None) => 0,
            (id, _) => id,
        };
        let known = id != 0 && self.find(&d.cgroup, &d.rule, id).is_some();
        if !known && (id == 0 || self.w.id_of(&d.cgroup) != Some(id)) {
            let path = self.w.dir(&d.cgroup);
            return report(Vec::new(), vec![ActError::Gone { path }.to_string()]);
        }
        let i = self.entry(d, id);
        let intent = self.intend(i, d, memory_current, &mut errors);
        if let Err(e) = self.save() {
            errors.push(format!("{e} (carried out all the same)"));
        }
        let writer = self.w.clone();
        let before = self.journal.entries[i].set.clone();
        carry_out(
            &writer,
            &mut self.journal.entries[i],
            intent,
            d,
            memory_current,
            &mut done,
            &mut errors,
        );
        self.claim(i, &before);
        if let Err(e) = self.save() {
            errors.push(e.to_string());
        }
        report(done, errors)
    }

    /// Entry `i` has just written the files whose values changed in its `set` since
    /// `before`: it keeps them from now on, and another entry on the same cgroup
    /// (another rule's ladder) no longer keeps its older value for them (the latest
    /// write is the one in force; two entries keeping two values would undo each
    /// other every tick).
    fn claim(&mut self, i: usize, before: &BTreeMap<String, String>) {
        let changed: Vec<String> = self.journal.entries[i]
            .set
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        for (j, other) in self.journal.entries.iter_mut().enumerate() {
            if j != i {
                for k in &changed {
                    other.set.remove(k);
                }
            }
        }
    }

    /// After `gone`'s release restored what its cgroups held before it, the other
    /// entries on them (another rule's ladder) get their caps and freeze back at once:
    /// the release of one rule does not lift another's.
    fn reassert(&self, gone: &Applied, report: &mut Report) {
        use std::fmt::Write as _;
        let cgroups = [Some(gone.cgroup.as_str()), gone.quarantine.as_deref()];
        for other in self.journal.entries.iter().filter(|o| !o.dry_run) {
            for c in cgroups.into_iter().flatten() {
                if other.target() != c || !other.still_ours(&self.w, c) {
                    continue;
                }
                for (file, want) in guarded(&other.set, c) {
                    match ensure(&self.w, c, &file, &want) {
                        Ok(true) => {
                            let _ =
                                write!(report.done, ", kept rule {}'s {file} {want}", other.rule);
                        }
                        Ok(false) => {}
                        Err(e) => report.errors.push(e.to_string()),
                    }
                }
                if other.frozen.as_deref() == Some(c) && !self.w.is_frozen(c) {
                    match self.w.set_frozen(c, true) {
                        Ok(_) => {
                            let _ = write!(report.done, ", kept rule {}'s freeze", other.rule);
                        }
                        Err(e) => report.errors.push(e.to_string()),
                    }
                }
            }
        }
    }

    /// Records in entry `i` what step `d` is about to do (the journal is saved next,
    /// before anything is written) and returns it.
    fn intend(
        &mut self,
        i: usize,
        d: &Decision,
        memory_current: Option<u64>,
        errors: &mut Vec<String>,
    ) -> Intent {
        let taken: Vec<String> = self
            .journal
            .entries
            .iter()
            .filter_map(|a| a.quarantine.clone())
            .collect();
        let parent = self.quarantine_parent.clone();
        let writer = &self.w;
        let entry = &mut self.journal.entries[i];
        entry.steps_taken = entry.steps_taken.max(d.step + 1);
        entry.relaxed = false; // a step taken again (a relapse) tightens again
        entry.updated_ms = now_ms();
        match d.action {
            Action::Notify => Intent::None,
            Action::Throttle => {
                let target = entry.target().to_owned();
                for f in Self::limit_files(&d.params, memory_current) {
                    if let Err(e) = Self::remember(writer, entry, &target, f) {
                        errors.push(e.to_string());
                    }
                }
                Intent::Throttle(target)
            }
            Action::Quarantine => {
                // A name no entry holds and no cgroup has yet (an orphan or someone
                // else's directory is never merged into). A unit of systemd's goes
                // into a scope of its own in the quarantine slice (see `quarantine`).
                let q = entry.quarantine.clone().unwrap_or_else(|| {
                    let free = |cgroup: &str, suffix| {
                        free_quarantine_path(&parent, cgroup, suffix, |q| {
                            taken.iter().any(|t| t == q) || writer.dir(q).exists()
                        })
                    };
                    Some(free(&unit_safe(&d.cgroup), ".scope"))
                        .filter(|q| is_scope_quarantine(q))
                        .filter(|_| writer.systemd_here())
                        .unwrap_or_else(|| free(&d.cgroup, ""))
                });
                entry.quarantine = Some(q.clone());
                Intent::Quarantine(q)
            }
            Action::Freeze => {
                let target = entry.target().to_owned();
                entry.frozen = Some(target.clone());
                Intent::Freeze(target)
            }
            Action::Kill => {
                let grace = d.params.grace_sec.unwrap_or(10);
                entry.kill_due_ms = Some(now_ms() + u128::from(grace) * 1000);
                entry.kill_deadline = Some(Instant::now() + Duration::from_secs(grace));
                Intent::Kill(entry.target().to_owned(), grace)
            }
        }
    }

    /// Escalates kills whose grace period ended (by the monotonic clock), to the same
    /// cgroup only: one made since at the same path is left alone.
    pub fn tick(&mut self) -> Vec<Report> {
        let now = Instant::now();
        let mut out = Vec::new();
        for a in &mut self.journal.entries {
            if a.kill_deadline.is_some_and(|due| due <= now) {
                a.kill_deadline = None;
                a.kill_due_ms = None;
                let target = a.target().to_owned();
                let (done, errors) = if !a.still_ours(&self.w, &target) {
                    (
                        format!(
                            "grace over: {target} is gone or was replaced since; nothing killed"
                        ),
                        Vec::new(),
                    )
                } else if let Some(why) = self.never.get(&target) {
                    (
                        "grace over: nothing killed".to_owned(),
                        vec![format!("refused: {target} is never acted on ({why})")],
                    )
                } else {
                    let done = format!("grace over: killed what was left in {target}");
                    match self.w.kill_all(&target) {
                        Ok(Some(how)) => (format!("{done} {how}"), Vec::new()),
                        Ok(None) => (done, Vec::new()),
                        Err(e) => (done, vec![e.to_string()]),
                    }
                };
                out.push(Report {
                    cgroup: a.cgroup.clone(),
                    rule: a.rule.clone(),
                    action: "kill".into(),
                    dry_run: false,
                    done,
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

    /// Undoes everything a rule did to a cgroup (the instance `r.cgroup_id`; 0: the
    /// entry at that path): thaw, move processes back, restore the limits it replaced,
    /// remove the quarantine cgroup.
    pub fn release(&mut self, r: &Release) -> Option<Report> {
        let i = self.find(&r.cgroup, &r.rule, r.cgroup_id)?;
        let a = self.journal.entries.remove(i);
        let mut report = undo(&self.w, &a);
        self.reassert(&a, &mut report);
        if let Err(e) = self.save() {
            warn!("{e}");
        }
        Some(report)
    }

    /// Undoes every entry of the journal (`cgsentry release --all`, and before an
    /// uninstall): nothing of cgsentry's stays on the machine.
    pub fn release_all(&mut self) -> Vec<Report> {
        let entries = std::mem::take(&mut self.journal.entries);
        let reports = entries.iter().map(|a| undo(&self.w, a)).collect();
        if let Err(e) = self.save() {
            warn!("{e}");
        }
        reports
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
        let i = self.find(&r.cgroup, &r.rule, r.cgroup_id)?;
        let before = self.journal.entries[i].set.clone();
        // Another rule's freeze of the same cgroup stays.
        let frozen_by_another = self.journal.entries.iter().enumerate().any(|(j, o)| {
            j != i && o.frozen.is_some() && o.frozen == self.journal.entries[i].frozen
        });
        let a = &mut self.journal.entries[i];
        let target = a.target().to_owned();
        let capped = a.originals.contains_key(&key(&target, "memory.high"));
        if a.relaxed || (a.frozen.is_none() && !capped) || !a.still_ours(&self.w, &target) {
            return self.release(r);
        }
        let (mut done, mut errors) = (Vec::new(), Vec::new());
        let memory_current = self.w.memory_current(&target);
        if let Some(f) = a.frozen.take().filter(|_| !frozen_by_another) {
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
            let r = self.w.set_memory_high(&target, bytes);
            // The widened cap is the one to keep from now on (not the old one put back).
            asked(
                &mut a.set,
                &target,
                "memory.high",
                memory_high_text(bytes),
                &r,
            );
            match r {
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
        self.claim(i, &before);
        if let Err(e) = self.save() {
            warn!("{e}");
        }
        Some(report)
    }

    /// A quarantine's memory caps raised back towards the offender's whole caps as it
    /// frees what it left charged to its origin (each tick; see
    /// [`Applied::whole_caps`]). Without it, an offender whose old processes exit (a
    /// build's compilers, a pool's jobs) would be held for the rest of its quarantine
    /// to the room it had when it was moved. Raised once the room grew by a sixteenth
    /// of the cap (at most 16 reports per cap); never lowered. Only where the figure is
    /// exact: the origin is the same cgroup still (removed, its pages went to its
    /// parent) and every process came from it (one a user moved elsewhere holds pages
    /// charged where she put it, which no counter tells apart); not once relaxed (the
    /// relax sets its own cap), nor in a dry run.
    pub fn widen_as_freed(&mut self) -> Vec<Report> {
        let w = self.w.clone();
        let mut out = Vec::new();
        let mut changed = false;
        for a in &mut self.journal.entries {
            let Some(q) = a.quarantine.clone() else {
                continue;
            };
            let from_origin = a.moved.iter().all(|m| m.from == a.cgroup);
            if a.whole_caps.is_empty()
                || a.dry_run
                || a.relaxed
                || a.kill_deadline.is_some()
                || !from_origin
                || !a.still_ours(&w, &a.cgroup)
                || !a.still_ours(&w, &q)
                // Unreadable (going away, its memory controller turned off) is not
                // freed: its pages are still charged, to it or to its parent.
                || w.memory_current(&a.cgroup).is_none()
            {
                continue;
            }
            let behind = left_behind(&w, &a.cgroup, &[]);
            let mut done = Vec::new();
            let mut errors = Vec::new();
            for (k, whole) in a.whole_caps.clone() {
                let Some((cgroup, file)) = k.rsplit_once('\t') else {
                    continue;
                };
                let have = a.set.get(&k).and_then(|v| v.parse::<u64>().ok());
                let want = in_pages(lowered(file, whole, behind).unwrap_or(whole));
                if cgroup != q || have.is_none_or(|h| want < h.saturating_add(whole / 16)) {
                    continue;
                }
                let text = memory_high_text(want);
                let result = w.restore(&q, file, &text);
                // A write still blocked in the kernel lands later: the guard keeps
                // what it will write, as for any other (see `asked`).
                asked(&mut a.set, &q, file, text, &result);
                match result {
                    Ok(()) => done.push(format!(
                        "{file} {} MiB of the offender's {} MiB",
                        want >> 20,
                        whole >> 20
                    )),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            // The same failure is reported once, not every tick.
            let failed = (!errors.is_empty()).then(|| errors.join("; "));
            if failed.is_some() && failed == a.widen_failed {
                errors.clear();
            }
            a.widen_failed = failed;
            if done.is_empty() && errors.is_empty() {
                continue;
            }
            changed = true;
            out.push(Report {
                cgroup: a.cgroup.clone(),
                rule: a.rule.clone(),
                action: "widen".into(),
                dry_run: false,
                done: format!(
                    "it freed what it left charged to {}, {} MiB left: raised {q}'s {}",
                    a.cgroup,
                    behind.0 >> 20,
                    done.join(", ")
                ),
                errors,
            });
        }
        if changed && let Err(e) = self.save() {
            warn!("{e}");
        }
        out
    }

    /// Containment undone behind cgsentry's back, put back (each tick). For every entry
    /// in force, the files cgsentry set on the cgroup the offender is in now are
    /// compared with what they held after its writes ([`Applied::set`]), and a cgroup it
    /// froze with `cgroup.freeze`. What changed is written back and reported with who
    /// could have changed it:
    /// - a file a user owns: the cgroup is delegated to her (a user manager's scopes, a
    ///   `Delegate=` service's cgroups), and she can lift a cap in place as often as it
    ///   is put back, and move the processes among her own cgroups. The offender goes
    ///   to quarantine, root's cgroup in the quarantine slice, which she can neither
    ///   write nor move processes out of, with the caps it had;
    /// - root's file: systemd (limits written to files, not set as properties: systemd
    ///   was not answering then) or root by hand. Put back, and said so: `cgsentry
    ///   release` is how a containment ends.
    ///
    /// A `memory.high` write still blocked in the kernel is not a change.
    pub fn enforce(&mut self) -> Vec<Report> {
        let mut out = Vec::new();
        // A cgroup being killed (thawed for its SIGTERM) is left to the kill.
        let killing: Vec<String> = self
            .journal
            .entries
            .iter()
            .filter(|a| a.kill_deadline.is_some())
            .map(|a| a.target().to_owned())
            .collect();
        for i in 0..self.journal.entries.len() {
            let a = &self.journal.entries[i];
            let target = a.target().to_owned();
            let ours = a.still_ours(&self.w, &target);
            // A cgroup gone or replaced since the last tick may have been emptied by
            // its user (and made anew at the same path).
            if a.dry_run
                || killing.contains(&target)
                || self.never.contains_key(&target)
                || (!ours && a.seen.is_empty())
            {
                continue;
            }
            let drift = if ours {
                drifted(&self.w, a, &target)
            } else {
                Vec::new()
            };
            let escaped = self.escaped(i, &target, ours);
            if drift.is_empty() && escaped.is_empty() {
                self.journal.entries[i].last_drift = None;
                continue;
            }
            let (mut done, mut errors) = (Vec::new(), Vec::new());
            for (pid, to) in &escaped {
                done.push(format!("process {pid} was moved out of {target} to {to}"));
            }
            let mut delegated = escaped.first().and(self.journal.entries[i].delegated_to);
            for d in &drift {
                let user = d.owner.filter(|u| *u != 0);
                let found = d
                    .found
                    .as_deref()
                    .unwrap_or("nothing (its controller was turned off)");
                let by = user.map_or_else(|| "root or systemd".to_owned(), |u| format!("uid {u}"));
                let what = format!("{} was changed to {found} (by {by})", d.file);
                if d.file == "cgroup.freeze" && user.is_some() {
                    // Her manager thaws a frozen unit to stop it: frozen again, its
                    // processes could not act on the SIGTERM that follows. The caps
                    // hold; the ladder goes on from there.
                    done.push(format!(
                        "{what}; left thawed: a user manager thaws a unit it stops"
                    ));
                    self.journal.entries[i].frozen = None;
                    continue;
                }
                delegated = delegated.or(user);
                let put = if d.file == "cgroup.freeze" {
                    self.w.set_frozen(&target, true).map(|_| ())
                } else {
                    self.w.restore(&target, &d.file, &d.want)
                };
                done.push(match put {
                    Ok(()) => format!("{what}; put back to {}", d.want),
                    Err(ActError::Timeout { .. }) => format!("{what}; putting back {}", d.want),
                    // Its stop must not wait for processes cgsentry holds.
                    Err(ActError::Stopping { .. }) => {
                        format!("{what}; left so: systemd is stopping it")
                    }
                    Err(e) => {
                        errors.push(e.to_string());
                        format!("{what}; not put back")
                    }
                });
            }
            if let Some(uid) = delegated
                && self.journal.entries[i].quarantine.is_none()
            {
                done.push(format!(
                    "{target} is delegated to uid {uid}, who can undo its containment in place"
                ));
                let r = self.escalate(i, uid, &escaped);
                done.push(r.done);
                errors.extend(r.errors);
            }
            let a = &mut self.journal.entries[i];
            let text = format!("{}; {}", done.join(", "), errors.join("; "));
            if a.last_drift.as_deref() == Some(text.as_str()) {
                continue; // said last tick, and nothing else has changed
            }
            a.last_drift = Some(text);
            out.push(Report {
                cgroup: a.cgroup.clone(),
                rule: a.rule.clone(),
                action: "enforce".into(),
                dry_run: false,
                done: done.join(", "),
                errors,
            });
        }
        if !out.is_empty()
            && let Err(e) = self.save()
        {
            warn!("{e}");
        }
        out
    }

    /// The processes of entry `i`'s offender, contained in place in a cgroup delegated
    /// to a user, that she moved out since the last tick (out of its subtree, or into
    /// a cgroup made anew at its path) to another of her cgroups (one whose
    /// `cgroup.procs` is hers: a move by root is root's business), with where they are
    /// now.
    fn escaped(&mut self, i: usize, target: &str, ours: bool) -> Vec<(u32, String)> {
        let w = &self.w;
        let a = &mut self.journal.entries[i];
        let uid = if ours {
            w.owner(target, "cgroup.procs")
        } else {
            a.delegated_to
        };
        let Some(uid) = uid.filter(|u| *u != 0 && a.quarantine.is_none()) else {
            a.seen.clear();
            a.delegated_to = None;
            return Vec::new();
        };
        a.delegated_to = Some(uid);
        let mut now = if ours {
            w.procs_below(target).unwrap_or_default()
        } else {
            Vec::new()
        };
        let here: std::collections::HashSet<u32> = now.iter().copied().collect();
        let below = format!("{}/", target.trim_end_matches('/'));
        let out = a
            .seen
            .iter()
            .filter(|p| !here.contains(p) && !untouchable(**p))
            .filter_map(|&p| {
                let to = w.cgroup_of(p)?;
                let inside = ours && (to == target || to.starts_with(&below));
                (!inside && w.owner(&to, "cgroup.procs") == Some(uid)).then_some((p, to))
            })
            .collect();
        now.truncate(SEEN_MAX);
        a.seen = now;
        out
    }

    /// Quarantines entry `index`'s offender, whose containment in place a user can
    /// undo, with the caps it had there (and frozen if it was), and the processes she
    /// moved out of it (`escaped`, with their descendants in the cgroup they went to).
    fn escalate(&mut self, index: usize, uid: u32, escaped: &[(u32, String)]) -> Report {
        let writer = self.w.clone();
        let entry = &mut self.journal.entries[index];
        entry.strays = with_descendants(&writer, escaped);
        let origin = entry.cgroup.clone();
        // What its caps there are to count, read before anything moves: a user's
        // manager removes her emptied cgroup at once, and its charges go with it.
        let behind = left_behind(&writer, &origin, &stray_pids(&writer, entry));
        let decision = Decision {
            cgroup_id: entry.cgroup_id.unwrap_or(0),
            cgroup: origin.clone(),
            finding: entry.finding,
            rule: entry.rule.clone(),
            step: entry.steps_taken.saturating_sub(1),
            action: Action::Quarantine,
            params: Step::bare(Action::Quarantine),
            dry_run: false,
            protected_by: Vec::new(),
            refused: None,
            reason: format!("uid {uid} undid cgsentry's containment of {origin}"),
        };
        let mut report = self.apply(&decision, None);
        let entry = &mut self.journal.entries[index];
        entry.strays.clear();
        if let Some(q) = entry
            .quarantine
            .clone()
            .filter(|q| entry.still_ours(&writer, q))
        {
            carry_over(&writer, entry, &q, behind, &mut report);
            if let Err(e) = self.save() {
                report.errors.push(e.to_string());
            }
        }
        report
    }

    /// Cgroups (the offenders' ids) of relaxed entries whose memory is at 90 % of the
    /// `memory.high` they were left under or more: their work still runs against the cap.
    #[must_use]
    pub fn pressing(&self) -> Vec<u64> {
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
            .filter_map(|a| a.cgroup_id.or_else(|| self.w.id_of(&a.cgroup)))
            .collect()
    }

    /// At start: what a previous agent journaled, checked against the cgroups as they
    /// are now. An entry whose cgroup and quarantine are both gone is dropped; one
    /// whose cgroup was replaced by another at the same path (its id differs) and that
    /// holds no quarantine is dropped (nothing of it is ever applied to the new
    /// cgroup); the rest — a quarantine still holding its offender included — are
    /// returned for the caller to re-adopt (continue their ladders, under the recorded
    /// id) or release. A SIGKILL still due is due by the monotonic clock from now,
    /// within its grace.
    pub fn reconcile(&mut self) -> (Vec<Applied>, Vec<Report>) {
        let w = self.w.clone();
        let before = self.journal.entries.len();
        let mut reports = Vec::new();
        let now = now_ms();
        let mut keep = Vec::new();
        for mut a in std::mem::take(&mut self.journal.entries) {
            let cgroup_there = w.id_of(&a.cgroup);
            let quarantine_there = a.quarantine.as_ref().and_then(|q| w.id_of(q));
            let replaced =
                matches!((cgroup_there, a.cgroup_id), (Some(now), Some(then)) if now != then);
            let quarantined = a.quarantine.as_deref().is_some_and(|q| a.still_ours(&w, q));
            // Replaced, with nothing of ours left but values to restore into the new
            // cgroup (which must not get them): dropped. A quarantine still holding the
            // old offender stays adopted under the old one's id.
            if replaced && !quarantined {
                let mut r = undo(&w, &a);
                r.action = "reconcile".into();
                r.done = format!(
                    "{} was replaced by a new cgroup since it was acted on: nothing of this entry \
                     is applied to the new one; {}",
                    a.cgroup, r.done
                );
                reports.push(r);
                continue;
            }
            if cgroup_there.is_none() && quarantine_there.is_none() {
                // Gone while no agent ran. A unit's limits were its properties, which
                // outlive its cgroup (its next start would begin capped): given back.
                if a.unit.is_some() {
                    let mut r = undo(&w, &a);
                    r.action = "reconcile".into();
                    r.done = format!("{} is gone: {}", a.cgroup, r.done);
                    reports.push(r);
                }
                continue;
            }
            // Journals from before ids were kept: the path is all there is.
            if a.cgroup_id.is_none() {
                a.cgroup_id = cgroup_there;
            }
            if a.quarantine_id.is_none() {
                a.quarantine_id = quarantine_there;
            }
            if let Some(due) = a.kill_due_ms {
                let left = Duration::from_millis(
                    u64::try_from(due.saturating_sub(now)).unwrap_or(u64::MAX),
                );
                a.kill_deadline = Some(Instant::now() + left.min(MAX_GRACE_ON_RESTART));
            }
            keep.push(a);
        }
        self.journal.entries = keep;
        if (self.journal.entries.len() != before || !reports.is_empty())
            && let Err(e) = self.save()
        {
            warn!("{e}");
        }
        (self.journal.entries.clone(), reports)
    }

    /// At start: what looks like cgsentry's work that no journal entry explains (the
    /// journal was lost, or another agent's): frozen cgroups (reported, never thawed:
    /// something else — systemd, a container runtime — may have frozen them) and
    /// `quarantine-*` cgroups under the quarantine parent (thawed, their processes
    /// moved back to the cgroup they were named after when it still exists, removed
    /// when empty). `cgroups` is every cgroup of the tree.
    #[must_use]
    pub fn orphans(&self, cgroups: &[&str]) -> Vec<Report> {
        let explained = |c: &str| {
            self.journal.entries.iter().any(|a| {
                a.cgroup == c
                    || a.quarantine.as_deref() == Some(c)
                    || a.frozen.as_deref() == Some(c)
            })
        };
        let parent = format!("/{}/", self.quarantine_parent.trim_matches('/'));
        let mut out = Vec::new();
        for &c in cgroups {
            if explained(c) {
                continue;
            }
            let in_quarantine = c
                .strip_prefix(&parent)
                .is_some_and(|name| name.starts_with("quarantine-") && !name.contains('/'));
            if in_quarantine {
                out.push(self.release_orphan(c, cgroups));
            } else if self.w.is_frozen(c) {
                out.push(Report {
                    cgroup: c.to_owned(),
                    rule: String::new(),
                    action: "orphan".into(),
                    dry_run: false,
                    done: format!(
                        "{c} is frozen and no journal entry says cgsentry froze it: left as it is \
                         (`echo 0 > {}/cgroup.freeze` thaws it)",
                        self.w.dir(c).display()
                    ),
                    errors: Vec::new(),
                });
            }
        }
        out
    }

    /// Thaws an unexplained quarantine cgroup, moves its processes back to the cgroup
    /// its name stands for (when one of `cgroups` has that quarantine name) and removes
    /// it once empty.
    fn release_orphan(&self, q: &str, cgroups: &[&str]) -> Report {
        let mut done = Vec::new();
        let mut errors = Vec::new();
        // A scope's name is the cgroup's with `.scope` after it.
        let unsuffixed = q
            .strip_suffix(".scope")
            .filter(|_| is_scope_quarantine(q))
            .unwrap_or(q);
        let named_after = |c: &str| {
            let base = quarantine_path(&self.quarantine_parent, c);
            let q = unsuffixed;
            q == base
                || q.strip_prefix(&base)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        let origin = cgroups
            .iter()
            .filter(|c| !c.starts_with(q) && **c != "/")
            .find(|c| named_after(c))
            .map(|c| (*c).to_owned());
        if self.w.is_frozen(q) {
            match self.w.set_frozen(q, false) {
                Ok(_) => done.push(format!("thawed {q}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if let Some(origin) = &origin {
            let n = move_back(&self.w, q, |_| origin.clone(), &mut errors);
            done.push(format!("moved {n} processes back to {origin}"));
            match end_quarantine(&self.w, q) {
                Ok(Some(ended)) => done.push(ended),
                Ok(None) => errors.push(format!("{q} still has processes; left in place")),
                Err(e) => errors.push(e.to_string()),
            }
        } else {
            done.push(format!(
                "the cgroup {q} was made for no longer exists: its processes stay in {q}, thawed"
            ));
        }
        Report {
            cgroup: q.to_owned(),
            rule: String::new(),
            action: "orphan".into(),
            dry_run: false,
            done: format!(
                "quarantine cgroup that no journal entry explains: {}",
                done.join(", ")
            ),
            errors,
        }
    }
}

/// Does what [`Actuator::intend`] recorded.
fn carry_out(
    writer: &Writer,
    entry: &mut Applied,
    intent: Intent,
    d: &Decision,
    memory_current: Option<u64>,
    done: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    match intent {
        Intent::None => {}
        Intent::Throttle(target) => {
            let memory = footprint(writer, entry, &target, memory_current);
            let high = Actuator::limits(
                writer,
                &target,
                &d.params,
                memory,
                &mut entry.set,
                done,
                errors,
            );
            entry.after_limits(&target, &d.params, high);
        }
        Intent::Quarantine(q) => {
            quarantine(writer, entry, &q, &d.params, memory_current, done, errors);
        }
        Intent::Freeze(target) => match writer.set_frozen(&target, true) {
            Ok(settled) => done.push(if settled {
                format!("froze {target}")
            } else {
                format!("freezing {target} (not settled within 1 s)")
            }),
            Err(e) => {
                // Not frozen (a unit systemd is stopping, a cgroup gone): nothing for
                // a release to thaw, nor for `enforce` to freeze again behind
                // systemd's back.
                entry.frozen = None;
                errors.push(e.to_string());
            }
        },
        Intent::Kill(target, grace) => {
            if entry.frozen.take().is_some() {
                // A frozen task cannot act on SIGTERM: thaw first.
                if let Err(e) = writer.set_frozen(&target, false) {
                    errors.push(e.to_string());
                }
            }
            match writer.terminate_all(&target) {
                Ok(what) => done.push(format!("{what}; SIGKILL in {grace} s")),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
}

/// What a step will do, decided (and journaled) before it is done.
enum Intent {
    None,
    Throttle(String),
    Quarantine(String),
    Freeze(String),
    Kill(String, u64),
}

/// A SIGKILL a previous agent left due is due within this long of a restart at most.
const MAX_GRACE_ON_RESTART: Duration = Duration::from_mins(10);

/// The longest quarantine name kept from the offender's path (a cgroup name is at
/// most 255 bytes; room is left for a suffix).
const QUARANTINE_NAME_MAX: usize = 200;

/// [`quarantine_path`], or with `-2`, `-3`… when `taken` says another offender (one
/// whose path maps to the same name: `/a-b` and `/a/b`) has it; `suffix` last.
fn free_quarantine_path(
    parent: &str,
    cgroup: &str,
    suffix: &str,
    taken: impl Fn(&str) -> bool,
) -> String {
    let base = quarantine_path(parent, cgroup);
    std::iter::once(format!("{base}{suffix}"))
        .chain((2..=4096).map(|n| format!("{base}-{n}{suffix}")))
        .find(|q| !taken(q))
        .unwrap_or_else(|| format!("{base}{suffix}"))
}

/// Creates the quarantine cgroup `q` for the entry's offender, inside the offender's
/// own limits (the smallest `memory.max`, `memory.high`, `memory.swap.max`, `pids.max`
/// and `cpu.max` of its cgroup and ancestors: a process moved out of a service or a
/// pod must not escape the limits it had there), with the step's limits on top, and
/// moves the offender's processes there.
fn quarantine(
    w: &Writer,
    entry: &mut Applied,
    q: &str,
    step: &Step,
    memory_current: Option<u64>,
    done: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    // Before anything moves: its processes gone, a user's manager removes her
    // emptied scope at once, and what it had charged goes with it.
    let memory = footprint(w, entry, q, memory_current);
    let mut fresh = entry.quarantine_id.is_none();
    let scope = is_scope_quarantine(q);
    // A scope systemd ended once it was empty (its processes gone) is started anew
    // for a relapse: made by hand, that path would be no unit's.
    if scope && !fresh && w.id_of(q).is_none() {
        entry.quarantine_id = None;
        fresh = true;
    }
    // Under systemd a quarantine is a scope of its own, which systemd knows
    // (`systemctl status` shows it, its limits are properties) and stops with the unit
    // the offender came from. Processes moved into a plain cgroup would escape that
    // unit's `systemctl stop`; and systemd sets cgsentry.slice's controllers by the
    // units it knows of there, so at its next reload a plain cgroup's limits vanish
    // (scenario debian-user-quarantine).
    let mut started = fresh && scope && w.systemd_here();
    let mut q = q.to_owned();
    if started {
        let part_of = w.owning_unit(&entry.cgroup);
        if let Err(e) = quarantine_scope(w, entry, &q, part_of.as_deref(), done) {
            errors.push(e.to_string());
            // systemd may have started it all the same (an answer past the deadline,
            // a cgroup slow to appear): what is there is adopted, not left unknown.
            if let Some(id) = w.id_of(&q) {
                entry.quarantine_id = Some(id);
            } else {
                // Nothing made (systemd slow, paused or refusing): containment first,
                // in a plain cgroup beside (systemd may drop its limits at a reload;
                // said so). debian-quarantine once had its leak reach the OOM killer
                // here, with a one-step ladder and no quarantine at all.
                let parent = q.rsplit_once('/').map_or("/", |(p, _)| p).to_owned();
                let scope_files = format!("{q}\t");
                entry.whole_caps.retain(|k, _| !k.starts_with(&scope_files));
                q = free_quarantine_path(&parent, &entry.cgroup, "", |p| w.dir(p).exists());
                entry.quarantine = Some(q.clone());
                started = false;
                errors.push(format!(
                    "quarantined in the plain cgroup {q} instead: systemd may drop its \
                     limits at its next reload"
                ));
            }
        }
    }
    let q = q.as_str();
    if !started {
        if let Err(e) = w.create(q) {
            errors.push(e.to_string());
            if fresh {
                // Nothing was made: later steps act on the offender where it is.
                entry.quarantine = None;
            }
            return;
        }
        // The origin's limits go into a new, still empty quarantine only: there they
        // cost the kernel nothing (a limit below the usage of a populated cgroup makes
        // the write reclaim, or kill, in the writer's context).
        if fresh {
            entry.quarantine_id = w.id_of(q);
            let mut kept = Vec::new();
            let behind = left_behind(w, &entry.cgroup, &stray_pids(w, entry));
            for (file, whole) in origin_limits(w, &entry.cgroup) {
                let value = entry.lowered_for(q, file, &whole, behind);
                match w.write_verified(q, file, &value, &value) {
                    Ok(()) => {
                        kept.push(format!("{file} {value}"));
                        entry.set.insert(key(q, file), value);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if !kept.is_empty() {
                done.push(format!(
                    "kept the offender's limits: {}",
                    kept_text(&kept, behind, &entry.cgroup)
                ));
            }
        }
    }
    let high = Actuator::limits(w, q, step, memory, &mut entry.set, done, errors);
    entry.after_limits(q, step, high);
    let (mut moved, mut vanished) = move_all(w, &entry.cgroup, q, &mut entry.moved, errors);
    // The offender's processes found elsewhere (a user moved them out of its cgroup).
    let began: std::collections::HashSet<u32> = entry.moved.iter().map(|m| m.pid).collect();
    for stray in std::mem::take(&mut entry.strays) {
        // Not the one the scope began with, and still where it was found (a pid that
        // exited since may be anyone's now).
        if began.contains(&stray.pid) || !stray_still_there(w, &stray) {
            continue;
        }
        match w.move_pid(q, stray.pid) {
            Ok(true) => {
                moved += 1;
                entry.moved.push(stray);
            }
            Ok(false) => vanished += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    // A started scope has said which process it began with: the rest, if any.
    if !started || moved + vanished > 0 {
        let more = if started { " more" } else { "" };
        done.push(format!(
            "moved {moved}{more} processes to {q} ({vanished} exited mid-move)"
        ));
    }
}

/// Whether quarantine `q` is (or is to be) a systemd scope: it is `/<slice>/<name>`
/// with a top-level slice (`/cgsentry.slice`, which systemd makes on demand) and a
/// valid unit name ending in `.scope` (an offender that is a unit has a path of unit
/// names; anything else, bytes a cgroup name may have and a unit's may not, stays a
/// plain cgroup).
fn is_scope_quarantine(q: &str) -> bool {
    let unit_name = |n: &str| !n.is_empty() && n.len() < 256 && n.chars().all(unit_name_char);
    let Some((slice, name)) = q.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    // A dash nests a slice (`a-b.slice` is /a.slice/a-b.slice; `-.slice` is the
    // root): only a top-level slice's path is its name.
    !slice.contains('-')
        && slice.strip_suffix(".slice").is_some()
        && unit_name(slice)
        && name.strip_suffix(".scope").is_some()
        && !name.contains('/')
        && unit_name(name)
}

/// `cgroup` with `_` for each character a scope's name may not have (a user names her
/// cgroups as she likes): the path its scope quarantine is named after.
fn unit_safe(cgroup: &str) -> String {
    cgroup
        .chars()
        .map(|c| {
            if c == '/' || unit_name_char(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A character a transient scope's name may have: a unit name's (systemd escapes any
/// other) but `@`, which makes a template instance's name, and systemd starts no
/// transient unit of that kind (`getty@tty1.service`'s quarantine is
/// `quarantine-system.slice-system-getty.slice-getty_tty1.service.scope`).
fn unit_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ":-_.\\".contains(c)
}

/// Ends quarantine `q` once its processes are out: a systemd scope through systemd
/// (removed behind its back, a scope stays an active unit with no cgroup), a plain
/// cgroup by removing it. `Ok(None)`: processes are still in it, left in place;
/// otherwise what was done.
fn end_quarantine(w: &Writer, q: &str) -> Result<Option<String>, ActError> {
    let unit = Some(q)
        .filter(|q| is_scope_quarantine(q))
        .and_then(|q| w.unit_of(q)); // its own unit: named as its cgroup is
    match unit {
        Some(unit) => Ok(w.stop_scope(q, &unit)?.then(|| format!("stopped {unit}"))),
        None => Ok(w.remove(q)?.then(|| format!("removed {q}"))),
    }
}

/// Starts quarantine `q` as a scope unit (part of `part_of`, the unit the offender is
/// in, when there is one), with the offender's limits
/// (see [`origin_limits`]) set before anything enters, and one of its processes in it
/// (systemd refuses a whole start when one PID of its list has exited meanwhile: a
/// forking offender would never be quarantined; the others are moved after, as in a
/// plain quarantine).
fn quarantine_scope(
    w: &Writer,
    entry: &mut Applied,
    q: &str,
    part_of: Option<&str>,
    done: &mut Vec<String>,
) -> Result<(), ActError> {
    let name = q.rsplit('/').next().unwrap_or(q);
    let first = w
        .procs(&entry.cgroup)?
        .into_iter()
        .chain(
            entry
                .strays
                .iter()
                .filter(|m| stray_still_there(w, m))
                .map(|m| m.pid),
        )
        .find(|p| !untouchable(*p))
        .ok_or_else(|| ActError::Systemd {
            unit: name.to_owned(),
            why: "no processes to quarantine".into(),
        })?;
    let behind = left_behind(w, &entry.cgroup, &stray_pids(w, entry));
    let kept: Vec<(&'static str, String)> = origin_limits(w, &entry.cgroup)
        .into_iter()
        .map(|(file, whole)| (file, entry.lowered_for(q, file, &whole, behind)))
        .collect();
    let limits: Vec<(&'static str, u64)> = kept
        .iter()
        .filter_map(|(file, value)| crate::systemd::property_for(file, value))
        .collect();
    w.start_scope(q, (&entry.cgroup, part_of), &[first], &limits)?;
    entry.quarantine_id = w.id_of(q);
    // systemd moves the process once the scope's cgroup exists: a moment later.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until && !w.procs(q).is_ok_and(|inside| inside.contains(&first)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // systemd set the scope's properties before it moved the process: what they
    // made the files hold is what the scope keeps.
    for (file, value) in &kept {
        if crate::systemd::property_for(file, value).is_some() {
            in_force(w, &mut entry.set, q, file);
        }
    }
    if w.procs(q).is_ok_and(|inside| inside.contains(&first)) {
        let from = entry
            .strays
            .iter()
            .find(|m| m.pid == first)
            .map_or_else(|| entry.cgroup.clone(), |m| m.from.clone());
        entry.moved.push(Moved { pid: first, from });
    }
    done.push(format!(
        "started {name}{} with process {first}{}",
        part_of.map_or(String::new(), |u| format!(" (part of {u})")),
        if kept.is_empty() {
            String::new()
        } else {
            let kept: Vec<String> = kept.iter().map(|(f, v)| format!("{f} {v}")).collect();
            format!(
                ", the offender's limits kept: {}",
                kept_text(&kept, behind, &entry.cgroup)
            )
        }
    ));
    Ok(())
}

/// The least `memory.high` a step sets (1 MiB): a percentage of a memory figure that
/// reads (nearly) nothing is no cap to hold a process to.
const MIN_CAP: u64 = 1 << 20;

/// A quarantine's memory cap for an offender capped at `cap` bytes that left `behind`
/// bytes charged elsewhere (see [`left_behind`]): the rest of the cap, and never less
/// than an eighth of it. The kernel's `memory.high` throttling delays a task by the
/// square of its overage relative to the cap (2 s per charge from ~18 % over): a cap
/// in place lets an offender slow down gently around its size, while a quarantine
/// capped at the 1 MiB left (debian-quarantine, with a 1 MiB floor) stalled the leak
/// at once, and the scenario harness ran its next operator ~40 s late, long enough
/// for the other leak to reach the OOM killer (not proven why; a fault throttled
/// with its mm lock held blocks the readers of its `/proc` files). An eighth keeps
/// the gentle landing, at most an eighth above the cap.
fn quarantine_cap(cap: u64, behind: u64) -> u64 {
    cap.saturating_sub(behind)
        .max(cap / 8)
        .max(MIN_CAP.min(cap))
}

/// What the offender leaves charged behind when its processes move to a quarantine,
/// in bytes of memory and of swap: cgroup v2 does not move a page's charge with its
/// process (the pages stay charged where they were allocated, to the origin's parent
/// once the origin is removed), so a quarantine starts at 0 while the offender keeps
/// them all. The origin `cgroup`'s charge counts what only the offender can free:
/// `memory.current` less its page cache and reclaimable slab, which reclaim takes
/// from wherever they are charged. Processes a user moved out of it (`strays`) also
/// hold pages charged where she put them, which no cgroup's counters tell apart from
/// her other processes': their own resident anonymous and shared memory and swap
/// count, when more (a process's pages, wherever charged, are in its RSS; the
/// origin's charge is the exact figure for the rest, where forked processes sharing
/// pages would count them many times over). Nothing readable: 0.
fn left_behind(w: &Writer, cgroup: &str, strays: &[u32]) -> (u64, u64) {
    // Parsed as the collector does; unreadable or malformed: nothing reclaimable.
    let stat: HashMap<String, u64> = w
        .read(cgroup, "memory.stat")
        .ok()
        .flatten()
        .and_then(|t| crate::cgroupfs::parse_keyed(&t).ok())
        .unwrap_or_default();
    let reclaimable: u64 = ["active_file", "inactive_file", "slab_reclaimable"]
        .iter()
        .filter_map(|k| stat.get(*k))
        .sum();
    let memory = w.memory_current(cgroup).unwrap_or(0);
    let swap = w.read_u64(cgroup, "memory.swap.current").unwrap_or(0);
    let (mut rss, mut swapped) = (0, 0);
    for p in strays.iter().take(SEEN_MAX) {
        let status = procfs::process::Process::new_with_root(w.proc_root.join(p.to_string()))
            .and_then(|p| p.status());
        if let Ok(st) = status {
            rss += (st.rssanon.unwrap_or(0) + st.rssshmem.unwrap_or(0)) << 10;
            swapped += st.vmswap.unwrap_or(0) << 10;
        }
    }
    (
        memory.saturating_sub(reclaimable).max(rss),
        swap.max(swapped),
    )
}

/// `value` of the cap `file` for a quarantine, less what the offender keeps charged to
/// its origin (`behind`, see [`left_behind`]): memory caps as [`quarantine_cap`] says,
/// swap's to 0 (`memory.swap.max` only stops more swapping), in pages as the kernel
/// keeps them: the cap holds the offender, wherever its pages are charged. A
/// quarantine given the cap as it was let the offender allocate all of it again:
/// debian-user-quarantine's leak went from ~400 MiB when quarantined to 776 MiB under
/// a cap of ~400. `max` and other files stay as they are.
fn less_left_behind(file: &str, value: &str, behind: (u64, u64)) -> String {
    match value.parse().ok().and_then(|v| lowered(file, v, behind)) {
        Some(v) => memory_high_text(v),
        None => value.to_owned(),
    }
}

/// The cap `v` of `file` less what was left `behind` (see [`less_left_behind`]);
/// `None`: nothing to take off.
fn lowered(file: &str, v: u64, behind: (u64, u64)) -> Option<u64> {
    match file {
        "memory.high" | "memory.max" if behind.0 > 0 => Some(quarantine_cap(v, behind.0)),
        "memory.swap.max" if behind.1 > 0 => Some(v.saturating_sub(behind.1)),
        _ => None,
    }
}

/// The limits a quarantine kept (`file value` each), and what its memory caps were
/// lowered by when there is one among them.
fn kept_text(kept: &[String], behind: (u64, u64), origin: &str) -> String {
    let note = if kept.iter().any(|k| k.starts_with("memory.")) {
        behind_note(behind, origin)
    } else {
        String::new()
    };
    format!("{}{note}", kept.join(", "))
}

/// How a report says that memory caps were lowered by what the offender left
/// charged to `origin` (nothing when it left nothing).
fn behind_note(behind: (u64, u64), origin: &str) -> String {
    match behind {
        (0, 0) => String::new(),
        (m, s) => format!(
            " (memory caps less the {} MiB, swap caps less the {} MiB, it left charged \
             to {origin})",
            m >> 20,
            s >> 20
        ),
    }
}

/// The entry's offender's memory for a step's `memory_high_percent` on `target`:
/// `memory_current` (the origin's, from the snapshot) where it is; in its quarantine,
/// what is charged to both, with the part it left behind (see [`left_behind`]) to
/// take off the quarantine's cap.
fn footprint(
    w: &Writer,
    entry: &Applied,
    target: &str,
    memory_current: Option<u64>,
) -> Option<Footprint> {
    let total = memory_current?;
    let origin = entry.cgroup.as_str();
    if target == origin {
        return Some(Footprint { total, behind: 0 });
    }
    let here = w.memory_current(target).unwrap_or(0);
    // A cgroup made anew at the origin's path (a service restarted) holds nothing of
    // the offender's: what is charged where it is now is all that counts.
    if w.id_of(origin).is_some() && !entry.still_ours(w, origin) {
        return Some(Footprint {
            total: here,
            behind: 0,
        });
    }
    // The origin as the tick saw it when it is gone since.
    let total = w.memory_current(origin).unwrap_or(total) + here;
    Some(Footprint {
        total,
        behind: left_behind(w, origin, &[]).0,
    })
}

/// What a step's limits did to `memory.high`.
#[derive(Clone, Copy, Debug)]
enum High {
    NotWritten,
    /// Written with the whole cap.
    Whole,
    /// Written with `whole` less what the offender left charged elsewhere.
    Less {
        whole: u64,
    },
}

/// An offender's memory: all of it, and what of it is charged to a cgroup it is no
/// longer in (a cap on the cgroup it is in is that much less).
#[derive(Clone, Copy, Debug)]
struct Footprint {
    total: u64,
    behind: u64,
}

/// The tightest of each limit over `cgroup` and its ancestors (the root has none):
/// what a quarantine cgroup must keep so that moving a process does not lift them.
fn origin_limits(w: &Writer, cgroup: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let chain: Vec<String> = {
        let mut v = Vec::new();
        let mut p = cgroup.trim_end_matches('/').to_owned();
        while !p.is_empty() {
            v.push(p.clone());
            p.truncate(p.rfind('/').unwrap_or(0));
        }
        v
    };
    for file in ["memory.max", "memory.high", "memory.swap.max", "pids.max"] {
        let least = chain
            .iter()
            .filter_map(|c| w.read(c, file).ok().flatten()?.parse::<u64>().ok())
            .min();
        if let Some(v) = least {
            out.push((file, v.to_string()));
        }
    }
    // cpu.max: the smallest share of a CPU ("quota period"), as it is written.
    let least = chain
        .iter()
        .filter_map(|c| {
            let text = w.read(c, "cpu.max").ok().flatten()?;
            let (quota, period) = text.split_once(' ')?;
            let (q, p): (u64, u64) = (quota.parse().ok()?, period.parse().ok()?);
            (p > 0).then_some((q as f64 / p as f64, text))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, text)) = least {
        out.push(("cpu.max", text));
    }
    out
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
        for pid in pids.into_iter().filter(|&p| !untouchable(p)) {
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

/// A journal's cgroup path as something to write into: `/`-led, no `.` or `..`
/// component, no empty component.
fn sane_cgroup(path: &str) -> bool {
    path.starts_with('/')
        && path
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Moves every process of `q` to where `dest` says (its cgroup of origin), or the
/// nearest cgroup above that exists and takes processes (a cgroup that enables
/// controllers for its children takes none: EBUSY); returns how many moved.
fn move_back(w: &Writer, q: &str, dest: impl Fn(u32) -> String, errors: &mut Vec<String>) -> usize {
    let mut n = 0;
    let mut stayed = 0;
    for pid in w.procs(q).unwrap_or_default() {
        if untouchable(pid) {
            continue;
        }
        let mut target = dest(pid);
        if !sane_cgroup(&target) {
            errors.push(format!(
                "journal names {target:?} as an origin: not a cgroup path"
            ));
            stayed += 1;
            continue;
        }
        // Up from the origin, never into the root: a process with no cgroup of its
        // own to go back to stays in the quarantine, inside the origin's limits.
        loop {
            if w.dir(&target).is_dir() {
                match w.move_pid(&target, pid) {
                    Ok(true) => {
                        n += 1;
                        break;
                    }
                    Ok(false) => break, // exited
                    Err(ActError::Write { source, .. })
                        if source.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) => {
                        errors.push(e.to_string());
                        stayed += 1;
                        break;
                    }
                }
            }
            match target.rfind('/') {
                Some(i) if i > 0 => target.truncate(i),
                _ => {
                    stayed += 1;
                    break;
                }
            }
        }
    }
    if stayed > 0 {
        errors.push(format!(
            "{stayed} process(es) had no cgroup of their own left to go back to (their \
             origin and every cgroup above it below the root are gone or take no \
             processes): they stay in {q}, thawed, inside the origin's limits"
        ));
    }
    n
}

/// Restores `file` of `cgroup` to `original`: in the cgroup while it is still the one
/// acted on, else, for a unit, its property (a unit's limits outlive its cgroup).
/// False when that failed.
fn restore_one(
    w: &Writer,
    a: &Applied,
    origin_ours: bool,
    (cgroup, file, original): (&str, &str, &str),
    done: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> bool {
    if origin_ours {
        match w.restore(cgroup, file, original) {
            Ok(()) => done.push(format!("{file} restored to {original}")),
            Err(ActError::Gone { .. } | ActError::NoController { .. }) => {}
            Err(e) => {
                errors.push(e.to_string());
                return false;
            }
        }
    } else if let Some(unit) = &a.unit {
        match w.restore_unit(unit, file, original) {
            Ok(true) => done.push(format!("{unit}: {file} restored to {original}")),
            Ok(false) => {}
            Err(e) => {
                errors.push(e);
                return false;
            }
        }
    }
    true
}

/// The values are the unit's own again (or it is gone): the drop-ins cgsentry's
/// limits made go, so that the unit's files rule at systemd's next reload. One whose
/// restore failed (`unrestored`) stays: that restore may still be carried out late,
/// through systemd, which would write the file again.
fn remove_own_dropins(
    w: &Writer,
    a: &Applied,
    unrestored: &[&str],
    done: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    let Some(unit) = &a.unit else {
        return;
    };
    for property in &a.own_dropins {
        let paths = w.runtime_dropins(unit, property);
        if paths.is_empty() {
            errors.push(format!(
                "journal names {property:?} of {unit} as cgsentry's drop-in: not one it writes; ignored"
            ));
            continue;
        }
        if unrestored.contains(&property.as_str()) {
            errors.push(format!(
                "{unit}: its {property} drop-in kept (the restore did not go through)"
            ));
            continue;
        }
        for path in paths {
            match std::fs::remove_file(&path) {
                Ok(()) => done.push(format!("removed {}", path.display())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("removing {}: {e}", path.display())),
            }
        }
    }
}

/// Undoes an entry where its cgroups are still the ones it acted on (same id): a new
/// cgroup at the same path is never thawed, moved into or given the old one's limits.
/// Only files of [`RESTORABLE`] on the entry's own cgroups are restored, whatever the
/// journal says.
fn undo(w: &Writer, a: &Applied) -> Report {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    let origin_ours = a.still_ours(w, &a.cgroup);
    if let Some(f) = &a.frozen {
        if a.still_ours(w, f) {
            match w.set_frozen(f, false) {
                Ok(_) => done.push(format!("thawed {f}")),
                Err(ActError::Gone { .. }) => {}
                Err(e) => errors.push(e.to_string()),
            }
        } else if w.id_of(f).is_some() {
            done.push(format!("{f} is another cgroup now: not thawed"));
        }
    }
    if let Some(q) = a.quarantine.as_deref().filter(|q| a.still_ours(w, q)) {
        // Everything in quarantine goes back: moved processes to where they came from,
        // children born in quarantine to the offender's cgroup; to the cgroup above
        // when that one is gone or was replaced.
        let back: BTreeMap<u32, &str> = a.moved.iter().map(|m| (m.pid, m.from.as_str())).collect();
        let parent_of = |c: &str| c.rfind('/').map_or("/", |i| &c[..i]).to_owned();
        let home = if origin_ours {
            a.cgroup.clone()
        } else {
            parent_of(&a.cgroup)
        };
        let n = move_back(
            w,
            q,
            |pid| match back.get(&pid) {
                Some(from) if sane_cgroup(from) && (*from != a.cgroup || origin_ours) => {
                    (*from).to_owned()
                }
                _ => home.clone(),
            },
            &mut errors,
        );
        done.push(format!("moved {n} processes back"));
        match end_quarantine(w, q) {
            Ok(Some(ended)) => done.push(ended),
            Ok(None) => errors.push(format!("{q} still has processes; left in place")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    // Properties whose restore failed (it may still land, late, through systemd).
    let mut unrestored = Vec::new();
    for (k, original) in &a.originals {
        let Some((cgroup, file)) = k.split_once('\t') else {
            continue;
        };
        if a.quarantine.as_deref() == Some(cgroup) {
            continue; // removed with the quarantine cgroup
        }
        if cgroup != a.cgroup || !RESTORABLE.contains(&file) {
            errors.push(format!(
                "journal asks to restore {file} of {cgroup}: not a file cgsentry changes there; ignored"
            ));
            continue;
        }
        let restored = restore_one(
            w,
            a,
            origin_ours,
            (cgroup, file, original),
            &mut done,
            &mut errors,
        );
        if !restored && let Some((property, _)) = crate::systemd::property_for(file, original) {
            unrestored.push(property);
        }
    }
    remove_own_dropins(w, a, &unrestored, &mut done, &mut errors);
    if !origin_ours && a.unit.is_none() && w.id_of(&a.cgroup).is_some() {
        done.push(format!(
            "{} is a new cgroup now: its limits were left as they are",
            a.cgroup
        ));
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
            cgroup_id: 0,
            cgroup: "/app".into(),
            finding: FindingKind::Leak,
            rule: "r".into(),
            step,
            action,
            params,
            dry_run: false,
            protected_by: vec![],
            refused: None,
            reason: "test".into(),
        }
    }

    /// The full release of rule "r" on `cgroup` (instance `id`; 0: the entry there).
    fn full_release(cgroup: &str, id: u64) -> Release {
        Release {
            cgroup_id: id,
            cgroup: cgroup.into(),
            rule: "r".into(),
            stage: crate::decide::ReleaseStage::Full,
            steps_taken: 1,
            quiet_sec: 120.0,
            dry_run: false,
        }
    }

    fn step(action: Action) -> Step {
        Step::bare(action)
    }

    /// An entry of rule "r" on /app, a unit's own cgroup, from its journal form.
    fn unit_entry(unit: &str, own_dropins: &[&str]) -> Applied {
        serde_json::from_value(serde_json::json!({
            "cgroup": "/app", "rule": "r", "finding": "leak", "steps_taken": 1,
            "originals": { "/app\tmemory.high": "max" }, "quarantine": null,
            "moved": [], "frozen": null, "kill_due_ms": null, "unit": unit,
            "own_dropins": own_dropins, "dry_run": false, "updated_ms": 0
        }))
        .unwrap()
    }

    /// A limit set through systemd is a runtime drop-in: one that was not there before
    /// cgsentry's first write is cgsentry's; one the operator made is not.
    #[test]
    fn the_runtime_dropins_cgsentry_makes_are_known_before_it_writes() {
        let (dir, w) = tree();
        let run = dir.path().join("run");
        let w = w.with_systemd_run_dir(&run);
        // The operator's, one of a unit with a file and one of a transient unit.
        for d in ["system.control/app.service.d", "transient/app.service.d"] {
            std::fs::create_dir_all(run.join(d)).unwrap();
        }
        std::fs::write(
            run.join("system.control/app.service.d/50-TasksMax.conf"),
            "",
        )
        .unwrap();
        std::fs::write(run.join("transient/app.service.d/50-CPUWeight.conf"), "").unwrap();
        let mut a = unit_entry("app.service", &[]);
        a.originals.clear();
        for file in [
            "memory.high",
            "pids.max",
            "cpu.max",
            "cpu.weight",
            "memory.high",
        ] {
            Actuator::remember(&w, &mut a, "/app", file).unwrap();
        }
        assert_eq!(a.own_dropins, ["MemoryHigh", "CPUQuotaPerSecUSec"]);
        // A later write of a file whose first went behind systemd's back (no drop-in
        // then, none now): still cgsentry's.
        std::fs::write(run.join("transient/app.service.d/50-MemoryHigh.conf"), "").unwrap();
        let mut late = unit_entry("app.service", &[]);
        late.originals.clear();
        late.unit = None;
        Actuator::remember(&w, &mut late, "/app", "pids.max").unwrap();
        late.unit = Some("app.service".into());
        std::fs::remove_file(run.join("system.control/app.service.d/50-TasksMax.conf")).unwrap();
        Actuator::remember(&w, &mut late, "/app", "pids.max").unwrap();
        Actuator::remember(&w, &mut late, "/app", "memory.high").unwrap();
        assert_eq!(late.own_dropins, ["TasksMax"]);
        // No unit, no drop-in.
        let mut plain = unit_entry("app.service", &[]);
        plain.unit = None;
        plain.originals.clear();
        Actuator::remember(&w, &mut plain, "/app", "memory.high").unwrap();
        assert!(plain.own_dropins.is_empty());
    }

    /// The release removes the drop-ins cgsentry's limits made (the unit's own files
    /// rule again at systemd's next reload), never the operator's, and never a file a
    /// journal names that is not one.
    #[test]
    fn a_release_removes_only_the_runtime_dropins_cgsentry_made() {
        let (dir, w) = tree();
        let run = dir.path().join("run");
        let w = w.with_systemd_run_dir(&run);
        let control = run.join("system.control");
        let d = control.join("app.service.d");
        let transient = run.join("transient/app.service.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir_all(&transient).unwrap();
        for f in ["50-MemoryHigh.conf", "50-CPUWeight.conf"] {
            std::fs::write(d.join(f), "[Service]\n").unwrap();
        }
        std::fs::write(transient.join("50-CPUQuota.conf"), "[Service]\n").unwrap();
        let a = unit_entry(
            "app.service",
            &["MemoryHigh", "CPUQuotaPerSecUSec", "TasksMax", "../../../x"],
        );
        let r = undo(&w, &a);
        assert!(!d.join("50-MemoryHigh.conf").exists(), "{r:?}");
        assert!(
            !transient.join("50-CPUQuota.conf").exists(),
            "a transient unit's"
        );
        assert!(d.join("50-CPUWeight.conf").exists(), "the operator's");
        assert!(r.done.contains("50-MemoryHigh.conf"), "{r:?}");
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("not one it writes"));
        assert_eq!(
            w.read("/app", "memory.high").unwrap().as_deref(),
            Some("max")
        );
        // A unit name that is a path: nothing removed.
        std::fs::create_dir_all(control.join("x.d")).unwrap();
        std::fs::write(control.join("x.d/50-CPUWeight.conf"), "").unwrap();
        let evil = unit_entry("../system.control/x", &["CPUWeight"]);
        let r = undo(&w, &evil);
        assert!(control.join("x.d/50-CPUWeight.conf").exists(), "{r:?}");
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
        let release = full_release("/app", 0);
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

    /// A throttle on /app with a cap of each kind (`memory` bytes of memory now).
    fn capped_at(act: &mut Actuator, memory: u64) {
        let params = Step {
            memory_high_percent: Some(100.0),
            pids_max: Some(64),
            cpu_weight: Some(10),
            swap_max_mib: Some(0),
            ..step(Action::Throttle)
        };
        let r = act.apply(&decision(Action::Throttle, 0, params), Some(memory));
        assert!(r.errors.is_empty(), "{r:?}");
    }

    /// The guard's one report of a tick that finds `saying` and quarantines alice's
    /// /app for it.
    fn escalated(act: &mut Actuator, saying: &str) -> Vec<Report> {
        let r = act.enforce();
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].done.contains(saying), "{r:?}");
        assert!(r[0].done.contains("/app is delegated to uid 1000"), "{r:?}");
        r
    }

    /// [`tree`], for a test that chowns its files to a user.
    fn tree_as_root() -> (tempfile::TempDir, Writer) {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test chowns cgroup files to a user: run it as root (CI does)"
        );
        tree()
    }

    /// What a control file holds (empty: nothing).
    fn holds(w: &Writer, rel: &str, file: &str) -> String {
        w.read(rel, file).unwrap().unwrap_or_default()
    }

    /// [`capped_at`] 300 MiB.
    fn capped(act: &mut Actuator) {
        capped_at(act, 300 << 20);
    }

    /// Caps lifted behind cgsentry's back (root's files: systemd, or root by hand) are
    /// put back and said so; the same check a tick later finds nothing. A freeze undone
    /// likewise. A relax's widened cap is the one kept from then on, not a drift.
    #[test]
    fn caps_lifted_behind_its_back_are_put_back() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        capped(&mut act);
        assert!(act.enforce().is_empty(), "nothing changed yet");
        w.write_raw("/app", "memory.high", "max").unwrap();
        w.write_raw("/app", "cpu.weight", "100").unwrap();
        let r = act.enforce();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].action, "enforce");
        assert!(r[0].errors.is_empty(), "{r:?}");
        assert!(
            r[0].done.contains(
                "memory.high was changed to max (by root or systemd); put back to 314572800"
            ),
            "{r:?}"
        );
        assert!(r[0].done.contains("cpu.weight was changed to 100"), "{r:?}");
        assert_eq!(holds(&w, "/app", "memory.high"), "314572800");
        assert_eq!(holds(&w, "/app", "cpu.weight"), "10");
        assert_eq!(holds(&w, "/app", "pids.max"), "64");
        assert!(
            act.entries()[0].quarantine.is_none(),
            "root's files: no quarantine"
        );
        assert!(act.enforce().is_empty(), "put back: nothing left to do");

        // A freeze undone is redone.
        act.apply(&decision(Action::Freeze, 1, step(Action::Freeze)), None);
        assert_eq!(holds(&w, "/app", "cgroup.freeze"), "1");
        w.write_raw("/app", "cgroup.freeze", "0").unwrap();
        let r = act.enforce();
        assert!(
            r[0].done.contains("cgroup.freeze was changed to 0"),
            "{r:?}"
        );
        assert_eq!(holds(&w, "/app", "cgroup.freeze"), "1");

        // Relaxed: thawed and widened, and neither is undone.
        let relax = Release {
            stage: crate::decide::ReleaseStage::Relax,
            ..full_release("/app", 0)
        };
        std::fs::write(w.dir("/app").join("memory.current"), "314572800").unwrap();
        act.relax(&relax, 100 << 20).expect("an entry");
        assert_eq!(holds(&w, "/app", "cgroup.freeze"), "0");
        assert_eq!(holds(&w, "/app", "memory.high"), "367001600");
        assert!(act.enforce().is_empty(), "the relax is cgsentry's own");
        // Journaled: a restarted agent guards the same values.
        let mut again = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        w.write_raw("/app", "pids.max", "max").unwrap();
        let r = again.enforce();
        assert!(r[0].done.contains("pids.max was changed to max"), "{r:?}");
        assert_eq!(holds(&w, "/app", "pids.max"), "64");
        // Released: nothing is guarded any more.
        again.release(&full_release("/app", 0)).expect("an entry");
        w.write_raw("/app", "pids.max", "1000").unwrap();
        assert!(again.enforce().is_empty());
    }

    /// A cgroup delegated to a user (her manager's scope: she owns its control files)
    /// whose cap she lifts is capped again and goes to quarantine, root's cgroup, with
    /// the caps it had (frozen if it was); she cannot write there or move it back.
    #[test]
    fn a_delegated_cgroup_whose_cap_is_lifted_goes_to_quarantine() {
        let (dir, w) = tree_as_root();
        for f in ["memory.high", "cgroup.freeze", "cpu.weight", "pids.max"] {
            nix::unistd::chown(
                &w.dir("/app").join(f),
                Some(nix::unistd::Uid::from_raw(1000)),
                None,
            )
            .unwrap();
        }
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        capped(&mut act);
        act.apply(&decision(Action::Freeze, 1, step(Action::Freeze)), None);
        w.write_raw("/app", "memory.high", "max").unwrap();
        let r = escalated(&mut act, "memory.high was changed to max (by uid 1000)");
        let q = "/cgsentry.slice/quarantine-app";
        let a = &act.entries()[0];
        assert_eq!(a.quarantine.as_deref(), Some(q), "{r:?}");
        assert_eq!(a.moved.len(), 2, "{r:?}");
        assert_eq!(a.frozen.as_deref(), Some(q), "{r:?}");
        assert_eq!(holds(&w, q, "memory.high"), "314572800");
        assert_eq!(holds(&w, q, "pids.max"), "64");
        assert_eq!(holds(&w, q, "cpu.weight"), "10");
        assert_eq!(holds(&w, q, "cgroup.freeze"), "1");
        assert_eq!(holds(&w, "/app", "cgroup.freeze"), "0", "origin thawed");
        // The quarantine's caps are guarded in turn; the empty origin's are not.
        w.write_raw("/app", "memory.high", "max").unwrap();
        assert!(act.enforce().is_empty());
        w.write_raw(q, "cpu.weight", "100").unwrap();
        let r = act.enforce();
        assert!(
            r[0].done
                .contains("cpu.weight was changed to 100 (by root or systemd)"),
            "{r:?}"
        );
        assert_eq!(holds(&w, q, "cpu.weight"), "10");
    }

    /// Process `pid` (child of `ppid`) in `cgroup`, as `/proc` below `proc` shows it.
    fn task(proc: &Path, pid: u32, parent: u32, cgroup: &str) {
        let d = proc.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        // A whole line, as the kernel writes it (a comm with `) ` in it).
        let rest = "1 1 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 1000 10000000 500 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0";
        std::fs::write(d.join("stat"), format!("{pid} (a) b) S {parent} {rest}\n")).unwrap();
    }

    /// Process `pid`'s resident anonymous (and shared: `shmem`) memory and swap, in
    /// KiB, in a `/proc/PID/status` otherwise this test process's own.
    fn memory_of(proc: &Path, pid: u32, anon_and_shmem: u64, swap: u64) {
        let mine = std::fs::read_to_string("/proc/self/status").unwrap();
        let status: String = mine
            .lines()
            .map(|l| match l.split(':').next() {
                Some("RssAnon") => format!("RssAnon:\t{} kB", anon_and_shmem / 2),
                Some("RssShmem") => format!("RssShmem:\t{} kB", anon_and_shmem / 2),
                Some("VmSwap") => format!("VmSwap:\t{swap} kB"),
                _ => l.to_owned(),
            })
            .map(|l| l + "\n")
            .collect();
        std::fs::write(proc.join(pid.to_string()).join("status"), status).unwrap();
    }

    /// Cgroup `rel` holding `procs`, made (if need be) by alice (uid 1000), whose
    /// `cgroup.procs` she owns.
    fn hers(w: &Writer, rel: &str, procs: &str) {
        std::fs::create_dir_all(w.dir(rel)).unwrap();
        let f = w.dir(rel).join("cgroup.procs");
        std::fs::write(&f, procs).unwrap();
        nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(1000)), None).unwrap();
    }

    /// Alice's /app (processes 101 and its child 102) capped in place, and seen once by
    /// the guard; the tree, its writer, its `/proc` and the actuator.
    fn her_capped_app() -> (tempfile::TempDir, Writer, PathBuf, Actuator) {
        let (dir, w) = tree_as_root();
        let proc = dir.path().join("proc");
        task(&proc, 101, 1, "/app");
        task(&proc, 102, 101, "/app");
        hers(&w, "/app", "101\n102\n");
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        act.w = act.w.clone().with_proc_root(&proc);
        capped(&mut act);
        assert!(act.enforce().is_empty(), "nothing moved yet");
        (dir, w, proc, act)
    }

    /// Contained in place in her own cgroup, a user moves the offender to another of
    /// hers (out of the caps, without touching a file): it is followed, with the
    /// children it forked there since, into quarantine; her other processes there
    /// stay. So when she moved every process out and her manager removed the emptied
    /// cgroup, or made a new one at its path.
    #[test]
    fn processes_a_user_moves_out_of_her_capped_cgroup_are_followed() {
        let (_dir, w, proc, mut act) = her_capped_app();
        // She moves 101 to /other, where it forks 103; 104 was hers there already.
        hers(&w, "/app", "102\n");
        hers(&w, "/other", "104\n101\n103\n");
        task(&proc, 101, 1, "/other");
        task(&proc, 103, 101, "/other");
        task(&proc, 104, 1, "/other");
        let r = escalated(&mut act, "process 101 was moved out of /app to /other");
        let a = &act.entries()[0];
        assert_eq!(
            a.quarantine.as_deref(),
            Some("/cgsentry.slice/quarantine-app")
        );
        let moved: Vec<(u32, &str)> = a.moved.iter().map(|m| (m.pid, m.from.as_str())).collect();
        assert_eq!(
            moved,
            vec![(102, "/app"), (101, "/other"), (103, "/other")],
            "{r:?}"
        );

        // She moved every process out, and her manager removed the empty cgroup.
        let (_dir, w, proc, mut act) = her_capped_app();
        std::fs::remove_dir_all(w.dir("/app")).unwrap();
        hers(&w, "/other", "101\n102\n");
        task(&proc, 101, 1, "/other");
        task(&proc, 102, 101, "/other");
        // What they hold, charged to /app's parent now and to /other: 200 + 60 MiB of
        // the 300 MiB cap (and 10 MiB swapped out).
        memory_of(&proc, 101, 200 << 10, 0);
        memory_of(&proc, 102, 60 << 10, 10 << 10);
        let r = act.enforce();
        assert!(
            r[0].done
                .contains("process 102 was moved out of /app to /other"),
            "{r:?}"
        );
        let a = &act.entries()[0];
        let q = a.quarantine.clone().unwrap();
        let moved: Vec<(u32, &str)> = a.moved.iter().map(|m| (m.pid, m.from.as_str())).collect();
        assert_eq!(moved, vec![(101, "/other"), (102, "/other")], "{r:?}");
        // The cap it had is on the offender, not on the empty quarantine.
        assert_eq!(
            w.read(&q, "memory.high").unwrap(),
            Some((40 << 20).to_string()),
            "{r:?}"
        );
        assert!(
            r[0].done
                .contains("less the 260 MiB, swap caps less the 10 MiB"),
            "{r:?}"
        );

        // Out, then back into a cgroup she made anew at the same path.
        let (_dir, w, _proc, mut act) = her_capped_app();
        // (Made before the old one goes: a new inode, as a new cgroup has a new id.)
        hers(&w, "/new", "101\n102\n");
        std::fs::remove_dir_all(w.dir("/app")).unwrap();
        std::fs::rename(w.dir("/new"), w.dir("/app")).unwrap();
        let r = act.enforce();
        assert!(
            r[0].done
                .contains("process 101 was moved out of /app to /app"),
            "{r:?}"
        );
        assert!(act.entries()[0].quarantine.is_some(), "{r:?}");
    }

    /// What is not an escape: a move within the offender's own subtree (a `Delegate=`
    /// service's jobs in sub-cgroups), and a move by root to a cgroup of root's. The
    /// same fixture then shows her own move followed.
    #[test]
    fn moves_within_the_subtree_or_by_root_are_not_escapes() {
        let (_dir, w, proc, mut act) = her_capped_app();
        // Into a job cgroup below hers.
        task(&proc, 101, 1, "/app/job");
        for (cgroup, procs) in [("/app", "102\n"), ("/app/job", "101\n")] {
            hers(&w, cgroup, procs);
        }
        assert!(act.enforce().is_empty());
        std::fs::create_dir(w.dir("/root")).unwrap();
        std::fs::write(w.dir("/root").join("cgroup.procs"), "101\n").unwrap();
        hers(&w, "/app/job", "");
        task(&proc, 101, 1, "/root");
        assert!(act.enforce().is_empty());
        assert!(act.entries()[0].quarantine.is_none());
        hers(&w, "/app", "");
        hers(&w, "/other", "102\n");
        task(&proc, 102, 1, "/other");
        let r = act.enforce();
        let moved: Vec<u32> = act.entries()[0].moved.iter().map(|m| m.pid).collect();
        assert_eq!(moved, vec![102], "{r:?}");
    }

    /// Her manager thaws a frozen unit of hers to stop it: frozen again, its processes
    /// could not act on the SIGTERM that follows. A thaw of her own cgroup is left so
    /// (the caps hold), and no quarantine follows from it.
    #[test]
    fn a_user_thawing_her_own_cgroup_is_not_fought() {
        let (dir, w) = tree_as_root();
        let f = w.dir("/app").join("cgroup.freeze");
        nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(1000)), None).unwrap();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        capped(&mut act);
        act.apply(&decision(Action::Freeze, 1, step(Action::Freeze)), None);
        w.write_raw("/app", "cgroup.freeze", "0").unwrap();
        let r = act.enforce();
        assert!(r[0].done.contains("left thawed"), "{r:?}");
        assert_eq!(holds(&w, "/app", "cgroup.freeze"), "0");
        let a = &act.entries()[0];
        assert!(a.quarantine.is_none() && a.frozen.is_none(), "{r:?}");
        assert!(act.enforce().is_empty());
    }

    /// Two rules' ladders on one cgroup: the latest write is the one kept (no fight
    /// between their values), and the release of one does not lift the other's cap.
    /// A journal's `set` names only files cgsentry changes: a forged one is never
    /// written.
    #[test]
    fn two_rules_on_one_cgroup_and_forged_keys() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        capped(&mut act);
        let tighter = Step {
            memory_high_percent: Some(50.0),
            ..step(Action::Throttle)
        };
        let d = Decision {
            rule: "r2".into(),
            ..decision(Action::Throttle, 0, tighter)
        };
        act.apply(&d, Some(300 << 20));
        assert_eq!(holds(&w, "/app", "memory.high"), "157286400");
        assert!(act.enforce().is_empty(), "no fight");
        assert!(act.enforce().is_empty(), "no fight");
        // r's release restores what /app held before r ("max"): r2's cap comes back.
        let r = act.release(&full_release("/app", 0)).expect("r's entry");
        assert!(
            r.done.contains("kept rule r2's memory.high 157286400"),
            "{r:?}"
        );
        assert_eq!(holds(&w, "/app", "memory.high"), "157286400");
        assert!(act.enforce().is_empty());

        // Forged: a journal asking for cgroup.procs and a path out of the tree.
        let (dir, w) = tree();
        let journal = dir.path().join("j");
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        capped(&mut act);
        let file = journal.join("journal.json");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text = text.replace(
            "\"/app\\tpids.max\"",
            "\"/app\\tcgroup.procs\": \"1\", \"/app\\t../../x\": \"y\", \"/app\\tpids.max\"",
        );
        assert!(text.contains("cgroup.procs"), "{text}");
        std::fs::write(&file, text).unwrap();
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        assert!(act.enforce().is_empty());
        assert_eq!(holds(&w, "/app", "cgroup.procs"), "101\n102");
        assert!(!dir.path().join("x").exists());
    }

    /// A controller turned off in the parent takes the capped files with it: that is a
    /// drift, named, not silence.
    #[test]
    fn a_controller_turned_off_is_a_drift() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        capped(&mut act);
        std::fs::remove_file(w.dir("/app").join("pids.max")).unwrap();
        let r = act.enforce();
        assert!(
            r[0].done
                .contains("pids.max was changed to nothing (its controller was turned off)"),
            "{r:?}"
        );
    }

    /// Incident D's release: capped (memory, pids, no swap) and frozen; relaxed =
    /// thawed with room (memory.high widened by half the machine's spare memory), the
    /// other caps (pids, swap, CPU weight) kept; then the full release restores every original.
    #[test]
    fn relax_thaws_and_widens_then_release_restores() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        capped_at(&mut act, 100 << 20);
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
            cgroup_id: 0,
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
        assert_eq!(act.pressing(), vec![w.id_of("/app").unwrap()]);
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
            cgroup_id: 0,
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
        assert_eq!(act.origin_of(q), Some(("/app", w.id_of("/app"))));
        assert_eq!(
            w.read(q, "cpu.max").unwrap().as_deref(),
            Some("100000 100000")
        );
    }

    /// Under systemd a quarantine is a scope; when systemd cannot start it (slow,
    /// paused, refusing) and made nothing, the offender is quarantined all the same,
    /// in a plain cgroup, and the report says so (debian-quarantine once had a one-step
    /// ladder's leak reach the OOM killer with no quarantine at all).
    #[test]
    fn a_scope_systemd_cannot_start_is_a_plain_quarantine() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        act.set_systemd(crate::systemd::Systemd::paused());
        let r = act.apply(
            &decision(Action::Quarantine, 0, step(Action::Quarantine)),
            None,
        );
        let q = "/cgsentry.slice/quarantine-app";
        assert!(w.dir(q).is_dir(), "{r:?}");
        assert!(!w.dir("/cgsentry.slice/quarantine-app.scope").exists());
        let a = &act.entries()[0];
        assert_eq!(a.quarantine.as_deref(), Some(q));
        let pids: Vec<u32> = a.moved.iter().map(|m| m.pid).collect();
        assert_eq!(pids, vec![101, 102], "{r:?}");
        let said = r.errors.join("; ");
        assert!(said.contains("StartTransientUnit"), "{said}");
        assert!(
            said.contains("plain cgroup /cgsentry.slice/quarantine-app"),
            "{said}"
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
        assert!(act.reconcile().0.is_empty(), "nothing left to adopt");
        assert!(
            Actuator::open(dir.path(), &journal, "x")
                .entries()
                .is_empty()
        );
    }

    /// A unit stopped while no agent ran: its cgroup is gone, but the caps cgsentry set
    /// are its properties, which would cap its next start. The restarted agent gives
    /// them back (and removes its drop-ins) instead of forgetting them.
    #[test]
    fn reconcile_gives_a_gone_unit_its_properties_back() {
        let (dir, w) = tree();
        let run = dir.path().join("run");
        let dropin = run.join("system.control/gone.service.d/50-MemoryHigh.conf");
        std::fs::create_dir_all(dropin.parent().unwrap()).unwrap();
        std::fs::write(&dropin, "[Service]\nMemoryHigh=1048576\n").unwrap();
        let journal = dir.path().join("j");
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        act.w = w.with_systemd_run_dir(&run);
        let mut gone = unit_entry("gone.service", &["MemoryHigh"]);
        gone.cgroup = "/gone.service".into();
        gone.originals = BTreeMap::from([(key("/gone.service", "memory.high"), "max".into())]);
        let mut plain = unit_entry("x.service", &[]);
        plain.cgroup = "/gone-plain".into();
        plain.unit = None;
        act.journal.entries = vec![gone, plain];
        let (adopt, reports) = act.reconcile();
        assert!(adopt.is_empty());
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].cgroup, "/gone.service");
        assert!(
            reports[0].done.starts_with("/gone.service is gone: "),
            "{reports:?}"
        );
        assert!(!dropin.exists(), "{reports:?}");
        assert!(act.entries().is_empty());
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

    /// Under systemd a quarantine is a scope of the quarantine slice when that is a
    /// top-level slice; any other parent stays a plain cgroup. The scope's name is the
    /// offender's path with `_` for what a transient unit's name may not have.
    #[test]
    fn a_quarantine_is_a_scope_only_under_a_slice_with_a_unit_name() {
        let scope = |parent: &str, cgroup: &str| {
            let q = free_quarantine_path(parent, &unit_safe(cgroup), ".scope", |_| false);
            (is_scope_quarantine(&q), q)
        };
        assert_eq!(
            scope("cgsentry.slice", "/system.slice/pool.service"),
            (
                true,
                "/cgsentry.slice/quarantine-system.slice-pool.service.scope".into()
            )
        );
        // A template instance's `@` (systemd starts no transient unit so named).
        assert_eq!(
            scope("/cgsentry.slice/", "/system.slice/getty@tty1.service").1,
            "/cgsentry.slice/quarantine-system.slice-getty_tty1.service.scope"
        );
        assert!(!is_scope_quarantine(
            "/cgsentry.slice/quarantine-system.slice-getty@tty1.service.scope"
        ));
        assert!(scope("cgsentry.slice", "/system.slice/dev-x\\x2dy.service").0);
        // Not a slice, not at the top, or a dashed name (systemd nests it): plain
        // cgroups.
        assert!(!scope("cgsentry", "/system.slice/pool.service").0);
        assert!(!scope("/a.slice/b.slice", "/system.slice/pool.service").0);
        assert!(!scope("system-cgsentry.slice", "/system.slice/pool.service").0);
        assert!(!scope("-.slice", "/system.slice/pool.service").0);
        // The path alone says which (an offender that is a scope itself, under a
        // parent that is no slice, stays plain).
        assert!(is_scope_quarantine(
            "/cgsentry.slice/quarantine-system.slice-pool.service.scope"
        ));
        assert!(!is_scope_quarantine(
            "/cgsentry/quarantine-user.slice-session-3.scope"
        ));
        assert!(!is_scope_quarantine("/a.slice/b.slice/quarantine-x.scope"));
        // Bytes a cgroup name may have and a unit name may not: `_` in the scope's.
        assert_eq!(
            scope("cgsentry.slice", "/user.slice/a b/caf\u{e9}\n").1,
            "/cgsentry.slice/quarantine-user.slice-a_b-caf__.scope"
        );
        assert!(scope("cgsentry.slice", "/user.slice/a b/caf\u{e9}\n").0);
        assert!(!is_scope_quarantine("/cgsentry.slice/quarantine-a b.scope"));
        // Taken names get a number before the suffix.
        let taken = ["/cgsentry.slice/quarantine-a.service.scope"];
        assert_eq!(
            free_quarantine_path("cgsentry.slice", "/a.service", ".scope", |q| taken
                .contains(&q)),
            "/cgsentry.slice/quarantine-a.service-2.scope"
        );
        assert!(!is_scope_quarantine("/cgsentry.slice/quarantine-a.service"));
    }

    /// A pid no process has (above the kernel's `pid_max` limit): a test that reaches
    /// `kill(2)` must never signal a real process of the machine running it.
    const NO_SUCH_PID: &str = "4194305";

    /// A cgroup of the fake tree made anew at the same path: another inode (the old
    /// directory is kept aside, so that the filesystem cannot reuse its inode number —
    /// cgroupfs never does: cgroup ids are unique since boot).
    fn replace_app(dir: &Path) {
        let aside = (0..100)
            .map(|n| dir.join(format!("app.old{n}")))
            .find(|p| !p.exists())
            .unwrap();
        std::fs::rename(dir.join("app"), aside).unwrap();
        std::fs::create_dir(dir.join("app")).unwrap();
        for (f, v) in [
            ("memory.high", "max"),
            ("pids.max", "max"),
            ("cgroup.procs", NO_SUCH_PID),
            ("cgroup.freeze", "0"),
        ] {
            std::fs::write(dir.join("app").join(f), v).unwrap();
        }
    }

    /// A control file that is not there (a user's manager enables no cpu controller
    /// for her scopes; cgroupfs refuses the create with EACCES): the error names the
    /// missing controller; a cgroup that is gone, or a refusal of a file that is
    /// there, is still told apart.
    #[test]
    fn a_missing_controller_is_named() {
        let path = Path::new("/sys/fs/cgroup/app/cpu.weight");
        let eacces = || io::Error::from_raw_os_error(libc::EACCES);
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        let e = write_error(path, "cpu.weight", "10", eacces(), true);
        assert!(matches!(e, ActError::NoController { ref controller, .. } if controller == "cpu"));
        assert!(
            e.to_string().contains("cpu controller is not enabled"),
            "{e}"
        );
        // The file is there and the kernel refused: the refusal, as it is.
        assert!(matches!(
            write_error(path, "cpu.weight", "10", eacces(), false),
            ActError::Write { .. }
        ));
        // The cgroup is gone.
        assert!(matches!(
            write_error(path, "cpu.weight", "10", enoent(), false),
            ActError::Gone { .. }
        ));
        // A file of the cgroup core missing (cgroup.kill before 5.14) is no
        // controller's: the caller's fallback for a gone file applies.
        for e in [enoent(), eacces()] {
            assert!(matches!(
                write_error(path, "cgroup.kill", "1", e, true),
                ActError::Gone { .. }
            ));
        }
    }

    /// The intent is on disk before the write: the freeze of a cgroup whose
    /// `cgroup.freeze` blocks (a FIFO nobody reads yet) finds the journal already
    /// naming what it freezes. An agent killed in the middle leaves a record.
    #[test]
    fn the_intent_is_journaled_before_anything_is_written() {
        let (dir, _w) = tree();
        let freeze = dir.path().join("app/cgroup.freeze");
        std::fs::remove_file(&freeze).unwrap();
        nix::unistd::mkfifo(&freeze, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let journal = dir.path().join("j");
        let root = dir.path().to_owned();
        let j = journal.clone();
        let worker = std::thread::spawn(move || {
            let mut act = Actuator::open(&root, &j, "cgsentry.slice");
            act.apply(&decision(Action::Freeze, 0, step(Action::Freeze)), None)
        });
        // The writer is blocked opening the FIFO: the journal must say it already.
        let deadline = Instant::now() + Duration::from_secs(5);
        let recorded = loop {
            let on_disk = std::fs::read(journal.join("journal.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Journal>(&b).ok());
            if let Some(j) = on_disk.filter(|j| !j.entries.is_empty()) {
                break j;
            }
            assert!(
                Instant::now() < deadline,
                "no intent journaled before the write"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(recorded.entries[0].frozen.as_deref(), Some("/app"));
        assert!(recorded.entries[0].cgroup_id.is_some());
        // Let the write through (read it), then answer its read-back.
        let wrote = std::fs::read_to_string(&freeze).unwrap();
        assert_eq!(wrote, "1");
        std::fs::write(&freeze, "1").unwrap();
        let r = worker.join().unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
    }

    /// A unit capped through systemd is restarted (a new cgroup at its path, showing
    /// the old caps: they are the unit's properties) and capped again: the new entry
    /// takes the unit's own values from the old one, which hands the unit over (its
    /// release would lift the new caps), so the new entry's release restores what the
    /// unit had before cgsentry, not the old caps. A journal naming another unit than
    /// its cgroup's is refused.
    #[test]
    fn a_restarted_unit_gets_its_own_values_back_not_the_old_caps() {
        let (dir, w) = tree();
        std::fs::write(dir.path().join("app/cgroup.procs"), NO_SUCH_PID).unwrap();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let cap = || Step {
            pids_max: Some(8),
            ..step(Action::Throttle)
        };
        let first = w.id_of("/app").unwrap();
        let mut d = decision(Action::Throttle, 0, cap());
        d.cgroup_id = first;
        assert!(act.apply(&d, None).errors.is_empty());
        // As the D-Bus path records it (no systemd in a unit test).
        act.journal.entries[0].unit = Some("app".into());
        replace_app(dir.path());
        std::fs::write(w.dir("/app").join("pids.max"), "8").unwrap();
        let second = w.id_of("/app").unwrap();
        assert_ne!(first, second);
        let mut d = decision(Action::Throttle, 0, cap());
        d.cgroup_id = second;
        assert!(act.apply(&d, None).errors.is_empty());
        let (old, new) = (&act.journal.entries[0], &act.journal.entries[1]);
        assert_eq!(old.unit, None, "the old entry handed the unit over");
        assert_eq!(new.unit.as_deref(), Some("app"));
        assert_eq!(
            new.originals
                .get(&key("/app", "pids.max"))
                .map(String::as_str),
            Some("max")
        );
        let r = act.release(&full_release("/app", second)).unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("max"));

        let mut forged = act.journal.entries[0].clone();
        forged.unit = Some("sshd.service".into());
        assert!(forged.malformed().unwrap().contains("unit"));
    }

    /// A cgroup removed and made again at the same path (a restarted service, the next
    /// CI job) is another cgroup: the release restores nothing into it, a restarted
    /// agent drops the entry, and a kill whose grace ends then kills nothing.
    #[test]
    fn a_replaced_cgroup_is_never_touched() {
        let (dir, w) = tree();
        std::fs::write(dir.path().join("app/cgroup.procs"), NO_SUCH_PID).unwrap();
        let journal = dir.path().join("j");
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        let cap = Step {
            pids_max: Some(8),
            ..step(Action::Throttle)
        };
        let r = act.apply(&decision(Action::Throttle, 0, cap), None);
        assert!(r.errors.is_empty(), "{r:?}");
        replace_app(dir.path());
        std::fs::write(w.dir("/app").join("pids.max"), "77").unwrap();
        // A restarted agent: the entry names a cgroup that is not there any more.
        let mut again = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        let (adopt, reports) = again.reconcile();
        assert!(adopt.is_empty(), "{adopt:?}");
        assert!(
            reports[0].done.contains("replaced by a new cgroup"),
            "{reports:?}"
        );
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("77"));

        // The same from the running agent's release.
        let mut act = Actuator::open(dir.path(), &dir.path().join("j2"), "cgsentry.slice");
        act.apply(
            &decision(
                Action::Throttle,
                0,
                Step {
                    pids_max: Some(8),
                    ..step(Action::Throttle)
                },
            ),
            None,
        );
        replace_app(dir.path());
        std::fs::write(w.dir("/app").join("pids.max"), "77").unwrap();
        let release = full_release("/app", 0);
        let r = act.release(&release).unwrap();
        assert!(r.done.contains("is a new cgroup now"), "{r:?}");
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("77"));

        // A kill: SIGTERM sent (to no real process), then the cgroup is replaced before
        // the grace ends: the new one is not killed.
        let mut act = Actuator::open(dir.path(), &dir.path().join("j3"), "cgsentry.slice");
        let kill = Step {
            grace_sec: Some(0),
            ..step(Action::Kill)
        };
        let r = act.apply(&decision(Action::Kill, 0, kill), None);
        assert!(r.done.contains("SIGKILL in 0 s"), "{r:?}");
        replace_app(dir.path());
        let reports = act.tick();
        assert_eq!(reports.len(), 1);
        assert!(
            reports[0]
                .done
                .contains("was replaced since; nothing killed"),
            "{reports:?}"
        );
        assert!(
            !w.dir("/app").join("cgroup.kill").exists(),
            "the new cgroup was killed"
        );

        // Not replaced: killed (cgroup.kill written).
        let mut act = Actuator::open(dir.path(), &dir.path().join("j4"), "cgsentry.slice");
        let kill = Step {
            grace_sec: Some(0),
            ..step(Action::Kill)
        };
        act.apply(&decision(Action::Kill, 0, kill), None);
        let reports = act.tick();
        assert!(
            reports[0].done.contains("killed what was left"),
            "{reports:?}"
        );
        assert_eq!(
            std::fs::read_to_string(w.dir("/app").join("cgroup.kill")).unwrap(),
            "1"
        );
    }

    /// A journal is data: only files cgsentry changes, on the entry's own cgroup, are
    /// ever restored from it.
    #[test]
    fn only_known_control_files_are_restored() {
        let (dir, w) = tree();
        std::fs::create_dir(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join("other/memory.high"), "123").unwrap();
        let journal = dir.path().join("j");
        std::fs::create_dir(&journal).unwrap();
        let id = w.id_of("/app");
        let forged = serde_json::json!({
            "version": 1,
            "entries": [{
                "cgroup": "/app", "cgroup_id": id, "rule": "r", "finding": "leak",
                "steps_taken": 1,
                "originals": {
                    "/app\tpids.max": "max",
                    "/app\tcgroup.procs": "1",
                    "/app\t../../escape": "x",
                    "/other\tmemory.high": "max"
                },
                "quarantine": null, "moved": [], "frozen": null, "kill_due_ms": null,
                "dry_run": false, "updated_ms": 0
            }]
        });
        std::fs::write(journal.join("journal.json"), forged.to_string()).unwrap();
        std::fs::write(w.dir("/app").join("pids.max"), "8").unwrap();
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        let reports = act.release_all();
        assert_eq!(reports.len(), 1);
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("max"));
        assert_eq!(
            w.read("/app", "cgroup.procs").unwrap().as_deref(),
            Some("101\n102")
        );
        assert_eq!(
            w.read("/other", "memory.high").unwrap().as_deref(),
            Some("123")
        );
        assert!(!dir.path().join("escape").exists());
        assert_eq!(reports[0].errors.len(), 3, "{reports:?}");
        assert!(act.entries().is_empty());
    }

    /// A SIGKILL still due in a journal is due by the monotonic clock from the restart,
    /// within bounds: a wall clock set a day ahead or back changes nothing drastic.
    #[test]
    fn kill_deadlines_go_by_the_monotonic_clock() {
        let (dir, w) = tree();
        let journal = dir.path().join("j");
        std::fs::create_dir(&journal).unwrap();
        let day: u128 = 86_400_000;
        let entry = |cgroup: &str, due: u128| {
            serde_json::json!({
                "cgroup": cgroup, "cgroup_id": w.id_of(cgroup), "rule": "r", "finding": "leak",
                "steps_taken": 3, "originals": {}, "quarantine": null, "moved": [],
                "frozen": null, "kill_due_ms": due, "dry_run": false, "updated_ms": 0
            })
        };
        std::fs::create_dir(dir.path().join("later")).unwrap();
        let j = serde_json::json!({
            "version": 1,
            "entries": [entry("/app", now_ms() + day), entry("/later", now_ms().saturating_sub(day))]
        });
        std::fs::write(journal.join("journal.json"), j.to_string()).unwrap();
        let mut act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        let before = Instant::now();
        let (adopt, _) = act.reconcile();
        assert_eq!(adopt.len(), 2);
        let far = act.entries()[0].kill_deadline.unwrap();
        assert!(far <= before + MAX_GRACE_ON_RESTART + Duration::from_secs(1));
        assert!(far >= before + MAX_GRACE_ON_RESTART.saturating_sub(Duration::from_secs(5)));
        let past = act.entries()[1].kill_deadline.unwrap();
        assert!(past <= Instant::now(), "already due");
    }

    /// Quarantine keeps the offender inside its service's (or pod's) limits: the
    /// tightest of its own and its ancestors'.
    #[test]
    fn quarantine_keeps_the_origin_limits() {
        let (dir, w) = tree();
        let svc = dir.path().join("svc");
        std::fs::create_dir_all(svc.join("app")).unwrap();
        for (f, v) in [
            ("memory.max", "536870912"),
            ("pids.max", "100"),
            ("cpu.max", "50000 100000"),
        ] {
            std::fs::write(svc.join(f), v).unwrap();
        }
        for (f, v) in [
            ("memory.max", "max"),
            ("pids.max", "40"),
            ("cpu.max", "max 100000"),
            ("cgroup.procs", "101\n"),
        ] {
            std::fs::write(svc.join("app").join(f), v).unwrap();
        }
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let mut d = decision(Action::Quarantine, 0, step(Action::Quarantine));
        d.cgroup = "/svc/app".into();
        let r = act.apply(&d, None);
        let q = "/cgsentry.slice/quarantine-svc-app";
        assert!(r.done.contains("kept the offender's limits"), "{r:?}");
        assert_eq!(
            w.read(q, "memory.max").unwrap().as_deref(),
            Some("536870912")
        );
        assert_eq!(w.read(q, "pids.max").unwrap().as_deref(), Some("40"));
        assert_eq!(
            w.read(q, "cpu.max").unwrap().as_deref(),
            Some("50000 100000")
        );
        assert_eq!(act.entries()[0].quarantine_id, w.id_of(q));

        // The offender's cgroup is gone by the release: its processes go to the
        // nearest cgroup above it.
        std::fs::remove_dir_all(svc.join("app")).unwrap();
        std::fs::write(w.dir(q).join("cgroup.procs"), "101\n").unwrap();
        let release = full_release("/svc/app", 0);
        let r = act.release(&release).unwrap();
        assert!(r.done.contains("moved 1 processes back"), "{r:?}");
        assert_eq!(
            std::fs::read_to_string(svc.join("cgroup.procs")).unwrap(),
            "101"
        );
    }

    const MIB: u64 = 1 << 20;

    /// `/app` holding 400 MiB (40 of them page cache and reclaimable slab) and 30 MiB
    /// of swap under `memory.max` 512 MiB and `memory.swap.max` 100 MiB, capped in
    /// place at 100 % of its memory, then quarantined; its tree, writer and actuator,
    /// the quarantine's report and path.
    fn quarantined_app_of_400_mib() -> (tempfile::TempDir, Writer, Actuator, Report, String) {
        let (dir, w) = tree();
        let app = dir.path().join("app");
        for (f, v) in [
            ("memory.max", (512 * MIB).to_string()),
            ("memory.current", (400 * MIB).to_string()),
            ("memory.swap.max", (100 * MIB).to_string()),
            ("memory.swap.current", (30 * MIB).to_string()),
            (
                "memory.stat",
                format!(
                    "anon {}\nactive_file {}\ninactive_file {}\nslab_reclaimable {}\n",
                    330 * MIB,
                    20 * MIB,
                    15 * MIB,
                    5 * MIB
                ),
            ),
        ] {
            std::fs::write(app.join(f), v).unwrap();
        }
        let capped = Step {
            memory_high_percent: Some(100.0),
            ..step(Action::Throttle)
        };
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        // In place: the cap is the usage, nothing taken off.
        act.apply(
            &decision(Action::Throttle, 0, capped.clone()),
            Some(400 * MIB),
        );
        assert_eq!(mib(&w, "/app", "memory.high"), Some(400));
        // Then quarantined, with the step's own cap of 100 % of its memory.
        let quarantine = Step {
            memory_high_percent: Some(100.0),
            ..step(Action::Quarantine)
        };
        let r = act.apply(
            &decision(Action::Quarantine, 1, quarantine),
            Some(400 * MIB),
        );
        let q = act.entries()[0].quarantine.clone().unwrap();
        (dir, w, act, r, q)
    }

    fn mib(w: &Writer, cgroup: &str, file: &str) -> Option<u64> {
        w.read(cgroup, file)
            .unwrap()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v / MIB)
    }

    /// cgroup v2 leaves a page's charge where it was allocated: a quarantine starts at
    /// 0 while the offender keeps all it had. Its caps there are the offender's caps
    /// less what it left charged behind and only it can free (page cache and
    /// reclaimable slab are not: reclaim takes them wherever they are charged), never
    /// less than an eighth of the cap; capped in place, nothing is taken off.
    #[test]
    fn a_quarantine_cap_counts_what_the_offender_left_charged_behind() {
        let (dir, w, act, r, q) = quarantined_app_of_400_mib();
        let app = dir.path().join("app");
        let mib = |c: &str, f: &str| mib(&w, c, f);
        // 400 MiB charged, 40 of them reclaimable: 360 stay behind.
        assert_eq!(mib(&q, "memory.max"), Some(512 - 360), "{r:?}");
        assert_eq!(mib(&q, "memory.swap.max"), Some(100 - 30), "{r:?}");
        // The cap set in place (400 MiB, kept) and the step's own (100 % of 400) are
        // both 400 less 360, but not below an eighth of 400.
        assert_eq!(mib(&q, "memory.high"), Some(400 / 8), "{r:?}");
        assert!(
            r.done
                .contains("a cap of 400 MiB less 360 MiB it left charged"),
            "{r:?}"
        );
        assert!(r.done.contains("less the 360 MiB"), "{r:?}");
        // What the guard keeps there is the lowered cap.
        let set = &act.entries()[0].set;
        assert_eq!(
            set.get(&key(&q, "memory.high")),
            Some(&(50 * MIB).to_string())
        );

        // More left behind than the cap: an eighth of it, not none.
        std::fs::write(app.join("memory.current"), (600 * MIB).to_string()).unwrap();
        assert_eq!(
            less_left_behind(
                "memory.max",
                &(512 * MIB).to_string(),
                left_behind(&w, "/app", &[])
            ),
            (64 * MIB).to_string()
        );
        // Only page cache left behind: nothing taken off; `max` stays `max`.
        std::fs::write(
            app.join("memory.stat"),
            format!("active_file {}\n", 600 * MIB),
        )
        .unwrap();
        std::fs::write(app.join("memory.swap.current"), "0").unwrap();
        let behind = left_behind(&w, "/app", &[]);
        assert_eq!(behind, (0, 0));
        assert_eq!(
            less_left_behind("memory.high", "4096000", behind),
            "4096000"
        );
        assert_eq!(less_left_behind("memory.max", "max", (MIB, 0)), "max");
        assert_eq!(less_left_behind("pids.max", "40", (MIB, MIB)), "40");
    }

    /// As the offender frees what it left charged to its origin, its quarantine's caps
    /// are raised back towards its whole caps, once by a sixteenth of one or more;
    /// never lowered; kept by the guard and across a restart.
    #[test]
    fn a_quarantine_cap_widens_as_the_offender_frees_what_it_left_behind() {
        let (dir, w, mut act, _, q) = quarantined_app_of_400_mib();
        let app = dir.path().join("app");
        let mib = |c: &str, f: &str| mib(&w, c, f);
        assert_eq!(mib(&q, "memory.high"), Some(400 / 8));
        assert!(act.widen_as_freed().is_empty(), "nothing freed yet");
        let charged = |current: u64, anon: u64| {
            std::fs::write(app.join("memory.current"), (current * MIB).to_string()).unwrap();
            std::fs::write(
                app.join("memory.stat"),
                format!(
                    "anon {}\nactive_file {}\n",
                    anon * MIB,
                    (current - anon) * MIB
                ),
            )
            .unwrap();
        };
        charged(200, 160);
        std::fs::write(app.join("memory.swap.current"), "0").unwrap();
        let r = act.widen_as_freed();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].action, "widen");
        assert!(
            r[0].done
                .contains("memory.high 240 MiB of the offender's 400 MiB"),
            "{r:?}"
        );
        assert_eq!(mib(&q, "memory.high"), Some(240));
        assert_eq!(mib(&q, "memory.max"), Some(512 - 160));
        assert_eq!(mib(&q, "memory.swap.max"), Some(100));
        // The guard keeps the raised caps, not the old ones.
        assert!(act.enforce().is_empty());
        // Less than a sixteenth more room: left as it is; never lowered.
        charged(200, 140);
        assert!(act.widen_as_freed().is_empty());
        charged(300, 300);
        assert!(act.widen_as_freed().is_empty());
        assert_eq!(mib(&q, "memory.high"), Some(240));
        // A journal read back keeps the whole caps.
        let again = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        assert_eq!(again.entries()[0].whole_caps, act.entries()[0].whole_caps);
        assert_eq!(
            again.entries()[0].whole_caps.get(&key(&q, "memory.high")),
            Some(&(400 * MIB))
        );

        // A later step's own swap cap is its own (not widened back); the memory caps
        // it did not write still widen.
        let no_swap = Step {
            swap_max_mib: Some(0),
            ..step(Action::Throttle)
        };
        act.apply(&decision(Action::Throttle, 2, no_swap), Some(300 * MIB));
        assert_eq!(mib(&q, "memory.swap.max"), Some(0));
        charged(100, 60);
        let r = act.widen_as_freed();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(mib(&q, "memory.high"), Some(400 - 60));
        assert_eq!(mib(&q, "memory.swap.max"), Some(0), "{r:?}");
        // An origin whose memory reads nothing (going away, its controller off) has
        // not freed anything.
        std::fs::remove_file(app.join("memory.current")).unwrap();
        assert!(act.widen_as_freed().is_empty());
        assert_eq!(mib(&q, "memory.high"), Some(400 - 60));
    }

    /// Two offenders whose paths give the same quarantine name get two quarantines.
    #[test]
    fn quarantine_names_never_collide() {
        let (dir, w) = tree();
        for p in ["a-b", "a/b"] {
            std::fs::create_dir_all(dir.path().join(p)).unwrap();
            std::fs::write(dir.path().join(p).join("cgroup.procs"), "").unwrap();
        }
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        for c in ["/a-b", "/a/b"] {
            let mut d = decision(Action::Quarantine, 0, step(Action::Quarantine));
            d.cgroup = c.into();
            act.apply(&d, None);
        }
        let qs: Vec<&str> = act
            .entries()
            .iter()
            .filter_map(|a| a.quarantine.as_deref())
            .collect();
        assert_eq!(
            qs,
            [
                "/cgsentry.slice/quarantine-a-b",
                "/cgsentry.slice/quarantine-a-b-2"
            ]
        );
        assert_eq!(act.origin_of(qs[1]).map(|(o, _)| o), Some("/a/b"));
        assert!(w.dir(qs[1]).is_dir());
        // A name too long for a cgroup keeps its tail.
        let long = format!("/{}", "x".repeat(300));
        let q = quarantine_path("cgsentry.slice", &long);
        assert_eq!(
            q.rsplit('/').next().unwrap().len(),
            "quarantine-".len() + QUARANTINE_NAME_MAX
        );
    }

    /// Work that looks like cgsentry's with no journal behind it: a quarantine cgroup
    /// is thawed and emptied back into the cgroup it was named after; a frozen cgroup
    /// is reported and left frozen.
    #[test]
    fn unexplained_quarantines_are_released_and_frozen_cgroups_reported() {
        let (dir, w) = tree();
        let q = "/cgsentry.slice/quarantine-app";
        std::fs::create_dir_all(w.dir(q)).unwrap();
        std::fs::write(w.dir(q).join("cgroup.procs"), "101\n").unwrap();
        std::fs::write(w.dir(q).join("cgroup.freeze"), "1").unwrap();
        std::fs::write(w.dir(q).join("cgroup.events"), "frozen 0\n").unwrap();
        std::fs::create_dir(dir.path().join("paused")).unwrap();
        std::fs::write(dir.path().join("paused/cgroup.freeze"), "1").unwrap();
        let act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let all = ["/", "/app", "/paused", "/cgsentry.slice", q];
        let reports = act.orphans(&all);
        assert_eq!(reports.len(), 2, "{reports:#?}");
        let quarantine = reports.iter().find(|r| r.cgroup == q).unwrap();
        assert!(quarantine.done.contains("thawed"), "{quarantine:?}");
        assert!(
            quarantine.done.contains("moved 1 processes back to /app"),
            "{quarantine:?}"
        );
        assert_eq!(
            w.read("/app", "cgroup.procs").unwrap().as_deref(),
            Some("101")
        );
        assert_eq!(w.read(q, "cgroup.freeze").unwrap().as_deref(), Some("0"));
        let paused = reports.iter().find(|r| r.cgroup == "/paused").unwrap();
        assert!(paused.done.contains("left as it is"), "{paused:?}");
        assert_eq!(
            w.read("/paused", "cgroup.freeze").unwrap().as_deref(),
            Some("1")
        );
    }

    /// A unit's quarantine scope that no journal explains goes back to the unit it is
    /// named after, as a plain one does.
    #[test]
    fn an_unexplained_quarantine_scope_goes_back_to_its_unit() {
        let (dir, w) = tree();
        let origin = "/system.slice/app.service";
        let q = "/cgsentry.slice/quarantine-system.slice-app.service.scope";
        for (cgroup, procs) in [(origin, ""), (q, "101\n")] {
            std::fs::create_dir_all(w.dir(cgroup)).unwrap();
            std::fs::write(w.dir(cgroup).join("cgroup.procs"), procs).unwrap();
        }
        let act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let all = ["/", "/system.slice", origin, "/cgsentry.slice", q];
        let reports = act.orphans(&all);
        let r = reports.iter().find(|r| r.cgroup == q).unwrap();
        assert!(
            r.done
                .contains(&format!("moved 1 processes back to {origin}")),
            "{r:?}"
        );
        assert_eq!(
            w.read(origin, "cgroup.procs").unwrap().as_deref(),
            Some("101")
        );
    }

    /// Whatever a decision says, the root and the never-act set are refused here too.
    #[test]
    fn the_actuator_refuses_the_never_act_set() {
        let (dir, w) = tree();
        std::fs::write(dir.path().join("cgroup.procs"), NO_SUCH_PID).unwrap();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        for action in [
            Action::Throttle,
            Action::Freeze,
            Action::Kill,
            Action::Quarantine,
        ] {
            let mut d = decision(
                action,
                0,
                Step {
                    pids_max: Some(1),
                    ..step(action)
                },
            );
            d.cgroup = "/".into();
            let r = act.apply(&d, None);
            assert!(
                r.errors[0].starts_with("refused: / is never acted on"),
                "{r:?}"
            );
        }
        act.set_safety(&crate::safety::Safety::new(Some("/app"), None, None));
        let r = act.apply(&decision(Action::Freeze, 0, step(Action::Freeze)), None);
        assert!(r.errors[0].contains("cgsentry's own cgroup"), "{r:?}");
        assert_eq!(
            w.read("/app", "cgroup.freeze").unwrap().as_deref(),
            Some("0")
        );
        assert!(!dir.path().join("cgroup.kill").exists());
        assert!(act.entries().is_empty());
    }

    /// One `memory.high` writer per file: while a write is blocked in the kernel (a
    /// FIFO nobody reads here), another write to the file starts no thread; its value
    /// is written by the blocked one when it returns.
    #[test]
    fn one_blocked_memory_high_writer_per_file() {
        let (dir, w) = tree();
        let high = w.dir("/app").join("memory.high");
        std::fs::remove_file(&high).unwrap();
        nix::unistd::mkfifo(&high, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = w.set_memory_high("/app", 100 << 20).unwrap_err();
        assert!(matches!(e, ActError::Timeout { .. }), "{e}");
        assert_eq!(w.blocked_writes(), 1);
        let started = Instant::now();
        let e = w.set_memory_high("/app", 50 << 20).unwrap_err();
        assert!(matches!(e, ActError::Busy { .. }), "{e}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "no wait, no thread"
        );
        assert_eq!(w.blocked_writes(), 1);
        // The kernel returns: the first value, its read-back, then the latest value.
        let page = procfs::page_size();
        for mib in [100u64, 50] {
            let want = ((mib << 20) / page * page).to_string();
            assert_eq!(std::fs::read_to_string(&high).unwrap(), want);
            std::fs::write(&high, &want).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.blocked_writes() > 0 {
            assert!(Instant::now() < deadline, "the writer did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(dir);
    }

    /// A quarantined offender whose own cgroup went away (systemd removes an empty
    /// scope) is still escalated, in its quarantine; and a new cgroup made at its path
    /// gets an entry of its own, never the old one's steps or release.
    #[test]
    fn an_entry_belongs_to_one_cgroup_not_to_a_path() {
        let (dir, w) = tree();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let old_id = w.id_of("/app").unwrap();
        let mut d = decision(Action::Quarantine, 0, step(Action::Quarantine));
        d.cgroup_id = old_id;
        act.apply(&d, None);
        let q = "/cgsentry.slice/quarantine-app";
        std::fs::write(w.dir(q).join("cgroup.freeze"), "0").unwrap();
        std::fs::write(w.dir(q).join("cgroup.events"), "frozen 1\n").unwrap();
        // The scope is gone (moved aside: the test filesystem must not reuse its inode
        // number, which cgroupfs never does); the offender lives on in quarantine: the
        // freeze reaches it.
        std::fs::rename(dir.path().join("app"), dir.path().join("app.gone")).unwrap();
        let mut d = decision(Action::Freeze, 1, step(Action::Freeze));
        d.cgroup_id = old_id;
        let r = act.apply(&d, None);
        assert_eq!(r.done, format!("froze {q}"), "{r:?}");
        assert_eq!(act.origin_of(q), Some(("/app", Some(old_id))));

        // A new /app (a restarted service) with its own finding: its own entry.
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/pids.max"), "max").unwrap();
        let new_id = w.id_of("/app").unwrap();
        assert_ne!(new_id, old_id);
        let mut d = decision(
            Action::Throttle,
            0,
            Step {
                pids_max: Some(9),
                ..step(Action::Throttle)
            },
        );
        d.cgroup_id = new_id;
        let r = act.apply(&d, None);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(act.entries().len(), 2);
        // The old one's release leaves the new one's throttle alone.
        let release = full_release("/app", old_id);
        act.release(&release).expect("the old entry");
        assert_eq!(w.read("/app", "pids.max").unwrap().as_deref(), Some("9"));
        assert_eq!(act.entries().len(), 1);
        assert_eq!(act.entries()[0].cgroup_id, Some(new_id));
        // A decision about a cgroup that is not there (any more) makes no entry.
        let mut gone = decision(Action::Freeze, 0, step(Action::Freeze));
        gone.cgroup_id = old_id;
        let r = act.apply(&gone, None);
        assert!(r.errors[0].contains("gone"), "{r:?}");
    }

    /// A quarantined process whose origin and every cgroup above it are gone is left
    /// in its quarantine (thawed, in the origin's limits), never moved to the root.
    #[test]
    fn a_release_never_moves_a_process_into_the_root() {
        let (dir, w) = tree();
        let svc = dir.path().join("svc");
        std::fs::create_dir_all(svc.join("app")).unwrap();
        std::fs::write(svc.join("app/cgroup.procs"), "101\n").unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let mut d = decision(Action::Quarantine, 0, step(Action::Quarantine));
        d.cgroup = "/svc/app".into();
        act.apply(&d, None);
        std::fs::remove_dir_all(&svc).unwrap();
        let q = "/cgsentry.slice/quarantine-svc-app";
        std::fs::write(w.dir(q).join("cgroup.procs"), "101\n").unwrap();
        let release = full_release("/svc/app", 0);
        let r = act.release(&release).unwrap();
        assert!(r.errors.iter().any(|e| e.contains("stay in")), "{r:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.procs")).unwrap(),
            ""
        );
    }

    /// A quarantine that cannot be made leaves the entry aimed at the offender itself.
    #[test]
    fn a_failed_quarantine_leaves_later_steps_on_the_offender() {
        let (dir, w) = tree();
        std::fs::write(dir.path().join("cgsentry.slice"), "not a directory").unwrap();
        let mut act = Actuator::open(dir.path(), &dir.path().join("j"), "cgsentry.slice");
        let r = act.apply(
            &decision(Action::Quarantine, 0, step(Action::Quarantine)),
            None,
        );
        assert!(!r.errors.is_empty(), "{r:?}");
        assert_eq!(act.entries()[0].quarantine, None);
        assert_eq!(act.entries()[0].target(), "/app");
        let r = act.apply(&decision(Action::Freeze, 1, step(Action::Freeze)), None);
        assert_eq!(r.done, "froze /app", "{r:?}");
        assert_eq!(
            w.read("/app", "cgroup.freeze").unwrap().as_deref(),
            Some("1")
        );
    }

    /// Journal entries naming what the agent never writes are ignored when it is read.
    #[test]
    fn forged_journal_paths_are_ignored() {
        let (dir, w) = tree();
        let journal = dir.path().join("j");
        std::fs::create_dir(&journal).unwrap();
        let entry = |cgroup: &str, quarantine: Option<&str>, frozen: Option<&str>| {
            serde_json::json!({
                "cgroup": cgroup, "cgroup_id": w.id_of("/app"), "rule": "r", "finding": "leak",
                "steps_taken": 1, "originals": {}, "quarantine": quarantine, "moved": [],
                "frozen": frozen, "kill_due_ms": null, "dry_run": false, "updated_ms": 0
            })
        };
        let j = serde_json::json!({"version": 1, "entries": [
            entry("/app/../../etc", None, None),
            entry("/app", Some("/etc"), None),
            entry("/app", None, Some("/other")),
            entry("/app", Some("/cgsentry.slice/quarantine-app"), Some("/cgsentry.slice/quarantine-app")),
        ]});
        std::fs::write(journal.join("journal.json"), j.to_string()).unwrap();
        let act = Actuator::open(dir.path(), &journal, "cgsentry.slice");
        assert_eq!(act.entries().len(), 1, "{:?}", act.entries());
        assert_eq!(
            act.entries()[0].frozen.as_deref(),
            Some("/cgsentry.slice/quarantine-app")
        );
    }
}
