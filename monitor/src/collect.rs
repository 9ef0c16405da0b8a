//! The collection stage: one owned [`Snapshot`] per tick, built from the eBPF maps and
//! ring buffer, the cgroup tree, /proc and PSI. No later stage reads the kernel itself.
//!
//! On-CPU time is charged by the eBPF program when a task *leaves* a CPU. A task that
//! never leaves (a spinner on an otherwise idle CPU) would show 0 % for seconds and then
//! a burst. [`StatsAccountant`] therefore also credits the slice still running on each
//! CPU (from the per-CPU `CPU_SLICE` record) and pays that credit back when the slice
//! ends and the map has it, so totals stay exact and each tick shows what happened in it.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use monitor_common::{CgroupStats, RUNQ_BUCKETS, runq_bucket_floor_ns};
use serde::Serialize;
use tracing::warn;

use crate::{
    cgroupfs::{CgroupId, CgroupIndex, CgroupReader, CpuStat, Limit, Pressure, cgroup_of_pid},
    events::{Kind, ProcEvent},
    probes::{EbpfStats, ProbeError, Probes},
};

/// What one CPU is running at the moment of a tick, as resolved by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunningSlice {
    /// Monotonic ns at which the slice started; 0 when no switch was seen yet.
    pub start_ns: u64,
    /// The cgroup of the running task; `None` for the idle task or an unknown one.
    pub cgroup: Option<CgroupId>,
}

#[derive(Clone, Copy, Debug)]
struct Credit {
    start_ns: u64,
    cgroup: CgroupId,
    credited_ns: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Debt {
    ns: u64,
    age: u8,
}

/// A debt not repaid within this many ticks is dropped: the slice was charged to
/// another cgroup (the task moved while running), so there is nothing to repay.
const DEBT_MAX_AGE: u8 = 2;

/// `cur - prev` for every counter. A counter that went backwards means the entry was
/// removed and re-created: then everything it holds is new.
#[must_use]
pub fn stats_delta(cur: &CgroupStats, prev: &CgroupStats) -> CgroupStats {
    if cur.switches < prev.switches || cur.on_cpu_ns < prev.on_cpu_ns || cur.forks < prev.forks {
        return *cur;
    }
    let mut d = CgroupStats {
        on_cpu_ns: cur.on_cpu_ns - prev.on_cpu_ns,
        switches: cur.switches - prev.switches,
        involuntary: cur.involuntary.saturating_sub(prev.involuntary),
        runq_wait_ns: cur.runq_wait_ns.saturating_sub(prev.runq_wait_ns),
        runq_waits: cur.runq_waits.saturating_sub(prev.runq_waits),
        forks: cur.forks - prev.forks,
        execs: cur.execs.saturating_sub(prev.execs),
        exits: cur.exits.saturating_sub(prev.exits),
        reclaim_ns: cur.reclaim_ns.saturating_sub(prev.reclaim_ns),
        reclaims: cur.reclaims.saturating_sub(prev.reclaims),
        runq_hist: [0; RUNQ_BUCKETS],
    };
    for (i, h) in d.runq_hist.iter_mut().enumerate() {
        *h = cur.runq_hist[i].saturating_sub(prev.runq_hist[i]);
    }
    d
}

/// Turns cumulative per-cgroup counters plus the running slices into per-tick deltas.
/// Pure logic: no kernel access, unit-tested below.
#[derive(Debug, Default)]
pub struct StatsAccountant {
    last: HashMap<CgroupId, CgroupStats>,
    credits: Vec<Option<Credit>>,
    debts: HashMap<CgroupId, Debt>,
}

impl StatsAccountant {
    /// Deltas since the previous call. `totals` are the map's cumulative counters read
    /// *before* `slices`; `now_ns` is the monotonic clock read after both; `since_ns`
    /// the previous call's `now_ns` (or when the agent started): a slice that began
    /// earlier is shown only from then on — the part before is not this tick's (at start,
    /// it is from before the agent) and is written off against the map's later charge.
    pub fn tick(
        &mut self,
        totals: &HashMap<CgroupId, CgroupStats>,
        slices: &[RunningSlice],
        now_ns: u64,
        since_ns: u64,
    ) -> HashMap<CgroupId, CgroupStats> {
        let mut deltas: HashMap<CgroupId, CgroupStats> = totals
            .iter()
            .map(|(id, total)| {
                let prev = self.last.get(id).copied().unwrap_or_default();
                (*id, stats_delta(total, &prev))
            })
            .collect();
        self.last.clone_from(totals);

        if self.credits.len() < slices.len() {
            self.credits.resize(slices.len(), None);
        }
        for (credit, slice) in self.credits.iter_mut().zip(slices) {
            match *credit {
                Some(ref mut c)
                    if c.start_ns == slice.start_ns && Some(c.cgroup) == slice.cgroup =>
                {
                    let extra = now_ns
                        .saturating_sub(c.start_ns)
                        .saturating_sub(c.credited_ns);
                    c.credited_ns += extra;
                    deltas.entry(c.cgroup).or_default().on_cpu_ns += extra;
                    continue;
                }
                Some(c) => {
                    // The slice ended: the map charges all of it, part of which we showed.
                    let debt = self.debts.entry(c.cgroup).or_default();
                    debt.ns += c.credited_ns;
                    debt.age = 0;
                }
                None => {}
            }
            *credit = match slice.cgroup {
                Some(cgroup) if slice.start_ns != 0 => {
                    // All of it counts as credited (the map will charge all of it), but
                    // only the part inside this tick is shown.
                    let credited_ns = now_ns.saturating_sub(slice.start_ns);
                    deltas.entry(cgroup).or_default().on_cpu_ns +=
                        now_ns.saturating_sub(slice.start_ns.max(since_ns));
                    Some(Credit {
                        start_ns: slice.start_ns,
                        cgroup,
                        credited_ns,
                    })
                }
                _ => None,
            };
        }

        self.debts.retain(|id, debt| {
            if let Some(delta) = deltas.get_mut(id) {
                let paid = debt.ns.min(delta.on_cpu_ns);
                delta.on_cpu_ns -= paid;
                debt.ns -= paid;
            }
            debt.age += 1;
            debt.ns > 0 && debt.age <= DEBT_MAX_AGE
        });
        deltas
    }

