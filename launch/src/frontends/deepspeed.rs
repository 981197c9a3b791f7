//! The DeepSpeed launcher's command line (`deepspeed/launcher/runner.py`, per node `launch.py`;
//! spec §2). Only its one-per-node forms run here: no hostfile (this machine), a one-host
//! hostfile, or `--no_ssh --node_rank=<i>` on every node of a hostfile. Fanning out over ssh,
//! MPI or Slurm, autotuning and elastic training are refused with what to do instead.

use std::path::PathBuf;
use std::time::Duration;

use super::argv::{self, Opt, Parsed};
use super::{Ctx, How, Layout, Src, Val, check_layout, read_small};
use crate::plan::{Dialect, LaunchError, LaunchPlan, WorkerEnv};

/// runner.py's options (underscore spelling, and the dash spelling as a convenience), plus
/// `--max_restarts` (ringctl's gang restarts) and `--monitor_interval` (accepted, no effect).
pub(crate) const OPTS: &[Opt] = &[
    Opt::value("hostfile").short("-H"),
    Opt::value("include").short("-i"),
    Opt::value("exclude").short("-e"),
    Opt::value("num_nodes"),
    Opt::value("min_elastic_nodes"),
    Opt::value("max_elastic_nodes"),
    Opt::value("num_gpus").alias("num_accelerators"),
    Opt::value("master_port"),
    Opt::value("master_addr"),
    Opt::value("node_rank"),
    Opt::value("launcher"),
    Opt::value("launcher_args"),
    Opt::flag("module"),
    Opt::flag("no_python"),
    Opt::flag("no_local_rank"),
    Opt::flag("no_ssh"),
    Opt::flag("no_ssh_check"),
    Opt::flag("force_multi"),
    Opt::flag("save_pid"),
    Opt::value("enable_each_rank_log"),
    Opt::value("autotuning"),
    Opt::value("comment"),
    Opt::value("account"),
    Opt::flag("elastic_training"),
    Opt::flag("bind_cores_to_rank"),
    Opt::value("bind_core_list"),
    Opt::value("ssh_port"),
    Opt::value("venv_script"),
    Opt::value("log_level"),
    Opt::flag("quiet").short("-q"),
    Opt::value("max_restarts"),
    Opt::value("monitor_interval"),
];

/// DeepSpeed's default hostfile.
pub(crate) const DEFAULT_HOSTFILE: &str = "/job/hostfile";

/// One hostfile entry: `NAME slots=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    pub name: String,
    pub slots: usize,
}

/// Most workers one host may run (`slots=`), as `ringmaster-hostfile` caps it.
pub(crate) const MAX_SLOTS_PER_HOST: usize = 1024;

/// Parses a hostfile (runner.py `_parse_hostfile`): blank and `#` lines skipped, every other line
/// must match `^(\S+)\s+slots=(\d+)` (text after the digits is tolerated), no host twice, at
/// least one host. Order of lines = node rank order. Errors name `path:line`.
pub(crate) fn parse_hostfile(text: &str, path: &str) -> Result<Vec<Host>, LaunchError> {
    let mut hosts: Vec<Host> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            LaunchError(format!(
                "{path}:{}: Hostfile contains a bad entry: {line}, unable to proceed with launching",
                i + 1
            ))
        };
        let (name, rest) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let digits: String = rest
            .trim_start()
            .strip_prefix("slots=")
            .ok_or_else(bad)?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if digits.is_empty() {
            return Err(bad());
        }
        let slots: usize = digits.parse().map_err(|_| bad())?;
        // Ours, not DeepSpeed's: a node's workers are started one process per slot, so a
        // count no machine has is refused before anything is allocated for it (the
        // coordinator's hostfiles have the same cap).
        if slots > MAX_SLOTS_PER_HOST {
            return Err(LaunchError(format!(
                "{path}:{}: {name} has slots={slots}; at most {MAX_SLOTS_PER_HOST} workers per \
                 host",
                i + 1
            )));
        }
        if hosts.iter().any(|h| h.name == name) {
            return Err(LaunchError(format!(
                "{path}:{}: Hostfile contains multiple entries for {name}, unable to proceed with \
                 launching",
                i + 1
            )));
        }
        hosts.push(Host {
            name: name.to_string(),
            slots,
        });
    }
    if hosts.is_empty() {
        return Err(LaunchError(format!(
            "{path}: Hostfile is empty or not formatted correctly, unable to proceed with \
             launching."
        )));
    }
    Ok(hosts)
}

