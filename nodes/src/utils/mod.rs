//! The utils category (ComfyUI's `utils/…`): primitives ([`primitive`]) and string operations
//! ([`string`]), with the Python `str` and `re` semantics they rely on ([`python_str`],
//! [`python_re`]).

pub mod primitive;
pub mod python_re;
pub mod python_str;
pub mod string;

use easel_engine::NodeRegistry;

/// Adds the utils nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    for primitive in &primitive::PRIMITIVES {
        registry.register(primitive);
    }
    registry.register(string::StringConcatenate);
    registry.register(string::StringSubstring);
    registry.register(string::StringLength);
    registry.register(string::CaseConverter);
    registry.register(string::StringTrim);
    registry.register(string::StringReplace);
    registry.register(string::StringContains);
    registry.register(string::StringCompare);
    registry.register(string::RegexMatch);
    registry.register(string::RegexExtract);
    registry.register(string::RegexReplace);
}
