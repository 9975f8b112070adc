//! Easel's graph runtime.
//!
//! A ComfyUI API-format prompt goes through these stages, one module each:
//! - [`prompt`]: the JSON prompt, kept as ComfyUI keeps it (node ids, `class_type`, `inputs`, `_meta`);
//!   [`ui_workflow`] turns a workflow saved in the frontend's UI format into one;
//! - [`schema`] and [`node`]: what a node declares (its `/object_info` entry) and what it runs;
//! - [`registry`]: every known node class by name;
//! - [`validate`]: ComfyUI's `validate_prompt`, with its exact error objects ([`node_errors`]);
//! - [`graph`], [`schedule`] and [`cache`]: the link DAG, ComfyUI's execution order and its output cache;
//! - [`executor`]: runs a validated prompt and reports [`events`];
//! - [`pyjson`]: Python-compatible JSON text and value formatting, for byte-exact output.
//!
//! The engine knows nothing of ML or HTTP: node implementations live in `easel-nodes`, transport in `easel-server`.

pub mod cache;
pub mod events;
pub mod executor;
pub mod graph;
pub mod node;
pub mod node_errors;
pub mod prompt;
pub mod pyjson;
pub mod registry;
pub mod schedule;
pub mod schema;
pub mod ui_workflow;
pub mod validate;
pub mod value;

pub use cache::CacheMode;
pub use events::{Event, EventSink};
pub use executor::{ExecutionOutcome, ExecutionStatus, Executor};
pub use node::{call_standalone, Interrupt, Node, NodeContext, NodeError, NodeInputs, NodeOutput, Preview, Services};
pub use node_errors::NodeErrors;
pub use prompt::{NodeId, Prompt, PromptError};
pub use registry::NodeRegistry;
pub use schema::{HiddenInput, InputSpec, IoType, NodeSchema, OutputSpec, SchemaStyle};
pub use validate::{validate_prompt, ValidatedPrompt, ValidationFailure};
pub use value::{NodeObject, Value};
