//! Requests the server itself makes (webhooks, model downloads) go to public addresses only,
//! unless an operator allows private ones: a client must not make the server reach into its own
//! network.

use std::net::{IpAddr, ToSocketAddrs};

/// Whether the server may send a request to a URL: http(s), and (unless allowed) not a loopback
/// or private address by its literal host; names are checked again when resolved ([`refuse_private_resolution`]).
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let uri: ureq::http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    }
    let host = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
    if allow_private {
        return Ok(());
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let named_local = host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost");
    if named_local || host.parse::<IpAddr>().is_ok_and(is_private) {
        return Err(format!(
            "`{host}` is a loopback or private address, which this server does not send requests to"
        ));
    }
    Ok(())
}

/// Loopback, private, link-local, unspecified, shared (100.64/10) or unique-local addresses.
fn is_private(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Refuses a URL whose host resolves to a loopback or private address.
pub fn refuse_private_resolution(url: &str) -> Result<(), String> {
    let uri: ureq::http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve {host}: {error}"))?;
    for address in addresses {
        if is_private(address.ip()) {
            return Err(format!("{host} resolves to the private address {}", address.ip()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_targets_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9000/hook",
            "http://localhost/hook",
            "http://10.1.2.3/",
            "http://192.168.0.7/",
            "http://[::1]:8080/",
            "http://169.254.169.254/latest",
            "http://100.100.1.1/",
        ] {
            assert!(check_url(url, false).is_err(), "{url}");
            assert!(check_url(url, true).is_ok(), "{url}");
        }
        assert!(check_url("https://example.com/hook", false).is_ok());
        assert!(check_url("ftp://example.com/hook", true).is_err());
    }
}
