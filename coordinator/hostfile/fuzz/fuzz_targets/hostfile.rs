//! Fuzzes `parse_hostfile` on arbitrary UTF-8.
//!
//! Invariants: no panic; an `Ok` hostfile is non-empty with valid, unique
//! names and slots > 0, and re-rendering it as `NAME slots=N` lines parses
//! back to the same value; an error message is one line and any line number
//! it carries is a line of the input; `natural_cmp` orders the names
//! consistently; `select` with counts never panics on the result.

#![no_main]

use std::cmp::Ordering;
use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use ringmaster_hostfile::{
    HostfileError, Request, is_valid_host_name, natural_cmp, parse_hostfile, rank_table, select,
};

fn one_line(msg: &str) -> bool {
    !msg.chars()
        .any(|c| c != ' ' && (c.is_whitespace() || c.is_control()))
}

fuzz_target!(|text: &str| {
    match parse_hostfile(text) {
        Ok(hf) => {
            assert!(!hf.hosts.is_empty());
            let mut seen = HashSet::new();
            for host in &hf.hosts {
                assert!(is_valid_host_name(&host.name), "{host:?}");
                assert!(host.slots > 0, "{host:?}");
                assert!(seen.insert(host.name.as_str()), "duplicate {host:?}");
            }
            let rendered: String = hf
                .hosts
                .iter()
                .map(|h| format!("{} slots={}\n", h.name, h.slots))
                .collect();
            assert_eq!(parse_hostfile(&rendered).expect("re-parse"), hf);

            let mut names: Vec<&str> = hf.hosts.iter().map(|h| h.name.as_str()).collect();
            names.sort_by(|a, b| natural_cmp(a, b));
            for pair in names.windows(2) {
                assert_eq!(natural_cmp(pair[0], pair[1]), Ordering::Less, "{pair:?}");
                assert_eq!(natural_cmp(pair[1], pair[0]), Ordering::Greater, "{pair:?}");
            }

            // Selecting every slot allocates one entry per slot: only for
            // hostfiles of a sane size.
            if hf.total_slots() <= 4096 {
                let nodes = (hf.hosts.len() as u32).div_ceil(2);
                let min_slots = hf.hosts[..nodes as usize].iter().map(|h| h.slots).min();
                let req = Request {
                    nodes: Some(nodes),
                    gpus_per_node: min_slots,
                    ..Request::default()
                };
                let selected = select(&hf.hosts, &req).expect("counts within range");
                assert_eq!(selected.len(), nodes as usize);
                let table = rank_table(&selected);
                assert_eq!(table.len(), nodes as usize * min_slots.unwrap() as usize);
                for (i, slot) in table.iter().enumerate() {
                    assert_eq!(slot.rank as usize, i);
                }
            }
        }
        Err(error) => {
            let msg = error.to_string();
            assert!(one_line(&msg), "{msg:?}");
            let lines = text.lines().count();
            match &error {
                HostfileError::Empty => {
                    assert!(
                        text.lines()
                            .all(|l| l.split('#').next().unwrap().trim().is_empty())
                    );
                }
                HostfileError::Io { .. } => panic!("parse_hostfile does no I/O"),
                HostfileError::DuplicateHost {
                    line, first_line, ..
                } => {
                    assert!(
                        *first_line >= 1 && first_line < line && *line <= lines,
                        "{msg}"
                    );
                }
                other => {
                    let line = other.line().expect("line-level error");
                    assert!(line >= 1 && line <= lines, "{msg}");
                }
            }
        }
    }
});
