//! Membership: agents joining (and re-joining after a coordinator restart), heartbeats and
//! lost nodes, what agents report about their workers, and sending to an agent.

use super::*;

impl Core {
    pub(super) fn agent_join(
        &mut self,
        join: JoinRequest,
        peer: Option<SocketAddr>,
        tx: AgentTx,
    ) -> Result<(u64, JoinAck), CoreError> {
        let name = join.name.clone();
        if let Some(l) = &self.cfg.leading
            && !l.valid()
        {
            return Err(CoreError::Unavailable(
                "this coordinator's leadership has lapsed; join the current leader".into(),
            ));
        }
        if !crate::spec::is_safe_name(&name) {
            return Err(CoreError::Invalid(format!(
                "node name '{name}' is not valid: use 1-63 characters of A-Z a-z 0-9 . _ -"
            )));
        }
        // The hostfile's limit; the agent refuses `--slots` above the same one (checked in
        // coordinator/tests), and a raw Join may not get past it.
        let max_slots = ringmaster_hostfile::hostfile::MAX_SLOTS;
        if join.slots > max_slots {
            return Err(CoreError::LimitReached(format!(
                "node '{name}' announces {} slots, above the limit of {max_slots} slots per agent",
                join.slots,
            )));
        }
        check_join_fields(&join)?;
        if let Some(hf) = &self.cfg.hostfile
            && !hf.hosts.iter().any(|h| h.name == name)
        {
            let known: Vec<&str> = hf.hosts.iter().map(|h| h.name.as_str()).collect();
            return Err(CoreError::Refused(format!(
                "node '{name}' is not in the coordinator's hostfile (hosts: {})",
                known.join(", ")
            )));
        }
        let now = Instant::now();
        if let Some(n) = self.nodes.get(&name)
            && n.conn.is_some()
            && n.incarnation != join.incarnation
            && now.duration_since(n.last_seen) < self.cfg.heartbeat_timeout
        {
            return Err(CoreError::NameTaken(format!(
                "node name '{name}' is already joined by another live agent ({}); give each agent its own --name",
                n.advertise_addr
            )));
        }
        let advertise = if join.advertise_addr.is_empty() {
            peer.map(|p| p.ip().to_string()).unwrap_or_default()
        } else {
            join.advertise_addr.clone()
        };
        let hostfile_slots = self
            .cfg
            .hostfile
            .as_ref()
            .and_then(|hf| hf.hosts.iter().find(|h| h.name == name).map(|h| h.slots));
        let slots = match hostfile_slots {
            Some(s) => {
                if s != join.slots {
                    tracing::warn!(node = %name, hostfile = s, announced = join.slots, "agent announces a different slot count; the hostfile's count rules");
                }
                s
            }
            None => join.slots.max(1),
        };
        if !self.nodes.contains_key(&name) {
            self.make_room_for_a_node(&name)?;
        }
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let previous_incarnation = self.nodes.get(&name).map(|n| n.incarnation.clone());
        let node = self
            .nodes
            .entry(name.clone())
            .or_insert_with(|| Node::new(slots, now));
        let rejoin = node.joined;
        node.slots = slots;
        node.announced_slots = join.slots;
        node.advertise_addr = advertise.clone();
        node.hostname = join.hostname.clone();
        node.version = join.version.clone();
        node.incarnation = join.incarnation.clone();
        node.conn = Some(AgentConn {
            id: conn_id,
            tx: tx.clone(),
        });
        node.last_seen = now;
        node.joined = true;
        node.lost = false;
        node.running_workers = join.running.len() as u32;
        tracing::info!(
            node = %name,
            slots,
            addr = %advertise,
            running = join.running.len(),
            rejoin,
            "agent joined"
        );
        let rec = NodeRecord {
            name: name.clone(),
            slots,
            advertise_addr: advertise,
            hostname: join.hostname.clone(),
            version: join.version.clone(),
        };
        self.persist.put(
            format!("nodes/{name}"),
            serde_json::to_vec(&rec).expect("node record serializes"),
        );
        self.dirty = true;

        // The JoinAck goes first on the stream, before anything reconciliation sends.
        let ack = JoinAck {
            slots,
            heartbeat_interval_ms: (self.cfg.heartbeat_timeout.as_millis() as u64 / 4)
                .clamp(50, 5_000),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            leader_epoch: self.epoch(),
            leader_scope: self
                .cfg
                .leading
                .as_ref()
                .map(|l| l.scope().to_owned())
                .unwrap_or_default(),
        };
        let _ = tx.try_send(Ok(Outbound {
            msg: ToAgent::JoinAck(ack.clone()),
            leader_epoch: self.epoch(),
        }));

        // Reconcile what the agent runs with what the jobs expect.
        let restarted =
            previous_incarnation.is_some_and(|p| !p.is_empty() && p != join.incarnation);
        self.reconcile(&name, &join, restarted);
        Ok((conn_id, ack))
    }

