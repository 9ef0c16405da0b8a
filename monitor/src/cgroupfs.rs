//! Reading the cgroup v2 tree (below's `cgroupfs` conventions): one reader with an
//! injectable root, one `read_<file>` per control file, errors that carry the path, and
//! "the cgroup went away mid-read" (`ENOENT`, `ENODEV`) as `Ok(None)`, never a failure.
use std::{
    collections::HashMap,
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Cgroup paths as text, losslessly.
///
/// A cgroup name is any bytes but `/`, NUL and newline: whoever may create a cgroup (a delegated
/// user, a container runtime) picks them. The agent keys, prints, journals and matches
/// paths as text, so a path becomes text this way and back to the exact bytes before any
/// file is touched:
///
/// - `%` becomes `%25`;
/// - a byte that is not part of valid UTF-8, and every byte of a control character
///   (C0, DEL, C1) or of an invisible or direction-changing format character (zero-width
///   spaces and joiners, bidi embeddings, overrides and isolates, the BOM) becomes `%XX`;
/// - everything else stays as it is.
///
/// The mapping is injective (`%` itself is escaped), so two cgroups never share a text,
/// and the text is safe to print: no newline, escape sequence or reordering can reach a
/// terminal, a log line or a JSON consumer. Real names — systemd's units with their own
/// `\x2d` escapes, container ids, pod slices — have none of these and read unchanged;
/// `%` is not valid in a systemd unit name. Where a text is turned back into a path
/// ([`fs_path`]), a `%` not followed by two hex digits stays a `%` (an operator's typing).
#[must_use]
pub fn path_text(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' || needs_escape(c) {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    push_escaped(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            push_escaped(&mut out, b);
        }
    }
    out
}

fn push_escaped(out: &mut String, b: u8) {
    use std::fmt::Write as _;
    let _ = write!(out, "%{b:02X}");
}

/// Characters a printed name must not carry as they are: controls, and the format
/// characters that hide text or reorder it on screen.
#[must_use]
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{061C}'
        )
}

/// The exact bytes a [`path_text`] stands for.
#[must_use]
pub fn text_bytes(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            #[expect(clippy::cast_possible_truncation, reason = "two hex digits")]
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The directory of the cgroup whose path text is `rel` ("/" or "" is the root) under
/// the hierarchy mounted at `root`: the one place where a cgroup's text becomes a
/// filesystem path again. It never leaves `root`: a component that is `.` or `..`, or
/// that would decode to one or to a `/` or NUL (no real cgroup's text does: only a
/// forged journal or a typo), names a directory no cgroup has.
#[must_use]
pub fn fs_path(root: &Path, rel: &str) -> PathBuf {
    let mut path = root.to_owned();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        let bytes = text_bytes(part);
        let unsafe_name =
            bytes == b"." || bytes == b".." || bytes.contains(&b'/') || bytes.contains(&0);
        if unsafe_name {
            // Taken literally, with its dots escaped: `%2E%2E` is no cgroup's name
            // (path_text writes a real one as %252E%252E).
            path.push(part.replace('.', "%2E"));
        } else {
            path.push(OsStr::from_bytes(&bytes));
        }
    }
    path
}

/// A failure to read or parse a cgroup file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unexpected content {line:?}")]
    Parse { path: PathBuf, line: String },
}

/// `cpu.stat` of a cgroup. Always present on cgroup v2, even without the cpu controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CpuStat {
    /// Total CPU time of the cgroup's tasks, microseconds.
    pub usage_usec: u64,
    /// Of which in user mode, microseconds.
    pub user_usec: u64,
    /// Of which in kernel mode, microseconds.
    pub system_usec: u64,
}

/// A cgroup limit: a value, or "max" (none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Max,
    Value(u64),
}

impl Limit {
    /// The value, `None` for "max".
    #[must_use]
    pub fn value(self) -> Option<u64> {
        match self {
            Limit::Max => None,
            Limit::Value(v) => Some(v),
        }
    }
}

/// One line of a PSI file: share of wall time stalled, as percentages averaged over
/// 10/60/300 s, and the total stall time in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    pub total_us: u64,
}

