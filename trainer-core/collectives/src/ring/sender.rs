//! The send side of a ring rank: one thread that writes queued byte ranges to the right
//! neighbour, so that sending overlaps with receiving and reducing on the caller's thread.
//!
//! Queued ranges point into the caller's buffer. The caller guarantees that a range stays
//! valid and unwritten until the next [`Sender::fence`] returns; every collective fences before
//! it returns, on its error paths too (after shutting the sockets down, so that a blocked write
//! ends).

use std::io::{Read, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::stream::Stream;

enum Cmd {
    Data { ptr: usize, len: usize },
    Fence(mpsc::SyncSender<Result<(), String>>),
}

pub struct Sender {
    tx: Option<mpsc::Sender<Cmd>>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    /// Starts the send thread. With `cma`, the right neighbour reads the bytes from this
    /// process itself: only (address, length) descriptors are written, and a fence also waits
    /// for the neighbour's one-byte ack of each.
    pub fn start(mut stream: Stream, rank: usize, cma: bool) -> Sender {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let thread = std::thread::Builder::new()
            .name(format!("ring-send-{rank}"))
            .spawn(move || {
                let mut error: Option<String> = None;
                let mut unacked = 0usize;
                let mut acks = Vec::new();
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::Data { ptr, len } => {
                            if error.is_some() {
                                continue;
                            }
                            let res = if cma {
                                unacked += 1;
                                let mut d = [0u8; 16];
                                d[..8].copy_from_slice(&(ptr as u64).to_le_bytes());
                                d[8..].copy_from_slice(&(len as u64).to_le_bytes());
                                stream.write_all(&d)
                            } else {
                                // SAFETY: the caller keeps [ptr, ptr+len) valid and unwritten
                                // until the fence that follows this command (module docs).
                                let bytes =
                                    unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
                                stream.write_all(bytes)
                            };
                            if let Err(e) = res {
                                error = Some(e.to_string());
                            }
                        }
                        Cmd::Fence(reply) => {
                            if unacked > 0 && error.is_none() {
                                acks.resize(unacked, 0u8);
                                if let Err(e) = stream.read_exact(&mut acks) {
                                    error = Some(format!("waiting for acks: {e}"));
                                }
                            }
                            unacked = 0;
                            let _ = reply.send(match &error {
                                None => Ok(()),
                                Some(e) => Err(e.clone()),
                            });
                        }
                    }
                }
            })
            .expect("spawning the ring send thread");
        Sender {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues `bytes` for sending.
    ///
    /// # Safety
    /// `bytes` must stay valid and must not be written until the next [`Sender::fence`] returns.
    pub unsafe fn send(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Data {
                ptr: bytes.as_ptr() as usize,
                len: bytes.len(),
            });
        }
    }

    /// Waits until everything queued is written (or skipped after an error); returns the
    /// first write error since the sender started, if any.
    pub fn fence(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::sync_channel(1);
        match &self.tx {
            Some(s) if s.send(Cmd::Fence(tx)).is_ok() => rx
                .recv()
                .unwrap_or_else(|_| Err("send thread ended".into())),
            _ => Err("send thread ended".into()),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
