//! The control socket: a unix stream socket (`/run/cgsentry/control.sock`, mode 0600,
//! root only) through which `cgsentry status`, `explain`, `release` and `top` talk to the
//! running agent.
//!
//! Protocol: the client writes one JSON request on one line (`{"cmd":"status"}`,
//! `{"cmd":"release","cgroup":"/x"}`), the agent answers one JSON line
//! (`{"ok":true,"data":…}` or `{"ok":false,"error":"…"}`) and closes. Besides the file
//! mode, every connection's peer credentials (`SO_PEERCRED`) are checked: a process that
//! is not uid 0 is refused even if the mode was loosened, since `release` undoes
//! containment.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

pub const DEFAULT_SOCKET: &str = "/run/cgsentry/control.sock";
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Explain,
    Release {
        cgroup: String,
        /// Seconds no ladder starts on the cgroup after the release.
        #[serde(default)]
        hold_off_sec: u64,
    },
    /// Everything applied, on every cgroup.
    ReleaseAll {
        #[serde(default)]
        hold_off_sec: u64,
    },
    Top,
}

/// What a manual release did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Released {
    /// The cgroup released (the origin when a quarantine cgroup was named).
    pub cgroup: String,
    pub reports: Vec<crate::act::Report>,
    /// Seconds it is held off (0: not held off).
    pub hold_off_sec: u64,
}

/// A cgroup held off after a manual release.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOff {
    pub cgroup: String,
    pub seconds_left: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or_default(),
        }
    }

    fn err(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// Something the agent applied and still holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub cgroup: String,
    pub rule: String,
    pub finding: String,
    pub steps_taken: usize,
    pub relaxed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// Limits we replaced, `cgroup/file`.
    pub limits: Vec<String>,
    pub dry_run: bool,
    pub updated_ms: u128,
}

/// `cgsentry status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub started_ms: u128,
    pub ticks: u64,
    pub last_tick_ms: u128,
    pub tick_seconds: f64,
    pub interval_ms: u64,
    pub policy_files: Vec<std::path::PathBuf>,
    pub rules: usize,
    pub protect: usize,
    pub dry_run: bool,
    pub policy_errors: Vec<String>,
    pub findings: usize,
    pub active: Vec<Active>,
    /// Cgroups the operator released with a hold-off still running.
    #[serde(default)]
    pub held_off: Vec<HeldOff>,
    /// Cgroups never acted on whatever a policy says, with why.
    #[serde(default)]
    pub never_act: Vec<(String, String)>,
    pub ebpf_dropped: u64,
    pub kernel_oom_victims: u64,
    pub rss_bytes: u64,
    pub gpu: String,
    pub event_log: Option<String>,
    pub metrics: Option<String>,
    pub history_file: Option<String>,
    pub notifications_sent: u64,
    pub notifications_failed: u64,
    pub notifications_suppressed: u64,
}

/// What the socket serves, refreshed every tick by the agent.
#[derive(Debug, Default)]
pub struct Shared {
    pub status: Status,
    pub state: crate::explain::State,
    pub top: crate::top::View,
}

pub type SharedRef = Arc<RwLock<Shared>>;

/// A manual release, carried out by the control loop (which owns the actuator).
#[derive(Debug)]
pub struct ReleaseRequest {
    /// The cgroup; `None`: everything applied, on every cgroup.
    pub cgroup: Option<String>,
    pub hold_off_sec: u64,
    pub reply: oneshot::Sender<Result<Released, String>>,
}

/// Binds `path` (mode 0600, its directory created 0755). A stale socket left by a dead
/// agent is replaced; a live one is an error (another agent runs).
///
/// # Errors
/// Another agent answers there, or the socket cannot be made.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{}: another agent is answering there (stop it first)",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Not under a tightened umask (it is process-wide, and other threads create
    // files): a socket made under the usual 022 is 0755, and connecting needs write
    // permission, so nobody but root can connect before the chmod below.
    let bound = UnixListener::bind(path);
    let listener = bound.map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves connections until the listener fails.
