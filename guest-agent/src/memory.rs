//! The memory the agent fills: one anonymous, page-aligned mapping, owned by one thread.

use std::io;
use std::ptr::NonNull;

use crate::pattern::{Page, PAGE_SIZE, WORDS};

/// An anonymous private mapping of `pages` 4 KiB pages.
pub struct GuestMemory {
    base: NonNull<Page>,
    pages: usize,
    mlocked: bool,
}

// SAFETY: GuestMemory owns its mapping exclusively (no aliasing pointers escape except as
// plain addresses), so moving it to another thread is sound.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    /// Maps `pages` pages (not yet touched: the kernel provides zero pages on first write).
    pub fn new(pages: usize) -> io::Result<Self> {
        if pages == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory size is 0 pages",
            ));
        }
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "memory size overflows"))?;
        // SAFETY: an anonymous private mapping with no address hint touches no existing
        // memory; the result is checked against MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // mmap returns page-aligned memory, so casting to 4096-byte pages of u64 is aligned.
        let base =
            NonNull::new(p.cast::<Page>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            base,
            pages,
            mlocked: false,
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Locks the mapping in RAM (so it is never swapped or moved by the guest kernel).
    pub fn mlock(&mut self) -> io::Result<()> {
        // SAFETY: the range is exactly our own live mapping.
        let r = unsafe { libc::mlock(self.base.as_ptr().cast(), self.pages * PAGE_SIZE) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.mlocked = true;
        Ok(())
    }

    /// Whether [`GuestMemory::mlock`] succeeded.
    pub fn is_mlocked(&self) -> bool {
        self.mlocked
    }

    /// Page `i` for reading. Panics if out of range.
    pub fn page(&self, i: usize) -> &Page {
        assert!(i < self.pages, "page {i} out of range");
        // SAFETY: i < pages, so the pointer is inside our mapping, aligned, and readable;
        // the shared borrow of self prevents concurrent mutable access.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    /// Page `i` for writing. Panics if out of range.
    pub fn page_mut(&mut self, i: usize) -> &mut Page {
        assert!(i < self.pages, "page {i} out of range");
        // SAFETY: i < pages, so the pointer is inside our mapping, aligned, and writable;
        // the exclusive borrow of self makes this the only reference.
        unsafe { &mut *self.base.as_ptr().add(i) }
    }

    /// Flips one byte of page `i` (bitwise NOT of byte `offset`), bypassing all bookkeeping.
    pub fn corrupt(&mut self, i: usize, offset: usize) {
        let off = offset % PAGE_SIZE;
        let page = self.page_mut(i);
        let w = off / 8;
        let mut b = page[w].to_le_bytes();
        b[off % 8] = !b[off % 8];
        page[w] = u64::from_le_bytes(b);
        debug_assert!(w < WORDS);
    }

    /// The virtual address of page `i` in this process.
    pub fn page_addr(&self, i: usize) -> usize {
        assert!(i < self.pages, "page {i} out of range");
        self.base.as_ptr() as usize + i * PAGE_SIZE
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created; no references outlive self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.pages * PAGE_SIZE);
        }
    }
}

/// The physical address backing virtual address `vaddr` of this process, from
/// /proc/self/pagemap. `Ok(None)` if the page is not present. Needs CAP_SYS_ADMIN (the
/// kernel reports frame number 0 otherwise, which is returned as an error).
pub fn phys_addr(vaddr: usize) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut buf = [0u8; 8];
    let vpn = (vaddr / PAGE_SIZE) as u64;
    f.read_exact_at(&mut buf, vpn * 8)?;
    let entry = u64::from_le_bytes(buf);
    let present = entry & (1 << 63) != 0;
    if !present {
        return Ok(None);
    }
    let pfn = entry & ((1u64 << 55) - 1);
    if pfn == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "pagemap hides frame numbers (needs CAP_SYS_ADMIN)",
        ));
    }
    Ok(Some(pfn * PAGE_SIZE as u64 + (vaddr % PAGE_SIZE) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{fill_page, verify_page};

    #[test]
    fn map_fill_verify_corrupt() {
        let mut m = GuestMemory::new(8).unwrap();
        assert_eq!(m.page_addr(0) % PAGE_SIZE, 0);
        for i in 0..8 {
            fill_page(m.page_mut(i), i as u64, 0);
        }
        assert!((0..8).all(|i| verify_page(m.page(i), i as u64, 0)));
        m.corrupt(3, 100);
        assert!(!verify_page(m.page(3), 3, 0));
        assert!(verify_page(m.page(2), 2, 0));
    }

    #[test]
    fn phys_addr_of_a_present_page() {
        let mut m = GuestMemory::new(1).unwrap();
        fill_page(m.page_mut(0), 0, 0);
        match phys_addr(m.page_addr(0)) {
            Ok(Some(a)) => assert_eq!(a % PAGE_SIZE as u64, 0),
            Ok(None) => panic!("a page just written is not present"),
            // Not root: the kernel hides frame numbers; that is reported, not invented.
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied),
        }
    }
}
