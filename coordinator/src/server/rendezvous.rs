//! The trainers' rendezvous store: a key-value store per job generation, a barrier, and the
//! progress stream.
//!
//! A scope (job id + generation) is opened by the coordinator's loop when it starts the
//! generation's workers and closed when the generation ends; requests for a closed or stale
//! scope fail at once, and a call waiting on a scope that closes fails too. Locks are plain
//! mutexes never held across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringmaster_auth::Credentials;
use ringmaster_proto as pb;
use tokio::sync::{Notify, mpsc};
use tonic::{Request, Response, Status};

use crate::server::limits::{RendezvousLimits, show_bytes};

/// Largest key and value the store accepts.
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest world size a barrier accepts (1,024 slots on each of 1,024 nodes).
pub const MAX_BARRIER_WORLD: u32 = 1 << 20;
/// Missing ranks a barrier timeout names one by one.
const MISSING_RANKS_NAMED: usize = 32;
/// Longest a Get or Barrier may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Scope {
    kv: HashMap<String, Vec<u8>>,
    /// Bytes of the keys and values in `kv`, counted against [`RendezvousLimits::max_bytes`].
    bytes: u64,
    closed: bool,
    notify: Arc<Notify>,
}

fn entry_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl Scope {
    /// Stores `value` under `key` if the generation's limits allow it; replacing a value
    /// counts the difference. Wakes the waiters.
    fn put(
        &mut self,
        scope: &(String, u64),
        limits: &RendezvousLimits,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), Status> {
        let old = self.kv.get(key).map(|v| entry_bytes(key, v));
        if old.is_none() && self.kv.len() >= limits.max_keys {
            return Err(Status::resource_exhausted(format!(
                "rendezvous store of job {} generation {} holds {} keys, the limit \
                 (--rendezvous-max-keys {}); setting {key} refused",
                scope.0,
                scope.1,
                self.kv.len(),
                limits.max_keys
            )));
        }
        let bytes = self.bytes - old.unwrap_or(0) + entry_bytes(key, &value);
        if bytes > limits.max_bytes {
            return Err(Status::resource_exhausted(format!(
                "rendezvous store of job {} generation {} would hold {bytes} bytes, above the \
                 limit of {} (--rendezvous-max-bytes); setting {key} refused",
                scope.0,
                scope.1,
                show_bytes(limits.max_bytes)
            )));
        }
        self.bytes = bytes;
        self.kv.insert(key.to_owned(), value);
        self.notify.notify_waiters();
        Ok(())
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.kv.remove(key) {
            Some(v) => {
                self.bytes -= entry_bytes(key, &v);
                true
            }
            None => false,
        }
    }
}

#[derive(Default)]
struct Inner {
    scopes: HashMap<(String, u64), Scope>,
    /// The newest generation opened per job.
    current: HashMap<String, u64>,
    /// Generations ended by a failure, with the reason: their trainers' progress streams end
    /// with `ABORTED`, on which the trainers abort their in-flight collectives.
    aborted: HashMap<(String, u64), String>,
}

/// The rendezvous store's size (`ringmaster_rendezvous_*`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RendezvousSizes {
    pub scopes: u64,
    pub keys: u64,
    pub bytes: u64,
}

/// Shared between the gRPC service and the coordinator's loop.
#[derive(Clone, Default)]
pub struct Rendezvous {
    inner: Arc<Mutex<Inner>>,
    /// Woken on every [`Rendezvous::abort`].
    aborts: Arc<Notify>,
    /// Keys and bytes one generation may hold.
    limits: RendezvousLimits,
}

impl Rendezvous {
    /// A store whose generations each hold at most what `limits` allow.
    pub fn new(limits: RendezvousLimits) -> Rendezvous {
        Rendezvous {
            limits,
            ..Rendezvous::default()
        }
    }

    /// What the store holds now: generations open, keys and bytes over all of them.
    pub fn sizes(&self) -> RendezvousSizes {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut s = RendezvousSizes {
            scopes: inner.scopes.len() as u64,
            ..RendezvousSizes::default()
        };
        for scope in inner.scopes.values() {
            s.keys += scope.kv.len() as u64;
            s.bytes += scope.bytes;
        }
        s
    }

