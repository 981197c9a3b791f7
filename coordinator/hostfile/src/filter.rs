//! DeepSpeed-grammar host filters, as given to `--include` / `--exclude`.
//!
//! ```text
//! FILTER := ENTRY ('@' ENTRY)*
//! ENTRY  := NAME (':' SLOT (',' SLOT)*)?
//! ```
//!
//! `worker-0@worker-1:0,2` names all of `worker-0` and slots 0 and 2 of
//! `worker-1`. Whitespace around the whole string is ignored; whitespace
//! inside it is an error. Names follow the hostfile rule (`[A-Za-z0-9._-]`),
//! slots are non-negative integers, and neither a host nor a slot of one host
//! may repeat. Whether the hosts and slots exist is checked later, by
//! [`select`](crate::select()).

use std::collections::HashSet;
use std::fmt;

use crate::{Shown, is_valid_host_name};

/// A parsed `--include` or `--exclude` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Use only these hosts (and slots).
    Include(Vec<HostSel>),
    /// Use every host except these (or except these slots of them).
    Exclude(Vec<HostSel>),
}

impl Filter {
    /// The host selections, whichever kind of filter this is.
    pub fn sels(&self) -> &[HostSel] {
        match self {
            Filter::Include(sels) | Filter::Exclude(sels) => sels,
        }
    }
}

/// One entry of a filter: a host and optionally some of its slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSel {
    pub name: String,
    /// The slots as written (order kept); `None` means all of the host's slots.
    pub slots: Option<Vec<u32>>,
}

/// Renders as it would be written in a filter: `name` or `name:0,2`.
impl fmt::Display for HostSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(slots) = &self.slots {
            for (i, slot) in slots.iter().enumerate() {
                write!(f, "{}{slot}", if i == 0 { ':' } else { ',' })?;
            }
        }
        Ok(())
    }
}

/// Renders selections back into filter syntax (`a@b:0,2`); for any `sels`
/// returned by [`parse_filter`], `parse_filter(&render_filter(&sels))` gives
/// `sels` again.
pub fn render_filter(sels: &[HostSel]) -> String {
    sels.iter()
        .map(HostSel::to_string)
        .collect::<Vec<_>>()
        .join("@")
}

/// Why a filter string could not be parsed. Every variant carries the filter
/// (trimmed) so that its message can quote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Nothing but whitespace.
    #[error("host filter is empty")]
    Empty,
    /// Whitespace inside the filter.
    #[error("host filter '{}': whitespace is not allowed inside a filter", Shown(.filter))]
    Whitespace { filter: String },
    /// An empty entry (`a@@b`, a leading or trailing `@`) or an entry with
    /// no name before its `:`. `entry` is 1-based.
    #[error("host filter '{}': entry {entry} has no host name", Shown(.filter))]
    EmptyHost { filter: String, entry: usize },
    /// A host name with characters outside `[A-Za-z0-9._-]`.
    #[error(
        "host filter '{}': invalid host name '{}' (allowed: letters, digits, '.', '_', '-')",
        Shown(.filter),
        Shown(.name)
    )]
    InvalidName { filter: String, name: String },
    /// `host:` with nothing after the colon.
    #[error("host filter '{}': empty slot list after '{host}:'", Shown(.filter))]
    EmptySlots { filter: String, host: String },
    /// A slot that is not a non-negative integer (empty ones included).
    #[error(
        "host filter '{}': slot '{}' of host '{host}' is not a non-negative integer",
        Shown(.filter),
        Shown(.slot)
    )]
    InvalidSlot {
        filter: String,
        host: String,
        slot: String,
    },
    /// The same slot twice for one host.
    #[error("host filter '{}': slot {slot} of host '{host}' is listed twice", Shown(.filter))]
    DuplicateSlot {
        filter: String,
        host: String,
        slot: u32,
    },
    /// The same host in two entries.
    #[error("host filter '{}': host '{host}' is listed twice", Shown(.filter))]
    DuplicateHost { filter: String, host: String },
}

