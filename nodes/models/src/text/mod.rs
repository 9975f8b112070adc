//! Prompts into tokens: ComfyUI's weighted-prompt parsing and CLIP tokenisation
//! ([`tokenizer`]), T5's ([`t5_tokenizer`]), how token weights shape the encoder's output
//! ([`token_weights`]) and textual inversions ([`embeddings`]).

pub mod embeddings;
pub mod t5_tokenizer;
pub mod token_weights;
pub mod tokenizer;
