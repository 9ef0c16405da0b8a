//! Prometheus metrics: the exposition text is rebuilt from each tick's snapshot and
//! judgement (prometheus-client, `OpenMetrics` text format) and served on
//! `--metrics-listen` (default `127.0.0.1:9464`).
//!
//! Rebuilt rather than updated in place: cgroups come and go every tick, and a family
//! kept across ticks would keep reporting the last value of a cgroup long deleted.
//! Rebuilt only when asked for: a scrape marks the exposition wanted and waits for the
//! next tick to render it (at 1,000 cgroups rendering every tick cost ~0.7 % of a core,
//! more than the rest of the agent; Prometheus scrapes every 15-60 s).
//! Counters that must survive that (actions, findings, decisions) are kept here and
//! re-emitted. Per-cgroup series carry the cgroup path and, for containers and pods,
//! the identity labels of [`crate::identity`].
//!
//! The HTTP side is a few lines over tokio's `TcpListener` instead of a web framework:
//! one path, `GET` only, a bounded request read with a timeout, `Connection: close` —
//! a server this small is easier to audit than a dependency tree, and the agent must not
//! grow a second runtime or thread pool for it.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, warn};

use crate::{collect::Snapshot, report::Judgement};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The agent's own figures for one tick.
#[derive(Clone, Debug, Default)]
pub struct SelfStats {
    pub tick_seconds: f64,
    pub rss_bytes: u64,
    pub event_log_lines: u64,
    pub event_log_failures: u64,
    pub notifications_sent: u64,
    pub notifications_failed: u64,
    pub notifications_suppressed: u64,
    pub policy_rules: usize,
    pub policy_errors: usize,
    pub gpu_available: bool,
    /// Cgroups the operator released with a hold-off still running.
    pub held_off: Vec<crate::control::HeldOff>,
}

/// Resident set size of this process, bytes (`/proc/self/statm`).
#[must_use]
pub fn self_rss_bytes() -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Counters kept across ticks.
#[derive(Debug, Default)]
pub struct Metrics {
    actions: BTreeMap<Labels, u64>,
    findings: BTreeMap<Labels, u64>,
    decisions: BTreeMap<Labels, u64>,
    ticks: u64,
    reclaim_seconds: BTreeMap<String, f64>,
}

fn cgroup_labels(path: &str) -> Labels {
    let mut l = vec![("cgroup".to_owned(), path.to_owned())];
    l.extend(
        crate::identity::of(path)
            .labels()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    l
}

/// A label value as the text format wants it: prometheus-client writes values as they
/// are given, so a cgroup named `x"} 1` (or holding a backslash) would end the label
/// and forge a series. Newlines never reach here (cgroup texts escape them), but are
/// escaped all the same.
#[must_use]
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A registered family whose label values are escaped on the way in: the only way
/// metrics here get labels, so no value can be forgotten.
struct Fam<M>(Family<Labels, M>);

impl<M: Clone> Fam<M>
where
    Family<Labels, M>: Clone,
{
    fn get_or_create(&self, labels: &Labels) -> M {
        let escaped: Labels = labels
            .iter()
            .map(|(k, v)| (k.clone(), escape_label_value(v)))
            .collect();
        self.0.get_or_create_owned(&escaped)
    }
}

/// A labelled family registered under `name` (with `unit`, when given).
fn family<M>(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Fam<M>
where
    M: Default,
    Family<Labels, M>: prometheus_client::registry::Metric + Clone,
{
    let f = Family::<Labels, M>::default();
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, f.clone()),
        None => reg.register(name, help, f.clone()),
    }
    Fam(f)
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Fam<GaugeF> {
    family(reg, name, help, unit)
}

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Fam<Counter> {
    family(reg, name, help, None)
}

fn plain_gauge(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: f64) {
    let g = GaugeF::default();
    g.set(v);
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, g),
        None => reg.register(name, help, g),
    }
}

