//! The [`Node`] trait: what every node class implements, and what it receives while running.

use crate::schema::NodeSchema;
use crate::value::{NodeObject, Value};
use indexmap::IndexMap;
use serde_json::{Map, Value as Json};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// A node class.
pub trait Node: Send + Sync + 'static {
    /// The class's declaration. Called per validation and per `/object_info`, because combo lists
    /// (files in the model folders) change while the server runs.
    fn schema(&self, services: &Services) -> NodeSchema;

    /// Runs one call. For a node without `input_is_list`, the executor maps list inputs over calls.
    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError>;

    /// ComfyUI's `IS_CHANGED`: `None` when the class has none. Receives constant inputs only (links
    /// are `null`). An `Err` makes the node re-run every time.
    fn fingerprint(&self, _services: &Services, _inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        None
    }

    /// ComfyUI's `VALIDATE_INPUTS`, for the inputs named by the schema's `custom_validation`.
    /// Linked inputs arrive as `null`. `Err(reason)` fails validation with `custom_validation_failed`.
    fn validate_inputs(&self, _services: &Services, _inputs: &Map<String, Json>) -> Result<(), String> {
        Ok(())
    }
}

/// A node call failed. `exception_type` is what `execution_error` reports (ComfyUI reports Python's).
#[derive(Debug, Clone, Error, PartialEq)]
pub enum NodeError {
    #[error("{message}")]
    Failed { exception_type: String, message: String },
    #[error("Processing interrupted")]
    Interrupted,
}

impl NodeError {
    /// A generic failure (`Exception`).
    pub fn new(message: impl Into<String>) -> Self {
        Self::typed("Exception", message)
    }

    /// A bad argument (`ValueError`).
    pub fn value(message: impl Into<String>) -> Self {
        Self::typed("ValueError", message)
    }

    pub fn typed(exception_type: &str, message: impl Into<String>) -> Self {
        NodeError::Failed {
            exception_type: exception_type.into(),
            message: message.into(),
        }
    }
}

/// Host-provided objects nodes may need (directories, model managers, …), looked up by type.
#[derive(Default, Clone)]
pub struct Services {
    entries: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert<T: Any + Send + Sync>(&mut self, service: T) {
        self.entries.insert(TypeId::of::<T>(), Arc::new(service));
    }

    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.entries.get(&TypeId::of::<T>())?.downcast_ref::<T>()
    }

    /// The service, or a node error naming what is missing.
    pub fn require<T: Any + Send + Sync>(&self) -> Result<&T, NodeError> {
        self.get::<T>()
            .ok_or_else(|| NodeError::new(format!("{} is not configured", std::any::type_name::<T>())))
    }
}

