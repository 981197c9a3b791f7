//! torchrun's command line (`torch/distributed/run.py`; spec §1), and the pieces accelerate's
//! torchrun path shares: `-r`/`-t` maps, `--local-ranks-filter`, `--rdzv-conf`, restarts and the
//! monitor interval.

use std::path::PathBuf;
use std::time::Duration;

use super::argv::{self, Opt, Parsed};
use super::{Ctx, How, Layout, Val, check_layout, random_run_id, unbracket};
use crate::plan::{Dialect, LaunchError, LaunchPlan, LogPolicy, Port};

/// torchrun's options (every long one also in its dash spelling), plus `--use-env` from
/// `python -m torch.distributed.launch` (there: no `--local-rank` argument; elsewhere accepted,
/// no effect).
pub(crate) const OPTS: &[Opt] = &[
    Opt::value("nnodes"),
    Opt::value("nproc_per_node"),
    Opt::value("rdzv_backend"),
    Opt::value("rdzv_endpoint"),
    Opt::value("rdzv_id"),
    Opt::value("rdzv_conf"),
    Opt::flag("standalone"),
    Opt::value("max_restarts"),
    Opt::value("monitor_interval"),
    Opt::value("start_method"),
    Opt::value("event_log_handler"),
    Opt::value("role"),
    Opt::flag("module").short("-m"),
    Opt::flag("no_python"),
    Opt::flag("run_path"),
    Opt::value("log_dir"),
    Opt::value("redirects").short("-r"),
    Opt::value("tee").short("-t"),
    Opt::value("local_ranks_filter"),
    Opt::value("node_rank"),
    Opt::value("master_addr"),
    Opt::value("master_port"),
    Opt::value("local_addr"),
    Opt::value("logs_specs"),
    Opt::value("numa_binding"),
    Opt::value("signals_to_handle"),
    Opt::flag("use_env"),
];

/// Options without a `PET_*` fallback (torchrun gives them no `env` action).
const NO_PET: &[&str] = &["logs_specs", "numa_binding", "use_env"];

/// torchrun's default c10d port.
const C10D_PORT: u16 = 29400;

/// A flag, else `PET_<KEY>`.
fn get(p: &Parsed, ctx: &Ctx, key: &str) -> Option<Val> {
    if let Some(v) = p.val(key) {
        return Some(v);
    }
    if NO_PET.contains(&key) {
        return None;
    }
    ctx.env.val(&format!("PET_{}", key.to_ascii_uppercase()))
}

/// A flag, else `PET_<KEY>`, else LLaMA-Factory's variable (spec §5.5 item 1).
fn get_lf(p: &Parsed, ctx: &Ctx, key: &str, lf: &str) -> Option<Val> {
    get(p, ctx, key).or_else(|| ctx.env.val(lf))
}

/// A switch: given, or `PET_<KEY>` set to a non-zero integer (torchrun's `check_env`).
fn switch(p: &Parsed, ctx: &Ctx, key: &str) -> Result<bool, LaunchError> {
    if p.given(key) {
        return Ok(true);
    }
    match ctx.env.val(&format!("PET_{}", key.to_ascii_uppercase())) {
        Some(v) => Ok(v.num::<i64>("expected an integer (0 or 1)")? != 0),
        None => Ok(false),
    }
}

fn others() -> [(&'static str, &'static [Opt]); 2] {
    [
        ("DeepSpeed", super::deepspeed::OPTS),
        ("accelerate", super::accelerate::OPTS),
    ]
}

/// Which of torch's launchers the command line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `torchrun` (`python -m torch.distributed.run`): workers read LOCAL_RANK.
    Torchrun,
    /// The deprecated `python -m torch.distributed.launch`: torchrun's options plus
    /// `--use-env`; without it every worker also gets `--local-rank=N` after the script.
    Launch,
}

