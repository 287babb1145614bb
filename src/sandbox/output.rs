//! Capped, deadline-bounded reading of a sandbox's stdout/stderr pipes.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::sandbox::model::Captured;

/// Reads `fd` to EOF, keeping at most `cap` bytes and draining the rest (so the tool never
/// blocks on a full pipe). Progress is visible in `sink` even if the task is aborted.
pub async fn capture(fd: OwnedFd, cap: usize, sink: Arc<Mutex<Captured>>) {
    let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut c = sink.lock().unwrap_or_else(|e| e.into_inner());
                let room = cap.saturating_sub(c.bytes.len());
                c.bytes.extend_from_slice(&buf[..n.min(room)]);
                if n > room {
                    c.truncated = true;
                }
            }
        }
    }
}

/// Writes `data` then closes the pipe (EOF for the tool). Errors (tool exited, EPIPE) are
/// expected and ignored.
pub async fn feed(fd: OwnedFd, data: Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let Ok(mut tx) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    let _ = tx.write_all(&data).await;
}
