//! [`EtcdStore`]: the state in an etcd cluster (v3 API), so that it outlives any one
//! coordinator machine.
//!
//! Mapping onto etcd:
//! - a store key `k` lives at `<root>/k`, where `<root>` is the URL's path
//!   (`etcd://h1:2379,h2:2379/ringmaster`; default `ringmaster`), so several Ringmaster
//!   clusters can share one etcd;
//! - [`Version`] is the key's `mod_revision`; all puts of one commit share the transaction's
//!   revision, as the trait asks;
//! - every write is one transaction whose compares are the preconditions (`Absent`:
//!   `create_revision == 0`; `Version(v)`: `mod_revision == v`; `Version(0)`: `version < 0`,
//!   which never holds, because an absent key's `mod_revision` is 0 in etcd) and whose failure
//!   branch reads every key of the commit, so that a conflict names the first failing key and
//!   its current version, read at the same revision;
//! - transient failures (an unreachable member, a leader election inside etcd, a deadline)
//!   are retried with backoff for up to [`RETRY_FOR`]; a write whose first attempt may have
//!   landed and whose retry then conflicts is recognised as our own when every key holds what
//!   the commit wrote.
//!
//! The trait is blocking; the client is async. The store owns a small runtime and runs each
//! call on it, waiting on a channel, which works from any thread, inside another runtime's
//! blocking section too.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::plan::{check_key, check_keys};
use crate::{Fence, Op, Precondition, StateStore, StoreError, Version, Versioned};

/// The root prefix when the URL names none.
pub const DEFAULT_ROOT: &str = "ringmaster";
/// How long a call retries transient failures before it gives up: several request timeouts,
/// so that one hung member costs a retry, not the call.
pub const RETRY_FOR: Duration = Duration::from_secs(6);
/// Keys read per request when listing (values can be up to etcd's 1.5 MiB request limit).
const PAGE: i64 = 64;
/// The largest response the client decodes (a page of large values).
const MAX_RESPONSE: usize = 128 << 20;

/// How to reach etcd beyond its URL: TLS and authentication (never in the URL, so that a
/// password does not show in `ps` or in logs).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// PEM file of the CA that signed the etcd members' certificates; set: TLS (https).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`); the password comes from `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Time to open a connection to a member.
    pub connect_timeout: Duration,
    /// Time one request may take before it counts as failed (and is retried).
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// An `etcd://` URL: the members' client endpoints and the root prefix of our keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `host:port` of each member, in the order given.
    pub endpoints: Vec<String>,
    /// The prefix of every key, without a trailing `/`.
    pub root: String,
}

impl EtcdUrl {
    /// Parse `etcd://host[:port][,host[:port]...][/root/prefix]` (port 2379 when absent).
    pub fn parse(url: &str) -> Result<EtcdUrl, StoreError> {
        let bad = |reason: String| StoreError::Url {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .trim()
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://host:port[,host:port...][/prefix]".into()))?;
        if rest.contains('@') {
            return Err(bad(
                "credentials do not go in the URL: use --etcd-user and --etcd-password-file".into(),
            ));
        }
        if rest.contains(['?', '#']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "the URL takes endpoints and a prefix only (no query, fragment or spaces)".into(),
            ));
        }
        let (hosts, root) = match rest.split_once('/') {
            Some((h, r)) => (h, r.trim_end_matches('/')),
            None => (rest, ""),
        };
        let root = if root.is_empty() { DEFAULT_ROOT } else { root };
        if root
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad(format!("bad key prefix {root:?}")));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(bad("an empty endpoint".into()));
            }
            // `[v6]:port`, `[v6]`, `host:port`, `host`.
            let (name, port) = if let Some(v6) = host.strip_prefix('[') {
                let (addr, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad(format!("endpoint {host:?}: no closing ]")))?;
                (format!("[{addr}]"), after.strip_prefix(':'))
            } else {
                match host.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (host.to_string(), None),
                }
            };
            if name.is_empty() || name == "[]" {
                return Err(bad(format!("endpoint {host:?}: no host")));
            }
            let port = match port {
                None => 2379,
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| bad(format!("endpoint {host:?}: bad port {p:?}")))?,
            };
            endpoints.push(format!("{name}:{port}"));
        }
        Ok(EtcdUrl {
            endpoints,
            root: root.to_string(),
        })
    }
}