/// `torchrun [options] (script | -m module | --no-python cmd | -- cmd) args...`.
pub(crate) fn plan(args: &[String], ctx: &Ctx, form: Form) -> Result<LaunchPlan, LaunchError> {
    let name = match form {
        Form::Torchrun => "torchrun",
        Form::Launch => "torch.distributed.launch",
    };
    let p = argv::parse(args, OPTS, true, name, &others(), ctx.named)?;
    let mut notices = Vec::new();

    let module = switch(&p, ctx, "module")?;
    let no_python = switch(&p, ctx, "no_python")?;
    let run_path = switch(&p, ctx, "run_path")?;
    let how = if run_path {
        if module || no_python {
            notices.push(
                "--run-path takes precedence over --module/--no-python: the script runs with \
                 python -u"
                    .to_string(),
            );
        }
        How::Script
    } else {
        How::from_flags(
            module,
            no_python,
            "Don't use both the '--no-python' flag and the '--module' flag at the same time.",
        )?
    };
    let program = ctx.program(&p, how)?;

    let nproc_val = get_lf(&p, ctx, "nproc_per_node", "NPROC_PER_NODE")
        .unwrap_or_else(|| Val::default("--nproc-per-node", "1"));
    let nproc = nproc_per_node(&nproc_val, ctx)?;

    let nnodes_val =
        get_lf(&p, ctx, "nnodes", "NNODES").unwrap_or_else(|| Val::default("--nnodes", "1:1"));
    let nnodes = parse_nnodes(&nnodes_val)?;

    let backend =
        get(&p, ctx, "rdzv_backend").unwrap_or_else(|| Val::default("--rdzv-backend", "static"));
    let endpoint = get(&p, ctx, "rdzv_endpoint").filter(|v| !v.v.is_empty());
    let rdzv_id = get(&p, ctx, "rdzv_id");
    let standalone = switch(&p, ctx, "standalone")?;
    let rank_val = get_lf(&p, ctx, "node_rank", "NODE_RANK");
    let addr_val = get_lf(&p, ctx, "master_addr", "MASTER_ADDR");
    let port_val = get_lf(&p, ctx, "master_port", "MASTER_PORT");

    let mut plan = LaunchPlan::new(Dialect::Torchrun, nproc, program);
    plan.nnodes = nnodes;
    let node_rank = match &rank_val {
        Some(v) => v.num::<usize>("expected a node rank (0, 1, ...)")?,
        None => 0,
    };

    let master_given;
    if standalone {
        if nnodes != 1 {
            return Err(LaunchError(format!(
                "--standalone is single-node; drop it or use --nnodes 1 (got {})",
                nnodes_val.show()
            )));
        }
        let ignored: Vec<String> = [Some(&backend), endpoint.as_ref(), rdzv_id.as_ref()]
            .into_iter()
            .flatten()
            .filter(|v| v.src.explicit())
            .map(Val::show)
            .collect();
        if !ignored.is_empty() {
            notices.push(format!(
                "--standalone picks its own rendezvous; ignoring {}",
                ignored.join(", ")
            ));
        }
        plan.master_addr = "127.0.0.1".into();
        plan.master_port = Port::Ephemeral;
        plan.run_id = random_run_id();
        plan.node_rank = 0;
        master_given = true;
    } else {
        match backend.v.as_str() {
            "static" => {
                if let Some(ep) = &endpoint {
                    let (host, port) = split_endpoint(ep, None)?;
                    plan.master_addr = host;
                    plan.master_port = port;
                    master_given = true;
                    for v in addr_val.iter().chain(port_val.iter()) {
                        notices.push(format!("{} is overridden by {}", v.show(), ep.show()));
                    }
                } else {
                    if let Some(a) = &addr_val {
                        plan.master_addr = unbracket(&a.v);
                    }
                    if let Some(pv) = &port_val {
                        plan.master_port = pv.port()?;
                    }
                    master_given = addr_val.is_some();
                }
                plan.node_rank = node_rank;
            }
            "c10d" => {
                if let Some(ep) = &endpoint {
                    let (host, port) = split_endpoint(ep, Some(C10D_PORT))?;
                    plan.master_addr = host;
                    plan.master_port = port;
                    master_given = true;
                } else {
                    plan.master_addr = "localhost".into();
                    plan.master_port = Port::Fixed(C10D_PORT);
                    master_given = false;
                    if addr_val.is_some() || port_val.is_some() {
                        notices.push(
                            "master_addr is only used for static rdzv_backend and when \
                             rdzv_endpoint is not specified."
                                .to_string(),
                        );
                    }
                }
                match &rank_val {
                    Some(r) => {
                        plan.node_rank = node_rank;
                        if nnodes > 1 {
                            notices.push(format!(
                                "--rdzv-backend c10d: node ranks come from {}; node 0 serves \
                                 the store at {}",
                                r.src.show("N"),
                                endpoint
                                    .as_ref()
                                    .map_or("localhost:29400", |e| e.v.as_str())
                            ));
                        }
                    }
                    None if nnodes > 1 && endpoint.is_none() => {
                        // Every node would serve its own store at localhost and wait alone.
                        return Err(LaunchError(format!(
                            "{} with {} and no node rank needs --rdzv-endpoint HOST:PORT (the \
                             machine that serves the rendezvous store, the same on every node)",
                            backend.show(),
                            nnodes_val.show()
                        )));
                    }
                    None if nnodes > 1 => {
                        // c10d's own numbering: the launchers take node ranks as they join,
                        // and the one on the endpoint's machine serves the store.
                        plan.join_order = true;
                    }
                    None => plan.node_rank = 0,
                }
            }
            other => {
                return Err(LaunchError(format!(
                    "rendezvous backend '{other}' is not supported (use static or c10d) ({})",
                    backend.show()
                )));
            }
        }
        if let Some(id) = &rdzv_id {
            plan.run_id = id.v.clone();
        }
    }

    plan.max_restarts = max_restarts(get(&p, ctx, "max_restarts").as_ref())?;
    if let Some(v) = get(&p, ctx, "monitor_interval") {
        plan.monitor_interval = monitor_interval(&v)?;
    }
    if let Some(v) = get(&p, ctx, "start_method") {
        if !["spawn", "fork", "forkserver"].contains(&v.v.as_str()) {
            return Err(LaunchError(format!(
                "argument --start-method/--start_method: invalid choice: '{}' (choose from \
                 'spawn', 'fork', 'forkserver')",
                v.v
            )));
        }
        if v.v != "spawn" {
            notices.push(format!(
                "{} has no effect on a script's workers (ignored)",
                v.show()
            ));
        }
    }
    if let Some(v) = get(&p, ctx, "role") {
        plan.role = v.v;
    }
    if let Some(v) = get(&p, ctx, "local_addr") {
        plan.local_addr = Some(v.v);
    }
    if let Some(v) = get(&p, ctx, "rdzv_conf")
        && let Some(t) = rdzv_conf(&v, &mut notices)?
    {
        plan.rdzv_timeout = t;
    }
    plan.logs = logs(
        get(&p, ctx, "log_dir"),
        get(&p, ctx, "redirects"),
        get(&p, ctx, "tee"),
        get(&p, ctx, "local_ranks_filter"),
        nproc,
    )?;
    for key in [
        "event_log_handler",
        "logs_specs",
        "numa_binding",
        "signals_to_handle",
    ] {
        if let Some(v) = get(&p, ctx, key)
            && !(key == "event_log_handler" && v.v == "null")
        {
            notices.push(format!(
                "{} is not supported by ringctl launch (ignored)",
                v.show()
            ));
        }
    }
    match form {
        Form::Launch if !p.given("use_env") => {
            if no_python && !run_path {
                return Err(LaunchError::new(
                    "When using the '--no-python' flag, you must also set the '--use-env' flag.",
                ));
            }
            if plan.program.is_trainer() {
                notices.push(
                    "a recipe reads LOCAL_RANK from the environment: no --local-rank argument \
                     is added"
                        .to_string(),
                );
            } else {
                plan.local_rank_arg = Some("--local-rank");
            }
        }
        Form::Launch => {}
        Form::Torchrun if p.given("use_env") => notices.push(
            "--use-env (torch.distributed.launch) is the only behaviour here: workers read \
             LOCAL_RANK from the environment; no --local-rank argument is added"
                .to_string(),
        ),
        Form::Torchrun => {}
    }
    // MASTER_ADDR/MASTER_PORT count only where they set the master (static, no endpoint).
    let master_used = !standalone && backend.v == "static" && endpoint.is_none();
    ctx.note_layout_env(
        name,
        Some("PET_"),
        [
            Some(&nproc_val),
            Some(&nnodes_val),
            rank_val.as_ref().filter(|_| !standalone),
            addr_val.as_ref().filter(|_| master_used),
            port_val.as_ref().filter(|_| master_used),
        ],
        &mut notices,
    );

    plan.notices = notices;
    check_layout(
        &mut plan,
        &Layout {
            nnodes: nnodes_val,
            node_rank: rank_val.unwrap_or_else(|| Val::default("--node-rank", "0")),
            master_given,
            master_hint: "--master-addr (or --rdzv-endpoint, MASTER_ADDR)",
        },
    )?;
    Ok(plan)
}

