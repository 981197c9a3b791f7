//! Sharded, reshardable checkpoints: `checkpoint-<step>/` holds a manifest, one safetensors
//! shard per shard-group rank (its owned slice of every flat unit: fp32 parameters and AdamW
//! moments) with its sha256, and a `COMMITTED` marker written last. Rank 0 also writes the
//! model as a Hugging Face directory beside them (for `trainer generate` and transformers).
//!
//! Writing: every rank of the first replica writes `rank-<r>.safetensors` (temp name, fsync,
//! rename) and `rank-<r>.json` (its sha256 and size); after a barrier rank 0 writes
//! `manifest.json` and then `COMMITTED`. A directory without the marker is never resumed from.
//!
//! Resuming: any world size and plan. Every rank reads the shards one at a time, checks each
//! file's sha256 against the manifest, and keeps the elements its new layout needs (all
//! parameters below ZeRO-3, its shard at ZeRO-3, the moments of its owned shard). The data
//! position, the learning-rate schedule and dropout seeds are functions of the step; the fp16
//! loss scaler's state is in the manifest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ringmaster_model::hf::{RawTensor, read_safetensors, save_tensors, write_atomic};
use ringmaster_model::{DType, ParamStore};
use ringmaster_optim::scaler::DynamicLossScaler;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::engine::{Engine, TrainBackend, UnitState};
use super::setup::Setup;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The marker written once every shard and the manifest are on disk.
pub const COMMITTED: &str = "COMMITTED";
/// Manifest format version.
pub const FORMAT: u32 = 1;

/// A tensor's place in its flat unit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorPlace {
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset of its first element in the unit.
    pub offset: usize,
}

/// One flat unit of the saved layout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnitEntry {
    pub unit: usize,
    /// Elements without padding.
    pub numel: usize,
    /// Elements of each rank's shard.
    pub shard: usize,
    pub tensors: Vec<TensorPlace>,
}

/// One rank's shard file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardFile {
    /// Shard index (the rank in the shard group).
    pub shard: usize,
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Ranks of the run that saved it, and of its shard group.
    pub world: usize,
    pub shard_group: usize,
    /// The plan's name and ZeRO stage.
    pub plan: String,
    pub stage: u8,
    /// Samples per optimizer step and the sampler's seed (the data position is a function of
    /// the step for these two).
    pub global_batch: usize,
    pub seed: u64,
    /// What the shards hold: `full` (the model's parameters) or `lora` (the adapters).
    pub trainable: String,
    /// AdamW steps taken (fewer than `step` when fp16 steps were skipped).
    pub adam_step: u64,
    /// The fp16 dynamic loss scaler, when used.
    pub scaler: Option<DynamicLossScaler>,
    /// Saved with `save_only_model`: the shards hold the parameters only (no AdamW moments,
    /// no loss scale); a resume from it restarts the optimizer.
    #[serde(default)]
    pub weights_only: bool,
    pub units: Vec<UnitEntry>,
    pub shards: Vec<ShardFile>,
}

/// What a run saves besides the engine's state.
pub struct SaveInfo<'a> {
    pub step: u64,
    pub world: usize,
    pub plan: String,
    pub global_batch: usize,
    pub seed: u64,
    pub trainable: &'a str,
    pub scaler: Option<DynamicLossScaler>,
    /// `save_only_model`: parameters only (see [`Manifest::weights_only`]).
    pub weights_only: bool,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn shard_name(k: usize) -> String {
    format!("rank-{k:05}.safetensors")
}

/// Opens `dir` for a save: creates it, and removes the commit marker of an earlier save into
/// the same directory before anything in it changes. Every rank calls it before [`save`].
pub fn begin(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match std::fs::remove_file(dir.join(COMMITTED)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow!("removing {}: {e}", dir.join(COMMITTED).display()))
        }
        _ => Ok(()),
    }
}

/// Removes `dir` after a failed save, unless it is committed (best effort: the save's error is
/// what gets reported).
pub fn discard(dir: &Path) {
    if dir.is_dir()
        && !dir.join(COMMITTED).exists()
        && let Err(e) = std::fs::remove_dir_all(dir)
    {
        eprintln!(
            "trainer: warning: removing the uncommitted {}: {e}",
            dir.display()
        );
    }
}

