//! The command-line table of docs/design/launch-spec.md §5.6: each row reads a `ringctl launch`
//! command line (with its environment) into a plan and checks the fields the row names, or the
//! error. Fixture: host `n0`, 4 CUDA devices, 16 logical CPUs, no accelerate default config
//! (HOME is not set unless a row sets it), hostfiles `HF2` (n0, n1 with 4 slots each) and `HF3`
//! (n0 3 slots, n1 2 slots) in a temporary directory.
//!
//! World size and first global rank are the runtime's to compute; here they follow from the
//! plan: the DeepSpeed world (`node_slots`) when known, else `nnodes × nproc` (every node alike).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Duration;

use ringmaster_launch::LaunchPlan;
use ringmaster_launch::frontends::parse;
use ringmaster_launch::plan::{Dialect, Port, Probe, Program};

fn probe(cuda_devices: usize) -> Probe {
    Probe {
        cuda_devices,
        cpus: 16,
        hostname: "n0".into(),
    }
}

/// The files rows refer to as `{HF2}`, `{HF3}`, `{BAD}`, ...; `{DIR}` is their directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        put("HF2", "n0 slots=4\nn1 slots=4\n");
        put("HF3", "n0 slots=3\nn1 slots=2\n");
        put("BAD", "n0 slot=4\n");
        put("DUP", "n0 slots=4\nn0 slots=2\n");
        put("BIG", &format!("n0 slots=4\n{}", "#".repeat(1 << 20)));
        put(
            "c.yaml",
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 16\n\
             num_machines: 2\nmachine_rank: 0\nmain_process_ip: h0\nmain_process_port: 29500\n\
             mixed_precision: bf16\ngpu_ids: all\n",
        );
        put(
            "ds.yaml",
            "distributed_type: DEEPSPEED\nnum_processes: 8\nnum_machines: 2\nmachine_rank: 1\n\
             main_process_ip: h0\nmain_process_port: 29500\ndeepspeed_config:\n  zero_stage: 3\n",
        );
        put(
            "ds_std.yaml",
            "distributed_type: DEEPSPEED\nnum_processes: 8\nnum_machines: 2\nmachine_rank: 1\n\
             main_process_ip: h0\nmain_process_port: 29500\nmixed_precision: bf16\n\
             deepspeed_config:\n  deepspeed_multinode_launcher: standard\n  zero_stage: 3\n",
        );
        let hf2 = dir.path().join("HF2");
        put(
            "ds_nossh.yaml",
            &format!(
                "distributed_type: DEEPSPEED\nnum_processes: 8\nnum_machines: 2\nmachine_rank: 1\n\
                 main_process_ip: n0\nmain_process_port: 29600\ndeepspeed_config:\n  \
                 deepspeed_multinode_launcher: nossh\n  deepspeed_hostfile: {}\n",
                hf2.display()
            ),
        );
        put(
            "bad.yaml",
            "distributed_type: MULTI_GPU\nnum_processes: 2\nfoo: 1\n",
        );
        put(
            "fsdp.json",
            r#"{"distributed_type": "FSDP", "num_processes": 2, "fsdp_config": {"offload_params": true}}"#,
        );
        put(
            "h/accelerate/default_config.yaml",
            "distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: fp16\n",
        );
        Files { dir }
    }

    fn fill(&self, s: &str) -> String {
        let d = self.dir.path().display().to_string();
        let mut out = s.replace("{DIR}", &d);
        for name in ["HF2", "HF3", "BAD", "DUP", "BIG"] {
            out = out.replace(&format!("{{{name}}}"), &format!("{d}/{name}"));
        }
        out
    }
}

