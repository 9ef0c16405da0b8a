//! GPU against the real NVML: a small real allocation (256 MiB through the CUDA driver
//! API, libcuda.so.1) must show up as this process's GPU memory, attributed to this
//! process's cgroup. Where there is no NVML or no GPU the test says clearly that it was
//! skipped (the fake-library tests in `monitor/src/gpu.rs` and `tests/host` always run);
//! with `CGSENTRY_REQUIRE_GPU=1` a missing GPU fails it instead.
use std::{
    ffi::{c_int, c_uint, c_void},
    path::Path,
    time::{Duration, Instant},
};

use cgsentry::{
    cgroupfs::cgroup_of_pid,
    gpu::{GpuCollector, GpuStatus},
};

const ALLOC: usize = 256 << 20;

type CuResult = c_int;

/// The CUDA driver API calls the test needs, from libcuda.so.1.
struct Cuda {
    _lib: libloading::Library,
    ctx: *mut c_void,
    ptr: u64,
    mem_free: unsafe extern "C" fn(u64) -> CuResult,
    ctx_destroy: unsafe extern "C" fn(*mut c_void) -> CuResult,
}

impl Cuda {
    /// A context on device 0 holding `bytes` of device memory, all written.
    fn allocate(bytes: usize) -> Result<Self, String> {
        // SAFETY: libcuda.so.1's documented C ABI; each symbol is used with the
        // signature of cuda.h (v2 entry points, 64-bit device pointers).
        unsafe {
            let lib = libloading::Library::new("libcuda.so.1").map_err(|e| e.to_string())?;
            let sym = |name: &[u8]| -> Result<*const c_void, String> {
                lib.get::<*const c_void>(name)
                    .map(|s| *s)
                    .map_err(|e| e.to_string())
            };
            let init: unsafe extern "C" fn(c_uint) -> CuResult =
                std::mem::transmute(sym(b"cuInit\0")?);
            let device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult =
                std::mem::transmute(sym(b"cuDeviceGet\0")?);
            let ctx_create: unsafe extern "C" fn(*mut *mut c_void, c_uint, c_int) -> CuResult =
                std::mem::transmute(sym(b"cuCtxCreate_v2\0")?);
            let mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> CuResult =
                std::mem::transmute(sym(b"cuMemAlloc_v2\0")?);
            let memset: unsafe extern "C" fn(u64, u8, usize) -> CuResult =
                std::mem::transmute(sym(b"cuMemsetD8_v2\0")?);
            let ctx_sync: unsafe extern "C" fn() -> CuResult =
                std::mem::transmute(sym(b"cuCtxSynchronize\0")?);
            let mem_free: unsafe extern "C" fn(u64) -> CuResult =
                std::mem::transmute(sym(b"cuMemFree_v2\0")?);
            let ctx_destroy: unsafe extern "C" fn(*mut c_void) -> CuResult =
                std::mem::transmute(sym(b"cuCtxDestroy_v2\0")?);
            let check = |what: &str, r: CuResult| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(format!("{what} failed: CUresult {r}"))
                }
            };
            check("cuInit", init(0))?;
            let mut dev = 0;
            check("cuDeviceGet", device_get(&raw mut dev, 0))?;
            let mut ctx = std::ptr::null_mut();
            check("cuCtxCreate", ctx_create(&raw mut ctx, 0, dev))?;
            let mut ptr = 0u64;
            check("cuMemAlloc", mem_alloc(&raw mut ptr, bytes))?;
            check("cuMemsetD8", memset(ptr, 0x5a, bytes))?;
            check("cuCtxSynchronize", ctx_sync())?;
            Ok(Self {
                _lib: lib,
                ctx,
                ptr,
                mem_free,
                ctx_destroy,
            })
        }
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // SAFETY: the pointer and context this value created.
        unsafe {
            (self.mem_free)(self.ptr);
            (self.ctx_destroy)(self.ctx);
        }
    }
}

fn skip_or_fail(why: &str) {
    assert!(
        std::env::var_os("CGSENTRY_REQUIRE_GPU").is_none(),
        "CGSENTRY_REQUIRE_GPU is set but {why}"
    );
    eprintln!("SKIPPED: real-NVML test: {why} (the fake-NVML tests ran instead)");
}

#[test]
fn a_real_gpu_allocation_is_attributed_to_this_cgroup() {
    let proc_root = Path::new("/proc");
    let mut gpu = GpuCollector::open(None, proc_root);
    gpu.set_min_interval(Duration::ZERO);
    let devices = match gpu.status() {
        GpuStatus::Ready { devices } => devices,
        GpuStatus::Unavailable(reason) => return skip_or_fail(&format!("no GPU: {reason}")),
        GpuStatus::Off => unreachable!("not turned off"),
    };
    let me = std::process::id();
    let cgroup = cgroup_of_pid(proc_root, me).expect("this process's v2 cgroup");
    let before = gpu.sample(&[]).expect("a sample");
    let cuda = match Cuda::allocate(ALLOC) {
        Ok(c) => c,
        Err(e) => return skip_or_fail(&format!("NVML sees {devices} GPU(s) but CUDA failed: {e}")),
    };
    // The driver lists a process a moment after its context exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (snap, took) = loop {
        let t0 = Instant::now();
        let snap = gpu.sample(&[]).expect("a sample");
        let took = t0.elapsed();
        if snap.processes.iter().any(|p| p.pid == me) || Instant::now() > deadline {
            break (snap, took);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mine = snap
        .processes
        .iter()
        .find(|p| p.pid == me)
        .unwrap_or_else(|| panic!("pid {me} not among the GPU processes: {:?}", snap.processes));
    let d = snap.device(mine.device).expect("its device");
    let used = mine
        .used_bytes
        .expect("the driver reports per-process memory");
    eprintln!(
        "real NVML: {} ({}), driver {:?}: this process holds {} MiB after allocating {} MiB \
         (context overhead included), attributed to {:?}; device used {:?} → {:?} MiB of {:?}, \
         util {:?} %, {:?} °C, {:?} W; one sample of {} device(s) took {:.2} ms",
        d.name,
        d.uuid,
        snap.driver,
        used >> 20,
        ALLOC >> 20,
        mine.cgroup,
        before
            .device(mine.device)
            .and_then(|b| b.memory_used_bytes)
            .map(|b| b >> 20),
        d.memory_used_bytes.map(|b| b >> 20),
        d.memory_total_bytes.map(|b| b >> 20),
        d.util_percent,
        d.temperature_c,
        d.power_watts,
        snap.devices.len(),
        took.as_secs_f64() * 1000.0
    );
    assert!(used >= ALLOC as u64, "{used} bytes < the {ALLOC} allocated");
    assert_eq!(mine.cgroup.as_deref(), Some(cgroup.as_str()));
    assert_eq!(mine.state, cgsentry::gpu::ProcState::Running);
    let by = snap.by_cgroup();
    assert!(by[cgroup.as_str()][&mine.device].memory_bytes >= ALLOC as u64);
    drop(cuda);
}
