//! Nodes that create, schedule and combine hooks (`advanced/hooks/create`, `…/scheduling`,
//! `…/combine` of `comfy_extras/nodes_hooks.py`).

use std::sync::Arc;

use serde_json::{Map, Value as Json};

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::schedule::linspace_f32;

use crate::hooks::keyframes::{HookKeyframe, HookKeyframes, Interpolation};
use crate::hooks::{Hook, HookGroup, HookWeights};
use crate::loaders::lora::open_lora;
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{file_names, CheckpointLoaderSimple};
use crate::model::clip::Clip;
use crate::model::diffusion_model::Model;
use crate::runtime::experimental;

const MODULE: &str = "comfy_extras.nodes_hooks";

fn schema(name: &str, display: &str, category: &str) -> NodeSchema {
    experimental(NodeSchema::v1(name, MODULE, category).display(display))
}

fn hook_strength() -> InputSpec {
    InputSpec::float(1.0, -20.0, 20.0).opt("step", 0.01)
}

fn percent(default: f64) -> InputSpec {
    InputSpec::float(default, 0.0, 1.0).opt("step", 0.001)
}

/// `prev_hooks` (else an empty group) followed by `hook`.
fn after_previous(inputs: &NodeInputs, hook: Hook) -> Result<NodeOutput, NodeError> {
    let mut hooks = inputs
        .optional_object::<HookGroup>("prev_hooks")?
        .cloned()
        .unwrap_or_default();
    hooks.add(hook);
    Ok(NodeOutput::values(vec![Value::object(hooks)]))
}

/// The schema of a hook-creating node: a file of `folder` as `file_input`, the model's strength
/// (and the text encoders' unless `model_only`), the hooks it comes after.
fn create_hook_schema(
    (name, display): (&str, &str),
    services: &Services,
    (file_input, folder): (&str, &str),
    model_only: bool,
) -> NodeSchema {
    let schema = schema(name, display, "advanced/hooks/create")
        .required(file_input, InputSpec::combo(&file_names(services, folder)))
        .model_folder(file_input, folder)
        .required("strength_model", hook_strength());
    let schema = match model_only {
        false => schema.required("strength_clip", hook_strength()),
        true => schema,
    };
    schema
        .optional("prev_hooks", InputSpec::of("HOOKS"))
        .output(OutputSpec::of("HOOKS"))
}

/// The model's and the text encoders' strengths (0 for the text encoders if `model_only`).
fn hook_strengths(inputs: &NodeInputs, model_only: bool) -> Result<(f64, f64), NodeError> {
    let strength_clip = match model_only {
        false => inputs.float("strength_clip")?,
        true => 0.0,
    };
    Ok((inputs.float("strength_model")?, strength_clip))
}

/// `CreateHookLora` and `CreateHookLoraModelOnly` ("Create Hook LoRA (MO)"): a hook applying a
/// LoRA at separate strengths to the model and the text encoders (the text encoders' 0 for
/// the model-only node), after `prev_hooks`.
pub struct CreateHookLora {
    pub model_only: bool,
}

impl Node for CreateHookLora {
    fn schema(&self, services: &Services) -> NodeSchema {
        let names = match self.model_only {
            false => ("CreateHookLora", "Create Hook LoRA"),
            true => ("CreateHookLoraModelOnly", "Create Hook LoRA (MO)"),
        };
        create_hook_schema(names, services, ("lora_name", "loras"), self.model_only)
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("lora_name", "loras")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (strength_model, strength_clip) = hook_strengths(inputs, self.model_only)?;
        if strength_model == 0.0 && strength_clip == 0.0 {
            let hooks = inputs
                .optional_object::<HookGroup>("prev_hooks")?
                .cloned()
                .unwrap_or_default();
            return Ok(NodeOutput::values(vec![Value::object(hooks)]));
        }
        let lora = open_lora(ctx, inputs.string("lora_name")?)?;
        let hook = Hook::new(HookWeights::Lora(Arc::new(lora)), strength_model, strength_clip);
        after_previous(inputs, hook)
    }
}

/// `CreateHookModelAsLora` and `CreateHookModelAsLoraModelOnly`: a hook applying another
/// checkpoint as the difference between its weights and the patched model's.
pub struct CreateHookModelAsLora {
    pub model_only: bool,
}

