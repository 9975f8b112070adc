//! The `easel` binary's pieces, as a library so end-to-end tests can start the server in-process.
//!
//! - [`cli`]: arguments; [`setup`]: directories, services, cache mode; [`run`]: `easel run`;
//! - [`bench`]: `easel bench server`;
//! - [`serve`]: `easel serve`; [`listen`]: its sockets, plain or TLS; [`api`]: the HTTP routes; [`ws`]: the WebSocket;
//! - [`rest`]: the REST API for people who don't edit graphs (`/v1/…`); [`webhooks`]: its task
//!   webhooks; [`metrics`]: `/metrics`, `/healthz`, `/readyz`; [`downloads`]: model downloads;
//! - [`outbound`]: where the server's own requests may go;
//! - [`frontend`]: where the official ComfyUI frontend is found;
//! - [`state`]: what the routes share; [`queue`]: prompts waiting; [`store`]: queue and history on disk;
//! - [`worker`]: executes queued prompts; [`hub`]: delivers messages to WebSocket clients;
//! - [`security`]: API keys, the origin check and CORS; [`url`]: percent-decoding;
//! - [`users`]: whose user data a request reads and writes (`--multi-user`);
//! - [`logs`]: the log lines the frontend's log panel shows; [`allocator`]: freed memory kept or returned.

pub mod allocator;
pub mod api;
pub mod bench;
pub mod cli;
pub mod downloads;
pub mod frontend;
pub mod hub;
pub mod listen;
pub mod logs;
pub mod metrics;
pub mod outbound;
pub mod queue;
pub mod rest;
pub mod run;
pub mod security;
pub mod serve;
pub mod setup;
pub mod state;
pub mod store;
pub mod url;
pub mod users;
pub mod webhooks;
pub mod worker;
pub mod ws;
