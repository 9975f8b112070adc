//! ComfyUI's T5 prompt tokenisation (`T5XXLTokenizer`, an `SDTokenizer` without a start token):
//! the weighted segments of the prompt (`(word:1.2)`, escapes, `embedding:` names, as for CLIP)
//! tokenised by T5 v1.1's SentencePiece vocabulary, joined into one sequence, ended by `</s>`
//! (1) and padded with `<pad>` (0) to at least `min_length` tokens (256 for FLUX). The
//! vocabulary is a `tokenizer.json` read by the `tokenizers` crate: ComfyUI's own, shipped inside
//! Easel ([`T5Tokenizer::builtin`]), or another one beside the model.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::text::tokenizer::{weighted_groups, EmbeddingLookup, TokenItem, WeightedToken};

/// `</s>`.
pub const T5_END_TOKEN: u32 = 1;
/// `<pad>`.
pub const T5_PAD_TOKEN: u32 = 0;
/// The key of T5's vectors in multi-encoder embedding files.
pub const T5_EMBEDDING_KEY: &str = "t5xxl";
/// FLUX pads T5 prompts to at least this many tokens.
pub const FLUX_T5_MIN_LENGTH: usize = 256;

/// How a T5 prompt is padded after its end token: `min_padding` pad tokens, then more up to
/// `min_length` tokens in all (ComfyUI's `t5xxl_min_padding` and `t5xxl_min_length` tokenizer
/// options, which T5TokenizerOptions sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct T5Padding {
    pub min_padding: usize,
    pub min_length: usize,
}

impl T5Padding {
    /// FLUX's: at least 256 tokens.
    pub const FLUX: T5Padding = T5Padding {
        min_padding: 0,
        min_length: FLUX_T5_MIN_LENGTH,
    };

    /// Padding up to `min_length` tokens only.
    pub fn to_length(min_length: usize) -> T5Padding {
        T5Padding {
            min_padding: 0,
            min_length,
        }
    }
}
/// The folder, in text-encoder folders and caches, that holds a T5 `tokenizer.json` (ComfyUI's
/// folder name).
pub const T5_TOKENIZER_FOLDER: &str = "t5_tokenizer";

/// ComfyUI 0.3.64's `comfy/text_encoders/t5_tokenizer/tokenizer.json` (T5 v1.1's SentencePiece
/// vocabulary, 32 100 tokens), gzipped.
const BUILTIN_T5_TOKENIZER: &[u8] = include_bytes!("../../data/t5_tokenizer.json.gz");

/// A T5 tokenizer that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the T5 tokenizer '{path}': {reason}")]
pub struct T5TokenizerError {
    pub path: PathBuf,
    pub reason: String,
}

