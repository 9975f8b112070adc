//! The WebSocket clients and how messages reach them.
//!
//! Each connected socket has a bounded outbox; a message that does not fit is dropped for that
//! client only, so a slow or dead socket never stalls execution or other clients. A client that
//! reconnects with the same `clientId` replaces its old socket (which is then closed) and keeps
//! receiving its messages.

use easel_engine::pyjson::dumps;
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Messages a socket may hold before it starts losing them.
const OUTBOX_CAPACITY: usize = 4096;

/// One frame for a socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
}

/// ComfyUI's binary event types (a big-endian u32 opens every binary frame).
const PREVIEW_IMAGE: u32 = 1;
const TEXT: u32 = 3;
const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// A type 1 preview frame: event type, image format (1 JPEG, 2 PNG), image bytes.
pub fn preview_frame(image_type: &str, image: &[u8]) -> Outgoing {
    let format: u32 = if image_type == "image/jpeg" { 1 } else { 2 };
    let mut frame = Vec::with_capacity(8 + image.len());
    frame.extend_from_slice(&PREVIEW_IMAGE.to_be_bytes());
    frame.extend_from_slice(&format.to_be_bytes());
    frame.extend_from_slice(image);
    Outgoing::Binary(frame)
}

/// A type 4 preview frame: event type, metadata length, metadata JSON, image bytes.
pub fn preview_frame_with_metadata(metadata: &Json, image: &[u8]) -> Outgoing {
    let metadata = dumps(metadata).into_bytes();
    let mut frame = Vec::with_capacity(8 + metadata.len() + image.len());
    frame.extend_from_slice(&PREVIEW_IMAGE_WITH_METADATA.to_be_bytes());
    frame.extend_from_slice(&(metadata.len() as u32).to_be_bytes());
    frame.extend_from_slice(&metadata);
    frame.extend_from_slice(image);
    Outgoing::Binary(frame)
}

/// A type 3 text frame (`send_progress_text`): event type, node id length, node id, text, in UTF-8.
pub fn progress_text_frame(node_id: &str, text: &str) -> Outgoing {
    let mut frame = Vec::with_capacity(8 + node_id.len() + text.len());
    frame.extend_from_slice(&TEXT.to_be_bytes());
    frame.extend_from_slice(&(node_id.len() as u32).to_be_bytes());
    frame.extend_from_slice(node_id.as_bytes());
    frame.extend_from_slice(text.as_bytes());
    Outgoing::Binary(frame)
}

/// `{"type": …, "data": …}` with Python's JSON spacing, as ComfyUI sends it.
pub fn message(kind: &str, data: &Json) -> Outgoing {
    Outgoing::Text(dumps(&json!({"type": kind, "data": data})))
}

struct Client {
    connection: u64,
    outbox: mpsc::Sender<Outgoing>,
    /// Negotiated `supports_preview_metadata`: previews as binary type 4 instead of 1.
    preview_metadata: bool,
}

#[derive(Default)]
pub struct Hub {
    clients: Mutex<HashMap<String, Client>>,
    next_connection: AtomicU64,
}

impl Hub {
    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, Client>> {
        self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a socket under `sid` (replacing any older one); returns its connection number and
    /// the receiving end of its outbox.
    pub fn connect(&self, sid: &str) -> (u64, mpsc::Receiver<Outgoing>) {
        let (outbox, inbox) = mpsc::channel(OUTBOX_CAPACITY);
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.clients().insert(
            sid.to_string(),
            Client {
                connection,
                outbox,
                preview_metadata: false,
            },
        );
        (connection, inbox)
    }

    /// Forgets `sid`, unless a newer socket has taken it over.
    pub fn disconnect(&self, sid: &str, connection: u64) {
        let mut clients = self.clients();
        if clients.get(sid).is_some_and(|c| c.connection == connection) {
            clients.remove(sid);
        }
    }

    /// Records the client's `feature_flags`.
    pub fn set_preview_metadata(&self, sid: &str, connection: u64, supported: bool) {
        if let Some(client) = self.clients().get_mut(sid).filter(|c| c.connection == connection) {
            client.preview_metadata = supported;
        }
    }

    pub fn supports_preview_metadata(&self, sid: &str) -> bool {
        self.clients().get(sid).is_some_and(|c| c.preview_metadata)
    }

    pub fn is_connected(&self, sid: &str) -> bool {
        self.clients().contains_key(sid)
    }

    pub fn has_clients(&self) -> bool {
        !self.clients().is_empty()
    }

    /// Queues a frame for one client; false when it is not connected or its outbox is full.
    pub fn send(&self, sid: &str, frame: Outgoing) -> bool {
        self.clients()
            .get(sid)
            .is_some_and(|c| c.outbox.try_send(frame).is_ok())
    }

    /// Queues a frame for every client.
    pub fn broadcast(&self, frame: Outgoing) {
        for client in self.clients().values() {
            // A full outbox drops this frame for that client only.
            let _ = client.outbox.try_send(frame.clone());
        }
    }

    /// Sends to `client` if there is one, else to everyone (ComfyUI's routing for progress events).
    pub fn send_or_broadcast(&self, client: Option<&str>, frame: Outgoing) {
        match client {
            Some(sid) => {
                self.send(sid, frame);
            }
            None => self.broadcast(frame),
        }
    }
}
