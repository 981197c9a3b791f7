//! An argparse-like reader of a launcher's options: options first, the first positional is the
//! program and everything after it belongs to the program (argparse's `REMAINDER`). `--` ends the
//! options: in ringctl's own form it starts a command (`-- CMD ...` runs CMD as it is); when the
//! launcher was named (`torchrun ...`, `deepspeed ...`, `accelerate launch ...`) it only ends
//! the options, as in argparse, and the next word is the program as any first positional is. Long options take `--opt value` and `--opt=value`; short ones
//! `-r value`, `-rvalue` and `-r=value`. Every long option is known in its underscore and its dash
//! spelling. With `abbrev` (torchrun, DeepSpeed: argparse's default) an unambiguous prefix of a
//! long option is accepted too.

use super::Val;
use crate::LaunchError;

/// Whether an option takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Flag,
    Value,
}

/// One option of a launcher: its dest (`nproc_per_node`), an alias dest spelling
/// (`num_accelerators` for `num_gpus`), a short form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Opt {
    pub key: &'static str,
    pub alias: Option<&'static str>,
    pub short: Option<&'static str>,
    pub kind: Kind,
}

impl Opt {
    pub(crate) const fn flag(key: &'static str) -> Opt {
        Opt {
            key,
            alias: None,
            short: None,
            kind: Kind::Flag,
        }
    }

    pub(crate) const fn value(key: &'static str) -> Opt {
        Opt {
            key,
            alias: None,
            short: None,
            kind: Kind::Value,
        }
    }

    pub(crate) const fn short(mut self, short: &'static str) -> Opt {
        self.short = Some(short);
        self
    }

    pub(crate) const fn alias(mut self, alias: &'static str) -> Opt {
        self.alias = Some(alias);
        self
    }

    /// Every long spelling: `--a_b` and `--a-b` for the key and the alias.
    fn longs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for name in std::iter::once(self.key).chain(self.alias) {
            out.push(format!("--{name}"));
            if name.contains('_') {
                out.push(format!("--{}", name.replace('_', "-")));
            }
        }
        out
    }

    fn matches_exactly(&self, name: &str) -> bool {
        self.short == Some(name) || self.longs().iter().any(|l| l == name)
    }
}

/// One option as it was typed.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub key: &'static str,
    /// The spelling the user typed (for messages): `--nproc_per_node`.
    pub spelled: String,
    pub value: Option<String>,
}

/// A command line read against one launcher's options.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parsed {
    pub opts: Vec<Seen>,
    /// The first positional (the script, module, recipe or command).
    pub program: Option<String>,
    /// Everything after it, untouched.
    pub args: Vec<String>,
    /// The program came after `--` in ringctl's own form (run it as a command).
    pub dashdash: bool,
}

impl Parsed {
    /// The last occurrence of an option (argparse's `store`: the last one wins).
    pub(crate) fn last(&self, key: &str) -> Option<&Seen> {
        self.opts.iter().rev().find(|s| s.key == key)
    }

    pub(crate) fn given(&self, key: &str) -> bool {
        self.last(key).is_some()
    }

    /// The last occurrence's value (empty for a flag), sourced to the spelling used.
    pub(crate) fn val(&self, key: &str) -> Option<Val> {
        self.last(key)
            .map(|s| Val::flag(&s.spelled, s.value.as_deref().unwrap_or_default()))
    }
}

/// `-1`, `-0.5`, `-.5`: argparse reads these as values, not options (`^-\d+$|^-\d*\.\d+$`).
fn is_negative_number(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('-') else {
        return false;
    };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    match rest.split_once('.') {
        None => digits(rest),
        Some((int, frac)) => (int.is_empty() || digits(int)) && digits(frac),
    }
}

fn looks_like_option(s: &str) -> bool {
    s.len() > 1 && s.starts_with('-') && !is_negative_number(s)
}

/// How an option token was resolved: the option, the spelling, an inline value.
struct Hit<'t> {
    opt: &'t Opt,
    spelled: String,
    inline: Option<String>,
}

