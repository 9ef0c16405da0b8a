//! Notifications: a webhook (JSON `POST`), desktop notifications for logged-in users,
//! and a per-rule `exec` hook — for decisions, releases and failed actions.
//!
//! The control loop never waits for any of them: it hands a job to a bounded queue
//! ([`QUEUE`]) served by worker threads (one for the webhook, one for desktop and exec,
//! so a dead webhook server does not hold back a hook), and drops (and counts) what does
//! not fit. Rate limits, applied in the loop: one message per cgroup, rule and event
//! kind per `min_interval_sec`, and `max_per_minute` in all; what was held back is
//! counted in the next message that gets through (`suppressed`).
use std::{
    collections::HashMap,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Jobs waiting per worker; more are dropped (and counted as suppressed).
pub const QUEUE: usize = 64;
/// An `exec` hook still running after this is killed.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// `[notify]` in the main file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// `http://` or `https://` URL the JSON is posted to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Per attempt (connect + send + answer).
    pub webhook_timeout_sec: u64,
    /// Attempts after the first, with a doubling backoff from 1 s.
    pub webhook_retries: u32,
    /// A desktop notification to every user with a session bus (`notify-send`).
    pub desktop: bool,
    /// One message per cgroup, rule and event kind in this many seconds.
    pub min_interval_sec: u64,
    /// At most this many messages a minute, all together.
    pub max_per_minute: u32,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            webhook: None,
            webhook_timeout_sec: 5,
            webhook_retries: 3,
            desktop: false,
            min_interval_sec: 60,
            max_per_minute: 20,
        }
    }
}

impl NotifyConfig {
    /// Problems with the values, for `cgsentry check`.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(url) = &self.webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            p.push(format!(
                "webhook {url:?} must start with http:// or https://"
            ));
        }
        if self.webhook_timeout_sec == 0 || self.webhook_timeout_sec > 60 {
            p.push("webhook_timeout_sec must be 1 to 60".into());
        }
        if self.webhook_retries > 10 {
            p.push("webhook_retries must be at most 10".into());
        }
        if self.max_per_minute == 0 {
            p.push("max_per_minute must be at least 1".into());
        }
        p
    }
}

/// What is sent (the webhook's JSON body, the hook's stdin).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `decision`, `release` or `action_failed`.
    pub event: String,
    pub host: String,
    /// Unix ms.
    pub ts_ms: u128,
    pub cgroup: String,
    pub rule: String,
    /// The ladder step's action (`notify`, `throttle`, …) or the release stage.
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finding: Option<String>,
    /// One line for people.
    pub summary: String,
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "crate::identity::Identity::is_empty")]
    pub identity: crate::identity::Identity,
    /// Messages for the same cgroup, rule and event held back since the last one.
    pub suppressed: u64,
}

impl Message {
    fn title(&self) -> String {
        format!(
            "cgsentry: {} {} on {}",
            self.event, self.action, self.cgroup
        )
    }
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub suppressed: AtomicU64,
}

enum Job {
    Webhook {
        url: String,
        body: String,
        timeout: Duration,
        retries: u32,
    },
    Desktop {
        title: String,
        body: String,
    },
    Exec {
        argv: Vec<String>,
        message: Box<Message>,
    },
}

/// (cgroup, rule, event).
type RateKey = (String, String, String);
/// When one was last sent, how many held back since, when the key was last seen.
type RateState = (Option<Instant>, u64, Instant);

/// Rate-limit keys kept at most (one per cgroup, rule and event).
const MAX_KEYS: usize = 4096;

