//! Execution semantics: ComfyUI's order, caching across prompts, list mapping, events, errors,
//! interrupts and panics.

mod common;

use common::test_nodes;
use easel_engine::events::{Event, EventKind};
use easel_engine::{validate_prompt, CacheMode, ExecutionStatus, Executor, Interrupt, Prompt, Services};
use serde_json::{json, Value as Json};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

struct Harness {
    executor: Executor,
    calls: std::collections::HashMap<&'static str, Arc<std::sync::atomic::AtomicUsize>>,
    interrupt: Interrupt,
}

impl Harness {
    fn new(mode: CacheMode) -> Self {
        let nodes = test_nodes();
        let executor = Executor::new(Arc::new(nodes.registry), Arc::new(Services::new()), mode);
        Harness {
            executor,
            calls: nodes.calls,
            interrupt: Interrupt::new(),
        }
    }

    fn calls(&self, class: &str) -> usize {
        self.calls[class].load(Ordering::SeqCst)
    }

    /// Runs a prompt; returns the outcome and every event as (type, data).
    fn run(&mut self, prompt: Json) -> (easel_engine::ExecutionOutcome, Vec<(String, Json)>) {
        self.run_with(prompt, |_, _| {})
    }

    fn run_with(
        &mut self,
        prompt: Json,
        on_event: impl Fn(&Event, &Interrupt),
    ) -> (easel_engine::ExecutionOutcome, Vec<(String, Json)>) {
        let validated = validate_prompt(
            self.executor.registry(),
            &Services::new(),
            Prompt::from_json(prompt).unwrap(),
            None,
        )
        .expect("valid prompt");
        let events = Mutex::new(Vec::new());
        let interrupt = self.interrupt.clone();
        let sink = |event: Event| {
            on_event(&event, &interrupt);
            events.lock().unwrap().push((event.kind.name().to_string(), event.data));
        };
        let outcome = self
            .executor
            .execute("p1", &validated, &json!({}), &sink, &self.interrupt);
        self.interrupt.clear();
        (outcome, events.into_inner().unwrap())
    }
}

fn executing_order(events: &[(String, Json)]) -> Vec<String> {
    events
        .iter()
        .filter(|(kind, _)| kind == "executing")
        .map(|(_, data)| data["node"].as_str().unwrap().to_string())
        .collect()
}

fn of_kind<'a>(events: &'a [(String, Json)], kind: &str) -> Vec<&'a Json> {
    events.iter().filter(|(k, _)| k == kind).map(|(_, d)| d).collect()
}

fn fan_out() -> Json {
    json!({
        "1": {"class_type": "Int", "inputs": {"value": 5}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["4", 0]}},
        "4": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
        "5": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "6": {"class_type": "Int", "inputs": {"value": 99}}
    })
}

#[test]
fn runs_outputs_and_ancestors_in_comfyui_order_with_events() {
    let mut h = Harness::new(CacheMode::Classic);
    let (outcome, events) = h.run(fan_out());
    assert_eq!(outcome.status, ExecutionStatus::Success);
    // Outputs first as soon as ready; the unreachable node 6 never runs.
    // Node 5 is identical to node 2 (same class, same inputs): it is served from the cache.
    assert_eq!(executing_order(&events), ["1", "2", "4", "3"]);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).take(5).collect();
    assert_eq!(
        kinds,
        [
            "execution_start",
            "execution_cached",
            "progress_state",
            "executing",
            "progress_state"
        ]
    );
    assert_eq!(events.last().unwrap().0, "execution_success");
    let executed = of_kind(&events, "executed");
    assert_eq!(
        executed[0],
        &json!({"node": "2", "display_node": "2", "output": {"text": ["5"]}, "prompt_id": "p1"})
    );
    assert_eq!(outcome.outputs["3"], json!({"text": ["10"]}));
    assert_eq!(
        outcome.meta["3"],
        json!({"node_id": "3", "display_node": "3", "parent_node": null, "real_node_id": "3"})
    );
    let first_state = of_kind(&events, "progress_state")[0];
    assert_eq!(
        first_state["nodes"]["1"],
        json!({"value": 0.0, "max": 1.0, "state": "running", "node_id": "1", "prompt_id": "p1", "display_node_id": "1", "parent_node_id": null, "real_node_id": "1"})
    );
    let messages: Vec<&str> = outcome.messages.iter().map(|m| m[0].as_str().unwrap()).collect();
    assert_eq!(messages, ["execution_start", "execution_cached", "execution_success"]);
    assert_eq!(outcome.status_json()["status_str"], "success");
    assert_eq!(h.calls("Int"), 1);
}

