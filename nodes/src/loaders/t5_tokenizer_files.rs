//! Which tokenizer a T5 text encoder uses. T5 weights files (safetensors or GGUF) carry no usable
//! vocabulary; ComfyUI ships T5's `tokenizer.json` in its package and Easel inside its binary
//! ([`T5Tokenizer::builtin`]), so nothing is downloaded. A vocabulary of another T5 is taken
//! instead where one lies
//! 1. beside the text encoder (`tokenizer.json`, or `t5_tokenizer/tokenizer.json`, ComfyUI's
//!    folder name), or
//! 2. in a text-encoder folder (`t5_tokenizer/tokenizer.json`).
//!
//! A file is taken only when it is a T5 vocabulary (`<pad>` = 0, `</s>` = 1), so a CLIP
//! `tokenizer.json` beside the encoder is passed over.

use std::path::Path;
use std::sync::Arc;

use easel_engine::Services;
use easel_models::text::t5_tokenizer::{
    T5Tokenizer, T5TokenizerError, T5_END_TOKEN, T5_PAD_TOKEN, T5_TOKENIZER_FOLDER,
};

use crate::paths::Paths;

/// Where T5 tokenizers other than the built-in one are looked for: the model folders.
#[derive(Clone, Copy, Default)]
pub struct TokenizerSearch<'a> {
    pub paths: Option<&'a Paths>,
}

impl<'a> TokenizerSearch<'a> {
    /// The registry's folders.
    pub fn of(services: &'a Services) -> Self {
        TokenizerSearch {
            paths: services.get::<Paths>(),
        }
    }
}

/// The T5 tokenizer for the text encoder at `encoder` (see the module documentation).
pub fn find_t5_tokenizer(encoder: &Path, search: TokenizerSearch) -> Result<Arc<T5Tokenizer>, T5TokenizerError> {
    let mut candidates = Vec::new();
    if let Some(dir) = encoder.parent() {
        candidates.push(dir.join("tokenizer.json"));
        candidates.push(dir.join(T5_TOKENIZER_FOLDER).join("tokenizer.json"));
    }
    let folders = search.paths.map(|paths| paths.folder_dirs("text_encoders"));
    for dir in folders.unwrap_or_default() {
        let candidate = Path::new(&dir).join(T5_TOKENIZER_FOLDER).join("tokenizer.json");
        if !candidates.contains(&candidate) {
            candidates.push(candidate);
        }
    }
    match candidates.iter().find_map(|candidate| t5_tokenizer_at(candidate)) {
        Some(tokenizer) => Ok(Arc::new(tokenizer)),
        None => T5Tokenizer::builtin(),
    }
}

/// The T5 tokenizer at `path`, when there is one there.
fn t5_tokenizer_at(path: &Path) -> Option<T5Tokenizer> {
    if !path.is_file() {
        return None;
    }
    match T5Tokenizer::from_file(path) {
        Ok(tokenizer)
            if tokenizer.token_id("<pad>") == Some(T5_PAD_TOKEN)
                && tokenizer.token_id("</s>") == Some(T5_END_TOKEN) =>
        {
            tracing::debug!("T5 tokenizer: {}", path.display());
            Some(tokenizer)
        }
        Ok(_) => {
            tracing::debug!("{} is not a T5 tokenizer (no <pad> = 0, </s> = 1)", path.display());
            None
        }
        Err(error) => {
            tracing::warn!("{error}");
            None
        }
    }
}
