//! Scheduling: placing waiting jobs, restarts that are due, applying a job's events through
//! [`crate::job::next`] and carrying out its actions (ports, starting and stopping workers).

use super::*;

impl Core {
    /// Hands the jobs whose restart backoff ran out to the state machine.
    pub(super) fn restarts_due(&mut self) {
        let now = now_ms();
        let due: Vec<String> = self
            .jobs
            .values()
            .filter(|j| {
                j.state == JobState::Restarting && j.restart_not_before_ms.is_some_and(|t| now >= t)
            })
            .map(|j| j.id.clone())
            .collect();
        for id in due {
            self.apply(&id, Event::Tick);
        }
    }

    pub(super) fn busy(&self) -> Busy {
        let mut busy = Busy::new();
        for j in self.jobs.values() {
            // A job holds its slots while any worker of it may be alive.
            let holds = j.state.has_workers() || j.ranks.iter().any(|r| !r.state.is_done());
            if !holds {
                continue;
            }
            for s in &j.placement {
                for slot in &s.slots {
                    busy.entry(s.name.clone())
                        .or_default()
                        .insert(*slot, j.id.clone());
                }
            }
        }
        busy
    }

    /// Offers a placement to every job waiting for one, oldest first.
    pub(super) fn schedule(&mut self) {
        let mut waiting: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| !self.unacked.contains(&j.id))
            .filter(|j| {
                j.state == JobState::Pending
                    || (j.state == JobState::Restarting
                        && j.restart_not_before_ms.is_none()
                        && j.ranks.all_done())
            })
            .map(|j| (j.created_unix_ms, j.id.clone()))
            .collect();
        waiting.sort();
        for (_, id) in waiting {
            let views: BTreeMap<String, NodeView> = self
                .nodes
                .iter()
                .map(|(k, n)| {
                    (
                        k.clone(),
                        NodeView {
                            slots: n.slots,
                            alive: n.alive(),
                            cordoned: n.cordoned,
                        },
                    )
                })
                .collect();
            let mut busy = self.busy();
            // A restarting job's own old slots do not block it.
            for m in busy.values_mut() {
                m.retain(|_, j| *j != id);
            }
            let placement = placement::place(
                &self.jobs[&id].spec,
                self.cfg.hostfile.as_ref(),
                &views,
                &busy,
            );
            self.apply(&id, Event::Placement(placement));
        }
    }

    /// Applies `event` to job `id`, then every event its actions raised, in order. The way in
    /// for commands and timers; actions [`Core::raise`] instead.
    pub(super) fn apply(&mut self, id: &str, event: Event) {
        let id = id.to_owned();
        self.acting(move |core| core.step(&id, event));
    }

    /// Runs `f` as the start of an apply: the events it raises, and those they raise, are
    /// stepped through in order afterwards. Never re-entered.
    pub(super) fn acting(&mut self, f: impl FnOnce(&mut Core)) {
        debug_assert!(
            !self.applying,
            "Core::apply re-entered (an action must raise)"
        );
        self.applying = true;
        f(self);
        while let Some((id, event)) = self.raised.pop_front() {
            self.step(&id, event);
        }
        self.applying = false;
    }

    /// Queues `event` for job `id`, to be applied once the event being applied is done.
    pub(super) fn raise(&mut self, id: &str, event: Event) {
        debug_assert!(self.applying, "Core::raise outside an apply");
        self.raised.push_back((id.to_owned(), event));
    }

    /// One event: the job's next state from [`crate::job::next`], its actions carried out,
    /// the job saved if it changed.
    fn step(&mut self, id: &str, event: Event) {
        let Some(mut job) = self.jobs.remove(id) else {
            return;
        };
        // Change detection costs the header, not the ranks: those count their own changes.
        let before = job.without_bulk(|j| j.clone());
        let rank_writes = job.ranks.writes();
        let events = job.events.newest_seq();
        let (mut job, actions) = crate::job::next(job, event, now_ms());
        let changed = job.ranks.writes() != rank_writes
            || job.events.newest_seq() != events
            || job.without_bulk(|j| *j != before);
        if changed {
            job.updated_unix_ms = now_ms();
            if job.state != before.state {
                tracing::info!(
                    job = %job.id,
                    generation = job.generation,
                    from = before.state.as_str(),
                    to = job.state.as_str(),
                    reason = job.pending_reason.as_deref().unwrap_or(""),
                    "job state"
                );
                if job.state.is_terminal() || job.state == JobState::Restarting {
                    self.dirty = true;
                }
            }
            if job.stopping != before.stopping {
                self.dirty = true;
            }
        }
        self.jobs.insert(id.to_owned(), job);
        for a in actions {
            self.act(id, a);
        }
        if changed {
            self.save(id);
        }
    }

    pub(super) fn act(&mut self, id: &str, action: Action) {
        match action {
            Action::AllocatePort { generation, node } => {
                let rid = self.next_request;
                self.next_request += 1;
                let sent = self.send_to(&node, ToAgent::AllocatePort { request_id: rid });
                if sent {
                    self.port_requests
                        .insert(rid, (id.to_owned(), generation, node));
                } else {
                    self.raise(
                        id,
                        Event::PortFailed {
                            generation,
                            message: format!("node {node} is not connected"),
                        },
                    );
                }
            }
            Action::StartWorkers { generation } => self.start_when_durable(id, generation),
            Action::Reschedule => self.dirty = true,
            Action::StopWorkers {
                generation,
                nodes,
                grace_ms,
            } => {
                let mut unreachable = Vec::new();
                for node in nodes {
                    let sent = self.send_to(
                        &node,
                        ToAgent::StopWorkers(StopWorkers {
                            job_id: id.to_owned(),
                            generation,
                            grace_ms,
                            reason: "generation ended".into(),
                        }),
                    );
                    if !sent {
                        unreachable.push(node);
                    }
                }
                // A drain waits for an unreachable node to be declared lost (the heartbeat
                // timeout): its workers may still run, and the moved job must not start a
                // second generation beside them.
                if self.jobs[id].moving.is_some() {
                    unreachable.clear();
                }
                for node in unreachable {
                    let ranks: Vec<u32> = self.jobs[id]
                        .ranks
                        .on_node(&node)
                        .filter(|r| !r.state.is_done())
                        .map(|r| r.rank)
                        .collect();
                    if !ranks.is_empty() {
                        self.raise(
                            id,
                            Event::RanksLost {
                                node: node.clone(),
                                ranks,
                                message: format!("node {node} unreachable during teardown"),
                                reason: crate::job::Reason::NodeLost,
                            },
                        );
                    }
                }
            }
            Action::CloseGeneration { generation } => {
                // A generation ended by a failure: its trainers abort their collectives at once
                // (their progress streams end with ABORTED) instead of waiting out a timeout
                // for a peer that is gone. A cancel lets them checkpoint, a success is done.
                // A move off a drained node is no failure: its trainers checkpoint on SIGTERM
                // (which takes their collectives), as a cancel's do.
                if let Some(j) = self.jobs.get(id)
                    && matches!(j.state, JobState::Restarting | JobState::Failed)
                    && j.generation == generation
                    && j.moving.is_none()
                {
                    let reason = j
                        .failure
                        .as_ref()
                        .map(|f| f.message.clone())
                        .unwrap_or_else(|| "the job failed".into());
                    self.rendezvous.abort(id, generation, &reason);
                }
                self.rendezvous.close(id, generation);
            }
        }
    }

    /// Durable, then start: the generation's record (placement, master port) is committed
    /// before any agent is told to start it, so that a coordinator that takes over (a
    /// restart, another leader on etcd) knows every generation an agent may be running and
    /// never restarts workers it was not told of.
    fn start_when_durable(&mut self, id: &str, generation: u64) {
        if !self.persist_job(id) {
            return;
        }
        let durable = self.persist.flush();
        let tx = self.starts_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let result = durable.wait().await;
            let _ = tx.send((id, generation, result));
        });
    }

    /// The generation's record is committed (or the writer stopped): start its workers if
    /// the job still waits for exactly them.
    pub(super) fn durable(
        &mut self,
        id: &str,
        generation: u64,
        result: Result<(), crate::persist::WritesStopped>,
    ) {
        let Some(job) = self.jobs.get(id) else { return };
        if job.state != crate::job::JobState::Starting || job.generation != generation {
            return;
        }
        if let Err(e) = result {
            if self.cfg.leading.is_some() {
                // An elected leader whose writes stopped is stepping down: the next leader
                // must not find workers of a generation it never heard of.
                tracing::error!(job = %id, generation, "not starting workers: their generation is not saved: {e}");
                return;
            }
            // Alone on an embedded store, running jobs go on when the store fails (the
            // operator is told at every write).
            tracing::warn!(job = %id, generation, "starting workers whose generation is not saved: {e}");
        }
        if self.lapsed() {
            return;
        }
        let id = id.to_owned();
        self.acting(move |core| core.start_workers(&id, generation));
    }

    pub(super) fn start_workers(&mut self, id: &str, generation: u64) {
        if let Some(j) = self.jobs.get_mut(id) {
            // The new generation reports where it resumed from.
            j.resumed_from = None;
            // From here agents may run this generation's workers: ending it takes a stop.
            j.workers_sent = true;
        }
        let job = &self.jobs[id];
        self.rendezvous.open(id, generation);
        let (program, train_config) = match (&job.spec.command, &job.spec.train) {
            (Some(cmd), _) => (cmd.clone(), String::new()),
            (None, Some(train)) => (
                Vec::new(),
                serde_json::to_string(train).expect("training config serializes"),
            ),
            (None, None) => (Vec::new(), String::new()),
        };
        // What every node is told, shared: a generation's files are not copied per node.
        let common = std::sync::Arc::new(StartTemplate {
            job_id: id.to_owned(),
            generation,
            restart_count: job.restart_count,
            max_restarts: job.spec.max_restarts,
            world_size: job.world_size(),
            nnodes: job.placement.len() as u32,
            master_addr: job.master_addr.clone().unwrap_or_default(),
            master_port: job.master_port.unwrap_or_default(),
            program,
            env: job.spec.env.clone(),
            train_config,
            files: job.files.clone(),
            resume_from: job
                .last_checkpoint
                .as_ref()
                .map(|c| c.path.clone())
                .unwrap_or_default(),
            job_name: job.name.clone(),
            worker_token: self.cfg.creds.worker_token(id, generation),
            workdir: job.spec.workdir.clone().unwrap_or_default(),
        });
        tracing::info!(job = %id, generation, world_size = common.world_size, master = %format!("{}:{}", common.master_addr, common.master_port), "starting workers");
        // Each agent gets only its own ranks: the message stays O(local ranks), so that a
        // 1,000-node start is 1,000 small messages, not 1,000 copies of the whole table.
        let orders: Vec<(String, StartWorkers)> = job
            .nodes()
            .into_iter()
            .map(|node| {
                let ranks = job
                    .ranks
                    .on_node(&node)
                    .map(|r| RankEntry {
                        rank: r.rank,
                        local_rank: r.local_rank,
                        node_rank: r.node_rank,
                        node: r.node.clone(),
                        slot: r.slot,
                    })
                    .collect();
                let m = StartWorkers {
                    common: common.clone(),
                    ranks,
                };
                (node, m)
            })
            .collect();
        let mut unreachable = Vec::new();
        for (node, m) in orders {
            if !self.send_to(&node, ToAgent::StartWorkers(m)) {
                unreachable.push(node);
            }
        }
        for node in unreachable {
            let ranks: Vec<u32> = self.jobs[id].ranks.on_node(&node).map(|r| r.rank).collect();
            self.raise(
                id,
                Event::RanksLost {
                    node: node.clone(),
                    ranks,
                    message: format!("node {node} not connected when the generation started"),
                    reason: crate::job::Reason::NodeLost,
                },
            );
        }
    }
}
