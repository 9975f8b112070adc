//! `easel run WORKFLOW.json`: validates and executes one prompt (API format, a `POST /prompt`
//! body, or a UI-format workflow) in-process, with a progress bar on
//! a terminal, and prints the prompt's history `outputs` as the last line of standard output.

use crate::cli::RunArgs;
use crate::setup;
use anyhow::Context;
use easel_engine::events::{Event, EventKind};
use easel_engine::pyjson::dumps;
use easel_engine::ui_workflow::queued_prompt;
use easel_engine::{validate_prompt, EventSink, ExecutionStatus, Executor, Interrupt, Prompt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};
use std::process::ExitCode;

/// Exit status when the prompt is rejected by validation.
const INVALID_PROMPT: u8 = 2;

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(&args.workflow).with_context(|| format!("cannot read {}", args.workflow.display()))?;
    let body: Json = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", args.workflow.display()))?;
    let (prompt_json, mut extra_data) = match body {
        Json::Object(mut request) if request.get("prompt").is_some_and(Json::is_object) => {
            let prompt = request.remove("prompt").unwrap_or_default();
            (prompt, request.remove("extra_data").unwrap_or_else(|| json!({})))
        }
        other => (other, json!({})),
    };
    let runtime = setup::runtime(&args.execution)?;
    let prompt_json = queued_prompt(&prompt_json, &mut extra_data, &runtime.registry, &runtime.services)?;
    let prompt = Prompt::from_json(prompt_json)?;
    let validated = match validate_prompt(&runtime.registry, &runtime.services, prompt, None) {
        Ok(validated) => validated,
        Err(failure) => {
            eprintln!("{}", dumps(&failure));
            return Ok(ExitCode::from(INVALID_PROMPT));
        }
    };
    if !validated.node_errors.is_empty() {
        eprintln!(
            "some outputs failed validation and are skipped: {}",
            dumps(&validated.node_errors)
        );
    }

    let progress = TerminalProgress::new(validated.prompt.clone());
    let mut executor = Executor::new(runtime.registry.clone(), runtime.services.clone(), runtime.cache_mode);
    let prompt_id = uuid::Uuid::new_v4().to_string();
    let outcome = executor.execute(&prompt_id, &validated, &extra_data, &progress, &Interrupt::new());
    progress.bar.finish_and_clear();
    if let Some(last) = outcome.messages.last() {
        if outcome.status != ExecutionStatus::Success {
            eprintln!("{}", dumps(last));
        }
    }
    println!("{}", dumps(&Json::Object(outcome.outputs)));
    Ok(if outcome.status == ExecutionStatus::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Shows which node runs and its step progress; hidden when standard error is not a terminal.
struct TerminalProgress {
    bar: ProgressBar,
    prompt: Prompt,
}

impl TerminalProgress {
    fn new(prompt: Prompt) -> Self {
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        TerminalProgress { bar, prompt }
    }
}

impl EventSink for TerminalProgress {
    fn emit(&self, event: Event) {
        match event.kind {
            EventKind::Executing => {
                let node = event.data["node"].as_str().unwrap_or_default();
                let class = self.prompt.class_type(node).unwrap_or_default();
                let title = self.prompt.title(node).unwrap_or(class);
                self.bar.set_message(format!("#{node} {title}"));
                self.bar.set_length(1);
                self.bar.set_position(0);
            }
            EventKind::Progress => {
                self.bar.set_length(event.data["max"].as_u64().unwrap_or(1));
                self.bar.set_position(event.data["value"].as_u64().unwrap_or(0));
            }
            _ => {}
        }
    }

    fn wants(&self, kind: EventKind) -> bool {
        kind != EventKind::ProgressState
    }
}
