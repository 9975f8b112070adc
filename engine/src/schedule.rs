//! Which nodes run, and in what order: ComfyUI's `ExecutionList`.
//!
//! The list is seeded with each output to execute; adding a node adds its linked sources that are not
//! cached, transitively (an explicit stack, in ComfyUI's order). Among the nodes whose sources are
//! done, the next one is, in this preference: an output node; a node an output node waits on; a node
//! two links from an output node; else the first added. This is why previews appear early.

use crate::prompt::{NodeId, Prompt};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::BTreeSet;

/// Preference classes, lowest first.
const CLASSES: usize = 4;

#[derive(Debug)]
pub struct ExecutionList {
    /// Node ids in the order they were added.
    nodes: Vec<NodeId>,
    position: HashMap<NodeId, usize>,
    /// How many pending sources each node waits on.
    waiting_on: Vec<usize>,
    /// The nodes each node blocks, in the order the links were added.
    blocks: Vec<Vec<usize>>,
    class: Vec<usize>,
    ready: [BTreeSet<usize>; CLASSES],
    completed: Vec<bool>,
    remaining: usize,
}

impl ExecutionList {
    /// Builds the list for `outputs`. `is_output` tells output classes, `is_cached` nodes whose
    /// outputs are already cached (they are not added, and nothing waits on them).
    pub fn new(
        prompt: &Prompt,
        outputs: &[NodeId],
        is_output: impl Fn(&str) -> bool,
        is_cached: impl Fn(&str) -> bool,
    ) -> Self {
        let mut list = ExecutionList {
            nodes: Vec::new(),
            position: HashMap::default(),
            waiting_on: Vec::new(),
            blocks: Vec::new(),
            class: Vec::new(),
            ready: Default::default(),
            completed: Vec::new(),
            remaining: 0,
        };
        for output in outputs {
            list.add_node(prompt, output, &is_cached);
        }
        let is_output: Vec<bool> = list.nodes.iter().map(|id| is_output(id)).collect();
        let blocks_output = |node: usize, blocks: &Vec<Vec<usize>>| blocks[node].iter().any(|&b| is_output[b]);
        for (node, &output) in is_output.iter().enumerate() {
            let class = if output {
                0
            } else if blocks_output(node, &list.blocks) {
                1
            } else if list.blocks[node].iter().any(|&b| blocks_output(b, &list.blocks)) {
                2
            } else {
                3
            };
            list.class.push(class);
            if list.waiting_on[node] == 0 {
                list.ready[class].insert(node);
            }
        }
        list.remaining = list.nodes.len();
        list.completed = vec![false; list.nodes.len()];
        list
    }

    /// ComfyUI's `add_node`: a depth-first walk on an explicit stack, then the links it found.
    fn add_node(&mut self, prompt: &Prompt, start: &str, is_cached: &impl Fn(&str) -> bool) {
        let mut stack = vec![start.to_string()];
        let mut links: Vec<(String, String)> = Vec::new();
        while let Some(id) = stack.pop() {
            if self.position.contains_key(&id) {
                continue;
            }
            self.position.insert(id.clone(), self.nodes.len());
            self.nodes.push(id.clone());
            self.waiting_on.push(0);
            self.blocks.push(Vec::new());
            for (_, source, _) in prompt.links(&id) {
                if !prompt.contains(source) || is_cached(source) {
                    continue;
                }
                stack.push(source.to_string());
                links.push((source.to_string(), id.clone()));
            }
        }
        let mut linked: HashSet<(usize, usize)> = HashSet::with_capacity_and_hasher(links.len(), Default::default());
        for (source, reader) in links {
            let (Some(&from), Some(&to)) = (self.position.get(&source), self.position.get(&reader)) else {
                continue;
            };
            if linked.insert((from, to)) {
                self.blocks[from].push(to);
                self.waiting_on[to] += 1;
            }
        }
    }

    /// The next node to run, or `None` when nothing is ready.
    pub fn take_next(&mut self) -> Option<NodeId> {
        let class = (0..CLASSES).find(|&c| !self.ready[c].is_empty())?;
        let node = self.ready[class].pop_first()?;
        Some(self.nodes[node].clone())
    }

    /// Marks `id` done, releasing the nodes that waited on it.
    pub fn complete(&mut self, id: &str) {
        let Some(&node) = self.position.get(id) else {
            return;
        };
        self.completed[node] = true;
        self.remaining = self.remaining.saturating_sub(1);
        for i in 0..self.blocks[node].len() {
            let reader = self.blocks[node][i];
            self.waiting_on[reader] -= 1;
            if self.waiting_on[reader] == 0 {
                self.ready[self.class[reader]].insert(reader);
            }
        }
    }

    /// Nodes not completed yet.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// The node ComfyUI blames when nothing is ready but nodes remain: the first added of those
    /// still waiting, which lie on a dependency cycle or after one (`get_nodes_in_cycle` keeps
    /// them all, in the order they were added).
    pub fn first_blocked(&self) -> Option<NodeId> {
        let blocked = (0..self.nodes.len()).find(|&node| !self.completed[node] && self.waiting_on[node] > 0)?;
        Some(self.nodes[blocked].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reference_txt2img_order() {
        // The captured run: nodes ran 4, 5, 7, 6, 3, 8, 9.
        let prompt = Prompt::from_json(json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": 42, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}
        }))
        .unwrap();
        let mut list = ExecutionList::new(&prompt, &["9".into()], |id| id == "9", |_| false);
        let mut order = Vec::new();
        while let Some(id) = list.take_next() {
            list.complete(&id);
            order.push(id);
        }
        assert_eq!(order, ["4", "5", "7", "6", "3", "8", "9"]);
    }
}
