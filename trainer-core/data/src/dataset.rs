//! Dataset readers: alpaca and sharegpt conversations (LLaMA-Factory's two formats) and plain
//! text for `stage: pt`, from `.json` (a top-level array; a `.json` file holding JSON Lines is
//! accepted too, as Hugging Face `datasets` does), `.jsonl` (one object per line, blank lines
//! skipped) or `.txt` (plain text only: one sample per non-blank line).
//!
//! Errors name the file, the record (`line N` for JSON Lines, `record N (0-based)` for arrays)
//! and the field, e.g. `data/train.jsonl: line 7: field `output`: missing`.
//!
//! Alpaca records become one conversation: the history pairs, then a user turn
//! `instruction + "\n" + input` (either part left out when empty) answered by `output`; an
//! empty or absent `system` means none (the template's default system then applies).
//! ShareGPT records must alternate user and assistant messages, starting with the user and
//! ending with the assistant; a leading message with the system role is the system prompt,
//! otherwise the record's `system` column is. Both formats may name a `tools` column: a JSON
//! list of tool definitions, as a string (LLaMA-Factory's `tools`), which the template renders
//! into the system block. Function-call and observation turns are not supported yet (an error
//! naming the record).
//!
//! Columns a dataset reads: with a `dataset_info.json` entry ([`crate::dataset_info`]) exactly
//! LLaMA-Factory's, so `system`, `history` and `tools` only when its `columns` name them
//! ([`AlpacaColumns::llama_factory`]); a file given by path has no entry to name them, so it
//! reads `system` and `history` when present ([`AlpacaColumns::default`]).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};
use crate::tokenizer::json_type;

/// One exchange: a user message and the assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The user's message.
    pub user: String,
    /// The assistant's answer (trained on in SFT).
    pub assistant: String,
}

impl Turn {
    /// A turn from two strings.
    pub fn new(user: impl Into<String>, assistant: impl Into<String>) -> Self {
        Turn {
            user: user.into(),
            assistant: assistant.into(),
        }
    }
}

/// A conversation: an optional system prompt and one or more turns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Conversation {
    /// The system prompt; `None` lets the template's default system apply.
    pub system: Option<String>,
    /// The turns, oldest first.
    pub turns: Vec<Turn>,
    /// Tool definitions (a JSON list, as text), rendered by the template into the system block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<String>,
}

impl Conversation {
    /// A one-turn conversation without system prompt.
    pub fn single(user: impl Into<String>, assistant: impl Into<String>) -> Self {
        Conversation {
            system: None,
            turns: vec![Turn::new(user, assistant)],
            tools: None,
        }
    }

    /// Every text of the conversation (system, then user and assistant messages), e.g. to
    /// train a tokenizer on.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.system.as_deref().into_iter().chain(
            self.turns
                .iter()
                .flat_map(|t| [t.user.as_str(), t.assistant.as_str()]),
        )
    }
}

/// One record of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A conversation (alpaca or sharegpt), for `stage: sft`.
    Conversation(Conversation),
    /// A text, for `stage: pt`.
    Text(String),
}

impl Record {
    /// Every text of the record (see [`Conversation::texts`]).
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Record::Conversation(c) => c.texts().collect(),
            Record::Text(t) => vec![t.as_str()],
        }
    }
}

/// An alpaca record as written to disk (LLaMA-Factory's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlpacaRecord {
    /// The instruction (user message).
    pub instruction: String,
    /// Extra input appended to the instruction after a newline; may be empty.
    #[serde(default)]
    pub input: String,
    /// The answer.
    pub output: String,
    /// The system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Earlier `[user, assistant]` pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<[String; 2]>,
}

impl AlpacaRecord {
    /// A record with only instruction and output.
    pub fn new(instruction: impl Into<String>, output: impl Into<String>) -> Self {
        AlpacaRecord {
            instruction: instruction.into(),
            input: String::new(),
            output: output.into(),
            system: None,
            history: Vec::new(),
        }
    }

    /// The conversation this record stands for (same rules as [`load_records`]).
    pub fn to_conversation(&self) -> Conversation {
        let mut turns: Vec<Turn> = self
            .history
            .iter()
            .map(|[u, a]| Turn::new(u.clone(), a.clone()))
            .collect();
        turns.push(Turn::new(
            alpaca_query(&self.instruction, &self.input),
            self.output.clone(),
        ));
        Conversation {
            system: self.system.clone().filter(|s| !s.is_empty()),
            turns,
            tools: None,
        }
    }
}

