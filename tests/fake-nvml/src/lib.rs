//! A scripted `libnvidia-ml.so.1` for tests: [`FakeNvml`] puts a copy of the library
//! and its script (format: the comment at the top of `fake_nvml.c`) in a directory of
//! its own, so that tests in one process each load their own instance.
use std::{
    ffi::{CString, c_char},
    io,
    path::{Path, PathBuf},
};

/// The library as built (`$OUT_DIR/libnvidia-ml.so.1`).
pub const LIB: &str = env!("FAKE_NVML_LIB");

/// A private copy of the fake library with its script.
pub struct FakeNvml {
    dir: tempfile::TempDir,
}

impl FakeNvml {
    /// Copies the library into a new directory and writes `script` next to it.
    ///
    /// # Errors
    /// The directory or a file could not be written.
    pub fn new(script: &str) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fake-nvml").tempdir()?;
        std::fs::copy(LIB, dir.path().join("libnvidia-ml.so.1"))?;
        let fake = Self { dir };
        fake.set_script(script)?;
        Ok(fake)
    }

    /// The path to load (`Nvml::builder().lib_path(...)`).
    #[must_use]
    pub fn lib_path(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// The directory holding the library and its script.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the script; the library reads it at its next `nvmlInit_v2`.
    ///
    /// # Errors
    /// The file could not be written.
    pub fn set_script(&self, script: &str) -> io::Result<()> {
        std::fs::write(self.dir.path().join("fake-nvml.script"), script)
    }

    /// How often `nvmlInit_v2` was called in this copy, failed calls included.
    #[must_use]
    pub fn inits(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("fake-nvml.inits"))
            .map_or(0, |s| s.lines().count())
    }

    /// How often `function` was called in the loaded copy (0 before it was loaded; a
    /// failed `nvmlInit_v2` unloads it: see [`FakeNvml::inits`]).
    ///
    /// # Panics
    /// The library cannot be loaded or lacks its counter (a build problem).
    #[must_use]
    pub fn calls(&self, function: &str) -> i64 {
        // SAFETY: the library is ours; loading it runs no initialisers, and
        // `fake_nvml_calls` has this signature (fake_nvml.c). The same path returns the
        // instance the code under test loaded, if any.
        unsafe {
            let lib = libloading::Library::new(self.lib_path()).expect("loading the fake NVML");
            let f: libloading::Symbol<'_, unsafe extern "C" fn(*const c_char) -> i64> =
                lib.get(b"fake_nvml_calls\0").expect("fake_nvml_calls");
            let name = CString::new(function).expect("no NUL in a function name");
            let n = f(name.as_ptr());
            // Keep it loaded: unloading could drop the instance under test's state.
            std::mem::forget(lib);
            n
        }
    }
}
