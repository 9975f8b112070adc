//! What a node class declares, and its `/object_info` entry.
//!
//! A [`NodeSchema`] is written once per node and serialises to exactly the JSON ComfyUI 0.3.64 sends for
//! that class: classic ("V1") nodes and schema-based ("V3") nodes differ in key order and defaults, so the
//! schema records which style it follows. Input options are an ordered JSON map, written in the order the
//! Python source lists them.

use indexmap::IndexMap;
use serde_json::{json, Map, Value as Json};

/// ComfyUI's `MAX_RESOLUTION`.
pub const MAX_RESOLUTION: i64 = 16384;

/// The serialisation style of a node's `/object_info` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchemaStyle {
    /// Classic nodes (`INPUT_TYPES`, `RETURN_TYPES`).
    #[default]
    V1,
    /// `comfy_api.latest.io.ComfyNode` nodes: every key present, options always present.
    V3,
}

/// The type of an input or output socket.
#[derive(Debug, Clone, PartialEq)]
pub enum IoType {
    /// A named type: `INT`, `IMAGE`, `FLOAT,INT`, `COMBO`, `*`, …
    Named(String),
    /// A classic combo: the list of allowed values.
    Combo(Vec<Json>),
}

impl IoType {
    pub fn named(name: &str) -> Self {
        IoType::Named(name.to_string())
    }

    fn to_json(&self) -> Json {
        match self {
            IoType::Named(name) => Json::String(name.clone()),
            IoType::Combo(values) => Json::Array(values.clone()),
        }
    }

    /// Whether an output of type `self` may feed an input of type `input` (ComfyUI's
    /// `validate_node_input`): equal types, `*` on either side, or overlapping comma-separated sets.
    pub fn feeds(&self, input: &IoType) -> bool {
        match (self, input) {
            (IoType::Named(out), IoType::Named(inp)) => {
                if out == inp || out == "*" || inp == "*" {
                    return true;
                }
                let outs: Vec<&str> = out.split(',').map(str::trim).collect();
                inp.split(',').map(str::trim).any(|t| outs.contains(&t))
            }
            (IoType::Combo(a), IoType::Combo(b)) => a == b,
            (IoType::Combo(_), IoType::Named(inp)) => inp == "*" || inp == "COMBO",
            (IoType::Named(out), IoType::Combo(_)) => out == "*",
        }
    }

    /// The type as ComfyUI prints it in error details.
    pub fn display(&self) -> String {
        match self {
            IoType::Named(name) => name.clone(),
            IoType::Combo(values) => crate::pyjson::py_repr(&Json::Array(values.clone())),
        }
    }
}

/// One input: its type and its options (`default`, `min`, `max`, `tooltip`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub io_type: IoType,
    /// `None` writes a one-element spec (`["IMAGE"]`), as V1 nodes without options do.
    pub options: Option<Map<String, Json>>,
}

impl InputSpec {
    /// A socket or widget of a named type, with no options.
    pub fn of(type_name: &str) -> Self {
        InputSpec {
            io_type: IoType::named(type_name),
            options: None,
        }
    }

    /// A classic combo over string values.
    pub fn combo<S: AsRef<str>>(values: &[S]) -> Self {
        InputSpec {
            io_type: IoType::Combo(values.iter().map(|v| Json::String(v.as_ref().to_string())).collect()),
            options: None,
        }
    }

    /// A V3 combo: `["COMBO", {"multiselect": false, "options": [...]}]`.
    pub fn combo_v3<S: AsRef<str>>(values: &[S]) -> Self {
        let options = values.iter().map(|v| Json::String(v.as_ref().to_string())).collect();
        Self::of("COMBO")
            .opt("multiselect", false)
            .opt("options", Json::Array(options))
    }

    /// `["INT", {"default", "min", "max"}]`.
    pub fn int(default: i64, min: i64, max: i64) -> Self {
        Self::of("INT").opt("default", default).opt("min", min).opt("max", max)
    }

    /// `["FLOAT", {"default", "min", "max"}]`.
    pub fn float(default: f64, min: f64, max: f64) -> Self {
        Self::of("FLOAT")
            .opt("default", default)
            .opt("min", min)
            .opt("max", max)
    }

    /// `["BOOLEAN", {"default"}]`.
    pub fn boolean(default: bool) -> Self {
        Self::of("BOOLEAN").opt("default", default)
    }

    /// `["STRING", {"default"}]`.
    pub fn string(default: &str) -> Self {
        Self::of("STRING").opt("default", default)
    }

