//! GPU collection through NVML (nvml-wrapper): per device memory, utilisation,
//! temperature and power; per process GPU memory and SM/memory utilisation, joined to
//! the process's cgroup (the process table, else `/proc/<pid>/cgroup`).
//!
//! A machine without NVML, or without devices, is normal: [`GpuCollector::open`] says so
//! once (`GPU: NVML not available: <reason>`) and the agent runs without GPU data. A
//! missing library is final; a driver that is not loaded yet is retried every
//! [`RETRY_EVERY`], silently. A device that falls off the bus (`GPU_IS_LOST`) is
//! reported once and kept in the snapshot as `lost`; a query a device does not support
//! is not asked again; any other error is logged once per device, query and error.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use nvml_wrapper::{
    Nvml,
    enum_wrappers::device::TemperatureSensor,
    enums::device::UsedGpuMemory,
    error::NvmlError,
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{cgroupfs::cgroup_of_pid, collect::ProcessSample};

/// The library NVML's own loader looks for.
pub const DEFAULT_LIB: &str = "libnvidia-ml.so.1";
/// How often an NVML that failed to start (driver not loaded, no devices) is tried again.
pub const RETRY_EVERY: Duration = Duration::from_mins(5);
/// Samples are taken at most this often; ticks in between (early ticks on a memory
/// burst) reuse the last one. NVML's own counters update about once a second.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(900);

/// One GPU in one sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuDevice {
    /// NVML index (not necessarily the CUDA index).
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// The device fell off the bus (`GPU_IS_LOST`): nothing else is known of it.
    pub lost: bool,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    /// Percent of the last sample period a kernel ran.
    pub util_percent: Option<u32>,
    /// Percent of the period device memory was read or written.
    pub memory_util_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
}

impl GpuDevice {
    /// Memory used, percent of the device's.
    #[must_use]
    pub fn memory_percent(&self) -> Option<f64> {
        let (used, total) = (self.memory_used_bytes?, self.memory_total_bytes?);
        (total > 0).then(|| used as f64 * 100.0 / total as f64)
    }

    /// Memory not used yet, bytes.
    #[must_use]
    pub fn memory_free_bytes(&self) -> Option<u64> {
        Some(
            self.memory_total_bytes?
                .saturating_sub(self.memory_used_bytes?),
        )
    }
}

/// What became of a process NVML lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    Running,
    /// Exited, not reaped: its GPU memory is freed only when its parent reaps it.
    Zombie,
    /// No such process in our PID namespace: it exited and the driver still holds its
    /// memory, or it lives in another PID namespace.
    Gone,
}

/// One process on one GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// NVML index of the device.
    pub device: u32,
    /// `None` where the driver cannot tell (some virtualised setups, Windows WDDM).
    pub used_bytes: Option<u64>,
    /// Listed as a graphics (not compute) process.
    pub graphics: bool,
    /// Mean SM and memory utilisation over the samples since the last read, percent;
    /// 0 when the device reports and this process had none, `None` where unsupported.
    pub sm_util_percent: Option<u32>,
    pub mem_util_percent: Option<u32>,
    pub cgroup: Option<String>,
    pub comm: Option<String>,
    pub state: ProcState,
}

/// Everything NVML said in one sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuSnapshot {
    /// Sample number, 1 for the first: a tick that reuses a sample sees the same number.
    pub seq: u64,
    pub driver: Option<String>,
    pub devices: Vec<GpuDevice>,
    pub processes: Vec<GpuProcess>,
}

/// GPU use of one cgroup (its own processes), per device.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CgroupGpu {
    pub memory_bytes: u64,
    /// Sum of its processes' SM utilisation on that device, percent.
    pub sm_util_percent: u32,
    pub processes: u32,
}

impl GpuSnapshot {
    #[must_use]
    pub fn device(&self, index: u32) -> Option<&GpuDevice> {
        self.devices.iter().find(|d| d.index == index)
    }

    /// GPU memory and utilisation per cgroup and device, from the processes' own cgroups.
    #[must_use]
    pub fn by_cgroup(&self) -> BTreeMap<&str, BTreeMap<u32, CgroupGpu>> {
        let mut out: BTreeMap<&str, BTreeMap<u32, CgroupGpu>> = BTreeMap::new();
        for p in &self.processes {
            let Some(cgroup) = p.cgroup.as_deref() else {
                continue;
            };
            let e = out.entry(cgroup).or_default().entry(p.device).or_default();
            e.memory_bytes += p.used_bytes.unwrap_or(0);
            e.sm_util_percent += p.sm_util_percent.unwrap_or(0);
            e.processes += 1;
        }
        out
    }

    /// GPU memory held per device by processes in `cgroup` or below it.
    #[must_use]
    pub fn subtree_memory(&self, cgroup: &str) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for p in &self.processes {
            if p.cgroup.as_deref().is_some_and(|c| in_subtree(cgroup, c)) {
                *out.entry(p.device).or_default() += p.used_bytes.unwrap_or(0);
            }
        }
        out
    }
}

