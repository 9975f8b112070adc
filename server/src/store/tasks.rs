//! The REST API's tasks (`/v1/tasks`), keyed by the id of the prompt each queued. While its
//! prompt is queued or running, a task lives in the prompt's row (the `task_*` columns of
//! `queue`): queuing a task is one insert, as queuing a prompt is, and starting it one update.
//! It gets its own row in `tasks` when it ends, in the transaction that stores its prompt's
//! history entry (or takes the prompt off the queue), so a task's status never disagrees with
//! `/queue` and `/history`, however the server stops.

use super::{read_json, QueueRow, Store, StoreError, StoredPrompt};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
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

    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn parse(name: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|status| status.name() == name)
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

/// The tasks whose prompts are queued or running, with the columns of `tasks`.
const QUEUED_TASKS: &str = "(SELECT prompt_id AS id, CASE running WHEN 0 THEN 'pending' ELSE 'running' END AS status,
    priority, task_spec AS spec, task_queued_at AS queued_at, task_started_at AS started_at, NULL AS finished_at,
    '[]' AS images, NULL AS error, task_webhook_url AS webhook_url FROM queue WHERE task_spec IS NOT NULL)";

/// A task's columns in its queued prompt's row, serialised.
pub(super) struct QueuedTask {
    pub spec: String,
    pub queued_at: i64,
    pub webhook_url: Option<String>,
}

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
    /// Queues a task's prompt, the task in its row.
    pub fn enqueue_task(&self, prompt: &StoredPrompt, task: &StoredTask) -> Result<(), StoreError> {
        // Serialise before taking the connection: the lock is shared with the worker.
        let row = QueueRow {
            task: Some(QueuedTask {
                spec: serde_json::to_string(&task.spec)?,
                queued_at: task.queued_at,
                webhook_url: task.webhook_url.clone(),
            }),
            ..QueueRow::of(prompt)?
        };
        row.insert(&self.connection())
    }

    pub fn task(&self, id: &str) -> Result<Option<StoredTask>, StoreError> {
        let connection = self.connection();
        let mut row = None;
        for source in ["tasks", QUEUED_TASKS] {
            row = connection
                .prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM {source} WHERE id = ?1"))?
                .query_row(params![id], task_row)
                .optional()?;
            if row.is_some() {
                break;
            }
        }
        drop(connection);
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
        // Tasks that have not ended live in the queue, the others in `tasks`: the newest of
        // each, merged.
        let sources = [
            ("tasks", filter.status.is_none_or(TaskStatus::is_final)),
            (
                QUEUED_TASKS,
                !filter.status.is_some_and(TaskStatus::is_final) && !filter.ended,
            ),
        ];
        let mut rows: Vec<TaskRow> = Vec::new();
        {
            let connection = self.connection();
            for (source, _) in sources.iter().filter(|(_, wanted)| *wanted) {
                let sql = format!(
                    "SELECT {TASK_COLUMNS} FROM {source} WHERE {} ORDER BY queued_at DESC, id DESC LIMIT ?",
                    conditions.join(" AND ")
                );
                let mut statement = connection.prepare(&sql)?;
                let found = statement.query_map(rusqlite::params_from_iter(values.iter()), task_row)?;
                for row in found {
                    rows.push(row?);
                }
            }
        }
        rows.sort_by(|a, b| (b.4, &b.0).cmp(&(a.4, &a.0)));
        rows.truncate(limit + 1);
        let mut tasks = rows.into_iter().map(parse_task).collect::<Result<Vec<_>, _>>()?;
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(|task| (task.queued_at, task.id.clone()))
        } else {
            None
        };
        Ok(TaskPage { tasks, next })
    }

    /// How many tasks there are of each status (every status, none left out at 0).
    pub fn task_counts(&self) -> Result<Vec<(TaskStatus, i64)>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT status, COUNT(*) FROM tasks GROUP BY status
             UNION ALL SELECT status, COUNT(*) FROM {QUEUED_TASKS} GROUP BY status"
        ))?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?;
        let mut counts = TaskStatus::ALL.map(|status| (status, 0));
        for row in rows {
            let (status, count) = row?;
            if let Some(slot) = counts.iter_mut().find(|(known, _)| known.name() == status) {
                slot.1 += count;
            }
        }
        Ok(counts.to_vec())
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

