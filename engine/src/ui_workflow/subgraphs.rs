//! Subgraphs (frontend 1.24 and later): a node whose `type` is the id of a definition in
//! `definitions.subgraphs` stands for that definition's nodes. The frontend queues them
//! flattened, each inner node's id prefixed with its instance's (`"17:6"`; nested, `"17:20:6"`),
//! and [`flatten`] does the same before the conversion: one level of nodes and links, where
//! - a link from the definition's input boundary (node -10, slot k) starts where whatever feeds
//!   the instance's input k starts, and a link to an instance's output k starts where the
//!   definition's link to its output boundary (node -20, slot k) starts;
//! - a widget promoted to the instance (an instance input with a `widget`) gives its value to
//!   the inner inputs it feeds, unless they end up linked;
//! - an instance that is muted or bypassed mutes or bypasses its inner nodes.

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};

use super::{id_text, UiWorkflowError};

/// The ids LiteGraph gives a definition's input and output boundaries.
const SUBGRAPH_INPUT: i64 = -10;
const SUBGRAPH_OUTPUT: i64 = -20;
/// Nesting deeper than this is taken for a definition that contains itself.
const MAX_DEPTH: usize = 32;
/// Following a link across more boundaries than this is taken for a cycle through an instance.
const MAX_HOPS: usize = 128;

/// A workflow's nodes and links in one level (links as arrays), and per node id the values
/// promoted to it (input name → value).
#[derive(Default)]
pub struct Flattened {
    pub nodes: Vec<Json>,
    pub links: Vec<Json>,
    pub promoted: HashMap<String, Map<String, Json>>,
}

/// A link's ends, from `[id, origin, origin slot, target, target slot, type]` or from an object
/// with those names (newer frontends, and every link inside a definition).
#[derive(Clone, Copy)]
pub struct Link<'a> {
    pub origin: &'a Json,
    pub origin_slot: i64,
    pub target: &'a Json,
    pub target_slot: i64,
    pub io_type: Option<&'a Json>,
}

pub fn parse_link(value: &Json) -> Result<(i64, Link<'_>), UiWorkflowError> {
    let parts = match value {
        Json::Array(parts) => [0, 1, 2, 3, 4, 5].map(|index| parts.get(index)),
        Json::Object(fields) => {
            ["id", "origin_id", "origin_slot", "target_id", "target_slot", "type"].map(|name| fields.get(name))
        }
        _ => [None; 6],
    };
    let [id, origin, origin_slot, target, target_slot, io_type] = parts;
    let number = |value: Option<&Json>| value.and_then(Json::as_i64);
    match (number(id), origin, number(origin_slot), target, number(target_slot)) {
        (Some(id), Some(origin), Some(origin_slot), Some(target), Some(target_slot)) => Ok((
            id,
            Link {
                origin,
                origin_slot,
                target,
                target_slot,
                io_type,
            },
        )),
        _ => Err(UiWorkflowError::Malformed(format!(
            "a link without id, origin, slot or target: {value}"
        ))),
    }
}

/// The workflow with every subgraph instance replaced by its inner nodes.
pub fn flatten(workflow: &Json) -> Result<Flattened, UiWorkflowError> {
    let mut definitions = HashMap::new();
    collect_definitions(workflow, &mut definitions);
    let top = Level::new(String::new(), workflow, None, 0, 0)?;
    let mut flattened = Flattened::default();
    top.emit(&definitions, &mut flattened)?;
    Ok(flattened)
}

type Definitions<'a> = HashMap<&'a str, &'a Json>;

/// Definitions by id, those nested in definitions included.
fn collect_definitions<'a>(graph: &'a Json, definitions: &mut Definitions<'a>) {
    let listed = graph.pointer("/definitions/subgraphs").and_then(Json::as_array);
    for definition in listed.into_iter().flatten() {
        if let Some(id) = definition.get("id").and_then(Json::as_str) {
            if definitions.insert(id, definition).is_none() {
                collect_definitions(definition, definitions);
            }
        }
    }
}

/// Where a link really starts in the flat graph (`None`: nowhere, an unfed instance input), and
/// the value an instance's promoted widget gives its target.
struct Origin {
    node_slot: Option<(String, i64)>,
    promoted: Option<Json>,
}

/// The top graph, or the inside of one subgraph instance.
struct Level<'a, 'p> {
    /// Prepended to this level's node ids.
    prefix: String,
    nodes: Vec<&'a Json>,
    by_id: HashMap<String, &'a Json>,
    links: HashMap<i64, Link<'a>>,
    /// The instance this level is the inside of, and the level that holds it.
    parent: Option<(&'p Level<'a, 'p>, &'a Json)>,
    depth: usize,
    /// A muted or bypassed instance's mode, for its inner nodes (0: their own).
    mode: i64,
}

