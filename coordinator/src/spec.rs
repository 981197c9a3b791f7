//! Job specs: what an operator submits.
//!
//! `ringctl submit FILE` accepts a job spec (a mapping with `train:` or `command:`) or a bare
//! training config (then the job defaults apply, as `llamafactory-cli train config.yaml` does).
//! The client inlines the training config and the files it names ([`load_submission`]); the
//! coordinator validates the whole spec again with [`JobSpec::validate`] before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ringmaster_config::yaml;
use ringmaster_config::{CommandLine, TrainConfig};
use serde::{Deserialize, Serialize};

/// Largest spec (with its inlined files) a coordinator accepts.
pub const MAX_SPEC_BYTES: usize = 4 << 20;

/// Environment variables the launcher owns; a job's `env:` may not set them.
pub const RESERVED_ENV: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "NNODES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "RINGMASTER_RESTART_COUNT",
    "RINGMASTER_JOB_ID",
    "RINGMASTER_JOB_NAME",
    "RINGMASTER_NODE",
    "RINGMASTER_NODE_ADDR",
    "RINGMASTER_WORK_DIR",
    "RINGMASTER_AGENT_ROOT",
    "RINGMASTER_GENERATION",
    "RINGMASTER_COORDINATOR",
    "RINGMASTER_RESUME_FROM",
    "RINGMASTER_WORKER_TOKEN",
    "RINGMASTER_TLS_CA",
    "RINGMASTER_TLS_DOMAIN",
];

/// A job as submitted. Field names are part of the interface contract (DESIGN.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A training config: a path (client side only) or, once inlined, a mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<serde_json::Value>,
    /// Any program, started with torchrun-style environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<String>,
    #[serde(default)]
    pub max_restarts: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Pause before each restart: `initial` after the first failure, doubling per further
    /// failure in a row, up to `max` (default 1s doubling to 60s). A duration alone (`5s`)
    /// sets `initial`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_backoff: Option<RestartBackoff>,
    /// The directory workers start in (absolute; each agent checks it against its allowed
    /// roots). Default: the generation's directory, `<work-dir>/<job>/gen-<g>`. ringctl
    /// resolves a training config's relative paths against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

/// How long a failed job waits before each restart (Kubernetes' CrashLoopBackOff, in small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    /// The pause after the first failure; `0s` restarts at once every time.
    pub initial: std::time::Duration,
    /// The longest pause.
    pub max: std::time::Duration,
}

impl Default for RestartBackoff {
    fn default() -> RestartBackoff {
        RestartBackoff {
            initial: std::time::Duration::from_secs(1),
            max: std::time::Duration::from_secs(60),
        }
    }
}

/// The longest `restart_backoff.max` a spec may set.
pub const MAX_RESTART_BACKOFF: std::time::Duration = std::time::Duration::from_secs(3600);

impl RestartBackoff {
    /// The pause before the restart that follows the `failures`-th failure in a row (1 for the
    /// first): `initial * 2^(failures-1)`, at most `max`.
    pub fn delay(&self, failures: u32) -> std::time::Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }
}

