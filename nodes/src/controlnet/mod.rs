//! ControlNet (`comfy/controlnet.py`): a CONTROL_NET value ([`ControlModel`]) and what applying
//! one to conditioning entries leaves on them ([`ControlApplication`]): at each model call the
//! application's network gives residuals, scaled by its strength and added to those of the
//! applications before it, that the UNet adds to its blocks. A ControlNet sees the latent, the
//! hint image resized to it, the timestep and the entry's text, and gives residuals for the skip
//! connections and the middle block (a control-LoRA is a ControlNet built from the model that
//! samples with it); a T2I-Adapter sees only the hint, once per size, and gives residuals for
//! the encoder's blocks. A FLUX ControlNet sees the latent, the hint, the timestep, the text,
//! the pooled text and the guidance, and gives residuals for FLUX's double and single blocks
//! (`input` and `output`); an SD3 ControlNet sees the latent, the hint encoded by the VAE, the
//! timestep and the text, and gives residuals for the MMDiT's joint blocks (`output`).
//!
//! - [`control_lora`]: control-LoRAs, built from the model that samples with them.
//! - [`nodes`]: ControlNetLoader, DiffControlNetLoader, ControlNetApplyAdvanced,
//!   ControlNetApply, ControlNetApplySD3, ControlNetInpaintingAliMamaApply and
//!   SetUnionControlNetType.

pub mod control_lora;
pub mod nodes;

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use easel_engine::{NodeObject, NodeRegistry};
use easel_models::architectures::controlnet::{ControlHint, ControlNet, ControlNetInput};
use easel_models::architectures::flux::{FluxControl, FluxInput, ReferenceMethod};
use easel_models::architectures::flux_controlnet::FluxControlNet;
use easel_models::architectures::mmdit_controlnet::{MmditControlInput, MmditControlNet};
use easel_models::architectures::t2i_adapter::T2IAdapter;
use easel_models::architectures::unet::ControlResiduals;
use easel_models::architectures::unet::UNet;

use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::Image;
use crate::latent::vae::encode_image;
use crate::latent::LatentFormat;
use crate::model::diffusion_model::{DiffusionModel, DiffusionNetwork};
use crate::model::vae::VaeModel;
use control_lora::ControlLora;

/// ComfyUI's error for a ControlNet that takes latents applied without a VAE.
const NEEDS_VAE: &str =
    "This Controlnet needs a VAE but none was provided, please use a ControlNetApply node with a VAE input and connect it.";

/// Adds the ControlNet nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ControlNetLoader);
    registry.register(nodes::DiffControlNetLoader);
    registry.register(nodes::ControlNetApplyAdvanced);
    registry.register(nodes::ControlNetApply);
    registry.register(nodes::ControlNetApplySD3);
    registry.register(nodes::ControlNetInpaintingAliMamaApply);
    registry.register(nodes::SetUnionControlNetType);
}

/// The CONTROL_NET socket: a loaded control network (clones share it) and the control type a
/// union ControlNet is told (SetUnionControlNetType; `None` is "auto").
#[derive(Clone)]
pub struct ControlModel {
    pub loaded: Arc<LoadedControlNet>,
    pub control_type: Option<usize>,
}

impl ControlModel {
    pub fn new(loaded: Arc<LoadedControlNet>) -> Self {
        ControlModel {
            loaded,
            control_type: None,
        }
    }
}

/// A control network as its loader made it.
pub struct LoadedControlNet {
    pub network: ControlNetwork,
    /// Pixels per latent pixel of the hint image (8).
    pub compression_ratio: usize,
    /// Each residual replaced by its mean over the image (ComfyUI sets it for ControlNet files
    /// named `…_shuffle`, the v1.1 shuffle model).
    pub global_average_pooling: bool,
}

