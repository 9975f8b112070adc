//! ComfyUI's prompt validation (`validate_prompt` / `validate_inputs` in `execution.py`), with its
//! exact error objects.
//!
//! Validation walks from each output node through its links, depth first and memoised, exactly as
//! ComfyUI's recursion does, but on an explicit stack: a 100 000-node chain cannot overflow it, and a
//! dependency cycle is reported as an error where ComfyUI would recurse until Python gives up.
//! Constants are converted as Python would (`int("5") == 5`, `bool("false") == True`) and written back
//! into the prompt, which is what gets queued and stored.

use crate::node::Services;
use crate::node_errors::NodeErrors;
use crate::prompt::{as_link, NodeId, Prompt};
use crate::pyjson::{py_repr, py_str, str_repr};
use crate::registry::NodeRegistry;
use crate::schema::{InputSection, InputSpec, IoType, NodeSchema};
use indexmap::IndexMap;
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};
use serde_json::{json, Map, Number, Value as Json};
use std::sync::Arc;

/// A prompt that passed validation (possibly with some outputs rejected).
#[derive(Debug, Clone)]
pub struct ValidatedPrompt {
    /// The prompt with validation's conversions written in.
    pub prompt: Prompt,
    /// The output nodes that passed, in prompt order.
    pub outputs_to_execute: Vec<NodeId>,
    /// Errors of the outputs that failed, as ComfyUI reports them next to a queued prompt.
    pub node_errors: NodeErrors,
}

/// A rejected prompt: `400 {"error": …, "node_errors": …}` (its serialization is the body).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ValidationFailure {
    pub error: Json,
    pub node_errors: NodeErrors,
}

impl ValidationFailure {
    pub fn prompt_level(error_type: &str, message: &str, details: String) -> Self {
        ValidationFailure {
            error: json!({"type": error_type, "message": message, "details": details, "extra_info": {}}),
            node_errors: NodeErrors::default(),
        }
    }

    /// A prompt refused as a whole, with ComfyUI's `invalid_prompt` error.
    pub fn invalid_prompt(message: String) -> Self {
        Self::prompt_level("invalid_prompt", &message, String::new())
    }

    /// A request body without a `"prompt"` key.
    pub fn no_prompt() -> Self {
        Self::prompt_level("no_prompt", "No prompt provided", "No prompt provided".into())
    }

    /// The response body as a JSON value.
    pub fn to_json(&self) -> Json {
        json!({"error": self.error, "node_errors": self.node_errors.to_json()})
    }
}

