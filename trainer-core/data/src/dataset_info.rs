//! `dataset_info.json`, read as LLaMA-Factory reads it (`data/parser.py`, `DatasetAttr`), for
//! the sources this build can load: local files.
//!
//! An entry's keys:
//! - `file_name`: a file, or a directory whose every entry is a file of one type, under
//!   `dataset_dir` (see [`DatasetSpec::files`]); `.json`/`.jsonl` and `.txt` are read, `.csv`,
//!   `.parquet` and `.arrow` are refused by name.
//! - `hf_hub_url`, `ms_hub_url`, `om_hub_url`, `script_url`, `cloud_file_name`: LLaMA-Factory
//!   prefers these to `file_name` when present; we cannot download or run them, so each is an
//!   error naming the dataset (even next to a `file_name`, which LLaMA-Factory would not read).
//! - `formatting`: `alpaca` (default), `sharegpt` or `openai` (sharegpt with `role`/`content`,
//!   `user`/`assistant` as defaults). For `stage: pt` every entry is read as LLaMA-Factory's
//!   pre-training processor reads it, the first user message of each row: alpaca's first
//!   `history` prompt, else its `prompt` and `query` joined by a newline; sharegpt's first
//!   message after the system one.
//! - `ranking: true` (preference data for rm/dpo): refused, naming the dataset and the file.
//! - `split`: local files form the single split `train`, so any other split is refused (it
//!   fails in LLaMA-Factory too); `subset` and `folder` only apply to hub and script sources and
//!   are ignored, as LLaMA-Factory ignores them for files.
//! - `num_samples`: see [`crate::mix::select_rows`].
//! - `columns`: `prompt`, `query`, `response`, `history`, `messages`, `system`, `tools` (a null
//!   value turns a column off); `images`, `videos`, `audios` and `kto_tag` are refused (no
//!   multimodal or KTO training here); `chosen`/`rejected` only matter to ranking data.
//! - `tags`: `role_tag`, `content_tag`, `user_tag`, `assistant_tag`, `observation_tag`,
//!   `function_tag`, `system_tag`.
//!
//! As in LLaMA-Factory, an entry that has `columns` (or `tags`) replaces every default of that
//! section: a name it leaves out is off (`query` of alpaca, `system_tag` of sharegpt, ...). A
//! left-out name without which no row can be read (`prompt`, `response`, `messages`,
//! `role_tag`, `content_tag`, `user_tag`, `assistant_tag`) is an error naming it, where
//! LLaMA-Factory would drop every row.
//!
//! Other keys, at the top or inside `columns`/`tags`, are ignored, as LLaMA-Factory ignores
//! them. Without an entry of that name, a dataset item may be a path to a file (ours, not
//! LLaMA-Factory's): alpaca for `sft`, text for `pt`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dataset::{AlpacaColumns, DatasetFormat, DatasetSpec, ShareGptColumns, TextColumns};
use crate::error::{DataError, Result};
use crate::preprocess::Stage;
use crate::tokenizer::json_type;

/// The file LLaMA-Factory reads dataset definitions from, in `dataset_dir`.
pub const DATASET_INFO: &str = "dataset_info.json";

/// Remote sources, in LLaMA-Factory's order of preference, with what they are.
const REMOTE_SOURCES: &[(&str, &str)] = &[
    ("hf_hub_url", "the Hugging Face Hub"),
    ("ms_hub_url", "the ModelScope Hub"),
    ("om_hub_url", "the Modelers (openMind) Hub"),
    ("script_url", "a dataset loading script"),
    ("cloud_file_name", "cloud storage (S3/GCS)"),
];