/// The T5 vocabulary and its normalisation (a `tokenizer.json`).
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl T5Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, T5TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|error| T5TokenizerError {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        Ok(T5Tokenizer { inner })
    }

    /// The tokenizer ComfyUI's T5 encoders use, from the copy inside Easel (read once).
    pub fn builtin() -> Result<Arc<T5Tokenizer>, T5TokenizerError> {
        static BUILTIN: OnceLock<Result<Arc<T5Tokenizer>, String>> = OnceLock::new();
        let read = || -> Result<Arc<T5Tokenizer>, String> {
            let mut json = Vec::new();
            flate2::read::GzDecoder::new(BUILTIN_T5_TOKENIZER)
                .read_to_end(&mut json)
                .map_err(|error| error.to_string())?;
            let inner = tokenizers::Tokenizer::from_bytes(&json).map_err(|error| error.to_string())?;
            Ok(Arc::new(T5Tokenizer { inner }))
        };
        BUILTIN.get_or_init(read).clone().map_err(|reason| T5TokenizerError {
            path: PathBuf::from("<built in>"),
            reason,
        })
    }

    /// The id of a vocabulary entry.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The tokens of `text`, without `</s>` (ComfyUI drops the tokenizer's end token from every
    /// segment and adds one at the end of the prompt).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.inner.encode(text, false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            Err(error) => {
                tracing::warn!("T5 tokenizer: cannot tokenize {text:?}: {error}");
                Vec::new()
            }
        }
    }

    /// The prompt as one sequence of weighted tokens: every segment's tokens, `</s>`, then
    /// `<pad>` up to `min_length`.
    pub fn tokenize_with_weights(
        &self,
        text: &str,
        embeddings: &dyn EmbeddingLookup,
        padding: T5Padding,
    ) -> Vec<WeightedToken> {
        let mut tokens: Vec<WeightedToken> = weighted_groups(text, embeddings, &|segment| self.encode(segment))
            .into_iter()
            .flatten()
            .collect();
        tokens.push((TokenItem::Token(T5_END_TOKEN), 1.0));
        let pad = (TokenItem::Token(T5_PAD_TOKEN), 1.0);
        tokens.extend(std::iter::repeat_n(pad, padding.min_padding));
        let min_length = padding.min_length;
        if tokens.len() < min_length {
            tokens.resize(min_length, (TokenItem::Token(T5_PAD_TOKEN), 1.0));
        }
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmodels::write_tiny_t5_tokenizer;
    use crate::text::tokenizer::NoEmbeddings;

    /// The tiny T5 vocabulary of the test models, read back.
    fn tiny_tokenizer(dir: &Path) -> T5Tokenizer {
        let path = dir.join("tokenizer.json");
        write_tiny_t5_tokenizer(&path).expect("written");
        T5Tokenizer::from_file(&path).expect("read back")
    }

    /// The vocabulary inside Easel is ComfyUI's: ids as in its `tokenizer.json`'s vocabulary
    /// table (`▁red` is entry 1131, `▁house` 629), `<pad>` 0 and `</s>` 1.
    #[test]
    fn the_builtin_tokenizer_is_comfyuis_t5_vocabulary() {
        let tokenizer = T5Tokenizer::builtin().expect("built in");
        assert_eq!(tokenizer.encode("red house"), vec![1131, 629]);
        assert_eq!(tokenizer.token_id("<pad>"), Some(T5_PAD_TOKEN));
        assert_eq!(tokenizer.token_id("</s>"), Some(T5_END_TOKEN));
    }

    #[test]
    fn prompts_become_one_weighted_sequence_ended_and_padded() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let tokenizer = tiny_tokenizer(dir.path());
        assert_eq!(tokenizer.encode("a red house"), vec![4, 5, 6]);
        let tokens = tokenizer.tokenize_with_weights("a (red houses:1.5)", &NoEmbeddings, T5Padding::to_length(8));
        let expected: Vec<WeightedToken> = [
            (4, 1.0),
            (5, 1.5),
            (6, 1.5),
            (7, 1.5),
            (1, 1.0),
            (0, 1.0),
            (0, 1.0),
            (0, 1.0),
        ]
        .into_iter()
        .map(|(token, weight)| (TokenItem::Token(token), weight))
        .collect();
        assert_eq!(tokens, expected);
        // Longer than the minimum: no padding, still ended.
        let long = tokenizer.tokenize_with_weights("a red house a red house", &NoEmbeddings, T5Padding::to_length(4));
        assert_eq!(long.len(), 7);
        assert_eq!(long.last(), Some(&(TokenItem::Token(T5_END_TOKEN), 1.0)));
        // The empty prompt: `</s>` and padding.
        let empty = tokenizer.tokenize_with_weights("", &NoEmbeddings, T5Padding::FLUX);
        assert_eq!(empty.len(), FLUX_T5_MIN_LENGTH);
        assert_eq!(empty[0], (TokenItem::Token(T5_END_TOKEN), 1.0));
        assert!(empty[1..]
            .iter()
            .all(|token| *token == (TokenItem::Token(T5_PAD_TOKEN), 1.0)));
    }

    #[test]
    fn an_unreadable_tokenizer_names_its_file() {
        let error = T5Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("/nonexistent/tokenizer.json"), "{error}");
    }
}
