//! Graph overhead benchmark: parse + validate + schedule + cache lookup for prompts of 10 to 10 000
//! cheap nodes. Run with `cargo bench -p easel-engine`; prints a table (median of repeated runs).

use easel_engine::cache::{signatures, OutputCache, SignatureInput};
use easel_engine::schedule::ExecutionList;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{
    validate_prompt, CacheMode, Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Prompt, Services,
};
use serde_json::{json, Map, Value as Json};
use std::time::{Duration, Instant};

struct Cheap(NodeSchema);

impl Node for Cheap {
    fn schema(&self, _: &Services) -> NodeSchema {
        self.0.clone()
    }
    fn execute(&self, _: &NodeContext, _: &NodeInputs) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput::default())
    }
}

fn registry() -> NodeRegistry {
    let mut registry = NodeRegistry::new();
    registry.register(Cheap(
        NodeSchema::v1("Int", "bench", "bench")
            .required("value", InputSpec::int(0, -1000, 1000))
            .output(OutputSpec::of("INT")),
    ));
    registry.register(Cheap(
        NodeSchema::v1("Add", "bench", "bench")
            .required("a", InputSpec::of("INT"))
            .required("b", InputSpec::of("INT"))
            .required("scale", InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01))
            .output(OutputSpec::of("INT")),
    ));
    registry.register(Cheap(
        NodeSchema::v1("Show", "bench", "bench")
            .output_node()
            .required("value", InputSpec::of("INT")),
    ));
    registry
}

/// `n` nodes: a constant, then nodes each reading the previous node and one further back, with an
/// output every 100 nodes and at the end.
fn prompt_text(n: usize) -> String {
    let mut nodes = Map::new();
    nodes.insert(
        "0".into(),
        json!({"class_type": "Int", "inputs": {"value": 1}, "_meta": {"title": "start"}}),
    );
    for i in 1..n {
        let (class, inputs) = if i % 100 == 99 || i == n - 1 {
            ("Show", json!({"value": [(i - 1).to_string(), 0]}))
        } else {
            (
                "Add",
                json!({"a": [(i - 1).to_string(), 0], "b": [(i / 2).to_string(), 0], "scale": 1.5}),
            )
        };
        nodes.insert(i.to_string(), json!({"class_type": class, "inputs": inputs}));
    }
    serde_json::to_string(&Json::Object(nodes)).unwrap_or_default()
}

/// Stage timings of one pass: everything the engine does before the first node runs.
fn pass(registry: &NodeRegistry, services: &Services, text: &str, cache: &mut OutputCache) -> [Duration; 4] {
    let start = Instant::now();
    let json: Json = serde_json::from_str(text).expect("bench prompt is JSON");
    let prompt = Prompt::from_json(json).expect("bench prompt is an object");
    let parsed = Instant::now();
    let validated = validate_prompt(registry, services, prompt, None).expect("bench prompt is valid");
    let checked = Instant::now();
    let schemas: std::collections::HashMap<String, NodeSchema> = registry
        .class_names()
        .filter_map(|c| registry.schema(c, services).map(|s| (c.to_string(), s)))
        .collect();
    let prompt = &validated.prompt;
    let keys = signatures(prompt, |id| {
        prompt
            .class_type(id)
            .and_then(|c| schemas.get(c))
            .map(|schema| SignatureInput {
                schema,
                fingerprint: None,
            })
    });
    cache.begin_prompt(keys.values());
    let signed = Instant::now();
    let is_output = |id: &str| prompt.class_type(id) == Some("Show");
    let list = ExecutionList::new(prompt, &validated.outputs_to_execute, is_output, |id| {
        keys.get(id).is_some_and(|k| cache.contains(k))
    });
    std::hint::black_box(list.remaining());
    let scheduled = Instant::now();
    [parsed - start, checked - parsed, signed - checked, scheduled - signed]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let registry = registry();
    let services = Services::new();
    println!("| nodes  | total (ms) | parse | validate | cache keys | schedule | per node (µs) |");
    println!("|-------:|-----------:|------:|---------:|-----------:|---------:|--------------:|");
    for n in [10, 100, 1_000, 10_000] {
        let text = prompt_text(n);
        let mut cache = OutputCache::new(CacheMode::Classic);
        let runs = (200_000 / n).clamp(5, 200);
        let mut passes: Vec<[Duration; 4]> = (0..runs)
            .map(|_| pass(&registry, &services, &text, &mut cache))
            .collect();
        passes.sort_by_key(|stages| stages.iter().sum::<Duration>());
        let median = passes[passes.len() / 2];
        let total: Duration = median.iter().sum();
        println!(
            "| {n:>6} | {:>10.3} | {:>5.2} | {:>8.2} | {:>10.2} | {:>8.2} | {:>13.2} |",
            ms(total),
            ms(median[0]),
            ms(median[1]),
            ms(median[2]),
            ms(median[3]),
            total.as_secs_f64() * 1e6 / n as f64
        );
    }
}