/// Validates `prompt` against the registry. `partial_execution_targets` keeps only the listed outputs.
// The failure is a response body, built once per rejected request: not worth boxing.
#[allow(clippy::result_large_err)]
pub fn validate_prompt(
    registry: &NodeRegistry,
    services: &Services,
    prompt: Prompt,
    partial_execution_targets: Option<&[String]>,
) -> Result<ValidatedPrompt, ValidationFailure> {
    let mut schemas: FxHashMap<String, Arc<NodeSchema>> = FxHashMap::default();
    let mut outputs = Vec::new();
    for id in prompt.node_ids() {
        let Some(class_value) = prompt.class_type_value(id) else {
            return Err(ValidationFailure::prompt_level(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                format!("Node ID '#{id}'"),
            ));
        };
        let known = class_value
            .as_str()
            .and_then(|class_type| match schemas.get(class_type) {
                Some(schema) => Some(schema.clone()),
                None => {
                    let schema = Arc::new(registry.schema(class_type, services)?);
                    schemas.insert(class_type.to_string(), schema.clone());
                    Some(schema)
                }
            });
        let Some(schema) = known else {
            return Err(ValidationFailure::prompt_level(
                "invalid_prompt",
                &format!("Cannot execute because node {} does not exist.", py_str(class_value)),
                format!("Node ID '#{id}'"),
            ));
        };
        if schema.output_node && partial_execution_targets.is_none_or(|targets| targets.iter().any(|t| t == id)) {
            outputs.push(id.to_string());
        }
    }
    if outputs.is_empty() {
        return Err(ValidationFailure::prompt_level(
            "prompt_no_outputs",
            "Prompt has no outputs",
            String::new(),
        ));
    }

    let mut validator = Validator {
        registry,
        services,
        schemas,
        prompt,
        validated: IndexMap::with_hasher(FxBuildHasher),
    };
    let mut good_outputs = Vec::new();
    let mut failed_outputs: Vec<(NodeId, Vec<Json>)> = Vec::new();
    let mut node_errors = NodeErrors::default();
    // Nodes validated before this index have been looked at for errors of their own.
    let mut charged_up_to = 0;
    for output in &outputs {
        let (valid, reasons) = match validator.validate_from(output) {
            Ok(result) => result,
            Err(exception) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": exception.message,
                    "extra_info": {"exception_type": exception.type_name, "traceback": []},
                })];
                validator.validated.insert(output.clone(), (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good_outputs.push(output.clone());
            continue;
        }
        failed_outputs.push((output.clone(), reasons));
        // As ComfyUI does: every node validated so far that has errors of its own is charged to
        // this output (those charged before are charged again by `NodeErrors`).
        let newly_validated = validator.validated.get_range(charged_up_to..).into_iter().flatten();
        let new_nodes = newly_validated
            .filter(|(_, (node_valid, node_reasons))| !*node_valid && !node_reasons.is_empty())
            .map(|(node_id, (_, node_reasons))| {
                let class_type = validator
                    .prompt
                    .class_type_value(node_id)
                    .cloned()
                    .unwrap_or(Json::Null);
                (node_id.clone(), node_reasons.clone(), class_type)
            });
        node_errors.charge(output.clone(), new_nodes.collect::<Vec<_>>());
        charged_up_to = validator.validated.len();
    }

    if good_outputs.is_empty() {
        let lines: Vec<String> = failed_outputs
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| format!("{}: {}", text(&r["message"]), text(&r["details"])))
            .collect();
        return Err(ValidationFailure {
            error: json!({
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": lines.join("\n"),
                "extra_info": {},
            }),
            node_errors,
        });
    }
    Ok(ValidatedPrompt {
        prompt: validator.prompt,
        outputs_to_execute: good_outputs,
        node_errors,
    })
}

fn text(value: &Json) -> String {
    value.as_str().map(str::to_string).unwrap_or_else(|| py_str(value))
}

/// A Python exception raised while validating a node (a broken link), caught by the caller.
#[derive(Debug, Clone)]
struct Exception {
    type_name: &'static str,
    message: String,
}

/// A link input whose source is being validated.
struct PendingLink {
    input_name: String,
    source: NodeId,
}

/// One node's validation in progress: ComfyUI's `validate_inputs` call frame.
struct Frame {
    id: NodeId,
    schema: Arc<NodeSchema>,
    next_input: usize,
    errors: Vec<Json>,
    valid: bool,
    waiting: Option<PendingLink>,
}

/// What checking one input leads to.
enum Step {
    Next,
    Validate(PendingLink),
    Raise(Exception),
}

struct Validator<'a> {
    registry: &'a NodeRegistry,
    services: &'a Services,
    schemas: FxHashMap<String, Arc<NodeSchema>>,
    prompt: Prompt,
    validated: IndexMap<NodeId, (bool, Vec<Json>), FxBuildHasher>,
}

