//! ControlNet (`comfy/controlnet.py`): a CONTROL_NET value ([`ControlModel`]) and what applying
//! one to conditioning entries leaves on them ([`ControlApplication`]): at each model call the
//! application's network sees the latent, the hint image resized to it, the timestep and the
//! entry's text, and gives residuals, scaled by its strength and added to those of the
//! applications before it, that the UNet adds to its skip connections and middle block.
//!
//! - [`nodes`]: ControlNetLoader, ControlNetApplyAdvanced and ControlNetApply.

pub mod nodes;

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use easel_engine::{NodeObject, NodeRegistry};
use easel_models::architectures::controlnet::{ControlNet, ControlNetInput};
use easel_models::architectures::unet::ControlResiduals;
use easel_models::sampling::schedule::SigmaSchedule;

use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::Image;

/// Adds the ControlNet nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ControlNetLoader);
    registry.register(nodes::ControlNetApplyAdvanced);
    registry.register(nodes::ControlNetApply);
}

/// The CONTROL_NET socket: a loaded control network (clones share it).
#[derive(Clone)]
pub struct ControlModel(pub Arc<LoadedControlNet>);

/// A control network as its loader made it.
pub struct LoadedControlNet {
    pub network: ControlNet,
    /// Pixels per latent pixel of the hint image (8).
    pub compression_ratio: usize,
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
    /// The hint resized for the last latent size asked for ([B, C, H, W], `cond_hint`).
    hint: Mutex<Option<Tensor>>,
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
    /// How many conditioning sides the batch holds (cond and uncond: 2).
    pub batched_number: usize,
    pub schedule: &'a SigmaSchedule,
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
            hint: Mutex::new(None),
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
            call.schedule.percent_to_sigma(self.range.0),
            call.schedule.percent_to_sigma(self.range.1),
        );
        let sigma = f64::from(call.sigma);
        if sigma > start || sigma < end {
            return Ok(previous);
        }
        let hint = self.hint_for(call.x, call.batched_number)?;
        let outputs = self.model.0.network.forward(&ControlNetInput {
            x: call.x,
            hint: &hint,
            timesteps: call.timesteps,
            context: call.context,
            y: call.y,
        })?;
        let residuals = outputs.residuals(self.strength)?;
        Ok(Some(match previous {
            Some(previous) => residuals.merged_with(previous)?,
            None => residuals,
        }))
    }

    /// The hint resized to the latent's size × the compression ratio (`common_upscale`, nearest-
    /// exact, centre crop), then matched to its batch (`broadcast_image_to`).
    fn hint_for(&self, x: &Tensor, batched_number: usize) -> candle_core::Result<Tensor> {
        let (batch, _, height, width) = x.dims4()?;
        let ratio = self.model.0.compression_ratio;
        let (height, width) = (height * ratio, width * ratio);
        let mut cached = self
            .hint
            .lock()
            .map_err(|_| candle_core::Error::Msg("a ControlNet hint was poisoned".into()))?;
        let hint = match cached.as_ref() {
            Some(hint) if hint.dims()[2..] == [height, width] => hint.clone(),
            _ => {
                let hint = resized_hint(&self.image, height, width, x.device())?;
                *cached = Some(hint.clone());
                hint
            }
        };
        broadcast_to_batch(&hint, batch, batched_number)
    }
}

/// The image [B, H, W, C] resized to `height × width` as [B, C, H, W] on `device`.
fn resized_hint(image: &Image, height: usize, width: usize, device: &Device) -> candle_core::Result<Tensor> {
    let resized = common_upscale(image, width, height, ResizeMethod::NearestExact, true, true)
        .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
    Tensor::from_vec(
        resized.data,
        (resized.batch, resized.height, resized.width, resized.channels),
        device,
    )?
    .permute((0, 3, 1, 2))?
    .contiguous()
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
