//! The four command-line dialects, each read into a [`crate::LaunchPlan`]
//! (docs/design/launch-spec.md §1–§5).
//!
//! [`parse`] takes what follows `ringctl launch`. An optional leading word picks the dialect, so
//! a team can paste its command: `torchrun` (or `python -m torch.distributed.run`), `python -m
//! torch.distributed.launch`, `deepspeed`, `accelerate launch`, `llamafactory-cli train` /
//! `lmf train`. Without one, a first word that is a training config (`.yaml`, `.yml`, `.json`)
//! with no options before it is LLaMA-Factory's form (its NNODES/NODE_RANK/MASTER_ADDR/
//! MASTER_PORT variables); otherwise the options decide: any DeepSpeed-only option makes it
//! DeepSpeed, any accelerate-only one accelerate, else torchrun; options of two dialects are
//! refused.
//!
//! `--`: without a leading word, `-- CMD ARGS` runs CMD as a command (ringctl's own form). With
//! one, `--` only ends the options, as in the named tool's argparse: `torchrun -- train.py`
//! runs `python -u train.py`, and `-m -- pkg.mod` a module.
//!
//! In every dialect NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and NPROC_PER_NODE are honoured
//! below the dialect's own flags (torchrun's `PET_*` and accelerate's config file come first).
//! When the tool was named and a value comes from one of them, a notice says so (the tool
//! itself would not read it).
//! Planning reads files (a DeepSpeed hostfile, an accelerate config, each at most 1 MiB) and
//! nothing else: the machine comes from the [`Probe`], the environment from `env`.

mod accelerate;
mod argv;
mod deepspeed;
mod llamafactory;
mod torchrun;

use std::io::Read;
use std::path::Path;

use crate::plan::{LaunchError, LaunchPlan, Port, Probe, Program};

/// Reads a `ringctl launch` command line (the words after `launch`) into this node's plan.
/// `env` is the launcher's environment (a test passes its own); `probe` describes the machine.
pub fn parse(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    probe: &Probe,
) -> Result<LaunchPlan, LaunchError> {
    let ctx = Ctx {
        env: Env(env),
        probe,
        named: false,
    };
    let mut plan = dispatch(args, &ctx)?;
    // Per-local-rank log settings for every dialect (none redirected unless asked).
    for v in [&mut plan.logs.redirects, &mut plan.logs.tee] {
        v.resize(plan.nproc, 0);
    }
    Ok(plan)
}

fn dispatch(args: &[String], ctx: &Ctx) -> Result<LaunchPlan, LaunchError> {
    let first = args.first().map(String::as_str);
    let second = args.get(1).map(String::as_str);
    // The tool named by a leading word: `--` then has its argparse meaning.
    let named = Ctx {
        env: Env(ctx.env.0),
        probe: ctx.probe,
        named: true,
    };
    if let [py, m, module, rest @ ..] = args
        && m == "-m"
        && is_python(py)
    {
        match module.as_str() {
            "torch.distributed.run" => {
                return torchrun::plan(rest, &named, torchrun::Form::Torchrun);
            }
            "torch.distributed.launch" => {
                return torchrun::plan(rest, &named, torchrun::Form::Launch);
            }
            _ => {}
        }
    }
    match (first, second) {
        (Some("torchrun"), _) => torchrun::plan(&args[1..], &named, torchrun::Form::Torchrun),
        (Some("deepspeed"), _) => deepspeed::plan(&args[1..], &named),
        (Some("accelerate"), Some("launch")) => accelerate::plan(&args[2..], &named),
        (Some("accelerate-launch"), _) => accelerate::plan(&args[1..], &named),
        (Some("accelerate"), other) => Err(LaunchError(format!(
            "'accelerate {}' cannot be launched: ringctl launch takes 'accelerate launch ...'",
            other.unwrap_or("")
        ))),
        (Some("llamafactory-cli" | "lmf"), Some("train")) => llamafactory::plan(&args[2..], &named),
        (Some(cli @ ("llamafactory-cli" | "lmf")), other) => Err(LaunchError(format!(
            "'{cli} {}' cannot be launched: ringctl launch runs '{cli} train RECIPE.yaml \
             [key=value ...]' (or '{cli} train --key value ...') only",
            other.unwrap_or("")
        ))),
        (None, _) => Err(LaunchError::new(
            "nothing to launch: give a training script, a recipe (.yaml), or -- COMMAND",
        )),
        (Some(word), _) if is_config_file(word) => llamafactory::plan(args, ctx),
        _ => detect(args, ctx),
    }
}

