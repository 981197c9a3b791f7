//! The crate's error type. Every variant carries enough context to act on: the file, the record
//! (line for `.jsonl`, 0-based index for `.json` arrays), the field, the token or the setting.

use std::fmt;
use std::path::PathBuf;

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Where in a dataset file something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A 1-based line of a `.jsonl` or `.txt` file.
    Line(usize),
    /// A 0-based index into the top-level array of a `.json` file.
    Record(usize),
    /// The file as a whole.
    File,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Record(i) => write!(f, "record {i} (0-based)"),
            Location::File => write!(f, "file"),
        }
    }
}

/// Errors of the data pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        cause: std::io::Error,
    },
    /// A file (or one line of it) is not valid JSON.
    #[error("{}: {location}: invalid JSON: {cause}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The line (JSONL) or the file (JSON).
        location: Location,
        /// serde_json's message (with line and column inside the text it parsed).
        cause: serde_json::Error,
    },
    /// A record lacks a field, or a field has the wrong type or an invalid value.
    #[error("{}: {location}: field `{field}`: {problem}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The record.
        location: Location,
        /// The field, as a path such as `conversations[2].from`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A file's overall shape is wrong (not an array of records, unknown extension, empty...).
    #[error("{}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The `tokenizers` crate failed.
    #[error("tokenizer: {context}: {message}")]
    Tokenizer {
        /// What we were doing (loading which file, encoding, training...).
        context: String,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// A template or setting needs a token the tokenizer does not have as one atomic token.
    #[error(
        "the tokenizer has no special token `{token}` (needed by {needed_by}); train the tokenizer \
         with it (e.g. `BpeTrainingOptions::for_template`) or choose another template"
    )]
    MissingToken {
        /// The token text, e.g. `<|im_start|>`.
        token: String,
        /// Who needs it, e.g. "template `qwen`".
        needed_by: String,
    },
    /// A role token (bos/eos/pad) is needed but the tokenizer has none configured.
    #[error("{needed_by} needs the {role} token, but the tokenizer has none (set `{role}_token`)")]
    MissingRoleToken {
        /// `bos`, `eos` or `pad`.
        role: &'static str,
        /// Who needs it.
        needed_by: String,
    },
    /// A token given by id does not exist.
    #[error("token id {id} is out of the tokenizer's vocabulary (size {vocab_size})")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size (largest id + 1).
        vocab_size: usize,
    },
    /// An error in a dataset named in `dataset_info.json` (also when its entry is wrong). The
    /// cause is part of the message, not also a `source()`, so that an error chain (`{:#}`)
    /// says it once.
    #[error("dataset `{name}`: {cause}")]
    InDataset {
        /// The dataset's name.
        name: String,
        /// What went wrong.
        cause: Box<DataError>,
    },
    /// A name (template, stage, dataset format) is not one we know.
    #[error("unknown {kind} `{name}`; known: {known}")]
    UnknownName {
        /// What kind of name (`template`, `stage`, `dataset format`).
        kind: &'static str,
        /// The name given.
        name: String,
        /// The accepted names, comma separated.
        known: String,
    },
    /// A setting is invalid (zero batch size, cutoff_len 0, vocab too small...).
    #[error("invalid setting `{setting}`: {problem}")]
    Config {
        /// The setting's name as the user writes it.
        setting: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A checkpoint's data position does not match the current data setup.
    #[error(
        "cannot resume the data order: `{field}` is {checkpoint} in the checkpoint but {current} now"
    )]
    ResumeMismatch {
        /// The differing field.
        field: &'static str,
        /// Its value in the checkpoint.
        checkpoint: String,
        /// Its value now.
        current: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn config(setting: &'static str, problem: impl Into<String>) -> Self {
        DataError::Config {
            setting,
            problem: problem.into(),
        }
    }

    pub(crate) fn tokenizer(context: impl Into<String>, message: impl fmt::Display) -> Self {
        DataError::Tokenizer {
            context: context.into(),
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_error_names_file_location_and_field() {
        let e = DataError::Field {
            path: "data/train.jsonl".into(),
            location: Location::Line(7),
            field: "output".into(),
            problem: "missing".into(),
        };
        assert_eq!(
            e.to_string(),
            "data/train.jsonl: line 7: field `output`: missing"
        );
        let e = DataError::Field {
            path: "a.json".into(),
            location: Location::Record(0),
            field: "conversations[1].from".into(),
            problem: "x".into(),
        };
        assert_eq!(
            e.to_string(),
            "a.json: record 0 (0-based): field `conversations[1].from`: x"
        );
    }

    #[test]
    fn a_dataset_error_chain_says_each_part_once() {
        let e = DataError::InDataset {
            name: "addition_train".into(),
            cause: Box::new(DataError::Field {
                path: "train.jsonl".into(),
                location: Location::Line(3),
                field: "output".into(),
                problem: "missing".into(),
            }),
        };
        assert_eq!(
            e.to_string(),
            "dataset `addition_train`: train.jsonl: line 3: field `output`: missing"
        );
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn missing_token_error_names_token_and_user() {
        let e = DataError::MissingToken {
            token: "<|im_start|>".into(),
            needed_by: "template `qwen`".into(),
        };
        let s = e.to_string();
        assert!(s.contains("`<|im_start|>`"), "{s}");
        assert!(s.contains("template `qwen`"), "{s}");
    }
}