/// Parses a filter string (see the [module docs](self) for the grammar).
pub fn parse_filter(text: &str) -> Result<Vec<HostSel>, FilterError> {
    let filter = text.trim();
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    let owned = || filter.to_string();
    if filter.contains(char::is_whitespace) {
        return Err(FilterError::Whitespace { filter: owned() });
    }
    let mut sels: Vec<HostSel> = Vec::new();
    let mut seen_hosts: HashSet<&str> = HashSet::new();
    for (index, entry) in filter.split('@').enumerate() {
        let (name, slot_list) = match entry.split_once(':') {
            Some((name, slots)) => (name, Some(slots)),
            None => (entry, None),
        };
        if name.is_empty() {
            return Err(FilterError::EmptyHost {
                filter: owned(),
                entry: index + 1,
            });
        }
        if !is_valid_host_name(name) {
            return Err(FilterError::InvalidName {
                filter: owned(),
                name: name.to_string(),
            });
        }
        let slots = match slot_list {
            None => None,
            Some("") => {
                return Err(FilterError::EmptySlots {
                    filter: owned(),
                    host: name.to_string(),
                });
            }
            Some(list) => {
                let mut slots = Vec::new();
                for item in list.split(',') {
                    let slot = parse_slot(item).ok_or_else(|| FilterError::InvalidSlot {
                        filter: owned(),
                        host: name.to_string(),
                        slot: item.to_string(),
                    })?;
                    if slots.contains(&slot) {
                        return Err(FilterError::DuplicateSlot {
                            filter: owned(),
                            host: name.to_string(),
                            slot,
                        });
                    }
                    slots.push(slot);
                }
                Some(slots)
            }
        };
        if !seen_hosts.insert(name) {
            return Err(FilterError::DuplicateHost {
                filter: owned(),
                host: name.to_string(),
            });
        }
        sels.push(HostSel {
            name: name.to_string(),
            slots,
        });
    }
    Ok(sels)
}

