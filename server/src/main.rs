//! The `easel` binary: a ComfyUI-compatible server (`easel`, `easel serve`) and a command line that
//! runs a workflow without one (`easel run`).

use clap::Parser;
use easel_server::cli::{Cli, Command};
use easel_server::{bench, run, serve};
use std::process::ExitCode;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Model runs allocate and free activations of hundreds of MB per layer; mimalloc reuses them
/// where the system allocator unmaps and re-faults them (see [`easel_server::allocator`], which
/// also counts the large blocks held, for the benchmarks).
#[global_allocator]
static ALLOCATOR: easel_server::allocator::CountingMiMalloc = easel_server::allocator::CountingMiMalloc;

fn main() -> ExitCode {
    easel_server::allocator::retain_freed_memory();
    let cli = Cli::parse();
    let level = cli.verbose.clone().unwrap_or_else(|| "info".into()).to_lowercase();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(easel_server::logs::LogLayer)
        .init();
    let result = match cli.command {
        Some(Command::Run(args)) => run::run(args),
        Some(Command::Serve(args)) => serve::serve(*args),
        Some(Command::Bench(args)) => bench::bench(args),
        Some(Command::Testmodels(args)) => testmodels(&args.dir),
        Some(Command::Models(args)) => models(args),
        None => serve::serve(cli.serve),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `easel models download URL`: the file into its model folder, with a progress bar.
fn models(args: easel_server::cli::ModelsArgs) -> anyhow::Result<ExitCode> {
    let easel_server::cli::ModelsAction::Download(download) = args.action;
    let execution = easel_server::cli::ExecutionArgs {
        directories: download.directories.clone(),
        ..Default::default()
    };
    let paths = easel_server::setup::paths(&execution)?;
    let target = easel_server::downloads::DownloadTarget::new(
        &paths,
        &download.url,
        &download.folder,
        download.name.as_deref(),
        download.sha256.as_deref(),
    )?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(target.name.clone());
    let sha256 = easel_server::downloads::download(&easel_server::downloads::agent(), &target, &mut |bytes, total| {
        if let Some(total) = total {
            bar.set_length(total);
        }
        bar.set_position(bytes);
    })?;
    bar.finish_and_clear();
    println!("{} (sha256 {sha256})", target.path.display());
    Ok(ExitCode::SUCCESS)
}

/// `easel testmodels DIR`: writes the tiny test models and lists them.
fn testmodels(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    for path in easel_models::testmodels::write_test_models(dir)? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
