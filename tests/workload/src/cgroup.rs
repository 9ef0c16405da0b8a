//! Starting a process inside a cgroup v2, for tests and the VM runner.
use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command},
};

/// Spawns `cmd` inside the cgroup at `dir`: the child writes "0" (itself) to an fd of
/// `cgroup.procs` opened before fork, so it never runs a cycle outside the cgroup.
///
/// # Errors
/// `cgroup.procs` cannot be opened, or the spawn (including the move) fails.
pub fn spawn_in_cgroup(cmd: &mut Command, dir: &Path) -> io::Result<Child> {
    let procs = File::options().write(true).open(dir.join("cgroup.procs"))?;
    let fd = procs.as_raw_fd();
    // SAFETY: write(2) on an inherited fd is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    let child = cmd.spawn();
    drop(procs);
    child
}