/// Resolves a `dataset` (or `eval_dataset`) item: its entry in `dataset_dir/dataset_info.json`
/// when there is one, else a path to a file (as given, or under `dataset_dir`).
///
/// # Errors
/// An unreadable `dataset_info.json`, an entry this build cannot load (each naming the dataset
/// and the key), or an item that is neither a name nor a file.
pub fn resolve_dataset(item: &str, dataset_dir: &Path, stage: Stage) -> Result<DatasetSpec> {
    let info_path = dataset_dir.join(DATASET_INFO);
    // Why the item is not a dataset of dataset_info.json, for the message if it is no file
    // either.
    let mut not_named = format!("not a dataset of {}", info_path.display());
    if dataset_dir.is_file() {
        return Err(DataError::File {
            path: dataset_dir.to_path_buf(),
            problem: "`dataset_dir` is a file, not a directory".into(),
        });
    } else if !dataset_dir.exists() {
        not_named = format!("dataset_dir {} does not exist", dataset_dir.display());
    } else if info_path.exists() && !info_path.is_file() {
        return Err(DataError::File {
            path: info_path,
            problem: "not a file".into(),
        });
    } else if !info_path.exists() {
        not_named = format!("{} has no {DATASET_INFO}", dataset_dir.display());
    } else {
        let text = std::fs::read_to_string(&info_path).map_err(|e| DataError::io(&info_path, e))?;
        let info: Value = serde_json::from_str(&text).map_err(|cause| DataError::Json {
            path: info_path.clone(),
            location: crate::error::Location::File,
            cause,
        })?;
        if !info.is_object() {
            return Err(DataError::File {
                path: info_path,
                problem: format!(
                    "must be a JSON object of dataset names to their entries, found {}",
                    json_type(&info)
                ),
            });
        }
        if let Some(entry) = info.get(item) {
            return from_entry(item, entry, dataset_dir, &info_path, stage).map_err(|e| match e {
                DataError::InDataset { .. } => e,
                e => DataError::InDataset {
                    name: item.to_string(),
                    cause: Box::new(e),
                },
            });
        }
    }
    let path = [PathBuf::from(item), dataset_dir.join(item)]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DataError::config(
                "dataset",
                format!("`{item}` is not a file, and {not_named}"),
            )
        })?;
    let format = match stage {
        Stage::Pt => DatasetFormat::Text(TextColumns::default()),
        Stage::Sft => DatasetFormat::Alpaca(AlpacaColumns::default()),
    };
    Ok(DatasetSpec::new(path, format))
}