/// Counters of deleted cgroups are dropped at least this often (ticks), and before
/// each rendering.
const PRUNE_EVERY: u64 = 60;

fn cgroup_of(labels: &Labels) -> Option<&str> {
    labels
        .iter()
        .find(|(k, _)| k == "cgroup")
        .map(|(_, v)| v.as_str())
}

impl Metrics {
    /// Drops what is kept for cgroups that are not in the snapshot any more.
    fn prune(&mut self, snap: &Snapshot) {
        let alive: std::collections::HashSet<&str> = snap
            .cgroups
            .iter()
            .filter_map(|c| c.path.as_deref())
            .collect();
        self.reclaim_seconds
            .retain(|p, _| alive.contains(p.as_str()));
        for m in [&mut self.actions, &mut self.decisions] {
            m.retain(|l, _| cgroup_of(l).is_none_or(|c| alive.contains(c)));
        }
    }

    /// Series kept across ticks (for tests: nothing may grow with cgroup churn).
    #[must_use]
    pub fn kept(&self) -> usize {
        self.actions.len() + self.decisions.len() + self.findings.len() + self.reclaim_seconds.len()
    }

    /// Counts the tick's events (every tick) and, when `render`, renders the whole
    /// exposition.
    #[expect(clippy::too_many_lines, reason = "one metric family after the other")]
    pub fn update(
        &mut self,
        snap: &Snapshot,
        j: &Judgement,
        me: &SelfStats,
        render: bool,
    ) -> Option<String> {
        self.ticks += 1;
        // Every tick, but only for cgroups that ever stalled (a total of 0 is not
        // exported): no allocation per cgroup per tick for the rest.
        for c in &snap.cgroups {
            if let Some(path) = c.path.as_deref()
                && c.reclaim_stall_ms > 0.0
            {
                let stalled = c.reclaim_stall_ms / 1000.0;
                match self.reclaim_seconds.get_mut(path) {
                    Some(total) => *total += stalled,
                    None => {
                        self.reclaim_seconds.insert(path.to_owned(), stalled);
                    }
                }
            }
        }
        // Cgroups deleted since: their series go with them (cgroups come and go by the
        // thousand on a CI host; nothing kept here may grow with that churn).
        if !self.reclaim_seconds.is_empty()
            || (self.ticks.is_multiple_of(PRUNE_EVERY) || render)
                && !(self.actions.is_empty() && self.decisions.is_empty())
        {
            self.prune(snap);
        }
        for a in &j.actions {
            let mut l = cgroup_labels(&a.cgroup);
            l.push(("rule".into(), a.rule.clone()));
            l.push(("action".into(), a.action.clone()));
            l.push(("dry_run".into(), a.dry_run.to_string()));
            *self.actions.entry(l).or_default() += 1;
        }
        for d in &j.decisions {
            let mut l = cgroup_labels(&d.cgroup);
            l.push(("rule".into(), d.rule.clone()));
            l.push(("action".into(), format!("{:?}", d.action).to_lowercase()));
            *self.decisions.entry(l).or_default() += 1;
        }
        let interval_s = snap.interval_ns as f64 / 1e9;
        for f in &j.findings {
            let mut l = vec![("kind".to_owned(), f.finding.kind.to_string())];
            l.push((
                "severity".into(),
                format!("{:?}", f.finding.severity).to_lowercase(),
            ));
            *self.findings.entry(l).or_default() += 1;
        }
        if !render {
            return None;
        }
        let mut reg = <Registry>::with_prefix("cgsentry");

        // Per cgroup.
        let cpu = gauge_family(
            &mut reg,
            "cgroup_cpu",
            "CPU used in the last tick, in CPUs (1.0 = one CPU busy)",
            None,
        );
        let mem = gauge_family(
            &mut reg,
            "cgroup_memory",
            "memory.current",
            Some(Unit::Bytes),
        );
        let trend = gauge_family(
            &mut reg,
            "cgroup_memory_trend_bytes_per_second",
            "Slope of memory.current over the recent samples",
            None,
        );
        let reclaim = family::<Counter<f64, std::sync::atomic::AtomicU64>>(
            &mut reg,
            "cgroup_reclaim_stall_seconds",
            "Time tasks of the cgroup stalled in direct or memcg reclaim (eBPF), since the agent started",
            None,
        );
        let psi = gauge_family(
            &mut reg,
            "cgroup_pressure_some_avg10_ratio",
            "PSI some avg10 of the cgroup, per resource (0-1)",
            None,
        );
        let pids = gauge_family(&mut reg, "cgroup_pids", "pids.current", None);
        let forks = gauge_family(
            &mut reg,
            "cgroup_forks_per_second",
            "Tasks created per second in the last tick (eBPF)",
            None,
        );
        for c in &snap.cgroups {
            let Some(path) = c.path.as_deref() else {
                continue;
            };
            let l = cgroup_labels(path);
            cpu.get_or_create(&l).set(c.cpu_percent / 100.0);
            if let Some(m) = c.files.memory_current {
                mem.get_or_create(&l).set(m as f64);
            }
            if let Some(t) = c.memory_trend_mib_per_s {
                trend.get_or_create(&l).set(t * f64::from(1u32 << 20));
            }
            let total = self.reclaim_seconds.get(path).copied().unwrap_or(0.0);
            if total > 0.0 {
                reclaim.get_or_create(&l).inc_by(total);
            }
            for (res, p) in [
                ("cpu", &c.files.cpu_pressure),
                ("memory", &c.files.memory_pressure),
                ("io", &c.files.io_pressure),
            ] {
                if let Some(p) = p {
                    let mut l = l.clone();
                    l.push(("resource".into(), res.into()));
                    psi.get_or_create(&l).set(p.some.avg10 / 100.0);
                }
            }
            if let Some(n) = c.files.pids_current {
                pids.get_or_create(&l).set(n as f64);
            }
            if c.forks > 0 {
                forks.get_or_create(&l).set(c.forks_per_s);
            }
        }
        // Findings active in this tick, and counts.
        let active = gauge_family(
            &mut reg,
            "finding_active",
            "1 while a finding is present on the cgroup (kind, severity, rule that applies)",
            None,
        );
        for f in &j.findings {
            let mut l = cgroup_labels(&f.finding.cgroup);
            l.push(("kind".into(), f.finding.kind.to_string()));
            l.push((
                "severity".into(),
                format!("{:?}", f.finding.severity).to_lowercase(),
            ));
            l.push(("rule".into(), f.rule.clone().unwrap_or_default()));
            active.get_or_create(&l).set(1.0);
        }
        let fc = counter_family(
            &mut reg,
            "finding_ticks",
            "Ticks with a finding, by kind and severity",
        );
        for (l, n) in &self.findings {
            fc.get_or_create(l).inc_by(*n);
        }
        let dc = counter_family(&mut reg, "decisions", "Ladder steps decided");
        for (l, n) in &self.decisions {
            dc.get_or_create(l).inc_by(*n);
        }
        let ac = counter_family(
            &mut reg,
            "actions",
            "Actions carried out (or logged, dry_run=\"true\"), releases included",
        );
        for (l, n) in &self.actions {
            ac.get_or_create(l).inc_by(*n);
        }
        let held = gauge_family(
            &mut reg,
            "held_off_seconds",
            "Seconds left of an operator's hold-off (`cgsentry release --hold-off`): no ladder starts on the cgroup until then",
            None,
        );
        for h in &me.held_off {
            held.get_or_create(&cgroup_labels(&h.cgroup))
                .set(h.seconds_left);
        }

        // Machine.
        let m = &snap.machine;
        plain_gauge(
            &mut reg,
            "machine_memory_available",
            "MemAvailable",
            Some(Unit::Bytes),
            m.mem_available_bytes as f64,
        );
        plain_gauge(
            &mut reg,
            "machine_memory_total",
            "MemTotal",
            Some(Unit::Bytes),
            m.mem_total_bytes as f64,
        );
        plain_gauge(
            &mut reg,
            "machine_swap_used",
            "SwapTotal - SwapFree",
            Some(Unit::Bytes),
            m.swap_total_bytes.saturating_sub(m.swap_free_bytes) as f64,
        );

        // GPUs.
        if let Some(g) = &snap.gpu {
            let used = gauge_family(
                &mut reg,
                "gpu_memory_used",
                "GPU memory used (NVML)",
                Some(Unit::Bytes),
            );
            let total = gauge_family(
                &mut reg,
                "gpu_memory_total",
                "GPU memory (NVML)",
                Some(Unit::Bytes),
            );
            let util = gauge_family(
                &mut reg,
                "gpu_utilization_ratio",
                "Share of the last sample period a kernel ran (0-1)",
                None,
            );
            let temp = gauge_family(&mut reg, "gpu_temperature_celsius", "GPU temperature", None);
            let lost = gauge_family(
                &mut reg,
                "gpu_lost",
                "1 when the GPU fell off the bus",
                None,
            );
            for d in &g.devices {
                let l = vec![
                    ("gpu".to_owned(), d.index.to_string()),
                    ("uuid".to_owned(), d.uuid.clone()),
                    ("name".to_owned(), d.name.clone()),
                ];
                lost.get_or_create(&l).set(if d.lost { 1.0 } else { 0.0 });
                if let Some(v) = d.memory_used_bytes {
                    used.get_or_create(&l).set(v as f64);
                }
                if let Some(v) = d.memory_total_bytes {
                    total.get_or_create(&l).set(v as f64);
                }
                if let Some(v) = d.util_percent {
                    util.get_or_create(&l).set(f64::from(v) / 100.0);
                }
                if let Some(v) = d.temperature_c {
                    temp.get_or_create(&l).set(f64::from(v));
                }
            }
            let cg = gauge_family(
                &mut reg,
                "cgroup_gpu_memory",
                "GPU memory held by the cgroup's own processes, per GPU",
                Some(Unit::Bytes),
            );
            for (path, devices) in g.by_cgroup() {
                for (dev, use_) in devices {
                    let mut l = cgroup_labels(path);
                    l.push(("gpu".into(), dev.to_string()));
                    cg.get_or_create(&l).set(use_.memory_bytes as f64);
                }
            }
        }

        // The agent itself.
        plain_gauge(
            &mut reg,
            "tick_duration",
            "Time the last tick took (collect, detect, decide, act)",
            Some(Unit::Seconds),
            me.tick_seconds,
        );
        plain_gauge(
            &mut reg,
            "tick_interval",
            "Length of the last tick",
            Some(Unit::Seconds),
            interval_s,
        );
        plain_gauge(
            &mut reg,
            "agent_resident_memory",
            "The agent's RSS",
            Some(Unit::Bytes),
            me.rss_bytes as f64,
        );
        let ticks = Counter::<u64>::default();
        ticks.inc_by(self.ticks);
        reg.register("ticks", "Ticks since the agent started", ticks);
        let e = &snap.ebpf;
        let ebpf = counter_family(
            &mut reg,
            "ebpf_lost",
            "What the eBPF side could not record, by reason",
        );
        for (why, n) in [
            ("cgroup_map_full", e.cgroup_map_full),
            ("clock_backwards", e.clock_backwards),
            ("read_errors", e.read_errors),
            ("update_errors", e.update_errors),
            ("ring_buffer_full", e.events_lost),
        ] {
            ebpf.get_or_create(&vec![("reason".to_owned(), why.to_owned())])
                .inc_by(n);
        }
        let evicted = Counter::<u64>::default();
        evicted.inc_by(e.cgroup_evictions);
        reg.register(
            "ebpf_cgroup_evictions",
            "Entries of the full (LRU) per-cgroup map evicted for newer cgroups: their counts start over",
            evicted,
        );
        let oom = Counter::<u64>::default();
        oom.inc_by(e.oom_victims);
        reg.register(
            "kernel_oom_victims",
            "Processes the kernel OOM killer chose since the agent started",
            oom,
        );
        plain_gauge(
            &mut reg,
            "ebpf_tracked_cgroups",
            "Cgroups held in the eBPF map",
            None,
            snap.tracked_cgroups as f64,
        );
        plain_gauge(
            &mut reg,
            "ebpf_cgroup_map_capacity",
            "Capacity of the eBPF per-cgroup map",
            None,
            f64::from(e.cgroup_map_capacity),
        );
        let log = counter_family(&mut reg, "event_log_lines", "Event log lines, by outcome");
        log.get_or_create(&vec![("outcome".to_owned(), "written".to_owned())])
            .inc_by(me.event_log_lines);
        log.get_or_create(&vec![("outcome".to_owned(), "failed".to_owned())])
            .inc_by(me.event_log_failures);
        let n = counter_family(&mut reg, "notifications", "Notifications, by outcome");
        for (o, v) in [
            ("sent", me.notifications_sent),
            ("failed", me.notifications_failed),
            ("suppressed", me.notifications_suppressed),
        ] {
            n.get_or_create(&vec![("outcome".to_owned(), o.to_owned())])
                .inc_by(v);
        }
        plain_gauge(
            &mut reg,
            "policy_rules",
            "Rules in force",
            None,
            me.policy_rules as f64,
        );
        plain_gauge(
            &mut reg,
            "policy_errors",
            "Errors of the last policy reload (the last good set stays in force)",
            None,
            me.policy_errors as f64,
        );
        plain_gauge(
            &mut reg,
            "gpu_available",
            "1 when NVML answers",
            None,
            if me.gpu_available { 1.0 } else { 0.0 },
        );

        let mut out = String::new();
        if let Err(e) = encode(&mut out, &reg) {
            warn!("metrics not encoded: {e}");
        }
        Some(out)
    }
}

