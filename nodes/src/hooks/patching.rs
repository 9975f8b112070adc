//! The weight patches hooks make (ComfyUI's `WeightHook.add_hook_patches`,
//! `ModelPatcher.get_combined_hook_patches` and `patch_hooks`): a hook's patches are read once
//! for the model or encoder they patch, then applied at `strength · keyframe strength` on top
//! of its own patches. [`HookedModels`] follows the keyframes through one sampling run and keeps,
//! per group of hooks, the model patched at the group's current strengths.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use easel_models::lora::Patch;
use easel_models::weights::WeightSource;

use crate::hooks::keyframes::{is_close, KeyframeCursor};
use crate::hooks::{Hook, HookGroup, HookWeights};
use crate::loaders::lora::{encoder_lora_patches, model_lora_patches};
use crate::model::clip::TextEncoder;
use crate::model::diffusion_model::DiffusionModel;

/// Weight patches by tensor name.
pub type WeightPatchMap = HashMap<String, Vec<Patch>>;

/// `model_as_lora` patches for every tensor `target` and `other` share (by name under their
/// prefixes, same shape): `W ← W + strength·(W₂ − W)`.
fn difference_patches(target: &WeightSource, other: &WeightSource, strength: f32) -> WeightPatchMap {
    let (target_prefix, other_prefix) = (target.name_prefix(), other.name_prefix());
    let mut patches = WeightPatchMap::new();
    for other_name in other.file.tensor_names() {
        let Some(name) = other_name.strip_prefix(other_prefix.as_str()) else {
            continue;
        };
        if name.ends_with(".position_ids") {
            continue;
        }
        let target_name = format!("{target_prefix}{name}");
        let Some(shape) = target.file.shape(&target_name) else {
            continue;
        };
        if other.file.shape(other_name) != Some(shape) {
            tracing::warn!("hook weight {name} not applied: its shape differs from the model's");
            continue;
        }
        let patch = Patch::model_difference(other.clone(), target.clone(), name.to_string(), strength);
        patches.insert(target_name, vec![patch]);
    }
    patches
}

/// The patches `hook` makes to `model`'s diffusion network, at strength 1.
pub fn model_hook_patches(hook: &Hook, model: &DiffusionModel) -> Result<WeightPatchMap, String> {
    match hook.weights.as_ref() {
        HookWeights::Lora(lora) => model_lora_patches(lora, model, 1.0)
            .map(|loaded| loaded.patches)
            .map_err(|error| error.to_string()),
        HookWeights::Model { model: Some(other), .. } => Ok(difference_patches(&model.source, &other.source, 1.0)),
        HookWeights::Model { model: None, .. } => Ok(WeightPatchMap::new()),
    }
}

/// The patches `hook` makes to the text encoder at `index` of a `clip` CLIP, at strength 1.
fn encoder_hook_patches(
    hook: &Hook,
    encoder: &TextEncoder,
    index: usize,
    family: easel_models::checkpoint::Family,
) -> Result<WeightPatchMap, String> {
    match hook.weights.as_ref() {
        HookWeights::Lora(lora) => encoder_lora_patches(lora, encoder, family, 1.0)
            .map(|loaded| loaded.map(|loaded| loaded.patches).unwrap_or_default())
            .map_err(|error| error.to_string()),
        HookWeights::Model { encoders, .. } => Ok(encoders
            .get(index)
            .filter(|other| other.clip_kind() == encoder.clip_kind())
            .map(|other| difference_patches(&encoder.source, &other.source, 1.0))
            .unwrap_or_default()),
    }
}

/// `patches` (made at strength 1) at `strength` times the keyframe's (ComfyUI multiplies
/// unless the keyframe's strength is close to 1), added to `combined`.
fn add_at_strength(combined: &mut WeightPatchMap, patches: &WeightPatchMap, strength: f64, keyframe_strength: f64) {
    let strength = if is_close(keyframe_strength, 1.0) {
        strength
    } else {
        strength * keyframe_strength
    } as f32;
    for (name, patches) in patches {
        combined
            .entry(name.clone())
            .or_default()
            .extend(patches.iter().map(|patch| patch.with_strength(strength)));
    }
}

