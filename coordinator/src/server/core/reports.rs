//! Reports from trainers: progress (step, loss, checkpoints committed) and checkpoint requests,
//! with the checks on the paths a trainer reports.

use super::*;

impl Core {
    /// `ringctl checkpoint`: SIGUSR1 to every worker of the running generation. Each trainer
    /// raises a flag that travels with the next step's loss all-reduce, so that every rank
    /// checkpoints after the same step; the commit comes back as `last_checkpoint`.
    pub(super) fn request_checkpoint(&mut self, id: &str) -> Result<pb::JobStatus, CoreError> {
        let Some(job) = self.jobs.get(id) else {
            return Err(unknown_job(id));
        };
        if job.spec.train.is_none() {
            return Err(CoreError::Invalid(format!(
                "job {id} runs a command, not the trainer: only `train:` jobs can be asked to \
                 checkpoint"
            )));
        }
        if job.state != JobState::Running || job.stopping {
            return Err(CoreError::Precondition(format!(
                "job {id} is {}{}: a checkpoint can be requested only while it is RUNNING",
                job.state.as_str(),
                if job.stopping { " (stopping)" } else { "" }
            )));
        }
        let generation = job.generation;
        let nodes = job.nodes();
        tracing::info!(job = %id, generation, "checkpoint requested");
        let mut unreachable = Vec::new();
        for node in nodes {
            let sent = self.send_to(
                &node,
                ToAgent::SignalWorkers(SignalWorkers {
                    job_id: id.to_owned(),
                    generation,
                    signal: nix::sys::signal::Signal::SIGUSR1 as i32,
                    reason: "checkpoint requested".into(),
                }),
            );
            if !sent {
                unreachable.push(node);
            }
        }
        if !unreachable.is_empty() {
            return Err(CoreError::Unavailable(format!(
                "node(s) {} not connected: the request did not reach every rank (the ranks that \
                 got it wait for the others at the next step, so none checkpoints alone)",
                unreachable.join(", ")
            )));
        }
        Ok(status::job_status(&self.jobs[id]))
    }

    pub(super) fn progress(&mut self, p: ProgressReport) {
        let Some(job) = self.jobs.get_mut(&p.job_id) else {
            return;
        };
        if job.generation != p.generation {
            return;
        }
        // Once a finished job's processes are all gone, nothing may report for it (a leaked
        // worker credential must not move its checkpoint afterwards). Reports still count while
        // a cancelled job's ranks are exiting: they commit their last checkpoint then.
        if job.state.is_terminal() && job.ranks.all_done() {
            return;
        }
        job.ranks.report(p.rank, p.step, p.collective_seq, now_ms());
        let mut persist = false;
        if p.rank == 0
            && let Some(c) = &p.committed_checkpoint
            && job
                .last_checkpoint
                .as_ref()
                .is_none_or(|l| l.path != c.path)
            && checkpoint_path_allowed(job, &c.path)
                .inspect_err(|why| {
                    tracing::warn!(job = %job.id, generation = job.generation, path = %c.path, "reported checkpoint refused: {why}");
                })
                .is_ok()
        {
            tracing::info!(job = %job.id, generation = job.generation, step = c.step, path = %c.path, "checkpoint committed");
            job.last_checkpoint = Some(CheckpointRef {
                step: c.step,
                path: c.path.clone(),
            });
            crate::job::events::checkpoint_committed(job, now_ms());
            // Once per newly committed checkpoint (the report is re-sent every step).
            if let Some(s) = p.checkpoint_seconds {
                self.cfg.metrics.checkpoint_durations(s.save, s.commit);
            }
            persist = true;
        }
        if p.rank == 0
            && let Some(r) = &p.resume
        {
            let from = r.from.as_ref().map(|c| CheckpointRef {
                step: c.step,
                path: c.path.clone(),
            });
            if job.resumed_from != from {
                job.resumed_from = from;
                crate::job::events::resumed(job, now_ms());
                let generation = job.generation;
                for w in &r.skipped {
                    tracing::warn!(job = %job.id, generation, "resume skipped {w}");
                    job.checkpoint_warnings.push(crate::job::cap(
                        format!("generation {generation}: skipped {w}"),
                        crate::job::MAX_WARNING_BYTES,
                    ));
                }
                let n = job.checkpoint_warnings.len();
                if n > crate::job::MAX_CHECKPOINT_WARNINGS {
                    job.checkpoint_warnings
                        .drain(..n - crate::job::MAX_CHECKPOINT_WARNINGS);
                }
                persist = true;
            }
        }
        if p.rank == 0 {
            job.progress.step = Some(p.step);
            job.progress.total_steps = (p.total_steps > 0).then_some(p.total_steps);
            job.progress.loss = p.loss;
            job.progress.tokens_per_second = Some(p.tokens_per_second);
            // None when the step's norm was not finite (or not computed, or a resume report):
            // never the last finite one.
            job.progress.grad_norm = p.grad_norm;
        }
        job.updated_unix_ms = now_ms();
        let world = job.ranks.len() as u32;
        let running = job.state == JobState::Running;
        // Progress is published, not persisted: it changes every step. Checkpoints are both.
        if persist {
            self.save(&p.job_id);
        } else if !self.progressed.contains(&p.job_id) {
            self.progressed.insert(p.job_id.clone());
        }
        self.telemetry(&p, world, running);
    }
}

/// A reported checkpoint must lie inside the job's `output_dir` (it becomes the next generation's
/// `RINGMASTER_RESUME_FROM`): a path outside it, or with `..` in it, is refused.
///
/// An absolute `output_dir` is a plain prefix check. A relative one is resolved by each trainer
/// against its own working directory, which the coordinator does not know: the reported path
/// (always absolute) must then contain `output_dir`'s components followed by at least one more.
pub(super) fn checkpoint_path_allowed(job: &Job, path: &str) -> Result<(), String> {
    use std::path::{Component, Path};
    let Some(out) = job
        .spec
        .train
        .as_ref()
        .and_then(|t| t.get("output_dir"))
        .and_then(|v| v.as_str())
    else {
        return Err("the job has no output_dir (only `train:` jobs report checkpoints)".into());
    };
    let p = Path::new(path);
    if path.len() > 4096 || !p.is_absolute() {
        return Err("not an absolute path".into());
    }
    let comps: Vec<Component> = p.components().collect();
    if comps
        .iter()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err("the path has '.' or '..' components".into());
    }
    let out_comps: Vec<Component> = Path::new(out)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if out_comps.iter().any(|c| matches!(c, Component::ParentDir)) || out_comps.is_empty() {
        return Err(format!("output_dir '{out}' is not a plain path"));
    }
    let inside = if Path::new(out).is_absolute() {
        comps.len() > out_comps.len() && comps[..out_comps.len()] == out_comps[..]
    } else {
        comps.len() > out_comps.len()
            && comps
                .windows(out_comps.len())
                .take(comps.len() - out_comps.len())
                .any(|w| w == &out_comps[..])
    };
    if inside {
        Ok(())
    } else {
        Err(format!("not inside the job's output_dir '{out}'"))
    }
}
