//! Containment through systemd, for cgroups that are systemd units.
//!
//! systemd owns its units' cgroups: a limit written into a service's `memory.high`
//! behind its back is written back on the next `systemctl daemon-reload` (every package
//! upgrade runs one), and does not show in `systemctl status`. So when the offender's
//! cgroup is a unit's own (a `.service`, `.scope` or `.slice` systemd reports for that
//! path), its limits are set as runtime unit properties over D-Bus (`MemoryHigh`,
//! `MemorySwapMax`, `TasksMax`, `CPUQuotaPerSecUSec`, `CPUWeight`), and it is frozen and
//! thawed with `FreezeUnit`/`ThawUnit`: systemd keeps them, shows them and never writes
//! them back. Everything else (containers' own trees, hosts without systemd) keeps the
//! cgroup files.
//!
//! The calls are a small zbus proxy of systemd's manager on one system-bus connection,
//! kept open. cgroups-rs 0.5's `SystemdClient` (the design card's choice) was tried
//! first and dropped: it opens a new bus connection for every call, two per property
//! set (an existence check, then the call), answers `Ok` without doing anything when the
//! unit does not exist, and keeps its manager proxy private (no `GetUnitByControlGroup`).
//! In the Debian VM one throttle step (four properties) took ~870 ms through it — bus
//! handshakes, at the moment memory is running out. Every call runs on a thread of its
//! own with a deadline: a PID 1 slowed by the very memory pressure the agent acts on, or
//! a stuck bus, must not hold the loop; the caller then writes the cgroup file itself
//! (containment first) and says so.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::{Duration, Instant},
};

use tracing::warn;

/// How long one D-Bus call may take.
pub const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// A call slower than this (or one not answered) turns the D-Bus path off for
/// [`SLOW_PAUSE`]: a step makes several calls, and a loop waiting seconds on a PID 1
/// slowed by memory pressure is the agent stalled when it is needed.
const SLOW_CALL: Duration = Duration::from_millis(500);
/// How long the cgroup files are used instead after a slow call.
const SLOW_PAUSE: Duration = Duration::from_secs(30);
/// Units known per cgroup path, at most (then forgotten and asked again).
const MAX_KNOWN: usize = 4096;

