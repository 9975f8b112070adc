//! The `node_errors` of a validation result, as ComfyUI reports them: per node with errors of its
//! own, its `errors`, its `dependent_outputs` and its `class_type`.
//!
//! ComfyUI charges every node with errors to each output that fails after the node was validated,
//! so with n failing outputs the lists hold about n²/2 ids between them (4,000 outputs: 65 MB of
//! JSON). They are kept as the one list of failing outputs and, per node, where its share of that
//! list starts; the lists are spelled out only as they are written.

use crate::prompt::NodeId;
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value as Json};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeErrors {
    /// Every failing output, in the order validation met them.
    failed_outputs: Vec<NodeId>,
    /// Nodes with errors, in the order they were first charged.
    nodes: Vec<FailingNode>,
}

#[derive(Debug, Clone, PartialEq)]
struct FailingNode {
    id: NodeId,
    errors: Vec<Json>,
    class_type: Json,
    /// Where this node's `dependent_outputs` start in `failed_outputs`: it is charged with every
    /// output that failed from then on.
    first_dependent: usize,
}

/// One node's entry as written.
#[derive(Serialize, Deserialize)]
struct Entry<Errors, Dependents> {
    errors: Errors,
    dependent_outputs: Dependents,
    class_type: Json,
}

impl NodeErrors {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records a failing output. `new_nodes` are the nodes with errors of their own validated
    /// since the previous failing output, as `(id, errors, class_type)`; they, and every node
    /// charged before, depend on it.
    pub(crate) fn charge(&mut self, output: NodeId, new_nodes: impl IntoIterator<Item = (NodeId, Vec<Json>, Json)>) {
        let first_dependent = self.failed_outputs.len();
        self.nodes
            .extend(new_nodes.into_iter().map(|(id, errors, class_type)| FailingNode {
                id,
                errors,
                class_type,
                first_dependent,
            }));
        self.failed_outputs.push(output);
    }

    fn dependents(&self, node: &FailingNode) -> &[NodeId] {
        &self.failed_outputs[node.first_dependent..]
    }

    /// The whole object as a JSON value, every list spelled out.
    pub fn to_json(&self) -> Json {
        let entries = self.nodes.iter().map(|node| {
            let entry = serde_json::json!({
                "errors": node.errors,
                "dependent_outputs": self.dependents(node),
                "class_type": node.class_type,
            });
            (node.id.clone(), entry)
        });
        Json::Object(entries.collect())
    }
}

impl Serialize for NodeErrors {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.nodes.len()))?;
        for node in &self.nodes {
            let entry = Entry {
                errors: &node.errors,
                dependent_outputs: self.dependents(node),
                class_type: node.class_type.clone(),
            };
            map.serialize_entry(&node.id, &entry)?;
        }
        map.end()
    }
}

/// Reads back what [`Serialize`] wrote: the first node charged depends on every failing output.
impl<'de> Deserialize<'de> for NodeErrors {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Map::<String, Json>::deserialize(deserializer)?;
        let mut read = Vec::with_capacity(entries.len());
        for (id, entry) in entries {
            let entry: Entry<Vec<Json>, Vec<NodeId>> = serde_json::from_value(entry).map_err(D::Error::custom)?;
            read.push((id, entry));
        }
        let failed_outputs = read
            .iter()
            .map(|(_, entry)| &entry.dependent_outputs)
            .max_by_key(|dependents| dependents.len())
            .cloned()
            .unwrap_or_default();
        let nodes = read
            .into_iter()
            .map(|(id, entry)| FailingNode {
                first_dependent: failed_outputs.len() - entry.dependent_outputs.len(),
                id,
                errors: entry.errors,
                class_type: entry.class_type,
            })
            .collect();
        Ok(NodeErrors { failed_outputs, nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_node_depends_on_the_outputs_failing_after_it_and_reads_back() {
        let mut errors = NodeErrors::default();
        let error = |id: &str| (id.to_string(), vec![json!({"type": id})], json!("X"));
        errors.charge("1".into(), [error("1")]);
        errors.charge("2".into(), []);
        errors.charge("3".into(), [error("3"), error("4")]);
        let expected = json!({
            "1": {"errors": [{"type": "1"}], "dependent_outputs": ["1", "2", "3"], "class_type": "X"},
            "3": {"errors": [{"type": "3"}], "dependent_outputs": ["3"], "class_type": "X"},
            "4": {"errors": [{"type": "4"}], "dependent_outputs": ["3"], "class_type": "X"},
        });
        assert_eq!(errors.to_json(), expected);
        let text = serde_json::to_string(&errors).unwrap();
        assert_eq!(serde_json::from_str::<Json>(&text).unwrap(), expected);
        assert_eq!(serde_json::from_str::<NodeErrors>(&text).unwrap(), errors);
    }
}
