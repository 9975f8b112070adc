//! Test helpers: node classes declared from captured `/object_info` entries, and small test nodes.
//! Each test binary uses a different subset of them.
#![allow(dead_code)]

use easel_engine::schema::{InputSpec, IoType, NodeSchema, OutputSpec, SchemaStyle};
use easel_engine::{HiddenInput, Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};
use serde_json::{json, Map, Value as Json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub fn fixture(name: &str) -> Json {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture exists")).expect("fixture is JSON")
}

fn input_spec(spec: &Json) -> InputSpec {
    let items = spec.as_array().expect("spec is a list");
    let io_type = match &items[0] {
        Json::String(name) => IoType::Named(name.clone()),
        Json::Array(values) => IoType::Combo(values.clone()),
        other => panic!("unexpected type {other}"),
    };
    InputSpec {
        io_type,
        options: items.get(1).and_then(Json::as_object).cloned(),
    }
}

/// A schema parsed back from its `/object_info` entry.
pub fn schema_from_object_info(entry: &Json) -> NodeSchema {
    let style = if entry.get("api_node").is_some() {
        SchemaStyle::V3
    } else {
        SchemaStyle::V1
    };
    let section = |name: &str| -> Vec<(String, InputSpec)> {
        entry["input"][name]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), input_spec(v))).collect())
            .unwrap_or_default()
    };
    let mut schema = NodeSchema {
        name: entry["name"].as_str().unwrap().into(),
        display_name: entry["display_name"].as_str().map(String::from),
        description: entry["description"].as_str().unwrap_or_default().into(),
        python_module: entry["python_module"].as_str().unwrap().into(),
        category: entry["category"].as_str().unwrap().into(),
        output_node: entry["output_node"].as_bool().unwrap(),
        style,
        ..Default::default()
    };
    schema.required = section("required").into_iter().collect();
    schema.optional = section("optional").into_iter().collect();
    if let Some(hidden) = entry["input"]["hidden"].as_object() {
        for (name, kind) in hidden {
            let kind = if kind.is_array() {
                kind[0].as_str()
            } else {
                kind.as_str()
            };
            let input = match kind.unwrap() {
                "PROMPT" => HiddenInput::Prompt,
                "EXTRA_PNGINFO" => HiddenInput::ExtraPngInfo,
                "UNIQUE_ID" => HiddenInput::UniqueId,
                other => panic!("hidden {other}"),
            };
            schema.hidden.insert(name.clone(), input);
        }
    }
    let outputs = entry["output"].as_array().unwrap();
    for (i, output) in outputs.iter().enumerate() {
        let io_type = match output {
            Json::String(s) => IoType::Named(s.clone()),
            Json::Array(values) => IoType::Combo(values.clone()),
            _ => panic!(),
        };
        schema.outputs.push(OutputSpec {
            io_type,
            name: entry["output_name"][i].as_str().unwrap().into(),
            is_list: entry["output_is_list"][i].as_bool().unwrap(),
            tooltip: entry
                .get("output_tooltips")
                .and_then(|t| t[i].as_str())
                .map(String::from),
        });
    }
    schema
}

/// Drops `traceback` (Python frames, which Easel cannot reproduce) from every error of a
/// `{"error", "node_errors"}` body.
pub fn without_tracebacks(mut body: Json) -> Json {
    for entry in body["node_errors"]
        .as_object_mut()
        .into_iter()
        .flat_map(|n| n.values_mut())
    {
        for error in entry["errors"].as_array_mut().into_iter().flatten() {
            if let Some(extra) = error["extra_info"].as_object_mut() {
                extra.remove("traceback");
            }
        }
    }
    body
}

/// A node known only by its schema: it validates like the real one and fails if run.
pub struct DeclaredOnly(pub NodeSchema);

impl Node for DeclaredOnly {
    fn schema(&self, _: &Services) -> NodeSchema {
        self.0.clone()
    }
    fn execute(&self, _: &NodeContext, _: &NodeInputs) -> Result<NodeOutput, NodeError> {
        Err(NodeError::new("declared-only node"))
    }
}

pub fn registry_from_object_info(info: &Json) -> NodeRegistry {
    let mut registry = NodeRegistry::new();
    for entry in info.as_object().unwrap().values() {
        registry.register(DeclaredOnly(schema_from_object_info(entry)));
    }
    registry
}

/// How a test node behaves.
pub type Behaviour = Arc<dyn Fn(&NodeContext, &NodeInputs) -> Result<NodeOutput, NodeError> + Send + Sync>;

/// A test node with a given schema and behaviour, counting its calls.
pub struct TestNode {
    pub schema: NodeSchema,
    pub behaviour: Behaviour,
    pub calls: Arc<AtomicUsize>,
    pub fingerprint: Option<Json>,
}

