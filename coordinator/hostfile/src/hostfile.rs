//! DeepSpeed-grammar hostfiles: one `NAME slots=N` per line.
//!
//! ```text
//! # the training pool
//! worker-0 slots=8
//! worker-1   slots=8    # tabs and runs of spaces are fine
//! ```
//!
//! `#` starts a comment anywhere on a line; blank and comment-only lines are
//! skipped. Every error names the 1-based line it was found on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Shown, is_valid_host_name};

/// One host of a hostfile: its name and how many slots (GPUs) it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: u32,
}

/// A parsed hostfile: the hosts in file order, names unique, slots > 0, never
/// empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostfile {
    pub hosts: Vec<Host>,
}

/// Why a hostfile could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum HostfileError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read hostfile '{}': {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The line is not of the form `NAME slots=N`.
    #[error("hostfile line {line}: expected 'NAME slots=N', got '{}'", Shown(.text))]
    Malformed { line: usize, text: String },
    /// The host name has characters outside `[A-Za-z0-9._-]`.
    #[error(
        "hostfile line {line}: invalid host name '{}' (allowed: letters, digits, '.', '_', '-')",
        Shown(.name)
    )]
    InvalidName { line: usize, name: String },
    /// `slots=` is not followed by an integer in `1..=MAX_SLOTS`.
    #[error(
        "hostfile line {line}: slots for host '{host}' must be an integer in 1..=1024, got '{}'",
        Shown(.value)
    )]
    InvalidSlots {
        line: usize,
        host: String,
        value: String,
    },
    /// Something follows `NAME slots=N` on the line.
    #[error("hostfile line {line}: unexpected '{}' after 'NAME slots=N'", Shown(.extra))]
    ExtraTokens { line: usize, extra: String },
    /// The host already appeared on an earlier line.
    #[error("hostfile line {line}: duplicate host '{name}' (first on line {first_line})")]
    DuplicateHost {
        line: usize,
        name: String,
        first_line: usize,
    },
    /// The file has no host lines at all.
    #[error("hostfile has no hosts")]
    Empty,
}

impl HostfileError {
    /// The 1-based line the error is about, if it is about one.
    pub fn line(&self) -> Option<usize> {
        match self {
            HostfileError::Malformed { line, .. }
            | HostfileError::InvalidName { line, .. }
            | HostfileError::InvalidSlots { line, .. }
            | HostfileError::ExtraTokens { line, .. }
            | HostfileError::DuplicateHost { line, .. } => Some(*line),
            HostfileError::Io { .. } | HostfileError::Empty => None,
        }
    }
}

impl Hostfile {
    /// Reads and parses the hostfile at `path`. A read error names the path.
    pub fn load(path: &Path) -> Result<Hostfile, HostfileError> {
        let text = std::fs::read_to_string(path).map_err(|error| HostfileError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        parse_hostfile(&text)
    }

    /// The host called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The sum of all hosts' slots.
    pub fn total_slots(&self) -> u64 {
        self.hosts.iter().map(|h| u64::from(h.slots)).sum()
    }
}

/// Parses hostfile text (see the [module docs](self) for the grammar).
pub fn parse_hostfile(text: &str) -> Result<Hostfile, HostfileError> {
    let mut hosts = Vec::new();
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = match raw.find('#') {
            Some(hash) => &raw[..hash],
            None => raw,
        }
        .trim();
        if content.is_empty() {
            continue;
        }
        let mut tokens = content.split_whitespace();
        let (Some(name), Some(slots_token)) = (tokens.next(), tokens.next()) else {
            return Err(malformed(line, content));
        };
        let Some(value) = slots_token.strip_prefix("slots=") else {
            return Err(malformed(line, content));
        };
        if !is_valid_host_name(name) {
            return Err(HostfileError::InvalidName {
                line,
                name: name.to_string(),
            });
        }
        let slots = parse_positive(value).ok_or_else(|| HostfileError::InvalidSlots {
            line,
            host: name.to_string(),
            value: value.to_string(),
        })?;
        if tokens.next().is_some() {
            // Everything after the slots token, as written.
            let after =
                slots_token.as_ptr() as usize - content.as_ptr() as usize + slots_token.len();
            return Err(HostfileError::ExtraTokens {
                line,
                extra: content[after..].trim().to_string(),
            });
        }
        if let Some(&first_line) = first_seen.get(name) {
            return Err(HostfileError::DuplicateHost {
                line,
                name: name.to_string(),
                first_line,
            });
        }
        first_seen.insert(name, line);
        hosts.push(Host {
            name: name.to_string(),
            slots,
        });
    }
    if hosts.is_empty() {
        return Err(HostfileError::Empty);
    }
    Ok(Hostfile { hosts })
}

