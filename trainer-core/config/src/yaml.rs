//! YAML text read as a JSON value without losing NaN and infinities: a `serde_json::Value`
//! cannot hold them (serde turns `.nan` / `.inf` into null), so a key written `.inf` would read
//! as unset. They are refused instead, naming the key.

use std::cell::RefCell;

/// Why YAML text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YamlError {
    /// Not YAML (serde_yaml's message).
    Syntax(String),
    /// A NaN or infinite number at this key path (`a.b[2]`; `the value` for a bare scalar).
    NonFinite(String),
}

/// What [`YamlError::NonFinite`] means, for messages.
pub const NON_FINITE: &str = "not a finite number (.nan and .inf are not accepted)";

/// YAML text (JSON is YAML too) as a JSON value, as `serde_yaml::from_str::<serde_json::Value>`
/// reads it (a key given twice: the later wins), but with NaN and infinities refused.
///
/// # Errors
/// A syntax error, or the first NaN or infinite number, by key path.
pub fn to_json(text: &str) -> Result<serde_json::Value, YamlError> {
    use serde::de::DeserializeSeed;
    let found = RefCell::new(None);
    let seed = Checked {
        at: String::new(),
        found: &found,
    };
    let result = seed.deserialize(serde_yaml::Deserializer::from_str(text));
    if let Some(at) = found.into_inner() {
        return Err(YamlError::NonFinite(at));
    }
    result.map_err(|e| YamlError::Syntax(e.to_string()))
}

/// Builds a `serde_json::Value` as its own `Deserialize` does, keeping the key path, and stops
/// at the first non-finite number (its path in `found`).
struct Checked<'a> {
    at: String,
    found: &'a RefCell<Option<String>>,
}

impl Checked<'_> {
    fn child(&self, at: String) -> Self {
        Checked {
            at,
            found: self.found,
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Checked<'_> {
    type Value = serde_json::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        match serde_json::Number::from_f64(v) {
            Some(n) => Ok(serde_json::Value::Number(n)),
            None => {
                let at = if self.at.is_empty() {
                    "the value".to_owned()
                } else {
                    self.at
                };
                *self.found.borrow_mut() = Some(at);
                Err(E::custom(NON_FINITE))
            }
        }
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) =
            seq.next_element_seed(self.child(format!("{}[{}]", self.at, items.len())))?
        {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let at = if self.at.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.at)
            };
            let v = map.next_value_seed(self.child(at))?;
            out.insert(key, v);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// The key path (below `at`) of the first number in `v` that is NaN or infinite: `a.b[2]`, or
/// `the value` when `v` itself is one and `at` is empty.
pub fn non_finite(v: &serde_yaml::Value, at: &str) -> Option<String> {
    use serde_yaml::Value;
    match v {
        Value::Number(n) => n.as_f64().filter(|f| !f.is_finite()).map(|_| {
            if at.is_empty() {
                "the value".to_owned()
            } else {
                at.to_owned()
            }
        }),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| non_finite(x, &format!("{at}[{i}]"))),
        Value::Mapping(m) => m.iter().find_map(|(k, x)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            };
            let path = if at.is_empty() {
                key
            } else {
                format!("{at}.{key}")
            };
            non_finite(x, &path)
        }),
        Value::Tagged(t) => non_finite(&t.value, at),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_and_infinities_are_refused_by_key_path() {
        for (text, at) in [
            ("learning_rate: .inf\n", "learning_rate"),
            ("cutoff_len: .nan\n", "cutoff_len"),
            ("a: {b: [1, -.Inf]}\n", "a.b[1]"),
            (".NaN\n", "the value"),
            ("a: 1\na: .inf\n", "a"),
        ] {
            assert_eq!(
                to_json(text),
                Err(YamlError::NonFinite(at.into())),
                "{text}"
            );
        }
        assert_eq!(
            to_json("a: 1.5\nb: [1, 2]\nc: inf\nd: '.nan'\n").unwrap(),
            serde_json::json!({"a": 1.5, "b": [1, 2], "c": "inf", "d": ".nan"})
        );
        assert!(matches!(to_json("a: [1"), Err(YamlError::Syntax(_))));
        // On a serde_yaml value (the coordinator's job specs), tags included.
        let v: serde_yaml::Value = serde_yaml::from_str("a: {b: [1, !t .inf]}\nc: 2\n").unwrap();
        assert_eq!(non_finite(&v, ""), Some("a.b[1]".into()));
        let v: serde_yaml::Value = serde_yaml::from_str("a: {b: [1, .5]}\n").unwrap();
        assert_eq!(non_finite(&v, ""), None);
        // As serde_yaml reads into a JSON value: a key given twice, the later wins; keys that
        // are numbers are their text.
        assert_eq!(
            to_json("a: 1\na: 2\n1: x\n").unwrap(),
            serde_json::json!({"a": 2, "1": "x"})
        );
        // The same value as serde_yaml's own reading, on a recipe with every kind of value.
        let recipe = "a: 1\nb: -2\nc: 1.0e-4\nd: [x, 1, {e: null}]\nf: ~\ng: true\nh: ''\n";
        assert_eq!(
            to_json(recipe).unwrap(),
            serde_yaml::from_str::<serde_json::Value>(recipe).unwrap()
        );
    }
}