/// A PSI file: `some` (at least one task stalled) and `full` (all non-idle tasks
/// stalled; absent for the machine-wide cpu file on old kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Pressure {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// Parses `key value` lines.
///
/// # Errors
/// The first malformed line.
pub fn parse_keyed(text: &str) -> Result<HashMap<String, u64>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (k, v) = line.split_once(' ').ok_or_else(|| line.to_owned())?;
            let v = v.trim().parse().map_err(|_| line.to_owned())?;
            Ok((k.to_owned(), v))
        })
        .collect()
}

/// Parses a PSI file.
///
/// # Errors
/// The first malformed line, or a missing `some` line.
pub fn parse_pressure(text: &str) -> Result<Pressure, String> {
    let mut some = None;
    let mut full = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or_default();
        let mut psi = PsiLine::default();
        let bad = || line.to_owned();
        for word in words {
            let (k, v) = word.split_once('=').ok_or_else(bad)?;
            match k {
                "avg10" => psi.avg10 = v.parse().map_err(|_| bad())?,
                "avg60" => psi.avg60 = v.parse().map_err(|_| bad())?,
                "avg300" => psi.avg300 = v.parse().map_err(|_| bad())?,
                "total" => psi.total_us = v.parse().map_err(|_| bad())?,
                _ => {}
            }
        }
        match kind {
            "some" => some = Some(psi),
            "full" => full = Some(psi),
            _ => return Err(bad()),
        }
    }
    Ok(Pressure {
        some: some.ok_or_else(|| "no `some` line".to_owned())?,
        full,
    })
}

/// The cgroup v2 id of a directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns in the kernel.
pub type CgroupId = u64;

/// Reads files of one cgroup v2 hierarchy mounted at `root`.
#[derive(Clone, Debug)]
pub struct CgroupReader {
    root: PathBuf,
}

fn gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ENODEV)
}