/// How long one checkpoint took on this rank (rank 0's are reported with the commit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SaveTimings {
    /// From the start of the save until this rank's shard was written, read back and hashed
    /// (rank 0: the Hugging Face weights too).
    pub save: Duration,
    /// From this rank's shard written until the commit marker was down (rank 0: the wait for
    /// every other shard, the manifest and the marker; other ranks: the wait at the barrier).
    pub commit: Duration,
}

/// Takes the checkpoint of step `info.step` into `output_dir/checkpoint-STEP` on every rank:
/// the Hugging Face weights (rank 0), every shard, the manifest and the commit marker; then
/// rank 0 reports the commit and prunes to `save_total_limit` (never `protect`, the checkpoint
/// the run resumed from). A failed save removes the uncommitted directory and leaves the
/// committed ones as they were.
pub fn save_step<B: TrainBackend>(
    setup: &mut Setup,
    eng: &mut Engine<'_, B>,
    rank: usize,
    info: &SaveInfo<'_>,
    progress: Option<&crate::progress::ProgressReporter>,
    protect: Option<&Path>,
) -> Result<PathBuf> {
    let dir = setup.output_dir.join(format!("checkpoint-{}", info.step));
    let start = Instant::now();
    let saved = (|| -> Result<Instant> {
        begin(&dir)?;
        eng.gather_full(setup.weights().trainable())?;
        if rank == 0 {
            super::save_model(setup, &dir)?;
        }
        eng.release_full(setup.weights().trainable());
        save(&dir, eng, setup.weights().trainable(), rank, info)
    })();
    let written = match saved {
        Ok(at) => at,
        Err(e) => {
            // A full disk, an unwritable directory or a lost peer: rank 0 removes the uncommitted
            // directory so that a full disk is not left full for the next attempt.
            if rank == 0 {
                discard(&dir);
            }
            return Err(e.context(format!(
                "saving the checkpoint of step {} (earlier checkpoints are untouched)",
                info.step
            )));
        }
    };
    let timings = SaveTimings {
        save: written.saturating_duration_since(start),
        commit: written.elapsed(),
    };
    if rank == 0 {
        if let Some(p) = progress {
            p.checkpoint_committed(info.step, &dir, timings);
        }
        if let Some(keep) = setup.cfg.save_total_limit {
            for d in prune(&setup.output_dir, keep as usize, protect)? {
                eprintln!("trainer: save_total_limit {keep}: removed {}", d.display());
            }
        }
    }
    Ok(dir)
}

