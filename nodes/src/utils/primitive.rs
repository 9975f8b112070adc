//! The primitive nodes (ComfyUI's `comfy_extras/nodes_primitive.py`, `utils/primitive`): a
//! string, a multiline string, an int, a float or a boolean, passed on as given.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};

use super::string::text;

/// Python's `sys.maxsize`, the bound of PrimitiveInt and PrimitiveFloat.
const MAX_SIZE: i64 = i64::MAX;

/// One primitive node: its class, display name, input and output type.
pub struct Primitive {
    class: &'static str,
    display_name: &'static str,
    io_type: &'static str,
}

/// PrimitiveString, PrimitiveStringMultiline, PrimitiveInt, PrimitiveFloat, PrimitiveBoolean.
pub const PRIMITIVES: [Primitive; 5] = [
    Primitive {
        class: "PrimitiveString",
        display_name: "String",
        io_type: "STRING",
    },
    Primitive {
        class: "PrimitiveStringMultiline",
        display_name: "String (Multiline)",
        io_type: "STRING",
    },
    Primitive {
        class: "PrimitiveInt",
        display_name: "Int",
        io_type: "INT",
    },
    Primitive {
        class: "PrimitiveFloat",
        display_name: "Float",
        io_type: "FLOAT",
    },
    Primitive {
        class: "PrimitiveBoolean",
        display_name: "Boolean",
        io_type: "BOOLEAN",
    },
];

impl Node for &'static Primitive {
    fn schema(&self, _: &Services) -> NodeSchema {
        let value = match self.class {
            "PrimitiveString" => text(false),
            "PrimitiveStringMultiline" => text(true),
            "PrimitiveInt" => InputSpec::of("INT")
                .opt("min", -MAX_SIZE)
                .opt("max", MAX_SIZE)
                .opt("control_after_generate", true),
            "PrimitiveFloat" => InputSpec::of("FLOAT").opt("min", -MAX_SIZE).opt("max", MAX_SIZE),
            _ => InputSpec::of(self.io_type),
        };
        NodeSchema::v3(self.class, "comfy_extras.nodes_primitive", "utils/primitive")
            .display(self.display_name)
            .required("value", value)
            .output(OutputSpec::of(self.io_type))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let value = inputs
            .get("value")
            .cloned()
            .ok_or_else(|| NodeError::value("Required input 'value' is missing"))?;
        Ok(NodeOutput::values(vec![value]))
    }
}
