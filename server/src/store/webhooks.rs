//! Webhook deliveries: one row per ended task that names a webhook URL, written in the same
//! transaction that settles the task, so a restart neither loses a delivery nor makes a second
//! one for the same task. The row keeps the attempts and, once sent, the exact body, so every
//! retry carries the same `webhook-id` and bytes.

use super::{Store, StoreError};
use rusqlite::{params, OptionalExtension, Transaction};

pub(super) const WEBHOOKS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT,
    created_at INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered_at INTEGER,
    given_up_at INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (next_attempt_at) WHERE delivered_at IS NULL AND given_up_at IS NULL;
";

/// A delivery still to make.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelivery {
    /// The `webhook-id`: the same for every attempt.
    pub id: String,
    pub task_id: String,
    pub url: String,
    /// The body of the first attempt, kept for the retries.
    pub body: Option<String>,
    pub created_at: i64,
    pub attempts: i64,
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Delivered,
    /// Failed; try again at this time.
    RetryAt(i64, String),
    /// Failed for the last time.
    GaveUp(String),
}

/// Schedules the delivery of a settled task's webhook, if it names one (at most one per task);
/// whether one was.
pub(super) fn schedule(transaction: &Transaction<'_>, task_id: &str, now: i64) -> Result<bool, StoreError> {
    let scheduled = transaction
        .prepare_cached(
            "INSERT OR IGNORE INTO webhooks (id, task_id, url, created_at, next_attempt_at)
             SELECT 'msg_' || id, id, webhook_url, ?2, ?2 FROM tasks WHERE id = ?1 AND webhook_url IS NOT NULL",
        )?
        .execute(params![task_id, now])?;
    Ok(scheduled > 0)
}

impl Store {
    /// The deliveries due at `now`, oldest first, and when the next later one is due.
    pub fn due_webhooks(&self, now: i64) -> Result<(Vec<PendingDelivery>, Option<i64>), StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare_cached(
            "SELECT id, task_id, url, body, created_at, attempts FROM webhooks
             WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ?1
             ORDER BY next_attempt_at LIMIT 64",
        )?;
        let due = statement
            .query_map(params![now], |row| {
                Ok(PendingDelivery {
                    id: row.get(0)?,
                    task_id: row.get(1)?,
                    url: row.get(2)?,
                    body: row.get(3)?,
                    created_at: row.get(4)?,
                    attempts: row.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let next = connection
            .query_row(
                "SELECT MIN(next_attempt_at) FROM webhooks
                 WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at > ?1",
                params![now],
                |row| row.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten();
        Ok((due, next))
    }

    /// Keeps the body of a delivery's first attempt.
    pub fn set_webhook_body(&self, id: &str, body: &str) -> Result<(), StoreError> {
        self.connection()
            .execute("UPDATE webhooks SET body = ?2 WHERE id = ?1", params![id, body])?;
        Ok(())
    }

    /// Records an attempt.
    pub fn record_webhook_attempt(&self, id: &str, attempt: &Attempt, now: i64) -> Result<(), StoreError> {
        let connection = self.connection();
        match attempt {
            Attempt::Delivered => connection.execute(
                "UPDATE webhooks SET attempts = attempts + 1, delivered_at = ?2, last_error = NULL WHERE id = ?1",
                params![id, now],
            )?,
            Attempt::RetryAt(at, error) => connection.execute(
                "UPDATE webhooks SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3 WHERE id = ?1",
                params![id, at, error],
            )?,
            Attempt::GaveUp(error) => connection.execute(
                "UPDATE webhooks SET attempts = attempts + 1, given_up_at = ?2, last_error = ?3 WHERE id = ?1",
                params![id, now, error],
            )?,
        };
        Ok(())
    }

    /// Deliveries by outcome: `(delivered, pending, given up)`.
    pub fn webhook_counts(&self) -> Result<(i64, i64, i64), StoreError> {
        Ok(self.connection().query_row(
            "SELECT COUNT(delivered_at), COUNT(*) - COUNT(delivered_at) - COUNT(given_up_at), COUNT(given_up_at) FROM webhooks",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?)
    }
}
