//! One function per behaviour. Each prints JSON status lines (`{"workload": ...}`) on
//! stdout: once a second and at the end, so a runner always has the latest state.
use std::{
    io::{Read as _, Write as _},
    os::fd::{FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::mem::{MIB, Mapping};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGTERM/SIGINT set a flag the loops poll, so they can print a final status.
pub fn install_stop_handler() {
    let handler = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

/// Whether a SIGTERM/SIGINT asked this process to stop.
#[must_use]
pub fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

pub fn status(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Grows by `mib_per_s` (0: as fast as possible) in `chunk_mib` steps, never frees, up
/// to `max_mib` (0: no limit), then holds.
pub fn leak(mib_per_s: f64, chunk_mib: usize, max_mib: usize) -> Result<()> {
    let start = Instant::now();
    let mut held: Vec<Mapping> = Vec::new();
    let mut last_status = Instant::now();
    while !stopping() {
        let total = held.len() * chunk_mib;
        if max_mib == 0 || total < max_mib {
            held.push(Mapping::touched(chunk_mib * MIB).context("leak: mmap")?);
        }
        let total = held.len() * chunk_mib;
        if mib_per_s > 0.0 {
            let due = Duration::from_secs_f64(total as f64 / mib_per_s);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        } else if max_mib != 0 && total >= max_mib {
            std::thread::sleep(Duration::from_millis(100));
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            status(&json!({"workload": "leak", "mib": total, "elapsed_ms": ms(start.elapsed())}));
            last_status = Instant::now();
        }
    }
    status(&json!({"workload": "leak", "mib": held.len() * chunk_mib, "final": true}));
    Ok(())
}

/// `threads` busy loops for `seconds` (0: until stopped).
pub fn spin(threads: usize, seconds: f64) {
    let start = Instant::now();
    let deadline = (seconds > 0.0).then(|| start + Duration::from_secs_f64(seconds));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stopping() && deadline.is_none_or(|d| Instant::now() < d) {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1),
                        );
                    }
                }
                x
            })
        })
        .collect();
    let mut last_status = Instant::now();
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if last_status.elapsed() >= Duration::from_secs(1) {
            status(
                &json!({"workload": "spin", "threads": threads, "elapsed_ms": ms(start.elapsed())}),
            );
            last_status = Instant::now();
        }
    }
    for w in workers {
        let _ = w.join();
    }
    status(&json!({"workload": "spin", "threads": threads, "final": true}));
}