/// A flag that stops the running prompt at the next check (before each node, and in progress updates).
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` when triggered.
    pub fn check(&self) -> Result<(), NodeError> {
        if self.is_set() {
            Err(NodeError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// The inputs of one call, by name. Absent optional inputs are absent.
#[derive(Debug, Clone, Default)]
pub struct NodeInputs {
    values: IndexMap<String, Value>,
}

impl NodeInputs {
    pub fn new(values: IndexMap<String, Value>) -> Self {
        NodeInputs { values }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    fn require(&self, name: &str) -> Result<&Value, NodeError> {
        self.values
            .get(name)
            .ok_or_else(|| NodeError::value(format!("Required input '{name}' is missing")))
    }

    fn json(&self, name: &str) -> Result<&Json, NodeError> {
        let value = self.require(name)?;
        value
            .as_json()
            .ok_or_else(|| NodeError::value(format!("Input '{name}' expects a constant, got {}", value.kind())))
    }

    pub fn int(&self, name: &str) -> Result<i64, NodeError> {
        let json = self.json(name)?;
        json.as_i64()
            .or_else(|| json.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .ok_or_else(|| NodeError::value(format!("Input '{name}' expects an INT, got {json}")))
    }

    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        let json = self.json(name)?;
        json.as_f64()
            .ok_or_else(|| NodeError::value(format!("Input '{name}' expects a FLOAT, got {json}")))
    }

    pub fn bool(&self, name: &str) -> Result<bool, NodeError> {
        let json = self.json(name)?;
        json.as_bool()
            .ok_or_else(|| NodeError::value(format!("Input '{name}' expects a BOOLEAN, got {json}")))
    }

    pub fn string(&self, name: &str) -> Result<&str, NodeError> {
        let json = self.json(name)?;
        json.as_str()
            .ok_or_else(|| NodeError::value(format!("Input '{name}' expects a STRING, got {json}")))
    }

    /// A required object input of type `T`.
    pub fn object<T: NodeObject>(&self, name: &str) -> Result<&T, NodeError> {
        let value = self.require(name)?;
        Self::cast(name, value)
    }

    /// An optional object input of type `T`.
    pub fn optional_object<T: NodeObject>(&self, name: &str) -> Result<Option<&T>, NodeError> {
        match self.values.get(name) {
            None | Some(Value::Json(Json::Null)) => Ok(None),
            Some(value) => Self::cast(name, value).map(Some),
        }
    }

    fn cast<'v, T: NodeObject>(name: &str, value: &'v Value) -> Result<&'v T, NodeError> {
        value.downcast::<T>().ok_or_else(|| {
            NodeError::value(format!(
                "Input '{name}' expects {}, got {}",
                std::any::type_name::<T>().rsplit("::").next().unwrap_or("an object"),
                value.kind()
            ))
        })
    }
}

/// What one call returns: a value per output slot, and the UI dict shown to clients.
#[derive(Debug, Clone, Default)]
pub struct NodeOutput {
    pub outputs: Vec<Value>,
    pub ui: Option<Map<String, Json>>,
}

impl NodeOutput {
    pub fn values(outputs: Vec<Value>) -> Self {
        NodeOutput { outputs, ui: None }
    }

    pub fn ui(ui: Map<String, Json>) -> Self {
        NodeOutput {
            outputs: Vec::new(),
            ui: Some(ui),
        }
    }
}

/// An encoded image a node shows while it runs (a sampler's preview, SaveImageWebsocket's output).
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// `image/png` or `image/jpeg`.
    pub image_type: &'static str,
    pub bytes: Vec<u8>,
}

/// A progress report from a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub value: Json,
    pub max: Json,
    pub preview: Option<Preview>,
}

/// What a running node sees of the prompt and the host.
pub struct NodeContext<'a> {
    pub node_id: &'a str,
    pub prompt_id: &'a str,
    /// The prompt as ComfyUI's hidden `PROMPT` input gives it.
    pub prompt: &'a Json,
    /// `extra_data.extra_pnginfo` (hidden `EXTRA_PNGINFO`).
    pub extra_pnginfo: Option<&'a Json>,
    pub services: &'a Services,
    pub(crate) interrupt: &'a Interrupt,
    pub(crate) on_progress: &'a dyn Fn(Progress),
    pub(crate) on_text: &'a dyn Fn(&str),
}

impl NodeContext<'_> {
    /// Reports `value` of `max` steps; returns `Err(Interrupted)` when the prompt was interrupted.
    pub fn progress(&self, value: u64, max: u64) -> Result<(), NodeError> {
        self.report(value, max, None)
    }

    /// Reports progress with an image for clients to show (ComfyUI's preview hook).
    pub fn progress_with_preview(&self, value: u64, max: u64, preview: Preview) -> Result<(), NodeError> {
        self.report(value, max, Some(preview))
    }

    fn report(&self, value: u64, max: u64, preview: Option<Preview>) -> Result<(), NodeError> {
        self.interrupt.check()?;
        (self.on_progress)(Progress {
            value: Json::from(value.min(max)),
            max: Json::from(max),
            preview,
        });
        Ok(())
    }

    /// Shows `text` on this node in clients (ComfyUI's `PromptServer.send_progress_text`).
    pub fn progress_text(&self, text: &str) {
        (self.on_text)(text);
    }

    /// `Err(Interrupted)` when the prompt was interrupted.
    pub fn check_interrupt(&self) -> Result<(), NodeError> {
        self.interrupt.check()
    }
}

/// Runs one call of `node` outside any prompt (for tools and tests): node id `"0"`, an empty
/// prompt, no interrupt, progress and progress text discarded.
pub fn call_standalone(node: &dyn Node, services: &Services, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
    let prompt = Json::Object(Map::new());
    let interrupt = Interrupt::new();
    let ctx = NodeContext {
        node_id: "0",
        prompt_id: "",
        prompt: &prompt,
        extra_pnginfo: None,
        services,
        interrupt: &interrupt,
        on_progress: &|_| {},
        on_text: &|_| {},
    };
    node.execute(&ctx, inputs)
}