    /// Appends one option (options keep insertion order).
    pub fn opt(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.options
            .get_or_insert_with(Map::new)
            .insert(key.to_string(), value.into());
        self
    }

    /// Ensures an (possibly empty) options map is written, as V3 nodes always do.
    pub fn with_options(mut self) -> Self {
        self.options.get_or_insert_with(Map::new);
        self
    }

    pub fn option(&self, key: &str) -> Option<&Json> {
        self.options.as_ref()?.get(key)
    }

    /// `[type, options]` with `{}` for missing options: what validation errors call `input_config`.
    pub fn config_json(&self) -> Json {
        json!([
            self.io_type.to_json(),
            Json::Object(self.options.clone().unwrap_or_default())
        ])
    }

    fn to_json(&self) -> Json {
        match &self.options {
            None => json!([self.io_type.to_json()]),
            Some(options) => json!([self.io_type.to_json(), options]),
        }
    }
}

/// Values the executor injects for hidden inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenInput {
    Prompt,
    DynPrompt,
    ExtraPngInfo,
    UniqueId,
    AuthTokenComfyOrg,
    ApiKeyComfyOrg,
}

impl HiddenInput {
    pub fn name(self) -> &'static str {
        match self {
            HiddenInput::Prompt => "PROMPT",
            HiddenInput::DynPrompt => "DYNPROMPT",
            HiddenInput::ExtraPngInfo => "EXTRA_PNGINFO",
            HiddenInput::UniqueId => "UNIQUE_ID",
            HiddenInput::AuthTokenComfyOrg => "AUTH_TOKEN_COMFY_ORG",
            HiddenInput::ApiKeyComfyOrg => "API_KEY_COMFY_ORG",
        }
    }
}

/// One output socket.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    pub io_type: IoType,
    pub name: String,
    pub is_list: bool,
    pub tooltip: Option<String>,
}

impl OutputSpec {
    /// An output named after its type.
    pub fn of(type_name: &str) -> Self {
        OutputSpec {
            io_type: IoType::named(type_name),
            name: type_name.to_string(),
            is_list: false,
            tooltip: None,
        }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn list(mut self) -> Self {
        self.is_list = true;
        self
    }

    pub fn tooltip(mut self, tooltip: &str) -> Self {
        self.tooltip = Some(tooltip.to_string());
        self
    }
}

/// Which constant inputs a node's own validation function (`VALIDATE_INPUTS`) receives. Range and
/// list checks are skipped for those inputs, as in ComfyUI.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum CustomValidation {
    #[default]
    None,
    Inputs(Vec<String>),
    AllInputs,
}

impl CustomValidation {
    pub fn covers(&self, input: &str) -> bool {
        match self {
            CustomValidation::None => false,
            CustomValidation::Inputs(names) => names.iter().any(|n| n == input),
            CustomValidation::AllInputs => true,
        }
    }
}

/// Where an input is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSection {
    Required,
    Optional,
}

/// Everything a node class declares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSchema {
    pub name: String,
    /// `None`: V1 shows the class name, V3 writes `null`.
    pub display_name: Option<String>,
    pub description: String,
    pub python_module: String,
    pub category: String,
    pub output_node: bool,
    pub deprecated: bool,
    pub experimental: bool,
    pub style: SchemaStyle,
    pub required: IndexMap<String, InputSpec>,
    pub optional: IndexMap<String, InputSpec>,
    pub hidden: IndexMap<String, HiddenInput>,
    pub outputs: Vec<OutputSpec>,
    /// ComfyUI's `INPUT_IS_LIST`: one call receives whole lists.
    pub input_is_list: bool,
    /// ComfyUI's `NOT_IDEMPOTENT`: the node id is part of the cache key.
    pub not_idempotent: bool,
    pub custom_validation: CustomValidation,
    /// `OUTPUT_TOOLTIPS` where it is not the outputs' own: a V1 subclass keeps its parent's
    /// (`LoraLoaderModelOnly` lists `LoraLoader`'s two).
    pub output_tooltips: Option<Vec<String>>,
    /// Inputs that name a file of a model folder (`ckpt_name` → `checkpoints`): a name not in
    /// the list gets the folder in its error's `extra_info.model_folder` (Easel's addition, so
    /// clients can say where the file belongs). Not part of `object_info`.
    pub model_folders: IndexMap<String, String>,
}

impl NodeSchema {
    /// A classic node in `python_module`, category `category`.
    pub fn v1(name: &str, python_module: &str, category: &str) -> Self {
        NodeSchema {
            name: name.into(),
            python_module: python_module.into(),
            category: category.into(),
            ..Default::default()
        }
    }