#[test]
fn unchanged_prompt_reruns_nothing_and_resends_cached_ui() {
    let mut h = Harness::new(CacheMode::Classic);
    h.run(fan_out());
    let (outcome, events) = h.run(fan_out());
    assert_eq!(
        of_kind(&events, "execution_cached")[0]["nodes"],
        json!(["1", "2", "3", "4", "5"])
    );
    assert!(executing_order(&events).is_empty());
    let executed: Vec<&Json> = of_kind(&events, "executed").iter().map(|d| &d["node"]).collect();
    assert_eq!(executed, [&json!("2"), &json!("3"), &json!("5")]);
    assert_eq!(outcome.outputs["2"], json!({"text": ["5"]}));
    let finished = &of_kind(&events, "progress_state")[0]["nodes"]["2"];
    assert_eq!((&finished["value"], &finished["max"]), (&json!(1), &json!(1)));
    assert_eq!((h.calls("Int"), h.calls("Add"), h.calls("Show")), (1, 1, 2));

    // A changed constant re-runs only what depends on it.
    let mut changed = fan_out();
    changed["4"]["inputs"]["b"] = json!(7);
    let (_, events) = h.run(changed);
    assert_eq!(executing_order(&events), ["4", "3"]);
}

#[test]
fn identical_subgraphs_share_cache_entries_regardless_of_ids() {
    let mut h = Harness::new(CacheMode::Classic);
    let (_, events) = h.run(json!({
        "a": {"class_type": "Int", "inputs": {"value": 1}},
        "b": {"class_type": "Int", "inputs": {"value": 1}},
        "sa": {"class_type": "Show", "inputs": {"value": ["a", 0]}},
        "sb": {"class_type": "Show", "inputs": {"value": ["b", 0]}}
    }));
    assert_eq!(h.calls("Int"), 1);
    assert_eq!(h.calls("Show"), 1);
    assert_eq!(executing_order(&events), ["a", "sa"]);
}

#[test]
fn cache_modes() {
    let first = json!({"1": {"class_type": "Int", "inputs": {"value": 1}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}});
    let second = json!({"1": {"class_type": "Int", "inputs": {"value": 2}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}});

    // Classic: alternating between two prompts re-runs everything.
    let mut h = Harness::new(CacheMode::Classic);
    for prompt in [&first, &second, &first] {
        h.run(prompt.clone());
    }
    assert_eq!(h.calls("Int"), 3);

    // LRU keeps both.
    let mut h = Harness::new(CacheMode::Lru(10));
    for prompt in [&first, &second, &first, &second] {
        h.run(prompt.clone());
    }
    assert_eq!(h.calls("Int"), 2);

    // LRU with room for two entries evicts the oldest generations at the start of a prompt.
    let third = json!({"1": {"class_type": "Int", "inputs": {"value": 3}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}});
    let mut h = Harness::new(CacheMode::Lru(2));
    for prompt in [&first, &second, &third, &second, &first] {
        h.run(prompt.clone());
    }
    assert_eq!(h.calls("Int"), 4);

    // None: nothing is ever reported cached.
    let mut h = Harness::new(CacheMode::None);
    h.run(first.clone());
    let (_, events) = h.run(first.clone());
    assert_eq!(of_kind(&events, "execution_cached")[0]["nodes"], json!([]));
    assert_eq!(h.calls("Int"), 2);
}

#[test]
fn lists_map_over_calls_and_merge_ui() {
    let mut h = Harness::new(CacheMode::Classic);
    let (outcome, _) = h.run(json!({
        "r": {"class_type": "Range", "inputs": {"count": 3}},
        "k": {"class_type": "Int", "inputs": {"value": 10}},
        "add": {"class_type": "Add", "inputs": {"a": ["r", 0], "b": ["k", 0]}},
        "show": {"class_type": "Show", "inputs": {"value": ["add", 0]}},
        "sum": {"class_type": "Sum", "inputs": {"values": ["r", 0]}},
        "show_sum": {"class_type": "Show", "inputs": {"value": ["sum", 0]}}
    }));
    assert_eq!(outcome.outputs["show"], json!({"text": ["10", "11", "12"]}));
    assert_eq!(outcome.outputs["show_sum"], json!({"text": ["3"]}));
    assert_eq!(h.calls("Add"), 3);
    assert_eq!(h.calls("Sum"), 1);
}

#[test]
fn a_failing_node_fails_its_prompt_with_execution_error() {
    let mut h = Harness::new(CacheMode::Classic);
    let (outcome, events) = h.run(json!({
        "1": {"class_type": "Int", "inputs": {"value": 1}},
        "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}
    }));
    assert_eq!(outcome.status, ExecutionStatus::Error);
    assert_eq!(outcome.status_json()["completed"], false);
    let error = of_kind(&events, "execution_error")[0].clone();
    let keys: Vec<&String> = error.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "prompt_id",
            "node_id",
            "node_type",
            "executed",
            "exception_message",
            "exception_type",
            "traceback",
            "current_inputs",
            "current_outputs",
            "timestamp"
        ]
    );
    assert_eq!(error["node_id"], "2");
    assert_eq!(error["node_type"], "Fail");
    assert_eq!(error["executed"], json!(["1"]));
    assert_eq!(error["exception_message"], "bad value\n");
    assert_eq!(error["exception_type"], "ValueError");
    assert_eq!(error["current_inputs"], json!({"value": [1]}));
    assert_eq!(error["current_outputs"], json!(["1", "2", "3"]));
    assert!(of_kind(&events, "execution_success").is_empty());
    assert_eq!(h.calls("Show"), 0);
}