/// Whether `path` is `root` or below it.
#[must_use]
pub fn in_subtree(root: &str, path: &str) -> bool {
    root == "/"
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Queries a device may not support; once unsupported, never asked again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Query {
    Memory,
    Utilization,
    Temperature,
    Power,
    Compute,
    Graphics,
    ProcessUtilization,
}

impl Query {
    fn name(self) -> &'static str {
        match self {
            Query::Memory => "memory info",
            Query::Utilization => "utilisation",
            Query::Temperature => "temperature",
            Query::Power => "power",
            Query::Compute => "compute processes",
            Query::Graphics => "graphics processes",
            Query::ProcessUtilization => "process utilisation",
        }
    }
}

#[derive(Debug, Default)]
struct DeviceMemo {
    uuid: String,
    name: String,
    unsupported: HashSet<Query>,
    lost: bool,
    /// Newest process-utilisation sample seen, µs (NVML's clock).
    last_seen_us: u64,
}

enum Source {
    Ready(Box<Nvml>),
    /// Not available; retried at `retry_at` when set.
    Unavailable {
        reason: String,
        retry_at: Option<Instant>,
    },
    Off,
}

/// Where the collector stands, for status lines and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuStatus {
    Ready { devices: u32 },
    Unavailable(String),
    Off,
}

/// Samples NVML; see the module doc.
pub struct GpuCollector {
    source: Source,
    lib: Option<PathBuf>,
    proc_root: PathBuf,
    devices: HashMap<u32, DeviceMemo>,
    logged: HashSet<String>,
    last: Option<(Instant, Arc<GpuSnapshot>)>,
    driver: Option<String>,
    seq: u64,
    min_interval: Duration,
}

/// Why NVML could not start, in words an operator can act on.
fn describe(e: &NvmlError, lib: &str) -> String {
    match e {
        NvmlError::LibloadingError(e) => format!("{lib} cannot be loaded ({e})"),
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".into(),
        NvmlError::LibRmVersionMismatch => {
            "the NVIDIA kernel module and libnvidia-ml versions differ (reboot or reload the driver)"
                .into()
        }
        e => format!("{e}"),
    }
}

impl GpuCollector {
    /// A collector that never samples (`--nvml-lib off`).
    #[must_use]
    pub fn off() -> Self {
        Self::with(Source::Off, None, Path::new("/proc"))
    }

    fn with(source: Source, lib: Option<PathBuf>, proc_root: &Path) -> Self {
        Self {
            source,
            lib,
            proc_root: proc_root.to_owned(),
            devices: HashMap::new(),
            logged: HashSet::new(),
            last: None,
            driver: None,
            seq: 0,
            min_interval: MIN_SAMPLE_INTERVAL,
        }
    }

    /// Loads NVML from `lib` (default: [`DEFAULT_LIB`] through the loader's search path)
    /// and says once, at info level, what it found.
    #[must_use]
    pub fn open(lib: Option<&Path>, proc_root: &Path) -> Self {
        let mut c = Self::with(
            Source::Unavailable {
                reason: String::new(),
                retry_at: None,
            },
            lib.map(Path::to_owned),
            proc_root,
        );
        c.start(true);
        c
    }

    /// Samples at most this often (tests use zero).
    pub fn set_min_interval(&mut self, d: Duration) {
        self.min_interval = d;
    }

    fn lib_name(&self) -> String {
        self.lib
            .as_deref()
            .map_or_else(|| DEFAULT_LIB.to_owned(), |p| p.display().to_string())
    }

    fn start(&mut self, first: bool) {
        let lib = self.lib_name();
        let init = match &self.lib {
            Some(p) => Nvml::builder().lib_path(OsStr::new(p.as_os_str())).init(),
            None => Nvml::init(),
        };
        let (source, message) = match init {
            Ok(nvml) => match nvml.device_count() {
                Ok(0) => (
                    Source::Unavailable {
                        reason: "no GPU devices".into(),
                        retry_at: Some(Instant::now() + RETRY_EVERY),
                    },
                    "GPU: NVML not available: no GPU devices".to_owned(),
                ),
                Ok(n) => {
                    self.driver = nvml.sys_driver_version().ok();
                    let msg = format!(
                        "GPU: NVML ready: {n} device(s), driver {}",
                        self.driver.as_deref().unwrap_or("unknown")
                    );
                    (Source::Ready(Box::new(nvml)), msg)
                }
                Err(e) => {
                    let reason = format!("listing devices failed: {e}");
                    let msg = format!("GPU: NVML not available: {reason}");
                    (
                        Source::Unavailable {
                            reason,
                            retry_at: Some(Instant::now() + RETRY_EVERY),
                        },
                        msg,
                    )
                }
            },
            Err(e) => {
                let reason = describe(&e, &lib);
                // A library that is not there will not appear: no retries.
                let retry_at = (!matches!(e, NvmlError::LibloadingError(_)))
                    .then(|| Instant::now() + RETRY_EVERY);
                let msg = format!("GPU: NVML not available: {reason}");
                (Source::Unavailable { reason, retry_at }, msg)
            }
        };
        if first {
            info!("{message}");
        } else if matches!(source, Source::Ready(_)) {
            info!("{message} (after an earlier failure)");
        } else {
            debug!("{message} (retried)");
        }
        self.source = source;
    }

