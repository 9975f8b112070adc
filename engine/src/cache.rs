//! The output cache, keyed like ComfyUI's: by a node's *input signature*, not its id.
//!
//! A node's signature covers its class, its `IS_CHANGED` fingerprint, its constant inputs (sorted by
//! name) and, for each link, the signature of the linked node and the slot, so any change upstream
//! changes every key below it, and two identical sub-graphs share entries whatever their ids. ComfyUI
//! lists all ancestors in each key; here each key is a SHA-256 over the node's own entry and its
//! sources' keys, which costs O(graph) instead of O(graph²). (Unlike ComfyUI's, these keys do not
//! tell a node that reads one source twice from one that reads two identical sources; both compute
//! the same outputs.)
//!
//! The three cache modes of ComfyUI's `main.py` are [`CacheMode`].

use crate::graph::PromptGraph;
use crate::prompt::{input_ref, InputRef, NodeId, Prompt};
use crate::schema::{HiddenInput, NodeSchema};
use crate::value::Value;
use rustc_hash::FxHashMap as HashMap;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How outputs are kept between prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// ComfyUI's default: at each prompt, drop every entry the new prompt does not use.
    #[default]
    Classic,
    /// `--cache-lru N`: keep entries across prompts, evicting the least recently used generations
    /// while there are more than N.
    Lru(usize),
    /// `--cache-none`: nothing survives a prompt.
    None,
}

/// A cache key.
pub type CacheKey = [u8; 32];

/// A node's outputs (one list per output slot) and the UI dict it showed.
#[derive(Debug, Clone)]
pub struct CachedOutput {
    pub outputs: Arc<Vec<Vec<Value>>>,
    pub ui: Option<Json>,
}

/// What the executor needs of a node to sign it.
pub struct SignatureInput<'a> {
    pub schema: &'a NodeSchema,
    /// The `IS_CHANGED` value: `None` when the class has none, `Some(Err)` when it failed.
    pub fingerprint: Option<Result<Json, String>>,
}

/// Computes every node's key for `prompt`, sources first. Nodes that cannot be signed (a link to a
/// missing node, a cycle, a failed fingerprint) get a key of their own that never matches.
pub fn signatures<'a>(
    prompt: &Prompt,
    mut describe: impl FnMut(&str) -> Option<SignatureInput<'a>>,
) -> HashMap<NodeId, CacheKey> {
    let graph = PromptGraph::new(prompt);
    let mut keys: HashMap<NodeId, CacheKey> = HashMap::with_capacity_and_hasher(prompt.len(), Default::default());
    for id in graph.dependency_order() {
        let key = describe(id)
            .and_then(|input| sign(prompt, id, &input, &keys))
            .unwrap_or_else(unique_key);
        keys.insert(id.to_string(), key);
    }
    for id in prompt.node_ids() {
        if !keys.contains_key(id) {
            keys.insert(id.to_string(), unique_key());
        }
    }
    keys
}

/// Feeds the hash one length-prefixed field, so field boundaries cannot be confused.
fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Streams JSON text into the hash without building it in memory.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_field(hasher: &mut Sha256, value: &Json) -> Option<()> {
    // JSON text has no unescaped NUL, so a NUL terminator delimits it.
    serde_json::to_writer(HashWriter(hasher), value).ok()?;
    hasher.update([0]);
    Some(())
}

fn sign(prompt: &Prompt, id: &str, input: &SignatureInput, keys: &HashMap<NodeId, CacheKey>) -> Option<CacheKey> {
    let mut hasher = Sha256::new();
    field(&mut hasher, input.schema.name.as_bytes());
    match &input.fingerprint {
        None => hasher.update([0]),
        Some(Ok(value)) => {
            hasher.update([1]);
            json_field(&mut hasher, value)?;
        }
        Some(Err(_)) => return None,
    }
    let keyed_by_id = input.schema.not_idempotent || input.schema.uses_hidden(HiddenInput::UniqueId);
    field(&mut hasher, if keyed_by_id { id.as_bytes() } else { &[] });
    let mut inputs: Vec<(&String, &Json)> = prompt.inputs(id).into_iter().flatten().collect();
    inputs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (name, value) in inputs {
        field(&mut hasher, name.as_bytes());
        match input_ref(value) {
            InputRef::Link { node, slot } => {
                hasher.update([1]);
                hasher.update(keys.get(node)?);
                hasher.update(slot.to_le_bytes());
            }
            InputRef::BadLink(_) => return None,
            InputRef::Constant(constant) => {
                hasher.update([0]);
                json_field(&mut hasher, constant)?;
            }
        }
    }
    Some(hasher.finalize().into())
}

/// A key no other node will ever have (ComfyUI's "unhashable" signatures).
fn unique_key() -> CacheKey {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = Sha256::new();
    hasher.update(b"easel-unique-key");
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.finalize().into()
}

struct Entry {
    output: CachedOutput,
    used_generation: u64,
}

/// The executor's output cache.
pub struct OutputCache {
    mode: CacheMode,
    entries: HashMap<CacheKey, Entry>,
    generation: u64,
    min_generation: u64,
}

impl OutputCache {
    pub fn new(mode: CacheMode) -> Self {
        OutputCache {
            mode,
            entries: HashMap::default(),
            generation: 0,
            min_generation: 0,
        }
    }

    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    /// Starts a prompt whose nodes have `keys`: drops what the mode says to drop.
    pub fn begin_prompt<'k>(&mut self, keys: impl Iterator<Item = &'k CacheKey>) {
        self.generation += 1;
        match self.mode {
            CacheMode::None => self.entries.clear(),
            CacheMode::Classic => {
                let used: rustc_hash::FxHashSet<&CacheKey> = keys.collect();
                self.entries.retain(|key, _| used.contains(key));
            }
            CacheMode::Lru(max_size) => {
                for key in keys {
                    if let Some(entry) = self.entries.get_mut(key) {
                        entry.used_generation = self.generation;
                    }
                }
                while self.entries.len() > max_size && self.min_generation < self.generation {
                    self.min_generation += 1;
                    let min = self.min_generation;
                    self.entries.retain(|_, entry| entry.used_generation >= min);
                }
            }
        }
    }

    /// Ends a prompt (`--cache-none` forgets everything).
    pub fn end_prompt(&mut self) {
        if self.mode == CacheMode::None {
            self.entries.clear();
        }
    }

    pub fn get(&mut self, key: &CacheKey) -> Option<CachedOutput> {
        let generation = self.generation;
        self.entries.get_mut(key).map(|entry| {
            entry.used_generation = generation;
            entry.output.clone()
        })
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entries.contains_key(key)
    }

    pub fn insert(&mut self, key: CacheKey, output: CachedOutput) {
        self.entries.insert(
            key,
            Entry {
                output,
                used_generation: self.generation,
            },
        );
    }
}
