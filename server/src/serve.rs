//! `easel serve`: binds the address and serves the API until interrupted.

use crate::api::router;
use crate::cli::ServeArgs;
use crate::frontend::front_end_root;
use crate::listen::{self, Incoming};
use crate::setup;
use crate::state::{AppState, ServerSettings};
use crate::store::Store;
use anyhow::Context;
use std::process::ExitCode;

/// Server settings from the command line; `--api-key @FILE` reads keys one per line. An empty
/// key (an unset `$VAR`, a file without keys) is refused: it would read as "no key".
fn settings(args: &ServeArgs) -> anyhow::Result<ServerSettings> {
    let mut api_keys = Vec::new();
    for key in &args.api_key {
        match key.strip_prefix('@') {
            Some(file) => {
                let text =
                    std::fs::read_to_string(file).with_context(|| format!("cannot read API keys from {file}"))?;
                let before = api_keys.len();
                api_keys.extend(text.lines().map(str::trim).filter(|k| !k.is_empty()).map(String::from));
                if api_keys.len() == before {
                    anyhow::bail!("--api-key @{file}: the file holds no key");
                }
            }
            None if key.trim().is_empty() => {
                anyhow::bail!("--api-key is empty (an unset variable?): give a key, or leave the option out")
            }
            None => api_keys.push(key.clone()),
        }
    }
    let mut settings = ServerSettings {
        api_keys,
        cors_origin: args.enable_cors_header.clone(),
        compress_responses: args.enable_compress_response_body,
        front_end_root: front_end_root(args.front_end_root.clone()),
        multi_user: args.multi_user,
        tls: args.tls_keyfile.is_some() && args.tls_certfile.is_some(),
        max_prompt_nodes: args.max_prompt_nodes,
        ..Default::default()
    };
    settings.max_queue = args.max_queue;
    settings.download_allow_private = args.download_allow_private;
    settings.compat =
        crate::rest::compat::Compat::parse(&args.compat).map_err(|error| anyhow::anyhow!("--compat: {error}"))?;
    settings.healthz_public = args.healthz_public;
    settings.webhooks = crate::webhooks::WebhookSettings {
        secret: match &args.webhook_secret {
            Some(secret) => Some(
                crate::webhooks::parse_secret(secret).map_err(|error| anyhow::anyhow!("--webhook-secret: {error}"))?,
            ),
            None => None,
        },
        default_url: args.webhook_url.clone(),
        retry_for: std::time::Duration::from_secs(args.webhook_retry_for),
        allow_private: args.webhook_allow_private,
    };
    if let Some(url) = &settings.webhooks.default_url {
        crate::outbound::check_url(url, settings.webhooks.allow_private)
            .map_err(|error| anyhow::anyhow!("--webhook-url: {error}"))?;
    }
    for choice in &args.default_model {
        let Some((family, file)) = choice.split_once('=') else {
            anyhow::bail!("--default-model {choice}: give FAMILY=FILE, such as sdxl=sd_xl_base_1.0.safetensors");
        };
        let known = crate::rest::request::Family::ALL.iter().any(|f| f.name() == family);
        if !known {
            anyhow::bail!("--default-model {choice}: the family is one of sd15, sdxl, sd3, flux");
        }
        settings.default_models.insert(family.to_string(), file.to_string());
    }
    if let Some(megabytes) = args.max_upload_size {
        let bytes = megabytes * 1024.0 * 1024.0;
        settings.max_upload_size = bytes.round() as usize;
        settings.max_upload_size_json = serde_json::json!(bytes);
    }
    Ok(settings)
}

/// Serves until interrupted (Ctrl-C).
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = setup::runtime(&args.execution)?;
    let database = setup::database_path(args.database_url.as_deref(), &runtime)?;
    let store = Store::open(&database, args.history_size)
        .with_context(|| format!("cannot open the database {}", database.display()))?;
    let settings = settings(&args)?;
    let addresses = listen::addresses(&args.listen, args.port)?;
    let loopback = addresses.iter().all(|address| address.ip().is_loopback());
    if !loopback && settings.api_keys.is_empty() && !args.allow_unauthenticated {
        anyhow::bail!(
            "refusing to listen on {} without an API key: pass --api-key KEY, or --allow-unauthenticated",
            args.listen
        );
    }
    let tls = match (&args.tls_keyfile, &args.tls_certfile) {
        (Some(key), Some(cert)) => Some(listen::tls_acceptor(key, cert)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = AppState::start(runtime, settings, store)?;
    let tokio = setup::server_runtime()?;
    tokio.block_on(async move {
        let incoming = Incoming::bind(&addresses, tls)?;
        if !args.dont_print_server {
            tracing::info!("Starting server");
            for address in incoming.local_addrs() {
                tracing::info!("To see the GUI go to: {scheme}://{address}");
            }
        }
        axum::serve(incoming, router(state))
            .with_graceful_shutdown(async {
                // Without a signal handler there is nothing to wait for: serve until killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}