/// The networks a CONTROL_NET can hold.
pub enum ControlNetwork {
    ControlNet(Box<ControlNet>),
    ControlLora(ControlLora),
    T2IAdapter(T2IAdapter),
    /// A FLUX ControlNet (XLabs, Mistoline, InstantX and Shakker-Labs union, AliMama inpainting).
    Flux(Box<FluxControlNet>),
    /// An SD3 ControlNet (InstantX's, AliMama's inpainting one, Stability's SD3.5 ones).
    Mmdit(Box<MmditControlNet>),
}

impl ControlNetwork {
    /// Whether the network takes the hint's latent (InstantX-style FLUX ControlNets, SD3's).
    fn takes_latent(&self) -> bool {
        match self {
            ControlNetwork::Flux(network) => network.kind().takes_latent(),
            ControlNetwork::Mmdit(_) => true,
            _ => false,
        }
    }

    /// Whether the network takes a mask after the hint's latent (AliMama's inpainting ones).
    pub fn concat_mask(&self) -> bool {
        match self {
            ControlNetwork::Flux(network) => network.kind().concat_mask(),
            ControlNetwork::Mmdit(network) => network.hint_channels() == 17,
            _ => false,
        }
    }

    /// How the encoded hint is brought into the model's space (`latent_format.process_in`):
    /// FLUX's format, SD3's, or SD3's scale alone for diffusers' SD3 ControlNets.
    fn hint_latent_format(&self) -> LatentFormat {
        match self {
            ControlNetwork::Mmdit(network) if network.shifted_hint() => LatentFormat::sd3(),
            ControlNetwork::Mmdit(_) => LatentFormat {
                shift_factor: 0.0,
                ..LatentFormat::sd3()
            },
            _ => LatentFormat::flux(),
        }
    }

    /// The hint's size for a latent of `height × width` × the compression ratio: a T2I-Adapter
    /// rounds it up to a multiple of its unshuffle factor (`scale_image_to`).
    fn hint_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self {
            ControlNetwork::ControlNet(_)
            | ControlNetwork::ControlLora(_)
            | ControlNetwork::Flux(_)
            | ControlNetwork::Mmdit(_) => (height, width),
            ControlNetwork::T2IAdapter(adapter) => {
                let factor = adapter.config().unshuffle();
                (height.div_ceil(factor) * factor, width.div_ceil(factor) * factor)
            }
        }
    }
}

impl std::fmt::Debug for ControlModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ControlModel")
    }
}

impl NodeObject for ControlModel {
    fn type_name(&self) -> &'static str {
        "CONTROL_NET"
    }
}

/// A control network applied to conditioning entries (ComfyUI's copy of the ControlNet with
/// `set_cond_hint` and `set_previous_controlnet`). Entries that share one are batched together.
pub struct ControlApplication {
    pub model: ControlModel,
    /// The hint image as the node received it.
    pub image: Image,
    pub strength: f64,
    /// The part of sampling, as (start, end) fractions, during which it applies.
    pub range: (f64, f64),
    /// The application the entries carried before this one (its residuals are added).
    pub previous: Option<Arc<ControlApplication>>,
    /// The hint resized for the last latent size asked for, and what is computed from it alone.
    cache: Mutex<Option<PreparedHint>>,
    /// A control-LoRA's network and the UNet it was built for.
    control_lora: Mutex<Option<(Arc<UNet>, Arc<ControlNet>)>>,
    /// The VAE that encodes the hint for a network that takes latents (the apply node's `vae`).
    vae: Option<VaeModel>,
    /// Channels put after an encoded hint, each [B, 1, H, W] at any size (ComfyUI's
    /// `extra_concat`: AliMama's inpainting ControlNets take the kept area's mask).
    extra_concat: Vec<Image>,
}

/// An application's hint at one size ([B, C, H, W], ComfyUI's `cond_hint`) and what its
/// network computes from the hint alone, before strength and batching.
#[derive(Clone)]
struct PreparedHint {
    /// The pixel size the image was resized to.
    size: (usize, usize),
    hint: Tensor,
    features: HintFeatures,
}