/// Resolves one option token against `table`. `Ok(None)`: not an option of this table.
fn resolve<'t>(token: &str, table: &'t [Opt], abbrev: bool) -> Result<Option<Hit<'t>>, String> {
    if let Some(body) = token.strip_prefix("--") {
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
            None => (token.to_string(), None),
        };
        if let Some(opt) = table.iter().find(|o| o.longs().contains(&name)) {
            return Ok(Some(Hit {
                opt,
                spelled: name,
                inline,
            }));
        }
        if !abbrev {
            return Ok(None);
        }
        let mut hits: Vec<(&Opt, String)> = Vec::new();
        for opt in table {
            for long in opt.longs() {
                if long.starts_with(&name) {
                    hits.push((opt, long));
                }
            }
        }
        let Some((first, _)) = hits.first() else {
            return Ok(None);
        };
        if hits.iter().all(|(o, _)| o.key == first.key) {
            return Ok(Some(Hit {
                opt: first,
                spelled: name,
                inline,
            }));
        }
        let names: Vec<&str> = hits.iter().map(|(_, l)| l.as_str()).collect();
        return Err(format!(
            "ambiguous option: {name} could match {}",
            names.join(", ")
        ));
    }
    // A short option: `-r`, `-r3`, `-r=3`.
    let short: String = token.chars().take(2).collect();
    let Some(opt) = table.iter().find(|o| o.short == Some(short.as_str())) else {
        return Ok(None);
    };
    let tail = &token[short.len()..];
    let inline = if tail.is_empty() {
        None
    } else {
        Some(tail.strip_prefix('=').unwrap_or(tail).to_string())
    };
    Ok(Some(Hit {
        opt,
        spelled: short,
        inline,
    }))
}

/// Reads `args` against `table`. `dialect` names the launcher in messages; `others` are the other
/// launchers' tables, to say where an unknown option belongs. `named`: the launcher was named by
/// a leading word, so `--` only ends the options (argparse's meaning); otherwise `-- CMD` is
/// ringctl's "run CMD as a command".
pub(crate) fn parse(
    args: &[String],
    table: &[Opt],
    abbrev: bool,
    dialect: &str,
    others: &[(&str, &[Opt])],
    named: bool,
) -> Result<Parsed, LaunchError> {
    let mut out = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let token = &args[i];
        if token == "--" {
            out.dashdash = !named;
            if let Some(cmd) = args.get(i + 1) {
                out.program = Some(cmd.clone());
                out.args = args[i + 2..].to_vec();
            }
            return Ok(out);
        }
        if !looks_like_option(token) {
            out.program = Some(token.clone());
            out.args = args[i + 1..].to_vec();
            return Ok(out);
        }
        let hit = resolve(token, table, abbrev).map_err(LaunchError)?;
        let Some(hit) = hit else {
            return Err(unknown(token, dialect, others));
        };
        let value = match hit.opt.kind {
            Kind::Flag => {
                if let Some(v) = hit.inline {
                    return Err(LaunchError(format!(
                        "argument {}: ignored explicit argument '{v}' ({dialect})",
                        hit.spelled
                    )));
                }
                None
            }
            Kind::Value => match hit.inline {
                Some(v) => Some(v),
                None => match args.get(i + 1) {
                    Some(v) if !looks_like_option(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    _ => {
                        return Err(LaunchError(format!(
                            "argument {}: expected one argument ({dialect})",
                            hit.spelled
                        )));
                    }
                },
            },
        };
        out.opts.push(Seen {
            key: hit.opt.key,
            spelled: hit.spelled,
            value,
        });
        i += 1;
    }
    Ok(out)
}

fn unknown(token: &str, dialect: &str, others: &[(&str, &[Opt])]) -> LaunchError {
    let name = token.split_once('=').map_or(token, |(n, _)| n);
    for (other, table) in others {
        if table.iter().any(|o| o.matches_exactly(name)) {
            return LaunchError(format!(
                "unrecognized arguments: {name} ({name} is a {other} option, not a {dialect} one; \
                 don't mix the two command lines)"
            ));
        }
    }
    LaunchError(format!(
        "unrecognized arguments: {name} (not a {dialect} option)"
    ))
}