impl Node for CreateHookModelAsLora {
    fn schema(&self, services: &Services) -> NodeSchema {
        let names = match self.model_only {
            false => ("CreateHookModelAsLora", "Create Hook Model as LoRA"),
            true => ("CreateHookModelAsLoraModelOnly", "Create Hook Model as LoRA (MO)"),
        };
        create_hook_schema(names, services, ("ckpt_name", "checkpoints"), self.model_only)
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("ckpt_name", "checkpoints")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (strength_model, strength_clip) = hook_strengths(inputs, self.model_only)?;
        let loaded = CheckpointLoaderSimple.execute(ctx, inputs)?;
        let part = |index: usize| loaded.outputs.get(index);
        let model = part(0)
            .and_then(|value| value.downcast::<Model>())
            .map(|model| model.0.clone());
        let encoders = part(1)
            .and_then(|value| value.downcast::<Clip>())
            .map(|clip| clip.encoders.clone())
            .unwrap_or_default();
        let hook = Hook::new(HookWeights::Model { model, encoders }, strength_model, strength_clip);
        after_previous(inputs, hook)
    }
}

/// `SetHookKeyframes`: the hooks with the keyframes given (one copy shared by all of them).
pub struct SetHookKeyframes;

impl Node for SetHookKeyframes {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("SetHookKeyframes", "Set Hook Keyframes", "advanced/hooks/scheduling")
            .required("hooks", InputSpec::of("HOOKS"))
            .optional("hook_kf", InputSpec::of("HOOK_KEYFRAMES"))
            .output(OutputSpec::of("HOOKS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let hooks = inputs.object::<HookGroup>("hooks")?;
        let hooks = match inputs.optional_object::<HookKeyframes>("hook_kf")? {
            Some(keyframes) => hooks.with_keyframes(Some(keyframes)),
            None => hooks.clone(),
        };
        Ok(NodeOutput::values(vec![Value::object(hooks)]))
    }
}

fn previous_keyframes(inputs: &NodeInputs) -> Result<Vec<HookKeyframe>, NodeError> {
    Ok(inputs
        .optional_object::<HookKeyframes>("prev_hook_kf")?
        .map(|previous| previous.keyframes().to_vec())
        .unwrap_or_default())
}

fn keyframes_output(keyframes: HookKeyframes) -> NodeOutput {
    NodeOutput::values(vec![Value::object(keyframes)])
}

/// `CreateHookKeyframe`: `prev_hook_kf` with a keyframe of `strength_mult` from
/// `start_percent` (guaranteeing one step).
pub struct CreateHookKeyframe;

impl Node for CreateHookKeyframe {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema(
            "CreateHookKeyframe",
            "Create Hook Keyframe",
            "advanced/hooks/scheduling",
        )
        .required("strength_mult", hook_strength())
        .required("start_percent", percent(0.0))
        .optional("prev_hook_kf", InputSpec::of("HOOK_KEYFRAMES"))
        .output(OutputSpec::of("HOOK_KEYFRAMES").named("HOOK_KF"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut keyframes = previous_keyframes(inputs)?;
        keyframes.push(HookKeyframe {
            strength: inputs.float("strength_mult")?,
            start_percent: inputs.float("start_percent")?,
            guarantee_steps: 1,
        });
        Ok(keyframes_output(HookKeyframes::new(keyframes)))
    }
}

/// Keyframes with `strengths` at `count` starts spread evenly from `start` to `end` percent
/// (in float32, as `torch.linspace`); the first guarantees one step, the others none.
fn spread_keyframes(
    inputs: &NodeInputs,
    strengths: impl IntoIterator<Item = f64>,
    count: usize,
) -> Result<NodeOutput, NodeError> {
    let (start, end) = (inputs.float("start_percent")?, inputs.float("end_percent")?);
    let print = inputs.bool("print_keyframes")?;
    let mut keyframes = previous_keyframes(inputs)?;
    let percents = linspace_f32(start as f32, end as f32, count);
    for (index, (percent, strength)) in percents.into_iter().zip(strengths).enumerate() {
        if print {
            tracing::info!("Hook Keyframe - start_percent:{percent} = {strength}");
        }
        keyframes.push(HookKeyframe {
            strength,
            start_percent: f64::from(percent),
            guarantee_steps: u32::from(index == 0),
        });
    }
    Ok(keyframes_output(HookKeyframes::new(keyframes)))
}

/// `CreateHookKeyframesInterpolated`: `keyframes_count` keyframes from `start_percent` to
/// `end_percent`, their strengths interpolated from `strength_start` to `strength_end`.
pub struct CreateHookKeyframesInterpolated;

impl Node for CreateHookKeyframesInterpolated {
    fn schema(&self, _: &Services) -> NodeSchema {
        let strength = || InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.001);
        schema(
            "CreateHookKeyframesInterpolated",
            "Create Hook Keyframes Interp.",
            "advanced/hooks/scheduling",
        )
        .required("strength_start", strength())
        .required("strength_end", strength())
        .required("interpolation", InputSpec::combo(&Interpolation::NAMES))
        .required("start_percent", percent(0.0))
        .required("end_percent", percent(1.0))
        .required("keyframes_count", InputSpec::int(5, 2, 100).opt("step", 1))
        .required("print_keyframes", InputSpec::boolean(false))
        .optional("prev_hook_kf", InputSpec::of("HOOK_KEYFRAMES"))
        .output(OutputSpec::of("HOOK_KEYFRAMES").named("HOOK_KF"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let name = inputs.string("interpolation")?;
        let interpolation = Interpolation::from_name(name)
            .ok_or_else(|| NodeError::value(format!("Unrecognized interpolation method '{name}'.")))?;
        let count = usize::try_from(inputs.int("keyframes_count")?)
            .map_err(|_| NodeError::value("keyframes_count must be at least 2"))?;
        let strengths = interpolation.weights(inputs.float("strength_start")?, inputs.float("strength_end")?, count);
        spread_keyframes(inputs, strengths.into_iter().map(f64::from), count)
    }
}

/// `CreateHookKeyframesFromFloats`: one keyframe per float of `floats_strength` (a FLOATS list
/// or one number), spread from `start_percent` to `end_percent`.
pub struct CreateHookKeyframesFromFloats;

impl Node for CreateHookKeyframesFromFloats {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema(
            "CreateHookKeyframesFromFloats",
            "Create Hook Keyframes From Floats",
            "advanced/hooks/scheduling",
        )
        .required(
            "floats_strength",
            InputSpec::of("FLOATS")
                .opt("default", -1)
                .opt("min", -1)
                .opt("step", 0.001)
                .opt("forceInput", true),
        )
        .required("start_percent", percent(0.0))
        .required("end_percent", percent(1.0))
        .required("print_keyframes", InputSpec::boolean(false))
        .optional("prev_hook_kf", InputSpec::of("HOOK_KEYFRAMES"))
        .output(OutputSpec::of("HOOK_KEYFRAMES").named("HOOK_KF"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let strengths = floats(inputs.get("floats_strength"))?;
        let count = strengths.len();
        spread_keyframes(inputs, strengths, count)
    }
}

/// The FLOATS input: a list of numbers, or one number.
fn floats(value: Option<&Value>) -> Result<Vec<f64>, NodeError> {
    let invalid = || NodeError::new("floats_strength must be either an iterable input or a float");
    match value.and_then(Value::as_json) {
        Some(Json::Number(number)) => number.as_f64().map(|value| vec![value]).ok_or_else(invalid),
        Some(Json::Array(items)) => items.iter().map(|item| item.as_f64().ok_or_else(invalid)).collect(),
        _ => Err(invalid()),
    }
}

/// `CombineHooks2`, `CombineHooks4` and `CombineHooks8`: the hooks given, combined in order
/// (nothing when none is given).
pub struct CombineHooks {
    pub count: usize,
}

impl CombineHooks {
    fn input_names(&self) -> impl Iterator<Item = String> {
        (b'A'..)
            .take(self.count)
            .map(|letter| format!("hooks_{}", letter as char))
    }
}

impl Node for CombineHooks {
    fn schema(&self, _: &Services) -> NodeSchema {
        let name = format!("CombineHooks{}", self.count);
        let display = format!("Combine Hooks [{}]", self.count);
        self.input_names()
            .fold(schema(&name, &display, "advanced/hooks/combine"), |schema, input| {
                schema.optional(&input, InputSpec::of("HOOKS"))
            })
            .output(OutputSpec::of("HOOKS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut given = Vec::with_capacity(self.count);
        for name in self.input_names() {
            if let Some(hooks) = inputs.optional_object::<HookGroup>(&name)? {
                given.push(hooks);
            }
        }
        let combined = match HookGroup::combine_all(given) {
            Some(hooks) => Value::object(hooks),
            None => Value::Json(Json::Null),
        };
        Ok(NodeOutput::values(vec![combined]))
    }
}