    /// A V3 schema node.
    pub fn v3(name: &str, python_module: &str, category: &str) -> Self {
        NodeSchema {
            style: SchemaStyle::V3,
            ..Self::v1(name, python_module, category)
        }
    }

    pub fn display(mut self, display_name: &str) -> Self {
        self.display_name = Some(display_name.into());
        self
    }

    pub fn description(mut self, description: &str) -> Self {
        self.description = description.into();
        self
    }

    pub fn output_node(mut self) -> Self {
        self.output_node = true;
        self
    }

    /// Lists `tooltips` as the V1 node's `output_tooltips`, whatever its outputs say.
    pub fn output_tooltips(mut self, tooltips: &[&str]) -> Self {
        self.output_tooltips = Some(tooltips.iter().map(|tooltip| tooltip.to_string()).collect());
        self
    }

    /// Records that input `name` names a file of model folder `folder` (see `model_folders`).
    pub fn model_folder(mut self, name: &str, folder: &str) -> Self {
        self.model_folders.insert(name.into(), folder.into());
        self
    }

    pub fn required(mut self, name: &str, spec: InputSpec) -> Self {
        let spec = if self.style == SchemaStyle::V3 {
            spec.with_options()
        } else {
            spec
        };
        self.required.insert(name.into(), spec);
        self
    }

    pub fn optional(mut self, name: &str, spec: InputSpec) -> Self {
        let spec = if self.style == SchemaStyle::V3 {
            spec.with_options()
        } else {
            spec
        };
        self.optional.insert(name.into(), spec);
        self
    }

    pub fn hidden(mut self, name: &str, input: HiddenInput) -> Self {
        self.hidden.insert(name.into(), input);
        self
    }

    pub fn output(mut self, output: OutputSpec) -> Self {
        self.outputs.push(output);
        self
    }

    pub fn validated_by(mut self, validation: CustomValidation) -> Self {
        self.custom_validation = validation;
        self
    }

    /// A declared (required or optional) input.
    pub fn input(&self, name: &str) -> Option<(InputSection, &InputSpec)> {
        if let Some(spec) = self.required.get(name) {
            return Some((InputSection::Required, spec));
        }
        self.optional.get(name).map(|spec| (InputSection::Optional, spec))
    }

    /// Declared inputs, required first, in declaration order.
    pub fn declared_inputs(&self) -> impl Iterator<Item = (&str, InputSection, &InputSpec)> {
        let required = self
            .required
            .iter()
            .map(|(n, s)| (n.as_str(), InputSection::Required, s));
        let optional = self
            .optional
            .iter()
            .map(|(n, s)| (n.as_str(), InputSection::Optional, s));
        required.chain(optional)
    }

    pub fn uses_hidden(&self, input: HiddenInput) -> bool {
        self.hidden.values().any(|h| *h == input)
    }