    #[must_use]
    pub fn status(&self) -> GpuStatus {
        match &self.source {
            Source::Ready(nvml) => GpuStatus::Ready {
                devices: nvml.device_count().unwrap_or(0),
            },
            Source::Unavailable { reason, .. } => GpuStatus::Unavailable(reason.clone()),
            Source::Off => GpuStatus::Off,
        }
    }

    fn once(&mut self, key: String, message: impl FnOnce() -> String) {
        if self.logged.insert(key) {
            warn!("{}", message());
        }
    }

    /// A sample, or the last one when it is younger than the minimum interval; `None`
    /// without NVML. `processes` (sorted by pid) gives cgroups and names; processes not
    /// in it are looked up in /proc.
    pub fn sample(&mut self, processes: &[ProcessSample]) -> Option<Arc<GpuSnapshot>> {
        if let Source::Unavailable {
            retry_at: Some(at), ..
        } = self.source
            && Instant::now() >= at
        {
            self.start(false);
        }
        if !matches!(self.source, Source::Ready(_)) {
            return None;
        }
        if let Some((at, snap)) = &self.last
            && at.elapsed() < self.min_interval
        {
            return Some(Arc::clone(snap));
        }
        let snap = Arc::new(self.read(processes)?);
        self.last = Some((Instant::now(), Arc::clone(&snap)));
        Some(snap)
    }

    fn read(&mut self, processes: &[ProcessSample]) -> Option<GpuSnapshot> {
        let Source::Ready(nvml) = std::mem::replace(&mut self.source, Source::Off) else {
            return None;
        };
        let out = self.read_with(&nvml, processes);
        self.source = Source::Ready(nvml);
        out
    }

