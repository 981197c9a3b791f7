//! Server-side credentials: who may call what.
//!
//! Three kinds of bearer credential reach the coordinator, each in the `authorization:
//! Bearer ...` metadata of every call:
//! - the **join token** (`--join-token-file`), which agents present;
//! - **operator tokens** (`--operator-token-file`), each with a [`Role`]; where no operator
//!   file is given, the join token also serves as the admin credential;
//! - **worker credentials**, one per job generation, minted by the coordinator for that
//!   generation's workers ([`WorkerKey::mint`]): they open only that generation's rendezvous
//!   store and progress stream.
//!
//! Every comparison of a presented secret is constant-time ([`subtle`]).

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// Shortest token accepted from a file: shorter ones are guessable.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest token accepted (files and metadata).
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Prefix of a worker credential; the rest is `<job>.<generation>.<mac hex>`.
pub const WORKER_TOKEN_PREFIX: &str = "rmw1.";

/// What an operator token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads: status, list, watch, nodes, logs.
    Viewer,
    /// Everything a viewer may, and submit, cancel, checkpoint.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// One line of an operator token file.
#[derive(Clone)]
pub struct OperatorToken {
    pub name: String,
    pub role: Role,
    token: Vec<u8>,
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Why a credential file was refused. Each message names the file and, where it applies, the line.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path} line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn check_token_text(t: &str) -> Result<(), String> {
    if t.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "token is {} bytes; use at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
            t.len()
        ));
    }
    if t.len() > MAX_TOKEN_BYTES {
        return Err(format!("token is above {MAX_TOKEN_BYTES} bytes"));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("token must be printable ASCII without spaces".into());
    }
    if t.starts_with(WORKER_TOKEN_PREFIX) {
        return Err(format!(
            "token must not start with '{WORKER_TOKEN_PREFIX}' (reserved for worker credentials)"
        ));
    }
    Ok(())
}

/// Reads a file holding one token (the join token, or ringctl's/an agent's credential).
///
/// # Errors
/// Unreadable, empty, too short or too long, or not printable ASCII.
pub fn read_token_file(path: &Path) -> Result<String, CredentialError> {
    let text = read_bounded(path, (MAX_TOKEN_BYTES as u64) * 2)?;
    let t = text.trim();
    if t.is_empty() {
        return Err(CredentialError::Invalid {
            path: path.to_owned(),
            message: "the file is empty".into(),
        });
    }
    check_token_text(t).map_err(|message| CredentialError::Invalid {
        path: path.to_owned(),
        message,
    })?;
    Ok(t.to_owned())
}

/// Parses an operator token file: one `ROLE NAME TOKEN` per line (`admin alice 3f9c...`), `#`
/// starts a comment, blank lines are allowed. Names and tokens must be unique.
///
/// # Errors
/// A malformed line, an unknown role, a weak or duplicate token, or no token at all.
pub fn parse_operator_tokens(
    path: &Path,
    text: &str,
) -> Result<Vec<OperatorToken>, CredentialError> {
    let mut out: Vec<OperatorToken> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| CredentialError::Line {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [role, name, token] = fields.as_slice() else {
            return Err(err(format!(
                "expected 'ROLE NAME TOKEN' (e.g. 'admin alice <token>'), got {} field(s)",
                fields.len()
            )));
        };
        let role = match *role {
            "admin" => Role::Admin,
            "viewer" => Role::Viewer,
            other => {
                return Err(err(format!(
                    "unknown role '{other}': expected 'admin' or 'viewer'"
                )));
            }
        };
        if name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
        {
            return Err(err(format!(
                "name '{name}': use up to 63 characters of A-Z a-z 0-9 . _ - @"
            )));
        }
        check_token_text(token).map_err(&err)?;
        if out.iter().any(|o| o.name == *name) {
            return Err(err(format!("name '{name}' appears twice")));
        }
        if out
            .iter()
            .any(|o| bool::from(o.token.ct_eq(token.as_bytes())))
        {
            return Err(err("this token is already given to another name".into()));
        }
        out.push(OperatorToken {
            name: (*name).to_owned(),
            role,
            token: token.as_bytes().to_vec(),
        });
    }
    if out.is_empty() {
        return Err(CredentialError::Invalid {
            path: path.to_owned(),
            message: "no token in the file (expected lines 'ROLE NAME TOKEN')".into(),
        });
    }
    Ok(out)
}

