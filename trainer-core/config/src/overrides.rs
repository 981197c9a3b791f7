//! LLaMA-Factory's command-line forms of a training config, applied over (or instead of) a
//! recipe file:
//! - `key=value` after a recipe, as `llamafactory-cli train recipe.yaml key=value` merges its
//!   command line over the file (the value is read as a YAML scalar: `1e-4` is a number,
//!   `true` a boolean, `a,b` a string, nothing (`key=`) null, which unsets the key);
//! - `--key value`, `--key=value` and a bare `--flag` (true), as the HF argument parser reads
//!   `torchrun … train.py --stage sft --bf16 …`; `--some-key` is `--some_key`, and a boolean
//!   takes the HF spellings (`true`/`false`, `yes`/`no`, `1`/`0`, any case).
//!
//! The overrides are checked against the key catalogue before they are merged, so a misspelt
//! key is refused naming the argument it came from.

use serde_json::{Map, Value};

use crate::ConfigError;
use crate::keys::{self, Kind};

/// One override: the key and its value, with the argument(s) it was read from for messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: Value,
    /// The argument as written (`lr=1`, `--bf16`, `--seed 3`).
    pub arg: String,
}

/// A training command line split into the recipe file (first argument, when it is not an
/// override) and the overrides, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandLine {
    pub recipe: Option<String>,
    pub overrides: Vec<Override>,
}

impl CommandLine {
    /// Parses the arguments after `trainer [train]`.
    ///
    /// # Errors
    /// A bare word where an override is expected, a dotted (nested) key, an empty key, a value
    /// that the key cannot take, or a key neither LLaMA-Factory nor transformers knows.
    pub fn parse(args: &[String]) -> Result<CommandLine, ConfigError> {
        let mut out = CommandLine::default();
        let mut i = 0;
        if let Some(first) = args.first()
            && !first.starts_with("--")
            && !first.contains('=')
        {
            out.recipe = Some(first.clone());
            i = 1;
        }
        while i < args.len() {
            let arg = &args[i];
            if let Some(flag) = arg.strip_prefix("--") {
                // HfArgumentParser's `--no_KEY` (store_false) for a bool key whose default is
                // true: a bare flag that sets KEY to false; it never takes the next argument.
                let bare = flag
                    .split_once('=')
                    .map_or(flag, |(k, _)| k)
                    .replace('-', "_");
                if let Some(negated) = bare.strip_prefix("no_")
                    && !keys::is_known(&bare)
                    && keys::DEFAULT_TRUE_BOOLS.contains(&negated)
                {
                    if flag.contains('=') {
                        return Err(bad(
                            arg,
                            format!("`--{bare}` takes no value (it sets `{negated}` to false)"),
                        ));
                    }
                    out.push(negated.to_owned(), Value::Bool(false), arg.clone())?;
                    i += 1;
                    continue;
                }
                let (key, value, written) = match flag.split_once('=') {
                    Some((k, v)) => (k, Some(v.to_owned()), arg.clone()),
                    None => match args.get(i + 1) {
                        Some(next) if !next.starts_with("--") => {
                            i += 1;
                            (flag, Some(next.clone()), format!("{arg} {next}"))
                        }
                        _ => (flag, None, arg.clone()),
                    },
                };
                let key = key.replace('-', "_");
                let value = match value {
                    Some(v) => scalar(&key, &v, &written)?,
                    None => match keys::kind_of(&key) {
                        Some(Kind::Bool) | None => Value::Bool(true),
                        Some(_) => {
                            return Err(bad(&written, format!("`--{key}` needs a value")));
                        }
                    },
                };
                out.push(key, value, written)?;
            } else if let Some((key, v)) = arg.split_once('=') {
                let value = scalar(key, v, arg)?;
                out.push(key.to_owned(), value, arg.clone())?;
            } else {
                return Err(bad(
                    arg,
                    "expected key=value or --key [value] (the recipe file comes first)",
                ));
            }
            i += 1;
        }
        Ok(out)
    }

    fn push(&mut self, key: String, value: Value, arg: String) -> Result<(), ConfigError> {
        if key.is_empty() {
            return Err(bad(&arg, "empty key"));
        }
        if key.contains('.') {
            return Err(bad(
                &arg,
                format!("`{key}`: a training config has no nested keys"),
            ));
        }
        if !keys::is_known(&key) {
            return Err(ConfigError::Invalid {
                file: "command line".into(),
                field: arg,
                message: format!(
                    "unknown key `{key}` (neither LLaMA-Factory nor transformers has it)"
                ),
            });
        }
        self.overrides.push(Override { key, value, arg });
        Ok(())
    }

    /// Merges the overrides over `map` (a later override of the same key wins).
    pub fn apply(&self, map: &mut Map<String, Value>) {
        for o in &self.overrides {
            map.insert(o.key.clone(), o.value.clone());
        }
    }

    /// True when there is nothing to merge.
    pub fn is_empty(&self) -> bool {
        self.overrides.is_empty()
    }
}

/// A command-line value: a YAML scalar (so `1e-4` is a number and `a,b` a string), with the
/// HF boolean spellings for boolean keys. An empty value is null (the key unset), as
/// OmegaConf's YAML reading of `key=` gives.
fn scalar(key: &str, text: &str, arg: &str) -> Result<Value, ConfigError> {
    if keys::kind_of(key) == Some(Kind::Bool) {
        return match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "t" | "1" => Ok(Value::Bool(true)),
            "false" | "no" | "n" | "f" | "0" => Ok(Value::Bool(false)),
            _ => Err(bad(
                arg,
                format!("`{key}` is a boolean: expected true or false, got '{text}'"),
            )),
        };
    }
    if text.is_empty() {
        return Ok(Value::Null);
    }
    // `.inf` / `.nan` would read as null (the key unset): a number key refuses them, a string
    // key takes the text.
    if let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(text)
        && crate::yaml::non_finite(&v, "").is_some()
    {
        return match keys::kind_of(key) {
            Some(Kind::Str | Kind::List) => Ok(Value::String(text.to_owned())),
            _ => Err(bad(arg, format!("`{key}`: {}", crate::yaml::NON_FINITE))),
        };
    }
    match serde_yaml::from_str::<Value>(text) {
        // A mapping or a list written on the command line is kept as text: the keys that
        // take lists (`dataset`, `lora_target`) split `a,b` themselves.
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::Null)) => Ok(v),
        _ => Ok(Value::String(text.to_owned())),
    }
}