/// What a row expects.
enum Want {
    Plan(fn(&LaunchPlan)),
    Err(&'static str),
}

struct Row {
    id: &'static str,
    devices: usize,
    env: &'static str,
    cmd: &'static str,
    want: Want,
}

const fn row(id: &'static str, env: &'static str, cmd: &'static str, want: Want) -> Row {
    Row {
        id,
        devices: 4,
        env,
        cmd,
        want,
    }
}

const fn row0(id: &'static str, cmd: &'static str, want: Want) -> Row {
    Row {
        id,
        devices: 0,
        env: "",
        cmd,
        want,
    }
}

fn world(p: &LaunchPlan) -> usize {
    p.node_slots
        .as_ref()
        .map_or(p.nnodes * p.nproc, |s| s.iter().sum())
}

fn base(p: &LaunchPlan) -> usize {
    p.node_slots
        .as_ref()
        .map_or(p.node_rank * p.nproc, |s| s[..p.node_rank].iter().sum())
}

fn env<'a>(p: &'a LaunchPlan, key: &str) -> Option<&'a str> {
    p.extra_env
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn devs(p: &LaunchPlan) -> Vec<&str> {
    p.visible_devices
        .as_ref()
        .expect("pinned devices")
        .iter()
        .map(String::as_str)
        .collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn script(p: &LaunchPlan) -> (&str, &str, Vec<&str>) {
    match &p.program {
        Program::Script {
            python,
            script,
            args,
        } => (
            python.as_str(),
            script.as_str(),
            args.iter().map(String::as_str).collect(),
        ),
        other => panic!("not a script: {other:?}"),
    }
}

fn master(p: &LaunchPlan) -> (&str, Port) {
    (p.master_addr.as_str(), p.master_port)
}

fn noticed(p: &LaunchPlan, what: &str) -> bool {
    p.notices.iter().any(|n| n.contains(what))
}

/// Defaults every row assumes unless it says otherwise.
fn single(p: &LaunchPlan) {
    assert_eq!((p.nnodes, p.node_rank), (1, 0));
    assert_eq!(p.run_id, "none");
    assert_eq!(p.max_restarts, 0);
}

fn rows() -> Vec<Row> {
    use Want::{Err, Plan};
    vec![
        // ---- torchrun
        row(
            "1",
            "",
            "--nproc-per-node 4 train.py --lr 1",
            Plan(|p| {
                single(p);
                assert_eq!(p.dialect, Dialect::Torchrun);
                assert_eq!((p.nproc, world(p), base(p)), (4, 4, 0));
                assert_eq!(p.visible_devices, None);
                assert_eq!(script(p), ("python3", "train.py", vec!["--lr", "1"]));
                assert_eq!(master(p), ("127.0.0.1", Port::Fixed(29500)));
                assert_eq!(p.local_rank_arg, None);
                assert_eq!(p.role, "default");
                assert_eq!(p.monitor_interval, Duration::from_millis(100));
            }),
        ),
        row(
            "2",
            "",
            "--nproc_per_node=2 train.py",
            Plan(|p| {
                assert_eq!((p.nproc, world(p)), (2, 2));
            }),
        ),
        row(
            "3",
            "",
            "torchrun train.py",
            Plan(|p| {
                single(p);
                assert_eq!((p.dialect, p.nproc, world(p)), (Dialect::Torchrun, 1, 1));
            }),
        ),
        row(
            "4a",
            "",
            "--nproc-per-node auto train.py",
            Plan(|p| assert_eq!(p.nproc, 4)),
        ),
        row0(
            "4b",
            "--nproc-per-node auto train.py",
            Plan(|p| assert_eq!(p.nproc, 16)),
        ),
        row0(
            "5",
            "--nproc-per-node gpu train.py",
            Err("Cuda is not available."),
        ),
        row(
            "5b",
            "CUDA_VISIBLE_DEVICES=1,2",
            "--nproc-per-node gpu train.py",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
            }),
        ),
        row(
            "6",
            "",
            "--nproc-per-node cpu train.py",
            Plan(|p| assert_eq!(p.nproc, 16)),
        ),
        row(
            "7",
            "",
            "--nproc-per-node two train.py",
            Err("Unsupported nproc_per_node value: two"),
        ),
        row(
            "7b",
            "",
            "--nproc-per-node 0 train.py",
            Err("--nproc-per-node must be >= 1"),
        ),
        row(
            "8",
            "",
            "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29600 --nproc-per-node 4 train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, world(p), base(p)), (2, 1, 8, 4));
                assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29600)));
            }),
        ),
        row(
            "9",
            "",
            "--nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --nproc_per_node=4 train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, world(p), base(p)), (2, 0, 8, 0));
                assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29500)));
            }),
        ),
        row(
            "10",
            "",
            "--nnodes 2 --node-rank 1 --nproc-per-node 4 train.py",
            Err("--nnodes 2 needs the address of node 0 on node 1: pass --master-addr"),
        ),
        row(
            "10b",
            "",
            "--nnodes 2 --node-rank 0 train.py",
            Plan(|p| {
                assert!(noticed(p, "the other nodes need this node's real address"));
            }),
        ),
        row(
            "11",
            "MASTER_ADDR=10.0.0.1 MASTER_PORT=29700",
            "torchrun --nnodes 2 --node-rank 1 train.py",
            Plan(|p| {
                assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29700)));
                assert_eq!(p.node_rank, 1);
            }),
        ),
        row(
            "11b",
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=3",
            "torchrun --node-rank 0 train.py",
            Plan(|p| {
                // Flags above the variables.
                assert_eq!((p.nnodes, p.node_rank, p.nproc), (2, 0, 3));
            }),
        ),
        row(
            "12",
            "PET_NNODES=2 PET_NODE_RANK=1 PET_MASTER_ADDR=h0 PET_NPROC_PER_NODE=2",
            "torchrun train.py",
            Plan(|p| {
                assert_eq!(
                    (p.nnodes, p.node_rank, p.nproc, world(p), base(p)),
                    (2, 1, 2, 4, 2)
                );
                assert_eq!(master(p), ("h0", Port::Fixed(29500)));
            }),
        ),
        row(
            "12b",
            "PET_NODE_RANK=1 NODE_RANK=0 PET_MASTER_ADDR=h0 MASTER_ADDR=h9",
            "--nnodes 2 train.py",
            Plan(|p| {
                // PET_* above LLaMA-Factory's variables.
                assert_eq!(p.node_rank, 1);
                assert_eq!(p.master_addr, "h0");
            }),
        ),
        row(
            "13",
            "",
            "--nnodes 2 --node-rank 2 --master-addr a train.py",
            Err("--node-rank 2 is out of range for --nnodes 2 (0..1)"),
        ),
        row(
            "14",
            "",
            "--nnodes 1:4 train.py",
            Err("elastic membership (MIN:MAX nodes, --nnodes 1:4) is not supported"),
        ),
        row(
            "15",
            "",
            "--nnodes 2:2 --node-rank 0 --master-addr a train.py",
            Plan(|p| {
                assert_eq!(p.nnodes, 2);
            }),
        ),
        row(
            "16a",
            "",
            "--nnodes 0 train.py",
            Err("--nnodes must be >= 1"),
        ),
        row(
            "16b",
            "",
            "--nnodes 1:2:3 train.py",
            Err("nnodes=1:2:3 is not in \"MIN:MAX\" format"),
        ),
        row(
            "17",
            "",
            "--standalone --nproc-per-node 2 train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.nproc), (1, 2));
                assert_eq!(master(p), ("127.0.0.1", Port::Ephemeral));
                assert_ne!(p.run_id, "none");
                assert_eq!(p.run_id.len(), 16);
            }),
        ),
        row(
            "18",
            "",
            "--standalone --nnodes 2 train.py",
            Err("--standalone is single-node"),
        ),
        row(
            "19a",
            "",
            "--max-restarts 3 --nproc-per-node 2 train.py",
            Plan(|p| {
                assert_eq!(p.max_restarts, 3);
            }),
        ),
        row(
            "19b",
            "",
            "--max_restarts -1 train.py",
            Err("--max-restarts must be >= 0"),
        ),
        row(
            "20",
            "",
            "--rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 --rdzv-id job7 --nnodes 2 --nproc-per-node 8 train.py",
            // No node rank: the launchers number themselves as they join.
            Plan(|p| {
                assert!(p.join_order);
                assert_eq!((p.run_id.as_str(), p.nnodes, p.nproc), ("job7", 2, 8));
                assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29400)));
            }),
        ),
        row(
            "20c",
            "",
            "--rdzv-backend c10d --rdzv-id job7 --nnodes 2 --nproc-per-node 8 train.py",
            Err("needs --rdzv-endpoint HOST:PORT"),
        ),
        row(
            "20b",
            "",
            "--rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 --rdzv-id job7 --nnodes 2 --node-rank 1 --nproc-per-node 8 train.py",
            Plan(|p| {
                assert!(!p.join_order);
                assert_eq!(p.run_id, "job7");
                assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29400)));
                assert_eq!((p.node_rank, world(p), base(p)), (1, 16, 8));
                assert!(noticed(p, "node 0 serves the store at 10.0.0.1:29400"));
            }),
        ),
        row(
            "21",
            "",
            "--rdzv_backend=c10d --rdzv_endpoint=10.0.0.1 --nnodes 2 --node-rank 0 train.py",
            Plan(|p| assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29400)))),
        ),
        row(
            "21b",
            "",
            "--rdzv-backend c10d train.py",
            Plan(|p| {
                assert_eq!(master(p), ("localhost", Port::Fixed(29400)));
            }),
        ),
        row(
            "22",
            "",
            "--rdzv-endpoint 10.0.0.9:29800 --nnodes 2 --node-rank 1 train.py",
            Plan(|p| {
                assert_eq!(master(p), ("10.0.0.9", Port::Fixed(29800)));
                assert_eq!(p.node_rank, 1);
            }),
        ),
        row(
            "22b",
            "",
            "--rdzv-endpoint 10.0.0.9 train.py",
            Err("port is missing in endpoint: 10.0.0.9. Try to specify --master-port"),
        ),
        row(
            "23",
            "",
            "--rdzv-backend etcd --rdzv-endpoint e:2379 train.py",
            Err("rendezvous backend 'etcd' is not supported (use static or c10d)"),
        ),
        row(
            "24a",
            "",
            "--rdzv-conf timeout=60,read_timeout=30 train.py",
            Plan(|p| {
                assert_eq!(p.rdzv_timeout, Duration::from_secs(60));
                assert!(noticed(p, "read_timeout"));
            }),
        ),
        row(
            "24b",
            "",
            "--rdzv-conf timeout train.py",
            Err("The rendezvous configuration option 'timeout' must have a value specified."),
        ),
        row(
            "25",
            "",
            "--rdzv-id r1 --log-dir /tmp/L --redirects 3 --tee 1 --nproc-per-node 2 train.py",
            Plan(|p| {
                assert_eq!(p.run_id, "r1");
                assert_eq!(p.logs.dir.as_deref(), Some(Path::new("/tmp/L")));
                assert_eq!(
                    (p.logs.redirects.clone(), p.logs.tee.clone()),
                    (vec![3, 3], vec![1, 1])
                );
                assert_eq!(p.logs.console_ranks, None);
            }),
        ),
        row(
            "26",
            "",
            "-r 0:3,1:1 -t 1:2 --log-dir /tmp/L --nproc-per-node 4 train.py",
            Plan(|p| {
                assert_eq!(p.logs.redirects, vec![3, 1, 0, 0]);
                assert_eq!(p.logs.tee, vec![0, 2, 0, 0]);
            }),
        ),
        row(
            "27a",
            "",
            "-r 4:3 --nproc-per-node 4 train.py",
            Err("-r 4:3 names local rank 4 but this node runs 4 workers (0..3)"),
        ),
        row(
            "27b",
            "",
            "--tee 5 train.py",
            Err("--tee 5: expected 0 (none), 1 (stdout), 2 (stderr), 3 (both)"),
        ),
        row(
            "28a",
            "",
            "--local-ranks-filter 0 --nproc-per-node 2 train.py",
            Plan(|p| {
                assert_eq!(p.logs.console_ranks, Some(vec![0]));
            }),
        ),
        row(
            "28b",
            "",
            "--local_ranks_filter a train.py",
            Err(
                "--local_ranks_filter must be a comma-separated list of integers e.g. --local_ranks_filter=0,1,2",
            ),
        ),
        row(
            "29a",
            "",
            "--no-python ./run.sh --x",
            Plan(|p| {
                assert_eq!(p.program, Program::Exec(s(&["./run.sh", "--x"])));
            }),
        ),
        row(
            "29b",
            "",
            "-- ./run.sh --x",
            Plan(|p| {
                assert_eq!(p.dialect, Dialect::Torchrun);
                assert_eq!(p.program, Program::Exec(s(&["./run.sh", "--x"])));
            }),
        ),
        row(
            "29c",
            "",
            "--nproc-per-node 2 -- ./run.sh recipe.yaml",
            Plan(|p| {
                assert_eq!(p.program, Program::Exec(s(&["./run.sh", "recipe.yaml"])));
            }),
        ),
        row(
            "30a",
            "",
            "-m pkg.train --x",
            Plan(|p| {
                assert_eq!(
                    p.program,
                    Program::Module {
                        python: "python3".into(),
                        module: "pkg.train".into(),
                        args: s(&["--x"])
                    }
                );
            }),
        ),
        row(
            "30b",
            "",
            "--module pkg.train",
            Plan(|p| {
                assert!(
                    matches!(&p.program, Program::Module { module, .. } if module == "pkg.train")
                );
            }),
        ),
        row(
            "31",
            "",
            "--no-python -m pkg.train",
            Err("Don't use both the '--no-python' flag and the '--module' flag at the same time."),
        ),
        row(
            "32",
            "PYTHON_EXEC=/opt/py/bin/python",
            "torchrun train.py",
            Plan(|p| {
                assert_eq!(script(p), ("/opt/py/bin/python", "train.py", vec![]));
            }),
        ),
        row(
            "33",
            "",
            "--monitor-interval 0.5 --start-method fork --role trainer --local-addr 10.0.0.5 train.py",
            Plan(|p| {
                assert_eq!(p.monitor_interval, Duration::from_millis(500));
                assert!(noticed(p, "--start-method fork"));
                assert_eq!(p.role, "trainer");
                assert_eq!(p.local_addr.as_deref(), Some("10.0.0.5"));
            }),
        ),
        row(
            "33b",
            "",
            "--start-method thread train.py",
            Err("invalid choice: 'thread'"),
        ),
        row(
            "34",
            "OMP_NUM_THREADS=8",
            "torchrun --nproc-per-node 4 train.py",
            Plan(|p| {
                // Inherited by the workers; the plan adds nothing.
                assert_eq!(env(p, "OMP_NUM_THREADS"), None);
            }),
        ),
        row(
            "35",
            "",
            "--use-env --nproc-per-node 2 train.py",
            Plan(|p| {
                assert_eq!(p.local_rank_arg, None);
                assert!(noticed(p, "--use-env"));
            }),
        ),
        row(
            "35b",
            "",
            "--nproc 2 --max-r 1 train.py",
            Plan(|p| {
                // argparse's unambiguous prefixes.
                assert_eq!((p.nproc, p.max_restarts), (2, 1));
            }),
        ),
        // ---- LLaMA-Factory
        row(
            "36",
            "",
            "recipe.yaml lr=1e-4",
            Plan(|p| {
                single(p);
                assert_eq!(p.dialect, Dialect::LlamaFactory);
                assert_eq!(
                    p.program,
                    Program::Recipe {
                        file: "recipe.yaml".into(),
                        overrides: s(&["lr=1e-4"])
                    }
                );
                assert_eq!(p.nproc, 4);
                assert_eq!(master(p), ("127.0.0.1", Port::Ephemeral));
            }),
        ),
        row(
            "37",
            "FORCE_TORCHRUN=1 NNODES=2 NODE_RANK=1 MASTER_ADDR=192.168.0.1 MASTER_PORT=29500",
            "recipe.yaml",
            Plan(|p| {
                assert_eq!(
                    (p.nnodes, p.node_rank, p.nproc, world(p), base(p)),
                    (2, 1, 4, 8, 4)
                );
                assert_eq!(master(p), ("192.168.0.1", Port::Fixed(29500)));
                assert_eq!(
                    env(p, "PYTORCH_CUDA_ALLOC_CONF"),
                    Some("expandable_segments:True")
                );
                assert_eq!(env(p, "TORCH_NCCL_AVOID_RECORD_STREAMS"), Some("1"));
            }),
        ),
        row(
            "38",
            "NNODES=2 NODE_RANK=0 MASTER_ADDR=h0",
            "recipe.yaml",
            Err(
                "NNODES=2 without MASTER_PORT: LLaMA-Factory would pick a different random port on each node; set MASTER_PORT",
            ),
        ),
        row(
            "39",
            "NPROC_PER_NODE=2 OPTIM_TORCH=0",
            "recipe.yaml",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
                assert_eq!(env(p, "PYTORCH_CUDA_ALLOC_CONF"), None);
                assert_eq!(env(p, "TORCH_NCCL_AVOID_RECORD_STREAMS"), None);
            }),
        ),
        row(
            "40",
            "CUDA_VISIBLE_DEVICES=0",
            "lmf train recipe.yaml",
            Plan(|p| {
                single(p);
                assert_eq!((p.dialect, p.nproc), (Dialect::LlamaFactory, 1));
                assert!(p.extra_env.is_empty());
                assert!(noticed(p, "trains in one process"));
            }),
        ),
        row(
            "41",
            "RDZV_ID=job NNODES=2 MASTER_ADDR=h0 MASTER_PORT=29400 MAX_RESTARTS=2",
            "recipe.yaml",
            Plan(|p| {
                assert!(p.join_order);
                assert_eq!((p.run_id.as_str(), p.nnodes, p.max_restarts), ("job", 2, 2));
                assert_eq!(master(p), ("h0", Port::Fixed(29400)));
            }),
        ),
        row(
            "41b",
            "RDZV_ID=job NNODES=2 NODE_RANK=1 MASTER_ADDR=h0 MASTER_PORT=29400 MAX_RESTARTS=2",
            "llamafactory-cli train recipe.yaml",
            Plan(|p| {
                assert!(!p.join_order);
                assert_eq!(
                    (p.run_id.as_str(), p.node_rank, p.max_restarts),
                    ("job", 1, 2)
                );
                assert_eq!(master(p), ("h0", Port::Fixed(29400)));
            }),
        ),
        row(
            "42a",
            "MAX_RESTARTS=2 FORCE_TORCHRUN=1",
            "recipe.yaml",
            Plan(|p| {
                assert_eq!(p.max_restarts, 0);
                assert!(noticed(p, "MAX_RESTARTS=2 is ignored without RDZV_ID"));
            }),
        ),
        row(
            "42b",
            "RDZV_ID=j MIN_NNODES=1 MAX_NNODES=3",
            "recipe.yaml",
            Err("elastic membership"),
        ),
        row(
            "43",
            "USE_RAY=1",
            "recipe.yaml",
            Err("USE_RAY is not supported by ringctl launch"),
        ),
        row(
            "43b",
            "",
            "lmf chat recipe.yaml",
            Err("runs 'lmf train RECIPE.yaml"),
        ),
        row(
            "43c",
            "",
            "torchrun --nproc-per-node 2 recipe.yaml lr=1",
            Plan(|p| {
                assert_eq!((p.dialect, p.nproc), (Dialect::Torchrun, 2));
                assert_eq!(
                    p.program,
                    Program::Recipe {
                        file: "recipe.yaml".into(),
                        overrides: s(&["lr=1"])
                    }
                );
            }),
        ),
        // ---- DeepSpeed
        row(
            "44",
            "",
            "deepspeed train.py --deepspeed ds.json",
            Plan(|p| {
                single(p);
                assert_eq!(p.dialect, Dialect::DeepSpeed);
                assert_eq!(devs(p), ["0", "1", "2", "3"]);
                assert_eq!((p.nproc, world(p)), (4, 4));
                assert_eq!(env(p, "LOCAL_SIZE"), Some("4"));
                assert_eq!(env(p, "CROSS_RANK"), Some("0"));
                assert_eq!(env(p, "CROSS_SIZE"), Some("1"));
                assert_eq!(p.local_rank_arg, Some("--local_rank"));
                assert_eq!(
                    script(p),
                    ("python3", "train.py", vec!["--deepspeed", "ds.json"])
                );
                assert_eq!(p.monitor_interval, Duration::from_secs(1));
            }),
        ),
        row(
            "45a",
            "",
            "deepspeed --num_gpus 2 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["0", "1"]);
                assert_eq!(world(p), 2);
            }),
        ),
        row(
            "45b",
            "",
            "deepspeed --num_accelerators 2 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["0", "1"]);
            }),
        ),
        row(
            "46",
            "",
            "deepspeed --include localhost:1,3 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["1", "3"]);
                assert_eq!((p.nproc, world(p)), (2, 2));
            }),
        ),
        row(
            "47",
            "",
            "deepspeed --exclude localhost:0 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["1", "2", "3"]);
            }),
        ),
        row(
            "48a",
            "",
            "deepspeed -i localhost:1 -e localhost:2 train.py",
            Err("include_str and exclude_str are mutually exclusive."),
        ),
        row(
            "48b",
            "",
            "deepspeed --num_gpus 2 --include localhost:0 train.py",
            Err("Cannot specify num_nodes/gpus with include/exclude"),
        ),
        row(
            "49",
            "CUDA_VISIBLE_DEVICES=2,3",
            "deepspeed train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["2", "3"]);
                assert!(noticed(p, "setting --include=localhost:2,3"));
            }),
        ),
        row(
            "50",
            "CUDA_VISIBLE_DEVICES=2,3",
            "deepspeed --num_gpus 1 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["0"]);
                assert!(noticed(p, "but ignoring it"));
            }),
        ),
        row(
            "51",
            "",
            "deepspeed --master_addr 10.0.0.1 --master_port 29600 train.py",
            Plan(|p| {
                assert_eq!(master(p), ("127.0.0.1", Port::Fixed(29600)));
                assert!(noticed(
                    p,
                    "--master_addr 10.0.0.1 is replaced by 127.0.0.1"
                ));
            }),
        ),
        row(
            "52",
            "",
            "deepspeed --hostfile {HF2} --no_ssh --node_rank 1 --master_addr n0 train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, world(p), base(p)), (2, 1, 8, 4));
                assert_eq!(devs(p), ["0", "1", "2", "3"]);
                assert_eq!(env(p, "CROSS_RANK"), Some("1"));
                assert_eq!(env(p, "CROSS_SIZE"), Some("2"));
                assert_eq!(master(p), ("n0", Port::Fixed(29500)));
                // The probe's host is n0, entry 0.
                assert!(noticed(p, "this host (n0) is entry 0"));
            }),
        ),
        row(
            "53",
            "",
            "deepspeed -H {HF2} --master_addr n0 train.py",
            Err(
                "--no_ssh and each host's --node_rank on that host (n0: --node_rank=0, n1: --node_rank=1)",
            ),
        ),
        row(
            "54",
            "",
            "deepspeed -H {HF2} --no_ssh --master_addr n0 train.py",
            Err("Launching training without ssh, but --node_rank is not set correctly."),
        ),
        row(
            "55",
            "",
            "deepspeed -H {HF2} --include n0@n1:0,2 --no_ssh --node_rank 1 --master_addr n0 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["0", "2"]);
                assert_eq!((world(p), base(p)), (6, 4));
                assert_eq!(env(p, "LOCAL_SIZE"), Some("2"));
            }),
        ),
        row(
            "56",
            "",
            "deepspeed -H {HF2} --num_nodes 1 --no_ssh --node_rank 0 --master_addr n0 train.py",
            Plan(|p| {
                assert_eq!(p.nnodes, 1);
                assert_eq!(devs(p), ["0", "1", "2", "3"]);
                assert_eq!(world(p), 4);
            }),
        ),
        row(
            "57",
            "",
            "deepspeed -H {HF2} --num_gpus 2 --no_ssh --node_rank 1 --master_addr n0 train.py",
            Plan(|p| {
                assert_eq!(devs(p), ["0", "1"]);
                assert_eq!((world(p), base(p)), (4, 2));
            }),
        ),
        row(
            "58",
            "",
            "deepspeed -H {HF3} --no_ssh --node_rank 1 --master_addr n0 train.py",
            Plan(|p| {
                assert_eq!(p.node_slots, Some(vec![3, 2]));
                assert_eq!((p.nproc, world(p), base(p)), (2, 5, 3));
                assert_eq!(devs(p), ["0", "1"]);
            }),
        ),
        row(
            "59a",
            "",
            "deepspeed -H {BAD} train.py",
            Err(":1: Hostfile contains a bad entry: n0 slot=4, unable to proceed with launching"),
        ),
        row(
            "59b",
            "",
            "deepspeed -H {DUP} train.py",
            Err(":2: Hostfile contains multiple entries for n0, unable to proceed with launching"),
        ),
        row(
            "59c",
            "",
            "deepspeed -H {BIG} train.py",
            Err("is larger than 1 MiB"),
        ),
        row(
            "60",
            "",
            "deepspeed --num_nodes 2 train.py",
            Err("Num nodes is >1 but no extra nodes available via hostfile"),
        ),
        row(
            "61a",
            "",
            "deepspeed --no_local_rank --module pkg.train --x",
            Plan(|p| {
                assert_eq!(p.local_rank_arg, None);
                assert!(
                    matches!(&p.program, Program::Module { module, args, .. } if module == "pkg.train" && *args == s(&["--x"]))
                );
            }),
        ),
        row(
            "61b",
            "",
            "deepspeed --no_python ./run.sh",
            Plan(|p| {
                assert_eq!(p.local_rank_arg, Some("--local_rank"));
                assert_eq!(p.program, Program::Exec(s(&["./run.sh"])));
            }),
        ),
        row(
            "61c",
            "",
            "deepspeed --no_python --module x",
            Err("Don't use both the '--no_python' flag and the '--module' flag at the same time."),
        ),
        row(
            "62",
            "",
            "deepspeed --enable_each_rank_log /tmp/L train.py",
            Plan(|p| {
                assert_eq!(p.each_rank_log.as_deref(), Some(Path::new("/tmp/L")));
            }),
        ),
        row(
            "63a",
            "",
            "deepspeed --autotuning tune train.py",
            Err("--autotuning tune is not supported by ringctl launch"),
        ),
        row(
            "63b",
            "",
            "deepspeed --elastic_training --master_addr a train.py",
            Err("--elastic_training: elastic membership is not supported"),
        ),
        row(
            "63c",
            "",
            "deepspeed -H {HF2} --force_multi --num_nodes 1 train.py",
            Err("--force_multi starts the workers over ssh"),
        ),
        row(
            "63d",
            "",
            "deepspeed --launcher openmpi -H {HF2} train.py",
            Err("--launcher openmpi starts the workers of every host through openmpi"),
        ),
        row(
            "63e",
            "",
            "deepspeed -H {DIR}/missing train.py",
            Plan(|p| {
                assert_eq!(p.nnodes, 1);
                assert!(noticed(p, "Unable to find hostfile"));
            }),
        ),
        row(
            "63f",
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=h0 NPROC_PER_NODE=2",
            "deepspeed train.py",
            Plan(|p| {
                // Without a hostfile the layout variables describe the nodes.
                assert_eq!((p.nnodes, p.node_rank, p.nproc), (2, 1, 2));
                assert_eq!(master(p), ("h0", Port::Fixed(29500)));
                assert_eq!(devs(p), ["0", "1"]);
            }),
        ),
        row(
            "63g",
            "",
            "deepspeed --num-gpus=2 train.py",
            Plan(|p| assert_eq!(p.nproc, 2)),
        ),
        row(
            "63h",
            "",
            "deepspeed recipe.yaml lr=1",
            Plan(|p| {
                assert_eq!(p.local_rank_arg, None);
                assert!(
                    matches!(&p.program, Program::Recipe { file, .. } if file == "recipe.yaml")
                );
            }),
        ),
        // ---- accelerate
        row(
            "64",
            "",
            "accelerate launch --multi_gpu --num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29600 train.py",
            Plan(|p| {
                assert_eq!(p.dialect, Dialect::Accelerate);
                assert_eq!(
                    (p.nnodes, p.node_rank, p.nproc, world(p), base(p)),
                    (2, 1, 4, 8, 4)
                );
                assert_eq!(master(p), ("10.0.0.1", Port::Fixed(29600)));
                assert_eq!(env(p, "ACCELERATE_MIXED_PRECISION"), Some("no"));
                assert_eq!(env(p, "ACCELERATE_DYNAMO_BACKEND"), Some("NO"));
                assert_eq!(env(p, "ACCELERATE_DYNAMO_MODE"), Some("default"));
                assert_eq!(env(p, "ACCELERATE_DYNAMO_USE_FULLGRAPH"), Some("False"));
                assert_eq!(env(p, "OMP_NUM_THREADS"), Some("1"));
                assert_eq!(p.local_rank_arg, None);
            }),
        ),
        row(
            "65",
            "",
            "accelerate launch --config_file {DIR}/c.yaml train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, p.nproc, world(p)), (2, 0, 8, 16));
                assert_eq!(master(p), ("h0", Port::Fixed(29500)));
                assert_eq!(env(p, "ACCELERATE_MIXED_PRECISION"), Some("bf16"));
                assert_eq!(p.visible_devices, None);
            }),
        ),
        row(
            "66",
            "",
            "accelerate launch --config_file {DIR}/c.yaml --mixed-precision fp16 --num_processes 4 train.py",
            Plan(|p| {
                assert_eq!(env(p, "ACCELERATE_MIXED_PRECISION"), Some("fp16"));
                assert_eq!((p.nproc, world(p)), (2, 4));
            }),
        ),
        row(
            "67",
            "",
            "accelerate launch --num_processes 7 --num_machines 2 --machine_rank 0 --main_process_ip h0 --multi_gpu train.py",
            Err(
                "--num_processes 7 is not divisible by --num_machines 2 (accelerate would silently start 3 per machine)",
            ),
        ),
        row(
            "68",
            "",
            "accelerate launch --multi_gpu --num_processes 2 --gpu_ids 1,3 train.py",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
                assert_eq!(devs(p), ["1", "3"]);
            }),
        ),
        row(
            "68b",
            "",
            "accelerate launch --multi_gpu --num_processes 2 --gpu_ids 1 train.py",
            Err("2 workers per node but only 1 device in --gpu_ids"),
        ),
        row(
            "69a",
            "",
            "accelerate launch --multi_gpu --num_processes 1 train.py",
            Err("You need to use at least 2 processes to use `--multi_gpu`."),
        ),
        row(
            "69b",
            "",
            "accelerate launch --use_deepspeed --use_fsdp train.py",
            Err(
                "You can only use one of `--cpu`, `--multi_gpu`, `--tpu`, `--use_deepspeed`, `--use_fsdp` at a time.",
            ),
        ),
        row(
            "70",
            "",
            "accelerate launch train.py",
            Plan(|p| {
                single(p);
                assert_eq!(p.nproc, 4);
                assert!(noticed(
                    p,
                    "More than one GPU was found, enabling multi-GPU training."
                ));
            }),
        ),
        row(
            "71",
            "PWD=/work/job PYTHONPATH=/opt/lib",
            "accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 train.py",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
                assert_eq!(p.local_rank_arg, None);
                assert_eq!(env(p, "ACCELERATE_USE_DEEPSPEED"), Some("true"));
                assert_eq!(env(p, "ACCELERATE_DEEPSPEED_ZERO_STAGE"), Some("2"));
                assert_eq!(env(p, "ACCELERATE_CONFIG_DS_FIELDS"), Some(""));
                // accelerate's env_var_path_add appends the working directory.
                assert_eq!(env(p, "PYTHONPATH"), Some("/opt/lib:/work/job"));
            }),
        ),
        row(
            "72",
            "",
            "accelerate launch --use_fsdp --num_processes 2 train.py",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
                assert_eq!(env(p, "ACCELERATE_USE_FSDP"), Some("true"));
                assert_eq!(env(p, "FSDP_VERSION"), Some("1"));
                assert_eq!(env(p, "FSDP_SHARDING_STRATEGY"), Some("FULL_SHARD"));
                assert_eq!(env(p, "FSDP_OFFLOAD_PARAMS"), Some("false"));
                assert_eq!(env(p, "FSDP_MIN_NUM_PARAMS"), Some("100000000"));
                assert_eq!(env(p, "FSDP_USE_ORIG_PARAMS"), Some("true"));
            }),
        ),
        row(
            "72b",
            "",
            "accelerate launch --config_file {DIR}/fsdp.json train.py",
            Plan(|p| {
                // A .json config; fsdp_config keys get their fsdp_ prefix.
                assert_eq!(env(p, "ACCELERATE_USE_FSDP"), Some("true"));
                assert_eq!(env(p, "FSDP_OFFLOAD_PARAMS"), Some("true"));
            }),
        ),
        row(
            "73a",
            "",
            "accelerate launch --main_process_port 0 --num_processes 2 --multi_gpu train.py",
            Plan(|p| assert_eq!(master(p), ("127.0.0.1", Port::Ephemeral))),
        ),
        row(
            "73b",
            "",
            "accelerate launch --dynamo_backend inductor --num_processes 2 train.py",
            Plan(|p| assert_eq!(env(p, "ACCELERATE_DYNAMO_BACKEND"), Some("INDUCTOR"))),
        ),
        row(
            "74a",
            "",
            "accelerate launch --config_file {DIR}/ds.yaml train.py",
            Err(
                "deepspeed_multinode_launcher 'pdsh' (the default) fans out over ssh/MPI from one machine; set deepspeed_multinode_launcher to 'standard' or 'nossh'",
            ),
        ),
        row(
            "74b",
            "",
            "accelerate launch --config_file {DIR}/ds_std.yaml train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, p.nproc), (2, 1, 4));
                assert_eq!(master(p), ("h0", Port::Fixed(29500)));
                assert_eq!(p.local_rank_arg, None);
                assert_eq!(env(p, "ACCELERATE_DEEPSPEED_ZERO_STAGE"), Some("3"));
                assert_eq!(
                    env(p, "ACCELERATE_CONFIG_DS_FIELDS"),
                    Some("deepspeed_multinode_launcher,zero_stage,mixed_precision")
                );
            }),
        ),
        row(
            "74c",
            "",
            "accelerate launch --config_file {DIR}/ds_nossh.yaml train.py",
            Plan(|p| {
                // nossh: DeepSpeed's --no_ssh form over deepspeed_hostfile.
                assert_eq!(p.dialect, Dialect::Accelerate);
                assert_eq!((p.nnodes, p.node_rank, world(p), base(p)), (2, 1, 8, 4));
                assert_eq!(devs(p), ["0", "1", "2", "3"]);
                assert_eq!(p.local_rank_arg, Some("--local_rank"));
                assert_eq!(master(p), ("n0", Port::Fixed(29600)));
                assert_eq!(env(p, "ACCELERATE_USE_DEEPSPEED"), Some("true"));
            }),
        ),
        row(
            "75a",
            "",
            "accelerate launch -m pkg.train",
            Plan(|p| {
                assert!(
                    matches!(&p.program, Program::Module { module, .. } if module == "pkg.train")
                );
            }),
        ),
        row(
            "75b",
            "",
            "accelerate launch --no-python ./run.sh",
            Plan(|p| {
                assert_eq!(p.program, Program::Exec(s(&["./run.sh"])));
            }),
        ),
        row(
            "75c",
            "",
            "accelerate launch --config_file {DIR}/bad.yaml train.py",
            Err("had unknown keys (['foo'])"),
        ),
        row(
            "75f",
            "",
            "accelerate launch --config_file {DIR}/bad.yaml train.py",
            Err("bad.yaml:3)"),
        ),
        row(
            "75d",
            "",
            "accelerate launch --config_file {DIR}/none.yaml train.py",
            Err("The passed configuration file `"),
        ),
        row(
            "75e",
            "",
            "accelerate launch --num_proc 2 train.py",
            Err("unrecognized arguments: --num_proc"),
        ),
        row(
            "76",
            "HF_HOME={DIR}/h",
            "accelerate launch train.py",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
                assert_eq!(env(p, "ACCELERATE_MIXED_PRECISION"), Some("fp16"));
                assert!(noticed(p, "h/accelerate/default_config.yaml"));
            }),
        ),
        row(
            "76b",
            "HOME={DIR}/home XDG_CACHE_HOME={DIR}",
            "accelerate launch --cpu train.py",
            Plan(|p| {
                // --cpu skips the default config; the single-process launcher.
                assert_eq!(p.nproc, 1);
                assert_eq!(env(p, "ACCELERATE_USE_CPU"), Some("True"));
            }),
        ),
        row(
            "76c",
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=h0 MASTER_PORT=29555 NPROC_PER_NODE=4",
            "accelerate launch --multi_gpu train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, p.nproc), (2, 1, 4));
                assert_eq!(master(p), ("h0", Port::Fixed(29555)));
            }),
        ),
        // ---- dialect choice
        row(
            "77",
            "",
            "--nproc-per-node 2 --num_gpus 2 train.py",
            Err("--nproc-per-node (torchrun) and --num_gpus (DeepSpeed) cannot be mixed"),
        ),
        row(
            "77b",
            "",
            "--num_processes 2 --hostfile x train.py",
            Err("--num_processes (accelerate) and --hostfile (DeepSpeed) cannot be mixed"),
        ),
        row(
            "77c",
            "",
            "--hostfile {HF2} --no_ssh --node_rank 0 --master_addr n0 train.py",
            Plan(|p| {
                assert_eq!((p.dialect, p.nnodes), (Dialect::DeepSpeed, 2));
            }),
        ),
        row(
            "77d",
            "",
            "--multi_gpu --num_processes 2 train.py",
            Plan(|p| {
                assert_eq!((p.dialect, p.nproc), (Dialect::Accelerate, 2));
            }),
        ),
        row(
            "77e",
            "",
            "torchrun --num_gpus 2 train.py",
            Err("--num_gpus is a DeepSpeed option, not a torchrun one"),
        ),
        row(
            "78",
            "",
            "--tee 3 --nproc-per-node 2 train.py",
            Plan(|p| {
                assert_eq!(p.logs.dir, None);
                assert_eq!(p.logs.tee, vec![3, 3]);
                assert_eq!(p.logs.redirects, vec![0, 0]);
            }),
        ),
        // ---- `--` after a named launcher only ends its options (argparse); without a leading
        // word `-- CMD` runs CMD as a command (row 29).
        row(
            "79",
            "",
            "torchrun --nproc-per-node 2 -- train.py --lr 1",
            Plan(|p| {
                assert_eq!(script(p), ("python3", "train.py", vec!["--lr", "1"]));
            }),
        ),
        row(
            "79b",
            "",
            "torchrun -m -- pkg.mod --x",
            Plan(|p| {
                assert!(matches!(&p.program, Program::Module { module, args, .. }
                        if module == "pkg.mod" && args == &s(&["--x"])));
            }),
        ),
        row(
            "79c",
            "",
            "deepspeed --num_gpus 2 -- train.py --deepspeed ds.json",
            Plan(|p| {
                assert_eq!(script(p).1, "train.py");
                assert_eq!(p.local_rank_arg, Some("--local_rank"));
            }),
        ),
        row(
            "79d",
            "",
            "accelerate launch --multi_gpu --num_processes 2 -- train.py --x",
            Plan(|p| {
                assert_eq!(script(p), ("python3", "train.py", vec!["--x"]));
            }),
        ),
        row(
            "79e",
            "",
            "--nproc-per-node 2 -- train.py --x",
            Plan(|p| {
                assert_eq!(p.program, Program::Exec(s(&["train.py", "--x"])));
            }),
        ),
        // ---- python -m torch.distributed.launch: `--local-rank=N` after the script unless
        // --use-env; python -m torch.distributed.run is torchrun.
        row(
            "80",
            "",
            "python -m torch.distributed.launch --nproc_per_node 2 train.py --lr 1",
            Plan(|p| {
                use ringmaster_launch::runtime::worker_argv;
                assert_eq!((p.dialect, p.nproc), (Dialect::Torchrun, 2));
                assert_eq!(p.local_rank_arg, Some("--local-rank"));
                assert_eq!(
                    worker_argv(p, Path::new("/bin/trainer"), 1),
                    s(&["python3", "-u", "train.py", "--local-rank=1", "--lr", "1"])
                );
            }),
        ),
        row(
            "80b",
            "",
            "python3 -m torch.distributed.launch --use-env --nproc_per_node 2 train.py",
            Plan(|p| {
                assert_eq!(p.local_rank_arg, None);
                assert!(!noticed(p, "--use-env"));
            }),
        ),
        row(
            "80c",
            "",
            "python -m torch.distributed.launch --no-python ./run.sh",
            Err("When using the '--no-python' flag, you must also set the '--use-env' flag."),
        ),
        row(
            "80d",
            "",
            "/usr/bin/python3.12 -m torch.distributed.run --nproc-per-node 2 -- train.py",
            Plan(|p| {
                assert_eq!(p.local_rank_arg, None);
                assert_eq!(script(p).1, "train.py");
            }),
        ),
        // ---- accelerate on one machine without a port: a free one (accelerate turns to
        // --standalone when 29500 is taken); several machines keep 29500.
        row(
            "81",
            "",
            "accelerate launch --multi_gpu --num_processes 2 train.py",
            Plan(|p| {
                assert_eq!(master(p), ("127.0.0.1", Port::Ephemeral));
            }),
        ),
        row(
            "81b",
            "",
            "accelerate launch --multi_gpu --num_processes 4 --num_machines 2 --machine_rank 0 --main_process_ip h0 train.py",
            Plan(|p| {
                assert_eq!(master(p), ("h0", Port::Fixed(29500)));
            }),
        ),
        // ---- llamafactory-cli train with the training config as flags.
        row(
            "82",
            "NPROC_PER_NODE=2",
            "lmf train --stage sft --model_name_or_path m --bf16 --learning_rate 1e-4",
            Plan(|p| {
                use ringmaster_launch::runtime::worker_argv;
                assert_eq!((p.dialect, p.nproc), (Dialect::LlamaFactory, 2));
                let flags = s(&[
                    "--stage",
                    "sft",
                    "--model_name_or_path",
                    "m",
                    "--bf16",
                    "--learning_rate",
                    "1e-4",
                ]);
                assert_eq!(p.program, Program::TrainerFlags(flags.clone()));
                let mut argv = s(&["/bin/trainer"]);
                argv.extend(flags);
                assert_eq!(worker_argv(p, Path::new("/bin/trainer"), 0), argv);
            }),
        ),
        row(
            "82b",
            "",
            "llamafactory-cli train foo",
            Err("or the training config as flags"),
        ),
        // ---- NNODES & co. read by a named tool that would ignore them: one notice each.
        row(
            "83",
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=h0 MASTER_PORT=29600",
            "torchrun train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank), (2, 1));
                for v in [
                    "NNODES=2",
                    "NODE_RANK=1",
                    "MASTER_ADDR=h0",
                    "MASTER_PORT=29600",
                ] {
                    let name = v.split('=').next().unwrap();
                    let line = format!(
                        "{v} is taken from the environment: torchrun itself does not read \
                         {name} (it reads PET_{name})"
                    );
                    assert!(noticed(p, &line), "{line}: {:?}", p.notices);
                }
            }),
        ),
        row(
            "83b",
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=h0 MASTER_PORT=29600",
            "train.py",
            Plan(|p| {
                // ringctl's own form documents them: no notice.
                assert_eq!((p.nnodes, p.node_rank), (2, 1));
                assert!(!noticed(p, "taken from the environment"), "{:?}", p.notices);
            }),
        ),
        row(
            "83c",
            "NPROC_PER_NODE=2 MASTER_PORT=29600",
            "deepspeed train.py",
            Plan(|p| {
                assert_eq!(p.nproc, 2);
                assert!(noticed(
                    p,
                    "NPROC_PER_NODE=2 is taken from the environment: the DeepSpeed launcher \
                     itself does not read NPROC_PER_NODE"
                ));
                assert!(noticed(
                    p,
                    "MASTER_PORT=29600 is taken from the environment"
                ));
            }),
        ),
        row(
            "83d",
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=h0 MASTER_PORT=29600",
            "accelerate launch --multi_gpu --num_processes 4 train.py",
            Plan(|p| {
                assert_eq!((p.nnodes, p.node_rank, p.nproc), (2, 1, 2));
                assert!(noticed(
                    p,
                    "NNODES=2 is taken from the environment: accelerate launch itself does not \
                     read NNODES"
                ));
            }),
        ),
    ]
}