/// ASCII digits only (no sign), no overflow.
fn parse_slot(item: &str) -> Option<u32> {
    if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    item.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(name: &str, slots: Option<&[u32]>) -> HostSel {
        HostSel {
            name: name.to_string(),
            slots: slots.map(<[u32]>::to_vec),
        }
    }

    #[test]
    fn parses_valid_filters() {
        type Want<'a> = &'a [(&'a str, Option<&'a [u32]>)];
        let cases: &[(&str, Want)] = &[
            ("worker-0", &[("worker-0", None)]),
            ("  worker-0\t\n", &[("worker-0", None)]),
            ("worker-0:3", &[("worker-0", Some(&[3]))]),
            (
                "worker-0@worker-1:0,2",
                &[("worker-0", None), ("worker-1", Some(&[0, 2]))],
            ),
            // Filter order and slot order are kept as written.
            ("b:2,0,1@a", &[("b", Some(&[2, 0, 1])), ("a", None)]),
            ("localhost:0", &[("localhost", Some(&[0]))]),
            ("h:007", &[("h", Some(&[7]))]),
            ("h:4294967295", &[("h", Some(&[u32::MAX]))]),
            ("10.0.0.1@a.b_c-D", &[("10.0.0.1", None), ("a.b_c-D", None)]),
        ];
        for &(text, want) in cases {
            let got = parse_filter(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let want: Vec<HostSel> = want.iter().map(|&(n, s)| sel(n, s)).collect();
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn rejects_bad_filters_with_exact_messages() {
        let cases: &[(&str, &str)] = &[
            ("", "host filter is empty"),
            (" \t\n", "host filter is empty"),
            (
                "a @b",
                "host filter 'a @b': whitespace is not allowed inside a filter",
            ),
            (
                "a:0, 1",
                "host filter 'a:0, 1': whitespace is not allowed inside a filter",
            ),
            (
                "a\t@b",
                "host filter 'a\\t@b': whitespace is not allowed inside a filter",
            ),
            ("a@@b", "host filter 'a@@b': entry 2 has no host name"),
            ("@a", "host filter '@a': entry 1 has no host name"),
            ("a@", "host filter 'a@': entry 2 has no host name"),
            ("@", "host filter '@': entry 1 has no host name"),
            ("a@:0", "host filter 'a@:0': entry 2 has no host name"),
            (
                "worker-1:",
                "host filter 'worker-1:': empty slot list after 'worker-1:'",
            ),
            (
                "a@worker-1:@b",
                "host filter 'a@worker-1:@b': empty slot list after 'worker-1:'",
            ),
            (
                "w:x",
                "host filter 'w:x': slot 'x' of host 'w' is not a non-negative integer",
            ),
            (
                "w:-1",
                "host filter 'w:-1': slot '-1' of host 'w' is not a non-negative integer",
            ),
            (
                "w:+1",
                "host filter 'w:+1': slot '+1' of host 'w' is not a non-negative integer",
            ),
            (
                "w:0,,1",
                "host filter 'w:0,,1': slot '' of host 'w' is not a non-negative integer",
            ),
            (
                "w:0,",
                "host filter 'w:0,': slot '' of host 'w' is not a non-negative integer",
            ),
            (
                "w:,0",
                "host filter 'w:,0': slot '' of host 'w' is not a non-negative integer",
            ),
            (
                "w:0:1",
                "host filter 'w:0:1': slot '0:1' of host 'w' is not a non-negative integer",
            ),
            (
                "w:4294967296",
                "host filter 'w:4294967296': slot '4294967296' of host 'w' is not a non-negative integer",
            ),
            (
                "w:1.5",
                "host filter 'w:1.5': slot '1.5' of host 'w' is not a non-negative integer",
            ),
            (
                "w:0,2,0",
                "host filter 'w:0,2,0': slot 0 of host 'w' is listed twice",
            ),
            (
                "w:1,01",
                "host filter 'w:1,01': slot 1 of host 'w' is listed twice",
            ),
            ("w@v@w", "host filter 'w@v@w': host 'w' is listed twice"),
            ("w:0@w:1", "host filter 'w:0@w:1': host 'w' is listed twice"),
            (
                "user/w",
                "host filter 'user/w': invalid host name 'user/w' (allowed: letters, digits, '.', '_', '-')",
            ),
            (
                "a,b",
                "host filter 'a,b': invalid host name 'a,b' (allowed: letters, digits, '.', '_', '-')",
            ),
            (
                "ok@wö:1",
                "host filter 'ok@wö:1': invalid host name 'wö' (allowed: letters, digits, '.', '_', '-')",
            ),
            (
                "a#b",
                "host filter 'a#b': invalid host name 'a#b' (allowed: letters, digits, '.', '_', '-')",
            ),
        ];
        for &(text, want) in cases {
            match parse_filter(text) {
                Ok(sels) => panic!("{text:?}: expected error {want:?}, got {sels:?}"),
                Err(e) => assert_eq!(e.to_string(), want, "{text:?}"),
            }
        }
    }

    #[test]
    fn error_variants_carry_fields() {
        assert_eq!(
            parse_filter(" a@@b "),
            Err(FilterError::EmptyHost {
                filter: "a@@b".into(),
                entry: 2
            })
        );
        assert_eq!(
            parse_filter("a:1,1"),
            Err(FilterError::DuplicateSlot {
                filter: "a:1,1".into(),
                host: "a".into(),
                slot: 1
            })
        );
        assert_eq!(
            parse_filter("a@a:0"),
            Err(FilterError::DuplicateHost {
                filter: "a@a:0".into(),
                host: "a".into()
            })
        );
    }

    #[test]
    fn render_round_trips() {
        for text in [
            "worker-0",
            "worker-0@worker-1:0,2",
            "b:2,0,1@a@c:9",
            " h:007 ",
        ] {
            let sels = parse_filter(text).unwrap();
            let rendered = render_filter(&sels);
            assert_eq!(parse_filter(&rendered).unwrap(), sels, "{text:?}");
        }
        let sels = vec![sel("a", Some(&[0, 2])), sel("b", None)];
        assert_eq!(render_filter(&sels), "a:0,2@b");
        assert_eq!(sels[0].to_string(), "a:0,2");
        assert_eq!(render_filter(&[]), "");
    }

    #[test]
    fn filter_sels() {
        let sels = vec![sel("a", None)];
        assert_eq!(Filter::Include(sels.clone()).sels(), &sels[..]);
        assert_eq!(Filter::Exclude(sels.clone()).sels(), &sels[..]);
    }
}
