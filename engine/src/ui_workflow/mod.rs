//! Workflows in ComfyUI's UI format (`nodes` + `links`, as the frontend saves them) turned into
//! the API format a prompt is, as the frontend's `graphToPrompt` turns them:
//! - each node's `widgets_values` fill its widget inputs in declaration order (required, then
//!   optional), skipping the `control_after_generate` value that follows a seed and the upload
//!   button's value that follows the required widgets of a node with an upload input;
//! - a linked input becomes `[origin id, origin slot]`, followed through Reroutes and through
//!   bypassed nodes (to the bypassed node's input of the same type, the origin slot's first);
//! - muted (mode 2) and bypassed (mode 4) nodes, Reroutes, PrimitiveNodes (their value is
//!   already the target's widget value) and notes are left out, and links to nodes left out
//!   are dropped;
//! - subgraphs are flattened first ([`subgraphs`]), their nodes keyed `"instance:inner"`.

mod subgraphs;

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};
use subgraphs::{parse_link, Link};

use crate::node::Services;
use crate::registry::NodeRegistry;
use crate::schema::{InputSpec, IoType, NodeSchema};

/// LiteGraph's node modes that leave a node out of the prompt.
const MODE_NEVER: i64 = 2;
const MODE_BYPASS: i64 = 4;

/// The frontend's own nodes, which never reach the server.
const VIRTUAL_NODES: [&str; 4] = ["Reroute", "PrimitiveNode", "Note", "MarkdownNote"];

/// Schema options after which the frontend adds a widget of its own with a saved value.
const UPLOAD_OPTIONS: [&str; 4] = ["image_upload", "video_upload", "audio_upload", "file_upload"];

#[derive(Debug, thiserror::Error)]
pub enum UiWorkflowError {
    #[error("the UI-format workflow is malformed: {0}")]
    Malformed(String),
}

/// Whether `value` is a UI-format workflow (an object with `nodes` and `links` arrays) rather
/// than an API-format prompt.
pub fn is_ui_workflow(value: &Json) -> bool {
    value.get("nodes").is_some_and(Json::is_array) && value.get("links").is_some_and(Json::is_array)
}

/// One node of the workflow: what the conversion reads of it.
struct UiNode<'a> {
    id: String,
    class_type: &'a str,
    mode: i64,
    title: Option<&'a str>,
    inputs: Vec<UiInput<'a>>,
    widgets_values: Option<&'a Json>,
}

struct UiInput<'a> {
    name: &'a str,
    io_type: Option<&'a Json>,
    link: Option<i64>,
}

/// The API-format prompt of a UI-format `workflow`, with widget inputs named by the schemas of
/// `registry`'s nodes (a node of an unknown class keeps only its links, and validation names it).
pub fn to_api_prompt(workflow: &Json, registry: &NodeRegistry, services: &Services) -> Result<Json, UiWorkflowError> {
    if !is_ui_workflow(workflow) {
        return Err(UiWorkflowError::Malformed("no `nodes` and `links` arrays".into()));
    }
    let flattened = subgraphs::flatten(workflow)?;
    let nodes = flattened.nodes.iter().map(parse_node).collect::<Result<Vec<_>, _>>()?;
    let links = flattened
        .links
        .iter()
        .map(parse_link)
        .collect::<Result<HashMap<_, _>, _>>()?;
    let by_id: HashMap<&str, &UiNode> = nodes.iter().map(|node| (node.id.as_str(), node)).collect();

    let mut prompt = Map::new();
    for node in &nodes {
        if node.mode == MODE_NEVER || node.mode == MODE_BYPASS || VIRTUAL_NODES.contains(&node.class_type) {
            continue;
        }
        let schema = registry.get(node.class_type).map(|class| class.schema(services));
        let mut inputs = match &schema {
            Some(schema) => widget_inputs(schema, node.widgets_values),
            None => Map::new(),
        };
        for input in &node.inputs {
            let Some(link) = input.link.and_then(|id| links.get(&id).copied()) else {
                continue;
            };
            if let Some(link) = resolve_link(link, input.io_type, &by_id, &links) {
                inputs.insert(input.name.to_string(), json!([id_text(link.origin), link.origin_slot]));
            }
        }
        for (name, value) in flattened.promoted.get(&node.id).into_iter().flatten() {
            if inputs.get(name).and_then(crate::prompt::as_link).is_none() {
                inputs.insert(name.clone(), value.clone());
            }
        }
        let title = node
            .title
            .map(str::to_string)
            .or_else(|| schema.as_ref().and_then(|s| s.display_name.clone()))
            .unwrap_or_else(|| node.class_type.to_string());
        prompt.insert(
            node.id.clone(),
            json!({"inputs": inputs, "class_type": node.class_type, "_meta": {"title": title}}),
        );
    }
    drop_links_to_missing_nodes(&mut prompt);
    Ok(Json::Object(prompt))
}