/// What a network computes from the hint alone, once per hint size rather than on every step.
#[derive(Clone)]
enum HintFeatures {
    None,
    /// A T2I-Adapter's residuals (`control_input`).
    Adapter(ControlResiduals),
    /// A ControlNet's hint through its hint block ([`ControlNet::guided_hint`]; ComfyUI
    /// recomputes it on every call, with the same result).
    Guided(Tensor),
}

impl std::fmt::Debug for ControlApplication {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ControlApplication")
            .field("strength", &self.strength)
            .field("range", &self.range)
            .field("previous", &self.previous)
            .finish_non_exhaustive()
    }
}

/// One model call, as the control networks of an entry see it.
pub(crate) struct ControlCall<'a> {
    /// The network's input (the latent scaled for σ, without extra channels), [B, C, h, w].
    pub x: &'a Tensor,
    pub sigma: f32,
    pub timesteps: &'a Tensor,
    /// The entry's text for ControlNets ([`crate::conditioning::ControlnetText`], else its own).
    pub context: &'a Tensor,
    pub y: Option<&'a Tensor>,
    /// The guidance strength per item (FLUX dev).
    pub guidance: Option<&'a Tensor>,
    /// How many conditioning sides the batch holds (cond and uncond: 2).
    pub batched_number: usize,
    /// The model sampling (its schedule places the timestep range; a control-LoRA is built
    /// from its UNet).
    pub model: &'a DiffusionModel,
}

impl ControlApplication {
    pub fn new(
        model: ControlModel,
        image: Image,
        strength: f64,
        range: (f64, f64),
        previous: Option<Arc<ControlApplication>>,
    ) -> Self {
        ControlApplication {
            model,
            image,
            strength,
            range,
            previous,
            cache: Mutex::new(None),
            control_lora: Mutex::new(None),
            vae: None,
            extra_concat: Vec::new(),
        }
    }

    /// The application with channels to put after its encoded hint (`extra_concat`).
    pub fn with_extra_concat(self, extra_concat: Vec<Image>) -> Self {
        ControlApplication { extra_concat, ..self }
    }

    /// The application with the VAE a network that takes latents encodes its hint with (others
    /// ignore it, as ComfyUI's `set_cond_hint` does).
    pub fn with_vae(self, vae: Option<VaeModel>) -> Self {
        let takes_latent = self.model.loaded.network.takes_latent();
        ControlApplication {
            vae: vae.filter(|_| takes_latent),
            ..self
        }
    }

    /// The residuals of this application and those before it for one call (`get_control`);
    /// `None` when none of them applies at the call's σ.
    pub(crate) fn residuals(&self, call: &ControlCall) -> candle_core::Result<Option<ControlResiduals>> {
        let previous = match &self.previous {
            Some(previous) => previous.residuals(call)?,
            None => None,
        };
        let (start, end) = (
            call.model.schedule.percent_to_sigma(self.range.0),
            call.model.schedule.percent_to_sigma(self.range.1),
        );
        let sigma = f64::from(call.sigma);
        if sigma > start || sigma < end {
            return Ok(previous);
        }
        let residuals = match &self.model.loaded.network {
            ControlNetwork::ControlNet(network) => self.controlnet_residuals(network, call)?,
            ControlNetwork::ControlLora(lora) => {
                let network = self.control_lora_network(lora, call.model)?;
                self.controlnet_residuals(&network, call)?
            }
            ControlNetwork::Flux(network) => self.flux_residuals(network, call)?,
            ControlNetwork::Mmdit(network) => self.mmdit_residuals(network, call)?,
            ControlNetwork::T2IAdapter(adapter) => {
                let prepared = self.prepared(call.x, |hint| adapter.forward(hint).map(HintFeatures::Adapter))?;
                let HintFeatures::Adapter(features) = prepared.features else {
                    candle_core::bail!("a T2I-Adapter's features are missing");
                };
                let batch = call.x.dim(0)?;
                features
                    .map(|residual| broadcast_to_batch(residual, batch, call.batched_number))?
                    .scaled(self.strength)?
            }
        };
        Ok(Some(match previous {
            Some(previous) => residuals.merged_with(previous)?,
            None => residuals,
        }))
    }

