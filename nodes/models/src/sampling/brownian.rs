//! The Brownian-tree noise of ComfyUI's SDE samplers (`BrownianTreeNoiseSampler`), reproduced
//! value for value: torchsde's `BrownianTree` (a halfway-split `BrownianInterval` with times
//! rounded to 6 decimals) seeded through numpy's `SeedSequence`, whose seeds feed torch's CPU
//! `randn`.

use std::collections::VecDeque;
use std::sync::Arc;

use super::noise::CpuGenerator;

/// numpy's `SeedSequence(entropy, spawn_key, pool_size).generate_state(n_words)` (uint32 words).
pub fn seed_sequence_state(entropy: u64, spawn_key: &[u64], pool_size: usize, n_words: usize) -> Vec<u32> {
    const INIT_A: u32 = 0x43b0_d7e5;
    const MULT_A: u32 = 0x931e_8875;
    const INIT_B: u32 = 0x8b51_f9dd;
    const MULT_B: u32 = 0x58f3_8ded;
    const MIX_MULT_L: u32 = 0xca01_f9dd;
    const MIX_MULT_R: u32 = 0x4973_f715;
    const XSHIFT: u32 = 16;

    let mut words = int_to_words(entropy);
    if !spawn_key.is_empty() && words.len() < pool_size {
        words.resize(pool_size, 0);
    }
    for &key in spawn_key {
        words.extend(int_to_words(key));
    }

    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| {
        let mut value = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        value = value.wrapping_mul(hash_const);
        value ^ (value >> XSHIFT)
    };
    let mix = |x: u32, y: u32| {
        let result = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        result ^ (result >> XSHIFT)
    };

    let mut pool: Vec<u32> = (0..pool_size)
        .map(|i| hashmix(words.get(i).copied().unwrap_or(0)))
        .collect();
    for src in 0..pool_size {
        let source = pool[src];
        for (dst, slot) in pool.iter_mut().enumerate() {
            if src != dst {
                *slot = mix(*slot, hashmix(source));
            }
        }
    }
    for &word in words.iter().skip(pool_size) {
        for slot in pool.iter_mut() {
            *slot = mix(*slot, hashmix(word));
        }
    }

    let mut hash_const = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut value = pool[i % pool_size] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        })
        .collect()
}

/// numpy's `_int_to_uint32_array`: little-endian 32-bit words, `[0]` for zero.
fn int_to_words(mut value: u64) -> Vec<u32> {
    if value == 0 {
        return vec![0];
    }
    let mut words = Vec::new();
    while value > 0 {
        words.push(value as u32);
        value >>= 32;
    }
    words
}

/// Python's `round(x, 6)`: the double nearest to x correctly rounded to 6 decimals.
fn round6(x: f64) -> f64 {
    format!("{x:.6}").parse().unwrap_or(x)
}

/// torchsde's `pool_size` for `BrownianTree`.
const POOL_SIZE: usize = 24;
/// How many computed increments stay cached (torchsde's `cache_size`; values do not depend on it).
const CACHE_SIZE: usize = 45;
/// Deeper splits would need spawn keys beyond 64 bits; 6-decimal times stop far earlier.
const MAX_DEPTH: u32 = 63;

/// One interval of the tree; children split it at its (rounded) midpoint.
struct Interval {
    start: f64,
    end: f64,
    parent: Option<usize>,
    is_left: bool,
    split: Option<Split>,
}

struct Split {
    midway: f64,
    spawn_key: u64,
    depth: u32,
    increment_seed: u32,
    left: usize,
    right: usize,
}

/// torchsde's `BrownianTree(t0, zeros(numel), t1, entropy=seed, tol=1e-6, pool_size=24)`.
pub struct BrownianTree {
    numel: usize,
    entropy: u64,
    intervals: Vec<Interval>,
    root_increment: Arc<Vec<f32>>,
    cache: VecDeque<(usize, Arc<Vec<f32>>)>,
}

impl BrownianTree {
    pub fn new(t0: f64, t1: f64, numel: usize, entropy: u64) -> Self {
        let seeds = seed_sequence_state(entropy, &[], POOL_SIZE, 3);
        let scale = (t1 - t0).sqrt() as f32;
        let root_increment = CpuGenerator::new(u64::from(seeds[0]))
            .randn(numel)
            .into_iter()
            .map(|value| value * scale)
            .collect();
        BrownianTree {
            numel,
            entropy,
            intervals: vec![Interval {
                start: round6(t0),
                end: round6(t1),
                parent: None,
                is_left: false,
                split: None,
            }],
            root_increment: Arc::new(root_increment),
            cache: VecDeque::new(),
        }
    }

    /// W(tb) − W(ta) for ta ≤ tb, with queries outside [t0, t1] clamped as torchsde does.
    pub fn increment(&mut self, ta: f64, tb: f64) -> Vec<f32> {
        let (start, end) = (self.intervals[0].start, self.intervals[0].end);
        let ta = ta.clamp(start, end);
        let tb = tb.clamp(start, end);
        let (ta, tb) = (round6(ta), round6(tb));
        if ta >= tb {
            return vec![0.0; self.numel];
        }
        let mut pieces = Vec::new();
        self.locate(0, ta, tb, &mut pieces);
        let mut total: Option<Vec<f32>> = None;
        for piece in pieces {
            let increment = self.interval_increment(piece);
            total = Some(match total {
                None => increment.as_ref().clone(),
                Some(mut sum) => {
                    sum.iter_mut().zip(increment.iter()).for_each(|(s, v)| *s += v);
                    sum
                }
            });
        }
        total.unwrap_or_else(|| vec![0.0; self.numel])
    }

