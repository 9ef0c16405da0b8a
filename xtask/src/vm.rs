//! `cargo xtask vm-test`: boots Debian's 6.1 cloud kernel under QEMU (TCG) with a pure
//! cgroup v2 and a busybox initramfs holding cgsentry, the workload binary and one
//! scenario, runs the scenario (`workload vm-run`), and checks its `RESULT` line against
//! the scenario's expectations. A VM that does not boot, times out or prints no result
//! is a failed test, with the console's tail shown.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cgsentry_workload::scenario::{Guard, Image, Scenario};

use crate::cmd::{as_root, build_release_binaries, output, run, workspace_root};
use crate::wedge;

/// Applets the init script and scenarios use.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "cat", "echo", "sleep", "poweroff", "insmod", "mkswap", "swapon",
    "ifconfig",
];
/// Loaded in this order for a swap disk (no virtio is built into the cloud kernel).
pub(crate) const SWAP_MODULES: &[&str] = &[
    "virtio/virtio_ring",
    "virtio/virtio",
    "virtio/virtio_pci_legacy_dev",
    "virtio/virtio_pci_modern_dev",
    "virtio/virtio_pci",
    "block/virtio_blk",
];
/// How long a guest may take to power off after its `VM-EXIT` line.
const POWER_OFF_GRACE: Duration = Duration::from_secs(20);
/// A swap disk as slow as a real one: with a fast one the freeze never shows.
const SWAP_THROTTLE: &str = "throttling.bps-total=20971520,throttling.iops-total=500";

#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    /// Scenario names (files in tests/scenarios/, without .toml); default: all.
    pub scenarios: Vec<String>,
    /// Run each scenario N times and print a success-rate table.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Override the scenarios' VM memory (MiB).
    #[arg(long, value_name = "MiB")]
    pub mem: Option<u32>,
    /// Copy every console log here (they are always under target/vm/logs/).
    #[arg(long, value_name = "DIR")]
    pub keep_logs: Option<PathBuf>,
    /// How QEMU runs the guest's vCPUs: `multi` gives each its own host thread
    /// (MTTCG), `single` runs them round-robin on one thread.
    #[arg(long, value_enum, default_value_t = DEFAULT_TCG)]
    pub tcg_threads: Tcg,
    /// Run this `cgsentry` binary in the guests instead of the one just built (an
    /// older build, to see a scenario fail where a fix was missing).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Shipped policies from this directory instead of `policies/` (with --agent: the
    /// policies that build shipped).
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
}

pub const DEFAULT_TCG: Tcg = Tcg::Multi;

/// QEMU's TCG threading (`-accel tcg,thread=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tcg {
    Single,
    Multi,
}

pub struct Outcome {
    pub failures: Vec<String>,
    /// The runner's `RESULT` metrics (null when it printed none).
    pub metrics: serde_json::Value,
    wall: Duration,
    boot_s: Option<f64>,
    log: PathBuf,
    /// The guest wedged: its user space went silent (see [`SILENT`]), its kernel reported a
    /// stuck CPU, or a child outlived its SIGKILL.
    hung: bool,
}

/// A scenario's user space prints every tick (agent) and every second (workloads); this
/// long without a line from it means the guest (or QEMU's TCG) has wedged, whether or not
/// the kernel's lockup watchdog still prints.
const SILENT: Duration = Duration::from_mins(1);

/// How many times a run whose VM went silent is run again before it counts as failed.
const WEDGE_RERUNS: u32 = 2;

/// What every scenario's VM shares.
struct Vm<'a> {
    dir: &'a Path,
    kernel: &'a Kernel,
    tcg: Tcg,
    /// The agent binary and the shipped policies' directory put into the guest.
    agent: &'a Path,
    policies: &'a Path,
}

pub fn vm_test(args: &VmTestArgs) -> Result<()> {
    let suite = Instant::now();
    let (table, hangs) = run_suite(args)?;
    eprintln!(
        "\nvm-test: {:<20} {:>5} {:>6} {:>8} {:>10}",
        "scenario", "runs", "passed", "rate", "median s"
    );
    let mut failed = 0;
    for (name, outcomes) in &table {
        let passed = outcomes.iter().filter(|o| o.failures.is_empty()).count();
        failed += outcomes.len() - passed;
        let mut walls: Vec<f64> = outcomes.iter().map(|o| o.wall.as_secs_f64()).collect();
        walls.sort_by(f64::total_cmp);
        eprintln!(
            "vm-test: {:<20} {:>5} {:>6} {:>7.0}% {:>10.1}",
            name,
            outcomes.len(),
            passed,
            100.0 * passed as f64 / outcomes.len() as f64,
            walls[walls.len() / 2]
        );
    }
    let total: usize = table.values().map(Vec::len).sum();
    // The plain closing line CI reads in any language.
    println!("vm-test: {} passed, {failed} failed", total - failed);
    if hangs > 0 {
        println!(
            "vm-test: {hangs} run(s) re-run after the VM wedged (silent, a stuck vCPU, or a child stuck after SIGKILL)"
        );
    }
    eprintln!("vm-test: suite took {:.1} s", suite.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} VM scenario run(s) failed");
    }
    Ok(())
}