/// A [`StateStore`] on etcd. See the module documentation for the mapping.
pub struct EtcdStore {
    /// Always `Some` until drop, which shuts it down without waiting (safe in async code).
    rt: Option<tokio::runtime::Runtime>,
    kv: KvClient,
    /// `<root>/`: prepended to every key.
    prefix: String,
    endpoints: Vec<String>,
    /// Write transactions tried, retries included (for tests that must know a write failed
    /// once before they heal the cluster).
    attempts: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Calls in flight are abandoned; the runtime's threads end without being waited on.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A client error with its causes, on one line.
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    let (mut text, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => (
            format!("{:?}: {}", s.code(), s.message()),
            std::error::Error::source(s),
        ),
        other => (other.to_string(), std::error::Error::source(e)),
    };
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

/// Whether a failure may go away by itself (retry), rather than being an answer.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            // Cancelled: tonic's answer when the client's own request timeout fires.
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => true,
            // etcd asking its clients to slow down.
            Code::ResourceExhausted => s.message().contains("too many requests"),
            // etcd reports its own elections and timeouts as Unknown with these texts.
            Code::Unknown => {
                let m = s.message();
                [
                    "leader changed",
                    "no leader",
                    "timed out",
                    "timeout",
                    "stopped",
                ]
                .iter()
                .any(|t| m.contains(t))
            }
            _ => false,
        },
        _ => false,
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::new(source.kind(), format!("{what}: {source}")),
    })
}

/// What a failed transaction read of one key: its version and value.
type Seen = Option<(Version, Vec<u8>)>;

