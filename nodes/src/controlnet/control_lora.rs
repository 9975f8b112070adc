//! Control-LoRA (Stability's SDXL control-LoRAs, ComfyUI's `ControlLora`): a ControlNet stored as
//! the changes it makes to the encoder of the model it controls. The network is built when a
//! model samples with it: a ControlNet of that UNet's architecture whose tensors are the file's
//! own where it has them (the hint stack, zero convolutions, norms, some full weights), else the
//! model's UNet's (with the model's patches), plus the file's low-rank `up`·`down` differences.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Device};
use easel_models::architectures::controlnet::{ControlNet, ControlNetConfig};
use easel_models::architectures::unet::UNetConfig;
use easel_models::kernels::sgemm::Precision;
use easel_models::lora::Patch;
use easel_models::weights::{LayeredWeights, MappedWeights, TensorShapes, WeightSource};

/// The tensor that marks a control-LoRA file.
pub const CONTROL_LORA_MARKER: &str = "lora_controlnet";

/// A control-LoRA as loaded: its file, read when a model samples with it.
pub struct ControlLora {
    file: Arc<dyn MappedWeights>,
    hint_channels: usize,
}

impl ControlLora {
    /// The control-LoRA of `file` (which has [`CONTROL_LORA_MARKER`]).
    pub fn new(file: Arc<dyn MappedWeights>) -> Result<Self, String> {
        let hint = "input_hint_block.0.weight";
        let hint_channels = file
            .shape(hint)
            .and_then(|shape| shape.get(1).copied())
            .ok_or_else(|| format!("the control-LoRA has no tensor '{hint}'"))?;
        Ok(ControlLora { file, hint_channels })
    }

    /// The ControlNet for the UNet of `unet`'s architecture that `model` holds (ComfyUI's
    /// `ControlLora.pre_run`).
    pub fn network_for(
        &self,
        unet: &UNetConfig,
        model: &WeightSource,
        device: &Device,
    ) -> candle_core::Result<ControlNet> {
        let config = ControlNetConfig::copying(unet, self.hint_channels);
        // Its own full tensors: weights and biases (not `up`, `down` or the marker).
        let own: HashSet<String> = self
            .file
            .tensor_names()
            .filter(|name| (name.ends_with(".weight") || name.ends_with(".bias")) && !name.contains("__"))
            .map(str::to_string)
            .collect();
        let model_prefix = model.name_prefix();
        let layered = LayeredWeights::new(self.file.clone(), own.clone(), model.file.clone(), &model_prefix);
        let mut patches: HashMap<String, Vec<Patch>> = HashMap::new();
        for name in layered.tensor_names().filter(|name| !own.contains(*name)) {
            if model.patches.touches(&format!("{model_prefix}{name}")) {
                patches.insert(
                    name.to_string(),
                    vec![Patch::merge(model.clone(), name.to_string(), 1.0, 0.0)],
                );
            }
        }
        for up_name in self.file.tensor_names().filter(|name| name.ends_with(".up")) {
            let layer = up_name.trim_end_matches(".up");
            let down_name = format!("{layer}.down");
            if !self.file.has(&down_name) {
                continue;
            }
            let up = self.file.load(up_name, DType::F32, device)?;
            let down = self.file.load(&down_name, DType::F32, device)?;
            patches
                .entry(format!("{layer}.weight"))
                .or_default()
                .push(Patch::low_rank(up, down, 1.0));
        }
        let source = WeightSource::new(Arc::new(layered), "", device, Precision::F32).patched(patches);
        ControlNet::new(config, source.weights())
    }
}
