//! Runs a validated prompt: ComfyUI's `PromptExecutor.execute`.
//!
//! For each prompt the executor signs every node, reuses what the [`OutputCache`] holds, runs the rest
//! in [`ExecutionList`] order, maps list inputs over node calls, and reports each step as an [`Event`].
//! A node that fails or panics fails its prompt with `execution_error`; the executor stays usable.

use crate::cache::{signatures, CacheKey, CacheMode, CachedOutput, OutputCache, SignatureInput};
use crate::events::{timestamp_ms, Event, EventKind, EventSink};
use crate::node::{Interrupt, Node, NodeContext, NodeError, NodeInputs, Progress, Services};
use crate::prompt::{input_ref, InputRef, NodeId, Prompt};
use crate::registry::NodeRegistry;
use crate::schedule::ExecutionList;
use crate::schema::NodeSchema;
use crate::validate::ValidatedPrompt;
use crate::value::Value;
use indexmap::IndexMap;
use rustc_hash::FxHashMap as HashMap;
use serde_json::{json, Map, Value as Json};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// How a prompt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionStatus {
    Success,
    Error,
    Interrupted,
}

/// What a finished prompt leaves for its history entry.
#[derive(Debug, Clone)]
pub struct ExecutionOutcome {
    pub status: ExecutionStatus,
    /// `status.messages`: `[event, data]` for the start, cached and final events.
    pub messages: Vec<Json>,
    /// The UI output of every node of the prompt that has one, cached or not.
    pub outputs: Map<String, Json>,
    /// `meta`: display information for each node in `outputs`.
    pub meta: Map<String, Json>,
}

impl ExecutionOutcome {
    /// The history entry's `status` object.
    pub fn status_json(&self) -> Json {
        let status_str = if self.status == ExecutionStatus::Success {
            "success"
        } else {
            "error"
        };
        json!({
            "status_str": status_str,
            "completed": self.status == ExecutionStatus::Success,
            "messages": self.messages,
        })
    }
}

/// Executes prompts one at a time, keeping the output cache between them.
pub struct Executor {
    registry: Arc<NodeRegistry>,
    services: Arc<Services>,
    cache: OutputCache,
}

/// Why a node stopped the prompt.
enum Stop {
    Failed {
        node: NodeId,
        error: NodeError,
        inputs: Json,
    },
    Interrupted {
        node: NodeId,
    },
}

impl Executor {
    pub fn new(registry: Arc<NodeRegistry>, services: Arc<Services>, mode: CacheMode) -> Self {
        Executor {
            registry,
            services,
            cache: OutputCache::new(mode),
        }
    }

    pub fn registry(&self) -> &Arc<NodeRegistry> {
        &self.registry
    }

    /// Forgets every cached output (ComfyUI's `POST /free` with `free_memory`).
    pub fn clear_cache(&mut self) {
        self.cache = OutputCache::new(self.cache.mode());
    }