/// Picks the dialect from the options (spec §5.1) and reads the command line with it.
fn detect(args: &[String], ctx: &Ctx) -> Result<LaunchPlan, LaunchError> {
    const NAMES: [&str; 3] = ["torchrun", "DeepSpeed", "accelerate"];
    let tables: [(&str, &[argv::Opt], bool); 3] = [
        (NAMES[0], torchrun::OPTS, true),
        (NAMES[1], deepspeed::OPTS, true),
        (NAMES[2], accelerate::OPTS, false),
    ];
    let seen = argv::scan(args, &tables);
    // The dialects that accept every option so far; the first option that empties the set is
    // reported with an earlier option of another dialect.
    let mut possible = vec![0usize, 1, 2];
    for (j, (spelled, owners)) in seen.iter().enumerate() {
        let next: Vec<usize> = possible
            .iter()
            .copied()
            .filter(|d| owners.contains(d))
            .collect();
        if next.is_empty() {
            let earlier = seen[..j]
                .iter()
                .find(|(_, o)| !o.iter().any(|d| owners.contains(d)));
            let theirs = owners.first().map_or("", |d| NAMES[*d]);
            return Err(LaunchError(match earlier {
                Some((other, other_owners)) => format!(
                    "{other} ({}) and {spelled} ({theirs}) cannot be mixed: use one launcher's \
                     options (put 'torchrun', 'deepspeed' or 'accelerate launch' first to say which)",
                    NAMES[other_owners[0]]
                ),
                None => format!(
                    "{spelled} ({theirs}) cannot be mixed with the options before it: use one \
                     launcher's options"
                ),
            }));
        }
        possible = next;
    }
    match possible.first() {
        Some(1) => deepspeed::plan(args, ctx),
        Some(2) => accelerate::plan(args, ctx),
        _ => torchrun::plan(args, ctx, torchrun::Form::Torchrun),
    }
}

/// `python`, `python3`, `python3.12`, `/usr/bin/python3`: an interpreter before `-m`.
fn is_python(word: &str) -> bool {
    Path::new(word)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| {
            n.strip_prefix("python")
                .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        })
}

