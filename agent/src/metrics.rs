//! The agent's Prometheus metrics (`agent --metrics-listen ADDR:PORT`, `GET /metrics`, text
//! format 0.0.4), served by [`ringmaster_common::metrics::serve`] like the coordinator's.
//!
//! Every series is named `ringmaster_agent_*` (the coordinator's are `ringmaster_*`), and
//! none has a per-job, per-rank or per-pid label: the label values are fixed sets (`state`:
//! running, exited; `outcome`: success, failure, signal, unknown), so the series of an agent
//! are the same few however many jobs it runs. Which node an agent is comes from the scrape's
//! own `instance` label.
//!
//! Two kinds:
//! - **Counted as things happen** ([`Metrics`]): worker exits by outcome, bytes of worker
//!   output captured, reconnects, and whether the agent is connected now.
//! - **Measured at each scrape**: workers by state, and resident memory (VmRSS) of the agent and
//!   of its workers' process groups, read from `/proc` on a blocking thread so that a scrape
//!   never stalls the agent's loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::supervisor::WorkerKey;

/// The prefix of every agent series.
pub const PREFIX: &str = "ringmaster_agent";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// How a worker ended, as the `outcome` label says it.
pub fn outcome(exit_code: Option<i32>, signal: Option<i32>) -> &'static str {
    match (exit_code, signal) {
        (Some(0), _) => "success",
        (Some(_), _) => "failure",
        (None, Some(_)) => "signal",
        // Waiting for the process failed: its end is not known.
        (None, None) => "unknown",
    }
}

/// The workers as the scrape sees them: each one the supervisor holds (its process group and
/// whether it still runs), and the exits the coordinator has not been told of yet.
#[derive(Default)]
struct Workers {
    held: BTreeMap<WorkerKey, (u32, Arc<AtomicBool>)>,
    undelivered: usize,
}

struct Inner {
    /// The counters and the `connected` gauge; the scrape's gauges get a registry each time.
    registry: Registry,
    worker_exits: Family<OutcomeLabel, Counter>,
    log_bytes: Counter,
    reconnects: Counter,
    connected: Gauge,
    workers: Mutex<Workers>,
}

