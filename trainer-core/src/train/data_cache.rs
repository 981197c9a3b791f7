//! A cache of the tokenized training set in `output_dir/.cache/`, so that a restarted
//! generation (and every rank after the first to get there) reads the samples instead of
//! tokenizing the dataset again: tokenizing is most of a trainer's start-up (57% of a one-step
//! quickstart run), and every rank of every generation used to do it.
//!
//! The file name is the sha256 of everything the samples depend on: the dataset files' names
//! and bytes (every file of a directory dataset), formats and `num_samples`, the row selection
//! (`max_samples`, `mix_strategy`, `interleave_probs`, `seed`), the tokenizer files' bytes, the
//! template, the preprocessing options, and the trainer binary itself (its size and mtime: a
//! rebuilt trainer may tokenize differently). The preprocessing options include
//! `preprocessing_batch_size` and `preprocessing_num_workers` (packing works within their
//! batches, as LLaMA-Factory's does); the format version in [`MAGIC`] changes whenever what the
//! samples mean does. `overwrite_cache` makes the caller skip reading. A
//! file that is missing, truncated or of another format is ignored; writing is best effort
//! (temporary name, then rename, so concurrent ranks never see a partial file).

use std::io::Write;
use std::path::{Path, PathBuf};

use ringmaster_data::batch::Sample;
use ringmaster_data::dataset::DatasetSpec;
use ringmaster_data::preprocess::{PreprocessConfig, PreprocessStats, ProcessedDataset, Selection};
use sha2::{Digest, Sha256};

/// The file format and the preprocessing semantics it holds: 02 is LLaMA-Factory's packing
/// (pt concatenation, sft knapsack per preprocessing batch at `cutoff_len - 1`) and rows
/// without target kept.
const MAGIC: &[u8; 8] = b"RMDATA02";

/// The cache file for these inputs, or `None` when one of them cannot be read (no caching).
pub fn path_for(
    output_dir: &Path,
    specs: &[DatasetSpec],
    selection: &Selection,
    tokenizer_dir: &Path,
    template: &str,
    cfg: &PreprocessConfig,
) -> Option<PathBuf> {
    let mut h = Sha256::new();
    h.update(MAGIC);
    let exe = std::fs::metadata(std::env::current_exe().ok()?).ok()?;
    let mtime = exe
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    h.update(exe.len().to_le_bytes());
    h.update(mtime.as_nanos().to_le_bytes());
    for spec in specs {
        for file in spec.files().ok()? {
            let bytes = std::fs::read(&file).ok()?;
            let name = file.file_name()?.to_string_lossy();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        h.update(format!("{:?} {:?}", spec.format, spec.num_samples).as_bytes());
    }
    h.update(format!("{selection:?}").as_bytes());
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        match std::fs::read(tokenizer_dir.join(name)) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.update(b"absent"),
            Err(_) => return None,
        }
    }
    h.update(template.as_bytes());
    h.update(format!("{cfg:?}").as_bytes());
    let hex: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(output_dir.join(".cache").join(format!("train-{hex}.bin")))
}

/// The cached dataset at `cache` if there is a complete one and `overwrite` is off
/// (`overwrite_cache`), else `build()`'s, written to `cache` for the next reader.
///
/// # Errors
/// `build`'s.
pub fn read_or_build<E>(
    cache: Option<&Path>,
    overwrite: bool,
    build: impl FnOnce() -> Result<ProcessedDataset, E>,
) -> Result<ProcessedDataset, E> {
    if !overwrite && let Some(data) = cache.and_then(read) {
        return Ok(data);
    }
    let data = build()?;
    if let Some(path) = cache {
        write(path, &data);
    }
    Ok(data)
}

