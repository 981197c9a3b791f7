//! Hostfiles, host filters and rank placement for Ringmaster launches.
//!
//! This crate speaks DeepSpeed's launcher grammar so that existing hostfiles
//! and `--include` / `--exclude` strings work unchanged:
//!
//! - a hostfile lists one host per line as `NAME slots=N`, with `#` comments;
//! - a filter names hosts and optionally slots, `worker-0@worker-1:0,2`;
//! - [`select`] turns the available hosts plus a [`Request`] (a filter, or a
//!   node count and GPUs per node) into the hosts and slots to launch on, and
//!   [`rank_table`] numbers those slots with global, local and node ranks.
//!
//! Everything here is pure: no I/O apart from [`Hostfile::load`], no global
//! state. Every error is an enum variant a caller can branch on, and its
//! `Display` is a single line naming what went wrong and where.
//!
//! # Layout
//!
//! - [`hostfile`]: [`Host`], [`Hostfile`], [`parse_hostfile`] and
//!   [`HostfileError`].
//! - [`filter`]: [`Filter`], [`HostSel`], [`parse_filter`], [`render_filter`]
//!   and [`FilterError`].
//! - [`select`]: [`Request`], [`Selected`], [`select`], [`RankSlot`],
//!   [`rank_table`], [`natural_cmp`] and [`SelectError`].

pub mod filter;
pub mod hostfile;
pub mod select;

pub use filter::{Filter, FilterError, HostSel, parse_filter, render_filter};
pub use hostfile::{Host, Hostfile, HostfileError, parse_hostfile};
pub use select::{
    FilterKind, RankSlot, Request, SelectError, Selected, natural_cmp, rank_table, select,
};

/// Whether `name` is a valid host name: non-empty, only `[A-Za-z0-9._-]`.
///
/// The same rule applies to hostfiles and to filters, so any name a filter
/// accepts can also appear in a hostfile.
pub fn is_valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Displays user-supplied text inside an error message while keeping the
/// message on one line: control characters and whitespace other than a plain
/// space are written as escapes (`\t`, `\n`, `\u{2028}`, ...).
pub(crate) struct Shown<'a>(pub(crate) &'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            if c == ' ' || !(c.is_whitespace() || c.is_control()) {
                f.write_char(c)?;
            } else {
                write!(f, "{}", c.escape_default())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_rule() {
        let cases: &[(&str, bool)] = &[
            ("worker-0", true),
            ("a.b_c-D9", true),
            ("10.0.0.1", true),
            ("", false),
            ("a/b", false),
            ("a:b", false),
            ("a@b", false),
            ("a,b", false),
            ("a b", false),
            ("a#b", false),
            ("wörker", false),
        ];
        for &(name, ok) in cases {
            assert_eq!(is_valid_host_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn shown_keeps_one_line() {
        let cases: &[(&str, &str)] = &[
            ("plain text", "plain text"),
            ("a\tb", "a\\tb"),
            ("a\nb\rc", "a\\nb\\rc"),
            ("x\u{2028}y", "x\\u{2028}y"),
            ("nul\0", "nul\\u{0}"),
            ("wörker", "wörker"),
        ];
        for &(input, want) in cases {
            assert_eq!(Shown(input).to_string(), want, "{input:?}");
        }
    }
}