    /// The `/object_info` entry.
    pub fn to_object_info(&self) -> Json {
        let mut input = Map::new();
        let mut order = Map::new();
        // ComfyUI lists "required" even when it is empty (DisableNoise); "optional" only when not.
        for (section, specs) in [("required", &self.required), ("optional", &self.optional)] {
            if section == "required" || !specs.is_empty() {
                let entries: Map<String, Json> = specs.iter().map(|(n, s)| (n.clone(), s.to_json())).collect();
                input.insert(section.into(), Json::Object(entries));
                order.insert(section.into(), json!(specs.keys().collect::<Vec<_>>()));
            }
        }
        if !self.hidden.is_empty() {
            let entries: Map<String, Json> = self
                .hidden
                .iter()
                .map(|(n, h)| {
                    let value = match self.style {
                        SchemaStyle::V1 => json!(h.name()),
                        SchemaStyle::V3 => json!([h.name()]),
                    };
                    (n.clone(), value)
                })
                .collect();
            input.insert("hidden".into(), Json::Object(entries));
            order.insert("hidden".into(), json!(self.hidden.keys().collect::<Vec<_>>()));
        }
        let output: Vec<Json> = self.outputs.iter().map(|o| o.io_type.to_json()).collect();
        let output_is_list: Vec<bool> = self.outputs.iter().map(|o| o.is_list).collect();
        let output_name: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
        let tooltips: Vec<Option<&str>> = self.outputs.iter().map(|o| o.tooltip.as_deref()).collect();

        let mut info = Map::new();
        info.insert("input".into(), Json::Object(input));
        info.insert("input_order".into(), Json::Object(order));
        info.insert("output".into(), json!(output));
        info.insert("output_is_list".into(), json!(output_is_list));
        info.insert("output_name".into(), json!(output_name));
        if self.style == SchemaStyle::V3 {
            info.insert("output_tooltips".into(), json!(tooltips));
        }
        info.insert("name".into(), json!(self.name));
        let display = match (&self.display_name, self.style) {
            (Some(d), _) => json!(d),
            (None, SchemaStyle::V1) => json!(self.name),
            (None, SchemaStyle::V3) => Json::Null,
        };
        info.insert("display_name".into(), display);
        info.insert("description".into(), json!(self.description));
        info.insert("python_module".into(), json!(self.python_module));
        info.insert("category".into(), json!(self.category));
        info.insert("output_node".into(), json!(self.output_node));
        match self.style {
            SchemaStyle::V3 => {
                info.insert("deprecated".into(), json!(self.deprecated));
                info.insert("experimental".into(), json!(self.experimental));
                info.insert("api_node".into(), json!(false));
            }
            SchemaStyle::V1 => {
                if let Some(inherited) = &self.output_tooltips {
                    info.insert("output_tooltips".into(), json!(inherited));
                } else if tooltips.iter().any(Option::is_some) {
                    info.insert("output_tooltips".into(), json!(tooltips));
                }
                if self.deprecated {
                    info.insert("deprecated".into(), json!(true));
                }
                if self.experimental {
                    info.insert("experimental".into(), json!(true));
                }
            }
        }
        Json::Object(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_matching_follows_comfyui() {
        let int = IoType::named("INT");
        assert!(int.feeds(&IoType::named("FLOAT,INT")));
        assert!(IoType::named("CLIP").feeds(&IoType::named("*")));
        assert!(!IoType::named("CLIP").feeds(&IoType::named("MODEL")));
    }

    #[test]
    fn output_names_and_tooltips_serialise_like_comfyui() {
        // Captured CheckpointLoaderSimple entry, protocol.md §5.1.
        let schema = NodeSchema::v1("CheckpointLoaderSimple", "nodes", "loaders")
            .display("Load Checkpoint")
            .description("Loads a diffusion model checkpoint, diffusion models are used to denoise latents.")
            .required(
                "ckpt_name",
                InputSpec::combo::<&str>(&[]).opt("tooltip", "The name of the checkpoint (model) to load."),
            )
            .output(OutputSpec::of("MODEL").tooltip("The model used for denoising latents."))
            .output(OutputSpec::of("CLIP").tooltip("The CLIP model used for encoding text prompts."))
            .output(
                OutputSpec::of("VAE")
                    .tooltip("The VAE model used for encoding and decoding images to and from latent space."),
            );
        let expected = r#"{"input":{"required":{"ckpt_name":[[],{"tooltip":"The name of the checkpoint (model) to load."}]}},"input_order":{"required":["ckpt_name"]},"output":["MODEL","CLIP","VAE"],"output_is_list":[false,false,false],"output_name":["MODEL","CLIP","VAE"],"name":"CheckpointLoaderSimple","display_name":"Load Checkpoint","description":"Loads a diffusion model checkpoint, diffusion models are used to denoise latents.","python_module":"nodes","category":"loaders","output_node":false,"output_tooltips":["The model used for denoising latents.","The CLIP model used for encoding text prompts.","The VAE model used for encoding and decoding images to and from latent space."]}"#;
        assert_eq!(serde_json::to_string(&schema.to_object_info()).unwrap(), expected);

        let list = NodeSchema::v3("Split", "test", "test").output(OutputSpec::of("INT").named("parts").list());
        let info = list.to_object_info();
        assert_eq!(info["output_name"], serde_json::json!(["parts"]));
        assert_eq!(info["output_is_list"], serde_json::json!([true]));
        assert_eq!(info["output_tooltips"], serde_json::json!([null]));
        assert_eq!(info["display_name"], serde_json::Value::Null);
    }

    #[test]
    fn v1_entry_has_comfyui_key_order() {
        let schema = NodeSchema::v1("ImageInvert", "nodes", "image")
            .display("Invert Image")
            .required("image", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"));
        let text = serde_json::to_string(&schema.to_object_info()).unwrap();
        assert_eq!(
            text,
            r#"{"input":{"required":{"image":["IMAGE"]}},"input_order":{"required":["image"]},"output":["IMAGE"],"output_is_list":[false],"output_name":["IMAGE"],"name":"ImageInvert","display_name":"Invert Image","description":"","python_module":"nodes","category":"image","output_node":false}"#
        );
    }
}
