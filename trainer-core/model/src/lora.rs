//! LoRA adapters in PEFT's format: `adapter_model.safetensors` with
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`),
//! and `adapter_config.json`. The adapter adds `(alpha / r) · B·A·dropout(x)` to a frozen
//! linear's output; merging adds `(alpha / r) · B·A` to its weight.

use std::path::Path;

use serde_json::{Value, json};

use crate::config::{DType, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::hf::{RawTensor, read_safetensors, save_tensors, write_atomic};
use crate::params::{ParamKind, ParamSpec, ParamStore, Rng, param_specs};

/// Adapter weights file.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// Adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The module names `lora_target: all` means (every linear of the blocks, as LLaMA-Factory's
/// `all` does; the head is never targeted).
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `lora_rank` (PEFT `r`).
    pub rank: usize,
    /// `lora_alpha` (LLaMA-Factory's default: 2 × rank).
    pub alpha: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// Target module names (`q_proj`, ...).
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// Resolves the LoRA settings as LLaMA-Factory's `FinetuningArguments.__post_init__` and
    /// `model/adapter.py` do: `lora_alpha` absent or 0 is `2 × lora_rank` (`lora_alpha or
    /// lora_rank * 2`); `lora_target` (a comma-separated list, or a list) is expanded to every
    /// linear of the blocks only when it is exactly `all`: inside a longer list `all` is a
    /// module name that matches no module (PEFT adapts the others).
    pub fn new(rank: usize, alpha: Option<f64>, dropout: f64, target: &[String]) -> Result<Self> {
        if rank == 0 {
            return Err(ModelError::Invalid("lora_rank must be positive".into()));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(ModelError::Invalid(format!(
                "lora_dropout {dropout} is not in [0, 1)"
            )));
        }
        let names: Vec<&str> = target
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let mut targets = Vec::new();
        let expand = names == ["all"];
        if expand {
            targets.extend(ALL_TARGETS.iter().map(|s| s.to_string()));
        }
        for &t in names.iter().filter(|_| !expand) {
            if t == "all" {
                // PEFT finds no module named `all`.
                continue;
            } else if ALL_TARGETS.contains(&t) {
                targets.push(t.to_string());
            } else {
                return Err(ModelError::Invalid(format!(
                    "lora_target `{t}` is not a linear module of a decoder block ({} or all)",
                    ALL_TARGETS.join(", ")
                )));
            }
        }
        targets.sort_by_key(|t| ALL_TARGETS.iter().position(|a| a == t));
        targets.dedup();
        if targets.is_empty() {
            return Err(ModelError::Invalid(format!(
                "lora_target names no module ({}; `all` counts only as the sole item)",
                names.join(",")
            )));
        }
        Ok(LoraConfig {
            rank,
            alpha: alpha.filter(|&a| a != 0.0).unwrap_or(2.0 * rank as f64),
            dropout,
            targets,
        })
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// Whether a linear module is adapted.
    pub fn targets(&self, module: &str) -> bool {
        self.targets.iter().any(|t| t == module)
    }

    /// Adapter tensor specs: for each targeted base linear (in base order) `lora_A` then
    /// `lora_B`, PEFT names; `unit` = the base tensor's index in the base store (kind Linear).
    pub fn specs(&self, cfg: &LlamaConfig) -> Vec<(ParamSpec, usize)> {
        let mut v = Vec::new();
        for (i, spec) in param_specs(cfg).iter().enumerate() {
            let ParamKind::Linear(module) = spec.kind else {
                continue;
            };
            if !self.targets(module) {
                continue;
            }
            let (out, inp) = (spec.shape[0], spec.shape[1]);
            let stem = spec.name.trim_end_matches(".weight");
            v.push((
                ParamSpec {
                    name: format!("base_model.model.{stem}.lora_A.weight"),
                    shape: vec![self.rank, inp],
                    kind: ParamKind::Linear("lora_A"),
                    unit: spec.unit,
                },
                i,
            ));
            v.push((
                ParamSpec {
                    name: format!("base_model.model.{stem}.lora_B.weight"),
                    shape: vec![out, self.rank],
                    kind: ParamKind::Linear("lora_B"),
                    unit: spec.unit,
                },
                i,
            ));
        }
        v
    }

    /// PEFT's initialisation: A kaiming-uniform (bound 1/√in), B zero; seeded.
    pub fn init(&self, cfg: &LlamaConfig, seed: u64) -> ParamStore {
        let specs: Vec<ParamSpec> = self.specs(cfg).into_iter().map(|(s, _)| s).collect();
        let mut store = ParamStore::zeros(specs);
        let mut rng = Rng::new(seed ^ 0x10a4_a0a7);
        for (spec, data) in store.iter_mut() {
            if spec.name.ends_with("lora_A.weight") {
                let bound = 1.0 / (spec.shape[1] as f64).sqrt();
                for x in data.iter_mut() {
                    *x = ((rng.uniform() * 2.0 - 1.0) * bound) as f32;
                }
            }
        }
        store
    }

    /// `adapter_config.json` text.
    pub fn to_json(&self, base_model: &str) -> String {
        let v = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        });
        serde_json::to_string_pretty(&v).expect("json") + "\n"
    }

    /// Reads `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::weights(path, format!("not valid JSON: {e}")))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| ModelError::weights(path, format!("field `{k}` missing")))
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            return Err(ModelError::weights(path, "field `peft_type` is not LORA"));
        }
        let rank = field("r")?
            .as_u64()
            .ok_or_else(|| ModelError::weights(path, "field `r` is not an integer"))?
            as usize;
        let alpha = field("lora_alpha")?
            .as_f64()
            .ok_or_else(|| ModelError::weights(path, "field `lora_alpha` is not a number"))?;
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let targets: Vec<String> = match field("target_modules")? {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => {
                return Err(ModelError::weights(
                    path,
                    "field `target_modules` is not a list",
                ));
            }
        };
        if v.get("use_rslora").and_then(Value::as_bool) == Some(true)
            || v.get("use_dora").and_then(Value::as_bool) == Some(true)
        {
            return Err(ModelError::weights(
                path,
                "rsLoRA and DoRA adapters are not supported",
            ));
        }
        LoraConfig::new(rank, Some(alpha), dropout, &targets)
            .map_err(|e| ModelError::weights(path, e.to_string()))
    }
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`.
pub fn save_adapter(
    dir: &Path,
    lora: &LoraConfig,
    adapters: &ParamStore,
    base_model: &str,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors: Vec<(String, RawTensor)> = adapters
        .iter()
        .map(|(s, d)| (s.name.clone(), RawTensor::encode(d, s.shape.clone(), dtype)))
        .collect();
    save_tensors(
        dir,
        ADAPTER_FILE,
        "adapter_model.safetensors.index.json",
        "adapter_model",
        &tensors,
        u64::MAX,
    )?;
    write_atomic(
        &dir.join(ADAPTER_CONFIG),
        lora.to_json(base_model).as_bytes(),
    )
}

/// Reads an adapter directory for a base model of config `cfg`.
pub fn load_adapter(dir: &Path, cfg: &LlamaConfig) -> Result<(LoraConfig, ParamStore)> {
    let lora = LoraConfig::from_file(&dir.join(ADAPTER_CONFIG))?;
    let specs: Vec<ParamSpec> = lora.specs(cfg).into_iter().map(|(s, _)| s).collect();
    let mut store = ParamStore::zeros(specs);
    let path = dir.join(ADAPTER_FILE);
    let mut seen = vec![false; store.len()];
    for (name, (_, shape, values)) in read_safetensors(&path)? {
        // PEFT files written by some versions carry the adapter name (`.default.`) in keys.
        let key = name
            .replace(".lora_A.default.weight", ".lora_A.weight")
            .replace(".lora_B.default.weight", ".lora_B.weight");
        let i = store.index_of(&key).ok_or_else(|| {
            ModelError::weights(
                &path,
                format!("unexpected tensor `{name}` for this adapter config"),
            )
        })?;
        if shape != store.specs()[i].shape {
            return Err(ModelError::weights(
                &path,
                format!(
                    "tensor `{name}` has shape {shape:?}; expected {:?}",
                    store.specs()[i].shape
                ),
            ));
        }
        store.set(i, values)?;
        seen[i] = true;
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(ModelError::weights(
            &path,
            format!("missing tensor `{}`", store.specs()[i].name),
        ));
    }
    Ok((lora, store))
}

/// Adds every adapter's `(alpha / r) · B·A` into its base weight.
pub fn merge(
    cfg: &LlamaConfig,
    lora: &LoraConfig,
    base: &mut ParamStore,
    adapters: &ParamStore,
) -> Result<()> {
    let scale = lora.scale();
    let specs = lora.specs(cfg);
    for pair in specs.chunks(2) {
        let (a_spec, base_idx) = &pair[0];
        let (b_spec, _) = &pair[1];
        let a = adapters.get(&a_spec.name)?;
        let b = adapters.get(&b_spec.name)?;
        let (r, inp) = (a_spec.shape[0], a_spec.shape[1]);
        let out = b_spec.shape[0];
        let w = base.data_mut(*base_idx);
        for o in 0..out {
            for i in 0..inp {
                let mut acc = 0.0f32;
                for k in 0..r {
                    acc += b[o * r + k] * a[k * inp + i];
                }
                w[o * inp + i] += scale * acc;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(t: &[&str]) -> Result<Vec<String>> {
        let t: Vec<String> = t.iter().map(|s| s.to_string()).collect();
        LoraConfig::new(8, None, 0.0, &t).map(|c| c.targets)
    }

    /// LLaMA-Factory's `FinetuningArguments.__post_init__`: `lora_alpha = lora_alpha or
    /// lora_rank * 2`, so absent and 0 both give 2 × rank.
    #[test]
    fn alpha_absent_or_zero_is_twice_the_rank() {
        let all = ["all".to_string()];
        for alpha in [None, Some(0.0)] {
            let c = LoraConfig::new(8, alpha, 0.0, &all).unwrap();
            assert_eq!(c.alpha, 16.0);
            assert_eq!(c.scale(), 2.0);
        }
        assert_eq!(LoraConfig::new(8, Some(4.0), 0.0, &all).unwrap().alpha, 4.0);
    }

    /// LLaMA-Factory's `model/adapter.py`: `if len(lora_target) == 1 and lora_target[0] ==
    /// "all"` expands to every linear module; otherwise the names go to PEFT as they are, where
    /// `all` matches no module.
    #[test]
    fn all_expands_only_as_the_sole_target() {
        assert_eq!(targets(&["all"]).unwrap(), ALL_TARGETS.map(String::from));
        assert_eq!(targets(&[" all "]).unwrap(), ALL_TARGETS.map(String::from));
        assert_eq!(targets(&["q_proj,all"]).unwrap(), ["q_proj"]);
        assert_eq!(
            targets(&["all", "v_proj", "q_proj"]).unwrap(),
            ["q_proj", "v_proj"]
        );
        let err = targets(&["all,all"]).unwrap_err().to_string();
        assert!(err.contains("names no module"), "{err}");
        assert!(targets(&["lm_head"]).is_err());
    }
}