/// The text encoders of a `family` CLIP patched by `hooks`, each hook at its CLIP strength times
/// `keyframe_strengths` (one per hook).
pub fn hooked_encoders(
    encoders: &[TextEncoder],
    family: easel_models::checkpoint::Family,
    hooks: &HookGroup,
    keyframe_strengths: &[f64],
) -> candle_core::Result<Vec<TextEncoder>> {
    encoders
        .iter()
        .enumerate()
        .map(|(index, encoder)| {
            let mut combined = WeightPatchMap::new();
            for (hook, keyframe_strength) in hooks.hooks().iter().zip(keyframe_strengths) {
                if hook.strength_clip == 0.0 {
                    continue;
                }
                let patches = encoder_hook_patches(hook, encoder, index, family).map_err(candle_core::Error::Msg)?;
                add_at_strength(&mut combined, &patches, hook.strength_clip, *keyframe_strength);
            }
            encoder.with_weight_patches(combined)
        })
        .collect()
}

/// The hooked models of one sampling run: each keyframe group's place (advanced once per σ,
/// as the entries that carry it are evaluated), each hook's patches for the model, and per
/// group of hooks the model patched at the strengths it was last built for.
pub(crate) struct HookedModels {
    /// The largest σ of the run (`sample_sigmas`' maximum).
    max_sigma: f32,
    cursors: RefCell<HashMap<u64, KeyframeCursor>>,
    patches: RefCell<HashMap<u64, Arc<WeightPatchMap>>>,
    models: RefCell<HashMap<Vec<u64>, BuiltModel>>,
}

/// A model patched by a group of hooks, and the strengths it was built for.
struct BuiltModel {
    strengths: Vec<f64>,
    model: Arc<DiffusionModel>,
}

impl HookedModels {
    /// For a run over `sigmas`.
    pub(crate) fn new(sigmas: &[f32]) -> Self {
        HookedModels {
            max_sigma: sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            cursors: RefCell::default(),
            patches: RefCell::default(),
            models: RefCell::default(),
        }
    }

    /// `base` patched by `hooks` at their strengths at σ, their keyframes first moved to σ
    /// (`prepare_hook_patches_current_keyframe`, then `patch_hooks`).
    pub(crate) fn model(
        &self,
        base: &DiffusionModel,
        hooks: &HookGroup,
        sigma: f32,
    ) -> candle_core::Result<Arc<DiffusionModel>> {
        let strengths: Vec<f64> = {
            let mut cursors = self.cursors.borrow_mut();
            hooks
                .hooks()
                .iter()
                .map(|hook| {
                    let cursor = cursors
                        .entry(hook.keyframes.id())
                        .or_insert_with(|| KeyframeCursor::new(&hook.keyframes, &base.schedule));
                    cursor.advance(&hook.keyframes, sigma, self.max_sigma);
                    cursor.strength(&hook.keyframes)
                })
                .collect()
        };
        let key = hooks.ids();
        if let Some(built) = self.models.borrow().get(&key) {
            if built.strengths == strengths {
                return Ok(built.model.clone());
            }
        }
        let mut combined = WeightPatchMap::new();
        for (hook, strength) in hooks.hooks().iter().zip(&strengths) {
            let patches = self.hook_patches(hook, base)?;
            add_at_strength(&mut combined, &patches, hook.strength_model, *strength);
        }
        let model = Arc::new(base.with_weight_patches(combined)?);
        let built = BuiltModel {
            strengths,
            model: model.clone(),
        };
        self.models.borrow_mut().insert(key, built);
        Ok(model)
    }

    /// `hook`'s patches for `base` at strength 1, read once per run.
    fn hook_patches(&self, hook: &Hook, base: &DiffusionModel) -> candle_core::Result<Arc<WeightPatchMap>> {
        if let Some(patches) = self.patches.borrow().get(&hook.id()) {
            return Ok(patches.clone());
        }
        let patches = Arc::new(model_hook_patches(hook, base).map_err(candle_core::Error::Msg)?);
        self.patches.borrow_mut().insert(hook.id(), patches.clone());
        Ok(patches)
    }
}
