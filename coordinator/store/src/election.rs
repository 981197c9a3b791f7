//! Leader election among coordinators that share one etcd ([`Elector`]), through etcd's
//! election API on a lease.
//!
//! - A candidate holds a lease of `ttl` (kept alive from the start, also while it waits) and
//!   campaigns under `<root>/leader`; etcd makes it leader when its key is the oldest there.
//! - The leadership is the election key and its creation revision: that revision is the
//!   [`Fence`] every leader write carries ([`crate::StateStore::commit_fenced`]), and the
//!   leader's epoch, which grows with every election.
//! - [`Leadership::valid`] is the leader's own view: true while the last keep-alive answer is
//!   younger than the TTL less a margin (the monotonic clock goes on under SIGSTOP, so a paused
//!   leader knows on waking that it may have been replaced). [`Leadership::lost`] resolves
//!   when the lease is gone or can no longer be renewed in time.
//!
//! Unlike [`crate::EtcdStore`], this is async: it runs in the coordinator's runtime, and its
//! client has no per-request timeout (a campaign waits as long as another leader lives).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaderKey, ResignOptions};
use tokio::sync::watch;

use crate::etcd_store::{EtcdOptions, EtcdUrl, connect_checked, connect_options, describe};
use crate::{Fence, StoreError};

/// What a leader subtracts from the TTL before it stops trusting its lease.
const MARGIN: Duration = Duration::from_secs(1);

/// A candidate for leadership of the Ringmaster cluster under one etcd root.
#[derive(Clone)]
pub struct Elector {
    client: Client,
    /// `<root>/leader`: the election's name (its keys are `<root>/leader/<lease>`).
    name: String,
    /// `<root>/`, stripped from election keys to make them store keys (fences).
    prefix: String,
    /// What this candidate publishes as leader: the address clients reach it at.
    value: String,
    ttl: Duration,
    endpoints: String,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("value", &self.value)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// This process's leadership, from a won campaign until it is lost or resigned.
pub struct Leadership {
    fence: Fence,
    /// `<etcd cluster id>/<root>`: the election the epoch counts in.
    scope: String,
    key: LeaderKey,
    lease: i64,
    ttl: Duration,
    /// When the last keep-alive that etcd answered was sent.
    renewed: Arc<Mutex<Instant>>,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
    client: Client,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("fence", &self.fence)
            .field("lease", &self.lease)
            .field("valid", &self.valid())
            .finish()
    }
}

impl Elector {
    /// Connect to the etcd of `url` as a candidate publishing `value` (its client address),
    /// with leases of `ttl` (at least 2 s: the margin is 1 s).
    pub async fn connect(
        url: &str,
        opts: &EtcdOptions,
        value: String,
        ttl: Duration,
    ) -> Result<Elector, StoreError> {
        if ttl < Duration::from_secs(2) {
            return Err(StoreError::Invalid(format!(
                "leader TTL {ttl:?} is below the 2 s minimum"
            )));
        }
        let parsed = EtcdUrl::parse(url)?;
        let mut connect = connect_options(opts, None)?;
        connect = connect.with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
        let endpoints = parsed.endpoints.join(",");
        let client = connect_checked(
            parsed.endpoints.clone(),
            connect,
            opts.connect_timeout + opts.request_timeout,
        )
        .await?;
        Ok(Elector {
            client,
            name: format!("{}/leader", parsed.root),
            prefix: format!("{}/", parsed.root),
            value,
            ttl,
            endpoints,
        })
    }

    fn err(&self, what: &str, e: &etcd_client::Error) -> StoreError {
        StoreError::Backend(format!(
            "etcd at {}: {what}: {}",
            self.endpoints,
            describe(e)
        ))
    }

