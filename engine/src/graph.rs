//! The prompt's link graph (petgraph): an edge runs from a source node to each node that reads one
//! of its outputs (once per link, so a node reading two outputs of one source has two edges).

use crate::prompt::{NodeId, Prompt};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;

pub struct PromptGraph {
    graph: DiGraph<NodeId, ()>,
}

impl PromptGraph {
    /// Builds the graph of well-formed links between nodes that exist.
    pub fn new(prompt: &Prompt) -> Self {
        let mut graph = DiGraph::with_capacity(prompt.len(), prompt.len());
        let mut index: HashMap<&str, NodeIndex> = HashMap::with_capacity_and_hasher(prompt.len(), Default::default());
        for id in prompt.node_ids() {
            index.insert(id, graph.add_node(id.to_string()));
        }
        for id in prompt.node_ids() {
            for (_, source, _) in prompt.links(id) {
                if let (Some(&from), Some(&to)) = (index.get(source), index.get(id)) {
                    graph.add_edge(from, to, ());
                }
            }
        }
        PromptGraph { graph }
    }

    /// Node ids with every source before its readers (Kahn's algorithm, iterative). Nodes on a cycle,
    /// or downstream of one, are left out.
    pub fn dependency_order(&self) -> Vec<&str> {
        let mut pending: Vec<usize> = self
            .graph
            .node_indices()
            .map(|i| self.graph.neighbors_directed(i, Direction::Incoming).count())
            .collect();
        let mut ready: VecDeque<NodeIndex> = self.graph.node_indices().filter(|i| pending[i.index()] == 0).collect();
        let mut order = Vec::with_capacity(self.graph.node_count());
        while let Some(node) = ready.pop_front() {
            order.push(self.graph[node].as_str());
            for reader in self.graph.neighbors_directed(node, Direction::Outgoing) {
                pending[reader.index()] -= 1;
                if pending[reader.index()] == 0 {
                    ready.push_back(reader);
                }
            }
        }
        order
    }
}