/// Rises to `to_mib` over `rise_s`, holds `hold_s` (pages kept hot), frees, exits 0:
/// a legitimate burst, like a compiler or a model load.
pub fn spike(to_mib: usize, rise_s: f64, hold_s: f64) -> Result<()> {
    const STEP_MIB: usize = 8;
    let start = Instant::now();
    let steps = to_mib.div_ceil(STEP_MIB).max(1);
    let mut held = Vec::with_capacity(steps);
    for i in 0..steps {
        if stopping() {
            break;
        }
        held.push(Mapping::touched(STEP_MIB * MIB).context("spike: mmap")?);
        let due = Duration::from_secs_f64(rise_s * (i + 1) as f64 / steps as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    status(&json!({"workload": "spike", "mib": held.len() * STEP_MIB, "phase": "plateau"}));
    let hold_until = Instant::now() + Duration::from_secs_f64(hold_s);
    while Instant::now() < hold_until && !stopping() {
        std::thread::sleep(Duration::from_millis(500));
        for m in &held {
            m.touch();
        }
    }
    drop(held);
    status(&json!({"workload": "spike", "final": true, "elapsed_ms": ms(start.elapsed())}));
    Ok(())
}

/// What a gap between beats lost to a stall: beyond one period, if it was more than two.
fn stall(gap: Duration, period: Duration) -> Duration {
    if gap > 2 * period {
        gap.saturating_sub(period)
    } else {
        Duration::ZERO
    }
}

/// Every `period_ms` (a fixed rate: the beat's own work does not stretch the period):
/// map `mib` of fresh memory, touch it, unmap it — what a new request or command does —
/// and record the largest time between two beats and the time lost to stalls. A
/// machine that thrashes or freezes shows here; a heartbeat that only sleeps would not
/// notice.
pub fn heartbeat(period_ms: u64, mib: usize) -> Result<()> {
    let period = Duration::from_millis(period_ms);
    let start = Instant::now();
    let mut last = Instant::now();
    let mut next = last + period;
    let mut max_gap = Duration::ZERO;
    // Time lost to stalls: what each gap of more than two periods took beyond one period.
    // Unlike the largest gap, this adds up many medium stalls (a thrashing machine that
    // never stops for seconds at a time still loses most of its beats).
    let mut stalled = Duration::ZERO;
    let mut beats = 0u64;
    // The largest gap since the last status line: which second a stall fell in (the
    // runner sets aside those its own operator commands caused).
    let mut recent_gap = Duration::ZERO;
    let mut last_status = Instant::now();
    while !stopping() {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Late (the machine stalled): the next beat is a period from now, not a burst
        // of catch-up beats.
        next = (next + period).max(Instant::now());
        drop(Mapping::touched(mib * MIB).context("heartbeat: mmap")?);
        let now = Instant::now();
        let gap = now - last;
        max_gap = max_gap.max(gap);
        recent_gap = recent_gap.max(gap);
        stalled += stall(gap, period);
        last = now;
        beats += 1;
        if now - last_status >= Duration::from_secs(1) {
            status(
                &json!({"workload": "heartbeat", "beats": beats, "max_gap_ms": ms(max_gap),
                        "recent_max_gap_ms": ms(recent_gap),
                        "stalled_ms": ms(stalled), "elapsed_ms": ms(start.elapsed())}),
            );
            last_status = now;
            recent_gap = Duration::ZERO;
        }
    }
    // The time since the last beat counts too: a heartbeat stopped while stalled.
    let tail = last.elapsed();
    max_gap = max_gap.max(tail);
    recent_gap = recent_gap.max(tail);
    stalled += stall(tail, period);
    status(
        &json!({"workload": "heartbeat", "beats": beats, "max_gap_ms": ms(max_gap),
                "recent_max_gap_ms": ms(recent_gap),
                "stalled_ms": ms(stalled), "final": true}),
    );
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Incident D: a process pool handed far more work than the machine holds, at once.
/// `workers` processes are forked first; then the parent queues `jobs` jobs whose
/// arguments (`mib_each` MiB each) it allocates up front, as fast as it can — the
/// queued futures that ate the machine. A worker takes a job, needs `mib_each` MiB of
/// working memory for `hold_ms`, and reports it done; the parent then frees its
/// arguments. With finite jobs it finishes, given room, and exits 0 with every job done.
pub fn pool_explosion(jobs: usize, mib_each: usize, workers: usize, hold_ms: u64) -> Result<()> {
    let (job_rx, job_tx) = pipe()?;
    let (done_rx, done_tx) = pipe()?;
    let mut children = Vec::new();
    for _ in 0..workers.max(1) {
        // SAFETY: we are single-threaded here (no thread has been spawned yet), so the
        // child may run arbitrary code.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                drop(job_tx);
                drop(done_rx);
                std::process::exit(pool_worker(&job_rx, &done_tx, mib_each, hold_ms));
            }
            pid => children.push(pid),
        }
    }
    drop(job_rx);
    drop(done_tx);
    let start = Instant::now();
    let mut job_pipe = std::fs::File::from(job_tx);
    let queue: std::sync::Arc<std::sync::Mutex<Vec<Option<Mapping>>>> =
        std::sync::Arc::new(std::sync::Mutex::new((0..jobs).map(|_| None).collect()));
    let reaper = {
        let queue = queue.clone();
        let mut done_pipe = std::fs::File::from(done_rx);
        std::thread::spawn(move || {
            let mut done = 0usize;
            let mut buf = [0u8; 4];
            while done_pipe.read_exact(&mut buf).is_ok() {
                let id = u32::from_ne_bytes(buf) as usize;
                if let Some(slot) = queue.lock().unwrap().get_mut(id) {
                    *slot = None; // frees the job's arguments
                }
                done += 1;
            }
            done
        })
    };
    let mut last_status = Instant::now();
    for id in 0..jobs {
        if stopping() {
            break;
        }
        let args = Mapping::touched(mib_each * MIB).context("pool: mmap")?;
        queue.lock().unwrap()[id] = Some(args);
        let id32 = u32::try_from(id).context("too many jobs")?;
        job_pipe
            .write_all(&id32.to_ne_bytes())
            .context("queueing a job")?;
        if last_status.elapsed() >= Duration::from_secs(1) {
            status(
                &json!({"workload": "pool", "queued": id + 1, "elapsed_ms": ms(start.elapsed())}),
            );
            last_status = Instant::now();
        }
    }
    status(
        &json!({"workload": "pool", "queued": jobs, "phase": "all queued", "elapsed_ms": ms(start.elapsed())}),
    );
    drop(job_pipe); // workers exit at EOF
    for pid in children {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut st, 0) };
    }
    let done = reaper.join().unwrap_or(0);
    status(
        &json!({"workload": "pool", "jobs": jobs, "jobs_done": done, "final": true,
                   "elapsed_ms": ms(start.elapsed())}),
    );
    if done == jobs {
        Ok(())
    } else {
        bail!("pool: {done} of {jobs} jobs done")
    }
}

