//! `cargo xtask install` / `--uninstall`: the binary, `/etc/cgsentry` with the shipped
//! policies, the systemd service and quarantine slice.
//!
//! Policies an operator edited are never overwritten: the pristine copy of every file we
//! installed is kept in `/var/lib/cgsentry/shipped/`; a file still equal to it is
//! updated, an edited one is kept and the new version written beside it as
//! `<name>.dist` (not loaded: only `*.toml` is).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{cargo, run, workspace_root};

pub const SERVICE: &str = include_str!("../deploy/cgsentry.service");
pub const SLICE: &str = include_str!("../deploy/cgsentry.slice");
pub const MAIN: &str = include_str!("../deploy/cgsentry.toml");
pub const TMPFILES: &str = include_str!("../deploy/cgsentry.tmpfiles");

#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// Install below this directory instead of `/` (packaging, tests); systemctl is then
    /// not called.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Use this binary instead of building one (`cargo build --release`).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Remove the binary and the units (and stop the service); configuration, journal
    /// and logs stay unless `--purge`.
    #[arg(long)]
    pub uninstall: bool,
    /// With `--uninstall`: remove /etc/cgsentry, /var/lib/cgsentry and /var/log/cgsentry too.
    #[arg(long, requires = "uninstall")]
    pub purge: bool,
    /// Do not call systemctl (daemon-reload, enable --now / disable --now).
    #[arg(long)]
    pub no_systemctl: bool,
}

/// Where things go, below a root.
struct Layout {
    binary: PathBuf,
    etc: PathBuf,
    policies: PathBuf,
    shipped: PathBuf,
    var_lib: PathBuf,
    var_log: PathBuf,
    units: PathBuf,
    tmpfiles: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Self {
        let at = |p: &str| root.join(p);
        Self {
            binary: at("usr/local/sbin/cgsentry"),
            etc: at("etc/cgsentry"),
            policies: at("etc/cgsentry/policies.d"),
            shipped: at("var/lib/cgsentry/shipped"),
            var_lib: at("var/lib/cgsentry"),
            var_log: at("var/log/cgsentry"),
            units: at("etc/systemd/system"),
            tmpfiles: at("etc/tmpfiles.d/cgsentry.conf"),
        }
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// What happened to one configuration file.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    Unchanged,
    Updated,
    /// Edited by the operator: kept, the new version written as `.dist`.
    KeptEdited,
}

/// Installs `text` at `path` unless the operator edited what we installed there last.
fn install_config(path: &Path, pristine: &Path, text: &str) -> Result<Outcome> {
    let current = std::fs::read_to_string(path).ok();
    let last_shipped = std::fs::read_to_string(pristine).ok();
    let outcome = match (&current, &last_shipped) {
        (None, _) => Outcome::Installed,
        (Some(c), _) if c == text => Outcome::Unchanged,
        (Some(c), Some(s)) if c == s => Outcome::Updated,
        // Edited, or there before us (no record of installing it): the operator's.
        (Some(_), _) => Outcome::KeptEdited,
    };
    match outcome {
        Outcome::Installed | Outcome::Updated => write(path, text, 0o644)?,
        Outcome::KeptEdited => {
            let mut dist = path.as_os_str().to_owned();
            dist.push(".dist");
            write(Path::new(&dist), text, 0o644)?;
        }
        Outcome::Unchanged => {}
    }
    if outcome != Outcome::KeptEdited {
        write(pristine, text, 0o600)?;
    }
    Ok(outcome)
}

fn shipped_policies() -> Result<Vec<(String, String)>> {
    let dir = workspace_root().join("policies");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let name = p
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            out.push((name, std::fs::read_to_string(&p)?));
        }
    }
    out.sort();
    Ok(out)
}

fn systemd_running(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").exists()
}

/// Installs into `args.root`; returns what happened to each configuration file.
pub fn install_files(args: &InstallArgs, binary: &Path) -> Result<Vec<(PathBuf, Outcome)>> {
    let l = Layout::new(&args.root);
    std::fs::create_dir_all(l.binary.parent().expect("has a parent"))?;
    // Through a temporary name: a running agent keeps its (old) inode.
    let tmp = l.binary.with_extension("new");
    std::fs::copy(binary, &tmp).with_context(|| format!("copying {}", binary.display()))?;
    std::fs::rename(&tmp, &l.binary)?;
    let mut done = Vec::new();
    let main = l.etc.join("cgsentry.toml");
    done.push((
        main.clone(),
        install_config(&main, &l.shipped.join("cgsentry.toml"), MAIN)?,
    ));
    let readme = std::fs::read_to_string(workspace_root().join("policies/README.md"))?;
    write(&l.etc.join("README.md"), &readme, 0o644)?;
    for (name, text) in shipped_policies()? {
        let path = l.policies.join(&name);
        done.push((
            path.clone(),
            install_config(&path, &l.shipped.join(&name), &text)?,
        ));
    }
    write(&l.units.join("cgsentry.service"), SERVICE, 0o644)?;
    write(&l.units.join("cgsentry.slice"), SLICE, 0o644)?;
    write(&l.tmpfiles, TMPFILES, 0o644)?;
    for d in [&l.var_lib, &l.var_log] {
        std::fs::create_dir_all(d)?;
    }
    Ok(done)
}