impl EtcdStore {
    /// Connect to the cluster `url` names and check that it answers; an unreachable cluster
    /// fails here, naming each endpoint and why.
    pub fn open(url: &str, opts: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        let parsed = EtcdUrl::parse(url)?;
        let connect = connect_options(opts, Some(opts.request_timeout))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Backend(format!("etcd store: cannot start its runtime: {e}"))
            })?;
        let result = on(
            &rt,
            connect_checked(
                parsed.endpoints.clone(),
                connect,
                opts.connect_timeout + opts.request_timeout,
            ),
        )?;
        let client = match result {
            Ok(client) => client,
            Err(e) => {
                // Not dropped: dropping a runtime inside async code panics.
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(EtcdStore {
            kv: client.kv_client().max_decoding_message_size(MAX_RESPONSE),
            rt: Some(rt),
            prefix: format!("{}/", parsed.root),
            endpoints: parsed.endpoints,
            attempts: Default::default(),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    /// The etcd key of store key `key`.
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Run `call` (one etcd request) with retries of transient failures. `attempts` counts
    /// the tries made, for callers that must know whether an earlier try may have landed.
    fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let err = match on(self.rt(), call(self.kv.clone()))? {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let elapsed = start.elapsed();
            if !transient(&err) || elapsed + delay > RETRY_FOR {
                return Err(self.failed(what, &err, tries, elapsed));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    fn failed(
        &self,
        what: &str,
        err: &etcd_client::Error,
        tries: u32,
        elapsed: Duration,
    ) -> StoreError {
        let detail = describe(err);
        if let etcd_client::Error::GRpcStatus(s) = err {
            use tonic::Code;
            match s.code() {
                Code::Unauthenticated | Code::PermissionDenied => {
                    return StoreError::Backend(format!(
                        "etcd at {} refused {what}: {detail} (check --etcd-user, \
                         --etcd-password-file and the user's role)",
                        self.endpoints.join(",")
                    ));
                }
                Code::ResourceExhausted if transient(err) => {}
                Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => {
                    return StoreError::Invalid(format!("etcd refused {what}: {detail}"));
                }
                _ => {}
            }
        }
        let again = if tries > 1 {
            format!(" (after {tries} tries over {:.1} s)", elapsed.as_secs_f64())
        } else {
            String::new()
        };
        StoreError::Backend(format!(
            "etcd at {}: {what} failed: {detail}{again}",
            self.endpoints.join(",")
        ))
    }

    /// Apply `ops` as one transaction, only while `fence` holds when given. Returns the
    /// revision and, per op, whether the key existed (for deletes).
    fn txn(&self, fence: Option<&Fence>, ops: &[Op]) -> Result<(Version, Vec<bool>), StoreError> {
        check_keys(ops)?;
        if let Some(f) = fence {
            check_key(&f.key)?;
        }
        let mut compares = Vec::new();
        let mut then = Vec::new();
        let mut reads = Vec::new();
        for op in ops {
            let key = self.full(op.key());
            match op.expect() {
                Precondition::Any => {}
                Precondition::Absent => {
                    compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0))
                }
                Precondition::Version(v) => match i64::try_from(v) {
                    Ok(v) if v > 0 => {
                        compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, v))
                    }
                    // Never holds: versions are > 0 and fit in etcd's i64.
                    _ => compares.push(Compare::version(key.clone(), CompareOp::Less, 0)),
                },
            }
            then.push(match op {
                Op::Put { value, .. } => TxnOp::put(key.clone(), value.clone(), None),
                Op::Delete { .. } => TxnOp::delete(key.clone(), None),
            });
            reads.push(TxnOp::get(key, None));
        }
        if let Some(f) = fence {
            let key = self.full(&f.key);
            // 0 ("absent") or beyond i64 is never a leadership: -1 never matches.
            let created = i64::try_from(f.created)
                .ok()
                .filter(|&c| c > 0)
                .unwrap_or(-1);
            compares.push(Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                created,
            ));
            reads.push(TxnOp::get(key, None));
        }
        let txn = Txn::new().when(compares).and_then(then).or_else(reads);
        let mut landed_maybe = false;
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            tries += 1;
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = txn.clone();
            let mut kv = self.kv.clone();
            let attempt = on(self.rt(), async move { kv.txn(t).await })?;
            let resp = match attempt {
                Ok(r) => r,
                Err(e) => {
                    let elapsed = start.elapsed();
                    if !transient(&e) || elapsed + delay > RETRY_FOR {
                        return Err(self.failed("a write", &e, tries, elapsed));
                    }
                    // The request may have been applied before the answer was lost.
                    landed_maybe = true;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let revision = resp
                .header()
                .map(|h| h.revision())
                .and_then(|r| u64::try_from(r).ok())
                .unwrap_or(0);
            let answers = resp.op_responses();
            if resp.succeeded() {
                let existed = answers
                    .iter()
                    .map(|a| matches!(a, TxnOpResponse::Delete(d) if d.deleted() > 0))
                    .collect();
                return Ok((revision, existed));
            }
            if let Some(f) = fence {
                let created = match answers.last() {
                    Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
                    _ => None,
                };
                if created.and_then(|c| u64::try_from(c).ok()) != Some(f.created) {
                    return Err(StoreError::Fenced {
                        key: f.key.clone(),
                        created: f.created,
                    });
                }
            }
            let seen: Vec<Seen> = answers
                .iter()
                .take(ops.len())
                .map(|a| match a {
                    TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                        (
                            u64::try_from(kv.mod_revision()).unwrap_or(0),
                            kv.value().to_vec(),
                        )
                    }),
                    _ => None,
                })
                .collect();
            if landed_maybe && let Some(revision) = our_own_write(ops, &seen) {
                // What a deleted key held is gone; report it as existing, as the first
                // attempt (which did delete it) would have.
                let existed = ops
                    .iter()
                    .map(|op| matches!(op, Op::Delete { .. }))
                    .collect();
                return Ok((revision, existed));
            }
            for (op, seen) in ops.iter().zip(&seen) {
                let current = seen.as_ref().map(|(v, _)| *v);
                if !op.expect().matches(current) {
                    return Err(StoreError::Conflict {
                        key: op.key().to_string(),
                        expected: op.expect(),
                        current,
                    });
                }
            }
            return Err(StoreError::Backend(format!(
                "etcd at {}: a transaction failed although every precondition holds",
                self.endpoints.join(",")
            )));
        }
    }
}

