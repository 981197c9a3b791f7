//! The client side: one way for ringctl, agents and trainers to dial the coordinator, with TLS
//! when a CA is given and the bearer credential on every call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Environment variables that carry the client settings into worker processes (set by the agent)
/// and into ringctl.
pub const ENV_TLS_CA: &str = "RINGMASTER_TLS_CA";
pub const ENV_TLS_DOMAIN: &str = "RINGMASTER_TLS_DOMAIN";
pub const ENV_WORKER_TOKEN: &str = "RINGMASTER_WORKER_TOKEN";
pub const ENV_TOKEN_FILE: &str = "RINGMASTER_TOKEN_FILE";

/// How a client verifies the coordinator (and, for agents with mutual TLS, proves itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM file of the CA the coordinator's certificate must chain to. None: plaintext.
    pub ca: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate (default: the host of the address).
    pub domain: Option<String>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// The settings a worker process inherits from its agent (`RINGMASTER_TLS_CA`,
    /// `RINGMASTER_TLS_DOMAIN`).
    pub fn from_env() -> ClientTls {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ClientTls {
            ca: var(ENV_TLS_CA).map(PathBuf::from),
            domain: var(ENV_TLS_DOMAIN),
            identity: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }
}

/// Why a channel could not be built or opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The address or the TLS files are unusable: a usage error.
    #[error("{0}")]
    Config(String),
    /// The coordinator could not be reached or the TLS handshake failed.
    #[error("cannot reach the coordinator at {addr}: {message}")]
    Unreachable { addr: String, message: String },
}

impl DialError {
    pub fn is_config(&self) -> bool {
        matches!(self, DialError::Config(_))
    }
}

fn read_pem(what: &str, p: &Path) -> Result<Vec<u8>, DialError> {
    let b =
        std::fs::read(p).map_err(|e| DialError::Config(format!("{what} {}: {e}", p.display())))?;
    if !b.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(DialError::Config(format!(
            "{what} {}: not a PEM file (no '-----BEGIN' line)",
            p.display()
        )));
    }
    Ok(b)
}

/// An endpoint for `addr` (`HOST:PORT`), `https` with `tls` when it names a CA.
///
/// # Errors
/// A malformed address or unreadable TLS files.
pub fn endpoint(addr: &str, tls: &ClientTls) -> Result<Endpoint, DialError> {
    let addr = addr.trim();
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    if !bare.contains(':') {
        return Err(DialError::Config(format!(
            "coordinator address '{addr}': expected HOST:PORT"
        )));
    }
    if addr.starts_with("https://") && !tls.enabled() {
        // Never send a credential in clear to an address that asks for TLS.
        return Err(DialError::Config(format!(
            "coordinator address '{addr}' asks for TLS: give the CA its certificate chains to \
             (--tls-ca or RINGMASTER_TLS_CA)"
        )));
    }
    let scheme = if tls.enabled() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{bare}"))
        .map_err(|e| DialError::Config(format!("coordinator address '{addr}': {e}")))?;
    if let Some(ca) = &tls.ca {
        let mut cfg =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
        let host = match bare.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => bare,
        };
        cfg = cfg.domain_name(tls.domain.clone().unwrap_or_else(|| host.to_owned()));
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(Identity::from_pem(
                read_pem("--tls-cert", cert)?,
                read_pem("--tls-key", key)?,
            ));
        }
        ep = ep
            .tls_config(cfg)
            .map_err(|e| DialError::Config(format!("TLS settings: {e}")))?;
    }
    Ok(ep)
}

/// Connects to the coordinator at `addr`.
///
/// # Errors
/// [`DialError::Config`] for bad settings, [`DialError::Unreachable`] when no connection (or no
/// TLS session) could be established.
pub async fn connect(addr: &str, tls: &ClientTls, timeout: Duration) -> Result<Channel, DialError> {
    let ep = endpoint(addr, tls)?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // A coordinator whose machine vanished (power, partition) sends no reset: HTTP/2 PINGs
        // notice it within 20 s, so that a watch or a trainer's progress stream moves on to
        // the coordinator that leads now instead of waiting for ever.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    // The connect timeout bounds the TCP connect; a peer that accepts and then never answers
    // (a paused process: its kernel completes the handshake) would hold the TLS handshake.
    match tokio::time::timeout(timeout, ep.connect()).await {
        Ok(r) => r.map_err(|e| DialError::Unreachable {
            addr: addr.to_owned(),
            message: explain(&e, tls),
        }),
        Err(_) => Err(DialError::Unreachable {
            addr: addr.to_owned(),
            message: format!("accepted the connection but did not answer within {timeout:?}"),
        }),
    }
}

/// The metadata key of a standby coordinator's refusals: the leader's address.
pub const LEADER_HINT: &str = "ringmaster-leader";

