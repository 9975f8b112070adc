//! Drop-in routes for clients of the services people run today (`shared/docs/rest-api.md`): a
//! company's per-family REST layer over ComfyUI ([`family`]), GenServe ([`genserve`]) and
//! FooocusAPI ([`fooocus`]). Each maps its request fields, with its own defaults, onto Easel's
//! generation request and answers in its own shape; each is switched on by `--compat` (all by
//! default) and never shadows ComfyUI's routes, except GenServe's `GET /models` when GenServe is
//! the only one on (ComfyUI's stays at `/api/models`).

pub mod family;
pub mod fooocus;
pub mod genserve;
pub mod schemas;

use crate::state::AppState;
use axum::Router;

/// Which drop-in route sets are served (`--compat family,genserve,fooocus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compat {
    pub family: bool,
    pub genserve: bool,
    pub fooocus: bool,
}

impl Default for Compat {
    fn default() -> Self {
        Compat {
            family: true,
            genserve: true,
            fooocus: true,
        }
    }
}

impl Compat {
    /// `family,genserve,fooocus`, a subset, or `none`.
    pub fn parse(list: &str) -> Result<Compat, String> {
        let mut compat = Compat {
            family: false,
            genserve: false,
            fooocus: false,
        };
        for name in list.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            match name {
                "family" => compat.family = true,
                "genserve" => compat.genserve = true,
                "fooocus" => compat.fooocus = true,
                "none" => {}
                other => {
                    return Err(format!(
                        "unknown drop-in API `{other}`: use family, genserve, fooocus or none"
                    ))
                }
            }
        }
        Ok(compat)
    }

    /// Whether GenServe's `GET /models` replaces ComfyUI's (GenServe alone is on).
    pub fn genserve_owns_models(&self) -> bool {
        self.genserve && !self.family && !self.fooocus
    }
}

/// The drop-in routes that are switched on.
pub fn routes(compat: Compat) -> Router<AppState> {
    let mut router = Router::new();
    if compat.family {
        router = router.merge(family::routes());
    }
    if compat.genserve {
        router = router.merge(genserve::routes(compat.genserve_owns_models()));
    }
    if compat.fooocus {
        router = router.merge(fooocus::routes());
    }
    router
}
