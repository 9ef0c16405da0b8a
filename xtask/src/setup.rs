//! `cargo xtask setup`: installs what a fresh machine lacks to build, run and test
//! cgsentry. Each step checks first and says what it does and why; running it twice
//! does nothing the second time.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{as_root, output, run};

/// Debian packages and why we need each.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "inspect loaded programs and their cost (bench)"),
    (
        "qemu-system-x86",
        "boot the pure cgroup v2 test kernel (vm-test)",
    ),
    ("busybox-static", "userland of the VM's initramfs (vm-test)"),
    ("cpio", "pack the VM's initramfs (vm-test)"),
    (
        "mmdebstrap",
        "build the Debian image of systemd scenarios from Debian's packages (vm-test)",
    ),
];

struct Step {
    name: &'static str,
    why: &'static str,
    missing: fn() -> Option<String>,
    install: fn() -> Result<()>,
}

const STEPS: &[Step] = &[
    Step {
        name: "debian packages",
        why: "VM tests and benchmarks",
        missing: missing_packages,
        install: install_packages,
    },
    Step {
        name: "nightly rust-src",
        why: "eBPF programs are built with nightly's -Z build-std=core",
        missing: missing_rust_src,
        install: install_rust_src,
    },
    Step {
        name: "bpf-linker",
        why: "links the eBPF object; built against the LLVM 22 inside the nightly toolchain \
              (a plain `cargo install bpf-linker` wants a system LLVM this machine lacks)",
        missing: missing_bpf_linker,
        install: install_bpf_linker,
    },
];

/// What is missing, one line per step; empty when the machine is ready.
pub fn missing() -> Vec<String> {
    STEPS
        .iter()
        .filter_map(|s| (s.missing)().map(|m| format!("{}: {m}", s.name)))
        .collect()
}

/// Installs every missing piece. With `check_only`, only reports and fails if any is missing.
pub fn setup(check_only: bool) -> Result<()> {
    let mut missing_any = false;
    for step in STEPS {
        match (step.missing)() {
            None => eprintln!("setup: {:<18} ok", step.name),
            Some(what) if check_only => {
                missing_any = true;
                eprintln!(
                    "setup: {:<18} MISSING: {what} (needed for: {})",
                    step.name, step.why
                );
            }
            Some(what) => {
                eprintln!(
                    "setup: {:<18} installing: {what} (needed for: {})",
                    step.name, step.why
                );
                (step.install)().with_context(|| format!("setup step `{}` failed", step.name))?;
                if let Some(still) = (step.missing)() {
                    bail!(
                        "setup step `{}` ran but {still} is still missing",
                        step.name
                    );
                }
                eprintln!("setup: {:<18} installed", step.name);
            }
        }
    }
    if missing_any {
        bail!("the machine is not ready: run `cargo xtask setup`");
    }
    Ok(())
}

/// Runs setup when something is missing; used by build, run and test.
pub fn ensure() -> Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "setup: missing {}; running `cargo xtask setup` first",
        missing.join("; ")
    );
    setup(false)
}

/// Debian packages only `cargo xtask bench` needs (installed by it, not by setup/CI).
pub const BENCH_PACKAGES: &[(&str, &str)] = &[(
    "bpftrace",
    "the reference row: a bpftrace one-liner doing what our sched_switch program does",
)];

fn missing_packages() -> Option<String> {
    missing_of(DEBIAN_PACKAGES)
}

fn missing_of(packages: &[(&str, &str)]) -> Option<String> {
    let missing: Vec<&str> = packages
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| s.trim() != "install ok installed")
        })
        .collect();
    (!missing.is_empty()).then(|| missing.join(" "))
}

fn install_packages() -> Result<()> {
    install_missing(DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` is missing, saying why each is needed.
pub fn install_missing(packages: &[(&str, &str)]) -> Result<()> {
    let Some(missing) = missing_of(packages) else {
        return Ok(());
    };
    for (p, why) in packages {
        if missing.split(' ').any(|m| m == *p) {
            eprintln!("setup:   {p}: {why}");
        }
    }
    run(as_root("apt-get").args(["update", "-qq"]))?;
    run(as_root("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing.split(' ')))
}

fn nightly_sysroot() -> Option<PathBuf> {
    output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .map(PathBuf::from)
}

fn missing_rust_src() -> Option<String> {
    match nightly_sysroot() {
        None => Some("the nightly toolchain".into()),
        Some(sysroot) if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() => {
            Some("rust-src for nightly".into())
        }
        Some(_) => None,
    }
}

fn install_rust_src() -> Result<()> {
    if nightly_sysroot().is_none() {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
    } else {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    }
}

fn missing_bpf_linker() -> Option<String> {
    // `--version` also proves the binary still finds the nightly libLLVM it links to.
    match output(Command::new("bpf-linker").arg("--version")) {
        Some(_) => None,
        None if which::which("bpf-linker").is_ok() => {
            Some("bpf-linker (installed but does not run: its nightly LLVM moved)".into())
        }
        None => Some("bpf-linker".into()),
    }
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot().context("the nightly toolchain is needed first")?;
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.22") || n.starts_with("libLLVM-22"))
        })
        .with_context(|| format!("no libLLVM 22 in {}", lib.display()))?;
    let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    );
    let prefix = cargo_home.join("llvm-from-nightly");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    run(Command::new("cargo")
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        )
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))
}