/// Tasks written before tasks lived in the queue (pending or running rows of `tasks`) move into
/// their prompts' rows.
pub(super) fn move_queued_tasks_into_queue(connection: &Connection) -> Result<(), StoreError> {
    connection.execute_batch(
        "UPDATE queue SET
             task_spec = (SELECT spec FROM tasks WHERE tasks.id = queue.prompt_id),
             task_queued_at = (SELECT queued_at FROM tasks WHERE tasks.id = queue.prompt_id),
             task_started_at = (SELECT started_at FROM tasks WHERE tasks.id = queue.prompt_id),
             task_webhook_url = (SELECT webhook_url FROM tasks WHERE tasks.id = queue.prompt_id)
         WHERE task_spec IS NULL
           AND prompt_id IN (SELECT id FROM tasks WHERE status IN ('pending', 'running'));
         DELETE FROM tasks WHERE status IN ('pending', 'running');",
    )?;
    Ok(())
}

/// Ends the task in a queued prompt's row: its row in `tasks`, with this status, `now` as its
/// end, its images and error; its webhook, if any, is scheduled (whether one was is returned).
/// Nothing for a prompt without a task.
fn end_task(
    transaction: &Transaction<'_>,
    prompt_id: &str,
    (status, images, error): (TaskStatus, &[Json], Option<Json>),
    now: i64,
) -> Result<bool, StoreError> {
    // `None`: the prompt carries no task; `Some(false)`: a task without a webhook.
    let ended: Option<bool> = transaction
        .prepare_cached(
            "INSERT OR REPLACE INTO tasks
                 (id, status, priority, spec, queued_at, started_at, finished_at, images, error, webhook_url)
             SELECT prompt_id, ?2, priority, task_spec, task_queued_at, task_started_at, ?3, ?4, ?5, task_webhook_url
             FROM queue WHERE prompt_id = ?1 AND task_spec IS NOT NULL
             RETURNING webhook_url IS NOT NULL",
        )?
        .query_row(
            params![
                prompt_id,
                status.name(),
                now,
                serde_json::to_string(images)?,
                error.map(|error| error.to_string())
            ],
            |row| row.get(0),
        )
        .optional()?;
    if ended != Some(true) {
        return Ok(false);
    }
    super::webhooks::schedule(transaction, prompt_id, now)
}

/// The ids of the tasks waiting in the queue.
pub(super) fn waiting_task_ids(transaction: &Transaction<'_>) -> Result<Vec<String>, StoreError> {
    let mut statement =
        transaction.prepare_cached(&format!("SELECT id FROM {QUEUED_TASKS} WHERE status = 'pending'"))?;
    let ids = statement.query_map([], |row| row.get(0))?;
    Ok(ids.collect::<Result<_, _>>()?)
}

/// A waiting task is cancelled before its prompt leaves the queue.
pub(super) fn cancel_waiting_task(transaction: &Transaction<'_>, prompt_id: &str, now: i64) -> Result<(), StoreError> {
    end_task(transaction, prompt_id, (TaskStatus::Cancelled, &[], None), now).map(drop)
}