/// Connects to `endpoints` and checks that the cluster answers. Fails with
/// [`StoreError::Unreachable`] naming what each endpoint answered, or with the cluster's
/// refusal (a wrong password) as such.
pub(crate) async fn connect_checked(
    endpoints: Vec<String>,
    connect: ConnectOptions,
    probe_timeout: Duration,
) -> Result<Client, StoreError> {
    let joined = endpoints.join(",");
    let attempt = async {
        let mut client = Client::connect(&endpoints, Some(connect.clone())).await?;
        // The balanced channel may send the first calls to a member that is down before it
        // learns to route around it: a few tries, so that one dead member of a cluster with
        // a quorum does not make the whole cluster look unreachable.
        let mut tries = 0;
        loop {
            match client.status().await {
                Ok(_) => return Ok::<_, etcd_client::Error>(client),
                Err(e) if transient(&e) && tries < 4 && endpoints.len() > 1 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let first = match tokio::time::timeout(probe_timeout, attempt).await {
        Ok(Ok(client)) => return Ok(client),
        // An answer (a refused password, a permission): not a reachability problem.
        Ok(Err(e)) if !transient(&e) => {
            return Err(StoreError::Backend(format!(
                "etcd at {joined} refused us: {}",
                describe(&e)
            )));
        }
        first => first,
    };
    // Say what each endpoint answered, not only what the balanced channel saw.
    let mut why = Vec::new();
    for ep in &endpoints {
        let one = async {
            let mut c = Client::connect([ep], Some(connect.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(())
        };
        let detail = match tokio::time::timeout(probe_timeout, one).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => describe(&e),
            Err(_) => format!("no answer within {probe_timeout:?}"),
        };
        why.push(format!("{ep}: {detail}"));
    }
    if why.len() < endpoints.len() {
        // Some members answer on their own: etcd is there (the others are down, or were
        // slow). Calls go through the balanced channel, and the store retries transient
        // errors, so a client over every endpoint serves, and finds the others when they
        // come back.
        if let Ok(client) = Client::connect(&endpoints, Some(connect.clone())).await {
            return Ok(client);
        }
    }
    if why.is_empty() {
        // Every member answered on its own: the first failure was passing.
        match first {
            Ok(Err(e)) => why.push(describe(&e)),
            _ => why.push(format!("no answer within {probe_timeout:?}")),
        }
    }
    Err(StoreError::Unreachable {
        endpoints: joined,
        detail: why.join("; "),
    })
}

/// When a retried commit conflicts: the revision of the earlier attempt, if the keys show that
/// it landed (every put key holds its value at one shared revision, every deleted key is gone).
fn our_own_write(ops: &[Op], seen: &[Seen]) -> Option<Version> {
    let mut revision = None;
    for (op, seen) in ops.iter().zip(seen) {
        match (op, seen) {
            (Op::Put { value, .. }, Some((v, stored))) if stored == value => {
                if revision.is_some_and(|r| r != *v) {
                    return None;
                }
                revision = Some(*v);
            }
            (Op::Delete { .. }, None) => {}
            _ => return None,
        }
    }
    revision
}

/// Run `fut` on `rt` and wait for it from this thread.
fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Backend("etcd store: its runtime stopped".to_string()))
}

/// The client's options: TLS, user, timeouts. `request_timeout` None: requests may wait as
/// long as they need (a campaign, a lease keep-alive stream).
pub(crate) fn connect_options(
    opts: &EtcdOptions,
    request_timeout: Option<Duration>,
) -> Result<ConnectOptions, StoreError> {
    let mut c = ConnectOptions::new()
        .with_connect_timeout(opts.connect_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_require_leader(true);
    if let Some(t) = request_timeout {
        c = c.with_timeout(t);
    }
    match (&opts.user, &opts.password_file) {
        (Some(user), Some(file)) => {
            let pw = read(file, "etcd password file")?;
            let pw = String::from_utf8(pw).map_err(|_| {
                StoreError::Invalid(format!(
                    "{}: the etcd password is not UTF-8",
                    file.display()
                ))
            })?;
            c = c
                .with_user(user.clone(), pw.trim_end_matches(['\n', '\r']).to_string())
                .with_auto_token_refresh(true);
        }
        (Some(user), None) => {
            return Err(StoreError::Invalid(format!(
                "etcd user {user:?} given without --etcd-password-file"
            )));
        }
        (None, Some(file)) => {
            return Err(StoreError::Invalid(format!(
                "--etcd-password-file {} given without --etcd-user",
                file.display()
            )));
        }
        (None, None) => {}
    }
    if opts.ca.is_some() || opts.cert.is_some() || opts.key.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &opts.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "etcd CA")?));
        }
        match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "etcd client certificate")?,
                    read(key, "etcd client key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Invalid(
                    "--etcd-cert and --etcd-key go together".to_string(),
                ));
            }
        }
        c = c.with_tls(tls);
    }
    Ok(c)
}