    /// Drops all state about a cgroup that no longer exists.
    pub fn forget(&mut self, id: CgroupId) {
        self.last.remove(&id);
        self.debts.remove(&id);
        for credit in &mut self.credits {
            if credit.is_some_and(|c| c.cgroup == id) {
                *credit = None;
            }
        }
    }
}

/// The `q` quantile (0..=1) of a run-queue histogram, in µs: the upper bound of the
/// bucket holding it (conservative); `None` without samples.
#[must_use]
pub fn hist_quantile_us(hist: &[u32; RUNQ_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (i, &c) in hist.iter().enumerate() {
        seen += u64::from(c);
        if seen as f64 >= rank {
            let upper = if i + 1 < RUNQ_BUCKETS {
                runq_bucket_floor_ns(i + 1)
            } else {
                runq_bucket_floor_ns(i)
            };
            return Some(upper as f64 / 1000.0);
        }
    }
    None
}

/// Least-squares slope of `(seconds, value)` points, in value units per second;
/// `None` with fewer than 3 points or no time spread.
#[must_use]
pub fn slope_per_s(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den)
}

/// Run-queue waits of one cgroup in one tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunQueue {
    /// Waits that ended (tasks switched in, then out) in this tick.
    pub waits: u64,
    pub mean_us: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Counts per log2 bucket (see `monitor_common::RUNQ_BUCKETS`).
    pub hist: Vec<u32>,
}

/// A cgroup's control files, as read this tick. Each is `None` when the file is absent
/// (controller not enabled) or the cgroup vanished mid-read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CgroupFiles {
    /// `memory.current`, bytes.
    pub memory_current: Option<u64>,
    pub memory_max: Option<Limit>,
    pub memory_high: Option<Limit>,
    /// `memory.events`: low, high, max, oom, `oom_kill`, `oom_group_kill` counts.
    pub memory_events: Option<HashMap<String, u64>>,
    /// `memory.stat`, the keys detectors use: anon, file, shmem, `file_dirty`, sock,
    /// `pgmajfault` (bytes or counts as the kernel gives them).
    pub memory_stat: Option<HashMap<String, u64>>,
    pub memory_pressure: Option<Pressure>,
    pub cpu_pressure: Option<Pressure>,
    pub io_pressure: Option<Pressure>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<Limit>,
    pub cpu_stat: Option<CpuStat>,
}

const MEMORY_STAT_KEYS: &[&str] = &["anon", "file", "shmem", "file_dirty", "sock", "pgmajfault"];

impl CgroupFiles {
    /// Reads every file of `rel`; unreadable or malformed files are logged once per
    /// call site at debug level and left `None`.
    #[must_use]
    pub fn read(reader: &CgroupReader, rel: &str) -> Self {
        fn ok<T>(r: Result<Option<T>, crate::cgroupfs::CgroupError>) -> Option<T> {
            r.unwrap_or_else(|e| {
                tracing::debug!("{e}");
                None
            })
        }
        Self {
            memory_current: ok(reader.read_u64(rel, "memory.current")),
            memory_max: ok(reader.read_limit(rel, "memory.max")),
            memory_high: ok(reader.read_limit(rel, "memory.high")),
            memory_events: ok(reader.read_keyed(rel, "memory.events")),
            memory_stat: ok(reader.read_keyed(rel, "memory.stat")).map(|mut m| {
                m.retain(|k, _| MEMORY_STAT_KEYS.contains(&k.as_str()));
                m
            }),
            memory_pressure: ok(reader.read_pressure(rel, "memory.pressure")),
            cpu_pressure: ok(reader.read_pressure(rel, "cpu.pressure")),
            io_pressure: ok(reader.read_pressure(rel, "io.pressure")),
            pids_current: ok(reader.read_u64(rel, "pids.current")),
            pids_max: ok(reader.read_limit(rel, "pids.max")),
            cpu_stat: ok(reader.read_cpu_stat(rel)),
        }
    }
}

/// One cgroup in one tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CgroupSample {
    /// cgroup v2 id (inode of its directory).
    pub id: CgroupId,
    /// Path relative to the v2 root ("/" is the root); `None` when the cgroup was
    /// deleted before it could be resolved.
    pub path: Option<String>,
    /// On-CPU time in this tick, nanoseconds.
    pub on_cpu_ns: u64,
    /// CPU use in percent of one CPU (200 = two CPUs busy).
    pub cpu_percent: f64,
    /// Tasks switched out in this tick, and of those, while still runnable.
    pub switches: u64,
    pub involuntary_switches: u64,
    pub runq: RunQueue,
    /// Tasks created, execs and process exits in this tick.
    pub forks: u64,
    pub execs: u64,
    pub exits: u64,
    pub forks_per_s: f64,
    /// Time stalled in direct/memcg reclaim in this tick, ms, and per second of tick.
    pub reclaim_stall_ms: f64,
    pub reclaim_ms_per_s: f64,
    pub reclaims: u64,
    /// Slope of `memory.current` over the last samples, MiB/s.
    pub memory_trend_mib_per_s: Option<f64>,
    pub files: Arc<CgroupFiles>,
    /// Whether `files` were read in this tick. Else they are the last read of a cgroup
    /// with no activity since: idle cgroups are checked every `IDLE_FILES_EVERY` ticks
    /// through `memory.current` and `pids.current`, and read again when either moved.
    pub files_fresh: bool,
    /// Created since the previous tick (absent from its complete walk of the tree): its
    /// memory and tasks were 0 then, which the detectors may count as a point (a
    /// workload started as a new unit has a past of one tick, not none).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub born: bool,
}

