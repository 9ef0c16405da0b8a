//! What policies match processes on, read so that no unprivileged user can forge it,
//! and without ever stalling the loop.
//!
//! - The real uid comes from `/proc/PID/status` (`Uid:`'s first field). The owner of
//!   `/proc/PID` is not it: a process that makes itself non-dumpable (`PR_SET_DUMPABLE`
//!   0) has a `/proc/PID` owned by root.
//! - The executable is `/proc/PID/exe` (a path the process cannot choose without being
//!   that program); `comm` is what the process calls itself (`prctl(PR_SET_NAME)`) and
//!   proves nothing.
//! - User names come from NSS, which may be LDAP or SSSD and may hang: [`UserNames`]
//!   resolves them on a thread of its own; the loop only reads what is known. A name not
//!   known yet does not match (`uid = N` in a policy never needs NSS).
use std::{
    collections::HashMap,
    os::unix::ffi::OsStrExt as _,
    path::Path,
    sync::{
        Arc, Mutex,
        mpsc::{SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use tracing::warn;

/// The real uid of `pid` (`Uid:` in `/proc/PID/status`: real, effective, saved, fs).
#[must_use]
pub fn real_uid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    parse_real_uid(&status)
}

/// The real uid in a `/proc/PID/status` text.
#[must_use]
pub fn parse_real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One process as policies see it, read now from /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcFacts {
    pub pid: u32,
    /// `comm`, control characters escaped.
    pub comm: String,
    /// `/proc/PID/exe` as a [`crate::cgroupfs::path_text`]; `None` for kernel threads and
    /// when it cannot be read.
    pub exe: Option<String>,
    /// Real uid (`/proc/PID/status`).
    pub uid: Option<u32>,
    /// The uid's name, if [`UserNames`] knows it already.
    pub user: Option<String>,
}

impl ProcFacts {
    /// Reads `pid`; `None` once it has exited.
    #[must_use]
    pub fn read(proc_root: &Path, pid: u32, users: &UserNames) -> Option<Self> {
        let dir = proc_root.join(pid.to_string());
        let comm = std::fs::read(dir.join("comm")).ok()?;
        let comm = crate::events::comm_to_string(comm.strip_suffix(b"\n").unwrap_or(&comm));
        // A program replaced on disk since it started (a package upgrade) reads
        // "<path> (deleted)": it is still that program.
        let exe = std::fs::read_link(dir.join("exe")).ok().map(|p| {
            let b = p.as_os_str().as_bytes();
            crate::cgroupfs::path_text(b.strip_suffix(b" (deleted)").unwrap_or(b))
        });
        let uid = real_uid(proc_root, pid);
        Some(Self {
            pid,
            comm,
            exe,
            user: uid.and_then(|u| users.name(u)),
            uid,
        })
    }

    /// The view matchers take.
    #[must_use]
    pub fn as_ref(&self) -> crate::policy::ProcessRef<'_> {
        crate::policy::ProcessRef {
            comm: &self.comm,
            exe: self.exe.as_deref(),
            user: self.user.as_deref(),
            uid: self.uid,
        }
    }
}

/// How many processes of one finding's cgroup are read in one tick at most.
pub const MAX_PROCESSES: usize = 4096;

/// The processes of `cgroup` (and of every cgroup below it when `subtree`), read now;
/// `complete` is false when there were more than [`MAX_PROCESSES`] or a `cgroup.procs`
/// could not be read (a protect entry that needs all of them then cannot hold).
#[must_use]
pub fn read_cgroup(
    proc_root: &Path,
    cgroups: &crate::cgroupfs::CgroupReader,
    cgroup: &str,
    subtree: bool,
    users: &UserNames,
) -> (Vec<ProcFacts>, bool) {
    let mut out = Vec::new();
    let mut complete = true;
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        match cgroups.procs(&dir) {
            Ok(pids) => {
                for pid in pids {
                    if out.len() >= MAX_PROCESSES {
                        return (out, false);
                    }
                    // Gone since the read: nothing to match, nothing to protect.
                    out.extend(ProcFacts::read(proc_root, pid, users));
                }
            }
            Err(_) => complete = false,
        }
        if subtree && let Ok(entries) = std::fs::read_dir(cgroups.dir(&dir)) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = crate::cgroupfs::path_text(e.file_name().as_bytes());
                    dirs.push(format!("{}/{name}", dir.trim_end_matches('/')));
                }
            }
        }
    }
    (out, complete)
}

/// A lookup that has not answered after this long is reported (once).
const SLOW_LOOKUP: Duration = Duration::from_secs(5);

/// A uid NSS had no name for is asked about again after this long (NSS may have been
/// down at the first ask).
const RETRY_UNKNOWN: Duration = Duration::from_mins(5);
/// Names kept at most (user namespaces bring uids by the ten thousand).
const MAX_NAMES: usize = 8192;

/// uid → its name (`None`: none known yet, or none) and when that was learnt.
type Names = HashMap<u32, (Option<String>, Instant)>;