impl StateStore for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let mut resp = self.retry("a read", move |mut kv| {
            let full = full.clone();
            async move { kv.get(full, None).await }
        })?;
        Ok(resp.take_kvs().into_iter().next().map(|kv| Versioned {
            version: u64::try_from(kv.mod_revision()).unwrap_or(0),
            value: kv.into_key_value().1,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let start = self.full(prefix);
        let end = range_end(start.as_bytes());
        let mut out = Vec::new();
        let mut from = start.into_bytes();
        let mut revision = 0i64;
        loop {
            let (key, end2) = (from.clone(), end.clone());
            let mut resp = self.retry("a listing", move |mut kv| {
                let mut o = GetOptions::new().with_range(end2.clone()).with_limit(PAGE);
                if revision > 0 {
                    // Every page at the first page's revision: one consistent snapshot.
                    o = o.with_revision(revision);
                }
                let key = key.clone();
                async move { kv.get(key, Some(o)).await }
            })?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            for kv in kvs {
                let version = u64::try_from(kv.mod_revision()).unwrap_or(0);
                let (k, value) = kv.into_key_value();
                let k = String::from_utf8(k).map_err(|e| {
                    StoreError::Backend(format!("etcd holds a key that is not UTF-8: {e}"))
                })?;
                let k = k[self.prefix.len()..].to_string();
                out.push((k, Versioned { value, version }));
            }
            if !more {
                break;
            }
        }
        Ok(out)
    }

    fn put(&self, key: &str, value: &[u8], expect: Precondition) -> Result<Version, StoreError> {
        let (revision, _) = self.txn(None, &[Op::put(key, value, expect)])?;
        Ok(revision)
    }

    fn delete(&self, key: &str, expect: Precondition) -> Result<bool, StoreError> {
        let (_, existed) = self.txn(None, &[Op::delete(key, expect)])?;
        Ok(existed[0])
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        self.commit_maybe_fenced(None, ops)
    }

    fn commit_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        self.commit_maybe_fenced(Some(fence), ops)
    }

    /// etcd's default `--max-txn-ops` is 128, counted per list; a commit's failure branch reads
    /// every key and the fence: 100 leaves room.
    fn max_ops_per_commit(&self) -> Option<usize> {
        Some(100)
    }

    /// etcd's default `--max-request-bytes` is 1.5 MiB.
    fn max_commit_bytes(&self) -> Option<usize> {
        Some(1 << 20)
    }
}

impl EtcdStore {
    fn commit_maybe_fenced(
        &self,
        fence: Option<&Fence>,
        ops: Vec<Op>,
    ) -> Result<Vec<Version>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (revision, _) = self.txn(fence, &ops)?;
        Ok(ops
            .iter()
            .map(|op| match op {
                Op::Put { .. } => revision,
                Op::Delete { .. } => 0,
            })
            .collect())
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's convention:
/// the prefix with its last byte below 0xff incremented, the rest dropped).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::testing::{EtcdServer, free_port};

