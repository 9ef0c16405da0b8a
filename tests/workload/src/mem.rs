//! Memory that really exists: fresh anonymous mappings whose every page is written
//! through a volatile pointer, so neither the optimiser nor the allocator can hide it.
use std::ptr::NonNull;

/// One anonymous private mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone.
unsafe impl Send for Mapping {}

pub const MIB: usize = 1 << 20;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

impl Mapping {
    /// Maps `len` bytes of fresh memory (straight from the kernel, never recycled by
    /// malloc) and writes every page.
    ///
    /// # Errors
    /// `mmap` failed (address space or overcommit limit).
    pub fn touched(len: usize) -> std::io::Result<Self> {
        // SAFETY: a new anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        let mapping = Self { ptr, len };
        mapping.touch();
        Ok(mapping)
    }

    /// Writes one byte in every page (again): keeps the pages resident and dirty.
    pub fn touch(&self) {
        let page = page_size();
        let mut off = 0;
        while off < self.len {
            // SAFETY: off < len, inside our mapping.
            unsafe { self.ptr.as_ptr().add(off).write_volatile(0xA5) };
            off += page;
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own exactly this mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
