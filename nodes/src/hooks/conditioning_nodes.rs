//! Nodes that attach hooks, masks and timestep ranges to conditioning and hooks to a CLIP
//! (`advanced/hooks/cond single`, `…/cond pair`, `…/clip` of `comfy_extras/nodes_hooks.py`,
//! on `comfy.hooks.set_conds_props` and its siblings).

use std::sync::Arc;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::conditioning::{CondEntry, Conditioning};
use crate::hooks::{HookGroup, TimestepsRange};
use crate::image::Mask;
use crate::model::clip::{Clip, ClipHooks};
use crate::runtime::experimental;

const MODULE: &str = "comfy_extras.nodes_hooks";

fn schema(name: &str, display: &str, category: &str) -> NodeSchema {
    experimental(NodeSchema::v1(name, MODULE, category).display(display))
}

/// What the set-properties nodes give new conditioning: hooks (added to the entries' own), a
/// mask with its strength and whether the area is set to the mask's bounds, a timestep range.
struct Properties<'a> {
    hooks: Option<&'a HookGroup>,
    mask: Option<(&'a Mask, f64, bool)>,
    timesteps: Option<TimestepsRange>,
}

impl<'a> Properties<'a> {
    /// The optional `mask`, `hooks` and `timesteps` inputs with `strength` and `set_cond_area`.
    fn read(inputs: &'a NodeInputs) -> Result<Self, NodeError> {
        let strength = inputs.float("strength")?;
        let bounds = inputs.string("set_cond_area")? != "default";
        Ok(Properties {
            hooks: inputs.optional_object::<HookGroup>("hooks")?,
            mask: inputs
                .optional_object::<Mask>("mask")?
                .map(|mask| (mask, strength, bounds)),
            timesteps: inputs.optional_object::<TimestepsRange>("timesteps")?.copied(),
        })
    }

    /// `conditioning` with these properties (`set_conds_props` for one conditioning).
    fn apply(&self, conditioning: &Conditioning) -> Conditioning {
        let entries = conditioning
            .0
            .iter()
            .map(|entry| {
                let mut entry = with_hooks(entry, self.hooks);
                if let Some((mask, strength, bounds)) = self.mask {
                    entry.region.mask = Some(mask.clone());
                    entry.region.mask_strength = Some(strength);
                    entry.region.set_area_to_bounds = bounds;
                }
                if let Some(TimestepsRange(start, end)) = self.timesteps {
                    entry.timestep_range = Some((start, end));
                }
                entry
            })
            .collect();
        Conditioning(entries)
    }
}

/// `entry` with `hooks` after its own (`set_hooks_for_conditioning`); an entry left without
/// hooks carries none.
fn with_hooks(entry: &CondEntry, hooks: Option<&HookGroup>) -> CondEntry {
    let Some(hooks) = hooks else {
        return entry.clone();
    };
    let combined = match &entry.hooks {
        Some(own) => own.and(hooks),
        None => hooks.clone(),
    };
    CondEntry {
        hooks: (!combined.is_empty()).then_some(combined),
        ..entry.clone()
    }
}

/// `first`'s entries followed by `second`'s.
fn combined(first: &Conditioning, second: Conditioning) -> Conditioning {
    Conditioning(first.0.iter().cloned().chain(second.0).collect())
}

fn conditioning_output(conditionings: Vec<Conditioning>) -> NodeOutput {
    NodeOutput::values(conditionings.into_iter().map(Value::object).collect())
}

fn properties_inputs(schema: NodeSchema) -> NodeSchema {
    schema
        .required("strength", InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01))
        .required("set_cond_area", InputSpec::combo(&["default", "mask bounds"]))
        .optional("mask", InputSpec::of("MASK"))
        .optional("hooks", InputSpec::of("HOOKS"))
        .optional("timesteps", InputSpec::of("TIMESTEPS_RANGE"))
}

fn pair_outputs(schema: NodeSchema) -> NodeSchema {
    schema
        .output(OutputSpec::of("CONDITIONING").named("positive"))
        .output(OutputSpec::of("CONDITIONING").named("negative"))
}

/// `ConditioningSetProperties` ("Cond Set Props") and `ConditioningSetPropertiesAndCombine`:
/// `cond_NEW` with hooks, a mask and a timestep range (then after `cond`).
pub struct ConditioningSetProperties {
    pub combine: bool,
}