    /// A ControlNet's residuals for one call, scaled by the strength.
    fn controlnet_residuals(&self, network: &ControlNet, call: &ControlCall) -> candle_core::Result<ControlResiduals> {
        let prepared = self.prepared(call.x, |hint| {
            network.guided_hint(hint, call.x.dtype()).map(HintFeatures::Guided)
        })?;
        let HintFeatures::Guided(guided) = prepared.features else {
            candle_core::bail!("a ControlNet's hint features are missing");
        };
        let guided = broadcast_to_batch(&guided, call.x.dim(0)?, call.batched_number)?;
        let outputs = network.forward(&ControlNetInput {
            x: call.x,
            hint: ControlHint::Guided(&guided),
            timesteps: call.timesteps,
            context: call.context,
            y: call.y,
            control_type: self.model.control_type,
        })?;
        let residuals = outputs.residuals(self.strength)?;
        if !self.model.loaded.global_average_pooling {
            return Ok(residuals);
        }
        residuals.map(|residual| {
            residual
                .mean_keepdim((2, 3))?
                .broadcast_as(residual.shape())?
                .contiguous()
        })
    }

    /// A FLUX ControlNet's residuals for one call, scaled by the strength.
    fn flux_residuals(&self, network: &FluxControlNet, call: &ControlCall) -> candle_core::Result<ControlResiduals> {
        let hint = self.batched_hint(call)?;
        let y = call
            .y
            .ok_or_else(|| candle_core::Error::Msg("a FLUX ControlNet needs the pooled text".into()))?;
        let input = FluxInput {
            x: call.x,
            timesteps: call.timesteps,
            context: call.context,
            y,
            guidance: call.guidance,
            concat: None,
            attention_mask: None,
            control: FluxControl::default(),
            image_prompt: None,
            patches: None,
            reference_latents: &[],
            reference_method: ReferenceMethod::default(),
        };
        network
            .forward(&input, &hint, self.model.control_type)?
            .scaled(self.strength)
    }

    /// An SD3 ControlNet's residuals for one call, scaled by the strength.
    fn mmdit_residuals(&self, network: &MmditControlNet, call: &ControlCall) -> candle_core::Result<ControlResiduals> {
        let DiffusionNetwork::Mmdit(model) = &call.model.network else {
            candle_core::bail!("an SD3 ControlNet controls an SD3 model");
        };
        let hint = self.batched_hint(call)?;
        let input = MmditControlInput {
            x: call.x,
            hint: &hint,
            timesteps: call.timesteps,
            context: call.context,
            y: call.y,
        };
        network.forward(&input, model)?.scaled(self.strength)
    }

    /// The hint for the call's latent, broadcast to its batch as ComfyUI's `broadcast_image_to`.
    fn batched_hint(&self, call: &ControlCall) -> candle_core::Result<Tensor> {
        let hint = self.prepared(call.x, |_| Ok(HintFeatures::None))?.hint;
        broadcast_to_batch(&hint, call.x.dim(0)?, call.batched_number)
    }

    /// A control-LoRA's network for the model sampling with it, built on its first call and
    /// kept while that model samples.
    fn control_lora_network(&self, lora: &ControlLora, model: &DiffusionModel) -> candle_core::Result<Arc<ControlNet>> {
        let unet = model.network.unet().ok_or_else(|| {
            candle_core::Error::Msg("a control-LoRA controls a UNet model (SD1.x, SD2.x, SDXL)".into())
        })?;
        let mut built = self
            .control_lora
            .lock()
            .map_err(|_| candle_core::Error::Msg("a control-LoRA was poisoned".into()))?;
        if let Some((for_unet, network)) = built.as_ref() {
            if Arc::ptr_eq(for_unet, unet) {
                return Ok(network.clone());
            }
        }
        let network = Arc::new(lora.network_for(unet.config(), &model.source, &model.device)?);
        *built = Some((unet.clone(), network.clone()));
        Ok(network)
    }

