//! The runner's side of a Debian image (`[vm] image = "debian"`): systemd is PID 1,
//! cgsentry runs as its installed service, workloads start as transient units where a
//! real distribution puts them, and what the agent did is read from its event log.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// The agent's event log, as the installed unit writes it.
pub const EVENT_LOG: &str = "/var/log/cgsentry/events.jsonl";

/// The swap disk (the root disk is /dev/vda), switched on when the VM has one.
pub fn swap_on() {
    if Path::new("/dev/vdb").exists() {
        let ok = Command::new("mkswap")
            .arg("/dev/vdb")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("swapon")
                .arg("/dev/vdb")
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            println!("vm-run: swap setup failed");
        }
    }
}

/// Waits (up to `within`) for cgsentry.service to be active (Type=notify: its programs
/// attached, its journal reconciled); returns the seconds since boot it took.
pub fn wait_for_agent(within: Duration) -> Result<f64> {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new("systemctl")
            .args(["is-active", "cgsentry.service"])
            .output()
            .context("systemctl")?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if state == "active" {
            let since = Command::new("systemctl")
                .args([
                    "show",
                    "-P",
                    "ActiveEnterTimestampMonotonic",
                    "cgsentry.service",
                ])
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0);
            return Ok(since as f64 / 1e6);
        }
        if state == "failed" || Instant::now() >= deadline {
            bail!("cgsentry.service is {state:?}, not active");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `journalctl -u cgsentry -f`: the agent's log lines as they come.
pub fn follow_agent_log() -> Result<Child> {
    Command::new("journalctl")
        .args(["-u", "cgsentry.service", "-f", "-o", "cat", "--no-pager"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting journalctl")
}

/// Lines the agent wrote to the journal since boot.
#[must_use]
pub fn agent_journal_lines() -> usize {
    Command::new("journalctl")
        .args(["-u", "cgsentry.service", "-b", "-o", "cat", "--no-pager"])
        .output()
        .map_or(0, |o| {
            o.stdout
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count()
        })
}

/// The systemd property for a cgroup control file a scenario sets on its workload.
fn property(file: &str, value: &str) -> Result<String> {
    let name = match file {
        "memory.max" => "MemoryMax",
        "memory.high" => "MemoryHigh",
        "memory.swap.max" => "MemorySwapMax",
        "pids.max" => "TasksMax",
        _ => bail!("{file}: no systemd property for it (a Debian scenario sets unit properties)"),
    };
    Ok(format!("{name}={value}"))
}

/// The uid whose user manager `rel` is below (`/user.slice/user-1000.slice/
/// user@1000.service/app.slice/leak.scope`: 1000), if it is.
#[must_use]
pub fn user_manager_uid(rel: &str) -> Option<u32> {
    let mut parts = rel.strip_prefix("/user.slice/")?.split('/');
    let slice = parts
        .next()?
        .strip_prefix("user-")?
        .strip_suffix(".slice")?;
    let manager = parts
        .next()?
        .strip_prefix("user@")?
        .strip_suffix(".service")?;
    (slice == manager && parts.next().is_some())
        .then(|| manager.parse().ok())
        .flatten()
}

/// The user whose manager the image starts at boot (lingering) for a scenario's
/// workloads in `/user.slice/user-1000.slice/user@1000.service/…`.
pub const LINGERING_USER: (&str, u32) = ("alice", 1000);

/// Waits (up to `within`) for the user manager of `uid` to listen on its bus (systemd
/// starts a lingering user's manager at boot, after the system is up).
fn wait_for_user_bus(uid: u32, within: Duration) -> Result<()> {
    let bus = format!("/run/user/{uid}/bus");
    let deadline = Instant::now() + within;
    while !Path::new(&bus).exists() {
        if Instant::now() > deadline {
            bail!(
                "{bus}: user@{uid}.service has no bus after {} s",
                within.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Starts `program args` as the transient unit `rel` names — `/system.slice/pool.service`
/// is the service pool.service in system.slice (its output piped here, through
/// `systemd-run --pipe --wait`), a `.scope` a scope of this runner's — as user `uid`
/// when given, with the scenario's control files and `unit_properties` as unit
/// properties. Below a user's
/// manager (`/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope`) it is
/// that user's unit, started by its manager (`systemd-run --user`, as the user).
pub fn spawn_unit(w: &crate::scenario::Workload, program: &str) -> Result<Child> {
    let rel = w.cgroup.as_str();
    let mut parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    let unit = parts.pop().context("a unit name")?;
    let slice = parts.last().copied().unwrap_or("system.slice");
    let user = user_manager_uid(rel);
    let mut cmd = match user {
        Some(owner) => {
            // Unit types are spelt in lower case: systemd knows no ".SLICE".
            if slice.rsplit_once('.').map(|(_, kind)| kind) != Some("slice") {
                bail!("{rel}: a user's unit is in a slice of its manager (app.slice)");
            }
            wait_for_user_bus(owner, Duration::from_mins(1))?;
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={owner}"))
                .arg(format!("--regid={owner}"))
                .args(["--clear-groups", "--", "env"])
                .arg(format!("XDG_RUNTIME_DIR=/run/user/{owner}"))
                .args(["systemd-run", "--user"]);
            c
        }
        None => Command::new("systemd-run"),
    };
    cmd.args(["--quiet", "--collect"])
        .arg(format!("--unit={unit}"))
        .arg(format!("--slice={slice}"));
    // Unit types are spelt in lower case: systemd knows no ".SCOPE".
    match unit.rsplit_once('.').map(|(_, kind)| kind) {
        Some("scope") => {
            cmd.arg("--scope");
        }
        Some("service") => {
            cmd.args(["--pipe", "--wait", "--service-type=exec"]);
        }
        _ => bail!("{rel}: a Debian scenario's cgroup is a .service or a .scope in a slice"),
    }
    if let Some(uid) = w.uid.filter(|_| user.is_none()) {
        cmd.arg(format!("--uid={uid}")).arg(format!("--gid={uid}"));
    }
    for (file, value) in &w.files {
        cmd.arg("--property").arg(property(file, value)?);
    }
    for p in &w.unit_properties {
        cmd.arg("--property").arg(p);
    }
    cmd.arg("--")
        .arg(program)
        .args(&w.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .with_context(|| format!("systemd-run {unit} in {slice}"))
}

/// How long ago (by `CLOCK_MONOTONIC`) the unit `rel` names started its main process (a
/// service) or began to start (a scope); `None` while systemd has no time for it.
/// `systemd-run` itself takes a while to start a unit (~0.4 s under TCG): the workload
/// starts when systemd forks it, not when the runner asked for it.
#[must_use]
pub fn unit_started_ago(rel: &str) -> Option<Duration> {
    let unit = rel.rsplit('/').next()?;
    let show = |prop: &str| -> Option<u64> {
        let out = Command::new("systemctl")
            .args(["show", "-P", prop, unit])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|us| *us > 0)
    };
    let at_us = show("ExecMainStartTimestampMonotonic")
        .or_else(|| show("InactiveExitTimestampMonotonic"))?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) } != 0 {
        return None;
    }
    let now_us =
        u64::try_from(now.tv_sec).ok()? * 1_000_000 + u64::try_from(now.tv_nsec).ok()? / 1000;
    Some(Duration::from_micros(now_us.checked_sub(at_us)?))
}

/// The agent's events since `since` (wall clock) as the agent ticks the metrics read
/// (`findings`, `decisions`, `actions`), each at its time since `t0`: one tick per
/// event (a finding counts when it appears or changes, not every tick).
#[must_use]
pub fn agent_events(path: &Path, t0: SystemTime) -> Vec<(Duration, Value)> {
    let t0_ms = t0.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| {
            let ms = u128::from(e["ts_ms"].as_u64()?);
            let at = Duration::from_millis(u64::try_from(ms.checked_sub(t0_ms)?).ok()?);
            let one = |key: &str, v: Value| json!({ key: [v] });
            let tick = match e["event"].as_str()? {
                "finding" => one(
                    "findings",
                    json!({"finding": {"kind": e["finding"]["kind"], "cgroup": e["finding"]["cgroup"]}}),
                ),
                "decision" => one("decisions", json!({"action": e["action"], "cgroup": e["cgroup"]})),
                "action" | "release" => {
                    one("actions", json!({"action": e["action"], "cgroup": e["cgroup"]}))
                }
                _ => return None,
            };
            Some((at, tick))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_manager_units() {
        let uid = user_manager_uid;
        assert_eq!(
            uid("/user.slice/user-1000.slice/user@1000.service/app.slice/leak.scope"),
            Some(1000)
        );
        assert_eq!(uid("/user.slice/user-1000.slice/session-3.scope"), None);
        assert_eq!(
            uid("/user.slice/user-1000.slice/user@1001.service/app.slice"),
            None
        );
        assert_eq!(uid("/user.slice/user-1000.slice/user@1000.service"), None);
        assert_eq!(
            uid("/system.slice/user@1000.service/app.slice/x.scope"),
            None
        );
    }

    #[test]
    fn events_become_ticks() {
        let dir = std::env::temp_dir().join(format!("cgsentry-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        std::fs::write(
            &path,
            "{\"ts_ms\":1000500,\"event\":\"decision\",\"action\":\"throttle\",\"cgroup\":\"/system.slice/pool.service\"}\n\
             {\"ts_ms\":999000,\"event\":\"decision\",\"action\":\"notify\",\"cgroup\":\"/x\"}\n\
             {\"ts_ms\":1001000,\"event\":\"finding\",\"finding\":{\"kind\":\"leak\",\"cgroup\":\"/y\"}}\n\
             {\"ts_ms\":1002000,\"event\":\"agent_stopped\"}\n\
             not json\n",
        )
        .unwrap();
        let ticks = agent_events(&path, t0);
        assert_eq!(ticks.len(), 2, "{ticks:?}");
        assert_eq!(ticks[0].0, Duration::from_millis(500));
        assert_eq!(ticks[0].1["decisions"][0]["action"], "throttle");
        assert_eq!(ticks[1].1["findings"][0]["finding"]["kind"], "leak");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn control_files_become_properties() {
        assert_eq!(property("memory.max", "400M").unwrap(), "MemoryMax=400M");
        assert!(property("cpu.max", "1").is_err());
    }
}
