//! Worker supervision: start one process per local rank, watch it, stop whole process trees.
//!
//! Layout:
//! - `spawn` — one worker process (own process group, dies with the agent).
//! - `kill` — signals to process groups.
//! - `logs` — rank log files, the agent-log copy, the failure tail, and serving logs.
//!
//! Each worker gets a monitor task that waits for it, kills what is left of its process group
//! (so that no grandchild outlives it), drains its pipes and reports the exit on a channel
//! the agent's loop reads — also while the coordinator is unreachable.

pub mod kill;
pub mod logs;
pub mod spawn;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use ringmaster_proto as pb;
use tokio::sync::mpsc;

use crate::env::{EnvInput, worker_env};
use crate::paths::AllowedRoots;

/// (job id, generation, rank)
pub type WorkerKey = (String, u64, u32);

/// Environment variable that marks a worker as this agent's, so that a restarted agent can
/// find and kill what a killed predecessor left behind.
pub const AGENT_ROOT_ENV: &str = "RINGMASTER_AGENT_ROOT";

struct Worker {
    pid: u32,
    running: Arc<AtomicBool>,
    log_rotations: Arc<AtomicU64>,
}

/// Owns the workers of this node.
pub struct Supervisor {
    work_dir: PathBuf,
    trainer: PathBuf,
    node: String,
    /// This node's advertised address.
    node_addr: String,
    /// host:port of the coordinator as this agent dials it; trainers use it for rendezvous.
    coordinator: String,
    workers: BTreeMap<WorkerKey, Worker>,
    exits: mpsc::Sender<pb::WorkerExited>,
    /// How workers dial the coordinator (the agent's own TLS settings, minus its identity).
    tls: ringmaster_auth::ClientTls,
    /// The unprivileged user workers run as (`--worker-user`); None: the agent's own.
    worker_user: Option<spawn::WorkerUser>,
    log_rotation: logs::Rotation,
    /// Where a job's `workdir:` and `output_dir` may lie.
    roots: AllowedRoots,
    /// Workers held and bytes captured, for `--metrics-listen`.
    metrics: crate::metrics::Metrics,
}

pub use ringmaster_common::names::is_safe_component;

fn exited(
    key: &WorkerKey,
    exit_code: Option<i32>,
    signal: Option<i32>,
    tail: Vec<String>,
    exited_unix_ms: u64,
) -> pb::WorkerExited {
    pb::WorkerExited {
        job_id: key.0.clone(),
        generation: key.1,
        rank: key.2,
        exit_code,
        signal,
        log_tail: tail,
        exited_unix_ms,
    }
}