/// The text last rendered, shared with the HTTP side, whether a scrape waits for a
/// new one, and when the agent last finished a tick (for `/health`).
#[derive(Debug, Default)]
pub struct Shared {
    text: RwLock<Arc<str>>,
    rendered: AtomicU64,
    wanted: AtomicBool,
    /// Wall clock (ms since the epoch) of the last finished tick; 0: none yet.
    last_tick_ms: AtomicU64,
    /// A tick older than this is a stuck agent (ms).
    stale_after_ms: AtomicU64,
}

pub type Exposition = Arc<Shared>;

/// How long a scrape waits for the next tick's rendering before it gets the last one.
const SCRAPE_WAIT: Duration = Duration::from_secs(5);
/// Connections served at once (see [`serve`] for what happens to more).
pub const MAX_CONNECTIONS: usize = 16;
/// Everything a connection gets, from accept to close: reading the request, waiting
/// for the rendering, writing the answer to a client that may not read.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The request head must arrive within this long.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

impl Shared {
    /// Whether a scrape asked for a rendering since the last call.
    pub fn take_wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
    }

    pub fn publish(&self, text: String) {
        if let Ok(mut w) = self.text.write() {
            *w = Arc::from(text);
        }
        self.rendered.fetch_add(1, Ordering::AcqRel);
    }

    /// The agent finished a tick at `now_ms`; `stale_after` without another one, it is
    /// unhealthy.
    pub fn ticked(&self, now_ms: u128, stale_after: Duration) {
        self.last_tick_ms
            .store(u64::try_from(now_ms).unwrap_or(u64::MAX), Ordering::Release);
        self.stale_after_ms.store(
            u64::try_from(stale_after.as_millis()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }

    /// `/health`: 200 while ticks come, 503 when the last one is older than allowed
    /// (or none came yet), with the age in words.
    #[must_use]
    pub fn health(&self, now_ms: u128) -> (bool, String) {
        let last = u128::from(self.last_tick_ms.load(Ordering::Acquire));
        let stale_after = u128::from(self.stale_after_ms.load(Ordering::Acquire));
        if last == 0 {
            return (false, "no tick yet\n".into());
        }
        let age = now_ms.saturating_sub(last);
        if age > stale_after {
            (
                false,
                format!("stale: the last tick finished {age} ms ago (allowed {stale_after} ms)\n"),
            )
        } else {
            (true, format!("ok: the last tick finished {age} ms ago\n"))
        }
    }

    /// Asks for a rendering and waits (up to `wait`) for the tick that makes it.
    async fn fresh(&self, wait: Duration) -> Arc<str> {
        let seen = self.rendered.load(Ordering::Acquire);
        self.wanted.store(true, Ordering::Release);
        let start = tokio::time::Instant::now();
        while self.rendered.load(Ordering::Acquire) == seen && start.elapsed() < wait {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.text
            .read()
            .map_or_else(|_| Arc::from(""), |t| Arc::clone(&t))
    }
}

/// A connection that has not sent its request this long may make room for a new one.
const EVICT_IDLE_AFTER: Duration = Duration::from_millis(100);

/// A connection being served, for the accept loop to bound and evict.
struct Conn {
    accepted: tokio::time::Instant,
    /// Its request arrived: it is being answered (never evicted).
    answering: Arc<AtomicBool>,
    handle: tokio::task::AbortHandle,
}

/// Serves `GET /metrics` and `GET /health` until the listener fails. At most
/// [`MAX_CONNECTIONS`] at once, each closed after [`CONNECTION_DEADLINE`] whatever the
/// client does; when all are taken, a new connection replaces the oldest one that has
/// sent no request for [`EVICT_IDLE_AFTER`] (or is closed at once if every one is being
/// answered). A thousand idle or slow connections cost the agent sixteen file
/// descriptors, and a scrape behind them is answered at once.
pub async fn serve(listener: tokio::net::TcpListener, text: Exposition) {
    let mut conns: Vec<Conn> = Vec::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        conns.retain(|c| !c.handle.is_finished());
        if conns.len() >= MAX_CONNECTIONS {
            let now = tokio::time::Instant::now();
            let idle = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    !c.answering.load(Ordering::Acquire)
                        && now.duration_since(c.accepted) >= EVICT_IDLE_AFTER
                })
                .min_by_key(|(_, c)| c.accepted)
                .map(|(i, _)| i);
            let Some(i) = idle else {
                debug!(%peer, "metrics endpoint busy: connection closed");
                continue; // dropped: closed
            };
            conns.swap_remove(i).handle.abort();
        }
        let text = text.clone();
        let answering = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&answering);
        let task = tokio::spawn(async move {
            let served =
                tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &text, &flag)).await;
            if served.is_err() {
                debug!(%peer, "metrics connection closed at its deadline");
            }
        });
        conns.push(Conn {
            accepted: tokio::time::Instant::now(),
            answering,
            handle: task.abort_handle(),
        });
    }
}