    /// What this candidate publishes when it leads (its address).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The current leader's published value (its address), if there is a leader.
    pub async fn leader(&self) -> Result<Option<String>, StoreError> {
        let mut c = self.client.clone();
        let asked = tokio::time::timeout(Duration::from_secs(2), c.leader(self.name.clone()))
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "etcd at {}: reading the leader: no answer within 2 s",
                    self.endpoints
                ))
            })?;
        match asked {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(self.err("reading the leader", &e)),
        }
    }

    /// Wait until this candidate leads. The lease is granted and kept alive first, so that a
    /// candidate that dies while waiting leaves nothing behind after its TTL.
    pub async fn campaign(&self) -> Result<Leadership, StoreError> {
        let mut c = self.client.clone();
        // Whole seconds, rounded up; then the TTL etcd granted is the one trusted.
        let wanted = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        let ttl_s = i64::try_from(wanted).unwrap_or(i64::MAX).max(2);
        let granted = c
            .lease_grant(ttl_s, None)
            .await
            .map_err(|e| self.err("granting a lease", &e))?;
        let lease = granted.id();
        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0).max(2));
        let renewed = Arc::new(Mutex::new(Instant::now()));
        let (lost_tx, lost) = watch::channel(false);
        // Aborted if this future is dropped mid-campaign (a shutdown), so that the lease is
        // not kept alive by a task nobody owns.
        let mut keeper = AbortOnDrop(Some(tokio::spawn(keep_alive(
            self.client.clone(),
            lease,
            ttl,
            Arc::clone(&renewed),
            lost_tx,
        ))));
        let mut scope = String::new();
        let won = tokio::select! {
            won = c.campaign(self.name.clone(), self.value.clone(), lease) => won,
            _ = wait_lost(lost.clone()) => {
                return Err(StoreError::Backend(format!(
                    "etcd at {}: the lease was lost while campaigning",
                    self.endpoints
                )));
            }
        };
        let key = match won {
            Ok(mut r) => {
                if let Some(h) = r.header() {
                    scope = format!("{:x}/{}", h.cluster_id(), self.prefix.trim_end_matches('/'));
                }
                r.take_leader()
            }
            Err(e) => {
                drop(keeper);
                let _ = c.lease_revoke(lease).await;
                return Err(self.err("campaigning for leadership", &e));
            }
        };
        let Some(key) = key else {
            return Err(StoreError::Backend(
                "etcd answered a campaign without a leader key".into(),
            ));
        };
        let full = String::from_utf8_lossy(key.key()).into_owned();
        let fence = Fence {
            key: full.strip_prefix(&self.prefix).unwrap_or(&full).to_string(),
            created: u64::try_from(key.rev()).unwrap_or(0),
        };
        Ok(Leadership {
            fence,
            scope,
            key,
            lease,
            ttl,
            renewed,
            lost,
            keeper: keeper
                .0
                .take()
                .expect("the keeper runs until the leadership ends"),
            client: self.client.clone(),
        })
    }
}

