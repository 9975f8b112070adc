//! Easel built-in nodes.