    /// torchsde's `_loc_inner`: the ordered intervals that exactly cover [ta, tb], splitting
    /// intervals at their midpoints as needed.
    fn locate(&mut self, node: usize, ta: f64, tb: f64, out: &mut Vec<usize>) {
        let (start, end) = (self.intervals[node].start, self.intervals[node].end);
        if ta == start && tb == end {
            out.push(node);
            return;
        }
        let split = match &self.intervals[node].split {
            Some(split) => (split.midway, split.left, split.right),
            None => {
                let target = if ta == start { tb } else { ta };
                if !self.split_towards(node, target) {
                    out.push(node);
                    return;
                }
                let split = self.intervals[node].split.as_ref().expect("just split");
                (split.midway, split.left, split.right)
            }
        };
        let (midway, left, right) = split;
        if tb <= midway {
            self.locate(left, ta, tb, out);
        } else if ta >= midway {
            self.locate(right, ta, tb, out);
        } else {
            self.locate(left, ta, midway, out);
            self.locate(right, midway, tb, out);
        }
    }

    /// `_split` of the halfway tree: split at the midpoint, then keep splitting the child that
    /// holds `target` until a midpoint lands on it. False when the tree cannot go deeper.
    fn split_towards(&mut self, mut node: usize, target: f64) -> bool {
        loop {
            let midway = match &self.intervals[node].split {
                Some(split) => split.midway,
                None => match self.split(node) {
                    Some(midway) => midway,
                    None => return false,
                },
            };
            let split = self.intervals[node].split.as_ref().expect("split");
            node = if target > midway {
                split.right
            } else if target < midway {
                split.left
            } else {
                return true;
            };
        }
    }

    /// `_split_exact` at the rounded midpoint; returns it.
    fn split(&mut self, node: usize) -> Option<f64> {
        let (start, end) = (self.intervals[node].start, self.intervals[node].end);
        let (spawn_key, depth) = match self.intervals[node].parent {
            None => (0, 0),
            Some(parent) => {
                let parent_split = self.intervals[parent].split.as_ref()?;
                let side = u64::from(!self.intervals[node].is_left);
                (parent_split.spawn_key.checked_mul(2)? + side, parent_split.depth + 1)
            }
        };
        let midway = round6(0.5 * (end + start));
        if depth > MAX_DEPTH || midway <= start || midway >= end {
            return None;
        }
        let seeds = seed_sequence_state(self.entropy, &[spawn_key, u64::from(depth)], POOL_SIZE, 4);
        let left = self.intervals.len();
        self.intervals.push(Interval {
            start,
            end: midway,
            parent: Some(node),
            is_left: true,
            split: None,
        });
        self.intervals.push(Interval {
            start: midway,
            end,
            parent: Some(node),
            is_left: false,
            split: None,
        });
        self.intervals[node].split = Some(Split {
            midway,
            spawn_key,
            depth,
            increment_seed: seeds[0],
            left,
            right: left + 1,
        });
        Some(midway)
    }

    /// The increment over one interval: the parent's increment split by a Brownian bridge,
    /// `W_left = (h_L/h)·W + √(h_L·h_R/h)·randn(seed)`, `W_right = W − W_left`.
    fn interval_increment(&mut self, node: usize) -> Arc<Vec<f32>> {
        let mut chain = Vec::new();
        let mut current = node;
        let mut known = loop {
            if current == 0 {
                break self.root_increment.clone();
            }
            if let Some((_, value)) = self.cache.iter().find(|(id, _)| *id == current) {
                break value.clone();
            }
            chain.push(current);
            current = self.intervals[current].parent.expect("non-root interval has a parent");
        };
        while let Some(child) = chain.pop() {
            let parent = &self.intervals[self.intervals[child].parent.expect("parent")];
            let split = parent.split.as_ref().expect("parent of a child is split");
            let h_reciprocal = 1.0 / (parent.end - parent.start);
            let left_diff = split.midway - parent.start;
            let right_diff = parent.end - split.midway;
            let std = (left_diff * right_diff * h_reciprocal).sqrt() as f32;
            let (left_diff, h_reciprocal) = (left_diff as f32, h_reciprocal as f32);
            let noise = CpuGenerator::new(u64::from(split.increment_seed)).randn(self.numel);
            let is_left = self.intervals[child].is_left;
            let value: Vec<f32> = known
                .iter()
                .zip(noise)
                .map(|(&w, n)| {
                    let left_w = left_diff * w * h_reciprocal + std * n;
                    if is_left {
                        left_w
                    } else {
                        w - left_w
                    }
                })
                .collect();
            known = Arc::new(value);
            if self.cache.len() == CACHE_SIZE {
                self.cache.pop_front();
            }
            self.cache.push_back((child, known.clone()));
        }
        known
    }
}

/// ComfyUI's `BrownianTreeNoiseSampler` over [σ_min, σ_max] for one latent batch: noise between
/// two σ values scaled to unit variance.
pub struct BrownianNoise {
    tree: BrownianTree,
}

impl BrownianNoise {
    pub fn new(sigma_min: f32, sigma_max: f32, numel: usize, seed: u64) -> Self {
        BrownianNoise {
            tree: BrownianTree::new(f64::from(sigma_min), f64::from(sigma_max), numel, seed),
        }
    }

    /// `W(σ, σ_next) / √|σ_next − σ|`, the sign following the order of the two σ.
    pub fn sample(&mut self, sigma: f32, sigma_next: f32) -> Vec<f32> {
        let (low, high, sign) = if sigma < sigma_next {
            (sigma, sigma_next, 1.0f32)
        } else {
            (sigma_next, sigma, -1.0)
        };
        let scale = (sigma_next - sigma).abs().sqrt();
        self.tree
            .increment(f64::from(low), f64::from(high))
            .into_iter()
            .map(|w| w * sign / scale)
            .collect()
    }
}
