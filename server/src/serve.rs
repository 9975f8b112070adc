//! `easel serve`: binds the address and serves the API until interrupted.

use crate::api::router;
use crate::cli::ServeArgs;
use crate::setup;
use crate::state::{AppState, ServerSettings};
use crate::store::Store;
use anyhow::Context;
use std::process::ExitCode;

/// Serves until interrupted (Ctrl-C).
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = setup::runtime(&args.execution)?;
    let database = setup::database_path(args.database_url.as_deref(), &runtime)?;
    let store = Store::open(&database, args.history_size)
        .with_context(|| format!("cannot open the database {}", database.display()))?;
    let state = AppState::start(runtime, ServerSettings::default(), store)?;
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    tokio.block_on(async move {
        let address = format!("{}:{}", args.listen, args.port);
        let listener = tokio::net::TcpListener::bind(&address).await?;
        tracing::info!("Starting server");
        tracing::info!("To see the GUI go to: http://{address}");
        axum::serve(listener, router(state))
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