    #[test]
    fn urls() {
        let u = EtcdUrl::parse("etcd://h1:2379,h2:2380/ringmaster").unwrap();
        assert_eq!(u.endpoints, ["h1:2379", "h2:2380"]);
        assert_eq!(u.root, "ringmaster");
        let u = EtcdUrl::parse("etcd://10.0.0.1").unwrap();
        assert_eq!(u.endpoints, ["10.0.0.1:2379"]);
        assert_eq!(u.root, DEFAULT_ROOT);
        let u = EtcdUrl::parse("etcd://[::1]:2381,[fe80::1]/a/b/").unwrap();
        assert_eq!(u.endpoints, ["[::1]:2381", "[fe80::1]:2379"]);
        assert_eq!(u.root, "a/b");
        for (bad, says) in [
            ("etcd://", "empty endpoint"),
            ("etcd://h1,,h2", "empty endpoint"),
            ("etcd://h1:0", "bad port"),
            ("etcd://h1:99999", "bad port"),
            ("etcd://h1:x", "bad port"),
            ("etcd://:2379", "no host"),
            ("etcd://[::1", "no closing"),
            ("etcd://user:pw@h1:2379", "--etcd-password-file"),
            ("etcd://h1/a//b", "bad key prefix"),
            ("etcd://h1/../b", "bad key prefix"),
            ("etcd://h1?x=1", "no query"),
            ("http://h1:2379", "expected etcd://"),
        ] {
            let e = EtcdUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn range_ends() {
        assert_eq!(range_end(b"ab"), b"ac");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn recognises_its_own_write_after_a_lost_answer() {
        let ops = [
            Op::put("a", b"1".to_vec(), Precondition::Absent),
            Op::delete("b", Precondition::Any),
        ];
        assert_eq!(
            our_own_write(&ops, &[Some((7, b"1".to_vec())), None]),
            Some(7)
        );
        assert_eq!(our_own_write(&ops, &[Some((7, b"2".to_vec())), None]), None);
        assert_eq!(
            our_own_write(&ops, &[Some((7, b"1".to_vec())), Some((3, vec![]))]),
            None
        );
        let two = [
            Op::put("a", b"1".to_vec(), Precondition::Any),
            Op::put("b", b"1".to_vec(), Precondition::Any),
        ];
        assert_eq!(
            our_own_write(&two, &[Some((7, b"1".to_vec())), Some((8, b"1".to_vec()))]),
            None
        );
    }

    /// A fresh store on the shared test server, under its own root prefix.
    fn store(server: &EtcdServer, name: &str) -> EtcdStore {
        EtcdStore::open(&server.url(name), &EtcdOptions::default()).unwrap()
    }

    #[test]
    fn conformance_on_etcd() {
        let Some(server) = EtcdServer::start_or_skip("conformance_on_etcd") else {
            return;
        };
        conformance::basic(&store(&server, "basic"));
        conformance::preconditions(&store(&server, "pre"));
        conformance::commit(&store(&server, "commit"));
        conformance::versions_increase(&store(&server, "versions"));
        conformance::concurrent_cas(std::sync::Arc::new(store(&server, "cas")));
        conformance::large_values(&store(&server, "large"));
        conformance::long_listings(&store(&server, "long"));
        conformance::fencing(&store(&server, "fencing"));
    }

    #[test]
    fn prefixes_keep_clusters_apart_and_survive_reopening() {
        let Some(server) = EtcdServer::start_or_skip("prefixes") else {
            return;
        };
        let a = store(&server, "team-a");
        let b = store(&server, "team-b");
        let va = a.put("jobs/1", b"a", Precondition::Absent).unwrap();
        b.put("jobs/1", b"b", Precondition::Absent).unwrap();
        assert_eq!(a.list("").unwrap().len(), 1);
        assert_eq!(a.get("jobs/1").unwrap().unwrap().value, b"a");
        assert_eq!(b.get("jobs/1").unwrap().unwrap().value, b"b");
        drop(a);
        let again = store(&server, "team-a");
        assert_eq!(
            again.get("jobs/1").unwrap(),
            Some(Versioned {
                value: b"a".to_vec(),
                version: va
            })
        );
        // A root that is a prefix of another's name does not see the other's keys.
        let t = store(&server, "team");
        assert!(t.list("").unwrap().is_empty());
    }

    #[test]
    fn an_unreachable_cluster_is_named_at_open() {
        let dead = [free_port(), free_port()];
        let url = format!("etcd://127.0.0.1:{},127.0.0.1:{}/x", dead[0], dead[1]);
        let opts = EtcdOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(500),
            ..EtcdOptions::default()
        };
        let err = EtcdStore::open(&url, &opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Unreachable { .. }), "{msg}");
        for p in dead {
            assert!(msg.contains(&format!("127.0.0.1:{p}: ")), "{msg}");
        }
    }

    /// A cluster of three with one member down still has its quorum: opening it (the first
    /// endpoint named is the dead one) and writing work; only when no member answers is it
    /// unreachable.
    #[test]
    fn one_dead_member_of_three_does_not_make_the_cluster_unreachable() {
        if EtcdServer::start_or_skip("one dead member").is_none() {
            return;
        }
        let mut cluster = crate::testing::EtcdCluster::start(3).unwrap();
        cluster.stop_member(0);
        for _ in 0..3 {
            let s = EtcdStore::open(&cluster.url("quorum"), &EtcdOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
            s.put("k", b"v", Precondition::Any).unwrap();
            assert_eq!(s.get("k").unwrap().unwrap().value, b"v");
        }
    }

    #[test]
    fn a_member_that_comes_back_within_the_retry_window_loses_no_write() {
        let Some(mut server) = EtcdServer::start_or_skip("restart") else {
            return;
        };
        let s = store(&server, "restart");
        let v1 = s.put("k", b"1", Precondition::Absent).unwrap();
        server.stop();
        let tried = || s.attempts.load(std::sync::atomic::Ordering::Relaxed);
        let before = tried();
        let restarted = std::thread::scope(|scope| {
            let writer = scope.spawn(|| s.put("k", b"2", Precondition::Version(v1)));
            // Heal only once the write has failed at least once (its first try, then a retry
            // is under way), within a deadline.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while tried() < before + 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the write never retried"
                );
                std::thread::yield_now();
            }
            server.restart();
            writer.join().unwrap()
        });
        let v2 = restarted.unwrap();
        assert!(v2 > v1);
        assert_eq!(s.get("k").unwrap().unwrap().value, b"2");
    }
}
