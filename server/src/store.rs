//! The durable store: queued prompts and history in SQLite (WAL mode), so nothing is lost when the
//! server stops, however it stops.
//!
//! A prompt is written before `POST /prompt` answers. The worker marks it running, and replaces it
//! by its history entry in one transaction when it ends. At start-up, pending prompts are queued
//! again; a prompt that was running is queued once more at the front, and if the server dies on it
//! a second time it is recorded as failed instead.

mod checkpoints;
pub mod tasks;
pub mod webhooks;

use easel_engine::NodeErrors;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value as Json};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is corrupt: {0}")]
    Json(#[from] serde_json::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A queued prompt as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPrompt {
    pub prompt_id: String,
    pub number: f64,
    pub number_json: Json,
    /// Higher runs first (REST tasks); 0 for `POST /prompt`.
    pub priority: i64,
    pub prompt: Json,
    pub extra_data: Json,
    pub outputs_to_execute: Vec<String>,
    pub node_errors: NodeErrors,
}

/// What start-up found in the queue table.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Prompts to queue again, in their stored order.
    pub pending: Vec<StoredPrompt>,
    /// A prompt that was running when the server stopped, to run first.
    pub interrupted: Option<StoredPrompt>,
    /// Prompts the server died on twice, now recorded as failed.
    pub abandoned: Vec<String>,
    /// The largest integer `number` seen, so new prompts queue after the old ones.
    pub highest_number: Option<i64>,
}

