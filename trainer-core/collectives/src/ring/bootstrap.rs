//! Ring bootstrap: each rank listens on an ephemeral port of its advertised address (and, with
//! `Transport::Auto`, on an abstract Unix socket), publishes both with its machine identity in
//! the store under job + generation, connects to its right neighbour — by Unix socket when the
//! neighbour shares its machine and network namespace, else by TCP — and accepts its left one. The connecting side introduces itself (job id, generation, rank, world
//! size); the accepting side answers OK or a refusal with the reason and keeps waiting for the
//! right peer, so that a stale rank from an older generation cannot take a newer one's place.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::RingConfig;
use super::stream::{Stream, Transport};
use crate::CommError;
use crate::store::Store;

const HELLO_MAGIC: &[u8; 4] = b"RMRG";
const PROTOCOL: u8 = 2;
const MAX_JOB_ID: usize = 256;

/// The store key of a rank's ring address.
pub fn addr_key(job: &str, generation: u64, rank: usize) -> String {
    format!("{job}/{generation}/ring/{rank}")
}

/// `offer_cma`: the connecting rank invites its peer to read its memory directly.
fn hello(cfg: &RingConfig, offer_cma: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(48 + cfg.job_id.len());
    h.extend_from_slice(HELLO_MAGIC);
    h.push(PROTOCOL);
    h.extend_from_slice(&(cfg.job_id.len() as u16).to_le_bytes());
    h.extend_from_slice(cfg.job_id.as_bytes());
    h.extend_from_slice(&cfg.generation.to_le_bytes());
    h.extend_from_slice(&(cfg.rank as u64).to_le_bytes());
    h.extend_from_slice(&(cfg.world as u64).to_le_bytes());
    h.extend_from_slice(&u64::from(std::process::id()).to_le_bytes());
    let probe = if offer_cma {
        super::cma::PROBE.as_ptr() as u64
    } else {
        0
    };
    h.extend_from_slice(&probe.to_le_bytes());
    h
}

struct Hello {
    job: String,
    generation: u64,
    rank: u64,
    world: u64,
    pid: u64,
    probe: u64,
}

fn read_hello(s: &mut Stream) -> Result<Hello, String> {
    let mut head = [0u8; 7];
    s.read_exact(&mut head)
        .map_err(|e| format!("reading hello: {e}"))?;
    if &head[0..4] != HELLO_MAGIC {
        return Err("not a Ringmaster ring peer".into());
    }
    if head[4] != PROTOCOL {
        return Err(format!(
            "ring protocol {} (this rank speaks {PROTOCOL})",
            head[4]
        ));
    }
    let n = u16::from_le_bytes([head[5], head[6]]) as usize;
    if n > MAX_JOB_ID {
        return Err("job id too long".into());
    }
    let mut job = vec![0u8; n];
    s.read_exact(&mut job)
        .map_err(|e| format!("reading hello: {e}"))?;
    let mut rest = [0u8; 40];
    s.read_exact(&mut rest)
        .map_err(|e| format!("reading hello: {e}"))?;
    let u = |i: usize| u64::from_le_bytes(rest[i..i + 8].try_into().expect("8 bytes"));
    Ok(Hello {
        job: String::from_utf8_lossy(&job).into_owned(),
        generation: u(0),
        rank: u(8),
        world: u(16),
        pid: u(24),
        probe: u(32),
    })
}

/// Answers a hello: `[refused][len u16][message][cma accepted]`.
fn reply(s: &mut Stream, refusal: Option<&str>, cma: bool) {
    let msg = refusal.unwrap_or("");
    let mut out = vec![u8::from(refusal.is_some())];
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.push(u8::from(cma));
    let _ = s.write_all(&out);
}

/// Reads an answer: `Err(refusal)` or whether the peer will read this rank's memory.
fn read_reply(s: &mut Stream) -> Result<Result<bool, String>, std::io::Error> {
    let mut head = [0u8; 3];
    s.read_exact(&mut head)?;
    let n = u16::from_le_bytes([head[1], head[2]]) as usize;
    let mut msg = vec![0u8; n + 1];
    s.read_exact(&mut msg)?;
    let cma = msg.pop() == Some(1);
    Ok(if head[0] != 0 {
        Err(String::from_utf8_lossy(&msg).into_owned())
    } else {
        Ok(cma)
    })
}

