//! ComfyUI's CLIP prompt tokenisation (`sd1_clip.SDTokenizer`): `(word:1.2)` / `(word)` weights,
//! `\(` escapes, `embedding:name` textual inversions, and 77-token chunks that start with the
//! start token and end with the end token, padded. The byte-pair encoding itself is OpenAI's
//! CLIP vocabulary from `instant-clip-tokenizer`; the text is first cleaned as transformers'
//! `CLIPTokenizer` does without ftfy (its `BasicTokenizer`: control characters dropped,
//! whitespace normalised, CJK characters split, NFC, lower case).

use std::sync::OnceLock;

use instant_clip_tokenizer::Tokenizer;
use unicode_normalization::UnicodeNormalization;

pub const START_TOKEN: u32 = 49406;
pub const END_TOKEN: u32 = 49407;
/// Chunk length, start and end tokens included.
pub const CHUNK_LENGTH: usize = 77;
/// A word of at least this many tokens may be split across chunks.
const MAX_WORD_LENGTH: usize = 8;
const EMBEDDING_PREFIX: &str = "embedding:";

/// One position of a chunk: a vocabulary token or a textual-inversion vector, with its weight.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenItem {
    Token(u32),
    Embedding(Vec<f32>),
}

pub type WeightedToken = (TokenItem, f64);

/// Looks up a textual-inversion embedding by name: one vector per token it stands for.
pub trait EmbeddingLookup {
    fn embedding(&self, name: &str) -> Option<Vec<Vec<f32>>>;
}

/// No embeddings available.
pub struct NoEmbeddings;

impl EmbeddingLookup for NoEmbeddings {
    fn embedding(&self, _name: &str) -> Option<Vec<Vec<f32>>> {
        None
    }
}

fn bpe() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(Tokenizer::new)
}

/// The vocabulary tokens of `text`, without start and end tokens.
pub fn encode_words(text: &str) -> Vec<u32> {
    let mut tokens = Vec::new();
    bpe().encode(&clean_text(text), &mut tokens);
    tokens.into_iter().map(|token| u32::from(token.to_u16())).collect()
}

