//! What the coordinator keeps, and how much of it: the operator's settings for its state
//! (`coordinator --reset-state`, `--rendezvous-max-*`, `--retain-finished-*`, `--max-job*`).
//! docs/operator-guide.md ("Limits") lists them with their defaults.

use std::time::Duration;

/// Settings of the coordinator's state: its store and its limits.
#[derive(Debug, Clone, Default)]
pub struct StateConfig {
    /// Move a damaged `state.redb` aside (`state.redb.damaged-<unix time>`) and start with an
    /// empty store instead of refusing to start. A healthy store is kept.
    pub reset_state: bool,
    pub rendezvous: RendezvousLimits,
    pub jobs: JobLimits,
}

/// Per generation of a job, in the trainers' rendezvous store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RendezvousLimits {
    /// Most keys (`--rendezvous-max-keys`).
    pub max_keys: usize,
    /// Most bytes of keys and values together (`--rendezvous-max-bytes`).
    pub max_bytes: u64,
}

impl Default for RendezvousLimits {
    fn default() -> RendezvousLimits {
        RendezvousLimits {
            max_keys: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// How many jobs the coordinator holds (in memory and in its store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Finished jobs (SUCCEEDED, FAILED, CANCELLED) kept, the newest (`--retain-finished-jobs`).
    pub retain_finished: usize,
    /// How long a finished job is kept (`--retain-finished-for`).
    pub retain_for: Duration,
    /// Most jobs, active and finished together (`--max-jobs`).
    pub max_jobs: usize,
    /// Most bytes of job specs and their files, all jobs together (`--max-job-bytes`).
    pub max_job_bytes: u64,
}

impl Default for JobLimits {
    fn default() -> JobLimits {
        JobLimits {
            retain_finished: 1000,
            retain_for: Duration::from_secs(7 * 24 * 3600),
            max_jobs: 10_000,
            max_job_bytes: 1 << 30,
        }
    }
}

/// Parses a byte size: a number with an optional unit, `B`, `K`/`KB`/`KiB`, `M`/`MB`/`MiB`,
/// `G`/`GB`/`GiB` (all binary: 1K = 1024 bytes), e.g. `64MiB`, `512k`, `1000000`.
///
/// # Errors
/// A message naming the text.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 64MiB or 4096"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{}' (use B, KiB, MiB or GiB)",
                unit.trim()
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// A byte count for messages: `64MiB`, `1GiB`, `1500B`.
pub fn show_bytes(n: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_and_show() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64mb"), Ok(64 << 20));
        assert_eq!(parse_bytes(" 512k "), Ok(512 << 10));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("10B"), Ok(10));
        assert!(parse_bytes("lots").unwrap_err().contains("'lots'"));
        assert!(
            parse_bytes("5TiB")
                .unwrap_err()
                .contains("unknown unit 'TiB'")
        );
        assert!(parse_bytes("99999999999999999999G").is_err());
        assert_eq!(show_bytes(64 << 20), "64MiB");
        assert_eq!(show_bytes(1 << 30), "1GiB");
        assert_eq!(show_bytes(1500), "1500B");
        assert_eq!(show_bytes(3 << 10), "3KiB");
    }
}
