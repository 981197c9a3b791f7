//! `ringctl launch`: the daemonless launcher, one per node. It reads the command line of the
//! tool a team already uses (torchrun, the DeepSpeed launcher, `accelerate launch`, or
//! LLaMA-Factory's NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT variables) into one
//! [`plan::LaunchPlan`], then runs this node's workers ([`runtime`]): the launchers meet in a TCP
//! store on PyTorch's TCPStore protocol at MASTER_ADDR:MASTER_PORT (served by node 0's
//! launcher), agree on the rank layout, start their workers with the environment contract
//! the agents give, and stop and restart every node's workers together.
//!
//! Layout:
//! - [`plan`] — the launch plan every front-end fills, and its errors.
//! - [`env`] — the worker environment contract, shared with the agents.
//! - [`frontends`] — the four command-line dialects (docs/design/launch-spec.md).
//! - [`probe`] — CUDA devices, CPUs and the host name of this machine.
//! - [`runtime`] — the node's launcher: join, spawn, watch, gang stop and restart.

pub mod env;
pub mod frontends;
pub mod plan;
pub mod probe;
pub mod runtime;

pub use plan::{LaunchError, LaunchPlan};