fn alpaca_query(instruction: &str, input: &str) -> String {
    match (instruction.is_empty(), input.is_empty()) {
        (false, false) => format!("{instruction}\n{input}"),
        (false, true) => instruction.to_string(),
        (true, _) => input.to_string(),
    }
}

/// Column names of an alpaca dataset (LLaMA-Factory's `columns` of `dataset_info.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlpacaColumns {
    /// The instruction column (default `instruction`); required in every record.
    pub prompt: String,
    /// The input column (default `input`); optional.
    pub query: String,
    /// The answer column (default `output`); required.
    pub response: String,
    /// The system column, if read; optional in a record.
    pub system: Option<String>,
    /// The history column, if read; optional list of `[user, assistant]` in a record.
    pub history: Option<String>,
    /// The tools column, if read; optional JSON text of a list of tool definitions.
    pub tools: Option<String>,
}

impl Default for AlpacaColumns {
    /// For a file given by path: `instruction`, `input`, `output`, and `system` and `history`
    /// when a record has them.
    fn default() -> Self {
        AlpacaColumns {
            prompt: "instruction".into(),
            query: "input".into(),
            response: "output".into(),
            system: Some("system".into()),
            history: Some("history".into()),
            tools: None,
        }
    }
}

impl AlpacaColumns {
    /// LLaMA-Factory's defaults for a `dataset_info.json` entry (`DatasetAttr`): `instruction`,
    /// `input`, `output`; no system, history or tools column unless `columns` names one.
    pub fn llama_factory() -> Self {
        AlpacaColumns {
            system: None,
            history: None,
            ..Self::default()
        }
    }
}

/// Column and role names of a sharegpt dataset (LLaMA-Factory's `columns` and `tags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShareGptColumns {
    /// The messages column (default `conversations`).
    pub messages: String,
    /// The system column, if read, used when the first message is not a system one.
    pub system: Option<String>,
    /// The tools column, if read; optional JSON text of a list of tool definitions.
    pub tools: Option<String>,
    /// The role key of a message (default `from`).
    pub role_tag: String,
    /// The content key of a message (default `value`).
    pub content_tag: String,
    /// The user role (default `human`).
    pub user_tag: String,
    /// The assistant role (default `gpt`).
    pub assistant_tag: String,
    /// The tool-result role (default `observation`; such turns are refused for now; `None`: no
    /// such role, as when `tags` leaves it out).
    pub observation_tag: Option<String>,
    /// The function-call role (default `function_call`; refused like `observation_tag`).
    pub function_tag: Option<String>,
    /// The system role of a leading message (default `system`; `None`: no such message).
    pub system_tag: Option<String>,
}

impl Default for ShareGptColumns {
    /// For a file given by path: LLaMA-Factory's names, and the `system` column when a record
    /// has one.
    fn default() -> Self {
        ShareGptColumns {
            messages: "conversations".into(),
            system: Some("system".into()),
            tools: None,
            role_tag: "from".into(),
            content_tag: "value".into(),
            user_tag: "human".into(),
            assistant_tag: "gpt".into(),
            observation_tag: Some("observation".into()),
            function_tag: Some("function_call".into()),
            system_tag: Some("system".into()),
        }
    }
}

impl ShareGptColumns {
    /// ShareGPT with OpenAI-style names: `messages` of `{role, content}` with roles
    /// `user`/`assistant`/`system`.
    pub fn openai() -> Self {
        ShareGptColumns {
            messages: "messages".into(),
            role_tag: "role".into(),
            content_tag: "content".into(),
            user_tag: "user".into(),
            assistant_tag: "assistant".into(),
            ..Self::default()
        }
    }

    /// LLaMA-Factory's defaults for a `dataset_info.json` entry: as [`Self::default`] but no
    /// system column unless `columns` names one.
    pub fn llama_factory() -> Self {
        ShareGptColumns {
            system: None,
            ..Self::default()
        }
    }

    /// The default sharegpt columns with user/assistant role names `user` and `assistant`.
    pub fn with_user_assistant_roles(mut self) -> Self {
        self.user_tag = "user".into();
        self.assistant_tag = "assistant".into();
        self
    }
}

/// Column names of a plain-text dataset in JSON form. `stage: pt` on an alpaca
/// `dataset_info.json` entry reads it this way too, as LLaMA-Factory's pre-training processor
/// reads the first user message (`_prompt[0]`): the first prompt of `history` when the row
/// has one, else `text` and `query` joined by a newline (each only when not empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextColumns {
    /// The text column (default `text`; alpaca's `prompt`).
    pub text: String,
    /// Alpaca's `query` column, if read.
    pub query: Option<String>,
    /// Alpaca's `history` column, if read.
    pub history: Option<String>,
}