/// `NODE_SPEC[@NODE_SPEC...]`, `NODE_SPEC = NAME[:SLOT[,SLOT...]]` → (name, slots) in the order
/// first named; a host named twice gets the union; slots sorted, duplicates dropped.
fn node_specs(spec: &str, flag: &Val) -> Result<Vec<(String, Vec<usize>)>, LaunchError> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for node in spec.split('@') {
        let (name, slots) = match node.split_once(':') {
            None => (node, Vec::new()),
            Some((name, list)) => {
                if list.contains(':') {
                    return Err(LaunchError(format!(
                        "{}: '{node}' is not NAME[:SLOT[,SLOT...]]",
                        flag.show()
                    )));
                }
                let mut slots = Vec::new();
                for s in list.split(',') {
                    slots.push(s.trim().parse::<usize>().map_err(|_| {
                        LaunchError(format!(
                            "{}: '{s}' is not a slot number (in '{node}')",
                            flag.show()
                        ))
                    })?);
                }
                (name, slots)
            }
        };
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, have)) => have.extend(slots),
            None => out.push((name.to_string(), slots)),
        }
    }
    for (_, slots) in &mut out {
        slots.sort_unstable();
        slots.dedup();
    }
    Ok(out)
}

/// The selected world (runner.py `parse_inclusion_exclusion`): with `--include`, only the named
/// hosts, each with the named slots (taken as given) or all of its slots; with `--exclude`, all
/// but the named slots or hosts (a slot the host lacks is an error). Hosts stay in hostfile
/// order; hosts left without slots are dropped.
pub(crate) fn select(
    pool: &[Host],
    include: Option<&Val>,
    exclude: Option<&Val>,
) -> Result<Vec<(String, Vec<usize>)>, LaunchError> {
    let all: Vec<(String, Vec<usize>)> = pool
        .iter()
        .map(|h| (h.name.clone(), (0..h.slots).collect()))
        .collect();
    if include.is_some() && exclude.is_some() {
        return Err(LaunchError::new(
            "include_str and exclude_str are mutually exclusive.",
        ));
    }
    let unknown = |name: &str, flag: &Val| {
        LaunchError(format!(
            "Hostname '{name}' not found in hostfile ({})",
            flag.show()
        ))
    };
    let mut chosen: Vec<(String, Vec<usize>)> = match (include, exclude) {
        (Some(inc), _) => {
            let mut chosen = Vec::new();
            for (name, slots) in node_specs(&inc.v, inc)? {
                let Some((_, every)) = all.iter().find(|(n, _)| *n == name) else {
                    return Err(unknown(&name, inc));
                };
                let slots = if slots.is_empty() {
                    every.clone()
                } else {
                    slots
                };
                chosen.push((name, slots));
            }
            // Hostfile order, not the order of the filter.
            all.iter()
                .filter_map(|(n, _)| chosen.iter().find(|(c, _)| c == n).cloned())
                .collect()
        }
        (None, Some(exc)) => {
            let mut kept = all.clone();
            for (name, slots) in node_specs(&exc.v, exc)? {
                let Some((_, have)) = kept.iter_mut().find(|(n, _)| *n == name) else {
                    return Err(unknown(&name, exc));
                };
                if slots.is_empty() {
                    have.clear();
                }
                for s in slots {
                    let Some(at) = have.iter().position(|x| *x == s) else {
                        return Err(LaunchError(format!(
                            "No slot '{s}' specified on host '{name}' ({})",
                            exc.show()
                        )));
                    };
                    have.remove(at);
                }
            }
            kept
        }
        (None, None) => all,
    };
    if include.is_some() || exclude.is_some() {
        chosen.retain(|(_, s)| !s.is_empty());
    }
    Ok(chosen)
}

fn others() -> [(&'static str, &'static [Opt]); 2] {
    [
        ("torchrun", super::torchrun::OPTS),
        ("accelerate", super::accelerate::OPTS),
    ]
}

fn get(p: &Parsed, key: &str) -> Option<Val> {
    p.val(key)
}

/// `deepspeed [options] script args...`, reading hostfiles from the filesystem.
pub(crate) fn plan(args: &[String], ctx: &Ctx) -> Result<LaunchPlan, LaunchError> {
    let p = argv::parse(args, OPTS, true, "DeepSpeed", &others(), ctx.named)?;
    plan_parsed(&p, ctx, Dialect::DeepSpeed)
}