/// What each launcher adds to its workers' environment besides the contract: torchrun sets
/// OMP_NUM_THREADS=1 for several workers per node when its environment lacks it, and
/// TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless set (so do accelerate's and LLaMA-Factory's
/// torchrun paths); DeepSpeed's launch.py neither; accelerate sets OMP_NUM_THREADS to
/// `--num_cpu_threads_per_process` (default: the inherited value, else 1); a single plain
/// process (accelerate's simple launcher, LLaMA-Factory in-process) gets none of torchrun's
/// variables.
#[test]
fn each_launcher_adds_the_variables_it_adds() {
    use ringmaster_launch::runtime::{Placement, worker_env};
    const NONE: &str = "-";
    // (environment, command, OMP_NUM_THREADS, TORCH_NCCL_ASYNC_ERROR_HANDLING, RANK) as the
    // workers get them from the launcher ("-": not set by it).
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        ("", "torchrun train.py", NONE, "1", "0"),
        ("", "torchrun --nproc-per-node 2 train.py", "1", "1", "0"),
        (
            "OMP_NUM_THREADS=8",
            "torchrun --nproc-per-node 2 train.py",
            NONE,
            "1",
            "0",
        ),
        (
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=0",
            "--nproc-per-node 2 train.py",
            "1",
            NONE,
            "0",
        ),
        (
            "",
            "python -m torch.distributed.launch --nproc_per_node 2 x.py",
            "1",
            "1",
            "0",
        ),
        ("", "deepspeed --num_gpus 2 train.py", NONE, NONE, "0"),
        ("", "deepspeed train.py", NONE, NONE, "0"),
        (
            "",
            "accelerate launch --multi_gpu --num_processes 2 train.py",
            "1",
            "1",
            "0",
        ),
        (
            "OMP_NUM_THREADS=8",
            "accelerate launch --multi_gpu --num_processes 2 train.py",
            "8",
            "1",
            "0",
        ),
        (
            "",
            "accelerate launch --num_cpu_threads_per_process 4 --multi_gpu --num_processes 2 x.py",
            "4",
            "1",
            "0",
        ),
        (
            "",
            "accelerate launch --num_processes 1 train.py",
            "1",
            NONE,
            NONE,
        ),
        (
            "",
            "accelerate launch --cpu --num_processes 1 train.py",
            "1",
            NONE,
            NONE,
        ),
        ("NPROC_PER_NODE=2", "recipe.yaml", "1", "1", "0"),
        (
            "CUDA_VISIBLE_DEVICES=0",
            "lmf train recipe.yaml",
            NONE,
            NONE,
            NONE,
        ),
    ];
    for (vars, cmd, omp, nccl, rank) in cases {
        let args: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        let vars: HashMap<String, String> = vars
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |k: &str| vars.get(k).cloned();
        let plan = parse(&args, &lookup, &probe(4)).unwrap_or_else(|e| panic!("{cmd}: {}", e.0));
        let at = Placement {
            world: world(&plan),
            base: 0,
            port: 29500,
            node_addr: "127.0.0.1".into(),
            hostname: "n0".into(),
            interface: None,
        };
        let env = worker_env(&plan, &at, 0, 0, &|k| vars.contains_key(k));
        let get = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map_or(NONE, |(_, v)| v.as_str())
        };
        assert_eq!(get("OMP_NUM_THREADS"), *omp, "{cmd}: OMP_NUM_THREADS");
        assert_eq!(
            get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
            *nccl,
            "{cmd}: TORCH_NCCL_ASYNC_ERROR_HANDLING"
        );
        assert_eq!(get("RANK"), *rank, "{cmd}: RANK");
        if *rank == NONE {
            // accelerate's simple launcher and LLaMA-Factory in-process set none of these.
            for k in [
                "LOCAL_RANK",
                "WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE",
                "RINGMASTER_STORE_SERVED",
            ] {
                assert_eq!(get(k), NONE, "{cmd}: {k}");
            }
            assert_ne!(get("RINGMASTER_JOB_ID"), NONE, "{cmd}");
        }
    }
    // accelerate's simple launcher with several processes sets MASTER_ADDR/MASTER_PORT (only).
    let args: Vec<String> = "accelerate launch --cpu --num_processes 2 train.py"
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let plan = parse(&args, &|_| None, &probe(4)).unwrap();
    assert_eq!(env(&plan, "MASTER_ADDR"), Some("127.0.0.1"));
    assert_eq!(env(&plan, "MASTER_PORT"), Some("29500"));
    // The launcher's own store takes a free port, away from the process's MASTER_PORT.
    assert_eq!(plan.master_port, Port::Ephemeral);
}