/// For dialect detection: which of `tables` know each option of the command line (in order),
/// up to the program. An option no table knows ends the scan (the chosen dialect reports it).
pub(crate) fn scan(args: &[String], tables: &[(&str, &[Opt], bool)]) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let token = &args[i];
        if token == "--" || !looks_like_option(token) {
            break;
        }
        let mut owners = Vec::new();
        let mut spelled = None;
        let mut takes_value = None;
        for (t, (_, table, abbrev)) in tables.iter().enumerate() {
            // Exact spellings first, so an abbreviation in one dialect does not outvote them.
            if let Ok(Some(hit)) = resolve(token, table, false) {
                owners.push(t);
                spelled.get_or_insert(hit.spelled);
                takes_value.get_or_insert(hit.opt.kind == Kind::Value && hit.inline.is_none());
            } else if *abbrev && let Ok(Some(hit)) = resolve(token, table, true) {
                owners.push(t);
                spelled.get_or_insert(hit.spelled);
                takes_value.get_or_insert(hit.opt.kind == Kind::Value && hit.inline.is_none());
            }
        }
        let (Some(spelled), Some(takes_value)) = (spelled, takes_value) else {
            break;
        };
        out.push((spelled, owners));
        i += if takes_value { 2 } else { 1 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[Opt] = &[
        Opt::value("nproc_per_node"),
        Opt::value("nnodes"),
        Opt::flag("module").short("-m"),
        Opt::value("redirects").short("-r"),
        Opt::value("max_restarts"),
        Opt::value("master_addr"),
        Opt::value("master_port"),
    ];

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// `args` parsed as a torchrun command line against `T` (abbreviations allowed).
    fn parse_t(args: &[&str]) -> Result<Parsed, LaunchError> {
        parse(&s(args), T, true, "torchrun", &[], false)
    }

    /// The value of the last occurrence of `key`.
    fn value<'p>(p: &'p Parsed, key: &str) -> Option<&'p str> {
        p.last(key).unwrap().value.as_deref()
    }

    #[test]
    fn spellings_values_and_remainder() {
        let p = parse_t(&[
            "--nproc_per_node=2",
            "--nnodes",
            "1",
            "-r3",
            "-m",
            "pkg.mod",
            "--nnodes",
            "9",
        ])
        .unwrap();
        assert_eq!(value(&p, "nproc_per_node"), Some("2"));
        assert_eq!(value(&p, "nnodes"), Some("1"));
        assert_eq!(value(&p, "redirects"), Some("3"));
        assert!(p.given("module"));
        assert_eq!(p.program.as_deref(), Some("pkg.mod"));
        assert_eq!(p.args, s(&["--nnodes", "9"]));
    }

    #[test]
    fn dash_spelling_abbreviation_and_negative_values() {
        let p = parse_t(&["--nproc-per-node", "4", "--max-res", "-1", "-r=0:1", "x.py"]).unwrap();
        assert_eq!(value(&p, "nproc_per_node"), Some("4"));
        assert_eq!(value(&p, "max_restarts"), Some("-1"));
        assert_eq!(value(&p, "redirects"), Some("0:1"));
        // `--nproc` matches both spellings of one option: not ambiguous.
        assert!(parse_t(&["--nproc", "2", "x"]).is_ok());
        let e = parse_t(&["--master", "a", "x"]).unwrap_err();
        assert!(e.0.contains("ambiguous option: --master"), "{e}");
        let e = parse(
            &s(&["--nproc", "2", "x"]),
            T,
            false,
            "accelerate",
            &[],
            false,
        )
        .unwrap_err();
        assert!(e.0.contains("unrecognized arguments: --nproc"), "{e}");
    }

    #[test]
    fn dashdash_and_errors() {
        let p = parse_t(&["-m", "--", "./run.sh", "--x"]).unwrap();
        assert!(p.dashdash);
        assert_eq!(p.program.as_deref(), Some("./run.sh"));
        assert_eq!(p.args, s(&["--x"]));
        // A named launcher: `--` only ends the options (argparse), `-m` still applies.
        let p = parse(
            &s(&["-m", "--", "pkg.mod", "--x"]),
            T,
            true,
            "torchrun",
            &[],
            true,
        )
        .unwrap();
        assert!(!p.dashdash && p.given("module"));
        assert_eq!(p.program.as_deref(), Some("pkg.mod"));
        assert_eq!(p.args, s(&["--x"]));
        let e = parse_t(&["--nnodes", "--module"]).unwrap_err();
        assert!(
            e.0.contains("argument --nnodes: expected one argument"),
            "{e}"
        );
        let e = parse_t(&["--module=1", "x"]).unwrap_err();
        assert!(e.0.contains("ignored explicit argument '1'"), "{e}");
        let other: &[Opt] = &[Opt::value("num_gpus")];
        let e = parse(
            &s(&["--num_gpus", "2"]),
            T,
            true,
            "torchrun",
            &[("DeepSpeed", other)],
            false,
        )
        .unwrap_err();
        assert!(e.0.contains("--num_gpus is a DeepSpeed option"), "{e}");
    }
}
