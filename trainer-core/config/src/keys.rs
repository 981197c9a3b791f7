//! The key catalogue: every key a LLaMA-Factory recipe may hold (its model, data, finetuning
//! and generating arguments, and the transformers `Seq2SeqTrainingArguments` it extends), with
//! its type and what Ringmaster does with it. A key outside the catalogue is an error naming it,
//! so a typo never passes silently.
//!
//! Each key is one of:
//! - [`Effect::Modeled`]: a field of [`crate::TrainConfig`]; it takes effect (the struct's docs
//!   and docs/config-reference.md say how);
//! - [`Effect::NoEffect`]: accepted, type-checked, and named in the one start-up line of keys
//!   without effect (logging integrations, kernels we do not have, hub options);
//! - [`Effect::DefaultOnly`]: changes what is trained when set to anything but LLaMA-Factory's
//!   default, which Ringmaster does not do yet: accepted at the default, refused otherwise
//!   with a message naming the key and the default;
//! - [`Effect::OneOf`]: accepted with the values that mean what Ringmaster does (`optim`'s
//!   AdamW spellings), refused with any other.
//!
//! The table (`keys_table.rs`) was built from LLaMA-Factory's `src/llamafactory/hparams/*.py`
//! and transformers' `training_args.py` / `training_args_seq2seq.py` (commits named in
//! docs/config-reference.md); it is data, kept sorted, and tested for order and consistency.

use serde_json::Value;

/// The type of a key's value, as the argument classes declare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    /// A string (numbers are accepted as their text, as YAML writes `1` for a name).
    Str,
    /// A string or a list of strings (or of numbers: `interleave_probs`).
    List,
    /// A mapping, a JSON string, or anything else the argument classes take as a dict.
    Any,
}

/// What Ringmaster does with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Modeled,
    NoEffect,
    /// Accepted only at this default (YAML text of LLaMA-Factory's default value).
    DefaultOnly(&'static str),
    /// Accepted with one of these values, which all mean what Ringmaster does (`optim:
    /// adamw_torch`); any other value is refused.
    OneOf(&'static [&'static str]),
}

/// One catalogue entry.
#[derive(Debug, Clone, Copy)]
pub struct KeyInfo {
    pub key: &'static str,
    pub kind: Kind,
    pub effect: Effect,
}

include!("keys_table.rs");

/// The entry of `key`, if it is in the catalogue.
pub fn info(key: &str) -> Option<&'static KeyInfo> {
    CATALOGUE
        .binary_search_by(|k| k.key.cmp(key))
        .ok()
        .map(|i| &CATALOGUE[i])
}

/// True when LLaMA-Factory or transformers knows `key`.
pub fn is_known(key: &str) -> bool {
    info(key).is_some()
}

/// The type of `key`'s value, if it is in the catalogue.
pub fn kind_of(key: &str) -> Option<Kind> {
    info(key).map(|k| k.kind)
}

/// Checks `value` against `kind`; the message says what was expected.
pub fn check_kind(kind: Kind, value: &Value) -> Result<(), String> {
    let ok = match kind {
        Kind::Bool => {
            matches!(value, Value::Bool(_))
                || matches!(value, Value::String(s) if ["true", "false"].contains(&s.to_ascii_lowercase().as_str()))
        }
        Kind::Int => value.as_i64().is_some() || value.as_u64().is_some(),
        Kind::Float => value.as_f64().is_some(),
        Kind::Str => matches!(value, Value::String(_) | Value::Number(_)),
        Kind::List => match value {
            Value::String(_) | Value::Number(_) => true,
            Value::Array(items) => items
                .iter()
                .all(|i| matches!(i, Value::String(_) | Value::Number(_))),
            _ => false,
        },
        Kind::Any => true,
    };
    if ok || value.is_null() {
        Ok(())
    } else {
        Err(format!(
            "expected {}, got {}",
            match kind {
                Kind::Bool => "true or false",
                Kind::Int => "an integer",
                Kind::Float => "a number",
                Kind::Str => "a string",
                Kind::List => "a string or a list",
                Kind::Any => "a value",
            },
            crate::reader::show(value)
        ))
    }
}

/// Checks a catalogue key that is not a [`crate::TrainConfig`] field: its type, and its value
/// for [`Effect::DefaultOnly`] and [`Effect::OneOf`] keys.
pub fn check_unmodeled(info: &KeyInfo, value: &Value) -> Result<(), String> {
    check_kind(info.kind, value)?;
    match info.effect {
        Effect::DefaultOnly(default) if !is_default(value, default) => Err(format!(
            "not supported yet: Ringmaster trains as LLaMA-Factory's default `{}: {default}` \
             does; remove the key or set it to {default}",
            info.key
        )),
        Effect::OneOf(values) => match value {
            Value::Null => Ok(()),
            Value::String(s) if values.contains(&s.as_str()) => Ok(()),
            other => Err(format!(
                "not supported yet: {} (Ringmaster trains with AdamW; accepted values: {})",
                crate::reader::show(other),
                values.join(", ")
            )),
        },
        _ => Ok(()),
    }
}

/// True when `value` is the default written as YAML text `default` (numbers compared as
/// numbers, `null` matching an absent value).
pub fn is_default(value: &Value, default: &str) -> bool {
    if value.is_null() {
        return true;
    }
    let d: Value = serde_yaml::from_str(default).unwrap_or(Value::String(default.to_owned()));
    match (value, &d) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(s), Value::Bool(b)) => s.eq_ignore_ascii_case(&b.to_string()),
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_is_sorted_without_duplicates() {
        for w in CATALOGUE.windows(2) {
            assert!(w[0].key < w[1].key, "{} before {}", w[0].key, w[1].key);
        }
    }

    #[test]
    fn modeled_keys_are_exactly_the_struct_fields() {
        let modeled: Vec<&str> = CATALOGUE
            .iter()
            .filter(|k| k.effect == Effect::Modeled)
            .map(|k| k.key)
            .collect();
        assert_eq!(modeled, crate::KNOWN_KEYS);
    }

    #[test]
    fn defaults_parse_and_match_their_kind() {
        for k in CATALOGUE {
            if let Effect::DefaultOnly(d) = k.effect {
                let v: Value = serde_yaml::from_str(d).unwrap();
                check_kind(k.kind, &v).unwrap_or_else(|e| panic!("{}: {e}", k.key));
                assert!(is_default(&v, d), "{}", k.key);
            }
        }
    }
}
