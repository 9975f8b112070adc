//! How much memory a model run needs against what the machine has, so that an oversized image
//! or batch fails with a clear error (or, for the VAE, falls back to tiles as ComfyUI does)
//! instead of the process being killed by an allocation it cannot make; and how large buffers
//! are laid out in pages.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Gives memory the allocator keeps for reuse back to the system (registered by the binary).
static RELEASE_RETAINED: OnceLock<fn()> = OnceLock::new();

/// Registers how to give memory the allocator keeps for reuse back to the system, so that a run
/// that would not fit otherwise counts it as available.
pub fn set_release_retained(release: fn()) {
    let _ = RELEASE_RETAINED.set(release);
}

/// Bytes available for a run that needs `needed`: [`available_bytes`], after giving retained
/// allocator memory back when `needed` would not fit otherwise.
pub fn available_for(needed: u64) -> Option<u64> {
    let available = available_bytes()?;
    match RELEASE_RETAINED.get() {
        Some(release) if needed > available => {
            release();
            available_bytes()
        }
        _ => Some(available),
    }
}

/// Bytes the system can still hand out (`MemAvailable`), where the platform says.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A run that would need more memory than is available.
#[derive(Debug, thiserror::Error)]
#[error("{what} needs about {needed_gib:.1} GiB of memory but only {available_gib:.1} GiB are available; use a smaller size or batch")]
pub struct OutOfMemory {
    pub what: String,
    pub needed_gib: f64,
    pub available_gib: f64,
}

/// Fails when `needed` bytes exceed what the system has available (passes when unknown).
pub fn ensure_available(needed: u64, what: impl FnOnce() -> String) -> Result<(), OutOfMemory> {
    match available_for(needed) {
        Some(available) if needed > available => Err(OutOfMemory {
            what: what(),
            needed_gib: needed as f64 / GIB,
            available_gib: available as f64 / GIB,
        }),
        _ => Ok(()),
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Asks the kernel to back the untouched `buffer` with 2 MiB pages where it can (Linux's
/// `MADV_HUGEPAGE`; a hint, nothing elsewhere). Filling gigabytes of fresh 4 KiB pages costs a
/// page fault each, which can take longer than the arithmetic that fills them.
pub fn advise_huge_pages<T>(buffer: &mut [MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buffer.as_mut_ptr() as usize;
        let first_page = start.div_ceil(PAGE) * PAGE;
        let end_page = (start + std::mem::size_of_val(buffer)) / PAGE * PAGE;
        if end_page > first_page {
            // SAFETY: the range lies inside `buffer`, which this call borrows mutably; the advice
            // changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(
                    first_page as *mut libc::c_void,
                    end_page - first_page,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RELEASES: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn retained_memory_is_given_back_only_when_a_run_would_not_fit() {
        set_release_retained(|| {
            RELEASES.fetch_add(1, Ordering::SeqCst);
        });
        if available_bytes().is_none() {
            return; // No MemAvailable on this platform: nothing is ever refused.
        }
        assert!(available_for(0).is_some());
        assert_eq!(RELEASES.load(Ordering::SeqCst), 0);
        assert!(ensure_available(u64::MAX, || "everything".into()).is_err());
        assert_eq!(RELEASES.load(Ordering::SeqCst), 1);
    }
}