impl Validator<'_> {
    fn frame(&self, id: &str) -> Result<Frame, Exception> {
        let schema = self
            .prompt
            .class_type(id)
            .and_then(|c| self.schemas.get(c))
            .cloned()
            .ok_or_else(|| Exception {
                type_name: "KeyError",
                message: str_repr(id),
            })?;
        Ok(Frame {
            id: id.to_string(),
            schema,
            next_input: 0,
            errors: Vec::new(),
            valid: true,
            waiting: None,
        })
    }

    /// Validates `root` and everything it links to; `Err` is an exception raised by `root` itself.
    fn validate_from(&mut self, root: &str) -> Result<(bool, Vec<Json>), Exception> {
        if let Some(done) = self.validated.get(root) {
            return Ok(done.clone());
        }
        let mut stack = vec![self.frame(root)?];
        let mut on_stack: FxHashSet<NodeId> = FxHashSet::default();
        on_stack.insert(root.to_string());
        // The outcome of the frame just popped, for the frame below it.
        let mut returned: Option<Result<bool, Exception>> = None;
        loop {
            let Some(frame) = stack.last_mut() else {
                return Err(Exception {
                    type_name: "RuntimeError",
                    message: "validation stack underflow".into(),
                });
            };
            if let Some(outcome) = returned.take() {
                if let Some(pending) = frame.waiting.take() {
                    match outcome {
                        Ok(valid) => frame.valid &= valid,
                        Err(exception) => {
                            frame.valid = false;
                            let config = frame
                                .schema
                                .input(&pending.input_name)
                                .map(|(_, spec)| spec.config_json());
                            let link = self.prompt.input(&frame.id, &pending.input_name).cloned();
                            let reason = inner_exception_error(&pending, config, link, &exception);
                            self.validated.insert(pending.source.clone(), (false, vec![reason]));
                        }
                    }
                }
            }

            let step = self.advance(stack.len() - 1, &mut stack);
            match step {
                None => {
                    let Some(mut frame) = stack.pop() else {
                        continue;
                    };
                    self.run_custom_validation(&mut frame);
                    let result = (frame.valid && frame.errors.is_empty(), frame.errors);
                    on_stack.remove(&frame.id);
                    self.validated.insert(frame.id, result.clone());
                    if stack.is_empty() {
                        return Ok(result);
                    }
                    returned = Some(Ok(result.0));
                }
                Some(Step::Validate(pending)) => {
                    if let Some((valid, _)) = self.validated.get(&pending.source) {
                        returned = Some(Ok(*valid));
                        if let Some(frame) = stack.last_mut() {
                            frame.waiting = Some(pending);
                        }
                        continue;
                    }
                    let next = if on_stack.contains(&pending.source) {
                        Err(Exception {
                            type_name: "DependencyCycleError",
                            message: format!(
                                "Dependency cycle detected: node {} links back to node {}",
                                stack.last().map(|f| f.id.as_str()).unwrap_or_default(),
                                pending.source
                            ),
                        })
                    } else {
                        self.frame(&pending.source)
                    };
                    match next {
                        Ok(child) => {
                            on_stack.insert(child.id.clone());
                            if let Some(frame) = stack.last_mut() {
                                frame.waiting = Some(pending);
                            }
                            stack.push(child);
                        }
                        Err(exception) => {
                            // The current node raises while checking this input.
                            let Some(frame) = stack.pop() else { continue };
                            on_stack.remove(&frame.id);
                            if stack.is_empty() {
                                return Err(exception);
                            }
                            returned = Some(Err(exception));
                        }
                    }
                }
                Some(Step::Raise(exception)) => {
                    let Some(frame) = stack.pop() else { continue };
                    on_stack.remove(&frame.id);
                    if stack.is_empty() {
                        return Err(exception);
                    }
                    returned = Some(Err(exception));
                }
                Some(Step::Next) => {}
            }
        }
    }

    /// Checks inputs of the frame at `index` until one needs a source validated, raises, or all are done.
    fn advance(&mut self, index: usize, stack: &mut [Frame]) -> Option<Step> {
        let frame = &mut stack[index];
        let schema = frame.schema.clone();
        while frame.next_input < schema.required.len() + schema.optional.len() {
            let position = frame.next_input;
            frame.next_input += 1;
            let (name, section, spec) = match schema.declared_inputs().nth(position) {
                Some(entry) => entry,
                None => break,
            };
            match self.check_input(frame, name, section, spec) {
                Step::Next => continue,
                other => return Some(other),
            }
        }
        None
    }

    fn check_input(&mut self, frame: &mut Frame, name: &str, section: InputSection, spec: &InputSpec) -> Step {
        let Some(value) = self.prompt.input(&frame.id, name) else {
            if section == InputSection::Required {
                frame.errors.push(json!({
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": name,
                    "extra_info": {"input_name": name},
                }));
            }
            return Step::Next;
        };
        if let Some((source, slot)) = as_link(value) {
            if self.link_is_sound(source, slot, spec) {
                return Step::Validate(PendingLink {
                    input_name: name.to_string(),
                    source: source.to_string(),
                });
            }
        }
        match value.clone() {
            Json::Array(items) => self.check_link(frame, name, spec, items),
            constant => {
                self.check_constant(frame, name, spec, constant);
                Step::Next
            }
        }
    }

    /// The common case: a link to an existing node's existing output of a matching type.
    fn link_is_sound(&self, source: &str, slot: i64, spec: &InputSpec) -> bool {
        let Some(schema) = self.prompt.class_type(source).and_then(|c| self.schemas.get(c)) else {
            return false;
        };
        usize::try_from(slot)
            .ok()
            .and_then(|s| schema.outputs.get(s))
            .is_some_and(|o| o.io_type.feeds(&spec.io_type))
    }

    /// Every other list value: ComfyUI's checks in order, each with its error.
    fn check_link(&mut self, frame: &mut Frame, name: &str, spec: &InputSpec, items: Vec<Json>) -> Step {
        if items.len() != 2 {
            frame.errors.push(json!({
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": name,
                "extra_info": {"input_name": name, "input_config": spec.config_json(), "received_value": items},
            }));
            return Step::Next;
        }
        let source = match &items[0] {
            Json::String(id) if self.prompt.contains(id) => id.clone(),
            Json::Array(_) => return Step::Raise(type_error("unhashable type: 'list'")),
            Json::Object(_) => return Step::Raise(type_error("unhashable type: 'dict'")),
            Json::String(id) => {
                return Step::Raise(Exception {
                    type_name: "KeyError",
                    message: str_repr(id),
                })
            }
            other => {
                return Step::Raise(Exception {
                    type_name: "KeyError",
                    message: py_repr(other),
                })
            }
        };
        let Some(source_schema) = self
            .prompt
            .class_type(&source)
            .and_then(|c| self.schemas.get(c))
            .cloned()
        else {
            return Step::Raise(Exception {
                type_name: "KeyError",
                message: "'class_type'".into(),
            });
        };
        let slot = match &items[1] {
            Json::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap_or_default(),
            Json::Bool(b) => i64::from(*b),
            other => {
                let kind = match other {
                    Json::Number(_) => "float",
                    Json::String(_) => "str",
                    Json::Null => "NoneType",
                    Json::Array(_) => "list",
                    _ => "dict",
                };
                return Step::Raise(type_error(&format!(
                    "tuple indices must be integers or slices, not {kind}"
                )));
            }
        };
        let count = source_schema.outputs.len() as i64;
        let index = if slot < 0 { slot + count } else { slot };
        if index < 0 || index >= count {
            return Step::Raise(Exception {
                type_name: "IndexError",
                message: "tuple index out of range".into(),
            });
        }
        let received = &source_schema.outputs[index as usize].io_type;
        if !received.feeds(&spec.io_type) {
            frame.errors.push(json!({
                "type": "return_type_mismatch",
                "message": "Return type mismatch between linked nodes",
                "details": format!("{name}, received_type({}) mismatch input_type({})", received.display(), spec.io_type.display()),
                "extra_info": {
                    "input_name": name,
                    "input_config": spec.config_json(),
                    "received_type": received_json(received),
                    "linked_node": items,
                },
            }));
            return Step::Next;
        }
        Step::Validate(PendingLink {
            input_name: name.to_string(),
            source,
        })
    }

    fn check_constant(&mut self, frame: &mut Frame, name: &str, spec: &InputSpec, value: Json) {
        let mut value = value;
        if let Some(inner) = value.as_object().and_then(|o| o.get("__value__")) {
            value = inner.clone();
            self.prompt.set_input(&frame.id, name, value.clone());
        }
        if let IoType::Named(type_name) = &spec.io_type {
            let converted = match type_name.as_str() {
                "INT" => Some(to_int(&value)),
                "FLOAT" => Some(to_float(&value)),
                "STRING" => Some(Ok(Json::String(py_str(&value)))),
                "BOOLEAN" => Some(Ok(Json::Bool(truthy(&value)))),
                _ => None,
            };
            match converted {
                Some(Ok(converted)) if converted != value => {
                    value = converted;
                    self.prompt.set_input(&frame.id, name, value.clone());
                }
                Some(Ok(_)) => {}
                Some(Err(message)) => {
                    frame.errors.push(json!({
                        "type": "invalid_input_type",
                        "message": format!("Failed to convert an input value to a {type_name} value"),
                        "details": format!("{name}, {}, {message}", py_str(&value)),
                        "extra_info": {
                            "input_name": name,
                            "input_config": spec.config_json(),
                            "received_value": value,
                            "exception_message": message,
                        },
                    }));
                    return;
                }
                None => {}
            }
        }
        if frame.schema.custom_validation.covers(name) {
            return;
        }
        if let Some(min) = spec.option("min") {
            if compare(&value, min) == Some(std::cmp::Ordering::Less) {
                frame.errors.push(json!({
                    "type": "value_smaller_than_min",
                    "message": format!("Value {} smaller than min of {}", py_str(&value), py_str(min)),
                    "details": name,
                    "extra_info": {"input_name": name, "input_config": spec.config_json(), "received_value": value},
                }));
                return;
            }
        }
        if let Some(max) = spec.option("max") {
            if compare(&value, max) == Some(std::cmp::Ordering::Greater) {
                frame.errors.push(json!({
                    "type": "value_bigger_than_max",
                    "message": format!("Value {} bigger than max of {}", py_str(&value), py_str(max)),
                    "details": name,
                    "extra_info": {"input_name": name, "input_config": spec.config_json(), "received_value": value},
                }));
                return;
            }
        }
        // A classic combo lists its values as its type; a V3 one (`COMBO`) in its `options`.
        let combo = match &spec.io_type {
            IoType::Combo(options) => Some(options.as_slice()),
            IoType::Named(name) if name == "COMBO" => Some(
                spec.option("options")
                    .and_then(Json::as_array)
                    .map_or(&[][..], Vec::as_slice),
            ),
            IoType::Named(_) => None,
        };
        if let Some(options) = combo {
            if !options.iter().any(|option| py_eq(option, &value)) {
                let (list_info, input_config) = if options.len() > 20 {
                    (format!("(list of length {})", options.len()), Json::Null)
                } else {
                    (py_repr(&Json::Array(options.to_vec())), spec.config_json())
                };
                let mut error = json!({
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    "details": format!("{name}: '{}' not in {list_info}", py_str(&value)),
                    "extra_info": {"input_name": name, "input_config": input_config, "received_value": value},
                });
                if let Some(folder) = frame.schema.model_folders.get(name) {
                    error["extra_info"]["model_folder"] = json!(folder);
                }
                frame.errors.push(error);
            }
        }
    }

    /// ComfyUI's `VALIDATE_INPUTS` step: the node's own check over the inputs it names.
    fn run_custom_validation(&self, frame: &mut Frame) {
        let schema = &frame.schema;
        if schema.custom_validation == crate::schema::CustomValidation::None {
            return;
        }
        let Some(inputs) = self.prompt.inputs(&frame.id) else {
            return;
        };
        let mut filtered = Map::new();
        for (name, value) in inputs {
            if !schema.custom_validation.covers(name) {
                continue;
            }
            match value {
                Json::Array(_) => {
                    filtered.insert(name.clone(), Json::Null);
                }
                constant if schema.input(name).is_some() => {
                    filtered.insert(name.clone(), constant.clone());
                }
                _ => {}
            }
        }
        let Some(class_type) = self.prompt.class_type(&frame.id) else {
            return;
        };
        let Some(node) = self.registry.get(class_type) else {
            return;
        };
        if let Err(reason) = node.validate_inputs(self.services, &filtered) {
            for name in filtered.keys() {
                let details = if reason.is_empty() {
                    name.clone()
                } else {
                    format!("{name} - {reason}")
                };
                frame.errors.push(json!({
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": details,
                    "extra_info": {"input_name": name},
                }));
            }
        }
    }
}