/// Runs the scenarios `args` names, each `args.repeat` times, printing each verdict;
/// returns every run's outcome by scenario and how many runs were re-run after a wedge.
pub fn run_suite(args: &VmTestArgs) -> Result<(BTreeMap<String, Vec<Outcome>>, u32)> {
    for (tool, why) in [
        ("qemu-system-x86_64", "boots the test kernel"),
        ("cpio", "packs the initramfs"),
    ] {
        if which::which(tool).is_err() {
            bail!("{tool} not found ({why}): run `cargo xtask setup`");
        }
    }
    if !Path::new("/bin/busybox").exists() {
        bail!("/bin/busybox not found (the VM's userland): run `cargo xtask setup`");
    }
    let root = workspace_root();
    let vm_dir = root.join("target/vm");
    let scenarios = scenario_paths(&root.join("tests/scenarios"), &args.scenarios)?;
    build_release_binaries()?;
    let kernel = ensure_kernel(&vm_dir.join("kernel"))?;
    let agent = args
        .agent
        .clone()
        .unwrap_or_else(|| root.join("target/release/cgsentry"));
    let policies = args
        .policies
        .clone()
        .unwrap_or_else(|| root.join("policies"));

    let mut table: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    let mut hangs = 0u32;
    for (name, path) in &scenarios {
        let mut scenario = Scenario::load(path)?;
        if let Some(mem) = args.mem {
            scenario.vm.mem_mib = mem;
        }
        for attempt in 1..=args.repeat.max(1) {
            eprintln!(
                "\x1b[1mvm-test: {name} (run {attempt}/{}): {}\x1b[0m",
                args.repeat.max(1),
                scenario.description
            );
            let vm = Vm {
                dir: &vm_dir,
                kernel: &kernel,
                tcg: args.tcg_threads,
                agent: &agent,
                policies: &policies,
            };
            let outcome = run_unwedged(&vm, name, path, &scenario, attempt, &mut hangs)?;
            if outcome.failures.is_empty() {
                eprintln!(
                    "vm-test: {name}: PASS in {:.1} s (boot {:.1} s)",
                    outcome.wall.as_secs_f64(),
                    outcome.boot_s.unwrap_or(f64::NAN)
                );
            } else {
                eprintln!(
                    "vm-test: {name}: FAIL in {:.1} s (log: {})",
                    outcome.wall.as_secs_f64(),
                    outcome.log.display()
                );
                for f in &outcome.failures {
                    eprintln!("vm-test:   - {f}");
                }
            }
            if let Some(dir) = &args.keep_logs {
                std::fs::create_dir_all(dir)?;
                std::fs::copy(
                    &outcome.log,
                    dir.join(outcome.log.file_name().expect("log file name")),
                )?;
            }
            table.entry(name.clone()).or_default().push(outcome);
        }
    }
    Ok((table, hangs))
}

/// Runs a scenario; a run whose VM went silent is run again up to [`WEDGE_RERUNS`]
/// times (counted in `hangs`). A wedged emulator is not a verdict on the scenario, so it
/// is not one, but it is said, with where the vCPUs were. Wedged on every try fails.
fn run_unwedged(
    vm: &Vm,
    name: &str,
    path: &Path,
    scenario: &Scenario,
    attempt: u32,
    hangs: &mut u32,
) -> Result<Outcome> {
    let mut outcome = run_scenario(vm, name, path, scenario, attempt)?;
    let mut reruns = 0;
    while outcome.hung && reruns < WEDGE_RERUNS {
        eprintln!(
            "vm-test: {name}: the VM wedged ({}): running it again",
            outcome.log.display()
        );
        for f in &outcome.failures {
            eprintln!("vm-test:   {}", f.trim());
        }
        *hangs += 1;
        reruns += 1;
        outcome = run_scenario(vm, name, path, scenario, attempt + 1000 * reruns)?;
    }
    Ok(outcome)
}