/// The join token must differ from every operator token: otherwise it would identify as that
/// operator, and agents presenting it would be refused.
///
/// # Errors
/// The name of the operator whose token equals the join token.
pub fn check_join_token_distinct(join: &str, operators: &[OperatorToken]) -> Result<(), String> {
    match operators
        .iter()
        .find(|o| bool::from(o.token.ct_eq(join.as_bytes())))
    {
        Some(o) => Err(format!(
            "operator '{}' has the join token as its token: give agents and operators different tokens",
            o.name
        )),
        None => Ok(()),
    }
}

/// Reads and parses an operator token file.
///
/// # Errors
/// As [`parse_operator_tokens`], or an unreadable file.
pub fn read_operator_tokens(path: &Path) -> Result<Vec<OperatorToken>, CredentialError> {
    let text = read_bounded(path, 4 << 20)?;
    parse_operator_tokens(path, &text)
}

/// A credential file's text, refused above `max` bytes before it is read.
fn read_bounded(path: &Path, max: u64) -> Result<String, CredentialError> {
    let read_err = |source| CredentialError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > max {
        return Err(CredentialError::Invalid {
            path: path.to_owned(),
            message: format!("{} bytes is too large for a token file", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// The secret from which worker credentials are derived (HMAC-SHA256 of the job and generation).
/// Kept in the coordinator's state store, so that a restarted coordinator accepts the
/// credentials of workers that kept running.
#[derive(Clone)]
pub struct WorkerKey([u8; 32]);

impl std::fmt::Debug for WorkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerKey(..)")
    }
}

impl WorkerKey {
    pub fn generate() -> WorkerKey {
        WorkerKey(rand::random())
    }

    pub fn from_bytes(b: &[u8]) -> Option<WorkerKey> {
        <[u8; 32]>::try_from(b).ok().map(WorkerKey)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, job: &str, generation: u64) -> Vec<u8> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts a key of any length");
        m.update(job.as_bytes());
        m.update(&[0]);
        m.update(&generation.to_be_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// The credential of one job generation's workers.
    pub fn mint(&self, job: &str, generation: u64) -> String {
        format!(
            "{WORKER_TOKEN_PREFIX}{job}.{generation}.{}",
            hex(&self.mac(job, generation))
        )
    }

    /// The job and generation a worker credential was minted for, if it is genuine.
    pub fn verify(&self, token: &str) -> Option<(String, u64)> {
        let rest = token.strip_prefix(WORKER_TOKEN_PREFIX)?;
        let mut parts = rest.rsplitn(3, '.');
        let mac = parts.next()?;
        let generation: u64 = parts.next()?.parse().ok()?;
        let job = parts.next()?;
        if job.is_empty() {
            return None;
        }
        let want = hex(&self.mac(job, generation));
        bool::from(want.as_bytes().ct_eq(mac.as_bytes())).then(|| (job.to_owned(), generation))
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Who made a call, as established from its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The coordinator has no credential configured (loopback only, or `--insecure`).
    Anonymous,
    /// The join token.
    Join,
    Operator {
        name: String,
        role: Role,
    },
    Worker {
        job: String,
        generation: u64,
    },
}

impl Caller {
    fn describe(&self) -> String {
        match self {
            Caller::Anonymous => "an anonymous caller".into(),
            Caller::Join => "the join token".into(),
            Caller::Operator { name, role } => format!("operator '{name}' ({})", role.as_str()),
            Caller::Worker { job, generation } => {
                format!("the worker credential of job {job} generation {generation}")
            }
        }
    }
}

/// Everything the coordinator checks credentials against.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    join_token: Option<Vec<u8>>,
    operators: Option<Vec<OperatorToken>>,
    worker_key: Option<WorkerKey>,
}

impl Credentials {
    pub fn new(join_token: Option<String>, operators: Option<Vec<OperatorToken>>) -> Credentials {
        Credentials {
            join_token: join_token.map(String::into_bytes),
            operators,
            worker_key: None,
        }
    }

    /// Sets the key worker credentials are derived from (loaded from, or first written to, the
    /// state store).
    pub fn with_worker_key(mut self, key: WorkerKey) -> Credentials {
        self.worker_key = Some(key);
        self
    }

    /// Whether any credential is configured: then every call must present one.
    pub fn required(&self) -> bool {
        self.join_token.is_some() || self.operators.is_some()
    }

    /// Whether the join token is the admin credential (no operator token file).
    pub fn join_token_is_admin(&self) -> bool {
        self.operators.is_none()
    }

    /// The credential of one job generation's workers; empty when none is required.
    pub fn worker_token(&self, job: &str, generation: u64) -> String {
        match (&self.worker_key, self.required()) {
            (Some(k), true) => k.mint(job, generation),
            _ => String::new(),
        }
    }

    /// Establishes who is calling from the `authorization` metadata.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when a credential is required and missing, malformed or unknown.
    pub fn identify(&self, md: &MetadataMap) -> Result<Caller, Status> {
        if !self.required() {
            return Ok(Caller::Anonymous);
        }
        let Some(value) = md.get("authorization") else {
            return Err(Status::unauthenticated(
                "this coordinator requires a credential: give ringctl --token-file (or set \
                 RINGMASTER_TOKEN_FILE), agents --join-token-file",
            ));
        };
        let text = value
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not ASCII"))?;
        if text.len() > MAX_TOKEN_BYTES + 16 {
            return Err(Status::unauthenticated("the credential is too long"));
        }
        let token = text
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("expected 'authorization: Bearer <token>'"))?
            .trim();
        self.identify_token(token)
    }

    /// As [`Credentials::identify`], for a token already taken out of its envelope (an agent's
    /// Join message carries one too).
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for a token that matches no credential.
    pub fn identify_token(&self, token: &str) -> Result<Caller, Status> {
        if !self.required() {
            return Ok(Caller::Anonymous);
        }
        if token.starts_with(WORKER_TOKEN_PREFIX) {
            if let Some((job, generation)) = self.worker_key.as_ref().and_then(|k| k.verify(token))
            {
                return Ok(Caller::Worker { job, generation });
            }
            return Err(Status::unauthenticated(
                "unknown or forged worker credential",
            ));
        }
        let t = token.as_bytes();
        // Every configured token is compared, so that the time taken says nothing of which
        // (if any) matched.
        let mut found: Option<&OperatorToken> = None;
        for o in self.operators.iter().flatten() {
            if bool::from(o.token.ct_eq(t)) {
                found = Some(o);
            }
        }
        let join = self
            .join_token
            .as_ref()
            .is_some_and(|j| bool::from(j.ct_eq(t)));
        match (found, join) {
            (Some(o), _) => Ok(Caller::Operator {
                name: o.name.clone(),
                role: o.role,
            }),
            (None, true) => Ok(Caller::Join),
            (None, false) => Err(Status::unauthenticated(
                "wrong token: it matches no credential of this coordinator",
            )),
        }
    }

    /// Operators' calls: `need` or a higher role.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` naming the caller and what it lacks.
    pub fn require_operator(&self, caller: &Caller, need: Role) -> Result<(), Status> {
        let has = match caller {
            Caller::Anonymous => Some(Role::Admin),
            Caller::Operator { role, .. } => Some(*role),
            Caller::Join if self.join_token_is_admin() => Some(Role::Admin),
            Caller::Join | Caller::Worker { .. } => None,
        };
        match has {
            Some(r) if r >= need => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "{} may not do this: it needs the {} role",
                caller.describe(),
                need.as_str()
            ))),
            None => Err(Status::permission_denied(format!(
                "{} is not an operator credential{}",
                caller.describe(),
                if matches!(caller, Caller::Join) {
                    " (an operator token file is configured: use one of its tokens)"
                } else {
                    ""
                }
            ))),
        }
    }

    /// Agents' stream: the join token only.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` for any other credential.
    pub fn require_agent(&self, caller: &Caller) -> Result<(), Status> {
        match caller {
            Caller::Anonymous | Caller::Join => Ok(()),
            other => Err(Status::permission_denied(format!(
                "{} cannot join as an agent: agents present the join token",
                other.describe()
            ))),
        }
    }

    /// Trainers' store and progress: the worker credential of exactly this job generation.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` for any other credential or another generation's.
    pub fn require_worker(
        &self,
        caller: &Caller,
        job: &str,
        generation: u64,
    ) -> Result<(), Status> {
        match caller {
            Caller::Anonymous => Ok(()),
            Caller::Worker {
                job: j,
                generation: g,
            } if j == job && *g == generation => Ok(()),
            Caller::Worker { .. } => Err(Status::permission_denied(format!(
                "{} cannot access job {job} generation {generation}",
                caller.describe()
            ))),
            other => Err(Status::permission_denied(format!(
                "{} cannot use the rendezvous service: it accepts only the worker credential \
                 the coordinator gives each generation (RINGMASTER_WORKER_TOKEN)",
                other.describe()
            ))),
        }
    }

    /// Any credential the service accepts at all (the per-service gate, before per-method checks).
    ///
    /// # Errors
    /// `PERMISSION_DENIED` when `caller`'s kind never may call `service`.
    pub fn gate(&self, service: Service, caller: &Caller) -> Result<(), Status> {
        match service {
            Service::Agent => self.require_agent(caller),
            Service::Jobs => self.require_operator(caller, Role::Viewer),
            Service::Rendezvous => match caller {
                Caller::Anonymous | Caller::Worker { .. } => Ok(()),
                other => self.require_worker(other, "", 0),
            },
        }
    }
}