    /// The hint for the latent `x` (kept until a latent of another size comes): the image
    /// resized to the latent's size × the compression ratio (`common_upscale`, nearest-exact,
    /// centre crop) and preprocessed as an SD3.5 ControlNet's type asks, averaged to one channel
    /// for a network that takes one, or encoded by the VAE into model space for a network that
    /// takes latents; and what `compute` makes of it.
    fn prepared(
        &self,
        x: &Tensor,
        compute: impl FnOnce(&Tensor) -> candle_core::Result<HintFeatures>,
    ) -> candle_core::Result<PreparedHint> {
        let (_, _, height, width) = x.dims4()?;
        let network = &self.model.loaded.network;
        let vae = match (network.takes_latent(), &self.vae) {
            (true, Some(vae)) => Some(vae),
            (true, None) => return Err(candle_core::Error::Msg(NEEDS_VAE.into())),
            (false, _) => None,
        };
        let ratio = self.model.loaded.compression_ratio * vae.map_or(1, |vae| vae.network.downscale());
        let size = network.hint_size(height * ratio, width * ratio);
        let mut cached = self
            .cache
            .lock()
            .map_err(|_| candle_core::Error::Msg("a ControlNet hint was poisoned".into()))?;
        if let Some(prepared) = cached.as_ref().filter(|p| p.size == size) {
            return Ok(prepared.clone());
        }
        let mut resized = common_upscale(&self.image, size.1, size.0, ResizeMethod::NearestExact, true, true)
            .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
        if let ControlNetwork::Mmdit(network) = network {
            network.preprocessing().apply(&mut resized.data);
        }
        let mut hint = match vae {
            Some(vae) => {
                let latent = encode_image(&vae.network, &resized, x.device())
                    .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
                let latent = network.hint_latent_format().process_in(&latent)?;
                if network.concat_mask() {
                    self.with_concatenated(latent)?
                } else {
                    latent
                }
            }
            None => Tensor::from_vec(
                resized.data,
                (resized.batch, resized.height, resized.width, resized.channels),
                x.device(),
            )?
            .permute((0, 3, 1, 2))?
            .contiguous()?,
        };
        let one_channel = matches!(network, ControlNetwork::T2IAdapter(a) if a.config().hint_channels() == 1);
        if one_channel && hint.dim(1)? > 1 {
            hint = hint.mean_keepdim(1)?;
        }
        let features = compute(&hint)?;
        let prepared = PreparedHint { size, hint, features };
        *cached = Some(prepared.clone());
        Ok(prepared)
    }

    /// `hint` [B, C, h, w] followed by the extra channels, each resized to it (nearest-exact,
    /// centre crop) and repeated to its batch; a network that wants a mask and was given none
    /// gets ones (ComfyUI's default `extra_concat`).
    fn with_concatenated(&self, hint: Tensor) -> candle_core::Result<Tensor> {
        let (batch, _, height, width) = hint.dims4()?;
        let ones = [Image::new(1, 1, 1, 1, vec![1.0]).map_err(|error| candle_core::Error::Msg(error.to_string()))?];
        let extras = if self.extra_concat.is_empty() {
            &ones[..]
        } else {
            &self.extra_concat[..]
        };
        let mut parts = vec![hint.clone()];
        for extra in extras {
            let resized = common_upscale(extra, width, height, ResizeMethod::NearestExact, true, false)
                .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
            let channel = Tensor::from_vec(resized.data, (resized.batch, 1, height, width), hint.device())?;
            let repeats = batch.div_ceil(resized.batch);
            parts.push(channel.repeat((repeats, 1, 1, 1))?.narrow(0, 0, batch)?);
        }
        Tensor::cat(&parts, 1)
    }
}

