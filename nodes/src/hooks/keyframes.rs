//! Hook keyframes (ComfyUI's `HookKeyframe` and `HookKeyframeGroup`, `comfy/hooks.py`): the
//! strength a hook is applied at, changing over sampling. A keyframe starts at a percent of
//! sampling (turned into σ when sampling starts) and holds for at least its guaranteed steps;
//! [`KeyframeCursor`] follows the keyframes through one sampling run as ComfyUI's
//! `prepare_current_keyframe` does. [`clip_schedule`] splits sampling into the ranges a
//! scheduled CLIP is encoded for (`get_hooks_for_clip_schedule`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use easel_engine::NodeObject;
use easel_models::sampling::schedule::{linspace_f32, SigmaSchedule};

/// A fresh identity for a value whose copies share state in ComfyUI (a hook's `hook_ref`, a
/// keyframe group object).
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One keyframe: `strength` from `start_percent` of sampling on, for at least `guarantee_steps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HookKeyframe {
    pub strength: f64,
    pub start_percent: f64,
    pub guarantee_steps: u32,
}

/// The HOOK_KEYFRAMES socket: keyframes sorted by start (keyframes starting together keep the
/// order they were added in). Copies share an identity, as ComfyUI's hooks share one keyframe
/// group object: they advance together while sampling.
#[derive(Clone, Debug)]
pub struct HookKeyframes {
    id: u64,
    keyframes: Arc<[HookKeyframe]>,
}

impl Default for HookKeyframes {
    fn default() -> Self {
        HookKeyframes::new(Vec::new())
    }
}

impl HookKeyframes {
    /// A new group of `keyframes` (sorted by start, stably).
    pub fn new(mut keyframes: Vec<HookKeyframe>) -> Self {
        keyframes.sort_by(|a, b| a.start_percent.total_cmp(&b.start_percent));
        HookKeyframes {
            id: next_id(),
            keyframes: keyframes.into(),
        }
    }

    /// A new group with these keyframes and `keyframe` (ComfyUI's `clone` then `add`).
    pub fn with(&self, keyframe: HookKeyframe) -> Self {
        let mut keyframes = self.keyframes.to_vec();
        keyframes.push(keyframe);
        HookKeyframes::new(keyframes)
    }

    /// A copy with its own identity (ComfyUI's `clone`).
    pub fn copied(&self) -> Self {
        HookKeyframes::new(self.keyframes.to_vec())
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn keyframes(&self) -> &[HookKeyframe] {
        &self.keyframes
    }
}

impl NodeObject for HookKeyframes {
    fn type_name(&self) -> &'static str {
        "HOOK_KEYFRAMES"
    }
}

/// How strengths go from one value to another over keyframes (`InterpolationMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    Linear,
    EaseIn,
    EaseOut,
    EaseInOut,
}

impl Interpolation {
    pub const NAMES: [&'static str; 4] = ["linear", "ease_in", "ease_out", "ease_in_out"];

    pub fn from_name(name: &str) -> Option<Interpolation> {
        match name {
            "linear" => Some(Interpolation::Linear),
            "ease_in" => Some(Interpolation::EaseIn),
            "ease_out" => Some(Interpolation::EaseOut),
            "ease_in_out" => Some(Interpolation::EaseInOut),
            _ => None,
        }
    }

    /// `count` values from `from` to `to` (`InterpolationMethod.get_weights`), in float32 as
    /// PyTorch and NumPy compute them there.
    pub fn weights(self, from: f64, to: f64, count: usize) -> Vec<f32> {
        let (from32, to32) = (from as f32, to as f32);
        let difference = (to - from) as f32;
        let index = linspace_f32(0.0, 1.0, count);
        match self {
            Interpolation::Linear => linspace_f32(from32, to32, count),
            Interpolation::EaseIn => index.iter().map(|i| difference * (i * i) + from32).collect(),
            Interpolation::EaseOut => index
                .iter()
                .map(|i| {
                    let rest = 1.0 - i;
                    difference * (1.0 - rest * rest) + from32
                })
                .collect(),
            Interpolation::EaseInOut => index
                .iter()
                .map(|i| difference * ((1.0 - (i * std::f32::consts::PI).cos()) / 2.0) + from32)
                .collect(),
        }
    }
}

/// Where one keyframe group stands in a sampling run (ComfyUI's `_current_index`,
/// `_current_used_steps`, `_curr_t`).
#[derive(Clone, Debug)]
pub struct KeyframeCursor {
    /// Each keyframe's start as σ (`start_t`).
    starts: Vec<f32>,
    index: usize,
    used_steps: u32,
    last_sigma: Option<f32>,
}

impl KeyframeCursor {
    /// At the first keyframe of `keyframes`, their starts turned into σ by `schedule`
    /// (`initialize_timesteps` and `reset`).
    pub fn new(keyframes: &HookKeyframes, schedule: &SigmaSchedule) -> Self {
        KeyframeCursor {
            starts: keyframes
                .keyframes()
                .iter()
                .map(|keyframe| schedule.percent_to_sigma(keyframe.start_percent) as f32)
                .collect(),
            index: 0,
            used_steps: 0,
            last_sigma: None,
        }
    }

