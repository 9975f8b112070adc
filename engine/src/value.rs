//! Values that flow along links at run time.
//!
//! Constants from the prompt stay JSON; node results that are not JSON (images, masks, models) are
//! shared objects that implement [`NodeObject`]. An output slot marked `output_is_list` carries a
//! [`Value::List`], and nodes with `INPUT_IS_LIST` receive every input as one.

use serde_json::Value as Json;
use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

/// A non-JSON value produced by a node.
pub trait NodeObject: Any + Send + Sync + Debug {
    /// The socket type name (`IMAGE`, `MASK`, …), for error messages.
    fn type_name(&self) -> &'static str;
    /// A short description, as ComfyUI's `str(x)` appears in `execution_error.current_inputs`.
    fn describe(&self) -> String {
        format!("<{}>", self.type_name())
    }
}

/// One value on a link or in an input.
#[derive(Debug, Clone)]
pub enum Value {
    Json(Json),
    Object(Arc<dyn NodeObject>),
    List(Vec<Value>),
}

impl Value {
    pub fn object(object: impl NodeObject) -> Self {
        Value::Object(Arc::new(object))
    }

    /// The object if it has type `T`.
    pub fn downcast<T: NodeObject>(&self) -> Option<&T> {
        match self {
            Value::Object(object) => {
                let any: &dyn Any = object.as_ref();
                any.downcast_ref::<T>()
            }
            _ => None,
        }
    }

    pub fn as_json(&self) -> Option<&Json> {
        match self {
            Value::Json(json) => Some(json),
            _ => None,
        }
    }

    /// The value as `execution_error.current_inputs` shows it: JSON scalars as they are, others as text.
    pub fn error_display(&self) -> Json {
        match self {
            Value::Json(json @ (Json::Null | Json::Bool(_) | Json::Number(_) | Json::String(_))) => json.clone(),
            Value::Json(other) => Json::String(crate::pyjson::py_repr(other)),
            Value::Object(object) => Json::String(object.describe()),
            Value::List(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|item| match item.error_display() {
                        Json::String(s) => s,
                        other => crate::pyjson::py_repr(&other),
                    })
                    .collect();
                Json::String(format!("[{}]", parts.join(", ")))
            }
        }
    }

    /// A short type name for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::Json(Json::Null) => "None".into(),
            Value::Json(Json::Bool(_)) => "BOOLEAN".into(),
            Value::Json(Json::Number(n)) if n.is_f64() => "FLOAT".into(),
            Value::Json(Json::Number(_)) => "INT".into(),
            Value::Json(Json::String(_)) => "STRING".into(),
            Value::Json(_) => "JSON".into(),
            Value::Object(object) => object.type_name().into(),
            Value::List(_) => "list".into(),
        }
    }
}

impl From<Json> for Value {
    fn from(json: Json) -> Self {
        Value::Json(json)
    }
}