/// One request, one answer, close.
async fn answer(mut stream: tokio::net::TcpStream, text: &Shared, answering: &AtomicBool) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_DEADLINE, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() || !head.windows(4).any(|w| w == b"\r\n\r\n") {
        return;
    }
    answering.store(true, Ordering::Release);
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let plain = "text/plain; charset=utf-8";
    let (status, ctype, body): (&str, &str, Arc<str>) =
        match (method, path.split('?').next().unwrap_or("")) {
            ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, text.fresh(SCRAPE_WAIT).await),
            ("GET", "/health") => match text.health(crate::eventlog::now_ms()) {
                (true, msg) => ("200 OK", plain, msg.into()),
                (false, msg) => ("503 Service Unavailable", plain, msg.into()),
            },
            ("GET", "/") => (
                "200 OK",
                plain,
                "cgsentry: metrics at /metrics, liveness at /health\n".into(),
            ),
            ("GET", _) => ("404 Not Found", plain, "not found: try /metrics\n".into()),
            _ => ("405 Method Not Allowed", plain, "GET only\n".into()),
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).await.is_ok() {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        collect::{CgroupSample, Events, Machine},
        probes::EbpfStats,
    };

    fn snap(cgroups: &[(&str, f64)]) -> Snapshot {
        Snapshot {
            tick: 1,
            timestamp_ms: 1,
            interval_ns: 1_000_000_000,
            cpus: 1,
            machine: Machine::default(),
            cgroups: cgroups
                .iter()
                .map(|&(path, reclaim_stall_ms)| CgroupSample {
                    path: Some(path.into()),
                    reclaim_stall_ms,
                    ..CgroupSample::default()
                })
                .collect(),
            processes: Arc::new(Vec::new()),
            processes_age_ms: 0,
            events: Events::default(),
            tracked_cgroups: cgroups.len(),
            vanished_cgroups: 0,
            ebpf: EbpfStats::default(),
            gpu: None,
        }
    }

    /// The reclaim-stall counter adds up every tick, rendered or not; a cgroup that
    /// never stalled has no series, and a deleted one starts over if it comes back.
    #[test]
    fn reclaim_stalls_add_up_between_scrapes() {
        let mut m = Metrics::default();
        let (j, me) = (Judgement::default(), SelfStats::default());
        let line = |text: &str, cg: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("cgsentry_cgroup_reclaim_stall_seconds_total")
                        && l.contains(&format!("cgroup=\"{cg}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
        };
        assert!(
            m.update(&snap(&[("/a", 250.0), ("/b", 0.0)]), &j, &me, false)
                .is_none()
        );
        let text = m
            .update(&snap(&[("/a", 500.0), ("/b", 0.0)]), &j, &me, true)
            .unwrap();
        assert_eq!(line(&text, "/a").as_deref(), Some("0.75"));
        assert_eq!(line(&text, "/b"), None);
        m.update(&snap(&[("/b", 0.0)]), &j, &me, false);
        let text = m.update(&snap(&[("/a", 100.0)]), &j, &me, true).unwrap();
        assert_eq!(line(&text, "/a").as_deref(), Some("0.1"));
    }

    /// An operator's hold-off is a gauge of the seconds left, labelled like the cgroup's
    /// other series; none, no series.
    #[test]
    fn hold_offs_are_exported() {
        let mut m = Metrics::default();
        let mut me = SelfStats::default();
        let text = m
            .update(&snap(&[("/train", 0.0)]), &Judgement::default(), &me, true)
            .unwrap();
        assert!(!text.contains("cgsentry_held_off_seconds{"), "{text}");
        me.held_off = vec![crate::control::HeldOff {
            cgroup: "/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e.scope".into(),
            seconds_left: 59.5,
        }];
        let text = m
            .update(&snap(&[("/train", 0.0)]), &Judgement::default(), &me, true)
            .unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("cgsentry_held_off_seconds{"))
            .unwrap_or_else(|| panic!("no hold-off series in\n{text}"));
        assert!(line.ends_with(" 59.5"), "{line}");
        assert!(line.contains("runtime=\"containerd\""), "{line}");
    }

    /// A scrape asks for a rendering and gets the one the next tick makes; a tick with
    /// no scrape waiting renders nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_waits_for_the_next_rendering() {
        let exp = Exposition::default();
        exp.publish("old".into());
        assert!(!exp.take_wanted(), "nobody scraped yet");
        let scrape = tokio::spawn({
            let exp = exp.clone();
            async move { exp.fresh(Duration::from_secs(5)).await }
        });
        // The agent's tick: renders only once the scrape has asked.
        while !exp.take_wanted() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        exp.publish("new".into());
        assert_eq!(&*scrape.await.unwrap(), "new");
        // With no tick coming, the scrape gets the last rendering after its wait.
        assert_eq!(&*exp.fresh(Duration::from_millis(50)).await, "new");
    }

    /// A cgroup named to end the label and forge a series (`x"} 1`, a backslash, a
    /// newline) stays one label value: the text parses, the value reads back, and no
    /// forged series appears.
    #[test]
    fn label_values_are_escaped() {
        let evil = crate::cgroupfs::path_text(b"/x\"} 1\ncgsentry_forged 1\n#\\");
        assert!(evil.contains('"') && evil.contains('\\'), "{evil}");
        let mut m = Metrics::default();
        let text = m
            .update(
                &snap(&[(&evil, 5.0)]),
                &Judgement::default(),
                &SelfStats::default(),
                true,
            )
            .unwrap();
        assert!(
            !text.lines().any(|l| l.starts_with("cgsentry_forged")),
            "{text}"
        );
        // The label value as the text format defines it (prometheus-parse's regex does
        // not handle escaped quotes, so read it here): up to the first unescaped quote.
        let line = text
            .lines()
            .find(|l| l.starts_with("cgsentry_cgroup_cpu{"))
            .expect("the cgroup's series");
        let rest = line.strip_prefix("cgsentry_cgroup_cpu{cgroup=\"").unwrap();
        let (mut value, mut chars) = (String::new(), rest.chars());
        loop {
            match chars.next().expect("a closing quote") {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {line}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        assert_eq!(value, evil);
        assert_eq!(chars.as_str(), "} 0.0", "{line}");
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    /// Actions and decisions of 100,000 cgroups that came and went are not kept.
    #[test]
    fn series_of_deleted_cgroups_are_dropped() {
        let mut m = Metrics::default();
        let me = SelfStats::default();
        for i in 0..100_000u32 {
            let path = format!("/ci/job-{i}");
            let j = Judgement {
                actions: vec![crate::act::Report::new(&path, "r", "throttle")],
                ..Judgement::default()
            };
            m.update(&snap(&[(&path, 1.0)]), &j, &me, false);
            assert!(m.kept() <= 3 * 61, "{} kept at {i}", m.kept());
        }
    }

    /// `/health` is 200 while ticks come and 503 once the last one is too old.
    #[test]
    fn health_follows_the_ticks() {
        let s = Shared::default();
        assert!(!s.health(1_000).0, "no tick yet");
        s.ticked(10_000, Duration::from_secs(10));
        assert!(s.health(15_000).0);
        let (ok, why) = s.health(30_000);
        assert!(!ok && why.contains("20000 ms ago"), "{why}");
    }

    /// A thousand idle connections hold no more than the bound, and a scrape behind
    /// them is answered at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exp = Exposition::default();
        exp.publish("cgsentry_up 1\n".into());
        exp.ticked(crate::eventlog::now_ms(), Duration::from_hours(1));
        tokio::spawn(serve(listener, exp.clone()));
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        let mut idle = Vec::new();
        for _ in 0..1000 {
            match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(c)) => idle.push(c),
                _ => break, // the accept queue is full: the kernel's bound, not ours
            }
        }
        assert!(idle.len() >= 100, "only {} connections", idle.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Ours: the clients' sockets plus at most MAX_CONNECTIONS accepted ones.
        let held = fds().saturating_sub(before).saturating_sub(idle.len());
        assert!(
            held <= MAX_CONNECTIONS + 2,
            "the agent holds {held} sockets"
        );
        // A scrape behind them is answered at once: it replaces an idle one.
        let started = tokio::time::Instant::now();
        let scrape = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        });
        let out = tokio::time::timeout(Duration::from_secs(5), scrape)
            .await
            .expect("answered")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let held = fds().saturating_sub(before).saturating_sub(idle.len());
        assert!(
            held <= MAX_CONNECTIONS + 2,
            "the agent holds {held} sockets"
        );
        drop(idle);
    }
}