/// Writes this rank's shard and, on rank 0 after every shard is written, the manifest and the
/// commit marker. Every rank calls it at the same step. Returns when this rank's shard was
/// written (the rest of the call is the commit).
pub fn save<B: TrainBackend>(
    dir: &Path,
    eng: &mut Engine<'_, B>,
    trainable: &ParamStore,
    rank: usize,
    info: &SaveInfo<'_>,
) -> Result<Instant> {
    // Saving again into a directory (a resumed run reaching the same step): the old marker goes
    // before any shard changes, so the directory is never committed with mixed shards. Every
    // rank removes it before writing; rank 0 writes the new one only after the barrier.
    begin(dir)?;
    let k = eng.shard_rank();
    if eng.writes_shard() {
        let state = eng.export_state(trainable);
        let mut tensors = Vec::with_capacity(3 * state.len());
        let kinds = if info.weights_only { 1 } else { 3 };
        for (u, s) in state.iter().enumerate() {
            for (what, v) in [
                ("param", &s.param),
                ("exp_avg", &s.exp_avg),
                ("exp_avg_sq", &s.exp_avg_sq),
            ]
            .into_iter()
            .take(kinds)
            {
                tensors.push((
                    format!("unit{u}.{what}"),
                    RawTensor::encode(v, vec![v.len()], DType::F32),
                ));
            }
        }
        let name = shard_name(k);
        save_tensors(
            dir,
            &name,
            &format!("{name}.index.json"),
            &format!("rank-{k:05}-part"),
            &tensors,
            u64::MAX,
        )
        .with_context(|| format!("writing checkpoint shard {}", dir.join(&name).display()))?;
        drop(tensors);
        let bytes = std::fs::read(dir.join(&name))
            .with_context(|| format!("reading back {}", dir.join(&name).display()))?;
        let entry = ShardFile {
            shard: k,
            file: name,
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        };
        write_atomic(
            &dir.join(format!("rank-{k:05}.json")),
            (serde_json::to_string(&entry)? + "\n").as_bytes(),
        )?;
    }
    let written = Instant::now();
    // The collective error stays in the chain: a peer that timed out here is a collective
    // timeout (the trainer's exit code), not a failed checkpoint.
    eng.barrier()
        .with_context(|| format!("checkpoint {}: waiting for every shard", dir.display()))?;
    if rank != 0 {
        return Ok(written);
    }
    let layout = eng.layout();
    let mut shards = Vec::with_capacity(layout.group);
    for k in 0..layout.group {
        let p = dir.join(format!("rank-{k:05}.json"));
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        shards.push(
            serde_json::from_str::<ShardFile>(&text)
                .with_context(|| format!("parsing {}", p.display()))?,
        );
    }
    let specs = trainable.specs();
    let manifest = Manifest {
        format: FORMAT,
        step: info.step,
        world: info.world,
        shard_group: layout.group,
        plan: info.plan.clone(),
        stage: eng.stage(),
        global_batch: info.global_batch,
        seed: info.seed,
        trainable: info.trainable.to_owned(),
        adam_step: if info.weights_only {
            0
        } else {
            eng.adam_step()
        },
        scaler: if info.weights_only {
            None
        } else {
            info.scaler.clone()
        },
        weights_only: info.weights_only,
        units: layout
            .units
            .iter()
            .map(|u| UnitEntry {
                unit: u.unit,
                numel: u.numel,
                shard: u.shard,
                tensors: u
                    .tensors
                    .clone()
                    .zip(&u.offsets)
                    .map(|(t, &offset)| TensorPlace {
                        name: specs[t].name.clone(),
                        shape: specs[t].shape.clone(),
                        offset,
                    })
                    .collect(),
            })
            .collect(),
        shards,
    };
    write_atomic(
        &dir.join(MANIFEST),
        (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes(),
    )?;
    write_atomic(&dir.join(COMMITTED), format!("{}\n", info.step).as_bytes())?;
    Ok(written)
}

/// Reads and checks a committed checkpoint's manifest. Every shard `file` entry must be a plain
/// file name inside `dir` (no `/`, no `..`, not absolute, no symlink leading out of `dir`): a
/// manifest is data anyone who can write the output dir controls, and resume and export read
/// whatever it names.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("checkpoint {}: no such directory", dir.display())
        }
        Err(e) => bail!("checkpoint {}: {e}", dir.display()),
        Ok(m) if !m.is_dir() => bail!(
            "checkpoint {}: not a directory (a checkpoint is an output_dir/checkpoint-<step> \
             directory)",
            dir.display()
        ),
        Ok(_) => {}
    }
    if !dir.join(COMMITTED).is_file() {
        bail!(
            "checkpoint {} is not committed (no {COMMITTED} marker: a rank never finished \
             writing it)",
            dir.display()
        );
    }
    let p = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    if m.format != FORMAT {
        bail!(
            "{}: format {} (this build reads {FORMAT})",
            p.display(),
            m.format
        );
    }
    for s in &m.shards {
        ringmaster_config::paths::file_in_dir(dir, &s.file).map_err(|why| {
            anyhow!(
                "{}: shard {} entry `file: {}` {why}",
                p.display(),
                s.shard,
                s.file
            )
        })?;
    }
    Ok(m)
}

/// The step in a `checkpoint-<step>` directory's name.
pub fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// The committed `checkpoint-<step>` directories under `output_dir`, newest first.
pub fn committed(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
            && entry.path().join(COMMITTED).is_file()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort_by_key(|x| std::cmp::Reverse(x.0));
    found
}

/// The newest committed `checkpoint-<step>` directory under `output_dir`.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    committed(output_dir).into_iter().next().map(|(_, p)| p)
}

