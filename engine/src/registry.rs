//! The node registry: every node class by its ComfyUI class name, in registration order.

use crate::node::{Node, Services};
use crate::schema::NodeSchema;
use indexmap::IndexMap;
use serde_json::{Map, Value as Json};
use std::sync::Arc;

#[derive(Default, Clone)]
pub struct NodeRegistry {
    nodes: IndexMap<String, Arc<dyn Node>>,
}

impl NodeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a class under the name its schema declares (a later registration replaces an earlier one).
    pub fn register(&mut self, node: impl Node) {
        let name = node.schema(&Services::new()).name;
        self.nodes.insert(name, Arc::new(node));
    }

    pub fn get(&self, class_type: &str) -> Option<&Arc<dyn Node>> {
        self.nodes.get(class_type)
    }

    pub fn contains(&self, class_type: &str) -> bool {
        self.nodes.contains_key(class_type)
    }

    pub fn class_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    pub fn schema(&self, class_type: &str, services: &Services) -> Option<NodeSchema> {
        self.nodes.get(class_type).map(|node| node.schema(services))
    }

    /// The body of `GET /object_info`.
    pub fn object_info(&self, services: &Services) -> Json {
        let entries: Map<String, Json> = self
            .nodes
            .iter()
            .map(|(name, node)| (name.clone(), node.schema(services).to_object_info()))
            .collect();
        Json::Object(entries)
    }
}
