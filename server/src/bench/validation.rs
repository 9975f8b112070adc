//! `easel bench validation`: a prompt of N outputs that all fail validation. ComfyUI charges every
//! failing node with each output that fails after it (`dependent_outputs`), so the 400 body grows
//! as N². Measured: the time to validate and to write the body, its size, and the memory the two
//! take at their peak, with the body written as Easel writes it (streamed from one shared list of
//! failing outputs) and, side by side, through a JSON value with every list spelled out.

use crate::allocator::release_freed_memory;
use crate::cli::BenchArgs;
use anyhow::Context;
use easel_engine::pyjson::dumps;
use easel_engine::{validate_prompt, Prompt, Services};
use serde_json::{json, Map, Value as Json};
use std::time::Instant;

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let registry = easel_nodes::builtin_registry();
    let services = Services::new();
    // Each PreviewImage lacks its `images`: every output fails on a node of its own.
    let nodes: Map<String, Json> = (1..=args.outputs)
        .map(|id| (id.to_string(), json!({"class_type": "PreviewImage", "inputs": {}})))
        .collect();
    let prompt = Prompt::from_json(Json::Object(nodes))?;
    println!("| body written | failing outputs | validation (s) | body (s) | body (MB) | peak memory (MB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (how, as_value) in [("streamed (Easel)", false), ("through a JSON value", true)] {
        release_freed_memory();
        reset_peak_rss();
        let resident = resident_bytes();
        let started = Instant::now();
        let failure = validate_prompt(&registry, &services, prompt.clone(), None)
            .err()
            .context("the prompt passed validation")?;
        let validation = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let body = if as_value {
            dumps(&failure.to_json())
        } else {
            dumps(&failure)
        };
        let writing = started.elapsed().as_secs_f64();
        let peak = match (super::peak_rss_bytes(), resident) {
            (Some(peak), Some(resident)) => format!("{:.0}", peak.saturating_sub(resident) as f64 / 1e6),
            _ => "n/a".into(),
        };
        println!(
            "| {how} | {} | {validation:.3} | {writing:.3} | {:.1} | {peak} |",
            args.outputs,
            body.len() as f64 / 1e6
        );
    }
    println!("\npeak memory: above the resident set before validating (Linux `VmHWM`, reset between rows)");
    Ok(std::process::ExitCode::SUCCESS)
}

/// The process's resident set now (`VmRSS`), where the platform says.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the peak resident set (`VmHWM`) afresh from the current one (Linux: `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
