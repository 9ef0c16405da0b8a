//! The Debian image of VM scenarios with `[vm] image = "debian"`: a real distribution,
//! systemd 252 as PID 1, journald, dbus, systemd-oomd, with cgsentry installed as it
//! is on a machine (`cargo xtask install --root`: the real unit, slice and
//! configuration) and enabled.
//!
//! - The root file system comes from Debian's own packages (`mmdebstrap`, apt's
//!   sources), built once per package list and cached as a tar under `target/vm`
//!   (about two minutes).
//! - Each scenario gets its own disk: the tar unpacked, cgsentry installed, the
//!   scenario's policies, the `workload` binary, a keeper unit (the tracepoints held
//!   open, see `workload keep-tracepoints`) ordered before cgsentry, and a unit that
//!   runs `workload vm-run /scenario.toml` once the system is up, its output on the
//!   serial console, then powers off.
//! - A small busybox initramfs loads `virtio_blk` (the cloud kernel has ext4 built in,
//!   virtio as modules) and switches to the disk's /sbin/init.
use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use cgsentry_workload::scenario::Scenario;

use crate::cmd::run;

/// Debian's packages in the image (and the suite). A change here builds a new image.
/// `dbus-user-session`: a lingering user's manager on its own bus (`systemd-run --user`);
/// `openssh-server`: the sshd that containment of a user's scope must leave alone;
/// `earlyoom`, `nohang`: the other guards `cargo xtask bench` compares on this image
/// (installed, not enabled: see [`GUARD_UNITS`]).
const PACKAGES: &str = "systemd,systemd-sysv,systemd-oomd,dbus,dbus-user-session,udev,procps,\
                        util-linux,openssh-server,earlyoom,nohang";
/// The other guards' services, which their packages enable: disabled in every disk, so
/// that only a benchmark run that starts one has it (systemd-oomd stays as Debian
/// ships it: enabled, the neighbour cgsentry meets on a real machine).
const GUARD_UNITS: &[&str] = &[
    "earlyoom.service",
    "nohang.service",
    "nohang-desktop.service",
];
const SUITE: &str = "bookworm";
/// Size of a scenario's root disk (sparse).
const DISK_BYTES: u64 = 2 << 30;
/// virtio modules in load order, then the block driver (the swap disk's, for the root).
const MODULES: &[&str] = crate::vm::SWAP_MODULES;

/// The cached root file system for [`PACKAGES`], built when missing.
///
/// # Errors
/// mmdebstrap is missing or fails.
pub fn ensure_rootfs(vm_dir: &Path) -> Result<PathBuf> {
    let key = {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (PACKAGES, SUITE).hash(&mut h);
        h.finish()
    };
    let tar = vm_dir.join(format!("debian-{SUITE}-{key:016x}.tar"));
    if tar.exists() {
        return Ok(tar);
    }
    std::fs::create_dir_all(vm_dir)?;
    if which("mmdebstrap").is_none() {
        bail!("mmdebstrap is missing: `cargo xtask setup` installs it");
    }
    eprintln!(
        "vm-test: building the Debian {SUITE} image from its packages (once; cached as {})",
        tar.display()
    );
    let part = tar.with_extension("tar.part");
    run(Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--format=tar",
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            SUITE,
        ])
        .arg(&part))?;
    std::fs::rename(&part, &tar)?;
    Ok(tar)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// What goes into a scenario's disk.
pub struct Inputs<'a> {
    pub tar: &'a Path,
    pub scenario_file: &'a Path,
    pub scenario: &'a Scenario,
    pub agent: &'a Path,
    pub workload: &'a Path,
    /// The shipped policies' directory.
    pub policies: &'a Path,
    pub kept_subsystems: &'a str,
    /// The kernel's `drivers` module directory.
    pub modules: &'a Path,
}