/// `--nproc-per-node`: a number, `cpu`, `gpu`, `xpu` or `auto` (spec §1.3).
fn nproc_per_node(v: &Val, ctx: &Ctx) -> Result<usize, LaunchError> {
    let s = v.v.trim();
    if let Ok(n) = s.parse::<i64>() {
        if n < 1 {
            return Err(LaunchError(format!(
                "{}: --nproc-per-node must be >= 1",
                v.show()
            )));
        }
        return usize::try_from(n).map_err(|_| LaunchError(format!("{}: too large", v.show())));
    }
    let gpus = ctx.gpu_count();
    match s {
        "cpu" => Ok(ctx.probe.cpus),
        "gpu" if gpus == 0 => Err(LaunchError::new("Cuda is not available.")),
        "gpu" => Ok(gpus),
        "xpu" => Err(LaunchError::new("Xpu is not available.")),
        "auto" if gpus > 0 => Ok(gpus),
        "auto" => Ok(ctx.probe.cpus),
        _ => Err(LaunchError(format!(
            "Unsupported nproc_per_node value: {s} ({})",
            v.src.show(s)
        ))),
    }
}

/// `--nnodes N` or `MIN:MAX` with MIN = MAX (elastic membership is refused).
fn parse_nnodes(v: &Val) -> Result<usize, LaunchError> {
    let s = v.v.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let num = |x: &str| -> Result<i64, LaunchError> {
        x.trim()
            .parse::<i64>()
            .map_err(|_| LaunchError(format!("{}: expected a node count N or MIN:MAX", v.show())))
    };
    let (min, max) = match parts.as_slice() {
        [n] => (num(n)?, num(n)?),
        [a, b] => (num(a)?, num(b)?),
        _ => {
            return Err(LaunchError(format!(
                "nnodes={s} is not in \"MIN:MAX\" format ({})",
                v.show()
            )));
        }
    };
    if min < 1 {
        return Err(LaunchError(format!(
            "--nnodes must be >= 1 (got {})",
            v.show()
        )));
    }
    if min > max {
        return Err(LaunchError(format!(
            "{}: the minimum node count is above the maximum",
            v.show()
        )));
    }
    if min != max {
        return Err(LaunchError(format!(
            "elastic membership (MIN:MAX nodes, {}) is not supported by ringctl launch; use a \
             fixed node count and --max-restarts",
            v.show()
        )));
    }
    usize::try_from(min).map_err(|_| LaunchError(format!("{}: too large", v.show())))
}

