//! Operations: `/metrics` in Prometheus' text format, `/healthz` (the process answers) and
//! `/readyz` (the store opens, the worker is alive, the queue is below `--max-queue`).
//!
//! Counters and histograms are kept as things happen (HTTP requests by route and status, prompt
//! and sampling-step durations, webhook attempts); gauges (queue depth, tasks by status, loaded
//! models) are read when scraped.

use crate::state::AppState;
use crate::store::webhooks::Attempt;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    http_requests: Family<RouteLabels, Counter>,
    prompt_seconds: Histogram,
    step_seconds: Histogram,
    webhook_attempts: Family<OutcomeLabels, Counter>,
    queue_depth: Gauge,
    tasks: Family<StatusLabels, Gauge>,
    models_loaded: Gauge,
    webhooks_pending: Gauge,
    /// Cleared when the worker thread stops (it should not).
    pub worker_alive: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            registry: Mutex::new(Registry::with_prefix("easel")),
            http_requests: Family::default(),
            prompt_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            step_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            webhook_attempts: Family::default(),
            queue_depth: Gauge::default(),
            tasks: Family::default(),
            models_loaded: Gauge::default(),
            webhooks_pending: Gauge::default(),
            worker_alive: AtomicBool::new(true),
        };
        {
            let mut registry = metrics.registry();
            registry.register(
                "http_requests",
                "HTTP requests by route, method and status",
                metrics.http_requests.clone(),
            );
            registry.register(
                "prompt_duration_seconds",
                "How long prompts (and REST tasks) ran",
                metrics.prompt_seconds.clone(),
            );
            registry.register(
                "step_duration_seconds",
                "How long one sampling step took",
                metrics.step_seconds.clone(),
            );
            registry.register(
                "webhook_attempts",
                "Webhook delivery attempts by outcome (delivered, retry, gave_up)",
                metrics.webhook_attempts.clone(),
            );
            registry.register("queue_depth", "Prompts waiting or running", metrics.queue_depth.clone());
            registry.register("tasks", "REST tasks by status", metrics.tasks.clone());
            registry.register("models_loaded", "Models held in memory", metrics.models_loaded.clone());
            registry.register(
                "webhooks_pending",
                "Webhook deliveries still to make",
                metrics.webhooks_pending.clone(),
            );
        }
        metrics
    }
}

impl Metrics {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn prompt_finished(&self, seconds: f64) {
        self.prompt_seconds.observe(seconds);
    }

    pub fn sampling_step(&self, seconds: f64) {
        self.step_seconds.observe(seconds);
    }

    pub fn webhook_attempt(&self, attempt: &Attempt) {
        let outcome = match attempt {
            Attempt::Delivered => "delivered",
            Attempt::RetryAt(..) => "retry",
            Attempt::GaveUp(_) => "gave_up",
        };
        self.webhook_attempts
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Counts each request by its route (the pattern, not the path) and status.
pub async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let method = request.method().to_string();
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .get_or_create(&RouteLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "metrics",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let metrics = &state.metrics;
    metrics.queue_depth.set(state.queue.remaining() as i64);
    if let Ok(counts) = state.store.task_counts() {
        for (status, count) in counts {
            let status = status.name().to_string();
            metrics.tasks.get_or_create(&StatusLabels { status }).set(count);
        }
    }
    if let Some(models) = state.runtime.services.get::<easel_nodes::model_cache::ModelCache>() {
        metrics.models_loaded.set(models.len() as i64);
    }
    if let Ok((_, pending, _)) = state.store.webhook_counts() {
        metrics.webhooks_pending.set(pending);
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[utoipa::path(get, path = "/healthz", tag = "operations", operation_id = "healthz",
    responses((status = 200, description = "OK", body = crate::rest::schemas::Health)))]
async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// 200 when the server can take work, else 503 saying what is wrong.
#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "readyz",
    responses((status = 200, description = "OK", body = crate::rest::schemas::Readiness), (status = 503, description = "Not ready", body = crate::rest::schemas::Readiness)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let mut problems = Vec::new();
    if let Err(error) = state.store.task_counts() {
        problems.push(format!("the store cannot be read: {error}"));
    }
    if !state.metrics.worker_alive.load(Ordering::SeqCst) {
        problems.push("the worker has stopped".to_string());
    }
    if let Some(limit) = state.settings.max_queue {
        let depth = state.queue.remaining();
        if depth >= limit {
            problems.push(format!("the queue is full ({depth} of {limit})"));
        }
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let ready = problems.is_empty();
    (status, axum::Json(json!({"ready": ready, "problems": problems}))).into_response()
}
