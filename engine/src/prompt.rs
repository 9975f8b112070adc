//! The API-format prompt: `{"<node id>": {"class_type": …, "inputs": {…}, "_meta": {…}}, …}`.
//!
//! The prompt is kept as the JSON object the client sent, in its key order, because ComfyUI echoes it
//! back (history, PNG metadata) with validation's conversions written into it. Accessors give the
//! structured view the engine needs: class names, inputs, and links `[node_id, output_index]`.

use serde_json::{Map, Value as Json};
use thiserror::Error;

/// A node id as it appears in the prompt (always a JSON object key, so a string).
pub type NodeId = String;

/// Why a request body is not a prompt at all.
#[derive(Debug, Error, PartialEq)]
pub enum PromptError {
    #[error("Prompt must be a JSON object mapping node ids to nodes, got {0}")]
    NotAnObject(&'static str),
}

/// An input value: a link to another node's output, or a constant.
#[derive(Debug, Clone, PartialEq)]
pub enum InputRef<'a> {
    /// `[node_id, slot]` with a string id and an integer slot (the only shape that can resolve).
    Link { node: &'a str, slot: i64 },
    /// Any other list: a link ComfyUI cannot resolve (validation reports it).
    BadLink(&'a [Json]),
    /// Anything that is not a list.
    Constant(&'a Json),
}

/// Reads an input value the way ComfyUI does: every JSON array is a link.
pub fn input_ref(value: &Json) -> InputRef<'_> {
    match value {
        Json::Array(items) => match items.as_slice() {
            [Json::String(node), Json::Number(slot)] if slot.as_i64().is_some() => InputRef::Link {
                node,
                slot: slot.as_i64().unwrap_or_default(),
            },
            _ => InputRef::BadLink(items),
        },
        other => InputRef::Constant(other),
    }
}

/// The link target of an input value, if it is a well-formed link.
pub fn as_link(value: &Json) -> Option<(&str, i64)> {
    match input_ref(value) {
        InputRef::Link { node, slot } => Some((node, slot)),
        _ => None,
    }
}

/// A prompt: the node map, in the client's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    nodes: Map<String, Json>,
}

impl Prompt {
    /// Takes the value of the request's `"prompt"` key.
    pub fn from_json(value: Json) -> Result<Self, PromptError> {
        match value {
            Json::Object(nodes) => Ok(Prompt { nodes }),
            Json::Array(_) => Err(PromptError::NotAnObject("a list")),
            Json::String(_) => Err(PromptError::NotAnObject("a string")),
            Json::Number(_) => Err(PromptError::NotAnObject("a number")),
            Json::Bool(_) => Err(PromptError::NotAnObject("a boolean")),
            Json::Null => Err(PromptError::NotAnObject("null")),
        }
    }

    /// Node ids in prompt order.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.nodes.contains_key(id)
    }

    /// The node's `class_type` value, if present (any JSON type).
    pub fn class_type_value(&self, id: &str) -> Option<&Json> {
        self.nodes.get(id)?.as_object()?.get("class_type")
    }

    /// The node's `class_type` as a string.
    pub fn class_type(&self, id: &str) -> Option<&str> {
        self.class_type_value(id)?.as_str()
    }

    /// The node's `inputs` object (empty when absent).
    pub fn inputs(&self, id: &str) -> Option<&Map<String, Json>> {
        self.nodes.get(id)?.as_object()?.get("inputs")?.as_object()
    }

    /// One input value.
    pub fn input(&self, id: &str, name: &str) -> Option<&Json> {
        self.inputs(id)?.get(name)
    }

    /// Replaces one input value (validation writes its conversions back).
    pub fn set_input(&mut self, id: &str, name: &str, value: Json) {
        if let Some(Json::Object(node)) = self.nodes.get_mut(id) {
            if let Some(Json::Object(inputs)) = node.get_mut("inputs") {
                inputs.insert(name.to_string(), value);
            }
        }
    }

    /// Sets a key on the node object itself (used for ComfyUI's `is_changed` side effect).
    pub fn set_node_key(&mut self, id: &str, key: &str, value: Json) {
        if let Some(Json::Object(node)) = self.nodes.get_mut(id) {
            node.insert(key.to_string(), value);
        }
    }

    /// The `_meta.title` the web UI sends, if any.
    pub fn title(&self, id: &str) -> Option<&str> {
        self.nodes.get(id)?.get("_meta")?.get("title")?.as_str()
    }

    /// The linked inputs of a node: `(input name, source id, slot)` in input order.
    pub fn links<'a>(&'a self, id: &str) -> impl Iterator<Item = (&'a str, &'a str, i64)> + 'a {
        self.inputs(id)
            .into_iter()
            .flat_map(|inputs| inputs.iter())
            .filter_map(|(name, value)| as_link(value).map(|(node, slot)| (name.as_str(), node, slot)))
    }

    /// The prompt as JSON.
    pub fn to_json(&self) -> Json {
        Json::Object(self.nodes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn links_are_two_element_lists_with_string_ids() {
        assert_eq!(input_ref(&json!(["4", 1])), InputRef::Link { node: "4", slot: 1 });
        assert!(matches!(input_ref(&json!([4, 1])), InputRef::BadLink(_)));
        assert!(matches!(input_ref(&json!(["4"])), InputRef::BadLink(_)));
        assert_eq!(input_ref(&json!(5)), InputRef::Constant(&json!(5)));
    }

    #[test]
    fn prompt_must_be_an_object() {
        assert_eq!(Prompt::from_json(json!([])), Err(PromptError::NotAnObject("a list")));
        let p = Prompt::from_json(json!({"1": {"class_type": "X", "inputs": {"a": ["2", 0]}}})).unwrap();
        assert_eq!(p.links("1").collect::<Vec<_>>(), vec![("a", "2", 0)]);
        assert_eq!(p.class_type("1"), Some("X"));
    }
}