impl CgroupReader {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The mount point of the hierarchy.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute directory of the cgroup `rel` ("/" or "" is the root cgroup; a
    /// [`path_text`]).
    #[must_use]
    pub fn dir(&self, rel: &str) -> PathBuf {
        fs_path(&self.root, rel)
    }

    fn read(&self, rel: &str, file: &str) -> Result<Option<(PathBuf, String)>, CgroupError> {
        let path = self.dir(rel).join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some((path, s))),
            Err(e) if gone(&e) => Ok(None),
            Err(source) => Err(CgroupError::Io { path, source }),
        }
    }

    /// The processes (thread-group ids) in `rel`'s `cgroup.procs`; empty when the
    /// cgroup vanished.
    ///
    /// # Errors
    /// A read error other than "cgroup gone".
    pub fn procs(&self, rel: &str) -> Result<Vec<u32>, CgroupError> {
        Ok(self
            .read(rel, "cgroup.procs")?
            .map(|(_, text)| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default())
    }

    /// `cpu.stat`: `usage_usec`, `user_usec`, `system_usec` (microseconds). Other keys
    /// (throttling, present with the cpu controller) are ignored here.
    ///
    /// # Errors
    /// A read error other than "cgroup gone", or a malformed line.
    pub fn read_cpu_stat(&self, rel: &str) -> Result<Option<CpuStat>, CgroupError> {
        let Some((path, text)) = self.read(rel, "cpu.stat")? else {
            return Ok(None);
        };
        let mut stat = CpuStat::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let parse_err = || CgroupError::Parse {
                path: path.clone(),
                line: line.to_owned(),
            };
            let (key, value) = line.split_once(' ').ok_or_else(parse_err)?;
            let value: u64 = value.trim().parse().map_err(|_| parse_err())?;
            match key {
                "usage_usec" => stat.usage_usec = value,
                "user_usec" => stat.user_usec = value,
                "system_usec" => stat.system_usec = value,
                _ => {}
            }
        }
        Ok(Some(stat))
    }

    fn read_value(&self, rel: &str, file: &str) -> Result<Option<(PathBuf, String)>, CgroupError> {
        self.read(rel, file)
            .map(|o| o.map(|(path, text)| (path, text.trim().to_owned())))
    }

    /// A single unsigned number (`memory.current`, `pids.current`: bytes, count).
    ///
    /// # Errors
    /// A read error other than "cgroup gone", or not a number.
    pub fn read_u64(&self, rel: &str, file: &str) -> Result<Option<u64>, CgroupError> {
        let Some((path, text)) = self.read_value(rel, file)? else {
            return Ok(None);
        };
        text.parse()
            .map(Some)
            .map_err(|_| CgroupError::Parse { path, line: text })
    }

    /// A limit (`memory.max`, `memory.high`, `pids.max`): a number, or "max" for none.
    ///
    /// # Errors
    /// A read error other than "cgroup gone", or neither a number nor "max".
    pub fn read_limit(&self, rel: &str, file: &str) -> Result<Option<Limit>, CgroupError> {
        let Some((path, text)) = self.read_value(rel, file)? else {
            return Ok(None);
        };
        if text == "max" {
            return Ok(Some(Limit::Max));
        }
        text.parse()
            .map(|v| Some(Limit::Value(v)))
            .map_err(|_| CgroupError::Parse { path, line: text })
    }

    /// A flat keyed file (`memory.events`, `memory.stat`): every `key value` line.
    ///
    /// # Errors
    /// A read error other than "cgroup gone", or a malformed line.
    pub fn read_keyed(
        &self,
        rel: &str,
        file: &str,
    ) -> Result<Option<HashMap<String, u64>>, CgroupError> {
        let Some((path, text)) = self.read(rel, file)? else {
            return Ok(None);
        };
        parse_keyed(&text)
            .map(Some)
            .map_err(|line| CgroupError::Parse { path, line })
    }

    /// A PSI file (`memory.pressure`, `cpu.pressure`, `io.pressure`, or
    /// `/proc/pressure/*` with a reader rooted at `/proc/pressure`).
    ///
    /// # Errors
    /// A read error other than "cgroup gone" (or PSI disabled), or a malformed line.
    pub fn read_pressure(&self, rel: &str, file: &str) -> Result<Option<Pressure>, CgroupError> {
        let text = match self.read(rel, file) {
            Ok(Some((path, text))) => (path, text),
            Ok(None) => return Ok(None),
            // PSI disabled at boot (psi=0) makes the file fail with EOPNOTSUPP.
            Err(CgroupError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let (path, text) = text;
        parse_pressure(&text)
            .map(Some)
            .map_err(|line| CgroupError::Parse { path, line })
    }

    /// Whether `rel` or a cgroup above it (below the root) is owned by a non-root user:
    /// a subtree delegated to that user (systemd's `Delegate=`, a user's own systemd,
    /// rootless containers), whose cgroups the user makes and names.
    #[must_use]
    pub fn delegated(&self, rel: &str) -> bool {
        let mut path = self.root.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path = fs_path(&path, part);
            if std::fs::metadata(&path).is_ok_and(|m| m.uid() != 0) {
                return true;
            }
        }
        false
    }

    /// The cgroup id (inode number) of `rel`; `None` if it does not exist.
    ///
    /// # Errors
    /// A `stat` error other than "cgroup gone".
    pub fn id_of(&self, rel: &str) -> Result<Option<CgroupId>, CgroupError> {
        let path = self.dir(rel);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.ino())),
            Err(e) if gone(&e) => Ok(None),
            Err(source) => Err(CgroupError::Io { path, source }),
        }
    }

    /// Every cgroup below the root (root included, as "/"), by id. Directories that
    /// vanish during the walk are skipped; unreadable ones are skipped too (a walk
    /// must not fail because one subtree is odd).
    #[must_use]
    pub fn walk(&self) -> HashMap<CgroupId, String> {
        self.walk_checked().0
    }

    /// [`Self::walk`], and whether it saw the whole tree: false when a directory or
    /// entry could not be read for another reason than being gone (EMFILE, ENOMEM
    /// under pressure), so that its subtree may be missing.
    #[must_use]
    pub fn walk_checked(&self) -> (HashMap<CgroupId, String>, bool) {
        let mut out = HashMap::new();
        let mut complete = true;
        let mut stack = vec![(self.root.clone(), String::from("/"))];
        while let Some((dir, rel)) = stack.pop() {
            let meta = match std::fs::metadata(&dir) {
                Ok(m) => m,
                Err(e) => {
                    complete &= gone(&e);
                    continue;
                }
            };
            out.insert(meta.ino(), rel.clone());
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    complete &= gone(&e);
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        complete &= gone(&e);
                        continue;
                    }
                };
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = path_text(entry.file_name().as_bytes());
                    let child = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((entry.path(), child));
                }
            }
        }
        (out, complete)
    }
}