fn scenario_paths(dir: &Path, names: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut all: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter_map(|p| Some((p.file_stem()?.to_str()?.to_owned(), p.clone())))
        .collect();
    all.sort();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            // A path to a scenario file elsewhere (the benchmark's generated variants).
            let file = Path::new(n);
            if file.extension().is_some_and(|e| e == "toml") && file.is_file() {
                let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or(n);
                return Ok((stem.to_owned(), file.to_path_buf()));
            }
            all.iter()
                .find(|(name, _)| name == n)
                .cloned()
                .with_context(|| {
                    let known: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
                    format!("no scenario {n:?}; known: {}", known.join(", "))
                })
        })
        .collect()
}

struct Kernel {
    vmlinuz: PathBuf,
    modules: PathBuf,
    /// Names the guest's instruction pointers when it wedges ([`crate::wedge`]).
    system_map: PathBuf,
}

/// Debian's current cloud kernel, downloaded once and unpacked under `dir`.
fn ensure_kernel(dir: &Path) -> Result<Kernel> {
    let unpacked = dir.join("root");
    let find = || -> Option<Kernel> {
        let boot = std::fs::read_dir(unpacked.join("boot")).ok()?;
        let vmlinuz = boot.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })?;
        let modules = std::fs::read_dir(unpacked.join("lib/modules"))
            .ok()?
            .find_map(Result::ok)?
            .path()
            .join("kernel/drivers");
        let system_map = vmlinuz.with_file_name(vmlinuz.file_name()?.to_str()?.replacen(
            "vmlinuz-",
            "System.map-",
            1,
        ));
        Some(Kernel {
            vmlinuz,
            modules,
            system_map,
        })
    };
    if let Some(k) = find() {
        return Ok(k);
    }
    std::fs::create_dir_all(dir)?;
    let depends = || output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    let package = |text: Option<String>| {
        text.and_then(|t| {
            t.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("Depends: ")
                    .filter(|p| p.starts_with("linux-image-"))
                    .map(str::to_owned)
            })
        })
    };
    let pkg = if let Some(p) = package(depends()) {
        p
    } else {
        // A fresh machine may have no package lists yet.
        run(as_root("apt-get").args(["update", "-qq"]))?;
        package(depends()).context("apt-cache knows no linux-image-cloud-amd64")?
    };
    eprintln!(
        "vm-test: downloading the test kernel {pkg} (once; cached in {})",
        dir.display()
    );
    run(Command::new("apt-get")
        .current_dir(dir)
        .args(["download", "-q", &pkg]))?;
    let deb = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    find().context("the kernel package has no /boot/vmlinuz-* or /lib/modules")
}

/// Copies `bin` and the shared libraries it loads (per ldd) into `root`.
/// Where `ensure_guards` unpacks other guards' Debian packages.
pub fn guards_dir() -> PathBuf {
    workspace_root().join("target/vm/guards/root")
}

