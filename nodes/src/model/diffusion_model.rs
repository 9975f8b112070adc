//! ComfyUI's `MODEL` value: a diffusion network (UNet, FLUX or SD3's MMDiT) with its prediction type, σ schedule
//! and latent format, and the extra inputs each family's network takes (SDXL's size embeddings,
//! inpainting models' mask and image channels, FLUX's guidance and fill channels), and the
//! patches nodes added to it ([`ModelPatches`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use easel_engine::NodeObject;
use easel_models::architectures::dit_patches::DitPatchedCall;
use easel_models::architectures::flux::{Flux, FluxConfig, FluxControl, FluxInput, ReferenceMethod};
use easel_models::architectures::mmdit::{Mmdit, MmditInput};
use easel_models::architectures::unet::{timestep_embedding, ControlResiduals, UNet, UNetInput};
use easel_models::architectures::unet_patches::{BatchPart, CallInfo, PatchedCall};
use easel_models::checkpoint::Family;
use easel_models::lora::Patch;
use easel_models::sampling::schedule::SigmaSchedule;
use easel_models::weights::WeightSource;

use crate::clip_vision::unclip::unclip_class_vector;
use crate::conditioning::gligen::{GligenBoxes, GligenPatch};
use crate::conditioning::{CondEntry, ConditioningError, FLUX_MASK_CHANNELS};
use crate::controlnet::{ControlApplication, ControlCall};
use crate::image::resample::{common_upscale, ResizeMethod};
use crate::latent::nodes::{image_as_latents, latents_as_image};
use crate::latent::{repeat_to_batch, LatentFormat};
use crate::model::patches::{CallPatches, ModelPatches};
use crate::model::wrappers::NetworkCall;

/// What the network predicts, and so what it is given and how its output becomes the denoised
/// latent (ComfyUI's model-sampling types, σ_data = 1 unless said otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (SD1.x, SD2.x base, SDXL).
    Epsilon,
    /// The velocity `α·ε − σ·x₀` (SD2.x 768-v, v-prediction SDXL fine-tunes).
    V,
    /// The clean latent itself.
    X0,
    /// The clean latent, from the noisy latent as it is (no input scaling).
    ImgToImg,
    /// A latent consistency model: the noise, turned into the denoised latent with LCM's
    /// boundary condition (σ_data 0.5, timestep scaling 10).
    Lcm,
    /// The velocity of a rectified flow from the latent to the noise (ComfyUI's `CONST`: SD3,
    /// FLUX), whose noisy latents are `σ·noise + (1 − σ)·latent`.
    Flow,
    /// EDM's preconditioned output with σ_data 0.5 (ModelSamplingContinuousEDM's `edm`).
    Edm,
}

/// EDM's σ_data.
const EDM_SIGMA_DATA: f64 = 0.5;

impl Prediction {
    /// ComfyUI's `calculate_input`: what the network is given for the noisy latent `x` at σ.
    pub fn network_input(self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        match self {
            Prediction::ImgToImg | Prediction::Flow => Ok(x.clone()),
            Prediction::Edm => x / (f64::from(sigma).powi(2) + EDM_SIGMA_DATA.powi(2)).sqrt(),
            _ => x / f64::from((sigma * sigma + 1.0).sqrt()),
        }
    }

    /// ComfyUI's `calculate_denoised`: the denoised latent from the network's output `out` for
    /// the noisy latent `x` at σ, whose timestep was `timestep`.
    pub fn denoised(self, x: &Tensor, out: &Tensor, sigma: f32, timestep: f32) -> candle_core::Result<Tensor> {
        match self {
            Prediction::Epsilon | Prediction::Flow => x - (out * f64::from(sigma))?,
            Prediction::V => {
                let variance = sigma * sigma + 1.0;
                (x / f64::from(variance))? - (out * f64::from(sigma))? / f64::from(variance.sqrt())
            }
            Prediction::X0 | Prediction::ImgToImg => Ok(out.clone()),
            Prediction::Edm => {
                let (sigma, data) = (f64::from(sigma), EDM_SIGMA_DATA);
                let variance = sigma * sigma + data * data;
                (x * (data * data / variance))? + (out * (sigma * data / variance.sqrt()))?
            }
            Prediction::Lcm => {
                const SIGMA_DATA_SQUARED: f32 = 0.25;
                let x0 = (x - (out * f64::from(sigma))?)?;
                let scaled = timestep * 10.0;
                let skip = SIGMA_DATA_SQUARED / (scaled * scaled + SIGMA_DATA_SQUARED);
                let output = scaled / (scaled * scaled + SIGMA_DATA_SQUARED).sqrt();
                (x0 * f64::from(output))? + (x * f64::from(skip))?
            }
        }
    }

