//! The REST API's tasks (`/v1/tasks`): one row per generation request, keyed by the id of the
//! prompt it queued. The row is written with the queued prompt in one transaction, marked running
//! with it, and settled from the history entry in the transaction that stores that entry, so a
//! task's status never disagrees with `/queue` and `/history`, however the server stops.

use super::{read_json, Store, StoreError};
use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::{json, Value as Json};

/// Milliseconds since the Unix epoch, as task times are kept.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn name(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(name: &str) -> Option<TaskStatus> {
        [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Succeeded,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ]
        .into_iter()
        .find(|status| status.name() == name)
    }

    /// Whether the task has ended (it will not change again).
    pub fn is_final(self) -> bool {
        !matches!(self, TaskStatus::Pending | TaskStatus::Running)
    }
}

/// A task as stored. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTask {
    pub id: String,
    pub status: TaskStatus,
    pub priority: i64,
    /// `{"request": the request as the client sent it, images replaced by the URLs of their
    /// stored copies; "seed": the seed it ran with; "workflow": the bundled workflow it was built
    /// from}`.
    pub spec: Json,
    pub queued_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The saved images: `[{"filename", "subfolder", "type"}]`.
    pub images: Vec<Json>,
    /// Why it failed: `{"message", "node_id", "node_type"}`.
    pub error: Option<Json>,
    /// Where its end is reported.
    pub webhook_url: Option<String>,
}

/// Which tasks a listing or a ranged delete covers.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    /// Queued at or after (ms).
    pub start_at: Option<i64>,
    /// Queued at or before (ms).
    pub end_at: Option<i64>,
    /// Only tasks that have ended.
    pub ended: bool,
}

/// A page of tasks, newest first, and where the next one starts.
#[derive(Debug, Clone)]
pub struct TaskPage {
    pub tasks: Vec<StoredTask>,
    /// `(queued_at, id)` of the last task when more may follow.
    pub next: Option<(i64, String)>,
}

pub(super) const TASKS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    spec TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    images TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    webhook_url TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (queued_at, id);
";

const TASK_COLUMNS: &str = "id, status, priority, spec, queued_at, started_at, finished_at, images, error, webhook_url";

type TaskRow = (
    String,
    String,
    i64,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    String,
    Option<String>,
    Option<String>,
);

fn task_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
    ))
}

fn parse_task(row: TaskRow) -> Result<StoredTask, StoreError> {
    let (id, status, priority, spec, queued_at, started_at, finished_at, images, error, webhook_url) = row;
    Ok(StoredTask {
        id,
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
        priority,
        spec: read_json(&spec)?,
        queued_at,
        started_at,
        finished_at,
        images: read_json(&images)?,
        error: error.as_deref().map(read_json).transpose()?,
        webhook_url,
    })
}

impl Store {
    /// Records a new task; `queue` writes its prompt in the same transaction.
    pub fn insert_task(
        &self,
        task: &StoredTask,
        queue: impl FnOnce(&Transaction<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(&task.spec)?;
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        transaction
            .prepare_cached(
                "INSERT OR REPLACE INTO tasks (id, status, priority, spec, queued_at, webhook_url)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                task.id,
                task.status.name(),
                task.priority,
                spec,
                task.queued_at,
                task.webhook_url
            ])?;
        queue(&transaction)?;
        transaction.commit()?;
        Ok(())
    }

    pub fn task(&self, id: &str) -> Result<Option<StoredTask>, StoreError> {
        let row = self
            .connection()
            .query_row(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"),
                params![id],
                task_row,
            )
            .optional()?;
        row.map(parse_task).transpose()
    }