/// The addresses of a coordinator list: `a:29500,b:29500` (coordinators sharing one etcd, one
/// of which leads), or one address.
pub fn addresses(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// The leader's address a standby coordinator named in its refusal, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_HINT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Connects to the leading coordinator of `list`. With one address, as [`connect`]. With
/// several, to the first whose health check says `service` is SERVING (standbys say
/// NOT_SERVING), trying each in turn.
///
/// # Errors
/// A bad address or TLS file ([`DialError::Config`]), or no address leads.
pub async fn connect_leader(
    list: &str,
    tls: &ClientTls,
    timeout: Duration,
    service: &str,
) -> Result<Channel, DialError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let addrs = addresses(list);
    match addrs.as_slice() {
        [] => Err(DialError::Config(format!(
            "coordinator address '{list}': expected HOST:PORT[,HOST:PORT...]"
        ))),
        [one] => connect(one, tls, timeout).await,
        many => {
            let mut why = Vec::new();
            for addr in many {
                let ch = match connect(addr, tls, timeout).await {
                    Ok(ch) => ch,
                    Err(e @ DialError::Config(_)) => return Err(e),
                    Err(DialError::Unreachable { message, .. }) => {
                        why.push(format!("{addr}: {message}"));
                        continue;
                    }
                };
                let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                let check = tonic_health::pb::HealthCheckRequest {
                    service: service.to_owned(),
                };
                match tokio::time::timeout(timeout, health.check(check)).await {
                    Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => {
                        return Ok(ch);
                    }
                    Ok(Ok(_)) => why.push(format!("{addr}: a standby (not the leader)")),
                    Ok(Err(s)) => why.push(format!("{addr}: {}", s.message())),
                    Err(_) => why.push(format!("{addr}: no health answer within {timeout:?}")),
                }
            }
            Err(DialError::Unreachable {
                addr: list.to_owned(),
                message: format!("no coordinator leads: {}", why.join("; ")),
            })
        }
    }
}

/// One line for a connection error, with a hint where the cause is a TLS mismatch.
pub fn explain(e: &(dyn std::error::Error + 'static), tls: &ClientTls) -> String {
    let mut s = error_chain(e);
    if tls.enabled() && (s.contains("InvalidContentType") || s.contains("corrupt message")) {
        s.push_str(" (the coordinator does not speak TLS; refusing to fall back to plaintext)");
    } else if is_untrusted_peer(&s) && s.contains("NotValidForName") {
        s.push_str(" (the coordinator's certificate does not name this host: see --tls-domain)");
    } else if is_untrusted_peer(&s) {
        s.push_str(" (the coordinator's certificate does not chain to --tls-ca)");
    }
    s
}

/// An error and its sources on one line, `outer: inner: innermost`. A source whose text the
/// line already ends with (an error that prints its source, or two layers saying the same,
/// as hyper's `tcp connect error`) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Whether a connection error (as [`explain`] wrote it) means the coordinator's certificate was
/// not trusted: an impostor, or a coordinator of another cluster. Retrying will not help.
pub fn is_untrusted_peer(explained: &str) -> bool {
    explained.contains("invalid peer certificate")
}

/// Adds `authorization: Bearer <token>` to every call (nothing when there is no token).
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(..)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// # Errors
    /// A token that cannot travel as metadata (not printable ASCII).
    pub fn new(token: Option<&str>) -> Result<Bearer, DialError> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => {
                let mut v: AsciiMetadataValue = format!("Bearer {t}").parse().map_err(|_| {
                    DialError::Config("the credential is not printable ASCII".into())
                })?;
                v.set_sensitive(true);
                Ok(Bearer(Some(v)))
            }
        }
    }

    /// The worker credential a worker process inherits (`RINGMASTER_WORKER_TOKEN`).
    pub fn from_worker_env() -> Bearer {
        Bearer::new(std::env::var(ENV_WORKER_TOKEN).ok().as_deref()).unwrap_or_default()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel with the bearer credential on every call.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_files_are_checked() {
        let plain = ClientTls::default();
        assert!(endpoint("127.0.0.1:29500", &plain).is_ok());
        assert!(endpoint("http://127.0.0.1:29500", &plain).is_ok());
        assert!(endpoint("nohost", &plain).unwrap_err().is_config());
        assert!(endpoint("https://h:1", &plain).unwrap_err().is_config());
        let missing = ClientTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = endpoint("h:1", &missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not pem").unwrap();
        let bad = ClientTls {
            ca: Some(p),
            ..Default::default()
        };
        assert!(
            endpoint("h:1", &bad)
                .unwrap_err()
                .to_string()
                .contains("not a PEM")
        );
    }

    #[test]
    fn bearer_adds_sensitive_metadata() {
        let mut b = Bearer::new(Some("abc")).unwrap();
        let r = b.call(tonic::Request::new(())).unwrap();
        let v = r.metadata().get("authorization").unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer abc");
        assert!(v.is_sensitive());
        let mut none = Bearer::new(None).unwrap();
        assert!(
            none.call(tonic::Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .is_none()
        );
        assert!(Bearer::new(Some("a\nb")).is_err());
        assert!(!format!("{b:?}").contains("abc"));
    }
}
