//! API keys, the origin check and CORS, over real HTTP and WebSocket connections.

mod common;

use common::{agent, start, start_with};
use easel_server::state::ServerSettings;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn keyed() -> ServerSettings {
    ServerSettings {
        api_keys: vec!["s3cret".into(), "other".into()],
        ..Default::default()
    }
}

#[test]
fn every_route_needs_a_key_when_keys_are_set() {
    let server = start_with(keyed());
    let url = &server.api.url;
    for path in ["/object_info", "/api/queue", "/view?filename=x.png", "/history"] {
        let response = agent().get(format!("{url}{path}")).call().unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
    }
    let status =
        |request: ureq::RequestBuilder<ureq::typestate::WithoutBody>| request.call().unwrap().status().as_u16();
    assert_eq!(
        status(agent().get(format!("{url}/queue")).header("X-API-KEY", "s3cret")),
        200
    );
    assert_eq!(
        status(
            agent()
                .get(format!("{url}/queue"))
                .header("Authorization", "Bearer other")
        ),
        200
    );
    assert_eq!(
        status(agent().get(format!("{url}/queue")).header("X-API-KEY", "s3cre")),
        401
    );
    let posted = agent()
        .post(format!("{url}/prompt"))
        .header("X-API-KEY", "s3cret")
        .send(json!({"prompt": {}}).to_string())
        .unwrap();
    assert_eq!(posted.status().as_u16(), 400);

    // A browser presents ?token= once and gets an HttpOnly cookie for later requests.
    let response = agent().get(format!("{url}/queue?token=s3cret")).call().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let cookie = response
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.starts_with("easel_token=s3cret;") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let with_cookie = agent()
        .get(format!("{url}/queue"))
        .header("Cookie", "easel_token=s3cret")
        .call()
        .unwrap();
    assert_eq!(with_cookie.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_websocket_needs_a_key_too() {
    let server = start_with(keyed());
    let refused = tokio_tungstenite::connect_async(server.api.ws_url("/ws?clientId=a")).await;
    assert!(refused.is_err());
    let mut request = server.api.ws_url("/ws?clientId=a").into_client_request().unwrap();
    request.headers_mut().insert("X-API-KEY", "s3cret".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
    assert!(
        tokio_tungstenite::connect_async(server.api.ws_url("/ws?clientId=b&token=other"))
            .await
            .is_ok()
    );
}

#[test]
fn cross_origin_requests_are_refused_like_comfyui_and_stricter() {
    let server = start();
    let url = &server.api.url;
    let host = url.trim_start_matches("http://").to_string();
    let port = host.rsplit_once(':').unwrap().1.to_string();
    let post = |origin: &str, host_header: &str| {
        agent()
            .post(format!("{url}/queue"))
            .header("Origin", origin)
            .header("Host", host_header)
            .send(r#"{"clear": true}"#)
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(&format!("http://{host}"), &host), 200);
    assert_eq!(post("http://evil.example", &host), 403);
    // ComfyUI's captured case: Host 127.0.0.1 with Origin localhost is refused.
    assert_eq!(post(&format!("http://localhost:{port}"), &host), 403);
    // Stricter than ComfyUI: a mutating request for a non-loopback host name is checked too.
    assert_eq!(post("http://evil.example", &format!("easel.lan:{port}")), 403);
    let get = agent()
        .get(format!("{url}/queue"))
        .header("Origin", "http://evil.example")
        .call()
        .unwrap();
    assert_eq!(get.status().as_u16(), 403);
    let options = agent().options(format!("{url}/prompt")).call().unwrap();
    assert_eq!(options.status().as_u16(), 200);
}

#[test]
fn cors_headers_replace_the_origin_check_when_enabled() {
    let server = start_with(ServerSettings {
        cors_origin: Some("*".into()),
        ..Default::default()
    });
    let response = agent()
        .get(format!("{}/queue", server.api.url))
        .header("Origin", "http://elsewhere.example")
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers().get("access-control-allow-origin").unwrap(), "*");
    assert_eq!(
        response.headers().get("access-control-allow-credentials").unwrap(),
        "true"
    );
}

#[test]
fn bodies_over_the_upload_limit_are_refused() {
    let server = start_with(ServerSettings {
        max_upload_size: 1024,
        ..Default::default()
    });
    let big = format!("{{\"prompt\": {{}}, \"pad\": \"{}\"}}", "x".repeat(4096));
    let (status, _, _) = server.api.post("/prompt", &big);
    assert_eq!(status, 413);
}

#[test]
fn cors_preflights_pass_without_a_key() {
    let server = start_with(ServerSettings {
        api_keys: vec!["k".into()],
        cors_origin: Some("https://app.example".into()),
        ..Default::default()
    });
    let preflight = agent().options(format!("{}/prompt", server.api.url)).call().unwrap();
    assert_eq!(preflight.status().as_u16(), 200);
    assert_eq!(
        preflight.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    let without_key = agent().get(format!("{}/queue", server.api.url)).call().unwrap();
    assert_eq!(without_key.status().as_u16(), 401);
}
