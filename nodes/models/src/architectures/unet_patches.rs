//! The UNet's hook points, as ComfyUI's `transformer_options["patches"]` and
//! `["patches_replace"]` define them (`openaimodel.py`, `attention.py`): patches that see a
//! block's output (`input_block_patch`, `input_block_patch_after_skip`, `output_block_patch`),
//! an attention's inputs and output (`attn1_patch`, `attn1_output_patch`, `attn2_…`), a
//! transformer block's tokens between its two attentions (`middle_patch`), and
//! replacements of the attention itself at one block (`patches_replace["attn1"][("middle", 0)]`).
//!
//! A patch implements the hooks it needs; [`UNetPatches`] keeps them in the order they were added
//! and every hook point calls them in that order, so each kind keeps ComfyUI's order. The call's
//! facts patches depend on (the latent's shape, σ, which batch chunks are conditional) travel in
//! [`CallInfo`].

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Result, Tensor};

/// Where a transformer block or a UNet block sits (ComfyUI's `transformer_options["block"]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockPosition {
    Input(usize),
    Middle,
    Output(usize),
}

/// Which attention of a transformer block: its self-attention (`attn1`) or its cross-attention
/// over the text (`attn2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    SelfAttention,
    CrossAttention,
}

/// What one chunk of the batch is (ComfyUI's `cond_or_uncond`: 0 conditional, 1 unconditional).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPart {
    Cond,
    Uncond,
}

/// The facts of one network call that patches may use.
#[derive(Clone, Debug)]
pub struct CallInfo {
    /// The latent's shape as the network got it, [B, C, H, W] (`original_shape`).
    pub original_shape: [usize; 4],
    /// σ of the step.
    pub sigma: f32,
    /// The batch in equal chunks, what each is.
    pub parts: Vec<BatchPart>,
}

/// Where an attention runs, with the call's facts.
pub struct AttentionSite<'a> {
    pub call: &'a CallInfo,
    pub block: BlockPosition,
    /// The transformer block's index inside its spatial transformer (`block_index`).
    pub block_index: usize,
    /// The spatial transformer's index over the whole network (`transformer_index`).
    pub transformer_index: usize,
    pub heads: usize,
    pub dim_head: usize,
}

/// The inputs of one attention: the normalised hidden states the query comes from, what the keys
/// and the values come from.
pub struct AttentionInputs {
    pub query: Tensor,
    pub context: Tensor,
    pub value: Tensor,
}

/// A patch of the UNet; every hook passes its value through unchanged unless overridden.
pub trait UNetPatch: Send + Sync {
    /// After input block `index` and its control residual, before the skip is kept.
    fn input_block(&self, _call: &CallInfo, _index: usize, h: Tensor) -> Result<Tensor> {
        Ok(h)
    }

    /// After input block `index`'s skip was kept.
    fn input_block_after_skip(&self, _call: &CallInfo, _index: usize, h: Tensor) -> Result<Tensor> {
        Ok(h)
    }

    /// Before output block `index` joins `h` with its skip `skip`.
    fn output_block(&self, _call: &CallInfo, _index: usize, h: Tensor, skip: Tensor) -> Result<(Tensor, Tensor)> {
        Ok((h, skip))
    }

    /// Before an attention's projections.
    fn attention_inputs(
        &self,
        _kind: AttentionKind,
        _site: &AttentionSite,
        inputs: AttentionInputs,
    ) -> Result<AttentionInputs> {
        Ok(inputs)
    }

    /// An attention's result, after its output projection.
    fn attention_output(&self, _kind: AttentionKind, _site: &AttentionSite, output: Tensor) -> Result<Tensor> {
        Ok(output)
    }

    /// A transformer block's tokens after its self-attention and residual, before its
    /// cross-attention (`middle_patch`).
    fn after_self_attention(&self, _site: &AttentionSite, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
}

/// Computes an attention in place of the network's (a `patches_replace` entry): takes the
/// projected q, k and v, [B, tokens, heads·dim_head], and returns the heads' values before the
/// output projection.
pub trait AttentionReplace: Any + Send + Sync {
    fn attend(&self, site: &AttentionSite, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
}

/// Which attention a replacement is for: one block, and one transformer block in it or all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplaceKey {
    pub kind: AttentionKind,
    pub block: BlockPosition,
    pub block_index: Option<usize>,
}

/// A model's UNet patches and attention replacements, cheap to clone.
#[derive(Clone, Default)]
pub struct UNetPatches {
    patches: Vec<Arc<dyn UNetPatch>>,
    replacements: Vec<(ReplaceKey, Arc<dyn AttentionReplace>)>,
}

impl UNetPatches {
    pub fn is_empty(&self) -> bool {
        self.patches.is_empty() && self.replacements.is_empty()
    }