    /// ComfyUI's `noise_scaling`: the latent noised to σ, `latent + σ·noise` (at the largest σ
    /// of the schedule, `√(1 + σ²)·noise`), or `σ·noise + (1 − σ)·latent` for flows.
    pub fn noise_scaling(
        self,
        sigma: f32,
        noise: &Tensor,
        latent: &Tensor,
        max_denoise: bool,
    ) -> candle_core::Result<Tensor> {
        match self {
            Prediction::Flow => (noise * f64::from(sigma))? + (latent * f64::from(1.0 - sigma))?,
            _ if max_denoise => (noise * f64::from((1.0 + sigma * sigma).sqrt()))? + latent,
            _ => (noise * f64::from(sigma))? + latent,
        }
    }

    /// ComfyUI's `inverse_noise_scaling` of the sampled latent at the last σ: a flow's latent
    /// is divided by 1 − σ, others are kept.
    pub fn inverse_noise_scaling(self, sigma: f32, x: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Prediction::Flow => x / f64::from(1.0 - sigma),
            _ => Ok(x),
        }
    }
}

/// The network of a diffusion model.
#[derive(Clone)]
pub enum DiffusionNetwork {
    UNet(Arc<UNet>),
    Flux(Arc<Flux>),
    Mmdit(Arc<Mmdit>),
}

impl DiffusionNetwork {
    /// The width of the text embeddings the network attends to.
    pub fn context_dim(&self) -> usize {
        match self {
            DiffusionNetwork::UNet(unet) => unet.config().context_dim,
            DiffusionNetwork::Flux(flux) => flux.config().context_dim,
            DiffusionNetwork::Mmdit(mmdit) => mmdit.config().context_dim.unwrap_or(mmdit.config().hidden_size()),
        }
    }

    /// Latent channels the network predicts.
    pub fn latent_channels(&self) -> usize {
        match self {
            DiffusionNetwork::UNet(unet) => unet.config().out_channels,
            DiffusionNetwork::Flux(flux) => flux.config().out_channels,
            DiffusionNetwork::Mmdit(mmdit) => mmdit.config().out_channels,
        }
    }

    /// Channels the network takes beyond the latent's (inpainting models).
    pub fn extra_channels(&self) -> usize {
        match self {
            DiffusionNetwork::UNet(unet) => unet.config().in_channels.saturating_sub(unet.config().out_channels),
            DiffusionNetwork::Flux(flux) => (flux.config().in_channels / 4).saturating_sub(flux.config().out_channels),
            DiffusionNetwork::Mmdit(mmdit) => mmdit.config().in_channels.saturating_sub(mmdit.config().out_channels),
        }
    }

    /// Bytes of activations one call on a [batch, C, height, width] latent needs at most.
    pub fn working_memory(&self, batch: usize, height: usize, width: usize) -> u64 {
        match self {
            DiffusionNetwork::UNet(unet) => unet.working_memory(batch, height, width),
            DiffusionNetwork::Flux(flux) => flux.working_memory(batch, height, width),
            DiffusionNetwork::Mmdit(mmdit) => mmdit.working_memory(batch, height, width),
        }
    }

    /// The UNet, for the UNet families.
    pub fn unet(&self) -> Option<&Arc<UNet>> {
        match self {
            DiffusionNetwork::UNet(unet) => Some(unet),
            DiffusionNetwork::Flux(_) | DiffusionNetwork::Mmdit(_) => None,
        }
    }
}

