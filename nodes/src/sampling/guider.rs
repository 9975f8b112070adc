//! Classifier-free guidance as ComfyUI's `CFGGuider` computes it: the conditioning entries active at
//! each σ (timestep ranges, areas, masks and strengths), batched through the model per side, the
//! positive and negative predictions combined by the CFG scale (DualCFGGuider's two scales too),
//! with the model's guidance patches around the combination (`sampling_function`,
//! `cfg_function`).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use easel_models::architectures::unet_patches::BatchPart;
use easel_models::sampling::samplers::Denoiser;

use crate::conditioning::regions::{same_area_source, LatentArea, ResolvedRegion};
use crate::conditioning::{CondEntry, Conditioning, ConditioningError};
use crate::hooks::patching::HookedModels;
use crate::hooks::HookGroup;
use crate::latent::repeat_to_batch;
use crate::model::diffusion_model::{DiffusionModel, DiffusionNetwork, LatentInputs, ModelCall, ModelInputs};
use crate::model::patches::{CallPatches, GuidanceArgs, GuidanceModel, Side};
use crate::sampling::perp_neg::PerpNegSide;

/// Classifier-free guidance over conditioning lists (ComfyUI's `CFGGuider` with
/// `sampling_function`): each side is the strength-weighted average of its active entries'
/// predictions, and `uncond + (cond − uncond)·cfg` combines them. At cfg = 1 the negative side is
/// not evaluated.
pub(crate) struct Guider<'a> {
    pub(crate) model: &'a DiffusionModel,
    pub(crate) positive: Vec<ActiveEntry>,
    pub(crate) negative: Vec<ActiveEntry>,
    pub(crate) cfg: f64,
    /// DualCFGGuider's middle prompt and its scale.
    pub(crate) dual: Option<DualSide>,
    /// PerpNegGuider's empty prompt and its scale.
    pub(crate) perp_neg: Option<PerpNegSide>,
    /// The latent being sampled, in model space, and the denoise mask: what conditioning outside
    /// the sides is resolved against ([`GuidanceModel::predict_conditioning`]).
    pub(crate) latent: Tensor,
    pub(crate) denoise_mask: Option<Tensor>,
    /// The run's seed.
    pub(crate) seed: u64,
    /// The models the entries' hooks patch, at their strengths of the current step.
    pub(crate) hooked: HookedModels,
}

/// The middle side of DualCFGGuider, ready for the model.
pub(crate) struct DualSide {
    pub(crate) middle: Vec<ActiveEntry>,
    pub(crate) cfg_conds: f64,
    pub(crate) nested: bool,
}

/// Python's `math.isclose(value, 1.0)`: ComfyUI skips what a scale of 1 makes unnecessary.
pub(crate) fn is_one(value: f64) -> bool {
    (value - 1.0).abs() <= 1e-9 * value.abs().max(1.0)
}

/// A conditioning entry ready for the model: its inputs on the model's device, its timestep
/// range turned into σ bounds, and its region resolved against the latent.
#[derive(Clone)]
pub(crate) struct ActiveEntry {
    pub(crate) inputs: ModelInputs,
    pub(crate) sigma_start: f64,
    pub(crate) sigma_end: f64,
    /// The area as the entry asked for it, which same-area entries are matched by.
    pub(crate) requested_area: Option<LatentArea>,
    /// Where the prediction is made (the area clamped to the latent; `None`: everywhere) and
    /// its weight there, [B, C, h, w]; no weight means 1.
    pub(crate) area: Option<LatentArea>,
    pub(crate) weight: Option<Tensor>,
    /// The hooks the entry is sampled with.
    pub(crate) hooks: Option<HookGroup>,
    /// A default entry: it predicts where the side's other entries leave weight.
    pub(crate) default: bool,
    /// ControlNetApply's entry: its control reaches the other sides' entries (see
    /// [`give_controls_and_boxes`]).
    pub(crate) control_to_uncond: bool,
}

