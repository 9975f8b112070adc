//! Where a T5 text encoder's tokenizer comes from. T5 weights files (safetensors or GGUF) carry no
//! usable vocabulary, and ComfyUI ships its `tokenizer.json` in its source tree; Easel looks, in
//! order, for a T5 `tokenizer.json`
//! 1. beside the text encoder (`tokenizer.json`, or `t5_tokenizer/tokenizer.json`, ComfyUI's
//!    folder name),
//! 2. in every text-encoder folder (`t5_tokenizer/tokenizer.json`),
//! 3. in the download cache (`t5_tokenizer/tokenizer.json`),
//!
//! and otherwise downloads ComfyUI's copy once into the cache. A file is taken only when it is a
//! T5 vocabulary (`<pad>` = 0, `</s>` = 1), so a CLIP `tokenizer.json` beside the encoder is
//! passed over.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use easel_engine::Services;
use easel_models::text::t5_tokenizer::{
    T5Tokenizer, T5TokenizerError, T5_END_TOKEN, T5_PAD_TOKEN, T5_TOKENIZER_FOLDER,
};

use crate::paths::Paths;

/// ComfyUI 0.3.64's T5 tokenizer, the file its T5 text encoders tokenize with.
pub const COMFYUI_T5_TOKENIZER_URL: &str =
    "https://raw.githubusercontent.com/comfyanonymous/ComfyUI/v0.3.64/comfy/text_encoders/t5_tokenizer/tokenizer.json";
/// A tokenizer.json larger than this is not T5's (ComfyUI's is 2.4 MB).
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Where downloaded tokenizers are kept, and where from they are downloaded (a service; without
/// it, or without a URL, nothing is downloaded).
#[derive(Clone, Debug)]
pub struct TokenizerDownloads {
    pub cache_dir: PathBuf,
    pub t5_url: Option<String>,
}

impl TokenizerDownloads {
    /// `$XDG_CACHE_HOME/easel`, else `~/.cache/easel`, else `.easel-cache`.
    pub fn default_cache_dir() -> PathBuf {
        let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty());
        match (xdg, std::env::var_os("HOME")) {
            (Some(dir), _) => PathBuf::from(dir).join("easel"),
            (None, Some(home)) => PathBuf::from(home).join(".cache").join("easel"),
            (None, None) => PathBuf::from(".easel-cache"),
        }
    }

    fn cached_t5(&self) -> PathBuf {
        self.cache_dir.join(T5_TOKENIZER_FOLDER).join("tokenizer.json")
    }
}

/// Where T5 tokenizers are looked for (the model folders) and fetched from.
#[derive(Clone, Copy, Default)]
pub struct TokenizerSearch<'a> {
    pub paths: Option<&'a Paths>,
    pub downloads: Option<&'a TokenizerDownloads>,
}

impl<'a> TokenizerSearch<'a> {
    /// The registry's folders and download settings.
    pub fn of(services: &'a Services) -> Self {
        TokenizerSearch {
            paths: services.get::<Paths>(),
            downloads: services.get::<TokenizerDownloads>(),
        }
    }
}

/// The T5 tokenizer for the text encoder at `encoder` (see the module documentation).
pub fn find_t5_tokenizer(encoder: &Path, search: TokenizerSearch) -> Result<Arc<T5Tokenizer>, T5TokenizerError> {
    let TokenizerSearch { paths, downloads } = search;
    let mut candidates = Vec::new();
    if let Some(dir) = encoder.parent() {
        candidates.push(dir.join("tokenizer.json"));
        candidates.push(dir.join(T5_TOKENIZER_FOLDER).join("tokenizer.json"));
    }
    for dir in paths
        .map(|paths| paths.folder_dirs("text_encoders"))
        .unwrap_or_default()
    {
        let candidate = Path::new(&dir).join(T5_TOKENIZER_FOLDER).join("tokenizer.json");
        if !candidates.contains(&candidate) {
            candidates.push(candidate);
        }
    }
    if let Some(downloads) = downloads {
        candidates.push(downloads.cached_t5());
    }
    for candidate in &candidates {
        if let Some(tokenizer) = t5_tokenizer_at(candidate) {
            return Ok(Arc::new(tokenizer));
        }
    }
    let looked_in = candidates
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let not_found = |download: String| T5TokenizerError::NotFound {
        encoder: encoder.to_path_buf(),
        looked_in: looked_in.clone(),
        download,
    };
    let Some((downloads, url)) = downloads.and_then(|d| d.t5_url.as_deref().map(|url| (d, url))) else {
        return Err(not_found("downloads are off".into()));
    };
    let target = downloads.cached_t5();
    tracing::info!("downloading the T5 tokenizer from {url} into {}", target.display());
    download(url, &target).map_err(|reason| not_found(format!("downloading {url} failed: {reason}")))?;
    match t5_tokenizer_at(&target) {
        Some(tokenizer) => Ok(Arc::new(tokenizer)),
        None => {
            // Not a T5 vocabulary: do not keep it where the next search would look.
            let _ = std::fs::remove_file(&target);
            Err(not_found(format!("{url} is not a T5 tokenizer.json")))
        }
    }
}

/// The T5 tokenizer at `path`, when there is one there.
fn t5_tokenizer_at(path: &Path) -> Option<T5Tokenizer> {
    if !path.is_file() {
        return None;
    }
    match T5Tokenizer::from_file(path) {
        Ok(tokenizer)
            if tokenizer.token_id("<pad>") == Some(T5_PAD_TOKEN)
                && tokenizer.token_id("</s>") == Some(T5_END_TOKEN) =>
        {
            tracing::debug!("T5 tokenizer: {}", path.display());
            Some(tokenizer)
        }
        Ok(_) => {
            tracing::debug!("{} is not a T5 tokenizer (no <pad> = 0, </s> = 1)", path.display());
            None
        }
        Err(error) => {
            tracing::warn!("{error}");
            None
        }
    }
}

/// Fetches `url` into `target` (through a temporary file beside it, renamed when complete).
fn download(url: &str, target: &Path) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(DOWNLOAD_TIMEOUT))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .root_certs(ureq::tls::RootCerts::new_with_certs(&system_root_certificates()))
                .build(),
        )
        .build()
        .into();
    let response = agent.get(url).call().map_err(|error| error.to_string())?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(MAX_TOKENIZER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| error.to_string())?;
    if bytes.len() as u64 > MAX_TOKENIZER_BYTES {
        return Err(format!("the file is larger than {MAX_TOKENIZER_BYTES} bytes"));
    }
    let dir = target.parent().ok_or("the cache path has no folder")?;
    std::fs::create_dir_all(dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let partial = target.with_extension("json.part");
    std::fs::write(&partial, &bytes).map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
    std::fs::rename(&partial, target).map_err(|error| format!("cannot write {}: {error}", target.display()))
}

/// The certificate authorities the system trusts: `SSL_CERT_FILE`, else the first bundle found
/// where Linux distributions and macOS keep it.
fn system_root_certificates() -> Vec<ureq::tls::Certificate<'static>> {
    let bundles = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from).into_iter().chain(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/ca-bundle.pem",
            "/etc/ssl/cert.pem",
        ]
        .map(PathBuf::from),
    );
    for bundle in bundles {
        if let Ok(pem) = std::fs::read(&bundle) {
            let certificates: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate),
                    _ => None,
                })
                .collect();
            if !certificates.is_empty() {
                return certificates;
            }
        }
    }
    tracing::warn!("no system certificate bundle found (set SSL_CERT_FILE): HTTPS downloads will fail");
    Vec::new()
}