/// The plan from parsed DeepSpeed options (accelerate's `nossh` launcher comes here too).
pub(crate) fn plan_parsed(
    p: &Parsed,
    ctx: &Ctx,
    dialect: Dialect,
) -> Result<LaunchPlan, LaunchError> {
    let mut notices = Vec::new();
    if let Some(v) = get(p, "autotuning") {
        if !["tune", "run"].contains(&v.v.as_str()) {
            return Err(LaunchError(format!(
                "argument --autotuning: invalid choice: '{}' (choose from 'tune', 'run')",
                v.v
            )));
        }
        return Err(LaunchError(format!(
            "{} is not supported by ringctl launch: run DeepSpeed's autotuner with the \
             deepspeed command, then launch the tuned config here",
            v.show()
        )));
    }
    if p.given("elastic_training") {
        return Err(LaunchError::new(
            "--elastic_training: elastic membership is not supported by ringctl launch; use a \
             fixed node count and --max_restarts",
        ));
    }
    let how = How::from_flags(
        p.given("module"),
        p.given("no_python"),
        "Don't use both the '--no_python' flag and the '--module' flag at the same time.",
    )?;
    let program = ctx.program(p, how)?;

    let num = |key: &str| -> Result<Option<(i64, Val)>, LaunchError> {
        match get(p, key) {
            Some(v) => Ok(Some((v.num::<i64>("expected an integer")?, v))),
            None => Ok(None),
        }
    };
    let num_nodes = num("num_nodes")?;
    let mut include = get(p, "include").filter(|v| !v.v.is_empty());
    let exclude = get(p, "exclude").filter(|v| !v.v.is_empty());
    let mut num_gpus = num("num_gpus")?;
    if num_gpus.is_none()
        && include.is_none()
        && exclude.is_none()
        && let Some(v) = ctx.env.val("NPROC_PER_NODE")
    {
        // NPROC_PER_NODE (spec §5.5 item 1) stands for --num_gpus.
        num_gpus = Some((v.num::<i64>("expected a number of workers")?, v));
    }

    // 1. The hostfile (missing: this machine's devices only).
    let hostfile = get(p, "hostfile")
        .map(|v| PathBuf::from(v.v))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HOSTFILE));
    let text = if hostfile.is_file() {
        read_small(&hostfile, "hostfile")?
    } else {
        None
    };
    let pool = match text {
        Some(text) => Some(parse_hostfile(&text, &hostfile.display().to_string())?),
        None => {
            if p.given("hostfile") {
                notices.push(format!(
                    "Unable to find hostfile ({}), will proceed with training with local \
                     resources only.",
                    hostfile.display()
                ));
            }
            None
        }
    };

    // 2. CUDA_VISIBLE_DEVICES becomes --include=localhost:<list> without a hostfile.
    if pool.is_none()
        && let Some(cvd) = ctx
            .env
            .raw("CUDA_VISIBLE_DEVICES")
            .filter(|v| !v.is_empty())
    {
        let filtered = include.is_some()
            || exclude.is_some()
            || num_nodes.as_ref().is_some_and(|(n, _)| *n > 1)
            || num_gpus.as_ref().is_some_and(|(n, _)| *n > 0);
        if filtered {
            notices.push(format!(
                "Detected VISIBLE_DEVICES={cvd} but ignoring it because one or several of \
                 --include/--exclude/--num_gpus/--num_nodes cl args were used"
            ));
        } else {
            notices.push(format!(
                "Detected VISIBLE_DEVICES={cvd}: setting --include=localhost:{cvd}"
            ));
            include = Some(Val {
                v: format!("localhost:{cvd}"),
                src: Src::Env("CUDA_VISIBLE_DEVICES".into()),
            });
        }
    }

    // 3.
    let typed_counts = p.given("num_nodes") || p.given("num_gpus");
    if typed_counts && (include.is_some() || exclude.is_some()) {
        return Err(LaunchError::new(
            "Cannot specify num_nodes/gpus with include/exclude",
        ));
    }

    // 4. Without a hostfile: this machine, master 127.0.0.1 (unless NNODES asks for more
    // nodes, spec §5.5 item 1).
    let env_nodes = ctx.env.val("NNODES");
    let have_hostfile = pool.is_some();
    let pool = match pool {
        Some(pool) => pool,
        None => {
            let devices = ctx.probe.cuda_devices;
            if devices == 0 {
                return Err(LaunchError::new(
                    "Unable to proceed, no GPU resources available",
                ));
            }
            if let Some((n, v)) = &num_nodes
                && *n > 1
            {
                return Err(LaunchError(format!(
                    "Num nodes is >1 but no extra nodes available via hostfile ({})",
                    v.show()
                )));
            }
            vec![Host {
                name: "localhost".into(),
                slots: devices,
            }]
        }
    };

    // 5.
    let mut active = select(&pool, include.as_ref(), exclude.as_ref())?;
    // 9.
    if let Some((n, _)) = &num_nodes
        && *n > 0
    {
        active.truncate(usize::try_from(*n).unwrap_or(usize::MAX));
    }
    if let Some((n, _)) = &num_gpus
        && *n > 0
    {
        let n = usize::try_from(*n).unwrap_or(usize::MAX);
        for (_, slots) in &mut active {
            *slots = (0..n).collect();
        }
    }
    if active.is_empty() {
        return Err(LaunchError::new(
            "no hosts or slots are left after --include/--exclude/--num_nodes",
        ));
    }

    // 12. No fan-out: more than one host needs --no_ssh and a node rank on every node.
    let no_ssh = p.given("no_ssh");
    let launcher = get(p, "launcher");
    if !no_ssh && (active.len() > 1 || p.given("force_multi")) {
        if let Some(l) = &launcher
            && !l.v.eq_ignore_ascii_case("pdsh")
        {
            return Err(LaunchError(format!(
                "{} starts the workers of every host through {} from this node; ringctl launch \
                 runs on each node instead: {}",
                l.show(),
                l.v.to_ascii_lowercase(),
                per_node_hint(&active)
            )));
        }
        let why = if active.len() > 1 {
            format!(
                "{} selects {} hosts and DeepSpeed would reach them over ssh",
                hostfile.display(),
                active.len()
            )
        } else {
            "--force_multi starts the workers over ssh".to_string()
        };
        return Err(LaunchError(format!(
            "ringctl launch starts workers on this node only ({why}): {}",
            per_node_hint(&active)
        )));
    }
    if no_ssh {
        for key in [
            "force_multi",
            "launcher",
            "launcher_args",
            "ssh_port",
            "no_ssh_check",
        ] {
            if p.given(key) {
                notices.push(format!("--{key} has no effect with --no_ssh (ignored)"));
            }
        }
    }

    // 10. This node.
    let rank_val = get(p, "node_rank")
        .filter(|v| v.v.trim() != "-1")
        .or_else(|| ctx.env.val("NODE_RANK"));
    let multi_env = !have_hostfile && !no_ssh && env_nodes.is_some();
    let node_rank = if no_ssh {
        let rank = rank_val
            .as_ref()
            .and_then(|v| v.v.trim().parse::<usize>().ok())
            .filter(|r| *r < active.len());
        match rank {
            Some(r) => r,
            None => {
                return Err(LaunchError(format!(
                    "Launching training without ssh, but --node_rank is not set correctly. ({}; \
                     the hosts are {})",
                    rank_val
                        .as_ref()
                        .map_or("--node_rank unset".into(), Val::show),
                    host_list(&active)
                )));
            }
        }
    } else if multi_env {
        match &rank_val {
            Some(v) => v.num("expected a node rank (0, 1, ...)")?,
            None => 0,
        }
    } else {
        if let Some(v) = &rank_val
            && matches!(v.src, Src::Flag(_))
        {
            notices.push(format!(
                "{} is only used with --no_ssh (ignored, as DeepSpeed does)",
                v.show()
            ));
        }
        0
    };
    if no_ssh
        && let Some(at) = active.iter().position(|(n, _)| *n == ctx.probe.hostname)
        && at != node_rank
    {
        notices.push(format!(
            "this host ({}) is entry {at} of the selected hosts but --node_rank is {node_rank}",
            ctx.probe.hostname
        ));
    }

    // Without a hostfile every node is this machine (NNODES: other nodes alike).
    let (_, slots) = &active[if multi_env { 0 } else { node_rank }];
    let nnodes_val;
    let mut plan = LaunchPlan::new(dialect, slots.len(), program);
    if multi_env {
        let ev = env_nodes
            .clone()
            .unwrap_or_else(|| Val::default("NNODES", "1"));
        plan.nnodes = ev.num("expected a node count")?;
        if plan.nnodes == 0 {
            return Err(LaunchError(format!("{}: must be >= 1", ev.show())));
        }
        plan.node_rank = node_rank;
        nnodes_val = ev;
    } else {
        plan.nnodes = active.len();
        plan.node_rank = node_rank;
        plan.node_slots = Some(active.iter().map(|(_, s)| s.len()).collect());
        if let Some(ev) = &env_nodes
            && ev.v.trim().parse::<usize>().ok() != Some(active.len())
        {
            notices.push(format!(
                "{} is ignored: the DeepSpeed world has {} node{}",
                ev.show(),
                active.len(),
                if active.len() == 1 { "" } else { "s" }
            ));
        }
        nnodes_val = Val {
            v: active.len().to_string(),
            src: Src::File {
                path: hostfile.display().to_string(),
                key: "hosts".into(),
            },
        };
    }
    plan.visible_devices = Some(slots.iter().map(usize::to_string).collect());

    // 7. The master.
    let addr_val = get(p, "master_addr")
        .filter(|v| !v.v.is_empty())
        .or_else(|| ctx.env.val("MASTER_ADDR"));
    let master_given;
    if !have_hostfile && !multi_env {
        if let Some(a) = &addr_val
            && a.v != "127.0.0.1"
        {
            notices.push(format!(
                "{} is replaced by 127.0.0.1: without a hostfile DeepSpeed runs on this machine \
                 only",
                a.show()
            ));
        }
        plan.master_addr = "127.0.0.1".into();
        master_given = true;
    } else if let Some(a) = &addr_val {
        plan.master_addr = super::unbracket(&a.v);
        master_given = true;
    } else if have_hostfile {
        let first = &active[0].0;
        if active.len() > 1 {
            notices.push(format!(
                "no --master_addr: using the first host's name {first} (DeepSpeed asks it for \
                 'hostname -I' over ssh)"
            ));
        }
        plan.master_addr = if active.len() > 1 {
            first.clone()
        } else {
            "127.0.0.1".into()
        };
        master_given = true;
    } else {
        master_given = false;
    }
    let port_val = get(p, "master_port").or_else(|| ctx.env.val("MASTER_PORT"));
    if let Some(v) = &port_val {
        plan.master_port = v.port()?;
    }
    // The values taken from LLaMA-Factory's variables, where they were used.
    let master_used = have_hostfile || multi_env;
    ctx.note_layout_env(
        "the DeepSpeed launcher",
        None,
        [
            num_gpus.as_ref().map(|(_, v)| v),
            env_nodes.as_ref().filter(|_| multi_env),
            rank_val.as_ref().filter(|_| no_ssh || multi_env),
            addr_val.as_ref().filter(|_| master_used),
            port_val.as_ref(),
        ],
        &mut notices,
    );

    plan.local_rank_arg = (!p.given("no_local_rank")).then_some("--local_rank");
    plan.worker_env = WorkerEnv::DeepSpeed;
    if plan.local_rank_arg.is_some() && plan.program.is_trainer() {
        plan.local_rank_arg = None;
        notices.push(
            "a recipe reads LOCAL_RANK from the environment: no --local_rank argument is added"
                .to_string(),
        );
    }
    plan.monitor_interval = Duration::from_secs(1);
    plan.max_restarts = super::torchrun::max_restarts(get(p, "max_restarts").as_ref())?;
    if let Some(v) = get(p, "monitor_interval") {
        notices.push(format!(
            "{} has no effect in the DeepSpeed dialect (workers are polled every second)",
            v.show()
        ));
    }
    if let Some(v) = get(p, "enable_each_rank_log")
        && v.v != "None"
    {
        plan.each_rank_log = Some(PathBuf::from(v.v));
    }
    for key in [
        "bind_cores_to_rank",
        "bind_core_list",
        "save_pid",
        "venv_script",
        "comment",
        "account",
        "min_elastic_nodes",
        "max_elastic_nodes",
        "log_level",
        "quiet",
    ] {
        if p.given(key) {
            notices.push(format!(
                "--{key} is not supported by ringctl launch (ignored)"
            ));
        }
    }
    plan.extra_env = vec![
        ("CROSS_RANK".into(), plan.node_rank.to_string()),
        ("CROSS_SIZE".into(), plan.nnodes.to_string()),
        ("LOCAL_SIZE".into(), plan.nproc.to_string()),
    ];
    plan.notices = notices;
    check_layout(
        &mut plan,
        &Layout {
            nnodes: nnodes_val,
            node_rank: rank_val.unwrap_or_else(|| Val::default("--node_rank", "0")),
            master_given,
            master_hint: "--master_addr (or MASTER_ADDR)",
        },
    )?;
    Ok(plan)
}

