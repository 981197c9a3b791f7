//! Capturing a worker's output: every byte goes to its rank log, each line to the agent's own
//! log with a `[job rank N]` prefix, and the last lines to a ring kept for failure reports.
//!
//! Memory stays flat whatever a worker prints: output is taken in lines of at most
//! [`MAX_LINE`] bytes; a longer line is cut and its rest continues as the next line(s). The
//! rank log still gets every byte, in order.

use std::collections::VecDeque;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::rotate::RankLog;

/// Lines of a worker's output kept for its failure report.
pub const TAIL_LINES: usize = 20;
/// Longest piece of output handled at once; a longer line is cut at this size.
pub const MAX_LINE: usize = 64 * 1024;
/// Characters of a line shown in the agent's log and kept in the failure tail.
const MAX_LINE_SHOWN: usize = 4096;

/// Shared sink of one worker's two pipes.
pub struct LogSink {
    log: Mutex<RankLog>,
    tail: Mutex<VecDeque<String>>,
    /// Bytes taken from the pipes (the agent's `log_bytes` metric, shared by every worker).
    captured: Counter,
    pub job: String,
    pub generation: u64,
    pub rank: u32,
}

impl LogSink {
    pub fn new(log: RankLog, job: String, generation: u64, rank: u32) -> LogSink {
        LogSink {
            log: Mutex::new(log),
            tail: Mutex::new(VecDeque::with_capacity(TAIL_LINES)),
            captured: Counter::default(),
            job,
            generation,
            rank,
        }
    }

    /// Counts the captured bytes on `counter` (the agent's `log_bytes` metric) rather than on
    /// a counter of its own.
    pub fn counting(mut self, counter: Counter) -> LogSink {
        self.captured = counter;
        self
    }

    /// The last lines, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Takes one line (or one piece of a cut line: `continued` when it goes on from the last
    /// piece of this pipe).
    fn line(&self, piece: &[u8], continued: bool) {
        self.captured.inc_by(piece.len() as u64);
        self.log.lock().expect("rank log lock").write(piece);
        let complete = piece.last() == Some(&b'\n');
        // Decode no more than the shown characters can take (4 bytes each at most).
        let head = &piece[..piece.len().min(MAX_LINE_SHOWN * 4)];
        let text = String::from_utf8_lossy(head);
        let shown: String = text
            .trim_end_matches(['\n', '\r'])
            .chars()
            .take(MAX_LINE_SHOWN)
            .collect();
        // The agent's log gets the start of each line; the rank log has it whole.
        if !continued {
            let cut = if complete { "" } else { " [line cut]" };
            tracing::info!(
                target: "worker",
                job = %self.job,
                generation = self.generation,
                "[{} rank {}] {}{}",
                self.job,
                self.rank,
                shown,
                cut
            );
        }
        let mut t = self.tail.lock().expect("tail lock");
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(shown);
    }
}

/// Copies one pipe into the sink until it closes.
pub async fn pump(reader: impl AsyncRead + Unpin, sink: &LogSink) {
    let mut r = BufReader::new(reader);
    let mut piece = Vec::with_capacity(MAX_LINE);
    let mut continued = false;
    loop {
        piece.clear();
        // At most MAX_LINE bytes per read: a line without end never grows this buffer.
        match (&mut r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut piece)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                sink.line(&piece, continued);
                continued = piece.last() != Some(&b'\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rotate::Rotation;
    use super::*;

    fn sink(dir: &std::path::Path, rotation: Rotation) -> LogSink {
        let log = RankLog::open(
            std::fs::File::open(dir).unwrap(),
            dir,
            "rank-0.log",
            rotation,
        )
        .unwrap();
        LogSink::new(log, "job-1".into(), 0, 0)
    }

    #[tokio::test]
    async fn long_lines_are_cut_at_64_kib_and_the_file_keeps_every_byte() {
        let t = tempfile::tempdir().unwrap();
        let captured = Counter::default();
        let s = sink(t.path(), Rotation::default()).counting(captured.clone());
        let mut input = vec![b'a'; MAX_LINE * 2 + 100];
        input.push(b'\n');
        input.extend_from_slice(b"short\nno newline at the end");
        pump(&input[..], &s).await;
        assert_eq!(std::fs::read(t.path().join("rank-0.log")).unwrap(), input);
        assert_eq!(captured.get(), input.len() as u64);
        let tail = s.tail();
        // Three pieces of the long line (cut, cut, end), then the two short lines.
        assert_eq!(
            tail.len(),
            5,
            "{:?}",
            tail.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(tail[0].len(), MAX_LINE_SHOWN);
        assert_eq!(tail[2], "a".repeat(100));
        assert_eq!(tail[3], "short");
        assert_eq!(tail[4], "no newline at the end");
    }

    #[tokio::test]
    async fn the_tail_keeps_the_last_lines() {
        let t = tempfile::tempdir().unwrap();
        let s = sink(t.path(), Rotation::default());
        let input: String = (0..100).map(|i| format!("line {i}\n")).collect();
        pump(input.as_bytes(), &s).await;
        let tail = s.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 80");
        assert_eq!(tail[TAIL_LINES - 1], "line 99");
    }

    #[tokio::test]
    async fn output_without_newlines_is_rotated_and_kept_in_order() {
        let t = tempfile::tempdir().unwrap();
        let max = 3 * MAX_LINE as u64;
        let s = sink(
            t.path(),
            Rotation {
                max_bytes: max,
                keep: 2,
            },
        );
        // 10 pieces of 64 KiB, each a different byte: files of three pieces each.
        let input: Vec<u8> = (0..10u8)
            .flat_map(|i| std::iter::repeat_n(b'a' + i, MAX_LINE))
            .collect();
        pump(&input[..], &s).await;
        let mut kept = Vec::new();
        for name in ["rank-0.log.2", "rank-0.log.1", "rank-0.log"] {
            let bytes = std::fs::read(t.path().join(name)).unwrap();
            assert!(bytes.len() as u64 <= max, "{name}: {}", bytes.len());
            kept.extend(bytes);
        }
        assert!(!t.path().join("rank-0.log.3").exists());
        // The newest 7 pieces, in order (the file being written holds one).
        assert_eq!(kept, input[3 * MAX_LINE..]);
    }
}