    pub(super) fn reconcile(&mut self, node: &str, join: &JoinRequest, restarted: bool) {
        let mut reported: BTreeSet<(String, u64, u32)> = BTreeSet::new();
        for w in &join.running {
            reported.insert((w.job_id.clone(), w.generation, w.rank));
            let current = self.jobs.get(&w.job_id).is_some_and(|j| {
                j.state.has_workers() && j.generation == w.generation && !j.stopping
            });
            if current {
                self.apply(
                    &w.job_id,
                    Event::WorkerStarted {
                        generation: w.generation,
                        rank: w.rank,
                        pid: w.pid,
                    },
                );
            } else {
                tracing::warn!(node, job = %w.job_id, generation = w.generation, rank = w.rank, "agent runs a worker of an ended generation; stopping it");
                self.send_to(
                    node,
                    ToAgent::StopWorkers(StopWorkers {
                        job_id: w.job_id.clone(),
                        generation: w.generation,
                        grace_ms: crate::job::ABORT_GRACE_MS,
                        reason: "generation ended while the agent was away".into(),
                    }),
                );
            }
        }
        for e in &join.exited_while_away {
            reported.insert((e.job_id.clone(), e.generation, e.rank));
            self.worker_exited(e.clone());
        }
        // Ranks this node should be running that the agent does not know of are gone.
        let mut lost: Vec<(String, Vec<u32>)> = Vec::new();
        for job in self.jobs.values() {
            if !job.state.has_workers() {
                continue;
            }
            let ranks: Vec<u32> = job
                .ranks
                .on_node(node)
                .filter(|r| !r.state.is_done())
                .filter(|r| r.state != RankState::Starting || restarted || r.pid.is_some())
                .filter(|r| !reported.contains(&(job.id.clone(), job.generation, r.rank)))
                .map(|r| r.rank)
                .collect();
            if !ranks.is_empty() {
                lost.push((job.id.clone(), ranks));
            }
        }
        for (id, ranks) in lost {
            let message = if restarted {
                format!("agent on {node} restarted; ranks {ranks:?} are gone")
            } else {
                format!("agent on {node} reconnected without ranks {ranks:?}")
            };
            self.apply(
                &id,
                Event::RanksLost {
                    node: node.to_owned(),
                    ranks,
                    message,
                    reason: if restarted {
                        crate::job::Reason::AgentRestarted
                    } else {
                        crate::job::Reason::NodeLost
                    },
                },
            );
        }
    }

    pub(super) fn check_heartbeats(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.heartbeat_timeout;
        let mut newly_lost = Vec::new();
        for (name, n) in &mut self.nodes {
            if n.lost || !n.joined {
                continue;
            }
            if now.duration_since(n.last_seen) > timeout {
                n.lost = true;
                n.conn = None;
                newly_lost.push((name.clone(), now.duration_since(n.last_seen)));
            }
        }
        for (name, silent) in newly_lost {
            let since =
                humantime::format_duration(Duration::from_millis(timeout.as_millis() as u64));
            let never = self.started.elapsed() <= timeout + Duration::from_millis(500);
            tracing::warn!(node = %name, "node lost: no heartbeat for {since}");
            self.dirty = true;
            let affected: Vec<(String, Vec<u32>)> = self
                .jobs
                .values()
                .filter(|j| j.state.has_workers())
                .map(|j| {
                    (
                        j.id.clone(),
                        j.ranks
                            .on_node(&name)
                            .filter(|r| !r.state.is_done())
                            .map(|r| r.rank)
                            .collect::<Vec<_>>(),
                    )
                })
                .filter(|(_, r)| !r.is_empty())
                .collect();
            if !affected.is_empty() {
                // From the node's last heartbeat to now: at least the heartbeat timeout.
                self.cfg
                    .metrics
                    .fault_detected("node_lost", silent.as_millis() as u64);
            }
            for (id, ranks) in affected {
                let message = if never {
                    format!(
                        "node {name} lost: its agent did not come back within {since} of the coordinator's restart"
                    )
                } else {
                    format!("node {name} lost: no heartbeat for {since}")
                };
                self.apply(
                    &id,
                    Event::RanksLost {
                        node: name.clone(),
                        ranks,
                        message,
                        reason: crate::job::Reason::NodeLost,
                    },
                );
            }
        }
    }