/// `host[:port]` (`[v6]:port`); `default_port` for c10d, else the port is required.
fn split_endpoint(v: &Val, default_port: Option<u16>) -> Result<(String, Port), LaunchError> {
    let s = v.v.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, tail)) = rest.split_once(']') else {
            return Err(LaunchError(format!(
                "{}: an IPv6 endpoint must be [ADDR]:PORT",
                v.show()
            )));
        };
        (h.to_string(), tail.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            _ => (s.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(LaunchError(format!("{}: the host is missing", v.show())));
    }
    let port = match (port, default_port) {
        (Some(p), _) => Val {
            v: p.to_string(),
            src: v.src.clone(),
        }
        .port()?,
        (None, Some(d)) => Port::Fixed(d),
        (None, None) => {
            return Err(LaunchError(format!(
                "port is missing in endpoint: {s}. Try to specify --master-port ({})",
                v.show()
            )));
        }
    };
    Ok((host, port))
}

/// `--max-restarts`: at least 0.
pub(crate) fn max_restarts(v: Option<&Val>) -> Result<u32, LaunchError> {
    let Some(v) = v else { return Ok(0) };
    let n: i64 = v.num("expected a number of restarts")?;
    if n < 0 {
        return Err(LaunchError(format!(
            "{}: --max-restarts must be >= 0",
            v.show()
        )));
    }
    u32::try_from(n).map_err(|_| LaunchError(format!("{}: too large", v.show())))
}

/// `--monitor-interval` in seconds (a positive float).
pub(crate) fn monitor_interval(v: &Val) -> Result<Duration, LaunchError> {
    let s: f64 = v.num("expected seconds")?;
    if !(s.is_finite() && s > 0.0 && s <= 3600.0) {
        return Err(LaunchError(format!(
            "{}: the monitor interval must be between 0 and 3600 seconds",
            v.show()
        )));
    }
    Ok(Duration::from_secs_f64(s))
}

