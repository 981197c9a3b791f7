//! YAML text read as a JSON value without losing NaN and infinities: a `serde_json::Value`
//! cannot hold them (serde turns `.nan` / `.inf` into null), so a key written `.inf` would read
//! as unset. They are refused instead, naming the key.

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

/// YAML text (JSON is YAML too) as a JSON value.
///
/// # Errors
/// A syntax error, or the first NaN or infinite number, by key path.
pub fn to_json(text: &str) -> Result<serde_json::Value, YamlError> {
    let syntax = |e: serde_yaml::Error| YamlError::Syntax(e.to_string());
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(syntax)?;
    if let Some(at) = non_finite(&yaml, "") {
        return Err(YamlError::NonFinite(at));
    }
    serde_yaml::from_value(yaml).map_err(syntax)
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
            ("x: !tag .inf\n", "x"),
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
    }
}
