//! What the coordinator needs for MFU (model FLOPs utilisation): the model FLOPs of training on
//! one token ([`ringmaster_model::LlamaConfig::training_flops_per_token`]) and this rank's peak
//! FLOP/s — a table by GPU name and precision on CUDA, a short GEMM measured on the CPU, or
//! `RINGMASTER_PEAK_FLOPS` over both. Each rank reports both on its progress stream; the
//! coordinator divides the job's tokens/s × FLOPs per token by the sum of the peaks.

use std::time::Duration;

use anyhow::{Result, bail};

use ringmaster_config::plan::Precision;

use crate::device::Placement;
use crate::train::Setup;

/// The environment variable that sets this rank's peak FLOP/s, over the table or measurement.
pub const PEAK_ENV: &str = "RINGMASTER_PEAK_FLOPS";

/// How long the CPU measurement runs.
const CPU_BUDGET: Duration = Duration::from_millis(50);

/// Dense peak FLOP/s of the GPUs we know, by a substring of the CUDA device name (first match
/// wins, so the more specific names come first): 16-bit tensor cores (bf16/fp16). fp32 runs use
/// TF32 tensor cores, half the rate on every one of these.
const GPU_PEAKS: &[(&str, f64)] = &[
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("B200", 2.25e15),
];

/// The dense peak FLOP/s of the GPU called `name` at `precision`, when the table knows it.
pub fn gpu_peak(name: &str, precision: &Precision) -> Option<f64> {
    let (_, bf16) = GPU_PEAKS.iter().find(|(n, _)| name.contains(n))?;
    Some(match precision {
        Precision::Bf16 | Precision::Fp16(_) => *bf16,
        Precision::Fp32 => bf16 / 2.0,
    })
}

/// Parses a peak rate: a positive number of FLOP/s, optionally with a unit prefix (`989e12`,
/// `989T`, `2.25P`, `150G`).
///
/// # Errors
/// Not a number, not finite or not positive; the message names the variable and the value.
pub fn parse_peak(value: &str) -> Result<f64> {
    let v = value.trim();
    let (num, scale) = match v.char_indices().last() {
        Some((i, 'G' | 'g')) => (&v[..i], 1e9),
        Some((i, 'T' | 't')) => (&v[..i], 1e12),
        Some((i, 'P' | 'p')) => (&v[..i], 1e15),
        _ => (v, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && (x * scale).is_finite() => Ok(x * scale),
        _ => bail!(
            "{PEAK_ENV}={value:?}: expected a positive number of FLOP/s per rank, e.g. 989e12 \
             or 989T"
        ),
    }
}

/// `RINGMASTER_PEAK_FLOPS`, when set (read at start, before any rank connects, so that a bad
/// value is a usage error and not a hang of the others).
///
/// # Errors
/// Set to something that is not a positive rate.
pub fn peak_override() -> Result<Option<f64>> {
    match std::env::var(PEAK_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_peak(&v).map(Some),
        _ => Ok(None),
    }
}

/// This rank's peak FLOP/s: `overridden` (from [`peak_override`]) when set, else the table
/// (CUDA; `None` for a GPU it does not list) or a ~50 ms measurement on the current thread
/// pool (CPU).
pub fn peak(placement: &Placement, precision: &Precision, overridden: Option<f64>) -> Option<f64> {
    if overridden.is_some() {
        return overridden;
    }
    match placement {
        Placement::Cpu { .. } => Some(ringmaster_model::host::measure_f32_gemm_flops(CPU_BUDGET)),
        Placement::Cuda { name, .. } => gpu_peak(name, precision),
    }
}

/// FLOPs of training on one token of `setup`'s run: the model's count at the run's sequence
/// length — the longest training row (packed rows are `cutoff_len` long; unpacked ones are
/// padded to the longest in their batch, at most `cutoff_len`).
pub fn per_token(setup: &Setup) -> f64 {
    let seq = setup
        .samples
        .iter()
        .map(|s| s.input_ids.len())
        .max()
        .unwrap_or(0);
    let adapter = setup.lora.as_ref().map(|(_, a)| a.numel());
    setup.model.training_flops_per_token(seq, adapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_table_by_name_and_precision() {
        let bf16 = Precision::Bf16;
        let fp32 = Precision::Fp32;
        assert_eq!(gpu_peak("NVIDIA H100 80GB HBM3", &bf16), Some(989e12));
        assert_eq!(gpu_peak("NVIDIA H100 80GB HBM3", &fp32), Some(494.5e12));
        assert_eq!(gpu_peak("NVIDIA H100 PCIe", &bf16), Some(756e12));
        assert_eq!(gpu_peak("NVIDIA H200", &bf16), Some(989e12));
        assert_eq!(gpu_peak("NVIDIA A100-SXM4-80GB", &bf16), Some(312e12));
        assert_eq!(gpu_peak("NVIDIA A100-SXM4-80GB", &fp32), Some(156e12));
        assert_eq!(gpu_peak("NVIDIA B200", &bf16), Some(2.25e15));
        assert_eq!(gpu_peak("NVIDIA GeForce RTX 4090", &bf16), None);
    }

    #[test]
    fn peak_override_parses_plain_and_prefixed_rates() {
        assert_eq!(parse_peak("989e12").unwrap(), 989e12);
        assert_eq!(parse_peak(" 989T ").unwrap(), 989e12);
        assert_eq!(parse_peak("2.25P").unwrap(), 2.25e15);
        assert_eq!(parse_peak("150g").unwrap(), 150e9);
        assert_eq!(parse_peak("1000").unwrap(), 1000.0);
        for bad in ["", "fast", "-1e12", "0", "NaN", "inf", "1e400", "T", "12X"] {
            let e = parse_peak(bad).unwrap_err().to_string();
            assert!(e.contains(PEAK_ENV), "{bad}: {e}");
        }
    }
}