impl ActiveEntry {
    /// `entry` for `model`, on the negative side or not, for `latent`.
    fn new(
        entry: &CondEntry,
        model: &DiffusionModel,
        negative: bool,
        latent: &LatentInputs,
    ) -> Result<Self, ConditioningError> {
        let shape = latent.model_space.dims();
        let schedule = &model.schedule;
        // A scheduled CLIP's range narrows the entry's own (`calculate_start_end_timesteps`).
        let (sigma_start, sigma_end) = match (entry.clip_range, entry.timestep_range) {
            (Some((clip_start, clip_end)), range) => {
                let (start, end) = range.unwrap_or((0.0, 1.0));
                (
                    schedule.percent_to_sigma(clip_start.max(start)),
                    schedule.percent_to_sigma(clip_end.min(end)),
                )
            }
            (None, Some((start, end))) => (schedule.percent_to_sigma(start), schedule.percent_to_sigma(end)),
            (None, None) => (f64::INFINITY, f64::NEG_INFINITY),
        };
        let width = entry.cross_attention.dim(D::Minus1)?;
        let expected = model.network.context_dim();
        if width != expected {
            return Err(ConditioningError::ContextWidth {
                family: model.family.name(),
                found: width,
                expected,
            });
        }
        let (latent_height, latent_width) = (shape[2], shape[3]);
        let region = ResolvedRegion::new(&entry.region, latent_height, latent_width, &model.device)?;
        let (area, weight) = match region.placement(shape, &model.device)? {
            Some((area, weight)) => (area, Some(weight)),
            None => (None, None),
        };
        let inputs = ModelInputs {
            context: entry.cross_attention.to_device(&model.device)?.to_dtype(DType::F32)?,
            y: model.class_conditioning(entry, negative, (latent_height, latent_width), latent.seed)?,
            concat: model.inpaint_channels(entry, latent)?,
            guidance: match (&model.network, entry.guidance.strength()) {
                (DiffusionNetwork::Flux(_), Some(strength)) => Some(Tensor::new(&[strength], &model.device)?),
                _ => None,
            },
            control: entry.control.clone(),
            control_context: match (&entry.control, &entry.controlnet_text) {
                (Some(_), Some(text)) => Some(text.cross_attention.to_device(&model.device)?.to_dtype(DType::F32)?),
                _ => None,
            },
            attention_mask: model.attention_bias(entry, (latent_height, latent_width))?,
            gligen: entry.gligen.clone(),
            reference_latents: model.reference_latents(entry)?,
            reference_method: entry.reference_method.unwrap_or_default(),
        };
        Ok(ActiveEntry {
            inputs,
            sigma_start,
            sigma_end,
            requested_area: region.area,
            area,
            weight,
            hooks: entry.hooks.clone(),
            default: entry.default,
            control_to_uncond: entry.control_to_uncond,
        })
    }

    fn applies_at(&self, sigma: f32) -> bool {
        let sigma = f64::from(sigma);
        !(sigma > self.sigma_start || sigma < self.sigma_end)
    }
}

/// Gives every entry of `from` that has an area an entry with the same area on the `to` side,
/// with the text conditioning of the `to` entry that contains it (ComfyUI's
/// `create_cond_with_same_area_if_none`), so that guidance compares like with like there.
pub(crate) fn add_same_areas(from: &[ActiveEntry], to: &mut Vec<ActiveEntry>) {
    for entry in from {
        let Some(area) = entry.requested_area else {
            continue;
        };
        let areas: Vec<Option<LatentArea>> = to.iter().map(|other| other.requested_area).collect();
        if let Some(source) = same_area_source(&area, &areas) {
            let paired = ActiveEntry {
                inputs: to[source].inputs.clone(),
                ..entry.clone()
            };
            to.push(paired);
        }
    }
}

/// ComfyUI's `apply_empty_x_to_equal_area` for `control` and `gligen`: the controls of `from`'s
/// ControlNetApply entries and the GLIGEN boxes of all its entries (those without an area) go to
/// `to`'s entries without an area (see [`give_to_equal_area`]).
pub(crate) fn give_controls_and_boxes(from: &[ActiveEntry], to: &mut Vec<ActiveEntry>) {
    let whole = |entry: &&ActiveEntry| entry.requested_area.is_none();
    let controls = from
        .iter()
        .filter(|entry| entry.control_to_uncond)
        .filter(whole)
        .filter_map(|entry| entry.inputs.control.clone())
        .collect();
    give_to_equal_area(
        controls,
        to,
        |entry| entry.inputs.control.is_some(),
        |entry, control| entry.inputs.control = Some(control),
    );
    let boxes = from
        .iter()
        .filter(whole)
        .filter_map(|entry| entry.inputs.gligen.clone())
        .collect();
    give_to_equal_area(
        boxes,
        to,
        |entry| entry.inputs.gligen.is_some(),
        |entry, boxes| entry.inputs.gligen = Some(boxes),
    );
}