    fn read_with(&mut self, nvml: &Nvml, processes: &[ProcessSample]) -> Option<GpuSnapshot> {
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                self.once(format!("count {e}"), || {
                    format!("GPU: cannot list devices: {e}")
                });
                return None;
            }
        };
        self.seq += 1;
        let mut snap = GpuSnapshot {
            seq: self.seq,
            driver: self.driver.clone(),
            ..GpuSnapshot::default()
        };
        for index in 0..count {
            let (device, procs) = self.read_device(nvml, index);
            snap.devices.push(device);
            snap.processes.extend(procs);
        }
        for p in &mut snap.processes {
            self.join(p, processes);
        }
        Some(snap)
    }

    /// The value of a query, remembering unsupported ones and logging other errors once.
    fn ask<T>(
        &mut self,
        index: u32,
        query: Query,
        f: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Result<Option<T>, ()> {
        let memo = self.devices.entry(index).or_default();
        if memo.unsupported.contains(&query) {
            return Ok(None);
        }
        match f() {
            Ok(v) => Ok(Some(v)),
            Err(NvmlError::GpuLost) => Err(()),
            Err(NvmlError::NotSupported | NvmlError::FunctionNotFound) => {
                debug!("GPU {index}: {} not supported", query.name());
                memo.unsupported.insert(query);
                Ok(None)
            }
            Err(e) => {
                self.once(format!("{index} {query:?} {e}"), || {
                    format!("GPU {index}: reading {} failed: {e}", query.name())
                });
                Ok(None)
            }
        }
    }

    fn lost(&mut self, index: u32) -> GpuDevice {
        let memo = self.devices.entry(index).or_default();
        if !memo.lost {
            memo.lost = true;
            warn!(
                "GPU {index} ({} {}) is lost: it fell off the bus or stopped answering; its \
                 processes are unknown until it is back",
                memo.name, memo.uuid
            );
        }
        GpuDevice {
            index,
            uuid: memo.uuid.clone(),
            name: memo.name.clone(),
            lost: true,
            memory_total_bytes: None,
            memory_used_bytes: None,
            util_percent: None,
            memory_util_percent: None,
            temperature_c: None,
            power_watts: None,
        }
    }

    fn read_device(&mut self, nvml: &Nvml, index: u32) -> (GpuDevice, Vec<GpuProcess>) {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(NvmlError::GpuLost) => return (self.lost(index), Vec::new()),
            Err(e) => {
                self.once(format!("{index} handle {e}"), || {
                    format!("GPU {index}: cannot open the device: {e}")
                });
                return (self.lost(index), Vec::new());
            }
        };
        let memo = self.devices.entry(index).or_default();
        if memo.uuid.is_empty() {
            memo.uuid = device
                .uuid()
                .unwrap_or_else(|_| format!("GPU-index-{index}"));
            memo.name = device.name().unwrap_or_else(|_| "unknown".into());
        }
        let result = (|| -> Result<(GpuDevice, Vec<GpuProcess>), ()> {
            let memory = self.ask(index, Query::Memory, || device.memory_info())?;
            let util = self.ask(index, Query::Utilization, || device.utilization_rates())?;
            let temperature = self.ask(index, Query::Temperature, || {
                device.temperature(TemperatureSensor::Gpu)
            })?;
            let power = self.ask(index, Query::Power, || device.power_usage())?;
            let compute = self.ask(index, Query::Compute, || device.running_compute_processes())?;
            let graphics = self.ask(index, Query::Graphics, || {
                device.running_graphics_processes()
            })?;
            let since = self.devices.get(&index).map_or(0, |m| m.last_seen_us);
            let samples = self.ask(index, Query::ProcessUtilization, || {
                match device.process_utilization_stats(since) {
                    // No process ran a kernel since `since`.
                    Err(NvmlError::NotFound) => Ok(Vec::new()),
                    r => r,
                }
            })?;
            let memo = self.devices.entry(index).or_default();
            if memo.lost {
                memo.lost = false;
                info!("GPU {index} ({} {}) answers again", memo.name, memo.uuid);
            }
            let dev = GpuDevice {
                index,
                uuid: memo.uuid.clone(),
                name: memo.name.clone(),
                lost: false,
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                util_percent: util.as_ref().map(|u| u.gpu),
                memory_util_percent: util.as_ref().map(|u| u.memory),
                temperature_c: temperature,
                power_watts: power.map(|mw| f64::from(mw) / 1000.0),
            };
            if let Some(s) = samples
                .as_ref()
                .and_then(|s| s.iter().map(|s| s.timestamp).max())
            {
                memo.last_seen_us = memo.last_seen_us.max(s);
            }
            let procs = processes_of(index, compute, graphics, samples.as_deref());
            Ok((dev, procs))
        })();
        result.unwrap_or_else(|()| (self.lost(index), Vec::new()))
    }

    /// Cgroup, name and state of a GPU process.
    fn join(&self, p: &mut GpuProcess, processes: &[ProcessSample]) {
        let dir = self.proc_root.join(p.pid.to_string());
        p.state = match std::fs::read_to_string(dir.join("stat")) {
            Ok(stat) if stat_state(&stat) == Some('Z') => ProcState::Zombie,
            Ok(_) => ProcState::Running,
            Err(_) => ProcState::Gone,
        };
        if let Ok(i) = processes.binary_search_by_key(&p.pid, |q| q.pid) {
            p.cgroup.clone_from(&processes[i].cgroup);
            p.comm = Some(processes[i].comm.clone());
        }
        if p.state != ProcState::Gone {
            if p.cgroup.is_none() {
                p.cgroup = cgroup_of_pid(&self.proc_root, p.pid);
            }
            if p.comm.is_none() {
                p.comm = std::fs::read_to_string(dir.join("comm"))
                    .ok()
                    .map(|c| c.trim_end().to_owned());
            }
        }
    }
}

/// The state letter of a `/proc/<pid>/stat` line (after the parenthesised name, which
/// may itself hold parentheses and spaces).
fn stat_state(stat: &str) -> Option<char> {
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
}

/// One entry per listed process, with its utilisation samples averaged.
fn processes_of(
    device: u32,
    compute: Option<Vec<ProcessInfo>>,
    graphics: Option<Vec<ProcessInfo>>,
    samples: Option<&[ProcessUtilizationSample]>,
) -> Vec<GpuProcess> {
    let mut util: HashMap<u32, (u32, u32, u32)> = HashMap::new();
    for s in samples.unwrap_or_default() {
        let e = util.entry(s.pid).or_default();
        *e = (e.0 + s.sm_util, e.1 + s.mem_util, e.2 + 1);
    }
    let mean = |pid: u32, which: fn(&(u32, u32, u32)) -> u32| -> Option<u32> {
        samples?;
        Some(util.get(&pid).map_or(0, |u| which(u) / u.2.max(1)))
    };
    let mut out: Vec<GpuProcess> = Vec::new();
    let listed = compute
        .into_iter()
        .flatten()
        .map(|p| (p, false))
        .chain(graphics.into_iter().flatten().map(|p| (p, true)));
    for (p, is_graphics) in listed {
        let used = match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        };
        // A process doing both compute and graphics is listed twice with the same memory.
        if let Some(e) = out.iter_mut().find(|q| q.pid == p.pid) {
            e.used_bytes = e.used_bytes.max(used);
            continue;
        }
        out.push(GpuProcess {
            pid: p.pid,
            device,
            used_bytes: used,
            graphics: is_graphics,
            sm_util_percent: mean(p.pid, |u| u.0),
            mem_util_percent: mean(p.pid, |u| u.1),
            cgroup: None,
            comm: None,
            state: ProcState::Running,
        });
    }
    out
}