    /// Runs the prompt's valid outputs. `extra_data` is the request's (`extra_pnginfo`, `client_id`).
    pub fn execute(
        &mut self,
        prompt_id: &str,
        validated: &ValidatedPrompt,
        extra_data: &Json,
        sink: &dyn EventSink,
        interrupt: &Interrupt,
    ) -> ExecutionOutcome {
        let mut messages = Vec::new();
        let mut record = |kind: EventKind, data: Json| {
            messages.push(json!([kind.name(), data]));
            sink.emit(Event::new(kind, data));
        };
        record(
            EventKind::ExecutionStart,
            json!({"prompt_id": prompt_id, "timestamp": timestamp_ms()}),
        );

        let mut prompt = validated.prompt.clone();
        let classes = self.node_classes(&prompt);
        let mut fingerprints = self.fingerprints(&mut prompt, &classes);
        let keys = signatures(&prompt, |id| {
            let (_, schema) = classes.get(id)?;
            Some(SignatureInput {
                schema,
                fingerprint: fingerprints.remove(id).flatten(),
            })
        });
        self.cache.begin_prompt(keys.values());
        let cached: Vec<&str> = prompt
            .node_ids()
            .filter(|id| keys.get(*id).is_some_and(|k| self.cache.contains(k)))
            .collect();
        record(
            EventKind::ExecutionCached,
            json!({"nodes": cached, "prompt_id": prompt_id, "timestamp": timestamp_ms()}),
        );

        let is_output = |id: &str| classes.get(id).is_some_and(|(_, schema)| schema.output_node);
        let mut list = ExecutionList::new(&prompt, &validated.outputs_to_execute, is_output, |id| {
            keys.get(id).is_some_and(|k| self.cache.contains(k))
        });

        let run = PromptRun {
            prompt_id,
            prompt_json: prompt.to_json(),
            extra_pnginfo: extra_data.get("extra_pnginfo").filter(|v| !v.is_null()).cloned(),
            progress: RefCell::new(Map::new()),
            sink,
            interrupt,
        };
        let mut results: HashMap<NodeId, Arc<Vec<Vec<Value>>>> = HashMap::default();
        let mut executed: Vec<NodeId> = Vec::new();
        let mut stop = None;
        while let Some(id) = list.take_next() {
            if interrupt.is_set() {
                stop = Some(Stop::Interrupted { node: id });
                break;
            }
            let (Some((node, schema)), Some(key)) = (classes.get(&id), keys.get(&id)) else {
                let error = NodeError::typed("KeyError", format!("node {id} has no registered class"));
                stop = Some(Stop::Failed {
                    node: id,
                    error,
                    inputs: json!({}),
                });
                break;
            };
            // Cached output nodes, and nodes an identical sub-graph of this prompt already ran, are
            // "executed" from the cache: ComfyUI re-sends their UI and runs nothing.
            if let Some(cached) = self.cache.get(key) {
                run.send(
                    EventKind::Executed,
                    json!({"node": id, "display_node": id, "output": cached.ui, "prompt_id": prompt_id}),
                );
                run.finish_progress(&id, Some((json!(1), json!(1))));
                results.insert(id.clone(), cached.outputs);
                list.complete(&id);
                continue;
            }
            run.start_progress(&id);
            run.send(
                EventKind::Executing,
                json!({"node": id, "display_node": id, "prompt_id": prompt_id}),
            );
            let inputs = match self.gather_inputs(&prompt, &id, schema, &keys, &mut results) {
                Ok(inputs) => inputs,
                Err(error) => {
                    stop = Some(Stop::Failed {
                        node: id,
                        error,
                        inputs: json!({}),
                    });
                    break;
                }
            };
            let ctx = NodeContext {
                node_id: &id,
                prompt_id,
                prompt: &run.prompt_json,
                extra_pnginfo: run.extra_pnginfo.as_ref(),
                services: &self.services,
                interrupt,
                on_progress: &|p: Progress| run.report_progress(&id, p),
                on_text: &|text: &str| run.send(EventKind::ProgressText, json!({"node_id": id, "text": text})),
            };
            match call_mapped(node.as_ref(), schema, &ctx, &inputs) {
                Ok((outputs, ui)) => {
                    let outputs = Arc::new(outputs);
                    self.cache.insert(
                        *key,
                        CachedOutput {
                            outputs: outputs.clone(),
                            ui: ui.clone(),
                        },
                    );
                    results.insert(id.clone(), outputs);
                    if let Some(ui) = ui {
                        run.send(
                            EventKind::Executed,
                            json!({"node": id, "display_node": id, "output": ui, "prompt_id": prompt_id}),
                        );
                    }
                    run.finish_progress(&id, None);
                    executed.push(id.clone());
                    list.complete(&id);
                }
                Err(NodeError::Interrupted) => {
                    stop = Some(Stop::Interrupted { node: id });
                    break;
                }
                Err(error) => {
                    stop = Some(Stop::Failed {
                        node: id,
                        error,
                        inputs: inputs_for_error(&inputs),
                    });
                    break;
                }
            }
        }
        if stop.is_none() && list.remaining() > 0 {
            let node = list.first_blocked().unwrap_or_default();
            let error = NodeError::typed("graph.DependencyCycleError", "Dependency cycle detected");
            stop = Some(Stop::Failed {
                node,
                error,
                inputs: json!({}),
            });
        }

        let node_type = |id: &str| prompt.class_type(id).unwrap_or_default().to_string();
        let status = match stop {
            None => {
                record(
                    EventKind::ExecutionSuccess,
                    json!({"prompt_id": prompt_id, "timestamp": timestamp_ms()}),
                );
                ExecutionStatus::Success
            }
            Some(Stop::Interrupted { node }) => {
                record(
                    EventKind::ExecutionInterrupted,
                    json!({"prompt_id": prompt_id, "node_id": node, "node_type": node_type(&node), "executed": executed, "timestamp": timestamp_ms()}),
                );
                ExecutionStatus::Interrupted
            }
            Some(Stop::Failed { node, error, inputs }) => {
                let (exception_type, message) = match &error {
                    NodeError::Failed {
                        exception_type,
                        message,
                    } => (exception_type.clone(), message.clone()),
                    NodeError::Interrupted => ("InterruptProcessingException".into(), error.to_string()),
                };
                record(
                    EventKind::ExecutionError,
                    json!({
                        "prompt_id": prompt_id,
                        "node_id": node,
                        "node_type": node_type(&node),
                        "executed": executed,
                        "exception_message": format!("{message}\n"),
                        "exception_type": exception_type,
                        "traceback": [],
                        "current_inputs": inputs,
                        "current_outputs": prompt.node_ids().collect::<Vec<_>>(),
                        "timestamp": timestamp_ms(),
                    }),
                );
                ExecutionStatus::Error
            }
        };

        let mut outputs = Map::new();
        let mut meta = Map::new();
        for id in prompt.node_ids() {
            let Some(key) = keys.get(id) else { continue };
            if let Some(ui) = self.cache.get(key).and_then(|c| c.ui) {
                outputs.insert(id.to_string(), ui);
                meta.insert(
                    id.to_string(),
                    json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}),
                );
            }
        }
        self.cache.end_prompt();
        ExecutionOutcome {
            status,
            messages,
            outputs,
            meta,
        }
    }

    /// Each node's class and schema (validation guarantees the classes exist).
    fn node_classes(&self, prompt: &Prompt) -> HashMap<NodeId, (Arc<dyn Node>, Arc<NodeSchema>)> {
        let mut schemas: HashMap<&str, Arc<NodeSchema>> = HashMap::default();
        let mut classes = HashMap::with_capacity_and_hasher(prompt.len(), Default::default());
        for id in prompt.node_ids() {
            let Some(class_type) = prompt.class_type(id) else {
                continue;
            };
            let Some(node) = self.registry.get(class_type) else {
                continue;
            };
            let schema = schemas
                .entry(class_type)
                .or_insert_with(|| Arc::new(node.schema(&self.services)))
                .clone();
            classes.insert(id.to_string(), (node.clone(), schema));
        }
        classes
    }

    /// ComfyUI's `IS_CHANGED` pass: every node whose class has one is asked, with its constant
    /// inputs, and the answer is written into the prompt as `is_changed`, as ComfyUI does.
    fn fingerprints(
        &self,
        prompt: &mut Prompt,
        classes: &HashMap<NodeId, (Arc<dyn Node>, Arc<NodeSchema>)>,
    ) -> HashMap<NodeId, Option<Result<Json, String>>> {
        let mut fingerprints = HashMap::default();
        let ids: Vec<NodeId> = prompt.node_ids().map(str::to_string).collect();
        for id in ids {
            let Some((node, schema)) = classes.get(&id) else {
                continue;
            };
            let mut constants = Map::new();
            for (name, value) in prompt.inputs(&id).into_iter().flatten() {
                match input_ref(value) {
                    InputRef::Constant(c) if schema.input(name).is_some() => {
                        constants.insert(name.clone(), c.clone());
                    }
                    InputRef::Constant(_) => {}
                    _ => {
                        constants.insert(name.clone(), Json::Null);
                    }
                }
            }
            let fingerprint = node.fingerprint(&self.services, &constants);
            if let Some(Ok(value)) = &fingerprint {
                prompt.set_node_key(&id, "is_changed", json!([value]));
            }
            fingerprints.insert(id, fingerprint);
        }
        fingerprints
    }

    /// ComfyUI's `get_input_data`: a list per input — a link's source list, or `[constant]` for a
    /// declared constant. Undeclared constants are dropped; undeclared links are passed on.
    fn gather_inputs(
        &mut self,
        prompt: &Prompt,
        id: &str,
        schema: &NodeSchema,
        keys: &HashMap<NodeId, CacheKey>,
        results: &mut HashMap<NodeId, Arc<Vec<Vec<Value>>>>,
    ) -> Result<IndexMap<String, Vec<Value>>, NodeError> {
        let mut inputs = IndexMap::new();
        for (name, value) in prompt.inputs(id).into_iter().flatten() {
            match input_ref(value) {
                InputRef::Link { node: source, slot } => {
                    if !results.contains_key(source) {
                        let cached = keys.get(source).and_then(|k| self.cache.get(k)).ok_or_else(|| {
                            NodeError::new(format!("Output of node {source} is not available for input '{name}'"))
                        })?;
                        results.insert(source.to_string(), cached.outputs);
                    }
                    let outputs = &results[source];
                    let values = usize::try_from(slot)
                        .ok()
                        .and_then(|s| outputs.get(s))
                        .cloned()
                        .unwrap_or_else(|| vec![Value::Json(Json::Null)]);
                    inputs.insert(name.clone(), values);
                }
                InputRef::Constant(constant) if schema.input(name).is_some() => {
                    inputs.insert(name.clone(), vec![Value::Json(constant.clone())]);
                }
                _ => {}
            }
        }
        Ok(inputs)
    }
}