/// When no entry of `to` without an area `has` its kind of value, `values` go to `to`'s entries
/// without one, the n-th to the (n mod count)-th (a copy of it when it already got one).
fn give_to_equal_area<T>(
    values: Vec<T>,
    to: &mut Vec<ActiveEntry>,
    has: impl Fn(&ActiveEntry) -> bool,
    set: impl Fn(&mut ActiveEntry, T),
) {
    let whole = |entry: &ActiveEntry| entry.requested_area.is_none();
    if to.iter().filter(|entry| whole(entry)).any(&has) {
        return;
    }
    let others: Vec<usize> = (0..to.len()).filter(|i| whole(&to[*i])).collect();
    if others.is_empty() {
        return;
    }
    for (n, value) in values.into_iter().enumerate() {
        let index = others[n % others.len()];
        if has(&to[index]) {
            let mut copy = to[index].clone();
            set(&mut copy, value);
            to.push(copy);
        } else {
            set(&mut to[index], value);
        }
    }
}

/// `t` narrowed to `area` on its last two dimensions.
pub(crate) fn crop(t: &Tensor, area: &LatentArea) -> candle_core::Result<Tensor> {
    t.narrow(2, area.y, area.height)?.narrow(3, area.x, area.width)
}

/// `t` (over `area`) placed in zeros of `height × width`.
fn uncrop(t: &Tensor, area: &LatentArea, height: usize, width: usize) -> candle_core::Result<Tensor> {
    t.pad_with_zeros(2, area.y, height - area.y - area.height)?
        .pad_with_zeros(3, area.x, width - area.x - area.width)
}

impl Guider<'_> {
    /// One side's prediction (`calc_cond_batch` for one side): every active entry predicts on
    /// its area, and the predictions are averaged with their weights (counts start at 1e-37).
    pub(crate) fn predict(
        &self,
        side: Side,
        x: &Tensor,
        sigma: f32,
        extra: Option<&CallPatches>,
    ) -> candle_core::Result<Tensor> {
        // ComfyUI numbers the batch's chunks by their place in the list of sides; the empty
        // prompt's (2 for PerpNegGuider, 0 for PerpNeg) is no patch's unconditional chunk.
        let part = match side {
            Side::Positive | Side::Empty => BatchPart::Cond,
            Side::Middle | Side::Negative => BatchPart::Uncond,
        };
        self.predict_entries(self.side(side), part, x, sigma, extra)
    }

    /// The prediction of `entries` (a side's, or a conditioning's outside the sides).
    fn predict_entries(
        &self,
        entries: &[ActiveEntry],
        part: BatchPart,
        x: &Tensor,
        sigma: f32,
        extra: Option<&CallPatches>,
    ) -> candle_core::Result<Tensor> {
        let parts = [part];
        let call = ModelCall { parts: &parts, extra };
        let (_, _, height, width) = x.dims4()?;
        let mut sum: Option<Tensor> = None;
        let mut count: Option<Tensor> = None;
        let active = |default: bool| {
            entries
                .iter()
                .filter(move |entry| entry.default == default && entry.applies_at(sigma))
        };
        for entry in active(false) {
            let model = self.model_for(entry, sigma)?;
            let (input, denoised) = match &entry.area {
                Some(area) => {
                    let input = crop(x, area)?;
                    let inputs = ModelInputs {
                        concat: entry.inputs.concat.as_ref().map(|c| crop(c, area)).transpose()?,
                        ..entry.inputs.clone()
                    };
                    let denoised = model.denoise(&input, sigma, &inputs, &call)?;
                    (input, denoised)
                }
                None => (x.clone(), model.denoise(x, sigma, &entry.inputs, &call)?),
            };
            let (weighted, weight) = match &entry.weight {
                Some(weight) => ((denoised * weight)?, weight.clone()),
                None => (denoised, input.ones_like()?),
            };
            let (weighted, weight) = match &entry.area {
                Some(area) => (
                    uncrop(&weighted, area, height, width)?,
                    uncrop(&weight, area, height, width)?,
                ),
                None => (weighted, weight),
            };
            sum = Some(match sum {
                Some(sum) => (sum + weighted)?,
                None => weighted,
            });
            count = Some(match count {
                Some(count) => (count + weight)?,
                None => weight,
            });
        }
        // Default entries predict over the whole latent, weighted by what the others leave
        // (`finalize_default_conds`): nothing where they cover it.
        let mut defaults = active(true).peekable();
        if defaults.peek().is_some() {
            let left = match &count {
                Some(count) => (1.0 - count)?.relu()?,
                None => x.ones_like()?,
            };
            if left.max_all()?.to_scalar::<f32>()? > 0.0 {
                for entry in defaults {
                    let denoised = self.model_for(entry, sigma)?.denoise(x, sigma, &entry.inputs, &call)?;
                    let weighted = (denoised * &left)?;
                    sum = Some(match sum {
                        Some(sum) => (sum + weighted)?,
                        None => weighted,
                    });
                    count = Some(match count {
                        Some(count) => (count + &left)?,
                        None => left.clone(),
                    });
                }
            }
        }
        match (sum, count) {
            (Some(sum), Some(count)) => sum / (count + 1e-37)?,
            _ => x.zeros_like(),
        }
    }
}

