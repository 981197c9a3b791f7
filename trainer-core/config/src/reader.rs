//! Reading a JSON/YAML mapping key by key: every key that is read is marked, so that what is
//! left over can be reported (with its dotted path) as unknown; values are checked with messages
//! that name the field.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::ConfigError;

/// A value that may be written as `"auto"` (resolved later by the HF Trainer rules).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Auto<T> {
    Auto,
    Set(T),
}

impl<T: Copy> Auto<T> {
    /// The explicit value, or `None` for `"auto"`.
    pub fn explicit(&self) -> Option<T> {
        match self {
            Auto::Auto => None,
            Auto::Set(v) => Some(*v),
        }
    }

    pub fn is_auto(&self) -> bool {
        matches!(self, Auto::Auto)
    }
}

/// One mapping being read. `file` names the kind of file in messages ("deepspeed config"),
/// `prefix` is the dotted path of this mapping inside it ("" or "zero_optimization.").
pub(crate) struct Reader<'a> {
    pub file: &'static str,
    prefix: String,
    map: &'a Map<String, Value>,
    used: BTreeSet<&'a str>,
}

impl<'a> Reader<'a> {
    /// A reader over `value`, which must be a mapping.
    pub fn new(
        file: &'static str,
        path: &str,
        value: &'a Value,
    ) -> Result<Reader<'a>, ConfigError> {
        match value {
            Value::Object(map) => Ok(Reader {
                file,
                prefix: if path.is_empty() {
                    String::new()
                } else {
                    format!("{path}.")
                },
                map,
                used: BTreeSet::new(),
            }),
            Value::Null if path.is_empty() => Err(ConfigError::Invalid {
                file: file.into(),
                field: "(document)".into(),
                message: "empty document; expected a mapping".into(),
            }),
            other => Err(ConfigError::Invalid {
                file: file.into(),
                field: if path.is_empty() {
                    "(document)".into()
                } else {
                    path.into()
                },
                message: format!("expected a mapping, got {}", kind(other)),
            }),
        }
    }

    /// The dotted path of `key` in this mapping.
    pub fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Takes `key` (marking it known); `None` when absent or `null`.
    pub fn take(&mut self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.used.insert(k.as_str());
        if v.is_null() { None } else { Some(v) }
    }

    /// True when `key` is present (without marking it).
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Keys of this mapping not taken yet, as dotted paths.
    pub fn leftover(&self) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.used.contains(k.as_str()))
            .map(|k| self.path(k))
            .collect()
    }

    /// Marks `key` as known.
    pub fn mark(&mut self, key: &str) {
        if let Some((k, _)) = self.map.get_key_value(key) {
            self.used.insert(k.as_str());
        }
    }

    pub fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.into(),
            field: self.path(key),
            message: message.into(),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            // accelerate writes some booleans as strings ("true"/"false").
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {}", show(v)))),
        }
    }

    pub fn auto_bool(&mut self, key: &str) -> Result<Option<Auto<bool>>, ConfigError> {
        match self.take(key) {
            Some(Value::String(s)) if s == "auto" => Ok(Some(Auto::Auto)),
            Some(_) => Ok(self.bool(key)?.map(Auto::Set)),
            None => Ok(None),
        }
    }

    /// A non-negative integer; JSON numbers such as `5e8` are accepted when integral.
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match as_u64(v) {
                Some(n) => Ok(Some(n)),
                None => Err(self.err(
                    key,
                    format!("expected a non-negative integer, got {}", show(v)),
                )),
            },
        }
    }

    pub fn auto_u64(&mut self, key: &str) -> Result<Option<Auto<u64>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s == "auto" => Ok(Some(Auto::Auto)),
            Some(v) => match as_u64(v) {
                Some(n) => Ok(Some(Auto::Set(n))),
                None => Err(self.err(
                    key,
                    format!(
                        "expected a non-negative integer or \"auto\", got {}",
                        show(v)
                    ),
                )),
            },
        }
    }

    pub fn f64(&mut self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                Some(x) => Ok(Some(x)),
                None => Err(self.err(key, format!("expected a number, got {}", show(v)))),
            },
        }
    }

    pub fn auto_f64(&mut self, key: &str) -> Result<Option<Auto<f64>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s == "auto" => Ok(Some(Auto::Auto)),
            Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                Some(x) => Ok(Some(Auto::Set(x))),
                None => Err(self.err(
                    key,
                    format!("expected a number or \"auto\", got {}", show(v)),
                )),
            },
        }
    }

    /// A string; numbers and booleans are given as their text (YAML `1` for a strategy).
    pub fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(v) => Err(self.err(key, format!("expected a string, got {}", show(v)))),
        }
    }

    /// A string or a list of strings (a comma-separated string is split).
    pub fn string_list(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.err(
                        key,
                        format!("expected a list of strings, got an item {}", show(other)),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.err(
                key,
                format!("expected a string or a list of strings, got {}", show(v)),
            )),
        }
    }

    /// A nested mapping, read by `f` (which gets the same sink for unknown keys, for mappings
    /// nested deeper); the keys `f` left unread are added to `unknown`.
    pub fn nested<T>(
        &mut self,
        key: &str,
        unknown: &mut Vec<String>,
        f: impl FnOnce(&mut Reader<'a>, &mut Vec<String>) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        let mut r = Reader::new(self.file, &self.path(key), v)?;
        let out = f(&mut r, unknown)?;
        unknown.extend(r.leftover());
        Ok(Some(out))
    }
}

/// An integral, non-negative JSON number as u64 (`5e8` included).
pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let x = v.as_f64()?;
    if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 1.8e19 {
        Some(x as u64)
    } else {
        None
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A short rendering of a value for messages.
pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Array(_) | Value::Object(_) => kind(v).to_owned(),
        other => other.to_string(),
    }
}