/// ComfyUI's `broadcast_image_to`: a single hint serves every item; else each side of the
/// batch takes the hint's first items, repeated to fill it.
fn broadcast_to_batch(hint: &Tensor, batch: usize, batched_number: usize) -> candle_core::Result<Tensor> {
    let items = hint.dim(0)?;
    if items == 1 || items == batch {
        return Ok(hint.clone());
    }
    let per_side = batch / batched_number.max(1);
    let mut side = hint.narrow(0, 0, items.min(per_side))?;
    while side.dim(0)? < per_side {
        let more = (per_side - side.dim(0)?).min(side.dim(0)?);
        side = Tensor::cat(&[&side, &side.narrow(0, 0, more)?], 0)?;
    }
    if per_side == batch {
        return Ok(side);
    }
    Tensor::cat(&vec![&side; batched_number], 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loaders::models::load_checkpoint;
    use crate::loaders::t5_tokenizer_files::TokenizerSearch;
    use candle_core::Device;
    use easel_models::kernels::sgemm::Precision;
    use easel_models::testmodels::{
        controlnet_layout, sd1_checkpoint_layout, tiny_clip_l, tiny_sd1_controlnet, tiny_sd1_unet, tiny_sd_vae,
        write_checkpoint,
    };

    /// The tiny ControlNet's residuals for one call, loaded from a file named `file`.
    fn residuals(dir: &std::path::Path, file: &str) -> ControlResiduals {
        let checkpoint = dir.join("checkpoint.safetensors");
        let layout = sd1_checkpoint_layout(&tiny_sd1_unet(), &tiny_clip_l(), &tiny_sd_vae()).unwrap();
        write_checkpoint(&checkpoint, &layout).unwrap();
        let (model, _) =
            load_checkpoint(&checkpoint, &Device::Cpu, Precision::F32, TokenizerSearch::default()).unwrap();
        let path = dir.join(file);
        write_checkpoint(&path, &controlnet_layout(&tiny_sd1_controlnet()).unwrap()).unwrap();
        let (loaded, _) = nodes::load_controlnet(&path, None, &Device::Cpu).unwrap();
        let pattern =
            |count: usize, scale: f32| -> Vec<f32> { (0..count).map(|i| ((i as f32) * 0.37).sin() * scale).collect() };
        let image = Image::new(
            1,
            64,
            64,
            3,
            pattern(64 * 64 * 3, 0.5).iter().map(|v| v + 0.5).collect(),
        )
        .unwrap();
        let application = ControlApplication::new(ControlModel::new(Arc::new(loaded)), image, 0.8, (0.0, 1.0), None);
        let x = Tensor::from_vec(pattern(2 * 4 * 8 * 8, 1.0), (2, 4, 8, 8), &Device::Cpu).unwrap();
        let context = Tensor::from_vec(pattern(2 * 77 * 64, 1.0), (2, 77, 64), &Device::Cpu).unwrap();
        let call = ControlCall {
            x: &x,
            sigma: 1.0,
            timesteps: &Tensor::new(&[500f32, 500.0], &Device::Cpu).unwrap(),
            context: &context,
            y: None,
            guidance: None,
            batched_number: 2,
            model: &model.model.0,
        };
        application.residuals(&call).unwrap().expect("residuals at σ 1")
    }

    #[test]
    fn a_shuffle_controlnets_residuals_are_their_means_over_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let plain = residuals(dir.path(), "control_v11e_sd15_plain.safetensors");
        let shuffle = residuals(dir.path(), "control_v11e_sd15_shuffle.safetensors");
        let pairs = plain
            .output
            .iter()
            .chain([&plain.middle])
            .zip(shuffle.output.iter().chain([&shuffle.middle]));
        for (plain, shuffle) in pairs {
            let (plain, shuffle) = (plain.as_ref().unwrap(), shuffle.as_ref().unwrap());
            let means = plain.mean_keepdim((2, 3)).unwrap().broadcast_as(plain.shape()).unwrap();
            let difference = (shuffle - means).unwrap().abs().unwrap().max_all().unwrap();
            assert!(difference.to_scalar::<f32>().unwrap() < 1e-6);
            let spread = (plain.max_all().unwrap() - plain.min_all().unwrap()).unwrap();
            assert!(
                spread.to_scalar::<f32>().unwrap() > 1e-4,
                "the plain residuals vary over the image"
            );
        }
    }
}
