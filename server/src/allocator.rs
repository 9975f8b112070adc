//! How the binary's allocator (mimalloc, chosen in `main.rs`) treats freed memory. A model run
//! frees and reallocates activations of hundreds of MB per layer; handing them back to the OS
//! and faulting fresh, zeroed pages in again costs about a sixth of a VAE decode on the
//! development machine. So freed memory is kept for reuse, and given back on `POST /free` with
//! `free_memory`.

use libmimalloc_sys::{mi_collect, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sys crate names only version 2's
/// options): milliseconds before freed memory goes back to the OS, -1 for never.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// Keeps freed memory in the process for reuse.
pub fn retain_freed_memory() {
    // SAFETY: sets an option value; mimalloc reads options at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Gives the memory freed so far back to the OS.
pub fn release_freed_memory() {
    // SAFETY: a forced collection of mimalloc's heaps; safe at any time.
    unsafe { mi_collect(true) };
}
