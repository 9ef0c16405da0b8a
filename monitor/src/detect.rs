//! Detection: snapshots in, findings out. Pure logic, no kernel access.
//!
//! [`Detector`] keeps a bounded window of [`Point`]s per cgroup, built from each
//! [`Snapshot`], and runs one function per pattern over it: [`leak`], [`runaway`],
//! [`explosion`], [`pressure`] (cgroup series) and the single-thread saturation hint
//! (per process). Each returns its evidence — numbers, window, thresholds — so that
//! `cgsentry explain` can say why, and each is unit-tested on synthetic series.
//!
//! Defaults are ratios where a size would not carry from a 2-core 2 GiB VM to a 64-core
//! box: memory is judged by the time left until the cgroup's headroom is gone, CPU per
//! busy core, task growth per CPU.
use std::{
    borrow::Cow,
    collections::{HashMap, HashSet, VecDeque},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroupfs::CgroupId,
    collect::{CgroupSample, Machine, Snapshot},
    gpu::{GpuProcess, GpuSnapshot, ProcState, in_subtree},
};

const MIB: f64 = 1024.0 * 1024.0;

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Memory grows steadily and will reach the cgroup's headroom within the horizon.
    Leak,
    /// CPU pinned with (almost) no voluntary sleeps while others queue for a CPU.
    Runaway,
    /// Tasks or memory growing in a burst right after forks (incident D).
    Explosion,
    /// Reclaim stall or memory PSI above thresholds: the earliest "act now" signal.
    Pressure,
    /// One process pinned at one core while the machine has idle cores: a hint, never
    /// an action (incidents A and B).
    SingleThreadSaturation,
    /// GPU memory of a cgroup (or one process of it) grows steadily and will fill the
    /// device within the horizon.
    GpuLeak,
    /// GPU memory held by a process that exited (gone, or a zombie not reaped): nothing
    /// to contain, the operator must know (a hint at the parent or the driver).
    GpuOrphan,
    /// Incident A: a process saturates one core while the GPU its cgroup uses is
    /// under-used: the GPU waits for that thread. A hint, never an action.
    GpuStarved,
}

impl FindingKind {
    /// Every kind, in a stable order.
    pub const ALL: [FindingKind; 8] = [
        FindingKind::Leak,
        FindingKind::Runaway,
        FindingKind::Explosion,
        FindingKind::Pressure,
        FindingKind::SingleThreadSaturation,
        FindingKind::GpuLeak,
        FindingKind::GpuOrphan,
        FindingKind::GpuStarved,
    ];

    /// Hints and reports only: a ladder for these can only notify.
    #[must_use]
    pub fn notify_only(self) -> bool {
        matches!(
            self,
            FindingKind::SingleThreadSaturation | FindingKind::GpuOrphan | FindingKind::GpuStarved
        )
    }

    /// The name used in policies and output.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::Leak => "leak",
            FindingKind::Runaway => "runaway",
            FindingKind::Explosion => "explosion",
            FindingKind::Pressure => "pressure",
            FindingKind::SingleThreadSaturation => "single_thread_saturation",
            FindingKind::GpuLeak => "gpu_leak",
            FindingKind::GpuOrphan => "gpu_orphan",
            FindingKind::GpuStarved => "gpu_starved",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How urgent a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Advice for the operator; never acted on.
    Hint,
    Warning,
    /// Act now: the limit or a freeze is seconds to minutes away.
    Critical,
}

/// One number behind a finding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub name: Cow<'static, str>,
    pub value: f64,
    pub unit: Cow<'static, str>,
}

fn ev(name: &'static str, value: f64, unit: &'static str) -> Evidence {
    Evidence {
        name: Cow::Borrowed(name),
        value,
        unit: Cow::Borrowed(unit),
    }
}

/// A pattern seen in one cgroup (or one process of it), with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: Severity,
    pub cgroup_id: CgroupId,
    pub cgroup: String,
    /// The process the finding is about, or the cgroup's largest process as a lead.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// One line for people.
    pub summary: String,
    /// Seconds of history the finding is based on.
    pub window_sec: f64,
    /// Projected seconds until the limit (leak, explosion).
    pub time_to_limit_sec: Option<f64>,
    pub evidence: Vec<Evidence>,
    /// Every GPU with what the cgroup (and its descendants) hold on it, when NVML is
    /// available: what policy GPU conditions are judged on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuUse>,
}

/// One GPU as a finding's cgroup sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuUse {
    pub device: u32,
    pub uuid: String,
    /// Device memory used, percent of the device's.
    pub memory_percent: Option<f64>,
    pub util_percent: Option<f64>,
    /// GPU memory held by the cgroup's processes and its descendants', bytes.
    pub cgroup_bytes: u64,
}

/// The detectors' settings (`[detect]` in cgsentry.toml). Defaults suit a 2-core 2 GiB
/// VM and a 64-core box alike.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// History kept per cgroup.
    pub window_sec: u64,
    pub leak: LeakConfig,
    pub runaway: RunawayConfig,
    pub explosion: ExplosionConfig,
    pub pressure: PressureConfig,
    pub saturation: SaturationConfig,
    pub gpu: GpuConfig,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            window_sec: 300,
            leak: LeakConfig::default(),
            runaway: RunawayConfig::default(),
            explosion: ExplosionConfig::default(),
            pressure: PressureConfig::default(),
            saturation: SaturationConfig::default(),
            gpu: GpuConfig::default(),
        }
    }
}

/// GPU detectors. A GPU leak uses `[detect.leak]`'s window, plateau and noise tests,
/// with the device's free memory as the headroom.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// A saturated process's GPU below this utilisation, percent, is waiting for it
    /// (incident A: 61 %).
    pub starved_util_percent: f64,
    /// A process that exited must have held GPU memory this long before it is reported
    /// (the driver frees memory a moment after the exit).
    pub orphan_grace_sec: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            starved_util_percent: 80.0,
            orphan_grace_sec: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeakConfig {
    /// Least history before a leak can be called.
    pub min_window_sec: u64,
    /// A leak whose projection reaches the limit later than this is not reported.
    pub horizon_sec: u64,
    /// Never project further than this many times the history seen: 30 s of growth
    /// says something about the next 90 s, not the next hour.
    pub max_extrapolation: f64,
    /// The recent third of the window must still grow at this fraction of the whole
    /// window's slope; below it the series has plateaued (a compile, a model load).
    pub plateau_ratio: f64,
    /// The rise over the window must exceed this many robust standard deviations of
    /// the series around its trend (noise and GC sawtooth are not growth).
    pub noise_factor: f64,
    /// Machine memory kept free when a cgroup has no `memory.max`, percent of RAM.
    pub reserve_percent: f64,
    /// Critical when the limit is nearer than this fraction of the horizon.
    pub critical_fraction: f64,
}