fn inner_exception_error(
    pending: &PendingLink,
    input_config: Option<Json>,
    link: Option<Json>,
    exception: &Exception,
) -> Json {
    json!({
        "type": "exception_during_inner_validation",
        "message": "Exception when validating inner node",
        "details": exception.message,
        "extra_info": {
            "input_name": pending.input_name,
            "input_config": input_config,
            "exception_message": exception.message,
            "exception_type": exception.type_name,
            "traceback": [],
            "linked_node": link,
        },
    })
}

fn type_error(message: &str) -> Exception {
    Exception {
        type_name: "TypeError",
        message: message.to_string(),
    }
}

fn received_json(io_type: &IoType) -> Json {
    match io_type {
        IoType::Named(name) => json!(name),
        IoType::Combo(values) => json!(values),
    }
}

fn python_type_name(value: &Json) -> &'static str {
    match value {
        Json::Null => "NoneType",
        Json::Bool(_) => "bool",
        Json::Number(n) if n.is_f64() => "float",
        Json::Number(_) => "int",
        Json::String(_) => "str",
        Json::Array(_) => "list",
        Json::Object(_) => "dict",
    }
}

/// An integral JSON number from an `i128`, or `None` when it does not fit JSON's integer range.
fn int_json(value: i128) -> Option<Json> {
    if let Ok(i) = i64::try_from(value) {
        Some(Json::from(i))
    } else {
        u64::try_from(value).ok().map(Json::from)
    }
}