/// transformers' `BasicTokenizer(strip_accents=False, do_split_on_punc=False)` joined by spaces.
fn clean_text(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
            continue;
        }
        if c.is_whitespace() {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    let normalized: String = cleaned.nfc().collect();
    normalized
        .split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_cjk(c: char) -> bool {
    matches!(u32::from(c),
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Splits a prompt into (text, weight) segments as ComfyUI's `token_weights` does: each
/// outermost `( … )` multiplies the weight by 1.1, or sets it with a trailing `:number`.
pub fn parse_weights(text: &str, weight: f64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for segment in split_parentheses(text) {
        let inner = segment.strip_prefix('(').and_then(|s| s.strip_suffix(')'));
        match inner {
            Some(inner) if segment.chars().count() >= 2 => {
                let mut inner = inner.to_string();
                let mut inner_weight = weight * 1.1;
                if let Some(colon) = inner.rfind(':').filter(|&colon| colon > 0) {
                    if let Some(explicit) = parse_python_float(&inner[colon + 1..]) {
                        inner_weight = explicit;
                        inner.truncate(colon);
                    }
                }
                out.extend(parse_weights(&inner, inner_weight));
            }
            _ => out.push((segment, weight)),
        }
    }
    out
}

/// Python's `float()` for the forms prompts use (surrounding whitespace allowed).
fn parse_python_float(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok()
}

/// ComfyUI's `parse_parentheses`: top-level text runs and `( … )` groups, nesting kept inside.
fn split_parentheses(text: &str) -> Vec<String> {
    let mut result = Vec::new();
    let mut current = String::new();
    let mut depth: i64 = 0;
    for c in text.chars() {
        match c {
            '(' => {
                if depth == 0 {
                    if !current.is_empty() {
                        result.push(std::mem::take(&mut current));
                    }
                    current.push('(');
                } else {
                    current.push(c);
                }
                depth += 1;
            }
            ')' => {
                depth -= 1;
                if depth == 0 {
                    current.push(')');
                    result.push(std::mem::take(&mut current));
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        result.push(current);
    }
    result
}

/// `SDTokenizer.tokenize_with_weights`: the prompt as chunks of [`CHUNK_LENGTH`] weighted
/// tokens. Unknown `embedding:` names are dropped with a warning, as ComfyUI does.
pub fn tokenize_with_weights(text: &str, embeddings: &dyn EmbeddingLookup, pad_token: u32) -> Vec<Vec<WeightedToken>> {
    chunk(weighted_groups(text, embeddings, &encode_words), pad_token)
}

/// The first half of `SDTokenizer.tokenize_with_weights`: the prompt's weighted segments
/// (`(word:1.2)`, escapes) split before `embedding:` names, as groups of weighted tokens — an
/// embedding's vectors, or a segment's tokens by `encode` (without start and end tokens).
pub fn weighted_groups(
    text: &str,
    embeddings: &dyn EmbeddingLookup,
    encode: &dyn Fn(&str) -> Vec<u32>,
) -> Vec<Vec<WeightedToken>> {
    let escaped = text.replace("\\)", "\0\u{1}").replace("\\(", "\0\u{2}");
    let mut groups: Vec<Vec<WeightedToken>> = Vec::new();
    for (segment, weight) in parse_weights(&escaped, 1.0) {
        let segment = segment.replace("\0\u{1}", ")").replace("\0\u{2}", "(");
        for word in split_embedding_words(&segment) {
            let mut word = word;
            if let Some(name) = word.strip_prefix(EMBEDDING_PREFIX) {
                let name = name.trim_matches('\n').to_string();
                let (found, leftover) = find_embedding(&name, embeddings);
                match found {
                    Some(vectors) => {
                        groups.push(vectors.into_iter().map(|v| (TokenItem::Embedding(v), weight)).collect());
                    }
                    None => tracing::warn!("warning, embedding:{name} does not exist, ignoring"),
                }
                if leftover.is_empty() {
                    continue;
                }
                word = leftover;
            }
            groups.push(
                encode(&word)
                    .into_iter()
                    .map(|t| (TokenItem::Token(t), weight))
                    .collect(),
            );
        }
    }
    groups
}

/// Splits before every `embedding:` that follows a space or newline (ComfyUI's
/// `re.split(' {0}|\n{0}')` with the prefix added back), dropping empty parts.
fn split_embedding_words(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    let mut first = true;
    loop {
        let next = [" ", "\n"]
            .iter()
            .filter_map(|separator| rest.find(&format!("{separator}{EMBEDDING_PREFIX}")))
            .min();
        let (part, tail) = match next {
            Some(index) => (&rest[..index], Some(&rest[index + 1 + EMBEDDING_PREFIX.len()..])),
            None => (rest, None),
        };
        let part = if first {
            part.to_string()
        } else {
            format!("{EMBEDDING_PREFIX}{part}")
        };
        if !part.is_empty() {
            parts.push(part);
        }
        first = false;
        match tail {
            Some(tail) => rest = tail,
            None => return parts,
        }
    }
}

/// `_try_get_embedding`: the first whitespace-separated word names the embedding (retried
/// without surrounding commas); the rest of the text is returned to be tokenised as words.
fn find_embedding(text: &str, embeddings: &dyn EmbeddingLookup) -> (Option<Vec<Vec<f32>>>, String) {
    let mut words = text.split_whitespace();
    let name = words.next().unwrap_or("");
    let leftover = words.collect::<Vec<_>>().join(" ");
    if let Some(found) = embeddings.embedding(name) {
        return (Some(found), leftover);
    }
    let stripped = name.trim_matches(',');
    if stripped.len() < name.len() {
        return (
            embeddings.embedding(stripped),
            format!("{} {leftover}", &name[stripped.len()..]),
        );
    }
    (None, leftover)
}

/// Packs token groups (one per word) into chunks; a short word that does not fit moves whole
/// to the next chunk, a long one (≥ 8 tokens) is split.
fn chunk(groups: Vec<Vec<WeightedToken>>, pad_token: u32) -> Vec<Vec<WeightedToken>> {
    let start = || vec![(TokenItem::Token(START_TOKEN), 1.0)];
    let end = (TokenItem::Token(END_TOKEN), 1.0);
    let pad = (TokenItem::Token(pad_token), 1.0);
    let mut chunks = Vec::new();
    let mut batch = start();
    for mut group in groups {
        let is_large = group.len() >= MAX_WORD_LENGTH;
        while !group.is_empty() {
            if group.len() + batch.len() > CHUNK_LENGTH - 1 {
                let remaining = CHUNK_LENGTH - batch.len() - 1;
                if is_large {
                    let tail = group.split_off(remaining);
                    batch.append(&mut group);
                    group = tail;
                    batch.push(end.clone());
                } else {
                    batch.push(end.clone());
                    batch.extend(std::iter::repeat_n(pad.clone(), remaining));
                }
                chunks.push(std::mem::replace(&mut batch, start()));
            } else {
                batch.append(&mut group);
            }
        }
    }
    batch.push(end);
    let padding = CHUNK_LENGTH.saturating_sub(batch.len());
    batch.extend(std::iter::repeat_n(pad, padding));
    chunks.push(batch);
    chunks
}
