//! The prompt queue: the highest priority first (REST tasks may set one; `POST /prompt` queues at
//! 0), then ComfyUI's ordering (lowest `number` first, then `prompt_id`); the running item, and the
//! `number` counter.

use crate::store::StoredPrompt;
use easel_engine::{Prompt, PromptError, ValidatedPrompt};
use serde_json::{json, Value as Json};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A prompt accepted by `POST /prompt`.
pub struct QueueItem {
    pub number: f64,
    /// The response's `number`: an int from the counter, or the client's float.
    pub number_json: Json,
    /// Higher runs first; 0 for `POST /prompt`.
    pub priority: i64,
    pub prompt_id: String,
    pub validated: ValidatedPrompt,
    /// `extra_data` with `client_id`, as `/queue` shows it.
    pub extra_data: Json,
}

impl QueueItem {
    /// The `client_id` the prompt was posted with.
    pub fn client_id(&self) -> Option<&str> {
        self.extra_data.get("client_id").and_then(Json::as_str)
    }

    /// The item as the store keeps it.
    pub fn to_stored(&self) -> StoredPrompt {
        StoredPrompt {
            prompt_id: self.prompt_id.clone(),
            number: self.number,
            number_json: self.number_json.clone(),
            priority: self.priority,
            prompt: self.validated.prompt.to_json(),
            extra_data: self.extra_data.clone(),
            outputs_to_execute: self.validated.outputs_to_execute.clone(),
            node_errors: self.validated.node_errors.clone(),
        }
    }

    /// An item read back from the store.
    pub fn from_stored(stored: StoredPrompt) -> Result<Self, PromptError> {
        let validated = ValidatedPrompt {
            prompt: Prompt::from_json(stored.prompt)?,
            outputs_to_execute: stored.outputs_to_execute,
            node_errors: stored.node_errors,
        };
        Ok(QueueItem {
            number: stored.number,
            number_json: stored.number_json,
            priority: stored.priority,
            prompt_id: stored.prompt_id,
            validated,
            extra_data: stored.extra_data,
        })
    }

    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`, as `/queue` lists it.
    pub fn to_json(&self) -> Json {
        json!([
            self.number_json,
            self.prompt_id,
            self.validated.prompt.to_json(),
            self.extra_data,
            self.validated.outputs_to_execute
        ])
    }
}

/// A queued prompt and when it was queued. Heap order: the highest priority, then the lowest
/// `(number, prompt_id)` is the greatest, so `BinaryHeap` pops it first.
struct Pending(QueueItem, Instant);

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .priority
            .cmp(&other.0.priority)
            .then_with(|| other.0.number.total_cmp(&self.0.number))
            .then_with(|| other.0.prompt_id.cmp(&self.0.prompt_id))
    }
}

#[derive(Default)]
struct State {
    pending: BinaryHeap<Pending>,
    running: Option<Arc<QueueItem>>,
    counter: i64,
}

impl State {
    fn remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }
}

#[derive(Default)]
pub struct PromptQueue {
    state: Mutex<State>,
    available: Condvar,
}

impl PromptQueue {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the counter after numbers already used (prompts recovered from the store).
    pub fn continue_counter_after(&self, highest: i64) {
        let mut state = self.state();
        state.counter = state.counter.max(highest + 1);
    }

    /// ComfyUI's counter: every parsed `POST /prompt` without a `number` takes the next value,
    /// negated when queued at the front.
    pub fn next_number(&self, front: bool) -> i64 {
        let mut state = self.state();
        let number = if front { -state.counter } else { state.counter };
        state.counter += 1;
        number
    }

    /// Queues a prompt. `announce` gets the new queue length while the queue is still locked, so
    /// status messages go out in the order the queue changed.
    pub fn put(&self, item: QueueItem, announce: impl FnOnce(usize)) {
        let mut state = self.state();
        state.pending.push(Pending(item, Instant::now()));
        announce(state.remaining());
        self.available.notify_one();
    }

    /// Waits up to `timeout` for the next prompt and marks it running (announcing the queue
    /// length, as `put`); the prompt and when it was queued, or `None` when none came.
    pub fn take_within(&self, timeout: Duration, announce: impl FnOnce(usize)) -> Option<(Arc<QueueItem>, Instant)> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            if let Some(Pending(item, queued_at)) = state.pending.pop() {
                let item = Arc::new(item);
                state.running = Some(item.clone());
                announce(state.remaining());
                return Some((item, queued_at));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .available
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// The running prompt is done (announcing the queue length, as `put`).
    pub fn finish(&self, announce: impl FnOnce(usize)) {
        let mut state = self.state();
        state.running = None;
        announce(state.remaining());
    }

    pub fn running(&self) -> Option<Arc<QueueItem>> {
        self.state().running.clone()
    }

    /// Pending plus running, as `status` messages count them.
    pub fn remaining(&self) -> usize {
        self.state().remaining()
    }

    /// Drops every pending prompt (announcing the queue length, as `put`).
    pub fn clear(&self, announce: impl FnOnce(usize)) {
        let mut state = self.state();
        state.pending.clear();
        announce(state.remaining());
    }

    /// Drops the pending prompts with these ids; running prompts are untouched. Whether any was
    /// pending.
    pub fn delete(&self, ids: &[String], announce: impl FnOnce(usize)) -> bool {
        let mut state = self.state();
        let before = state.pending.len();
        state.pending.retain(|Pending(item, _)| !ids.contains(&item.prompt_id));
        announce(state.remaining());
        state.pending.len() < before
    }

    /// `(running, pending)` as `/queue` lists them; pending in heap order, the next to run first.
    pub fn snapshot(&self) -> (Vec<Json>, Vec<Json>) {
        let state = self.state();
        let running = state.running.iter().map(|item| item.to_json()).collect();
        let pending = state.pending.iter().map(|Pending(item, _)| item.to_json()).collect();
        (running, pending)
    }
}
