//! `trainer export CHECKPOINT --out DIR [--merge-lora] [--dtype D]` (and `ringctl export`, which
//! runs it): a Hugging Face directory from a sharded checkpoint of any layout, written one
//! tensor at a time.
//!
//! The output's safetensors header is computed from the manifest (every tensor's name, shape and
//! size are known up front), then each tensor is assembled from the byte ranges of the shards
//! that hold it — read with positioned reads of the shard files, never the whole shard — and
//! appended in chunks of 1M elements. Peak memory: a few chunk buffers (about 13 MiB), whatever
//! the model size and the largest tensor.
//! Config, tokenizer and adapter-config files are copied from the checkpoint directory (rank 0
//! writes them there). `--merge-lora` merges a LoRA checkpoint's adapters into the base model
//! named by its adapter_config.json (that step loads the base model whole).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use ringmaster_model::{DType, hf, lora};

use crate::run::RunError;
use crate::train::checkpoint::{Manifest, read_manifest};

/// Flags of `trainer export`.
#[derive(Parser, Debug)]
#[command(name = "trainer export", bin_name = "trainer export")]
pub struct ExportArgs {
    /// A committed checkpoint directory (`output_dir/checkpoint-<step>`).
    pub checkpoint: PathBuf,
    /// Output directory (created): not the checkpoint itself; one that already holds a model
    /// (the run's output_dir, say) only with --overwrite.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the model files an existing --out holds.
    #[arg(long)]
    pub overwrite: bool,
    /// A LoRA checkpoint: write the base model with the adapters merged in (default: the PEFT
    /// adapter files).
    #[arg(long)]
    pub merge_lora: bool,
    /// Dtype of the written weights: float32 (default), bfloat16 or float16.
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Where one shard's tensors lie in its file.
struct ShardReader {
    path: PathBuf,
    file: File,
    /// name → (absolute byte offset of the data, byte length).
    tensors: BTreeMap<String, (u64, u64)>,
}

impl ShardReader {
    fn open(path: &Path) -> Result<ShardReader> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .with_context(|| format!("{}: reading the header size", path.display()))?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            bail!(
                "{}: header of {n} bytes: not a safetensors file",
                path.display()
            );
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .with_context(|| format!("{}: reading the header", path.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&header)
            .with_context(|| format!("{}: parsing the header", path.display()))?;
        let base = 8 + n;
        let mut tensors = BTreeMap::new();
        for (name, t) in v.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            if t["dtype"] != "F32" {
                bail!(
                    "{}: `{name}` is {}, expected F32",
                    path.display(),
                    t["dtype"]
                );
            }
            let off = t["data_offsets"]
                .as_array()
                .and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)))
                .ok_or_else(|| anyhow!("{}: `{name}` has no data_offsets", path.display()))?;
            tensors.insert(name.clone(), (base + off.0, off.1 - off.0));
        }
        Ok(ShardReader {
            path: path.to_owned(),
            file,
            tensors,
        })
    }

    /// Elements `lo..lo + out.len()` of tensor `name` (f32).
    fn read_into(&self, name: &str, lo: usize, out: &mut [f32], buf: &mut Vec<u8>) -> Result<()> {
        let (start, len) = *self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        let (a, n) = (4 * lo as u64, 4 * out.len() as u64);
        if a + n > len {
            bail!(
                "{}: `{name}` is shorter than the manifest says",
                self.path.display()
            );
        }
        buf.resize(n as usize, 0);
        self.file
            .read_exact_at(buf, start + a)
            .with_context(|| format!("reading {}", self.path.display()))?;
        for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

/// Elements read, converted and written at a time by the export (4 MiB of f32).
const EXPORT_CHUNK: usize = 1 << 20;

/// Streams the checkpoint's parameters into `out_file` as one safetensors file; returns its
/// tensor count. Tensors are written in manifest order (units, then tensors in a unit).
pub fn write_streamed(dir: &Path, m: &Manifest, out_file: &Path, dtype: DType) -> Result<usize> {
    let readers: Vec<ShardReader> = m
        .shards
        .iter()
        .map(|s| ShardReader::open(&dir.join(&s.file)))
        .collect::<Result<_>>()?;
    let st_dtype = match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for u in &m.units {
        for t in &u.tensors {
            let n: usize = t.shape.iter().product();
            let bytes = (n * dtype.size()) as u64;
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": st_dtype, "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let tmp = out_file.with_extension("safetensors.tmp");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let write = (|| -> Result<usize> {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(text.as_bytes())?;
        let mut values = Vec::new();
        let mut buf = Vec::new();
        let mut count = 0;
        for (ui, u) in m.units.iter().enumerate() {
            let name = format!("unit{ui}.param");
            for t in &u.tensors {
                let n: usize = t.shape.iter().product();
                // The tensor is elements t.offset .. t.offset + n of the unit; shard k holds
                // k·shard .. (k+1)·shard, so the shards' pieces in shard order are the tensor
                // in order: each is streamed in chunks, never assembled whole.
                let (lo, hi) = (t.offset, t.offset + n);
                for (k, r) in readers.iter().enumerate() {
                    let (s0, s1) = (k * u.shard, (k + 1) * u.shard);
                    let (a, b) = (lo.max(s0), hi.min(s1));
                    let mut p = a;
                    while p < b {
                        let q = (p + EXPORT_CHUNK).min(b);
                        values.clear();
                        values.resize(q - p, 0.0f32);
                        r.read_into(&name, p - s0, &mut values, &mut buf)?;
                        let raw = hf::RawTensor::encode(&values, vec![q - p], dtype);
                        w.write_all(&raw.bytes)?;
                        p = q;
                    }
                }
                count += 1;
            }
        }
        let file = w.into_inner().map_err(|e| anyhow!("{}", e.error()))?;
        file.sync_all()?;
        Ok(count)
    })();
    match write {
        Ok(count) => {
            std::fs::rename(&tmp, out_file)
                .with_context(|| format!("renaming to {}", out_file.display()))?;
            Ok(count)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("writing {}", out_file.display())))
        }
    }
}

/// Whether `dir` holds a model or adapter: a `config.json`, `adapter_config.json` or any
/// `*.safetensors` (or its index); the file found, if any.
fn model_file_in(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n == hf::CONFIG_FILE
                || n == "adapter_config.json"
                || n.ends_with(".safetensors")
                || n.ends_with(".safetensors.index.json")
        })
        .min()
}

