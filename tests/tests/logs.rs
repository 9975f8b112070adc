//! The frontend's log panel: `/internal/logs[/raw]` and `logs` messages to subscribed sockets.

mod common;

use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread")]
async fn log_lines_are_kept_and_streamed_to_subscribers() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(easel_server::logs::LogLayer)).unwrap();
    let server = common::start();
    let mut socket = tokio_tungstenite::connect_async(server.api.ws_url("/ws?clientId=logger"))
        .await
        .unwrap()
        .0;
    socket.next().await.unwrap().unwrap();
    let api = server.api.clone();
    tokio::task::spawn_blocking(move || {
        let agent = common::agent();
        let body = json!({"clientId": "logger", "enabled": true}).to_string();
        let response = agent
            .patch(format!("{}/internal/logs/subscribe", api.url))
            .send(body)
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    })
    .await
    .unwrap();
    tracing::info!("hello from the test");
    let message = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = frame {
            let message: Json = serde_json::from_str(&text).unwrap();
            if message["type"] == "logs" {
                break message;
            }
        }
    };
    assert_eq!(message["data"]["entries"][0]["m"], "hello from the test\n");
    assert_eq!(message["data"]["size"], json!({"cols": 80, "rows": 24}));
    let raw = server.api.get_json("/internal/logs/raw");
    assert!(raw["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["m"] == "hello from the test\n"));
    let text = server.api.get_json("/internal/logs");
    assert!(text.as_str().unwrap().contains(" - hello from the test\n"));
}