    /// Tasks matching `filter`, newest first, `limit` of them after `cursor`.
    pub fn tasks(
        &self,
        filter: &TaskFilter,
        limit: usize,
        cursor: Option<&(i64, String)>,
    ) -> Result<TaskPage, StoreError> {
        let (mut conditions, mut values) = filter_sql(filter);
        if let Some((queued_at, id)) = cursor {
            conditions.push("(queued_at, id) < (?, ?)".into());
            values.push(Box::new(*queued_at));
            values.push(Box::new(id.clone()));
        }
        values.push(Box::new(limit as i64 + 1));
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE {} ORDER BY queued_at DESC, id DESC LIMIT ?",
            conditions.join(" AND ")
        );
        let rows: Vec<TaskRow> = {
            let connection = self.connection();
            let mut statement = connection.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values.iter()), task_row)?;
            rows.collect::<Result<_, _>>()?
        };
        let mut tasks = rows.into_iter().map(parse_task).collect::<Result<Vec<_>, _>>()?;
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(|task| (task.queued_at, task.id.clone()))
        } else {
            None
        };
        Ok(TaskPage { tasks, next })
    }

    /// How many tasks wait at each priority, highest first.
    pub fn pending_by_priority(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT priority, COUNT(*) FROM tasks WHERE status = 'pending' GROUP BY priority ORDER BY priority DESC",
        )?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many tasks there are of each status.
    pub fn task_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare_cached("SELECT status, COUNT(*) FROM tasks GROUP BY status")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A pending task was taken off the queue before it ran (its webhook, if any, is scheduled).
    pub fn cancel_pending_task(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        transaction.execute("DELETE FROM queue WHERE prompt_id = ?1 AND running = 0", params![id])?;
        let cancelled = transaction.execute(
            "UPDATE tasks SET status = 'cancelled', finished_at = ?2 WHERE id = ?1 AND status = 'pending'",
            params![id, now],
        )?;
        if cancelled > 0 {
            super::webhooks::schedule(&transaction, id, now)?;
        }
        transaction.commit()?;
        Ok(())
    }

    /// Forgets ended tasks matching `filter` (or this one id) and their history entries; the
    /// deleted tasks are returned so their files can go too.
    pub fn delete_tasks(&self, filter: &TaskFilter, id: Option<&str>) -> Result<Vec<StoredTask>, StoreError> {
        let (mut conditions, mut values) = filter_sql(filter);
        conditions.push("status NOT IN ('pending', 'running')".into());
        if let Some(id) = id {
            conditions.push("id = ?".into());
            values.push(Box::new(id.to_string()));
        }
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE {}", conditions.join(" AND "));
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        let rows: Vec<TaskRow> = {
            let mut statement = transaction.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values.iter()), task_row)?;
            rows.collect::<Result<_, _>>()?
        };
        let tasks = rows.into_iter().map(parse_task).collect::<Result<Vec<_>, _>>()?;
        for task in &tasks {
            transaction.execute("DELETE FROM tasks WHERE id = ?1", params![task.id])?;
            transaction.execute("DELETE FROM history WHERE prompt_id = ?1", params![task.id])?;
        }
        transaction.commit()?;
        Ok(tasks)
    }
}

/// `WHERE` conditions and their values for a filter (always at least one condition).
fn filter_sql(filter: &TaskFilter) -> (Vec<String>, Vec<Box<dyn rusqlite::ToSql>>) {
    let mut conditions = vec!["1 = 1".to_string()];
    let mut values: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(status) = filter.status {
        conditions.push("status = ?".into());
        values.push(Box::new(status.name()));
    }
    if let Some(start) = filter.start_at {
        conditions.push("queued_at >= ?".into());
        values.push(Box::new(start));
    }
    if let Some(end) = filter.end_at {
        conditions.push("queued_at <= ?".into());
        values.push(Box::new(end));
    }
    if filter.ended {
        conditions.push("status NOT IN ('pending', 'running')".into());
    }
    (conditions, values)
}

/// Marks the task of a prompt running; whether the prompt has a task.
pub(super) fn start_task(transaction: &Transaction<'_>, prompt_id: &str, now: i64) -> Result<bool, StoreError> {
    let changed = transaction
        .prepare_cached("UPDATE tasks SET status = 'running', started_at = ?2 WHERE id = ?1")?
        .execute(params![prompt_id, now])?;
    Ok(changed > 0)
}

/// A task whose prompt the server stopped on, and which will run again, waits again.
pub(super) fn requeue_task(transaction: &Transaction<'_>, prompt_id: &str) -> Result<(), StoreError> {
    transaction.execute(
        "UPDATE tasks SET status = 'pending', started_at = NULL WHERE id = ?1",
        params![prompt_id],
    )?;
    Ok(())
}

/// Settles the task of a prompt from its history entry (no task: nothing happens).
pub(super) fn settle_task(
    transaction: &Transaction<'_>,
    prompt_id: &str,
    entry: &Json,
    now: i64,
) -> Result<(), StoreError> {
    let (status, images, error) = outcome(entry);
    transaction
        .prepare_cached("UPDATE tasks SET status = ?2, finished_at = ?3, images = ?4, error = ?5 WHERE id = ?1")?
        .execute(params![
            prompt_id,
            status.name(),
            now,
            serde_json::to_string(&images)?,
            error.map(|error| error.to_string())
        ])?;
    super::webhooks::schedule(transaction, prompt_id, now)?;
    Ok(())
}

/// What a history entry says of its prompt: the status, the saved images (in node order) and
/// the error.
fn outcome(entry: &Json) -> (TaskStatus, Vec<Json>, Option<Json>) {
    let messages = entry["status"]["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let message = |kind: &str| messages.iter().find(|m| m[0] == kind).map(|m| &m[1]);
    let images: Vec<Json> = entry["outputs"]
        .as_object()
        .into_iter()
        .flat_map(|outputs| outputs.values())
        .filter_map(|output| output["images"].as_array())
        .flatten()
        .filter(|image| image["type"] == "output")
        .cloned()
        .collect();
    if message("execution_interrupted").is_some() {
        return (TaskStatus::Cancelled, images, None);
    }
    if let Some(error) = message("execution_error") {
        let error = json!({
            "message": error["exception_message"].as_str().unwrap_or_default().trim_end(),
            "node_id": error["node_id"],
            "node_type": error["node_type"],
        });
        return (TaskStatus::Failed, images, Some(error));
    }
    match entry["status"]["status_str"].as_str() {
        Some("success") => (TaskStatus::Succeeded, images, None),
        _ => (
            TaskStatus::Failed,
            images,
            Some(json!({"message": "The prompt did not complete", "node_id": null, "node_type": null})),
        ),
    }
}