/// A diffusion network with its noise schedule (ComfyUI's `BaseModel` with `model_sampling`);
/// clones share the network.
#[derive(Clone)]
pub struct DiffusionModel {
    /// The family, which decides the class conditioning (SDXL's size vector) among others.
    pub family: Family,
    pub network: DiffusionNetwork,
    /// What the network was built from (LoRA nodes build it again with their patches).
    pub source: WeightSource,
    pub prediction: Prediction,
    pub schedule: SigmaSchedule,
    pub latent_format: LatentFormat,
    pub device: Device,
    /// The strength DifferentialDiffusion set: the inpainting mask is then thresholded anew at
    /// every step (see [`DifferentialDiffusion`]).
    pub differential_diffusion: Option<f64>,
    /// The σ range (min, max) its file states for v-prediction on EDM's continuous schedule
    /// (CosXL; ComfyUI's `V_PREDICTION_EDM` model type). An InstructPix2Pix UNet of such a file
    /// (CosXL Edit) takes its image's latent in model space rather than raw
    /// (`process_ip2p_image_in`).
    pub edm_v_prediction: Option<(f64, f64)>,
    /// An IC-Light UNet (LoadAndApplyICLightUnet): its extra input channels take the entry's
    /// concatenated latents as they are (the foreground's, and the background's for "fbc").
    pub ic_light: bool,
    pub patches: ModelPatches,
}

impl DiffusionModel {
    /// Whether this is an SD2.1 unCLIP model: an SD2.x UNet with class conditioning (image
    /// embeddings and their noise level).
    pub fn is_unclip(&self) -> bool {
        self.family == Family::Sd2
            && matches!(&self.network, DiffusionNetwork::UNet(unet) if unet.config().adm_in_channels.is_some())
    }

    /// The model built again with `more` weight patches after its own (LoRA, merges, scaled
    /// layers); the base weights stay in their file's map, only patched tensors are copies.
    pub fn with_weight_patches(&self, more: HashMap<String, Vec<Patch>>) -> candle_core::Result<DiffusionModel> {
        if more.is_empty() {
            return Ok(self.clone());
        }
        let source = self.source.patched(more);
        let network = match &self.network {
            DiffusionNetwork::UNet(unet) => {
                DiffusionNetwork::UNet(Arc::new(UNet::new(unet.config().clone(), source.weights())?))
            }
            DiffusionNetwork::Flux(flux) => {
                // A control LoRA widens the input layer: the model takes more channels.
                let input_layer = format!("{}img_in.weight", source.name_prefix());
                let in_channels = match source.patches.padded_shape(&input_layer) {
                    Some(&[_, width]) => width,
                    _ => flux.config().in_channels,
                };
                let config = FluxConfig {
                    in_channels,
                    ..flux.config().clone()
                };
                DiffusionNetwork::Flux(Arc::new(Flux::new(config, source.weights())?))
            }
            DiffusionNetwork::Mmdit(mmdit) => {
                DiffusionNetwork::Mmdit(Arc::new(Mmdit::new(mmdit.config().clone(), source.weights())?))
            }
        };
        Ok(DiffusionModel {
            network,
            source,
            ..self.clone()
        })
    }

