//! Tool descriptions rendered into the system block, as LLaMA-Factory's `ToolFormatter` does
//! (`data/formatter.py`, `data/tool_utils.py`). Only the `qwen` tool format is implemented (the
//! one of the `qwen`, `qwen3` and `qwen3_nothink` templates); it writes each tool with Python's
//! `json.dumps(..., ensure_ascii=False)`, so [`python_json`] reproduces that text: keys in the
//! order of the dataset, `", "` and `": "` separators, Python's float spelling.

use std::fmt::Write as _;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The tool formats we can render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// Qwen 2.5 / Qwen3 (`QwenToolUtils`).
    Qwen,
}

/// A JSON value that keeps the order of object keys (serde_json's `Value` sorts them).
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Int(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element()? {
                    out.push(v);
                }
                Ok(Json::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut out: Vec<(String, Json)> = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Json>()? {
                    // Python's dict keeps the first position and the last value of a key.
                    match out.iter_mut().find(|(key, _)| *key == k) {
                        Some(slot) => slot.1 = v,
                        None => out.push((k, v)),
                    }
                }
                Ok(Json::Object(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Json {
    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Json::Float(x) => out.push_str(&python_float(*x)),
            Json::Str(s) => write_str(s, out),
            Json::List(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Object(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(k, out);
                    out.push_str(": ");
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// Python's `json` string escaping with `ensure_ascii=False`.
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr` of a float: the shortest round-trip digits, positional for exponents in
/// `-4..16` (always with a fraction), else `d.ddde+XX`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{x:e}"); // e.g. "-1.5e-5", shortest round-trip digits
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp writes an exponent");
    let exp: i32 = exp.parse().expect("LowerExp writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

/// The JSON text Python's `json.dumps(value, ensure_ascii=False)` writes for the JSON `text`.
///
/// # Errors
/// `text` is not JSON.
pub fn python_json(text: &str) -> Result<String, serde_json::Error> {
    let v: Json = serde_json::from_str(text)?;
    let mut out = String::new();
    v.write(&mut out);
    Ok(out)
}

impl ToolFormat {
    /// The text appended to the system prompt for the tool list `tools` (JSON text of a list):
    /// LLaMA-Factory's `ToolFormatter.apply`, empty for an empty list.
    ///
    /// # Errors
    /// `tools` is not JSON, not a list, or holds something other than objects; the message
    /// says which.
    pub fn system_text(&self, tools: &str) -> Result<String, String> {
        let v: Json = serde_json::from_str(tools)
            .map_err(|e| format!("invalid JSON in tool description: {e}"))?;
        let Json::List(items) = v else {
            return Err("the tool description must be a JSON list of tools".into());
        };
        if items.is_empty() {
            return Ok(String::new());
        }
        match self {
            ToolFormat::Qwen => {
                let mut tool_text = String::new();
                for (i, tool) in items.into_iter().enumerate() {
                    let Json::Object(entries) = &tool else {
                        return Err(format!("tool {i} is not a JSON object"));
                    };
                    let is_function = entries
                        .iter()
                        .any(|(k, v)| k == "type" && *v == Json::Str("function".into()));
                    let wrapped = if is_function {
                        tool
                    } else {
                        Json::Object(vec![
                            ("type".into(), Json::Str("function".into())),
                            ("function".into(), tool),
                        ])
                    };
                    tool_text.push('\n');
                    wrapped.write(&mut tool_text);
                }
                Ok(format!(
                    "\n\n# Tools\n\nYou may call one or more functions to assist with the user \
                     query.\n\nYou are provided with function signatures within <tools></tools> \
                     XML tags:\n<tools>{tool_text}\n</tools>\n\nFor each function call, return a \
                     json object with function name and arguments within <tool_call></tool_call> \
                     XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": \
                     <args-json-object>}}\n</tool_call>"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_json_dumps() {
        // Expected strings are what CPython's json.dumps(json.loads(src), ensure_ascii=False)
        // prints.
        let cases = [
            (
                r#"{"b": 1, "a": [true, null, "x"]}"#,
                r#"{"b": 1, "a": [true, null, "x"]}"#,
            ),
            (
                r#"{"k":{"z":1,"y":{}},"l":[]}"#,
                r#"{"k": {"z": 1, "y": {}}, "l": []}"#,
            ),
            (r#"["é🦀\"\\\n\t\u0001"]"#, "[\"é🦀\\\"\\\\\\n\\t\\u0001\"]"),
            (
                "[1.0, 0.5, 100.0, 1e16, 1.5e-5, 0.0001, -2.25, 1e100, 12345678.9]",
                "[1.0, 0.5, 100.0, 1e+16, 1.5e-05, 0.0001, -2.25, 1e+100, 12345678.9]",
            ),
            (r#"{"a": 1, "a": 2, "b": 3}"#, r#"{"a": 2, "b": 3}"#),
            ("-7", "-7"),
        ];
        for (src, want) in cases {
            assert_eq!(python_json(src).unwrap(), want, "{src}");
        }
    }

    #[test]
    fn qwen_tool_text_wraps_plain_tools_as_functions() {
        let tools = r#"[{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                        {"type": "function", "function": {"name": "f"}}]"#;
        let got = ToolFormat::Qwen.system_text(tools).unwrap();
        let want = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
            You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n\
            {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather\", \
            \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n\
            {\"type\": \"function\", \"function\": {\"name\": \"f\"}}\n</tools>\n\n\
            For each function call, return a json object with function name and arguments within \
            <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \
            \"arguments\": <args-json-object>}\n</tool_call>";
        assert_eq!(got, want);
        assert_eq!(ToolFormat::Qwen.system_text("[]").unwrap(), "");
        assert!(
            ToolFormat::Qwen
                .system_text("{}")
                .unwrap_err()
                .contains("JSON list")
        );
        assert!(
            ToolFormat::Qwen
                .system_text("[1]")
                .unwrap_err()
                .contains("tool 0")
        );
        assert!(
            ToolFormat::Qwen
                .system_text("[")
                .unwrap_err()
                .contains("invalid JSON")
        );
    }
}