impl Default for TextColumns {
    fn default() -> Self {
        TextColumns {
            text: "text".into(),
            query: None,
            history: None,
        }
    }
}

/// How a dataset file is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetFormat {
    /// Alpaca records.
    Alpaca(AlpacaColumns),
    /// ShareGPT conversations.
    ShareGpt(ShareGptColumns),
    /// Plain text (`stage: pt`).
    Text(TextColumns),
}

/// Names accepted by `DatasetFormat::from_str`.
pub const FORMAT_NAMES: &[&str] = &["alpaca", "sharegpt", "openai", "text"];

impl FromStr for DatasetFormat {
    type Err = DataError;

    /// `alpaca`, `sharegpt` (from/value, human/gpt), `openai` (sharegpt with messages of
    /// role/content, user/assistant) or `text`, each with default column names.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alpaca" => Ok(DatasetFormat::Alpaca(AlpacaColumns::default())),
            "sharegpt" => Ok(DatasetFormat::ShareGpt(ShareGptColumns::default())),
            "openai" => Ok(DatasetFormat::ShareGpt(ShareGptColumns::openai())),
            "text" => Ok(DatasetFormat::Text(TextColumns::default())),
            _ => Err(DataError::UnknownName {
                kind: "dataset format",
                name: s.to_string(),
                known: FORMAT_NAMES.join(", "),
            }),
        }
    }
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetFormat::Alpaca(_) => "alpaca",
            DatasetFormat::ShareGpt(_) => "sharegpt",
            DatasetFormat::Text(_) => "text",
        })
    }
}

/// A dataset: a file (or a directory of files) and its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// The `.json`, `.jsonl` or `.txt` file, or a directory whose every entry is one such
    /// file, all of one type (LLaMA-Factory's `file_name`).
    pub path: PathBuf,
    /// Its layout.
    pub format: DatasetFormat,
    /// Its name in `dataset_info.json`, named by its errors; `None` for a file given by path.
    pub name: Option<String>,
    /// `num_samples` of its `dataset_info.json` entry (see [`crate::mix::select_rows`]).
    pub num_samples: Option<usize>,
}

/// Where a record came from, for errors found after loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The dataset's name in `dataset_info.json`, if it has one.
    pub dataset: Option<String>,
    /// The file.
    pub path: PathBuf,
    /// The record in the file.
    pub location: Location,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.dataset {
            write!(f, "dataset `{d}`: ")?;
        }
        write!(f, "{}: {}", self.path.display(), self.location)
    }
}

/// File types by extension, as LLaMA-Factory's `FILEEXT2TYPE` groups them; `None` for one it
/// does not know.
fn file_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "json" | "jsonl" => "json",
        "txt" => "text",
        "csv" => "csv",
        "parquet" => "parquet",
        "arrow" => "arrow",
        _ => return None,
    })
}

impl DatasetSpec {
    /// A spec from a path and a format, without a name or `num_samples`.
    pub fn new(path: impl Into<PathBuf>, format: DatasetFormat) -> Self {
        DatasetSpec {
            path: path.into(),
            format,
            name: None,
            num_samples: None,
        }
    }

    fn named(&self, e: DataError) -> DataError {
        match &self.name {
            Some(name) => DataError::InDataset {
                name: name.clone(),
                cause: Box::new(e),
            },
            None => e,
        }
    }