    /// D(x, σ) for one conditioning: scale the input, run the network at σ's timestep with the
    /// model's patches (and `call.extra`), turn the prediction into the denoised latent.
    pub(crate) fn denoise(
        &self,
        x: &Tensor,
        sigma: f32,
        inputs: &ModelInputs,
        call: &ModelCall,
    ) -> candle_core::Result<Tensor> {
        let batch = x.dim(0)?;
        let scaled = self.prediction.network_input(x, sigma)?;
        let concat = inputs.concat.as_ref().map(|c| repeat_to_batch(c, batch)).transpose()?;
        let timestep = self.schedule.timestep(sigma);
        let timesteps = Tensor::from_vec(vec![timestep; batch], batch, &self.device)?;
        let context = repeat_to_batch(&inputs.context, batch)?;
        let y = inputs.y.as_ref().map(|y| repeat_to_batch(y, batch)).transpose()?;
        let guidance = inputs
            .guidance
            .as_ref()
            .map(|guidance| repeat_to_batch(guidance, batch))
            .transpose()?;
        let references = inputs
            .reference_latents
            .iter()
            .map(|latent| repeat_to_batch(latent, batch))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The residuals of the entry's control networks for the (scaled) input.
        let control_residuals = |scaled: &Tensor| -> candle_core::Result<Option<ControlResiduals>> {
            let Some(control) = &inputs.control else {
                return Ok(None);
            };
            let control_context = match &inputs.control_context {
                Some(text) => repeat_to_batch(text, batch)?,
                None => context.clone(),
            };
            control.residuals(&ControlCall {
                x: scaled,
                sigma,
                timesteps: &timesteps,
                context: &control_context,
                y: y.as_ref(),
                guidance: guidance.as_ref(),
                batched_number: call.parts.len(),
                model: self,
            })
        };
        // The network on its (scaled) input, which the network wrappers go around.
        let network = |scaled: &Tensor| -> candle_core::Result<Tensor> {
            Ok(match &self.network {
                DiffusionNetwork::UNet(unet) => {
                    let input = match &concat {
                        Some(concat) => Tensor::cat(&[scaled, concat], 1)?,
                        None => scaled.clone(),
                    };
                    let (_, channels, height, width) = input.dims4()?;
                    let control = control_residuals(scaled)?;
                    let patches = match call.extra {
                        Some(extra) => Cow::Owned(self.patches.unet.and(&extra.unet)),
                        None => Cow::Borrowed(&self.patches.unet),
                    };
                    let patches = match &inputs.gligen {
                        Some(gligen) => {
                            let mut with_boxes = patches.into_owned();
                            with_boxes.add(Arc::new(GligenPatch::new(gligen, batch, height, width)?));
                            Cow::Owned(with_boxes)
                        }
                        None => patches,
                    };
                    let info = CallInfo {
                        original_shape: [batch, channels, height, width],
                        sigma,
                        parts: call.parts.to_vec(),
                    };
                    unet.forward(&UNetInput {
                        y: y.as_ref(),
                        control: control.as_ref(),
                        patches: (!patches.is_empty()).then_some(PatchedCall {
                            patches: patches.as_ref(),
                            info: &info,
                        }),
                        ..UNetInput::new(&input, &timesteps, &context)
                    })?
                }
                DiffusionNetwork::Flux(flux) => {
                    let Some(y) = &y else {
                        return Err(candle_core::Error::Msg(
                            "a FLUX model call needs the pooled output".into(),
                        ));
                    };
                    let control = control_residuals(scaled)?.unwrap_or_default();
                    let patches = match call.extra {
                        Some(extra) => Cow::Owned(self.patches.dit.and(&extra.dit)),
                        None => Cow::Borrowed(&self.patches.dit),
                    };
                    let (_, latent_channels, height, width) = scaled.dims4()?;
                    let extra_channels = concat.as_ref().map_or(Ok(0), |concat| concat.dim(1))?;
                    let info = CallInfo {
                        original_shape: [batch, latent_channels + extra_channels, height, width],
                        sigma,
                        parts: call.parts.to_vec(),
                    };
                    flux.forward(&FluxInput {
                        x: scaled,
                        timesteps: &timesteps,
                        context: &context,
                        y,
                        guidance: guidance.as_ref(),
                        concat: concat.as_ref(),
                        attention_mask: inputs.attention_mask.as_ref(),
                        control: FluxControl {
                            double: &control.input,
                            single: &control.output,
                        },
                        image_prompt: None,
                        patches: (!patches.is_empty()).then_some(DitPatchedCall {
                            patches: patches.as_ref(),
                            info: &info,
                        }),
                        reference_latents: &references,
                        reference_method: inputs.reference_method,
                    })?
                }
                DiffusionNetwork::Mmdit(mmdit) => {
                    let control = control_residuals(scaled)?.unwrap_or_default();
                    let patches = match call.extra {
                        Some(extra) => Cow::Owned(self.patches.dit.and(&extra.dit)),
                        None => Cow::Borrowed(&self.patches.dit),
                    };
                    let (_, channels, height, width) = scaled.dims4()?;
                    let info = CallInfo {
                        original_shape: [batch, channels, height, width],
                        sigma,
                        parts: call.parts.to_vec(),
                    };
                    mmdit.forward(&MmditInput {
                        x: scaled,
                        timesteps: &timesteps,
                        context: &context,
                        y: y.as_ref(),
                        control: &control.output,
                        patches: (!patches.is_empty()).then_some(DitPatchedCall {
                            patches: patches.as_ref(),
                            info: &info,
                        }),
                    })?
                }
            })
        };
        let network_call = NetworkCall {
            input: &scaled,
            sigma,
            timestep,
            parts: call.parts,
        };
        let out = self.patches.call_network(&network_call, &network)?;
        self.prediction.denoised(x, &out, sigma, timestep)
    }

