//! Webhooks: when a REST task that names a `webhook_url` (or the server's `--webhook-url`) ends,
//! its task JSON is POSTed there, signed as Standard Webhooks specifies (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with
//! the `whsec_` secret of `--webhook-secret`), and retried with growing delays for
//! `--webhook-retry-for`. Deliveries live in the store ([`crate::store::webhooks`]), so a restart
//! goes on where the last one stopped. Loopback and private addresses are refused unless
//! `--webhook-allow-private`.

use crate::outbound::{check_url, refuse_private_resolution};
use crate::rest::tasks::{image_entry, task_json};
use crate::state::Shared;
use crate::store::tasks::now_ms;
use crate::store::webhooks::{Attempt, PendingDelivery};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The delays between attempts: the first retries within seconds, then minutes, then hourly
/// until `--webhook-retry-for` has passed since the task ended.
const RETRY_DELAYS_MS: [i64; 7] = [1_000, 5_000, 30_000, 120_000, 600_000, 1_800_000, 3_600_000];

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The key of `--webhook-secret whsec_<base64>`; without one, deliveries are not signed.
    pub secret: Option<Vec<u8>>,
    /// `--webhook-url`: where tasks that name no webhook report.
    pub default_url: Option<String>,
    /// `--webhook-retry-for`: how long after a task ends its delivery is retried.
    pub retry_for: Duration,
    /// `--webhook-allow-private`: loopback and private addresses may receive webhooks.
    pub allow_private: bool,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            secret: None,
            default_url: None,
            retry_for: Duration::from_secs(24 * 3600),
            allow_private: false,
        }
    }
}

/// The key of a `whsec_<base64>` secret.
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    let encoded = text
        .strip_prefix("whsec_")
        .ok_or("a webhook secret looks like whsec_<base64> (Standard Webhooks)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the part after whsec_ is not base64".to_string())?;
    if key.len() < 16 {
        return Err("the webhook secret is shorter than 16 bytes".into());
    }
    Ok(key)
}

/// `v1,<base64 HMAC-SHA256>` of `id.timestamp.body`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{signature}")
}

/// Wakes the delivery thread when an ended task has a webhook to deliver.
#[derive(Default)]
pub struct WebhookWake {
    pending: Mutex<bool>,
    signal: Condvar,
}

impl WebhookWake {
    pub fn notify(&self) {
        *self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
        self.signal.notify_one();
    }

    /// Waits until notified or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*pending {
            pending = self
                .signal
                .wait_timeout(pending, timeout)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        *pending = false;
    }
}

/// The delivery thread: sends what is due, then sleeps until the next is due or a task schedules one.
pub fn run(shared: &Shared) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(ATTEMPT_TIMEOUT))
        .user_agent("Easel-Webhooks")
        .build()
        .into();
    loop {
        let now = now_ms();
        let (due, next) = match shared.store.due_webhooks(now) {
            Ok(found) => found,
            Err(error) => {
                tracing::error!("cannot read the webhook deliveries: {error}");
                (Vec::new(), Some(now + 1_000))
            }
        };
        if due.is_empty() {
            let wait = next.map_or(Duration::from_secs(60), |at| {
                Duration::from_millis((at - now_ms()).clamp(10, 60_000) as u64)
            });
            shared.webhook_wake.wait(wait);
            continue;
        }
        // Then look again: what failed now has a retry time to sleep until.
        for delivery in due {
            deliver(shared, &agent, &delivery);
        }
    }
}

/// One attempt at a delivery, recorded.
fn deliver(shared: &Shared, agent: &ureq::Agent, delivery: &PendingDelivery) {
    let settings = &shared.settings.webhooks;
    let body = match &delivery.body {
        Some(body) => body.clone(),
        None => match shared.store.task(&delivery.task_id) {
            Ok(Some(task)) => {
                let images = task.images.iter().map(image_entry).collect();
                let body = serde_json::to_string(&task_json(&task, None, images)).unwrap_or_default();
                if let Err(error) = shared.store.set_webhook_body(&delivery.id, &body) {
                    tracing::error!(webhook = %delivery.id, "cannot store the webhook body: {error}");
                }
                body
            }
            // The task was deleted before its webhook went out: nothing to report.
            Ok(None) => {
                let attempt = Attempt::GaveUp("the task was deleted".into());
                let _ = shared.store.record_webhook_attempt(&delivery.id, &attempt, now_ms());
                return;
            }
            Err(error) => {
                tracing::error!(webhook = %delivery.id, "cannot read the task: {error}");
                return;
            }
        },
    };
    let result = send(agent, settings, delivery, &body);
    let now = now_ms();
    let attempt = match result {
        Ok(()) => Attempt::Delivered,
        Err(error) => {
            let delay = RETRY_DELAYS_MS[(delivery.attempts as usize).min(RETRY_DELAYS_MS.len() - 1)];
            let deadline = delivery.created_at + settings.retry_for.as_millis() as i64;
            tracing::warn!(webhook = %delivery.id, url = %delivery.url, attempt = delivery.attempts + 1, "webhook failed: {error}");
            if now + delay > deadline {
                Attempt::GaveUp(error)
            } else {
                Attempt::RetryAt(now + delay, error)
            }
        }
    };
    if let Err(error) = shared.store.record_webhook_attempt(&delivery.id, &attempt, now) {
        tracing::error!(webhook = %delivery.id, "cannot record the webhook attempt: {error}");
        // The delivery stays due: do not retry it in a tight loop while the store fails.
        std::thread::sleep(Duration::from_secs(1));
    }
    shared.metrics.webhook_attempt(&attempt);
}

/// POSTs the body; a 2xx answer is a delivery.
fn send(agent: &ureq::Agent, settings: &WebhookSettings, delivery: &PendingDelivery, body: &str) -> Result<(), String> {
    check_url(&delivery.url, settings.allow_private)?;
    if !settings.allow_private {
        refuse_private_resolution(&delivery.url)?;
    }
    let timestamp = now_ms() / 1000;
    let mut request = agent
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("webhook-id", &delivery.id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(key) = &settings.secret {
        request = request.header("webhook-signature", sign(key, &delivery.id, timestamp, body));
    }
    let response = request.send(body).map_err(|error| error.to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification's reference libraries.
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
    }
}
