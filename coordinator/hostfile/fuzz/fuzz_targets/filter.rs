//! Fuzzes `parse_filter` and `select` on arbitrary input.
//!
//! The first two bytes pick `nodes` / `gpus_per_node` for a count request;
//! the rest, if UTF-8, is the filter text.
//!
//! Invariants: no panic; a parsed filter is non-empty with valid, unique
//! names and non-empty, duplicate-free slot lists, and rendering it and
//! parsing again gives the same value; error messages are one line; `select`
//! against small fixed host lists agrees with a straightforward model of its
//! rules, and `rank_table` numbers its result consecutively.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use ringmaster_hostfile::{
    Host, HostSel, Request, SelectError, Selected, is_valid_host_name, parse_filter, rank_table,
    render_filter, select,
};

fn one_line(msg: &str) -> bool {
    !msg.chars()
        .any(|c| c != ' ' && (c.is_whitespace() || c.is_control()))
}

fn hosts(spec: &[(&str, u32)]) -> Vec<Host> {
    spec.iter()
        .map(|&(name, slots)| Host {
            name: name.to_string(),
            slots,
        })
        .collect()
}

/// The filter rules, written the plain way: `None` where select must fail.
fn model(hosts: &[Host], sels: &[HostSel], include: bool) -> Option<Vec<Selected>> {
    // Per host index, the slots the filter names (None = all).
    let mut named: Vec<Option<Option<Vec<u32>>>> = vec![None; hosts.len()];
    for sel in sels {
        let index = match hosts.iter().position(|h| h.name == sel.name) {
            Some(i) => i,
            None if sel.name == "localhost" && hosts.len() == 1 => 0,
            None => return None,
        };
        if let Some(slots) = &sel.slots {
            if slots.iter().any(|&s| s >= hosts[index].slots) {
                return None;
            }
        }
        if named[index].is_some() {
            return None;
        }
        named[index] = Some(sel.slots.clone());
    }
    let mut out = Vec::new();
    for (host, named) in hosts.iter().zip(named) {
        let all = 0..host.slots;
        let slots: Vec<u32> = match (include, named) {
            (true, None) => vec![],
            (true, Some(None)) => all.collect(),
            (true, Some(Some(s))) => all.filter(|x| s.contains(x)).collect(),
            (false, None) => all.collect(),
            (false, Some(None)) => vec![],
            (false, Some(Some(s))) => all.filter(|x| !s.contains(x)).collect(),
        };
        if !slots.is_empty() {
            out.push(Selected {
                name: host.name.clone(),
                slots,
            });
        }
    }
    (!out.is_empty()).then_some(out)
}

fn check_ranks(selected: &[Selected]) {
    let table = rank_table(selected);
    assert_eq!(
        table.len(),
        selected.iter().map(|s| s.slots.len()).sum::<usize>()
    );
    for (i, r) in table.iter().enumerate() {
        assert_eq!(r.rank as usize, i);
        let node = &selected[r.node_rank as usize];
        assert_eq!(r.node, node.name);
        assert_eq!(node.slots[r.local_rank as usize], r.slot);
    }
}

fuzz_target!(|data: &[u8]| {
    let [n, g, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };

    let parsed = parse_filter(text);
    match &parsed {
        Ok(sels) => {
            assert!(!sels.is_empty());
            let mut names = HashSet::new();
            for sel in sels {
                assert!(is_valid_host_name(&sel.name), "{sel:?}");
                assert!(names.insert(sel.name.as_str()), "duplicate {sel:?}");
                if let Some(slots) = &sel.slots {
                    assert!(!slots.is_empty(), "{sel:?}");
                    let unique: HashSet<_> = slots.iter().collect();
                    assert_eq!(unique.len(), slots.len(), "{sel:?}");
                }
            }
            let rendered = render_filter(sels);
            assert_eq!(parse_filter(&rendered).as_ref(), Ok(sels), "{rendered:?}");
            assert_eq!(render_filter(&parse_filter(&rendered).unwrap()), rendered);
        }
        Err(e) => assert!(one_line(&e.to_string()), "{e}"),
    }

    let pools = [
        hosts(&[("worker-0", 4), ("worker-1", 2), ("node-10", 8)]),
        hosts(&[("worker-0", 2)]),
        hosts(&[("a", 1), ("localhost", 3)]),
    ];
    for pool in &pools {
        for include in [true, false] {
            let req = Request {
                include: include.then_some(text),
                exclude: (!include).then_some(text),
                ..Request::default()
            };
            let got = select(pool, &req);
            match (&parsed, &got) {
                (Err(pe), Err(SelectError::Filter { error, .. })) => assert_eq!(pe, error),
                (Err(pe), other) => panic!("parse failed with {pe} but select gave {other:?}"),
                (Ok(sels), _) => {
                    assert_eq!(
                        got.as_ref().ok(),
                        model(pool, sels, include).as_ref(),
                        "{text:?}"
                    );
                }
            }
            match &got {
                Ok(selected) => check_ranks(selected),
                Err(e) => assert!(one_line(&e.to_string()), "{e}"),
            }
        }

        // Counts, from the first two bytes (0 = not given).
        let nodes = (*n != 0).then_some(u32::from(*n % 8));
        let gpus = (*g != 0).then_some(u32::from(*g % 12));
        let req = Request {
            nodes,
            gpus_per_node: gpus,
            ..Request::default()
        };
        let count = nodes.map_or(pool.len(), |n| n as usize);
        let expect_ok = count >= 1
            && count <= pool.len()
            && gpus.is_none_or(|g| g >= 1 && pool[..count].iter().all(|h| g <= h.slots));
        match select(pool, &req) {
            Ok(selected) => {
                assert!(expect_ok, "{req:?} {pool:?}");
                assert_eq!(selected.len(), count);
                for (s, h) in selected.iter().zip(pool) {
                    assert_eq!(s.name, h.name);
                    let want: Vec<u32> = (0..gpus.unwrap_or(h.slots)).collect();
                    assert_eq!(s.slots, want);
                }
                check_ranks(&selected);
            }
            Err(e) => {
                assert!(!expect_ok, "{req:?} {pool:?}: {e}");
                assert!(one_line(&e.to_string()), "{e}");
            }
        }
        // A filter together with counts is always refused.
        if nodes.is_some() || gpus.is_some() {
            let req = Request {
                include: Some(text),
                ..req
            };
            assert!(matches!(
                select(pool, &req),
                Err(SelectError::FilterWithCount { .. })
            ));
        }
    }
});