fn pool_worker(jobs: &OwnedFd, done: &OwnedFd, mib_each: usize, hold_ms: u64) -> i32 {
    let mut jobs = std::fs::File::from(jobs.try_clone().expect("dup job fd"));
    let mut done = std::fs::File::from(done.try_clone().expect("dup done fd"));
    let mut buf = [0u8; 4];
    while jobs.read_exact(&mut buf).is_ok() {
        match Mapping::touched(mib_each * MIB) {
            Ok(work) => {
                std::thread::sleep(Duration::from_millis(hold_ms));
                drop(work);
            }
            Err(_) => return 1,
        }
        if done.write_all(&buf).is_err() {
            return 1;
        }
    }
    0
}

fn pin_to_cpu0() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Context-switch throughput: two processes pinned to CPU 0 pass one byte back and
/// forth through pipes for `seconds`; every round trip is two switches and two wakeups.
pub fn pingpong(seconds: f64) -> Result<()> {
    pin_to_cpu0()?;
    let (a_rx, a_tx) = pipe()?;
    let (b_rx, b_tx) = pipe()?;
    // SAFETY: single-threaded here; the child only does pipe I/O and exits.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            // The parent's ends must close here, or the child never sees EOF.
            drop(a_tx);
            drop(b_rx);
            let mut rx = std::fs::File::from(a_rx);
            let mut tx = std::fs::File::from(b_tx);
            let mut byte = [0u8; 1];
            while rx.read_exact(&mut byte).is_ok() && tx.write_all(&byte).is_ok() {}
            std::process::exit(0);
        }
        _ => {}
    }
    drop(a_rx);
    drop(b_tx);
    let mut tx = std::fs::File::from(a_tx);
    let mut rx = std::fs::File::from(b_rx);
    let mut byte = [1u8; 1];
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(seconds);
    let mut rounds = 0u64;
    while start.elapsed() < deadline {
        for _ in 0..1000 {
            tx.write_all(&byte).context("ping")?;
            rx.read_exact(&mut byte).context("pong")?;
        }
        rounds += 1000;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(tx);
    // SAFETY: reaping our child.
    unsafe { libc::wait(std::ptr::null_mut()) };
    status(
        &json!({"workload": "pingpong", "round_trips": rounds, "seconds": elapsed,
                   "round_trips_per_s": rounds as f64 / elapsed}),
    );
    Ok(())
}

