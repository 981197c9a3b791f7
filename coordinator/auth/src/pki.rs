//! The files `ringctl certs init DIR` writes, and the flags that use them: one layout shared by
//! the generator, the tests and the benchmarks.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{ClientTls, ServerTls};

/// A `ringctl certs init` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pki(pub PathBuf);

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Pki {
        Pki(dir.into())
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// The cluster CA's certificate (public: copy it to every machine).
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca-key.pem")
    }
    pub fn coordinator_cert(&self) -> PathBuf {
        self.0.join("coordinator.pem")
    }
    pub fn coordinator_key(&self) -> PathBuf {
        self.0.join("coordinator-key.pem")
    }
    pub fn agent_cert(&self, agent: &str) -> PathBuf {
        self.0.join(format!("agent-{agent}.pem"))
    }
    pub fn agent_key(&self, agent: &str) -> PathBuf {
        self.0.join(format!("agent-{agent}-key.pem"))
    }
    pub fn join_token(&self) -> PathBuf {
        self.0.join("join-token")
    }
    pub fn operators(&self) -> PathBuf {
        self.0.join("operators")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.0.join("admin-token")
    }
    pub fn viewer_token(&self) -> PathBuf {
        self.0.join("viewer-token")
    }

    /// The coordinator's TLS with mutual TLS for agents.
    pub fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert: self.coordinator_cert(),
            key: self.coordinator_key(),
            client_ca: Some(self.ca()),
        }
    }

    /// `--tls-cert F --tls-key F --tls-client-ca F` for the coordinator.
    pub fn coordinator_args(&self) -> Vec<OsString> {
        flags(&[
            ("--tls-cert", self.coordinator_cert()),
            ("--tls-key", self.coordinator_key()),
            ("--tls-client-ca", self.ca()),
        ])
    }

    /// How a client verifies the coordinator (no client certificate).
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca: Some(self.ca()),
            ..Default::default()
        }
    }

    /// As [`Pki::client_tls`], with the certificate of `agent` for mutual TLS.
    pub fn agent_tls(&self, agent: &str) -> ClientTls {
        ClientTls {
            identity: Some((self.agent_cert(agent), self.agent_key(agent))),
            ..self.client_tls()
        }
    }

    /// `--tls-ca F --tls-cert F --tls-key F` for an agent with the certificate of `agent`.
    pub fn agent_args(&self, agent: &str) -> Vec<OsString> {
        flags(&[
            ("--tls-ca", self.ca()),
            ("--tls-cert", self.agent_cert(agent)),
            ("--tls-key", self.agent_key(agent)),
        ])
    }
}

fn flags(pairs: &[(&str, PathBuf)]) -> Vec<OsString> {
    pairs
        .iter()
        .flat_map(|(f, p)| [OsString::from(f), p.clone().into_os_string()])
        .collect()
}
