//! Compiles `fake_nvml.c` into `$OUT_DIR/libnvidia-ml.so.1`. cc builds static
//! archives only, so its compiler (with cc's flags for this target) is invoked
//! directly with `-shared`.
use std::{env, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib = out.join("libnvidia-ml.so.1");
    let compiler = cc::Build::new()
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-O1", "-std=c11", "-o"])
        .arg(&lib)
        .arg("fake_nvml.c")
        .arg("-ldl")
        .status()
        .expect("running the C compiler");
    assert!(status.success(), "compiling fake_nvml.c failed: {status}");
    println!("cargo:rerun-if-changed=fake_nvml.c");
    println!("cargo:rustc-env=FAKE_NVML_LIB={}", lib.display());
}
