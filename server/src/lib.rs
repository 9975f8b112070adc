//! The `easel` binary's pieces, as a library so end-to-end tests can start the server in-process:
//! [`cli`] (arguments), [`setup`] (directories, services, cache), [`serve`] (HTTP API) and [`run`]
//! (`easel run`).

pub mod cli;
pub mod run;
pub mod serve;
pub mod setup;