impl Node for ConditioningSetProperties {
    fn schema(&self, _: &Services) -> NodeSchema {
        let (name, display) = match self.combine {
            false => ("ConditioningSetProperties", "Cond Set Props"),
            true => ("ConditioningSetPropertiesAndCombine", "Cond Set Props Combine"),
        };
        let schema = schema(name, display, "advanced/hooks/cond single");
        let schema = match self.combine {
            true => schema.required("cond", InputSpec::of("CONDITIONING")),
            false => schema,
        };
        properties_inputs(schema.required("cond_NEW", InputSpec::of("CONDITIONING")))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let new = Properties::read(inputs)?.apply(inputs.object::<Conditioning>("cond_NEW")?);
        let out = match self.combine {
            true => combined(inputs.object::<Conditioning>("cond")?, new),
            false => new,
        };
        Ok(conditioning_output(vec![out]))
    }
}

/// `PairConditioningSetProperties` ("Cond Pair Set Props") and
/// `PairConditioningSetPropertiesAndCombine`: both new conditionings with the same properties
/// (then after `positive` and `negative`).
pub struct PairConditioningSetProperties {
    pub combine: bool,
}

impl Node for PairConditioningSetProperties {
    fn schema(&self, _: &Services) -> NodeSchema {
        let (name, display) = match self.combine {
            false => ("PairConditioningSetProperties", "Cond Pair Set Props"),
            true => ("PairConditioningSetPropertiesAndCombine", "Cond Pair Set Props Combine"),
        };
        let schema = schema(name, display, "advanced/hooks/cond pair");
        let schema = match self.combine {
            true => schema
                .required("positive", InputSpec::of("CONDITIONING"))
                .required("negative", InputSpec::of("CONDITIONING")),
            false => schema,
        };
        let schema = schema
            .required("positive_NEW", InputSpec::of("CONDITIONING"))
            .required("negative_NEW", InputSpec::of("CONDITIONING"));
        pair_outputs(properties_inputs(schema))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let properties = Properties::read(inputs)?;
        let positive = properties.apply(inputs.object::<Conditioning>("positive_NEW")?);
        let negative = properties.apply(inputs.object::<Conditioning>("negative_NEW")?);
        let outputs = match self.combine {
            true => vec![
                combined(inputs.object::<Conditioning>("positive")?, positive),
                combined(inputs.object::<Conditioning>("negative")?, negative),
            ],
            false => vec![positive, negative],
        };
        Ok(conditioning_output(outputs))
    }
}

/// `conditioning` marked as default, with `hooks` (`set_default_conds_and_combine`'s new part).
fn as_default(conditioning: &Conditioning, hooks: Option<&HookGroup>) -> Conditioning {
    Conditioning(
        conditioning
            .0
            .iter()
            .map(|entry| CondEntry {
                default: true,
                ..with_hooks(entry, hooks)
            })
            .collect(),
    )
}

/// `ConditioningSetDefaultCombine` ("Cond Set Default Combine"): `cond` followed by
/// `cond_DEFAULT` as default entries, which apply only where `cond`'s entries leave weight.
pub struct ConditioningSetDefaultCombine;

impl Node for ConditioningSetDefaultCombine {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema(
            "ConditioningSetDefaultCombine",
            "Cond Set Default Combine",
            "advanced/hooks/cond single",
        )
        .required("cond", InputSpec::of("CONDITIONING"))
        .required("cond_DEFAULT", InputSpec::of("CONDITIONING"))
        .optional("hooks", InputSpec::of("HOOKS"))
        .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let hooks = inputs.optional_object::<HookGroup>("hooks")?;
        let default = as_default(inputs.object::<Conditioning>("cond_DEFAULT")?, hooks);
        Ok(conditioning_output(vec![combined(
            inputs.object::<Conditioning>("cond")?,
            default,
        )]))
    }
}

/// `PairConditioningSetDefaultCombine` ("Cond Pair Set Default Combine"): both sides followed by
/// their default entries.
pub struct PairConditioningSetDefaultCombine;

