//! Loaded models shared between nodes and prompts: a file is loaded once and kept while it fits
//! in a memory budget, least recently used first out. `/free` empties it.
//!
//! Weights stay memory-mapped, so a model file must not be rewritten in place while a prompt uses
//! it (reading a truncated mapping kills the process). A file replaced between prompts is noticed
//! by its [`FileVersion`] and loaded again, here and in the loaders' fingerprints.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What tells one version of a file from another: its size, modification time and inode. Copying
/// another file over it, or renaming a new one onto its name, changes at least one of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileVersion {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileVersion {
    /// The version of the file at `path` now (`None` when it cannot be read).
    pub fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&metadata);
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileVersion {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            inode,
        })
    }

    /// The version as JSON, for fingerprints: `[size, modified ns, inode]`.
    pub fn to_json(&self) -> serde_json::Value {
        let modified = self
            .modified
            .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|since| since.as_nanos().to_string());
        serde_json::json!([self.len, modified, self.inode])
    }
}

/// Identifies one loaded part of one file version.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CacheKey {
    path: PathBuf,
    version: Option<FileVersion>,
    part: &'static str,
}

struct CacheEntry {
    key: CacheKey,
    value: Arc<dyn Any + Send + Sync>,
    bytes: u64,
    last_used: u64,
}

/// The loaded-model cache, a service of the node registry.
pub struct ModelCache {
    budget_bytes: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: Vec<CacheEntry>,
    clock: u64,
}

impl ModelCache {
    pub fn new(budget_bytes: u64) -> Self {
        ModelCache {
            budget_bytes,
            state: Mutex::new(CacheState::default()),
        }
    }

    /// The cached `part` of the file at `path`, or the result of `load` (value and its size in
    /// bytes), which is then cached. Entries for older versions of the file are dropped.
    pub fn get_or_load<T, E>(
        &self,
        path: &Path,
        part: &'static str,
        load: impl FnOnce() -> Result<(T, u64), E>,
    ) -> Result<Arc<T>, E>
    where
        T: Any + Send + Sync,
    {
        let key = CacheKey {
            path: path.to_path_buf(),
            version: FileVersion::of(path),
            part,
        };
        if let Some(found) = self.lookup::<T>(&key) {
            return Ok(found);
        }
        let (value, bytes) = load()?;
        let value = Arc::new(value);
        self.insert(key, value.clone(), bytes);
        Ok(value)
    }

    fn lookup<T: Any + Send + Sync>(&self, key: &CacheKey) -> Option<Arc<T>> {
        let mut state = self.state.lock().ok()?;
        state.clock += 1;
        let clock = state.clock;
        let entry = state.entries.iter_mut().find(|entry| &entry.key == key)?;
        entry.last_used = clock;
        entry.value.clone().downcast::<T>().ok()
    }

    fn insert(&self, key: CacheKey, value: Arc<dyn Any + Send + Sync>, bytes: u64) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state
            .entries
            .retain(|entry| !(entry.key.path == key.path && entry.key.part == key.part));
        state.clock += 1;
        let last_used = state.clock;
        state.entries.push(CacheEntry {
            key,
            value,
            bytes,
            last_used,
        });
        while state.entries.len() > 1 && state.entries.iter().map(|entry| entry.bytes).sum::<u64>() > self.budget_bytes
        {
            let oldest = state
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(index, _)| index);
            if let Some(index) = oldest {
                state.entries.remove(index);
            }
        }
    }

    /// Drops every cached model (ComfyUI's `/free` with `unload_models`).
    pub fn clear(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.entries.clear();
        }
    }

    /// Number of cached parts.
    pub fn len(&self) -> usize {
        self.state.lock().map(|state| state.entries.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_once_and_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b, c] = ["a", "b", "c"].map(|name| {
            let path = dir.path().join(name);
            std::fs::write(&path, name).unwrap();
            path
        });
        let cache = ModelCache::new(20);
        let load = |value: u32| move || Ok::<_, ()>((value, 10));
        assert_eq!(*cache.get_or_load(&a, "unet", load(1)).unwrap(), 1);
        assert_eq!(
            *cache.get_or_load(&a, "unet", load(2)).unwrap(),
            1,
            "second call is served from the cache"
        );
        cache.get_or_load(&b, "unet", load(3)).unwrap();
        cache.get_or_load(&a, "unet", load(4)).unwrap();
        cache.get_or_load(&c, "unet", load(5)).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(
            *cache.get_or_load(&a, "unet", load(6)).unwrap(),
            1,
            "a was used more recently than b"
        );
        assert_eq!(*cache.get_or_load(&b, "unet", load(7)).unwrap(), 7, "b was evicted");
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn a_file_replaced_on_disk_is_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, "first version").unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let cache = ModelCache::new(100);
        let load = |value: u32| move || Ok::<_, ()>((value, 10));
        // Writes `text` to `file` with the first version's modification time, as `cp -p` keeps it.
        let write_as_first = |file: &Path, text: &str| {
            std::fs::write(file, text).unwrap();
            let written = std::fs::File::options().write(true).open(file).unwrap();
            written.set_modified(modified).unwrap();
        };
        assert_eq!(*cache.get_or_load(&path, "unet", load(1)).unwrap(), 1);
        // `cp` over it: same inode, another size.
        write_as_first(&path, "second");
        assert_eq!(*cache.get_or_load(&path, "unet", load(2)).unwrap(), 2);
        // A new file renamed onto the name: same size and time, another inode.
        let other = dir.path().join("other");
        write_as_first(&other, "second");
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(*cache.get_or_load(&path, "unet", load(3)).unwrap(), 3);
        assert_eq!(*cache.get_or_load(&path, "unet", load(4)).unwrap(), 3);
        assert_eq!(cache.len(), 1, "the older versions were dropped");
    }
}