pub async fn serve(
    listener: UnixListener,
    shared: SharedRef,
    releases: mpsc::Sender<ReleaseRequest>,
) {
    // A few at a time, each with a deadline: what waits stays in the kernel's queue.
    let permits = Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let releases = releases.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(30), handle(stream, shared, releases))
                .await
            {
                Ok(Err(e)) => debug!("control socket: {e}"),
                Err(_) => debug!("control socket: connection closed at its deadline"),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }
}

async fn handle(
    stream: UnixStream,
    shared: SharedRef,
    releases: mpsc::Sender<ReleaseRequest>,
) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let response = if uid == 0 {
        let mut line = String::new();
        let mut reader =
            tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
        match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await {
            Err(_) => Response::err("no request within 5 s"),
            Ok(Err(e)) => Response::err(format!("reading the request: {e}")),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
                Err(e) => Response::err(format!("bad request: {e}")),
                Ok(req) => answer(req, &shared, &releases).await,
            },
        }
    } else {
        warn!(
            uid,
            "control socket: refused a connection from a non-root process"
        );
        Response::err(format!(
            "refused: uid {uid} is not root (the control socket is root-only)"
        ))
    };
    let mut text = serde_json::to_string(&response).unwrap_or_default();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

async fn answer(
    req: Request,
    shared: &SharedRef,
    releases: &mpsc::Sender<ReleaseRequest>,
) -> Response {
    let read = |f: &dyn Fn(&Shared) -> Response| match shared.read() {
        Ok(s) => f(&s),
        Err(_) => Response::err("agent state unavailable"),
    };
    match req {
        Request::Status => read(&|s| Response::ok(&s.status)),
        Request::Explain => read(&|s| Response::ok(&s.state)),
        Request::Top => read(&|s| Response::ok(&s.top)),
        Request::Release {
            cgroup,
            hold_off_sec,
        } => release(Some(cgroup), hold_off_sec, releases).await,
        Request::ReleaseAll { hold_off_sec } => release(None, hold_off_sec, releases).await,
    }
}

/// Hands a release to the control loop and waits for what it did.
async fn release(
    cgroup: Option<String>,
    hold_off_sec: u64,
    releases: &mpsc::Sender<ReleaseRequest>,
) -> Response {
    let (tx, rx) = oneshot::channel();
    let req = ReleaseRequest {
        cgroup,
        hold_off_sec,
        reply: tx,
    };
    if releases.send(req).await.is_err() {
        return Response::err("the agent is stopping");
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(done))) => {
            info!(n = done.reports.len(), "manual release done");
            Response::ok(done)
        }
        Ok(Ok(Err(e))) => Response::err(e),
        Ok(Err(_)) | Err(_) => Response::err("the agent did not answer within 10 s"),
    }
}

/// Sends one request and returns the answer's `data`.
///
/// # Errors
/// No agent at `path`, refused, or the agent's error.
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is the agent running? `systemctl status cgsentry`)"
            }
            std::io::ErrorKind::PermissionDenied => " (root only: run with sudo)",
            _ => "",
        };
        format!("{}: {e}{hint}", path.display())
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let mut text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let r: Response =
        serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}"))?;
    if r.ok {
        Ok(r.data)
    } else {
        Err(r.error.unwrap_or_else(|| "failed".into()))
    }
}

fn fail(msg: &str) -> std::process::ExitCode {
    eprintln!("cgsentry: {msg}");
    std::process::ExitCode::FAILURE
}

/// `cgsentry status`.
#[must_use]
pub fn status_command(args: &crate::cli::StatusArgs) -> std::process::ExitCode {
    let data = match request(&args.socket, &Request::Status) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&data).unwrap_or_default()
        );
        return std::process::ExitCode::SUCCESS;
    }
    match serde_json::from_value::<Status>(data) {
        Ok(s) => {
            print!("{}", status_text(&s, crate::eventlog::now_ms()));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("bad status from the agent: {e}")),
    }
}