pub struct Store {
    connection: Mutex<Connection>,
    /// How many history entries `/history` shows (the newest); older ones stay on disk.
    history_limit: usize,
    /// Copies the log into the database, in its own thread (declared after the connection, so it
    /// makes the last checkpoint once the connection is closed).
    _checkpoints: checkpoints::Checkpointer,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    prompt_id TEXT PRIMARY KEY,
    number REAL NOT NULL,
    number_json TEXT NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    node_errors TEXT NOT NULL,
    running INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL
);
";

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, history_limit: usize) -> Result<Store, StoreError> {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)?;
        }
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "wal_autocheckpoint", 0)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        connection.execute_batch(tasks::TASKS_SCHEMA)?;
        connection.execute_batch(webhooks::WEBHOOKS_SCHEMA)?;
        add_queue_columns(&connection)?;
        tasks::move_queued_tasks_into_queue(&connection)?;
        Ok(Store {
            connection: Mutex::new(connection),
            history_limit,
            _checkpoints: checkpoints::Checkpointer::start(path)?,
        })
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn enqueue(&self, prompt: &StoredPrompt) -> Result<(), StoreError> {
        // Serialise before taking the connection: the lock is shared with the worker.
        QueueRow::of(prompt)?.insert(&self.connection())
    }

    /// How many prompts wait at each priority, highest first.
    pub fn pending_by_priority(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare_cached(
            "SELECT priority, COUNT(*) FROM queue WHERE running = 0 GROUP BY priority ORDER BY priority DESC",
        )?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks a prompt running, and its task if it has one; whether it has.
    pub fn mark_running(&self, prompt_id: &str) -> Result<bool, StoreError> {
        let is_task = self
            .connection()
            .prepare_cached(
                "UPDATE queue SET running = 1, attempts = attempts + 1,
                     task_started_at = CASE WHEN task_spec IS NULL THEN NULL ELSE ?2 END
                 WHERE prompt_id = ?1 RETURNING task_spec IS NOT NULL",
            )?
            .query_row(params![prompt_id, tasks::now_ms()], |row| row.get::<_, bool>(0))
            .optional()?;
        Ok(is_task == Some(true))
    }

    /// Replaces the queued prompt by its history entry, and settles its task from it, atomically;
    /// whether that made a webhook delivery due.
    pub fn complete(&self, prompt_id: &str, entry: &Json) -> Result<bool, StoreError> {
        let entry_text = serde_json::to_string(entry)?;
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        // The task is settled first: until then it lives in the queue row.
        let webhook_due = tasks::settle_task(&transaction, prompt_id, entry, tasks::now_ms())?;
        transaction
            .prepare_cached("DELETE FROM queue WHERE prompt_id = ?1")?
            .execute(params![prompt_id])?;
        transaction
            .prepare_cached("DELETE FROM history WHERE prompt_id = ?1")?
            .execute(params![prompt_id])?;
        transaction
            .prepare_cached("INSERT INTO history (prompt_id, entry) VALUES (?1, ?2)")?
            .execute(params![prompt_id, entry_text])?;
        transaction.commit()?;
        Ok(webhook_due)
    }

    /// Forgets pending prompts, these ids or all of them; the tasks waiting in them are
    /// cancelled (their ids are returned, their webhooks scheduled).
    pub fn remove_pending(&self, ids: Option<&[String]>) -> Result<Vec<String>, StoreError> {
        let now = tasks::now_ms();
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        let waiting = tasks::waiting_task_ids(&transaction)?;
        let cancelled: Vec<String> = waiting
            .into_iter()
            .filter(|id| ids.is_none_or(|ids| ids.contains(id)))
            .collect();
        for id in &cancelled {
            tasks::cancel_waiting_task(&transaction, id, now)?;
        }
        delete_where(&transaction, "DELETE FROM queue WHERE running = 0", ids)?;
        transaction.commit()?;
        Ok(cancelled)
    }

    /// Reads the queue table after a restart (see the module documentation).
    pub fn recover(&self) -> Result<Recovery, StoreError> {
        let rows: Vec<(StoredPrompt, bool, i64)> = {
            let connection = self.connection();
            let mut statement = connection.prepare(
                "SELECT prompt_id, number, number_json, prompt, extra_data, outputs_to_execute, node_errors,
                        running, attempts, priority FROM queue ORDER BY rowid",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, f64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, String>(6)?,
                    row.get::<_, i64>(7)? != 0,
                    row.get::<_, i64>(8)?,
                    row.get::<_, i64>(9)?,
                ))
            })?;
            let mut parsed = Vec::new();
            for row in rows {
                let (
                    prompt_id,
                    number,
                    number_json,
                    prompt,
                    extra_data,
                    outputs,
                    node_errors,
                    running,
                    attempts,
                    priority,
                ) = row?;
                let stored = StoredPrompt {
                    prompt_id,
                    number,
                    number_json: read_json(&number_json)?,
                    priority,
                    prompt: read_json(&prompt)?,
                    extra_data: read_json(&extra_data)?,
                    outputs_to_execute: read_json(&outputs)?,
                    node_errors: read_json(&node_errors)?,
                };
                parsed.push((stored, running, attempts));
            }
            parsed
        };
        let mut recovery = Recovery::default();
        for (prompt, running, attempts) in rows {
            if prompt.number >= 0.0 && prompt.number.fract() == 0.0 {
                recovery.highest_number = recovery.highest_number.max(Some(prompt.number as i64));
            }
            if !running {
                recovery.pending.push(prompt);
            } else if attempts < 2 && recovery.interrupted.is_none() {
                // Its task, if any, waits again.
                self.connection().execute(
                    "UPDATE queue SET running = 0, task_started_at = NULL WHERE prompt_id = ?1",
                    params![prompt.prompt_id],
                )?;
                recovery.interrupted = Some(prompt);
            } else {
                let message = format!(
                    "Easel stopped {attempts} times while this prompt was running; it was not run again. \
                     Re-queue it to try once more."
                );
                self.complete(&prompt.prompt_id, &abandoned_entry(&prompt, &message))?;
                recovery.abandoned.push(prompt.prompt_id);
            }
        }
        Ok(recovery)
    }

    /// `GET /history`: the newest `history_limit` entries, oldest first; with `offset`, skip that
    /// many of them and take up to `max_items`; without, the newest `max_items`.
    pub fn history_page(&self, max_items: Option<usize>, offset: Option<usize>) -> Result<Json, StoreError> {
        let connection = self.connection();
        let total: i64 = connection.query_row("SELECT COUNT(*) FROM history", [], |row| row.get(0))?;
        let visible = (total as usize).min(self.history_limit);
        let first_visible = total as usize - visible;
        let (skip, take) = match (offset, max_items) {
            (Some(offset), max) => (offset.min(visible), max.unwrap_or(visible)),
            (None, Some(max)) => (visible.saturating_sub(max), max),
            (None, None) => (0, visible),
        };
        let mut statement =
            connection.prepare("SELECT prompt_id, entry FROM history ORDER BY seq LIMIT ?1 OFFSET ?2")?;
        let take = take.min(visible - skip) as i64;
        let rows = statement.query_map(params![take, (first_visible + skip) as i64], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut page = Map::new();
        for row in rows {
            let (prompt_id, entry) = row?;
            page.insert(prompt_id, read_json(&entry)?);
        }
        Ok(Json::Object(page))
    }

    /// `GET /history/{id}`: `{id: entry}`, or `{}`.
    pub fn history_entry(&self, prompt_id: &str) -> Result<Json, StoreError> {
        let entry: Option<String> = self
            .connection()
            .query_row(
                "SELECT entry FROM history WHERE prompt_id = ?1",
                params![prompt_id],
                |row| row.get(0),
            )
            .optional()?;
        let mut body = Map::new();
        if let Some(entry) = entry {
            body.insert(prompt_id.to_string(), read_json(&entry)?);
        }
        Ok(Json::Object(body))
    }

    /// Forgets history entries: these ids, or all of them.
    pub fn delete_history(&self, ids: Option<&[String]>) -> Result<(), StoreError> {
        delete_where(&self.connection(), "DELETE FROM history WHERE 1 = 1", ids)
    }
}

