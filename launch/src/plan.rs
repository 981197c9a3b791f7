//! The launch plan: what one node's launcher runs, whatever dialect described it.

use std::path::PathBuf;
use std::time::Duration;

/// A launch command line or its files that cannot be run, with the reason (exit code 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct LaunchError(pub String);

impl LaunchError {
    pub fn new(msg: impl Into<String>) -> LaunchError {
        LaunchError(msg.into())
    }
}

/// Which tool's command line described the launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Torchrun,
    /// `ringctl launch recipe.yaml` with LLaMA-Factory's environment variables.
    LlamaFactory,
    DeepSpeed,
    Accelerate,
}

/// What every worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// A training config: the trainer with the recipe file and its overrides.
    Recipe {
        file: String,
        overrides: Vec<String>,
    },
    /// `python -u SCRIPT ARGS` (the interpreter from `PYTHON_EXEC`, else `python3`).
    Script {
        python: String,
        script: String,
        args: Vec<String>,
    },
    /// `python -u -m MODULE ARGS`.
    Module {
        python: String,
        module: String,
        args: Vec<String>,
    },
    /// Any command (`--no-python`, or after `--`).
    Exec(Vec<String>),
    /// The trainer with a training config given as flags, LLaMA-Factory's other form
    /// (`llamafactory-cli train --stage sft --model_name_or_path DIR ...`): the trainer reads
    /// the same `--key [value]` flags.
    TrainerFlags(Vec<String>),
}

impl Program {
    /// Whether the workers are the trainer (a recipe, or a training config as flags).
    pub fn is_trainer(&self) -> bool {
        matches!(self, Program::Recipe { .. } | Program::TrainerFlags(_))
    }
}

/// Which launcher's worker environment a plan reproduces, beyond the contract every worker
/// gets (the variables each tool adds or leaves out, spec §1.6, §2.4, §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnv {
    /// torchrun's elastic agent (torchrun, `python -m torch.distributed.launch`, and the
    /// torchrun that `accelerate launch` and LLaMA-Factory start): `OMP_NUM_THREADS=1` when the
    /// node runs more than one worker and the launcher's environment lacks it, and
    /// `TORCH_NCCL_ASYNC_ERROR_HANDLING=1` unless set.
    Torchrun,
    /// DeepSpeed's `launch.py`: neither of those.
    DeepSpeed,
    /// One process and no distributed launcher (accelerate's simple launcher, LLaMA-Factory
    /// training in-process): none of torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
    /// MASTER_ADDR, TORCHELASTIC_*, ...), so the program runs as a plain single process.
    Single,
}

/// MASTER_PORT: a number, or a free port node 0 picks (single-node runs only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Fixed(u16),
    Ephemeral,
}

/// Where a worker's output goes (torchrun's `--redirects`/`--tee` bits: 1 stdout, 2 stderr).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPolicy {
    /// `--log-dir`: per-rank files under `<dir>/<run_id>_<suffix>/attempt_<n>/<local_rank>/`.
    pub dir: Option<PathBuf>,
    /// Per local rank: which streams go to files only (0 none, 1 out, 2 err, 3 both).
    pub redirects: Vec<u8>,
    /// Per local rank: which streams go to files and the console.
    pub tee: Vec<u8>,
    /// Local ranks whose output reaches the console (`--local-ranks-filter`); `None`: all.
    pub console_ranks: Option<Vec<usize>>,
}