/// The coordinator's gRPC services, for [`Credentials::gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Agent,
    Jobs,
    Rendezvous,
}

/// A tonic interceptor that identifies the caller, applies the service's gate and leaves the
/// [`Caller`] in the request's extensions for the per-method checks.
#[derive(Clone)]
pub struct Gate {
    creds: std::sync::Arc<Credentials>,
    service: Service,
}

impl Gate {
    pub fn new(creds: std::sync::Arc<Credentials>, service: Service) -> Gate {
        Gate { creds, service }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let caller = self
            .creds
            .identify(req.metadata())
            .inspect_err(|e| refused(self.service, req.remote_addr(), e))?;
        self.creds
            .gate(self.service, &caller)
            .inspect_err(|e| refused(self.service, req.remote_addr(), e))?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Refusals logged: at most one line per [`REFUSAL_LOG_EVERY`] (anyone who reaches the port
/// can send refused calls as fast as the network allows); the next line counts the ones left
/// out.
static REFUSALS: std::sync::Mutex<Option<(std::time::Instant, u64)>> = std::sync::Mutex::new(None);
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn refused(service: Service, peer: Option<std::net::SocketAddr>, e: &Status) {
    let now = std::time::Instant::now();
    let mut last = REFUSALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match &mut *last {
        Some((at, left_out)) if now.duration_since(*at) < REFUSAL_LOG_EVERY => *left_out += 1,
        _ => {
            let left_out = last.map_or(0, |(_, n)| n);
            *last = Some((now, 0));
            drop(last);
            if left_out > 0 {
                tracing::warn!(
                    ?service,
                    ?peer,
                    left_out,
                    "refused: {} ({left_out} more refused calls were not logged)",
                    e.message()
                );
            } else {
                tracing::warn!(?service, ?peer, "refused: {}", e.message());
            }
        }
    }
}

/// The caller a [`Gate`] established for this request.
///
/// # Errors
/// `INTERNAL` when the service was not wrapped in a gate (a wiring bug: refuse, never allow).
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("request reached a service without its credential gate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    const JOIN: &str = "join-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";
    const VIEW: &str = "viewer-token-0123456789";

    fn ops() -> Vec<OperatorToken> {
        parse_operator_tokens(
            Path::new("ops"),
            &format!("# operators\nadmin alice {ADMIN}\n\nviewer bob {VIEW}  # read-only\n"),
        )
        .unwrap()
    }

    #[test]
    fn no_credential_configured_means_anonymous() {
        let c = Credentials::new(None, None);
        assert!(!c.required());
        assert_eq!(c.identify(&MetadataMap::new()).unwrap(), Caller::Anonymous);
        assert!(c.require_operator(&Caller::Anonymous, Role::Admin).is_ok());
        assert_eq!(c.worker_token("j-1", 0), "");
    }

    #[test]
    fn join_token_is_admin_only_without_an_operator_file() {
        let c = Credentials::new(Some(JOIN.into()), None);
        let caller = c.identify(&md(JOIN)).unwrap();
        assert_eq!(caller, Caller::Join);
        assert!(c.require_operator(&caller, Role::Admin).is_ok());
        assert!(c.require_agent(&caller).is_ok());

        let c = Credentials::new(Some(JOIN.into()), Some(ops()));
        let caller = c.identify(&md(JOIN)).unwrap();
        let e = c.require_operator(&caller, Role::Viewer).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(c.require_agent(&caller).is_ok());
    }

    #[test]
    fn roles_are_enforced() {
        let c = Credentials::new(Some(JOIN.into()), Some(ops()));
        let admin = c.identify(&md(ADMIN)).unwrap();
        let viewer = c.identify(&md(VIEW)).unwrap();
        assert_eq!(
            viewer,
            Caller::Operator {
                name: "bob".into(),
                role: Role::Viewer
            }
        );
        assert!(c.require_operator(&admin, Role::Admin).is_ok());
        assert!(c.require_operator(&viewer, Role::Viewer).is_ok());
        let e = c.require_operator(&viewer, Role::Admin).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("admin role"), "{e:?}");
        // An operator is not an agent and cannot use the workers' store.
        assert!(c.require_agent(&admin).is_err());
        assert!(c.gate(Service::Rendezvous, &admin).is_err());
    }

    #[test]
    fn missing_wrong_and_malformed_credentials_are_unauthenticated() {
        let c = Credentials::new(Some(JOIN.into()), None);
        for m in [
            MetadataMap::new(),
            md("join-token-0123456788"),
            md(""),
            md("rmw1.job-1.0.00"),
        ] {
            let e = c.identify(&m).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{m:?}");
        }
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Basic {JOIN}").parse().unwrap());
        assert_eq!(
            c.identify(&m).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn worker_credentials_open_exactly_their_generation() {
        let key = WorkerKey::generate();
        let c = Credentials::new(Some(JOIN.into()), None).with_worker_key(key.clone());
        let t = c.worker_token("train.v2-7", 3);
        assert!(t.starts_with(WORKER_TOKEN_PREFIX));
        let caller = c.identify(&md(&t)).unwrap();
        assert_eq!(
            caller,
            Caller::Worker {
                job: "train.v2-7".into(),
                generation: 3
            }
        );
        assert!(c.require_worker(&caller, "train.v2-7", 3).is_ok());
        assert!(c.require_worker(&caller, "train.v2-7", 4).is_err());
        assert!(c.require_worker(&caller, "other-1", 3).is_err());
        assert!(c.require_operator(&caller, Role::Viewer).is_err());
        assert!(c.require_agent(&caller).is_err());
        // Editing the job or generation of a genuine credential breaks its MAC.
        let forged = t.replacen(".3.", ".4.", 1);
        assert!(c.identify(&md(&forged)).is_err());
        // Another coordinator's key does not verify.
        let other = WorkerKey::generate().mint("train.v2-7", 3);
        assert!(c.identify(&md(&other)).is_err());
        // The join token does not open the store.
        let join = c.identify(&md(JOIN)).unwrap();
        assert!(c.require_worker(&join, "train.v2-7", 3).is_err());
    }

    #[test]
    fn operator_file_errors_name_the_line() {
        let p = Path::new("/etc/ringmaster/operators");
        let cases = [
            ("admin alice\n", "line 1", "ROLE NAME TOKEN"),
            ("root alice 0123456789abcdef0\n", "line 1", "unknown role"),
            ("\nadmin alice short\n", "line 2", "at least 16"),
            (
                "admin a 0123456789abcdef0\nviewer a 0123456789abcdef1\n",
                "line 2",
                "twice",
            ),
            (
                "admin a 0123456789abcdef0\nviewer b 0123456789abcdef0\n",
                "line 2",
                "already given",
            ),
            ("# nothing\n", "", "no token"),
        ];
        for (text, line, what) in cases {
            let e = parse_operator_tokens(p, text).unwrap_err().to_string();
            assert!(e.contains("/etc/ringmaster/operators"), "{e}");
            assert!(e.contains(line) && e.contains(what), "{text:?}: {e}");
        }
        // The token itself never appears in an error.
        let e = parse_operator_tokens(p, "root x s3cr3t-s3cr3t-s3cr3t\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn token_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "0123456789abcdef0123");
        std::fs::write(&p, "\n").unwrap();
        assert!(
            read_token_file(&p)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        std::fs::write(&p, "abc").unwrap();
        assert!(
            read_token_file(&p)
                .unwrap_err()
                .to_string()
                .contains("at least")
        );
        assert!(read_token_file(&dir.path().join("none")).is_err());
    }
}