/// Unpacks Debian's `packages` (earlyoom…) under [`guards_dir`] for the VM, without
/// installing them on this machine (where they would start guarding it).
pub fn ensure_guards(packages: &[&str]) -> Result<()> {
    let dir = guards_dir();
    let debs = dir.with_file_name("debs");
    std::fs::create_dir_all(&debs)?;
    for p in packages {
        let unpacked = debs.join(format!("{p}.unpacked"));
        if unpacked.exists() {
            continue;
        }
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", p]))?;
        let deb = std::fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|f| {
                f.extension().is_some_and(|e| e == "deb")
                    && f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{p}_")))
            })
            .with_context(|| format!("apt-get download {p} left no .deb"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        std::fs::write(&unpacked, deb.display().to_string())?;
    }
    // Parts of Python's standard library no guard imports (the VM's initramfs is RAM).
    for unused in UNUSED_PYTHON {
        let path = dir.join(unused);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// Directories of Debian's Python 3.11 standard library left out of the VM.
const UNUSED_PYTHON: &[&str] = &[
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/unittest",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/asyncio",
    "usr/lib/python3.11/multiprocessing",
    "usr/lib/python3.11/email",
    "usr/lib/python3.11/xml",
    "usr/lib/python3.11/http",
    "usr/lib/python3.11/urllib",
];

fn install_binary(root: &Path, bin: &Path) -> Result<()> {
    let name = bin.file_name().context("binary name")?;
    std::fs::copy(bin, root.join("bin").join(name))
        .with_context(|| format!("copying {}", bin.display()))?;
    install_libraries(root, bin)
}

/// Copies the host libraries `elf` links (as `ldd` resolves them) into `root`.
fn install_libraries(root: &Path, elf: &Path) -> Result<()> {
    let ldd = output(Command::new("ldd").arg(elf)).unwrap_or_default();
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let lib = Path::new(lib.trim_end_matches([')', '(']));
        let dest = root.join(lib.strip_prefix("/").unwrap_or(lib));
        if dest.exists() {
            continue;
        }
        std::fs::create_dir_all(dest.parent().context("lib dir")?)?;
        std::fs::copy(lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

/// Regular files under `path` (itself, if it is one); symlinks are not followed.
fn regular_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            regular_files(&entry?.path(), out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_owned());
    }
    Ok(())
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Where the guard file at absolute path `file` is in the unpacked packages.
fn unpacked(file: &str) -> PathBuf {
    guards_dir().join(file.trim_start_matches('/'))
}

/// Carries a guard's `files` from the unpacked packages into `root` at the same paths,
/// with the host libraries its ELF files (programs, extension modules) link.
fn install_guard_files(root: &Path, guard: &Guard) -> Result<()> {
    for file in &guard.files {
        let src = unpacked(file);
        if !src.exists() {
            bail!(
                "guard {}: {file} is not in {} (`cargo xtask bench` unpacks the guards' \
                 packages there)",
                guard.name,
                guards_dir().display()
            );
        }
        let dest = root.join(file.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().context("guard file's directory")?)?;
        run(Command::new("cp").arg("-a").arg(&src).arg(&dest))?;
        let mut files = Vec::new();
        regular_files(&src, &mut files)?;
        for f in files.iter().filter(|f| is_elf(f)) {
            install_libraries(root, f)?;
        }
    }
    Ok(())
}

/// MiB that a guard's files add to the VM's initramfs, which lives in RAM: the
/// benchmark gives a guard's VM this much more memory, so that every guard has the
/// same memory to guard.
///
/// # Errors
/// A file is missing or unreadable.
pub fn guard_files_mib(files: &[&str]) -> Result<u32> {
    let mut bytes = 0u64;
    for file in files {
        let mut all = Vec::new();
        regular_files(&unpacked(file), &mut all)
            .with_context(|| format!("{file} in {}", guards_dir().display()))?;
        for f in all {
            bytes += std::fs::metadata(&f)?.len();
        }
    }
    Ok(u32::try_from(bytes.div_ceil(1 << 20))?)
}

/// Tracepoint subsystems the keeper holds open for the VM's life (every one the agent's
/// probes attach to, `monitor/src/probes.rs`): the agent's attach and detach then patch
/// no kernel text, which can wedge QEMU's multi-threaded TCG (`tests/workload/src/keeper.rs`).
const KEPT_SUBSYSTEMS: &str = "sched vmscan oom";

fn init_script(swap: bool) -> String {
    let mut modules = String::new();
    if swap {
        for m in SWAP_MODULES {
            let file = Path::new(m)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(m);
            let _ = writeln!(modules, "insmod /modules/{file}.ko");
        }
        modules.push_str("sleep 1\nmkswap /dev/vda >/dev/null && swapon /dev/vda || echo 'vm-run: swap setup failed'\n");
    }
    format!(
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t cgroup2 none /sys/fs/cgroup\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tracefs tracefs /sys/kernel/tracing\n\
         echo '+cpu +memory +pids +io +cpuset' > /sys/fs/cgroup/cgroup.subtree_control\n\
         export PATH=/bin\n\
         ifconfig lo 127.0.0.1 up\n\
         {modules}\
         /bin/workload keep-tracepoints {KEPT_SUBSYSTEMS} &\n\
         /bin/workload vm-run /scenario.toml\n\
         echo \"VM-EXIT $?\"\n\
         poweroff -f\n"
    )
}

fn build_initramfs(
    dir: &Path,
    kernel: &Kernel,
    scenario_file: &Path,
    scenario: &Scenario,
    agent: &Path,
    policies: &Path,
) -> Result<PathBuf> {
    let swap = scenario.vm.swap_mib > 0;
    let root = dir.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "etc", "modules"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let release = workspace_root().join("target/release");
    install_binary(&root, agent)?;
    install_binary(&root, &release.join("workload"))?;
    // Another guard, for side-by-side benchmarks: only its own files.
    if let Some(guard) = &scenario.guard {
        install_guard_files(&root, guard)?;
    }
    std::fs::copy(scenario_file, root.join("scenario.toml"))?;
    // The shipped policies, for scenarios that ask for them (`shipped_policies`).
    let shipped = root.join("usr/share/cgsentry/policies");
    std::fs::create_dir_all(&shipped)?;
    for entry in std::fs::read_dir(policies)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(
                &path,
                shipped.join(path.file_name().context("policy name")?),
            )?;
        }
    }
    if swap {
        for m in SWAP_MODULES {
            let src = kernel.modules.join(format!("{m}.ko"));
            let file = src.file_name().context("module name")?;
            std::fs::copy(&src, root.join("modules").join(file))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let init = root.join("init");
    std::fs::write(&init, init_script(swap))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let initrd = dir.join("initrd.gz");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio -o -H newc --quiet | gzip -1 > {}",
        initrd.display()
    )))?;
    Ok(initrd)
}

/// What one boot printed.
struct Console {
    lines: Vec<String>,
    wall: Duration,
    timed_out: bool,
    /// Seconds into the run at which the console went silent for [`SILENT`].
    silent_at: Option<f64>,
    /// Where each vCPU was when it went silent ([`crate::wedge::describe`]).
    wedged_cpus: Vec<String>,
}

fn run_scenario(
    vm: &Vm,
    name: &str,
    path: &Path,
    scenario: &Scenario,
    attempt: u32,
) -> Result<Outcome> {
    let Vm {
        dir: vm_dir,
        kernel,
        tcg,
        agent,
        policies,
    } = *vm;
    let dir = vm_dir.join("run").join(name);
    std::fs::create_dir_all(&dir)?;
    let (initrd, disk) = match scenario.vm.image {
        Image::Busybox => (
            build_initramfs(&dir, kernel, path, scenario, agent, policies)?,
            None,
        ),
        Image::Debian => {
            let tar = crate::debian::ensure_rootfs(vm_dir)?;
            let inputs = crate::debian::Inputs {
                tar: &tar,
                scenario_file: path,
                scenario,
                agent,
                workload: &workspace_root().join("target/release/workload"),
                policies,
                kept_subsystems: KEPT_SUBSYSTEMS,
                modules: &kernel.modules,
            };
            let (disk, initrd) = crate::debian::build(&dir, &inputs)?;
            (initrd, Some(disk))
        }
    };
    let console = boot(&dir, kernel, tcg, &initrd, disk.as_deref(), scenario)?;
    let logs = vm_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{name}-{attempt}.log"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&log)?);
    for l in &console.lines {
        writeln!(file, "{l}")?;
    }
    file.flush()?;
    Ok(judge(name, scenario, console, log))
}

/// QEMU's command line for one scenario: machine, memory, kernel, swap disk, monitor.
fn qemu_command(
    dir: &Path,
    kernel: &Kernel,
    tcg: Tcg,
    initrd: &Path,
    disk: Option<&Path>,
    scenario: &Scenario,
    monitor: &Path,
) -> Result<Command> {
    let _ = std::fs::remove_file(monitor);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        "q35",
        "-accel",
        match tcg {
            Tcg::Single => "tcg,thread=single",
            Tcg::Multi => "tcg,thread=multi",
        },
        "-cpu",
        "max",
        "-nographic",
        "-no-reboot",
    ])
    .args([
        "-smp",
        &scenario.vm.cpus.to_string(),
        "-m",
        &scenario.vm.mem_mib.to_string(),
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    // nokaslr: a wedged guest's instruction pointers are then the kernel's link addresses.
    .args([
        "-append",
        if disk.is_some() {
            // The root disk first (/dev/vda), the swap disk after it (/dev/vdb).
            "console=ttyS0 quiet panic=-1 nokaslr root=/dev/vda rw"
        } else {
            "console=ttyS0 quiet panic=-1 nokaslr"
        },
    ])
    .arg("-monitor")
    .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    if let Some(disk) = disk {
        qemu.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            disk.display()
        ));
    }
    if scenario.vm.swap_mib > 0 {
        let img = dir.join("swap.img");
        let _ = std::fs::remove_file(&img);
        std::fs::File::create(&img)?.set_len(u64::from(scenario.vm.swap_mib) << 20)?;
        let throttle = if scenario.vm.swap_throttle {
            format!(",{SWAP_THROTTLE}")
        } else {
            String::new()
        };
        qemu.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,cache=none{throttle}",
            img.display()
        ));
    }
    Ok(qemu)
}

