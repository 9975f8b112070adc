//! Who may call the server: API keys, ComfyUI's origin check (done for every host), and CORS.
//!
//! With keys configured, every route (the WebSocket, `/view` and static files included) needs one:
//! the `X-API-KEY` header, `Authorization: Bearer <key>`, or, for browsers, a `token` query
//! parameter, which is answered with an HttpOnly cookie so the page's later requests carry it.

use crate::api::error_response;
use crate::state::AppState;
use crate::url::percent_decode;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The cookie a browser gets after presenting `?token=`.
const COOKIE: &str = "easel_token";

/// Equal-length comparison in time independent of where the keys differ.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key);
    }
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())?;
    bearer.strip_prefix("Bearer ").map(str::trim)
}

fn cookie_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|cookie| cookie.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let value = pair.strip_prefix("token=")?;
        Some(percent_decode(value, true))
    })
}

fn unauthorized() -> Response {
    let mut response = error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "An API key is required",
        "Send it as X-API-KEY, Authorization: Bearer, or ?token=",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Requires an API key when the server has any.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = &state.settings.api_keys;
    // A CORS preflight carries no credentials; the request it announces will.
    let preflight = request.method() == Method::OPTIONS && state.settings.cors_origin.is_some();
    let public_health = state.settings.healthz_public && request.uri().path() == "/healthz";
    if keys.is_empty() || preflight || public_health {
        return next.run(request).await;
    }
    let valid = |key: &str| keys.iter().any(|k| same_key(k, key));
    let headers = request.headers();
    if header_key(headers).is_some_and(valid) || cookie_key(headers).is_some_and(valid) {
        return next.run(request).await;
    }
    match query_token(request.uri().query()) {
        Some(token) if valid(&token) => {
            let mut response = next.run(request).await;
            let secure = if state.settings.tls { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}");
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().append(header::SET_COOKIE, value);
            }
            response
        }
        _ => unauthorized(),
    }
}

/// Whether `host` names this machine.
fn is_loopback(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(h, port)| !h.is_empty() && port.chars().all(|c| c.is_ascii_digit()));
    let name = name
        .map_or(host, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// ComfyUI's origin check, extended: when a browser's `Origin` does not match `Host`, the request is
/// refused (403) if the server is addressed as loopback (ComfyUI's rule) or if it would change
/// something (any method but GET, HEAD and OPTIONS). With `--enable-cors-header`, CORS headers
/// replace the check, as in ComfyUI.
pub async fn check_origin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(allowed) = state.settings.cors_origin.clone() {
        if request.method() == Method::OPTIONS {
            return with_cors(StatusCode::OK.into_response(), &allowed);
        }
        return with_cors(next.run(request).await, &allowed);
    }
    if request.method() == Method::OPTIONS {
        return StatusCode::OK.into_response();
    }
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let (Some(host), Some(origin)) = (host, origin) {
        let mutating = !matches!(*request.method(), Method::GET | Method::HEAD);
        if (mutating || is_loopback(host)) && !same_origin(host, origin) {
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    next.run(request).await
}

/// Compares `Host` with the origin's host and port (ports ignored when the origin has none).
fn same_origin(host: &str, origin: &str) -> bool {
    let netloc = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    let has_port = |h: &str| {
        h.rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    };
    let strip = |h: &str| {
        if has_port(h) {
            h.rsplit_once(':').map_or(h, |(name, _)| name).to_ascii_lowercase()
        } else {
            h.to_ascii_lowercase()
        }
    };
    if has_port(netloc) {
        netloc.eq_ignore_ascii_case(host)
    } else {
        strip(netloc) == strip(host)
    }
}

fn with_cors(mut response: Response, origin: &str) -> Response {
    let headers = response.headers_mut();
    let pairs = [
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin),
        (header::ACCESS_CONTROL_ALLOW_METHODS, "POST, GET, DELETE, PUT, OPTIONS"),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, "Content-Type, Authorization"),
        (header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"),
    ];
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_hosts() {
        assert!(same_origin("127.0.0.1:8188", "http://127.0.0.1:8188"));
        assert!(!same_origin("127.0.0.1:18188", "http://localhost:18188"));
        assert!(same_origin("example.com:8188", "https://example.com"));
        assert!(!same_origin("127.0.0.1:8188", "http://evil.example"));
        assert!(is_loopback("127.0.0.1:8188") && is_loopback("localhost") && is_loopback("[::1]:8188"));
        assert!(!is_loopback("192.168.1.2:8188"));
    }

    #[test]
    fn keys_from_headers_cookies_and_queries() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(header_key(&headers), Some("k1"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b; easel_token=k2"));
        assert_eq!(cookie_key(&headers), Some("k2"));
        assert_eq!(query_token(Some("x=1&token=a%2Bb")), Some("a+b".to_string()));
        assert!(same_key("abc", "abc") && !same_key("abc", "abd") && !same_key("abc", "ab"));
    }
}
