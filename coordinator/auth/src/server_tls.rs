//! The coordinator's TLS settings from PEM files.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The coordinator's certificate, key and (for mutual TLS) the CA agents' certificates chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Agents must present a certificate that chains to this CA. Operators and trainers need no
    /// client certificate (they present tokens).
    pub client_ca: Option<PathBuf>,
}

fn read_pem(flag: &str, p: &Path, want: &str) -> Result<Vec<u8>, String> {
    let b = std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))?;
    let text = String::from_utf8_lossy(&b);
    if !text.contains("-----BEGIN ") || !text.contains(want) {
        return Err(format!(
            "{flag} {}: not a PEM file holding {want}",
            p.display()
        ));
    }
    Ok(b)
}

impl ServerTls {
    /// Reads the files into tonic's server settings.
    ///
    /// # Errors
    /// A file that cannot be read or is not the PEM it should be, naming the flag and the file.
    pub fn load(&self) -> Result<ServerTlsConfig, String> {
        let cert = read_pem("--tls-cert", &self.cert, "CERTIFICATE")?;
        let key = read_pem("--tls-key", &self.key, "PRIVATE KEY")?;
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let ca = read_pem("--tls-client-ca", ca, "CERTIFICATE")?;
            // Optional at the TLS layer: operators and trainers connect without a client
            // certificate; the agent service requires one (checked per call).
            cfg = cfg
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        // Parsed now (rustls: the key read, and matched against the certificate), so that a
        // bad file is a usage error at start, not a failure once the server is being built.
        if let Err(e) = tonic::transport::Server::builder().tls_config(cfg.clone()) {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            return Err(format!(
                "--tls-cert {} with --tls-key {}: {why}",
                self.cert.display(),
                self.key.display()
            ));
        }
        Ok(cfg)
    }
}