/// The v2 cgroup of a process, from `/proc/<pid>/cgroup`'s `0::<path>` line, as a
/// [`path_text`]. `None` when the process is gone or has no v2 entry.
#[must_use]
pub fn cgroup_of_pid(proc_root: &Path, pid: u32) -> Option<String> {
    let bytes = std::fs::read(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_proc_cgroup(&bytes)
}

/// Parses the `0::<path>` line of a `/proc/<pid>/cgroup` file (the path's bytes as
/// they are: a cgroup name may hold any byte but `/`, NUL and the newline the kernel
/// refuses in names; the v2 line is the last one).
#[must_use]
pub fn parse_proc_cgroup(bytes: &[u8]) -> Option<String> {
    let at = if bytes.starts_with(b"0::") {
        0
    } else {
        bytes.windows(4).position(|w| w == b"\n0::")? + 1
    };
    let mut path = &bytes[at + 3..];
    path = path.strip_suffix(b"\n").unwrap_or(path);
    path = path.strip_suffix(b" (deleted)").unwrap_or(path);
    Some(path_text(path))
}

/// Resolves cgroup ids to paths from a walk of the tree. The walk is redone when an
/// unknown id shows up, and when the root's `cgroup.stat` (`nr_descendants`,
/// `nr_dying_descendants`) says cgroups were created or deleted: one small read per
/// tick instead of a `stat` per cgroup.
#[derive(Debug)]
pub struct CgroupIndex {
    reader: CgroupReader,
    by_id: HashMap<CgroupId, String>,
    /// Whether the last walk saw the whole tree ([`CgroupReader::walk_checked`]).
    complete: bool,
    /// `cgroup.stat` of the root at the last walk; `None` where it cannot be read.
    root_stat: Option<HashMap<String, u64>>,
}

impl CgroupIndex {
    #[must_use]
    pub fn new(reader: CgroupReader) -> Self {
        let root_stat = reader.read_keyed("/", "cgroup.stat").ok().flatten();
        let (by_id, complete) = reader.walk_checked();
        Self {
            reader,
            by_id,
            complete,
            root_stat,
        }
    }

    #[must_use]
    pub fn reader(&self) -> &CgroupReader {
        &self.reader
    }

    /// Walks again if the tree changed since the last walk (or if the root's
    /// `cgroup.stat` cannot tell). Returns whether it walked.
    pub fn refresh_if_changed(&mut self) -> bool {
        let now = self.reader.read_keyed("/", "cgroup.stat").ok().flatten();
        if now.is_some() && now == self.root_stat {
            return false;
        }
        self.root_stat = now;
        (self.by_id, self.complete) = self.reader.walk_checked();
        true
    }

    /// Path of every id in `ids`, walking once more if one is unknown; ids still
    /// unknown are gone (deleted cgroups) and map to `None`.
    pub fn resolve_all<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a CgroupId> + Clone,
    ) -> HashMap<CgroupId, Option<String>> {
        if ids
            .clone()
            .into_iter()
            .any(|id| !self.by_id.contains_key(id))
        {
            self.refresh();
        }
        ids.into_iter()
            .map(|id| (*id, self.by_id.get(id).cloned()))
            .collect()
    }

    /// Every cgroup seen by the last walk, id → path.
    #[must_use]
    pub fn known(&self) -> &HashMap<CgroupId, String> {
        &self.by_id
    }

    /// Whether the last walk saw the whole tree (see [`CgroupReader::walk_checked`]).
    #[must_use]
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Walks the tree again (finds cgroups created and deleted since).
    pub fn refresh(&mut self) {
        self.root_stat = self.reader.read_keyed("/", "cgroup.stat").ok().flatten();
        (self.by_id, self.complete) = self.reader.walk_checked();
    }

    /// Id of the cgroup at `rel`, looked up by `stat` (cheap, exact).
    #[must_use]
    pub fn id_of(&self, rel: &str) -> Option<CgroupId> {
        self.reader.id_of(rel).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, CgroupReader) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        let reader = CgroupReader::new(dir.path());
        (dir, reader)
    }

    macro_rules! cpu_stat_cases {
        ($($name:ident: $content:expr => $expected:expr;)*) => {$(
            #[test]
            fn $name() {
                let (dir, reader) = tree();
                std::fs::write(dir.path().join("a/cpu.stat"), $content).unwrap();
                let got = reader.read_cpu_stat("/a");
                let expected: Option<Option<CpuStat>> = $expected;
                match expected {
                    Some(want) => assert_eq!(got.unwrap(), want),
                    None => assert!(
                        matches!(got, Err(CgroupError::Parse { ref path, .. }) if path.ends_with("a/cpu.stat")),
                        "expected a parse error naming the file, got {got:?}"
                    ),
                }
            }
        )*};
    }

    cpu_stat_cases! {
        cpu_stat_v2_basic: "usage_usec 10\nuser_usec 7\nsystem_usec 3\nnice_usec 0\n"
            => Some(Some(CpuStat { usage_usec: 10, user_usec: 7, system_usec: 3 }));
        cpu_stat_with_throttling_keys: "usage_usec 5\nuser_usec 5\nsystem_usec 0\nnr_periods 4\nthrottled_usec 9\n"
            => Some(Some(CpuStat { usage_usec: 5, user_usec: 5, system_usec: 0 }));
        cpu_stat_empty_file: "" => Some(Some(CpuStat::default()));
        cpu_stat_not_a_number: "usage_usec lots\n" => None;
        cpu_stat_no_value: "usage_usec\n" => None;
        cpu_stat_negative: "usage_usec -1\n" => None;
    }

    macro_rules! file_cases {
        ($($name:ident: $file:expr, $content:expr, |$r:ident| $read:expr => $expected:expr;)*) => {$(
            #[test]
            fn $name() {
                let (dir, $r) = tree();
                std::fs::write(dir.path().join("a").join($file), $content).unwrap();
                assert_eq!($read, $expected);
            }
        )*};
    }

    file_cases! {
        memory_current: "memory.current", "1048576\n", |r| r.read_u64("/a", "memory.current").unwrap() => Some(1_048_576);
        memory_max_unlimited: "memory.max", "max\n", |r| r.read_limit("/a", "memory.max").unwrap() => Some(Limit::Max);
        memory_max_value: "memory.max", "536870912\n", |r| r.read_limit("/a", "memory.max").unwrap() => Some(Limit::Value(536_870_912));
        pids_max_garbage: "pids.max", "lots\n", |r| r.read_limit("/a", "pids.max").is_err() => true;
        current_garbage: "pids.current", "-3\n", |r| r.read_u64("/a", "pids.current").is_err() => true;
        memory_events: "memory.events", "low 0\nhigh 4\nmax 1\noom 0\noom_kill 2\noom_group_kill 0\n",
            |r| r.read_keyed("/a", "memory.events").unwrap().unwrap()["oom_kill"] => 2;
        memory_events_malformed: "memory.events", "high\n", |r| r.read_keyed("/a", "memory.events").is_err() => true;
        pressure_cgroup: "memory.pressure",
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=600\n",
            |r| r.read_pressure("/a", "memory.pressure").unwrap().unwrap()
            => Pressure { some: PsiLine { avg10: 1.5, avg60: 0.2, avg300: 0.0, total_us: 12345 },
                          full: Some(PsiLine { avg10: 0.5, avg60: 0.0, avg300: 0.0, total_us: 600 }) };
        pressure_some_only: "cpu.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            |r| r.read_pressure("/a", "cpu.pressure").unwrap().unwrap().full => None;
        pressure_malformed: "io.pressure", "some avg10=x\n", |r| r.read_pressure("/a", "io.pressure").is_err() => true;
        pressure_no_some: "io.pressure", "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            |r| r.read_pressure("/a", "io.pressure").is_err() => true;
    }

    #[test]
    fn vanished_cgroup_reads_as_none() {
        let (_dir, reader) = tree();
        assert_eq!(reader.read_cpu_stat("/nope").unwrap(), None);
        assert_eq!(reader.id_of("/nope").unwrap(), None);
        assert_eq!(reader.read_u64("/nope", "memory.current").unwrap(), None);
        assert_eq!(reader.read_limit("/nope", "memory.max").unwrap(), None);
        assert_eq!(reader.read_keyed("/nope", "memory.events").unwrap(), None);
        assert_eq!(reader.read_pressure("/nope", "cpu.pressure").unwrap(), None);
    }

    #[test]
    fn walk_maps_inodes_to_paths() {
        let (dir, reader) = tree();
        let map = reader.walk();
        let ino = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().ino();
        assert_eq!(map.len(), 4);
        assert_eq!(map[&ino("")], "/");
        assert_eq!(map[&ino("a/b")], "/a/b");
        assert_eq!(map[&ino("c")], "/c");
        assert_eq!(reader.id_of("/a/b").unwrap(), Some(ino("a/b")));
    }

    #[test]
    fn index_rewalks_for_new_and_reports_deleted() {
        let (dir, reader) = tree();
        let mut index = CgroupIndex::new(reader);
        std::fs::create_dir(dir.path().join("new")).unwrap();
        let new_id = std::fs::metadata(dir.path().join("new")).unwrap().ino();
        let c_id = std::fs::metadata(dir.path().join("c")).unwrap().ino();
        std::fs::remove_dir(dir.path().join("c")).unwrap();
        let got = index.resolve_all(&[new_id, c_id]);
        assert_eq!(got[&new_id].as_deref(), Some("/new"));
        assert_eq!(got[&c_id], None, "a deleted cgroup resolves to None");
    }

    #[test]
    fn index_notices_deleted_cgroup_it_knew() {
        let (dir, reader) = tree();
        let mut index = CgroupIndex::new(reader);
        let c_id = std::fs::metadata(dir.path().join("c")).unwrap().ino();
        assert_eq!(index.resolve_all(&[c_id])[&c_id].as_deref(), Some("/c"));
        std::fs::remove_dir(dir.path().join("c")).unwrap();
        // No cgroup.stat in a fake tree: the index cannot tell, so it walks.
        assert!(index.refresh_if_changed());
        assert_eq!(index.resolve_all(&[c_id])[&c_id], None);
    }

    #[test]
    fn index_walks_only_when_the_root_stat_changes() {
        let (dir, reader) = tree();
        let stat = |n: u32| format!("nr_descendants {n}\nnr_dying_descendants 0\n");
        std::fs::write(dir.path().join("cgroup.stat"), stat(3)).unwrap();
        let mut index = CgroupIndex::new(reader);
        assert!(!index.refresh_if_changed(), "nothing changed");
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("cgroup.stat"), stat(4)).unwrap();
        assert!(index.refresh_if_changed());
        let d_id = std::fs::metadata(dir.path().join("d")).unwrap().ino();
        assert_eq!(index.known()[&d_id], "/d");
    }

    #[test]
    fn proc_cgroup_lines() {
        let hybrid = b"12:pids:/\n4:memory:/x\n0::/user.slice/a b\n";
        assert_eq!(
            parse_proc_cgroup(hybrid).as_deref(),
            Some("/user.slice/a b")
        );
        assert_eq!(
            parse_proc_cgroup(b"0::/gone (deleted)\n").as_deref(),
            Some("/gone")
        );
        assert_eq!(parse_proc_cgroup(b"1:cpu:/\n"), None);
        assert_eq!(parse_proc_cgroup(b""), None);
        // Any bytes, a newline and an invalid UTF-8 byte included, as the kernel prints.
        assert_eq!(
            parse_proc_cgroup(b"0::/a\xffb\nc\n").as_deref(),
            Some("/a%FFb%0Ac")
        );
    }

    /// Every byte string survives text and back; the text has nothing a terminal or a
    /// log line would act on; real names (systemd's own escapes, unicode) are unchanged.
    #[test]
    fn path_text_is_lossless_and_printable() {
        let cases: &[(&[u8], &str)] = &[
            (b"/system.slice/sshd.service", "/system.slice/sshd.service"),
            (
                b"/system.slice/systemd-fsck@dev-disk-by\\x2duuid-1.service",
                "/system.slice/systemd-fsck@dev-disk-by\\x2duuid-1.service",
            ),
            ("/user.slice/caf\u{e9}".as_bytes(), "/user.slice/caf\u{e9}"),
            (b"/x\"} 1\ny", "/x\"} 1%0Ay"),
            (b"/bad\xff\xfe", "/bad%FF%FE"),
            (b"/100%", "/100%25"),
            (b"/%41", "/%2541"),
            (b"/esc\x1b[31m", "/esc%1B[31m"),
            ("/rtl\u{202e}gpj.exe".as_bytes(), "/rtl%E2%80%AEgpj.exe"),
            ("/c1\u{85}".as_bytes(), "/c1%C2%85"),
        ];
        for (raw, text) in cases {
            assert_eq!(path_text(raw), *text, "{raw:?}");
            assert_eq!(text_bytes(text), *raw, "{text}");
        }
        // A % the encoder would not have written is the operator's own: kept.
        assert_eq!(text_bytes("/a%zz%4"), b"/a%zz%4");
    }

    /// A cgroup at or below a directory a non-root user owns is in a delegated subtree.
    #[test]
    fn delegated_subtrees_are_seen() {
        let (dir, reader) = tree();
        std::fs::create_dir_all(dir.path().join("u/job")).unwrap();
        assert!(!reader.delegated("/u/job"));
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(
                &dir.path().join("u"),
                Some(nix::unistd::Uid::from_raw(1000)),
                None,
            )
            .unwrap();
            assert!(reader.delegated("/u"));
            assert!(reader.delegated("/u/job"));
            assert!(!reader.delegated("/a/b"));
        } else {
            eprintln!("SKIPPED the chown half: not root");
        }
    }

    /// However forged, a text never names a path outside the hierarchy.
    #[test]
    fn fs_path_never_leaves_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        for text in [
            "/../etc",
            "/a/../../etc",
            "/%2E%2E/etc",
            "/a%2F..%2F..%2Fetc",
            "/x%00y",
            "/./a",
        ] {
            let p = fs_path(root, text);
            assert!(p.starts_with(root), "{text}: {}", p.display());
            assert!(
                !p.components().any(|c| matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )),
                "{text}: {}",
                p.display()
            );
            assert!(!p.as_os_str().as_bytes().contains(&0), "{text}");
        }
        assert_eq!(
            fs_path(root, "/a/b%FFc"),
            root.join("a").join(OsStr::from_bytes(b"b\xffc"))
        );
        assert_eq!(fs_path(root, "/"), root);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_round_trip(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let text = path_text(&raw);
            proptest::prop_assert_eq!(text_bytes(&text), raw);
            proptest::prop_assert!(!text.chars().any(char::is_control));
        }

        #[test]
        fn distinct_bytes_distinct_texts(
            a in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
        ) {
            proptest::prop_assume!(a != b);
            proptest::prop_assert_ne!(path_text(&a), path_text(&b));
        }
    }

    /// A cgroup whose name is not UTF-8 is found by the walk under a text that leads
    /// back to it: its files are read, not reported as gone.
    #[test]
    fn walk_keeps_names_that_are_not_utf8() {
        let (dir, reader) = tree();
        let raw = OsStr::from_bytes(b"job\xff\x1b[31mx");
        std::fs::create_dir(dir.path().join("a").join(raw)).unwrap();
        std::fs::write(
            dir.path().join("a").join(raw).join("memory.current"),
            "42\n",
        )
        .unwrap();
        let walked = reader.walk();
        let text = walked
            .values()
            .find(|p| p.starts_with("/a/job"))
            .expect("walked")
            .clone();
        assert_eq!(text, "/a/job%FF%1B[31mx");
        assert_eq!(reader.read_u64(&text, "memory.current").unwrap(), Some(42));
        assert_eq!(reader.dir(&text), dir.path().join("a").join(raw));
    }
}