    /// The strength at the current keyframe (1 without keyframes).
    pub fn strength(&self, keyframes: &HookKeyframes) -> f64 {
        keyframes
            .keyframes()
            .get(self.index)
            .map_or(1.0, |keyframe| keyframe.strength)
    }

    /// Moves to the keyframe for σ, once per σ (`prepare_current_keyframe`): after the current
    /// keyframe's guaranteed steps, on to the latest keyframe that has started, stopping at one
    /// that guarantees steps. A keyframe that started before the run's largest σ guarantees none.
    pub fn advance(&mut self, keyframes: &HookKeyframes, sigma: f32, max_sigma: f32) {
        let keyframes = keyframes.keyframes();
        if keyframes.is_empty() || self.last_sigma == Some(sigma) {
            return;
        }
        let guaranteed = |index: usize| {
            if self.starts[index] > max_sigma {
                0
            } else {
                keyframes[index].guarantee_steps
            }
        };
        if self.used_steps >= guaranteed(self.index) {
            for next in self.index + 1..keyframes.len() {
                if self.starts[next] < sigma {
                    break;
                }
                self.index = next;
                self.used_steps = 0;
                if guaranteed(next) > 0 {
                    break;
                }
            }
        }
        self.used_steps += 1;
        self.last_sigma = Some(sigma);
    }
}

/// One range of a CLIP schedule: (start, end) percent, and the keyframe of each hook there
/// (by the hook's position in its group; `None`: no keyframe, strength 1).
pub type ClipScheduleRange = ((f64, f64), Vec<Option<HookKeyframe>>);

/// A range of one hook's keyframes over which its strength holds, and the keyframe there.
type HookRange = ((f64, f64), Option<HookKeyframe>);

/// The ranges of sampling over which none of `hooks`' strengths change, with each hook's
/// keyframe there (`get_hooks_for_clip_schedule`): every hook's keyframes are merged into
/// ranges of equal strength, and all their boundaries (and 0) cut sampling into ranges.
pub fn clip_schedule(hooks: &[&HookKeyframes]) -> Vec<ClipScheduleRange> {
    let mut scheduled: Vec<Vec<HookRange>> = Vec::with_capacity(hooks.len());
    for keyframes in hooks {
        let keyframes = keyframes.keyframes();
        let Some(first) = keyframes.first() else {
            scheduled.push(vec![((0.0, 1.0), None)]);
            continue;
        };
        let mut ranges = Vec::new();
        let mut previous = *first;
        for keyframe in keyframes {
            if keyframe.start_percent > previous.start_percent && !is_close(keyframe.strength, previous.strength) {
                ranges.push(((previous.start_percent, keyframe.start_percent), Some(previous)));
                previous = *keyframe;
            } else if keyframe.start_percent == previous.start_percent {
                previous = *keyframe;
            }
        }
        if !is_close(previous.start_percent, 1.0) {
            ranges.push(((previous.start_percent, 1.0), Some(previous)));
        }
        scheduled.push(ranges);
    }
    let mut boundaries: Vec<f64> = scheduled
        .iter()
        .flatten()
        .flat_map(|((start, end), _)| [*start, *end])
        .chain([0.0])
        .collect();
    boundaries.sort_by(f64::total_cmp);
    boundaries.dedup();
    boundaries
        .windows(2)
        .map(|pair| {
            let range = (pair[0], pair[1]);
            let keyframes = scheduled
                .iter()
                .map(|ranges| {
                    ranges
                        .iter()
                        .find(|((start, end), _)| *start < range.1 && *end > range.0)
                        .and_then(|(_, keyframe)| *keyframe)
                })
                .collect();
            (range, keyframes)
        })
        .collect()
}

/// Python's `math.isclose` with its default tolerance.
pub(crate) fn is_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}