/// The agent's metrics; clones share them. Made at start whether or not they are served (the
/// counting costs an atomic add).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let worker_exits = Family::<OutcomeLabel, Counter>::default();
        let (log_bytes, reconnects) = (Counter::default(), Counter::default());
        let connected = Gauge::default();
        let mut r = Registry::with_prefix(PREFIX);
        // Counters are registered without `_total`: the encoder appends it.
        r.register(
            "worker_exits",
            "Workers that ended, by outcome (success: exit code 0, failure: another exit code, signal: killed by a signal)",
            worker_exits.clone(),
        );
        r.register(
            "log_bytes",
            "Bytes of worker output (stdout and stderr) captured into rank logs",
            log_bytes.clone(),
        );
        r.register(
            "reconnects",
            "Joins to a coordinator after the first (each follows a lost connection or a failover)",
            reconnects.clone(),
        );
        r.register(
            "connected",
            "1 while the agent holds a session with a coordinator, else 0",
            connected.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry: r,
                worker_exits,
                log_bytes,
                reconnects,
                connected,
                workers: Mutex::default(),
            }),
        }
    }

    /// The counter of captured worker output, for the log pumps.
    pub fn log_bytes(&self) -> Counter {
        self.inner.log_bytes.clone()
    }

    /// A worker started: `pid` leads its process group; `running` turns false when it ends.
    pub fn worker_started(&self, key: WorkerKey, pid: u32, running: Arc<AtomicBool>) {
        self.workers().held.insert(key, (pid, running));
    }

    /// The supervisor forgot a worker (its exit is being reported).
    pub fn worker_reaped(&self, key: &WorkerKey) {
        self.workers().held.remove(key);
    }

    /// A worker's exit, counted once, by outcome.
    pub fn worker_exited(&self, exit_code: Option<i32>, signal: Option<i32>) {
        let outcome = outcome(exit_code, signal);
        self.inner
            .worker_exits
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Exits waiting for the coordinator (the agent was away when they happened).
    pub fn set_undelivered(&self, n: usize) {
        self.workers().undelivered = n;
    }

    /// Whether the agent holds a session with a coordinator now.
    pub fn set_connected(&self, connected: bool) {
        self.inner.connected.set(i64::from(connected));
    }

    /// A join after the first.
    pub fn reconnected(&self) {
        self.inner.reconnects.inc();
    }

    fn workers(&self) -> MutexGuard<'_, Workers> {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What the scrape measures besides the counters, in plain data: workers by state and
    /// the process groups to sum the memory of.
    fn workers_now(&self) -> (u64, u64, BTreeSet<u32>) {
        let w = self.workers();
        let running = w
            .held
            .values()
            .filter(|(_, r)| r.load(Ordering::Acquire))
            .count() as u64;
        let exited = (w.held.len() as u64 - running) + w.undelivered as u64;
        let groups = w.held.values().map(|(pid, _)| *pid).collect();
        (running, exited, groups)
    }

    /// The whole `/metrics` text, reading `/proc` (blocking: call it off the async threads).
    pub fn render_blocking(&self) -> String {
        let (running, exited, groups) = self.workers_now();
        let sample = Sample {
            running,
            exited,
            agent_rss_bytes: rss_bytes("/proc/self/status"),
            workers_rss_bytes: groups_rss_bytes(&groups),
        };
        self.encode(&sample)
    }

    /// The text of the counters and of `sample`.
    fn encode(&self, sample: &Sample) -> String {
        use prometheus_client::encoding::prometheus_text::encode;
        let mut out = String::new();
        if encode(&mut out, &self.inner.registry).is_err() {
            out.clear();
        }
        let mut more = String::new();
        if encode(&mut more, &sample.registry()).is_ok() {
            out.push_str(&more);
        }
        out
    }

    /// What [`ringmaster_common::metrics::serve`] calls at each scrape.
    pub fn render(&self) -> ringmaster_common::metrics::Render {
        let m = self.clone();
        Arc::new(move || {
            let m = m.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || m.render_blocking())
                    .await
                    .unwrap_or_default()
            })
        })
    }
}

/// What one scrape measured.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    running: u64,
    exited: u64,
    /// None where `/proc` could not tell (then the series is absent, not 0).
    agent_rss_bytes: Option<u64>,
    workers_rss_bytes: u64,
}

impl Sample {
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix(PREFIX);
        let workers: Family<StateLabel, Gauge> = Family::default();
        for (state, n) in [("running", self.running), ("exited", self.exited)] {
            workers.get_or_create(&StateLabel { state }).set(n as i64);
        }
        r.register(
            "workers",
            "Workers held, by state (exited: ended, the coordinator not told yet)",
            workers,
        );
        if let Some(b) = self.agent_rss_bytes {
            let g: Gauge = Gauge::default();
            g.set(b as i64);
            r.register(
                "resident_memory_bytes",
                "Resident memory of the agent process (VmRSS)",
                g,
            );
        }
        let g: Gauge = Gauge::default();
        g.set(self.workers_rss_bytes as i64);
        r.register(
            "worker_resident_memory_bytes",
            "Resident memory (VmRSS) summed over every process of the workers' process groups",
            g,
        );
        r
    }
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in bytes. None without one (a zombie,
/// a kernel thread).
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(n * 1024),
        _ => None,
    }
}

fn rss_bytes(status_path: &str) -> Option<u64> {
    std::fs::read_to_string(status_path)
        .ok()
        .as_deref()
        .and_then(parse_vm_rss)
}

/// The process group of a `/proc/<pid>/stat` text (the fifth field; the command name before
/// it is in parentheses and may hold spaces or parentheses itself).
fn parse_pgrp(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    after.split_whitespace().nth(2)?.parse().ok()
}