    /// Opens the store of a generation (idempotent).
    pub fn open(&self, job: &str, generation: u64) {
        let mut inner = self.inner.lock().expect("rendezvous lock poisoned");
        inner
            .scopes
            .entry((job.to_owned(), generation))
            .or_default();
        let cur = inner.current.entry(job.to_owned()).or_insert(generation);
        *cur = (*cur).max(generation);
        inner
            .aborted
            .retain(|(j, g), _| j != job || *g >= generation);
    }

    /// Marks a generation as ended by a failure: the progress streams of its trainers end at
    /// once with `ABORTED` and `reason`, and so does any later stream of that generation.
    pub fn abort(&self, job: &str, generation: u64, reason: &str) {
        let mut inner = self.inner.lock().expect("rendezvous lock poisoned");
        inner
            .aborted
            .insert((job.to_owned(), generation), reason.to_owned());
        drop(inner);
        self.aborts.notify_waiters();
    }

    fn abort_reason(&self, scope: &(String, u64)) -> Option<String> {
        let inner = self.inner.lock().expect("rendezvous lock poisoned");
        inner.aborted.get(scope).cloned()
    }

    /// Closes a generation's store: its data is dropped and waiters fail.
    pub fn close(&self, job: &str, generation: u64) {
        let mut inner = self.inner.lock().expect("rendezvous lock poisoned");
        if let Some(mut s) = inner.scopes.remove(&(job.to_owned(), generation)) {
            s.closed = true;
            s.notify.notify_waiters();
        }
    }

    /// Forgets a job entirely.
    pub fn forget(&self, job: &str) {
        let mut inner = self.inner.lock().expect("rendezvous lock poisoned");
        inner.current.remove(job);
        inner.aborted.retain(|(j, _), _| j != job);
        let keys: Vec<_> = inner
            .scopes
            .keys()
            .filter(|k| k.0 == job)
            .cloned()
            .collect();
        for k in keys {
            if let Some(s) = inner.scopes.remove(&k) {
                s.notify.notify_waiters();
            }
        }
    }

