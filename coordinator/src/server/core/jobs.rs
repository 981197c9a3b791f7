//! Jobs: submission (limits, room made by retiring finished jobs), the store's acknowledgement,
//! worker exits, retention and removal.

use super::*;

impl Core {
    pub(super) fn worker_exited(&mut self, e: WorkerExited) {
        let Some(job) = self.jobs.get(&e.job_id) else {
            return;
        };
        if job.generation != e.generation {
            return;
        }
        let level_fail = e.exit_code != Some(0) || e.signal.is_some();
        if level_fail && !job.stopping && !job.state.is_terminal() {
            // A fault this coordinator acts on: how long after the process ended it knew.
            if e.exited_unix_ms > 0 {
                let late_ms = now_ms().saturating_sub(e.exited_unix_ms);
                self.cfg.metrics.fault_detected("exit", late_ms);
            }
            tracing::warn!(job = %e.job_id, generation = e.generation, rank = e.rank, exit_code = ?e.exit_code, signal = ?e.signal, "worker failed");
        } else {
            tracing::info!(job = %e.job_id, generation = e.generation, rank = e.rank, exit_code = ?e.exit_code, signal = ?e.signal, "worker exited");
        }
        self.apply(
            &e.job_id.clone(),
            Event::WorkerExited {
                generation: e.generation,
                rank: e.rank,
                exit_code: e.exit_code,
                signal: e.signal,
                log_tail: e.log_tail,
            },
        );
    }

    /// Validates and records a job; returns its id. The job is scheduled, and the submit
    /// answered, once its record is on disk ([`Core::acked`]).
    pub(super) fn submit(
        &mut self,
        spec: JobSpec,
        files: BTreeMap<String, Vec<u8>>,
    ) -> Result<String, CoreError> {
        self.writable()?;
        let train = spec
            .validate("job spec")
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
        if let Some(train) = &train {
            crate::spec::validate_files(train, &files, "job spec")
                .map_err(|e| CoreError::Invalid(e.to_string()))?;
        }
        let size = job_bytes(&spec, &files);
        if size > MAX_SPEC_BYTES as u64 {
            return Err(CoreError::Invalid(format!(
                "job spec and files total {size} bytes, above the limit of {} per job",
                show_bytes(MAX_SPEC_BYTES as u64)
            )));
        }
        if let Some(hf) = &self.cfg.hostfile {
            placement::check_against_hostfile(&spec, hf)
                .map_err(|e| CoreError::Invalid(format!("job spec: {e}")))?;
        }
        if let Some(limit) = self.persist.max_record_bytes() {
            // The job is saved as one record; the store (etcd) caps a request. Half is left
            // for what the job gathers as it runs (ranks, failures, generations).
            let record =
                serde_json::to_vec(&Job::new("x".repeat(60), spec.clone(), files.clone(), 0))
                    .map_or(0, |v| v.len());
            if record > limit / 2 {
                return Err(CoreError::Invalid(format!(
                    "job spec and files take {} as a saved record, above the {} this state \
                     store allows one job at submit (half of its request limit of {}); inline \
                     fewer or smaller files (keep data on shared storage)",
                    show_bytes(record as u64),
                    show_bytes((limit / 2) as u64),
                    show_bytes(limit as u64)
                )));
            }
        }
        self.make_room(size)?;
        let n = self.ids.take().map_err(|e| {
            tracing::error!(error = %e, "cannot hand out a job id");
            CoreError::Unavailable(format!("cannot hand out a job id: {e}"))
        })?;
        let base = spec.name.clone().unwrap_or_else(|| "job".to_owned());
        let base: String = base.chars().take(50).collect();
        let id = format!("{base}-{n}");
        self.persist.put(
            "meta/coordinator".into(),
            serde_json::to_vec(&Meta {
                next_job: self.ids.next(),
            })
            .expect("meta serializes"),
        );
        let job = Job::new(id.clone(), spec, files, now_ms());
        tracing::info!(job = %id, generation = 0, "job submitted");
        self.job_bytes += size;
        self.jobs.insert(id.clone(), job);
        self.unacked.insert(id.clone());
        self.save(&id);
        self.flush_changed();
        Ok(id)
    }

