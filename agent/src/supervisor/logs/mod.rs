//! Rank logs: capturing a worker's output, rotating its log file, and serving it.
//!
//! Layout:
//! - `capture` — the pumps of a worker's stdout and stderr: lines cut at 64 KiB, the rank log,
//!   the agent-log copy and the failure tail.
//! - `rotate` — the rank log writer and its rotation at a size limit (`--log-max-bytes`,
//!   `--log-keep`).
//! - `serve` — a rank's log sent to the coordinator with byte offsets and flow control.
//! - `open` — directories and files opened without following links (a worker can write its
//!   generation directory).

pub mod capture;
pub mod open;
pub mod rotate;
pub mod serve;

pub use capture::{LogSink, MAX_LINE, TAIL_LINES, pump};
pub use open::LogFileError;
pub use rotate::{RankLog, Rotation};
pub use serve::{Fetch, Live, serve};