fn bad(arg: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: "command line".into(),
        field: arg.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn recipe_then_key_value_overrides() {
        let cl = CommandLine::parse(&args(&[
            "r.yaml",
            "model_name_or_path=/m",
            "output_dir=out/x",
            "learning_rate=1e-4",
            "bf16=true",
            "dataset=a,b",
            "max_samples=",
        ]))
        .unwrap();
        assert_eq!(cl.recipe.as_deref(), Some("r.yaml"));
        let mut map = Map::new();
        map.insert("learning_rate".into(), json!(5e-5));
        map.insert("seed".into(), json!(1));
        cl.apply(&mut map);
        assert_eq!(
            Value::Object(map),
            json!({"model_name_or_path": "/m", "output_dir": "out/x", "learning_rate": 1e-4,
                   "bf16": true, "dataset": "a,b", "max_samples": null, "seed": 1})
        );
    }

    #[test]
    fn flags_form_as_the_hf_argument_parser_reads_it() {
        let cl = CommandLine::parse(&args(&[
            "--stage",
            "sft",
            "--do_train",
            "--model-name-or-path",
            "/m",
            "--bf16",
            "--plot_loss",
            "--overwrite_cache",
            "False",
            "--seed=7",
            "--lora_target",
            "q_proj,v_proj",
            "--fp16",
        ]))
        .unwrap();
        assert_eq!(cl.recipe, None);
        let mut map = Map::new();
        cl.apply(&mut map);
        assert_eq!(
            Value::Object(map),
            json!({"stage": "sft", "do_train": true, "model_name_or_path": "/m", "bf16": true,
                   "plot_loss": true, "overwrite_cache": false, "seed": 7,
                   "lora_target": "q_proj,v_proj", "fp16": true})
        );
    }

    #[test]
    fn no_flag_sets_a_default_true_bool_to_false() {
        let cl = CommandLine::parse(&args(&[
            "r.yaml",
            "--no_enable_thinking",
            "--no-use-fast-tokenizer",
            "seed=3",
        ]))
        .unwrap();
        let mut map = Map::new();
        cl.apply(&mut map);
        assert_eq!(
            Value::Object(map),
            json!({"enable_thinking": false, "use_fast_tokenizer": false, "seed": 3})
        );
        // Only bool keys whose default is true have a `--no_` form, and it takes no value.
        for (a, want) in [
            (&["--no_bf16"][..], "unknown key `no_bf16`"),
            (&["--no_enable_thinking=1"][..], "takes no value"),
        ] {
            let e = CommandLine::parse(&args(a)).unwrap_err().to_string();
            assert!(e.contains(want), "{a:?}: {e}");
        }
    }

    #[test]
    fn a_later_override_wins() {
        let cl = CommandLine::parse(&args(&["r.yaml", "seed=1", "--seed", "2"])).unwrap();
        let mut map = Map::new();
        cl.apply(&mut map);
        assert_eq!(map["seed"], json!(2));
    }

    #[test]
    fn errors_name_the_argument() {
        for (a, want) in [
            (&["r.yaml", "learning_rat=1"][..], "learning_rat=1"),
            (&["--learning_rat", "1"][..], "--learning_rat 1"),
            (&["r.yaml", "deepspeed.stage=3"][..], "deepspeed.stage=3"),
            (&["r.yaml", "oops"][..], "oops"),
            (&["r.yaml", "=3"][..], "=3"),
            (&["--bf16", "maybe"][..], "--bf16 maybe"),
            (&["--learning_rate"][..], "--learning_rate"),
        ] {
            let e = CommandLine::parse(&args(a)).unwrap_err();
            match &e {
                ConfigError::Invalid { file, field, .. } => {
                    assert_eq!(file, "command line", "{a:?}");
                    assert_eq!(field, want, "{a:?}");
                }
                other => panic!("{a:?}: {other:?}"),
            }
        }
        let e = CommandLine::parse(&args(&["r.yaml", "learning_rat=1"])).unwrap_err();
        assert!(e.to_string().contains("unknown key `learning_rat`"), "{e}");
    }

    #[test]
    fn nan_and_infinities_are_refused_for_number_keys() {
        for a in [
            "learning_rate=.inf",
            "cutoff_len=.nan",
            "per_device_train_batch_size=.Inf",
            "num_train_epochs=-.inf",
        ] {
            let e = CommandLine::parse(&args(&["r.yaml", a])).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { field, .. } if field == a),
                "{a}: {e:?}"
            );
            let key = a.split('=').next().unwrap();
            assert!(
                e.to_string()
                    .contains(&format!("`{key}`: not a finite number")),
                "{e}"
            );
        }
        let e = CommandLine::parse(&args(&["--learning_rate", ".nan"])).unwrap_err();
        assert!(e.to_string().contains("not a finite number"), "{e}");
        // A string key takes the text.
        let cl = CommandLine::parse(&args(&["r.yaml", "run_name=.inf"])).unwrap();
        let mut map = Map::new();
        cl.apply(&mut map);
        assert_eq!(map["run_name"], json!(".inf"));
    }
}
