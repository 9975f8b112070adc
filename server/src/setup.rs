//! Turns command-line options into the engine's pieces: directories, services, cache mode.

use crate::cli::{CacheArgs, ExecutionArgs, PreviewMethodArg};
use anyhow::Context;
use easel_engine::{CacheMode, NodeRegistry, Services};
use easel_models::kernels::sgemm::Precision;
use easel_nodes::image::nodes::ImageMetadata;
use easel_nodes::model_cache::ModelCache;
use easel_nodes::paths::Paths;
use easel_nodes::runtime::DiffusionModelPrecision;
use easel_nodes::sampling::preview::{PreviewMethod, PreviewSettings};
use std::path::PathBuf;
use std::sync::Arc;

/// Everything needed to validate and execute prompts.
pub struct Runtime {
    pub registry: Arc<NodeRegistry>,
    pub services: Arc<Services>,
    pub cache_mode: CacheMode,
}

/// Resolves the directories (reading extra model paths) and creates the missing ones.
pub fn paths(args: &ExecutionArgs) -> anyhow::Result<Paths> {
    let dirs = &args.directories;
    let mut paths = Paths::new(&dirs.base_directory);
    if let Some(dir) = &dirs.output_directory {
        paths = paths.with_output(dir);
    }
    if let Some(dir) = &dirs.input_directory {
        paths = paths.with_input(dir);
    }
    if let Some(dir) = &dirs.temp_directory {
        paths = paths.with_temp_parent(dir);
    }
    if let Some(dir) = &dirs.user_directory {
        paths = paths.with_user(dir);
    }
    for config in &dirs.extra_model_paths_config {
        paths.load_extra_model_paths(config)?;
    }
    let paths = paths.finish();
    paths
        .prepare()
        .with_context(|| format!("cannot create the directories under {}", paths.base.display()))?;
    Ok(paths)
}

pub fn cache_mode(args: &CacheArgs) -> CacheMode {
    match (args.cache_none, args.cache_lru) {
        (true, _) => CacheMode::None,
        (false, Some(size)) if size > 0 => CacheMode::Lru(size),
        _ => CacheMode::Classic,
    }
}

/// The SQLite file of `--database-url` (`sqlite:///absolute/path`, `sqlite:///relative`, or a plain
/// path); by default `easel.db` in the user directory.
pub fn database_path(url: Option<&str>, runtime: &Runtime) -> anyhow::Result<PathBuf> {
    match url {
        Some(url) => {
            let path = url.strip_prefix("sqlite:///").map(|rest| {
                // `sqlite:////abs` and `sqlite:///abs` both mean an absolute path when it exists as one.
                if url.starts_with("sqlite:////") {
                    format!("/{}", rest.trim_start_matches('/'))
                } else {
                    rest.to_string()
                }
            });
            match (path, url.contains("://")) {
                (Some(path), _) => Ok(PathBuf::from(path)),
                (None, false) => Ok(PathBuf::from(url)),
                (None, true) => anyhow::bail!("unsupported --database-url {url}: use sqlite:///path or a file path"),
            }
        }
        None => {
            let paths = runtime
                .services
                .get::<Paths>()
                .context("directories are not configured")?;
            Ok(paths.user.join("easel.db"))
        }
    }
}

pub fn runtime(args: &ExecutionArgs) -> anyhow::Result<Runtime> {
    let mut services = Services::new();
    services.insert(paths(args)?);
    services.insert(ImageMetadata {
        enabled: !args.disable_metadata,
    });
    services.insert(ModelCache::new(
        (args.model_cache_size.max(0.0) * (1u64 << 30) as f64) as u64,
    ));
    services.insert(candle_core::Device::Cpu);
    if args.bf16_unet {
        if !Precision::bf16_supported() {
            tracing::warn!("--bf16-unet: this CPU has no AVX512-BF16, the diffusion model runs in f32");
        }
        services.insert(DiffusionModelPrecision(Precision::Bf16));
    }
    let method = match args.preview_method {
        PreviewMethodArg::None => PreviewMethod::None,
        PreviewMethodArg::Auto => PreviewMethod::Auto,
        PreviewMethodArg::Latent2rgb => PreviewMethod::Latent2Rgb,
        PreviewMethodArg::Taesd => PreviewMethod::Taesd,
    };
    services.insert(PreviewSettings {
        method,
        max_size: args.preview_size,
    });
    Ok(Runtime {
        registry: Arc::new(easel_nodes::builtin_registry()),
        services: Arc::new(services),
        cache_mode: cache_mode(&args.cache),
    })
}

/// The tokio runtime the HTTP server runs on. Its blocking pool (prompt validation and store
/// writes, file reads) is kept to a few threads per core: they mostly queue on the store's one
/// connection, and hundreds of short-lived threads cost more in wake-ups and per-thread allocator
/// heaps than they gain (`easel bench server`: POST /prompt p50 halves, throughput +50%).
pub fn server_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads((4 * cores).max(8))
        .enable_all()
        .build()
}
