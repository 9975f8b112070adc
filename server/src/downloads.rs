//! Model downloads for a fresh install (`easel models download`, `POST /v1/models/download`): a
//! file fetched over HTTP(S) into a model folder as `NAME.part`, resumed with a `Range` request
//! after a dropped connection, checked against its SHA-256 when one is given, and renamed into
//! place only when complete, so a model folder never holds half a file under a model's name.

use easel_nodes::paths::{contained_once_created, safe_relative, Paths};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// File types a model folder holds.
const MODEL_EXTENSIONS: [&str; 8] = [".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin", ".onnx"];

/// How many times a dropped transfer is resumed before the download fails.
const ATTEMPTS: usize = 4;

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} already exists; delete it first to download it again")]
    Exists(String),
    #[error("the server answered {0}")]
    Status(u16),
    #[error("the download failed: {0}")]
    Transfer(String),
    #[error("the SHA-256 is {actual}, not the expected {expected}; the file was removed")]
    Checksum { expected: String, actual: String },
    #[error("cannot write the file: {0}")]
    Io(#[from] std::io::Error),
}

/// What to download and where.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadTarget {
    pub url: String,
    /// The model folder (`checkpoints`, `loras`, …).
    pub folder: String,
    /// The file name in that folder.
    pub name: String,
    /// The final path.
    pub path: PathBuf,
    /// The expected SHA-256, lower-case hex.
    pub sha256: Option<String>,
}

impl DownloadTarget {
    /// Checks a request: an http(s) URL, a known model folder, a plain model file name (from the
    /// URL when not given) that does not exist yet, a 64-digit SHA-256.
    pub fn new(
        paths: &Paths,
        url: &str,
        folder: &str,
        name: Option<&str>,
        sha256: Option<&str>,
    ) -> Result<DownloadTarget, DownloadError> {
        let invalid = |message: String| Err(DownloadError::Invalid(message));
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return invalid(format!("`{url}` is not an http(s) URL"));
        }
        if !paths.folder_names().any(|known| known == folder) {
            return invalid(format!("`{folder}` is not a model folder (checkpoints, loras, vae, …)"));
        }
        let name = match name {
            Some(name) => name.to_string(),
            None => name_from_url(url)
                .ok_or_else(|| DownloadError::Invalid(format!("no file name in `{url}`: give one")))?,
        };
        let plain = !name.contains('/') && !name.contains('\\') && safe_relative(&name).is_some();
        let lower = name.to_ascii_lowercase();
        if !plain || !MODEL_EXTENSIONS.iter().any(|extension| lower.ends_with(extension)) {
            return invalid(format!(
                "`{name}` is not a model file name (a plain name ending in {})",
                MODEL_EXTENSIONS.join(", ")
            ));
        }
        let sha256 = match sha256 {
            Some(hex) if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
                Some(hex.to_ascii_lowercase())
            }
            Some(other) => return invalid(format!("`{other}` is not a SHA-256 (64 hexadecimal digits)")),
            None => None,
        };
        let Some(directory) = paths.folder_dirs(folder).into_iter().next() else {
            return invalid(format!("the folder `{folder}` has no directory"));
        };
        let directory = PathBuf::from(directory);
        let path = directory.join(&name);
        if !contained_once_created(&directory, &path) {
            return invalid(format!("`{name}` would leave the {folder} folder"));
        }
        if path.exists() {
            return Err(DownloadError::Exists(format!("{folder}/{name}")));
        }
        Ok(DownloadTarget {
            url: url.to_string(),
            folder: folder.to_string(),
            name,
            path,
            sha256,
        })
    }

    fn part_path(&self) -> PathBuf {
        let mut part = self.path.clone().into_os_string();
        part.push(".part");
        PathBuf::from(part)
    }
}

/// The last segment of a URL's path, percent-decoded.
pub fn name_from_url(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let last = path.rsplit('/').next().filter(|segment| !segment.is_empty())?;
    let decoded = crate::url::percent_decode(last, false);
    Some(decoded).filter(|name| !name.is_empty())
}

/// Downloads `target`, resuming dropped transfers; `progress` hears `(bytes, total)` as it goes.
/// Returns the file's SHA-256.
pub fn download(
    agent: &ureq::Agent,
    target: &DownloadTarget,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<String, DownloadError> {
    if let Some(folder) = target.path.parent() {
        std::fs::create_dir_all(folder)?;
    }
    let part = target.part_path();
    let mut last_error = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500 * attempt as u64));
        }
        match transfer(agent, target, &part, progress) {
            Ok(()) => {
                last_error = None;
                break;
            }
            Err(DownloadError::Transfer(message)) => last_error = Some(DownloadError::Transfer(message)),
            Err(DownloadError::Status(status)) if status >= 500 => last_error = Some(DownloadError::Status(status)),
            Err(other) => return Err(other),
        }
    }
    if let Some(error) = last_error {
        return Err(error);
    }
    let actual = file_sha256(&part)?;
    if let Some(expected) = &target.sha256 {
        if &actual != expected {
            let _ = std::fs::remove_file(&part);
            return Err(DownloadError::Checksum {
                expected: expected.clone(),
                actual,
            });
        }
    }
    std::fs::rename(&part, &target.path)?;
    Ok(actual)
}

/// One request: from the end of the partial file when there is one.
fn transfer(
    agent: &ureq::Agent,
    target: &DownloadTarget,
    part: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<(), DownloadError> {
    let have = std::fs::metadata(part).map_or(0, |metadata| metadata.len());
    let mut request = agent.get(&target.url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = request
        .call()
        .map_err(|error| DownloadError::Transfer(error.to_string()))?;
    let status = response.status().as_u16();
    let resumed = match status {
        206 => true,
        200 => false,
        // The part is already the whole file.
        416 if have > 0 => return Ok(()),
        other => return Err(DownloadError::Status(other)),
    };
    let length = response
        .headers()
        .get("content-length")
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let start = if resumed { have } else { 0 };
    let total = length.map(|length| start + length);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(part)?;
    let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut buffer = vec![0u8; 1 << 20];
    let mut written = start;
    progress(written, total);
    loop {
        let read = reader
            .read(&mut buffer)
            .map_err(|error| DownloadError::Transfer(error.to_string()))?;
        if read == 0 {
            break;
        }
        file.write_all(&buffer[..read])?;
        written += read as u64;
        progress(written, total);
    }
    file.sync_all()?;
    if total.is_some_and(|total| written < total) {
        return Err(DownloadError::Transfer(format!(
            "the connection closed after {written} of {} bytes",
            total.unwrap_or_default()
        )));
    }
    Ok(())
}

fn file_sha256(path: &Path) -> Result<String, DownloadError> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}

/// An agent for downloads: no overall timeout (files are large), a bounded wait for each read.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(None)
        .timeout_per_call(None)
        .build()
        .into()
}