impl<'a, 'p> Level<'a, 'p> {
    fn new(
        prefix: String,
        graph: &'a Json,
        parent: Option<(&'p Level<'a, 'p>, &'a Json)>,
        depth: usize,
        mode: i64,
    ) -> Result<Self, UiWorkflowError> {
        let nodes: Vec<&Json> = graph
            .get("nodes")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .collect();
        if let Some(node) = nodes.iter().find(|node| !node.is_object()) {
            return Err(UiWorkflowError::Malformed(format!(
                "a node that is not an object: {node}"
            )));
        }
        let by_id = nodes
            .iter()
            .filter_map(|node| Some((id_text(node.get("id")?), *node)))
            .collect();
        let links = graph
            .get("links")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .map(parse_link)
            .collect::<Result<_, _>>()?;
        Ok(Level {
            prefix,
            nodes,
            by_id,
            links,
            parent,
            depth,
            mode,
        })
    }

    /// The inside of `instance`, a node of this level.
    fn enter<'q>(
        &'q self,
        instance: &'a Json,
        definitions: &Definitions<'a>,
    ) -> Result<Level<'a, 'q>, UiWorkflowError> {
        if self.depth >= MAX_DEPTH {
            return Err(UiWorkflowError::Malformed(format!(
                "subgraphs nested more than {MAX_DEPTH} deep (a subgraph that contains itself?)"
            )));
        }
        let definition = instance_definition(instance, definitions)
            .ok_or_else(|| UiWorkflowError::Malformed(format!("no subgraph definition for {instance}")))?;
        let mode = match instance.get("mode").and_then(Json::as_i64).unwrap_or(0) {
            0 => self.mode,
            mode => mode,
        };
        let prefix = format!("{}{}:", self.prefix, id_text(&instance["id"]));
        Level::new(prefix, definition, Some((self, instance)), self.depth + 1, mode)
    }

    /// Where a link from `origin`'s output `slot` at this level starts in the flat graph, `hops`
    /// boundaries away from the input it feeds.
    fn resolve(
        &self,
        origin: &'a Json,
        slot: i64,
        definitions: &Definitions<'a>,
        hops: usize,
    ) -> Result<Origin, UiWorkflowError> {
        if hops > MAX_HOPS {
            return Err(UiWorkflowError::Malformed(
                "a link that goes round through a subgraph's boundaries".into(),
            ));
        }
        let nowhere = Origin {
            node_slot: None,
            promoted: None,
        };
        if origin.as_i64() == Some(SUBGRAPH_INPUT) {
            let Some((parent, instance)) = self.parent else {
                return Ok(nowhere);
            };
            let Some(input) = usize::try_from(slot)
                .ok()
                .and_then(|slot| instance_inputs(instance).nth(slot))
            else {
                return Ok(nowhere);
            };
            let promoted = promoted_value(instance, input);
            let fed = input
                .get("link")
                .and_then(Json::as_i64)
                .and_then(|id| parent.links.get(&id));
            let mut origin = match fed {
                Some(link) => parent.resolve(link.origin, link.origin_slot, definitions, hops + 1)?,
                None => nowhere,
            };
            // The outermost instance's value is the one a person sees and edits.
            origin.promoted = origin.promoted.or(promoted);
            return Ok(origin);
        }
        let id = id_text(origin);
        match self.by_id.get(&id) {
            Some(node) if instance_definition(node, definitions).is_some() => {
                let inside = self.enter(node, definitions)?;
                let output = inside
                    .links
                    .values()
                    .find(|link| link.target.as_i64() == Some(SUBGRAPH_OUTPUT) && link.target_slot == slot);
                match output {
                    Some(link) => inside.resolve(link.origin, link.origin_slot, definitions, hops + 1),
                    None => Ok(nowhere),
                }
            }
            _ => Ok(Origin {
                node_slot: Some((format!("{}{id}", self.prefix), slot)),
                promoted: None,
            }),
        }
    }

    /// Appends this level's nodes (the insides of its instances in their place) and their links.
    fn emit(&self, definitions: &Definitions<'a>, out: &mut Flattened) -> Result<(), UiWorkflowError> {
        for node in &self.nodes {
            if instance_definition(node, definitions).is_some() {
                self.enter(node, definitions)?.emit(definitions, out)?;
                continue;
            }
            let mut flat = (*node).clone();
            let flat_id = format!("{}{}", self.prefix, id_text(&node["id"]));
            flat["id"] = json!(flat_id);
            if self.mode != 0 && flat.get("mode").and_then(Json::as_i64).unwrap_or(0) == 0 {
                flat["mode"] = json!(self.mode);
            }
            if let Some(inputs) = flat.get_mut("inputs").and_then(Json::as_array_mut) {
                for (slot, input) in inputs.iter_mut().enumerate() {
                    let Some(link) = input
                        .get("link")
                        .and_then(Json::as_i64)
                        .and_then(|id| self.links.get(&id))
                    else {
                        continue;
                    };
                    let origin = self.resolve(link.origin, link.origin_slot, definitions, 0)?;
                    input["link"] = match origin.node_slot {
                        Some((origin_id, origin_slot)) => {
                            let id = out.links.len() + 1;
                            out.links
                                .push(json!([id, origin_id, origin_slot, flat_id, slot, link.io_type]));
                            json!(id)
                        }
                        None => Json::Null,
                    };
                    if let (Some(value), Some(name)) = (origin.promoted, input.get("name").and_then(Json::as_str)) {
                        out.promoted
                            .entry(flat_id.clone())
                            .or_default()
                            .insert(name.to_string(), value);
                    }
                }
            }
            out.nodes.push(flat);
        }
        Ok(())
    }
}

