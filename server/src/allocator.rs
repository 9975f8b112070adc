//! How the binary's allocator (mimalloc, chosen in `main.rs`) treats freed memory. A model run
//! frees and reallocates activations of hundreds of MB per layer; handing them back to the OS
//! and faulting fresh, zeroed pages in again costs about a sixth of a VAE decode on the
//! development machine. So freed memory is kept for a minute (mimalloc's arenas: ten) before it
//! goes back, and goes back at once on `POST /free` with `free_memory`, or when a run would not
//! fit in memory otherwise (see [`easel_models::memory`]).

use libmimalloc_sys::{mi_collect, mi_option_set, mi_option_t};

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
