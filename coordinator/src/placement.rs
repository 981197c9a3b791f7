//! Where a job can run now: the hostfile (or the joined agents) filtered by the job's
//! include/exclude/nodes/gpus_per_node, then checked against who is joined and which slots other
//! jobs hold. Pure: the loop passes in what it knows.

use std::collections::{BTreeMap, BTreeSet};

use ringmaster_hostfile::{Host, Hostfile, Request, Selected};

use crate::spec::JobSpec;

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub slots: u32,
    pub alive: bool,
    /// An operator took the node out of placement (`ringctl cordon`/`drain`).
    pub cordoned: bool,
}

/// Slots held by running jobs: node → slot → job id.
pub type Busy = BTreeMap<String, BTreeMap<u32, String>>;

fn request(spec: &JobSpec) -> Request<'_> {
    Request {
        include: spec.include.as_deref(),
        exclude: spec.exclude.as_deref(),
        nodes: spec.nodes,
        gpus_per_node: spec.gpus_per_node,
    }
}

/// Checks a spec against the hostfile at submit time: an error here can never clear up.
///
/// # Errors
/// The selection error (unknown host or slot, too many nodes...).
pub fn check_against_hostfile(spec: &JobSpec, hostfile: &Hostfile) -> Result<(), String> {
    ringmaster_hostfile::select(&hostfile.hosts, &request(spec))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Computes the job's placement, or the reason it has to wait.
pub fn place(
    spec: &JobSpec,
    hostfile: Option<&Hostfile>,
    nodes: &BTreeMap<String, NodeView>,
    busy: &Busy,
) -> Result<Vec<Selected>, String> {
    let cordoned = |name: &str| nodes.get(name).is_some_and(|n| n.cordoned);
    let selected = match hostfile {
        Some(hf) => {
            // The hostfile without its cordoned hosts; a job that can only run on one of them
            // waits, naming it.
            let open: Vec<Host> = hf
                .hosts
                .iter()
                .filter(|h| !cordoned(&h.name))
                .cloned()
                .collect();
            let sel = match ringmaster_hostfile::select(&open, &request(spec)) {
                Ok(sel) => sel,
                Err(e) if open.len() == hf.hosts.len() => return Err(e.to_string()),
                Err(e) => {
                    let held: Vec<&str> = hf
                        .hosts
                        .iter()
                        .filter(|h| cordoned(&h.name))
                        .map(|h| h.name.as_str())
                        .collect();
                    return Err(format!(
                        "waiting for nodes: cordoned {} (ringctl uncordon): {e}",
                        summarize(&held)
                    ));
                }
            };
            let missing: Vec<&str> = sel
                .iter()
                .filter(|s| !nodes.get(&s.name).is_some_and(|n| n.alive))
                .map(|s| s.name.as_str())
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "waiting for nodes: {}/{} joined (missing {})",
                    sel.len() - missing.len(),
                    sel.len(),
                    summarize(&missing)
                ));
            }
            sel
        }
        None => {
            let mut hosts: Vec<Host> = nodes
                .iter()
                .filter(|(_, n)| n.alive && !n.cordoned)
                .map(|(name, n)| Host {
                    name: name.clone(),
                    slots: n.slots,
                })
                .collect();
            hosts.sort_by(|a, b| ringmaster_hostfile::natural_cmp(&a.name, &b.name));
            let want = spec.nodes.unwrap_or(1) as usize;
            if hosts.is_empty() || hosts.len() < want {
                let held = nodes.values().filter(|n| n.alive && n.cordoned).count();
                let also = if held > 0 {
                    format!(" and not cordoned ({held} cordoned)")
                } else {
                    String::new()
                };
                return Err(format!(
                    "waiting for nodes: {}/{want} joined{also}",
                    hosts.len()
                ));
            }
            ringmaster_hostfile::select(&hosts, &request(spec))
                .map_err(|e| format!("waiting for nodes: {e}"))?
        }
    };
    let mut held = BTreeSet::new();
    for s in &selected {
        for slot in &s.slots {
            if let Some(job) = busy.get(&s.name).and_then(|m| m.get(slot)) {
                held.insert(job.clone());
            }
        }
    }
    if !held.is_empty() {
        let jobs: Vec<&str> = held.iter().map(String::as_str).collect();
        return Err(format!(
            "waiting for slots held by job {}",
            summarize(&jobs)
        ));
    }
    Ok(selected)
}