impl TestNode {
    pub fn new(
        schema: NodeSchema,
        behaviour: impl Fn(&NodeContext, &NodeInputs) -> Result<NodeOutput, NodeError> + Send + Sync + 'static,
    ) -> (Self, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        (
            TestNode {
                schema,
                behaviour: Arc::new(behaviour),
                calls: calls.clone(),
                fingerprint: None,
            },
            calls,
        )
    }
}

impl Node for TestNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        self.schema.clone()
    }
    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.behaviour)(ctx, inputs)
    }
    fn fingerprint(&self, _: &Services, _: &Map<String, Json>) -> Option<Result<Json, String>> {
        self.fingerprint.clone().map(Ok)
    }
}

/// `Int(value)` → INT, `Add(a, b)` → INT, `Show(value)` output node with `{"text": [value]}`.
pub struct TestNodes {
    pub registry: NodeRegistry,
    pub calls: std::collections::HashMap<&'static str, Arc<AtomicUsize>>,
}

pub fn test_nodes() -> TestNodes {
    let mut registry = NodeRegistry::new();
    let mut calls = std::collections::HashMap::new();
    let int_schema = NodeSchema::v1("Int", "test", "test")
        .required("value", InputSpec::int(0, -1000, 1000))
        .output(OutputSpec::of("INT"));
    let (int, c) = TestNode::new(int_schema, |_, i| {
        Ok(NodeOutput::values(vec![Value::Json(json!(i.int("value")?))]))
    });
    registry.register(int);
    calls.insert("Int", c);

    let add_schema = NodeSchema::v1("Add", "test", "test")
        .required("a", InputSpec::of("INT"))
        .required("b", InputSpec::of("INT"))
        .output(OutputSpec::of("INT"));
    let (add, c) = TestNode::new(add_schema, |_, i| {
        Ok(NodeOutput::values(vec![Value::Json(json!(i.int("a")? + i.int("b")?))]))
    });
    registry.register(add);
    calls.insert("Add", c);

    let show_schema = NodeSchema::v1("Show", "test", "test")
        .output_node()
        .required("value", InputSpec::of("INT"));
    let (show, c) = TestNode::new(show_schema, |_, i| {
        let mut ui = Map::new();
        ui.insert("text".into(), json!([i.int("value")?.to_string()]));
        Ok(NodeOutput::ui(ui))
    });
    registry.register(show);
    calls.insert("Show", c);

    let range_schema = NodeSchema::v1("Range", "test", "test")
        .required("count", InputSpec::int(1, 0, 100))
        .output(OutputSpec::of("INT").list());
    let (range, c) = TestNode::new(range_schema, |_, i| {
        let n = i.int("count")?;
        Ok(NodeOutput::values(vec![Value::List(
            (0..n).map(|k| Value::Json(json!(k))).collect(),
        )]))
    });
    registry.register(range);
    calls.insert("Range", c);

    let sum_schema = NodeSchema {
        input_is_list: true,
        ..NodeSchema::v1("Sum", "test", "test")
    }
    .required("values", InputSpec::of("INT"))
    .output(OutputSpec::of("INT"));
    let (sum, c) = TestNode::new(sum_schema, |_, i| {
        let Some(Value::List(items)) = i.get("values") else {
            return Err(NodeError::new("expected a list"));
        };
        let total: i64 = items
            .iter()
            .map(|v| v.as_json().and_then(Json::as_i64).unwrap_or(0))
            .sum();
        Ok(NodeOutput::values(vec![Value::Json(json!(total))]))
    });
    registry.register(sum);
    calls.insert("Sum", c);

    let panic_schema = NodeSchema::v1("Panic", "test", "test")
        .required("value", InputSpec::of("INT"))
        .output(OutputSpec::of("INT"));
    let (panicking, c) = TestNode::new(panic_schema, |_, _| panic!("boom"));
    registry.register(panicking);
    calls.insert("Panic", c);

    let fail_schema = NodeSchema::v1("Fail", "test", "test")
        .required("value", InputSpec::of("INT"))
        .output(OutputSpec::of("INT"));
    let (fail, c) = TestNode::new(fail_schema, |_, _| Err(NodeError::value("bad value")));
    registry.register(fail);
    calls.insert("Fail", c);

    let steps_schema = NodeSchema::v1("Steps", "test", "test")
        .required("value", InputSpec::of("INT"))
        .required("steps", InputSpec::int(3, 1, 100))
        .output(OutputSpec::of("INT"));
    let (steps, c) = TestNode::new(steps_schema, |ctx, i| {
        let steps = i.int("steps")? as u64;
        for step in 1..=steps {
            ctx.progress(step, steps)?;
        }
        Ok(NodeOutput::values(vec![i
            .get("value")
            .cloned()
            .unwrap_or(Value::Json(Json::Null))]))
    });
    registry.register(steps);
    calls.insert("Steps", c);

    TestNodes { registry, calls }
}
