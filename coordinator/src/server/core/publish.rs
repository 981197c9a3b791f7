//! Persisting and publishing: changed jobs go to the store in one commit per burst, and their
//! status to watchers.

use super::*;

impl Core {
    /// Marks a job for persisting and publishing; done once per burst of commands by
    /// [`Core::flush_changed`], so that 1,000 WorkerStarted in a row cost one write, not 1,000.
    pub(super) fn save(&mut self, id: &str) {
        self.changed.insert(id.to_owned());
    }

    pub(super) fn flush_changed(&mut self) {
        for id in std::mem::take(&mut self.progressed) {
            if !self.changed.contains(&id) && self.jobs.contains_key(&id) {
                self.publish(&id);
            }
        }
        for id in std::mem::take(&mut self.changed) {
            if let Some(job) = self.jobs.get(&id) {
                self.cfg.metrics.observe(job);
            }
            if self.persist_job(&id) {
                // Published with the ranks' last telemetry: the final frame of a watch shows
                // where each rank stood.
                self.publish(&id);
            }
            if self
                .jobs
                .get(&id)
                .is_some_and(|j| j.state != JobState::Running)
            {
                // A generation's telemetry ends with it.
                self.telemetry.remove(&id);
            }
        }
    }

    /// Queues the writes that bring the store up to date with job `id` (its header and the
    /// parts that changed, [`crate::job::record`]); false if there is no such job.
    pub(super) fn persist_job(&mut self, id: &str) -> bool {
        let Some(job) = self.jobs.get_mut(id) else {
            return false;
        };
        for (key, value) in job.record_writes() {
            match value {
                Some(v) => self.persist.put(key, v),
                None => self.persist.delete(key),
            }
        }
        true
    }

    pub(super) fn publish(&mut self, id: &str) {
        if let Some(w) = self.watchers.get(id)
            && let Some(st) = self.job_status(id)
        {
            w.send_replace(st);
            if self.jobs[id].state.is_terminal() && w.receiver_count() == 0 {
                self.watchers.remove(id);
            }
        }
    }
}