/// Runs `delete` (a `DELETE … WHERE …` statement) for all rows, or for the rows of these ids.
fn delete_where(connection: &Connection, delete: &str, ids: Option<&[String]>) -> Result<(), StoreError> {
    match ids {
        None => {
            connection.execute(delete, [])?;
        }
        Some(ids) => {
            let one = format!("{delete} AND prompt_id = ?1");
            for id in ids {
                connection.execute(&one, params![id])?;
            }
        }
    }
    Ok(())
}

/// A queued prompt serialised for its row, ready to insert.
struct QueueRow {
    prompt_id: String,
    number: f64,
    priority: i64,
    /// `number_json`, `prompt`, `extra_data`, `outputs_to_execute`, `node_errors` as JSON text.
    texts: [String; 5],
    /// The REST task waiting in this prompt, if it is one.
    task: Option<tasks::QueuedTask>,
}

impl QueueRow {
    fn of(prompt: &StoredPrompt) -> Result<QueueRow, StoreError> {
        Ok(QueueRow {
            prompt_id: prompt.prompt_id.clone(),
            number: prompt.number,
            priority: prompt.priority,
            texts: [
                serde_json::to_string(&prompt.number_json)?,
                serde_json::to_string(&prompt.prompt)?,
                serde_json::to_string(&prompt.extra_data)?,
                serde_json::to_string(&prompt.outputs_to_execute)?,
                serde_json::to_string(&prompt.node_errors)?,
            ],
            task: None,
        })
    }

    fn insert(&self, connection: &Connection) -> Result<(), StoreError> {
        let [number_json, prompt, extra_data, outputs, node_errors] = &self.texts;
        let task = self.task.as_ref();
        // Statements are prepared once per connection and reused (`prepare_cached`).
        connection
            .prepare_cached(
                "INSERT OR REPLACE INTO queue
                 (prompt_id, number, number_json, prompt, extra_data, outputs_to_execute, node_errors, priority,
                  task_spec, task_queued_at, task_webhook_url)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                self.prompt_id,
                self.number,
                number_json,
                prompt,
                extra_data,
                outputs,
                node_errors,
                self.priority,
                task.map(|task| &task.spec),
                task.map(|task| task.queued_at),
                task.and_then(|task| task.webhook_url.as_ref()),
            ])?;
        Ok(())
    }
}

/// Columns the queue table gained after it was first released, added to older databases
/// (every old prompt at priority 0, carrying no task).
fn add_queue_columns(connection: &Connection) -> Result<(), StoreError> {
    for (column, declaration) in [
        ("priority", "INTEGER NOT NULL DEFAULT 0"),
        ("task_spec", "TEXT"),
        ("task_queued_at", "INTEGER"),
        ("task_webhook_url", "TEXT"),
        ("task_started_at", "INTEGER"),
    ] {
        let present = connection
            .prepare("SELECT name FROM pragma_table_info('queue') WHERE name = ?1")?
            .exists(params![column])?;
        if !present {
            connection.execute_batch(&format!("ALTER TABLE queue ADD COLUMN {column} {declaration}"))?;
        }
    }
    Ok(())
}