/// Reads a cached dataset; `None` when the file is absent or not a complete one.
pub fn read(path: &Path) -> Option<ProcessedDataset> {
    let bytes = std::fs::read(path).ok()?;
    let mut r = Reader { b: &bytes, at: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return None;
    }
    let mut stat = || r.u64().map(|v| v as usize);
    let stats = PreprocessStats {
        records: stat()?,
        samples: stat()?,
        no_target: stat()?,
        truncated: stat()?,
        dropped_tokens: stat()?,
        rows: stat()?,
        tokens: stat()?,
        target_tokens: stat()?,
    };
    let n = r.u64()? as usize;
    let mut samples = Vec::with_capacity(n.min(bytes.len() / 16));
    for _ in 0..n {
        let len = r.u64()? as usize;
        let ids = r.take(len.checked_mul(4)?)?;
        let input_ids = ids
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let labels = r
            .take(len.checked_mul(8)?)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let nseg = r.u64()? as usize;
        let segments = r
            .take(nseg.checked_mul(8)?)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect();
        samples.push(Sample {
            input_ids,
            labels,
            segments,
        });
    }
    (r.at == bytes.len()).then_some(ProcessedDataset { samples, stats })
}

/// Writes `data` to `path` (best effort: a failure is reported and otherwise ignored).
pub fn write(path: &Path, data: &ProcessedDataset) {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    let s = &data.stats;
    for v in [
        s.records,
        s.samples,
        s.no_target,
        s.truncated,
        s.dropped_tokens,
        s.rows,
        s.tokens,
        s.target_tokens,
        data.samples.len(),
    ] {
        out.extend_from_slice(&(v as u64).to_le_bytes());
    }
    for sample in &data.samples {
        out.extend_from_slice(&(sample.input_ids.len() as u64).to_le_bytes());
        for id in &sample.input_ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        for l in &sample.labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&(sample.segments.len() as u64).to_le_bytes());
        for g in &sample.segments {
            out.extend_from_slice(&(*g as u64).to_le_bytes());
        }
    }
    let result = (|| -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&out))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    })();
    if let Err(e) = result {
        eprintln!(
            "trainer: warning: caching the tokenized dataset at {}: {e}",
            path.display()
        );
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u32) -> Sample {
        Sample {
            input_ids: (0..n).collect(),
            labels: (0..n as i64)
                .map(|v| if v % 2 == 0 { -100 } else { v })
                .collect(),
            segments: vec![n as usize],
        }
    }

    #[test]
    fn a_written_dataset_reads_back_equal_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cache/train-x.bin");
        let data = ProcessedDataset {
            samples: vec![sample(5), sample(1), sample(9)],
            stats: PreprocessStats {
                records: 3,
                samples: 3,
                no_target: 1,
                dropped_tokens: 3,
                truncated: 2,
                rows: 3,
                tokens: 15,
                target_tokens: 6,
            },
        };
        write(&path, &data);
        let back = read(&path).expect("reads back");
        assert_eq!(back.samples, data.samples);
        assert_eq!(back.stats, data.stats);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read(&path).is_none(), "truncated");
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(read(&path).is_none(), "trailing bytes");
        assert!(read(&dir.path().join("absent")).is_none());
    }

    #[test]
    fn the_key_changes_with_the_data_and_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("a.jsonl"),
            "{\"instruction\": \"x\", \"output\": \"y\"}\n",
        )
        .unwrap();
        std::fs::write(d.join("tokenizer.json"), "{}").unwrap();
        let specs = vec![DatasetSpec::new(
            d.join("a.jsonl"),
            "alpaca".parse().unwrap(),
        )];
        let cfg = PreprocessConfig::new(ringmaster_data::preprocess::Stage::Sft, 64);
        let sel = Selection::default();
        let key = |cfg: &PreprocessConfig, t: &str| path_for(d, &specs, &sel, d, t, cfg).unwrap();
        let k = key(&cfg, "default");
        assert_eq!(k, key(&cfg, "default"));
        assert_ne!(k, key(&cfg, "llama3"));
        assert_ne!(
            k,
            key(
                &PreprocessConfig::new(ringmaster_data::preprocess::Stage::Sft, 65),
                "default"
            )
        );
        // Packing and the preprocessing batches it works within change the rows.
        for other in [
            PreprocessConfig {
                packing: true,
                ..cfg
            },
            PreprocessConfig {
                batch_size: 7,
                ..cfg
            },
            PreprocessConfig { num_proc: 2, ..cfg },
        ] {
            assert_ne!(k, key(&other, "default"));
        }
        std::fs::write(
            d.join("a.jsonl"),
            "{\"instruction\": \"x\", \"output\": \"z\"}\n",
        )
        .unwrap();
        assert_ne!(k, key(&cfg, "default"));
        std::fs::write(d.join("tokenizer_config.json"), "{}").unwrap();
        let k2 = key(&cfg, "default");
        std::fs::write(d.join("tokenizer_config.json"), "{\"eos\": 1}").unwrap();
        assert_ne!(k2, key(&cfg, "default"));
    }

    #[test]
    fn overwrite_cache_rebuilds_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cache/train-k.bin");
        let data = |n: u32| ProcessedDataset {
            samples: vec![sample(n)],
            stats: PreprocessStats::default(),
        };
        let build = |n: u32| move || Ok::<_, ()>(data(n));
        // Nothing cached: built and written.
        assert_eq!(
            read_or_build(Some(&path), false, build(3)).unwrap(),
            data(3)
        );
        // Cached: read, not built.
        let never = || -> Result<ProcessedDataset, ()> { panic!("built despite the cache") };
        assert_eq!(read_or_build(Some(&path), false, never).unwrap(), data(3));
        // overwrite_cache: built again and the cache replaced.
        assert_eq!(read_or_build(Some(&path), true, build(5)).unwrap(), data(5));
        assert_eq!(read(&path).unwrap(), data(5));
        // No cache path: always built.
        assert_eq!(read_or_build(None, false, build(2)).unwrap(), data(2));
        assert_eq!(
            read_or_build(Some(&path), false, || Err::<ProcessedDataset, _>(7)).unwrap(),
            data(5)
        );
    }

    #[test]
    fn the_key_changes_with_the_row_selection() {
        use ringmaster_data::mix::{MixConfig, MixStrategy};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("a.jsonl"),
            "{\"instruction\": \"x\", \"output\": \"y\"}\n",
        )
        .unwrap();
        let cfg = PreprocessConfig::new(ringmaster_data::preprocess::Stage::Sft, 64);
        let spec = DatasetSpec::new(d.join("a.jsonl"), "alpaca".parse().unwrap());
        let key = |spec: &DatasetSpec, sel: &Selection| {
            path_for(d, std::slice::from_ref(spec), sel, d, "qwen", &cfg).unwrap()
        };
        let base = Selection::default();
        let k = key(&spec, &base);
        let mut sampled = spec.clone();
        sampled.num_samples = Some(3);
        let variants = [
            Selection {
                max_samples: Some(2),
                ..base.clone()
            },
            Selection {
                mix: MixConfig {
                    strategy: MixStrategy::InterleaveOver,
                    ..base.mix.clone()
                },
                ..base.clone()
            },
            Selection {
                mix: MixConfig {
                    probs: Some(vec![1.0]),
                    ..base.mix.clone()
                },
                ..base.clone()
            },
            Selection {
                mix: MixConfig {
                    seed: 7,
                    ..base.mix.clone()
                },
                ..base.clone()
            },
        ];
        for sel in &variants {
            assert_ne!(k, key(&spec, sel), "{sel:?}");
        }
        assert_ne!(k, key(&sampled, &base), "num_samples");
        assert_eq!(k, key(&spec.clone(), &base.clone()));
        // A directory dataset is keyed by its files.
        std::fs::create_dir(d.join("dir")).unwrap();
        std::fs::write(
            d.join("dir/a.jsonl"),
            "{\"instruction\": \"x\", \"output\": \"y\"}\n",
        )
        .unwrap();
        let ds = DatasetSpec::new(d.join("dir"), "alpaca".parse().unwrap());
        let k1 = key(&ds, &base);
        std::fs::write(
            d.join("dir/b.jsonl"),
            "{\"instruction\": \"x\", \"output\": \"y\"}\n",
        )
        .unwrap();
        assert_ne!(k1, key(&ds, &base));
    }
}
