//! Hooks: scheduled LoRA (ComfyUI's `comfy/hooks.py` and `comfy_extras/nodes_hooks.py`). A hook
//! holds weights (a LoRA file, or another checkpoint applied as a difference) and the strengths
//! they patch the diffusion model and the text encoders at. Conditioning entries carry hooks, and
//! each entry is sampled by the model patched with its own hooks at the strengths their keyframes
//! give at that step; a CLIP with hooks encodes prompts with them, once per range of a schedule
//! if asked.
//!
//! - [`keyframes`]: HOOK_KEYFRAMES and how strengths follow them over sampling;
//! - [`patching`]: the weight patches hooks make to a model or text encoder, and the models a
//!   sampling run builds for its hooked entries;
//! - [`nodes`]: creating, scheduling and combining hooks; [`conditioning_nodes`]: attaching them
//!   (and masks and timestep ranges) to conditioning and to a CLIP.

pub mod conditioning_nodes;
pub mod keyframes;
pub mod nodes;
pub mod patching;

use std::fmt;
use std::sync::Arc;

use easel_engine::{NodeObject, NodeRegistry};
use easel_models::weights::SafetensorsFile;

use crate::hooks::keyframes::{next_id, HookKeyframes};
use crate::model::clip::TextEncoder;
use crate::model::diffusion_model::DiffusionModel;

/// Adds the hook nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::CreateHookLora { model_only: false });
    registry.register(nodes::CreateHookLora { model_only: true });
    registry.register(nodes::CreateHookModelAsLora { model_only: false });
    registry.register(nodes::CreateHookModelAsLora { model_only: true });
    registry.register(nodes::SetHookKeyframes);
    registry.register(nodes::CreateHookKeyframe);
    registry.register(nodes::CreateHookKeyframesInterpolated);
    registry.register(nodes::CreateHookKeyframesFromFloats);
    registry.register(nodes::CombineHooks { count: 2 });
    registry.register(nodes::CombineHooks { count: 4 });
    registry.register(nodes::CombineHooks { count: 8 });
    registry.register(conditioning_nodes::ConditioningSetProperties { combine: false });
    registry.register(conditioning_nodes::ConditioningSetProperties { combine: true });
    registry.register(conditioning_nodes::PairConditioningSetProperties { combine: false });
    registry.register(conditioning_nodes::PairConditioningSetProperties { combine: true });
    registry.register(conditioning_nodes::ConditioningSetDefaultCombine);
    registry.register(conditioning_nodes::PairConditioningSetDefaultCombine);
    registry.register(conditioning_nodes::PairConditioningCombine);
    registry.register(conditioning_nodes::SetClipHooks);
    registry.register(conditioning_nodes::ConditioningTimestepsRange);
}

/// The weights a hook applies.
pub enum HookWeights {
    /// A LoRA file, mapped onto each model or encoder it patches (`create_hook_lora`).
    Lora(Arc<SafetensorsFile>),
    /// Another checkpoint, applied as its difference from the patched weights
    /// (`create_hook_model_as_lora`): `W ← W + strength·(W₂ − W)`, W the weight before hooks.
    Model {
        model: Option<Arc<DiffusionModel>>,
        encoders: Vec<TextEncoder>,
    },
}

/// A weight hook (ComfyUI's `WeightHook`): its weights, the strengths it patches the model and
/// the text encoders at, and its keyframes. Copies share the identity (`hook_ref`).
#[derive(Clone)]
pub struct Hook {
    id: u64,
    pub weights: Arc<HookWeights>,
    pub strength_model: f64,
    pub strength_clip: f64,
    pub keyframes: HookKeyframes,
}

impl Hook {
    /// A new hook without keyframes.
    pub fn new(weights: HookWeights, strength_model: f64, strength_clip: f64) -> Hook {
        Hook {
            id: next_id(),
            weights: Arc::new(weights),
            strength_model,
            strength_clip,
            keyframes: HookKeyframes::default(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The HOOKS socket (ComfyUI's `HookGroup`): hooks in the order added, each at most once.
#[derive(Clone, Default)]
pub struct HookGroup {
    hooks: Vec<Hook>,
}

impl HookGroup {
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Adds `hook` unless the group holds it already.
    pub fn add(&mut self, hook: Hook) {
        if !self.hooks.iter().any(|held| held.id == hook.id) {
            self.hooks.push(hook);
        }
    }

    /// These hooks followed by `other`'s (`clone_and_combine`).
    pub fn and(&self, other: &HookGroup) -> HookGroup {
        let mut combined = self.clone();
        for hook in &other.hooks {
            combined.add(hook.clone());
        }
        combined
    }

    /// The groups given combined in order; `None` when none is given (`combine_all_hooks`).
    pub fn combine_all<'a>(groups: impl IntoIterator<Item = &'a HookGroup>) -> Option<HookGroup> {
        groups.into_iter().fold(None, |combined, group| match combined {
            None => Some(group.clone()),
            Some(combined) => Some(combined.and(group)),
        })
    }

    /// The hooks with `keyframes` (a copy shared by all of them), or with none
    /// (`set_keyframes_on_hooks`).
    pub fn with_keyframes(&self, keyframes: Option<&HookKeyframes>) -> HookGroup {
        let keyframes = keyframes.map_or_else(HookKeyframes::default, HookKeyframes::copied);
        HookGroup {
            hooks: self
                .hooks
                .iter()
                .map(|hook| Hook {
                    keyframes: keyframes.clone(),
                    ..hook.clone()
                })
                .collect(),
        }
    }

    /// The hooks' identities, in order: what sampling groups conditioning entries by.
    pub fn ids(&self) -> Vec<u64> {
        self.hooks.iter().map(|hook| hook.id).collect()
    }
}

impl fmt::Debug for HookGroup {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<comfy.hooks.HookGroup>")
    }
}

impl NodeObject for HookGroup {
    fn type_name(&self) -> &'static str {
        "HOOKS"
    }
}

/// The TIMESTEPS_RANGE socket: (start, end) percent of sampling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimestepsRange(pub f64, pub f64);

impl NodeObject for TimestepsRange {
    fn type_name(&self) -> &'static str {
        "TIMESTEPS_RANGE"
    }
}
