//! Progress text over a real WebSocket: GetImageSize's `send_progress_text` reaches every client,
//! not only the prompt's, as a binary frame of type 3 (node id length, node id, text).

mod common;

use common::start;
use futures_util::StreamExt;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// The first binary frame a socket receives.
async fn next_binary<S>(socket: &mut S) -> Vec<u8>
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a frame within 60 s")
            .expect("the socket stays open")
            .expect("a valid frame");
        if let Message::Binary(bytes) = frame {
            return bytes.to_vec();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn get_image_size_text_is_broadcast_as_a_type_3_frame() {
    let server = start();
    let (mut client, _) = connect_async(server.api.ws_url("/ws?clientId=sizer")).await.unwrap();
    let (mut observer, _) = connect_async(server.api.ws_url("/ws?clientId=observer")).await.unwrap();
    // Each socket is registered once its `status` greeting arrives.
    for socket in [&mut client, &mut observer] {
        let greeting = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .unwrap();
        assert!(matches!(greeting, Some(Ok(Message::Text(_)))), "{greeting:?}");
    }
    let prompt = json!({
        "4": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0}},
        "5": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}
    });
    let api = server.api.clone();
    let body = json!({"prompt": prompt, "client_id": "sizer"}).to_string();
    let (status, _, text) = tokio::task::spawn_blocking(move || api.post("/prompt", &body))
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");

    let mut expected = Vec::new();
    expected.extend_from_slice(&3u32.to_be_bytes());
    expected.extend_from_slice(&1u32.to_be_bytes());
    expected.extend_from_slice(b"5");
    expected.extend_from_slice(b"width: 64, height: 48\n batch size: 2");
    assert_eq!(next_binary(&mut client).await, expected);
    assert_eq!(next_binary(&mut observer).await, expected);
}