/// `save_total_limit`: deletes committed checkpoints beyond the newest `keep`, never `protect`
/// (the one the run resumed from). Returns the directories removed.
pub fn prune(output_dir: &Path, keep: usize, protect: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (_, dir) in committed(output_dir).into_iter().skip(keep.max(1)) {
        let same = |p: &Path| match (p.canonicalize(), dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if protect.is_some_and(same) {
            continue;
        }
        // The marker goes first: a half-deleted directory is never taken for a checkpoint.
        std::fs::remove_file(dir.join(COMMITTED))
            .and_then(|_| std::fs::remove_dir_all(&dir))
            .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Loads `dir` into the engine (any saved layout into the current one); returns the manifest.
/// `trainable` receives the parameters below ZeRO-3. Checks that the checkpoint is of the same
/// model and the same global batch.
pub fn load<B: TrainBackend>(
    dir: &Path,
    eng: &mut Engine<'_, B>,
    trainable: &mut ParamStore,
    trainable_kind: &str,
    global_batch: usize,
) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    if m.trainable != trainable_kind {
        bail!(
            "checkpoint {} holds `{}` weights but this run trains `{trainable_kind}`",
            dir.display(),
            m.trainable
        );
    }
    if m.global_batch != global_batch {
        bail!(
            "checkpoint {} was saved with a global batch of {} samples, this run has {} \
             (world x micro-batch x accumulation): the data position would not carry over",
            dir.display(),
            m.global_batch,
            global_batch
        );
    }
    let layout = eng.layout().clone();
    let specs = trainable.specs();
    let same_units = m.units.len() == layout.units.len()
        && m.units.iter().zip(&layout.units).all(|(a, b)| {
            a.unit == b.unit
                && a.numel == b.numel
                && a.tensors.len() == b.tensors.len()
                && a.tensors
                    .iter()
                    .zip(b.tensors.clone())
                    .all(|(t, i)| t.name == specs[i].name && t.shape == specs[i].shape)
        });
    if !same_units {
        bail!(
            "checkpoint {} is of another model (its tensors or units differ from this run's)",
            dir.display()
        );
    }
    if m.shards.len() != m.shard_group {
        bail!(
            "checkpoint {}: the manifest lists {} shards for a shard group of {}",
            dir.display(),
            m.shards.len(),
            m.shard_group
        );
    }
    // Every shard is checked before anything is loaded, so a failed load leaves the engine as
    // it was and the caller can fall back to an older checkpoint.
    for s in &m.shards {
        let path = dir.join(&s.file);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let sum = sha256_hex(&bytes);
        if sum != s.sha256 {
            bail!(
                "checkpoint shard {} is corrupt: sha256 {sum}, the manifest says {}",
                path.display(),
                s.sha256
            );
        }
    }
    for s in &m.shards {
        let path = dir.join(&s.file);
        let mut tensors = read_safetensors(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading {}", path.display()))?;
        for (u, unit) in m.units.iter().enumerate() {
            let mut take = |what: &str| -> Result<Vec<f32>> {
                let name = format!("unit{u}.{what}");
                let (_, _, v) = tensors
                    .remove(&name)
                    .ok_or_else(|| anyhow!("{}: no tensor `{name}`", path.display()))?;
                if v.len() != unit.shard {
                    bail!(
                        "{}: `{name}` has {} elements, the manifest says {}",
                        path.display(),
                        v.len(),
                        unit.shard
                    );
                }
                Ok(v)
            };
            let state = if m.weights_only {
                UnitState {
                    param: take("param")?,
                    exp_avg: vec![0.0; unit.shard],
                    exp_avg_sq: vec![0.0; unit.shard],
                }
            } else {
                UnitState {
                    param: take("param")?,
                    exp_avg: take("exp_avg")?,
                    exp_avg_sq: take("exp_avg_sq")?,
                }
            };
            eng.import_range(u, s.shard * unit.shard, &state, m.adam_step, trainable);
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_or_a_file_is_not_called_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("nowhere");
        let e = format!("{:#}", read_manifest(&none).unwrap_err());
        assert_eq!(
            e,
            format!("checkpoint {}: no such directory", none.display())
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = format!("{:#}", read_manifest(&file).unwrap_err());
        assert!(
            e.contains("not a directory") && !e.contains("COMMITTED"),
            "{e}"
        );
        let e = format!("{:#}", read_manifest(dir.path()).unwrap_err());
        assert!(e.contains("is not committed (no COMMITTED marker"), "{e}");
    }
}
