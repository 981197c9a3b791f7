//! Ringmaster's control plane: the coordinator daemon and the `ringctl` operator CLI.
//!
//! Layout:
//! - [`spec`] — job specs: parsing, inlining the training config, validation.
//! - [`job`] — the job state machine, a pure transition function; `job/ranks.rs` (ranks that
//!   count their states and changes), `job/record.rs` (a job's header and parts in the store),
//!   `job/conditions.rs` (reasons, conditions, durations), `job/events.rs` (the event log).
//! - [`metrics`] — Prometheus metrics (`--metrics-listen`): counters fed by job events, gauges
//!   from the loop per scrape.
//! - [`placement`] — where a job can run: hostfile, filters, joined nodes, busy slots.
//! - [`persist`] — the state writer thread over a `StateStore`.
//! - [`status`] — job status in wire and JSON form.
//! - [`server`] — the daemon: the loop and its gRPC services.
//! - [`cli`] — `ringctl`.
//! - [`local`] — `ringctl local`: a whole cluster on this machine.
//!
//! Credentials and TLS live in the burn-free `ringmaster-auth` crate (`coordinator/auth`), shared
//! with agents and trainers; the tracing setup, the shutdown signal and name checks are
//! `ringmaster-common`'s. The daemon does not link the agent crate: `ringctl local` starts the
//! `agent` binary next to it.

pub mod cli;
pub mod job;
pub mod local;
pub mod metrics;
pub mod persist;
pub mod placement;
pub mod server;
pub mod spec;
pub mod status;
pub mod straggler;