/// Builds the scenario's root disk and the initramfs that boots it, in `dir`.
///
/// # Errors
/// A file cannot be written or a tool fails.
pub fn build(dir: &Path, i: &Inputs<'_>) -> Result<(PathBuf, PathBuf)> {
    let root = dir.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xf")
        .arg(i.tar))?;
    std::fs::write(root.join("etc/hostname"), "cgsentry-vm\n")?;
    std::fs::write(root.join("etc/fstab"), "/dev/vda / ext4 rw,relatime 0 1\n")?;
    install_agent(&root, i)?;
    if i.scenario
        .workloads
        .iter()
        .any(|w| cgsentry_workload::systemd::user_manager_uid(&w.cgroup).is_some())
    {
        lingering_user(&root)?;
    }
    std::fs::copy(i.workload, root.join("usr/bin/workload"))
        .with_context(|| format!("copying {}", i.workload.display()))?;
    std::fs::copy(i.scenario_file, root.join("scenario.toml"))?;
    units(&root, i.kept_subsystems)?;
    disable(&root, GUARD_UNITS)?;
    mask(&root, &i.scenario.vm.masked)?;
    let disk = dir.join("disk.img");
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&disk))?;
    std::fs::remove_dir_all(&root)?;
    let initrd = initramfs(dir, i.modules)?;
    Ok((disk, initrd))
}

/// The scenario's user, as `useradd -m` and `loginctl enable-linger` make it: systemd
/// starts its manager (user@UID.service, with app.slice for its units) at boot.
fn lingering_user(root: &Path) -> Result<()> {
    use std::io::Write as _;
    let (name, uid) = cgsentry_workload::systemd::LINGERING_USER;
    let append = |file: &str, line: String| -> Result<()> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join(file))
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("adding {name} to /{file}"))
    };
    append(
        "etc/passwd",
        format!("{name}:x:{uid}:{uid}::/home/{name}:/bin/sh\n"),
    )?;
    append("etc/group", format!("{name}:x:{uid}:\n"))?;
    append("etc/shadow", format!("{name}:!:20000:0:99999:7:::\n"))?;
    let home = root.join("home").join(name);
    std::fs::create_dir_all(&home)?;
    std::os::unix::fs::chown(&home, Some(uid), Some(uid))?;
    let linger = root.join("var/lib/systemd/linger");
    std::fs::create_dir_all(&linger)?;
    std::fs::write(linger.join(name), "")?;
    Ok(())
}

/// cgsentry as `cargo xtask install --root` puts it, enabled, with the scenario's
/// policy files.
fn install_agent(root: &Path, i: &Inputs<'_>) -> Result<()> {
    let args = crate::install::InstallArgs {
        root: root.to_owned(),
        binary: Some(i.agent.to_owned()),
        uninstall: false,
        purge: false,
        no_systemctl: true,
    };
    crate::install::install_files(&args, i.agent)?;
    std::os::unix::fs::symlink("/usr/local/sbin/cgsentry", root.join("usr/bin/cgsentry"))?;
    let policies = root.join("etc/cgsentry/policies.d");
    let spec = i.scenario.agent.as_ref();
    // The policies of the build under test (another build's with --policies), or none.
    for e in std::fs::read_dir(&policies)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            std::fs::remove_file(p)?;
        }
    }
    if spec.is_some_and(|a| a.shipped_policies) {
        for e in std::fs::read_dir(i.policies)? {
            let p = e?.path();
            if let (Some(name), true) = (p.file_name(), p.extension().is_some_and(|x| x == "toml"))
            {
                std::fs::copy(&p, policies.join(name))?;
            }
        }
    }
    for (name, text) in spec.map(|a| &a.policy_files).into_iter().flatten() {
        std::fs::write(policies.join(name), text)?;
    }
    // Enabled only where the scenario has an agent: a run under another guard (or
    // none) has cgsentry installed but not running.
    if spec.is_some() {
        let wants = root.join("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants)?;
        std::os::unix::fs::symlink(
            "/etc/systemd/system/cgsentry.service",
            wants.join("cgsentry.service"),
        )?;
    }
    Ok(())
}

/// `systemctl disable`, offline: the units' links in /etc/systemd/system/*.wants go.
fn disable(root: &Path, units: &[&str]) -> Result<()> {
    for entry in std::fs::read_dir(root.join("etc/systemd/system"))? {
        let dir = entry?.path();
        if dir.extension().is_none_or(|e| e != "wants") {
            continue;
        }
        for unit in units {
            match std::fs::remove_file(dir.join(unit)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("disabling {unit}")),
            }
        }
    }
    Ok(())
}