/// The two connections of a rank, and whether they move data by cross-memory attach.
pub struct Links {
    pub left: Stream,
    /// The left neighbour's pid when this rank reads its chunks with `process_vm_readv`.
    pub left_cma_pid: Option<i32>,
    pub right: Stream,
    /// The right neighbour reads this rank's chunks with `process_vm_readv`.
    pub right_cma: bool,
}

/// This machine and network namespace: ranks with equal identities reach each other's
/// abstract Unix sockets.
fn machine_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if boot.trim().is_empty() || netns.is_empty() {
        return String::new();
    }
    format!("{}/{netns}", boot.trim())
}

/// What a rank publishes: `tcp=IP:PORT [uds=NAME host=IDENTITY]`.
struct Published {
    tcp: SocketAddr,
    uds: Option<String>,
    host: String,
}

fn parse_published(text: &str) -> Result<Published, String> {
    let mut tcp = None;
    let mut uds = None;
    let mut host = String::new();
    for part in text.split_whitespace() {
        match part.split_once('=') {
            Some(("tcp", v)) => tcp = Some(v.parse().map_err(|e| format!("'{v}': {e}"))?),
            Some(("uds", v)) => uds = Some(v.to_owned()),
            Some(("host", v)) => host = v.to_owned(),
            _ => tcp = Some(part.parse().map_err(|e| format!("'{part}': {e}"))?),
        }
    }
    Ok(Published {
        tcp: tcp.ok_or("no tcp address")?,
        uds,
        host,
    })
}

/// Connects the ring.
pub fn connect(cfg: &RingConfig, store: &dyn Store) -> Result<Links, CommError> {
    let deadline = Instant::now() + cfg.bootstrap_timeout;
    let listener = TcpListener::bind(SocketAddr::new(cfg.bind_addr, 0))
        .map_err(|e| CommError::Bootstrap(format!("binding {}: {e}", cfg.bind_addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CommError::Bootstrap(e.to_string()))?;
    let identity = machine_identity();
    let uds = if cfg.transport == Transport::Auto && !identity.is_empty() {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "ringmaster.{}.{}.{}.{}.{nonce:x}",
            cfg.job_id.replace(char::is_whitespace, "_"),
            cfg.generation,
            cfg.rank,
            std::process::id()
        );
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| UnixListener::bind_addr(&a))
            .ok()
            .map(|l| (l, name))
    } else {
        None
    };
    let mut published = format!("tcp={local}");
    if let Some((_, name)) = &uds {
        published.push_str(&format!(" uds={name} host={identity}"));
    }
    store.set(
        &addr_key(&cfg.job_id, cfg.generation, cfg.rank),
        published.as_bytes(),
    )?;
    let right = (cfg.rank + 1) % cfg.world;
    let left = (cfg.rank + cfg.world - 1) % cfg.world;

    // If connecting to the right fails, stop waiting for the left at once.
    let gave_up = std::sync::atomic::AtomicBool::new(false);
    let uds_listener = uds.as_ref().map(|(l, _)| l);
    std::thread::scope(|scope| {
        let connector = scope.spawn(|| {
            let r = connect_right(cfg, store, right, deadline, &identity);
            if r.is_err() {
                gave_up.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            r
        });
        let accepted = accept_left(cfg, &listener, uds_listener, left, deadline, &gave_up);
        let connected = connector.join().expect("connector thread panicked");
        match (accepted, connected) {
            (Ok((left, left_cma_pid)), Ok((right, right_cma))) => Ok(Links {
                left,
                left_cma_pid,
                right,
                right_cma,
            }),
            (_, Err(e)) | (Err(e), _) => Err(e),
        }
    })
}

/// Introduces this rank on `s` and reads the answer.
fn handshake(
    cfg: &RingConfig,
    mut s: Stream,
    right: usize,
    deadline: Instant,
) -> Result<(Stream, bool), CommError> {
    s.tune(cfg.socket_buffer);
    let left_time = deadline.saturating_duration_since(Instant::now());
    let _ = s.set_read_timeout(Some(left_time.max(Duration::from_millis(1))));
    let offer_cma = cfg.cma && matches!(s, Stream::Unix(_));
    s.write_all(&hello(cfg, offer_cma))
        .map_err(|e| CommError::Bootstrap(format!("hello to rank {right}: {e}")))?;
    match read_reply(&mut s) {
        Ok(Ok(cma)) => {
            let _ = s.set_read_timeout(None);
            Ok((s, cma && offer_cma))
        }
        Ok(Err(why)) => Err(CommError::Refused {
            peer: right,
            detail: why,
        }),
        Err(e) => Err(CommError::Bootstrap(format!(
            "no answer from rank {right}: {e}"
        ))),
    }
}

fn connect_right(
    cfg: &RingConfig,
    store: &dyn Store,
    right: usize,
    deadline: Instant,
    identity: &str,
) -> Result<(Stream, bool), CommError> {
    let key = addr_key(&cfg.job_id, cfg.generation, right);
    let mut wait = Duration::from_millis(5);
    let mut last_error = String::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CommError::Bootstrap(format!(
                "could not connect to rank {right} within {:?}: {last_error}",
                cfg.bootstrap_timeout
            )));
        }
        // Read the address on every attempt: a value left by an earlier run (a reused store
        // directory) is replaced once the peer publishes its own.
        let bytes = store
            .get(&key, remaining)
            .map_err(|e| CommError::Bootstrap(format!("address of rank {right}: {e}")))?;
        let published = parse_published(&String::from_utf8_lossy(&bytes))
            .map_err(|e| CommError::Bootstrap(format!("address of rank {right}: {e}")))?;
        // Same machine and network namespace: a Unix socket, else TCP.
        let mut unix_error = String::new();
        if cfg.transport == Transport::Auto
            && !identity.is_empty()
            && published.host == identity
            && let Some(name) = &published.uds
        {
            match std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| UnixStream::connect_addr(&a))
            {
                Ok(u) => return handshake(cfg, Stream::Unix(u), right, deadline),
                Err(e) => unix_error = format!("unix socket {name}: {e}; "),
            }
        }
        let addr = published.tcp;
        match TcpStream::connect_timeout(&addr, remaining.min(Duration::from_secs(2))) {
            Ok(s) => return handshake(cfg, Stream::Tcp(s), right, deadline),
            Err(e) => last_error = format!("{unix_error}{addr}: {e}"),
        }
        std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