/// One node's launch.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    pub dialect: Dialect,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's rank among them.
    pub node_rank: usize,
    /// Node ranks are given in the order the launchers join (torchrun's c10d rendezvous
    /// without `--node-rank`): `node_rank` is then decided at the join, and the launcher on
    /// the machine MASTER_ADDR names serves the store, whatever rank it gets.
    pub join_order: bool,
    /// Workers on this node.
    pub nproc: usize,
    /// `CUDA_VISIBLE_DEVICES` for this node's workers (`None`: inherited).
    pub visible_devices: Option<Vec<String>>,
    /// Where the launchers meet (node 0 serves the store there).
    pub master_addr: String,
    pub master_port: Port,
    /// The run id (`--rdzv-id`, `TORCHELASTIC_RUN_ID`; keys in the store are scoped by it).
    pub run_id: String,
    /// Restarts of the whole job (every node's workers together), counted once for the job.
    pub max_restarts: u32,
    /// How long a launcher waits for the others (and for MASTER_ADDR:MASTER_PORT).
    pub rdzv_timeout: Duration,
    /// torchrun's `--role` (ROLE_NAME; console prefix `[role<local_rank>]:`).
    pub role: String,
    /// The address this node advertises (`--local-addr`; RINGMASTER_NODE_ADDR).
    pub local_addr: Option<String>,
    pub logs: LogPolicy,
    pub program: Program,
    /// The local rank as an argument, `FLAG=N` inserted before the program's own arguments:
    /// `--local_rank` (DeepSpeed) or `--local-rank` (`python -m torch.distributed.launch`
    /// without `--use-env`); `None`: only `LOCAL_RANK` in the environment.
    pub local_rank_arg: Option<&'static str>,
    /// Whose worker environment this is (what is added besides the contract).
    pub worker_env: WorkerEnv,
    /// Variables the dialect adds for every worker (ACCELERATE_*, FSDP_*, ...).
    pub extra_env: Vec<(String, String)>,
    /// Things the user should know about how their command line was read (printed once).
    pub notices: Vec<String>,
    /// Every node's worker count, in node order, when the command line gives the whole world
    /// (a DeepSpeed hostfile, possibly with different slot counts per node): the runtime takes
    /// this node's first global rank (the sum before `node_rank`) and the world size (the sum)
    /// from it, and can check the counts the other launchers report. `None`: only this node's
    /// `nproc` is known; the rendezvous adds the counts up (torchrun's slow path).
    pub node_slots: Option<Vec<usize>>,
    /// How often the launcher polls its workers (torchrun's `--monitor-interval`, 0.1 s;
    /// DeepSpeed's launcher polls every second).
    pub monitor_interval: Duration,
    /// DeepSpeed's `--enable_each_rank_log DIR`: each rank's stdout and stderr together to
    /// `DIR/<YYYYmmddHHMMSS>_rank<RANK>.log` instead of the console (`logs` is then unused).
    pub each_rank_log: Option<PathBuf>,
}

impl LaunchPlan {
    /// A single-node plan running `program` on `nproc` workers, with the defaults every
    /// dialect starts from (127.0.0.1:29500, run id `none`, no restarts, 600 s rendezvous,
    /// 0.1 s monitor interval).
    pub fn new(dialect: Dialect, nproc: usize, program: Program) -> LaunchPlan {
        LaunchPlan {
            dialect,
            nnodes: 1,
            node_rank: 0,
            nproc,
            visible_devices: None,
            master_addr: "127.0.0.1".into(),
            master_port: Port::Fixed(29500),
            run_id: "none".into(),
            max_restarts: 0,
            rdzv_timeout: Duration::from_secs(600),
            role: "default".into(),
            local_addr: None,
            logs: LogPolicy::default(),
            program,
            local_rank_arg: None,
            worker_env: WorkerEnv::Torchrun,
            extra_env: Vec::new(),
            notices: Vec::new(),
            node_slots: None,
            join_order: false,
            monitor_interval: Duration::from_millis(100),
            each_rank_log: None,
        }
    }
}

/// What a front-end may ask about the machine (a test passes its own).
#[derive(Debug, Clone)]
pub struct Probe {
    /// CUDA devices visible to this process.
    pub cuda_devices: usize,
    /// Logical CPUs.
    pub cpus: usize,
    /// This machine's host name.
    pub hostname: String,
}