/// Uid → user name, resolved by NSS on a thread of its own. The loop asks and gets
/// what is known now; an unknown uid is queued and answered on a later tick. A lookup
/// that hangs (an LDAP server gone) stalls only that thread.
#[derive(Clone, Debug)]
pub struct UserNames {
    known: Arc<Mutex<Names>>,
    queue: Option<SyncSender<u32>>,
}

impl Default for UserNames {
    /// Resolves nothing: every name is unknown (tests, and where threads cannot start).
    fn default() -> Self {
        Self {
            known: Arc::default(),
            queue: None,
        }
    }
}

impl UserNames {
    /// Starts the resolver thread (`cgsentry-nss`). Without it (the thread cannot be
    /// started), names stay unknown and uids still match.
    #[must_use]
    pub fn start() -> Self {
        Self::with_lookup(|uid| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
    }

    /// The resolver with another lookup (tests: a slow or hanging NSS).
    #[must_use]
    pub fn with_lookup(lookup: impl Fn(u32) -> Option<String> + Send + 'static) -> Self {
        let known: Arc<Mutex<Names>> = Arc::default();
        let (tx, rx) = sync_channel::<u32>(256);
        let shared = known.clone();
        let spawned = std::thread::Builder::new()
            .name("cgsentry-nss".into())
            .spawn(move || {
                let mut warned = false;
                for uid in rx {
                    let started = Instant::now();
                    let name = lookup(uid);
                    if started.elapsed() >= SLOW_LOOKUP && !warned {
                        warn!(
                            uid,
                            seconds = started.elapsed().as_secs_f64(),
                            "user name lookup (NSS) is slow; policies' `user =` waits for it, `uid =` does not"
                        );
                        warned = true;
                    }
                    if let Ok(mut k) = shared.lock() {
                        k.insert(uid, (name, Instant::now()));
                    }
                }
            });
        match spawned {
            Ok(_) => Self {
                known,
                queue: Some(tx),
            },
            Err(e) => {
                warn!("user names will not be resolved: cannot start a thread: {e}");
                Self::default()
            }
        }
    }

    /// The name of `uid` if known; otherwise queues it (never blocks) and says `None`.
    /// A uid without a name is asked about again after [`RETRY_UNKNOWN`]; at most
    /// [`MAX_NAMES`] are kept (then they are forgotten and asked again as needed).
    #[must_use]
    pub fn name(&self, uid: u32) -> Option<String> {
        let Ok(mut known) = self.known.lock() else {
            return None;
        };
        match known.get(&uid) {
            Some((Some(name), _)) => return Some(name.clone()),
            Some((None, since)) if since.elapsed() < RETRY_UNKNOWN => return None,
            _ => {}
        }
        if known.len() >= MAX_NAMES {
            known.clear();
        }
        if let Some(q) = &self.queue {
            match q.try_send(uid) {
                // Pending: asked once, not again every tick.
                Ok(()) => {
                    known.insert(uid, (None, Instant::now()));
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {}
            }
        }
        None
    }

    /// Names kept (for tests: bounded).
    #[must_use]
    pub fn kept(&self) -> usize {
        self.known.lock().map_or(0, |k| k.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_uid_is_the_first_uid_field() {
        let status = "Name:\tsshd\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_real_uid(status), Some(1000));
        assert_eq!(parse_real_uid("Name:\tx\n"), None);
        // This test's own process.
        let me = real_uid(Path::new("/proc"), std::process::id()).unwrap();
        assert_eq!(me, nix::unistd::getuid().as_raw());
    }

    /// A lookup that hangs never blocks the asker: the name is unknown meanwhile, and
    /// other uids queued behind it wait without blocking either.
    #[test]
    fn a_hanging_lookup_never_blocks_the_loop() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let names = UserNames::with_lookup(move |uid| {
            if uid == 7 {
                let _ = wait.lock().unwrap().recv();
            }
            Some(format!("user{uid}"))
        });
        let started = Instant::now();
        assert_eq!(names.name(7), None);
        assert_eq!(names.name(8), None);
        for _ in 0..100 {
            assert_eq!(names.name(7), None);
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while names.name(8).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(names.name(7).as_deref(), Some("user7"));
        assert_eq!(names.name(8).as_deref(), Some("user8"));
    }

    /// 100,000 uids (user namespaces) keep the cache bounded.
    #[test]
    fn names_stay_bounded() {
        let names = UserNames::with_lookup(|uid| Some(format!("u{uid}")));
        for uid in 0..100_000 {
            let _ = names.name(uid);
            assert!(names.kept() <= MAX_NAMES, "{} at {uid}", names.kept());
        }
    }

    /// A process's facts are read from /proc now (this test's own process).
    #[test]
    fn facts_of_a_live_process() {
        let me = ProcFacts::read(
            Path::new("/proc"),
            std::process::id(),
            &UserNames::default(),
        )
        .expect("this process");
        assert_eq!(me.uid, Some(nix::unistd::getuid().as_raw()));
        assert!(me.exe.is_some(), "{me:?}");
        assert_eq!(
            ProcFacts::read(Path::new("/proc"), u32::MAX, &UserNames::default()),
            None
        );
    }
}