/// Removes what `install_files` put there (configuration too with `purge`).
pub fn uninstall_files(root: &Path, purge: bool) -> Result<()> {
    let l = Layout::new(root);
    for f in [
        &l.binary,
        &l.units.join("cgsentry.service"),
        &l.units.join("cgsentry.slice"),
        &l.tmpfiles,
    ] {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", f.display()));
            }
            _ => {}
        }
    }
    let dirs: &[&PathBuf] = if purge {
        &[&l.etc, &l.var_lib, &l.var_log]
    } else {
        &[&l.shipped]
    };
    for d in dirs {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    Ok(())
}

/// Before the binary goes: nothing cgsentry applied may outlive it (a cgroup left
/// frozen, capped or in quarantine with nobody to release it). With the agent stopped,
/// `cgsentry release --all --offline` undoes what its journal records. Only on a live
/// system (root `/`); a staged tree has nothing applied.
fn release_everything(root: &Path) -> Result<()> {
    let l = Layout::new(root);
    if root != Path::new("/") || !l.binary.exists() {
        return Ok(());
    }
    let status = std::process::Command::new(&l.binary)
        .args(["release", "--all", "--offline", "--journal-dir"])
        .arg(&l.var_lib)
        .status()
        .with_context(|| format!("running {} release --all --offline", l.binary.display()))?;
    if !status.success() {
        bail!(
            "{} release --all --offline failed (see above): nothing was removed; \
             fix it and uninstall again",
            l.binary.display()
        );
    }
    Ok(())
}

