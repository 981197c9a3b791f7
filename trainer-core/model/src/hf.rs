//! Hugging Face model directories: `config.json` plus `model.safetensors` or
//! `model.safetensors.index.json` with shards; fp32, bf16 and fp16 files.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use serde_json::{Value, json};

use crate::config::{DType, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::params::{ParamSpec, ParamStore, param_specs};

/// Single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model config.
pub const CONFIG_FILE: &str = "config.json";

/// A tensor ready to be written: dtype, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// Encodes fp32 values as `dtype` (round to nearest even for bf16/f16).
    pub fn encode(values: &[f32], shape: Vec<usize>, dtype: DType) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            DType::F32 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        }
        RawTensor {
            dtype,
            shape,
            bytes,
        }
    }
}

impl View for &RawTensor {
    fn dtype(&self) -> StDtype {
        match self.dtype {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Decodes a safetensors view to fp32; `what` names the tensor in errors.
pub fn decode_f32(path: &Path, name: &str, dtype: StDtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::weights(
                path,
                format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
            ));
        }
    })
}

/// A tensor read from a file: stored dtype, shape, values as fp32.
pub type ReadTensor = (DType, Vec<usize>, Vec<f32>);

/// Reads a whole safetensors file into `name → (dtype, shape, fp32 values)`.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, ReadTensor>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        ModelError::weights(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            StDtype::F32 => DType::F32,
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            other => {
                return Err(ModelError::weights(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
                ));
            }
        };
        let values = decode_f32(path, &name, view.dtype(), view.data())?;
        out.insert(name, (dtype, view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The weight files of a directory: the single file, or the shards its index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(INDEX_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    if !index.is_file() {
        return Err(ModelError::weights(
            dir,
            format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is there"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::weights(&index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            ModelError::weights(&index, "field `weight_map` missing or not an object")
        })?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let f = file.as_str().ok_or_else(|| {
            ModelError::weights(&index, format!("weight_map.`{tensor}` is not a file name"))
        })?;
        if f.contains('/') || f.contains("..") {
            return Err(ModelError::weights(
                &index,
                format!("weight_map.`{tensor}`: `{f}` is not a plain file name"),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// A loaded model directory.
#[derive(Debug, Clone)]
pub struct HfModel {
    /// The architecture.
    pub config: LlamaConfig,
    /// The weights, fp32.
    pub params: ParamStore,
    /// The dtype the weights were stored in.
    pub stored_dtype: DType,
}

/// Loads `config.json` and the weights of a Hugging Face directory. Every parameter must be
/// present with its shape; `lm_head.weight` of a tied model and `rotary_emb.inv_freq` buffers
/// are ignored; any other tensor is an error naming it.
pub fn load_dir(dir: &Path) -> Result<HfModel> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG_FILE))?;
    let specs = param_specs(&config);
    let (params, stored_dtype) = load_weights(dir, specs, config.tie_word_embeddings)?;
    Ok(HfModel {
        config,
        params,
        stored_dtype,
    })
}

/// Loads tensors named by `specs` from the weight files of `dir`.
pub fn load_weights(dir: &Path, specs: Vec<ParamSpec>, tied: bool) -> Result<(ParamStore, DType)> {
    let mut store = ParamStore::try_zeros(specs)?;
    let mut seen = vec![false; store.len()];
    let mut dtype = None;
    for file in weight_files(dir)? {
        for (name, (dt, shape, values)) in read_safetensors(&file)? {
            let Some(i) = store.index_of(&name) else {
                if name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight") {
                    continue;
                }
                return Err(ModelError::weights(
                    &file,
                    format!("unexpected tensor `{name}` (not part of this model)"),
                ));
            };
            let want = &store.specs()[i].shape;
            if &shape != want {
                return Err(ModelError::weights(
                    &file,
                    format!("tensor `{name}` has shape {shape:?}; config.json implies {want:?}"),
                ));
            }
            dtype.get_or_insert(dt);
            store.set(i, values)?;
            seen[i] = true;
        }
    }
    let missing: Vec<&str> = store
        .specs()
        .iter()
        .zip(&seen)
        .filter(|(_, s)| !**s)
        .map(|(spec, _)| spec.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(ModelError::weights(
            dir,
            format!("missing tensor(s): {}", missing.join(", ")),
        ));
    }
    Ok((store, dtype.unwrap_or(DType::F32)))
}

/// Options of [`save_dir`].
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    /// Dtype the weights are written in.
    pub dtype: DType,
    /// Largest shard in bytes; above it the weights are split with an index (transformers'
    /// `max_shard_size`; its default is 5 GB).
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Writes `config.json` and the weights (single file or shards + index) into `dir`. Every file
/// goes to a temporary name, is fsynced, then renamed.
pub fn save_dir(
    dir: &Path,
    config: &LlamaConfig,
    params: &ParamStore,
    opts: SaveOptions,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_atomic(
        &dir.join(CONFIG_FILE),
        config.to_json(opts.dtype).as_bytes(),
    )?;
    let tensors: Vec<(String, RawTensor)> = params
        .iter()
        .map(|(spec, data)| {
            (
                spec.name.clone(),
                RawTensor::encode(data, spec.shape.clone(), opts.dtype),
            )
        })
        .collect();
    save_tensors(
        dir,
        WEIGHTS_FILE,
        INDEX_FILE,
        "model",
        &tensors,
        opts.max_shard_bytes,
    )
}

/// Writes named tensors as one file `single`, or as shards `{stem}-0000i-of-0000n.safetensors`
/// with an index `index` when they exceed `max_shard_bytes`. Stale files of the other layout are
/// removed so that a directory never holds both.
pub fn save_tensors(
    dir: &Path,
    single: &str,
    index: &str,
    stem: &str,
    tensors: &[(String, RawTensor)],
    max_shard_bytes: u64,
) -> Result<()> {
    let mut shards: Vec<Vec<&(String, RawTensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let n = t.1.bytes.len() as u64;
        if size > 0 && size + n > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(t);
        size += n;
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    if shards.len() == 1 {
        let path = dir.join(single);
        let bytes = safetensors::serialize(
            shards[0].iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
        )
        .map_err(|e| ModelError::weights(&path, format!("serialising: {e}")))?;
        write_atomic(&path, &bytes)?;
        remove_stale_shards(dir, index, stem)?;
        return Ok(());
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{n:05}.safetensors", k + 1);
        let path = dir.join(&file);
        let bytes = safetensors::serialize(
            shard.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata.clone()),
        )
        .map_err(|e| ModelError::weights(&path, format!("serialising: {e}")))?;
        write_atomic(&path, &bytes)?;
        for (name, t) in shard {
            weight_map.insert(name.clone(), json!(file));
            total += t.bytes.len() as u64;
        }
    }
    let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(
        &dir.join(index),
        (serde_json::to_string_pretty(&idx).expect("json") + "\n").as_bytes(),
    )?;
    let single_path = dir.join(single);
    if single_path.exists() {
        std::fs::remove_file(&single_path).map_err(|e| ModelError::io(&single_path, e))?;
    }
    Ok(())
}

fn remove_stale_shards(dir: &Path, index: &str, stem: &str) -> Result<()> {
    let idx = dir.join(index);
    if idx.exists() {
        std::fs::remove_file(&idx).map_err(|e| ModelError::io(&idx, e))?;
    }
    let prefix = format!("{stem}-");
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.contains("-of-") && name.ends_with(".safetensors") {
            std::fs::remove_file(entry.path()).map_err(|e| ModelError::io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory: write, fsync,
/// rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<(), std::io::Error>(())
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}
