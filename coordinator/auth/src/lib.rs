//! Ringmaster's credentials and transport security, shared by the coordinator, `ringctl`, agents
//! and trainers (burn-free, so the control plane stays light).
//!
//! Layout:
//! - [`credentials`] — server side: operator token files and roles, the join token, worker
//!   credentials derived per job generation, the per-service [`credentials::Gate`] interceptor.
//! - [`client`] — client side: TLS settings, dialing the coordinator, the [`client::Bearer`]
//!   interceptor that puts the credential on every call.
//! - [`server_tls`] — the coordinator's certificate, key and client CA.
//! - [`pki`] — the layout of a `ringctl certs init` directory and the flags that use it.
//!
//! See docs/security.md for the threat model and what each credential allows.

pub mod client;
pub mod credentials;
pub mod pki;
pub mod server_tls;

pub use client::{AuthChannel, Bearer, ClientTls, DialError};
pub use credentials::{Caller, Credentials, Gate, Role, Service, WorkerKey};
pub use pki::Pki;
pub use server_tls::ServerTls;