    pub(super) fn node_statuses(&self) -> Vec<NodeInfo> {
        let now = Instant::now();
        let mut names: Vec<&String> = self.nodes.keys().collect();
        if self.cfg.hostfile.is_none() {
            names.sort_by(|a, b| ringmaster_hostfile::natural_cmp(a, b));
        } else if let Some(hf) = &self.cfg.hostfile {
            names = hf.hosts.iter().map(|h| &h.name).collect();
        }
        names
            .into_iter()
            .filter_map(|name| {
                let n = self.nodes.get(name)?;
                let state = if n.alive() {
                    "JOINED"
                } else if n.lost {
                    "LOST"
                } else if n.joined {
                    "DISCONNECTED"
                } else {
                    "EXPECTED"
                };
                Some(NodeInfo {
                    name: name.clone(),
                    slots: n.slots,
                    state,
                    advertise_addr: n.advertise_addr.clone(),
                    version: n.version.clone(),
                    last_heartbeat_ms_ago: n
                        .joined
                        .then(|| now.duration_since(n.last_seen).as_millis() as u64),
                    running_workers: n.running_workers,
                    hostname: n.hostname.clone(),
                    cordoned: n.cordoned,
                })
            })
            .collect()
    }

    /// This coordinator's leadership epoch (0: alone on its store, no election).
    pub(super) fn epoch(&self) -> u64 {
        self.cfg.leading.as_ref().map_or(0, |l| l.epoch())
    }

