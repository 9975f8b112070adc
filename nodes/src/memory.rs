//! How much memory a model run needs against what the machine has, so that an oversized image
//! or batch fails with a clear error (or, for the VAE, falls back to tiles as ComfyUI does)
//! instead of the process being killed by an allocation it cannot make.

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
    match available_bytes() {
        Some(available) if needed > available => Err(OutOfMemory {
            what: what(),
            needed_gib: needed as f64 / GIB,
            available_gib: available as f64 / GIB,
        }),
        _ => Ok(()),
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
