//! Choosing hosts and slots for a launch, and numbering the chosen slots.
//!
//! [`select`] follows DeepSpeed's launcher: either a filter (`include` or
//! `exclude`, never both) or counts (`nodes`, `gpus_per_node`), never a
//! filter together with counts. Hosts keep the order they are given in (the
//! hostfile's, or the joined agents sorted with [`natural_cmp`]), whatever the
//! order in the filter, and slots are listed ascending.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use crate::filter::{FilterError, HostSel, parse_filter};
use crate::hostfile::Host;

/// What the user asked for. All `None` means every slot of every host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request<'a> {
    /// `--include` filter text.
    pub include: Option<&'a str>,
    /// `--exclude` filter text.
    pub exclude: Option<&'a str>,
    /// Use the first N hosts.
    pub nodes: Option<u32>,
    /// Use the first G slots of every chosen host.
    pub gpus_per_node: Option<u32>,
}

/// A chosen host and its chosen slots (ascending, non-empty).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selected {
    pub name: String,
    pub slots: Vec<u32>,
}

/// One process of the launch: where it runs and its ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSlot {
    /// Global rank: the slots of all earlier nodes plus `local_rank`.
    pub rank: u32,
    /// Index among this node's chosen slots.
    pub local_rank: u32,
    /// Position of the node in the selection.
    pub node_rank: u32,
    pub node: String,
    /// The slot (GPU) number on the node, e.g. 2 for the second process of
    /// `worker-1:0,2`.
    pub slot: u32,
}

/// Which filter an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    Include,
    Exclude,
}

impl fmt::Display for FilterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilterKind::Include => "include",
            FilterKind::Exclude => "exclude",
        })
    }
}

/// Why no selection could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Both `include` and `exclude` were given.
    #[error("include and exclude filters cannot be combined; give one of them")]
    IncludeAndExclude,
    /// A filter together with `nodes` or `gpus_per_node` (`count` is one of
    /// those two names).
    #[error(
        "cannot combine an {filter} filter with {count}: the filter already chooses the hosts and slots"
    )]
    FilterWithCount {
        filter: FilterKind,
        count: &'static str,
    },
    /// The filter text does not parse.
    #[error("invalid {kind} filter: {error}")]
    Filter {
        kind: FilterKind,
        error: FilterError,
    },
    /// No host with at least one slot was given.
    #[error("no hosts available to select from")]
    NoHosts,
    /// The filter says `localhost`, there is more than one host and none of
    /// them is called `localhost`.
    #[error(
        "{kind} filter names 'localhost', but there are {hosts} hosts and none is named localhost"
    )]
    AmbiguousLocalhost { kind: FilterKind, hosts: usize },
    /// The filter names the only host both as `localhost` and by its name.
    #[error("{kind} filter names host '{host}' twice (once as 'localhost')")]
    LocalhostDuplicate { kind: FilterKind, host: String },
    /// The filter names a host that is not available.
    #[error("{kind} filter names unknown host '{host}' (known hosts: {})", list(.known))]
    UnknownHost {
        kind: FilterKind,
        host: String,
        known: Vec<String>,
    },
    /// The filter names a slot the host does not have.
    #[error(
        "{kind} filter names slot {slot} of host '{host}', which has only {slots} slots (0..={})",
        .slots - 1
    )]
    SlotOutOfRange {
        kind: FilterKind,
        host: String,
        slot: u32,
        slots: u32,
    },
    /// `nodes` is 0 or more than the hosts available.
    #[error("cannot select {requested} nodes: {available} available (need 1..={available})")]
    BadNodeCount { requested: u32, available: usize },
    /// `gpus_per_node` is 0 or more than a chosen host's slots.
    #[error(
        "cannot use {requested} GPUs per node on host '{host}', which has {slots} slots (need 1..={slots})"
    )]
    BadGpuCount {
        host: String,
        requested: u32,
        slots: u32,
    },
    /// The exclude filter left nothing.
    #[error("nothing left to run on: the {kind} filter removes every host and slot")]
    NothingSelected { kind: FilterKind },
}

/// Lists known hosts on one line, eliding a very long list.
fn list(names: &[String]) -> String {
    const SHOWN: usize = 16;
    let mut out = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.is_empty() {
        out.push_str("none");
    } else if names.len() > SHOWN {
        out.push_str(&format!(", ... and {} more", names.len() - SHOWN));
    }
    out
}

