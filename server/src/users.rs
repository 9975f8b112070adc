//! Who a request acts for (protocol §1.15). With `--multi-user` the `comfy-user` header names
//! one of the users recorded in `<user directory>/users.json`, and each user's data lives in
//! `<user directory>/<id>`; without it every request acts for `default`, whatever it sends.

use easel_engine::pyjson::dumps;
use indexmap::IndexMap;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The single user of a server without `--multi-user`.
pub const DEFAULT_USER: &str = "default";

/// Ids starting with this are the server's own and never reachable from a request.
const SYSTEM_USER_PREFIX: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("Unknown user: {0}")]
    Unknown(String),
    #[error("Duplicate username.")]
    Duplicate,
    #[error("username not provided")]
    NoName,
    #[error("System User prefix not allowed")]
    SystemPrefix,
    #[error("cannot record the user in {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The known users, id → name, and whether requests may choose among them.
pub struct Users {
    multi_user: bool,
    known: Mutex<IndexMap<String, String>>,
}

/// Where the users are recorded.
fn users_file(user_directory: &Path) -> PathBuf {
    user_directory.join("users.json")
}

impl Users {
    /// With `multi_user`, the users recorded in the user directory's `users.json` (none when it
    /// is missing or unreadable); without, only `default`.
    pub fn load(user_directory: Option<&Path>, multi_user: bool) -> Self {
        let file = user_directory.map(users_file);
        let known = if multi_user {
            match file.as_ref().map(std::fs::read) {
                Some(Ok(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                    tracing::error!("ignoring the unreadable users.json: {error}");
                    IndexMap::new()
                }),
                _ => IndexMap::new(),
            }
        } else {
            IndexMap::from([(DEFAULT_USER.to_string(), DEFAULT_USER.to_string())])
        };
        Users {
            multi_user,
            known: Mutex::new(known),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, IndexMap<String, String>> {
        self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The id of the user a request acts for, from its `comfy-user` header.
    pub fn resolve(&self, header: Option<&str>) -> Result<String, UserError> {
        let user = match header {
            Some(user) if self.multi_user => {
                if user.starts_with(SYSTEM_USER_PREFIX) {
                    return Err(UserError::Unknown(user.to_string()));
                }
                user
            }
            _ => DEFAULT_USER,
        };
        // An id names one folder inside the user directory, whatever a hand-edited users.json says.
        let one_folder = !matches!(user, "" | "." | "..") && !user.contains(['/', '\\', '\0']);
        if one_folder && self.known().contains_key(user) {
            Ok(user.to_string())
        } else {
            Err(UserError::Unknown(user.to_string()))
        }
    }

    /// `GET /users` with `--multi-user`: every user, id → name; `None` without it.
    pub fn listing(&self) -> Option<Json> {
        self.multi_user
            .then(|| serde_json::to_value(&*self.known()).unwrap_or_default())
    }

    /// Records a new user in `user_directory` and returns its id: the name with runs of other characters than
    /// `[a-zA-Z0-9-_]` replaced by `-`, then `_` and a random UUID.
    pub fn add(&self, username: &str, user_directory: &Path) -> Result<String, UserError> {
        let mut known = self.known();
        if known.values().any(|name| name == username) {
            return Err(UserError::Duplicate);
        }
        let name = username.trim();
        if name.is_empty() {
            return Err(UserError::NoName);
        }
        let mut slug = String::new();
        let mut replacing = false;
        for c in name.chars() {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                slug.push(c);
                replacing = false;
            } else if !replacing {
                slug.push('-');
                replacing = true;
            }
        }
        if name.starts_with(SYSTEM_USER_PREFIX) || slug.starts_with(SYSTEM_USER_PREFIX) {
            return Err(UserError::SystemPrefix);
        }
        let id = format!("{slug}_{}", uuid::Uuid::new_v4());
        known.insert(id.clone(), name.to_string());
        let file = users_file(user_directory);
        std::fs::write(&file, dumps(&*known)).map_err(|source| UserError::Write { path: file, source })?;
        Ok(id)
    }
}
