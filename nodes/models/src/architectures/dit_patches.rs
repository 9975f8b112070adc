//! The hook points of DiT networks (FLUX's double- and single-stream blocks, SD3's joint blocks
//! as double blocks), as ComfyUI's `transformer_options["patches_replace"]["dit"]` defines them
//! (`comfy/ldm/flux/model.py`, `forward_orig`; `mmdit.py`): a replacement of block
//! `("double_block", i)` or `("single_block", i)` is given the block's inputs and the original
//! block as a callable, and returns the block's outputs in its place. SkipLayerGuidance returns the inputs unchanged (the block is skipped); an IP-Adapter or
//! PuLID-style patch runs the original block and adds to its result, or changes its inputs first.
//!
//! [`DitPatches`] keeps one replacement per block (a later one wins, as ComfyUI's
//! `set_model_options_patch_replace` overwrites); the network asks it for each block's. The call's
//! facts (σ, which batch chunks are conditional) travel in [`CallInfo`], as for the UNet's patches.

use std::sync::Arc;

use candle_core::{Result, Tensor};

pub use super::unet_patches::CallInfo;

/// A transformer block of a DiT, by kind and index (ComfyUI's `("double_block", i)` and
/// `("single_block", i)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DitBlock {
    /// A double-stream block: image and text tokens with their own weights.
    Double(usize),
    /// A single-stream block: all tokens joined, text first.
    Single(usize),
}

/// What a block takes (ComfyUI's `args`): a double block its image tokens `img` [B, L_img, hidden]
/// and text tokens `txt` [B, L_txt, hidden] apart; a single block all tokens joined, text first,
/// in `img`, with `txt` `None`. `vec` [B, hidden] is the modulation vector (timestep, guidance and
/// pooled text embedded).
pub struct BlockInputs {
    pub img: Tensor,
    pub txt: Option<Tensor>,
    pub vec: Tensor,
}

/// What a block gives: the image tokens (a single block: all tokens) and, for a double block, the
/// text tokens.
pub struct BlockOutputs {
    pub img: Tensor,
    pub txt: Option<Tensor>,
}

impl BlockInputs {
    /// The inputs passed through as the block's outputs: the block skipped.
    pub fn unchanged(self) -> BlockOutputs {
        BlockOutputs {
            img: self.img,
            txt: self.txt,
        }
    }
}

/// Where a replaced block runs: which block, how many of a single block's tokens are text, and the
/// call's facts.
pub struct BlockSite<'a> {
    pub block: DitBlock,
    pub txt_tokens: usize,
    pub call: &'a CallInfo,
}

/// The model's own block, as a replacement may run it (ComfyUI's `original_block`).
pub type OriginalBlock<'a> = dyn Fn(BlockInputs) -> Result<BlockOutputs> + 'a;

/// Computes a block in place of the network's (a `patches_replace["dit"]` entry).
pub trait BlockReplace: Send + Sync {
    fn replace(&self, site: &BlockSite, inputs: BlockInputs, original: &OriginalBlock) -> Result<BlockOutputs>;
}

/// A model's DiT block replacements, cheap to clone.
#[derive(Clone, Default)]
pub struct DitPatches {
    replacements: Vec<(DitBlock, Arc<dyn BlockReplace>)>,
}

impl DitPatches {
    pub fn is_empty(&self) -> bool {
        self.replacements.is_empty()
    }

    /// Replaces `block` (a later replacement of the same block wins).
    pub fn replace(&mut self, block: DitBlock, replacement: Arc<dyn BlockReplace>) {
        self.replacements.retain(|(existing, _)| *existing != block);
        self.replacements.push((block, replacement));
    }

    /// These replacements with `more`'s; `more`'s win.
    pub fn and(&self, more: &DitPatches) -> DitPatches {
        let mut all = self.clone();
        for (block, replacement) in &more.replacements {
            all.replace(*block, replacement.clone());
        }
        all
    }

    /// The replacement of `block`, if any.
    pub fn replacement(&self, block: DitBlock) -> Option<&dyn BlockReplace> {
        self.replacements
            .iter()
            .find(|(existing, _)| *existing == block)
            .map(|(_, replacement)| replacement.as_ref())
    }

    /// The blocks replaced, in order.
    pub fn blocks(&self) -> Vec<DitBlock> {
        let mut blocks: Vec<DitBlock> = self.replacements.iter().map(|(block, _)| *block).collect();
        blocks.sort();
        blocks
    }
}

/// The replacements of one call, with the call's facts.
#[derive(Clone, Copy)]
pub struct DitPatchedCall<'a> {
    pub patches: &'a DitPatches,
    pub info: &'a CallInfo,
}