fn from_entry(
    name: &str,
    entry: &Value,
    dataset_dir: &Path,
    info_path: &Path,
    stage: Stage,
) -> Result<DatasetSpec> {
    let bad = |problem: String| DataError::File {
        path: info_path.to_path_buf(),
        problem,
    };
    let Value::Object(entry) = entry else {
        return Err(bad(format!(
            "the entry must be an object, found {}",
            json_type(entry)
        )));
    };
    for (key, what) in REMOTE_SOURCES {
        if let Some(v) = entry.get(*key) {
            let also = if entry.contains_key("file_name") {
                " (LLaMA-Factory prefers it to `file_name`; remove it to use the local file)"
            } else {
                "; download the data and point `file_name` at it"
            };
            return Err(bad(format!(
                "`{key}` ({v}) loads from {what}, which this build cannot do{also}"
            )));
        }
    }
    let file = match entry.get("file_name") {
        Some(Value::String(f)) => f,
        None => {
            return Err(bad(
                "no `file_name` (nor any source LLaMA-Factory knows)".into()
            ));
        }
        Some(other) => {
            return Err(bad(format!(
                "`file_name` must be a string, found {}",
                json_type(other)
            )));
        }
    };
    let path = dataset_dir.join(file);
    if let Some(Value::Bool(true)) = entry.get("ranking") {
        return Err(bad(format!(
            "`ranking: true` marks preference data (chosen/rejected, for stage rm or dpo) in {}; \
             this build trains stages pt and sft only",
            path.display()
        )));
    }
    match entry.get("split") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "train" => {}
        Some(other) => {
            return Err(bad(format!(
                "`split` {other}: local files form the single split \"train\" (LLaMA-Factory \
                 fails on another split of {} too)",
                path.display()
            )));
        }
    }
    let num_samples = match entry.get("num_samples") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            bad(format!(
                "`num_samples` must be a non-negative integer, found {v}"
            ))
        })? as usize),
    };
    let formatting = match entry.get("formatting") {
        None | Some(Value::Null) => "alpaca",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(bad(format!(
                "`formatting` must be a string, found {}",
                json_type(other)
            )));
        }
    };
    let empty = Map::new();
    let object = |key: &str| -> Result<&Map<String, Value>> {
        match entry.get(key) {
            None | Some(Value::Null) => Ok(&empty),
            Some(Value::Object(o)) => Ok(o),
            Some(other) => Err(bad(format!(
                "`{key}` must be an object, found {}",
                json_type(other)
            ))),
        }
    };
    let columns = object("columns")?;
    let tags = object("tags")?;
    // LLaMA-Factory's DatasetAttr.join: once an entry has `columns` (or `tags`), every name of
    // that section it leaves out is None, not the default.
    let given = |section: &str| matches!(entry.get(section), Some(Value::Object(_)));
    for key in ["images", "videos", "audios", "kto_tag"] {
        if let Some(Value::String(col)) = columns.get(key) {
            return Err(bad(format!(
                "`columns.{key}` ({col}): {} is not supported by this build",
                if key == "kto_tag" {
                    "KTO data (stage kto)"
                } else {
                    "multimodal data"
                }
            )));
        }
    }
    // A column: absent keeps the default (turns it off when the section is given), null turns
    // it off, a string renames it.
    let column = |obj: &Map<String, Value>,
                  section: &str,
                  key: &str,
                  slot: &mut Option<String>|
     -> Result<()> {
        match obj.get(key) {
            None if given(section) => *slot = None,
            None => {}
            Some(Value::Null) => *slot = None,
            Some(Value::String(s)) => *slot = Some(s.clone()),
            Some(other) => {
                return Err(bad(format!(
                    "`{section}.{key}` must be a string or null, found {}",
                    json_type(other)
                )));
            }
        }
        Ok(())
    };
    // A name that cannot be turned off (LLaMA-Factory would fail on a null one).
    let required =
        |obj: &Map<String, Value>, section: &str, key: &str, slot: &mut String| -> Result<()> {
            let mut v = Some(slot.clone());
            column(obj, section, key, &mut v)?;
            *slot = v.ok_or_else(|| {
                bad(if obj.contains_key(key) {
                    format!("`{section}.{key}` cannot be null")
                } else {
                    format!(
                        "`{section}` leaves out `{key}`; LLaMA-Factory then reads none (a given \
                         `{section}` replaces every default), so name it"
                    )
                })
            })?;
            Ok(())
        };
    let format = match (formatting, stage) {
        ("alpaca", Stage::Pt) => {
            // LLaMA-Factory's pt reads the first user message: history's first prompt, else
            // prompt and query joined by a newline (AlpacaDatasetConverter, then
            // PretrainDatasetProcessor's `_prompt[0]["content"]`).
            let defaults = AlpacaColumns::llama_factory();
            let mut text = TextColumns {
                text: defaults.prompt,
                query: Some(defaults.query),
                history: defaults.history,
            };
            required(columns, "columns", "prompt", &mut text.text)?;
            column(columns, "columns", "query", &mut text.query)?;
            column(columns, "columns", "history", &mut text.history)?;
            DatasetFormat::Text(text)
        }
        ("alpaca", Stage::Sft) => {
            let mut c = AlpacaColumns::llama_factory();
            required(columns, "columns", "prompt", &mut c.prompt)?;
            let mut query = Some(c.query.clone());
            column(columns, "columns", "query", &mut query)?;
            // Null turns the input column off; no record has a column named "".
            c.query = query.unwrap_or_default();
            required(columns, "columns", "response", &mut c.response)?;
            column(columns, "columns", "system", &mut c.system)?;
            column(columns, "columns", "history", &mut c.history)?;
            column(columns, "columns", "tools", &mut c.tools)?;
            DatasetFormat::Alpaca(c)
        }
        ("sharegpt" | "openai", _) => {
            let mut c = if formatting == "openai" {
                ShareGptColumns {
                    system: None,
                    ..ShareGptColumns::openai()
                }
            } else {
                ShareGptColumns::llama_factory()
            };
            required(columns, "columns", "messages", &mut c.messages)?;
            column(columns, "columns", "system", &mut c.system)?;
            column(columns, "columns", "tools", &mut c.tools)?;
            for (key, slot) in [
                ("role_tag", &mut c.role_tag),
                ("content_tag", &mut c.content_tag),
                ("user_tag", &mut c.user_tag),
                ("assistant_tag", &mut c.assistant_tag),
            ] {
                required(tags, "tags", key, slot)?;
            }
            column(tags, "tags", "observation_tag", &mut c.observation_tag)?;
            column(tags, "tags", "function_tag", &mut c.function_tag)?;
            column(tags, "tags", "system_tag", &mut c.system_tag)?;
            DatasetFormat::ShareGpt(c)
        }
        (other, _) => {
            return Err(bad(format!(
                "unknown `formatting` `{other}`; known: alpaca, sharegpt, openai"
            )));
        }
    };
    Ok(DatasetSpec {
        path,
        format,
        name: Some(name.to_string()),
        num_samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Conversation, Record, Turn};

    fn dir_with(info: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATASET_INFO), info).unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    fn conv(r: &Record) -> &Conversation {
        match r {
            Record::Conversation(c) => c,
            Record::Text(_) => panic!("not a conversation"),
        }
    }

    #[test]
    fn alpaca_reads_system_history_and_tools_only_when_declared() {
        let row = r#"{"instruction": "i", "input": "x", "output": "o", "system": "S", "history": [["u", "a"]], "tools": "[]"}"#;
        let dir = dir_with(
            r#"{"plain": {"file_name": "a.jsonl"},
                "full": {"file_name": "a.jsonl", "description": "ignored",
                         "columns": {"prompt": "instruction", "response": "output", "system": "system",
                                     "history": "history", "tools": "tools", "whatever": 1}},
                "no_prompt": {"file_name": "a.jsonl", "columns": {"response": "output"}},
                "renamed": {"file_name": "b.json", "columns": {"prompt": "q", "query": null, "response": "r"}}}"#,
            &[
                ("a.jsonl", row),
                ("b.json", r#"[{"q": "Q", "input": "dropped", "r": "R"}]"#),
            ],
        );
        let load = |n: &str| {
            resolve_dataset(n, dir.path(), Stage::Sft)
                .unwrap()
                .load()
                .unwrap()
        };
        // LLaMA-Factory's DatasetAttr has no system/history/tools column by default.
        assert_eq!(conv(&load("plain")[0]), &Conversation::single("i\nx", "o"));
        // A given `columns` replaces every default: `query` is left out, so `input` is not read.
        assert_eq!(
            conv(&load("full")[0]),
            &Conversation {
                system: Some("S".into()),
                turns: vec![Turn::new("u", "a"), Turn::new("i", "o")],
                tools: Some("[]".into()),
            }
        );
        assert_eq!(conv(&load("renamed")[0]), &Conversation::single("Q", "R"));
        let err = resolve_dataset("no_prompt", dir.path(), Stage::Sft)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset `no_prompt`") && err.contains("`columns` leaves out `prompt`"),
            "{err}"
        );
    }

    #[test]
    fn given_tags_replace_every_default_tag() {
        // As mllm_demo in LLaMA-Factory's dataset_info.json: tags without `system_tag`, so a
        // leading `system` message is not a system prompt (LLaMA-Factory drops such a row as
        // broken; here it is an error naming it), and without `role_tag` nothing can be read.
        let dir = dir_with(
            r#"{"m": {"file_name": "m.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
                "bad": {"file_name": "m.jsonl", "formatting": "sharegpt", "tags": {"content_tag": "content"}}}"#,
            &[(
                "m.jsonl",
                concat!(
                    r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#,
                    "\n",
                    r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#,
                ),
            )],
        );
        let err = resolve_dataset("m", dir.path(), Stage::Sft)
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2: field `messages[0].role`") && err.contains("found `system`"),
            "{err}"
        );
        let err = resolve_dataset("bad", dir.path(), Stage::Sft)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tags` leaves out `role_tag`"), "{err}");
    }

    #[test]
    fn sharegpt_tags_system_and_tools_columns() {
        let dir = dir_with(
            r#"{"s": {"file_name": "s.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "msgs", "system": "sys", "tools": "tl"},
                      "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "u", "assistant_tag": "a"}},
                "o": {"file_name": "o.json", "formatting": "openai"}}"#,
            &[
                (
                    "s.jsonl",
                    r#"{"msgs": [{"role": "u", "text": "hi"}, {"role": "a", "text": "yo"}], "sys": "S", "tl": "[{\"name\": \"f\"}]"}"#,
                ),
                (
                    "o.json",
                    r#"[{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}]"#,
                ),
            ],
        );
        let s = resolve_dataset("s", dir.path(), Stage::Sft).unwrap();
        let c = s.load().unwrap();
        assert_eq!(conv(&c[0]).system.as_deref(), Some("S"));
        assert_eq!(conv(&c[0]).tools.as_deref(), Some(r#"[{"name": "f"}]"#));
        assert_eq!(conv(&c[0]).turns, vec![Turn::new("hi", "yo")]);
        let o = resolve_dataset("o", dir.path(), Stage::Sft)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(conv(&o[0]).system.as_deref(), Some("S"));
    }

    #[test]
    fn a_directory_is_every_file_in_name_order() {
        let dir = dir_with(
            r#"{"d": {"file_name": "parts", "num_samples": 3}, "mixed": {"file_name": "mixed"}}"#,
            &[
                ("parts/b.jsonl", r#"{"instruction": "b", "output": "1"}"#),
                ("parts/a.json", r#"[{"instruction": "a", "output": "1"}]"#),
                ("mixed/a.json", r#"[{"instruction": "a", "output": "1"}]"#),
                ("mixed/b.txt", "text"),
            ],
        );
        let d = resolve_dataset("d", dir.path(), Stage::Sft).unwrap();
        assert_eq!(d.num_samples, Some(3));
        assert_eq!(d.name.as_deref(), Some("d"));
        let recs = d.load_with_origins().unwrap();
        let users: Vec<&str> = recs
            .iter()
            .map(|(_, r)| conv(r).turns[0].user.as_str())
            .collect();
        assert_eq!(users, ["a", "b"]);
        assert!(
            recs[1].0.to_string().ends_with("b.jsonl: line 1"),
            "{}",
            recs[1].0
        );
        assert!(recs[1].0.to_string().starts_with("dataset `d`: "));
        let err = resolve_dataset("mixed", dir.path(), Stage::Sft)
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dataset `mixed`: ")
                && err.contains("one type")
                && err.contains("b.txt"),
            "{err}"
        );
    }

    #[test]
    fn entries_this_build_cannot_load_are_refused_by_name() {
        let dir = dir_with(
            r#"{"hub": {"hf_hub_url": "org/data"},
                "hub_and_file": {"hf_hub_url": "org/data", "file_name": "a.json"},
                "ms": {"ms_hub_url": "org/data"},
                "script": {"script_url": "my_script"},
                "cloud": {"cloud_file_name": "s3://b/k.json"},
                "rank": {"file_name": "pairs.json", "ranking": true},
                "split": {"file_name": "a.json", "split": "test"},
                "split_ok": {"file_name": "a.json", "split": "train", "subset": "x", "folder": "y"},
                "img": {"file_name": "a.json", "columns": {"images": "images"}},
                "kto": {"file_name": "a.json", "columns": {"kto_tag": "label"}},
                "fmt": {"file_name": "a.json", "formatting": "parquet"},
                "none": {"formatting": "alpaca"},
                "ns": {"file_name": "a.json", "num_samples": -1},
                "csv": {"file_name": "a.csv"}}"#,
            &[("a.json", "[]"), ("a.csv", "a,b")],
        );
        let cases = [
            (
                "hub",
                "`hf_hub_url` (\"org/data\") loads from the Hugging Face Hub",
            ),
            ("hub_and_file", "prefers it to `file_name`"),
            ("ms", "the ModelScope Hub"),
            ("script", "a dataset loading script"),
            ("cloud", "cloud storage"),
            ("rank", "`ranking: true` marks preference data"),
            ("split", "`split` \"test\""),
            ("img", "`columns.images` (images): multimodal data"),
            ("kto", "KTO data"),
            ("fmt", "unknown `formatting` `parquet`"),
            ("none", "no `file_name`"),
            ("ns", "`num_samples` must be a non-negative integer"),
        ];
        for (name, want) in cases {
            let err = resolve_dataset(name, dir.path(), Stage::Sft)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("dataset `{name}`: ")) && err.contains(DATASET_INFO),
                "{name}: {err}"
            );
            assert!(err.contains(want), "{name}: {err}");
        }
        let err = resolve_dataset("rank", dir.path(), Stage::Sft)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pairs.json"), "{err}");
        resolve_dataset("split_ok", dir.path(), Stage::Sft).unwrap();
        let err = resolve_dataset("csv", dir.path(), Stage::Sft)
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset `csv`: ") && err.contains("csv files are not supported"),
            "{err}"
        );
        let err = resolve_dataset("nope", dir.path(), Stage::Sft)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`nope` is not a file, and not a dataset of"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_dataset_dir_or_dataset_info_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let err = |dataset_dir: &Path| {
            resolve_dataset("addition_train", dataset_dir, Stage::Sft)
                .unwrap_err()
                .to_string()
        };
        let missing = dir.path().join("missing");
        let e = err(&missing);
        assert!(
            e.contains(&format!("dataset_dir {} does not exist", missing.display())),
            "{e}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(
            err(&file).contains("is a file, not a directory"),
            "{}",
            err(&file)
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(
            err(&empty).contains("has no dataset_info.json"),
            "{}",
            err(&empty)
        );
        let as_dir = dir.path().join("as_dir");
        std::fs::create_dir_all(as_dir.join(DATASET_INFO)).unwrap();
        let e = err(&as_dir);
        assert!(e.ends_with("dataset_info.json: not a file"), "{e}");
        let list = dir.path().join("list");
        std::fs::create_dir(&list).unwrap();
        std::fs::write(list.join(DATASET_INFO), "[1, 2]").unwrap();
        let e = err(&list);
        assert!(
            e.contains("must be a JSON object of dataset names") && e.contains("found an array"),
            "{e}"
        );
        // A file named directly still works whatever dataset_dir is.
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{}\n").unwrap();
        resolve_dataset(data.to_str().unwrap(), &missing, Stage::Sft).unwrap();
    }

    #[test]
    fn row_errors_name_dataset_file_and_row() {
        let dir = dir_with(
            r#"{"s": {"file_name": "s.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}}"#,
            &[(
                "s.jsonl",
                concat!(
                    r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}"#,
                    "\n",
                    r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "function_call", "value": "{}"}]}"#,
                    "\n",
                    r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "tools": "{not json"}"#,
                ),
            )],
        );
        let spec = resolve_dataset("s", dir.path(), Stage::Sft).unwrap();
        let err = spec.load().unwrap_err().to_string();
        assert!(
            err.starts_with("dataset `s`: ")
                && err.contains("s.jsonl: line 2: field `conversations[1].from`")
                && err.contains("function-call and tool-result turns"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("s.jsonl"),
            r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "tools": "{not json"}"#,
        )
        .unwrap();
        let err = spec.load().unwrap_err().to_string();
        assert!(
            err.contains("s.jsonl: line 1: field `tools`: invalid JSON in tool description"),
            "{err}"
        );
    }

    #[test]
    fn pt_reads_an_alpaca_entry_as_text_from_its_prompt_column() {
        let dir = dir_with(
            r#"{"c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}}}"#,
            &[("c4.jsonl", "{\"text\": \"hello\"}\n")],
        );
        let recs = resolve_dataset("c4", dir.path(), Stage::Pt)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(recs, vec![Record::Text("hello".into())]);
    }

    /// LLaMA-Factory's pt text is `_prompt[0]["content"]` (PretrainDatasetProcessor) of what
    /// AlpacaDatasetConverter builds: history's first prompt when the row has history, else
    /// `"\n".join` of the non-empty prompt and query.
    #[test]
    fn pt_reads_an_alpaca_entry_as_its_first_user_message() {
        let rows = [
            r#"{"instruction": "i1", "input": "x", "output": "o"}"#,
            r#"{"instruction": "i2", "input": "", "output": "o"}"#,
            r#"{"instruction": "", "input": "only input", "output": "o"}"#,
            r#"{"instruction": "i4", "output": "o", "history": [["h1", "a1"], ["h2", "a2"]]}"#,
            r#"{"instruction": "i5", "output": "o", "history": []}"#,
        ]
        .join("\n");
        let dir = dir_with(
            r#"{"plain": {"file_name": "a.jsonl"},
                "hist": {"file_name": "a.jsonl", "columns": {"prompt": "instruction",
                         "query": "input", "response": "output", "history": "history"}}}"#,
            &[("a.jsonl", &rows)],
        );
        let texts = |name: &str| -> Vec<Record> {
            resolve_dataset(name, dir.path(), Stage::Pt)
                .unwrap()
                .load()
                .unwrap()
        };
        let t = |s: &str| Record::Text(s.into());
        // Default columns: instruction, input (history is off by default, as in LLaMA-Factory).
        assert_eq!(
            texts("plain"),
            [t("i1\nx"), t("i2"), t("only input"), t("i4"), t("i5")]
        );
        assert_eq!(
            texts("hist"),
            [t("i1\nx"), t("i2"), t("only input"), t("h1"), t("i5")]
        );
    }

    /// LLaMA-Factory's pt on a sharegpt entry reads the first message after the system one
    /// (SharegptDatasetConverter's `_prompt[0]`); the rows load as conversations and the
    /// preprocessing takes that message.
    #[test]
    fn pt_accepts_a_sharegpt_entry() {
        let dir = dir_with(
            r#"{"s": {"file_name": "s.jsonl", "formatting": "sharegpt"}}"#,
            &[(
                "s.jsonl",
                r#"{"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"}]}"#,
            )],
        );
        let spec = resolve_dataset("s", dir.path(), Stage::Pt).unwrap();
        let recs = spec.load().unwrap();
        assert_eq!(conv(&recs[0]).turns[0].user, "u1");
    }
}