/// Now, in ms since the Unix epoch.
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Supervisor {
    pub fn new(
        work_dir: PathBuf,
        trainer: PathBuf,
        node: String,
        node_addr: String,
        coordinator: String,
        exits: mpsc::Sender<pb::WorkerExited>,
    ) -> Supervisor {
        Supervisor {
            roots: AllowedRoots::only(&work_dir),
            work_dir,
            trainer,
            node,
            node_addr,
            coordinator,
            workers: BTreeMap::new(),
            exits,
            tls: Default::default(),
            worker_user: None,
            log_rotation: logs::Rotation::default(),
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// Reports workers and captured output to these metrics (by default, metrics of its own).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Supervisor {
        self.metrics = metrics;
        self
    }

    /// Workers verify the coordinator with this CA (and server name) too.
    pub fn set_tls(&mut self, tls: &ringmaster_auth::ClientTls) {
        self.tls = ringmaster_auth::ClientTls {
            identity: None,
            ..tls.clone()
        };
    }

    /// Workers run as this user; their generation directories are theirs.
    pub fn with_worker_user(mut self, user: Option<spawn::WorkerUser>) -> Supervisor {
        self.worker_user = user;
        self
    }

    /// Rotates rank logs at this size limit (default: [`logs::Rotation::default`]).
    pub fn with_log_rotation(mut self, rotation: logs::Rotation) -> Supervisor {
        self.log_rotation = rotation;
        self
    }

    /// Replaces the allowed roots (by default the work dir alone).
    pub fn with_allowed_roots(mut self, roots: AllowedRoots) -> Supervisor {
        self.roots = roots;
        self
    }

    /// The directory of one generation of a job: `<work-dir>/<job>/gen-<g>`.
    ///
    /// # Errors
    /// A job id that is not a safe path component (never lets a job write outside the work dir).
    pub fn generation_dir(&self, job: &str, generation: u64) -> Result<PathBuf, String> {
        if !is_safe_component(job) {
            return Err(format!("job id '{job}' is not a safe directory name"));
        }
        Ok(self.work_dir.join(job).join(format!("gen-{generation}")))
    }

    pub fn log_path(&self, job: &str, generation: u64, rank: u32) -> Result<PathBuf, String> {
        Ok(self
            .generation_dir(job, generation)?
            .join(format!("rank-{rank}.log")))
    }

    /// What following a worker's log needs while the worker is here (runs or was not yet
    /// reaped): whether it runs and its log's rotations.
    pub fn log_live(&self, key: &WorkerKey) -> Option<logs::Live> {
        self.workers.get(key).map(|w| logs::Live {
            running: w.running.clone(),
            rotations: w.log_rotations.clone(),
            keep: self.log_rotation.keep,
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The workers alive now, reported when (re)joining.
    pub fn inventory(&self) -> Vec<pb::RunningWorker> {
        self.workers
            .iter()
            .map(|(k, w)| pb::RunningWorker {
                job_id: k.0.clone(),
                generation: k.1,
                rank: k.2,
                pid: w.pid,
            })
            .collect()
    }

    /// Forgets a worker whose exit was reported.
    pub fn reap(&mut self, key: &WorkerKey) {
        self.workers.remove(key);
        self.metrics.worker_reaped(key);
    }

    /// Starts this node's ranks of `sw`. Returns what to tell the coordinator for each.
    pub fn start(&mut self, sw: &pb::StartWorkers) -> Vec<pb::agent_message::Msg> {
        let mut out = Vec::new();
        let mut local: Vec<&pb::RankEntry> =
            sw.ranks.iter().filter(|r| r.node == self.node).collect();
        local.sort_by_key(|r| r.local_rank);
        let fail = |rank: u32, message: String| {
            pb::agent_message::Msg::StartFailed(pb::StartFailed {
                job_id: sw.job_id.clone(),
                generation: sw.generation,
                rank,
                message,
            })
        };
        let gen_dir = match self.generation_dir(&sw.job_id, sw.generation) {
            Ok(d) => d,
            Err(e) => return local.iter().map(|r| fail(r.rank, e.clone())).collect(),
        };
        // Workers start in the generation's directory (or the job's `workdir:`), and nothing
        // starts from a spec that would write outside the allowed roots.
        let cwd = match self.roots.job_dirs(&sw.workdir, &sw.train_config, &gen_dir) {
            Ok(d) => d,
            Err(e) => return local.iter().map(|r| fail(r.rank, e.clone())).collect(),
        };
        // Made and opened without following links: a worker of an earlier generation may
        // have replaced the job directory with one.
        let gen_fd =
            match logs::open::generation_dir(&self.work_dir, &sw.job_id, sw.generation, true) {
                Ok(d) => d,
                Err(e) => {
                    let msg = format!("creating the generation directory: {e}");
                    return local.iter().map(|r| fail(r.rank, msg.clone())).collect();
                }
            };
        // The config is written before the directory is handed over, and through the open
        // directory: a worker of another job running as the worker user cannot put a link
        // where the agent (root) writes.
        let program = if sw.program.is_empty() {
            match self.write_train_config(sw, &gen_fd, &gen_dir) {
                Ok(cfg) => vec![
                    self.trainer.display().to_string(),
                    cfg.display().to_string(),
                ],
                Err(e) => return local.iter().map(|r| fail(r.rank, e.clone())).collect(),
            }
        } else {
            sw.program.clone()
        };
        // Workers of another user start (and write) in their generation directory: it is theirs.
        if let Some(u) = &self.worker_user
            && let Err(e) = std::os::unix::fs::fchown(&gen_fd, Some(u.uid), Some(u.gid))
        {
            let msg = format!("giving {} to user {}: {e}", gen_dir.display(), u.name);
            return local.iter().map(|r| fail(r.rank, msg.clone())).collect();
        }
        let inherited_omp = std::env::var_os("OMP_NUM_THREADS").is_some();
        let gen_dir_text = gen_dir.display().to_string();
        let root = self.work_dir.display().to_string();
        for entry in &local {
            let key: WorkerKey = (sw.job_id.clone(), sw.generation, entry.rank);
            if self.workers.contains_key(&key) {
                tracing::warn!(job = %sw.job_id, generation = sw.generation, rank = entry.rank, "start for a worker already running ignored");
                continue;
            }
            let mut env = worker_env(&EnvInput {
                start: sw,
                entry,
                local: &local,
                coordinator: &self.coordinator,
                inherited_omp,
                node_name: &self.node,
                node_addr: &self.node_addr,
                work_dir: &gen_dir_text,
                tls: &self.tls,
            });
            env.push((AGENT_ROOT_ENV.into(), root.clone()));
            let log_name = format!("rank-{}.log", entry.rank);
            let log_path = gen_dir.join(&log_name);
            let log = match gen_fd.try_clone().map_err(|source| logs::LogFileError::Io {
                path: gen_dir.clone(),
                source,
            }) {
                Ok(dir) => logs::RankLog::open(dir, &gen_dir, &log_name, self.log_rotation),
                Err(e) => Err(e),
            };
            let log = match log {
                Ok(l) => l,
                Err(e) => {
                    out.push(fail(entry.rank, format!("opening the rank log: {e}")));
                    continue;
                }
            };
            let log_rotations = log.rotations();
            let mut child =
                match spawn::spawn(&program, &env, Some(&cwd), self.worker_user.as_ref()) {
                    Ok(c) => c,
                    Err(e) => {
                        out.push(fail(entry.rank, format!("starting {:?}: {e}", program[0])));
                        continue;
                    }
                };
            let pid = child.id().expect("a just-spawned child has a pid");
            tracing::info!(job = %sw.job_id, generation = sw.generation, rank = entry.rank, pid, log = %log_path.display(), "worker started");
            let running = Arc::new(AtomicBool::new(true));
            let sink = Arc::new(
                logs::LogSink::new(log, sw.job_id.clone(), sw.generation, entry.rank)
                    .counting(self.metrics.log_bytes()),
            );
            let stdout = child.stdout.take().expect("stdout is piped");
            let stderr = child.stderr.take().expect("stderr is piped");
            let exits = self.exits.clone();
            let flag = running.clone();
            let k = key.clone();
            tokio::spawn(async move {
                let pumps = tokio::spawn({
                    let sink = sink.clone();
                    async move {
                        tokio::join!(logs::pump(stdout, &sink), logs::pump(stderr, &sink));
                    }
                });
                let status = child.wait().await;
                let exited_at = now_unix_ms();
                flag.store(false, Ordering::Release);
                // Nothing of the worker outlives it: kill what is left of its group.
                kill::signal_group(pid, Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(2), pumps).await;
                let (code, sig) = match status {
                    Ok(s) => (s.code(), s.signal()),
                    Err(e) => {
                        tracing::error!(error = %e, "waiting for a worker failed");
                        (None, None)
                    }
                };
                let _ = exits
                    .send(exited(&k, code, sig, sink.tail(), exited_at))
                    .await;
            });
            self.metrics
                .worker_started(key.clone(), pid, running.clone());
            self.workers.insert(
                key,
                Worker {
                    pid,
                    running,
                    log_rotations,
                },
            );
            out.push(pb::agent_message::Msg::WorkerStarted(pb::WorkerStarted {
                job_id: sw.job_id.clone(),
                generation: sw.generation,
                rank: entry.rank,
                pid,
            }));
        }
        out
    }

    /// Writes the training config and its files into the generation's directory (`gen_fd`,
    /// opened at `gen_dir`), with the config's references pointing at the written copies.
    /// Every name is opened relative to the open directory without following links.
    fn write_train_config(
        &self,
        sw: &pb::StartWorkers,
        gen_fd: &std::fs::File,
        gen_dir: &Path,
    ) -> Result<PathBuf, String> {
        let mut cfg: serde_json::Value = serde_json::from_str(&sw.train_config)
            .map_err(|e| format!("training config from the coordinator is not JSON: {e}"))?;
        let files_dir = gen_dir.join("files");
        let mut written: BTreeMap<&str, PathBuf> = BTreeMap::new();
        if !sw.files.is_empty() {
            let dir = logs::open::open_dir(gen_fd, "files", &files_dir, true)
                .map_err(|e| format!("creating {}: {e}", files_dir.display()))?;
            for (i, (name, bytes)) in sw.files.iter().enumerate() {
                let base: String = Path::new(name)
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let file_name = format!("{i}-{}", base.trim_start_matches('.'));
                let path = files_dir.join(&file_name);
                logs::open::write_whole(&dir, &file_name, &path, bytes)
                    .map_err(|e| format!("writing {e}"))?;
                written.insert(name.as_str(), path);
            }
        }
        if let serde_json::Value::Object(map) = &mut cfg {
            for v in map.values_mut() {
                if let serde_json::Value::String(s) = v
                    && let Some(p) = written.get(s.as_str())
                {
                    *s = p.display().to_string();
                }
            }
        }
        let path = gen_dir.join("train.yaml");
        let text = serde_json::to_string_pretty(&cfg).expect("JSON value serializes");
        logs::open::write_whole(gen_fd, "train.yaml", &path, text.as_bytes())
            .map_err(|e| format!("writing {e}"))?;
        Ok(path)
    }

    /// Stops the workers of `job` with generation ≤ `generation`: SIGTERM to each process
    /// group now, SIGKILL after `grace` to whatever is left.
    pub fn stop(&mut self, job: &str, generation: u64, grace: Duration) {
        let keys: Vec<WorkerKey> = self
            .workers
            .keys()
            .filter(|k| k.0 == job && k.1 <= generation)
            .cloned()
            .collect();
        for k in keys {
            self.stop_one(&k, grace);
        }
    }

    /// Delivers `sig` to the process group of every running worker of `job`'s `generation`;
    /// returns how many got it.
    pub fn signal(&self, job: &str, generation: u64, sig: Signal) -> usize {
        let mut n = 0;
        for (k, w) in &self.workers {
            if k.0 == job && k.1 == generation && w.running.load(Ordering::Acquire) {
                tracing::info!(job = %k.0, generation = k.1, rank = k.2, pid = w.pid, signal = %sig, "signalling worker");
                kill::signal_group(w.pid, sig);
                n += 1;
            }
        }
        n
    }

    /// Stops every worker (agent shutdown).
    pub fn stop_all(&mut self, grace: Duration) {
        let keys: Vec<WorkerKey> = self.workers.keys().cloned().collect();
        for k in keys {
            self.stop_one(&k, grace);
        }
    }

    fn stop_one(&self, key: &WorkerKey, grace: Duration) {
        let Some(w) = self.workers.get(key) else {
            return;
        };
        let pgid = w.pid;
        tracing::info!(job = %key.0, generation = key.1, rank = key.2, pid = pgid, grace_ms = grace.as_millis() as u64, "stopping worker");
        if grace.is_zero() {
            kill::signal_group(pgid, Signal::SIGKILL);
            return;
        }
        kill::signal_group(pgid, Signal::SIGTERM);
        let running = w.running.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if running.load(Ordering::Acquire) || kill::group_alive(pgid) {
                kill::signal_group(pgid, Signal::SIGKILL);
            }
        });
    }
}

/// Kills process groups left by an earlier agent on the same work dir (one killed with
/// SIGKILL: its direct children died with it, their children may not have). Call it only with
/// the work dir's lock held ([`crate::lock`]): then no live agent owns those workers.
pub fn kill_leftovers(work_dir: &Path) -> usize {
    let marker = format!("{AGENT_ROOT_ENV}={}", work_dir.display());
    let me = std::process::id();
    let mut groups = std::collections::BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            continue;
        }
        if let Ok(pgid) = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32))) {
            groups.insert(pgid.as_raw() as u32);
        }
    }
    let own = nix::unistd::getpgrp().as_raw() as u32;
    groups.remove(&own);
    for g in &groups {
        tracing::warn!(
            pgid = g,
            "killing a worker process group left by an earlier agent"
        );
        kill::signal_group(*g, Signal::SIGKILL);
    }
    groups.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup(dir: &Path) -> Supervisor {
        let (tx, _rx) = mpsc::channel(1);
        Supervisor::new(
            dir.to_owned(),
            PathBuf::from("trainer"),
            "n0".into(),
            "127.0.0.1".into(),
            "127.0.0.1:1".into(),
            tx,
        )
    }

    #[test]
    fn no_job_id_leads_outside_the_work_dir() {
        let s = sup(Path::new("/w"));
        for bad in ["..", "../x", "a/b", "/etc", ".hidden", "", "-rf", "a\0b"] {
            assert!(s.generation_dir(bad, 0).is_err(), "{bad:?}");
            assert!(s.log_path(bad, 0, 1).is_err(), "{bad:?}");
        }
        assert_eq!(
            s.log_path("job-1", 3, 2).unwrap(),
            PathBuf::from("/w/job-1/gen-3/rank-2.log")
        );
    }

    #[tokio::test]
    async fn train_config_files_are_written_inside_the_generation_dir() {
        let dir = tempfile::tempdir().unwrap();
        let s = sup(dir.path());
        let gen_dir = s.generation_dir("job-1", 0).unwrap();
        std::fs::create_dir_all(&gen_dir).unwrap();
        let mut sw = pb::StartWorkers {
            job_id: "job-1".into(),
            train_config: r#"{"stage":"sft","deepspeed":"../../etc/ds.json"}"#.into(),
            ..Default::default()
        };
        sw.files.insert(
            "../../etc/ds.json".into(),
            b"{\"zero_optimization\":{}}".to_vec(),
        );
        let gen_fd = std::fs::File::open(&gen_dir).unwrap();
        let cfg = s.write_train_config(&sw, &gen_fd, &gen_dir).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        let ds = PathBuf::from(v["deepspeed"].as_str().unwrap());
        assert!(ds.starts_with(&gen_dir), "{}", ds.display());
        assert_eq!(std::fs::read(&ds).unwrap(), b"{\"zero_optimization\":{}}");
    }

    /// Polls `f` every 20 ms until it returns `Some`, for at most 5 s.
    async fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(v) = f() {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("condition not met within 5 s")
    }

    #[tokio::test]
    async fn workers_start_in_their_generation_dir_and_bad_paths_start_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().canonicalize().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Supervisor::new(
            work.clone(),
            PathBuf::from("trainer"),
            "n0".into(),
            "127.0.0.1".into(),
            "127.0.0.1:1".into(),
            tx,
        );
        let mut sw = pb::StartWorkers {
            job_id: "job-1".into(),
            generation: 4,
            world_size: 1,
            nnodes: 1,
            ranks: vec![pb::RankEntry {
                node: "n0".into(),
                ..Default::default()
            }],
            program: vec!["sh".into(), "-c".into(), "pwd".into()],
            ..Default::default()
        };
        let msgs = s.start(&sw);
        assert!(
            matches!(msgs.as_slice(), [pb::agent_message::Msg::WorkerStarted(_)]),
            "{msgs:?}"
        );
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        s.reap(&(e.job_id.clone(), e.generation, e.rank));
        assert_eq!(
            e.log_tail,
            vec![work.join("job-1/gen-4").display().to_string()]
        );

        // A workdir outside the roots, and a train job writing to /etc: refused, nothing runs.
        sw.generation = 5;
        sw.workdir = "/tmp".into();
        let msgs = s.start(&sw);
        let [pb::agent_message::Msg::StartFailed(f)] = msgs.as_slice() else {
            panic!("{msgs:?}");
        };
        assert!(f.message.contains("workdir: /tmp"), "{}", f.message);
        sw.workdir.clear();
        sw.program.clear();
        sw.train_config = r#"{"output_dir": "/etc/x"}"#.into();
        let msgs = s.start(&sw);
        let [pb::agent_message::Msg::StartFailed(f)] = msgs.as_slice() else {
            panic!("{msgs:?}");
        };
        assert!(
            f.message.contains("output_dir: /etc/x") && f.message.contains("system directory"),
            "{}",
            f.message
        );
        assert!(s.is_empty());
        assert!(
            !work.join("job-1/gen-5/train.yaml").exists(),
            "nothing written from a refused config"
        );
    }

    #[tokio::test]
    async fn a_worker_and_its_children_are_stopped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Supervisor::new(
            dir.path().to_owned(),
            PathBuf::from("trainer"),
            "n0".into(),
            "127.0.0.1".into(),
            "127.0.0.1:1".into(),
            tx,
        );
        let pidfile = dir.path().join("child.pid");
        let sw = pb::StartWorkers {
            job_id: "job-1".into(),
            world_size: 1,
            nnodes: 1,
            ranks: vec![pb::RankEntry {
                node: "n0".into(),
                ..Default::default()
            }],
            program: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "sleep 1000 & echo $! > {}; echo started; wait",
                    pidfile.display()
                ),
            ],
            ..Default::default()
        };
        let msgs = s.start(&sw);
        assert!(matches!(
            msgs.as_slice(),
            [pb::agent_message::Msg::WorkerStarted(_)]
        ));
        // A second start of the same worker is ignored (no duplicate launch).
        assert!(s.start(&sw).is_empty());
        let child: i32 = poll(|| {
            std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse().ok())
        })
        .await;
        s.stop("job-1", 0, Duration::from_millis(500));
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.signal, Some(15));
        assert_eq!(e.log_tail, vec!["started"]);
        // The grandchild is gone too (killed with the worker's process group).
        poll(|| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let gone = stat.is_empty()
                || stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'));
            gone.then_some(())
        })
        .await;
        let log = std::fs::read_to_string(s.log_path("job-1", 0, 0).unwrap()).unwrap();
        assert_eq!(log, "started\n");
    }
}