pub fn install(args: &InstallArgs) -> Result<()> {
    if !crate::cmd::is_root() && args.root == Path::new("/") {
        bail!("installing into / needs root: sudo -E cargo xtask install (or --root DIR)");
    }
    let systemctl = !args.no_systemctl && systemd_running(&args.root);
    if args.uninstall {
        if systemctl {
            let _ = run(std::process::Command::new("systemctl").args([
                "disable",
                "--now",
                "cgsentry.service",
            ]));
        }
        release_everything(&args.root)?;
        uninstall_files(&args.root, args.purge)?;
        if systemctl {
            run(std::process::Command::new("systemctl").arg("daemon-reload"))?;
        }
        println!(
            "install: removed cgsentry{}",
            if args.purge {
                " and its configuration, journal and logs"
            } else {
                " (configuration kept in /etc/cgsentry)"
            }
        );
        return Ok(());
    }
    let binary = if let Some(b) = &args.binary {
        b.clone()
    } else {
        run(cargo().args(["build", "--release", "--package", "monitor"]))?;
        workspace_root().join("target/release/cgsentry")
    };
    for (path, outcome) in install_files(args, &binary)? {
        match outcome {
            Outcome::KeptEdited => println!(
                "install: kept your edited {}; the shipped version is {}.dist",
                path.display(),
                path.display()
            ),
            o => println!(
                "install: {} {}",
                path.display(),
                format!("{o:?}").to_lowercase()
            ),
        }
    }
    if systemctl {
        // What the boot's systemd-tmpfiles-setup would have made (see the file).
        run(std::process::Command::new("systemd-tmpfiles")
            .arg("--create")
            .arg(Layout::new(&args.root).tmpfiles))?;
        run(std::process::Command::new("systemctl").arg("daemon-reload"))?;
        run(std::process::Command::new("systemctl").args(["enable", "--now", "cgsentry.service"]))?;
        println!("install: cgsentry is running: `cgsentry status`, `journalctl -u cgsentry`");
    } else {
        println!(
            "install: files in place below {}; without systemd start it with\n  \
             /usr/local/sbin/cgsentry run --config /etc/cgsentry/cgsentry.toml",
            args.root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(root: &Path) -> InstallArgs {
        InstallArgs {
            root: root.to_owned(),
            binary: None,
            uninstall: false,
            purge: false,
            no_systemctl: true,
        }
    }

    /// A fresh install lays out the binary, the unit with its protections, the slice,
    /// the main file and every shipped policy.
    #[test]
    fn install_into_a_temporary_root() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("built");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        let done = install_files(&args(root.path()), &bin).unwrap();
        assert!(
            done.iter().all(|(_, o)| *o == Outcome::Installed),
            "{done:?}"
        );
        let r = root.path();
        assert!(r.join("usr/local/sbin/cgsentry").is_file());
        let unit = std::fs::read_to_string(r.join("etc/systemd/system/cgsentry.service")).unwrap();
        for want in [
            "OOMScoreAdjust=-1000",
            "Restart=on-failure",
            "MemoryMax=",
            "CPUQuota=",
            "CapabilityBoundingSet=CAP_BPF",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "ExecStart=/usr/local/sbin/cgsentry run --config /etc/cgsentry/cgsentry.toml",
        ] {
            assert!(unit.contains(want), "no {want} in the unit");
        }
        assert!(r.join("etc/systemd/system/cgsentry.slice").is_file());
        // The directories its ReadWritePaths= names, made at boot.
        let tmpfiles = std::fs::read_to_string(r.join("etc/tmpfiles.d/cgsentry.conf")).unwrap();
        for dir in ["/run/systemd/system.control", "/run/systemd/transient"] {
            assert!(
                tmpfiles.contains(&format!("d {dir} 0755 root root -")),
                "{dir}"
            );
            assert!(unit.contains(&format!(" -{dir}")), "{dir}");
        }
        assert_eq!(
            std::fs::read_to_string(r.join("etc/cgsentry/cgsentry.toml")).unwrap(),
            MAIN
        );
        let shipped = shipped_policies().unwrap();
        assert!(shipped.len() >= 3);
        for (name, text) in &shipped {
            assert_eq!(
                &std::fs::read_to_string(r.join("etc/cgsentry/policies.d").join(name)).unwrap(),
                text
            );
        }
    }

    /// A second install keeps an edited policy (new version beside it as .dist), updates
    /// an untouched one whose shipped version changed, leaves the rest alone; uninstall
    /// keeps the configuration unless purged.
    #[test]
    fn reinstall_keeps_edited_policies() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let bin = r.join("built");
        std::fs::write(&bin, "x").unwrap();
        install_files(&args(r), &bin).unwrap();
        let shipped = shipped_policies().unwrap();
        let (edited, untouched) = (&shipped[0].0, &shipped[1].0);
        let edited_path = r.join("etc/cgsentry/policies.d").join(edited);
        std::fs::write(&edited_path, "# mine\n").unwrap();
        // An older shipped version of the untouched file: as if the last install put it.
        let untouched_path = r.join("etc/cgsentry/policies.d").join(untouched);
        std::fs::write(&untouched_path, "# old shipped\n").unwrap();
        std::fs::write(
            r.join("var/lib/cgsentry/shipped").join(untouched),
            "# old shipped\n",
        )
        .unwrap();

        let done = install_files(&args(r), &bin).unwrap();
        let outcome = |p: &Path| &done.iter().find(|(q, _)| q == p).unwrap().1;
        assert_eq!(outcome(&edited_path), &Outcome::KeptEdited);
        assert_eq!(std::fs::read_to_string(&edited_path).unwrap(), "# mine\n");
        let dist = r
            .join("etc/cgsentry/policies.d")
            .join(format!("{edited}.dist"));
        assert_eq!(std::fs::read_to_string(dist).unwrap(), shipped[0].1);
        assert_eq!(outcome(&untouched_path), &Outcome::Updated);
        assert_eq!(
            std::fs::read_to_string(&untouched_path).unwrap(),
            shipped[1].1
        );
        assert_eq!(
            outcome(&r.join("etc/cgsentry/cgsentry.toml")),
            &Outcome::Unchanged
        );
        // A third install: still the operator's file.
        install_files(&args(r), &bin).unwrap();
        assert_eq!(std::fs::read_to_string(&edited_path).unwrap(), "# mine\n");

        uninstall_files(r, false).unwrap();
        assert!(!r.join("usr/local/sbin/cgsentry").exists());
        assert!(!r.join("etc/systemd/system/cgsentry.service").exists());
        assert!(!r.join("etc/tmpfiles.d/cgsentry.conf").exists());
        assert_eq!(std::fs::read_to_string(&edited_path).unwrap(), "# mine\n");
        uninstall_files(r, true).unwrap();
        assert!(!r.join("etc/cgsentry").exists());
    }
}