/// `--rdzv-conf k=v,...` (torchrun's `_parse_rendezvous_config`): `timeout` (or c10d's
/// `join_timeout`) becomes the rendezvous timeout; other keys are noted and ignored.
pub(crate) fn rdzv_conf(
    v: &Val,
    notices: &mut Vec<String>,
) -> Result<Option<Duration>, LaunchError> {
    let s = v.v.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let mut timeout = None;
    let mut join_timeout = None;
    let mut ignored = Vec::new();
    for kv in s.split(',') {
        let (key, value) = match kv.split_once('=') {
            Some((k, val)) => (k.trim(), Some(val.trim())),
            None => (kv.trim(), None),
        };
        if key.is_empty() {
            return Err(LaunchError(format!(
                "The rendezvous configuration string must be in format \
                 <key1>=<value1>,...,<keyN>=<valueN>. ({})",
                v.show()
            )));
        }
        let Some(value) = value.filter(|x| !x.is_empty()) else {
            return Err(LaunchError(format!(
                "The rendezvous configuration option '{key}' must have a value specified. ({})",
                v.show()
            )));
        };
        let secs = || -> Result<u64, LaunchError> {
            value.parse::<u64>().map_err(|_| {
                LaunchError(format!(
                    "The rendezvous configuration option '{key}' does not represent a valid \
                     integer value. ({})",
                    v.show()
                ))
            })
        };
        match key {
            "timeout" => timeout = Some(secs()?),
            "join_timeout" => join_timeout = Some(secs()?),
            _ => ignored.push(key.to_string()),
        }
    }
    if !ignored.is_empty() {
        notices.push(format!(
            "rendezvous options not used by ringctl launch (ignored): {}",
            ignored.join(", ")
        ));
    }
    Ok(timeout.or(join_timeout).map(Duration::from_secs))
}

/// The log policy from `--log-dir`, `-r`, `-t`, `--local-ranks-filter` (spec §1.5).
pub(crate) fn logs(
    dir: Option<Val>,
    redirects: Option<Val>,
    tee: Option<Val>,
    filter: Option<Val>,
    nproc: usize,
) -> Result<LogPolicy, LaunchError> {
    let std_of = |v: Option<Val>| match v {
        Some(v) => std_map(&v, nproc),
        None => Ok(vec![0; nproc]),
    };
    Ok(LogPolicy {
        dir: dir.filter(|d| !d.v.is_empty()).map(|d| PathBuf::from(d.v)),
        redirects: std_of(redirects)?,
        tee: std_of(tee)?,
        console_ranks: match filter {
            Some(f) => ranks_filter(&f)?,
            None => None,
        },
    })
}

/// A `--redirects`/`--tee` value: `0`..`3` for every local rank, or a map
/// `local_rank:value,...` (multi-digit ranks accepted; ranks not named get 0). A rank this node
/// does not run is refused.
pub(crate) fn std_map(v: &Val, nproc: usize) -> Result<Vec<u8>, LaunchError> {
    let s = v.v.trim();
    let bad = || {
        LaunchError(format!(
            "{}: expected 0 (none), 1 (stdout), 2 (stderr), 3 (both), or a map of local rank to \
             one of those like 0:3,1:1",
            v.show()
        ))
    };
    let digit = |x: &str| -> Option<u8> {
        match x {
            "0" | "1" | "2" | "3" => x.parse().ok(),
            _ => None,
        }
    };
    if !s.contains(':') {
        return digit(s).map(|d| vec![d; nproc]).ok_or_else(bad);
    }
    let mut out = vec![0; nproc];
    for item in s.split(',') {
        let (rank, value) = item.split_once(':').ok_or_else(bad)?;
        if rank.is_empty() || !rank.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let value = digit(value).ok_or_else(bad)?;
        let rank: usize = rank.parse().map_err(|_| bad())?;
        if rank >= nproc {
            return Err(LaunchError(format!(
                "{} names local rank {rank} but this node runs {nproc} worker{} (0..{})",
                v.show(),
                if nproc == 1 { "" } else { "s" },
                nproc.saturating_sub(1)
            )));
        }
        out[rank] = value;
    }
    Ok(out)
}