fn accept_left(
    cfg: &RingConfig,
    listener: &TcpListener,
    uds: Option<&UnixListener>,
    left: usize,
    deadline: Instant,
    gave_up: &std::sync::atomic::AtomicBool,
) -> Result<(Stream, Option<i32>), CommError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::Bootstrap(e.to_string()))?;
    if let Some(u) = uds {
        u.set_nonblocking(true)
            .map_err(|e| CommError::Bootstrap(e.to_string()))?;
    }
    loop {
        let mut incoming = match listener.accept() {
            Ok((s, _)) => Some(Stream::Tcp(s)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => return Err(CommError::Bootstrap(format!("accept: {e}"))),
        };
        if incoming.is_none()
            && let Some(u) = uds
        {
            incoming = match u.accept() {
                Ok((s, _)) => Some(Stream::Unix(s)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => return Err(CommError::Bootstrap(format!("accept: {e}"))),
            };
        }
        let Some(mut s) = incoming else {
            if gave_up.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(CommError::Bootstrap(
                    "connecting to the right neighbour failed".into(),
                ));
            }
            if Instant::now() >= deadline {
                return Err(CommError::Bootstrap(format!(
                    "rank {left} did not connect within {:?}",
                    cfg.bootstrap_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let hello = read_hello(&mut s);
        let cma_pid = match &hello {
            Ok(h) if h.probe != 0 && matches!(s, Stream::Unix(_)) => {
                let pid = h.pid as i32;
                super::cma::probe(pid, h.probe).then_some(pid)
            }
            _ => None,
        };
        let refusal = match hello {
            Err(e) => Some(e),
            Ok(h) if h.job != cfg.job_id => Some(format!(
                "job '{}' is not this rank's job '{}'",
                h.job, cfg.job_id
            )),
            Ok(h) if h.generation != cfg.generation => Some(format!(
                "generation {} is not this rank's generation {} (stale peer)",
                h.generation, cfg.generation
            )),
            Ok(h) if h.world != cfg.world as u64 => Some(format!(
                "world size {} is not this rank's world size {}",
                h.world, cfg.world
            )),
            Ok(h) if h.rank != left as u64 => Some(format!(
                "rank {} is not this rank's left neighbour {left}",
                h.rank
            )),
            Ok(_) => None,
        };
        match refusal {
            None => {
                reply(&mut s, None, cma_pid.is_some());
                let _ = s.set_read_timeout(None);
                s.tune(cfg.socket_buffer);
                return Ok((s, cma_pid));
            }
            // Keep waiting for the right peer.
            Some(why) => reply(&mut s, Some(&why), false),
        }
    }
}