/// Machine-wide memory and pressure.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Machine {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub cpu_pressure: Option<Pressure>,
    pub memory_pressure: Option<Pressure>,
    pub io_pressure: Option<Pressure>,
}

/// One `Key: N kB` value of /proc/meminfo's text, in bytes.
#[must_use]
pub fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|v| v * 1024)
}

impl Machine {
    fn read(proc_root: &std::path::Path) -> Self {
        let meminfo = std::fs::read_to_string(proc_root.join("meminfo")).unwrap_or_default();
        let kib = |key: &str| meminfo_bytes(&meminfo, key).unwrap_or(0);
        let psi = CgroupReader::new(proc_root.join("pressure"));
        let pressure = |f: &str| psi.read_pressure("/", f).ok().flatten();
        Self {
            mem_total_bytes: kib("MemTotal"),
            mem_available_bytes: kib("MemAvailable"),
            swap_total_bytes: kib("SwapTotal"),
            swap_free_bytes: kib("SwapFree"),
            cpu_pressure: pressure("cpu"),
            memory_pressure: pressure("memory"),
            io_pressure: pressure("io"),
        }
    }
}

/// One process (thread-group leader).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessSample {
    pub pid: u32,
    pub ppid: u32,
    /// Control characters escaped (names may hold newlines or escapes).
    pub comm: String,
    pub exe: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub rss_bytes: u64,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// Start time (clock ticks after boot): tells a reused pid from the same process.
    pub starttime: u64,
    /// Threads (`num_threads`).
    pub threads: Option<i64>,
    /// User + system CPU time, clock ticks (cumulative).
    pub cpu_ticks: u64,
    /// CPU use between the two last reads of this process, percent of one core; `None`
    /// until it was read twice.
    pub cpu_percent: Option<f64>,
    /// The tick of the last read ([`Snapshot::tick`]): `cpu_percent` and `rss_bytes`
    /// are current when it equals the snapshot's tick.
    pub read_tick: u64,
    /// Monotonic ns of the last read.
    #[serde(skip)]
    pub read_ns: u64,
}

/// Lifecycle events drained this tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Events {
    /// Events decoded this tick (all of them, up to the drain limit).
    pub decoded: u64,
    /// Records that could not be decoded (version or kind mismatch), cumulative.
    pub undecodable: u64,
    /// The last events of this tick, newest last (at most [`RECENT_EVENTS`]).
    pub recent: Vec<ProcEvent>,
    /// Kernel OOM kills seen this tick, with the victim's cgroup where it could still
    /// be resolved.
    pub oom_victims: Vec<OomVictim>,
}

/// A kernel OOM kill.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OomVictim {
    pub pid: u32,
    pub cgroup: Option<String>,
    /// cgroup of the task whose allocation triggered the kill.
    pub trigger_cgroup: Option<String>,
}

/// Events kept per tick in [`Events::recent`].
pub const RECENT_EVENTS: usize = 64;
/// Events drained per tick at most (the rest wait for the next tick).
const DRAIN_LIMIT: usize = 65_536;
/// Samples kept per cgroup for the memory trend.
const TREND_SAMPLES: usize = 10;
/// Cgroups with kernel activity whose processes are refreshed per tick between scans.
const ACTIVE_CGROUPS_PER_TICK: usize = 8;
/// A cgroup none of whose tasks ran, forked, exited or reclaimed cannot have grown:
/// its files are re-read every this many ticks (spread over the ticks), not every tick.
const IDLE_FILES_EVERY: u64 = 60;
/// The tree is re-walked when the root's `cgroup.stat` changes (a cgroup was created or
/// deleted), and every this many ticks in any case (renames leave the counts alone).
const TREE_WALK_EVERY: u64 = 60;
/// New processes (fork and exec events that outlived their tick) read per tick; the
/// rest wait for the next tick.
const NEW_PROCESSES_PER_TICK: usize = 256;
/// New processes remembered until read; beyond this a fork bomb's children wait for
/// the next full scan.
const PENDING_MAX: usize = 65_536;

/// Everything one tick saw.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Tick number, 1 for the first.
    pub tick: u64,
    /// Wall-clock time of the tick, milliseconds since the Unix epoch.
    pub timestamp_ms: u128,
    /// Length of the tick, nanoseconds (monotonic).
    pub interval_ns: u64,
    /// CPUs the eBPF programs report on.
    pub cpus: usize,
    pub machine: Machine,
    /// Every cgroup, busiest (CPU) first.
    pub cgroups: Vec<CgroupSample>,
    /// Processes as of the last /proc scan, kept current by fork/exec/exit events (a
    /// process is read in the tick after its fork or exec, if it still lives; until
    /// then an exec'd one has only pid, comm and cgroup), with the processes of the
    /// busiest cgroups re-read every tick.
    /// Shared, not copied: rebuilt only in ticks that changed the table.
    pub processes: Arc<Vec<ProcessSample>>,
    /// Milliseconds since that scan.
    pub processes_age_ms: u64,
    pub events: Events,
    /// Cgroups currently held in the eBPF map.
    pub tracked_cgroups: usize,
    /// Deleted cgroups forgotten in this tick.
    pub vanished_cgroups: usize,
    /// What the eBPF side could not record, and kernel OOM kills (cumulative).
    pub ebpf: EbpfStats,
    /// GPUs and their processes (NVML); `None` without NVML. Filled in by the agent
    /// ([`crate::gpu::GpuCollector`]), not by [`Collector`].
    pub gpu: Option<Arc<crate::gpu::GpuSnapshot>>,
}