#[test]
fn spec_table() {
    let files = Files::new();
    // Rows without -H read DeepSpeed's default hostfile; this machine must not have one.
    let job_hostfile = Path::new("/job/hostfile").exists();
    let mut failures = Vec::new();
    let mut ran = 0;
    for r in rows() {
        if job_hostfile && r.cmd.starts_with("deepspeed") && !r.cmd.contains(" -H ") {
            eprintln!("row {}: skipped (/job/hostfile exists here)", r.id);
            continue;
        }
        let cmd = files.fill(r.cmd);
        let args: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        let vars: HashMap<String, String> = files
            .fill(r.env)
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("KEY=VALUE");
                (k.to_string(), v.to_string())
            })
            .collect();
        let lookup = |k: &str| vars.get(k).cloned();
        let got = parse(&args, &lookup, &probe(r.devices));
        ran += 1;
        let outcome = catch_unwind(AssertUnwindSafe(|| match (&r.want, &got) {
            (Want::Plan(check), Ok(plan)) => check(plan),
            (Want::Err(want), Err(e)) => {
                assert!(e.0.contains(want), "error {:?} lacks {want:?}", e.0);
                assert!(!e.0.contains('\n'), "a one-line error: {:?}", e.0);
            }
            (Want::Plan(_), Err(e)) => panic!("unexpected error: {}", e.0),
            (Want::Err(want), Ok(plan)) => panic!("expected an error with {want:?}, got {plan:?}"),
        }));
        if outcome.is_err() {
            failures.push(format!("row {} `{}`", r.id, r.cmd));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_plan_is_consistent() {
    // Whatever the row, a plan has a worker, a node rank in range and per-rank log vectors.
    let files = Files::new();
    for r in rows() {
        let cmd = files.fill(r.cmd);
        let args: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        let vars: HashMap<String, String> = files
            .fill(r.env)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |k: &str| vars.get(k).cloned();
        if let Ok(p) = parse(&args, &lookup, &probe(r.devices)) {
            assert!(p.nproc >= 1, "row {}", r.id);
            assert!(p.node_rank < p.nnodes, "row {}", r.id);
            assert_eq!(p.logs.redirects.len(), p.nproc, "row {}", r.id);
            assert_eq!(p.logs.tee.len(), p.nproc, "row {}", r.id);
            if let Some(d) = &p.visible_devices {
                assert!(d.len() >= p.nproc, "row {}", r.id);
            }
            if let Some(slots) = &p.node_slots {
                assert_eq!(slots.len(), p.nnodes, "row {}", r.id);
                assert_eq!(slots[p.node_rank], p.nproc, "row {}", r.id);
            }
        }
    }
}

/// The same job, node 1 of 2 nodes x 2 workers meeting at 10.0.0.1:29600 and training
/// `recipe.yaml`, written in each of the four flag families (both spellings of the torchrun
/// and accelerate flags, accelerate's flags and its config file): every form gives the same
/// rank layout, the same worker command line and the same contract environment for each
/// worker. Only DeepSpeed pins `CUDA_VISIBLE_DEVICES` (its hostfile's slots), as its launcher
/// does, and sets neither `OMP_NUM_THREADS` nor `TORCH_NCCL_ASYNC_ERROR_HANDLING`, which
/// torchrun (under accelerate and LLaMA-Factory too) sets to 1 for two workers per node; those
/// are checked on their own.
#[test]
fn the_four_flag_families_give_the_same_layout_and_environment() {
    use ringmaster_launch::runtime::{Placement, worker_argv, worker_env};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(dir.path().join("hostfile"), "n0 slots=2\nn1 slots=2\n").unwrap();
    std::fs::write(
        dir.path().join("accelerate.yaml"),
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 4\n\
         num_machines: 2\nmachine_rank: 1\nmain_process_ip: 10.0.0.1\nmain_process_port: 29600\n",
    )
    .unwrap();
    let forms: Vec<(&str, String, &str)> = vec![
        (
            "torchrun",
            "torchrun --nnodes 2 --nproc-per-node 2 --node-rank 1 --master-addr 10.0.0.1 \
             --master-port 29600 recipe.yaml"
                .into(),
            "",
        ),
        (
            "torchrun, underscores, no leading word",
            "--nnodes=2 --nproc_per_node=2 --node_rank=1 --master_addr=10.0.0.1 \
             --master_port=29600 recipe.yaml"
                .into(),
            "",
        ),
        (
            "LLaMA-Factory's variables",
            "recipe.yaml".into(),
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 NPROC_PER_NODE=2",
        ),
        (
            "llamafactory-cli train",
            "llamafactory-cli train recipe.yaml".into(),
            "NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 NPROC_PER_NODE=2",
        ),
        (
            "DeepSpeed",
            format!(
                "deepspeed --hostfile {d}/hostfile --no_ssh --node_rank 1 --master_addr 10.0.0.1 \
                 --master_port 29600 recipe.yaml"
            ),
            "",
        ),
        (
            "accelerate's flags",
            "accelerate launch --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 \
             --main_process_port 29600 --num_processes 4 recipe.yaml"
                .into(),
            "",
        ),
        (
            "accelerate's flags, dashes",
            "accelerate launch --num-machines 2 --machine-rank 1 --main-process-ip 10.0.0.1 \
             --main-process-port 29600 --num-processes 4 recipe.yaml"
                .into(),
            "",
        ),
        (
            "accelerate's config file",
            format!("accelerate launch --config_file {d}/accelerate.yaml recipe.yaml"),
            "",
        ),
    ];
    const CONTRACT: [&str; 17] = [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "NNODES",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_USE_AGENT_STORE",
        "RINGMASTER_STORE_SERVED",
        "RINGMASTER_NODE_ADDR",
        "GLOO_SOCKET_IFNAME",
    ];
    type Worker = (Vec<String>, Vec<(String, String)>);
    let mut first: Option<(&str, Vec<Worker>)> = None;
    for (name, cmd, vars) in &forms {
        let args: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        let vars: HashMap<String, String> = vars
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |k: &str| vars.get(k).cloned();
        let plan = parse(&args, &lookup, &probe(4)).unwrap_or_else(|e| panic!("{name}: {}", e.0));
        let port = match plan.master_port {
            Port::Fixed(p) => p,
            Port::Ephemeral => panic!("{name}: no fixed port"),
        };
        let at = Placement {
            world: world(&plan),
            base: base(&plan),
            port,
            node_addr: "10.0.0.2".into(),
            hostname: "n1".into(),
            interface: Some("eth1".into()),
        };
        let workers: Vec<Worker> = (0..plan.nproc)
            .map(|lr| {
                let env = worker_env(&plan, &at, lr, 0, &|_| false);
                let get = |k: &str| env.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v);
                let contract = CONTRACT
                    .iter()
                    .map(|k| {
                        let v = get(k).unwrap_or_else(|| panic!("{name}: worker {lr} lacks {k}"));
                        (k.to_string(), v.clone())
                    })
                    .collect();
                let torchrun_sets = if *name == "DeepSpeed" {
                    assert_eq!(get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some("0,1"));
                    None
                } else {
                    Some("1")
                };
                for k in ["OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING"] {
                    assert_eq!(get(k).map(String::as_str), torchrun_sets, "{name}: {k}");
                }
                (worker_argv(&plan, Path::new("/bin/trainer"), lr), contract)
            })
            .collect();
        match &first {
            None => {
                // The layout itself, once: node 1 holds ranks 2 and 3 of 4.
                assert_eq!(workers.len(), 2, "{name}");
                for (lr, (argv, env)) in workers.iter().enumerate() {
                    assert_eq!(argv, &["/bin/trainer", "recipe.yaml"], "{name}");
                    let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
                    assert_eq!(get("RANK"), (2 + lr).to_string());
                    assert_eq!(get("WORLD_SIZE"), "4");
                    assert_eq!(get("NODE_RANK"), "1");
                    assert_eq!(get("MASTER_ADDR"), "10.0.0.1");
                    assert_eq!(get("MASTER_PORT"), "29600");
                }
                first = Some((name, workers));
            }
            Some((first_name, want)) => {
                assert_eq!(&workers, want, "{name} differs from {first_name}");
            }
        }
    }
}