impl Guider<'_> {
    /// The model `entry` is sampled with at σ: the guider's, or patched by the entry's hooks at
    /// their strengths there.
    fn model_for(&self, entry: &ActiveEntry, sigma: f32) -> candle_core::Result<ModelRef<'_>> {
        match &entry.hooks {
            None => Ok(ModelRef::Base(self.model)),
            Some(hooks) => Ok(ModelRef::Hooked(self.hooked.model(self.model, hooks, sigma)?)),
        }
    }
}

/// A model borrowed from the guider or built for hooks.
enum ModelRef<'a> {
    Base(&'a DiffusionModel),
    Hooked(Arc<DiffusionModel>),
}

impl std::ops::Deref for ModelRef<'_> {
    type Target = DiffusionModel;

    fn deref(&self) -> &DiffusionModel {
        match self {
            ModelRef::Base(model) => model,
            ModelRef::Hooked(model) => model,
        }
    }
}

impl Guider<'_> {
    /// Both sides' predictions. When each side has one active entry over the whole latent and
    /// their inputs have the same shapes, they run as one batch, as ComfyUI's `calc_cond_batch`
    /// does.
    pub(crate) fn predict_both(&self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        let active = |entries: &[ActiveEntry]| -> Vec<usize> {
            (0..entries.len()).filter(|i| entries[*i].applies_at(sigma)).collect()
        };
        if let ([positive], [negative]) = (active(&self.positive).as_slice(), active(&self.negative).as_slice()) {
            let (positive, negative) = (&self.positive[*positive], &self.negative[*negative]);
            let whole = positive.weight.is_none() && negative.weight.is_none();
            let same_hooks = positive.hooks.as_ref().map(HookGroup::ids) == negative.hooks.as_ref().map(HookGroup::ids);
            let model = self.model_for(positive, sigma)?;
            let (positive, negative) = (&positive.inputs, &negative.inputs);
            let same_shape = |p: &Option<Tensor>, n: &Option<Tensor>| match (p, n) {
                (Some(p), Some(n)) => p.dims()[1..] == n.dims()[1..],
                (None, None) => true,
                _ => false,
            };
            let same_control = match (&positive.control, &negative.control) {
                (Some(p), Some(n)) => {
                    Arc::ptr_eq(p, n) && same_shape(&positive.control_context, &negative.control_context)
                }
                (None, None) => true,
                _ => false,
            };
            if whole
                && same_hooks
                && same_control
                && positive.context.dims()[1..] == negative.context.dims()[1..]
                && same_shape(&positive.y, &negative.y)
                && same_shape(&positive.concat, &negative.concat)
                && same_shape(&positive.guidance, &negative.guidance)
                && positive.attention_mask.is_none()
                && negative.attention_mask.is_none()
                && positive.gligen.is_none()
                && negative.gligen.is_none()
                && positive.reference_method == negative.reference_method
                && positive.reference_latents.len() == negative.reference_latents.len()
                && positive
                    .reference_latents
                    .iter()
                    .zip(&negative.reference_latents)
                    .all(|(p, n)| p.dims()[1..] == n.dims()[1..])
            {
                let batch = x.dim(0)?;
                let both =
                    |p: &Tensor, n: &Tensor| Tensor::cat(&[repeat_to_batch(p, batch)?, repeat_to_batch(n, batch)?], 0);
                let both_optional = |p: &Option<Tensor>, n: &Option<Tensor>| match (p, n) {
                    (Some(p), Some(n)) => both(p, n).map(Some),
                    _ => Ok(None),
                };
                let inputs = ModelInputs {
                    context: both(&positive.context, &negative.context)?,
                    y: both_optional(&positive.y, &negative.y)?,
                    concat: both_optional(&positive.concat, &negative.concat)?,
                    guidance: both_optional(&positive.guidance, &negative.guidance)?,
                    control: positive.control.clone(),
                    control_context: both_optional(&positive.control_context, &negative.control_context)?,
                    attention_mask: None,
                    gligen: None,
                    reference_latents: positive
                        .reference_latents
                        .iter()
                        .zip(&negative.reference_latents)
                        .map(|(p, n)| both(p, n))
                        .collect::<candle_core::Result<_>>()?,
                    reference_method: positive.reference_method,
                };
                let call = ModelCall {
                    parts: &[BatchPart::Cond, BatchPart::Uncond],
                    extra: None,
                };
                let out = model.denoise(&Tensor::cat(&[x, x], 0)?, sigma, &inputs, &call)?;
                return Ok((out.narrow(0, 0, batch)?, out.narrow(0, batch, batch)?));
            }
        }
        Ok((
            self.predict(Side::Positive, x, sigma, None)?,
            self.predict(Side::Negative, x, sigma, None)?,
        ))
    }

    /// One side's entries.
    fn side(&self, side: Side) -> &[ActiveEntry] {
        match (side, &self.dual) {
            (Side::Positive, _) => &self.positive,
            (Side::Negative, _) => &self.negative,
            (Side::Middle, Some(dual)) => &dual.middle,
            (Side::Middle, None) => &[],
            (Side::Empty, _) => match &self.perp_neg {
                Some(perp_neg) => &perp_neg.empty,
                None => &[],
            },
        }
    }

    /// ComfyUI's `sampling_function`: both sides' predictions (the negative one only where cfg
    /// is not 1, or the model asks for it), the pre-CFG functions, then [`Self::cfg_function`].
    /// Returns the guided prediction and the negative side's.
    fn guided(&self, x: &Tensor, sigma: f32, need_uncond: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let patches = &self.model.patches;
        let evaluate_uncond = need_uncond || patches.disable_cfg1_optimization || !is_one(self.cfg);
        let args = GuidanceArgs {
            x,
            sigma,
            cond_scale: self.cfg,
            cond: Side::Positive,
            uncond: evaluate_uncond.then_some(Side::Negative),
            model: self,
        };
        let predicted = match &patches.cond_batch {
            Some(function) => function.predict(&args)?,
            None => None,
        };
        let (cond, uncond) = match predicted {
            Some([cond, uncond]) => (cond, uncond),
            None if evaluate_uncond => self.predict_both(x, sigma)?,
            None => {
                let cond = self.predict(Side::Positive, x, sigma, None)?;
                let zeros = cond.zeros_like()?;
                (cond, zeros)
            }
        };
        let [cond, uncond] = patches.apply_pre_cfg(&args, [cond, uncond])?;
        let guided = patches.cfg_function(&args, cond, Some(uncond.clone()))?;
        Ok((guided, uncond))
    }
}

