//! WAL checkpoints off the request path. The store's connection never checkpoints
//! (`wal_autocheckpoint = 0`): a thread with a connection of its own copies the write-ahead log
//! into the database every [`INTERVAL`], passively (writers go on meanwhile), so no request holds
//! the store's lock through a checkpoint's writes and `fsync`. Under writes that never pause, a
//! passive checkpoint never catches up and the log would only grow: past [`RESTART_FRAMES`] the
//! thread checkpoints once while holding writers back, and the log starts again from the top.

use super::StoreError;
use rusqlite::Connection;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the log is copied into the database.
const INTERVAL: Duration = Duration::from_millis(250);

/// A log longer than this (pages; 64 MB of 4 KiB pages) is restarted.
const RESTART_FRAMES: i64 = 16384;

/// The checkpointing thread; it ends (after a last checkpoint) when this is dropped.
pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(5))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("easel-checkpoints".into())
            .spawn(move || loop {
                let stopping = !matches!(stopped.recv_timeout(INTERVAL), Err(RecvTimeoutError::Timeout));
                if let Err(error) = checkpoint(&connection) {
                    tracing::warn!("cannot checkpoint the store's log: {error}");
                }
                if stopping {
                    return;
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// A passive checkpoint, and a restarting one if the log has grown past [`RESTART_FRAMES`].
fn checkpoint(connection: &Connection) -> rusqlite::Result<()> {
    let frames = |mode: &str| {
        connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            row.get::<_, i64>(1)
        })
    };
    if frames("PASSIVE")? > RESTART_FRAMES {
        frames("RESTART")?;
    }
    Ok(())
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
