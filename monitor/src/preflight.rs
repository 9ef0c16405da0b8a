//! Before loading anything: are we root, does the kernel have what cgsentry needs, and
//! where are cgroup v2, tracefs and bpffs? Every failure says what is missing and what
//! to do; optional things (BTF, bpffs) are warnings.
use std::path::{Path, PathBuf};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, TRACEFS_MAGIC, statfs},
};
use tracing::{info, warn};

/// A reason cgsentry cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "cgsentry must run as root: it loads eBPF programs and writes cgroup files \
         (try `sudo cgsentry run`, or `cargo xtask run` from the source tree)"
    )]
    NotRoot,
    #[error(
        "no cgroup v2 hierarchy is mounted (looked at /sys/fs/cgroup, /sys/fs/cgroup/unified \
         and /proc/self/mountinfo); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error(
        "tracefs is not available at {path} and could not be mounted ({reason}); \
         cgsentry needs tracepoints: mount it with `mount -t tracefs tracefs {path}`"
    )]
    NoTracefs { path: PathBuf, reason: String },
    #[error(
        "tracepoint {name} is missing ({path} does not exist); this kernel lacks \
         CONFIG_SCHEDSTATS/tracepoint support cgsentry needs"
    )]
    TracepointMissing { name: String, path: PathBuf },
}

/// What the kernel offers, found once at start.
#[derive(Clone, Debug)]
pub struct Environment {
    /// Mount point of the cgroup v2 hierarchy.
    pub cgroup_root: PathBuf,
    /// True when v1 hierarchies hold the controllers and v2 is at `.../unified`.
    pub hybrid: bool,
    /// tracefs mount point (holds `events/`).
    pub tracefs: PathBuf,
    /// Whether `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
}

/// Checks and prepares the machine. Mounts tracefs and bpffs when they are absent.
///
/// # Errors
/// See [`PreflightError`]: each variant is one thing the operator must fix.
pub fn prepare() -> Result<Environment, PreflightError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(PreflightError::NotRoot);
    }
    let (cgroup_root, hybrid) = find_cgroup2()?;
    let tracefs = ensure_tracefs()?;
    ensure_bpffs();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if !btf {
        warn!(
            "kernel BTF (/sys/kernel/btf/vmlinux) is missing: the tracepoint programs still \
             load, but collectors that need CO-RE will be disabled; enable CONFIG_DEBUG_INFO_BTF"
        );
    }
    let format = tracefs.join("events/sched/sched_switch/format");
    if !format.exists() {
        return Err(PreflightError::TracepointMissing {
            name: "sched:sched_switch".into(),
            path: format,
        });
    }
    raise_memlock();
    let env = Environment {
        cgroup_root,
        hybrid,
        tracefs,
        btf,
    };
    info!(
        cgroup_root = %env.cgroup_root.display(),
        hybrid = env.hybrid,
        tracefs = %env.tracefs.display(),
        btf = env.btf,
        "kernel checked"
    );
    Ok(env)
}

fn is_fs(path: &Path, magic: nix::sys::statfs::FsType) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

/// Whether stdout goes to systemd's journal: `$JOURNAL_STREAM` names the stream
/// (`device:inode`) systemd connected, and it is stdout's (a service's output, not a
/// shell started from one that redirected it).
#[must_use]
pub fn stdout_is_journal() -> bool {
    journal_stream_is(std::env::var("JOURNAL_STREAM").ok().as_deref(), 1)
}

/// Whether stderr goes to systemd's journal (see [`stdout_is_journal`]).
#[must_use]
pub fn stderr_is_journal() -> bool {
    journal_stream_is(std::env::var("JOURNAL_STREAM").ok().as_deref(), 2)
}