    /// The extra input channels of an inpainting model for an entry, [B, 5, H, W] (ComfyUI's
    /// `concat_cond` with keys mask and masked image): the entry's mask (else the sampling's
    /// denoise mask) resized to the latent and rounded, and its image latent (else the latent
    /// being sampled) in model space; without any mask, ones and a blank image. `None` for models
    /// without extra channels.
    pub(crate) fn inpaint_channels(
        &self,
        entry: &CondEntry,
        latent: &LatentInputs,
    ) -> Result<Option<Tensor>, ConditioningError> {
        let extra = self.network.extra_channels();
        if extra == 0 {
            return Ok(None);
        }
        if let DiffusionNetwork::Flux(_) = self.network {
            return self.flux_concat(extra, entry, latent).map(Some);
        }
        let (batch, _, height, width) = latent.model_space.dims4()?;
        if self.ic_light {
            return self.ic_light_channels(extra, entry, latent).map(Some);
        }
        if extra == INSTRUCT_PIX2PIX_CHANNELS {
            // `IP2P.concat_cond`: the raw latent (as ComfyUI's SD1.x and diffusers-SDXL
            // InstructPix2Pix models take it; in model space for CosXL Edit), else zeros.
            let image = match &entry.concat_image {
                Some(concat) => {
                    let image = concat.latent.to_device(&self.device)?.to_dtype(DType::F32)?;
                    if self.edm_v_prediction.is_some() {
                        self.latent_format.process_in(&image)?
                    } else {
                        image
                    }
                }
                None => latent.model_space.zeros_like()?,
            };
            return Ok(Some(resize_to_batch(&resize_centered(&image, height, width)?, batch)?));
        }
        if extra != 5 {
            return Err(ConditioningError::ExtraChannels(extra));
        }
        let concat_mask = match &entry.concat_image {
            Some(concat) => concat.mask_channel(&self.device)?,
            None => None,
        };
        let mask = match (concat_mask, latent.denoise_mask) {
            (Some(mask), _) => Some(mask),
            (None, Some(denoise_mask)) => Some(denoise_mask.narrow(1, 0, 1)?),
            (None, None) => None,
        };
        let Some(mask) = mask else {
            let blank = Tensor::new(&BLANK_INPAINT_IMAGE, &self.device)?.reshape((1, 4, 1, 1))?;
            let blank = blank.broadcast_as((batch, 4, height, width))?.contiguous()?;
            let ones = Tensor::ones((batch, 1, height, width), DType::F32, &self.device)?;
            return Ok(Some(Tensor::cat(&[&ones, &blank], 1)?));
        };
        let mask = resize_to_batch(&resize_centered(&mask, height, width)?.round()?, batch)?;
        let image = match &entry.concat_image {
            Some(concat) => self
                .latent_format
                .process_in(&concat.latent.to_device(&self.device)?.to_dtype(DType::F32)?)?,
            None => latent.model_space.clone(),
        };
        let image = resize_to_batch(&resize_centered(&image, height, width)?, batch)?;
        Ok(Some(Tensor::cat(&[&mask, &image], 1)?))
    }

    /// The attention bias an entry gives FLUX (ComfyUI's `Flux.extra_conds`): its mask
    /// ([`CondEntry::attention_mask`]) spread over the image tokens of a latent of
    /// `latent_size`, once per sampling run; `None` for other models, which do not read it, or
    /// without a mask.
    pub(crate) fn attention_bias(
        &self,
        entry: &CondEntry,
        latent_size: (usize, usize),
    ) -> candle_core::Result<Option<Tensor>> {
        let (DiffusionNetwork::Flux(_), Some(mask)) = (&self.network, &entry.attention_mask) else {
            return Ok(None);
        };
        let mask = mask.to_device(&self.device)?.to_dtype(DType::F32)?;
        let image_tokens = latent_size.0.div_ceil(2) * latent_size.1.div_ceil(2);
        image_token_spread(&mask, image_tokens).map(Some)
    }

    /// An entry's reference latents in model space, for a FLUX model (ComfyUI's
    /// `process_latent_in` of each); other models take none.
    pub(crate) fn reference_latents(&self, entry: &CondEntry) -> candle_core::Result<Vec<Tensor>> {
        if !matches!(self.network, DiffusionNetwork::Flux(_)) {
            return Ok(Vec::new());
        }
        entry
            .reference_latents
            .iter()
            .map(|latent| {
                self.latent_format
                    .process_in(&latent.to_device(&self.device)?.to_dtype(DType::F32)?)
            })
            .collect()
    }