/// `--local-ranks-filter 0,1`: the local ranks whose output reaches the console.
pub(crate) fn ranks_filter(v: &Val) -> Result<Option<Vec<usize>>, LaunchError> {
    if v.v.is_empty() {
        return Ok(None);
    }
    let mut ranks = Vec::new();
    for item in v.v.split(',') {
        let r: usize = item.trim().parse().map_err(|_| {
            LaunchError(format!(
                "--local_ranks_filter must be a comma-separated list of integers e.g. \
                 --local_ranks_filter=0,1,2 ({})",
                v.show()
            ))
        })?;
        if !ranks.contains(&r) {
            ranks.push(r);
        }
    }
    ranks.sort_unstable();
    Ok(Some(ranks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_maps() {
        let r = |v: &str, n| std_map(&Val::flag("-r", v), n);
        assert_eq!(r("3", 2).unwrap(), vec![3, 3]);
        assert_eq!(r("0", 1).unwrap(), vec![0]);
        assert_eq!(r("0:3,1:1", 4).unwrap(), vec![3, 1, 0, 0]);
        assert_eq!(r("1:2", 4).unwrap(), vec![0, 2, 0, 0]);
        // The last entry for a rank wins, as in torchrun's dict.
        assert_eq!(r("0:1,0:2", 1).unwrap(), vec![2]);
        // Multi-digit local ranks (torchrun's regex takes single digits only).
        let mut want = vec![0; 12];
        want[10] = 3;
        assert_eq!(r("10:3", 12).unwrap(), want);
        let e = r("4:3", 4).unwrap_err();
        assert!(
            e.0.contains("-r 4:3 names local rank 4 but this node runs 4 workers (0..3)"),
            "{e}"
        );
        for bad in [
            "5", "4:", ":3", "0:4", "a", "0:1,", "-1:1", "0:1;1:2", "", "01",
        ] {
            let e = r(bad, 4).unwrap_err();
            assert!(e.0.contains("expected 0 (none)"), "{bad}: {e}");
        }
    }

    #[test]
    fn filters_and_conf() {
        let f = |v: &str| ranks_filter(&Val::flag("--local-ranks-filter", v));
        assert_eq!(f("1,0,1").unwrap(), Some(vec![0, 1]));
        assert_eq!(f("").unwrap(), None);
        assert!(
            f("a")
                .unwrap_err()
                .0
                .starts_with("--local_ranks_filter must be a comma-separated list of integers")
        );
        let mut notes = Vec::new();
        let c = |v: &str, n: &mut Vec<String>| rdzv_conf(&Val::flag("--rdzv-conf", v), n);
        assert_eq!(
            c("timeout=60,read_timeout=30", &mut notes).unwrap(),
            Some(Duration::from_secs(60))
        );
        assert!(notes[0].contains("read_timeout"));
        assert_eq!(
            c("join_timeout=5", &mut notes).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert!(c("timeout", &mut notes).unwrap_err().0.contains(
            "The rendezvous configuration option 'timeout' must have a value specified."
        ));
        assert!(
            c("=1", &mut notes)
                .unwrap_err()
                .0
                .contains("must be in format <key1>=<value1>")
        );
        assert!(
            c("timeout=x", &mut notes)
                .unwrap_err()
                .0
                .contains("valid integer")
        );
    }

    #[test]
    fn endpoints_and_nnodes() {
        let ep = |v: &str, d| split_endpoint(&Val::flag("--rdzv-endpoint", v), d);
        assert_eq!(
            ep("10.0.0.1:29400", None).unwrap(),
            ("10.0.0.1".to_string(), Port::Fixed(29400))
        );
        assert_eq!(
            ep("h", Some(29400)).unwrap(),
            ("h".to_string(), Port::Fixed(29400))
        );
        assert_eq!(
            ep("[::1]:5", None).unwrap(),
            ("::1".to_string(), Port::Fixed(5))
        );
        assert!(
            ep("h", None)
                .unwrap_err()
                .0
                .contains("port is missing in endpoint: h")
        );
        assert!(ep("h:70000", None).is_err());
        let nn = |v: &str| parse_nnodes(&Val::flag("--nnodes", v));
        assert_eq!(nn("2").unwrap(), 2);
        assert_eq!(nn("3:3").unwrap(), 3);
        assert!(nn("1:4").unwrap_err().0.contains("elastic membership"));
        assert!(nn("0").unwrap_err().0.contains("--nnodes must be >= 1"));
        assert!(
            nn("1:2:3")
                .unwrap_err()
                .0
                .contains("nnodes=1:2:3 is not in \"MIN:MAX\" format")
        );
    }
}
