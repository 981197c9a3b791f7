//! LLaMA-Factory's `llamafactory-cli train RECIPE.yaml [key=value ...]` and its flag form
//! `llamafactory-cli train --stage sft --model_name_or_path DIR ...` (spec §4; `read_args`
//! takes the arguments as flags when the first is no config file): the layout comes from
//! NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT (and RDZV_ID, MAX_RESTARTS,
//! MIN_NNODES/MAX_NNODES), the program is the trainer with the recipe and its overrides, or with
//! the flags.

use super::{Ctx, Layout, Val, check_layout};
use crate::plan::{Dialect, LaunchError, LaunchPlan, Port, Program, WorkerEnv};

/// `args`: what follows `llamafactory-cli train`: the recipe and its overrides, or flags.
pub(crate) fn plan(args: &[String], ctx: &Ctx) -> Result<LaunchPlan, LaunchError> {
    let Some(first) = args.first() else {
        return Err(LaunchError::new(
            "llamafactory-cli train needs a recipe: ringctl launch lmf train RECIPE.yaml \
             [key=value ...] (or lmf train --key value ...)",
        ));
    };
    let program = if super::is_config_file(first) {
        Program::Recipe {
            file: first.clone(),
            overrides: args[1..].to_vec(),
        }
    } else if first.starts_with("--") && first.len() > 2 {
        // The training config as flags, given to the trainer as they are.
        Program::TrainerFlags(args.to_vec())
    } else {
        return Err(LaunchError(format!(
            "llamafactory-cli train {first}: ringctl launch needs the recipe file \
             (.yaml, .yml or .json) first, then its overrides (key=value ...), or the training \
             config as flags (--stage sft --model_name_or_path DIR ...)"
        )));
    };
    let env = &ctx.env;
    for var in ["USE_RAY", "USE_KT"] {
        if env.enabled(var, false) {
            let why = if var == "USE_RAY" {
                "it uses Ray, not a per-node launcher"
            } else {
                "it runs KTransformers in one process"
            };
            return Err(LaunchError(format!(
                "{var} is not supported by ringctl launch ({why}); unset {var}"
            )));
        }
    }
    let forced = ["FORCE_TORCHRUN", "USE_MCA", "USE_MEGATRON_BRIDGE"]
        .iter()
        .any(|v| env.enabled(v, false));
    let devices = ctx.gpu_count();
    let nnodes_val = env.val("NNODES");
    let nproc_val = env.val("NPROC_PER_NODE");
    let rdzv_id = env.val("RDZV_ID");
    let mut notices = Vec::new();

    // LLaMA-Factory trains in-process (one process, no torchrun) unless forced or it sees more
    // than one device. Setting the layout variables asks for the distributed form here.
    let asked = nnodes_val.is_some() || nproc_val.is_some() || rdzv_id.is_some();
    if !forced && devices <= 1 && !asked {
        let mut plan = LaunchPlan::new(Dialect::LlamaFactory, 1, program);
        plan.master_port = Port::Ephemeral;
        // Training in LLaMA-Factory's own process: no torchrun, none of its variables.
        plan.worker_env = WorkerEnv::Single;
        plan.notices.push(format!(
            "one worker: LLaMA-Factory trains in one process when it sees {devices} device{} \
             and FORCE_TORCHRUN is unset",
            if devices == 1 { "" } else { "s" }
        ));
        return Ok(plan);
    }
    if !forced && devices <= 1 {
        notices.push(
            "FORCE_TORCHRUN is unset and at most one device is visible: LLaMA-Factory would \
             train in one process and ignore NNODES/NPROC_PER_NODE; ringctl launch honours them"
                .to_string(),
        );
    }

    let nnodes_val = nnodes_val.unwrap_or_else(|| Val::default("NNODES", "1"));
    let mut nnodes: usize = nnodes_val.num("expected a node count")?;
    if nnodes == 0 {
        return Err(LaunchError(format!(
            "{}: the node count must be >= 1",
            nnodes_val.show()
        )));
    }
    let nproc = match &nproc_val {
        Some(v) => v.num::<usize>("expected a number of workers")?,
        None if devices == 0 => {
            return Err(LaunchError::new(
                "no CUDA device is visible and NPROC_PER_NODE is unset: set NPROC_PER_NODE",
            ));
        }
        None => devices,
    };
    if nproc == 0 {
        return Err(LaunchError::new(
            "NPROC_PER_NODE=0: the number of workers must be >= 1",
        ));
    }
    let min_max = (env.val("MIN_NNODES"), env.val("MAX_NNODES"));
    let restarts = env.val("MAX_RESTARTS");

    let mut plan = LaunchPlan::new(Dialect::LlamaFactory, nproc, program);
    let rank_val = env.val("NODE_RANK");
    if let Some(id) = &rdzv_id {
        // torchrun --rdzv-backend c10d --rdzv-id RDZV_ID --rdzv-endpoint ADDR:PORT
        if let (Some(min), Some(max)) = &min_max {
            let lo: usize = min.num("expected a node count")?;
            let hi: usize = max.num("expected a node count")?;
            if lo != hi {
                return Err(LaunchError(format!(
                    "elastic membership (MIN:MAX nodes, {} {}) is not supported by ringctl \
                     launch; use a fixed node count (NNODES) and MAX_RESTARTS",
                    min.show(),
                    max.show()
                )));
            }
            nnodes = hi;
        }
        plan.run_id = id.v.clone();
        plan.max_restarts = super::torchrun::max_restarts(restarts.as_ref())?;
        if nnodes > 1 && rank_val.is_none() {
            // torchrun's c10d rendezvous numbers the nodes as they join.
            plan.join_order = true;
        }
    } else {
        if let Some(r) = &restarts {
            notices.push(format!(
                "{} is ignored without RDZV_ID (as LLaMA-Factory does): no restarts",
                r.show()
            ));
        }
        for v in [&min_max.0, &min_max.1].into_iter().flatten() {
            notices.push(format!(
                "{} is ignored without RDZV_ID (as LLaMA-Factory does)",
                v.show()
            ));
        }
    }
    plan.nnodes = nnodes;
    if let Some(r) = &rank_val {
        plan.node_rank = r.num("expected a node rank (0, 1, ...)")?;
    }
    let addr_val = env.val("MASTER_ADDR");
    if let Some(a) = &addr_val {
        plan.master_addr = super::unbracket(&a.v);
    }
    match env.val("MASTER_PORT") {
        Some(p) => plan.master_port = p.port()?,
        None if nnodes > 1 => {
            return Err(LaunchError(format!(
                "NNODES={nnodes} without MASTER_PORT: LLaMA-Factory would pick a different \
                 random port on each node; set MASTER_PORT"
            )));
        }
        // LLaMA-Factory's find_available_port(): a free port on this node.
        None => plan.master_port = Port::Ephemeral,
    }

    if env.enabled("OPTIM_TORCH", true) {
        if let Some(old) = env.get("PYTORCH_CUDA_ALLOC_CONF")
            && old != "expandable_segments:True"
        {
            notices.push(format!(
                "PYTORCH_CUDA_ALLOC_CONF={old} is replaced by expandable_segments:True (as \
                 LLaMA-Factory does; OPTIM_TORCH=0 keeps it)"
            ));
        }
        plan.extra_env.push((
            "PYTORCH_CUDA_ALLOC_CONF".into(),
            "expandable_segments:True".into(),
        ));
        plan.extra_env
            .push(("TORCH_NCCL_AVOID_RECORD_STREAMS".into(), "1".into()));
    }
    plan.notices = notices;
    check_layout(
        &mut plan,
        &Layout {
            nnodes: nnodes_val,
            node_rank: rank_val.unwrap_or_else(|| Val::default("NODE_RANK", "0")),
            master_given: addr_val.is_some(),
            master_hint: "MASTER_ADDR",
        },
    )?;
    Ok(plan)
}
