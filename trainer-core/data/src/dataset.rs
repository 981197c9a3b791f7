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
//! otherwise the record's `system` field is. Tool/observation turns are not supported.

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
}

impl Conversation {
    /// A one-turn conversation without system prompt.
    pub fn single(user: impl Into<String>, assistant: impl Into<String>) -> Self {
        Conversation {
            system: None,
            turns: vec![Turn::new(user, assistant)],
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
    /// The system column (default `system`); optional.
    pub system: String,
    /// The history column (default `history`); optional list of `[user, assistant]`.
    pub history: String,
}

impl Default for AlpacaColumns {
    fn default() -> Self {
        AlpacaColumns {
            prompt: "instruction".into(),
            query: "input".into(),
            response: "output".into(),
            system: "system".into(),
            history: "history".into(),
        }
    }
}

/// Column and role names of a sharegpt dataset (LLaMA-Factory's `columns` and `tags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShareGptColumns {
    /// The messages column (default `conversations`).
    pub messages: String,
    /// The system column (default `system`), used when the first message is not a system one.
    pub system: String,
    /// The role key of a message (default `from`).
    pub role_tag: String,
    /// The content key of a message (default `value`).
    pub content_tag: String,
    /// The user role (default `human`).
    pub user_tag: String,
    /// The assistant role (default `gpt`).
    pub assistant_tag: String,
    /// The system role (default `system`).
    pub system_tag: String,
}

impl Default for ShareGptColumns {
    fn default() -> Self {
        ShareGptColumns {
            messages: "conversations".into(),
            system: "system".into(),
            role_tag: "from".into(),
            content_tag: "value".into(),
            user_tag: "human".into(),
            assistant_tag: "gpt".into(),
            system_tag: "system".into(),
        }
    }
}

impl ShareGptColumns {
    /// ShareGPT with OpenAI-style names: `messages` of `{role, content}` with roles
    /// `user`/`assistant`/`system`.
    pub fn openai() -> Self {
        ShareGptColumns {
            messages: "messages".into(),
            system: "system".into(),
            role_tag: "role".into(),
            content_tag: "content".into(),
            user_tag: "user".into(),
            assistant_tag: "assistant".into(),
            system_tag: "system".into(),
        }
    }

    /// The default sharegpt columns with user/assistant role names `user` and `assistant`.
    pub fn with_user_assistant_roles(mut self) -> Self {
        self.user_tag = "user".into();
        self.assistant_tag = "assistant".into();
        self
    }
}

/// Column name of a plain-text dataset in JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextColumns {
    /// The text column (default `text`).
    pub text: String,
}

impl Default for TextColumns {
    fn default() -> Self {
        TextColumns {
            text: "text".into(),
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

/// A dataset: a file and its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// The `.json`, `.jsonl` or `.txt` file.
    pub path: PathBuf,
    /// Its layout.
    pub format: DatasetFormat,
}

impl DatasetSpec {
    /// A spec from a path and a format.
    pub fn new(path: impl Into<PathBuf>, format: DatasetFormat) -> Self {
        DatasetSpec {
            path: path.into(),
            format,
        }
    }

    /// Reads the records (see [`load_records`]).
    pub fn load(&self) -> Result<Vec<Record>> {
        load_records(&self.path, &self.format)
    }
}

/// Reads every record of a dataset file. An empty dataset is an error.
pub fn load_records(path: &Path, format: &DatasetFormat) -> Result<Vec<Record>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let records = match ext.as_deref() {
        Some("txt") => match format {
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
        Some("json") | Some("jsonl") => {
            let values = read_json_values(path)?;
            let mut out = Vec::with_capacity(values.len());
            for (loc, v) in values {
                let ctx = Ctx { path, loc };
                let obj = ctx.object(&v)?;
                out.push(match format {
                    DatasetFormat::Alpaca(c) => Record::Conversation(parse_alpaca(&ctx, obj, c)?),
                    DatasetFormat::ShareGpt(c) => {
                        Record::Conversation(parse_sharegpt(&ctx, obj, c)?)
                    }
                    DatasetFormat::Text(c) => Record::Text(ctx.required_str(obj, &c.text)?),
                });
            }
            out
        }
        _ => {
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

fn read_text_lines(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Record::Text(l.to_string()))
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
    let system = ctx.optional_str(obj, &c.system)?.filter(|s| !s.is_empty());
    let mut turns = Vec::new();
    match obj.get(&c.history) {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (i, pair) in pairs.iter().enumerate() {
                let field = format!("{}[{i}]", c.history);
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
        Some(other) => {
            return Err(ctx.field_err(
                &c.history,
                format!(
                    "expected a list of [user, assistant] pairs, found {}",
                    json_type(other)
                ),
            ));
        }
    }
    turns.push(Turn::new(alpaca_query(&instruction, &input), output));
    Ok(Conversation { system, turns })
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
        && *role == c.system_tag
    {
        system = Some(content.clone());
        rest = &rest[1..];
    }
    if system.is_none() {
        system = ctx.optional_str(obj, &c.system)?;
    }
    let system = system.filter(|s| !s.is_empty());
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
    Ok(Conversation { system, turns })
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
        assert!(err.contains("x.csv: unsupported file type"), "{err}");

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
                turns: vec![Turn::new("u1", "a1"), Turn::new("u2", "a2")]
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
        };
        assert_eq!(Record::Conversation(c).texts(), vec!["s", "u", "a"]);
        assert_eq!(Record::Text("t".into()).texts(), vec!["t"]);
    }
}