/// LLaMA-Factory's layout variables, which `ringctl launch` honours in every dialect.
const LF_LAYOUT: [&str; 5] = [
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// A training config, run by the trainer as a recipe: `.yaml`, `.yml` or `.json`.
pub(crate) fn is_config_file(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    !word.starts_with('-')
        && (lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json"))
}

/// What a front-end may consult: the environment and the machine.
pub(crate) struct Ctx<'a> {
    pub env: Env<'a>,
    pub probe: &'a Probe,
    /// The tool was named by a leading word (`torchrun ...`): `--` only ends its options, and
    /// values taken from LLaMA-Factory's variables are pointed out.
    pub named: bool,
}

impl Ctx<'_> {
    /// When the tool was named, one notice per value that came from NNODES, NODE_RANK,
    /// NPROC_PER_NODE, MASTER_ADDR or MASTER_PORT, which `tool` itself does not read
    /// (`reads`: what it reads instead, e.g. `PET_`-prefixed names).
    pub(crate) fn note_layout_env<'v>(
        &self,
        tool: &str,
        reads: Option<&str>,
        vals: impl IntoIterator<Item = Option<&'v Val>>,
        notices: &mut Vec<String>,
    ) {
        if !self.named {
            return;
        }
        for v in vals.into_iter().flatten() {
            let Src::Env(name) = &v.src else { continue };
            if !LF_LAYOUT.contains(&name.as_str()) {
                continue;
            }
            let instead = reads.map_or_else(String::new, |r| format!(" (it reads {r}{name})"));
            let line = format!(
                "{} is taken from the environment: {tool} itself does not read {name}{instead}; \
                 ringctl launch honours it below the command line",
                v.show()
            );
            if !notices.contains(&line) {
                notices.push(line);
            }
        }
    }

    /// CUDA devices a worker would see: the probe's count, bounded by the entries of
    /// `CUDA_VISIBLE_DEVICES` when it is set (an empty value hides every device).
    pub(crate) fn gpu_count(&self) -> usize {
        match self.env.raw("CUDA_VISIBLE_DEVICES") {
            Some(list) => {
                let n = list.split(',').filter(|d| !d.trim().is_empty()).count();
                n.min(self.probe.cuda_devices)
            }
            None => self.probe.cuda_devices,
        }
    }

    /// The worker program (spec §5.1 "Program forms").
    pub(crate) fn program(&self, p: &argv::Parsed, how: How) -> Result<Program, LaunchError> {
        let Some(first) = p.program.clone() else {
            return Err(LaunchError::new(
                "the following arguments are required: training_script (a script, a recipe \
                 .yaml, or -- COMMAND)",
            ));
        };
        let args = p.args.clone();
        if p.dashdash || how == How::Exec {
            let mut argv = vec![first];
            argv.extend(args);
            return Ok(Program::Exec(argv));
        }
        let python = self
            .env
            .get("PYTHON_EXEC")
            .unwrap_or_else(|| "python3".to_string());
        Ok(match how {
            How::Module => Program::Module {
                python,
                module: first,
                args,
            },
            _ if is_config_file(&first) => Program::Recipe {
                file: first,
                overrides: args,
            },
            _ => Program::Script {
                python,
                script: first,
                args,
            },
        })
    }
}

/// How the first positional is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// A script (or a recipe, by its suffix).
    Script,
    /// `-m`: a module.
    Module,
    /// `--no-python`: a command.
    Exec,
}

impl How {
    /// From the `--module` and `--no_python` flags; both together is an error, worded as the
    /// dialect words it (`conflict`).
    pub(crate) fn from_flags(
        module: bool,
        no_python: bool,
        conflict: &'static str,
    ) -> Result<How, LaunchError> {
        match (module, no_python) {
            (true, true) => Err(LaunchError::new(conflict)),
            (false, true) => Ok(How::Exec),
            (true, false) => Ok(How::Module),
            (false, false) => Ok(How::Script),
        }
    }
}

/// The launcher's environment. Empty values count as unset (`NNODES= ringctl launch ...`),
/// except where [`Env::raw`] is asked (CUDA_VISIBLE_DEVICES="" hides every device).
pub(crate) struct Env<'a>(pub &'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    pub(crate) fn raw(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<String> {
        self.raw(name).filter(|v| !v.trim().is_empty())
    }

    pub(crate) fn val(&self, name: &str) -> Option<Val> {
        self.get(name).map(|v| Val {
            v: v.trim().to_string(),
            src: Src::Env(name.to_string()),
        })
    }

    /// LLaMA-Factory's `is_env_enabled`: `true`, `y` or `1`, any case.
    pub(crate) fn enabled(&self, name: &str, default: bool) -> bool {
        match self.get(name) {
            Some(v) => matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "y" | "1"),
            None => default,
        }
    }
}

/// Where a value came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Src {
    /// A flag, as typed (`--nproc_per_node`).
    Flag(String),
    /// An environment variable.
    Env(String),
    /// A key of a config file.
    File { path: String, key: String },
    /// The dialect's default (named by its flag).
    Default(String),
}

impl Src {
    /// `--nnodes 2`, `NNODES=2`, `num_machines: 2 (c.yaml)`, `--nnodes 1 (default)`.
    pub(crate) fn show(&self, v: &str) -> String {
        match self {
            Src::Flag(f) => format!("{f} {v}"),
            Src::Env(n) => format!("{n}={v}"),
            Src::File { path, key } => format!("{key}: {v} ({path})"),
            Src::Default(f) => format!("{f} {v} (default)"),
        }
    }

