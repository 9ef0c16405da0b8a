//! The event log: one JSON object per line (`/var/log/cgsentry/events.jsonl`), so that an
//! incident can be reconstructed afterwards with `jq` — what was found (with its
//! evidence), what was decided and why, what was done or failed, what was released, and
//! when the policy changed.
//!
//! Every line has `ts` (RFC 3339, UTC), `ts_ms` (Unix ms), `event` and the event's own
//! fields. The file is rotated by size, like logrotate's `size` + `rotate N` would:
//! `events.jsonl` → `events.jsonl.1` → … → `events.jsonl.N` (the oldest dropped).
//! Rotation is done here rather than by logrotate so the agent's file descriptor never
//! points at a moved file, and so a box without logrotate (a container) is covered too.
//!
//! Writing never stops the agent: a failure is logged once (and again once it works).
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tracing::{info, warn};

pub const DEFAULT_PATH: &str = "/var/log/cgsentry/events.jsonl";
pub const DEFAULT_MAX_MIB: u64 = 20;
pub const DEFAULT_KEEP: u32 = 5;

/// Where and how big.
#[derive(Clone, Debug)]
pub struct EventLogConfig {
    pub path: PathBuf,
    /// Rotate once the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`.1` … `.keep`).
    pub keep: u32,
}

#[derive(Debug)]
pub struct EventLog {
    cfg: EventLogConfig,
    file: Option<File>,
    size: u64,
    failing: bool,
    /// Lines written since start (for the agent's self-metrics).
    pub written: u64,
    /// Lines that could not be written.
    pub failed: u64,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    ts: String,
    ts_ms: u128,
    event: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

/// RFC 3339 UTC with milliseconds for a Unix time in ms.
#[must_use]
pub fn rfc3339(ms: u128) -> String {
    let secs = u64::try_from(ms / 1000).unwrap_or(u64::MAX);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    // humantime prints `2026-11-23T12:00:00Z`; add the milliseconds before the `Z`.
    let s = humantime::format_rfc3339_seconds(t).to_string();
    format!("{}.{:03}Z", s.trim_end_matches('Z'), ms % 1000)
}

#[must_use]
pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl EventLog {
    /// Opens (creating the directory, mode 0750) or reports why not, once; the agent runs on.
    #[must_use]
    pub fn open(cfg: EventLogConfig) -> Self {
        let mut log = Self {
            cfg,
            file: None,
            size: 0,
            failing: false,
            written: 0,
            failed: 0,
        };
        if let Err(e) = log.reopen() {
            log.fail(&e);
        }
        log
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        if let Some(dir) = self.cfg.path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.cfg.path)?;
        self.size = f.metadata()?.len();
        self.file = Some(f);
        Ok(())
    }

    fn fail(&mut self, e: &std::io::Error) {
        self.failed += 1;
        if !self.failing {
            warn!(
                "event log {}: {e} (events are still logged to stderr)",
                self.cfg.path.display()
            );
            self.failing = true;
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let name = |i: u32| {
            let mut p = self.cfg.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.cfg.keep == 0 {
            std::fs::remove_file(&self.cfg.path)?;
        } else {
            for i in (1..self.cfg.keep).rev() {
                match std::fs::rename(name(i), name(i + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.cfg.path, name(1))?;
        }
        self.reopen()
    }

    /// Appends one event.
    ///
    /// # Panics
    /// Never: the file is opened just before it is written.
    pub fn record<T: Serialize>(&mut self, event: &str, body: &T) {
        let ms = now_ms();
        let line = Line {
            ts: rfc3339(ms),
            ts_ms: ms,
            event,
            body,
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(t) => t,
            Err(e) => {
                warn!("event {event} not logged: {e}");
                return;
            }
        };
        text.push('\n');
        let result = (|| {
            if self.file.is_none() {
                self.reopen()?;
            }
            if self.size > 0 && self.size + text.len() as u64 > self.cfg.max_bytes {
                self.rotate()?;
            }
            let f = self.file.as_mut().expect("opened above");
            f.write_all(text.as_bytes())?;
            self.size += text.len() as u64;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.written += 1;
                if self.failing {
                    info!("event log {} writable again", self.cfg.path.display());
                    self.failing = false;
                }
            }
            Err(e) => {
                self.file = None;
                self.fail(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn lines_are_json_with_time_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/events.jsonl");
        let mut log = EventLog::open(EventLogConfig {
            path: path.clone(),
            max_bytes: 1 << 20,
            keep: 2,
        });
        log.record(
            "decision",
            &serde_json::json!({"cgroup": "/a", "rule": "r"}),
        );
        log.record(
            "action",
            &serde_json::json!({"cgroup": "/a", "done": "froze"}),
        );
        let l = lines(&path);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0]["event"], "decision");
        assert_eq!(l[0]["cgroup"], "/a");
        assert_eq!(l[1]["done"], "froze");
        let ts = l[0]["ts"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        assert!(l[0]["ts_ms"].as_u64().unwrap() > 1_700_000_000_000);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        ) & 0o777;
        assert_eq!(mode, 0o640);
    }

    /// Rotation by size keeps `keep` old files, oldest dropped, and loses no line in
    /// between.
    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut log = EventLog::open(EventLogConfig {
            path: path.clone(),
            max_bytes: 400,
            keep: 2,
        });
        for i in 0..40 {
            log.record("finding", &serde_json::json!({ "n": i }));
        }
        assert_eq!(log.written, 40);
        let mut all = Vec::new();
        for p in [
            path.with_extension("jsonl.2"),
            path.with_extension("jsonl.1"),
            path.clone(),
        ] {
            assert!(
                std::fs::metadata(&p).unwrap().len() <= 400,
                "{}",
                p.display()
            );
            all.extend(lines(&p).into_iter().map(|v| v["n"].as_u64().unwrap()));
        }
        assert!(!path.with_extension("jsonl.3").exists());
        // The newest lines, in order, with no gap.
        let first = all[0];
        assert_eq!(all, (first..40).collect::<Vec<_>>());
        assert!(first > 0, "older files were dropped");
    }

    /// An unwritable place is reported, counted, and retried on the next event.
    #[test]
    fn an_unwritable_log_does_not_stop_anything() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let mut log = EventLog::open(EventLogConfig {
            path: blocker.join("events.jsonl"),
            max_bytes: 1000,
            keep: 1,
        });
        log.record("x", &serde_json::json!({}));
        assert_eq!((log.written, log.failed), (0, 2));
    }

    #[test]
    fn time_format() {
        assert_eq!(
            rfc3339(1_795_435_200_123),
            "2026-11-23T12:00:00.123Z".to_owned()
        );
    }
}