fn instance_definition<'a>(node: &Json, definitions: &Definitions<'a>) -> Option<&'a Json> {
    node.get("type")
        .and_then(Json::as_str)
        .and_then(|class| definitions.get(class).copied())
}

fn instance_inputs(instance: &Json) -> impl Iterator<Item = &Json> {
    instance.get("inputs").and_then(Json::as_array).into_iter().flatten()
}

/// The value of the instance's widget for `input`: its widget values follow its widget inputs.
fn promoted_value(instance: &Json, input: &Json) -> Option<Json> {
    input.get("widget")?;
    let index = instance_inputs(instance)
        .filter(|candidate| candidate.get("widget").is_some())
        .position(|candidate| std::ptr::eq(candidate, input))?;
    instance.get("widgets_values")?.as_array()?.get(index).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subgraph that contains itself is refused instead of recursing without end.
    #[test]
    fn a_subgraph_containing_itself_is_an_error() {
        let workflow = json!({
            "nodes": [{"id": 1, "type": "loop", "inputs": []}],
            "links": [],
            "definitions": {"subgraphs": [
                {"id": "loop", "nodes": [{"id": 2, "type": "loop", "inputs": []}], "links": []}
            ]}
        });
        let error = flatten(&workflow).err().expect("refused");
        assert!(error.to_string().contains("nested more than 32 deep"), "{error}");
    }

    /// An instance whose output feeds its own input is refused instead of followed forever.
    #[test]
    fn a_link_round_an_instance_is_an_error() {
        let workflow = json!({
            "nodes": [{"id": 1, "type": "pass", "inputs": [{"name": "x", "type": "IMAGE", "link": 7}]}],
            "links": [[7, 1, 0, 1, 0, "IMAGE"]],
            "definitions": {"subgraphs": [{"id": "pass", "nodes": [
                {"id": 2, "type": "Invert", "inputs": [{"name": "image", "type": "IMAGE", "link": 1}]}
            ], "links": [
                {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"},
                {"id": 3, "origin_id": -10, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}
            ]}]}
        });
        let error = flatten(&workflow).err().expect("refused");
        assert!(error.to_string().contains("goes round"), "{error}");
    }

    /// An instance input fed from outside reaches the inner node through the input boundary, and
    /// an inner output leaves through the output boundary to the outer consumer.
    #[test]
    fn links_cross_the_boundaries() {
        let workflow = json!({
            "nodes": [
                {"id": 1, "type": "Source", "inputs": []},
                {"id": 2, "type": "inner", "inputs": [{"name": "x", "type": "IMAGE", "link": 10}]},
                {"id": 3, "type": "Sink", "inputs": [{"name": "images", "type": "IMAGE", "link": 11}]}
            ],
            "links": [[10, 1, 0, 2, 0, "IMAGE"], [11, 2, 0, 3, 0, "IMAGE"]],
            "definitions": {"subgraphs": [{"id": "inner", "nodes": [
                {"id": 5, "type": "Invert", "inputs": [{"name": "image", "type": "IMAGE", "link": 1}]}
            ], "links": [
                {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "IMAGE"},
                {"id": 2, "origin_id": 5, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}
            ]}]}
        });
        let flattened = flatten(&workflow).unwrap();
        let ids: Vec<&Json> = flattened.nodes.iter().map(|node| &node["id"]).collect();
        assert_eq!(ids, [&json!("1"), &json!("2:5"), &json!("3")]);
        assert_eq!(
            flattened.links,
            [
                json!([1, "1", 0, "2:5", 0, "IMAGE"]),
                json!([2, "2:5", 0, "3", 0, "IMAGE"])
            ]
        );
        assert_eq!(flattened.nodes[1]["inputs"][0]["link"], 1);
        assert_eq!(flattened.nodes[2]["inputs"][0]["link"], 2);
    }
}