/// Python's `int(v)`.
fn to_int(value: &Json) -> Result<Json, String> {
    match value {
        Json::Number(n) if !n.is_f64() => Ok(value.clone()),
        Json::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            int_json(f.trunc() as i128).ok_or_else(|| format!("integer {} is out of range", float_repr_int(f)))
        }
        Json::Bool(b) => Ok(Json::from(i64::from(*b))),
        Json::String(s) => parse_python_int(s)
            .and_then(int_json)
            .ok_or_else(|| format!("invalid literal for int() with base 10: {}", str_repr(s))),
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            python_type_name(other)
        )),
    }
}

fn float_repr_int(f: f64) -> String {
    format!("{:.0}", f.trunc())
}

fn parse_python_int(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let cleaned: String = digits.chars().filter(|c| *c != '_').collect();
    if !cleaned.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let magnitude: i128 = cleaned.parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Python's `float(v)`; non-finite results are refused because JSON cannot carry them.
fn to_float(value: &Json) -> Result<Json, String> {
    let parsed = match value {
        Json::Number(n) => n.as_f64().ok_or_else(|| "number out of range".to_string())?,
        Json::Bool(b) => f64::from(u8::from(*b)),
        Json::String(s) => {
            let trimmed = s.trim();
            let cleaned: String = trimmed.chars().filter(|c| *c != '_').collect();
            let ok_underscores = !trimmed.starts_with('_') && !trimmed.ends_with('_') && !trimmed.contains("__");
            match cleaned.parse::<f64>() {
                Ok(f) if ok_underscores && !cleaned.is_empty() => f,
                _ => return Err(format!("could not convert string to float: {}", str_repr(s))),
            }
        }
        other => {
            return Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                python_type_name(other)
            ))
        }
    };
    Number::from_f64(parsed)
        .map(Json::Number)
        .ok_or_else(|| format!("float value {} is not finite", crate::pyjson::float_repr(parsed)))
}