/// What the loop asks of a GPU sampler ([`GpuCollector`]; tests use others).
pub trait Sampler: Send + 'static {
    fn sample(&mut self, processes: &[ProcessSample]) -> Option<Arc<GpuSnapshot>>;
    fn status(&self) -> GpuStatus;
}

impl Sampler for GpuCollector {
    fn sample(&mut self, processes: &[ProcessSample]) -> Option<Arc<GpuSnapshot>> {
        GpuCollector::sample(self, processes)
    }

    fn status(&self) -> GpuStatus {
        GpuCollector::status(self)
    }
}

/// How long the loop waits for a GPU sample before it goes on without one.
pub const SAMPLE_DEADLINE: Duration = Duration::from_millis(250);
/// A sample older than this is not used (detectors would see a frozen series).
const STALE_AFTER: Duration = Duration::from_secs(5);

type Answer = (Option<Arc<GpuSnapshot>>, GpuStatus);

/// NVML off the control loop. A thread owns the sampler; each tick the loop hands it
/// the process table and waits at most [`SAMPLE_DEADLINE`] for the sample. An NVML
/// call that hangs in the driver (a GPU falling off the bus, a driver upgrade) stalls
/// that thread only: the loop goes on with the last sample while it is fresh, then
/// without GPU data, says so in the status, and asks again only once the thread
/// answers.
pub struct GpuWorker {
    tx: Option<std::sync::mpsc::SyncSender<Arc<Vec<ProcessSample>>>>,
    rx: std::sync::mpsc::Receiver<Answer>,
    /// When the request still unanswered was made.
    asked: Option<Instant>,
    last: Option<(Instant, Arc<GpuSnapshot>)>,
    status: GpuStatus,
    deadline: Duration,
    warned: bool,
}

impl GpuWorker {
    /// Starts the thread (`cgsentry-nvml`) with `sampler`; without NVML (`Off`, or a
    /// thread that cannot start) nothing runs and samples are `None`.
    #[must_use]
    pub fn start(sampler: impl Sampler) -> Self {
        Self::with_deadline(sampler, SAMPLE_DEADLINE)
    }