/// Stored JSON, read without serde_json's nesting limit: a request nested as deep as `POST /prompt`
/// accepts ends up a few levels deeper in its history entry, and what was accepted must read back.
/// The nesting is bounded by what was accepted, so the recursion is too.
fn read_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let value = T::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// The history entry of a prompt that was given up on.
fn abandoned_entry(prompt: &StoredPrompt, message: &str) -> Json {
    json!({
        "prompt": [prompt.number_json, prompt.prompt_id, prompt.prompt, prompt.extra_data, prompt.outputs_to_execute],
        "outputs": {},
        "status": {
            "status_str": "error",
            "completed": false,
            "messages": [["execution_error", {
                "prompt_id": prompt.prompt_id,
                "node_id": Json::Null,
                "node_type": Json::Null,
                "executed": [],
                "exception_message": message,
                "exception_type": "ServerStopped",
                "traceback": [],
                "current_inputs": {},
                "current_outputs": [],
                "timestamp": easel_engine::events::timestamp_ms(),
            }]],
        },
        "meta": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str, number: f64) -> StoredPrompt {
        StoredPrompt {
            prompt_id: id.into(),
            number,
            number_json: json!(number as i64),
            priority: 0,
            prompt: json!({"1": {"class_type": "X", "inputs": {}}}),
            extra_data: json!({"client_id": "c"}),
            outputs_to_execute: vec!["1".into()],
            node_errors: NodeErrors::default(),
        }
    }

    #[test]
    fn prompts_survive_reopening_and_a_twice_interrupted_one_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user/easel.db");
        {
            let store = Store::open(&path, 10000).unwrap();
            store.enqueue(&prompt("a", 0.0)).unwrap();
            store.enqueue(&prompt("b", 1.0)).unwrap();
            store.enqueue(&prompt("c", 2.0)).unwrap();
            store.mark_running("a").unwrap();
            store
                .complete("c", &json!({"status": {"status_str": "success"}}))
                .unwrap();
        }
        let store = Store::open(&path, 10000).unwrap();
        let recovery = store.recover().unwrap();
        assert_eq!(recovery.interrupted.as_ref().unwrap().prompt_id, "a");
        assert_eq!(
            recovery
                .pending
                .iter()
                .map(|p| p.prompt_id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(recovery.highest_number, Some(1));
        assert_eq!(recovery.pending[0], prompt("b", 1.0));

        store.mark_running("a").unwrap();
        let recovery = store.recover().unwrap();
        assert_eq!(recovery.abandoned, ["a"]);
        assert!(recovery.interrupted.is_none());
        let entry = store.history_entry("a").unwrap();
        assert_eq!(entry["a"]["status"]["status_str"], "error");
        assert!(entry["a"]["status"]["messages"][0][1]["exception_message"]
            .as_str()
            .unwrap()
            .contains("stopped 2 times"));
    }

    #[test]
    fn priorities_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("easel.db");
        {
            let store = Store::open(&path, 10).unwrap();
            store
                .enqueue(&StoredPrompt {
                    priority: 5,
                    ..prompt("urgent", 3.0)
                })
                .unwrap();
            store.enqueue(&prompt("plain", 1.0)).unwrap();
        }
        let recovery = Store::open(&path, 10).unwrap().recover().unwrap();
        let priorities: Vec<_> = recovery
            .pending
            .iter()
            .map(|p| (p.prompt_id.as_str(), p.priority))
            .collect();
        assert_eq!(priorities, [("urgent", 5), ("plain", 0)]);
    }

    #[test]
    fn history_pages_like_comfyui_and_the_limit_hides_without_deleting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("easel.db"), 3).unwrap();
        for id in ["a", "b", "c", "d"] {
            store.complete(id, &json!({"id": id})).unwrap();
        }
        let keys = |page: Json| page.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(store.history_page(None, None).unwrap()), ["b", "c", "d"]);
        assert_eq!(keys(store.history_page(Some(2), None).unwrap()), ["c", "d"]);
        assert_eq!(keys(store.history_page(Some(1), Some(1)).unwrap()), ["c"]);
        assert_eq!(keys(store.history_page(None, Some(5)).unwrap()), Vec::<String>::new());
        assert_eq!(store.history_entry("a").unwrap()["a"]["id"], "a");
        store.delete_history(Some(&["c".to_string()])).unwrap();
        assert_eq!(keys(store.history_page(None, None).unwrap()), ["a", "b", "d"]);
        store.delete_history(None).unwrap();
        assert_eq!(store.history_page(None, None).unwrap(), json!({}));
    }
}
