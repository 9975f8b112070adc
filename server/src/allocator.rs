//! How the binary's allocator (mimalloc, chosen in `main.rs`) treats freed memory. A model run
//! frees and reallocates activations of hundreds of MB per layer; handing them back to the OS
//! and faulting fresh, zeroed pages in again costs about a sixth of a VAE decode on the
//! development machine. So freed memory is kept for a minute (mimalloc's arenas: ten) before it
//! goes back, and goes back at once on `POST /free` with `free_memory`, or when a run would not
//! fit in memory otherwise (see [`easel_models::memory`]).
//!
//! [`CountingMiMalloc`] is that allocator counting the bytes held in large blocks (image buffers,
//! request bodies, tensors), so benchmarks can tell how many copies of something a request holds;
//! small blocks pass straight through.

use libmimalloc_sys::{mi_collect, mi_option_set, mi_option_t};
use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sys crate names only version 2's
/// options): milliseconds before freed memory goes back to the OS. (-1, never, would also make
/// `mi_collect` keep it.)
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// How long freed memory waits for reuse, in milliseconds.
const PURGE_DELAY_MS: std::ffi::c_long = 60_000;

/// Keeps freed memory for reuse, and lets the memory checks give it back when they need it.
pub fn retain_freed_memory() {
    // SAFETY: sets an option value; mimalloc reads options at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    easel_models::memory::set_release_retained(release_freed_memory);
}

/// Gives the memory freed so far back to the OS.
pub fn release_freed_memory() {
    // SAFETY: a forced collection of mimalloc's heaps; safe at any time.
    unsafe { mi_collect(true) };
}

/// Blocks from this size up are counted.
const LARGE_BLOCK: usize = 64 * 1024;

static LARGE_HELD: AtomicUsize = AtomicUsize::new(0);
static LARGE_PEAK: AtomicUsize = AtomicUsize::new(0);

/// mimalloc, counting large blocks (see the module documentation).
pub struct CountingMiMalloc;

fn held(size: usize) {
    if size >= LARGE_BLOCK {
        let now = LARGE_HELD.fetch_add(size, Ordering::Relaxed) + size;
        LARGE_PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn released(size: usize) {
    if size >= LARGE_BLOCK {
        LARGE_HELD.fetch_sub(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is mimalloc's; the counting only reads sizes.
unsafe impl GlobalAlloc for CountingMiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let block = unsafe { MiMalloc.alloc(layout) };
        if !block.is_null() {
            held(layout.size());
        }
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let block = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !block.is_null() {
            held(layout.size());
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        released(layout.size());
        unsafe { MiMalloc.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { MiMalloc.realloc(block, layout, new_size) };
        if !moved.is_null() {
            released(layout.size());
            held(new_size);
        }
        moved
    }
}

/// Bytes held in large blocks now, and at most since [`reset_large_block_peak`] (0 where the
/// binary's allocator is not [`CountingMiMalloc`]: in tests).
pub fn large_blocks() -> (usize, usize) {
    (LARGE_HELD.load(Ordering::Relaxed), LARGE_PEAK.load(Ordering::Relaxed))
}

/// Starts the peak of [`large_blocks`] again from what is held now.
pub fn reset_large_block_peak() {
    LARGE_PEAK.store(LARGE_HELD.load(Ordering::Relaxed), Ordering::Relaxed);
}