/// The resident memory of every process in `groups`, in bytes (processes that exit during
/// the walk are skipped).
fn groups_rss_bytes(groups: &BTreeSet<u32>) -> u64 {
    if groups.is_empty() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let is_process = e
            .file_name()
            .to_str()
            .is_some_and(|s| s.parse::<u32>().is_ok());
        let in_group = is_process
            && std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .as_deref()
                .and_then(parse_pgrp)
                .is_some_and(|g| groups.contains(&g));
        if in_group
            && let Some(b) = std::fs::read_to_string(e.path().join("status"))
                .ok()
                .as_deref()
                .and_then(parse_vm_rss)
        {
            total += b;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The samples of a text in the Prometheus text format, keyed `name{k="v",...}`, after the
    /// strict parse (every line valid, each family typed before its samples) and the agent's
    /// own rules: every family is `ringmaster_agent_*`, a counter or a gauge, with help.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let samples = ringmaster_common::metrics::parse_prometheus(text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let (mut helped, mut typed) = (BTreeSet::new(), BTreeSet::new());
        for line in text.lines().filter(|l| l.starts_with('#')) {
            assert!(!line.contains("_total_total"), "{line:?}");
            let mut parts = line.splitn(4, ' ');
            let (kind, name, rest) = (parts.nth(1), parts.next(), parts.next());
            let name = name
                .filter(|n| n.starts_with("ringmaster_agent_"))
                .unwrap_or_else(|| panic!("{line:?}"));
            match kind {
                Some("HELP") => {
                    assert!(rest.is_some_and(|h| !h.is_empty()), "{line:?}");
                    helped.insert(name);
                }
                Some("TYPE") => {
                    assert!(matches!(rest, Some("counter" | "gauge")), "{line:?}");
                    assert_eq!(
                        rest == Some("counter"),
                        name.ends_with("_total"),
                        "{line:?}"
                    );
                    typed.insert(name);
                }
                _ => panic!("{line:?}"),
            }
        }
        assert_eq!(helped, typed, "every family has its help and its type");
        samples
            .into_iter()
            .map(|(name, labels, value)| {
                let labels: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                let series = if labels.is_empty() {
                    name
                } else {
                    format!("{name}{{{}}}", labels.join(","))
                };
                (series, value)
            })
            .collect()
    }

    fn key(rank: u32) -> WorkerKey {
        ("job-1".into(), 0, rank)
    }

    #[test]
    fn the_text_parses_and_counts_what_happened() {
        let m = Metrics::new();
        let flags: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
        for (r, f) in flags.iter().enumerate() {
            m.worker_started(key(r as u32), 100 + r as u32, f.clone());
        }
        m.log_bytes().inc_by(1234);
        m.set_connected(true);
        m.reconnected();
        // Rank 0 succeeded and is reaped; rank 1 was killed and its exit is not reaped yet;
        // rank 2 runs; one more exit waits for the coordinator.
        flags[0].store(false, Ordering::Release);
        m.worker_exited(Some(0), None);
        m.worker_reaped(&key(0));
        flags[1].store(false, Ordering::Release);
        m.worker_exited(None, Some(9));
        m.worker_exited(Some(3), None);
        m.set_undelivered(1);
        let (running, exited, groups) = m.workers_now();
        assert_eq!((running, exited), (1, 2));
        assert_eq!(groups, BTreeSet::from([101, 102]));
        let text = m.encode(&Sample {
            running,
            exited,
            agent_rss_bytes: Some(4096),
            workers_rss_bytes: 8192,
        });
        let samples = parse(&text);
        let want = [
            ("ringmaster_agent_workers{state=\"running\"}", 1.0),
            ("ringmaster_agent_workers{state=\"exited\"}", 2.0),
            (
                "ringmaster_agent_worker_exits_total{outcome=\"success\"}",
                1.0,
            ),
            (
                "ringmaster_agent_worker_exits_total{outcome=\"signal\"}",
                1.0,
            ),
            (
                "ringmaster_agent_worker_exits_total{outcome=\"failure\"}",
                1.0,
            ),
            ("ringmaster_agent_log_bytes_total", 1234.0),
            ("ringmaster_agent_reconnects_total", 1.0),
            ("ringmaster_agent_connected", 1.0),
            ("ringmaster_agent_resident_memory_bytes", 4096.0),
            ("ringmaster_agent_worker_resident_memory_bytes", 8192.0),
        ];
        for (series, value) in want {
            assert_eq!(samples.get(series), Some(&value), "{series} in:\n{text}");
        }
        assert_eq!(samples.len(), want.len(), "{text}");
        // No job, rank or pid in any label.
        assert!(!text.contains("job-1") && !text.contains("101"), "{text}");
    }

    #[test]
    fn a_fresh_agent_has_every_family_and_zeroes() {
        let m = Metrics::new();
        let samples = parse(&m.render_blocking());
        assert_eq!(samples["ringmaster_agent_connected"], 0.0);
        assert_eq!(samples["ringmaster_agent_log_bytes_total"], 0.0);
        assert_eq!(samples["ringmaster_agent_workers{state=\"running\"}"], 0.0);
        assert_eq!(
            samples["ringmaster_agent_worker_resident_memory_bytes"],
            0.0
        );
        assert!(samples["ringmaster_agent_resident_memory_bytes"] > 0.0);
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(Some(0), None), "success");
        assert_eq!(outcome(Some(1), None), "failure");
        assert_eq!(outcome(Some(143), None), "failure");
        assert_eq!(outcome(None, Some(15)), "signal");
        assert_eq!(outcome(None, None), "unknown");
    }

    #[test]
    fn proc_texts_are_read() {
        let status = "Name:\tsleep\nVmPeak:\t    8000 kB\nVmRSS:\t     1234 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\nState:\tS\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots\n"), None);
        let stat = "4242 (a (weird) name) S 1 4240 4240 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_pgrp(stat), Some(4240));
        assert_eq!(parse_pgrp("garbage"), None);
    }

    /// The memory of a worker's whole process group is measured: a shell and its child.
    #[test]
    fn worker_memory_is_summed_over_its_process_group() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let m = Metrics::new();
        m.worker_started(key(0), pid, Arc::new(AtomicBool::new(true)));
        // The shell alone, then with its child: poll for the child (no bare sleep).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let both = loop {
            let members = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("stat"))
                        .ok()
                        .as_deref()
                        .and_then(parse_pgrp)
                        == Some(pid)
                })
                .count();
            if members >= 2 || std::time::Instant::now() > deadline {
                break members;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let shell = rss_bytes(&format!("/proc/{pid}/status")).unwrap_or(0);
        let samples = parse(&m.render_blocking());
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = child.wait();
        assert_eq!(both, 2, "the shell's child did not start");
        let summed = samples["ringmaster_agent_worker_resident_memory_bytes"];
        assert!(summed > shell as f64, "{summed} vs the shell's {shell}");
        assert_eq!(samples["ringmaster_agent_workers{state=\"running\"}"], 1.0);
    }

    #[test]
    fn the_content_type_is_the_encoders() {
        assert_eq!(
            ringmaster_common::metrics::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        );
    }

    /// Every `ringmaster_agent_*` metric the example Grafana dashboard queries is one the agent
    /// serves (the coordinator's test checks the other `ringmaster_*` names).
    #[test]
    fn the_dashboard_queries_agent_metrics_that_exist() {
        let dashboard = include_str!("../../deploy/grafana/ringmaster.json");
        let m = Metrics::new();
        m.worker_exited(Some(0), None);
        let text = m.encode(&Sample {
            agent_rss_bytes: Some(1),
            ..Sample::default()
        });
        let names = ringmaster_common::metrics::metric_names_in(dashboard, "ringmaster_agent_");
        assert!(!names.is_empty(), "the dashboard has no agent panel");
        for name in names {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "the dashboard queries {name}, which the agent does not serve:\n{text}"
            );
        }
    }
}