fn journal_stream_is(var: Option<&str>, fd: i32) -> bool {
    use std::os::fd::BorrowedFd;
    let Some((dev, ino)) = var.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: a standard stream, open for the life of the process (or fstat fails).
    let stream = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::sys::stat::fstat(stream).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or the hybrid
/// `/sys/fs/cgroup/unified`, or wherever mountinfo says).
///
/// # Errors
/// No cgroup2 mount.
pub fn cgroup2_root() -> Result<PathBuf, PreflightError> {
    find_cgroup2().map(|(root, _)| root)
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on a pure v2 machine, `/sys/fs/cgroup/unified`
/// on a hybrid one, else wherever mountinfo says.
fn find_cgroup2() -> Result<(PathBuf, bool), PreflightError> {
    let pure = Path::new("/sys/fs/cgroup");
    if is_fs(pure, CGROUP2_SUPER_MAGIC) {
        return Ok((pure.to_path_buf(), false));
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if is_fs(unified, CGROUP2_SUPER_MAGIC) {
        return Ok((unified.to_path_buf(), true));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    find_cgroup2_in_mountinfo(&mountinfo)
        .map(|p| (p, true))
        .ok_or(PreflightError::NoCgroup2)
}

/// First cgroup2 mount point in a `/proc/self/mountinfo` text.
#[must_use]
pub fn find_cgroup2_in_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(c) = code {
            out.push(char::from(c));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

fn ensure_tracefs() -> Result<PathBuf, PreflightError> {
    for candidate in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let p = Path::new(candidate);
        if p.join("events").is_dir() {
            return Ok(p.to_path_buf());
        }
    }
    let path = PathBuf::from("/sys/kernel/tracing");
    match mount(
        Some("tracefs"),
        &path,
        Some("tracefs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) if is_fs(&path, TRACEFS_MAGIC) => {
            info!("mounted tracefs at {}", path.display());
            Ok(path)
        }
        Ok(()) => Err(PreflightError::NoTracefs {
            path,
            reason: "mounted, but it is not tracefs".into(),
        }),
        Err(e) => Err(PreflightError::NoTracefs {
            path,
            reason: e.desc().into(),
        }),
    }
}

/// bpffs is where later versions pin maps; today nothing needs it, so failing to mount
/// it is a warning.
fn ensure_bpffs() {
    let path = Path::new("/sys/fs/bpf");
    if is_fs(path, BPF_FS_MAGIC) {
        return;
    }
    match mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => info!("mounted bpffs at {}", path.display()),
        Err(e) => warn!(
            "could not mount bpffs at {}: {}; continuing (nothing is pinned yet)",
            path.display(),
            e.desc()
        ),
    }
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK` (<https://lwn.net/Articles/837122/>).
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        let err = std::io::Error::last_os_error();
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        if kernel_before(&release, (5, 11)) {
            warn!(
                "could not raise RLIMIT_MEMLOCK: {err}; kernel {release} charges BPF maps to it, loading may fail"
            );
        } else {
            tracing::debug!(
                "could not raise RLIMIT_MEMLOCK ({err}); not needed on kernel {release}"
            );
        }
    }
}

/// Whether a `uname -r` release ("6.1.0-27-cloud-amd64") is older than `major.minor`.
/// An unparsable release counts as old (the cautious answer).
#[must_use]
pub fn kernel_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => true,
    }
}

/// Byte offset of `field` in a tracefs event `format` file
/// (`field:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;`).
#[must_use]
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        let name = decl.rsplit(' ').next()?.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_SWITCH_6_1: &str = "name: sched_switch
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;
";

    #[test]
    fn offsets_from_format() {
        assert_eq!(field_offset(SCHED_SWITCH_6_1, "next_pid"), Some(56));
        assert_eq!(field_offset(SCHED_SWITCH_6_1, "prev_pid"), Some(24));
        assert_eq!(field_offset(SCHED_SWITCH_6_1, "next_comm"), Some(40));
        assert_eq!(field_offset(SCHED_SWITCH_6_1, "common_pid"), Some(4));
        assert_eq!(field_offset(SCHED_SWITCH_6_1, "next"), None);
        assert_eq!(field_offset("garbage\n\n", "next_pid"), None);
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_before("5.10.0-20-amd64", (5, 11)));
        assert!(!kernel_before("5.11.0", (5, 11)));
        assert!(!kernel_before("6.1.0-27-cloud-amd64", (5, 11)));
        assert!(!kernel_before("6.18.44-fc-v782", (5, 11)));
        assert!(kernel_before("garbage", (5, 11)));
    }

    #[test]
    fn cgroup2_from_mountinfo() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
            26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:4 - cgroup2 cgroup2 rw\n\
            27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_cgroup2_in_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let odd = "30 1 0:30 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            find_cgroup2_in_mountinfo(odd),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(
            find_cgroup2_in_mountinfo("27 25 0:24 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(find_cgroup2_in_mountinfo("malformed"), None);
    }

    /// `$JOURNAL_STREAM` names stdout's device and inode, or it is not the journal.
    #[test]
    fn journal_stream_detection() {
        use std::os::fd::BorrowedFd;
        // SAFETY: stdout, open for the life of the test process.
        let st = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(1) }).unwrap();
        let mine = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(journal_stream_is(Some(&mine), 1));
        assert!(!journal_stream_is(Some("1:2"), 1));
        assert!(!journal_stream_is(Some("nonsense"), 1));
        assert!(!journal_stream_is(None, 1));
    }
}