/// Select nodes and slots from the available hosts (hostfile order, or the joined agents sorted by name).
///
/// A host with 0 slots is not available; if a name repeats, only its first
/// host counts. The result is never empty: in hosts order, each with its
/// slots ascending and non-empty.
pub fn select(hosts: &[Host], req: &Request) -> Result<Vec<Selected>, SelectError> {
    let filter = match (req.include, req.exclude) {
        (Some(_), Some(_)) => return Err(SelectError::IncludeAndExclude),
        (Some(text), None) => Some((FilterKind::Include, text)),
        (None, Some(text)) => Some((FilterKind::Exclude, text)),
        (None, None) => None,
    };
    if let Some((kind, _)) = filter {
        let count = if req.nodes.is_some() {
            Some("nodes")
        } else if req.gpus_per_node.is_some() {
            Some("gpus_per_node")
        } else {
            None
        };
        if let Some(count) = count {
            return Err(SelectError::FilterWithCount {
                filter: kind,
                count,
            });
        }
    }

    // Linear in the host count: the coordinator runs this for every waiting job whenever
    // membership changes, with hostfiles of thousands of nodes.
    let mut available: Vec<&Host> = Vec::with_capacity(hosts.len());
    let mut seen: std::collections::HashSet<&str> =
        std::collections::HashSet::with_capacity(hosts.len());
    for host in hosts {
        if host.slots > 0 && seen.insert(host.name.as_str()) {
            available.push(host);
        }
    }
    if available.is_empty() {
        return Err(SelectError::NoHosts);
    }

    let Some((kind, text)) = filter else {
        return select_counts(&available, req.nodes, req.gpus_per_node);
    };
    let sels = parse_filter(text).map_err(|error| SelectError::Filter { kind, error })?;
    let chosen = resolve(kind, &sels, &available)?;
    let mut selected = Vec::new();
    for (index, host) in available.iter().enumerate() {
        let slots = match (kind, chosen.get(&index)) {
            (FilterKind::Include, None) => continue,
            (FilterKind::Include, Some(None)) => all_slots(host.slots),
            (FilterKind::Include, Some(Some(slots))) => {
                let mut slots = slots.to_vec();
                slots.sort_unstable();
                slots
            }
            (FilterKind::Exclude, None) => all_slots(host.slots),
            (FilterKind::Exclude, Some(None)) => continue,
            (FilterKind::Exclude, Some(Some(removed))) => (0..host.slots)
                .filter(|slot| !removed.contains(slot))
                .collect(),
        };
        if !slots.is_empty() {
            selected.push(Selected {
                name: host.name.clone(),
                slots,
            });
        }
    }
    if selected.is_empty() {
        return Err(SelectError::NothingSelected { kind });
    }
    Ok(selected)
}

/// Maps each filter entry to the index of its host in `available`, checking
/// names and slots, with `localhost` meaning the only host.
fn resolve<'s>(
    kind: FilterKind,
    sels: &'s [HostSel],
    available: &[&Host],
) -> Result<HashMap<usize, Option<&'s Vec<u32>>>, SelectError> {
    let mut chosen = HashMap::new();
    for sel in sels {
        let index = match available.iter().position(|h| h.name == sel.name) {
            Some(index) => index,
            None if sel.name == "localhost" && available.len() == 1 => 0,
            None if sel.name == "localhost" => {
                return Err(SelectError::AmbiguousLocalhost {
                    kind,
                    hosts: available.len(),
                });
            }
            None => {
                return Err(SelectError::UnknownHost {
                    kind,
                    host: sel.name.clone(),
                    known: available.iter().map(|h| h.name.clone()).collect(),
                });
            }
        };
        let host = available[index];
        let out_of_range = sel.slots.iter().flatten().find(|&&slot| slot >= host.slots);
        if let Some(&slot) = out_of_range {
            return Err(SelectError::SlotOutOfRange {
                kind,
                host: host.name.clone(),
                slot,
                slots: host.slots,
            });
        }
        if chosen.insert(index, sel.slots.as_ref()).is_some() {
            return Err(SelectError::LocalhostDuplicate {
                kind,
                host: host.name.clone(),
            });
        }
    }
    Ok(chosen)
}

