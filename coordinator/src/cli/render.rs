//! Human-readable output of `ringctl`.

use std::fmt::Write;

use ringmaster_proto as pb;

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Formats rows as left-aligned columns.
fn table(rows: Vec<Vec<String>>) -> String {
    table_aligned(&rows, |_| false)
}

/// Formats rows as columns; columns for which `right(i)` holds are right-aligned.
pub fn table_aligned(rows: &[Vec<String>], right: impl Fn(usize) -> bool) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() && !right(i) {
                line.push_str(cell);
            } else if right(i) {
                let _ = write!(line, "{:>w$}  ", cell, w = widths[i]);
            } else {
                let _ = write!(line, "{:<w$}  ", cell, w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn jobs_table(jobs: &[pb::JobStatus]) -> String {
    let mut rows = vec![
        [
            "ID", "NAME", "STATE", "GEN", "RESTARTS", "WORLD", "STEP", "LOSS", "REASON",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for j in jobs {
        let p = j.progress.unwrap_or_default();
        rows.push(vec![
            j.id.clone(),
            j.name.clone(),
            j.state.clone(),
            j.generation.to_string(),
            format!("{}/{}", j.restart_count, j.max_restarts),
            j.world_size.to_string(),
            opt(p.step),
            p.loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            j.pending_reason.clone().unwrap_or_default(),
        ]);
    }
    table(rows)
}

pub fn nodes_table(nodes: &[pb::NodeStatus]) -> String {
    let mut rows = vec![
        ["NAME", "STATE", "SLOTS", "ADDRESS", "HEARTBEAT", "WORKERS"]
            .map(String::from)
            .to_vec(),
    ];
    for n in nodes {
        // A cordoned node still running workers is being drained of them.
        let state = match (n.cordoned, n.running_workers) {
            (false, _) => n.state.clone(),
            (true, 0) => format!("{},CORDONED", n.state),
            (true, _) => format!("{},DRAINING", n.state),
        };
        rows.push(vec![
            n.name.clone(),
            state,
            n.slots.to_string(),
            if n.advertise_addr.is_empty() {
                "-".into()
            } else {
                n.advertise_addr.clone()
            },
            n.last_heartbeat_ms_ago
                .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            n.running_workers.to_string(),
        ]);
    }
    table(rows)
}

fn failure_text(f: &pb::Failure) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "failure (generation {}{}): {}{}",
        f.generation,
        if f.reason.is_empty() || f.reason == "Unknown" {
            String::new()
        } else {
            format!(", {}", f.reason)
        },
        f.message,
        match (f.exit_code, f.signal) {
            (_, Some(sig)) => format!(" [signal {sig}]"),
            (Some(c), None) => format!(" [exit code {c}]"),
            _ => String::new(),
        }
    );
    for l in &f.log_tail {
        let _ = writeln!(s, "  | {l}");
    }
    s
}

pub fn status_block(j: &pb::JobStatus) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "job:      {} ({})", j.id, j.name);
    let _ = writeln!(
        s,
        "state:    {}   generation {}   restarts {}/{}   world size {}",
        j.state, j.generation, j.restart_count, j.max_restarts, j.world_size
    );
    if let Some(r) = &j.pending_reason {
        let _ = writeln!(s, "reason:   {r}");
    }
    if j.duration_ms > 0 {
        let d = |ms: u64| humantime::format_duration(std::time::Duration::from_secs(ms / 1000));
        let mut line = format!("time:     {} (queued {}", d(j.duration_ms), d(j.queued_ms));
        if j.recovery_ms > 0 {
            let _ = write!(
                line,
                ", recovering {}; {} without recovery",
                d(j.recovery_ms),
                d(j.duration_excluding_recovery_ms)
            );
        }
        let _ = writeln!(s, "{line})");
    }
    if !j.conditions.is_empty() {
        let shown: Vec<String> = j
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                format!("{}={status} ({})", c.r#type, c.reason)
            })
            .collect();
        let _ = writeln!(s, "conditions: {}", shown.join("  "));
    }
    if let (Some(a), Some(p)) = (&j.master_addr, j.master_port) {
        let _ = writeln!(s, "master:   {a}:{p}");
    }
    if let Some(p) = &j.progress
        && p.step.is_some()
    {
        let _ = writeln!(
            s,
            "progress: step {}/{}   loss {}   {} tokens/s{}",
            opt(p.step),
            opt(p.total_steps),
            p.loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            p.tokens_per_second
                .map(|t| format!("{t:.0}"))
                .unwrap_or_else(|| "-".into()),
            p.mfu
                .map(|m| format!("   MFU {:.1}%", 100.0 * m))
                .unwrap_or_default()
        );
    }
    for x in &j.stragglers {
        let _ = writeln!(
            s,
            "straggler: rank {} on {} is {:.0}% slower than its peers (since step {})",
            x.rank,
            x.node,
            (x.slowdown - 1.0) * 100.0,
            x.since_step
        );
    }
    if let Some(c) = &j.last_checkpoint {
        let _ = writeln!(s, "checkpoint: step {} at {}", c.step, c.path);
    }
    if let Some(c) = &j.resumed_from {
        let _ = writeln!(s, "resumed:    step {} from {}", c.step, c.path);
    }
    for w in &j.checkpoint_warnings {
        let _ = writeln!(s, "warning:    {w}");
    }
    if !j.ranks.is_empty() {
        let mut rows = vec![
            ["RANK", "NODE", "LOCAL", "STATE", "PID", "EXIT", "STEP"]
                .map(String::from)
                .to_vec(),
        ];
        for r in &j.ranks {
            rows.push(vec![
                r.rank.to_string(),
                r.node.clone(),
                r.local_rank.to_string(),
                r.state.clone(),
                opt(r.pid),
                match (r.exit_code, r.signal) {
                    (_, Some(sig)) => format!("sig {sig}"),
                    (Some(c), None) => c.to_string(),
                    _ => "-".into(),
                },
                opt(r.step),
            ]);
        }
        for line in table(rows).lines() {
            let _ = writeln!(s, "  {line}");
        }
    }
    if let Some(f) = &j.failure {
        s.push_str(&failure_text(f));
    }
    s
}