impl Serialize for RestartBackoff {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry(
            "initial",
            &humantime::format_duration(self.initial).to_string(),
        )?;
        m.serialize_entry("max", &humantime::format_duration(self.max).to_string())?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for RestartBackoff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RestartBackoff, D::Error> {
        struct V;
        fn duration<E: serde::de::Error>(
            field: &str,
            text: &str,
        ) -> Result<std::time::Duration, E> {
            humantime::parse_duration(text.trim()).map_err(|e| {
                E::custom(format!(
                    "restart_backoff{field}: '{text}' is not a duration like 1s or 500ms ({e})"
                ))
            })
        }
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RestartBackoff;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration (the initial pause, e.g. 5s) or a mapping {initial, max}")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RestartBackoff, E> {
                Err(E::custom(format!(
                    "restart_backoff: {v} has no unit; write a duration like {v}s"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RestartBackoff, E> {
                Err(E::custom(format!(
                    "restart_backoff: {v} has no unit; write a duration like 1s"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RestartBackoff, E> {
                Err(E::custom(format!(
                    "restart_backoff: {v} has no unit; write a duration like 1500ms"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RestartBackoff, E> {
                let initial = duration("", v)?;
                let max = RestartBackoff::default().max.max(initial);
                Ok(RestartBackoff { initial, max })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RestartBackoff, A::Error> {
                use serde::de::Error;
                let mut b = RestartBackoff::default();
                let mut max_given = false;
                while let Some(key) = map.next_key::<String>()? {
                    let text: String = map
                        .next_value()
                        .map_err(|e| A::Error::custom(format!("restart_backoff.{key}: {e}")))?;
                    match key.as_str() {
                        "initial" => b.initial = duration(".initial", &text)?,
                        "max" => {
                            b.max = duration(".max", &text)?;
                            max_given = true;
                        }
                        other => {
                            return Err(A::Error::custom(format!(
                                "restart_backoff: unknown key `{other}` (expected `initial`, `max`)"
                            )));
                        }
                    }
                }
                if !max_given {
                    b.max = b.max.max(b.initial);
                }
                Ok(b)
            }
        }
        d.deserialize_any(V)
    }
}

/// Why a spec was refused. Each message names the field or file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: not valid YAML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("{origin}: training config: {source}")]
    Train {
        origin: String,
        source: ringmaster_config::ConfigError,
    },
}

impl SpecError {
    fn invalid(origin: &str, message: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            origin: origin.to_owned(),
            message: message.into(),
        }
    }
}

/// True for names safe as one path component and as an id: `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`, at most 63 characters.
pub fn is_safe_name(s: &str) -> bool {
    // The agent applies the same rule before it builds any path from a job id.
    ringmaster_common::names::is_safe_component(s)
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl JobSpec {
    /// Validates a spec whose `train:` is inlined. `origin` names the spec in messages.
    ///
    /// # Errors
    /// The first problem found, naming the field.
    pub fn validate(&self, origin: &str) -> Result<Option<TrainConfig>, SpecError> {
        if let Some(name) = &self.name
            && !is_safe_name(name)
        {
            return Err(SpecError::invalid(
                origin,
                format!(
                    "name '{name}': use 1-63 characters of A-Z a-z 0-9 . _ - (not starting with . or -)"
                ),
            ));
        }
        let train = match (&self.train, &self.command) {
            (Some(_), Some(_)) => {
                return Err(SpecError::invalid(
                    origin,
                    "give either `train:` or `command:`, not both",
                ));
            }
            (None, None) => {
                return Err(SpecError::invalid(
                    origin,
                    "a job spec needs `train:` or `command:`",
                ));
            }
            (None, Some(cmd)) => {
                if cmd.is_empty() || cmd[0].trim().is_empty() {
                    return Err(SpecError::invalid(
                        origin,
                        "`command:` must be a non-empty list whose first item is the program",
                    ));
                }
                if cmd.iter().any(|a| a.contains('\0')) {
                    return Err(SpecError::invalid(
                        origin,
                        "`command:` items may not contain NUL bytes",
                    ));
                }
                None
            }
            (Some(serde_json::Value::String(p)), None) => {
                return Err(SpecError::invalid(
                    origin,
                    format!("`train: {p}` was not inlined (submit the spec with ringctl)"),
                ));
            }
            (Some(v), None) => {
                Some(
                    TrainConfig::from_value(v).map_err(|source| SpecError::Train {
                        origin: origin.to_owned(),
                        source,
                    })?,
                )
            }
        };
        if self.include.is_some() && self.exclude.is_some() {
            return Err(SpecError::invalid(
                origin,
                "`include:` and `exclude:` are mutually exclusive",
            ));
        }
        for (field, f) in [("include", &self.include), ("exclude", &self.exclude)] {
            if let Some(f) = f {
                if self.nodes.is_some() || self.gpus_per_node.is_some() {
                    return Err(SpecError::invalid(
                        origin,
                        format!("`{field}:` cannot be combined with `nodes:` or `gpus_per_node:`"),
                    ));
                }
                ringmaster_hostfile::parse_filter(f)
                    .map_err(|e| SpecError::invalid(origin, format!("`{field}:` {e}")))?;
            }
        }
        if self.nodes == Some(0) {
            return Err(SpecError::invalid(origin, "`nodes:` must be at least 1"));
        }
        if self.gpus_per_node == Some(0) {
            return Err(SpecError::invalid(
                origin,
                "`gpus_per_node:` must be at least 1",
            ));
        }
        if self.max_restarts > 10_000 {
            return Err(SpecError::invalid(
                origin,
                format!("`max_restarts: {}` is above 10000", self.max_restarts),
            ));
        }
        if let Some(b) = &self.restart_backoff {
            let show = |d| humantime::format_duration(d).to_string();
            if b.initial > b.max {
                return Err(SpecError::invalid(
                    origin,
                    format!(
                        "`restart_backoff:` initial {} is above max {}",
                        show(b.initial),
                        show(b.max)
                    ),
                ));
            }
            if b.max > MAX_RESTART_BACKOFF {
                return Err(SpecError::invalid(
                    origin,
                    format!(
                        "`restart_backoff:` max {} is above {}",
                        show(b.max),
                        show(MAX_RESTART_BACKOFF)
                    ),
                ));
            }
        }
        for (k, v) in &self.env {
            if !is_env_name(k) {
                return Err(SpecError::invalid(
                    origin,
                    format!("`env:` key '{k}' is not a valid environment variable name"),
                ));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(SpecError::invalid(
                    origin,
                    format!("`env:` may not set {k}: the launcher sets it for every rank"),
                ));
            }
            if v.contains('\0') {
                return Err(SpecError::invalid(
                    origin,
                    format!("`env:` value of {k} contains a NUL byte"),
                ));
            }
        }
        self.check_paths(train.as_ref(), origin)?;
        Ok(train)
    }

    /// The submit-time rules for the paths a job writes to (`workdir:` and the training
    /// config's `output_dir`): absolute, no `..`, not a system directory. Whether a path lies
    /// inside the allowed roots is for each agent to say: only it knows its roots.
    ///
    /// # Errors
    /// The first path refused, naming its field.
    pub fn check_paths(&self, train: Option<&TrainConfig>, origin: &str) -> Result<(), SpecError> {
        use ringmaster_config::paths::check_submitted;
        let output_dir = train.and_then(|t| t.output_dir.as_deref());
        for (field, path) in [
            ("workdir", self.workdir.as_deref()),
            ("output_dir", output_dir),
        ] {
            if let Some(p) = path {
                check_submitted(field, p).map_err(|e| SpecError::invalid(origin, e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// Checks the DeepSpeed JSON and FSDP/accelerate YAML files a training config names, as sent
/// with the job: unknown keys and impossible settings are refused at submit time. (Batch-size
/// contradictions need the world size and are checked when the job's ranks start.)
///
/// # Errors
/// A missing file, or one that does not parse as what its key says, naming the key and path.
pub fn validate_files(
    train: &TrainConfig,
    files: &BTreeMap<String, Vec<u8>>,
    origin: &str,
) -> Result<(), SpecError> {
    let get = |key: &str, path: &str| -> Result<String, SpecError> {
        let bytes = files.get(path).ok_or_else(|| {
            SpecError::invalid(
                origin,
                format!("`{key}: {path}`: the file was not sent with the job"),
            )
        })?;
        String::from_utf8(bytes.clone())
            .map_err(|_| SpecError::invalid(origin, format!("`{key}: {path}`: not UTF-8 text")))
    };
    if let Some(path) = &train.deepspeed {
        let text = get("deepspeed", path)?;
        ringmaster_config::deepspeed::DeepSpeedConfig::from_json(&text)
            .map_err(|e| SpecError::invalid(origin, format!("`deepspeed: {path}`: {e}")))?;
    }
    if let Some(path) = &train.fsdp_config {
        let text = get("fsdp_config", path)?;
        ringmaster_config::accelerate::FsdpConfig::from_yaml(&text)
            .map_err(|e| SpecError::invalid(origin, format!("`fsdp_config: {path}`: {e}")))?;
    }
    if let Some(path) = &train.accelerate_config {
        let text = get("accelerate_config", path)?;
        let acc = ringmaster_config::AccelerateConfig::from_yaml(&text)
            .map_err(|e| SpecError::invalid(origin, format!("`accelerate_config: {path}`: {e}")))?;
        if let Some(ds) = acc.deepspeed_file() {
            let text = get("deepspeed_config_file", ds)?;
            ringmaster_config::deepspeed::DeepSpeedConfig::from_json(&text).map_err(|e| {
                SpecError::invalid(
                    origin,
                    format!("`accelerate_config: {path}` → deepspeed_config_file {ds}: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

/// A spec ready to send: `train:` inlined, plus the files its training config names.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub spec: JobSpec,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Parses YAML (or JSON) text; a leading UTF-8 byte-order mark is skipped, and a number that
/// is not finite (`.nan`, `.inf`), which JSON cannot hold and would read as null, is refused
/// naming its key.
fn parse_yaml(text: &str, origin: &str) -> Result<serde_json::Value, SpecError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let syntax = |e: serde_yaml::Error| SpecError::Syntax {
        origin: origin.to_owned(),
        message: e.to_string(),
    };
    // Through serde_yaml's own value first: a key given twice is an error here.
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(syntax)?;
    if let Some(at) = yaml::non_finite(&doc, "") {
        return Err(SpecError::invalid(
            origin,
            format!("{at}: {}", yaml::NON_FINITE),
        ));
    }
    serde_yaml::from_value(doc).map_err(syntax)
}

fn read(path: &Path) -> Result<Vec<u8>, SpecError> {
    std::fs::read(path).map_err(|source| SpecError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a job spec or a bare training config from `path`, inlines the training config and
/// the files it names, and validates the result.
///
/// The files a spec names (`train:`, DeepSpeed / FSDP / accelerate files) resolve against the
/// spec's directory, then the working directory. The training config's own relative paths
/// (`model_name_or_path`, `dataset_dir`, `output_dir`...) are made absolute against the
/// directory the job starts from: the spec's `workdir:` when given, else the working
/// directory, as `llamafactory-cli` reads them relative to where it runs
/// ([`ringmaster_config::paths::absolutize_config`]).
///
/// # Errors
/// Unreadable files, bad YAML, unknown keys, bad values: each naming the file and the field.
pub fn load_submission(path: &Path) -> Result<Submission, SpecError> {
    load_submission_with(Some(path), &CommandLine::default())
}

/// As [`load_submission`], with LLaMA-Factory's command-line overrides (`key=value`,
/// `--key value`) merged over the training config; with no file, the training config is the
/// overrides alone.
///
/// # Errors
/// As [`load_submission`]; overrides on a spec that runs a command instead of training.
pub fn load_submission_with(
    path: Option<&Path>,
    overrides: &CommandLine,
) -> Result<Submission, SpecError> {
    let Some(path) = path else {
        return submission_from_text_with("{}", "command line", Path::new("."), overrides);
    };
    let bytes = read(path)?;
    let origin = path.display().to_string();
    let text =
        String::from_utf8(bytes).map_err(|_| SpecError::invalid(&origin, "not UTF-8 text"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    submission_from_text_with(&text, &origin, base, overrides)
}

/// As [`load_submission`], from text already read.
///
/// # Errors
/// As [`load_submission`].
pub fn submission_from_text(
    text: &str,
    origin: &str,
    base: &Path,
) -> Result<Submission, SpecError> {
    submission_from_text_with(text, origin, base, &CommandLine::default())
}

/// As [`submission_from_text`], with command-line overrides of the training config.
///
/// # Errors
/// As [`load_submission_with`].
pub fn submission_from_text_with(
    text: &str,
    origin: &str,
    base: &Path,
    overrides: &CommandLine,
) -> Result<Submission, SpecError> {
    let value = parse_yaml(text, origin)?;
    let map = match &value {
        serde_json::Value::Object(m) => m,
        serde_json::Value::Null => return Err(SpecError::invalid(origin, "the file is empty")),
        _ => {
            return Err(SpecError::invalid(
                origin,
                "expected a mapping (a job spec or a training config)",
            ));
        }
    };
    let is_spec = map.contains_key("train") || map.contains_key("command");
    let mut spec: JobSpec = if is_spec {
        serde_json::from_value(value.clone())
            .map_err(|e| SpecError::invalid(origin, format!("job spec: {e}")))?
    } else {
        JobSpec {
            train: Some(value.clone()),
            ..JobSpec::default()
        }
    };
    let mut train_origin = origin.to_owned();
    let mut train_base = base.to_owned();
    if let Some(serde_json::Value::String(p)) = &spec.train {
        let tpath = resolve(base, p);
        let bytes = read(&tpath)?;
        train_origin = tpath.display().to_string();
        let text = String::from_utf8(bytes)
            .map_err(|_| SpecError::invalid(&train_origin, "not UTF-8 text"))?;
        spec.train = Some(parse_yaml(&text, &train_origin)?);
        train_base = tpath.parent().unwrap_or(Path::new(".")).to_owned();
    }
    if !overrides.is_empty() {
        match &mut spec.train {
            Some(serde_json::Value::Object(map)) => overrides.apply(map),
            _ => {
                return Err(SpecError::invalid(
                    origin,
                    "key=value and --key overrides apply to a training config, and this spec \
                     has no `train:` mapping",
                ));
            }
        }
        if train_origin != "command line" {
            train_origin = format!("{train_origin} + command line");
        }
    }
    if let Some(serde_json::Value::Object(map)) = &mut spec.train {
        let start = match spec.workdir.as_deref().map(Path::new) {
            Some(w) if w.is_absolute() => w.to_owned(),
            // A relative workdir is refused by `validate` below.
            _ => std::env::current_dir().map_err(|e| {
                SpecError::invalid(origin, format!("reading the current directory: {e}"))
            })?,
        };
        ringmaster_config::paths::absolutize_config(map, &start);
    }
    let mut files = BTreeMap::new();
    if let Some(train) = &spec.train {
        let cfg = TrainConfig::from_value(train).map_err(|source| SpecError::Train {
            origin: train_origin.clone(),
            source,
        })?;
        for f in cfg.referenced_files() {
            let p = resolve(&train_base, &f);
            files.insert(f, read(&p)?);
        }
        // The DeepSpeed file an accelerate config names travels with the job too.
        if let Some(a) = &cfg.accelerate_config {
            let text = String::from_utf8_lossy(&files[a]).into_owned();
            if let Ok(acc) = ringmaster_config::AccelerateConfig::from_yaml(&text)
                && let Some(f) = acc.deepspeed_file()
            {
                let p = resolve(&train_base, f);
                files.insert(f.to_owned(), read(&p)?);
            }
        }
    }
    if let Some(train) = spec.validate(origin)? {
        validate_files(&train, &files, origin)?;
    }
    Ok(Submission { spec, files })
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        return p.to_owned();
    }
    let beside = base.join(p);
    if beside.exists() {
        beside
    } else {
        p.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(text: &str) -> Result<Submission, SpecError> {
        submission_from_text(text, "job.yaml", Path::new("."))
    }

    /// A byte-order mark is skipped; `.nan`/`.inf` are refused by key, not read as null.
    #[test]
    fn a_bom_is_skipped_and_non_finite_numbers_are_refused() {
        let s = sub("\u{feff}command: [\"true\"]\n").unwrap();
        assert_eq!(s.spec.command.unwrap()[0], "true");
        let e = sub("learning_rate: .inf\noutput_dir: /tmp/o\n").unwrap_err();
        assert!(
            e.to_string().contains("learning_rate: not a finite number"),
            "{e}"
        );
        let e = sub("command: [\"true\"]\nrestart_backoff: {initial: .nan}\n").unwrap_err();
        assert!(e.to_string().contains("restart_backoff.initial"), "{e}");
    }

    /// Every variable the launch contract gives a worker is refused in `env:` (the agent
    /// would drop the job's value without a word).
    #[test]
    fn every_contract_variable_is_reserved() {
        let devices = vec!["0".to_owned()];
        let names = ringmaster_launch::env::contract_env(&ringmaster_launch::env::Contract {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            node_rank: 0,
            nnodes: 1,
            master_addr: "h",
            master_port: 1,
            visible_devices: Some(&devices),
            restart_count: 0,
            max_restarts: 0,
            run_id: "r",
            job_name: "j",
            generation: 0,
            role: "default",
        });
        for (k, _) in names {
            assert!(RESERVED_ENV.contains(&k.as_str()), "{k} is not reserved");
        }
        let e = sub("command: [\"true\"]\nenv: {ROLE_NAME: x}\n").unwrap_err();
        assert!(e.to_string().contains("may not set ROLE_NAME"), "{e}");
    }

    #[test]
    fn command_spec_parses() {
        let s = sub("name: envdump\ncommand: [sh, -c, env]\nnodes: 2\nmax_restarts: 3\nenv: {NCCL_DEBUG: INFO}\n")
            .unwrap();
        assert_eq!(s.spec.name.as_deref(), Some("envdump"));
        assert_eq!(s.spec.command.as_ref().unwrap()[0], "sh");
        assert_eq!(s.spec.max_restarts, 3);
        assert_eq!(s.spec.env["NCCL_DEBUG"], "INFO");
    }

    #[test]
    fn command_line_overrides_merge_over_the_training_config() {
        let cl = CommandLine::parse(&[
            "r.yaml".to_string(),
            "learning_rate=1e-3".into(),
            "--bf16".into(),
        ])
        .unwrap();
        let s = submission_from_text_with(
            "stage: sft\nlearning_rate: 1.0e-4\n",
            "r.yaml",
            Path::new("."),
            &cl,
        )
        .unwrap();
        let train = s.spec.train.unwrap();
        assert_eq!(train["learning_rate"], 1e-3);
        assert_eq!(train["bf16"], true);
        assert_eq!(train["stage"], "sft");
        // A command spec has no training config to override.
        let err =
            submission_from_text_with("command: [sh, -c, env]\n", "job.yaml", Path::new("."), &cl)
                .unwrap_err();
        assert!(err.to_string().contains("no `train:`"), "{err}");
        // An override that makes the config invalid is named with the command line.
        let cl = CommandLine::parse(&["r.yaml".to_string(), "stage=dpo".into()]).unwrap();
        let err =
            submission_from_text_with("stage: sft\n", "r.yaml", Path::new("."), &cl).unwrap_err();
        assert!(err.to_string().contains("r.yaml + command line"), "{err}");
    }

    #[test]
    fn bare_training_config_becomes_a_train_job() {
        let s = sub("stage: sft\nlearning_rate: 1.0e-4\n").unwrap();
        assert!(s.spec.command.is_none());
        assert_eq!(s.spec.train.unwrap()["stage"], "sft");
    }

    #[test]
    fn inline_train_mapping_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ds.json"),
            b"{\"zero_optimization\":{\"stage\":3}}",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t.yaml"),
            "stage: sft\ndeepspeed: ds.json\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("job.yaml"), "train: t.yaml\nnodes: 1\n").unwrap();
        let s = load_submission(&dir.path().join("job.yaml")).unwrap();
        assert_eq!(s.spec.train.as_ref().unwrap()["deepspeed"], "ds.json");
        assert!(s.files["ds.json"].starts_with(b"{\"zero"));
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("- a\n", "expected a mapping"),
            ("command: [a]\ntrain: {stage: sft}\n", "not both"),
            ("command: []\n", "non-empty"),
            ("command: [a]\nbogus: 1\n", "unknown field `bogus`"),
            ("command: [a]\nname: a/b\n", "name 'a/b'"),
            (
                "command: [a]\ninclude: a\nexclude: b\n",
                "mutually exclusive",
            ),
            ("command: [a]\ninclude: a\nnodes: 1\n", "cannot be combined"),
            ("command: [a]\ninclude: 'a@'\n", "`include:`"),
            ("command: [a]\nnodes: 0\n", "`nodes:`"),
            ("command: [a]\ngpus_per_node: 0\n", "`gpus_per_node:`"),
            ("command: [a]\nenv: {RANK: '3'}\n", "may not set RANK"),
            (
                "command: [a]\nenv: {'1X': a}\n",
                "not a valid environment variable",
            ),
            (
                "stage: sft\nlearnin_rate: 1\n",
                "unknown key(s): learnin_rate",
            ),
            ("train: {stage: xx}\n", "`stage`"),
            ("train: missing.yaml\n", "missing.yaml"),
            ("command: [a\n", "not valid YAML"),
            (
                "command: [a]\nworkdir: rel/dir\n",
                "`workdir: rel/dir`: must be an absolute",
            ),
            (
                "command: [a]\nworkdir: /etc\n",
                "`workdir: /etc` is a system directory",
            ),
            (
                "stage: sft\noutput_dir: /etc/x\n",
                "`output_dir: /etc/x` is a system directory",
            ),
            ("stage: sft\noutput_dir: /usr/../etc/x\n", "`..` components"),
            (
                "train: {stage: sft, output_dir: /proc/1}\n",
                "`output_dir: /proc/1`",
            ),
        ];
        for (text, want) in cases {
            let err = sub(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
            assert!(
                err.starts_with("job.yaml") || err.contains("missing.yaml"),
                "{err}"
            );
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn accelerate_configs_travel_with_their_deepspeed_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let acc = "distributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n\
                   deepspeed_config:\n  deepspeed_config_file: ds.json\n";
        std::fs::write(dir.path().join("acc.yaml"), acc).unwrap();
        std::fs::write(
            dir.path().join("ds.json"),
            b"{\"zero_optimization\": {\"stage\": 2}}",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t.yaml"),
            "stage: sft\naccelerate_config: acc.yaml\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("job.yaml"), "train: t.yaml\n").unwrap();
        let s = load_submission(&dir.path().join("job.yaml")).unwrap();
        let names: Vec<&str> = s.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["acc.yaml", "ds.json"]);
        // A bad key in the DeepSpeed file is refused at submit, naming the file.
        std::fs::write(
            dir.path().join("ds.json"),
            b"{\"zero_optimization\": {\"stage\": 2, \"bogus_knob\": 1}}",
        )
        .unwrap();
        let err = load_submission(&dir.path().join("job.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("accelerate_config: acc.yaml")
                && err.contains("ds.json")
                && err.contains("bogus_knob"),
            "{err}"
        );
        // With deepspeed: as well, the training config is refused naming both.
        std::fs::write(
            dir.path().join("t.yaml"),
            "stage: sft\naccelerate_config: acc.yaml\ndeepspeed: ds.json\n",
        )
        .unwrap();
        let err = load_submission(&dir.path().join("job.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("accelerate_config (acc.yaml)") && err.contains("deepspeed (ds.json)"),
            "{err}"
        );
    }

    #[test]
    fn deepspeed_files_are_checked_at_submit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ds.json"),
            b"{\"zero_optimization\": {\"stage\": 3, \"bogus_knob\": 1}}",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t.yaml"),
            "stage: sft\ndeepspeed: ds.json\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("job.yaml"), "train: t.yaml\n").unwrap();
        let err = load_submission(&dir.path().join("job.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("deepspeed: ds.json") && err.contains("bogus_knob"),
            "{err}"
        );
        // The seed examples all pass.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for f in std::fs::read_dir(&root).unwrap().flatten() {
            let p = f.path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("llama3_") && name.ends_with(".yaml") {
                // Their paths are relative to the repository root, where users run ringctl.
                let text = std::fs::read_to_string(&p).unwrap();
                let repo = root.parent().unwrap();
                submission_from_text(&text, &name, repo).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }

    #[test]
    fn restart_backoff_forms_and_limits() {
        let b = |text: &str| sub(&format!("command: [a]\n{text}")).map(|s| s.spec.restart_backoff);
        let secs = std::time::Duration::from_secs;
        let ms = std::time::Duration::from_millis;
        assert_eq!(b("").unwrap(), None);
        assert_eq!(
            b("restart_backoff: 5s\n").unwrap(),
            Some(RestartBackoff {
                initial: secs(5),
                max: secs(60)
            })
        );
        // A plain initial above the default max raises the max with it.
        assert_eq!(b("restart_backoff: 2m\n").unwrap().unwrap().max, secs(120));
        assert_eq!(
            b("restart_backoff: {initial: 100ms, max: 2s}\n").unwrap(),
            Some(RestartBackoff {
                initial: ms(100),
                max: secs(2)
            })
        );
        assert_eq!(
            b("restart_backoff: {max: 10s}\n").unwrap(),
            Some(RestartBackoff {
                initial: secs(1),
                max: secs(10)
            })
        );
        assert_eq!(b("restart_backoff: 0s\n").unwrap().unwrap().initial, ms(0));
        for (text, want) in [
            ("restart_backoff: soon\n", "'soon' is not a duration"),
            (
                "restart_backoff: {initial: 1s, maxx: 2s}\n",
                "unknown key `maxx`",
            ),
            (
                "restart_backoff: {initial: 10s, max: 2s}\n",
                "initial 10s is above max 2s",
            ),
            ("restart_backoff: {max: 2h}\n", "max 2h is above 1h"),
            ("restart_backoff: 5\n", "5 has no unit"),
        ] {
            let err = b(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        // It survives the round trip through the job record (JSON).
        let spec = sub("command: [a]\nrestart_backoff: {initial: 250ms, max: 3s}\n")
            .unwrap()
            .spec;
        let back: JobSpec = serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn restart_backoff_doubles_up_to_max() {
        let b = RestartBackoff::default();
        let got: Vec<u64> = (1..=9).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.delay(u32::MAX).as_secs(), 60);
        assert_eq!(b.delay(0).as_secs(), 1);
        let none = RestartBackoff {
            initial: std::time::Duration::ZERO,
            max: std::time::Duration::ZERO,
        };
        assert_eq!(none.delay(50), std::time::Duration::ZERO);
    }

    #[test]
    fn relative_training_paths_are_made_absolute_against_the_start_directory() {
        let s = sub("workdir: /srv/proj\ntrain: {stage: sft, output_dir: out/../run, model_name_or_path: models/m}\n")
            .unwrap();
        let t = s.spec.train.unwrap();
        assert_eq!(t["output_dir"], "/srv/proj/run");
        assert_eq!(t["model_name_or_path"], "/srv/proj/models/m");
        // Without workdir: the directory ringctl runs in (as llamafactory-cli reads them).
        let s = sub("stage: sft\noutput_dir: output/quickstart\n").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            s.spec.train.unwrap()["output_dir"],
            cwd.join("output/quickstart").display().to_string()
        );
    }

    #[test]
    fn the_coordinator_refuses_relative_and_climbing_paths() {
        // What a raw API submission (no ringctl in between) may carry.
        let spec = |out: &str| JobSpec {
            train: Some(serde_json::json!({"stage": "sft", "output_dir": out})),
            ..JobSpec::default()
        };
        assert!(spec("/data/run").validate("job spec").is_ok());
        for (out, want) in [
            ("out", "absolute"),
            ("../../x", "absolute"),
            ("/a/../../etc/x", "`..`"),
            ("/dev/shm/x", "system directory"),
        ] {
            let e = spec(out).validate("job spec").unwrap_err().to_string();
            assert!(
                e.starts_with("job spec: `output_dir: ") && e.contains(want),
                "{out}: {e}"
            );
        }
    }

    #[test]
    fn safe_names() {
        for ok in ["a", "job-1", "llama3.sft_2"] {
            assert!(is_safe_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "-x",
            ".hidden",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!is_safe_name(bad), "{bad}");
        }
    }
}