    /// The files of the dataset: the path itself, or every entry of the directory sorted by
    /// name. LLaMA-Factory takes a directory's entries in `os.listdir` order (which Python
    /// leaves unspecified) and requires one file type for all (`.json` and `.jsonl` are one
    /// type); we sort, so that the row order does not depend on the file system.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        let files = if self.path.is_dir() {
            let mut files = Vec::new();
            let entries = std::fs::read_dir(&self.path)
                .map_err(|e| self.named(DataError::io(&self.path, e)))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.named(DataError::io(&self.path, e)))?;
                files.push(entry.path());
            }
            files.sort();
            if files.is_empty() {
                return Err(self.named(DataError::File {
                    path: self.path.clone(),
                    problem: "the directory holds no dataset file".into(),
                }));
            }
            let first = file_type(&files[0]);
            if let Some(other) = files
                .iter()
                .find(|f| file_type(f) != first || first.is_none())
            {
                return Err(self.named(DataError::File {
                    path: self.path.clone(),
                    problem: format!(
                        "every file of a dataset directory must be of one type (.json/.jsonl,                          or .txt), as LLaMA-Factory requires; `{}` is not of the type of `{}`",
                        other.display(),
                        files[0].display()
                    ),
                }));
            }
            files
        } else if self.path.is_file() {
            vec![self.path.clone()]
        } else {
            return Err(self.named(DataError::File {
                path: self.path.clone(),
                problem: "no such file or directory".into(),
            }));
        };
        Ok(files)
    }

    /// Reads the records of every file, in order (see [`load_records`]); errors name the
    /// dataset as well.
    pub fn load(&self) -> Result<Vec<Record>> {
        Ok(self
            .load_with_origins()?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// [`Self::load`], each record with where it came from.
    pub fn load_with_origins(&self) -> Result<Vec<(Origin, Record)>> {
        let mut out = Vec::new();
        for file in self.files()? {
            let records = load_located(&file, &self.format).map_err(|e| self.named(e))?;
            out.extend(records.into_iter().map(|(location, r)| {
                (
                    Origin {
                        dataset: self.name.clone(),
                        path: file.clone(),
                        location,
                    },
                    r,
                )
            }));
        }
        Ok(out)
    }
}

/// Reads every record of a dataset file. An empty dataset is an error.
pub fn load_records(path: &Path, format: &DatasetFormat) -> Result<Vec<Record>> {
    Ok(load_located(path, format)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`load_records`], each record with its location in the file.
fn load_located(path: &Path, format: &DatasetFormat) -> Result<Vec<(Location, Record)>> {
    let records = match file_type(path) {
        Some("text") => match format {
            DatasetFormat::Text(_) => read_text_lines(path)?,
            other => {
                return Err(DataError::File {
                    path: path.to_path_buf(),
                    problem: format!(
                        "a .txt file holds plain text (format `text`), not {other} records"
                    ),
                });
            }
        },
        Some("json") => {
            let values = read_json_values(path)?;
            let mut out = Vec::with_capacity(values.len());
            for (loc, v) in values {
                let ctx = Ctx { path, loc };
                let obj = ctx.object(&v)?;
                out.push((
                    loc,
                    match format {
                        DatasetFormat::Alpaca(c) => {
                            Record::Conversation(parse_alpaca(&ctx, obj, c)?)
                        }
                        DatasetFormat::ShareGpt(c) => {
                            Record::Conversation(parse_sharegpt(&ctx, obj, c)?)
                        }
                        DatasetFormat::Text(c) => Record::Text(parse_text(&ctx, obj, c)?),
                    },
                ));
            }
            out
        }
        Some(other) => {
            return Err(DataError::File {
                path: path.to_path_buf(),
                problem: format!(
                    "{other} files are not supported by this build (LLaMA-Factory reads them);                      convert to .json, .jsonl or .txt"
                ),
            });
        }
        None => {
            return Err(DataError::File {
                path: path.to_path_buf(),
                problem: "unsupported file type: expected .json, .jsonl or .txt".into(),
            });
        }
    };
    if records.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            problem: "the dataset has no records".into(),
        });
    }
    Ok(records)
}

/// The JSON values of a `.json` array or of JSON Lines, each with its location.
pub fn read_json_values(path: &Path) -> Result<Vec<(Location, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_array = text.trim_start().starts_with('[');
    if is_array {
        let v: Value = serde_json::from_str(text).map_err(|cause| DataError::Json {
            path: path.to_path_buf(),
            location: Location::File,
            cause,
        })?;
        let Value::Array(items) = v else {
            unreachable!("text starting with '[' parsed as JSON is an array")
        };
        Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (Location::Record(i), v))
            .collect())
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|cause| DataError::Json {
                path: path.to_path_buf(),
                location: Location::Line(i + 1),
                cause,
            })?;
            out.push((Location::Line(i + 1), v));
        }
        Ok(out)
    }
}

fn read_text_lines(path: &Path) -> Result<Vec<(Location, Record)>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (Location::Line(i + 1), Record::Text(l.to_string())))
        .collect())
}

/// Writes `items` as JSON Lines.
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    for item in items {
        serde_json::to_writer(&mut w, item).map_err(|e| DataError::io(path, e.into()))?;
        w.write_all(b"\n").map_err(|e| DataError::io(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}

/// Writes `items` as one pretty-printed JSON array.
pub fn write_json<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let text = serde_json::to_string_pretty(items).map_err(|e| DataError::io(path, e.into()))?;
    std::fs::write(path, text).map_err(|e| DataError::io(path, e))
}

/// Error context of one record.
struct Ctx<'a> {
    path: &'a Path,
    loc: Location,
}