impl Snapshot {
    /// The cgroup at `path` in this tick, if it was seen.
    #[must_use]
    pub fn cgroup(&self, path: &str) -> Option<&CgroupSample> {
        self.cgroups
            .iter()
            .find(|c| c.path.as_deref() == Some(path))
    }
}

/// Monotonic clock, nanoseconds: the clock of `bpf_ktime_get_ns()`.
///
/// # Panics
/// Never on Linux: `CLOCK_MONOTONIC` always exists.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// Knobs of the collector.
#[derive(Clone, Copy, Debug)]
pub struct CollectOptions {
    /// Rescan /proc every this many ticks (1 = every tick).
    pub proc_scan_every: u32,
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            proc_scan_every: 300,
        }
    }
}

/// Reads the probes, the cgroup tree and /proc into snapshots.
pub struct Collector {
    probes: Probes,
    index: CgroupIndex,
    proc_root: PathBuf,
    options: CollectOptions,
    accountant: StatsAccountant,
    /// Recent `memory.current` samples per cgroup (seconds, MiB), for the trend.
    trends: HashMap<CgroupId, VecDeque<(f64, f64)>>,
    /// Last control files read per cgroup (shared with the snapshots, not copied).
    files: HashMap<CgroupId, Arc<CgroupFiles>>,
    /// By pid (sorted, so the snapshot's view needs no sort).
    processes: BTreeMap<u32, ProcessSample>,
    /// The snapshot's view of `processes`; `None` once the table changed.
    processes_view: Option<Arc<Vec<ProcessSample>>>,
    /// Pids from fork and exec events, with the tick they were seen in, to be read.
    pending: BTreeMap<u32, u64>,
    last_scan: Option<Instant>,
    ticks: u64,
    users: crate::procinfo::UserNames,
    page_size: u64,
    ticks_per_s: f64,
    start: Instant,
    last_ns: u64,
    last_map_full: u64,
    last_evictions: u64,
    /// Entries this agent removed from the per-cgroup map (deleted cgroups).
    forgotten: u64,
    undecodable: u64,
    /// Every cgroup of the previous tick (none before the first).
    previous: Option<HashSet<CgroupId>>,
}

impl Collector {
    #[must_use]
    pub fn new(
        probes: Probes,
        index: CgroupIndex,
        proc_root: impl Into<PathBuf>,
        options: CollectOptions,
    ) -> Self {
        let mut c = Self {
            probes,
            index,
            proc_root: proc_root.into(),
            options,
            accountant: StatsAccountant::default(),
            trends: HashMap::new(),
            files: HashMap::new(),
            processes: BTreeMap::new(),
            processes_view: None,
            pending: BTreeMap::new(),
            last_scan: None,
            ticks: 0,
            users: crate::procinfo::UserNames::default(),
            page_size: procfs::page_size(),
            ticks_per_s: procfs::ticks_per_second() as f64,
            start: Instant::now(),
            last_ns: monotonic_ns(),
            last_map_full: 0,
            last_evictions: 0,
            forgotten: 0,
            undecodable: 0,
            previous: None,
        };
        c.prime();
        c
    }

    /// Makes the first tick cover exactly the time since `new`: what the programs
    /// counted between their attach and now (the agent's start-up) becomes the
    /// baseline instead of the first tick's share (a lone spinner read 110 % of a CPU
    /// in its first tick), and a slice running now is shown from now on.
    fn prime(&mut self) {
        let totals = self.probes.cgroup_stats();
        let running = self.running_slices().unwrap_or_default();
        let now = monotonic_ns();
        let _ = self.accountant.tick(&totals, &running, now, now);
        self.last_ns = now;
    }

    /// The slices running on each CPU now, with their cgroups.
    fn running_slices(&self) -> Result<Vec<RunningSlice>, ProbeError> {
        Ok(self
            .probes
            .cpu_slices()?
            .iter()
            .map(|s| RunningSlice {
                start_ns: s.start_ns,
                cgroup: (s.pid != 0)
                    .then(|| cgroup_of_pid(&self.proc_root, s.pid))
                    .flatten()
                    .and_then(|path| self.index.id_of(&path)),
            })
            .collect())
    }

    /// Where user names come from (resolved off the loop; see
    /// [`crate::procinfo::UserNames`]).
    pub fn set_user_names(&mut self, users: crate::procinfo::UserNames) {
        self.users = users;
    }