impl Node for PairConditioningSetDefaultCombine {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = schema(
            "PairConditioningSetDefaultCombine",
            "Cond Pair Set Default Combine",
            "advanced/hooks/cond pair",
        )
        .required("positive", InputSpec::of("CONDITIONING"))
        .required("negative", InputSpec::of("CONDITIONING"))
        .required("positive_DEFAULT", InputSpec::of("CONDITIONING"))
        .required("negative_DEFAULT", InputSpec::of("CONDITIONING"))
        .optional("hooks", InputSpec::of("HOOKS"));
        pair_outputs(schema)
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let hooks = inputs.optional_object::<HookGroup>("hooks")?;
        let side = |name: &str, default: &str| -> Result<Conditioning, NodeError> {
            let default = as_default(inputs.object::<Conditioning>(default)?, hooks);
            Ok(combined(inputs.object::<Conditioning>(name)?, default))
        };
        Ok(conditioning_output(vec![
            side("positive", "positive_DEFAULT")?,
            side("negative", "negative_DEFAULT")?,
        ]))
    }
}

/// `PairConditioningCombine` ("Cond Pair Combine"): each side's A entries followed by its B ones.
pub struct PairConditioningCombine;

impl Node for PairConditioningCombine {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = schema(
            "PairConditioningCombine",
            "Cond Pair Combine",
            "advanced/hooks/cond pair",
        )
        .required("positive_A", InputSpec::of("CONDITIONING"))
        .required("negative_A", InputSpec::of("CONDITIONING"))
        .required("positive_B", InputSpec::of("CONDITIONING"))
        .required("negative_B", InputSpec::of("CONDITIONING"));
        pair_outputs(schema)
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let side = |first: &str, second: &str| -> Result<Conditioning, NodeError> {
            let second = inputs.object::<Conditioning>(second)?.clone();
            Ok(combined(inputs.object::<Conditioning>(first)?, second))
        };
        Ok(conditioning_output(vec![
            side("positive_A", "positive_B")?,
            side("negative_A", "negative_B")?,
        ]))
    }
}

/// `SetClipHooks` ("Set CLIP Hooks"): the CLIP's encoders patched by the hooks (at strength 1,
/// or following their keyframes over a schedule of encodings), and the hooks given to the
/// conditioning it encodes.
pub struct SetClipHooks;

impl Node for SetClipHooks {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("SetClipHooks", "Set CLIP Hooks", "advanced/hooks/clip")
            .required("clip", InputSpec::of("CLIP"))
            .required("apply_to_conds", InputSpec::boolean(true))
            .required("schedule_clip", InputSpec::boolean(false))
            .optional("hooks", InputSpec::of("HOOKS"))
            .output(OutputSpec::of("CLIP"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = inputs.object::<Clip>("clip")?;
        let Some(hooks) = inputs.optional_object::<HookGroup>("hooks")? else {
            return Ok(NodeOutput::values(vec![Value::object(clip.clone())]));
        };
        let scheduled = inputs.bool("schedule_clip")?;
        let for_conds = match inputs.bool("apply_to_conds")? {
            true => Some(hooks.clone()),
            false => clip.hooks.as_ref().and_then(|previous| previous.for_conds.clone()),
        };
        let clip_hooks = ClipHooks {
            hooks: match scheduled {
                true => hooks.clone(),
                false => hooks.with_keyframes(None),
            },
            scheduled,
            for_conds,
        };
        Ok(NodeOutput::values(vec![Value::object(Clip {
            hooks: Some(Arc::new(clip_hooks)),
            ..clip.clone()
        })]))
    }
}

/// `ConditioningTimestepsRange` ("Timesteps Range"): the range from `start_percent` to
/// `end_percent`, the one before it and the one after it.
pub struct ConditioningTimestepsRange;

impl Node for ConditioningTimestepsRange {
    fn schema(&self, _: &Services) -> NodeSchema {
        let percent = |default: f64| InputSpec::float(default, 0.0, 1.0).opt("step", 0.001);
        schema("ConditioningTimestepsRange", "Timesteps Range", "advanced/hooks")
            .required("start_percent", percent(0.0))
            .required("end_percent", percent(1.0))
            .output(OutputSpec::of("TIMESTEPS_RANGE"))
            .output(OutputSpec::of("TIMESTEPS_RANGE").named("BEFORE_RANGE"))
            .output(OutputSpec::of("TIMESTEPS_RANGE").named("AFTER_RANGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (start, end) = (inputs.float("start_percent")?, inputs.float("end_percent")?);
        let ranges = [
            TimestepsRange(start, end),
            TimestepsRange(0.0, start),
            TimestepsRange(end, 1.0),
        ];
        Ok(NodeOutput::values(ranges.into_iter().map(Value::object).collect()))
    }
}
