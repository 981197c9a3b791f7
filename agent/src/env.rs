//! The environment of a worker process: torchrun / DeepSpeed names, so existing scripts run
//! unchanged (DESIGN.md's interface contract).

use ringmaster_proto as pb;

/// Everything the agent knows when it builds a worker's environment.
pub struct EnvInput<'a> {
    pub start: &'a pb::StartWorkers,
    pub entry: &'a pb::RankEntry,
    /// This node's entries of the rank table, in local-rank order.
    pub local: &'a [&'a pb::RankEntry],
    /// host:port trainers dial for the rendezvous service.
    pub coordinator: &'a str,
    /// The agent's own environment already sets OMP_NUM_THREADS.
    pub inherited_omp: bool,
    pub node_name: &'a str,
    /// The node's advertised address (collectives listen on it).
    pub node_addr: &'a str,
    pub work_dir: &'a str,
    /// How this agent verifies the coordinator: workers dial it the same way.
    pub tls: &'a ringmaster_auth::ClientTls,
}

/// The variables the launcher sets, then the job's own `env:` (which may not override them;
/// the coordinator refuses such a spec).
pub fn worker_env(i: &EnvInput<'_>) -> Vec<(String, String)> {
    let s = i.start;
    let e = i.entry;
    let visible: Vec<String> = i.local.iter().map(|r| r.slot.to_string()).collect();
    let mut env = ringmaster_launch::env::contract_env(&ringmaster_launch::env::Contract {
        rank: e.rank as usize,
        local_rank: e.local_rank as usize,
        world_size: s.world_size as usize,
        local_world_size: i.local.len(),
        node_rank: e.node_rank as usize,
        nnodes: s.nnodes as usize,
        master_addr: &s.master_addr,
        master_port: s.master_port,
        visible_devices: Some(&visible),
        restart_count: u64::from(s.restart_count),
        max_restarts: u64::from(s.max_restarts),
        run_id: &s.job_id,
        job_name: &s.job_name,
        generation: s.generation,
        role: "default",
    });
    env.extend(
        [
            ("RINGMASTER_COORDINATOR", i.coordinator),
            ("RINGMASTER_NODE", i.node_name),
            ("RINGMASTER_NODE_ADDR", i.node_addr),
            ("RINGMASTER_WORK_DIR", i.work_dir),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    if !s.resume_from.is_empty() {
        env.push(("RINGMASTER_RESUME_FROM".into(), s.resume_from.clone()));
    }
    // The generation's credential for the rendezvous store and progress stream, and the CA the
    // coordinator's certificate chains to.
    if !s.worker_token.is_empty() {
        env.push((
            ringmaster_auth::client::ENV_WORKER_TOKEN.into(),
            s.worker_token.clone(),
        ));
    }
    if let Some(ca) = &i.tls.ca {
        env.push((
            ringmaster_auth::client::ENV_TLS_CA.into(),
            ca.display().to_string(),
        ));
    }
    if let Some(d) = &i.tls.domain {
        env.push((ringmaster_auth::client::ENV_TLS_DOMAIN.into(), d.clone()));
    }
    env.extend(ringmaster_launch::env::omp_default(
        i.inherited_omp,
        s.env.contains_key("OMP_NUM_THREADS"),
    ));
    let mut user: Vec<(&String, &String)> = s.env.iter().collect();
    user.sort();
    for (k, v) in user {
        if !env.iter().any(|(ek, _)| ek == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rank: u32, local_rank: u32, node_rank: u32, node: &str, slot: u32) -> pb::RankEntry {
        pb::RankEntry {
            rank,
            local_rank,
            node_rank,
            node: node.into(),
            slot,
        }
    }

    #[test]
    fn contract_variables() {
        let ranks = vec![
            entry(0, 0, 0, "w0", 0),
            entry(1, 0, 1, "w1", 0),
            entry(2, 1, 1, "w1", 2),
        ];
        let mut start = pb::StartWorkers {
            job_id: "job-7".into(),
            generation: 2,
            restart_count: 2,
            max_restarts: 3,
            world_size: 3,
            nnodes: 2,
            master_addr: "10.0.0.1".into(),
            master_port: 29400,
            ranks: ranks.clone(),
            ..Default::default()
        };
        start.env.insert("NCCL_DEBUG".into(), "INFO".into());
        let local: Vec<&pb::RankEntry> = ranks.iter().filter(|r| r.node == "w1").collect();
        let env = worker_env(&EnvInput {
            start: &start,
            entry: &ranks[2],
            local: &local,
            coordinator: "127.0.0.1:29500",
            inherited_omp: false,
            node_name: "w1",
            node_addr: "10.0.0.2",
            work_dir: "/w",
            tls: &Default::default(),
        });
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("2"));
        assert_eq!(get("LOCAL_RANK"), Some("1"));
        assert_eq!(get("WORLD_SIZE"), Some("3"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("2"));
        assert_eq!(get("NODE_RANK"), Some("1"));
        assert_eq!(get("GROUP_RANK"), Some("1"));
        assert_eq!(get("NNODES"), Some("2"));
        assert_eq!(get("MASTER_ADDR"), Some("10.0.0.1"));
        assert_eq!(get("MASTER_PORT"), Some("29400"));
        assert_eq!(get("CUDA_VISIBLE_DEVICES"), Some("0,2"));
        assert_eq!(get("TORCHELASTIC_RESTART_COUNT"), Some("2"));
        assert_eq!(get("RINGMASTER_RESTART_COUNT"), Some("2"));
        assert_eq!(get("TORCHELASTIC_MAX_RESTARTS"), Some("3"));
        assert_eq!(get("TORCHELASTIC_RUN_ID"), Some("job-7"));
        assert_eq!(get("RINGMASTER_JOB_ID"), Some("job-7"));
        assert_eq!(get("RINGMASTER_GENERATION"), Some("2"));
        assert_eq!(get("RINGMASTER_COORDINATOR"), Some("127.0.0.1:29500"));
        assert_eq!(get("RINGMASTER_RESUME_FROM"), None);
        assert_eq!(get("RINGMASTER_NODE_ADDR"), Some("10.0.0.2"));
        assert_eq!(get("OMP_NUM_THREADS"), Some("1"));
        assert_eq!(get("NCCL_DEBUG"), Some("INFO"));
    }

    #[test]
    fn omp_is_left_alone_when_set() {
        let ranks = vec![entry(0, 0, 0, "w0", 0)];
        let mut start = pb::StartWorkers {
            ranks: ranks.clone(),
            resume_from: "/ckpt/checkpoint-10".into(),
            ..Default::default()
        };
        let local: Vec<&pb::RankEntry> = ranks.iter().collect();
        let mk = |start: &pb::StartWorkers, inherited| {
            worker_env(&EnvInput {
                start,
                entry: &ranks[0],
                local: &local,
                coordinator: "c:1",
                inherited_omp: inherited,
                node_name: "w0",
                node_addr: "10.0.0.1",
                work_dir: "/w",
                tls: &ringmaster_auth::ClientTls {
                    ca: Some("/pki/ca.pem".into()),
                    domain: None,
                    identity: None,
                },
            })
        };
        let env = mk(&start, true);
        assert!(!env.iter().any(|(k, _)| k == "OMP_NUM_THREADS"));
        // The CA goes to the workers; no worker credential without one from the coordinator.
        assert!(env.contains(&("RINGMASTER_TLS_CA".into(), "/pki/ca.pem".into())));
        assert!(!env.iter().any(|(k, _)| k == "RINGMASTER_WORKER_TOKEN"));
        start.worker_token = "rmw1.j.0.ab".into();
        let env = mk(&start, true);
        assert!(env.contains(&("RINGMASTER_WORKER_TOKEN".into(), "rmw1.j.0.ab".into())));
        assert!(env.contains(&(
            "RINGMASTER_RESUME_FROM".into(),
            "/ckpt/checkpoint-10".into()
        )));
        start.env.insert("OMP_NUM_THREADS".into(), "8".into());
        let env = mk(&start, false);
        let omp: Vec<_> = env.iter().filter(|(k, _)| k == "OMP_NUM_THREADS").collect();
        assert_eq!(omp, vec![&("OMP_NUM_THREADS".to_owned(), "8".to_owned())]);
    }
}