fn summarize(items: &[&str]) -> String {
    const SHOW: usize = 8;
    if items.len() <= SHOW {
        items.join(", ")
    } else {
        format!(
            "{} and {} more",
            items[..SHOW].join(", "),
            items.len() - SHOW
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf() -> Hostfile {
        ringmaster_hostfile::parse_hostfile("worker-0 slots=2\nworker-1 slots=2\n").unwrap()
    }

    fn joined(names: &[&str]) -> BTreeMap<String, NodeView> {
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    NodeView {
                        slots: 2,
                        alive: true,
                        cordoned: false,
                    },
                )
            })
            .collect()
    }

    fn cmd() -> JobSpec {
        JobSpec {
            command: Some(vec!["x".into()]),
            ..JobSpec::default()
        }
    }

    #[test]
    fn waits_for_missing_hostfile_nodes() {
        let err = place(&cmd(), Some(&hf()), &joined(&["worker-0"]), &Busy::new()).unwrap_err();
        assert_eq!(err, "waiting for nodes: 1/2 joined (missing worker-1)");
    }

    #[test]
    fn hostfile_order_not_join_order() {
        let sel = place(
            &cmd(),
            Some(&hf()),
            &joined(&["worker-1", "worker-0"]),
            &Busy::new(),
        )
        .unwrap();
        assert_eq!(sel[0].name, "worker-0");
        assert_eq!(sel[1].name, "worker-1");
    }

    #[test]
    fn include_only_needs_its_nodes() {
        let spec = JobSpec {
            include: Some("worker-1:1".into()),
            ..cmd()
        };
        let sel = place(&spec, Some(&hf()), &joined(&["worker-1"]), &Busy::new()).unwrap();
        assert_eq!(
            sel,
            vec![Selected {
                name: "worker-1".into(),
                slots: vec![1]
            }]
        );
    }

    #[test]
    fn without_hostfile_uses_joined_agents_in_natural_order() {
        let sel = place(
            &JobSpec {
                nodes: Some(2),
                ..cmd()
            },
            None,
            &joined(&["node-10", "node-2"]),
            &Busy::new(),
        )
        .unwrap();
        assert_eq!(sel[0].name, "node-2");
        let err = place(
            &JobSpec {
                nodes: Some(3),
                ..cmd()
            },
            None,
            &joined(&["node-10", "node-2"]),
            &Busy::new(),
        )
        .unwrap_err();
        assert_eq!(err, "waiting for nodes: 2/3 joined");
        assert!(place(&cmd(), None, &BTreeMap::new(), &Busy::new()).is_err());
    }

    #[test]
    fn busy_slots_make_a_job_wait() {
        let mut busy = Busy::new();
        busy.entry("worker-0".into())
            .or_default()
            .insert(1, "other-1".into());
        let err = place(
            &cmd(),
            Some(&hf()),
            &joined(&["worker-0", "worker-1"]),
            &busy,
        )
        .unwrap_err();
        assert_eq!(err, "waiting for slots held by job other-1");
        let spec = JobSpec {
            include: Some("worker-0:0@worker-1".into()),
            ..cmd()
        };
        assert!(
            place(
                &spec,
                Some(&hf()),
                &joined(&["worker-0", "worker-1"]),
                &busy
            )
            .is_ok()
        );
    }

    #[test]
    fn cordoned_nodes_take_no_new_placement() {
        let mut nodes = joined(&["worker-0", "worker-1", "worker-2"]);
        nodes.get_mut("worker-1").unwrap().cordoned = true;
        let three: Hostfile = ringmaster_hostfile::parse_hostfile(
            "worker-0 slots=2\nworker-1 slots=2\nworker-2 slots=2\n",
        )
        .unwrap();
        let two = JobSpec {
            nodes: Some(2),
            ..cmd()
        };
        for hf in [Some(&three), None] {
            let sel = place(&two, hf, &nodes, &Busy::new()).unwrap();
            let names: Vec<&str> = sel.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["worker-0", "worker-2"], "{hf:?}");
        }
        // A job that needs the cordoned node waits, naming it.
        let on_1 = JobSpec {
            include: Some("worker-1".into()),
            ..cmd()
        };
        let err = place(&on_1, Some(&three), &nodes, &Busy::new()).unwrap_err();
        assert!(
            err.starts_with("waiting for nodes: cordoned worker-1"),
            "{err}"
        );
        let all = JobSpec {
            nodes: Some(3),
            ..cmd()
        };
        let err = place(&all, None, &nodes, &Busy::new()).unwrap_err();
        assert_eq!(
            err,
            "waiting for nodes: 2/3 joined and not cordoned (1 cordoned)"
        );
    }
}