/// `run the same command with --no_ssh ... (n0: --node_rank=0, n1: --node_rank=1)`.
fn per_node_hint(active: &[(String, Vec<usize>)]) -> String {
    format!(
        "run the same command with --no_ssh and each host's --node_rank on that host ({}), or \
         use 'ringctl submit'",
        hosts_with(active, |i, n| format!("{n}: --node_rank={i}"))
    )
}

/// `0 n0, 1 n1`.
fn host_list(active: &[(String, Vec<usize>)]) -> String {
    hosts_with(active, |i, n| format!("{i} {n}"))
}

/// The hosts with their node ranks, at most eight named.
fn hosts_with(active: &[(String, Vec<usize>)], f: impl Fn(usize, &str) -> String) -> String {
    let mut s: Vec<String> = active
        .iter()
        .take(8)
        .enumerate()
        .map(|(i, (n, _))| f(i, n))
        .collect();
    if active.len() > 8 {
        s.push(format!("... {} more", active.len() - 8));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(v: &[(&str, usize)]) -> Vec<Host> {
        v.iter()
            .map(|(n, s)| Host {
                name: n.to_string(),
                slots: *s,
            })
            .collect()
    }

    #[test]
    fn hostfiles() {
        let text = "# cluster\n\n  n0 slots=4\nn1\tslots=2 # spare\nn2 slots=0\n";
        assert_eq!(
            parse_hostfile(text, "hf").unwrap(),
            hosts(&[("n0", 4), ("n1", 2), ("n2", 0)])
        );
        let e = parse_hostfile("n0 slots=99999999999\n", "hf").unwrap_err();
        assert!(
            e.0.contains("hf:1: n0 has slots=99999999999; at most 1024"),
            "{e}"
        );
        let e = parse_hostfile("n0 slots=4\nn0 slot=4\n", "hf").unwrap_err();
        assert_eq!(
            e.0,
            "hf:2: Hostfile contains a bad entry: n0 slot=4, unable to proceed with launching"
        );
        let e = parse_hostfile("n0 slots=4\n n0 slots=2\n", "hf").unwrap_err();
        assert_eq!(
            e.0,
            "hf:2: Hostfile contains multiple entries for n0, unable to proceed with launching"
        );
        for bad in [
            "n0",
            "n0 slots=",
            "n0 slots=x",
            "slots=4",
            "n0 slots=99999999999999999999999",
        ] {
            assert!(
                parse_hostfile(bad, "hf")
                    .unwrap_err()
                    .0
                    .contains("bad entry"),
                "{bad}"
            );
        }
        let e = parse_hostfile("# nothing\n\n", "hf").unwrap_err();
        assert!(
            e.0.contains("Hostfile is empty or not formatted correctly"),
            "{e}"
        );
    }

    #[test]
    fn include_exclude() {
        let pool = hosts(&[("n0", 4), ("n1", 4)]);
        let inc = |s: &str| select(&pool, Some(&Val::flag("--include", s)), None);
        let exc = |s: &str| select(&pool, None, Some(&Val::flag("--exclude", s)));
        let w = |v: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
            v.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
        };
        assert_eq!(
            inc("n0@n1:0,2").unwrap(),
            w(&[("n0", &[0, 1, 2, 3]), ("n1", &[0, 2])])
        );
        // Hostfile order, merged and sorted slots, slots beyond slots= taken as given.
        assert_eq!(
            inc("n1:3,1@n0:2@n1:1,7").unwrap(),
            w(&[("n0", &[2]), ("n1", &[1, 3, 7])])
        );
        assert_eq!(exc("n0").unwrap(), w(&[("n1", &[0, 1, 2, 3])]));
        assert_eq!(
            exc("n1:0,3").unwrap(),
            w(&[("n0", &[0, 1, 2, 3]), ("n1", &[1, 2])])
        );
        assert!(
            inc("n9")
                .unwrap_err()
                .0
                .contains("Hostname 'n9' not found in hostfile")
        );
        assert!(
            exc("n1:4")
                .unwrap_err()
                .0
                .contains("No slot '4' specified on host 'n1'")
        );
        assert!(
            inc("n1:a")
                .unwrap_err()
                .0
                .contains("'a' is not a slot number")
        );
        assert!(inc("n1:1:2").is_err());
        let both = select(
            &pool,
            Some(&Val::flag("-i", "n0")),
            Some(&Val::flag("-e", "n1")),
        );
        assert_eq!(
            both.unwrap_err().0,
            "include_str and exclude_str are mutually exclusive."
        );
    }
}
