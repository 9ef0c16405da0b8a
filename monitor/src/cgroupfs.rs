//! Reading the cgroup v2 tree (below's `cgroupfs` conventions): one reader with an
//! injectable root, one `read_<file>` per control file, errors that carry the path, and
//! "the cgroup went away mid-read" (`ENOENT`, `ENODEV`) as `Ok(None)`, never a failure.
use std::{
    collections::HashMap,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A failure to read or parse a cgroup file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unexpected content {line:?}")]
    Parse { path: PathBuf, line: String },
}

/// `cpu.stat` of a cgroup. Always present on cgroup v2, even without the cpu controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStat {
    /// Total CPU time of the cgroup's tasks, microseconds.
    pub usage_usec: u64,
    /// Of which in user mode, microseconds.
    pub user_usec: u64,
    /// Of which in kernel mode, microseconds.
    pub system_usec: u64,
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

    /// Absolute directory of the cgroup `rel` ("/" or "" is the root cgroup).
    #[must_use]
    pub fn dir(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    fn read(&self, rel: &str, file: &str) -> Result<Option<(PathBuf, String)>, CgroupError> {
        let path = self.dir(rel).join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some((path, s))),
            Err(e) if gone(&e) => Ok(None),
            Err(source) => Err(CgroupError::Io { path, source }),
        }
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
        let mut out = HashMap::new();
        let mut stack = vec![(self.root.clone(), String::from("/"))];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            out.insert(meta.ino(), rel.clone());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((entry.path(), child));
                }
            }
        }
        out
    }
}

/// The v2 cgroup of a process, from `/proc/<pid>/cgroup`'s `0::<path>` line.
/// `None` when the process is gone or has no v2 entry.
#[must_use]
pub fn cgroup_of_pid(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_proc_cgroup(&text)
}

/// Parses the `0::<path>` line of a `/proc/<pid>/cgroup` file.
#[must_use]
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_owned())
}

/// Resolves cgroup ids to paths. A cached path is trusted only while its directory
/// still has that inode (one `stat`); an unknown or stale id triggers at most one
/// re-walk per call to [`CgroupIndex::resolve_all`].
#[derive(Debug)]
pub struct CgroupIndex {
    reader: CgroupReader,
    by_id: HashMap<CgroupId, String>,
}

impl CgroupIndex {
    #[must_use]
    pub fn new(reader: CgroupReader) -> Self {
        let by_id = reader.walk();
        Self { reader, by_id }
    }

    #[must_use]
    pub fn reader(&self) -> &CgroupReader {
        &self.reader
    }

    fn cached_and_current(&self, id: CgroupId) -> bool {
        self.by_id
            .get(&id)
            .is_some_and(|rel| self.reader.id_of(rel).ok().flatten() == Some(id))
    }

    /// Path of every id in `ids`; ids not found by a fresh walk are gone (deleted
    /// cgroups) and map to `None`.
    pub fn resolve_all<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a CgroupId> + Clone,
    ) -> HashMap<CgroupId, Option<String>> {
        if ids
            .clone()
            .into_iter()
            .any(|id| !self.cached_and_current(*id))
        {
            self.by_id = self.reader.walk();
        }
        ids.into_iter()
            .map(|id| (*id, self.by_id.get(id).cloned()))
            .collect()
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

    #[test]
    fn vanished_cgroup_reads_as_none() {
        let (_dir, reader) = tree();
        assert_eq!(reader.read_cpu_stat("/nope").unwrap(), None);
        assert_eq!(reader.id_of("/nope").unwrap(), None);
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
        assert_eq!(
            index.resolve_all(&[c_id])[&c_id],
            None,
            "cached path is re-checked"
        );
    }

    #[test]
    fn proc_cgroup_lines() {
        let hybrid = "12:pids:/\n4:memory:/x\n0::/user.slice/a b\n";
        assert_eq!(
            parse_proc_cgroup(hybrid).as_deref(),
            Some("/user.slice/a b")
        );
        assert_eq!(
            parse_proc_cgroup("0::/gone (deleted)\n").as_deref(),
            Some("/gone")
        );
        assert_eq!(parse_proc_cgroup("1:cpu:/\n"), None);
        assert_eq!(parse_proc_cgroup(""), None);
    }
}