/// State shared by the calls of one prompt: where events go and the `progress_state` table.
struct PromptRun<'a> {
    prompt_id: &'a str,
    prompt_json: Json,
    extra_pnginfo: Option<Json>,
    progress: RefCell<Map<String, Json>>,
    sink: &'a dyn EventSink,
    interrupt: &'a Interrupt,
}

impl PromptRun<'_> {
    fn send(&self, kind: EventKind, data: Json) {
        self.sink.emit(Event::new(kind, data));
    }

    fn set_progress(&self, id: &str, value: Json, max: Json, state: &str) {
        if !self.sink.wants(EventKind::ProgressState) {
            return;
        }
        let entry = json!({
            "value": value, "max": max, "state": state, "node_id": id, "prompt_id": self.prompt_id,
            "display_node_id": id, "parent_node_id": null, "real_node_id": id,
        });
        let nodes = {
            let mut table = self.progress.borrow_mut();
            table.insert(id.to_string(), entry);
            Json::Object(table.clone())
        };
        self.send(
            EventKind::ProgressState,
            json!({"prompt_id": self.prompt_id, "nodes": nodes}),
        );
    }

    fn start_progress(&self, id: &str) {
        self.set_progress(id, json!(0.0), json!(1.0), "running");
    }

    /// Marks a node finished: value = max (the last reported max, or `given`).
    fn finish_progress(&self, id: &str, given: Option<(Json, Json)>) {
        let (value, max) = given.unwrap_or_else(|| {
            let max = self
                .progress
                .borrow()
                .get(id)
                .map(|e| e["max"].clone())
                .unwrap_or(json!(1.0));
            (max.clone(), max)
        });
        self.set_progress(id, value, max, "finished");
    }

    /// ComfyUI's progress hook: `progress_state`, then the preview image if any, then `progress`.
    fn report_progress(&self, id: &str, progress: Progress) {
        if self.interrupt.is_set() {
            return;
        }
        self.set_progress(id, progress.value.clone(), progress.max.clone(), "running");
        if let Some(preview) = progress.preview {
            let data = json!({
                "node_id": id, "prompt_id": self.prompt_id, "display_node_id": id,
                "parent_node_id": null, "real_node_id": id, "image_type": preview.image_type,
            });
            self.sink.emit(Event {
                kind: EventKind::Preview,
                data,
                image: Some(Arc::new(preview.bytes)),
            });
        }
        self.send(
            EventKind::Progress,
            json!({"value": progress.value, "max": progress.max, "prompt_id": self.prompt_id, "node": id}),
        );
    }
}