    fn check_scope(scope: &Option<pb::Scope>) -> Result<(String, u64), Status> {
        let s = scope
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("missing scope (job_id, generation)"))?;
        if s.job_id.is_empty() {
            return Err(Status::invalid_argument("scope.job_id is empty"));
        }
        Ok((s.job_id.clone(), s.generation))
    }

    fn check_key(key: &str) -> Result<(), Status> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "key must be 1..={MAX_KEY_BYTES} bytes, got {}",
                key.len()
            )));
        }
        Ok(())
    }

    /// Runs `f` on an open scope, or explains why the scope is not open.
    fn with_scope<T>(
        &self,
        scope: &(String, u64),
        f: impl FnOnce(&mut Scope) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let mut inner = self.inner.lock().expect("rendezvous lock poisoned");
        let current = inner.current.get(&scope.0).copied();
        match inner.scopes.get_mut(scope) {
            Some(s) => f(s),
            None => Err(match current {
                Some(c) if c > scope.1 => Status::failed_precondition(format!(
                    "job {} generation {} is stale (current generation is {c})",
                    scope.0, scope.1
                )),
                Some(_) => Status::failed_precondition(format!(
                    "job {} generation {} is not running",
                    scope.0, scope.1
                )),
                None => Status::not_found(format!("job {} has no running generation", scope.0)),
            }),
        }
    }

    pub fn set(&self, scope: &(String, u64), key: &str, value: Vec<u8>) -> Result<(), Status> {
        Self::check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(Status::invalid_argument(format!(
                "value of {key} is {} bytes, above the limit of {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        self.with_scope(scope, |s| s.put(scope, &self.limits, key, value))
    }

    /// Gets a key, waiting up to `wait` for it to appear.
    pub async fn get(
        &self,
        scope: &(String, u64),
        key: &str,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, Status> {
        Self::check_key(key)?;
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let notify = self.with_scope(scope, |s| {
                if s.closed {
                    return Err(Status::aborted("generation ended"));
                }
                Ok(match s.kv.get(key) {
                    Some(v) => Err(v.clone()),
                    None => Ok(s.notify.clone()),
                })
            })?;
            let notify = match notify {
                Err(found) => return Ok(Some(found)),
                Ok(n) => n,
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so that a set between the check and enable() is seen.
            let again = self.with_scope(scope, |s| Ok(s.kv.get(key).cloned()))?;
            if again.is_some() {
                return Ok(again);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    pub fn add(&self, scope: &(String, u64), key: &str, delta: i64) -> Result<i64, Status> {
        Self::check_key(key)?;
        self.with_scope(scope, |s| {
            let cur = match s.kv.get(key) {
                None => 0,
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok())
                    .ok_or_else(|| {
                        Status::failed_precondition(format!("{key} does not hold an integer"))
                    })?,
            };
            let new = cur
                .checked_add(delta)
                .ok_or_else(|| Status::out_of_range(format!("{key}: {cur} + {delta} overflows")))?;
            s.put(scope, &self.limits, key, new.to_string().into_bytes())?;
            Ok(new)
        })
    }

    pub fn compare_and_set(
        &self,
        scope: &(String, u64),
        key: &str,
        expected: Option<Vec<u8>>,
        desired: Vec<u8>,
    ) -> Result<(bool, Option<Vec<u8>>), Status> {
        Self::check_key(key)?;
        if desired.len() > MAX_VALUE_BYTES {
            return Err(Status::invalid_argument(
                "desired value above the size limit",
            ));
        }
        self.with_scope(scope, |s| {
            let cur = s.kv.get(key).cloned();
            if cur == expected {
                s.put(scope, &self.limits, key, desired.clone())?;
                Ok((true, Some(desired)))
            } else {
                Ok((false, cur))
            }
        })
    }

    pub fn delete(&self, scope: &(String, u64), key: &str) -> Result<bool, Status> {
        Self::check_key(key)?;
        self.with_scope(scope, |s| Ok(s.remove(key)))
    }

    /// Waits until `world_size` ranks have entered the barrier `name`.
    pub async fn barrier(
        &self,
        scope: &(String, u64),
        name: &str,
        rank: u32,
        world_size: u32,
        timeout: Duration,
    ) -> Result<(), Status> {
        if world_size == 0 || rank >= world_size {
            return Err(Status::invalid_argument(format!(
                "barrier {name}: rank {rank} is not below world size {world_size}"
            )));
        }
        if world_size > MAX_BARRIER_WORLD {
            return Err(Status::invalid_argument(format!(
                "barrier {name}: world size {world_size} is above the limit of {MAX_BARRIER_WORLD}"
            )));
        }
        let arrived_key = format!("__barrier/{name}/rank/{rank}");
        let count_key = format!("__barrier/{name}/count");
        let first = self.with_scope(scope, |s| Ok(!s.kv.contains_key(&arrived_key)))?;
        if first {
            self.set(scope, &arrived_key, b"1".to_vec())?;
            self.add(scope, &count_key, 1)?;
        }
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            let (count, notify) = self.with_scope(scope, |s| {
                if s.closed {
                    return Err(Status::aborted("generation ended"));
                }
                let c =
                    s.kv.get(&count_key)
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
                        .unwrap_or(0);
                Ok((c, s.notify.clone()))
            })?;
            if count >= world_size {
                return Ok(());
            }
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let count = self.with_scope(scope, |s| {
                Ok(s.kv
                    .get(&count_key)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
                    .unwrap_or(0))
            })?;
            if count >= world_size {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // The first few missing ranks by name, then how many more: the message (and the
                // time the lock is held) stays small whatever the world size.
                let mut missing: Vec<String> = self.with_scope(scope, |s| {
                    Ok((0..world_size)
                        .filter(|r| !s.kv.contains_key(&format!("__barrier/{name}/rank/{r}")))
                        .take(MISSING_RANKS_NAMED)
                        .map(|r| r.to_string())
                        .collect())
                })?;
                let more = world_size.saturating_sub(count) as usize;
                if more > missing.len() {
                    missing.push(format!("and {} more", more - missing.len()));
                }
                return Err(Status::deadline_exceeded(format!(
                    "barrier {name}: {count}/{world_size} ranks arrived; missing ranks {}",
                    missing.join(",")
                )));
            }
        }
    }
}

/// The gRPC face of [`Rendezvous`]; progress reports go to the coordinator's loop.
pub struct RendezvousSvc {
    pub store: Rendezvous,
    pub progress: mpsc::Sender<Box<crate::server::core::types::ProgressReport>>,
    pub creds: Arc<Credentials>,
    /// Set when this coordinator stops serving (shutdown, or a lost leadership): open waits
    /// and progress streams end with UNAVAILABLE at once, so that trainers reconnect to the
    /// coordinator that serves now instead of talking to one that no longer listens.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// What an open call gets when its coordinator stops serving.
fn stopped() -> Status {
    Status::unavailable("this coordinator stopped serving (shut down, or no longer the leader)")
}

impl RendezvousSvc {
    /// The request's scope, once the caller is known to hold that generation's credential.
    fn scope<T>(
        &self,
        req: &Request<T>,
        scope: &Option<pb::Scope>,
    ) -> Result<(String, u64), Status> {
        let s = Rendezvous::check_scope(scope)?;
        let caller = ringmaster_auth::credentials::caller(req)?;
        self.creds.require_worker(&caller, &s.0, s.1)?;
        Ok(s)
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[tonic::async_trait]
impl pb::rendezvous_service_server::RendezvousService for RendezvousSvc {
    async fn set(&self, req: Request<pb::SetRequest>) -> Result<Response<pb::SetResponse>, Status> {
        let scope = self.scope(&req, &req.get_ref().scope)?;
        let r = req.into_inner();
        self.store.set(&scope, &r.key, r.value)?;
        Ok(Response::new(pb::SetResponse {}))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let scope = self.scope(&req, &req.get_ref().scope)?;
        let r = req.into_inner();
        let v = tokio::select! {
            v = self.store.get(&scope, &r.key, ms(r.wait_ms)) => v?,
            () = self.stopping.cancelled() => return Err(stopped()),
        };
        Ok(Response::new(pb::GetResponse {
            found: v.is_some(),
            value: v.unwrap_or_default(),
        }))
    }

    async fn add(&self, req: Request<pb::AddRequest>) -> Result<Response<pb::AddResponse>, Status> {
        let scope = self.scope(&req, &req.get_ref().scope)?;
        let r = req.into_inner();
        let value = self.store.add(&scope, &r.key, r.delta)?;
        Ok(Response::new(pb::AddResponse { value }))
    }

    async fn compare_and_set(
        &self,
        req: Request<pb::CompareAndSetRequest>,
    ) -> Result<Response<pb::CompareAndSetResponse>, Status> {
        let scope = self.scope(&req, &req.get_ref().scope)?;
        let r = req.into_inner();
        let (swapped, current) = self
            .store
            .compare_and_set(&scope, &r.key, r.expected, r.desired)?;
        Ok(Response::new(pb::CompareAndSetResponse {
            swapped,
            current,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let scope = self.scope(&req, &req.get_ref().scope)?;
        let r = req.into_inner();
        let deleted = self.store.delete(&scope, &r.key)?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn barrier(
        &self,
        req: Request<pb::BarrierRequest>,
    ) -> Result<Response<pb::BarrierResponse>, Status> {
        let scope = self.scope(&req, &req.get_ref().scope)?;
        let r = req.into_inner();
        tokio::select! {
            r = self.store.barrier(&scope, &r.name, r.rank, r.world_size, ms(r.timeout_ms)) => r?,
            () = self.stopping.cancelled() => return Err(stopped()),
        }
        Ok(Response::new(pb::BarrierResponse {}))
    }

    async fn report_progress(
        &self,
        req: Request<tonic::Streaming<pb::Progress>>,
    ) -> Result<Response<pb::ProgressAck>, Status> {
        let caller = ringmaster_auth::credentials::caller(&req)?;
        let mut s = req.into_inner();
        let mut scope = None;
        // One wait for the whole stream, not one registered per report.
        let stop = self.stopping.cancelled();
        tokio::pin!(stop);
        loop {
            // Registered before the check, so that an abort between the two is not missed.
            let aborted = self.store.aborts.notified();
            if let Some(reason) = scope.as_ref().and_then(|k| self.store.abort_reason(k)) {
                let (_, generation) = scope.unwrap_or_default();
                return Err(Status::aborted(format!(
                    "generation {generation} ended: {reason}"
                )));
            }
            tokio::select! {
                m = s.message() => {
                    let Some(p) = m? else { break };
                    // Reports of a closed generation still count (a checkpoint committed while
                    // the generation is being cancelled); the loop drops those of a stale one.
                    let k = Rendezvous::check_scope(&p.scope)?;
                    // Every report must be of the generation whose credential opened the
                    // stream: nothing else may report a job's progress or checkpoints.
                    self.creds.require_worker(&caller, &k.0, k.1)?;
                    scope = Some(k);
                    // Progress is advisory: drop an update rather than stall a trainer.
                    if let Some(p) = crate::server::convert::progress(p) {
                        let _ = self.progress.try_send(Box::new(p));
                    }
                }
                () = aborted => {}
                () = &mut stop => return Err(stopped()),
            }
        }
        Ok(Response::new(pb::ProgressAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(g: u64) -> (String, u64) {
        ("job-1".to_owned(), g)
    }

    #[tokio::test]
    async fn set_get_add_cas_delete() {
        let r = Rendezvous::default();
        r.open("job-1", 0);
        let s = scope(0);
        r.set(&s, "a", b"1".to_vec()).unwrap();
        assert_eq!(
            r.get(&s, "a", Duration::ZERO).await.unwrap(),
            Some(b"1".to_vec())
        );
        assert_eq!(r.get(&s, "b", Duration::ZERO).await.unwrap(), None);
        assert_eq!(r.add(&s, "n", 2).unwrap(), 2);
        assert_eq!(r.add(&s, "n", -5).unwrap(), -3);
        assert!(r.add(&s, "a", 1).is_ok());
        r.set(&s, "x", b"nope".to_vec()).unwrap();
        assert!(r.add(&s, "x", 1).is_err());
        assert_eq!(
            r.compare_and_set(&s, "c", None, b"v1".to_vec()).unwrap(),
            (true, Some(b"v1".to_vec()))
        );
        assert_eq!(
            r.compare_and_set(&s, "c", None, b"v2".to_vec()).unwrap(),
            (false, Some(b"v1".to_vec()))
        );
        assert!(
            r.compare_and_set(&s, "c", Some(b"v1".to_vec()), b"v2".to_vec())
                .unwrap()
                .0
        );
        assert!(r.delete(&s, "c").unwrap());
        assert!(!r.delete(&s, "c").unwrap());
        assert!(r.set(&s, "", vec![]).is_err());
    }

    #[tokio::test]
    async fn an_aborted_generation_is_remembered_until_a_newer_one_opens() {
        let r = Rendezvous::default();
        r.open("job-1", 0);
        let woken = r.aborts.notified();
        r.abort("job-1", 0, "rank 3 exited with code 9");
        // The notification reaches a waiter registered before the abort.
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("abort wakes the progress streams");
        assert_eq!(
            r.abort_reason(&scope(0)).as_deref(),
            Some("rank 3 exited with code 9")
        );
        assert_eq!(r.abort_reason(&scope(1)), None);
        r.open("job-1", 1);
        assert_eq!(r.abort_reason(&scope(0)), None);
        r.abort("job-1", 1, "node w1 lost");
        r.forget("job-1");
        assert_eq!(r.abort_reason(&scope(1)), None);
    }

    #[tokio::test]
    async fn get_waits_for_a_later_set() {
        let r = Rendezvous::default();
        r.open("job-1", 0);
        let r2 = r.clone();
        let waiter =
            tokio::spawn(async move { r2.get(&scope(0), "k", Duration::from_secs(10)).await });
        // On this current-thread runtime, yielding runs the waiter up to its wait.
        tokio::task::yield_now().await;
        r.set(&scope(0), "k", b"v".to_vec()).unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), Some(b"v".to_vec()));
        // And a wait with nothing coming times out empty.
        let got = r.get(&scope(0), "never", Duration::from_millis(20)).await;
        assert_eq!(got.unwrap(), None);
    }

    #[tokio::test]
    async fn stale_and_closed_generations_are_refused() {
        let r = Rendezvous::default();
        r.open("job-1", 0);
        let r2 = r.clone();
        let waiter =
            tokio::spawn(async move { r2.get(&scope(0), "k", Duration::from_secs(10)).await });
        // On this current-thread runtime, yielding runs the waiter up to its wait.
        tokio::task::yield_now().await;
        r.close("job-1", 0);
        r.open("job-1", 1);
        let err = waiter.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::Aborted | tonic::Code::FailedPrecondition
            ),
            "{err:?}"
        );
        let err = r.set(&scope(0), "k", vec![]).unwrap_err();
        assert!(err.message().contains("stale"), "{err:?}");
        let err = r.set(&("other".into(), 0), "k", vec![]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn barrier_releases_all_and_names_missing_ranks() {
        let r = Rendezvous::default();
        r.open("job-1", 0);
        let mut handles = Vec::new();
        for rank in 0..3 {
            let r = r.clone();
            handles.push(tokio::spawn(async move {
                r.barrier(&scope(0), "b", rank, 3, Duration::from_secs(10))
                    .await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let err = r
            .barrier(&scope(0), "b2", 0, 2, Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(err.message().contains("missing ranks 1"), "{err:?}");
        // A huge world size is refused before any work; a large one names a few missing ranks.
        let err = r
            .barrier(&scope(0), "huge", 0, u32::MAX, Duration::from_millis(1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let err = r
            .barrier(&scope(0), "wide", 0, 100, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(err.message().ends_with("and 67 more"), "{err:?}");
    }

    #[tokio::test]
    async fn keys_and_bytes_per_generation_are_limited() {
        let r = Rendezvous::new(RendezvousLimits {
            max_keys: 3,
            max_bytes: 100,
        });
        r.open("job-1", 0);
        let s = scope(0);
        r.set(&s, "a", vec![0; 10]).unwrap();
        r.set(&s, "b", vec![0; 10]).unwrap();
        assert_eq!(r.add(&s, "n", 1).unwrap(), 1);
        // A fourth key is refused, naming the limit and its flag; replacing one is not.
        let err = r.set(&s, "c", vec![]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("--rendezvous-max-keys 3"), "{err:?}");
        assert!(err.message().contains("job job-1 generation 0"), "{err:?}");
        assert!(r.compare_and_set(&s, "c", None, vec![1]).is_err());
        r.set(&s, "a", vec![1; 5]).unwrap();
        // Bytes: a=1+5, b=1+10, n=1+1 → 19; growing b to 89 value bytes makes 19-11+90 = 98.
        r.set(&s, "b", vec![0; 89]).unwrap();
        let err = r.set(&s, "a", vec![1; 8]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("above the limit of 100B (--rendezvous-max-bytes)"),
            "{err:?}"
        );
        // CAS and add are counted too; a refused write leaves the old value.
        assert!(
            r.compare_and_set(&s, "a", Some(vec![1; 5]), vec![2; 50])
                .unwrap_err()
                .message()
                .contains("--rendezvous-max-bytes")
        );
        assert_eq!(
            r.get(&s, "a", Duration::ZERO).await.unwrap(),
            Some(vec![1; 5])
        );
        r.set(&s, "n", b"1".to_vec()).unwrap();
        assert!(r.add(&s, "n", 1_000_000_000).is_err());
        // Deleting frees room; a new generation starts empty.
        assert!(r.delete(&s, "b").unwrap());
        r.set(&s, "c", vec![0; 80]).unwrap();
        r.close("job-1", 0);
        r.open("job-1", 1);
        for k in ["x", "y", "z"] {
            r.set(&scope(1), k, vec![0; 30]).unwrap();
        }
    }
}