/// The part of systemd's manager interface the agent calls.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_async = false,
    blocking_name = "ManagerBlocking"
)]
trait Manager {
    fn get_unit_by_control_group(
        &self,
        cgroup: &str,
    ) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;

    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[&(&str, &zbus::zvariant::Value<'_>)],
    ) -> zbus::Result<()>;

    fn freeze_unit(&self, name: &str) -> zbus::Result<()>;

    fn thaw_unit(&self, name: &str) -> zbus::Result<()>;

    fn get_unit(&self, name: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;

    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::zvariant::Value<'_>)],
        aux: &[(&str, Vec<(&str, zbus::zvariant::Value<'_>)>)],
    ) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
}

/// A unit's state, asked when systemd refused to act on it.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_async = false,
    blocking_name = "UnitBlocking"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
}

/// Why systemd did not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// systemd is stopping the unit (it refuses to freeze a unit with a job pending):
    /// its processes and cgroup are going away, and freezing them behind its back
    /// would leave its stop waiting for processes that cannot exit.
    Stopping,
    /// No such unit loaded (a transient unit gone with its cgroup).
    NoUnit,
    /// Refused for another reason (a unit still starting is refused too), or no answer:
    /// the caller writes the cgroup file itself.
    Failed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopping => f.write_str("systemd is stopping it"),
            Self::NoUnit => f.write_str("no such unit"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

/// The D-Bus thread's connection: opened on first use, dropped after a failed call (so
/// the next one connects afresh, e.g. after dbus-daemon restarted).
#[derive(Default)]
struct Bus {
    connection: Option<zbus::blocking::Connection>,
}

impl Bus {
    /// Runs `f` with the manager's proxy; a failure drops the connection.
    fn manager<T>(
        &mut self,
        f: impl FnOnce(&ManagerBlocking<'_>) -> zbus::Result<T>,
    ) -> Result<T, String> {
        self.with(|c| ManagerBlocking::new(c).and_then(|m| f(&m)))
            .map_err(|e| e.to_string())
    }

    /// Runs `f` on the connection (opened when there is none); any failure but
    /// systemd's own refusal (a method error, which says nothing about the connection)
    /// drops it.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&zbus::blocking::Connection) -> zbus::Result<T>,
    ) -> zbus::Result<T> {
        let connection = match self.connection.take() {
            Some(c) => c,
            None => zbus::blocking::Connection::system()?,
        };
        let result = f(&connection);
        if matches!(result, Ok(_) | Err(zbus::Error::MethodError(..))) {
            self.connection = Some(connection);
        }
        result
    }

    /// `unit`'s stop timeout in µs (a service's or a scope's; `None`: another kind,
    /// or not answered).
    fn stop_timeout(&mut self, unit: &str) -> Option<u64> {
        let interface = match unit.rsplit_once('.').map(|(_, kind)| kind) {
            Some("service") => "org.freedesktop.systemd1.Service",
            Some("scope") => "org.freedesktop.systemd1.Scope",
            _ => return None,
        };
        self.with(|c| {
            let path = ManagerBlocking::new(c)?.get_unit(unit)?;
            let value = zbus::blocking::fdo::PropertiesProxy::builder(c)
                .destination("org.freedesktop.systemd1")?
                .path(path)?
                .build()?
                .get(
                    zbus::names::InterfaceName::from_static_str(interface)?,
                    "TimeoutStopUSec",
                )?;
            Ok(u64::try_from(value)?)
        })
        .ok()
    }

    /// `f`'s outcome for `unit`: when systemd refused, [`Refusal::Stopping`] if the unit
    /// is being stopped.
    fn outcome(
        &mut self,
        unit: &str,
        f: impl FnOnce(&ManagerBlocking<'_>) -> zbus::Result<()>,
    ) -> Result<(), Refusal> {
        match self.with(|c| ManagerBlocking::new(c).and_then(|m| f(&m))) {
            Ok(()) => Ok(()),
            Err(zbus::Error::MethodError(name, ..))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Err(Refusal::NoUnit)
            }
            Err(e @ zbus::Error::MethodError(..)) => {
                let state = self.with(|c| {
                    let path = ManagerBlocking::new(c)?.get_unit(unit)?;
                    UnitBlocking::builder(c).path(path)?.build()?.active_state()
                });
                if state.is_ok_and(|s| s == "deactivating") {
                    Err(Refusal::Stopping)
                } else {
                    Err(Refusal::Failed(format!("{unit}: {e}")))
                }
            }
            Err(e) => Err(Refusal::Failed(format!("{unit}: {e}"))),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Bus) + Send>;

/// systemd on this host, reached over D-Bus from a thread of its own.
#[derive(Clone, Debug)]
pub struct Systemd {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// When the call in progress started (none: idle).
    busy_since: Mutex<Option<Instant>>,
    /// No calls until then (an earlier one was slow or not answered).
    paused_until: Mutex<Option<Instant>>,
    /// [`SLOW_PAUSE`] (shorter in tests).
    slow_pause: Duration,
    /// cgroup path → its unit (`None`: not a unit of its own).
    units: Mutex<HashMap<String, Option<String>>>,
    warned: Mutex<bool>,
}

/// A unit property value as the files give it: `max` is systemd's infinity.
fn property_value(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(u64::MAX),
        t => t.parse().ok(),
    }
}

/// The property and value that set control `file` of a unit to `value` (the text a
/// cgroup file takes), when systemd has one for it.
#[must_use]
pub fn property_for(file: &str, value: &str) -> Option<(&'static str, u64)> {
    match file {
        "memory.high" => Some(("MemoryHigh", property_value(value)?)),
        "memory.max" => Some(("MemoryMax", property_value(value)?)),
        "memory.swap.max" => Some(("MemorySwapMax", property_value(value)?)),
        "pids.max" => Some(("TasksMax", property_value(value)?)),
        "cpu.weight" => Some(("CPUWeight", property_value(value)?)),
        // "quota period" (µs): systemd takes the quota per second.
        "cpu.max" => {
            let (quota, period) = value.trim().split_once(' ')?;
            let period: u64 = period.parse().ok().filter(|p| *p > 0)?;
            let per_sec = match quota {
                "max" => u64::MAX,
                q => q.parse::<u64>().ok()?.saturating_mul(1_000_000) / period,
            };
            Some(("CPUQuotaPerSecUSec", per_sec))
        }
        _ => None,
    }
}

/// Where systemd keeps its runtime state: the runtime properties of its units
/// (`SetUnitProperties` with `runtime`, `systemctl set-property --runtime`) are one
/// drop-in per setting, `<unit>.d/50-<setting>.conf`, in `system.control/` for a unit
/// with a file of its own and in `transient/` for a transient unit (systemd-run's
/// services, every scope). They outlive the value they were written for: systemd
/// re-reads them on every `daemon-reload`, above the unit's own files, until the next
/// boot or (transient) until the unit goes, so one left behind overrides the
/// operator's later edit of the unit.
pub const RUN_DIR: &str = "/run/systemd";

/// The runtime drop-ins under `run_dir` (see [`RUN_DIR`]) that setting `property` of
/// `unit` may write, for the properties [`property_for`] names; none for any other
/// property or a name that is not a unit's (a journal is data: it never names the
/// file root removes).
#[must_use]
pub fn runtime_dropins(run_dir: &Path, unit: &str, property: &str) -> Vec<PathBuf> {
    // systemd names the file by the setting it writes, which for the quota per second
    // is `CPUQuota=` (dbus-cgroup.c).
    let setting = match property {
        "MemoryHigh" | "MemoryMax" | "MemorySwapMax" | "TasksMax" | "CPUWeight" => property,
        "CPUQuotaPerSecUSec" => "CPUQuota",
        _ => return Vec::new(),
    };
    let is_unit = !unit.is_empty()
        && !unit.starts_with('.')
        && !unit.contains('/')
        && named_unit(unit).is_some();
    if !is_unit {
        return Vec::new();
    }
    ["system.control", "transient"]
        .iter()
        .map(|d| {
            run_dir
                .join(d)
                .join(format!("{unit}.d"))
                .join(format!("50-{setting}.conf"))
        })
        .collect()
}

/// A unit's name from its D-Bus object path (`/org/freedesktop/systemd1/unit/pool_2eservice`
/// is `pool.service`: bytes other than letters and digits are `_XX`).
#[must_use]
pub fn unit_from_path(path: &str) -> Option<String> {
    let escaped = path.strip_prefix("/org/freedesktop/systemd1/unit/")?;
    let b = escaped.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The unit name a cgroup path ends in, if it has a unit's suffix.
fn named_unit(cgroup: &str) -> Option<&str> {
    let last = cgroup.rsplit('/').next()?;
    [".service", ".scope", ".slice"]
        .iter()
        .any(|s| last.ends_with(s))
        .then_some(last)
}

impl Systemd {
    /// systemd when it is this host's init (`/run/systemd/system`), else `None`.
    #[must_use]
    pub fn detect() -> Option<Self> {
        let sd = std::path::Path::new("/run/systemd/system")
            .is_dir()
            .then(|| Self::start(SLOW_PAUSE))
            .flatten()?;
        // The bus is opened now, not at the first containment: its handshake under
        // memory pressure (two quarantines at once in debian-quarantine, under TCG)
        // took past SLOW_CALL and paused the D-Bus path just when it was needed.
        let warm: Job = Box::new(|bus| {
            let _ = bus.with(|_| Ok(()));
        });
        if let Some(tx) = sd
            .shared
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = tx.send(warm);
        }
        Some(sd)
    }

    fn start(slow_pause: Duration) -> Option<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("cgsentry-systemd".into())
            .spawn(move || {
                let mut bus = Bus::default();
                for job in rx {
                    job(&mut bus);
                }
            });
        if let Err(e) = spawned {
            warn!(
                "systemd units will be acted on through their cgroup files: cannot start a thread: {e}"
            );
            return None;
        }
        Some(Self {
            shared: Arc::new(Shared {
                jobs: Mutex::new(Some(tx)),
                busy_since: Mutex::new(None),
                paused_until: Mutex::new(None),
                slow_pause,
                units: Mutex::new(HashMap::new()),
                warned: Mutex::new(false),
            }),
        })
    }

    /// A connection whose calls are all refused (paused after a slow one) for a
    /// minute: what the agent sees of a PID 1 slowed by memory pressure. It never
    /// reaches a bus.
    #[cfg(test)]
    pub(crate) fn paused() -> Self {
        let sd = Self::start(Duration::from_mins(1)).expect("a thread");
        let _ = sd.call("slow", |_| {
            std::thread::sleep(SLOW_CALL + Duration::from_millis(50));
            Ok(())
        });
        sd
    }

    /// Runs `f` on the D-Bus thread, waiting [`CALL_DEADLINE`] at most. A call still
    /// stuck from before refuses new ones at once (they would queue behind it); after
    /// a call slower than [`SLOW_CALL`] or not answered, calls are refused for
    /// [`SLOW_PAUSE`]. A job whose caller has given up is dropped, not run late (a
    /// stale limit must not land after what the caller did meanwhile).
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Bus) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let busy = *self
            .shared
            .busy_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if busy.is_some_and(|at| at.elapsed() > CALL_DEADLINE) {
            return Err(format!("{what}: systemd has not answered an earlier call"));
        }
        let paused = *self
            .shared
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if paused.is_some_and(|until| Instant::now() < until) {
            return Err(format!(
                "{what}: systemd answered slowly; its calls are paused for {} s",
                self.shared.slow_pause.as_secs()
            ));
        }
        let (reply, answer) = mpsc::channel();
        let shared = Arc::clone(&self.shared);
        let asked = Instant::now();
        let job: Job = Box::new(move |bus| {
            if asked.elapsed() >= CALL_DEADLINE {
                return; // its caller has given up
            }
            *shared
                .busy_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            let r = f(bus);
            *shared
                .busy_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
            let _ = reply.send(r);
        });
        let sent = self
            .shared
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|tx| tx.send(job).is_ok());
        if sent != Some(true) {
            return Err(format!("{what}: the D-Bus thread is gone"));
        }
        let answered = answer.recv_timeout(CALL_DEADLINE);
        if answered.is_err() || asked.elapsed() > SLOW_CALL {
            *self
                .shared
                .paused_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some(Instant::now() + self.shared.slow_pause);
        }
        answered.map_err(|_| {
            format!(
                "{what}: systemd did not answer within {} s",
                CALL_DEADLINE.as_secs()
            )
        })?
    }

    /// The unit `cgroup` belongs to as PID 1 sees it (its own, or the unit whose tree
    /// it is in: a user's manager for her scopes, a container's scope for its cgroups),
    /// asked each time; `None` when systemd does not answer.
    #[must_use]
    pub fn unit_containing(&self, cgroup: &str) -> Option<String> {
        let path = cgroup.to_owned();
        match self.call("GetUnitByControlGroup", move |bus| {
            let object = bus.manager(|m| m.get_unit_by_control_group(&path))?;
            Ok(unit_from_path(object.as_str()))
        }) {
            Ok(unit) => unit,
            Err(e) => {
                self.warn_once(&e);
                None
            }
        }
    }

    /// The unit whose own cgroup `cgroup` is (asked once per path), `None` for a cgroup
    /// that is no unit's own (a container's tree below its scope, a cgroup made by
    /// hand) or when systemd does not answer.
    pub fn unit_of(&self, cgroup: &str) -> Option<String> {
        let name = named_unit(cgroup)?.to_owned();
        {
            let units = self
                .shared
                .units
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(known) = units.get(cgroup) {
                return known.clone();
            }
        }
        let path = cgroup.to_owned();
        let asked = self.call("GetUnitByControlGroup", move |bus| {
            let object = bus.manager(|m| m.get_unit_by_control_group(&path))?;
            Ok(unit_from_path(object.as_str()))
        });
        let unit = match asked {
            // systemd names the unit the cgroup belongs to: its own only if the names
            // agree (a container's `foo.service` below a docker scope is the scope's).
            Ok(found) => found.filter(|u| *u == name),
            Err(e) => {
                self.warn_once(&e);
                return None; // not remembered: asked again next time
            }
        };
        let mut units = self
            .shared
            .units
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if units.len() >= MAX_KNOWN {
            units.clear();
        }
        units.insert(cgroup.to_owned(), unit.clone());
        unit
    }

    /// Sets runtime property `name` of `unit` (kept by systemd across reloads, shown
    /// by `systemctl status`).
    ///
    /// # Errors
    /// systemd refused (or is stopping the unit), or did not answer in time.
    pub fn set_property(&self, unit: &str, name: &'static str, value: u64) -> Result<(), Refusal> {
        let unit = unit.to_owned();
        self.call("SetUnitProperties", move |bus| {
            let v = zbus::zvariant::Value::U64(value);
            Ok(bus
                .outcome(&unit, |m| {
                    m.set_unit_properties(&unit, true, &[&(name, &v)])
                })
                .map_err(|r| match r {
                    Refusal::Failed(e) => Refusal::Failed(format!("{e} ({name}={value})")),
                    other => other,
                }))
        })
        .map_err(Refusal::Failed)?
    }

    /// `FreezeUnit` / `ThawUnit`.
    ///
    /// # Errors
    /// systemd refused (or is stopping the unit), or did not answer in time.
    pub fn set_frozen(&self, unit: &str, frozen: bool) -> Result<(), Refusal> {
        let unit = unit.to_owned();
        self.call(if frozen { "FreezeUnit" } else { "ThawUnit" }, move |bus| {
            Ok(bus.outcome(&unit, |m| {
                if frozen {
                    m.freeze_unit(&unit)
                } else {
                    m.thaw_unit(&unit)
                }
            }))
        })
        .map_err(Refusal::Failed)?
    }

    /// Starts the transient scope `name` in `slice` with `pids` in it (systemd moves
    /// them), `limits` (properties, as [`property_for`] names them) set on its cgroup
    /// before they enter, described as the quarantine of `origin`, and
    /// `PartOf=part_of` (and its stop timeout) when given: a `systemctl stop` or
    /// restart of the unit the processes came from ends them in quarantine too, as it
    /// would have where they were.
    ///
    /// # Errors
    /// systemd refused (a unit of that name exists, a PID is gone…), or did not
    /// answer in time.
    pub fn start_scope(
        &self,
        name: &str,
        slice: &str,
        (origin, part_of): (&str, Option<&str>),
        pids: &[u32],
        limits: &[(&'static str, u64)],
    ) -> Result<(), Refusal> {
        let (name, slice) = (name.to_owned(), slice.to_owned());
        let part_of = part_of.map(str::to_owned);
        let description = format!(
            "cgsentry quarantine of {}",
            part_of.as_deref().unwrap_or(origin)
        );
        let (pids, limits) = (pids.to_vec(), limits.to_vec());
        self.call("StartTransientUnit", move |bus| {
            use zbus::zvariant::Value;
            let mut properties: Vec<(&str, Value<'_>)> = vec![
                ("Description", Value::from(description.as_str())),
                ("Slice", Value::from(slice.as_str())),
                ("PIDs", Value::from(pids)),
            ];
            if let Some(unit) = &part_of {
                properties.push(("PartOf", Value::from(vec![unit.as_str()])));
                // Stopped with that unit, its processes here get the time to end that
                // they had there (`TimeoutStopSec=`; a scope's own default is
                // systemd's, 90 s): an offender held by its memory cap may take all of
                // it to get to its SIGTERM, then SIGKILL ends it as it would have.
                if let Some(usec) = bus.stop_timeout(unit) {
                    properties.push(("TimeoutStopUSec", Value::U64(usec)));
                }
            }
            properties.extend(limits.iter().map(|(k, v)| (*k, Value::U64(*v))));
            Ok(bus.outcome(&name, |m| {
                m.start_transient_unit(&name, "fail", &properties, &[])
                    .map(|_job| ())
            }))
        })
        .map_err(Refusal::Failed)?
    }

    /// `StopUnit` (replacing any job queued for it).
    ///
    /// # Errors
    /// systemd refused, or did not answer in time.
    pub fn stop(&self, unit: &str) -> Result<(), Refusal> {
        let unit = unit.to_owned();
        self.call("StopUnit", move |bus| {
            Ok(bus.outcome(&unit, |m| m.stop_unit(&unit, "replace").map(|_job| ())))
        })
        .map_err(Refusal::Failed)?
    }

    /// `KillUnit` with whom `all`: `signal` to every process of the unit's cgroup and
    /// those below it, sent by systemd, which then knows why its unit's processes
    /// ended (the unit's result and journal say so).
    ///
    /// # Errors
    /// systemd refused, or did not answer in time.
    pub fn kill(&self, unit: &str, signal: nix::sys::signal::Signal) -> Result<(), Refusal> {
        let unit = unit.to_owned();
        self.call("KillUnit", move |bus| {
            Ok(bus.outcome(&unit, |m| m.kill_unit(&unit, "all", signal as i32)))
        })
        .map_err(Refusal::Failed)?
    }

    /// Says once that systemd is not answering (the cgroup files are used meanwhile).
    pub fn warn_once(&self, why: &str) {
        let mut warned = self
            .shared
            .warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !*warned {
            warn!(
                "{why}: acting through the cgroup files meanwhile (systemd may write them back on its next reload)"
            );
            *warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_become_unit_properties() {
        assert_eq!(
            property_for("memory.high", "104857600"),
            Some(("MemoryHigh", 104_857_600))
        );
        assert_eq!(
            property_for("memory.high", "max"),
            Some(("MemoryHigh", u64::MAX))
        );
        assert_eq!(property_for("pids.max", "256"), Some(("TasksMax", 256)));
        assert_eq!(
            property_for("cpu.max", "50000 100000"),
            Some(("CPUQuotaPerSecUSec", 500_000))
        );
        assert_eq!(
            property_for("cpu.max", "max 100000"),
            Some(("CPUQuotaPerSecUSec", u64::MAX))
        );
        assert_eq!(property_for("cpu.weight", "10"), Some(("CPUWeight", 10)));
        assert_eq!(
            property_for("memory.swap.max", "0"),
            Some(("MemorySwapMax", 0))
        );
        assert_eq!(property_for("cgroup.procs", "1"), None);
        assert_eq!(property_for("cpu.max", "nonsense"), None);
    }

    #[test]
    fn runtime_dropins_are_named_as_systemd_writes_them() {
        let run = Path::new("/run/systemd");
        assert_eq!(
            runtime_dropins(run, "pool.service", "MemoryHigh"),
            [
                run.join("system.control/pool.service.d/50-MemoryHigh.conf"),
                run.join("transient/pool.service.d/50-MemoryHigh.conf")
            ]
        );
        assert_eq!(
            runtime_dropins(run, "pool.service", "CPUQuotaPerSecUSec")[0],
            run.join("system.control/pool.service.d/50-CPUQuota.conf")
        );
        // Every property a limit becomes has its drop-ins.
        for (file, value) in [
            ("memory.high", "1"),
            ("memory.max", "1"),
            ("memory.swap.max", "0"),
            ("pids.max", "1"),
            ("cpu.weight", "1"),
            ("cpu.max", "50000 100000"),
        ] {
            let (property, _) = property_for(file, value).unwrap();
            assert_eq!(runtime_dropins(run, "a.scope", property).len(), 2, "{file}");
        }
        // Nothing else: not another property, not a path that is no unit's.
        assert!(runtime_dropins(run, "pool.service", "ExecStart").is_empty());
        for unit in [
            "../../etc/x.service",
            "a/b.service",
            "..service",
            "pool",
            "",
        ] {
            assert!(
                runtime_dropins(run, unit, "MemoryHigh").is_empty(),
                "{unit}"
            );
        }
    }

    #[test]
    fn unit_names_from_object_paths() {
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/pool_2eservice").as_deref(),
            Some("pool.service")
        );
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/user_401000_2eservice").as_deref(),
            Some("user@1000.service")
        );
        assert_eq!(unit_from_path("/elsewhere"), None);
        assert_eq!(
            named_unit("/system.slice/pool.service"),
            Some("pool.service")
        );
        assert_eq!(named_unit("/system.slice/docker-1.scope/init"), None);
        assert_eq!(named_unit("/leak"), None);
    }

    /// A D-Bus thread stuck in a call: the next ones fail at once instead of queueing;
    /// once it returns, calls stay refused for the pause, then work again.
    #[test]
    fn a_stuck_call_fails_the_next_ones_fast() {
        let sd = Systemd::start(Duration::from_millis(300)).unwrap();
        let (release, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let started = Instant::now();
        let r = sd.call("stuck", move |_| {
            let _ = wait.lock().unwrap().recv();
            Ok(())
        });
        assert!(r.unwrap_err().contains("did not answer"));
        assert!(started.elapsed() < CALL_DEADLINE + Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let r = sd.call("next", |_| Ok(()));
        assert!(
            r.as_ref()
                .unwrap_err()
                .contains("has not answered an earlier call"),
            "{r:?}"
        );
        assert!(t.elapsed() < Duration::from_millis(200));
        release.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let r = sd.call("paused", |_| Ok(()));
        assert!(r.as_ref().unwrap_err().contains("paused"), "{r:?}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(sd.call("after", |_| Ok(7)), Ok(7));
    }

    /// A call answered, but slowly: it counts, and the next ones are refused for the
    /// pause (a step's several calls must not add up to seconds of a stalled loop).
    #[test]
    fn a_slow_answer_pauses_the_calls() {
        let sd = Systemd::start(Duration::from_millis(300)).unwrap();
        let slow = sd.call("slow", |_| {
            std::thread::sleep(SLOW_CALL + Duration::from_millis(100));
            Ok(1)
        });
        assert_eq!(slow, Ok(1));
        let r = sd.call("next", |_| Ok(2));
        assert!(r.as_ref().unwrap_err().contains("paused"), "{r:?}");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(sd.call("later", |_| Ok(3)), Ok(3));
    }

    /// A job queued behind a call in progress whose caller gave up is dropped, not run
    /// when the thread gets to it (it would set a stale value).
    #[test]
    fn a_job_given_up_on_is_not_run_late() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let sd = Systemd::start(Duration::from_millis(10)).unwrap();
        let (release, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let first = {
            let sd = sd.clone();
            std::thread::spawn(move || {
                sd.call("long", move |_| {
                    let _ = wait.lock().unwrap().recv();
                    Ok(())
                })
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let r = sd.call("queued", move |_| {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        });
        assert!(r.unwrap_err().contains("did not answer"));
        release.send(()).unwrap();
        assert!(first.join().unwrap().is_err());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ran.load(Ordering::SeqCst), "a given-up job ran late");
    }
}