    /// Adds `patch` after the others.
    pub fn add(&mut self, patch: Arc<dyn UNetPatch>) {
        self.patches.push(patch);
    }

    /// Replaces the attention at `key` (a later replacement of the same key wins).
    pub fn replace(&mut self, key: ReplaceKey, replacement: Arc<dyn AttentionReplace>) {
        self.replacements.retain(|(existing, _)| *existing != key);
        self.replacements.push((key, replacement));
    }

    /// These patches followed by `more`'s; `more`'s replacements win.
    pub fn and(&self, more: &UNetPatches) -> UNetPatches {
        let mut all = self.clone();
        all.patches.extend(more.patches.iter().cloned());
        for (key, replacement) in &more.replacements {
            all.replace(*key, replacement.clone());
        }
        all
    }

    /// The replacement set at exactly `key`.
    pub fn replacement_at(&self, key: &ReplaceKey) -> Option<&dyn AttentionReplace> {
        self.replacements
            .iter()
            .find(|(existing, _)| existing == key)
            .map(|(_, replacement)| replacement.as_ref())
    }

    /// The replacement for an attention: the one for its transformer block, else the one for
    /// its whole block (ComfyUI looks up `(block, number, index)` then `(block, number)`).
    pub fn replacement(
        &self,
        kind: AttentionKind,
        block: BlockPosition,
        block_index: usize,
    ) -> Option<&dyn AttentionReplace> {
        let find = |index: Option<usize>| {
            self.replacements
                .iter()
                .find(|(key, _)| key.kind == kind && key.block == block && key.block_index == index)
                .map(|(_, replacement)| replacement.as_ref())
        };
        find(Some(block_index)).or_else(|| find(None))
    }

    pub(crate) fn input_block(&self, call: &CallInfo, index: usize, mut h: Tensor) -> Result<Tensor> {
        for patch in &self.patches {
            h = patch.input_block(call, index, h)?;
        }
        Ok(h)
    }

    pub(crate) fn input_block_after_skip(&self, call: &CallInfo, index: usize, mut h: Tensor) -> Result<Tensor> {
        for patch in &self.patches {
            h = patch.input_block_after_skip(call, index, h)?;
        }
        Ok(h)
    }

    pub(crate) fn output_block(
        &self,
        call: &CallInfo,
        index: usize,
        mut h: Tensor,
        mut skip: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        for patch in &self.patches {
            (h, skip) = patch.output_block(call, index, h, skip)?;
        }
        Ok((h, skip))
    }

    pub(crate) fn attention_inputs(
        &self,
        kind: AttentionKind,
        site: &AttentionSite,
        mut inputs: AttentionInputs,
    ) -> Result<AttentionInputs> {
        for patch in &self.patches {
            inputs = patch.attention_inputs(kind, site, inputs)?;
        }
        Ok(inputs)
    }

    pub(crate) fn attention_output(
        &self,
        kind: AttentionKind,
        site: &AttentionSite,
        mut output: Tensor,
    ) -> Result<Tensor> {
        for patch in &self.patches {
            output = patch.attention_output(kind, site, output)?;
        }
        Ok(output)
    }

    pub(crate) fn after_self_attention(&self, site: &AttentionSite, mut x: Tensor) -> Result<Tensor> {
        for patch in &self.patches {
            x = patch.after_self_attention(site, x)?;
        }
        Ok(x)
    }
}

/// The patches of one call, with the call's facts.
#[derive(Clone, Copy)]
pub struct PatchedCall<'a> {
    pub patches: &'a UNetPatches,
    pub info: &'a CallInfo,
}

/// What a patch's attention-input hook leaves for its attention-output hook of the same
/// attention (ComfyUI's patches keep it on themselves: HyperTile's `temp`, ToMe's `u`).
pub struct PendingUntilOutput<T>(Mutex<Option<T>>);

impl<T> Default for PendingUntilOutput<T> {
    fn default() -> Self {
        PendingUntilOutput(Mutex::new(None))
    }
}

impl<T> PendingUntilOutput<T> {
    /// The slot, locked; `patch` names the patch when the lock was poisoned.
    pub fn lock(&self, patch: &str) -> Result<MutexGuard<'_, Option<T>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{patch}'s state was poisoned")))
    }
}