fn select_counts(
    available: &[&Host],
    nodes: Option<u32>,
    gpus_per_node: Option<u32>,
) -> Result<Vec<Selected>, SelectError> {
    let hosts = match nodes {
        None => available,
        Some(n) => {
            let count = usize::try_from(n).unwrap_or(usize::MAX);
            if n == 0 || count > available.len() {
                return Err(SelectError::BadNodeCount {
                    requested: n,
                    available: available.len(),
                });
            }
            &available[..count]
        }
    };
    hosts
        .iter()
        .map(|host| {
            let take = match gpus_per_node {
                None => host.slots,
                Some(g) if g == 0 || g > host.slots => {
                    return Err(SelectError::BadGpuCount {
                        host: host.name.clone(),
                        requested: g,
                        slots: host.slots,
                    });
                }
                Some(g) => g,
            };
            Ok(Selected {
                name: host.name.clone(),
                slots: all_slots(take),
            })
        })
        .collect()
}

fn all_slots(count: u32) -> Vec<u32> {
    (0..count).collect()
}

/// Numbers every chosen slot: node by node in order, slots in the order
/// given (ascending from [`select`]).
pub fn rank_table(selected: &[Selected]) -> Vec<RankSlot> {
    let mut table = Vec::with_capacity(selected.iter().map(|s| s.slots.len()).sum());
    let mut rank = 0u32;
    for (node_rank, node) in (0u32..).zip(selected) {
        for (local_rank, &slot) in (0u32..).zip(&node.slots) {
            table.push(RankSlot {
                rank,
                local_rank,
                node_rank,
                node: node.name.clone(),
                slot,
            });
            rank += 1;
        }
    }
    table
}