/// `current_inputs` of `execution_error`: each input's values, formatted.
fn inputs_for_error(inputs: &IndexMap<String, Vec<Value>>) -> Json {
    let map: Map<String, Json> = inputs
        .iter()
        .map(|(name, values)| {
            (
                name.clone(),
                Json::Array(values.iter().map(Value::error_display).collect()),
            )
        })
        .collect();
    Json::Object(map)
}

/// Runs a node over its inputs with ComfyUI's list semantics and merges the results per slot.
fn call_mapped(
    node: &dyn Node,
    schema: &NodeSchema,
    ctx: &NodeContext,
    inputs: &IndexMap<String, Vec<Value>>,
) -> Result<(Vec<Vec<Value>>, Option<Json>), NodeError> {
    let calls: Vec<NodeInputs> = if schema.input_is_list {
        vec![NodeInputs::new(
            inputs
                .iter()
                .map(|(n, v)| (n.clone(), Value::List(v.clone())))
                .collect(),
        )]
    } else if inputs.is_empty() {
        vec![NodeInputs::default()]
    } else {
        let count = inputs.values().map(Vec::len).max().unwrap_or(0);
        let mut calls = Vec::with_capacity(count);
        for i in 0..count {
            let mut call = IndexMap::with_capacity(inputs.len());
            for (name, values) in inputs {
                let value = values
                    .get(i.min(values.len().saturating_sub(1)))
                    .ok_or_else(|| NodeError::typed("IndexError", "list index out of range"))?;
                call.insert(name.clone(), value.clone());
            }
            calls.push(NodeInputs::new(call));
        }
        calls
    };

    let mut outputs: Vec<Vec<Value>> = vec![Vec::new(); schema.outputs.len()];
    let mut uis: Vec<Map<String, Json>> = Vec::new();
    for call in &calls {
        ctx.check_interrupt()?;
        let result = catch_unwind(AssertUnwindSafe(|| node.execute(ctx, call))).map_err(|panic| {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            NodeError::typed("RuntimeError", format!("node {} panicked: {reason}", schema.name))
        })??;
        if result.outputs.len() < schema.outputs.len() {
            return Err(NodeError::new(format!(
                "{} returned {} outputs, expected {}",
                schema.name,
                result.outputs.len(),
                schema.outputs.len()
            )));
        }
        for ((slot, spec), value) in outputs.iter_mut().zip(&schema.outputs).zip(result.outputs) {
            match (spec.is_list, value) {
                (true, Value::List(items)) => slot.extend(items),
                (_, value) => slot.push(value),
            }
        }
        if let Some(ui) = result.ui {
            uis.push(ui);
        }
    }
    Ok((outputs, merge_ui(uis)?))
}

/// ComfyUI merges the UI dicts of several calls key by key (keys of the first), concatenating lists.
fn merge_ui(uis: Vec<Map<String, Json>>) -> Result<Option<Json>, NodeError> {
    let Some(first) = uis.first() else {
        return Ok(None);
    };
    if uis.len() == 1 {
        return Ok(Some(Json::Object(first.clone())));
    }
    let mut merged = Map::new();
    for key in first.keys() {
        let mut items = Vec::new();
        for ui in &uis {
            match ui.get(key) {
                Some(Json::Array(values)) => items.extend(values.iter().cloned()),
                _ => {
                    return Err(NodeError::typed(
                        "KeyError",
                        format!("UI output '{key}' is not a list in every call"),
                    ))
                }
            }
        }
        merged.insert(key.clone(), Json::Array(items));
    }
    Ok(Some(Json::Object(merged)))
}