    /// The extra input channels of an IC-Light UNet for an entry (the pack's `ICLight.extra_conds`):
    /// the entry's concatenated latents, resized to the latent and matched to its batch; they
    /// must fill the model's extra channels.
    fn ic_light_channels(
        &self,
        extra: usize,
        entry: &CondEntry,
        latent: &LatentInputs,
    ) -> Result<Tensor, ConditioningError> {
        let (batch, _, height, width) = latent.model_space.dims4()?;
        let Some(concat) = &entry.concat_image else {
            return Err(ConditioningError::IcLight(
                "'NoneType' object has no attribute 'shape' (an IC-Light model needs ICLightConditioning)".into(),
            ));
        };
        let image = concat.latent.to_device(&self.device)?.to_dtype(DType::F32)?;
        let channels = image.dim(1)?;
        if channels != extra {
            let (input, model) = (channels + 4, extra + 4);
            return Err(ConditioningError::IcLight(format!(
                "Input channels {input} does not match model in_channels {model}, 'opt_background' latent input should be used with the IC-Light 'fbc' model, and only with it"
            )));
        }
        Ok(resize_to_batch(&resize_centered(&image, height, width)?, batch)?)
    }

    /// The extra input channels of a FLUX model for an entry (ComfyUI's `Flux.concat_cond`):
    /// the entry's image latent (else zeros) in model space; for fill models (`extra` = latent
    /// channels + 64) also the mask (the entry's, else the channel mean of the sampling's denoise
    /// mask, else ones) at pixel size, each 8×8 block of pixels made 64 channels.
    fn flux_concat(&self, extra: usize, entry: &CondEntry, latent: &LatentInputs) -> Result<Tensor, ConditioningError> {
        let (batch, channels, height, width) = latent.model_space.dims4()?;
        let image = match &entry.concat_image {
            Some(concat) => concat.latent.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => latent.model_space.zeros_like()?,
        };
        let image = resize_to_batch(&resize_centered(&image, height, width)?, batch)?;
        let image = self.latent_format.process_in(&image)?;
        if extra <= channels {
            return Ok(image);
        }
        if extra != channels + FLUX_MASK_CHANNELS {
            return Err(ConditioningError::ExtraChannels(extra));
        }
        let concat_mask = match &entry.concat_image {
            Some(concat) => concat.mask_channel(&self.device)?,
            None => None,
        };
        let mask = match (concat_mask, latent.denoise_mask) {
            (Some(mask), _) => mask,
            (None, Some(denoise_mask)) => denoise_mask.mean_keepdim(1)?,
            (None, None) => Tensor::ones((batch, 1, height, width), DType::F32, &self.device)?,
        };
        let mask = resize_centered(&mask, height * 8, width * 8)?;
        let mask_batch = mask.dim(0)?;
        let mask = mask
            .reshape((mask_batch, height, 8, width, 8))?
            .permute((0, 2, 4, 1, 3))?
            .reshape((mask_batch, FLUX_MASK_CHANNELS, height, width))?;
        let mask = resize_to_batch(&mask, batch)?;
        Ok(Tensor::cat(&[&image, &mask], 1)?)
    }

    /// An entry's pooled vector for a DiT that embeds it as it is: at least `width` wide, or
    /// (`exact`) just that wide.
    fn pooled_vector(&self, entry: &CondEntry, width: usize, exact: bool) -> Result<Tensor, ConditioningError> {
        let pooled = entry.pooled.as_ref().ok_or(ConditioningError::NoPooledOutput)?;
        let found = pooled.dim(D::Minus1)?;
        if found < width || (exact && found != width) {
            return Err(ConditioningError::PooledWidth {
                family: self.family.name(),
                found,
                expected: width,
            });
        }
        Ok(pooled.to_device(&self.device)?.to_dtype(DType::F32)?)
    }