/// Orders names the way people count: runs of ASCII digits compare as
/// numbers, so `node-2 < node-10`; everything else compares by character.
/// Names equal under that rule (`n01`, `n1`) fall back to plain string order,
/// so this is a total order consistent with `==`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(cx), Some(cy)) if cx.is_ascii_digit() && cy.is_ascii_digit() => {
                let (nx, rest_x) = split_digits(x);
                let (ny, rest_y) = split_digits(y);
                let ord = cmp_digit_runs(nx, ny);
                if ord != Ordering::Equal {
                    return ord;
                }
                (x, y) = (rest_x, rest_y);
            }
            (Some(cx), Some(cy)) => {
                // Byte order on UTF-8 is code point order, and a digit byte
                // never occurs inside a multi-byte character.
                let ord = cx.cmp(cy);
                if ord != Ordering::Equal {
                    return ord;
                }
                (x, y) = (&x[1..], &y[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Compares two runs of ASCII digits by value, whatever their length.
fn cmp_digit_runs(x: &[u8], y: &[u8]) -> Ordering {
    let strip = |s: &[u8]| -> usize { s.iter().position(|&b| b != b'0').unwrap_or(s.len()) };
    let (x, y) = (&x[strip(x)..], &y[strip(y)..]);
    x.len().cmp(&y.len()).then_with(|| x.cmp(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(spec: &[(&str, u32)]) -> Vec<Host> {
        spec.iter()
            .map(|&(name, slots)| Host {
                name: name.to_string(),
                slots,
            })
            .collect()
    }

    /// `worker-0:0,1 worker-2:3` style, for compact expectations.
    fn show(selected: &[Selected]) -> String {
        selected
            .iter()
            .map(|s| {
                let slots: Vec<String> = s.slots.iter().map(u32::to_string).collect();
                format!("{}:{}", s.name, slots.join(","))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn req<'a>(
        include: Option<&'a str>,
        exclude: Option<&'a str>,
        nodes: Option<u32>,
        gpus_per_node: Option<u32>,
    ) -> Request<'a> {
        Request {
            include,
            exclude,
            nodes,
            gpus_per_node,
        }
    }

    /// (hosts as (name, slots), request, expected `show()` output or message)
    type Case<'a> = (&'a [(&'a str, u32)], Request<'a>, &'a str);

    const POOL: &[(&str, u32)] = &[("worker-0", 4), ("worker-1", 4), ("worker-2", 2)];

    #[test]
    fn selects_as_requested() {
        let cases: &[Case] = &[
            // Nothing asked: everything, in hosts order.
            (
                POOL,
                Request::default(),
                "worker-0:0,1,2,3 worker-1:0,1,2,3 worker-2:0,1",
            ),
            // include: hosts order, not filter order; slots sorted.
            (
                POOL,
                req(Some("worker-2@worker-0"), None, None, None),
                "worker-0:0,1,2,3 worker-2:0,1",
            ),
            (
                POOL,
                req(Some("worker-1:2,0"), None, None, None),
                "worker-1:0,2",
            ),
            (
                POOL,
                req(Some(" worker-2:1@worker-0:3 "), None, None, None),
                "worker-0:3 worker-2:1",
            ),
            // exclude: whole hosts, some slots, all slots of a host.
            (
                POOL,
                req(None, Some("worker-1"), None, None),
                "worker-0:0,1,2,3 worker-2:0,1",
            ),
            (
                POOL,
                req(None, Some("worker-0:1,3@worker-2:0"), None, None),
                "worker-0:0,2 worker-1:0,1,2,3 worker-2:1",
            ),
            (
                POOL,
                req(None, Some("worker-2:1,0"), None, None),
                "worker-0:0,1,2,3 worker-1:0,1,2,3",
            ),
            // localhost means the only host...
            (
                &[("worker-0", 2)],
                req(Some("localhost:1"), None, None, None),
                "worker-0:1",
            ),
            (
                &[("worker-0", 2)],
                req(None, Some("localhost:0"), None, None),
                "worker-0:1",
            ),
            // ...or the host literally called localhost.
            (
                &[("a", 1), ("localhost", 2)],
                req(Some("localhost"), None, None, None),
                "localhost:0,1",
            ),
            (
                &[("localhost", 2)],
                req(Some("localhost:1"), None, None, None),
                "localhost:1",
            ),
            // Counts.
            (
                POOL,
                req(None, None, Some(2), None),
                "worker-0:0,1,2,3 worker-1:0,1,2,3",
            ),
            (
                POOL,
                req(None, None, Some(3), None),
                "worker-0:0,1,2,3 worker-1:0,1,2,3 worker-2:0,1",
            ),
            (
                POOL,
                req(None, None, None, Some(2)),
                "worker-0:0,1 worker-1:0,1 worker-2:0,1",
            ),
            (POOL, req(None, None, Some(1), Some(3)), "worker-0:0,1,2"),
            // gpus_per_node is only checked against the chosen hosts.
            (
                POOL,
                req(None, None, Some(2), Some(4)),
                "worker-0:0,1,2,3 worker-1:0,1,2,3",
            ),
            // Zero-slot hosts are unavailable, repeated names count once.
            (&[("a", 0), ("b", 1), ("b", 5)], Request::default(), "b:0"),
            (
                &[("a", 0), ("b", 2)],
                req(None, None, Some(1), None),
                "b:0,1",
            ),
            (
                &[("a", 0), ("b", 2)],
                req(Some("localhost"), None, None, None),
                "b:0,1",
            ),
        ];
        for (pool, request, want) in cases {
            let got = select(&hosts(pool), request)
                .unwrap_or_else(|e| panic!("{pool:?} {request:?}: {e}"));
            assert_eq!(show(&got), *want, "{pool:?} {request:?}");
        }
    }

    #[test]
    fn rejects_bad_requests_with_exact_messages() {
        let cases: &[Case] = &[
            (
                POOL,
                req(Some("worker-0"), Some("worker-1"), None, None),
                "include and exclude filters cannot be combined; give one of them",
            ),
            (
                POOL,
                req(Some("worker-0"), None, Some(1), None),
                "cannot combine an include filter with nodes: the filter already chooses the hosts and slots",
            ),
            (
                POOL,
                req(Some("worker-0"), None, None, Some(1)),
                "cannot combine an include filter with gpus_per_node: the filter already chooses the hosts and slots",
            ),
            (
                POOL,
                req(None, Some("worker-0"), None, Some(1)),
                "cannot combine an exclude filter with gpus_per_node: the filter already chooses the hosts and slots",
            ),
            (
                POOL,
                req(None, Some("worker-0"), Some(2), Some(1)),
                "cannot combine an exclude filter with nodes: the filter already chooses the hosts and slots",
            ),
            (
                POOL,
                req(Some(""), None, None, None),
                "invalid include filter: host filter is empty",
            ),
            (
                POOL,
                req(None, Some("a@@b"), None, None),
                "invalid exclude filter: host filter 'a@@b': entry 2 has no host name",
            ),
            (&[], Request::default(), "no hosts available to select from"),
            (
                &[("a", 0)],
                req(None, None, Some(1), None),
                "no hosts available to select from",
            ),
            (
                POOL,
                req(Some("localhost"), None, None, None),
                "include filter names 'localhost', but there are 3 hosts and none is named localhost",
            ),
            (
                POOL,
                req(None, Some("worker-0@localhost:1"), None, None),
                "exclude filter names 'localhost', but there are 3 hosts and none is named localhost",
            ),
            (
                &[("worker-0", 2)],
                req(Some("worker-0:0@localhost:1"), None, None, None),
                "include filter names host 'worker-0' twice (once as 'localhost')",
            ),
            (
                POOL,
                req(Some("worker-0@worker-9"), None, None, None),
                "include filter names unknown host 'worker-9' (known hosts: worker-0, worker-1, worker-2)",
            ),
            (
                POOL,
                req(None, Some("worker-3:0"), None, None),
                "exclude filter names unknown host 'worker-3' (known hosts: worker-0, worker-1, worker-2)",
            ),
            (
                &[("a", 1), ("b", 0)],
                req(Some("b"), None, None, None),
                "include filter names unknown host 'b' (known hosts: a)",
            ),
            (
                POOL,
                req(Some("worker-2:0,2"), None, None, None),
                "include filter names slot 2 of host 'worker-2', which has only 2 slots (0..=1)",
            ),
            (
                &[("worker-0", 2)],
                req(None, Some("localhost:7"), None, None),
                "exclude filter names slot 7 of host 'worker-0', which has only 2 slots (0..=1)",
            ),
            (
                POOL,
                req(None, None, Some(0), None),
                "cannot select 0 nodes: 3 available (need 1..=3)",
            ),
            (
                POOL,
                req(None, None, Some(4), Some(1)),
                "cannot select 4 nodes: 3 available (need 1..=3)",
            ),
            (
                POOL,
                req(None, None, Some(u32::MAX), None),
                "cannot select 4294967295 nodes: 3 available (need 1..=3)",
            ),
            (
                POOL,
                req(None, None, None, Some(0)),
                "cannot use 0 GPUs per node on host 'worker-0', which has 4 slots (need 1..=4)",
            ),
            (
                POOL,
                req(None, None, None, Some(3)),
                "cannot use 3 GPUs per node on host 'worker-2', which has 2 slots (need 1..=2)",
            ),
            (
                POOL,
                req(None, None, Some(1), Some(5)),
                "cannot use 5 GPUs per node on host 'worker-0', which has 4 slots (need 1..=4)",
            ),
            (
                POOL,
                req(None, Some("worker-0@worker-1@worker-2:0,1"), None, None),
                "nothing left to run on: the exclude filter removes every host and slot",
            ),
            (
                &[("worker-0", 2)],
                req(None, Some("localhost"), None, None),
                "nothing left to run on: the exclude filter removes every host and slot",
            ),
        ];
        for (pool, request, want) in cases {
            match select(&hosts(pool), request) {
                Ok(got) => panic!("{pool:?} {request:?}: expected {want:?}, got {got:?}"),
                Err(e) => assert_eq!(e.to_string(), *want, "{pool:?} {request:?}"),
            }
        }
    }

    #[test]
    fn error_variants_carry_fields() {
        let pool = hosts(POOL);
        assert_eq!(
            select(&pool, &req(Some("nope:0"), None, None, None)),
            Err(SelectError::UnknownHost {
                kind: FilterKind::Include,
                host: "nope".into(),
                known: vec!["worker-0".into(), "worker-1".into(), "worker-2".into()],
            })
        );
        assert_eq!(
            select(&pool, &req(None, Some("worker-1:4"), None, None)),
            Err(SelectError::SlotOutOfRange {
                kind: FilterKind::Exclude,
                host: "worker-1".into(),
                slot: 4,
                slots: 4,
            })
        );
        assert_eq!(
            select(&pool, &req(None, None, Some(9), None)),
            Err(SelectError::BadNodeCount {
                requested: 9,
                available: 3
            })
        );
        assert!(matches!(
            select(&pool, &req(Some("w:"), None, None, None)),
            Err(SelectError::Filter {
                kind: FilterKind::Include,
                error: FilterError::EmptySlots { .. }
            })
        ));
    }

    #[test]
    fn long_known_host_lists_are_elided() {
        let names: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        let pool: Vec<Host> = names
            .iter()
            .map(|n| Host {
                name: n.clone(),
                slots: 1,
            })
            .collect();
        let msg = select(&pool, &req(Some("x"), None, None, None))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "include filter names unknown host 'x' (known hosts: n0, n1, n2, n3, n4, n5, n6, n7, \
             n8, n9, n10, n11, n12, n13, n14, n15, ... and 4 more)"
        );
    }

    #[test]
    fn rank_table_numbers_slots() {
        let pool = hosts(&[("worker-0", 2), ("worker-1", 4), ("worker-2", 1)]);
        let selected =
            select(&pool, &req(Some("worker-0@worker-1:0,2"), None, None, None)).unwrap();
        let table = rank_table(&selected);
        let got: Vec<(u32, u32, u32, &str, u32)> = table
            .iter()
            .map(|r| (r.rank, r.local_rank, r.node_rank, r.node.as_str(), r.slot))
            .collect();
        // (rank, local_rank, node_rank, node, slot)
        let want = [
            (0, 0, 0, "worker-0", 0),
            (1, 1, 0, "worker-0", 1),
            (2, 0, 1, "worker-1", 0),
            (3, 1, 1, "worker-1", 2),
        ];
        assert_eq!(got, want);

        assert_eq!(rank_table(&[]), vec![]);
        let table = rank_table(&[
            Selected {
                name: "a".into(),
                slots: vec![3],
            },
            Selected {
                name: "b".into(),
                slots: vec![1, 5, 7],
            },
        ]);
        assert_eq!(
            table.last(),
            Some(&RankSlot {
                rank: 3,
                local_rank: 2,
                node_rank: 1,
                node: "b".into(),
                slot: 7,
            })
        );
    }

    #[test]
    fn natural_order() {
        use Ordering::*;
        let cases: &[(&str, &str, Ordering)] = &[
            ("node-2", "node-10", Less),
            ("node-10", "node-2", Greater),
            ("node-10", "node-10", Equal),
            ("node-9", "node-10", Less),
            ("a", "b", Less),
            ("", "a", Less),
            ("a", "", Greater),
            ("node", "node-1", Less),
            ("node1", "node-1", Greater), // '1' > '-'
            ("n01", "n1", Less),          // equal numbers: plain order breaks the tie
            ("n1", "n01", Greater),
            ("n1a2", "n1a10", Less),
            (
                "n99999999999999999999999",
                "n100000000000000000000000",
                Less,
            ),
            ("10.0.0.2", "10.0.0.10", Less),
            ("x2y", "x10", Less),
            ("2", "a", Less),
            ("B", "a", Less),
        ];
        for &(a, b, want) in cases {
            assert_eq!(natural_cmp(a, b), want, "{a:?} vs {b:?}");
        }
        let mut names = vec![
            "node-10", "node-2", "node-1", "gpu-a", "node-02", "node-100",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "gpu-a", "node-1", "node-02", "node-2", "node-10", "node-100"
            ]
        );
    }

    #[test]
    fn natural_order_is_a_total_order() {
        let words = [
            "", "0", "00", "1", "01", "10", "9", "a", "a0", "a00", "a1", "a01", "a10", "a-1",
            "a1b", "a1b2", "a01b", "b", "B", "n-2", "n-10", "é", "1é",
        ];
        for a in words {
            assert_eq!(natural_cmp(a, a), Ordering::Equal);
            for b in words {
                assert_eq!(
                    natural_cmp(a, b),
                    natural_cmp(b, a).reverse(),
                    "{a:?} {b:?}"
                );
                assert_eq!(natural_cmp(a, b) == Ordering::Equal, a == b, "{a:?} {b:?}");
                for c in words {
                    if natural_cmp(a, b) != Ordering::Greater
                        && natural_cmp(b, c) != Ordering::Greater
                    {
                        assert_ne!(natural_cmp(a, c), Ordering::Greater, "{a:?} {b:?} {c:?}");
                    }
                }
            }
        }
    }
}