/// `cgsentry release CGROUP`, `cgsentry release --all [--offline]`.
#[must_use]
pub fn release_command(args: &crate::cli::ReleaseArgs) -> std::process::ExitCode {
    if args.offline {
        return release_offline(args);
    }
    let hold_off_sec = args.hold_off.as_secs();
    let req = match &args.cgroup {
        Some(cgroup) => Request::Release {
            cgroup: cgroup.clone(),
            hold_off_sec,
        },
        None => Request::ReleaseAll { hold_off_sec },
    };
    match request(&args.socket, &req).map(serde_json::from_value::<Released>) {
        Ok(Ok(released)) => {
            print!("{}", released_text(&released));
            let failed = released.reports.iter().any(|r| !r.errors.is_empty());
            if failed {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Ok(Err(e)) => fail(&format!("bad answer from the agent: {e}")),
        Err(e) => fail(&e),
    }
}

/// `cgsentry release --all --offline`: undoes the journal's entries without an agent.
fn release_offline(args: &crate::cli::ReleaseArgs) -> std::process::ExitCode {
    if request(&args.socket, &Request::Status).is_ok() {
        return fail(&format!(
            "an agent answers on {}: release through it (drop --offline), or stop it first",
            args.socket.display()
        ));
    }
    let root = match crate::preflight::cgroup2_root() {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    let mut act = crate::act::Actuator::open(&root, &args.journal_dir, "cgsentry.slice");
    let mut reports = act.release_all();
    // And what no journal entry explains: quarantines emptied back, frozen cgroups
    // reported.
    let tree = crate::cgroupfs::CgroupReader::new(&root).walk();
    let all: Vec<&str> = tree.values().map(String::as_str).collect();
    reports.extend(act.orphans(&all));
    let released = Released {
        cgroup: "(all, from the journal)".into(),
        reports,
        hold_off_sec: 0,
    };
    print!("{}", released_text(&released));
    if released.reports.iter().any(|r| !r.errors.is_empty()) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// What `cgsentry release` prints.
#[must_use]
pub fn released_text(r: &Released) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if r.reports.is_empty() {
        let _ = writeln!(o, "{}: ladder reset (nothing was applied yet)", r.cgroup);
    }
    for rep in &r.reports {
        let _ = writeln!(o, "{} (rule {:?}): {}", rep.cgroup, rep.rule, rep.done);
        for e in &rep.errors {
            let _ = writeln!(o, "  failed: {e}");
        }
    }
    if r.hold_off_sec > 0 {
        let _ = writeln!(
            o,
            "{}: held off for {}: findings are still reported, no ladder starts on it until \
             then (`cgsentry release {} --hold-off 0` lifts it)",
            r.cgroup,
            humantime::format_duration(Duration::from_secs(r.hold_off_sec)),
            r.cgroup
        );
    } else {
        let _ = writeln!(
            o,
            "{}: not held off: a finding still present starts its ladder again",
            r.cgroup
        );
    }
    o
}

/// `cgsentry status` as text.
#[must_use]
pub fn status_text(s: &Status, now_ms: u128) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let age = |ms: u128| format!("{:.1} s ago", now_ms.saturating_sub(ms) as f64 / 1000.0);
    let _ = writeln!(
        o,
        "cgsentry {} (pid {}), up {:.0} s",
        s.version,
        s.pid,
        now_ms.saturating_sub(s.started_ms) as f64 / 1000.0
    );
    let _ = writeln!(
        o,
        "ticks: {} every {} ms, last {} taking {:.1} ms; agent RSS {} MiB",
        s.ticks,
        s.interval_ms,
        age(s.last_tick_ms),
        s.tick_seconds * 1000.0,
        s.rss_bytes >> 20
    );
    let _ = writeln!(
        o,
        "policy: {} rule(s), {} protect entr(ies) from {} file(s){}",
        s.rules,
        s.protect,
        s.policy_files.len(),
        if s.dry_run {
            ", DRY RUN (nothing is done)"
        } else {
            ""
        }
    );
    for f in &s.policy_files {
        let _ = writeln!(o, "  {}", f.display());
    }
    for e in &s.policy_errors {
        let _ = writeln!(o, "  policy error (last good set in force): {e}");
    }
    let _ = writeln!(
        o,
        "eBPF: {} dropped; kernel OOM victims since start: {}; GPU: {}",
        s.ebpf_dropped, s.kernel_oom_victims, s.gpu
    );
    let off = |v: &Option<String>| v.clone().unwrap_or_else(|| "off".into());
    let _ = writeln!(
        o,
        "event log: {}; metrics: {}; history: {}",
        off(&s.event_log),
        off(&s.metrics),
        off(&s.history_file)
    );
    let _ = writeln!(
        o,
        "notifications: {} sent, {} failed, {} held back by rate limits",
        s.notifications_sent, s.notifications_failed, s.notifications_suppressed
    );
    if !s.never_act.is_empty() {
        let _ = writeln!(o, "never acted on, whatever a policy says:");
        for (cgroup, why) in &s.never_act {
            let _ = writeln!(o, "  {cgroup}: {why}");
        }
    }
    let _ = writeln!(o, "findings now: {}", s.findings);
    actions_text(&mut o, s, now_ms);
    o
}

/// `status`'s active actions and hold-offs.
fn actions_text(o: &mut String, s: &Status, now_ms: u128) {
    use std::fmt::Write as _;
    let age = |ms: u128| format!("{:.1} s ago", now_ms.saturating_sub(ms) as f64 / 1000.0);
    if s.active.is_empty() {
        let _ = writeln!(o, "active actions: none");
    } else {
        let _ = writeln!(o, "active actions ({}):", s.active.len());
        for a in &s.active {
            let mut what = vec![format!(
                "{} step(s) of rule {:?} ({})",
                a.steps_taken, a.rule, a.finding
            )];
            if let Some(f) = &a.frozen {
                what.push(format!("frozen {f}"));
            }
            if let Some(q) = &a.quarantine {
                what.push(format!("quarantined in {q}"));
            }
            if !a.limits.is_empty() {
                what.push(format!("limits {}", a.limits.join(", ")));
            }
            if a.relaxed {
                what.push("relaxed".into());
            }
            if a.dry_run {
                what.push("dry run".into());
            }
            let _ = writeln!(
                o,
                "  {}: {} (since {}) — `cgsentry release {}` undoes it",
                crate::report::printable(&a.cgroup),
                what.join("; "),
                age(a.updated_ms),
                a.cgroup
            );
        }
    }
    for h in &s.held_off {
        let _ = writeln!(
            o,
            "held off by the operator: {} for {:.0} s more (findings reported, no ladder) — \
             `cgsentry release {} --hold-off 0` lifts it",
            crate::report::printable(&h.cgroup),
            h.seconds_left,
            h.cgroup
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(
        dir: &Path,
    ) -> (
        std::path::PathBuf,
        SharedRef,
        mpsc::Receiver<ReleaseRequest>,
    ) {
        let path = dir.join("c.sock");
        let listener = bind(&path).unwrap();
        let shared = SharedRef::default();
        shared.write().unwrap().status.version = "9.9".into();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, shared.clone(), tx));
        (path, shared, rx)
    }

    /// Status, a release carried out by "the loop", a bad request; mode 0600.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _shared, mut rx) = agent(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let p = path.clone();
        let status = tokio::task::spawn_blocking(move || request(&p, &Request::Status))
            .await
            .unwrap();
        assert_eq!(status.unwrap()["version"], "9.9");

        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let answer = match r.cgroup.as_deref() {
                    Some("/x") | None => Ok(Released {
                        cgroup: r.cgroup.unwrap_or_else(|| "(all)".into()),
                        reports: Vec::new(),
                        hold_off_sec: r.hold_off_sec,
                    }),
                    Some(other) => Err(format!("nothing applied to {other}")),
                };
                let _ = r.reply.send(answer);
            }
        });
        let p = path.clone();
        let (ok, err) = tokio::task::spawn_blocking(move || {
            (
                request(
                    &p,
                    &Request::Release {
                        cgroup: "/x".into(),
                        hold_off_sec: 600,
                    },
                ),
                request(
                    &p,
                    &Request::Release {
                        cgroup: "/y".into(),
                        hold_off_sec: 0,
                    },
                ),
            )
        })
        .await
        .unwrap();
        let p = path.clone();
        let all = tokio::task::spawn_blocking(move || {
            request(&p, &Request::ReleaseAll { hold_off_sec: 60 })
        })
        .await
        .unwrap();
        let all: Released = serde_json::from_value(all.unwrap()).unwrap();
        assert_eq!((all.cgroup.as_str(), all.hold_off_sec), ("(all)", 60));
        // The hold-off reaches the loop.
        let ok: Released = serde_json::from_value(ok.unwrap()).unwrap();
        assert_eq!((ok.cgroup.as_str(), ok.hold_off_sec), ("/x", 600));
        assert!(
            released_text(&ok).contains("/x: held off for 10m"),
            "{}",
            released_text(&ok)
        );
        assert_eq!(err.unwrap_err(), "nothing applied to /y");

        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"cmd\":\"reboot\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
    }

    /// A second agent on the same socket is refused; a stale socket is replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_agent_per_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _s, _rx) = agent(dir.path());
        let p = path.clone();
        let second = tokio::task::spawn_blocking(move || bind(&p).map(|_| ()))
            .await
            .unwrap();
        assert!(second.unwrap_err().contains("another agent"));
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(bind(&stale).is_ok());
    }

    /// A process that is not root is refused, even with the socket's mode opened up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_non_root_peer_is_refused() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test needs root (to become another user); CI runs as root"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (path, _s, _rx) = agent(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let answer = ask_as_nobody(&path);
        assert!(
            answer.contains("refused: uid 65534 is not root"),
            "{answer}"
        );
        // Root is answered.
        let p = path.clone();
        assert!(
            tokio::task::spawn_blocking(move || request(&p, &Request::Status))
                .await
                .unwrap()
                .is_ok()
        );
    }

    /// Forks a child that drops to uid/gid 65534 and sends a status request; returns
    /// what it read. Only raw syscalls in the child (this process has threads).
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss,
        reason = "raw syscalls in a forked child: sizes of a sockaddr and a 512-byte buffer"
    )]
    fn ask_as_nobody(path: &Path) -> String {
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        use std::os::unix::ffi::OsStrExt as _;
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let request = b"{\"cmd\":\"status\"}\n";
        // SAFETY: the child only makes async-signal-safe calls and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => unsafe {
                let out = wr.as_raw_fd();
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    libc::_exit(2);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                    libc::write(out, b"connect failed".as_ptr().cast(), 14);
                    libc::_exit(3);
                }
                libc::write(fd, request.as_ptr().cast(), request.len());
                let mut buf = [0u8; 512];
                loop {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n <= 0 {
                        break;
                    }
                    libc::write(out, buf.as_ptr().cast(), n as usize);
                }
                libc::_exit(0);
            },
            nix::unistd::ForkResult::Parent { child } => {
                drop(wr);
                let mut text = String::new();
                std::fs::File::from(rd).read_to_string(&mut text).unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                text
            }
        }
    }

    #[test]
    fn status_reads_well() {
        let s = Status {
            version: "0.1.0".into(),
            pid: 42,
            started_ms: 1000,
            ticks: 10,
            last_tick_ms: 10_000,
            interval_ms: 1000,
            rules: 3,
            active: vec![Active {
                cgroup: "/pool".into(),
                rule: "explosion".into(),
                finding: "explosion".into(),
                steps_taken: 1,
                limits: vec!["/pool/pids.max".into()],
                updated_ms: 9000,
                ..Active::default()
            }],
            held_off: vec![HeldOff {
                cgroup: "/train".into(),
                seconds_left: 59.6,
            }],
            ..Status::default()
        };
        let t = status_text(&s, 11_000);
        assert!(
            t.contains("held off by the operator: /train for 60 s more"),
            "{t}"
        );
        assert!(t.contains("pid 42"), "{t}");
        assert!(t.contains("/pool: 1 step(s) of rule \"explosion\""), "{t}");
        assert!(t.contains("`cgsentry release /pool`"), "{t}");
        assert!(t.contains("last 1.0 s ago"), "{t}");
    }
}

