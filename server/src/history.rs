//! Finished prompts, oldest first, as ComfyUI's `/history` shows them.

use serde_json::{Map, Value as Json};
use std::sync::{Mutex, MutexGuard};

/// ComfyUI keeps at most this many entries (plus the one being added).
pub const MAXIMUM_HISTORY_SIZE: usize = 10000;

#[derive(Default)]
pub struct History {
    entries: Mutex<indexmap::IndexMap<String, Json>>,
}

impl History {
    fn entries(&self) -> MutexGuard<'_, indexmap::IndexMap<String, Json>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, prompt_id: String, entry: Json) {
        let mut entries = self.entries();
        if entries.len() > MAXIMUM_HISTORY_SIZE {
            entries.shift_remove_index(0);
        }
        entries.insert(prompt_id, entry);
    }

    /// `GET /history`: with `offset`, skip that many of the oldest and take up to `max_items`;
    /// without, the newest `max_items`.
    pub fn page(&self, max_items: Option<usize>, offset: Option<usize>) -> Json {
        let entries = self.entries();
        let (skip, take) = match (offset, max_items) {
            (Some(offset), max) => (offset, max.unwrap_or(usize::MAX)),
            (None, Some(max)) => (entries.len().saturating_sub(max), max),
            (None, None) => (0, usize::MAX),
        };
        let page: Map<String, Json> = entries
            .iter()
            .skip(skip)
            .take(take)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Json::Object(page)
    }

    /// `GET /history/{id}`: `{id: entry}`, or `{}`.
    pub fn get(&self, prompt_id: &str) -> Json {
        let mut body = Map::new();
        if let Some(entry) = self.entries().get(prompt_id) {
            body.insert(prompt_id.to_string(), entry.clone());
        }
        Json::Object(body)
    }

    pub fn clear(&self) {
        self.entries().clear();
    }

    pub fn delete(&self, ids: &[String]) {
        let mut entries = self.entries();
        for id in ids {
            entries.shift_remove(id);
        }
    }
}