    pub(crate) fn explicit(&self) -> bool {
        !matches!(self, Src::Default(_))
    }
}

/// A value and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Val {
    pub v: String,
    pub src: Src,
}

impl Val {
    /// A value given on the command line, as spelled there (`--nnodes`, `-r`).
    pub(crate) fn flag(spelled: &str, v: &str) -> Val {
        Val {
            v: v.to_string(),
            src: Src::Flag(spelled.to_string()),
        }
    }

    pub(crate) fn default(flag: &str, v: &str) -> Val {
        Val {
            v: v.to_string(),
            src: Src::Default(flag.to_string()),
        }
    }

    pub(crate) fn show(&self) -> String {
        self.src.show(&self.v)
    }

    /// The value as a number, or an error naming where it came from.
    pub(crate) fn num<T: std::str::FromStr>(&self, what: &str) -> Result<T, LaunchError> {
        self.v
            .trim()
            .parse()
            .map_err(|_| LaunchError(format!("{}: {what}", self.show())))
    }

    /// A port: `Fixed`, or `Ephemeral` for 0 (a free port, one node only).
    pub(crate) fn port(&self) -> Result<Port, LaunchError> {
        let p: u16 = self.num("expected a port number (0..65535)")?;
        Ok(if p == 0 {
            Port::Ephemeral
        } else {
            Port::Fixed(p)
        })
    }
}

/// The node layout a front-end settled on, with the sources for the checks every dialect makes
/// (spec §5.3).
pub(crate) struct Layout {
    pub nnodes: Val,
    pub node_rank: Val,
    /// The master address was given (flag, variable, file, hostfile), not defaulted.
    pub master_given: bool,
    /// How to give it, for the error: `--master-addr (or --rdzv-endpoint, MASTER_ADDR)`.
    pub master_hint: &'static str,
}

/// The checks every dialect shares: node rank in range, a master address on the other nodes,
/// a fixed port across nodes, at least one worker.
pub(crate) fn check_layout(plan: &mut LaunchPlan, layout: &Layout) -> Result<(), LaunchError> {
    let n = plan.nnodes;
    if plan.node_rank >= n {
        return Err(LaunchError(format!(
            "{} is out of range for {} (0..{})",
            layout.node_rank.show(),
            layout.nnodes.show(),
            n - 1
        )));
    }
    if n > 1 && plan.master_port == Port::Ephemeral {
        return Err(LaunchError(format!(
            "{} with a free port (port 0): the other nodes could not find it; give a fixed \
             master port",
            layout.nnodes.show()
        )));
    }
    if n > 1 && !layout.master_given {
        if plan.node_rank > 0 {
            return Err(LaunchError(format!(
                "{} needs the address of node 0 on node {}: pass {}",
                layout.nnodes.show(),
                plan.node_rank,
                layout.master_hint
            )));
        }
        plan.notices.push(format!(
            "{} with the default master address {}: the other nodes need this node's real \
             address ({})",
            layout.nnodes.show(),
            plan.master_addr,
            layout.master_hint
        ));
    }
    if plan.nproc == 0 {
        return Err(LaunchError::new(
            "this node would run no workers (0 processes per node)",
        ));
    }
    Ok(())
}

/// A host name or IP from `host`, `[v6]`; brackets are dropped.
pub(crate) fn unbracket(host: &str) -> String {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string()
}

/// A run id nobody else has (torchrun's `--standalone` uses a uuid4).
pub(crate) fn random_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Files a front-end reads (hostfiles, accelerate configs) are bounded.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a small text file: `Ok(None)` if there is no such file.
pub(crate) fn read_small(path: &Path, what: &str) -> Result<Option<String>, LaunchError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LaunchError(format!(
                "cannot read {what} {}: {e}",
                path.display()
            )));
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| LaunchError(format!("cannot read {what} {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LaunchError(format!(
            "{what} {} is larger than 1 MiB; refusing to read it",
            path.display()
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| LaunchError(format!("{what} {} is not UTF-8 text", path.display())))
}