    /// A submitted job's record is on disk, or cannot be: answer the submit. A job that could
    /// not be saved was never acknowledged, so it is dropped.
    pub(super) fn acked(&mut self, ack: Acked) {
        let Acked { id, result, reply } = ack;
        self.unacked.remove(&id);
        let r = match result {
            Ok(()) => {
                self.dirty = true;
                self.jobs
                    .get(&id)
                    .map(status::job_status)
                    .ok_or_else(|| unknown_job(&id))
            }
            Err(stopped) => {
                tracing::error!(job = %id, "submit refused: {stopped}");
                self.remove_job(&id);
                Err(CoreError::Unavailable(stopped.to_string()))
            }
        };
        let _ = reply.send(r);
    }

    /// Refuses a write (submit, cancel, checkpoint) once the state writer has stopped.
    pub(super) fn writable(&self) -> Result<(), CoreError> {
        match self.persist.stopped() {
            Some(stopped) => Err(CoreError::Unavailable(stopped.to_string())),
            None => Ok(()),
        }
    }

    /// Finished jobs that may be removed (no worker of theirs can be alive), oldest first.
    pub(super) fn retirable(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.state.is_terminal() && j.ranks.all_done())
            .map(|j| {
                (
                    j.finished_unix_ms.unwrap_or(j.updated_unix_ms),
                    j.id.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Makes room for one more job of `size` bytes under `--max-jobs` and `--max-job-bytes`,
    /// removing the oldest finished jobs if need be.
    pub(super) fn make_room(&mut self, size: u64) -> Result<(), CoreError> {
        let limits = self.cfg.job_limits;
        let full =
            |c: &Core| c.jobs.len() >= limits.max_jobs || c.job_bytes + size > limits.max_job_bytes;
        if !full(self) {
            return Ok(());
        }
        for (_, id) in self.retirable() {
            tracing::info!(job = %id, "removing a finished job to make room for a new one");
            self.remove_job(&id);
            if !full(self) {
                return Ok(());
            }
        }
        if self.jobs.len() >= limits.max_jobs {
            return Err(CoreError::LimitReached(format!(
                "the coordinator holds {} unfinished jobs, the limit (--max-jobs {}); wait for \
                 jobs to finish or cancel some",
                self.jobs.len(),
                limits.max_jobs
            )));
        }
        Err(CoreError::LimitReached(format!(
            "job specs and files of the unfinished jobs take {}, and this job's {size} bytes \
             would go above the limit of {} (--max-job-bytes)",
            show_bytes(self.job_bytes),
            show_bytes(limits.max_job_bytes)
        )))
    }

    /// Removes finished jobs beyond `--retain-finished-jobs` or older than
    /// `--retain-finished-for`, from memory and the store. Their logs stay on the agents.
    pub(super) fn retire_finished(&mut self) {
        let limits = self.cfg.job_limits;
        let now = now_ms();
        let retain_ms = u64::try_from(limits.retain_for.as_millis()).unwrap_or(u64::MAX);
        let finished = self.retirable();
        let excess = finished.len().saturating_sub(limits.retain_finished);
        for (i, (at, id)) in finished.into_iter().enumerate() {
            if i < excess || now.saturating_sub(at) > retain_ms {
                tracing::info!(job = %id, "removing a finished job (retention limits)");
                self.remove_job(&id);
            }
        }
    }

    /// Forgets a job: memory, store, watchers, rendezvous.
    pub(super) fn remove_job(&mut self, id: &str) {
        if let Some(job) = self.jobs.remove(id) {
            self.cfg.metrics.forget(id);
            self.telemetry.remove(id);
            self.job_bytes = self
                .job_bytes
                .saturating_sub(job_bytes(&job.spec, &job.files));
            for key in job.record_keys() {
                self.persist.delete(key);
            }
        }
        self.unacked.remove(id);
        self.changed.remove(id);
        self.progressed.remove(id);
        self.watchers.remove(id);
        self.rendezvous.forget(id);
    }
}
