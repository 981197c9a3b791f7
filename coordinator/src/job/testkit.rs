//! Helpers for the job module's tests: a job driven through [`next`] as the coordinator's
//! loop would drive it.

use ringmaster_hostfile::Selected;

use super::{Event, Job, next};

/// `nodes` nodes named `node0`, `node1`, … with `slots` slots each.
pub fn placement(nodes: usize, slots: u32) -> Vec<Selected> {
    (0..nodes)
        .map(|i| Selected {
            name: format!("node{i}"),
            slots: (0..slots).collect(),
        })
        .collect()
}

/// Places the job's next generation on `sel` at `t`, allocates its port, and starts every
/// rank at `t_run` (rank `r` with pid `10 + r`).
pub fn start(mut j: Job, sel: Vec<Selected>, t: u64, t_run: u64) -> Job {
    let ranks: u32 = sel.iter().map(|s| s.slots.len() as u32).sum();
    j = next(j, Event::Placement(Ok(sel)), t).0;
    let generation = j.generation;
    j = next(
        j,
        Event::PortAllocated {
            generation,
            addr: "a".into(),
            port: 1,
        },
        t,
    )
    .0;
    for rank in 0..ranks {
        j = next(
            j,
            Event::WorkerStarted {
                generation,
                rank,
                pid: 10 + rank,
            },
            t_run,
        )
        .0;
    }
    j
}

/// Rank `rank` of the current generation exits at `t`.
pub fn exit(j: Job, rank: u32, code: Option<i32>, signal: Option<i32>, t: u64) -> Job {
    let generation = j.generation;
    let e = Event::WorkerExited {
        generation,
        rank,
        exit_code: code,
        signal,
        log_tail: vec![],
    };
    next(j, e, t).0
}
