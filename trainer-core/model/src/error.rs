//! Errors that name the file and the field, tensor or row at fault.

use std::path::{Path, PathBuf};

/// Everything that can go wrong reading, building or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or writing a file.
    /// The cause is part of the message and not a `source()` as well, so that an error chain
    /// (`{:#}`) says it once.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A bad field of a model config.
    #[error("{}field `{field}`: {problem}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Config {
        /// The config file, when known.
        file: Option<PathBuf>,
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A bad weights file or tensor.
    #[error("{}: {problem}", path.display())]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong (names the tensor where there is one).
        problem: String,
    },
    /// Anything else about the model (shapes of inputs, a missing tensor in memory).
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, cause: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            cause,
        }
    }

    /// A weights error.
    pub fn weights(path: &Path, problem: impl Into<String>) -> Self {
        ModelError::Weights {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    /// Attaches the config file to a config error.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            ModelError::Config { field, problem, .. } => ModelError::Config {
                file: Some(path.to_path_buf()),
                field,
                problem,
            },
            other => other,
        }
    }
}

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_chain_names_the_cause_once() {
        let e = ModelError::io(
            Path::new("nowhere/config.json"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        // anyhow's `{:#}` prints each error of the source chain: the cause is in the message.
        assert_eq!(e.to_string(), "nowhere/config.json: entity not found");
        assert!(std::error::Error::source(&e).is_none());
    }
}