impl Ctx<'_> {
    fn field_err(&self, field: impl Into<String>, problem: impl Into<String>) -> DataError {
        DataError::Field {
            path: self.path.to_path_buf(),
            location: self.loc,
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn object<'v>(&self, v: &'v Value) -> Result<&'v Map<String, Value>> {
        v.as_object().ok_or_else(|| DataError::File {
            path: self.path.to_path_buf(),
            problem: format!(
                "{}: expected a JSON object, found {}",
                self.loc,
                json_type(v)
            ),
        })
    }

    fn required_str(&self, obj: &Map<String, Value>, key: &str) -> Result<String> {
        match obj.get(key) {
            None => Err(self.field_err(key, "missing")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.field_err(
                key,
                format!("expected a string, found {}", json_type(other)),
            )),
        }
    }

    /// The tools column: absent, null or empty means none; else JSON text of a list (checked
    /// here, so that a bad one is reported with its record; LLaMA-Factory fails on it while
    /// tokenizing).
    fn tools(&self, obj: &Map<String, Value>, key: Option<&str>) -> Result<Option<String>> {
        let Some(key) = key else {
            return Ok(None);
        };
        let Some(text) = self.optional_str(obj, key)?.filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(_)) => Ok(Some(text)),
            Ok(other) => Err(self.field_err(
                key,
                format!(
                    "expected a JSON list of tool definitions, found {}",
                    json_type(&other)
                ),
            )),
            Err(e) => Err(self.field_err(key, format!("invalid JSON in tool description: {e}"))),
        }
    }

    /// A string field that may be absent or null (then `None`).
    fn optional_str(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.field_err(
                key,
                format!("expected a string or null, found {}", json_type(other)),
            )),
        }
    }
}

fn parse_alpaca(
    ctx: &Ctx<'_>,
    obj: &Map<String, Value>,
    c: &AlpacaColumns,
) -> Result<Conversation> {
    let instruction = ctx.required_str(obj, &c.prompt)?;
    let input = ctx.optional_str(obj, &c.query)?.unwrap_or_default();
    let output = ctx.required_str(obj, &c.response)?;
    let system = match &c.system {
        Some(col) => ctx.optional_str(obj, col)?.filter(|s| !s.is_empty()),
        None => None,
    };
    let tools = ctx.tools(obj, c.tools.as_deref())?;
    let mut turns = Vec::new();
    let history = c
        .history
        .as_deref()
        .and_then(|h| obj.get(h).map(|v| (h, v)));
    match history {
        None | Some((_, Value::Null)) => {}
        Some((col, Value::Array(pairs))) => {
            for (i, pair) in pairs.iter().enumerate() {
                let field = format!("{col}[{i}]");
                let bad = || ctx.field_err(&field, "expected a [user, assistant] pair of strings");
                let Value::Array(p) = pair else {
                    return Err(bad());
                };
                match p.as_slice() {
                    [Value::String(u), Value::String(a)] => {
                        turns.push(Turn::new(u.clone(), a.clone()))
                    }
                    _ => return Err(bad()),
                }
            }
        }
        Some((col, other)) => {
            return Err(ctx.field_err(
                col,
                format!(
                    "expected a list of [user, assistant] pairs, found {}",
                    json_type(other)
                ),
            ));
        }
    }
    turns.push(Turn::new(alpaca_query(&instruction, &input), output));
    Ok(Conversation {
        system,
        turns,
        tools,
    })
}

/// A text row: see [`TextColumns`].
fn parse_text(ctx: &Ctx<'_>, obj: &Map<String, Value>, c: &TextColumns) -> Result<String> {
    if let Some(col) = &c.history
        && let Some(Value::Array(pairs)) = obj.get(col)
        && let Some(first) = pairs.first()
    {
        return match first {
            Value::Array(p) => match p.as_slice() {
                [Value::String(u), Value::String(_)] => Ok(u.clone()),
                _ => Err(ctx.field_err(
                    format!("{col}[0]"),
                    "expected a [user, assistant] pair of strings",
                )),
            },
            _ => Err(ctx.field_err(
                format!("{col}[0]"),
                "expected a [user, assistant] pair of strings",
            )),
        };
    }
    let text = ctx.required_str(obj, &c.text)?;
    let query = match &c.query {
        Some(q) => ctx.optional_str(obj, q)?.unwrap_or_default(),
        None => String::new(),
    };
    Ok(alpaca_query(&text, &query))
}