fn malformed(line: usize, content: &str) -> HostfileError {
    HostfileError::Malformed {
        line,
        text: content.to_string(),
    }
}

/// Most slots one host may have: far above any real node, low enough that a typo such as
/// `slots=4000000000` is an error rather than a multi-gigabyte rank table.
pub const MAX_SLOTS: u32 = 1024;

/// ASCII digits only (no sign), no overflow, in `1..=MAX_SLOTS`.
fn parse_positive(value: &str) -> Option<u32> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value
        .parse::<u32>()
        .ok()
        .filter(|&n| (1..=MAX_SLOTS).contains(&n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, slots: u32) -> Host {
        Host {
            name: name.to_string(),
            slots,
        }
    }

    #[test]
    fn parses_valid_hostfiles() {
        let cases: &[(&str, &[(&str, u32)])] = &[
            ("worker-0 slots=8", &[("worker-0", 8)]),
            ("worker-0 slots=8\n", &[("worker-0", 8)]),
            (
                "worker-0 slots=8\nworker-1 slots=4\n",
                &[("worker-0", 8), ("worker-1", 4)],
            ),
            // Comments: whole-line, trailing, glued to the value.
            (
                "# pool\nworker-0 slots=8 # eight\nworker-1 slots=2#two\n",
                &[("worker-0", 8), ("worker-1", 2)],
            ),
            // Blank and whitespace-only lines.
            ("\n\n  \t \nworker-0 slots=1\n\n", &[("worker-0", 1)]),
            // Tabs, runs of spaces, surrounding whitespace, CRLF.
            (
                "\tworker-0\tslots=3\t\r\n   worker-1      slots=5   \r\n",
                &[("worker-0", 3), ("worker-1", 5)],
            ),
            // File order is kept, not sorted.
            (
                "node-10 slots=1\nnode-2 slots=1\nnode-1 slots=1",
                &[("node-10", 1), ("node-2", 1), ("node-1", 1)],
            ),
            // Name characters, leading zeros, the largest count.
            (
                "a.b_C-9 slots=007\n10.0.0.1 slots=1024",
                &[("a.b_C-9", 7), ("10.0.0.1", MAX_SLOTS)],
            ),
            ("localhost slots=2", &[("localhost", 2)]),
        ];
        for &(text, want) in cases {
            let got = parse_hostfile(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let want: Vec<Host> = want.iter().map(|&(n, s)| host(n, s)).collect();
            assert_eq!(got.hosts, want, "{text:?}");
        }
    }

    #[test]
    fn rejects_bad_hostfiles_with_exact_messages() {
        let cases: &[(&str, &str)] = &[
            ("", "hostfile has no hosts"),
            ("\n  \n\t\n", "hostfile has no hosts"),
            ("# only a comment\n   # another\n", "hostfile has no hosts"),
            (
                "worker-0 slots=4\n\nworker-2 slot=4\n",
                "hostfile line 3: expected 'NAME slots=N', got 'worker-2 slot=4'",
            ),
            (
                "worker-0",
                "hostfile line 1: expected 'NAME slots=N', got 'worker-0'",
            ),
            (
                "# c\nslots=4",
                "hostfile line 2: expected 'NAME slots=N', got 'slots=4'",
            ),
            (
                "worker-0 slots = 4",
                "hostfile line 1: expected 'NAME slots=N', got 'worker-0 slots = 4'",
            ),
            (
                "worker-0 4",
                "hostfile line 1: expected 'NAME slots=N', got 'worker-0 4'",
            ),
            (
                "worker-0 Slots=4",
                "hostfile line 1: expected 'NAME slots=N', got 'worker-0 Slots=4'",
            ),
            (
                "worker-0\tslot=4  # typo",
                "hostfile line 1: expected 'NAME slots=N', got 'worker-0\\tslot=4'",
            ),
            (
                "worker-0 slots=0",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '0'",
            ),
            (
                "a slots=1\nworker-0 slots=-1",
                "hostfile line 2: slots for host 'worker-0' must be an integer in 1..=1024, got '-1'",
            ),
            (
                "worker-0 slots=1025",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '1025'",
            ),
            (
                "worker-0 slots=abc",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got 'abc'",
            ),
            (
                "worker-0 slots=",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got ''",
            ),
            (
                "worker-0 slots=+4",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '+4'",
            ),
            (
                "worker-0 slots=4.0",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '4.0'",
            ),
            (
                "worker-0 slots=4294967296",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '4294967296'",
            ),
            (
                "worker-0 slots=99999999999999999999999",
                "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '99999999999999999999999'",
            ),
            (
                "# pool\n\nworker-1 slots=8\nworker-0 slots=8\nworker-1 slots=4\n",
                "hostfile line 5: duplicate host 'worker-1' (first on line 3)",
            ),
            (
                "worker-0 slots=8 gpus=2",
                "hostfile line 1: unexpected 'gpus=2' after 'NAME slots=N'",
            ),
            (
                "worker-0 slots=8  extra\ttokens # comment",
                "hostfile line 1: unexpected 'extra\\ttokens' after 'NAME slots=N'",
            ),
            (
                "worker-0 slots=8 slots=4",
                "hostfile line 1: unexpected 'slots=4' after 'NAME slots=N'",
            ),
            (
                "ok slots=1\nuser@worker-0 slots=8",
                "hostfile line 2: invalid host name 'user@worker-0' (allowed: letters, digits, '.', '_', '-')",
            ),
            (
                "worker/0 slots=8",
                "hostfile line 1: invalid host name 'worker/0' (allowed: letters, digits, '.', '_', '-')",
            ),
            (
                "worker-0:22 slots=8",
                "hostfile line 1: invalid host name 'worker-0:22' (allowed: letters, digits, '.', '_', '-')",
            ),
            (
                "a,b slots=8",
                "hostfile line 1: invalid host name 'a,b' (allowed: letters, digits, '.', '_', '-')",
            ),
        ];
        for &(text, want) in cases {
            match parse_hostfile(text) {
                Ok(hf) => panic!("{text:?}: expected error {want:?}, got {hf:?}"),
                Err(e) => assert_eq!(e.to_string(), want, "{text:?}"),
            }
        }
    }

    #[test]
    fn error_variants_carry_fields() {
        match parse_hostfile("a slots=1\nb slots=1\n\na slots=2") {
            Err(HostfileError::DuplicateHost {
                line,
                name,
                first_line,
            }) => {
                assert_eq!((line, name.as_str(), first_line), (4, "a", 1));
            }
            other => panic!("{other:?}"),
        }
        match parse_hostfile("\n\nw slots=x") {
            Err(HostfileError::InvalidSlots { line, host, value }) => {
                assert_eq!((line, host.as_str(), value.as_str()), (3, "w", "x"));
            }
            other => panic!("{other:?}"),
        }
        match parse_hostfile("w:1 slots=x") {
            // The name is checked before the slot value.
            Err(HostfileError::InvalidName { line: 1, name }) => assert_eq!(name, "w:1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_hostfile("w slots=1 x"),
            Err(HostfileError::ExtraTokens { line: 1, .. })
        ));
        assert!(matches!(
            parse_hostfile("#\nw"),
            Err(HostfileError::Malformed { line: 2, .. })
        ));
        assert!(matches!(parse_hostfile("#"), Err(HostfileError::Empty)));
        let lines: &[(&str, Option<usize>)] = &[
            ("", None),
            ("x", Some(1)),
            ("a slots=1\n\nb:1 slots=1", Some(3)),
            ("a slots=0", Some(1)),
            ("\na slots=1 b", Some(2)),
            ("a slots=1\na slots=1", Some(2)),
        ];
        for &(text, want) in lines {
            assert_eq!(parse_hostfile(text).unwrap_err().line(), want, "{text:?}");
        }
    }

    #[test]
    fn messages_are_one_line() {
        for text in [
            "w slots=1 x\u{2028}y",
            "w\x0bslot=1",
            "w slots=1 x\x0cy\rz",
            "a\u{85}b slots=1",
        ] {
            let msg = parse_hostfile(text).unwrap_err().to_string();
            assert!(
                !msg.chars()
                    .any(|c| c != ' ' && (c.is_whitespace() || c.is_control())),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn load_reads_a_file_and_names_the_path_on_error() {
        let dir = std::env::temp_dir().join(format!(
            "ringmaster-hostfile-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hostfile");
        std::fs::write(&path, "worker-0 slots=2 # c\nworker-1 slots=4\n").unwrap();
        let hf = Hostfile::load(&path).unwrap();
        assert_eq!(hf.hosts, vec![host("worker-0", 2), host("worker-1", 4)]);
        assert_eq!(hf.get("worker-1"), Some(&host("worker-1", 4)));
        assert_eq!(hf.get("worker-2"), None);
        assert_eq!(hf.total_slots(), 6);

        std::fs::write(&path, "worker-0 slots=0\n").unwrap();
        assert_eq!(
            Hostfile::load(&path).unwrap_err().to_string(),
            "hostfile line 1: slots for host 'worker-0' must be an integer in 1..=1024, got '0'"
        );

        let missing = dir.join("missing");
        let err = Hostfile::load(&missing).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("cannot read hostfile '{}': ", missing.display())),
            "{msg}"
        );
        match err {
            HostfileError::Io { path, error } => {
                assert_eq!(path, missing);
                assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
