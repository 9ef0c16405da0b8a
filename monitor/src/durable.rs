//! Durable writes of a file the agent must not lose (the journal), in bounded time.
//!
//! Each version is written to a temporary file, flushed to disk (`fsync`), renamed over
//! the file and the directory flushed: after a crash the file is the old version or the
//! new one, whole. The writing happens on a thread of its own; the caller hands over a
//! version and waits up to a deadline for it to be on disk. On a disk stalled by the
//! very I/O storm the agent is there to stop, a step is delayed by that much at most
//! and the write completes in the background; a newer version replaces one not started
//! yet (only the latest matters).
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::Duration,
};

/// How long a save waits for its version to be on disk.
pub const SAVE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct Slot {
    /// The version waiting to be written (the newest handed over).
    next: Option<(u64, Vec<u8>)>,
    /// The newest version on disk.
    written: u64,
    /// The newest version whose write failed, and why.
    failed: Option<(u64, String)>,
    closed: bool,
}

type Shared = Arc<(Mutex<Slot>, Condvar)>;

/// A file written durably by a thread of its own (see the module doc).
#[derive(Debug)]
pub struct DurableFile {
    path: PathBuf,
    shared: Shared,
    seq: u64,
    /// No writer thread could be started: writes happen in the caller.
    inline: bool,
    wait: Duration,
}

/// Writes `bytes` to `path` durably: temporary file, fsync, rename, fsync of the
/// directory.
///
/// # Errors
/// Any step failed (the file keeps its previous version).
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename is in the directory: flushed with it. A filesystem that cannot sync a
    // directory has done what it can.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl DurableFile {
    /// The file at `path`, its writer thread started (`cgsentry-journal`).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self::with_wait(path, SAVE_WAIT)
    }

    /// [`DurableFile::new`] with another wait (tests).
    #[must_use]
    pub fn with_wait(path: PathBuf, wait: Duration) -> Self {
        let shared: Shared = Arc::default();
        let theirs = Arc::clone(&shared);
        let target = path.clone();
        let spawned = std::thread::Builder::new()
            .name("cgsentry-journal".into())
            .spawn(move || writer(&target, &theirs));
        Self {
            path,
            shared,
            seq: 0,
            inline: spawned.is_err(),
            wait,
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands `bytes` over as the newest version and waits up to the deadline for it.
    ///
    /// # Errors
    /// The write failed, or it is not on disk yet (`TimedOut`: it still completes).
    pub fn save(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if self.inline {
            return write_durably(&self.path, &bytes);
        }
        self.seq += 1;
        let seq = self.seq;
        let (lock, cv) = &*self.shared;
        let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        slot.next = Some((seq, bytes));
        cv.notify_all();
        let (slot, _) = cv
            .wait_timeout_while(slot, self.wait, |s| {
                s.written < seq && s.failed.as_ref().is_none_or(|(f, _)| *f < seq)
            })
            .unwrap_or_else(PoisonError::into_inner);
        if slot.written >= seq {
            return Ok(());
        }
        if let Some((f, why)) = &slot.failed
            && *f >= seq
        {
            return Err(std::io::Error::other(why.clone()));
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "not on disk after {} ms (the disk is slow; it is written in the background)",
                self.wait.as_millis()
            ),
        ))
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        slot.closed = true;
        cv.notify_all();
    }
}

fn writer(path: &Path, shared: &Shared) {
    let (lock, cv) = &**shared;
    loop {
        let (seq, bytes) = {
            let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
            while slot.next.is_none() && !slot.closed {
                slot = cv.wait(slot).unwrap_or_else(PoisonError::into_inner);
            }
            match slot.next.take() {
                Some(next) => next,
                None => return, // closed, nothing left to write
            }
        };
        let result = write_durably(path, &bytes);
        let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => slot.written = slot.written.max(seq),
            Err(e) => slot.failed = Some((seq, e.to_string())),
        }
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_are_durable_and_the_latest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/journal.json");
        let mut f = DurableFile::new(path.clone());
        f.save(b"one".to_vec()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        f.save(b"two".to_vec()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension("tmp").exists());
    }

    /// A directory that cannot be written: the error comes back, nothing hangs.
    #[test]
    fn a_failed_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        // A path below a regular file cannot be created.
        let mut f = DurableFile::new(dir.path().join("file/journal.json"));
        assert!(f.save(b"x".to_vec()).is_err());
    }

    /// A write that cannot finish in time (a FIFO nobody reads stands for a stalled
    /// disk) returns after the deadline, saying so; the next version is written once
    /// the disk moves again.
    #[test]
    fn a_stalled_disk_costs_the_deadline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        nix::unistd::mkfifo(&path.with_extension("tmp"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut f = DurableFile::with_wait(path.clone(), Duration::from_millis(100));
        let started = std::time::Instant::now();
        let e = f.save(b"stuck".to_vec()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        f.save(b"newer".to_vec()).unwrap_err();
        f.save(b"newest".to_vec()).unwrap_err();
        // The disk moves: the stalled write completes, then only the newest version
        // queued behind it ("newer" was replaced before it started).
        let mut got = Vec::new();
        while !got.ends_with(b"newest") {
            got.extend(std::fs::read(path.with_extension("tmp")).unwrap());
            assert!(
                got.len() <= b"stucknewest".len(),
                "{}",
                String::from_utf8_lossy(&got)
            );
        }
        assert_eq!(got, b"stucknewest");
    }
}