    /// [`GpuWorker::start`] with another deadline (tests).
    #[must_use]
    pub fn with_deadline(mut sampler: impl Sampler, deadline: Duration) -> Self {
        let status = sampler.status();
        let (answer_tx, rx) = std::sync::mpsc::sync_channel::<Answer>(1);
        let mut worker = Self {
            tx: None,
            rx,
            asked: None,
            last: None,
            status: status.clone(),
            deadline,
            warned: false,
        };
        if status == GpuStatus::Off {
            return worker;
        }
        let (tx, requests) = std::sync::mpsc::sync_channel::<Arc<Vec<ProcessSample>>>(1);
        let spawned = std::thread::Builder::new()
            .name("cgsentry-nvml".into())
            .spawn(move || {
                for processes in requests {
                    let snap = sampler.sample(&processes);
                    if answer_tx.send((snap, sampler.status())).is_err() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => worker.tx = Some(tx),
            Err(e) => worker.status = GpuStatus::Unavailable(format!("cannot start a thread: {e}")),
        }
        worker
    }

    fn take(&mut self, answer: Answer) {
        let (snap, status) = answer;
        self.asked = None;
        self.status = status;
        self.last = snap.map(|s| (Instant::now(), s));
        if self.warned {
            info!("GPU: NVML answers again");
            self.warned = false;
        }
    }

    /// This tick's GPU sample: a new one if NVML answers within the deadline, else the
    /// last one while it is fresh, else `None`. Never waits longer than the deadline.
    pub fn sample(&mut self, processes: &Arc<Vec<ProcessSample>>) -> Option<Arc<GpuSnapshot>> {
        let tx = self.tx.as_ref()?;
        if self.asked.is_none() {
            match tx.try_send(Arc::clone(processes)) {
                Ok(()) => self.asked = Some(Instant::now()),
                Err(_) => return self.fresh(),
            }
            match self.rx.recv_timeout(self.deadline) {
                Ok(answer) => self.take(answer),
                Err(_) => self.overdue(),
            }
        } else {
            // Still waiting on the last request: whatever it brings, no new one.
            match self.rx.try_recv() {
                Ok(answer) => self.take(answer),
                Err(_) => self.overdue(),
            }
        }
        self.fresh()
    }

    fn overdue(&mut self) {
        let Some(asked) = self.asked else { return };
        let waited = asked.elapsed();
        if waited >= STALE_AFTER {
            self.status = GpuStatus::Unavailable(format!(
                "NVML has not answered for {:.0} s (a hung driver call): running without GPU data",
                waited.as_secs_f64()
            ));
            if !self.warned {
                warn!(
                    "GPU: NVML has not answered for {:.0} s: running without GPU data until it does",
                    waited.as_secs_f64()
                );
                self.warned = true;
            }
        }
    }

    fn fresh(&self) -> Option<Arc<GpuSnapshot>> {
        self.last
            .as_ref()
            .filter(|(at, _)| at.elapsed() < STALE_AFTER)
            .map(|(_, s)| Arc::clone(s))
    }

    /// Where NVML stands (a hung one included).
    #[must_use]
    pub fn status(&self) -> GpuStatus {
        self.status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_state_survives_odd_names() {
        assert_eq!(stat_state("42 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(stat_state("42 (python3) S 1 2"), Some('S'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn subtree_and_by_cgroup() {
        let p = |pid, cgroup: &str, device, mib: u64, sm| GpuProcess {
            pid,
            device,
            used_bytes: Some(mib << 20),
            graphics: false,
            sm_util_percent: Some(sm),
            mem_util_percent: None,
            cgroup: Some(cgroup.into()),
            comm: None,
            state: ProcState::Running,
        };
        let snap = GpuSnapshot {
            processes: vec![
                p(1, "/ml/a", 0, 100, 10),
                p(2, "/ml/a", 0, 50, 5),
                p(3, "/ml/b", 1, 10, 0),
                p(4, "/mlx", 0, 1, 0),
            ],
            ..GpuSnapshot::default()
        };
        let by = snap.by_cgroup();
        assert_eq!(by["/ml/a"][&0].memory_bytes, 150 << 20);
        assert_eq!(by["/ml/a"][&0].sm_util_percent, 15);
        assert_eq!(by["/ml/a"][&0].processes, 2);
        assert_eq!(
            snap.subtree_memory("/ml"),
            BTreeMap::from([(0, 150 << 20), (1, 10 << 20)])
        );
        assert_eq!(
            snap.subtree_memory("/"),
            BTreeMap::from([(0, 151 << 20), (1, 10 << 20)])
        );
    }

    // ---- against the fake libnvidia-ml.so.1 (tests/fake-nvml), through nvml-wrapper's
    // real loading path ----

    use fake_nvml::FakeNvml;

    const MIB: u64 = 1 << 20;

    fn collector(fake: &FakeNvml) -> GpuCollector {
        let mut c = GpuCollector::open(Some(&fake.lib_path()), Path::new("/proc"));
        c.set_min_interval(Duration::ZERO);
        c
    }

    fn own_cgroup() -> String {
        cgroup_of_pid(Path::new("/proc"), std::process::id()).expect("own v2 cgroup")
    }

    #[test]
    fn processes_are_attributed_to_their_cgroups_and_states() {
        let me = std::process::id();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Exits at once and is not waited for until the end: a zombie meanwhile.
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat_state(&std::fs::read_to_string(format!("/proc/{}/stat", zombie.id())).unwrap())
            != Some('Z')
        {
            assert!(Instant::now() < deadline, "true did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        let gone = 4_194_303; // above any pid_max in use here
        let fake = FakeNvml::new(&format!(
            "device 0 uuid=GPU-aaaa name=\"NVIDIA H100 80GB HBM3\" total_mib=81559\n\
             device 1 uuid=GPU-bbbb name=\"Fake L4\" total_mib=23034\n\
             frame\n\
             gpu 0 used_mib=5000 util=61 mem_util=30 temp=55 power_mw=312500\n\
             proc 0 pid={me} used_mib=4000 sm=40 mem=20\n\
             proc 0 pid={} used_mib=500 kind=graphics\n\
             proc 1 pid={} used_mib=300\n\
             proc 1 pid={gone} used_mib=200\n\
             proc 1 pid={me} used=na sm=3 mem=1\n",
            sleeper.id(),
            zombie.id()
        ))
        .unwrap();
        let mut c = collector(&fake);
        assert_eq!(c.status(), GpuStatus::Ready { devices: 2 });
        // The process table knows only the sleeper (with a name it would not have in
        // /proc): the table wins; the rest comes from /proc.
        let table = vec![ProcessSample {
            pid: sleeper.id(),
            ppid: me,
            comm: "from-table".into(),
            exe: None,
            uid: None,
            user: None,
            rss_bytes: 0,
            cgroup: Some("/from/table".into()),
            starttime: 0,
            threads: None,
            cpu_ticks: 0,
            cpu_percent: None,
            read_tick: 0,
            read_ns: 0,
        }];
        let snap = c.sample(&table).expect("a sample");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        zombie.wait().unwrap();

        assert_eq!(snap.seq, 1);
        assert_eq!(snap.driver.as_deref(), Some("550.54.15"));
        let d0 = &snap.devices[0];
        assert_eq!(
            (d0.index, d0.uuid.as_str(), d0.name.as_str()),
            (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3")
        );
        assert_eq!(d0.memory_total_bytes, Some(81_559 * MIB));
        assert_eq!(d0.memory_used_bytes, Some(5000 * MIB));
        assert_eq!(
            (d0.util_percent, d0.memory_util_percent),
            (Some(61), Some(30))
        );
        assert_eq!((d0.temperature_c, d0.power_watts), (Some(55), Some(312.5)));
        // Device 1 has no `gpu` line: used is the sum of its processes.
        assert_eq!(snap.devices[1].memory_used_bytes, Some(500 * MIB));

        let find = |pid, dev| {
            snap.processes
                .iter()
                .find(|p| p.pid == pid && p.device == dev)
                .unwrap()
        };
        let mine = find(me, 0);
        assert_eq!(mine.cgroup.as_deref(), Some(own_cgroup().as_str()));
        assert_eq!(mine.used_bytes, Some(4000 * MIB));
        assert_eq!(
            (mine.sm_util_percent, mine.mem_util_percent),
            (Some(40), Some(20))
        );
        assert_eq!(mine.state, ProcState::Running);
        let s = find(sleeper.id(), 0);
        assert!(s.graphics);
        assert_eq!(
            (s.cgroup.as_deref(), s.comm.as_deref()),
            (Some("/from/table"), Some("from-table"))
        );
        // Supported but no sample for it this period: it ran no kernel.
        assert_eq!(s.sm_util_percent, Some(0));
        let z = find(zombie.id(), 1);
        assert_eq!(z.state, ProcState::Zombie);
        assert_eq!(z.cgroup.as_deref(), Some(own_cgroup().as_str()));
        let g = find(gone, 1);
        assert_eq!((g.state, g.cgroup.as_deref()), (ProcState::Gone, None));
        assert_eq!(find(me, 1).used_bytes, None, "NVML_VALUE_NOT_AVAILABLE");

        let by = snap.by_cgroup();
        assert_eq!(by[own_cgroup().as_str()][&0].memory_bytes, 4000 * MIB);
        assert_eq!(by["/from/table"][&0].memory_bytes, 500 * MIB);
    }

    #[test]
    fn frames_advance_per_sample_and_utilisation_is_per_period() {
        let me = std::process::id();
        let fake = FakeNvml::new(&format!(
            "device 0 total_mib=1000\n\
             frame\nproc 0 pid={me} used_mib=100 sm=50\n\
             frame\nproc 0 pid={me} used_mib=200 sm=70\n\
             frame\nproc 0 pid={me} used_mib=300\n"
        ))
        .unwrap();
        let mut c = collector(&fake);
        let used: Vec<(u64, Option<u64>, Option<u32>)> = (0..4)
            .map(|_| {
                let s = c.sample(&[]).unwrap();
                (
                    s.seq,
                    s.processes[0].used_bytes.map(|b| b / MIB),
                    s.processes[0].sm_util_percent,
                )
            })
            .collect();
        // The last frame repeats; its process ran no kernel (no sample) and the driver
        // returns NOT_FOUND for "nothing since the last read": 0, not an error.
        assert_eq!(
            used,
            [
                (1, Some(100), Some(50)),
                (2, Some(200), Some(70)),
                (3, Some(300), Some(0)),
                (4, Some(300), Some(0))
            ]
        );
    }

    #[test]
    fn samples_are_reused_within_the_minimum_interval() {
        let fake = FakeNvml::new("device 0\nframe\nframe\n").unwrap();
        let mut c = GpuCollector::open(Some(&fake.lib_path()), Path::new("/proc"));
        c.set_min_interval(Duration::from_hours(1));
        let a = c.sample(&[]).unwrap();
        let b = c.sample(&[]).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(fake.calls("nvmlDeviceGetMemoryInfo_v2"), 1);
    }

    #[test]
    fn a_lost_gpu_is_reported_kept_and_found_again() {
        let me = std::process::id();
        let fake = FakeNvml::new(&format!(
            "device 0 uuid=GPU-aaaa\ndevice 1 uuid=GPU-bbbb\n\
             frame\nproc 0 pid={me} used_mib=10\nproc 1 pid={me} used_mib=20\n\
             frame\nproc 0 pid={me} used_mib=10\nerror 1 * GPU_IS_LOST\n\
             frame\nproc 0 pid={me} used_mib=10\nerror 1 nvmlDeviceGetComputeRunningProcesses_v3 GPU_IS_LOST\n\
             frame\nproc 0 pid={me} used_mib=10\nproc 1 pid={me} used_mib=30\n"
        ))
        .unwrap();
        let mut c = collector(&fake);
        let lost: Vec<(bool, usize)> = (0..4)
            .map(|_| {
                let s = c.sample(&[]).unwrap();
                assert!(!s.devices[0].lost, "device 0 is unaffected");
                (s.devices[1].lost, s.processes.len())
            })
            .collect();
        assert_eq!(lost, [(false, 2), (true, 1), (true, 1), (false, 2)]);
        let s = c.sample(&[]).unwrap();
        assert_eq!(s.devices[1].uuid, "GPU-bbbb", "known across the loss");
        assert_eq!(s.processes[1].used_bytes, Some(30 * MIB));
    }

    #[test]
    fn unsupported_queries_are_not_asked_again_and_other_errors_leave_a_gap() {
        let fake = FakeNvml::new(
            "device 0\n\
             frame\nerror 0 nvmlDeviceGetTemperature NOT_SUPPORTED\nerror 0 nvmlDeviceGetProcessUtilization NOT_SUPPORTED\n\
             error 0 nvmlDeviceGetPowerUsage UNKNOWN\n\
             frame\n",
        )
        .unwrap();
        let mut c = collector(&fake);
        let a = c.sample(&[]).unwrap();
        let b = c.sample(&[]).unwrap();
        assert_eq!(
            (a.devices[0].temperature_c, b.devices[0].temperature_c),
            (None, None)
        );
        assert_eq!(
            (a.devices[0].power_watts, b.devices[0].power_watts),
            (None, Some(50.0))
        );
        assert_eq!(
            a.devices[0].memory_total_bytes,
            Some(16_384 * MIB),
            "the rest is read"
        );
        assert_eq!(fake.calls("nvmlDeviceGetTemperature"), 1);
        assert_eq!(fake.calls("nvmlDeviceGetProcessUtilization"), 1);
        assert_eq!(fake.calls("nvmlDeviceGetPowerUsage"), 2);
    }

    #[test]
    fn absence_is_said_once_and_not_retried_in_a_storm() {
        let missing = GpuCollector::open(
            Some(Path::new("/nonexistent/libnvidia-ml.so.1")),
            Path::new("/proc"),
        );
        let GpuStatus::Unavailable(reason) = missing.status() else {
            panic!("{:?}", missing.status())
        };
        assert!(
            reason.contains("/nonexistent/libnvidia-ml.so.1 cannot be loaded"),
            "{reason}"
        );
        assert!(matches!(
            missing.source,
            Source::Unavailable { retry_at: None, .. }
        ));

        let fake = FakeNvml::new("init_error DRIVER_NOT_LOADED\n").unwrap();
        let mut c = collector(&fake);
        assert_eq!(
            c.status(),
            GpuStatus::Unavailable("the NVIDIA driver is not loaded".into())
        );
        for _ in 0..100 {
            assert!(c.sample(&[]).is_none());
        }
        assert_eq!(fake.inits(), 1, "retried only every {RETRY_EVERY:?}");

        // Due for a retry, and the driver is there now.
        fake.set_script("device 0\nframe\n").unwrap();
        c.source = Source::Unavailable {
            reason: String::new(),
            retry_at: Some(Instant::now()),
        };
        assert!(c.sample(&[]).is_some());
        assert_eq!(c.status(), GpuStatus::Ready { devices: 1 });

        let none = FakeNvml::new("").unwrap();
        assert_eq!(
            collector(&none).status(),
            GpuStatus::Unavailable("no GPU devices".into())
        );
        assert_eq!(GpuCollector::off().status(), GpuStatus::Off);
    }

    /// A sampler whose NVML call hangs until told otherwise.
    struct Hanging {
        gate: std::sync::mpsc::Receiver<()>,
    }

    impl Sampler for Hanging {
        fn sample(&mut self, _: &[ProcessSample]) -> Option<Arc<GpuSnapshot>> {
            let _ = self.gate.recv();
            Some(Arc::new(GpuSnapshot::default()))
        }

        fn status(&self) -> GpuStatus {
            GpuStatus::Ready { devices: 1 }
        }
    }

    /// An NVML call that hangs never holds the loop longer than the deadline, and no
    /// second request queues behind it; once it answers, samples come again.
    #[test]
    fn a_hung_nvml_never_stalls_the_loop() {
        let (open, gate) = std::sync::mpsc::channel();
        let mut w = GpuWorker::with_deadline(Hanging { gate }, Duration::from_millis(50));
        let procs = Arc::new(Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            assert!(w.sample(&procs).is_none());
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{:?}",
                t.elapsed()
            );
        }
        open.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            got = w.sample(&procs);
            std::thread::sleep(Duration::from_millis(10));
            let _ = open.send(());
        }
        assert!(got.is_some(), "answers again");
        assert_eq!(w.status(), GpuStatus::Ready { devices: 1 });
    }

    /// Off: no thread, no samples.
    #[test]
    fn an_off_worker_samples_nothing() {
        let mut w = GpuWorker::start(GpuCollector::off());
        assert!(w.sample(&Arc::new(Vec::new())).is_none());
        assert_eq!(w.status(), GpuStatus::Off);
    }
}