/// Boots QEMU and collects the console until the VM powers off or times out.
fn boot(
    dir: &Path,
    kernel: &Kernel,
    tcg: Tcg,
    initrd: &Path,
    disk: Option<&Path>,
    scenario: &Scenario,
) -> Result<Console> {
    let monitor = dir.join("monitor.sock");
    let mut qemu = qemu_command(dir, kernel, tcg, initrd, disk, scenario, &monitor)?;
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let last_line = Arc::new(Mutex::new(Instant::now()));
    let lockup_seen = Arc::new(AtomicBool::new(false));
    // The scenario said its last word: the guest only has to power off.
    let exit_seen = Arc::new(Mutex::new(None::<Instant>));
    let streams: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped")),
        Box::new(child.stderr.take().expect("piped")),
    ];
    let pumps: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            let lines = lines.clone();
            let last_line = last_line.clone();
            let lockup_seen = lockup_seen.clone();
            let exit_seen = exit_seen.clone();
            std::thread::spawn(move || {
                // Lossy: firmware writes escape codes and the odd invalid byte.
                let mut reader = BufReader::new(stream);
                let mut buf = Vec::new();
                while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    buf.clear();
                    if line.contains("VM-EXIT") {
                        exit_seen.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                    if ["vm-run:", "VM-EXIT", "Kernel panic"]
                        .iter()
                        .any(|m| line.contains(m))
                    {
                        // From our marker on: firmware escape codes may precede it.
                        let start = line.find("vm-run:").unwrap_or(0);
                        eprintln!("  | {}", &line[start..]);
                    }
                    // The kernel's own lines do not count: its lockup watchdog goes on
                    // printing every ~28 s while a vCPU is stuck and user space is not.
                    if !from_kernel(&line) {
                        *last_line.lock().unwrap() = Instant::now();
                    } else if reports_lockup(&line) {
                        lockup_seen.store(true, Ordering::Relaxed);
                    }
                    lines.lock().unwrap().push(line);
                }
            })
        })
        .collect();
    let limit = Duration::from_secs(scenario.vm.timeout_s);
    let mut timed_out = false;
    let mut silent_at = None;
    let mut wedged_cpus = Vec::new();
    let where_cpus_are = || {
        let samples = wedge::sample(&monitor, 3, Duration::from_secs(1));
        let map = std::fs::read_to_string(&kernel.system_map).unwrap_or_default();
        wedge::describe(&samples, &wedge::Symbols::parse(&map))
    };
    while child.try_wait()?.is_none() {
        // The kernel named a stuck CPU: where it is stuck, while it still is.
        if wedged_cpus.is_empty() && lockup_seen.load(Ordering::Relaxed) {
            wedged_cpus = where_cpus_are();
        }
        // Past its VM-EXIT a guest that is slow to power off (a service that ignores
        // SIGTERM holds up systemd's shutdown) is done, not wedged.
        if exit_seen
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() > POWER_OFF_GRACE)
        {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        let silent = last_line.lock().unwrap().elapsed();
        if start.elapsed() > limit || silent > SILENT {
            if silent > SILENT {
                silent_at = Some(start.elapsed().saturating_sub(silent).as_secs_f64());
                wedged_cpus = where_cpus_are();
            } else {
                timed_out = true;
            }
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in pumps {
        let _ = p.join();
    }
    let lines = std::mem::take(&mut *lines.lock().unwrap());
    Ok(Console {
        lines,
        wall: start.elapsed(),
        timed_out,
        silent_at,
        wedged_cpus,
    })
}

/// A line printk wrote (`[   60.825861] watchdog: …`), after any firmware escape codes.
fn from_kernel(line: &str) -> bool {
    let mut line = line.trim_start();
    // ESC c, ESC [ … final byte: what SeaBIOS leaves at the start of the first line.
    while let Some(rest) = line.strip_prefix('\x1b') {
        line = match rest.strip_prefix('[') {
            Some(csi) => csi
                .find(|c: char| ('@'..='~').contains(&c))
                .map_or("", |end| &csi[end + 1..]),
            None => rest.get(1..).unwrap_or(""),
        };
    }
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim_start();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

/// What the guest kernel says when a CPU stopped scheduling: the soft-lockup watchdog,
/// RCU's stall detector, the hung-task detector.
const LOCKUP_MARKS: [&str; 4] = [
    "soft lockup",
    "rcu_preempt detected stalls",
    "self-detected stall",
    "blocked for more than",
];

fn reports_lockup(line: &str) -> bool {
    from_kernel(line) && LOCKUP_MARKS.iter().any(|m| line.contains(m))
}

/// Checks the console against the scenario: booted, result printed, runner exited 0,
/// every expectation met.
fn judge(name: &str, scenario: &Scenario, console: Console, log: PathBuf) -> Outcome {
    let Console {
        lines,
        wall,
        timed_out,
        silent_at,
        wedged_cpus,
    } = console;
    let mut failures = Vec::new();
    if let Some(at) = silent_at {
        failures.push(format!(
            "the VM went silent at {at:.1} s: no line from its user space for {} s",
            SILENT.as_secs()
        ));
    }
    // A vCPU stuck in the guest kernel (seen only under TCG, never on the host) wedges the
    // run as surely as silence does: its timings are void and it is run again.
    let lockup = lines.iter().find(|l| reports_lockup(l));
    if let Some(l) = lockup {
        failures.push(format!(
            "the guest kernel reported a stuck CPU: {}",
            l.trim()
        ));
    }
    for cpu in wedged_cpus {
        failures.push(format!("  {cpu}"));
    }
    if timed_out {
        failures.push(format!(
            "the VM timed out after {} s",
            scenario.vm.timeout_s
        ));
    }
    // The console may put firmware escape codes before our first line.
    let boot_s = lines.iter().find_map(|l| {
        let (_, rest) = l.split_once("vm-run: booted in ")?;
        rest.split(' ').next()?.parse().ok()
    });
    let exit = lines
        .iter()
        .rev()
        .find_map(|l| l.split_once("VM-EXIT ")?.1.trim().parse::<i32>().ok());
    let result = lines
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.split_once("RESULT ")?.1).ok());
    match (exit, &result) {
        (_, None) => {
            failures.push("no RESULT line (the VM did not boot, or the runner failed)".into());
        }
        (Some(0), Some(_)) => {}
        (code, Some(_)) => failures.push(format!("the runner exited with {code:?}")),
    }
    let stuck = result
        .as_ref()
        .and_then(|r| r["metrics"]["stuck_after_kill"].as_array())
        .is_some_and(|a| !a.is_empty());
    if let Some(result) = &result {
        let metrics = &result["metrics"];
        if stuck {
            failures.push(format!(
                "stuck in the guest kernel after SIGKILL: {}",
                metrics["stuck_after_kill"]
            ));
        }
        let shown = scenario
            .expect
            .keys()
            .map(String::as_str)
            .chain(["duration_ms", "stop_reason"]);
        let summary: Vec<String> = shown
            .map(|k| {
                let v = metrics
                    .get(k)
                    .map_or_else(|| "-".into(), ToString::to_string);
                format!("{k}={v}")
            })
            .collect();
        eprintln!("vm-test: {name}: {}", summary.join(" "));
        for (metric, expect) in &scenario.expect {
            if let Some(why) = expect.check(metric, metrics.get(metric)) {
                failures.push(why);
            }
        }
    }
    if !failures.is_empty() {
        eprintln!("vm-test: {name}: console tail:");
        let tail = lines.len().saturating_sub(25);
        for l in &lines[tail..] {
            let cut = l.char_indices().nth(300).map_or(l.len(), |(i, _)| i);
            let more = if cut < l.len() { " …" } else { "" };
            eprintln!("  | {}{more}", &l[..cut]);
        }
    }
    Outcome {
        failures,
        metrics: result.map_or(serde_json::Value::Null, |mut r| r["metrics"].take()),
        wall,
        boot_s,
        log,
        hung: silent_at.is_some() || lockup.is_some() || stuck,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(expect: &str) -> Scenario {
        Scenario::parse(&format!(
            "description = \"t\"\n[[workload]]\nname = \"a\"\ncgroup = \"/a\"\nargs = [\"spin\"]\n[expect]\n{expect}"
        ))
        .unwrap()
    }

    fn console(lines: &[&str]) -> Console {
        Console {
            lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            wall: Duration::from_secs(1),
            timed_out: false,
            silent_at: None,
            wedged_cpus: Vec::new(),
        }
    }

    /// A guest that went silent fails and is marked hung (the suite runs it once more).
    #[test]
    fn a_silent_vm_is_hung_and_fails() {
        let mut c = console(&["vm-run: booted in 2.0 s; scenario: t"]);
        c.silent_at = Some(27.3);
        c.wedged_cpus = vec!["vCPU 1: csd_lock_wait+0x1a".into()];
        let o = judge("t", &scenario("oom_kills = { min = 1 }"), c, PathBuf::new());
        assert!(o.hung);
        assert!(
            o.failures
                .iter()
                .any(|f| f.contains("went silent at 27.3 s")),
            "{:?}",
            o.failures
        );
        // Where the CPUs were is part of the verdict, so that it reaches the CI log.
        assert!(o.failures.iter().any(|f| f.contains("csd_lock_wait")));
        let o = judge(
            "t",
            &scenario("oom_kills = { min = 1 }"),
            console(&[]),
            PathBuf::new(),
        );
        assert!(!o.hung);
    }

    /// Judges `lines` (optionally timed out) and asserts a failure mentioning `needle`.
    fn assert_fails(lines: &[&str], timed_out: bool, needle: &str) {
        let mut c = console(lines);
        c.timed_out = timed_out;
        let o = judge("t", &scenario("oom_kills = { min = 1 }"), c, PathBuf::new());
        assert!(
            o.failures.iter().any(|f| f.contains(needle)),
            "{needle}: {:?}",
            o.failures
        );
    }

    #[test]
    fn kernel_lines_are_told_from_user_space() {
        assert!(from_kernel(
            "[   60.825861] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [cgsentry:124]"
        ));
        assert!(from_kernel("\x1bc\x1b[?7l[    3.1] x"));
        assert!(!from_kernel("[agent] tick: top \"/service\" 42 %"));
        assert!(!from_kernel("[agent-log] 2026-11-23T09:48:21Z INFO"));
        assert!(!from_kernel("vm-run: started leaker in /leak"));
        assert!(!from_kernel("[] x"));
    }

    /// A stuck CPU in the guest kernel, or a child that outlived its SIGKILL, wedges the
    /// run (it is run again) even when the runner got its result out.
    #[test]
    fn a_stuck_cpu_is_hung_and_fails() {
        let judged = |lines: &[&str]| {
            judge(
                "t",
                &scenario("oom_kills = { min = 1 }"),
                console(lines),
                PathBuf::new(),
            )
        };
        let ok = "RESULT {\"metrics\":{\"oom_kills\":1}}";
        let lockup =
            "[   60.825861] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [cgsentry:124]";
        let o = judged(&[ok, lockup, "VM-EXIT 0"]);
        assert!(o.hung);
        assert!(
            o.failures.iter().any(|f| f.contains("soft lockup")),
            "{:?}",
            o.failures
        );
        let stuck = "RESULT {\"metrics\":{\"oom_kills\":1,\"stuck_after_kill\":[\"agent\"]}}";
        let o = judged(&[stuck, "VM-EXIT 0"]);
        assert!(o.hung);
        assert!(
            o.failures.iter().any(|f| f.contains("agent")),
            "{:?}",
            o.failures
        );
        // The words alone in user space's output are not the kernel's report.
        let o = judged(&[ok, "[agent-log] no soft lockup here", "VM-EXIT 0"]);
        assert!(!o.hung && o.failures.is_empty(), "{:?}", o.failures);
    }

    #[test]
    fn a_vm_that_prints_nothing_fails() {
        assert_fails(
            &["SeaBIOS", "Kernel panic - not syncing"],
            false,
            "no RESULT",
        );
    }

    #[test]
    fn a_timeout_fails_even_with_a_result() {
        let ok = "RESULT {\"metrics\":{\"oom_kills\":1}}";
        assert_fails(&[ok, "VM-EXIT 0"], true, "timed out");
    }

    #[test]
    fn runner_failure_fails() {
        let ok = "RESULT {\"metrics\":{\"oom_kills\":1}}";
        assert_fails(&[ok, "VM-EXIT 1"], false, "exited with Some(1)");
    }

    #[test]
    fn result_is_checked_against_expectations() {
        let s = scenario("oom_kills = { min = 1 }\n\"survived:a\" = { equals = false }");
        let lines = [
            "\x1bc\x1b[2Jvm-run: booted in 3.5 s; scenario: t",
            "RESULT {\"metrics\":{\"oom_kills\":2,\"survived:a\":false}}",
            "VM-EXIT 0",
        ];
        let o = judge("t", &s, console(&lines), PathBuf::new());
        assert!(o.failures.is_empty(), "{:?}", o.failures);
        assert_eq!(o.boot_s, Some(3.5));

        let lines = [
            "RESULT {\"metrics\":{\"oom_kills\":0,\"survived:a\":false}}",
            "VM-EXIT 0",
        ];
        let o = judge("t", &s, console(&lines), PathBuf::new());
        assert_eq!(o.failures, vec!["oom_kills: 0 < 1".to_owned()]);
    }

    #[test]
    fn init_loads_swap_modules_in_order() {
        let init = init_script(true);
        let pos = |m: &str| init.find(&format!("/modules/{m}.ko")).unwrap();
        assert!(pos("virtio_ring") < pos("virtio") && pos("virtio_pci") < pos("virtio_blk"));
        assert!(init.contains("swapon /dev/vda"));
        assert!(!init_script(false).contains("insmod"));
        assert!(init.contains("/bin/workload vm-run /scenario.toml"));
        assert!(init.contains("/bin/workload keep-tracepoints sched vmscan oom &"));
    }

    /// Every tracepoint subsystem the agent attaches to is held by the keeper.
    #[test]
    fn the_keeper_holds_every_subsystem_the_agent_uses() {
        let probes = include_str!("../../monitor/src/probes.rs");
        let kept: Vec<&str> = KEPT_SUBSYSTEMS.split(' ').collect();
        let mut used = 0;
        for (i, _) in probes.match_indices("tracepoints: &[") {
            let list = &probes[i..i + probes[i..].find(']').unwrap()];
            for part in list.split("(\"").skip(1) {
                let sub = part.split('"').next().unwrap();
                assert!(kept.contains(&sub), "{sub} is not kept: {KEPT_SUBSYSTEMS}");
                used += 1;
            }
        }
        assert!(
            used >= 10,
            "the probe list was not found ({used} tracepoints)"
        );
    }
}
