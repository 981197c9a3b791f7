//! The environment contract of a worker process (DESIGN.md): torchrun's and DeepSpeed's names,
//! so existing scripts run unchanged. The agents and `ringctl launch` both build it here, so a
//! worker sees the same variables whoever started it.

/// What the contract's variables are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract<'a> {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    /// Workers on this node.
    pub local_world_size: usize,
    pub node_rank: usize,
    pub nnodes: usize,
    pub master_addr: &'a str,
    pub master_port: u32,
    /// `CUDA_VISIBLE_DEVICES` for the node's workers; `None`: not set (inherited).
    pub visible_devices: Option<&'a [String]>,
    /// Restarts of the job so far (the same on every node).
    pub restart_count: u64,
    pub max_restarts: u64,
    /// The run id (`TORCHELASTIC_RUN_ID`, `RINGMASTER_JOB_ID`).
    pub run_id: &'a str,
    pub job_name: &'a str,
    pub generation: u64,
    /// torchrun's `--role` (`ROLE_NAME`).
    pub role: &'a str,
}

/// The contract's variables, in a fixed order.
pub fn contract_env(c: &Contract<'_>) -> Vec<(String, String)> {
    let mut env: Vec<(&str, String)> = vec![
        ("RANK", c.rank.to_string()),
        ("LOCAL_RANK", c.local_rank.to_string()),
        ("WORLD_SIZE", c.world_size.to_string()),
        ("LOCAL_WORLD_SIZE", c.local_world_size.to_string()),
        ("NODE_RANK", c.node_rank.to_string()),
        ("GROUP_RANK", c.node_rank.to_string()),
        ("GROUP_WORLD_SIZE", c.nnodes.to_string()),
        ("ROLE_RANK", c.rank.to_string()),
        ("ROLE_WORLD_SIZE", c.world_size.to_string()),
        ("ROLE_NAME", c.role.to_owned()),
        ("NNODES", c.nnodes.to_string()),
        ("MASTER_ADDR", c.master_addr.to_owned()),
        ("MASTER_PORT", c.master_port.to_string()),
    ];
    if let Some(v) = c.visible_devices {
        env.push(("CUDA_VISIBLE_DEVICES", v.join(",")));
    }
    env.extend([
        ("TORCHELASTIC_RESTART_COUNT", c.restart_count.to_string()),
        ("RINGMASTER_RESTART_COUNT", c.restart_count.to_string()),
        ("TORCHELASTIC_MAX_RESTARTS", c.max_restarts.to_string()),
        ("TORCHELASTIC_RUN_ID", c.run_id.to_owned()),
        ("RINGMASTER_JOB_ID", c.run_id.to_owned()),
        ("RINGMASTER_JOB_NAME", c.job_name.to_owned()),
        ("RINGMASTER_GENERATION", c.generation.to_string()),
    ]);
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `OMP_NUM_THREADS=1` unless the launcher's own environment or the job sets it (torchrun's
/// default for several workers per node; DESIGN.md's for every worker).
pub fn omp_default(inherited: bool, job_sets_it: bool) -> Option<(String, String)> {
    (!inherited && !job_sets_it).then(|| ("OMP_NUM_THREADS".to_owned(), "1".to_owned()))
}