    /// The class-conditioning vector `y` of an entry, [1, adm] (ComfyUI's `encode_adm`): for SDXL
    /// the pooled text vector (or the entry's unCLIP images, "revision") and the embedded sizes,
    /// for the refiner the sizes and the aesthetic score (6 on the positive side, 2.5 on the
    /// negative one by default), for an SD2.1 unCLIP UNet the entry's unCLIP images (zeros
    /// without), for FLUX and SD3 the pooled vector itself; `None` for models without class
    /// conditioning. `latent_size` is the latent's (height, width); `seed` the sampling run's,
    /// which unCLIP's noise augmentation draws from.
    pub fn class_conditioning(
        &self,
        entry: &CondEntry,
        negative: bool,
        latent_size: (usize, usize),
        seed: u64,
    ) -> Result<Option<Tensor>, ConditioningError> {
        let unet = match &self.network {
            DiffusionNetwork::UNet(unet) => unet,
            // FLUX reads the first `vector_dim` values of a wider vector; the MMDiT's embedder
            // takes exactly its width.
            DiffusionNetwork::Flux(flux) => {
                return self.pooled_vector(entry, flux.config().vector_dim, false).map(Some);
            }
            DiffusionNetwork::Mmdit(mmdit) => {
                return match mmdit.config().adm_in_channels {
                    Some(width) => self.pooled_vector(entry, width, true).map(Some),
                    None => Ok(None),
                };
            }
        };
        let Some(adm_width) = unet.config().adm_in_channels else {
            return Ok(None);
        };
        if self.is_unclip() {
            return Ok(Some(match entry.unclip.as_slice() {
                [] => Tensor::zeros((1, adm_width), DType::F32, &self.device)?,
                images => unclip_class_vector(images, seed, &self.device)?,
            }));
        }
        let sizes = &entry.sdxl;
        let height = sizes.height.unwrap_or((latent_size.0 * 8) as f64);
        let width = sizes.width.unwrap_or((latent_size.1 * 8) as f64);
        let (crop_w, crop_h) = (sizes.crop_w.unwrap_or(0.0), sizes.crop_h.unwrap_or(0.0));
        let values = match self.family {
            Family::SdxlRefiner => {
                let aesthetic = sizes.aesthetic_score.unwrap_or(if negative { 2.5 } else { 6.0 });
                vec![height, width, crop_h, crop_w, aesthetic]
            }
            _ => vec![
                height,
                width,
                crop_h,
                crop_w,
                sizes.target_height.unwrap_or(height),
                sizes.target_width.unwrap_or(width),
            ],
        };
        let expected = adm_width.saturating_sub(values.len() * SIZE_EMBEDDING_WIDTH);
        let revision;
        let pooled = match (self.family, entry.unclip.as_slice()) {
            (Family::Sdxl, images) if !images.is_empty() => {
                let vector = unclip_class_vector(images, seed, &self.device)?;
                revision = vector.narrow(1, 0, expected.min(vector.dim(1)?))?;
                &revision
            }
            _ => entry.pooled.as_ref().ok_or(ConditioningError::NoPooledOutput)?,
        };
        let pooled_width = pooled.dim(D::Minus1)?;
        if pooled_width != expected {
            return Err(ConditioningError::PooledWidth {
                family: self.family.name(),
                found: pooled_width,
                expected,
            });
        }
        let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        let count = values.len();
        let sizes = Tensor::from_vec(values, count, &self.device)?;
        let embedded = timestep_embedding(&sizes, SIZE_EMBEDDING_WIDTH)?.reshape((1, count * SIZE_EMBEDDING_WIDTH))?;
        let pooled = pooled
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .reshape((1, pooled_width))?;
        Ok(Some(Tensor::cat(&[&pooled, &embedded], 1)?))
    }
}

/// ComfyUI's `blank_inpaint_image_like` for SD latents: "zero" pixels in latent space.
const BLANK_INPAINT_IMAGE: [f32; 4] = [0.8223, -0.6876, 0.6364, 0.1380];

/// The extra input channels of an InstructPix2Pix UNet: the image's latent.
const INSTRUCT_PIX2PIX_CHANNELS: usize = 4;

/// `t` [B, C, h, w] resized to `height × width` as `common_upscale(…, "bilinear", "center")`
/// does (cropped to the aspect ratio first); unchanged when it has that size.
fn resize_centered(t: &Tensor, height: usize, width: usize) -> Result<Tensor, ConditioningError> {
    let (_, _, h, w) = t.dims4()?;
    if (h, w) == (height, width) {
        return Ok(t.clone());
    }
    let image = latents_as_image(t).map_err(|e| ConditioningError::Inpaint(e.to_string()))?;
    let resized = common_upscale(&image, width, height, ResizeMethod::Bilinear, true, false)
        .map_err(|e| ConditioningError::Inpaint(e.to_string()))?;
    image_as_latents(resized, t.device()).map_err(|e| ConditioningError::Inpaint(e.to_string()))
}