impl GuidanceModel for Guider<'_> {
    fn predict_side(&self, side: Side, x: &Tensor, sigma: f32, extra: &CallPatches) -> candle_core::Result<Tensor> {
        self.predict(side, x, sigma, Some(extra))
    }

    fn predict_conditioning(&self, conditioning: &Conditioning, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let latent = LatentInputs {
            model_space: &self.latent,
            denoise_mask: self.denoise_mask.as_ref(),
            seed: self.seed,
        };
        let mut entries = entries(conditioning, self.model, true, &latent).map_err(candle_core::Error::wrap)?;
        for entry in &mut entries {
            (entry.sigma_start, entry.sigma_end) = (f64::INFINITY, f64::NEG_INFINITY);
        }
        self.predict_entries(&entries, BatchPart::Cond, x, sigma, None)
    }
}

impl Guider<'_> {
    /// DualCFGGuider's prediction and the one its guidance treats as unconditional. Regular:
    /// `negative + (middle − negative)·cfg + (positive − middle)·cfg_conds`, the negative side
    /// not evaluated (zeros) when cfg is 1 and then the middle one neither when cfg_conds is 1
    /// too; nested: `negative + cfg·(middle + (positive − middle)·cfg_conds − negative)`.
    fn dual_guided(&self, dual: &DualSide, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        if dual.nested {
            let negative = self.predict(Side::Negative, x, sigma, None)?;
            let middle = self.predict(Side::Middle, x, sigma, None)?;
            let positive = self.predict(Side::Positive, x, sigma, None)?;
            let args = GuidanceArgs {
                x,
                sigma,
                cond_scale: dual.cfg_conds,
                cond: Side::Positive,
                uncond: Some(Side::Middle),
                model: self,
            };
            let text = self.model.patches.cfg_function(&args, positive, Some(middle.clone()))?;
            let guided = (&negative + ((text - &negative)? * self.cfg)?)?;
            return Ok((guided, middle));
        }
        let optimise = !self.model.patches.disable_cfg1_optimization;
        let skip_negative = optimise && is_one(self.cfg);
        let skip_middle = skip_negative && is_one(dual.cfg_conds);
        let negative = match skip_negative {
            true => None,
            false => Some(self.predict(Side::Negative, x, sigma, None)?),
        };
        let middle = match skip_middle {
            true => x.zeros_like()?,
            false => self.predict(Side::Middle, x, sigma, None)?,
        };
        let positive = self.predict(Side::Positive, x, sigma, None)?;
        let args = GuidanceArgs {
            x,
            sigma,
            cond_scale: self.cfg,
            cond: Side::Middle,
            uncond: negative.is_some().then_some(Side::Negative),
            model: self,
        };
        let negative_or_zeros = match &negative {
            Some(negative) => negative.clone(),
            None => x.zeros_like()?,
        };
        let between = self.model.patches.cfg_function(&args, middle.clone(), negative)?;
        let guided = (between + ((positive - &middle)? * dual.cfg_conds)?)?;
        Ok((guided, negative_or_zeros))
    }
}

