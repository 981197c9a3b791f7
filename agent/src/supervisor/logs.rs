//! A worker's output: every line goes to its rank log file, to the agent's own log with a
//! `[job rank N]` prefix, and to a ring buffer of the last lines for failure reports.
//! Also serving a rank's log file to the coordinator (`ringctl logs`, `--follow`).

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringmaster_proto as pb;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Lines of a worker's output kept for its failure report.
pub const TAIL_LINES: usize = 20;
/// Longest line kept whole; longer ones are cut (the file keeps them whole).
const MAX_LINE_IN_AGENT_LOG: usize = 4096;

/// Shared sink of one worker's two pipes.
pub struct LogSink {
    pub file: Mutex<std::fs::File>,
    pub tail: Mutex<VecDeque<String>>,
    pub job: String,
    pub generation: u64,
    pub rank: u32,
}

impl LogSink {
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Copies one pipe into the sink until it closes.
pub async fn pump(reader: impl AsyncRead + Unpin, sink: Arc<LogSink>) {
    let mut r = BufReader::new(reader);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Err(e) = sink.file.lock().expect("log file lock").write_all(&buf) {
                    tracing::warn!(job = %sink.job, rank = sink.rank, error = %e, "could not write the rank log");
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches(['\n', '\r']);
                let shown: String = line.chars().take(MAX_LINE_IN_AGENT_LOG).collect();
                tracing::info!(
                    target: "worker",
                    job = %sink.job,
                    generation = sink.generation,
                    "[{} rank {}] {}",
                    sink.job,
                    sink.rank,
                    shown
                );
                let mut t = sink.tail.lock().expect("tail lock");
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(shown);
            }
        }
    }
}

/// Streams a rank's log file to the coordinator as `LogChunk`s.
///
/// With `follow`, keeps reading while `running` says the worker lives, then drains and ends.
pub async fn serve(
    request_id: u64,
    path: PathBuf,
    tail_bytes: u64,
    follow: bool,
    running: Option<Arc<AtomicBool>>,
    out: mpsc::Sender<pb::AgentMessage>,
    cancel: CancellationToken,
) {
    let send = |data: Vec<u8>, eof: bool, error: String| {
        let out = out.clone();
        async move {
            out.send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::LogChunk(pb::LogChunk {
                    request_id,
                    data,
                    eof,
                    error,
                })),
            })
            .await
            .is_ok()
        }
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            send(Vec::new(), true, format!("{}: {e}", path.display())).await;
            return;
        }
    };
    if tail_bytes > 0
        && let Ok(meta) = file.metadata().await
        && meta.len() > tail_bytes
    {
        let _ = file
            .seek(std::io::SeekFrom::Start(meta.len() - tail_bytes))
            .await;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => return,
            n = file.read(&mut buf) => match n {
                Ok(n) => n,
                Err(e) => {
                    send(Vec::new(), true, format!("{}: {e}", path.display())).await;
                    return;
                }
            },
        };
        if n > 0 {
            if !send(buf[..n].to_vec(), false, String::new()).await {
                return;
            }
            continue;
        }
        let alive = follow && running.as_ref().is_some_and(|r| r.load(Ordering::Acquire));
        if !alive {
            // One last read catches what was written just before the worker ended.
            if let Ok(n) = file.read(&mut buf).await
                && n > 0
            {
                if !send(buf[..n].to_vec(), false, String::new()).await {
                    return;
                }
                continue;
            }
            send(Vec::new(), true, String::new()).await;
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