fn parse_sharegpt(
    ctx: &Ctx<'_>,
    obj: &Map<String, Value>,
    c: &ShareGptColumns,
) -> Result<Conversation> {
    let messages = match obj.get(&c.messages) {
        None => return Err(ctx.field_err(&c.messages, "missing")),
        Some(Value::Array(m)) => m,
        Some(other) => {
            return Err(ctx.field_err(
                &c.messages,
                format!("expected a list of messages, found {}", json_type(other)),
            ));
        }
    };
    // (index, role, content)
    let mut parsed: Vec<(usize, String, String)> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(mo) = m else {
            return Err(ctx.field_err(
                format!("{}[{i}]", c.messages),
                format!("expected a message object, found {}", json_type(m)),
            ));
        };
        let sub = |key: &str| format!("{}[{i}].{key}", c.messages);
        let get = |key: &str| -> Result<String> {
            match mo.get(key) {
                None => Err(ctx.field_err(sub(key), "missing")),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(ctx.field_err(
                    sub(key),
                    format!("expected a string, found {}", json_type(other)),
                )),
            }
        };
        parsed.push((i, get(&c.role_tag)?, get(&c.content_tag)?));
    }
    let mut rest = parsed.as_slice();
    let mut system = None;
    if let Some((_, role, content)) = rest.first()
        && Some(role) == c.system_tag.as_ref()
    {
        system = Some(content.clone());
        rest = &rest[1..];
    }
    if system.is_none()
        && let Some(col) = &c.system
    {
        system = ctx.optional_str(obj, col)?;
    }
    let system = system.filter(|s| !s.is_empty());
    let tools = ctx.tools(obj, c.tools.as_deref())?;
    if let Some((i, role, _)) = rest.iter().find(|(_, role, _)| {
        Some(role) == c.function_tag.as_ref() || Some(role) == c.observation_tag.as_ref()
    }) {
        return Err(ctx.field_err(
            format!("{}[{i}].{}", c.messages, c.role_tag),
            format!("function-call and tool-result turns are not supported yet; found `{role}`"),
        ));
    }
    if rest.is_empty() {
        return Err(ctx.field_err(&c.messages, "no user/assistant messages"));
    }
    let mut turns = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        let (ui, urole, ucontent) = &pair[0];
        if *urole != c.user_tag {
            return Err(ctx.field_err(
                format!("{}[{ui}].{}", c.messages, c.role_tag),
                format!(
                    "expected the user role `{}` (messages alternate user, assistant), found `{urole}`",
                    c.user_tag
                ),
            ));
        }
        let Some((ai, arole, acontent)) = pair.get(1) else {
            return Err(ctx.field_err(
                &c.messages,
                format!(
                    "the conversation ends with a user message; the last message must be the \
                     assistant's (`{}`)",
                    c.assistant_tag
                ),
            ));
        };
        if *arole != c.assistant_tag {
            return Err(ctx.field_err(
                format!("{}[{ai}].{}", c.messages, c.role_tag),
                format!(
                    "expected the assistant role `{}` (messages alternate user, assistant), found `{arole}`",
                    c.assistant_tag
                ),
            ));
        }
        turns.push(Turn::new(ucontent.clone(), acontent.clone()));
    }
    Ok(Conversation {
        system,
        turns,
        tools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn alpaca() -> DatasetFormat {
        "alpaca".parse().unwrap()
    }

    fn sharegpt() -> DatasetFormat {
        "sharegpt".parse().unwrap()
    }

    fn conv(r: &Record) -> &Conversation {
        match r {
            Record::Conversation(c) => c,
            Record::Text(_) => panic!("not a conversation"),
        }
    }

    #[test]
    fn alpaca_json_array_with_all_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.json",
            r#"[
              {"instruction": "Add", "input": "1 + 2", "output": "3"},
              {"instruction": "Hi", "output": "Hello", "system": "Be brief.",
               "history": [["q1", "a1"], ["q2", "a2"]]},
              {"instruction": "", "input": "only input", "output": "x", "system": "", "input2": 5},
              {"instruction": "no input", "input": null, "output": "", "system": null, "history": null}
            ]"#,
        );
        let recs = load_records(&p, &alpaca()).unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(conv(&recs[0]), &Conversation::single("Add\n1 + 2", "3"));
        assert_eq!(
            conv(&recs[1]),
            &Conversation {
                system: Some("Be brief.".into()),
                turns: vec![
                    Turn::new("q1", "a1"),
                    Turn::new("q2", "a2"),
                    Turn::new("Hi", "Hello")
                ],
                tools: None,
            }
        );
        assert_eq!(conv(&recs[2]), &Conversation::single("only input", "x"));
        assert_eq!(conv(&recs[3]), &Conversation::single("no input", ""));
    }

    #[test]
    fn alpaca_record_round_trips_through_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut r = AlpacaRecord::new("What is 1 + 2?", "3");
        r.system = Some("sys".into());
        r.history = vec![["u".into(), "a".into()]];
        let rs = vec![r.clone(), AlpacaRecord::new("i", "o")];
        write_jsonl(&p, &rs).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.lines().nth(1).unwrap().contains("history"));
        let recs = load_records(&p, &alpaca()).unwrap();
        assert_eq!(conv(&recs[0]), &r.to_conversation());
        assert_eq!(conv(&recs[1]), &rs[1].to_conversation());
        let back: AlpacaRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, r);
        // The same records as a JSON array.
        let pj = dir.path().join("a.json");
        write_json(&pj, &rs).unwrap();
        assert_eq!(load_records(&pj, &alpaca()).unwrap(), recs);
    }

    #[test]
    fn alpaca_errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bad.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\"}\n",
        );
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl: line 3: field `output`: missing"),
            "{err}"
        );

        let p = write(
            dir.path(),
            "bad2.json",
            r#"[{"instruction": "a", "output": 3}]"#,
        );
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(
            err.contains(
                "bad2.json: record 0 (0-based): field `output`: expected a string, found a number"
            ),
            "{err}"
        );

        let p = write(
            dir.path(),
            "bad3.jsonl",
            r#"{"instruction": "a", "output": "b", "history": [["x"]]}"#,
        );
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(err.contains("line 1: field `history[0]`"), "{err}");

        let p = write(dir.path(), "bad4.jsonl", "{\"instruction\": \"a\", \n");
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(err.contains("bad4.jsonl: line 1: invalid JSON"), "{err}");

        let p = write(dir.path(), "bad5.json", "[1, 2]");
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(
            err.contains("bad5.json: record 0 (0-based): expected a JSON object, found a number"),
            "{err}"
        );

        let p = write(dir.path(), "bad6.json", "[{\"instruction\": ]");
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(
            err.contains("bad6.json: file: invalid JSON") && err.contains("line 1"),
            "{err}"
        );

        let p = write(dir.path(), "empty.jsonl", "\n\n");
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(
            err.contains("empty.jsonl: the dataset has no records"),
            "{err}"
        );

        let p = write(dir.path(), "x.csv", "a,b");
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(err.contains("x.csv: csv files are not supported"), "{err}");

        let err = load_records(&dir.path().join("missing.json"), &alpaca())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");

        let p = write(dir.path(), "t.txt", "hello\n");
        let err = load_records(&p, &alpaca()).unwrap_err().to_string();
        assert!(
            err.contains("t.txt") && err.contains("format `text`"),
            "{err}"
        );
    }

    #[test]
    fn json_file_holding_json_lines_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "lines.json",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"output\": \"d\"}\n",
        );
        let recs = load_records(&p, &alpaca()).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(conv(&recs[1]), &Conversation::single("c", "d"));
    }

    #[test]
    fn custom_alpaca_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "c.jsonl", r#"{"q": "question", "a": "answer"}"#);
        let cols: AlpacaColumns =
            serde_json::from_str(r#"{"prompt": "q", "response": "a"}"#).unwrap();
        let recs = load_records(&p, &DatasetFormat::Alpaca(cols)).unwrap();
        assert_eq!(conv(&recs[0]), &Conversation::single("question", "answer"));
        assert!(serde_json::from_str::<AlpacaColumns>(r#"{"promt": "q"}"#).is_err());
    }

    #[test]
    fn sharegpt_default_roles_and_system() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "s.jsonl",
            concat!(
                r#"{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"}]}"#,
                "\n",
                r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "system": "col"}"#,
                "\n",
                r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}"#,
            ),
        );
        let recs = load_records(&p, &sharegpt()).unwrap();
        assert_eq!(
            conv(&recs[0]),
            &Conversation {
                system: Some("S".into()),
                turns: vec![Turn::new("u1", "a1"), Turn::new("u2", "a2")],
                tools: None,
            }
        );
        assert_eq!(conv(&recs[1]).system.as_deref(), Some("col"));
        assert_eq!(conv(&recs[2]), &Conversation::single("u", "a"));
    }

    #[test]
    fn sharegpt_user_assistant_roles_via_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "s.json",
            r#"[{"conversations": [{"from": "user", "value": "u"}, {"from": "assistant", "value": "a"}]}]"#,
        );
        // Default roles reject user/assistant, naming the field and the expected role.
        let err = load_records(&p, &sharegpt()).unwrap_err().to_string();
        assert!(
            err.contains(
                "record 0 (0-based): field `conversations[0].from`: expected the user role `human`"
            ),
            "{err}"
        );
        let cols = ShareGptColumns::default().with_user_assistant_roles();
        let recs = load_records(&p, &DatasetFormat::ShareGpt(cols)).unwrap();
        assert_eq!(conv(&recs[0]), &Conversation::single("u", "a"));
        // OpenAI style messages.
        let p = write(
            dir.path(),
            "o.jsonl",
            r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#,
        );
        let recs = load_records(&p, &"openai".parse().unwrap()).unwrap();
        assert_eq!(conv(&recs[0]).system.as_deref(), Some("S"));
        assert_eq!(conv(&recs[0]).turns, vec![Turn::new("u", "a")]);
        // Roles from a YAML/JSON config.
        let cols: ShareGptColumns =
            serde_json::from_str(r#"{"user_tag": "user", "assistant_tag": "bot"}"#).unwrap();
        assert_eq!(cols.assistant_tag, "bot");
        assert_eq!(cols.role_tag, "from");
    }

    #[test]
    fn sharegpt_structure_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"conversations": [{"from": "human", "value": "u"}]}"#,
                "field `conversations`: the conversation ends with a user message",
            ),
            (
                r#"{"conversations": [{"from": "gpt", "value": "a"}]}"#,
                "field `conversations[0].from`: expected the user role `human`",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "human", "value": "u"}]}"#,
                "field `conversations[1].from`: expected the assistant role `gpt`",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt"}]}"#,
                "field `conversations[1].value`: missing",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}"#,
                "field `conversations[0].value`: expected a string, found a number",
            ),
            (
                r#"{"conversations": []}"#,
                "field `conversations`: no user/assistant messages",
            ),
            (
                r#"{"conversations": [{"from": "system", "value": "s"}]}"#,
                "field `conversations`: no user/assistant messages",
            ),
            (r#"{"conversation": []}"#, "field `conversations`: missing"),
            (
                r#"{"conversations": {}}"#,
                "field `conversations`: expected a list of messages, found an object",
            ),
            (
                r#"{"conversations": ["hi"]}"#,
                "field `conversations[0]`: expected a message object, found a string",
            ),
        ];
        for (i, (line, want)) in cases.iter().enumerate() {
            let p = write(dir.path(), &format!("e{i}.jsonl"), &format!("\n{line}\n"));
            let err = load_records(&p, &sharegpt()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("e{i}.jsonl: line 2: {want}")),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn text_format_from_json_jsonl_and_txt() {
        let dir = tempfile::tempdir().unwrap();
        let text = DatasetFormat::from_str("text").unwrap();
        let p = write(dir.path(), "t.txt", "first line\n\n  \nsecond 🦀\n");
        assert_eq!(
            load_records(&p, &text).unwrap(),
            vec![
                Record::Text("first line".into()),
                Record::Text("second 🦀".into())
            ]
        );
        let p = write(
            dir.path(),
            "t.jsonl",
            "{\"text\": \"a\"}\n{\"text\": \"b\\nc\"}\n",
        );
        assert_eq!(
            load_records(&p, &text).unwrap(),
            vec![Record::Text("a".into()), Record::Text("b\nc".into())]
        );
        let p = write(dir.path(), "t.json", r#"[{"content": "a"}]"#);
        let err = load_records(&p, &text).unwrap_err().to_string();
        assert!(
            err.contains("record 0 (0-based): field `text`: missing"),
            "{err}"
        );
    }

    #[test]
    fn format_names() {
        for n in FORMAT_NAMES {
            assert!(DatasetFormat::from_str(n).is_ok());
        }
        let err = DatasetFormat::from_str("parquet").unwrap_err().to_string();
        assert!(
            err.contains("unknown dataset format `parquet`") && err.contains("alpaca, sharegpt"),
            "{err}"
        );
        assert_eq!(
            DatasetFormat::from_str("openai").unwrap().to_string(),
            "sharegpt"
        );
    }

    #[test]
    fn record_texts() {
        let c = Conversation {
            system: Some("s".into()),
            turns: vec![Turn::new("u", "a")],
            tools: None,
        };
        assert_eq!(Record::Conversation(c).texts(), vec!["s", "u", "a"]);
        assert_eq!(Record::Text("t".into()).texts(), vec!["t"]);
    }
}