    /// The probes whose maps this collector reads.
    #[must_use]
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// One tick: deltas since the previous call (or since `new`).
    ///
    /// # Errors
    /// A map could not be read at all.
    pub fn collect(&mut self) -> Result<Snapshot, ProbeError> {
        // Read before the map: an entry added in between is then live but not yet
        // counted, so evictions are never overcounted.
        let inserts = self.probes.stats().cgroup_inserts;
        let totals = self.probes.cgroup_stats();
        let running = self.running_slices()?;
        let now = monotonic_ns();
        let deltas = self.accountant.tick(&totals, &running, now, self.last_ns);
        let interval_ns = now.saturating_sub(self.last_ns).max(1);
        self.last_ns = now;
        let secs = interval_ns as f64 / 1e9;
        self.ticks += 1;

        let events = self.drain_events();

        let (paths, vanished) = self.resolve(&totals, &deltas);
        let mut cgroups = self.sample_cgroups(&paths, &deltas, secs);
        // Ids are never reused (the directory's inode): an id the previous tick's
        // complete walk lacked is a new cgroup. After a walk that could not read part
        // of the tree nothing is taken as new on the next tick (the missing subtree
        // would all look born).
        if let Some(previous) = &self.previous {
            for c in &mut cgroups {
                c.born = !previous.contains(&c.id);
            }
        }
        self.previous = self
            .index
            .complete()
            .then(|| paths.keys().copied().collect());
        cgroups.sort_by(|a, b| b.on_cpu_ns.cmp(&a.on_cpu_ns).then(a.id.cmp(&b.id)));

        let mut ebpf = self.probes.stats();
        // A counter: never smaller than before (the estimate moves with the reads).
        ebpf.cgroup_evictions = inserts
            .saturating_sub(self.forgotten)
            .saturating_sub(totals.len() as u64)
            .max(self.last_evictions);
        if ebpf.cgroup_evictions > self.last_evictions {
            warn!(
                evicted = ebpf.cgroup_evictions - self.last_evictions,
                capacity = ebpf.cgroup_map_capacity,
                tracked = totals.len(),
                "eBPF cgroup map full: the least recently active cgroups' entries were \
                 evicted for new ones (their counts start over; raise --cgroup-map-capacity)"
            );
            self.last_evictions = ebpf.cgroup_evictions;
        }
        if ebpf.cgroup_map_full > self.last_map_full {
            warn!(
                dropped = ebpf.cgroup_map_full - self.last_map_full,
                capacity = ebpf.cgroup_map_capacity,
                tracked = totals.len(),
                "eBPF cgroup map full: data of new cgroups is being dropped \
                 (raise --cgroup-map-capacity)"
            );
            self.last_map_full = ebpf.cgroup_map_full;
        }
        let active: Vec<String> = cgroups
            .iter()
            .filter(|c| c.forks > 0 || c.reclaims > 0 || c.cpu_percent >= 1.0)
            .filter_map(|c| c.path.clone())
            .filter(|p| p != "/")
            .collect();
        self.refresh_processes(&active);
        let processes = self
            .processes_view
            .get_or_insert_with(|| Arc::new(self.processes.values().cloned().collect()))
            .clone();
        Ok(Snapshot {
            tick: self.ticks,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            interval_ns,
            cpus: running.len(),
            machine: Machine::read(&self.proc_root),
            cgroups,
            processes,
            processes_age_ms: self.last_scan.map_or(0, |s| {
                u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)
            }),
            events,
            tracked_cgroups: totals.len() - vanished,
            vanished_cgroups: vanished,
            ebpf,
            gpu: None,
        })
    }

    /// Paths of every cgroup (deleted ones: `None`) and how many the map forgot.
    fn resolve(
        &mut self,
        totals: &HashMap<CgroupId, CgroupStats>,
        deltas: &HashMap<CgroupId, CgroupStats>,
    ) -> (HashMap<CgroupId, Option<String>>, usize) {
        // A deleted cgroup resolves to None after the walk and leaves the eBPF map.
        if self.ticks.is_multiple_of(TREE_WALK_EVERY) {
            self.index.refresh();
        } else {
            self.index.refresh_if_changed();
        }
        let mut map_ids: Vec<CgroupId> = totals.keys().chain(deltas.keys()).copied().collect();
        map_ids.sort_unstable();
        map_ids.dedup();
        let mut paths: HashMap<CgroupId, Option<String>> = self
            .index
            .known()
            .iter()
            .map(|(id, p)| (*id, Some(p.clone())))
            .collect();
        paths.extend(self.index.resolve_all(&map_ids));
        let mut vanished = 0;
        for (id, path) in &paths {
            if path.is_none() {
                if totals.contains_key(id) {
                    if self.probes.forget_cgroup(*id) {
                        self.forgotten += 1;
                    }
                    vanished += 1;
                }
                self.accountant.forget(*id);
                self.trends.remove(id);
                self.files.remove(id);
            }
        }
        self.files.retain(|id, _| paths.contains_key(id));
        self.trends.retain(|id, _| paths.contains_key(id));
        (paths, vanished)
    }

    fn sample_cgroups(
        &mut self,
        paths: &HashMap<CgroupId, Option<String>>,
        deltas: &HashMap<CgroupId, CgroupStats>,
        secs: f64,
    ) -> Vec<CgroupSample> {
        let t = self.start.elapsed().as_secs_f64();
        let tick = self.ticks;
        paths
            .iter()
            .map(|(&id, path)| {
                let d = deltas.get(&id).copied().unwrap_or_default();
                let active = d.on_cpu_ns > 0 || d.forks > 0 || d.reclaims > 0 || d.exits > 0;
                let due = (id.wrapping_add(tick)).is_multiple_of(IDLE_FILES_EVERY);
                let cached = self.files.get(&id);
                // An idle cgroup that is due is checked cheaply first: if neither its
                // memory nor its task count moved, nothing a detector reads did.
                let unchanged = !active
                    && due
                    && cached.zip(path.as_deref()).is_some_and(|(f, p)| {
                        let r = self.index.reader();
                        r.read_u64(p, "memory.current").ok().flatten() == f.memory_current
                            && r.read_u64(p, "pids.current").ok().flatten() == f.pids_current
                    });
                let fresh = (active || due || cached.is_none()) && !unchanged;
                let files = match (path.as_deref(), fresh) {
                    (Some(p), true) => {
                        let f = Arc::new(CgroupFiles::read(self.index.reader(), p));
                        self.files.insert(id, f.clone());
                        f
                    }
                    (Some(_), false) => self.files.get(&id).cloned().unwrap_or_default(),
                    (None, _) => Arc::default(),
                };
                // A cgroup checked unchanged adds a point too: its trend flattens.
                let trend = if fresh || unchanged {
                    files.memory_current.and_then(|bytes| {
                        let points = self.trends.entry(id).or_default();
                        points.push_back((t, bytes as f64 / f64::from(1 << 20)));
                        if points.len() > TREND_SAMPLES {
                            points.pop_front();
                        }
                        slope_per_s(points)
                    })
                } else {
                    self.trends.get(&id).and_then(slope_per_s)
                };
                let mut s = sample(id, path.clone(), &d, secs, files, trend);
                s.files_fresh = fresh;
                s
            })
            .collect()
    }

    fn drain_events(&mut self) -> Events {
        let mut out = Events::default();
        for e in self.probes.drain_events(DRAIN_LIMIT) {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    if self.undecodable == 0 {
                        warn!("undecodable lifecycle event (counted from now on): {err}");
                    }
                    self.undecodable += 1;
                    continue;
                }
            };
            out.decoded += 1;
            match e.kind {
                Kind::Exit => {
                    self.pending.remove(&e.tgid);
                    if self.processes.remove(&e.tgid).is_some() {
                        self.processes_view = None;
                    }
                }
                Kind::Exec => {
                    let cgroup = self.index.resolve_all(&[e.cgroup])[&e.cgroup].clone();
                    let p = self
                        .processes
                        .entry(e.tgid)
                        .or_insert_with(|| ProcessSample {
                            pid: e.tgid,
                            ppid: 0,
                            comm: String::new(),
                            exe: None,
                            uid: None,
                            user: None,
                            rss_bytes: 0,
                            cgroup: None,
                            starttime: 0,
                            threads: None,
                            cpu_ticks: 0,
                            cpu_percent: None,
                            read_tick: 0,
                            read_ns: 0,
                        });
                    p.comm.clone_from(&e.comm);
                    p.cgroup = cgroup;
                    p.exe = None; // a new program: read in the next tick
                    self.processes_view = None;
                    self.remember(e.tgid);
                }
                Kind::OomVictim => {
                    // The victim may be reaped already; its exit event comes after this
                    // one, so the process table still knows it.
                    let cgroup = cgroup_of_pid(&self.proc_root, e.other_pid).or_else(|| {
                        self.processes
                            .get(&e.other_pid)
                            .and_then(|p| p.cgroup.clone())
                    });
                    out.oom_victims.push(OomVictim {
                        pid: e.other_pid,
                        cgroup,
                        trigger_cgroup: self.index.resolve_all(&[e.cgroup])[&e.cgroup].clone(),
                    });
                }
                // A thread's creation is a fork too: the next tick tells them apart.
                Kind::Fork => self.remember(e.other_pid),
            }
            if out.recent.len() == RECENT_EVENTS {
                out.recent.remove(0);
            }
            out.recent.push(e);
        }
        out.undecodable = self.undecodable;
        out
    }

    fn remember(&mut self, pid: u32) {
        if self.pending.len() < PENDING_MAX {
            self.pending.entry(pid).or_insert(self.ticks);
        }
    }

    /// Keeps the process table current without reading all of /proc every tick:
    /// - every `proc_scan_every` ticks, a full scan;
    /// - every tick, the processes of the busiest cgroups (their RSS moves), and the
    ///   processes forked or exec'd in an earlier tick that still live (short-lived
    ///   ones are gone by then and cost nothing).
    ///
    /// At 10,000 processes a full scan costs ~40 µs per process here: this is why.
    fn refresh_processes(&mut self, active: &[String]) {
        let every = u64::from(self.options.proc_scan_every.max(1));
        if self.last_scan.is_none() || self.ticks.is_multiple_of(every) {
            self.full_scan();
            return;
        }
        for rel in active.iter().take(ACTIVE_CGROUPS_PER_TICK) {
            let pids = self.index.reader().procs(rel).unwrap_or_default();
            for pid in pids {
                self.pending.remove(&pid);
                self.refresh_process(pid, Some(rel.clone()));
            }
        }
        let tick = self.ticks;
        let due: Vec<u32> = self
            .pending
            .iter()
            .filter(|&(_, &seen)| seen < tick)
            .map(|(&pid, _)| pid)
            .take(NEW_PROCESSES_PER_TICK)
            .collect();
        for pid in due {
            self.pending.remove(&pid);
            // /proc/<tid> of a thread exists too (unlisted): only leaders are processes.
            if tgid_of(&self.proc_root, pid) == Some(pid) {
                self.refresh_process(pid, None);
            }
        }
    }

    /// Reads every process; membership comes from each cgroup's `cgroup.procs` (one
    /// read per cgroup instead of one `/proc/<pid>/cgroup` per process).
    fn full_scan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.pending.clear();
        let Ok(all) = procfs::process::all_processes_with_root(&self.proc_root) else {
            warn!("cannot list processes under {}", self.proc_root.display());
            return;
        };
        let mut member: HashMap<u32, String> = HashMap::new();
        for rel in self.index.known().values() {
            for pid in self.index.reader().procs(rel).unwrap_or_default() {
                member.insert(pid, rel.clone());
            }
        }
        let mut fresh = BTreeMap::new();
        // Processes exit mid-scan all the time: each failed read skips that process.
        for p in all.flatten() {
            let cgroup = u32::try_from(p.pid)
                .ok()
                .and_then(|pid| member.remove(&pid));
            if let Some(sample) = self.process_sample(&p, cgroup) {
                fresh.insert(sample.pid, sample);
            }
        }
        self.processes = fresh;
        self.processes_view = None;
    }

    /// Re-reads one process (gone: nothing happens, its exit event removes it).
    fn refresh_process(&mut self, pid: u32, cgroup: Option<String>) {
        let Ok(p) = procfs::process::Process::new_with_root(self.proc_root.join(pid.to_string()))
        else {
            return;
        };
        if let Some(sample) = self.process_sample(&p, cgroup) {
            self.processes.insert(sample.pid, sample);
            self.processes_view = None;
        }
    }

    /// One process; `cgroup` when the caller knows it already (else read from /proc).
    fn process_sample(
        &mut self,
        p: &procfs::process::Process,
        cgroup: Option<String>,
    ) -> Option<ProcessSample> {
        let stat = p.stat().ok()?;
        let pid = u32::try_from(p.pid).ok()?;
        let same = self
            .processes
            .get(&pid)
            .filter(|k| k.starttime == stat.starttime);
        let now_ns = monotonic_ns();
        let cpu_ticks = stat.utime + stat.stime;
        let cpu_percent = same
            .filter(|k| k.read_ns != 0 && now_ns > k.read_ns)
            .map(|k| {
                let secs = cpu_ticks.saturating_sub(k.cpu_ticks) as f64 / self.ticks_per_s;
                secs * 1e9 / (now_ns - k.read_ns) as f64 * 100.0
            });
        let known = same.filter(|k| k.exe.is_some());
        let (exe, uid, user) = if let Some(k) = known {
            (k.exe.clone(), k.uid, k.user.clone())
        } else {
            // The real uid, not the owner of /proc/PID (root for a non-dumpable process).
            let uid = crate::procinfo::real_uid(&self.proc_root, pid);
            let user = uid.and_then(|uid| self.users.name(uid));
            (
                p.exe().ok().map(|e| {
                    use std::os::unix::ffi::OsStrExt as _;
                    let b = e.as_os_str().as_bytes();
                    // Replaced on disk since it started (an upgrade): still that program.
                    crate::cgroupfs::path_text(b.strip_suffix(b" (deleted)").unwrap_or(b))
                }),
                uid,
                user,
            )
        };
        Some(ProcessSample {
            pid,
            ppid: u32::try_from(stat.ppid).unwrap_or(0),
            comm: crate::events::comm_to_string(stat.comm.as_bytes()),
            exe,
            uid,
            user,
            rss_bytes: stat.rss * self.page_size,
            cgroup: cgroup.or_else(|| cgroup_of_pid(&self.proc_root, pid)),
            starttime: stat.starttime,
            threads: Some(stat.num_threads),
            cpu_ticks,
            cpu_percent,
            read_tick: self.ticks,
            read_ns: now_ns,
        })
    }
}

