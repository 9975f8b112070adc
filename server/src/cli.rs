//! Command-line arguments, with ComfyUI's flag names where ComfyUI has the flag.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "easel",
    version,
    about = "A ComfyUI-compatible node-graph engine and server."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `easel` alone is `easel serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log level (error, warn, info, debug, trace); the bare flag means debug. `RUST_LOG` overrides.
    #[arg(long, global = true, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "debug")]
    pub verbose: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve ComfyUI's HTTP API (the default).
    Serve(Box<ServeArgs>),
    /// Execute an API-format workflow without a server; prints the history `outputs` JSON last.
    Run(RunArgs),
    /// Measure the server (`easel bench server`) or SD1.x compute (`easel bench sd15`) and print a table.
    Bench(BenchArgs),
    /// Write tiny random-weight models (real file formats) into a models directory, for tests.
    Testmodels(TestmodelsArgs),
    /// Manage model files (`easel models download URL --folder checkpoints`).
    Models(ModelsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub action: ModelsAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ModelsAction {
    /// Download a model file into its folder: resumed if interrupted, checked against --sha256,
    /// renamed into place only when complete.
    Download(DownloadArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DownloadArgs {
    /// The file's http(s) URL.
    pub url: String,
    /// The model folder (checkpoints, loras, vae, text_encoders, diffusion_models, …).
    #[arg(long, default_value = "checkpoints")]
    pub folder: String,
    /// The file name (default: the URL's last path segment).
    #[arg(long)]
    pub name: Option<String>,
    /// The expected SHA-256 (64 hexadecimal digits).
    #[arg(long)]
    pub sha256: Option<String>,
    #[command(flatten)]
    pub directories: DirectoryArgs,
}

#[derive(Args, Debug, Clone)]
pub struct TestmodelsArgs {
    /// The models directory (ComfyUI's `models`): files go into its `checkpoints` folder.
    pub dir: std::path::PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub target: BenchTarget,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Requests per measurement.
    #[arg(long, default_value_t = 6400)]
    pub requests: usize,
    /// Timed runs per model measurement (after one warm-up run).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Only the tiny test model (skips writing and running the full-size checkpoint: 2.1 GB for
    /// SD1.5, 7 GB for SDXL).
    #[arg(long)]
    pub tiny_only: bool,
    /// sdxl, sd3, flux: measure this checkpoint (a real one, or a random one the benchmark writes and
    /// measures in a fresh process) instead of writing random ones.
    #[arg(long)]
    pub checkpoint: Option<std::path::PathBuf>,
    /// flux: with `--checkpoint`, measure the model with this LoRA applied (strength 1).
    #[arg(long)]
    pub lora: Option<std::path::PathBuf>,
    /// flux: FLUX.1-dev's full depth (19 double and 38 single blocks) as GGUF Q8_0 only: the
    /// peak memory of a full-size file (12.7 GB of disk; as bf16 it would be 23.8 GB).
    #[arg(long)]
    pub full_depth: bool,
    /// controlnet, ipadapter, upscale: also time ComfyUI's own code from this checkout (v0.3.64), on
    /// PyTorch.
    #[arg(long, value_name = "DIR")]
    pub comfyui: Option<std::path::PathBuf>,
    /// controlnet, ipadapter, upscale: the Python (with torch) that runs ComfyUI's side.
    #[arg(long, value_name = "PATH", default_value = "python3")]
    pub python: std::path::PathBuf,
    /// validation: how many outputs of the prompt fail.
    #[arg(long, default_value_t = 4000)]
    pub outputs: usize,
    /// Print the table's rows without its header (the benchmark's own child processes).
    #[arg(long, hide = true)]
    pub rows_only: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum BenchTarget {
    /// The HTTP API on loopback.
    Server,
    /// The REST API's overhead over `POST /prompt` (request to queued).
    Rest,
    /// Stable Diffusion 1.x: load, UNet step and VAE decode times, peak memory.
    Sd15,
    /// SDXL: load, UNet step at 512² and 1024², rank-32 LoRA patch time, peak memory.
    Sdxl,
    /// SD3: the tiny SD3 and a full-size SD3.5 medium MMDiT: load, CFG step at 512² and 1024²,
    /// peak memory against file size.
    Sd3,
    /// FLUX: a full-width FLUX-shaped model as bf16, GGUF Q8_0 and Q4_K: step at 256² and 512²,
    /// peak memory against file size.
    Flux,
    /// ControlNet: the SD1.5 step at 512² alone, with one ControlNet and with two chained
    /// (`--comfyui DIR`: ComfyUI's too, on PyTorch).
    Controlnet,
    /// IP-Adapter: the SD1.5 step at 512² alone and with a standard IP-Adapter, and a ViT-H
    /// CLIP vision encode (`--comfyui DIR`: ComfyUI's and the pack's too, on PyTorch).
    Ipadapter,
    /// Validation of a prompt whose outputs all fail (`--outputs N`): time, error body size and
    /// peak memory.
    Validation,
    /// EasyCache and LazyCache: time, network calls and difference from the uncached latent of
    /// one sampling run on an SD1-shaped model (`--tiny-only`: the tiny test model).
    StepCache,
    /// Upscale models: a 4× RRDBNet the size of 4x-UltraSharp on a 512² image, time and peak
    /// memory (`--comfyui DIR`: spandrel's on PyTorch too, from `--python`).
    Upscale,
}

/// Where things live: ComfyUI's directory flags.
#[derive(Args, Debug, Clone, Default)]
pub struct DirectoryArgs {
    /// Base for models/, input/, output/, temp/ and user/ (created if absent).
    #[arg(long, value_name = "DIR", default_value = "easel-data")]
    pub base_directory: PathBuf,
    /// Output directory (default: <base>/output).
    #[arg(long, value_name = "DIR")]
    pub output_directory: Option<PathBuf>,
    /// Input directory (default: <base>/input).
    #[arg(long, value_name = "DIR")]
    pub input_directory: Option<PathBuf>,
    /// Temporary files go to DIR/temp (default: <base>/temp).
    #[arg(long, value_name = "DIR")]
    pub temp_directory: Option<PathBuf>,
    /// User directory (default: <base>/user).
    #[arg(long, value_name = "DIR")]
    pub user_directory: Option<PathBuf>,
    /// Extra model folders, in ComfyUI's extra_model_paths.yaml format (repeatable).
    #[arg(long, value_name = "YAML", num_args = 1..)]
    pub extra_model_paths_config: Vec<PathBuf>,
}

/// How node outputs are cached between prompts (ComfyUI's three flags).
#[derive(Args, Debug, Clone, Default)]
#[group(multiple = false)]
pub struct CacheArgs {
    /// Keep only what the next prompt reuses (the default).
    #[arg(long)]
    pub cache_classic: bool,
    /// Keep up to N outputs across prompts, least recently used evicted first.
    #[arg(long, value_name = "N")]
    pub cache_lru: Option<usize>,
    /// Cache nothing between prompts.
    #[arg(long)]
    pub cache_none: bool,
}

/// Options shared by everything that executes prompts.
#[derive(Args, Debug, Clone, Default)]
pub struct ExecutionArgs {
    #[command(flatten)]
    pub directories: DirectoryArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Write no prompt or workflow into saved images.
    #[arg(long)]
    pub disable_metadata: bool,
    /// Live sampling previews sent to clients: none, auto, latent2rgb, taesd (TAESD decoders are
    /// not supported yet: auto and taesd colour the latent as latent2rgb does).
    #[arg(long, value_name = "METHOD", value_enum, default_value_t)]
    pub preview_method: PreviewMethodArg,
    /// Previews are scaled to fit this many pixels.
    #[arg(long, value_name = "PIXELS", default_value_t = 512)]
    pub preview_size: u32,
    /// Memory for loaded models kept between prompts, in GiB (least recently used first out).
    #[arg(long, value_name = "GIB", default_value_t = 16.0)]
    pub model_cache_size: f64,
    /// Run the diffusion model in bf16: weights and activations rounded to bf16, sums in f32
    /// (AVX512-BF16; on a CPU without it the model runs in f32). Images differ slightly from f32.
    #[arg(long)]
    pub bf16_unet: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Addresses to listen on, comma-separated (bare flag: every IPv4 and IPv6 address).
    #[arg(long, value_name = "IP[,IP...]", default_value = "127.0.0.1", num_args = 0..=1, default_missing_value = "0.0.0.0,::")]
    pub listen: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8188)]
    pub port: u16,
    /// Serve HTTPS and WSS with this PEM private key (needs --tls-certfile).
    #[arg(long, value_name = "FILE", requires = "tls_certfile")]
    pub tls_keyfile: Option<PathBuf>,
    /// The PEM certificate chain for --tls-keyfile.
    #[arg(long, value_name = "FILE", requires = "tls_keyfile")]
    pub tls_certfile: Option<PathBuf>,
    /// Keep user data per user, chosen by the `comfy-user` request header.
    #[arg(long)]
    pub multi_user: bool,
    /// Where queued prompts and history are kept: `sqlite:///path/to/file.db` or a path
    /// (default: <user directory>/easel.db).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// How many history entries `/history` shows (older ones stay on disk until deleted).
    #[arg(long, value_name = "N", default_value_t = 10000)]
    pub history_size: usize,
    /// Require this API key on every request (repeatable; `@FILE` reads one key per line).
    #[arg(long, value_name = "KEY")]
    pub api_key: Vec<String>,
    /// Refuse prompts of more nodes than this (400).
    #[arg(long, value_name = "N", default_value_t = crate::state::DEFAULT_MAX_PROMPT_NODES)]
    pub max_prompt_nodes: usize,
    /// The checkpoint REST requests of a family get when they name none, as FAMILY=FILE
    /// (sd15, sdxl, sd3, flux; repeatable). Without it, the first of the family in models/checkpoints.
    #[arg(long, value_name = "FAMILY=FILE")]
    pub default_model: Vec<String>,
    /// REST requests beyond this many queued or running prompts get 429 with Retry-After
    /// (`/readyz` reports not ready).
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Answer `/healthz` without an API key.
    #[arg(long)]
    pub healthz_public: bool,
    /// Sign webhooks with this Standard Webhooks secret (`whsec_<base64>`).
    #[arg(long, value_name = "SECRET")]
    pub webhook_secret: Option<String>,
    /// Report every REST task that names no webhook here.
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// Retry a failed webhook for this many seconds after its task ended.
    #[arg(long, value_name = "SECONDS", default_value_t = 86400)]
    pub webhook_retry_for: u64,
    /// Let webhooks go to loopback and private addresses.
    #[arg(long)]
    pub webhook_allow_private: bool,
    /// The drop-in REST APIs to serve: family, genserve, fooocus (comma-separated), or none.
    #[arg(long, value_name = "LIST", default_value = "family,genserve,fooocus")]
    pub compat: String,
    /// Let `POST /v1/models/download` fetch from loopback and private addresses.
    #[arg(long)]
    pub download_allow_private: bool,
    /// Allow listening on a non-loopback address without an API key.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Send CORS headers for ORIGIN (bare flag: `*`) instead of checking the Origin header.
    #[arg(long, value_name = "ORIGIN", num_args = 0..=1, default_missing_value = "*")]
    pub enable_cors_header: Option<String>,
    /// The largest request body, in MB.
    #[arg(long, value_name = "MB")]
    pub max_upload_size: Option<f64>,
    /// Serve this directory as the web root (a built ComfyUI frontend); without it, the frontend
    /// of `pip install comfyui-frontend-package` is served if Python finds one.
    #[arg(long, value_name = "DIR")]
    pub front_end_root: Option<std::path::PathBuf>,
    /// Gzip JSON and text responses for clients that accept gzip.
    #[arg(long)]
    pub enable_compress_response_body: bool,
    /// Do not print the address the server listens on.
    #[arg(long)]
    pub dont_print_server: bool,
    #[command(flatten)]
    pub execution: ExecutionArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// An API-format workflow, or a `POST /prompt` body (`{"prompt": …, "extra_data": …}`).
    pub workflow: PathBuf,
    #[command(flatten)]
    pub execution: ExecutionArgs,
}

/// `--preview-method` values, as ComfyUI spells them.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PreviewMethodArg {
    #[default]
    None,
    Auto,
    Latent2rgb,
    Taesd,
}