/// Python's `bool(v)`.
fn truthy(value: &Json) -> bool {
    match value {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// A JSON scalar as Python compares numbers: exact integers, else floats.
enum Numeric {
    Int(i128),
    Float(f64),
}

fn numeric(value: &Json) -> Option<Numeric> {
    match value {
        Json::Bool(b) => Some(Numeric::Int(i128::from(*b))),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Some(Numeric::Int(i128::from(i))),
            (None, Some(u)) => Some(Numeric::Int(i128::from(u))),
            _ => n.as_f64().map(Numeric::Float),
        },
        _ => None,
    }
}

fn compare(a: &Json, b: &Json) -> Option<std::cmp::Ordering> {
    match (numeric(a)?, numeric(b)?) {
        (Numeric::Int(x), Numeric::Int(y)) => Some(x.cmp(&y)),
        (Numeric::Int(x), Numeric::Float(y)) => (x as f64).partial_cmp(&y),
        (Numeric::Float(x), Numeric::Int(y)) => x.partial_cmp(&(y as f64)),
        (Numeric::Float(x), Numeric::Float(y)) => x.partial_cmp(&y),
    }
}

/// Python's `==` between two JSON-derived values (`1 == 1.0 == True`).
fn py_eq(a: &Json, b: &Json) -> bool {
    match (numeric(a), numeric(b)) {
        (Some(_), Some(_)) => compare(a, b) == Some(std::cmp::Ordering::Equal),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_conversions() {
        assert_eq!(to_int(&json!(5.7)), Ok(json!(5)));
        assert_eq!(to_int(&json!(" -1_000 ")), Ok(json!(-1000)));
        assert_eq!(
            to_int(&json!("5.5")),
            Err("invalid literal for int() with base 10: '5.5'".into())
        );
        assert_eq!(to_float(&json!(7)), Ok(json!(7.0)));
        assert_eq!(
            to_float(&json!("abc")),
            Err("could not convert string to float: 'abc'".into())
        );
        assert!(truthy(&json!("false")));
        assert!(!truthy(&json!(0)));
        assert!(py_eq(&json!(1), &json!(1.0)));
        assert_eq!(
            compare(&json!(u64::MAX), &json!(u64::MAX)),
            Some(std::cmp::Ordering::Equal)
        );
    }
}