/// One event as a line of `ringctl events` and `ringctl describe`: time (UTC), type, kind,
/// generation, reason, message.
pub fn event_line(e: &pb::JobEvent) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.unix_ms);
    let kind = if e.warning { "Warning" } else { "Normal" };
    let reason = if e.reason.is_empty() { "-" } else { &e.reason };
    format!(
        "{:>4}  {}  {kind:<7}  {:<19}  gen {:<3}  {reason:<20}  {}",
        e.seq,
        humantime::format_rfc3339_seconds(at),
        e.kind,
        e.generation,
        e.message
    )
}

/// `ringctl describe`: the status, the failure history and every event kept.
pub fn describe(j: &pb::JobStatus, events: &[pb::JobEvent]) -> String {
    let mut s = status_block(j);
    if j.failures.len() > 1 || j.failures_omitted > 0 {
        let _ = writeln!(
            s,
            "failures: {} (oldest first{}):",
            j.failures.len() as u64 + j.failures_omitted,
            if j.failures_omitted > 0 {
                format!("; {} left out of the history", j.failures_omitted)
            } else {
                String::new()
            }
        );
        for f in &j.failures {
            let reason = if f.reason.is_empty() { "-" } else { &f.reason };
            let _ = writeln!(s, "  gen {:<3}  {reason:<20}  {}", f.generation, f.message);
        }
    }
    let _ = writeln!(s, "events:");
    if events.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    let mut last = 0;
    for e in events {
        if last > 0 && e.seq > last + 1 {
            let _ = writeln!(s, "  ... {} events left out", e.seq - last - 1);
        }
        last = e.seq;
        let _ = writeln!(s, "  {}", event_line(e));
    }
    s
}

/// Prints a line when a job's state or generation changes, and its progress at most every
/// [`PROGRESS_EVERY`] (and at the last step).
#[derive(Default)]
pub struct WatchPrinter {
    last: Option<(String, u64, Option<String>)>,
    last_step: Option<u64>,
    last_progress: Option<std::time::Instant>,
}

/// Shortest interval between two progress lines of `ringctl watch` / `ringctl local`.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl WatchPrinter {
    pub fn update(&mut self, j: &pb::JobStatus) {
        let key = (j.state.clone(), j.generation, j.pending_reason.clone());
        if self.last.as_ref() != Some(&key) {
            let reason = j
                .pending_reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            println!(
                "{} {} generation {} restarts {}/{} world {}{}",
                j.id, j.state, j.generation, j.restart_count, j.max_restarts, j.world_size, reason
            );
            if matches!(j.state.as_str(), "RESTARTING" | "FAILED")
                && let Some(f) = &j.failure
                && f.generation == j.generation
                && self.last.as_ref().map(|l| &l.0) != Some(&j.state)
            {
                print!("{}", failure_text(f));
            }
            self.last = Some(key);
        }
        if let Some(p) = &j.progress
            && p.step.is_some()
            && p.step != self.last_step
            && (p.step == p.total_steps
                || self
                    .last_progress
                    .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY))
        {
            self.last_progress = Some(std::time::Instant::now());
            // MFU last, once known: readers of the fields before it are not disturbed.
            println!(
                "{} step {}/{} loss {} tokens/s {}{}",
                j.id,
                opt(p.step),
                opt(p.total_steps),
                p.loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "-".into()),
                p.tokens_per_second
                    .map(|t| format!("{t:.0}"))
                    .unwrap_or_else(|| "-".into()),
                p.mfu
                    .map(|m| format!(" MFU {:.1}%", 100.0 * m))
                    .unwrap_or_default()
            );
            self.last_step = p.step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(vec![
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["long".into(), "x".into(), "y".into()],
        ]);
        assert_eq!(t, "A     BB  C\nlong  x   y\n");
    }

    #[test]
    fn the_progress_line_shows_mfu_when_known() {
        let mut st = pb::JobStatus {
            id: "j".into(),
            progress: Some(pb::JobProgress {
                step: Some(5),
                total_steps: Some(10),
                loss: Some(1.5),
                tokens_per_second: Some(1234.0),
                mfu: Some(0.1234),
                ..Default::default()
            }),
            ..Default::default()
        };
        let line = |st: &pb::JobStatus| {
            status_block(st)
                .lines()
                .find(|l| l.starts_with("progress:"))
                .map(str::to_owned)
        };
        assert_eq!(
            line(&st).as_deref(),
            Some("progress: step 5/10   loss 1.5000   1234 tokens/s   MFU 12.3%")
        );
        st.progress.as_mut().unwrap().mfu = None;
        assert_eq!(
            line(&st).as_deref(),
            Some("progress: step 5/10   loss 1.5000   1234 tokens/s")
        );
    }
}