/// ComfyUI's `resize_to_batch_size`: items picked evenly to make `batch` of them.
fn resize_to_batch(t: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    let items = t.dim(0)?;
    if items == batch {
        return Ok(t.clone());
    }
    let indices: Vec<u32> = if batch <= 1 {
        (0..batch.min(items) as u32).collect()
    } else if batch < items {
        let scale = (items - 1) as f64 / (batch - 1) as f64;
        (0..batch)
            .map(|i| ((i as f64 * scale).round_ties_even() as usize).min(items - 1) as u32)
            .collect()
    } else {
        let scale = items as f64 / batch as f64;
        (0..batch)
            .map(|i| (((i as f64 + 0.5) * scale).floor() as usize).min(items - 1) as u32)
            .collect()
    };
    let indices = Tensor::new(indices.as_slice(), t.device())?;
    t.index_select(&indices, 0)
}

/// What one model call takes besides the latent: the text conditioning, the class
/// conditioning (SDXL, FLUX), an inpainting model's extra channels and FLUX's guidance
/// strength ([1]).
#[derive(Clone)]
pub(crate) struct ModelInputs {
    pub(crate) context: Tensor,
    pub(crate) y: Option<Tensor>,
    pub(crate) concat: Option<Tensor>,
    pub(crate) guidance: Option<Tensor>,
    /// The control networks applied to the entry, and the text they see when it is not
    /// `context` (CLIPTextEncodeControlnet's).
    pub(crate) control: Option<Arc<ControlApplication>>,
    pub(crate) control_context: Option<Tensor>,
    /// The entry's attention bias over its text tokens and the latent's image tokens [L, L]
    /// (FLUX's; see [`DiffusionModel::attention_bias`]).
    pub(crate) attention_mask: Option<Tensor>,
    /// The entry's GLIGEN boxes; read by the UNet.
    pub(crate) gligen: Option<GligenBoxes>,
    /// The entry's reference latents in model space (FLUX Kontext's), and their placement.
    pub(crate) reference_latents: Vec<Tensor>,
    pub(crate) reference_method: ReferenceMethod,
}

/// A mask over text tokens and one image token, [T + 1, T + 1], spread over `image_tokens`
/// image tokens: ComfyUI's `upscale_dit_mask` from the 1×1 image grid StyleModelApply gives.
fn image_token_spread(mask: &Tensor, image_tokens: usize) -> candle_core::Result<Tensor> {
    let text_tokens = mask.dim(0)? - 1;
    let indices: Vec<u32> = (0..text_tokens as u32)
        .chain(std::iter::repeat_n(text_tokens as u32, image_tokens))
        .collect();
    let indices = Tensor::from_vec(indices, text_tokens + image_tokens, mask.device())?;
    mask.index_select(&indices, 0)?.index_select(&indices, 1)
}

/// What a model call is for: the batch's chunks (one per conditioning side it holds), and network
/// patches for this call only (PerturbedAttentionGuidance's perturbed attention,
/// SkipLayerGuidance's skipped blocks).
pub(crate) struct ModelCall<'a> {
    pub(crate) parts: &'a [BatchPart],
    pub(crate) extra: Option<&'a CallPatches>,
}

/// The latent being sampled, as the conditioning needs it: in model space, and the denoise
/// mask when sampling is masked; and the run's seed.
pub(crate) struct LatentInputs<'a> {
    pub(crate) model_space: &'a Tensor,
    pub(crate) denoise_mask: Option<&'a Tensor>,
    /// The run's seed, which unCLIP's noise augmentation draws from.
    pub(crate) seed: u64,
}

/// Width of each embedded size in SDXL's class-conditioning vector.
const SIZE_EMBEDDING_WIDTH: usize = 256;

/// The MODEL socket.
#[derive(Clone)]
pub struct Model(pub Arc<DiffusionModel>);

impl fmt::Debug for Model {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<ModelPatcher>")
    }
}

impl NodeObject for Model {
    fn type_name(&self) -> &'static str {
        "MODEL"
    }
}