    pub(super) fn send_to(&mut self, node: &str, msg: ToAgent) -> bool {
        if let Some(leading) = &self.cfg.leading
            && !leading.valid()
        {
            tracing::warn!(node, "not sent: this coordinator's leadership has lapsed");
            return false;
        }
        let Some(conn) = self.nodes.get(node).and_then(|n| n.conn.as_ref()) else {
            return false;
        };
        match conn.tx.try_send(Ok(Outbound {
            msg,
            leader_epoch: self.epoch(),
        })) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(node, error = %e, "could not send to agent");
                false
            }
        }
    }

    pub(super) fn agent_msg(&mut self, node: &str, conn: u64, msg: AgentEvent) {
        use AgentEvent as Msg;
        match self.nodes.get_mut(node) {
            Some(n) if n.conn.as_ref().is_some_and(|c| c.id == conn) => {
                n.last_seen = Instant::now();
            }
            _ => return, // a superseded connection
        }
        match msg {
            Msg::Heartbeat { running_workers } => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.running_workers = running_workers;
                }
            }
            Msg::WorkerStarted(w) => {
                let current = self
                    .jobs
                    .get(&w.job_id)
                    .is_some_and(|j| j.generation == w.generation && j.state.has_workers());
                if current {
                    tracing::info!(job = %w.job_id, generation = w.generation, rank = w.rank, pid = w.pid, node, "worker started");
                    self.apply(
                        &w.job_id,
                        Event::WorkerStarted {
                            generation: w.generation,
                            rank: w.rank,
                            pid: w.pid,
                        },
                    );
                } else {
                    self.send_to(
                        node,
                        ToAgent::StopWorkers(StopWorkers {
                            job_id: w.job_id,
                            generation: w.generation,
                            grace_ms: 0,
                            reason: "generation already ended".into(),
                        }),
                    );
                }
            }
            Msg::WorkerExited(e) => self.worker_exited(e),
            Msg::StartFailed(f) => {
                tracing::warn!(job = %f.job_id, generation = f.generation, rank = f.rank, node, "worker failed to start: {}", f.message);
                self.apply(
                    &f.job_id.clone(),
                    Event::StartFailed {
                        generation: f.generation,
                        rank: f.rank,
                        message: f.message,
                    },
                );
            }
            Msg::PortAllocated(p) => {
                // Only the node asked may answer (request ids are sequential: another agent
                // could guess one).
                let asked = self
                    .port_requests
                    .get(&p.request_id)
                    .is_some_and(|(_, _, node0)| node0 == node);
                if !asked {
                    tracing::warn!(
                        node,
                        request = p.request_id,
                        "port answer for a request this node was not asked: ignored"
                    );
                } else if let Some((job, generation, node0)) =
                    self.port_requests.remove(&p.request_id)
                {
                    let event = if p.error.is_empty() && (1..=65_535).contains(&p.port) {
                        let addr = self
                            .nodes
                            .get(&node0)
                            .map(|n| n.advertise_addr.clone())
                            .unwrap_or_default();
                        Event::PortAllocated {
                            generation,
                            addr,
                            port: p.port,
                        }
                    } else {
                        let why = if p.error.is_empty() {
                            format!("port {} is not a TCP port", p.port)
                        } else {
                            crate::job::cap(p.error, crate::job::MAX_WARNING_BYTES)
                        };
                        Event::PortFailed {
                            generation,
                            message: format!("agent on {node0}: {why}"),
                        }
                    };
                    self.apply(&job, event);
                }
            }
            Msg::LogChunk(c) => {
                // The agent sends data only against credits, and the reader's channel holds
                // the whole window: a full channel means an agent that ignores its credits.
                // The fetch then ends without eof, which its reader reports as a truncation.
                let eof = c.eof;
                let id = c.request_id;
                let failed = match self.log_requests.get(&id) {
                    // Only the node the fetch went to may answer it.
                    Some((asked, _)) if asked != node => {
                        tracing::warn!(
                            node,
                            request = id,
                            "log data for a fetch sent to another node: ignored"
                        );
                        return;
                    }
                    Some((_, tx)) => {
                        let r = if c.error.is_empty() {
                            Ok(c)
                        } else {
                            Err(CoreError::Precondition(c.error))
                        };
                        tx.try_send(r).is_err()
                    }
                    None => true,
                };
                if eof {
                    self.log_requests.remove(&id);
                } else if failed {
                    self.log_requests.remove(&id);
                    self.send_to(node, ToAgent::CancelFetch { request_id: id });
                }
            }
            Msg::Join => {
                tracing::warn!(node, "agent sent a second Join on one stream; ignored");
            }
        }
    }
}

/// Most nodes a coordinator keeps (joined, lost or expected). At the limit a new name takes
/// the place of the node lost longest ago that no unfinished job placed; with none, it is
/// refused.
pub const MAX_NODES: usize = 16_384;
/// Longest `hostname` an agent may announce (a fully qualified name is at most 253).
pub const MAX_HOSTNAME_BYTES: usize = 255;
/// Longest `version` and `incarnation` an agent may announce.
pub const MAX_AGENT_TAG_BYTES: usize = 128;

/// A join's own fields, checked before any is kept or persisted: bounded text without control
/// characters, and an advertised address that is an IP address or a host name (it becomes
/// the workers' MASTER_ADDR).
fn check_join_fields(join: &JoinRequest) -> Result<(), CoreError> {
    let name = &join.name;
    let text = |field: &str, v: &str, max: usize| {
        if v.len() > max || v.chars().any(char::is_control) {
            Err(CoreError::Invalid(format!(
                "node '{name}': {field} must be at most {max} bytes without control characters \
                 ({} bytes given)",
                v.len()
            )))
        } else {
            Ok(())
        }
    };
    text("hostname", &join.hostname, MAX_HOSTNAME_BYTES)?;
    text("version", &join.version, MAX_AGENT_TAG_BYTES)?;
    text("incarnation", &join.incarnation, MAX_AGENT_TAG_BYTES)?;
    let addr = join.advertise_addr.as_str();
    if !addr.is_empty() && addr.parse::<std::net::IpAddr>().is_err() && !is_host_name(addr) {
        return Err(CoreError::Invalid(format!(
            "node '{name}': advertise address '{}' is neither an IP address nor a host name",
            crate::job::cap(addr.chars().filter(|c| !c.is_control()).collect(), 80)
        )));
    }
    Ok(())
}