/// The loop's side: rate limits and queues.
pub struct Notifier {
    webhook_tx: SyncSender<Job>,
    local_tx: SyncSender<Job>,
    /// Per (cgroup, rule, event): when one was last sent, how many held back since,
    /// and when the key was last seen (sent or held back).
    last: HashMap<RateKey, RateState>,
    minute: std::collections::VecDeque<Instant>,
    pub stats: Arc<Stats>,
    host: String,
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

impl Default for Notifier {
    fn default() -> Self {
        Self::start()
    }
}

impl Notifier {
    /// Starts the two worker threads.
    #[must_use]
    pub fn start() -> Self {
        let stats = Arc::new(Stats::default());
        let (webhook_tx, rx) = sync_channel(QUEUE);
        spawn_worker("cgsentry-webhook", rx, stats.clone());
        let (local_tx, rx) = sync_channel(QUEUE);
        spawn_worker("cgsentry-notify", rx, stats.clone());
        Self {
            webhook_tx,
            local_tx,
            last: HashMap::new(),
            minute: std::collections::VecDeque::new(),
            stats,
            host: host_name(),
        }
    }

    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Rate limits: `Some(suppressed before this one)` when `m` may go now.
    fn admit(&mut self, cfg: &NotifyConfig, m: &Message, now: Instant) -> Option<u64> {
        let key = (m.cgroup.clone(), m.rule.clone(), m.event.clone());
        let min = Duration::from_secs(cfg.min_interval_sec);
        while self
            .minute
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_mins(1))
        {
            self.minute.pop_front();
        }
        if self.last.len() > MAX_KEYS {
            self.prune(now, min);
        }
        let (last_sent, held, _) = self.last.get(&key).copied().unwrap_or((None, 0, now));
        let too_soon = last_sent.is_some_and(|t| now.duration_since(t) < min);
        let over_cap = self.minute.len() >= cfg.max_per_minute as usize;
        if too_soon || over_cap {
            self.last.insert(key, (last_sent, held + 1, now));
            self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.last.insert(key, (Some(now), 0, now));
        self.minute.push_back(now);
        Some(held)
    }

    /// Cgroups come and go by the thousand: keys not seen for a rate-limit interval are
    /// forgotten (their held-back count with them: nothing would report it), and if a
    /// burst of new keys still exceeds the bound, the oldest go.
    fn prune(&mut self, now: Instant, min: Duration) {
        self.last
            .retain(|_, (_, _, seen)| now.duration_since(*seen) < min);
        if self.last.len() > MAX_KEYS {
            let mut seen: Vec<Instant> = self.last.values().map(|v| v.2).collect();
            seen.sort_unstable();
            let cut = seen[self.last.len() - MAX_KEYS / 2];
            self.last.retain(|_, (_, _, s)| *s >= cut);
        }
    }

    /// Rate-limit keys kept (for tests: bounded whatever the churn).
    #[must_use]
    pub fn keys(&self) -> usize {
        self.last.len()
    }