/// The thread-group id of task `tid` (`Tgid:` in its status); `None` once it is gone.
fn tgid_of(proc_root: &std::path::Path, tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(tid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn sample(
    id: CgroupId,
    path: Option<String>,
    d: &CgroupStats,
    secs: f64,
    files: Arc<CgroupFiles>,
    memory_trend_mib_per_s: Option<f64>,
) -> CgroupSample {
    let runq = RunQueue {
        waits: d.runq_waits,
        mean_us: (d.runq_waits > 0).then(|| d.runq_wait_ns as f64 / d.runq_waits as f64 / 1000.0),
        p50_us: hist_quantile_us(&d.runq_hist, 0.5),
        p99_us: hist_quantile_us(&d.runq_hist, 0.99),
        hist: d.runq_hist.to_vec(),
    };
    let reclaim_ms = d.reclaim_ns as f64 / 1e6;
    CgroupSample {
        id,
        path,
        on_cpu_ns: d.on_cpu_ns,
        cpu_percent: d.on_cpu_ns as f64 * 100.0 / (secs * 1e9),
        switches: d.switches,
        involuntary_switches: d.involuntary,
        runq,
        forks: d.forks,
        execs: d.execs,
        exits: d.exits,
        forks_per_s: d.forks as f64 / secs,
        reclaim_stall_ms: reclaim_ms,
        reclaim_ms_per_s: reclaim_ms / secs,
        reclaims: d.reclaims,
        memory_trend_mib_per_s,
        files,
        files_fresh: true,
        born: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(entries: &[(u64, u64, u64)]) -> HashMap<CgroupId, CgroupStats> {
        entries
            .iter()
            .map(|&(id, ns, sw)| {
                (
                    id,
                    CgroupStats {
                        on_cpu_ns: ns,
                        switches: sw,
                        ..CgroupStats::default()
                    },
                )
            })
            .collect()
    }

    fn cpu(d: &CgroupStats) -> (u64, u64) {
        (d.on_cpu_ns, d.switches)
    }

    fn running(start_ns: u64, cgroup: u64) -> RunningSlice {
        RunningSlice {
            start_ns,
            cgroup: Some(cgroup),
        }
    }

    const IDLE: RunningSlice = RunningSlice {
        start_ns: 0,
        cgroup: None,
    };

    #[test]
    fn deltas_between_ticks() {
        let mut acc = StatsAccountant::default();
        let d = acc.tick(&totals(&[(1, 100, 2)]), &[IDLE], 1_000, 0);
        assert_eq!(cpu(&d[&1]), (100, 2));
        let d = acc.tick(&totals(&[(1, 350, 5), (2, 10, 1)]), &[IDLE], 2_000, 0);
        assert_eq!(cpu(&d[&1]), (250, 3));
        assert_eq!(cpu(&d[&2]), (10, 1));
    }

    #[test]
    fn every_counter_has_a_delta() {
        let prev = CgroupStats {
            forks: 10,
            reclaim_ns: 5,
            runq_hist: [1; RUNQ_BUCKETS],
            ..CgroupStats::default()
        };
        let mut cur = prev;
        cur.forks = 25;
        cur.reclaim_ns = 9;
        cur.runq_hist[3] = 4;
        let d = stats_delta(&cur, &prev);
        assert_eq!(
            (d.forks, d.reclaim_ns, d.runq_hist[3], d.runq_hist[0]),
            (15, 4, 3, 0)
        );
    }

    #[test]
    fn counter_going_backwards_is_a_recreated_entry() {
        let mut acc = StatsAccountant::default();
        acc.tick(&totals(&[(1, 1_000, 10)]), &[], 1, 0);
        let d = acc.tick(&totals(&[(1, 30, 1)]), &[], 2, 0);
        assert_eq!(cpu(&d[&1]), (30, 1));
    }

    /// A spinner that never leaves its CPU: the map never grows, yet every tick shows
    /// the full interval, and when it finally leaves, the map's charge is not counted twice.
    #[test]
    fn running_slice_is_credited_then_repaid() {
        let mut acc = StatsAccountant::default();
        let spinner = 7;
        let d = acc.tick(&totals(&[]), &[running(500, spinner)], 1_000, 0);
        assert_eq!(d[&spinner].on_cpu_ns, 500);
        let d = acc.tick(&totals(&[]), &[running(500, spinner)], 2_000, 0);
        assert_eq!(d[&spinner].on_cpu_ns, 1_000);
        // It leaves at 2_500: the map now holds the whole slice (2_000 ns), the CPU idles.
        let d = acc.tick(&totals(&[(spinner, 2_000, 1)]), &[IDLE], 3_000, 0);
        assert_eq!(cpu(&d[&spinner]), (500, 1));
    }

    /// The agent starts (at 1 µs) while a spinner's slice runs since 0.4 µs: the
    /// first tick shows only its own 1 µs, never more than the tick; when the map
    /// later charges the whole slice, the part before the agent is not shown either.
    #[test]
    fn a_slice_older_than_the_tick_shows_only_the_tick() {
        let mut acc = StatsAccountant::default();
        let d = acc.tick(&totals(&[]), &[running(400, 7)], 2_000, 1_000);
        assert_eq!(
            d[&7].on_cpu_ns, 1_000,
            "not 1_600: 600 ns were before the agent"
        );
        // It leaves at 2_500: the map charges 2_100; shown so far 1_000; 600 written off.
        let d = acc.tick(&totals(&[(7, 2_100, 1)]), &[IDLE], 3_000, 2_000);
        assert_eq!(d[&7].on_cpu_ns, 500);
    }

    /// The switch lands between reading the map and reading the slices: the map does
    /// not have the ended slice yet, so the debt waits for it instead of being lost.
    #[test]
    fn debt_waits_for_a_late_map_charge() {
        let mut acc = StatsAccountant::default();
        acc.tick(&totals(&[]), &[running(1, 3)], 1_001, 0); // credited 1_000
        let d = acc.tick(&totals(&[]), &[running(1_500, 4)], 2_001, 0);
        assert_eq!(
            d.get(&3).map_or(0, |d| d.on_cpu_ns),
            0,
            "nothing to repay from yet"
        );
        assert_eq!(d[&4].on_cpu_ns, 501);
        let d = acc.tick(&totals(&[(3, 1_499, 1)]), &[running(1_500, 4)], 3_001, 0);
        assert_eq!(
            d[&3].on_cpu_ns, 499,
            "1_499 charged minus the 1_000 shown earlier"
        );
        assert_eq!(d[&4].on_cpu_ns, 1_000);
    }

    #[test]
    fn stale_debt_expires() {
        let mut acc = StatsAccountant::default();
        acc.tick(&totals(&[]), &[running(1, 3)], 1_001, 0);
        acc.tick(&totals(&[]), &[IDLE], 2_000, 0); // debt 1_000 on cgroup 3
        acc.tick(&totals(&[]), &[IDLE], 3_000, 0);
        acc.tick(&totals(&[]), &[IDLE], 4_000, 0);
        // Three ticks later the task had moved away; cgroup 3's new work is not eaten.
        let d = acc.tick(&totals(&[(3, 700, 1)]), &[IDLE], 5_000, 0);
        assert_eq!(d[&3].on_cpu_ns, 700);
    }

    #[test]
    fn forgotten_cgroup_leaves_no_state() {
        let mut acc = StatsAccountant::default();
        acc.tick(&totals(&[(9, 100, 1)]), &[running(10, 9)], 100, 0);
        acc.forget(9);
        let d = acc.tick(&totals(&[(9, 40, 1)]), &[IDLE], 200, 0);
        assert_eq!(cpu(&d[&9]), (40, 1));
    }

    #[test]
    fn idle_and_unresolved_cpus_credit_nobody() {
        let mut acc = StatsAccountant::default();
        let unresolved = RunningSlice {
            start_ns: 10,
            cgroup: None,
        };
        let d = acc.tick(&totals(&[]), &[IDLE, unresolved], 1_000, 0);
        assert!(d.is_empty());
    }

    #[test]
    fn quantiles_from_histogram() {
        let mut h = [0u32; RUNQ_BUCKETS];
        assert_eq!(hist_quantile_us(&h, 0.99), None);
        h[0] = 98; // < 4 µs
        h[10] = 2; // [2 ms, 4 ms)
        assert_eq!(hist_quantile_us(&h, 0.5), Some(4.096));
        assert_eq!(hist_quantile_us(&h, 0.99), Some(4194.304));
        h[19] = 1_000; // ≥ 1.07 s: reported as the floor
        assert_eq!(hist_quantile_us(&h, 0.99), Some(1_073_741.824));
    }

    #[test]
    fn slopes() {
        let line: VecDeque<(f64, f64)> = (0..5)
            .map(|i| (f64::from(i), 10.0 + 2.0 * f64::from(i)))
            .collect();
        assert!((slope_per_s(&line).unwrap() - 2.0).abs() < 1e-9);
        let flat: VecDeque<(f64, f64)> = (0..5).map(|i| (f64::from(i), 7.0)).collect();
        assert_eq!(slope_per_s(&flat), Some(0.0));
        let two: VecDeque<(f64, f64)> = [(0.0, 1.0), (1.0, 2.0)].into_iter().collect();
        assert_eq!(slope_per_s(&two), None);
        let same_t: VecDeque<(f64, f64)> =
            [(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)].into_iter().collect();
        assert_eq!(slope_per_s(&same_t), None);
    }
}