#[test]
fn a_panicking_node_fails_its_prompt_and_the_executor_keeps_serving() {
    let mut h = Harness::new(CacheMode::Classic);
    let (outcome, events) = h.run(json!({
        "1": {"class_type": "Int", "inputs": {"value": 1}},
        "2": {"class_type": "Panic", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}
    }));
    assert_eq!(outcome.status, ExecutionStatus::Error);
    let error = of_kind(&events, "execution_error")[0];
    assert_eq!(error["exception_type"], "RuntimeError");
    assert!(error["exception_message"].as_str().unwrap().contains("boom"));

    let (outcome, _) = h.run(fan_out());
    assert_eq!(outcome.status, ExecutionStatus::Success);
}

#[test]
fn interrupt_stops_at_the_next_progress_update() {
    let mut h = Harness::new(CacheMode::Classic);
    let prompt = json!({
        "1": {"class_type": "Int", "inputs": {"value": 1}},
        "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 5}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}
    });
    let (outcome, events) = h.run_with(prompt.clone(), |event, interrupt| {
        if event.kind == EventKind::Progress && event.data["value"] == 2 {
            interrupt.trigger();
        }
    });
    assert_eq!(outcome.status, ExecutionStatus::Interrupted);
    let progress: Vec<&Json> = of_kind(&events, "progress").iter().map(|d| &d["value"]).collect();
    assert_eq!(progress, [&json!(1), &json!(2)]);
    let interrupted = of_kind(&events, "execution_interrupted")[0];
    assert_eq!(interrupted["node_id"], "2");
    assert_eq!(interrupted["node_type"], "Steps");
    assert_eq!(interrupted["executed"], json!(["1"]));
    assert_eq!(outcome.messages.last().unwrap()[0], "execution_interrupted");
    assert_eq!(h.calls("Show"), 0);

    // The next prompt runs normally, reusing what finished before the interrupt.
    let (outcome, events) = h.run(prompt);
    assert_eq!(outcome.status, ExecutionStatus::Success);
    assert_eq!(executing_order(&events), ["2", "3"]);
    let steps = of_kind(&events, "progress_state").last().unwrap()["nodes"]["2"].clone();
    assert_eq!(
        (steps["value"].clone(), steps["state"].clone()),
        (json!(5), json!("finished"))
    );
}

#[test]
fn interrupt_before_a_node_stops_the_prompt() {
    let mut h = Harness::new(CacheMode::Classic);
    let (outcome, events) = h.run_with(fan_out(), |event, interrupt| {
        if event.kind == EventKind::Executed {
            interrupt.trigger();
        }
    });
    assert_eq!(outcome.status, ExecutionStatus::Interrupted);
    assert_eq!(of_kind(&events, "execution_interrupted")[0]["node_id"], "5");
}

/// A sink that drops `progress_state`, as a client of a huge graph would.
struct Quiet(Mutex<usize>);

impl easel_engine::EventSink for Quiet {
    fn emit(&self, _: Event) {
        *self.0.lock().unwrap() += 1;
    }
    fn wants(&self, kind: EventKind) -> bool {
        kind != EventKind::ProgressState
    }
}

#[test]
fn a_100000_node_chain_executes_without_overflow() {
    let mut prompt = serde_json::Map::new();
    prompt.insert("0".into(), json!({"class_type": "Int", "inputs": {"value": 1}}));
    for i in 1..100_000 {
        prompt.insert(
            i.to_string(),
            json!({"class_type": "Add", "inputs": {"a": [(i - 1).to_string(), 0], "b": ["0", 0]}}),
        );
    }
    prompt.insert(
        "out".into(),
        json!({"class_type": "Show", "inputs": {"value": ["99999", 0]}}),
    );
    let h = Harness::new(CacheMode::Classic);
    let validated = validate_prompt(
        h.executor.registry(),
        &Services::new(),
        Prompt::from_json(Json::Object(prompt)).unwrap(),
        None,
    )
    .unwrap();
    let mut executor = h.executor;
    let sink = Quiet(Mutex::new(0));
    let started = std::time::Instant::now();
    let outcome = executor.execute("deep", &validated, &json!({}), &sink, &Interrupt::new());
    eprintln!("executed in {:?}", started.elapsed());
    assert_eq!(outcome.status, ExecutionStatus::Success);
    assert_eq!(outcome.outputs["out"], json!({"text": ["100000"]}));
}

#[test]
fn a_cycle_through_an_undeclared_input_fails_naming_a_node_on_it() {
    let mut h = Harness::new(CacheMode::Classic);
    // `extra` is no input of Add or Int: validation does not follow it, the schedule does.
    let (outcome, events) = h.run(json!({
        "1": {"class_type": "Int", "inputs": {"value": 1, "extra": ["2", 0]}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}
    }));
    assert_eq!(outcome.status, ExecutionStatus::Error);
    let error = &of_kind(&events, "execution_error")[0];
    assert_eq!(error["exception_type"], "graph.DependencyCycleError");
    // As ComfyUI: the first node added of those left waiting (the output, after the cycle).
    assert_eq!(error["node_id"], "3");
    assert_eq!(error["node_type"], "Show");
}