/// Renew `lease` every third of the TTL; report it lost when etcd says it is gone or when no
/// renewal has been answered within the TTL.
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    renewed: Arc<Mutex<Instant>>,
    lost: watch::Sender<bool>,
) {
    let every = ttl / 3;
    let mut stream = None;
    loop {
        let last = *renewed.lock().unwrap_or_else(PoisonError::into_inner);
        if last.elapsed() >= ttl {
            let _ = lost.send(true);
            return;
        }
        if stream.is_none() {
            let mut c = client.clone();
            stream = tokio::time::timeout(every, c.lease_keep_alive(lease))
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some((keeper, answers)) = stream.as_mut() {
            let sent = Instant::now();
            let answer = tokio::time::timeout(every, async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    *renewed.lock().unwrap_or_else(PoisonError::into_inner) = sent;
                }
                Ok(Ok(Some(_))) => {
                    // ttl <= 0: etcd no longer knows the lease.
                    let _ = lost.send(true);
                    return;
                }
                _ => stream = None,
            }
        }
        let wait = every.saturating_sub(
            Instant::now().duration_since(*renewed.lock().unwrap_or_else(PoisonError::into_inner)),
        );
        tokio::time::sleep(wait.max(Duration::from_millis(100)).min(every)).await;
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

async fn wait_lost(mut lost: watch::Receiver<bool>) {
    while !*lost.borrow_and_update() {
        if lost.changed().await.is_err() {
            // The keeper ended without saying: treat as lost.
            return;
        }
    }
}

impl Leadership {
    /// The fence every write of this leadership carries.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The leader epoch: the election key's creation revision, which grows with every
    /// election.
    pub fn epoch(&self) -> u64 {
        self.fence.created
    }

    /// The election the epoch counts in: `<etcd cluster id>/<root>`.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Whether this process may still act as leader: its last renewal was answered less than
    /// the TTL (less a margin) ago. False from the moment it may have been replaced.
    pub fn valid(&self) -> bool {
        !*self.lost.borrow()
            && self
                .renewed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed()
                + MARGIN
                < self.ttl
    }

    /// Resolves when the leadership is lost (lease gone or not renewed in time).
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        wait_lost(self.lost.clone())
    }

    /// Give the leadership up at once (a clean shutdown): the next candidate need not wait
    /// for the TTL.
    pub async fn resign(&self) {
        self.keeper.abort();
        let mut c = self.client.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            c.resign(Some(ResignOptions::new().with_leader(self.key.clone()))),
        )
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(self.lease)).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::EtcdServer;
    use crate::{EtcdStore, Op, Precondition, StateStore};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn one_leader_then_the_next_when_its_lease_ends_and_the_old_fence_writes_nothing() {
        let Some(server) = EtcdServer::start_or_skip("election") else {
            return;
        };
        let url = server.url("elect");
        let rt = rt();
        let opts = EtcdOptions::default();
        let ttl = Duration::from_secs(2);
        let a = rt
            .block_on(Elector::connect(&url, &opts, "a:29500".into(), ttl))
            .unwrap();
        let b = rt
            .block_on(Elector::connect(&url, &opts, "b:29500".into(), ttl))
            .unwrap();
        assert_eq!(rt.block_on(a.leader()).unwrap(), None);
        let first = rt.block_on(a.campaign()).unwrap();
        assert!(first.valid());
        assert_eq!(rt.block_on(b.leader()).unwrap().as_deref(), Some("a:29500"));
        assert!(
            first.fence().key.starts_with("leader/"),
            "{:?}",
            first.fence()
        );

        let store = EtcdStore::open(&url, &opts).unwrap();
        store
            .commit_fenced(
                first.fence(),
                vec![Op::put("jobs/1", b"a".to_vec(), Precondition::Any)],
            )
            .unwrap();

        // b waits while a leads.
        let b2 = b.clone();
        let mut waiting = rt.spawn(async move { b2.campaign().await });
        let led_early = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(500), &mut waiting)
                .await
                .is_ok()
        });
        assert!(!led_early, "b led while a's lease lived");

        // a stops renewing (a frozen or cut-off leader): within the TTL it knows itself
        // invalid, and b leads within TTL + 1 s of the last renewal.
        first.keeper.abort();
        let stopped = Instant::now();
        let second = rt.block_on(async {
            tokio::time::timeout(ttl + Duration::from_secs(3), waiting)
                .await
                .expect("b leads after a's lease ends")
                .unwrap()
                .unwrap()
        });
        let took = stopped.elapsed();
        assert!(took <= ttl + Duration::from_secs(2), "took {took:?}");
        assert!(!first.valid());
        assert!(second.epoch() > first.epoch());
        assert_eq!(rt.block_on(a.leader()).unwrap().as_deref(), Some("b:29500"));

        // The deposed leader's writes are fenced; the new leader's land.
        let r = store.commit_fenced(
            first.fence(),
            vec![Op::put("jobs/1", b"stale".to_vec(), Precondition::Any)],
        );
        assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
        assert_eq!(store.get("jobs/1").unwrap().unwrap().value, b"a");
        store
            .commit_fenced(
                second.fence(),
                vec![Op::put("jobs/1", b"b".to_vec(), Precondition::Any)],
            )
            .unwrap();

        // Resigning hands over at once.
        let a2 = a.clone();
        let third = rt.spawn(async move { a2.campaign().await });
        let resigned = Instant::now();
        rt.block_on(second.resign());
        let third = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), third).await })
            .expect("a leads after b resigns")
            .unwrap()
            .unwrap();
        assert!(resigned.elapsed() < ttl, "{:?}", resigned.elapsed());
        assert!(third.valid());
        drop(first);
        rt.block_on(third.resign());
    }

    #[test]
    fn a_leader_knows_when_etcd_is_gone() {
        let Some(mut server) = EtcdServer::start_or_skip("election loss") else {
            return;
        };
        let rt = rt();
        let ttl = Duration::from_secs(2);
        let e = rt
            .block_on(Elector::connect(
                &server.url("gone"),
                &EtcdOptions::default(),
                "a".into(),
                ttl,
            ))
            .unwrap();
        let l = rt.block_on(e.campaign()).unwrap();
        server.stop();
        let start = Instant::now();
        rt.block_on(async {
            tokio::time::timeout(ttl + Duration::from_secs(2), l.lost())
                .await
                .expect("lost within the TTL")
        });
        assert!(!l.valid());
        assert!(start.elapsed() <= ttl + Duration::from_secs(1));
    }
}