/// Whether `a` and `b` name the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Checks an output directory before anything is written: not a file, not one of the `inputs`
/// (flag, directory) it is made from, and holding no model unless `overwrite`.
///
/// # Errors
/// Each names `--out`, the path and what is wrong (the caller exits 2).
pub fn check_out_dir(out: &Path, inputs: &[(&str, &Path)], overwrite: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {}: not a directory", out.display());
    }
    for (flag, input) in inputs {
        if same_dir(out, input) {
            bail!(
                "--out {} is the {flag} directory itself: writing there would replace what is \
                 being read; choose another directory",
                out.display()
            );
        }
    }
    if !overwrite && let Some(file) = model_file_in(out) {
        bail!(
            "--out {} already holds a model ({file}); give --overwrite to replace it, or choose \
             another directory",
            out.display()
        );
    }
    Ok(())
}

/// Files of a checkpoint directory that are training state or weights, not carried over.
fn is_state_or_weights(name: &str) -> bool {
    name.starts_with("rank-")
        || name.starts_with("model")
        || name.starts_with("adapter_model")
        || name == crate::train::checkpoint::MANIFEST
        || name == crate::train::checkpoint::COMMITTED
        || name.starts_with('.')
}

/// Runs `trainer export`.
pub fn export(args: ExportArgs) -> Result<(), RunError> {
    let usage = |e: anyhow::Error| RunError::Usage(e);
    let failed = |e: anyhow::Error| RunError::Failed(e);
    let dtype = match &args.dtype {
        None => DType::F32,
        Some(d) => DType::parse(d).ok_or_else(|| usage(anyhow!("--dtype: unknown dtype `{d}`")))?,
    };
    let m = read_manifest(&args.checkpoint).map_err(usage)?;
    let mut inputs = vec![("checkpoint", args.checkpoint.as_path())];
    // --merge-lora reads the base model that adapter_config.json names: not to be written over.
    let base = if m.trainable == "lora" && args.merge_lora {
        let cfg_path = args.checkpoint.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))
            .map_err(usage)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))
            .map_err(usage)?;
        v["base_model_name_or_path"].as_str().map(PathBuf::from)
    } else {
        None
    };
    if let Some(b) = &base {
        inputs.push(("base model", b));
    }
    check_out_dir(&args.out, &inputs, args.overwrite).map_err(usage)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))
        .map_err(failed)?;
    for e in std::fs::read_dir(&args.checkpoint)
        .with_context(|| format!("reading {}", args.checkpoint.display()))
        .map_err(failed)?
    {
        let e = e.map_err(|e| failed(e.into()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Regular files only: a symlink in a checkpoint may lead anywhere (a token, a key), and
        // the export is a copy someone will publish.
        let regular = e.file_type().is_ok_and(|t| t.is_file());
        if !regular && e.path().is_file() {
            eprintln!(
                "trainer: warning: {} is a symlink; not copied into the export",
                e.path().display()
            );
        }
        if regular && !is_state_or_weights(&name) {
            std::fs::copy(e.path(), args.out.join(&name))
                .with_context(|| format!("copying {name}"))
                .map_err(failed)?;
        }
    }
    let lora = m.trainable == "lora";
    if !lora && args.merge_lora {
        return Err(usage(anyhow!(
            "--merge-lora: {} is a full fine-tuning checkpoint (no adapters)",
            args.checkpoint.display()
        )));
    }
    let (file, what) = if lora {
        ("adapter_model.safetensors", "adapter")
    } else {
        ("model.safetensors", "model")
    };
    let n = write_streamed(&args.checkpoint, &m, &args.out.join(file), dtype).map_err(failed)?;
    if lora && args.merge_lora {
        let cfg_path = args.out.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))
            .map_err(usage)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))
            .map_err(usage)?;
        let base = v["base_model_name_or_path"].as_str().ok_or_else(|| {
            usage(anyhow!(
                "{}: no base_model_name_or_path",
                cfg_path.display()
            ))
        })?;
        let mut model = hf::load_dir(Path::new(base))
            .with_context(|| format!("loading the base model {base}"))
            .map_err(usage)?;
        let (lc, adapters) =
            lora::load_adapter(&args.out, &model.config).map_err(|e| failed(e.into()))?;
        lora::merge(&model.config, &lc, &mut model.params, &adapters)
            .map_err(|e| failed(e.into()))?;
        let opts = hf::SaveOptions {
            dtype,
            ..hf::SaveOptions::default()
        };
        hf::save_dir(&args.out, &model.config, &model.params, opts)
            .map_err(|e| failed(e.into()))?;
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            let _ = std::fs::remove_file(args.out.join(f));
        }
        if !args.out.join("tokenizer.json").is_file()
            && Path::new(base).join("tokenizer.json").is_file()
        {
            let _ = std::fs::copy(
                Path::new(base).join("tokenizer.json"),
                args.out.join("tokenizer.json"),
            );
        }
        println!(
            "exported {} (step {}) with its adapters merged into {base}: {}",
            args.checkpoint.display(),
            m.step,
            args.out.display()
        );
        return Ok(());
    }
    println!(
        "exported {} (step {}, saved by {} ranks under {}): {n} {what} tensors in {}",
        args.checkpoint.display(),
        m.step,
        m.world,
        m.plan,
        args.out.join(file).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_directory_is_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir(&base).unwrap();
        std::fs::write(base.join("model.safetensors"), "x").unwrap();
        let msg = |out: &Path, overwrite| {
            format!(
                "{:#}",
                check_out_dir(out, &[("--base", &base)], overwrite).unwrap_err()
            )
        };
        // The input itself, also by another spelling and with --overwrite.
        let again = dir.path().join("base/../base");
        for overwrite in [false, true] {
            let e = msg(&again, overwrite);
            assert!(e.contains("is the --base directory itself"), "{e}");
        }
        // A directory holding a model: only with --overwrite.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("config.json"), "{}").unwrap();
        let e = msg(&other, false);
        assert!(
            e.contains("already holds a model (config.json)") && e.contains("--overwrite"),
            "{e}"
        );
        check_out_dir(&other, &[("--base", &base)], true).unwrap();
        // A file is not a directory; a new or model-free directory is fine.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(msg(&file, true).contains("not a directory"));
        check_out_dir(&dir.path().join("new"), &[("--base", &base)], false).unwrap();
        let tok = dir.path().join("tok");
        std::fs::create_dir(&tok).unwrap();
        std::fs::write(tok.join("tokenizer.json"), "{}").unwrap();
        check_out_dir(&tok, &[("--base", &base)], false).unwrap();
    }
}
