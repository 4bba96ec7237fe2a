//! Memory for registered buffers, with an inaccessible page on each side.
//!
//! Every buffer the device may read or write (receive and send rings, the target SGL, message
//! buffers) is its own mapping between two `PROT_NONE` pages. A copy or a work request that
//! strays past either end of a buffer faults at once instead of reading or overwriting the
//! neighbouring memory, in every build: the pages cost address space only.

use std::io;
use std::ptr::NonNull;

use super::last_error;

/// A zeroed, page-aligned mapping of at least `len` bytes, guarded on both sides.
#[derive(Debug)]
pub(super) struct Guarded {
    /// Start of the whole mapping (the leading guard page).
    base: NonNull<u8>,
    /// Bytes of the whole mapping: the pages of the buffer plus the two guards.
    total: usize,
    /// The buffer's first byte (just past the leading guard page).
    buf: NonNull<u8>,
}

// SAFETY: owns its mapping; the raw pointer is only an address.
unsafe impl Send for Guarded {}

/// The page size.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

impl Guarded {
    /// Maps a buffer of `len` bytes (rounded up to whole pages, at least one).
    pub(super) fn new(len: usize) -> io::Result<Self> {
        let page = page_size();
        let pages = len.max(1).div_ceil(page);
        let inner = pages
            .checked_mul(page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let total = inner
            .checked_add(2 * page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_error());
        }
        let base = NonNull::new(base as *mut u8).expect("mmap returned a mapping");
        // SAFETY: the mapping is inner + 2 pages long.
        let buf = unsafe { NonNull::new_unchecked(base.as_ptr().add(page)) };
        let g = Guarded { base, total, buf };
        // SAFETY: the pages between the guards lie inside the mapping made above.
        let r = unsafe {
            libc::mprotect(
                buf.as_ptr() as *mut _,
                inner,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r != 0 {
            return Err(last_error());
        }
        Ok(g)
    }

    /// The buffer's first byte (just past the leading guard page).
    pub(super) fn ptr(&self) -> NonNull<u8> {
        self.buf
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; its users (the MR) are gone.
        unsafe { libc::munmap(self.base.as_ptr() as *mut _, self.total) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether touching `addr` in a child process kills it with SIGSEGV.
    fn faults(addr: *mut u8, write: bool) -> bool {
        // SAFETY: the child only touches one byte and exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                if write {
                    std::ptr::write_volatile(addr, 1);
                } else {
                    std::ptr::read_volatile(addr);
                }
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV
        }
    }

    #[test]
    fn a_buffer_is_usable_to_its_end_and_faults_just_outside() {
        let page = page_size();
        for len in [1, page - 1, page, page + 1, 5 * page + 7] {
            let g = Guarded::new(len).unwrap();
            let p = g.ptr().as_ptr();
            let inner = len.div_ceil(page) * page;
            // SAFETY: inside the buffer; zeroed, readable and writable.
            unsafe {
                assert_eq!(std::ptr::read_volatile(p), 0);
                assert_eq!(std::ptr::read_volatile(p.add(inner - 1)), 0);
                std::ptr::write_volatile(p.add(inner - 1), 7);
            }
            assert!(!faults(p, true), "len {len}: first byte");
            assert!(faults(p.wrapping_sub(1), false), "len {len}: byte before");
            assert!(faults(p.wrapping_sub(1), true), "len {len}: byte before");
            assert!(
                faults(p.wrapping_add(inner), false),
                "len {len}: byte after"
            );
            assert!(faults(p.wrapping_add(inner), true), "len {len}: byte after");
        }
    }
}