impl Denoiser for Guider<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        if let Some(dual) = &self.dual {
            return Ok(self.dual_guided(dual, x, sigma)?.0);
        }
        if let Some(perp_neg) = &self.perp_neg {
            return Ok(self.perp_neg_guided(perp_neg, x, sigma)?.0);
        }
        let patches = &self.model.patches;
        if is_one(self.cfg) && !patches.disable_cfg1_optimization && patches.guides_plainly() {
            // `0 + (cond − 0)·1` is `cond`: plain CFG at 1 is the positive prediction.
            return self.predict(Side::Positive, x, sigma, None);
        }
        Ok(self.guided(x, sigma, false)?.0)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        if let Some(dual) = &self.dual {
            return self.dual_guided(dual, x, sigma);
        }
        if let Some(perp_neg) = &self.perp_neg {
            return self.perp_neg_guided(perp_neg, x, sigma);
        }
        self.guided(x, sigma, true)
    }
}

/// The entries of one side of guidance, ready for `model` and `latent`.
pub(crate) fn entries(
    conditioning: &Conditioning,
    model: &DiffusionModel,
    negative: bool,
    latent: &LatentInputs,
) -> Result<Vec<ActiveEntry>, ConditioningError> {
    conditioning
        .0
        .iter()
        .map(|entry| ActiveEntry::new(entry, model, negative, latent))
        .collect()
}