fn parse_node(value: &Json) -> Result<UiNode<'_>, UiWorkflowError> {
    let malformed = |what: &str| UiWorkflowError::Malformed(format!("a node without {what}: {value}"));
    let id = value
        .get("id")
        .filter(|id| id.is_number() || id.is_string())
        .ok_or_else(|| malformed("an id"))?;
    let class_type = value
        .get("type")
        .and_then(Json::as_str)
        .ok_or_else(|| malformed("a type"))?;
    let inputs = value
        .get("inputs")
        .and_then(Json::as_array)
        .map(|inputs| {
            inputs
                .iter()
                .filter_map(|input| {
                    Some(UiInput {
                        name: input.get("name")?.as_str()?,
                        io_type: input.get("type"),
                        link: input.get("link").and_then(Json::as_i64),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(UiNode {
        id: id_text(id),
        class_type,
        mode: value.get("mode").and_then(Json::as_i64).unwrap_or(0),
        title: value.get("title").and_then(Json::as_str),
        inputs,
        widgets_values: value.get("widgets_values"),
    })
}

/// A node id as the prompt keys it (`3`, or `"12:5"` as it is).
fn id_text(id: &Json) -> String {
    match id {
        Json::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Widget inputs of `schema` from the saved widget values (a list in widget order, or an
/// object by widget name). A widget without a saved value (a node saved with no
/// `widgets_values`, or fewer than it has widgets) keeps the value the frontend gives a new one.
fn widget_inputs(schema: &NodeSchema, saved: Option<&Json>) -> Map<String, Json> {
    let mut inputs = Map::new();
    match saved {
        Some(Json::Array(_)) | Some(Json::Null) | None => {
            let mut values = saved.and_then(Json::as_array).into_iter().flatten();
            let mut upload_pending = false;
            let required = schema.required.iter().map(|entry| (entry, true));
            let optional = schema.optional.iter().map(|entry| (entry, false));
            for ((name, spec), is_required) in required.chain(optional) {
                if upload_pending && !is_required {
                    values.next();
                    upload_pending = false;
                }
                if !is_widget(spec) {
                    continue;
                }
                if let Some(value) = values.next().cloned().or_else(|| new_widget_value(spec)) {
                    inputs.insert(name.clone(), value);
                }
                if option_is_true(spec, "control_after_generate") {
                    values.next();
                }
                upload_pending |= UPLOAD_OPTIONS.iter().any(|option| option_is_true(spec, option));
            }
        }
        Some(Json::Object(values)) => {
            for (name, _, spec) in schema.declared_inputs() {
                if !is_widget(spec) {
                    continue;
                }
                if let Some(value) = values.get(name).cloned().or_else(|| new_widget_value(spec)) {
                    inputs.insert(name.to_string(), value);
                }
            }
        }
        Some(_) => {}
    }
    inputs
}

/// The value the frontend gives a new widget: the input's `default`, else a combo's first
/// option; `None` for other inputs without a default.
fn new_widget_value(spec: &InputSpec) -> Option<Json> {
    if let Some(default) = spec.option("default") {
        return Some(default.clone());
    }
    match &spec.io_type {
        IoType::Combo(options) => options.first().cloned(),
        IoType::Named(_) => spec.option("options").and_then(Json::as_array)?.first().cloned(),
    }
}

/// Whether the frontend shows `spec` as a widget: a combo, or a number, text or boolean input
/// that is not `forceInput`.
fn is_widget(spec: &InputSpec) -> bool {
    let widget_type = match &spec.io_type {
        IoType::Combo(_) => true,
        IoType::Named(name) => matches!(name.as_str(), "INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO"),
    };
    widget_type && !option_is_true(spec, "forceInput")
}

fn option_is_true(spec: &InputSpec, option: &str) -> bool {
    spec.option(option).and_then(Json::as_bool).unwrap_or(false)
}

/// The link an input of type `input_type` ends up with: through Reroutes to their source, and
/// through bypassed nodes to their input of the same type (the origin slot's first, then in
/// order). `None` where the chain ends unconnected (a PrimitiveNode's value, an empty Reroute).
fn resolve_link<'a>(
    mut link: Link<'a>,
    input_type: Option<&Json>,
    nodes: &HashMap<&str, &UiNode<'a>>,
    links: &HashMap<i64, Link<'a>>,
) -> Option<Link<'a>> {
    // A chain longer than the graph has links is a cycle.
    for _ in 0..=links.len() {
        let Some(origin) = nodes.get(id_text(link.origin).as_str()) else {
            return Some(link);
        };
        let next_input = if VIRTUAL_NODES.contains(&origin.class_type) {
            origin.inputs.first()?
        } else if origin.mode == MODE_BYPASS {
            let slot = usize::try_from(link.origin_slot).ok();
            let same_type = |index: &usize| origin.inputs.get(*index).is_some_and(|i| i.io_type == input_type);
            let preferred = slot.into_iter().chain(0..origin.inputs.len()).find(same_type);
            match preferred {
                Some(index) => &origin.inputs[index],
                None => return Some(link),
            }
        } else {
            return Some(link);
        };
        link = next_input.link.and_then(|id| links.get(&id).copied())?;
    }
    None
}

/// Removes link inputs whose origin is not in the prompt (muted nodes, unresolved bypasses), as
/// the frontend does.
fn drop_links_to_missing_nodes(prompt: &mut Map<String, Json>) {
    let ids: Vec<String> = prompt.keys().cloned().collect();
    for node in prompt.values_mut() {
        if let Some(inputs) = node.get_mut("inputs").and_then(Json::as_object_mut) {
            inputs.retain(|_, value| match crate::prompt::as_link(value) {
                Some((origin, _)) => ids.iter().any(|id| id == origin),
                None => true,
            });
        }
    }
}

/// What a queued `prompt` runs as: a UI-format workflow converted ([`to_api_prompt`]) and put
/// where the frontend puts the workflow it queues (`extra_pnginfo.workflow` of an object
/// `extra_data`, which SaveImage writes into the PNG), unless the request put one there itself;
/// an API-format prompt as it is.
pub fn queued_prompt(
    prompt: &Json,
    extra_data: &mut Json,
    registry: &NodeRegistry,
    services: &Services,
) -> Result<Json, UiWorkflowError> {
    if !is_ui_workflow(prompt) {
        return Ok(prompt.clone());
    }
    let api = to_api_prompt(prompt, registry, services)?;
    if let Some(extra_data) = extra_data.as_object_mut() {
        let pnginfo = extra_data.entry("extra_pnginfo").or_insert_with(|| json!({}));
        if let Some(pnginfo) = pnginfo.as_object_mut() {
            pnginfo.entry("workflow").or_insert_with(|| prompt.clone());
        }
    }
    Ok(api)
}