/// A host name: at most 253 bytes of dot-separated labels of 1-63 letters, digits, hyphens
/// and underscores (container runtimes name hosts so), no label starting or ending with a
/// hyphen; one trailing dot (a fully qualified name) is allowed.
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Core {
    /// Before a node of a new name is added: at [`MAX_NODES`], forgets the node lost longest
    /// ago that is not connected, not in the hostfile and not placed by an unfinished job.
    fn make_room_for_a_node(&mut self, name: &str) -> Result<(), CoreError> {
        if self.nodes.len() < MAX_NODES {
            return Ok(());
        }
        let placed: BTreeSet<String> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal() || !j.all_ranks_done())
            .flat_map(|j| j.nodes())
            .collect();
        let in_hostfile = |n: &str| {
            self.cfg
                .hostfile
                .as_ref()
                .is_some_and(|hf| hf.hosts.iter().any(|h| h.name == n))
        };
        let oldest = self
            .nodes
            .iter()
            .filter(|(n, node)| {
                node.conn.is_none()
                    && !node.cordoned
                    && !placed.contains(*n)
                    && !in_hostfile(n.as_str())
            })
            .min_by_key(|(_, node)| node.last_seen)
            .map(|(n, _)| n.clone());
        let Some(old) = oldest else {
            return Err(CoreError::LimitReached(format!(
                "node '{name}' cannot join: this coordinator keeps at most {MAX_NODES} nodes and \
                 every one is connected or placed by an unfinished job"
            )));
        };
        tracing::info!(node = %old, joining = %name, "forgetting a disconnected node: the node limit is reached");
        self.nodes.remove(&old);
        self.persist.delete(format!("nodes/{old}"));
        self.dirty = true;
        Ok(())
    }
}

impl Core {
    /// `ringctl cordon`/`uncordon`: no new generation is placed on the node while it is
    /// cordoned (running ones go on). Persisted, so it survives a restart or a failover.
    pub(super) fn cordon(&mut self, name: &str, cordon: bool) -> Result<NodeInfo, CoreError> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Err(CoreError::NotFound(format!(
                "no node '{name}' is known to this coordinator (ringctl nodes lists them)"
            )));
        };
        if node.cordoned != cordon {
            node.cordoned = cordon;
            let key = format!("{CORDONS}{name}");
            if cordon {
                self.persist.put(key, b"{}".to_vec());
            } else {
                self.persist.delete(key);
            }
            tracing::info!(node = %name, cordon, "node {}", if cordon { "cordoned" } else { "uncordoned" });
            // Jobs waiting for this node may fit now.
            self.dirty = true;
        }
        self.node_info(name)
    }

    /// `ringctl drain`: cordons the node, then moves every generation placed on it that has
    /// workers: each stops (SIGTERM, `grace_ms`, SIGKILL) and is placed again without the node,
    /// using no restart. Returns the node and the jobs moved.
    pub(super) fn drain(
        &mut self,
        name: &str,
        grace_ms: u64,
    ) -> Result<(NodeInfo, Vec<String>), CoreError> {
        self.cordon(name, true)?;
        let moving: Vec<String> = self
            .jobs
            .values()
            .filter(|j| {
                j.state == JobState::Running
                    && !j.stopping
                    && j.placement.iter().any(|s| s.name == name)
            })
            .map(|j| j.id.clone())
            .collect();
        for id in &moving {
            tracing::info!(job = %id, node = %name, "draining: moving the job off the node");
            self.apply(
                id,
                Event::Drain {
                    node: name.to_owned(),
                    grace_ms,
                },
            );
        }
        Ok((self.node_info(name)?, moving))
    }

    fn node_info(&self, name: &str) -> Result<NodeInfo, CoreError> {
        self.node_statuses()
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| CoreError::NotFound(format!("no node '{name}'")))
    }
}
