//! Ringmaster's wire protocol.
//!
//! Holds only the `.proto` files and their generated types; domain types live in the crates
//! that own them and are converted at the gRPC edge.
//!
//! Layout:
//! - `proto/ringmaster.proto` — `AgentService` (one bidirectional stream per agent),
//!   `RendezvousService` (the trainers' key-value store, barrier and progress stream) and
//!   `JobService` (operators).

#![allow(clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("ringmaster.v1");
}

pub use v1::*;

/// The encoded `FileDescriptorSet` of `ringmaster.proto`, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ringmaster_descriptor.bin"));

/// Protocol version an agent announces when it joins; the coordinator refuses another major.
pub const PROTOCOL_VERSION: &str = "1";
