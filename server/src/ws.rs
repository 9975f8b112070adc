//! `GET /ws?clientId=…`: the WebSocket (protocol §4). The first frame is `status` with the client's
//! `sid`; a client that opens with `feature_flags` gets the server's flags back; everything else the
//! client sends is ignored. Messages come from the [`Hub`](crate::hub::Hub).

use crate::hub::{message, Outgoing};
use crate::state::AppState;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use std::collections::HashMap;

pub async fn websocket(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sid = query
        .get("clientId")
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| session(state, sid, socket))
}

fn frame(outgoing: Outgoing) -> Message {
    match outgoing {
        Outgoing::Text(text) => Message::Text(text.into()),
        Outgoing::Binary(bytes) => Message::Binary(bytes.into()),
    }
}

async fn session(state: AppState, sid: String, socket: WebSocket) {
    let (connection, mut outbox) = state.hub.connect(&sid);
    let remaining = state.queue.remaining();
    let (mut sender, mut receiver) = socket.split();
    let mut greeting = vec![state.status(remaining, Some(&sid))];
    let running_here = state
        .queue
        .running()
        .is_some_and(|item| item.client_id() == Some(sid.as_str()));
    if let (true, Some(node)) = (running_here, state.executing_node()) {
        greeting.push(message("executing", &json!({"node": node})));
    }
    for outgoing in greeting {
        if sender.send(frame(outgoing)).await.is_err() {
            state.hub.disconnect(&sid, connection);
            return;
        }
    }
    let mut first_message = true;
    loop {
        tokio::select! {
            outgoing = outbox.recv() => {
                let Some(outgoing) = outgoing else { break };
                if sender.send(frame(outgoing)).await.is_err() {
                    break;
                }
            }
            incoming = receiver.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // Only a first frame of type `feature_flags` negotiates.
                    if std::mem::take(&mut first_message) {
                        let request: Json = serde_json::from_str(&text).unwrap_or_default();
                        if request["type"] == "feature_flags" {
                            let supported = request["data"]["supports_preview_metadata"] == true;
                            state.hub.set_preview_metadata(&sid, connection, supported);
                            let reply = message("feature_flags", &state.features());
                            if sender.send(frame(reply)).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    state.hub.disconnect(&sid, connection);
}