    fn queue(&self, tx: &SyncSender<Job>, job: Job) {
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
                debug!("notification queue full: dropped");
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends `m` on every configured channel (and `exec`, the rule's hook), unless rate
    /// limited. Never blocks.
    pub fn send(&mut self, cfg: &NotifyConfig, exec: Option<&[String]>, mut m: Message) {
        let wanted = cfg.webhook.is_some() || cfg.desktop || exec.is_some();
        if !wanted {
            return;
        }
        let Some(suppressed) = self.admit(cfg, &m, Instant::now()) else {
            return;
        };
        m.suppressed = suppressed;
        if let Some(url) = &cfg.webhook {
            match serde_json::to_string(&m) {
                Ok(body) => self.queue(
                    &self.webhook_tx,
                    Job::Webhook {
                        url: url.clone(),
                        body,
                        timeout: Duration::from_secs(cfg.webhook_timeout_sec),
                        retries: cfg.webhook_retries,
                    },
                ),
                Err(e) => warn!("notification not encoded: {e}"),
            }
        }
        if cfg.desktop {
            self.queue(
                &self.local_tx,
                Job::Desktop {
                    title: m.title(),
                    body: m.summary.clone(),
                },
            );
        }
        if let Some(argv) = exec {
            self.queue(
                &self.local_tx,
                Job::Exec {
                    argv: argv.to_vec(),
                    message: Box::new(m),
                },
            );
        }
    }
}

fn spawn_worker(name: &str, rx: Receiver<Job>, stats: Arc<Stats>) {
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for job in rx {
                let ok = match job {
                    Job::Webhook {
                        url,
                        body,
                        timeout,
                        retries,
                    } => post(&url, &body, timeout, retries),
                    Job::Desktop { title, body } => desktop(&title, &body),
                    Job::Exec { argv, message } => exec_hook(&argv, &message, EXEC_TIMEOUT),
                };
                let counter = if ok { &stats.sent } else { &stats.failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        warn!("notifications off: cannot start a worker thread: {e}");
    }
}

/// POSTs `body`, retrying with a doubling backoff from 1 s; true once answered 2xx.
pub fn post(url: &str, body: &str, timeout: Duration, retries: u32) -> bool {
    let agent = ureq::AgentBuilder::new()
        .timeout(timeout)
        .user_agent(concat!("cgsentry/", env!("CARGO_PKG_VERSION")))
        .build();
    let mut backoff = Duration::from_secs(1);
    for attempt in 0..=retries {
        match agent
            .post(url)
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(_) => return true,
            Err(e) => {
                let last = attempt == retries;
                if last {
                    warn!(
                        "webhook {url}: {e} (gave up after {} attempt(s))",
                        attempt + 1
                    );
                } else {
                    debug!("webhook {url}: {e}; again in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
            }
        }
    }
    false
}

/// Users with a session bus: `(uid, name, bus address)`.
#[must_use]
pub fn session_buses(run_user: &Path) -> Vec<(u32, String, String)> {
    let Ok(dir) = std::fs::read_dir(run_user) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, String, String)> = dir
        .flatten()
        .filter_map(|e| {
            let uid: u32 = e.file_name().to_str()?.parse().ok()?;
            let bus = e.path().join("bus");
            bus.exists().then_some(())?;
            let name = nix::unistd::User::from_uid(uid.into()).ok()??.name;
            Some((uid, name, format!("unix:path={}", bus.display())))
        })
        .collect();
    out.sort();
    out
}

/// The command showing one desktop notification to `user` on `bus`.
#[must_use]
pub fn desktop_command(user: &str, bus: &str, title: &str, body: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args([
        "-u",
        user,
        "--",
        "notify-send",
        "--app-name=cgsentry",
        "--urgency=critical",
        title,
        body,
    ])
    .env("DBUS_SESSION_BUS_ADDRESS", bus)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn desktop(title: &str, body: &str) -> bool {
    let sessions = session_buses(Path::new("/run/user"));
    if sessions.is_empty() {
        debug!("desktop notification: no session bus");
        return true;
    }
    let mut ok = true;
    for (_, user, bus) in sessions {
        match run_with_timeout(
            desktop_command(&user, &bus, title, body),
            None,
            EXEC_TIMEOUT,
        ) {
            Ok(()) => {}
            Err(e) => {
                ok = false;
                warn!("desktop notification to {user}: {e}");
            }
        }
    }
    ok
}

/// Runs `command`, writing `stdin`, killing it after `timeout`.
///
/// # Errors
/// It could not start, exited non-zero (with the start of its stderr), or ran too long.
pub fn run_with_timeout(
    mut command: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), String> {
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().map_err(|e| format!("cannot start: {e}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A hook that does not read its stdin is fine.
        let _ = pipe.write_all(data);
    }
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.by_ref().take(1024).read_to_string(&mut err);
                }
                return Err(format!("{status}: {}", err.trim()));
            }
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {timeout:?}: killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The rule's hook: `argv` with the message as JSON on stdin and in `CGSENTRY_*`
/// variables.
#[must_use]
pub fn hook_command(argv: &[String], m: &Message) -> Option<Command> {
    let (program, rest) = argv.split_first()?;
    let mut c = Command::new(program);
    c.args(rest)
        .env("CGSENTRY_EVENT", &m.event)
        .env("CGSENTRY_CGROUP", &m.cgroup)
        .env("CGSENTRY_RULE", &m.rule)
        .env("CGSENTRY_ACTION", &m.action)
        .env("CGSENTRY_FINDING", m.finding.as_deref().unwrap_or(""))
        .env("CGSENTRY_SUMMARY", &m.summary)
        .env("CGSENTRY_DRY_RUN", if m.dry_run { "1" } else { "0" })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in m.identity.labels() {
        c.env(format!("CGSENTRY_{}", k.to_ascii_uppercase()), v);
    }
    Some(c)
}

fn exec_hook(argv: &[String], m: &Message, timeout: Duration) -> bool {
    let Some(command) = hook_command(argv, m) else {
        return false;
    };
    let stdin = serde_json::to_vec(m).unwrap_or_default();
    match run_with_timeout(command, Some(&stdin), timeout) {
        Ok(()) => {
            info!(hook = %argv[0], cgroup = %m.cgroup, "exec hook ran");
            true
        }
        Err(e) => {
            warn!(hook = %argv[0], cgroup = %m.cgroup, "exec hook failed: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(cgroup: &str) -> Message {
        Message {
            event: "decision".into(),
            host: "h".into(),
            ts_ms: 1,
            cgroup: cgroup.into(),
            rule: "r".into(),
            action: "throttle".into(),
            finding: Some("leak".into()),
            summary: "growing 10 MiB/s".into(),
            dry_run: false,
            identity: crate::identity::Identity::default(),
            suppressed: 0,
        }
    }

    /// 100,000 cgroups come and go, each held back once: the keys stay bounded.
    #[test]
    fn rate_limit_keys_stay_bounded_under_churn() {
        let mut n = Notifier::start();
        let cfg = NotifyConfig {
            min_interval_sec: 60,
            max_per_minute: 0,
            ..NotifyConfig::default()
        };
        let t0 = Instant::now();
        for i in 0..100_000u64 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(n.admit(&cfg, &message(&format!("/ci/job-{i}")), at), None);
            assert!(n.keys() <= MAX_KEYS + 1, "{} keys at {i}", n.keys());
        }
    }

    /// One per key per interval; the overall cap; held-back messages counted in the
    /// next one that goes.
    #[test]
    fn rate_limits() {
        let mut n = Notifier::start();
        let cfg = NotifyConfig {
            min_interval_sec: 60,
            max_per_minute: 3,
            ..NotifyConfig::default()
        };
        let t0 = Instant::now();
        assert_eq!(n.admit(&cfg, &message("/a"), t0), Some(0));
        assert_eq!(
            n.admit(&cfg, &message("/a"), t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            n.admit(&cfg, &message("/a"), t0 + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            n.admit(&cfg, &message("/b"), t0 + Duration::from_secs(3)),
            Some(0)
        );
        assert_eq!(
            n.admit(&cfg, &message("/c"), t0 + Duration::from_secs(4)),
            Some(0)
        );
        // Overall cap of 3 a minute reached.
        assert_eq!(
            n.admit(&cfg, &message("/d"), t0 + Duration::from_secs(5)),
            None
        );
        // A minute on: /a goes again, telling of the two held back.
        assert_eq!(
            n.admit(&cfg, &message("/a"), t0 + Duration::from_secs(61)),
            Some(2)
        );
        // /d, held by the cap only, goes as soon as the cap allows.
        assert_eq!(
            n.admit(&cfg, &message("/d"), t0 + Duration::from_secs(64)),
            Some(1)
        );
        assert_eq!(n.stats.suppressed.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn config_problems() {
        assert!(NotifyConfig::default().problems().is_empty());
        let bad = NotifyConfig {
            webhook: Some("ftp://x".into()),
            webhook_timeout_sec: 0,
            max_per_minute: 0,
            ..NotifyConfig::default()
        };
        assert_eq!(bad.problems().len(), 3, "{:?}", bad.problems());
    }

    /// The hook gets the message on stdin and in its environment; a hook that hangs is
    /// killed at the timeout; a failing one reports its stderr.
    #[test]
    fn exec_hook_environment_stdin_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$CGSENTRY_EVENT $CGSENTRY_CGROUP $CGSENTRY_ACTION $CGSENTRY_FINDING\" > {0}; cat >> {0}",
            out.display()
        );
        let argv: Vec<String> = ["/bin/sh", "-c", &script].map(Into::into).to_vec();
        assert!(exec_hook(&argv, &message("/x"), Duration::from_secs(5)));
        let text = std::fs::read_to_string(&out).unwrap();
        let (first, json) = text.split_once('\n').unwrap();
        assert_eq!(first, "decision /x throttle leak");
        let back: Message = serde_json::from_str(json).unwrap();
        assert_eq!(back, message("/x"));

        let hang: Vec<String> = ["/bin/sleep", "30"].map(Into::into).to_vec();
        let t = Instant::now();
        assert!(!exec_hook(
            &hang,
            &message("/x"),
            Duration::from_millis(300)
        ));
        assert!(t.elapsed() < Duration::from_secs(5));

        let cmd = hook_command(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo nope >&2; exit 3".into(),
            ],
            &message("/x"),
        )
        .unwrap();
        let err = run_with_timeout(cmd, None, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("nope") && err.contains('3'), "{err}");
    }

    #[test]
    fn desktop_command_runs_as_the_user_on_their_bus() {
        let c = desktop_command("alice", "unix:path=/run/user/1000/bus", "t", "b");
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "runuser");
        assert_eq!(args[..4], ["-u", "alice", "--", "notify-send"]);
        assert_eq!(args[args.len() - 2..], ["t", "b"]);
        let env: Vec<_> = c.get_envs().collect();
        assert_eq!(env.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        assert!(session_buses(dir.path()).is_empty());
        std::fs::create_dir(dir.path().join("0")).unwrap();
        std::fs::write(dir.path().join("0/bus"), "").unwrap();
        std::fs::create_dir(dir.path().join("4242")).unwrap(); // no bus
        let found = session_buses(dir.path());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].0, found[0].1.as_str()), (0, "root"));
    }
}