/// The shipped deployment files (`xtask/deploy/`) say what the agent understands.
#[cfg(test)]
mod deploy_tests {
    use std::path::Path;

    const DAEMONSET: &str = include_str!("../../xtask/deploy/kubernetes/daemonset.yaml");
    const MAIN: &str = include_str!("../../xtask/deploy/cgsentry.toml");

    /// The `DaemonSet`: valid YAML, privileged with host PID, the host's cgroup, bpf and
    /// trace filesystems mounted, policies from a `ConfigMap` that parse as policies, and
    /// agent arguments this binary accepts.
    #[test]
    fn daemonset_manifest() {
        use yaml_rust2::{Yaml, YamlLoader};
        let docs = YamlLoader::load_from_str(DAEMONSET).expect("valid YAML");
        let kind = |k: &str| {
            docs.iter()
                .find(|d| d["kind"].as_str() == Some(k))
                .unwrap_or_else(|| panic!("no {k}"))
        };
        let ds = kind("DaemonSet");
        assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!(spec["hostPID"].as_bool(), Some(true));
        let c = &spec["containers"][0];
        assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        for want in [
            "/sys/fs/cgroup",
            "/sys/fs/bpf",
            "/sys/kernel/tracing",
            "/etc/cgsentry",
        ] {
            assert!(mounts.contains(&want), "{want} not mounted: {mounts:?}");
        }
        let volumes = spec["volumes"].as_vec().unwrap();
        let host = |p: &str| {
            volumes
                .iter()
                .any(|v| v["hostPath"]["path"].as_str() == Some(p))
        };
        assert!(host("/sys/fs/cgroup") && host("/sys/fs/bpf") && host("/sys/kernel/tracing"));
        assert!(
            volumes
                .iter()
                .any(|v| v["configMap"]["name"].as_str() == Some("cgsentry-policies"))
        );
        // Arguments: what the binary's parser accepts.
        let mut argv = vec!["cgsentry".to_owned()];
        argv.extend(
            c["args"]
                .as_vec()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        );
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(&argv)
            .expect("args the agent accepts");
        assert!(matches!(cli.command, crate::cli::Command::Run(_)));
        // The ConfigMap's files parse.
        let data = &kind("ConfigMap")["data"];
        let Yaml::Hash(files) = data else {
            panic!("no data")
        };
        for (name, text) in files {
            let (name, text) = (name.as_str().unwrap(), text.as_str().unwrap());
            if name == "cgsentry.toml" {
                crate::policy::parse_main(Path::new(name), text).unwrap();
            } else {
                let (protect, rules) = crate::policy::parse_policy_file(Path::new(name), text)
                    .unwrap_or_else(|e| panic!("{e:?}"));
                assert!(!protect.is_empty() && !rules.is_empty());
            }
        }
    }

    #[test]
    fn shipped_main_file_parses() {
        let main =
            crate::policy::parse_main(Path::new("/etc/cgsentry/cgsentry.toml"), MAIN).unwrap();
        assert_eq!(main.notify, crate::notify::NotifyConfig::default());
        assert_eq!(main.policies_dir, Path::new("/etc/cgsentry/policies.d"));
    }
}