impl Default for LeakConfig {
    fn default() -> Self {
        Self {
            min_window_sec: 20,
            horizon_sec: 900,
            max_extrapolation: 3.0,
            plateau_ratio: 0.3,
            noise_factor: 4.0,
            reserve_percent: 5.0,
            critical_fraction: 0.2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunawayConfig {
    pub window_sec: u64,
    /// CPU, percent of one core, the cgroup stays at or above in `pinned_fraction` of
    /// the ticks. Below a full core on purpose: a runaway competing with the tasks it
    /// delays gets only its share.
    pub cpu_percent: f64,
    pub pinned_fraction: f64,
    /// Voluntary sleeps per second per busy core at most (a spinner: 0, or a few tens
    /// when a helper thread ticks beside it; a busy web server: thousands).
    pub max_voluntary_per_sec: f64,
    /// Forks plus exits in the window at most: the same tasks stay pinned (a build's
    /// stream of short compilers is not a runaway).
    pub max_turnover: u64,
    /// Run-queue p99 of the other cgroups, ms, in at least half the ticks: somebody
    /// waits for the CPU it holds.
    pub victim_runq_p99_ms: f64,
}

impl Default for RunawayConfig {
    fn default() -> Self {
        Self {
            window_sec: 30,
            cpu_percent: 60.0,
            pinned_fraction: 0.8,
            max_voluntary_per_sec: 50.0,
            max_turnover: 2,
            victim_runq_p99_ms: 4.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExplosionConfig {
    /// Seconds, not minutes: incident D went from burst to no RAM in ~5 s.
    pub window_sec: u64,
    /// Net new tasks in the window per CPU that make a fork burst.
    pub new_tasks_per_cpu: f64,
    /// A memory burst: growth in the window projects the headroom gone within this.
    pub horizon_sec: u64,
    /// ... and the growth in the window is at least this percent of the headroom left
    /// at its start.
    pub min_growth_percent: f64,
    /// Exits at most this fraction of forks: tasks accumulate rather than turn over.
    pub max_exit_ratio: f64,
}

impl Default for ExplosionConfig {
    fn default() -> Self {
        Self {
            window_sec: 10,
            new_tasks_per_cpu: 64.0,
            horizon_sec: 30,
            min_growth_percent: 5.0,
            max_exit_ratio: 0.5,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PressureConfig {
    /// Time stalled in reclaim, percent of wall time, averaged over the last 3 ticks.
    pub reclaim_stall_percent: f64,
    /// `memory.pressure` some avg10, percent.
    pub memory_some_percent: f64,
    /// `memory.pressure` full avg10, percent.
    pub memory_full_percent: f64,
}

impl Default for PressureConfig {
    fn default() -> Self {
        Self {
            reclaim_stall_percent: 10.0,
            memory_some_percent: 20.0,
            memory_full_percent: 5.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaturationConfig {
    pub window_sec: u64,
    /// A process within this band of one core (percent) is pinned to one thread's worth.
    pub min_percent: f64,
    pub max_percent: f64,
    /// Idle cores (of the machine) at least, so more workers would have room.
    pub min_idle_cores: f64,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        Self {
            window_sec: 30,
            min_percent: 90.0,
            max_percent: 110.0,
            min_idle_cores: 0.5,
        }
    }
}

/// One tick of one cgroup, as the detectors see it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Point {
    /// Seconds since the detector started.
    pub t: f64,
    /// Length of the tick, seconds.
    pub interval_s: f64,
    /// `memory.current`, bytes.
    pub memory: Option<f64>,
    /// Bytes the cgroup can still grow by: the nearer of its `memory.max` and the
    /// machine's available memory less the reserve.
    pub headroom: Option<f64>,
    pub cpu_percent: f64,
    /// Switches-out while sleeping (not preempted) in this tick.
    pub voluntary: u64,
    pub forks: u64,
    pub exits: u64,
    /// `pids.current`.
    pub pids: Option<u64>,
    pub reclaim_ms_per_s: f64,
    pub memory_some_avg10: Option<f64>,
    pub memory_full_avg10: Option<f64>,
    /// Worst run-queue p99 among the *other* cgroups in this tick, µs.
    pub others_runq_p99_us: Option<f64>,
    /// A cgroup's birth (see `birth_point`), not a sample.
    pub birth: bool,
}

/// Theil–Sen slope (median of pairwise slopes): robust to outliers and sawtooth.
/// `None` with fewer than 2 points of distinct time.
#[must_use]
pub fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len() / 2);
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            if (b.0 - a.0).abs() > f64::EPSILON {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    median(&mut slopes)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// At most `buckets` points: the series cut into equal time slices, each the mean time
/// and median value of its points. Keeps Theil–Sen's cost bounded on long windows.
fn downsample(series: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64)> {
    if series.len() <= buckets {
        return series.to_vec();
    }
    let (t0, t1) = (series[0].0, series[series.len() - 1].0);
    let width = (t1 - t0) / buckets as f64;
    let mut out = Vec::with_capacity(buckets);
    let mut i = 0;
    for b in 0..buckets {
        let end = if b + 1 == buckets {
            f64::INFINITY
        } else {
            t0 + width * (b + 1) as f64
        };
        let (mut ts, mut vs) = (Vec::new(), Vec::new());
        while i < series.len() && series[i].0 < end {
            ts.push(series[i].0);
            vs.push(series[i].1);
            i += 1;
        }
        if let Some(v) = median(&mut vs) {
            out.push((ts.iter().sum::<f64>() / ts.len() as f64, v));
        }
    }
    out
}

/// Points of the last `secs` seconds.
fn last_secs(points: &[Point], secs: f64) -> &[Point] {
    let Some(end) = points.last().map(|p| p.t) else {
        return points;
    };
    let start = points.partition_point(|p| p.t < end - secs);
    &points[start..]
}

/// Span covered by `points`: from the start of the first tick to the last.
fn span(points: &[Point]) -> f64 {
    match (points.first(), points.last()) {
        (Some(a), Some(b)) => b.t - a.t + a.interval_s,
        _ => 0.0,
    }
}

/// What [`leak`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct LeakEvidence {
    pub slope_bytes_per_s: f64,
    pub recent_slope_bytes_per_s: f64,
    pub window_s: f64,
    pub memory: f64,
    pub headroom: f64,
    pub time_to_limit_s: f64,
    pub rise_over_noise: f64,
}

/// A sustained rise whose projection reaches the headroom within the horizon.
#[must_use]
pub fn leak(points: &[Point], cfg: &LeakConfig) -> Option<LeakEvidence> {
    let series: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| Some((p.t, p.memory?)))
        .collect();
    let headroom = points.iter().rev().find(|p| p.memory.is_some())?.headroom?;
    leak_series(&series, span(points), headroom, cfg)
}

/// [`leak`] over a `(seconds, bytes)` series covering `window` seconds, with `headroom`
/// bytes left after its last point.
#[must_use]
pub fn leak_series(
    series: &[(f64, f64)],
    window: f64,
    headroom: f64,
    cfg: &LeakConfig,
) -> Option<LeakEvidence> {
    if series.len() < 5 || window < cfg.min_window_sec as f64 {
        return None;
    }
    // Cheap first: most cgroups end where they started (idle, flat) or lower, and a
    // leak ends higher. This keeps a tick over thousands of cgroups cheap.
    if series[series.len() - 1].1 <= series[0].1 {
        return None;
    }
    let coarse = downsample(series, 30);
    let slope = theil_sen(&coarse)?;
    if slope <= 0.0 {
        return None;
    }
    // Plateau: the last third must still be rising.
    let t_recent = series[series.len() - 1].0 - window / 3.0;
    let recent: Vec<(f64, f64)> = coarse
        .iter()
        .copied()
        .filter(|(t, _)| *t >= t_recent)
        .collect();
    let recent_slope = if recent.len() >= 3 {
        theil_sen(&recent)?
    } else {
        slope
    };
    if recent_slope < cfg.plateau_ratio * slope {
        return None;
    }
    // Noise: robust sigma (1.4826 × MAD) of the residuals around the fitted line.
    let (t0, _) = series[0];
    let mut intercepts: Vec<f64> = series.iter().map(|(t, v)| v - slope * (t - t0)).collect();
    let intercept = median(&mut intercepts)?;
    let mut residuals: Vec<f64> = series
        .iter()
        .map(|(t, v)| (v - intercept - slope * (t - t0)).abs())
        .collect();
    let sigma = 1.4826 * median(&mut residuals)?;
    let rise = slope * (series[series.len() - 1].0 - t0);
    let rise_over_noise = if sigma > 0.0 {
        rise / sigma
    } else {
        f64::INFINITY
    };
    if rise_over_noise < cfg.noise_factor {
        return None;
    }
    let headroom = headroom.max(0.0);
    let time_to_limit_s = headroom / slope;
    let trusted = (cfg.horizon_sec as f64).min(cfg.max_extrapolation * window);
    (time_to_limit_s <= trusted).then_some(LeakEvidence {
        slope_bytes_per_s: slope,
        recent_slope_bytes_per_s: recent_slope,
        window_s: window,
        memory: series[series.len() - 1].1,
        headroom,
        time_to_limit_s,
        rise_over_noise,
    })
}

/// What [`runaway`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct RunawayEvidence {
    pub window_s: f64,
    pub mean_cpu_percent: f64,
    pub pinned_fraction: f64,
    pub voluntary_per_s_per_core: f64,
    pub turnover: u64,
    pub victims_runq_p99_ms: f64,
}

/// Pinned at a full core or more, (almost) never sleeping by itself, the same tasks
/// throughout, while other cgroups wait for a CPU.
#[must_use]
pub fn runaway(points: &[Point], cfg: &RunawayConfig) -> Option<RunawayEvidence> {
    // Cheap first (most cgroups, every tick): not pinned now, not a runaway now.
    if points
        .last()
        .is_none_or(|p| p.cpu_percent < cfg.cpu_percent)
    {
        return None;
    }
    let w = last_secs(points, cfg.window_sec as f64);
    let window = span(w);
    if w.len() < 3 || window < 0.9 * cfg.window_sec as f64 {
        return None;
    }
    // Weighted by each tick's length: early ticks (a memory alarm) are short.
    let total: f64 = w.iter().map(|p| p.interval_s).sum::<f64>().max(1e-9);
    let share = |hit: &dyn Fn(&Point) -> bool| {
        w.iter()
            .filter(|p| hit(p))
            .map(|p| p.interval_s)
            .sum::<f64>()
            / total
    };
    let pinned = share(&|p| p.cpu_percent >= cfg.cpu_percent);
    let mean_cpu = w.iter().map(|p| p.cpu_percent * p.interval_s).sum::<f64>() / total;
    let cores = (mean_cpu / 100.0).max(0.01);
    let voluntary = w.iter().map(|p| p.voluntary).sum::<u64>() as f64 / window / cores;
    let turnover: u64 = w.iter().map(|p| p.forks + p.exits).sum();
    let threshold_us = cfg.victim_runq_p99_ms * 1000.0;
    let waiting = share(&|p| p.others_runq_p99_us.is_some_and(|us| us >= threshold_us));
    let mut victims: Vec<f64> = w.iter().filter_map(|p| p.others_runq_p99_us).collect();
    let victims_p99 = median(&mut victims).unwrap_or(0.0) / 1000.0;
    (pinned >= cfg.pinned_fraction
        && voluntary <= cfg.max_voluntary_per_sec
        && turnover <= cfg.max_turnover
        && waiting >= 0.5)
        .then_some(RunawayEvidence {
            window_s: window,
            mean_cpu_percent: mean_cpu,
            pinned_fraction: pinned,
            voluntary_per_s_per_core: voluntary,
            turnover,
            victims_runq_p99_ms: victims_p99,
        })
}

/// What [`explosion`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct ExplosionEvidence {
    pub window_s: f64,
    pub forks: u64,
    pub exits: u64,
    pub new_tasks: i64,
    pub memory_growth: f64,
    pub growth_bytes_per_s: f64,
    pub headroom: Option<f64>,
    pub time_to_limit_s: Option<f64>,
    /// Which burst: tasks, memory, or both.
    pub tasks_burst: bool,
    pub memory_burst: bool,
}

/// Forks that accumulate (few exits), with either a task burst (net new tasks per CPU)
/// or a memory burst (the window's growth projects the headroom gone within the
/// explosion horizon), judged over seconds.
#[must_use]
pub fn explosion(
    points: &[Point],
    cpus: usize,
    cfg: &ExplosionConfig,
) -> Option<ExplosionEvidence> {
    // Cheap first (most cgroups, every tick): no fork in the window, no explosion.
    let end = points.last()?.t;
    if !points
        .iter()
        .rev()
        .take_while(|p| p.t >= end - cfg.window_sec as f64)
        .any(|p| p.forks > 0)
    {
        return None;
    }
    let w = last_secs(points, cfg.window_sec as f64);
    if w.len() < 3 {
        return None;
    }
    let window = span(w);
    let forks: u64 = w.iter().map(|p| p.forks).sum();
    let exits: u64 = w.iter().map(|p| p.exits).sum();
    if forks == 0 || exits as f64 > cfg.max_exit_ratio * forks as f64 {
        return None;
    }
    let new_tasks = match (w[0].pids, w[w.len() - 1].pids) {
        (Some(a), Some(b)) => i64::try_from(b).unwrap_or(i64::MAX) - i64::try_from(a).unwrap_or(0),
        _ => i64::try_from(forks).unwrap_or(i64::MAX) - i64::try_from(exits).unwrap_or(0),
    };
    let tasks_burst = new_tasks as f64 >= cfg.new_tasks_per_cpu * cpus.max(1) as f64;

    // Memory: growing in each of the last ticks, fast enough to end the headroom soon.
    let mem: Vec<(f64, f64)> = w.iter().filter_map(|p| Some((p.t, p.memory?))).collect();
    let rising = mem.len() >= 3 && mem.windows(2).rev().take(2).all(|p| p[1].1 > p[0].1);
    let growth = match (mem.first(), mem.last()) {
        (Some(a), Some(b)) => b.1 - a.1,
        _ => 0.0,
    };
    // The rate is projected from samples: a birth point's zero says that the cgroup is
    // new, not how fast it grows now (a service that loaded 200 MiB as it started and
    // now adds a little is no burst).
    let sampled: Vec<(f64, f64)> = w
        .iter()
        .filter(|p| !p.birth)
        .filter_map(|p| Some((p.t, p.memory?)))
        .collect();
    let slope = theil_sen(&sampled).unwrap_or(0.0);
    let headroom = w.iter().rev().find_map(|p| p.headroom).map(|h| h.max(0.0));
    let time_to_limit_s = headroom.filter(|_| slope > 0.0).map(|h| h / slope);
    let memory_burst = rising
        && time_to_limit_s.is_some_and(|t| t <= cfg.horizon_sec as f64)
        && headroom.is_some_and(|h| growth >= cfg.min_growth_percent / 100.0 * (h + growth));
    (tasks_burst || memory_burst).then_some(ExplosionEvidence {
        window_s: window,
        forks,
        exits,
        new_tasks,
        memory_growth: growth,
        growth_bytes_per_s: slope,
        headroom,
        time_to_limit_s,
        tasks_burst,
        memory_burst,
    })
}

/// What [`pressure`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct PressureEvidence {
    pub reclaim_stall_percent: f64,
    pub memory_some_avg10: Option<f64>,
    pub memory_full_avg10: Option<f64>,
    pub critical: bool,
}

/// Reclaim stall (last 3 ticks) or memory PSI over its thresholds.
#[must_use]
pub fn pressure(points: &[Point], cfg: &PressureConfig) -> Option<PressureEvidence> {
    let last = points.last()?;
    let recent = &points[points.len().saturating_sub(3)..];
    let time: f64 = recent.iter().map(|p| p.interval_s).sum();
    let stall_ms: f64 = recent
        .iter()
        .map(|p| p.reclaim_ms_per_s * p.interval_s)
        .sum();
    let stall = if time > 0.0 {
        stall_ms / time / 10.0
    } else {
        0.0
    };
    let some = last.memory_some_avg10;
    let full = last.memory_full_avg10;
    let over = stall >= cfg.reclaim_stall_percent
        || some.is_some_and(|s| s >= cfg.memory_some_percent)
        || full.is_some_and(|f| f >= cfg.memory_full_percent);
    let critical = stall >= 5.0 * cfg.reclaim_stall_percent
        || full.is_some_and(|f| f >= 4.0 * cfg.memory_full_percent);
    over.then_some(PressureEvidence {
        reclaim_stall_percent: stall,
        memory_some_avg10: some,
        memory_full_avg10: full,
        critical,
    })
}

/// Builds one cgroup's [`Point`] from its sample in a snapshot.
#[must_use]
pub fn point(
    t: f64,
    interval_s: f64,
    c: &CgroupSample,
    machine: &Machine,
    reserve_percent: f64,
    others_runq_p99_us: Option<f64>,
) -> Point {
    let f = &c.files;
    let memory = f.memory_current.map(|m| m as f64);
    let reserve = machine.mem_total_bytes as f64 * reserve_percent / 100.0;
    let machine_room = (machine.mem_available_bytes as f64 - reserve).max(0.0);
    let limit_room = match (f.memory_max.and_then(crate::cgroupfs::Limit::value), memory) {
        (Some(max), Some(m)) => Some((max as f64 - m).max(0.0)),
        _ => None,
    };
    let headroom = match (memory, limit_room) {
        (None, _) => None,
        (Some(_), Some(l)) => Some(l.min(machine_room)),
        (Some(_), None) => Some(machine_room),
    };
    Point {
        t,
        interval_s,
        memory,
        headroom,
        cpu_percent: c.cpu_percent,
        voluntary: c.switches.saturating_sub(c.involuntary_switches),
        forks: c.forks,
        exits: c.exits,
        pids: f.pids_current,
        reclaim_ms_per_s: c.reclaim_ms_per_s,
        memory_some_avg10: f.memory_pressure.map(|p| p.some.avg10),
        memory_full_avg10: f.memory_pressure.and_then(|p| p.full.map(|l| l.avg10)),
        others_runq_p99_us,
        birth: false,
    }
}

/// What a cgroup created since the previous tick looked like then: no memory, nothing
/// done. A point for the short-window detectors only (the leak window judges what a
/// cgroup keeps, not how it started), so a memory burst in a new unit is judged on its
/// second sight, as one in a cgroup made in advance is. Its tasks are those of the
/// first sight: the threads a service starts with are no burst of new tasks.
fn birth_point(first: &Point) -> Point {
    Point {
        t: first.t - first.interval_s,
        interval_s: first.interval_s,
        memory: first.memory.map(|_| 0.0),
        headroom: first.headroom,
        cpu_percent: 0.0,
        voluntary: 0,
        forks: 0,
        exits: 0,
        pids: first.pids,
        reclaim_ms_per_s: 0.0,
        memory_some_avg10: None,
        memory_full_avg10: None,
        others_runq_p99_us: None,
        birth: true,
    }
}

/// One cgroup's (or process's) past: the last seconds in full for the short-window
/// detectors, memory alone (16 bytes a point) over the long window for leaks. At 1,000
/// cgroups and 5 min that is ~5 MB, not the ~45 MB full points would take. A cgroup
/// idle for longer than the short window keeps one point (the baseline its next burst
/// is measured from) instead of a window of idle ones.
#[derive(Debug, Default)]
struct History {
    recent: VecDeque<Point>,
    last_active: f64,
    baseline: Option<Point>,
    /// `(seconds, bytes)`.
    memory: VecDeque<(f64, f64)>,
    /// Start of the first tick the memory series covers.
    memory_start: f64,
    headroom: Option<f64>,
}

impl History {
    fn push(&mut self, p: Point, recent_s: f64, memory_s: f64) {
        let t = p.t;
        if let Some(m) = p.memory {
            if self.memory.is_empty() {
                self.memory_start = t - p.interval_s;
            }
            self.memory.push_back((t, m));
            self.headroom = p.headroom;
        }
        while self
            .memory
            .front()
            .is_some_and(|&(mt, _)| mt < t - memory_s)
        {
            if let Some((mt, _)) = self.memory.pop_front() {
                self.memory_start = mt;
            }
        }
        let active = p.cpu_percent > 0.0 || p.forks > 0 || p.exits > 0 || p.reclaim_ms_per_s > 0.0;
        if active {
            self.last_active = t;
            if let Some(mut b) = self.baseline.take() {
                // Idle until now, so this is what the cgroup looked like a tick ago.
                b.t = t - p.interval_s;
                self.recent.push_back(b);
            }
            self.recent.push_back(p);
        } else if t - self.last_active <= recent_s
            || self.recent.is_empty() && self.baseline.is_none()
        {
            self.recent.push_back(p);
        } else {
            self.recent = VecDeque::new();
            self.baseline = Some(p);
        }
        while self.recent.front().is_some_and(|q| q.t < t - recent_s) {
            self.recent.pop_front();
        }
    }

    fn leak(&mut self, cfg: &LeakConfig) -> Option<LeakEvidence> {
        let last = self.memory.back()?.0;
        let window = last - self.memory_start;
        let headroom = self.headroom?;
        leak_series(self.memory.make_contiguous(), window, headroom, cfg)
    }
}

#[derive(Debug, Default)]
struct ProcessStreak {
    since: f64,
    starttime: u64,
}

/// Keeps the windows and runs every detector once per snapshot.
#[derive(Debug)]
pub struct Detector {
    config: DetectConfig,
    t: f64,
    history: HashMap<CgroupId, History>,
    /// RSS windows of processes, with their start time (a reused pid starts over).
    rss: HashMap<u32, (u64, History)>,
    saturated: HashMap<u32, ProcessStreak>,
    gpu: GpuHistory,
    /// Cgroups under containment (see [`Detector::set_contained`]).
    contained: HashSet<String>,
}

/// GPU memory windows: per (cgroup, device) and per (pid, device), and since when
/// exited processes hold memory.
#[derive(Debug, Default)]
struct GpuHistory {
    /// The last GPU sample taken in (a tick without a new sample adds nothing).
    seq: u64,
    cgroups: HashMap<(String, u32), History>,
    processes: HashMap<(u32, u32), History>,
    orphans: HashMap<(u32, u32), f64>,
    /// What the last sample showed: a tick that reuses it shows the same (a finding
    /// must not blink between samples, or its ladder would see quiet spells).
    last: Vec<Finding>,
}

impl Detector {
    #[must_use]
    pub fn new(config: DetectConfig) -> Self {
        Self {
            config,
            t: 0.0,
            history: HashMap::new(),
            rss: HashMap::new(),
            saturated: HashMap::new(),
            gpu: GpuHistory::default(),
            contained: HashSet::new(),
        }
    }

    /// The cgroups the agent contains now. Their memory is not counted in their
    /// ancestors' series: an ancestor is judged on what is not contained yet, so a
    /// contained leak (throttled, frozen) does not start a ladder on its slice — which
    /// would cap its siblings — while a sibling's own growth still shows there.
    pub fn set_contained(&mut self, cgroups: impl IntoIterator<Item = String>) {
        self.contained = cgroups.into_iter().collect();
    }

    #[must_use]
    pub fn config(&self) -> &DetectConfig {
        &self.config
    }

    /// New thresholds (a policy reload); the windows are kept.
    pub fn set_config(&mut self, config: DetectConfig) {
        self.config = config;
    }

    /// The recent points of one cgroup, oldest first.
    #[must_use]
    pub fn history(&self, id: CgroupId) -> Option<&VecDeque<Point>> {
        self.history.get(&id).map(|h| &h.recent)
    }

    /// Adds a snapshot and returns every finding, deepest cgroup first: a memory
    /// finding of a cgroup whose descendant has the same finding is dropped (the
    /// parent's memory includes the child's; the child is the offender).
    pub fn observe(&mut self, snap: &Snapshot) -> Vec<Finding> {
        let interval_s = snap.interval_ns as f64 / 1e9;
        self.t += interval_s;
        let t = self.t;
        // Worst and second-worst run-queue p99 so each cgroup sees the others' worst.
        let mut worst: [(Option<CgroupId>, f64); 2] = [(None, 0.0), (None, 0.0)];
        for c in &snap.cgroups {
            if let Some(p99) = c.runq.p99_us {
                if p99 > worst[0].1 {
                    worst = [(Some(c.id), p99), worst[0]];
                } else if p99 > worst[1].1 {
                    worst[1] = (Some(c.id), p99);
                }
            }
        }
        let window = self.config.window_sec as f64;
        let recent = (self
            .config
            .runaway
            .window_sec
            .max(self.config.explosion.window_sec)
            + 2) as f64;
        let contained: Vec<(&str, f64)> = snap
            .cgroups
            .iter()
            .filter_map(|c| {
                let p = c.path.as_deref().filter(|p| self.contained.contains(*p))?;
                Some((p, c.files.memory_current? as f64))
            })
            .collect();
        let mut seen = HashSet::new();
        let mut findings = Vec::new();
        for c in &snap.cgroups {
            let Some(path) = c.path.as_deref() else {
                continue;
            };
            seen.insert(c.id);
            let others = if worst[0].0 == Some(c.id) {
                worst[1]
            } else {
                worst[0]
            };
            let mut p = point(
                t,
                interval_s,
                c,
                &snap.machine,
                self.config.leak.reserve_percent,
                others.0.map(|_| others.1),
            );
            let below: f64 = contained
                .iter()
                .filter(|(q, _)| *q != path && in_subtree(path, q))
                .map(|(_, m)| m)
                .sum();
            if below > 0.0 {
                p.memory = p.memory.map(|m| (m - below).max(0.0));
            }
            let h = self.history.entry(c.id).or_insert_with(|| {
                let mut h = History::default();
                if c.born {
                    h.recent.push_back(birth_point(&p));
                }
                h
            });
            h.push(p, recent, window);
            let leak = h.leak(&self.config.leak);
            let points = h.recent.make_contiguous();
            findings.extend(cgroup_findings(
                &self.config,
                c.id,
                path,
                points,
                leak,
                snap,
            ));
        }
        self.history.retain(|id, _| seen.contains(id));
        let headroom: HashMap<&str, f64> = snap
            .cgroups
            .iter()
            .filter_map(|c| Some((c.path.as_deref()?, self.history.get(&c.id)?.headroom?)))
            .collect();
        let process_leaks = self.process_leaks(snap, t, window, &headroom);
        merge_process_leaks(&mut findings, process_leaks);
        findings.extend(self.saturation(snap, t));
        findings.extend(self.gpu_findings(snap, t, window));
        suppress_ancestors(&mut findings);
        attach_gpus(&mut findings, snap);
        findings
    }

    /// Leaks of single processes, from the RSS of processes read this tick (the busiest
    /// cgroups' and new ones): a leaking process runs, so it is read. Its headroom is
    /// its cgroup's.
    fn process_leaks(
        &mut self,
        snap: &Snapshot,
        t: f64,
        window: f64,
        headroom: &HashMap<&str, f64>,
    ) -> Vec<Finding> {
        let interval_s = snap.interval_ns as f64 / 1e9;
        let mut out = Vec::new();
        for p in snap.processes.iter() {
            // Only processes read this tick that ran since their last read: an idle
            // process's RSS does not grow.
            if p.read_tick != snap.tick || !p.cpu_percent.is_some_and(|c| c > 0.0) {
                continue;
            }
            let h = self.rss.entry(p.pid).or_default();
            if h.0 != p.starttime {
                *h = (p.starttime, History::default());
            }
            let cgroup = p.cgroup.as_deref().unwrap_or("/");
            h.1.push(
                Point {
                    t,
                    interval_s,
                    memory: Some(p.rss_bytes as f64),
                    headroom: headroom.get(cgroup).copied(),
                    ..Point::default()
                },
                0.0,
                window,
            );
            let Some(e) = h.1.leak(&self.config.leak) else {
                continue;
            };
            let critical = e.time_to_limit_s
                <= self.config.leak.critical_fraction * self.config.leak.horizon_sec as f64;
            out.push(Finding {
                kind: FindingKind::Leak,
                severity: if critical { Severity::Critical } else { Severity::Warning },
                cgroup_id: snap.cgroup(cgroup).map_or(0, |c| c.id),
                cgroup: cgroup.to_owned(),
                pid: Some(p.pid),
                comm: Some(p.comm.clone()),
                summary: format!(
                    "{} (pid {}) RSS grows {:.2} MiB/s for {:.0} s; its cgroup has {:.0} MiB left: limit in {:.0} s",
                    p.comm,
                    p.pid,
                    e.slope_bytes_per_s / MIB,
                    e.window_s,
                    e.headroom / MIB,
                    e.time_to_limit_s
                ),
                window_sec: e.window_s,
                time_to_limit_sec: Some(e.time_to_limit_s),
                evidence: vec![
                    ev("process_slope", e.slope_bytes_per_s / MIB, "MiB/s"),
                    ev("process_rss", e.memory / MIB, "MiB"),
                    ev("headroom", e.headroom / MIB, "MiB"),
                    ev("time_to_limit", e.time_to_limit_s, "s"),
                    ev("rise_over_noise", e.rise_over_noise, "sigma"),
                ],
                gpus: Vec::new(),
            });
        }
        // Forget processes that exited or have not run for a window.
        self.rss.retain(|pid, (_, h)| {
            snap.processes.binary_search_by_key(pid, |p| p.pid).is_ok()
                && h.memory.back().is_some_and(|&(mt, _)| mt >= t - window)
        });
        out
    }
}

/// A process leak inside a cgroup that leaks as a whole names the process on the
/// cgroup's finding (its lead and evidence); a process leaking while its cgroup as a
/// whole does not (others shrink) is a finding of its own.
fn merge_process_leaks(findings: &mut Vec<Finding>, process_leaks: Vec<Finding>) {
    for p in process_leaks {
        if let Some(c) = findings
            .iter_mut()
            .find(|f| f.kind == FindingKind::Leak && f.cgroup == p.cgroup)
        {
            c.pid = p.pid;
            c.comm.clone_from(&p.comm);
            c.evidence.extend(
                p.evidence
                    .into_iter()
                    .filter(|e| e.name.starts_with("process_")),
            );
            c.evidence
                .push(ev("process_pid", f64::from(p.pid.unwrap_or(0)), "pid"));
        } else {
            findings.push(p);
        }
    }
}

/// Builds a finding of one cgroup from its kind-specific parts.
type Make<'a> =
    &'a dyn Fn(FindingKind, Severity, String, f64, Option<f64>, Vec<Evidence>) -> Finding;

fn cgroup_findings(
    cfg: &DetectConfig,
    id: CgroupId,
    path: &str,
    points: &[Point],
    leak: Option<LeakEvidence>,
    snap: &Snapshot,
) -> Vec<Finding> {
    let base = |kind, severity, summary: String, window_sec, ttl, evidence| {
        // Looked up only for a finding: a scan of every process per cgroup per tick
        // would cost more than all the detectors.
        let largest = largest_process(snap, path);
        Finding {
            kind,
            severity,
            cgroup_id: id,
            cgroup: path.to_owned(),
            pid: largest.map(|p| p.0),
            comm: largest.map(|p| p.1.to_owned()),
            summary,
            window_sec,
            time_to_limit_sec: ttl,
            evidence,
            gpus: Vec::new(),
        }
    };
    let mut out = Vec::new();
    memory_findings(cfg, points, leak, snap.cpus, &base, &mut out);
    cpu_and_pressure_findings(cfg, points, &base, &mut out);
    out
}

fn memory_findings(
    cfg: &DetectConfig,
    points: &[Point],
    leak: Option<LeakEvidence>,
    cpus: usize,
    base: Make<'_>,
    out: &mut Vec<Finding>,
) {
    if let Some(e) = leak {
        let critical =
            e.time_to_limit_s <= cfg.leak.critical_fraction * cfg.leak.horizon_sec as f64;
        out.push(base(
            FindingKind::Leak,
            if critical {
                Severity::Critical
            } else {
                Severity::Warning
            },
            format!(
                "memory grows {:.2} MiB/s for {:.0} s; {:.0} MiB left: limit in {:.0} s",
                e.slope_bytes_per_s / MIB,
                e.window_s,
                e.headroom / MIB,
                e.time_to_limit_s
            ),
            e.window_s,
            Some(e.time_to_limit_s),
            vec![
                ev("slope", e.slope_bytes_per_s / MIB, "MiB/s"),
                ev("recent_slope", e.recent_slope_bytes_per_s / MIB, "MiB/s"),
                ev("memory", e.memory / MIB, "MiB"),
                ev("headroom", e.headroom / MIB, "MiB"),
                ev("time_to_limit", e.time_to_limit_s, "s"),
                ev("rise_over_noise", e.rise_over_noise, "sigma"),
            ],
        ));
    }
    if let Some(e) = explosion(points, cpus, &cfg.explosion) {
        let what = match (e.tasks_burst, e.memory_burst) {
            (true, true) => "tasks and memory",
            (true, false) => "tasks",
            _ => "memory",
        };
        let mut evidence = vec![
            ev("forks", e.forks as f64, "tasks"),
            ev("exits", e.exits as f64, "tasks"),
            ev("new_tasks", e.new_tasks as f64, "tasks"),
            ev("memory_growth", e.memory_growth / MIB, "MiB"),
            ev("growth_rate", e.growth_bytes_per_s / MIB, "MiB/s"),
        ];
        if let Some(h) = e.headroom {
            evidence.push(ev("headroom", h / MIB, "MiB"));
        }
        out.push(base(
            FindingKind::Explosion,
            Severity::Critical,
            format!(
                "{what} burst: {} forks, {} new tasks, +{:.0} MiB in {:.0} s{}",
                e.forks,
                e.new_tasks,
                e.memory_growth / MIB,
                e.window_s,
                e.time_to_limit_s
                    .map(|t| format!("; headroom gone in {t:.0} s"))
                    .unwrap_or_default()
            ),
            e.window_s,
            e.time_to_limit_s,
            evidence,
        ));
    }
}

fn cpu_and_pressure_findings(
    cfg: &DetectConfig,
    points: &[Point],
    base: Make<'_>,
    out: &mut Vec<Finding>,
) {
    if let Some(e) = runaway(points, &cfg.runaway) {
        out.push(base(
                FindingKind::Runaway,
                Severity::Warning,
                format!(
                    "{:.0} % CPU for {:.0} s with {:.1} voluntary sleeps/s per core; others wait {:.1} ms (p99)",
                    e.mean_cpu_percent, e.window_s, e.voluntary_per_s_per_core, e.victims_runq_p99_ms
                ),
                e.window_s,
                None,
                vec![
                    ev("cpu", e.mean_cpu_percent, "%"),
                    ev("pinned_fraction", e.pinned_fraction, "ratio"),
                    ev("voluntary_sleeps", e.voluntary_per_s_per_core, "/s/core"),
                    ev("forks_and_exits", e.turnover as f64, "tasks"),
                    ev("others_runq_p99", e.victims_runq_p99_ms, "ms"),
                ],
            ));
    }
    if let Some(e) = pressure(points, &cfg.pressure) {
        let mut evidence = vec![ev("reclaim_stall", e.reclaim_stall_percent, "%")];
        if let Some(s) = e.memory_some_avg10 {
            evidence.push(ev("memory_psi_some_avg10", s, "%"));
        }
        if let Some(f) = e.memory_full_avg10 {
            evidence.push(ev("memory_psi_full_avg10", f, "%"));
        }
        out.push(base(
            FindingKind::Pressure,
            if e.critical {
                Severity::Critical
            } else {
                Severity::Warning
            },
            format!(
                "stalled {:.1} % of the time in reclaim; memory PSI some {} full {}",
                e.reclaim_stall_percent,
                fmt_opt(e.memory_some_avg10),
                fmt_opt(e.memory_full_avg10)
            ),
            points.iter().rev().take(3).map(|p| p.interval_s).sum(),
            None,
            evidence,
        ));
    }
}

impl Detector {
    /// A process at about one core, for the whole window, while the machine has idle
    /// cores: more workers (or fewer awaits on one loop) would help. A hint only.
    fn saturation(&mut self, snap: &Snapshot, t: f64) -> Vec<Finding> {
        let cfg = &self.config.saturation;
        let busy: f64 = snap.cgroups.iter().map(|c| c.cpu_percent).sum::<f64>() / 100.0;
        let idle_cores = snap.cpus as f64 - busy;
        let mut out = Vec::new();
        let mut alive = HashSet::new();
        for p in snap.processes.iter() {
            let Some(cpu) = p.cpu_percent.filter(|_| p.read_tick == snap.tick) else {
                continue;
            };
            if cpu < cfg.min_percent || cpu > cfg.max_percent || idle_cores < cfg.min_idle_cores {
                continue;
            }
            alive.insert(p.pid);
            let streak = self.saturated.entry(p.pid).or_insert(ProcessStreak {
                since: t - snap.interval_ns as f64 / 1e9,
                starttime: p.starttime,
            });
            if streak.starttime != p.starttime {
                *streak = ProcessStreak {
                    since: t,
                    starttime: p.starttime,
                };
            }
            let held = t - streak.since;
            if held < cfg.window_sec as f64 {
                continue;
            }
            let cgroup = p.cgroup.clone().unwrap_or_default();
            let cgroup_id = snap.cgroup(&cgroup).map_or(0, |c| c.id);
            let mut f = Finding {
                kind: FindingKind::SingleThreadSaturation,
                severity: Severity::Hint,
                cgroup_id,
                cgroup,
                pid: Some(p.pid),
                comm: Some(p.comm.clone()),
                summary: format!(
                    "{} (pid {}) holds {cpu:.0} % of one core for {held:.0} s while {idle_cores:.1} cores idle: \
                     one thread or event loop is the bottleneck; more workers would use them",
                    p.comm, p.pid
                ),
                window_sec: held,
                time_to_limit_sec: None,
                evidence: vec![
                    ev("process_cpu", cpu, "%"),
                    ev("threads", p.threads.unwrap_or(0) as f64, "threads"),
                    ev("idle_cores", idle_cores, "cores"),
                ],
                gpus: Vec::new(),
            };
            if let Some(gpu) = &snap.gpu {
                starved(&mut f, gpu, self.config.gpu.starved_util_percent);
            }
            out.push(f);
        }
        self.saturated.retain(|pid, _| alive.contains(pid));
        out
    }
}

/// Incident A: a saturation finding whose cgroup holds memory on a GPU that is
/// under-used becomes a `gpu_starved` hint naming that GPU.
fn starved(f: &mut Finding, gpu: &GpuSnapshot, below_percent: f64) {
    let held = gpu.subtree_memory(&f.cgroup);
    let Some((d, bytes)) = held
        .iter()
        .filter(|(_, b)| **b > 0)
        .filter_map(|(i, b)| Some((gpu.device(*i)?, *b)))
        .filter(|(d, _)| !d.lost)
        .filter_map(|(d, b)| Some((d, f64::from(d.util_percent?), b)))
        .filter(|(_, util, _)| *util < below_percent)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(d, _, b)| (d, b))
    else {
        return;
    };
    let util = f64::from(d.util_percent.unwrap_or(0));
    f.kind = FindingKind::GpuStarved;
    f.summary = format!(
        "{}; GPU {} ({}) runs at {util:.0} % holding {:.0} MiB for this cgroup: the GPU waits \
         for this thread — more workers would feed it",
        f.summary,
        d.index,
        d.name,
        bytes as f64 / MIB
    );
    f.evidence
        .push(ev("gpu_device", f64::from(d.index), "index"));
    f.evidence.push(ev("gpu_util", util, "%"));
    f.evidence.push(ev("gpu_memory", bytes as f64 / MIB, "MiB"));
}

/// Fills every finding's [`Finding::gpus`]: each device with what the cgroup holds.
fn attach_gpus(findings: &mut [Finding], snap: &Snapshot) {
    let Some(gpu) = &snap.gpu else {
        return;
    };
    for f in findings {
        let held = gpu.subtree_memory(&f.cgroup);
        f.gpus = gpu
            .devices
            .iter()
            .filter(|d| !d.lost)
            .map(|d| GpuUse {
                device: d.index,
                uuid: d.uuid.clone(),
                memory_percent: d.memory_percent(),
                util_percent: d.util_percent.map(f64::from),
                cgroup_bytes: held.get(&d.index).copied().unwrap_or(0),
            })
            .collect();
    }
}

impl Detector {
    /// GPU leaks per cgroup and device (a process's own leak named on it, or a finding
    /// of its own when its cgroup as a whole does not leak) and GPU memory of exited
    /// processes. Runs on new GPU samples only.
    fn gpu_findings(&mut self, snap: &Snapshot, t: f64, window: f64) -> Vec<Finding> {
        let Some(gpu) = snap.gpu.as_deref() else {
            self.gpu = GpuHistory::default();
            return Vec::new();
        };
        if gpu.seq == self.gpu.seq {
            return self.gpu.last.clone();
        }
        self.gpu.seq = gpu.seq;
        let cfg = self.config.leak.clone();
        let interval_s = snap.interval_ns as f64 / 1e9;
        let point = |memory: u64, device: u32| gpu_point(gpu, t, interval_s, memory, device);
        let id_of = |path: &str| snap.cgroup(path).map_or(0, |c| c.id);
        let process_leaks = self.gpu_process_leaks(gpu, &point, window);

        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (cgroup, devices) in gpu.by_cgroup() {
            for (device, use_) in devices {
                let key = (cgroup.to_owned(), device);
                let h = self.gpu.cgroups.entry(key.clone()).or_default();
                h.push(point(use_.memory_bytes, device), 0.0, window);
                seen.insert(key);
                if let Some(e) = h.leak(&cfg) {
                    let ours =
                        |p: &GpuProcess| p.device == device && p.cgroup.as_deref() == Some(cgroup);
                    // The process growing fastest, else the largest, is the lead.
                    let lead = process_leaks
                        .iter()
                        .filter(|(p, _)| ours(p))
                        .max_by(|a, b| a.1.slope_bytes_per_s.total_cmp(&b.1.slope_bytes_per_s));
                    let largest = gpu
                        .processes
                        .iter()
                        .filter(|p| ours(p))
                        .max_by_key(|p| p.used_bytes);
                    let mut f = gpu_leak_finding(
                        &cfg,
                        gpu,
                        device,
                        cgroup,
                        id_of(cgroup),
                        &e,
                        lead.map_or(largest, |l| Some(l.0)),
                    );
                    if let Some((p, pe)) = lead {
                        f.evidence.push(ev(
                            "process_gpu_slope",
                            pe.slope_bytes_per_s / MIB,
                            "MiB/s",
                        ));
                        f.evidence
                            .push(ev("process_gpu_memory", pe.memory / MIB, "MiB"));
                        f.evidence.push(ev("process_pid", f64::from(p.pid), "pid"));
                    }
                    out.push(f);
                }
            }
        }
        self.gpu.cgroups.retain(|k, _| seen.contains(k));
        // A process leaking while its cgroup as a whole does not (others free memory).
        let reported: HashSet<(String, u32)> = out
            .iter()
            .filter_map(|f| {
                Some((
                    f.cgroup.clone(),
                    f.pid
                        .and_then(|pid| gpu.processes.iter().find(|p| p.pid == pid))?
                        .device,
                ))
            })
            .collect();
        for (p, e) in &process_leaks {
            let cgroup = p.cgroup.as_deref().unwrap_or("/");
            if !reported.contains(&(cgroup.to_owned(), p.device)) {
                out.push(gpu_leak_finding(
                    &cfg,
                    gpu,
                    p.device,
                    cgroup,
                    id_of(cgroup),
                    e,
                    Some(p),
                ));
            }
        }
        out.extend(self.gpu_orphans(gpu, t, &id_of));
        self.gpu.last.clone_from(&out);
        out
    }

    /// Leaks of single processes' GPU memory, per device.
    fn gpu_process_leaks<'a>(
        &mut self,
        gpu: &'a GpuSnapshot,
        point: &dyn Fn(u64, u32) -> Point,
        window: f64,
    ) -> Vec<(&'a GpuProcess, LeakEvidence)> {
        let mut leaks = Vec::new();
        let mut alive = HashSet::new();
        for p in &gpu.processes {
            let (Some(used), ProcState::Running) = (p.used_bytes, p.state) else {
                continue;
            };
            alive.insert((p.pid, p.device));
            let h = self.gpu.processes.entry((p.pid, p.device)).or_default();
            h.push(point(used, p.device), 0.0, window);
            if let Some(e) = h.leak(&self.config.leak) {
                leaks.push((p, e));
            }
        }
        self.gpu.processes.retain(|k, _| alive.contains(k));
        leaks
    }

    fn gpu_orphans(
        &mut self,
        gpu: &GpuSnapshot,
        t: f64,
        id_of: &dyn Fn(&str) -> CgroupId,
    ) -> Vec<Finding> {
        let grace = self.config.gpu.orphan_grace_sec as f64;
        let mut out = Vec::new();
        let mut held = HashSet::new();
        for p in &gpu.processes {
            if p.state == ProcState::Running {
                continue;
            }
            let key = (p.pid, p.device);
            held.insert(key);
            let since = *self.gpu.orphans.entry(key).or_insert(t);
            if t - since < grace {
                continue;
            }
            let d = gpu.device(p.device);
            let bytes = p.used_bytes.unwrap_or(0) as f64;
            let (what, cgroup) = match p.state {
                ProcState::Zombie => (
                    "exited but was not reaped by its parent (a zombie): the memory is freed when the parent waits for it or exits",
                    p.cgroup.clone().unwrap_or_else(|| "/".into()),
                ),
                _ => (
                    "no longer exists here: the driver still holds its memory (a stuck context) or it runs in another PID namespace; `nvidia-smi` shows it",
                    "/".to_owned(),
                ),
            };
            out.push(Finding {
                kind: FindingKind::GpuOrphan,
                severity: Severity::Warning,
                cgroup_id: id_of(&cgroup),
                cgroup,
                pid: Some(p.pid),
                comm: p.comm.clone(),
                summary: format!(
                    "pid {} holds {:.0} MiB on GPU {} ({}) for {:.0} s and {what}",
                    p.pid,
                    bytes / MIB,
                    p.device,
                    d.map_or("?", |d| d.name.as_str()),
                    t - since
                ),
                window_sec: t - since,
                time_to_limit_sec: None,
                evidence: vec![
                    ev("gpu_device", f64::from(p.device), "index"),
                    ev("gpu_memory", bytes / MIB, "MiB"),
                    ev("held_for", t - since, "s"),
                ],
                gpus: Vec::new(),
            });
        }
        self.gpu.orphans.retain(|k, _| held.contains(k));
        out
    }
}

/// One GPU memory reading of a series: the device's free memory is the headroom.
fn gpu_point(gpu: &GpuSnapshot, t: f64, interval_s: f64, memory: u64, device: u32) -> Point {
    Point {
        t,
        interval_s,
        memory: Some(memory as f64),
        headroom: gpu
            .device(device)
            .and_then(crate::gpu::GpuDevice::memory_free_bytes)
            .map(|f| f as f64),
        ..Point::default()
    }
}

fn gpu_leak_finding(
    cfg: &LeakConfig,
    gpu: &GpuSnapshot,
    device: u32,
    cgroup: &str,
    cgroup_id: CgroupId,
    e: &LeakEvidence,
    lead: Option<&GpuProcess>,
) -> Finding {
    let critical = e.time_to_limit_s <= cfg.critical_fraction * cfg.horizon_sec as f64;
    let name = gpu.device(device).map_or("?", |d| d.name.as_str());
    let who = lead.map_or_else(
        || cgroup.to_owned(),
        |p| {
            format!(
                "{} (pid {}) in {cgroup}",
                p.comm.as_deref().unwrap_or("?"),
                p.pid
            )
        },
    );
    Finding {
        kind: FindingKind::GpuLeak,
        severity: if critical {
            Severity::Critical
        } else {
            Severity::Warning
        },
        cgroup_id,
        cgroup: cgroup.to_owned(),
        pid: lead.map(|p| p.pid),
        comm: lead.and_then(|p| p.comm.clone()),
        summary: format!(
            "GPU {device} ({name}) memory of {who} grows {:.2} MiB/s for {:.0} s ({:.0} MiB now); \
             {:.0} MiB free on the device: full in {:.0} s",
            e.slope_bytes_per_s / MIB,
            e.window_s,
            e.memory / MIB,
            e.headroom / MIB,
            e.time_to_limit_s
        ),
        window_sec: e.window_s,
        time_to_limit_sec: Some(e.time_to_limit_s),
        evidence: vec![
            ev("gpu_device", f64::from(device), "index"),
            ev("gpu_slope", e.slope_bytes_per_s / MIB, "MiB/s"),
            ev("gpu_memory", e.memory / MIB, "MiB"),
            ev("gpu_free", e.headroom / MIB, "MiB"),
            ev("time_to_limit", e.time_to_limit_s, "s"),
            ev("rise_over_noise", e.rise_over_noise, "sigma"),
        ],
        gpus: Vec::new(),
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} %"))
}

/// The process with the most RSS in `path` (the lead an operator checks first).
fn largest_process<'a>(snap: &'a Snapshot, path: &str) -> Option<(u32, &'a str)> {
    snap.processes
        .iter()
        .filter(|p| p.cgroup.as_deref() == Some(path))
        .max_by_key(|p| p.rss_bytes)
        .map(|p| (p.pid, p.comm.as_str()))
}

/// Drops memory findings (leak, explosion, pressure) of cgroups one of whose
/// descendants has the same finding: memory is hierarchical, the child is the offender.
fn suppress_ancestors(findings: &mut Vec<Finding>) {
    let hierarchical = |k| {
        matches!(
            k,
            FindingKind::Leak | FindingKind::Explosion | FindingKind::Pressure
        )
    };
    let keyed: Vec<(FindingKind, String)> = findings
        .iter()
        .map(|f| (f.kind, f.cgroup.clone()))
        .collect();
    findings.retain(|f| {
        !hierarchical(f.kind)
            || !keyed
                .iter()
                .any(|(k, p)| *k == f.kind && p != &f.cgroup && in_subtree(&f.cgroup, p))
    });
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(
                b.cgroup
                    .matches('/')
                    .count()
                    .cmp(&a.cgroup.matches('/').count()),
            )
            .then(a.cgroup.cmp(&b.cgroup))
    });
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, sync::Arc};

    use super::*;
    use crate::{
        cgroupfs::{Limit, Pressure, PsiLine},
        collect::{CgroupFiles, Events, ProcessSample},
        probes::EbpfStats,
    };

    const CPUS: usize = 2;

    /// One synthetic tick per second; `f(t)` fills in what the case varies.
    fn series(secs: u32, limit_mib: f64, f: impl Fn(f64, &mut Point)) -> Vec<Point> {
        (1..=secs)
            .map(|i| {
                let t = f64::from(i);
                let mut p = Point {
                    t,
                    interval_s: 1.0,
                    others_runq_p99_us: Some(50.0),
                    pids: Some(4),
                    voluntary: 200,
                    cpu_percent: 5.0,
                    ..Point::default()
                };
                f(t, &mut p);
                if let Some(m) = p.memory {
                    p.memory = Some(m * MIB);
                    p.headroom = Some((limit_mib * MIB - m * MIB).max(0.0));
                }
                p
            })
            .collect()
    }

    /// Deterministic noise in [-1, 1].
    fn noise(t: f64) -> f64 {
        ((t * 12.9898).sin() * 43_758.545_3).fract()
    }

    fn kinds(points: &[Point]) -> Vec<FindingKind> {
        let cfg = DetectConfig::default();
        let mut k = Vec::new();
        if leak(points, &cfg.leak).is_some() {
            k.push(FindingKind::Leak);
        }
        if runaway(points, &cfg.runaway).is_some() {
            k.push(FindingKind::Runaway);
        }
        if explosion(points, CPUS, &cfg.explosion).is_some() {
            k.push(FindingKind::Explosion);
        }
        if pressure(points, &cfg.pressure).is_some() {
            k.push(FindingKind::Pressure);
        }
        k
    }

    /// Every synthetic case against every series detector: the expected findings and no
    /// others (a compile burst must be neither a runaway nor an explosion nor a leak).
    /// `--nocapture` prints the false-positive/false-negative table.
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one table of cases, read top to bottom"
    )]
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "synthetic series count whole seconds"
    )]
    fn synthetic_series_table() {
        use FindingKind::{Explosion, Leak, Pressure, Runaway};
        let cases: Vec<(&str, Vec<Point>, Vec<FindingKind>)> = vec![
            (
                "stable",
                series(300, 1024.0, |_, p| p.memory = Some(500.0)),
                vec![],
            ),
            (
                "noisy-stable (±30 MiB)",
                series(300, 1024.0, |t, p| p.memory = Some(500.0 + 30.0 * noise(t))),
                vec![],
            ),
            (
                "noisy-stable near its limit",
                series(300, 1024.0, |t, p| p.memory = Some(960.0 + 20.0 * noise(t))),
                vec![],
            ),
            (
                "glacial growth (limit in hours)",
                series(300, 4096.0, |t, p| p.memory = Some(500.0 + 0.05 * t)),
                vec![],
            ),
            (
                "slow leak 0.5 MiB/s",
                series(300, 1024.0, |t, p| {
                    p.memory = Some(500.0 + 0.5 * t + 3.0 * noise(t));
                }),
                vec![Leak],
            ),
            (
                "fast leak 20 MiB/s",
                series(30, 1024.0, |t, p| {
                    p.memory = Some(200.0 + 20.0 * t);
                    p.cpu_percent = 30.0;
                }),
                vec![Leak],
            ),
            (
                "spike then plateau (model load)",
                series(90, 1024.0, |t, p| {
                    p.memory = Some(if t < 20.0 {
                        100.0 + 40.0 * t
                    } else {
                        900.0 + 2.0 * noise(t)
                    });
                }),
                vec![],
            ),
            (
                "GC sawtooth, flat baseline",
                series(300, 1024.0, |t, p| {
                    p.memory = Some(400.0 + (t % 20.0) * 10.0);
                }),
                vec![],
            ),
            (
                "GC sawtooth over a 1 MiB/s leak",
                series(300, 1536.0, |t, p| {
                    p.memory = Some(400.0 + t + (t % 20.0) * 10.0);
                }),
                vec![Leak],
            ),
            (
                "CPU runaway, others queue",
                series(40, 1024.0, |_, p| {
                    p.memory = Some(50.0);
                    p.cpu_percent = 100.0;
                    p.voluntary = 0;
                    p.others_runq_p99_us = Some(8_000.0);
                }),
                vec![Runaway],
            ),
            (
                "busy server at 100 % (sleeps in epoll)",
                series(40, 1024.0, |_, p| {
                    p.memory = Some(50.0);
                    p.cpu_percent = 100.0;
                    p.voluntary = 3_000;
                    p.others_runq_p99_us = Some(8_000.0);
                }),
                vec![],
            ),
            (
                "spinner alone on an idle machine",
                series(40, 1024.0, |_, p| {
                    p.memory = Some(50.0);
                    p.cpu_percent = 100.0;
                    p.voluntary = 0;
                    p.others_runq_p99_us = Some(60.0);
                }),
                vec![],
            ),
            (
                "compile-like burst of short processes",
                series(40, 2048.0, |t, p| {
                    p.cpu_percent = 190.0;
                    p.forks = 20;
                    p.exits = 20;
                    p.voluntary = 60;
                    p.pids = Some(10 + (t as u64 % 4));
                    p.others_runq_p99_us = Some(8_000.0);
                    p.memory = Some(300.0 + 120.0 * (t * 0.7).sin().abs());
                }),
                vec![],
            ),
            (
                "pool explosion (incident D: queue outgrows RAM)",
                series(6, 2048.0, |t, p| {
                    p.forks = if t <= 1.0 { 8 } else { 0 };
                    p.pids = Some(9);
                    p.memory = Some(100.0 + 250.0 * t);
                    p.cpu_percent = 150.0;
                }),
                // 6 s is too short a history for a leak: the explosion detector is the
                // one judged on seconds.
                vec![Explosion],
            ),
            (
                "fork bomb",
                series(4, 2048.0, |t, p| {
                    p.forks = 200;
                    p.pids = Some(4 + 200 * t as u64);
                    p.memory = Some(100.0 + t);
                }),
                vec![Explosion],
            ),
            (
                "reclaim stall 30 %",
                series(10, 1024.0, |_, p| {
                    p.memory = Some(1000.0);
                    p.reclaim_ms_per_s = 300.0;
                }),
                vec![Pressure],
            ),
            (
                "memory PSI full 30 %",
                series(10, 1024.0, |_, p| {
                    p.memory = Some(1000.0);
                    p.memory_some_avg10 = Some(40.0);
                    p.memory_full_avg10 = Some(30.0);
                }),
                vec![Pressure],
            ),
        ];
        let mut table = String::from("| case | expected | found | result |\n|---|---|---|---|\n");
        let mut wrong = Vec::new();
        for (name, points, expected) in &cases {
            let mut found = kinds(points);
            found.sort();
            let mut expected = expected.clone();
            expected.sort();
            let verdict = if found == expected {
                "ok"
            } else if found.iter().any(|k| !expected.contains(k)) {
                "FALSE POSITIVE"
            } else {
                "FALSE NEGATIVE"
            };
            let names = |k: &[FindingKind]| {
                if k.is_empty() {
                    "-".to_owned()
                } else {
                    k.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                }
            };
            let _ = writeln!(
                table,
                "| {name} | {} | {} | {verdict} |",
                names(&expected),
                names(&found)
            );
            if found != expected {
                wrong.push(*name);
            }
        }
        println!("{table}");
        assert!(wrong.is_empty(), "misjudged: {wrong:?}\n{table}");
    }

    #[test]
    fn leak_projection_is_bounded_by_history() {
        // 25 s of growth whose projection is 200 s away: more than 3 × 25 s, not trusted.
        let p = series(25, 1024.0, |t, p| p.memory = Some(500.0 + 2.0 * t));
        assert!(leak(&p, &LeakConfig::default()).is_none());
        // The same growth seen for 120 s (limit ~80 s ahead) is a leak.
        let p = series(120, 1024.0, |t, p| p.memory = Some(500.0 + 2.0 * t));
        let e = leak(&p, &LeakConfig::default()).expect("leak");
        assert!((e.slope_bytes_per_s / MIB - 2.0).abs() < 0.01, "{e:?}");
        assert!((e.time_to_limit_s - 142.0).abs() < 2.0, "{e:?}");
    }

    #[test]
    fn theil_sen_ignores_outliers() {
        let mut pts: Vec<(f64, f64)> = (0..20)
            .map(|i| (f64::from(i), 3.0 * f64::from(i)))
            .collect();
        pts[5].1 = 1e9;
        pts[12].1 = -1e9;
        assert!((theil_sen(&pts).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(theil_sen(&[(1.0, 1.0)]), None);
    }

    fn cgroup(id: u64, path: &str, memory_mib: u64, cpu_percent: f64) -> CgroupSample {
        CgroupSample {
            id,
            path: Some(path.into()),
            cpu_percent,
            switches: 100,
            files: Arc::new(CgroupFiles {
                memory_current: Some(memory_mib << 20),
                memory_max: Some(Limit::Value(1 << 30)),
                pids_current: Some(3),
                memory_pressure: Some(Pressure {
                    some: PsiLine::default(),
                    full: None,
                }),
                ..CgroupFiles::default()
            }),
            files_fresh: true,
            ..CgroupSample::default()
        }
    }

    fn snapshot(
        tick: u64,
        cpus: usize,
        cgroups: Vec<CgroupSample>,
        processes: Vec<ProcessSample>,
    ) -> Snapshot {
        Snapshot {
            tick,
            timestamp_ms: u128::from(tick) * 1000,
            interval_ns: 1_000_000_000,
            cpus,
            machine: Machine {
                mem_total_bytes: 8 << 30,
                mem_available_bytes: 6 << 30,
                ..Machine::default()
            },
            cgroups,
            processes: Arc::new(processes),
            processes_age_ms: 0,
            events: Events::default(),
            tracked_cgroups: 0,
            vanished_cgroups: 0,
            ebpf: EbpfStats::default(),
            gpu: None,
        }
    }

    fn process(pid: u32, cgroup: &str, cpu: f64, tick: u64) -> ProcessSample {
        ProcessSample {
            pid,
            ppid: 1,
            comm: "uvicorn".into(),
            exe: None,
            uid: Some(1000),
            user: None,
            rss_bytes: 100 << 20,
            cgroup: Some(cgroup.into()),
            starttime: 77,
            threads: Some(9),
            cpu_ticks: 0,
            cpu_percent: Some(cpu),
            read_tick: tick,
            read_ns: 0,
        }
    }

    /// The parent's memory includes the child's: only the child is named.
    #[test]
    fn leak_is_reported_at_the_deepest_cgroup() {
        let mut d = Detector::new(DetectConfig::default());
        let mut last = Vec::new();
        for tick in 1..=120 {
            let child = 200 + 6 * tick; // MiB, 6 MiB/s
            last = d.observe(&snapshot(
                tick,
                2,
                vec![
                    cgroup(10, "/app.slice", child + 50, 20.0),
                    cgroup(11, "/app.slice/worker", child, 20.0),
                    cgroup(12, "/other", 300, 1.0),
                ],
                vec![process(500, "/app.slice/worker", 20.0, tick)],
            ));
        }
        let leaks: Vec<&Finding> = last
            .iter()
            .filter(|f| f.kind == FindingKind::Leak)
            .collect();
        assert_eq!(leaks.len(), 1, "{last:#?}");
        assert_eq!(leaks[0].cgroup, "/app.slice/worker");
        assert_eq!(leaks[0].pid, Some(500), "the largest process is the lead");
        assert!(
            leaks[0].time_to_limit_sec.is_some_and(|t| t < 60.0),
            "{:?}",
            leaks[0]
        );
        assert!(
            leaks[0]
                .evidence
                .iter()
                .any(|e| e.name == "slope" && (e.value - 6.0).abs() < 0.1)
        );
    }

    /// A cgroup idle for a minute (its window reduced to a baseline) bursts into 300
    /// tasks in one tick and then sleeps: the burst is measured from the baseline.
    #[test]
    fn a_burst_after_a_long_idle_spell_is_an_explosion() {
        let mut d = Detector::new(DetectConfig::default());
        let mut found = Vec::new();
        for tick in 1..=70u64 {
            let mut c = cgroup(50, "/jobs", 100, 0.0);
            let burst = tick == 65;
            let tasks = if tick >= 65 { 303 } else { 3 };
            Arc::make_mut(&mut c.files).pids_current = Some(tasks);
            if burst {
                c.forks = 300;
                c.cpu_percent = 40.0;
            }
            found.extend(d.observe(&snapshot(tick, 2, vec![c], vec![])));
        }
        let e = found
            .iter()
            .find(|f| f.kind == FindingKind::Explosion)
            .expect("an explosion");
        assert!(
            e.evidence
                .iter()
                .any(|v| v.name == "new_tasks" && (v.value - 300.0).abs() < 0.5),
            "{e:#?}"
        );
        assert!(
            d.history(50).unwrap().len() <= 8,
            "idle points were not kept"
        );
    }

    /// A contained child's memory is not its parent's to answer for: the parent's
    /// series holds what is not contained (its other child), which still shows growth
    /// of its own; nothing contained, the parent holds it all.
    #[test]
    fn contained_memory_is_not_counted_against_ancestors() {
        let parent_memory = |contained: &[&str]| {
            let mut d = Detector::new(DetectConfig::default());
            d.set_contained(contained.iter().map(|c| (*c).to_owned()));
            let mut last = Vec::new();
            for tick in 1..=3u64 {
                let sibling = 50 + 10 * tick;
                d.observe(&snapshot(
                    tick,
                    2,
                    vec![
                        cgroup(70, "/app.slice", 500 + sibling, 0.0),
                        cgroup(71, "/app.slice/leak.scope", 500, 0.0),
                        cgroup(72, "/app.slice/editor.scope", sibling, 1.0),
                    ],
                    vec![],
                ));
                let p = d.history(70).unwrap().back().unwrap();
                last.push((p.memory.unwrap() / f64::from(1u32 << 20)).round());
            }
            last
        };
        assert_eq!(
            parent_memory(&["/app.slice/leak.scope"]),
            [60.0, 70.0, 80.0]
        );
        assert_eq!(parent_memory(&[]), [560.0, 570.0, 580.0]);
        // Only below: a contained cgroup is not subtracted from itself, nor from a
        // cgroup whose name it merely starts with.
        assert_eq!(
            parent_memory(&["/app.slice", "/app"]),
            [560.0, 570.0, 580.0]
        );
    }

    /// A unit started between two ticks (its cgroup made by systemd at start, not in
    /// advance) bursts: judged on its second sight, from a past of "nothing" a tick
    /// before the first — as early as a burst in a cgroup made in advance. Not born
    /// (present at the agent's start, or only unresolved before), it waits for three
    /// points of its own. A new unit that loads what it needs and then holds it (a
    /// service starting) is no burst: its memory does not rise twice in a row; nor are
    /// the 150 threads a JVM starts with a burst of new tasks.
    #[test]
    fn a_burst_in_a_new_cgroup_is_judged_from_its_birth() {
        // Ticks of 1 s; the cgroup's memory.max (1 GiB) is the nearer limit: +200 MiB a
        // second from 300 MiB ends its headroom in ~4 s.
        let first_explosion = |born: bool, series: &[(u64, u64)]| {
            let mut d = Detector::new(DetectConfig::default());
            d.observe(&snapshot(
                1,
                2,
                vec![cgroup(1, "/system.slice", 10, 1.0)],
                vec![],
            ));
            for (i, (mib, tasks)) in series.iter().enumerate() {
                let mut c = cgroup(60, "/system.slice/pool.service", *mib, 50.0);
                c.born = born && i == 0;
                c.forks = 5;
                Arc::make_mut(&mut c.files).pids_current = Some(*tasks);
                let tick = 2 + i as u64;
                let found = d.observe(&snapshot(tick, 2, vec![c], vec![]));
                if found.iter().any(|f| f.kind == FindingKind::Explosion) {
                    return Some(i + 1);
                }
            }
            None
        };
        let burst = [(300, 9), (500, 9), (700, 9), (900, 9)];
        assert_eq!(first_explosion(true, &burst), Some(2));
        assert_eq!(first_explosion(false, &burst), Some(3));
        assert_eq!(
            first_explosion(true, &[(300, 9), (300, 9), (300, 9), (300, 9)]),
            None
        );
        assert_eq!(
            first_explosion(true, &[(200, 150), (210, 152), (210, 152), (212, 152)]),
            None
        );
    }

    /// One process leaks while its cgroup's total stays flat (a sibling shrinks): a
    /// process finding naming it; when the cgroup leaks too, the process is named on the
    /// cgroup's finding instead of a second one.
    #[test]
    fn process_leaks_are_found_and_merged_into_their_cgroup() {
        for (cgroup_grows, expect_process_finding) in [(false, true), (true, false)] {
            let mut d = Detector::new(DetectConfig::default());
            let mut last = Vec::new();
            for tick in 1..=120u32 {
                let mut leaker = process(600, "/svc", 10.0, u64::from(tick));
                leaker.rss_bytes = u64::from(100 + 5 * tick) << 20;
                let mut sibling = process(601, "/svc", 10.0, u64::from(tick));
                sibling.rss_bytes = u64::from(800 - 5 * tick) << 20;
                let total = if cgroup_grows { 100 + 5 * tick } else { 900 };
                last = d.observe(&snapshot(
                    u64::from(tick),
                    2,
                    vec![cgroup(40, "/svc", u64::from(total), 20.0)],
                    vec![leaker, sibling],
                ));
            }
            let leaks: Vec<&Finding> = last
                .iter()
                .filter(|f| f.kind == FindingKind::Leak)
                .collect();
            assert_eq!(leaks.len(), 1, "{last:#?}");
            assert_eq!(
                leaks[0].pid,
                Some(600),
                "the leaking process is named: {last:#?}"
            );
            let has_cgroup_slope = leaks[0].evidence.iter().any(|e| e.name == "slope");
            assert_eq!(has_cgroup_slope, !expect_process_finding, "{:#?}", leaks[0]);
            assert!(leaks[0].evidence.iter().any(|e| e.name == "process_slope"));
        }
    }

    /// Incidents A/B: one worker pinned at one core while three cores idle → a hint
    /// after the window, never sooner; on a one-CPU machine there is nothing to gain.
    #[test]
    fn single_thread_saturation_is_a_hint_after_its_window() {
        for (cpus, expect) in [(4, true), (1, false)] {
            let mut d = Detector::new(DetectConfig::default());
            let mut first_hint = None;
            for tick in 1..=40 {
                let found = d.observe(&snapshot(
                    tick,
                    cpus,
                    vec![cgroup(20, "/omnimind", 300, 99.0)],
                    vec![process(700, "/omnimind", 99.0, tick)],
                ));
                if let Some(f) = found
                    .iter()
                    .find(|f| f.kind == FindingKind::SingleThreadSaturation)
                {
                    assert_eq!(f.severity, Severity::Hint);
                    assert_eq!(f.pid, Some(700));
                    first_hint.get_or_insert(tick);
                }
            }
            assert_eq!(first_hint.is_some(), expect, "cpus {cpus}: {first_hint:?}");
            if expect {
                assert_eq!(first_hint, Some(30), "held for the whole 30 s window first");
            }
        }
    }

    fn gpu_proc(pid: u32, cgroup: &str, mib: u64, state: ProcState) -> GpuProcess {
        GpuProcess {
            pid,
            device: 0,
            used_bytes: Some(mib << 20),
            graphics: false,
            sm_util_percent: Some(30),
            mem_util_percent: None,
            cgroup: Some(cgroup.into()),
            comm: Some(format!("p{pid}")),
            state,
        }
    }

    fn gpu_snap(seq: u64, util: u32, processes: Vec<GpuProcess>) -> Arc<GpuSnapshot> {
        let used: u64 = processes.iter().filter_map(|p| p.used_bytes).sum();
        Arc::new(GpuSnapshot {
            seq,
            driver: None,
            devices: vec![crate::gpu::GpuDevice {
                index: 0,
                uuid: "GPU-aaaa".into(),
                name: "NVIDIA H100".into(),
                lost: false,
                memory_total_bytes: Some(80 << 30),
                memory_used_bytes: Some(used),
                util_percent: Some(util),
                memory_util_percent: None,
                temperature_c: None,
                power_watts: None,
            }],
            processes,
        })
    }

    /// GPU memory series of one cgroup (two processes: `grow` MiB/s and flat) over
    /// 120 s: which GPU findings show up, and when.
    fn gpu_run(grow: impl Fn(u64) -> u64) -> Vec<(u64, Finding)> {
        let mut d = Detector::new(DetectConfig::default());
        let mut out = Vec::new();
        for tick in 1..=120 {
            let mut snap = snapshot(tick, 4, vec![cgroup(20, "/ml", 300, 5.0)], vec![]);
            snap.gpu = Some(gpu_snap(
                tick,
                90,
                vec![
                    gpu_proc(10, "/ml", 1000 + grow(tick), ProcState::Running),
                    gpu_proc(11, "/ml", 2000, ProcState::Running),
                ],
            ));
            out.extend(
                d.observe(&snap)
                    .into_iter()
                    .filter(|f| f.kind == FindingKind::GpuLeak)
                    .map(|f| (tick, f)),
            );
        }
        out
    }

    #[test]
    fn a_gpu_leak_is_found_named_and_timed_and_a_plateau_is_not() {
        // 400 MiB/s with 77 GiB free at the start: at t s the device is full in
        // 197 - t s, trusted once that is within 3× the history (max_extrapolation): t = 50.
        let found = gpu_run(|t| t * 400);
        let (tick, f) = found.first().expect("a GPU leak");
        assert_eq!(*tick, 50);
        assert_eq!(
            (f.cgroup.as_str(), f.cgroup_id, f.pid),
            ("/ml", 20, Some(10))
        );
        let get = |n: &str| f.evidence.iter().find(|e| e.name == n).unwrap().value;
        assert!((get("gpu_slope") - 400.0).abs() < 1.0, "{:?}", f.evidence);
        assert!((get("process_gpu_slope") - 400.0).abs() < 1.0);
        assert!(get("gpu_device").abs() < f64::EPSILON, "device 0");
        let ttl = f.time_to_limit_sec.unwrap();
        let free_mib = (80 * 1024 - 3000 - tick * 400) as f64;
        assert!((ttl - free_mib / 400.0).abs() < 2.0, "{ttl} vs {free_mib}");
        assert!(
            f.summary
                .contains("GPU 0 (NVIDIA H100) memory of p10 (pid 10) in /ml grows 400.00 MiB/s"),
            "{}",
            f.summary
        );
        assert_eq!(f.gpus.len(), 1, "GPU context for policy conditions");
        assert_eq!(f.gpus[0].cgroup_bytes, (3000 + tick * 400) << 20);

        // A model load: rises for 40 s, then flat: never a leak.
        assert!(gpu_run(|t| t.min(40) * 400).is_empty());
        // Slow growth that would need hours to fill the device: not within the horizon.
        assert!(gpu_run(|t| t / 10).is_empty());
    }

    #[test]
    fn gpu_samples_reused_by_ticks_add_no_points_and_keep_their_findings() {
        let mut d = Detector::new(DetectConfig::default());
        let mut leaking = Vec::new();
        for tick in 1..=200 {
            let mut snap = snapshot(tick, 4, vec![cgroup(20, "/ml", 300, 5.0)], vec![]);
            // One GPU sample per 10 ticks, rising 2 GiB per sample.
            let seq = tick.div_ceil(10);
            snap.gpu = Some(gpu_snap(
                seq,
                90,
                vec![gpu_proc(10, "/ml", seq * 2048, ProcState::Running)],
            ));
            if d.observe(&snap)
                .iter()
                .any(|f| f.kind == FindingKind::GpuLeak)
            {
                leaking.push(tick);
            }
        }
        let h = &d.gpu.cgroups[&("/ml".to_owned(), 0)];
        assert_eq!(h.memory.len(), 20);
        let first = leaking[0];
        assert_eq!(first % 10, 1, "found on a tick with a new sample: {first}");
        assert_eq!(leaking, (first..=200).collect::<Vec<_>>(), "never blinks");
    }

    #[test]
    fn gpu_memory_of_exited_processes_is_reported_after_a_grace() {
        let mut d = Detector::new(DetectConfig::default());
        let mut seen = Vec::new();
        for tick in 1..=15 {
            let mut snap = snapshot(tick, 4, vec![cgroup(20, "/ml", 300, 5.0)], vec![]);
            snap.gpu = Some(gpu_snap(
                tick,
                90,
                vec![
                    gpu_proc(10, "/ml", 500, ProcState::Zombie),
                    gpu_proc(
                        11,
                        "/ml",
                        700,
                        if tick < 4 {
                            ProcState::Running
                        } else {
                            ProcState::Gone
                        },
                    ),
                ],
            ));
            for f in d
                .observe(&snap)
                .into_iter()
                .filter(|f| f.kind == FindingKind::GpuOrphan)
            {
                seen.push((tick, f.pid, f.cgroup.clone(), f.severity));
            }
        }
        let first = |pid| seen.iter().find(|s| s.1 == Some(pid)).map(|s| s.0);
        assert_eq!(first(10), Some(11), "a zombie, after 10 s");
        assert_eq!(first(11), Some(14), "gone at tick 4, reported 10 s later");
        let gone = seen.iter().find(|s| s.1 == Some(11)).unwrap();
        assert_eq!(gone.2, "/", "a gone process has no cgroup left");
        let zombie = seen.iter().find(|s| s.1 == Some(10)).unwrap();
        assert_eq!((zombie.2.as_str(), zombie.3), ("/ml", Severity::Warning));
    }

    #[test]
    fn a_saturated_feeder_of_an_underused_gpu_is_a_gpu_starved_hint() {
        for (util, expect) in [
            (61, FindingKind::GpuStarved),
            (95, FindingKind::SingleThreadSaturation),
        ] {
            let mut d = Detector::new(DetectConfig::default());
            let mut last = Vec::new();
            for tick in 1..=31 {
                let mut snap = snapshot(
                    tick,
                    4,
                    vec![cgroup(20, "/omnimind", 300, 99.0)],
                    vec![process(700, "/omnimind", 99.0, tick)],
                );
                snap.gpu = Some(gpu_snap(
                    tick,
                    util,
                    vec![gpu_proc(701, "/omnimind", 12_000, ProcState::Running)],
                ));
                last = d.observe(&snap);
            }
            let f = last
                .iter()
                .find(|f| f.pid == Some(700))
                .unwrap_or_else(|| panic!("util {util}: {last:?}"));
            assert_eq!(
                (f.kind, f.severity),
                (expect, Severity::Hint),
                "util {util}"
            );
            if expect == FindingKind::GpuStarved {
                assert!(
                    f.summary
                        .contains("GPU 0 (NVIDIA H100) runs at 61 % holding 12000 MiB"),
                    "{}",
                    f.summary
                );
            }
        }
    }

    /// A stale CPU reading (process not re-read this tick) is not evidence.
    #[test]
    fn stale_process_readings_are_ignored() {
        let mut d = Detector::new(DetectConfig::default());
        for tick in 1..=40 {
            let found = d.observe(&snapshot(
                tick,
                4,
                vec![cgroup(20, "/svc", 300, 99.0)],
                vec![process(700, "/svc", 99.0, 1)],
            ));
            assert!(found.is_empty(), "tick {tick}: {found:?}");
        }
    }

    #[test]
    fn vanished_cgroups_leave_the_window() {
        let mut d = Detector::new(DetectConfig::default());
        d.observe(&snapshot(1, 2, vec![cgroup(30, "/gone", 10, 1.0)], vec![]));
        assert!(d.history(30).is_some());
        d.observe(&snapshot(2, 2, vec![], vec![]));
        assert!(d.history(30).is_none());
    }

    /// 100,000 cgroups come and go (ten at a time): the windows kept stay those of the
    /// cgroups alive, whatever the churn.
    #[test]
    fn windows_of_deleted_cgroups_are_dropped() {
        let mut d = Detector::new(DetectConfig::default());
        for tick in 0..10_000u64 {
            let cgroups = (0..10)
                .map(|i| {
                    let id = tick * 10 + i;
                    cgroup(id, &format!("/ci/job-{id}"), 100, 5.0)
                })
                .collect();
            d.observe(&snapshot(tick, 2, cgroups, vec![]));
            assert!(
                d.history.len() <= 10,
                "{} windows at tick {tick}",
                d.history.len()
            );
        }
    }
}