/// `systemctl mask` of the scenario's `masked` units, offline: a link to /dev/null in
/// /etc/systemd/system overrides the unit and its enablement.
fn mask(root: &Path, units: &[String]) -> Result<()> {
    let system = root.join("etc/systemd/system");
    for unit in units {
        let link = system.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)
            .with_context(|| format!("masking {unit}"))?;
    }
    Ok(())
}

/// The keeper (before cgsentry), the test runner (once the system is up), no login on
/// the console.
fn units(root: &Path, kept: &str) -> Result<()> {
    let system = root.join("etc/systemd/system");
    std::fs::write(
        system.join("vm-keeper.service"),
        format!(
            "[Unit]\nDescription=Hold the tracepoints open (no kernel text patched mid-run)\n\
             DefaultDependencies=no\nBefore=cgsentry.service\n\n\
             [Service]\nType=exec\nExecStart=/usr/bin/workload keep-tracepoints {kept}\n\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
    )?;
    std::fs::write(
        system.join("vmtest.service"),
        "[Unit]\nDescription=The VM scenario\nAfter=multi-user.target cgsentry.service\n\n\
         [Service]\nType=oneshot\n\
         ExecStart=/bin/sh -c '/usr/bin/workload vm-run /scenario.toml > /dev/ttyS0 2>&1; \
         echo \"VM-EXIT $?\" > /dev/ttyS0; systemctl poweroff --force --force'\n\n\
         [Install]\nWantedBy=multi-user.target\n",
    )?;
    let wants = system.join("multi-user.target.wants");
    for unit in ["vm-keeper.service", "vmtest.service"] {
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), wants.join(unit))?;
    }
    // agetty on the console hangs up (vhangup) every other writer of ttyS0.
    std::os::unix::fs::symlink("/dev/null", system.join("serial-getty@ttyS0.service"))?;
    Ok(())
}

/// A busybox initramfs: virtio modules, then `switch_root` to the disk's systemd.
fn initramfs(dir: &Path, modules: &Path) -> Result<PathBuf> {
    let i = dir.join("initrd-root");
    if i.exists() {
        std::fs::remove_dir_all(&i)?;
    }
    for d in ["bin", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(i.join(d))?;
    }
    std::fs::copy("/bin/busybox", i.join("bin/busybox"))?;
    for applet in ["sh", "mount", "insmod", "switch_root", "sleep"] {
        std::os::unix::fs::symlink("busybox", i.join("bin").join(applet))?;
    }
    let mut loads = String::new();
    for m in MODULES {
        let file = Path::new(m).file_name().context("module name")?;
        std::fs::copy(
            modules.join(format!("{m}.ko")),
            i.join(file).with_extension("ko"),
        )?;
        let _ = writeln!(loads, "insmod /{}.ko", file.to_string_lossy());
    }
    let init = i.join("init");
    std::fs::write(
        &init,
        format!(
            "#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n\
             mount -t devtmpfs dev /dev\n{loads}\
             n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done\n\
             mount -t ext4 /dev/vda /newroot\nexec switch_root /newroot /sbin/init\n"
        ),
    )?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let initrd = dir.join("initrd.gz");
    run(Command::new("sh").current_dir(&i).arg("-c").arg(format!(
        "find . | cpio -o -H newc --quiet | gzip -1 > {}",
        initrd.display()
    )))?;
    Ok(initrd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_guards_are_installed_but_not_enabled() {
        let root = tempfile::tempdir().unwrap();
        let system = root.path().join("etc/systemd/system");
        let wants = system.join("multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        std::fs::write(system.join("README"), "").unwrap();
        for unit in ["earlyoom.service", "nohang.service", "ssh.service"] {
            std::os::unix::fs::symlink(format!("/lib/systemd/system/{unit}"), wants.join(unit))
                .unwrap();
        }
        disable(root.path(), GUARD_UNITS).unwrap();
        let left: Vec<_> = std::fs::read_dir(&wants)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["ssh.service"]);
        assert!(PACKAGES.split(',').any(|p| p.trim() == "earlyoom"));
        assert!(PACKAGES.split(',').any(|p| p.trim() == "nohang"));
    }
}