/// Settles the task of a prompt from its history entry (no task: nothing happens), before its
/// queue row goes; whether a webhook delivery was scheduled.
pub(super) fn settle_task(
    transaction: &Transaction<'_>,
    prompt_id: &str,
    entry: &Json,
    now: i64,
) -> Result<bool, StoreError> {
    let (status, images, error) = outcome(entry);
    end_task(transaction, prompt_id, (status, &images, error), now)
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

#[cfg(test)]
mod tests {
    use super::*;
    use easel_engine::NodeErrors;

    fn prompt(id: &str) -> StoredPrompt {
        StoredPrompt {
            prompt_id: id.into(),
            number: 0.0,
            number_json: json!(0),
            priority: 2,
            prompt: json!({"1": {"class_type": "X", "inputs": {}}}),
            extra_data: json!({}),
            outputs_to_execute: vec!["1".into()],
            node_errors: NodeErrors::default(),
        }
    }

    fn task(id: &str, queued_at: i64) -> StoredTask {
        StoredTask {
            id: id.into(),
            status: TaskStatus::Pending,
            priority: 2,
            spec: json!({"request": {"prompt": id}, "seed": 1, "workflow": "v1/sd_text2img"}),
            queued_at,
            started_at: None,
            finished_at: None,
            images: Vec::new(),
            error: None,
            webhook_url: Some("https://example.com/hook".into()),
        }
    }

    fn statuses(store: &Store, filter: &TaskFilter) -> Vec<(String, TaskStatus)> {
        let page = store.tasks(filter, 10, None).unwrap();
        page.tasks.into_iter().map(|task| (task.id, task.status)).collect()
    }

    fn success() -> Json {
        json!({"status": {"status_str": "success", "messages": []}, "outputs": {}})
    }

    #[test]
    fn a_task_lives_in_its_queue_row_until_it_ends_and_every_view_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("easel.db");
        let store = Store::open(&path, 100).unwrap();
        for (id, at) in [("a", 1), ("b", 2), ("c", 3)] {
            store.enqueue_task(&prompt(id), &task(id, at)).unwrap();
        }
        assert_eq!(store.task("b").unwrap(), Some(task("b", 2)));
        assert!(store.mark_running("a").unwrap());
        let all = TaskFilter::default();
        use TaskStatus::*;
        let expected = |a| {
            vec![
                ("c".to_string(), Pending),
                ("b".to_string(), Pending),
                ("a".to_string(), a),
            ]
        };
        assert_eq!(statuses(&store, &all), expected(Running));
        let pending = TaskFilter {
            status: Some(Pending),
            ..TaskFilter::default()
        };
        assert_eq!(statuses(&store, &pending).len(), 2);
        let page = store.tasks(&all, 2, None).unwrap();
        assert_eq!(page.next, Some((2, "b".to_string())));
        assert_eq!(store.tasks(&all, 2, page.next.as_ref()).unwrap().tasks[0].id, "a");

        // A restart while `a` runs: it waits again.
        drop(store);
        let store = Store::open(&path, 100).unwrap();
        assert_eq!(store.recover().unwrap().interrupted.unwrap().prompt_id, "a");
        assert_eq!(statuses(&store, &all), expected(Pending));

        assert!(store.mark_running("a").unwrap());
        store.complete("a", &success()).unwrap();
        assert_eq!(store.remove_pending(Some(&["b".to_string()])).unwrap(), ["b"]);
        assert_eq!(
            statuses(&store, &all),
            [
                ("c".to_string(), Pending),
                ("b".to_string(), Cancelled),
                ("a".to_string(), Succeeded)
            ]
        );
        let ended = TaskFilter {
            ended: true,
            ..TaskFilter::default()
        };
        assert_eq!(statuses(&store, &ended).len(), 2);
        // A task that ends without having started (a prompt given up on) settles too.
        store.complete("c", &success()).unwrap();
        assert_eq!(store.task("c").unwrap().unwrap().status, Succeeded);
        assert_eq!(
            store.task_counts().unwrap(),
            [(Pending, 0), (Running, 0), (Succeeded, 2), (Failed, 0), (Cancelled, 1)]
        );
        let (due, _) = store.due_webhooks(i64::MAX).unwrap();
        let mut hooked: Vec<_> = due.into_iter().map(|delivery| delivery.task_id).collect();
        hooked.sort();
        assert_eq!(hooked, ["a", "b", "c"]);
    }

    #[test]
    fn tasks_written_in_their_own_rows_before_they_ended_move_into_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("easel.db");
        {
            let store = Store::open(&path, 100).unwrap();
            for id in ["waiting", "running"] {
                store.enqueue(&prompt(id)).unwrap();
                let connection = store.connection();
                connection
                    .execute(
                        "INSERT INTO tasks (id, status, priority, spec, queued_at, webhook_url)
                         VALUES (?1, ?2, 2, ?3, 5, ?4)",
                        params![
                            id,
                            if id == "running" { "running" } else { "pending" },
                            serde_json::to_string(&task(id, 5).spec).unwrap(),
                            task(id, 5).webhook_url
                        ],
                    )
                    .unwrap();
            }
            store
                .connection()
                .execute("UPDATE queue SET running = 1 WHERE prompt_id = 'running'", [])
                .unwrap();
        }
        let store = Store::open(&path, 100).unwrap();
        assert_eq!(store.task("waiting").unwrap(), Some(task("waiting", 5)));
        assert_eq!(store.task("running").unwrap().unwrap().status, TaskStatus::Running);
        store.recover().unwrap();
        assert_eq!(store.task("running").unwrap(), Some(task("running", 5)));
    }
}