/// Creates `cgroups` child cgroups under `root` and parks `processes` idle processes
/// across them (round robin) until SIGTERM; then kills them and removes the cgroups.
/// Load for measuring the agent's own cost.
pub fn park(root: &std::path::Path, cgroups: usize, processes: usize) -> Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("mkdir {}", root.display()))?;
    let dirs: Vec<std::path::PathBuf> = (0..cgroups.max(1))
        .map(|i| root.join(format!("cg{i:05}")))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    let mut children = Vec::with_capacity(processes);
    for i in 0..processes {
        let procs = std::fs::File::options()
            .write(true)
            .open(dirs[i % dirs.len()].join("cgroup.procs"))?;
        // SAFETY: single-threaded; the child writes its cgroup and sleeps.
        match unsafe { libc::fork() } {
            -1 => bail!("fork #{i}: {}", std::io::Error::last_os_error()),
            0 => {
                let mut procs = procs;
                let _ = procs.write_all(b"0");
                drop(procs);
                loop {
                    // SAFETY: pause has no preconditions.
                    unsafe { libc::pause() };
                }
            }
            pid => children.push(pid),
        }
    }
    status(
        &json!({"workload": "park", "cgroups": dirs.len(), "processes": children.len(), "phase": "parked"}),
    );
    while !stopping() {
        std::thread::sleep(Duration::from_millis(200));
    }
    for &pid in &children {
        // SAFETY: signalling and reaping our own children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in &children {
        let mut st = 0;
        // SAFETY: as above.
        unsafe { libc::waitpid(pid, &raw mut st, 0) };
    }
    for d in dirs.iter().chain(std::iter::once(&root.to_path_buf())) {
        let _ = std::fs::remove_dir(d);
    }
    status(&json!({"workload": "park", "final": true}));
    Ok(())
}

/// Creates `count` cgroups under `root` (no controllers: a delegated user's cheapest
/// way to make many) and runs one short-lived process in each, so that the kernel
/// side sees every one of them; then exits 0. What any user with a delegated subtree
/// can do to fill a per-cgroup eBPF map.
pub fn cgroup_flood(root: &std::path::Path, count: usize) -> Result<()> {
    let start = Instant::now();
    for i in 0..count {
        let dir = root.join(format!("c{i:05}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => bail!("mkdir {}: {e}", dir.display()),
        }
        let procs = std::fs::File::options()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .with_context(|| format!("{}/cgroup.procs", dir.display()))?;
        // SAFETY: single-threaded; the child moves itself and exits at once.
        match unsafe { libc::fork() } {
            -1 => bail!("fork #{i}: {}", std::io::Error::last_os_error()),
            0 => {
                let mut procs = procs;
                let code = i32::from(procs.write_all(b"0").is_err());
                // SAFETY: leaving the child without running the parent's destructors.
                unsafe { libc::_exit(code) };
            }
            pid => {
                let mut st = 0;
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid, &raw mut st, 0) };
            }
        }
        if i % 500 == 0 {
            status(
                &json!({"workload": "cgroup-flood", "cgroups": i, "elapsed_ms": ms(start.elapsed())}),
            );
        }
        if stopping() {
            break;
        }
    }
    status(
        &json!({"workload": "cgroup-flood", "cgroups": count, "elapsed_ms": ms(start.elapsed()), "final": true}),
    );
    Ok(())
}

/// Holds `count` idle TCP connections to `addr` (a metrics port), opening again
/// those the server closes, until SIGTERM: a local user's way to exhaust a server's
/// file descriptors.
pub fn conn_flood(addr: std::net::SocketAddr, count: usize) -> Result<()> {
    raise_file_limit();
    let start = Instant::now();
    let mut open: Vec<std::net::TcpStream> = Vec::with_capacity(count);
    let (mut opened, mut failed) = (0u64, 0u64);
    let mut last_status = Instant::now();
    while !stopping() {
        // Drop the ones the server closed (a read of 0 bytes), keep the idle ones.
        open.retain(|c| {
            let mut b = [0u8; 64];
            match (&*c).read(&mut b) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
        while open.len() < count && !stopping() {
            let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            else {
                failed += 1;
                break; // the accept queue is full: try again next round
            };
            c.set_nonblocking(true)?;
            open.push(c);
            opened += 1;
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            status(
                &json!({"workload": "conn-flood", "open": open.len(), "opened": opened, "failed": failed, "elapsed_ms": ms(start.elapsed())}),
            );
            last_status = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    status(
        &json!({"workload": "conn-flood", "open": open.len(), "opened": opened, "failed": failed, "final": true}),
    );
    Ok(())
}

/// The soft open-file limit up to the hard one (a thousand sockets need it).
fn raise_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_counts_beyond_one_period_once_a_beat_is_missed() {
        let ms = Duration::from_millis;
        assert_eq!(stall(ms(150), ms(100)), Duration::ZERO); // late, no beat missed
        assert_eq!(stall(ms(200), ms(100)), Duration::ZERO);
        assert_eq!(stall(ms(250), ms(100)), ms(150));
        assert_eq!(stall(ms(5100), ms(100)), ms(5000));
    }
}
