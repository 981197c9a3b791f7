//! Ring bootstrap: each rank listens on an ephemeral port of its advertised address, publishes
//! `host:port` in the store under job + generation, connects to its right neighbour and
//! accepts its left one. The connecting side introduces itself (job id, generation, rank, world
//! size); the accepting side answers OK or a refusal with the reason and keeps waiting for the
//! right peer, so that a stale rank from an older generation cannot take a newer one's place.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::RingConfig;
use crate::CommError;
use crate::store::Store;

const HELLO_MAGIC: &[u8; 4] = b"RMRG";
const PROTOCOL: u8 = 1;
const MAX_JOB_ID: usize = 256;

/// The store key of a rank's ring address.
pub fn addr_key(job: &str, generation: u64, rank: usize) -> String {
    format!("{job}/{generation}/ring/{rank}")
}

fn tune(s: &TcpStream, cfg: &RingConfig) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_send_buffer_size(cfg.socket_buffer);
    let _ = sock.set_recv_buffer_size(cfg.socket_buffer);
}

fn hello(cfg: &RingConfig) -> Vec<u8> {
    let mut h = Vec::with_capacity(32 + cfg.job_id.len());
    h.extend_from_slice(HELLO_MAGIC);
    h.push(PROTOCOL);
    h.extend_from_slice(&(cfg.job_id.len() as u16).to_le_bytes());
    h.extend_from_slice(cfg.job_id.as_bytes());
    h.extend_from_slice(&cfg.generation.to_le_bytes());
    h.extend_from_slice(&(cfg.rank as u64).to_le_bytes());
    h.extend_from_slice(&(cfg.world as u64).to_le_bytes());
    h
}

struct Hello {
    job: String,
    generation: u64,
    rank: u64,
    world: u64,
}

fn read_hello(s: &mut TcpStream) -> Result<Hello, String> {
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
    let mut rest = [0u8; 24];
    s.read_exact(&mut rest)
        .map_err(|e| format!("reading hello: {e}"))?;
    let u = |i: usize| u64::from_le_bytes(rest[i..i + 8].try_into().expect("8 bytes"));
    Ok(Hello {
        job: String::from_utf8_lossy(&job).into_owned(),
        generation: u(0),
        rank: u(8),
        world: u(16),
    })
}

fn reply(s: &mut TcpStream, refusal: Option<&str>) {
    let msg = refusal.unwrap_or("");
    let mut out = vec![u8::from(refusal.is_some())];
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    let _ = s.write_all(&out);
}

fn read_reply(s: &mut TcpStream) -> Result<Option<String>, std::io::Error> {
    let mut head = [0u8; 3];
    s.read_exact(&mut head)?;
    let n = u16::from_le_bytes([head[1], head[2]]) as usize;
    let mut msg = vec![0u8; n];
    s.read_exact(&mut msg)?;
    Ok((head[0] != 0).then(|| String::from_utf8_lossy(&msg).into_owned()))
}

/// Connects the ring: returns (left, right) streams.
pub fn connect(cfg: &RingConfig, store: &dyn Store) -> Result<(TcpStream, TcpStream), CommError> {
    let deadline = Instant::now() + cfg.bootstrap_timeout;
    let listener = TcpListener::bind(SocketAddr::new(cfg.bind_addr, 0))
        .map_err(|e| CommError::Bootstrap(format!("binding {}: {e}", cfg.bind_addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CommError::Bootstrap(e.to_string()))?;
    store.set(
        &addr_key(&cfg.job_id, cfg.generation, cfg.rank),
        local.to_string().as_bytes(),
    )?;
    let right = (cfg.rank + 1) % cfg.world;
    let left = (cfg.rank + cfg.world - 1) % cfg.world;

    // If connecting to the right fails, stop waiting for the left at once.
    let gave_up = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let connector = scope.spawn(|| {
            let r = connect_right(cfg, store, right, deadline);
            if r.is_err() {
                gave_up.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            r
        });
        let accepted = accept_left(cfg, &listener, left, deadline, &gave_up);
        let connected = connector.join().expect("connector thread panicked");
        match (accepted, connected) {
            (Ok(l), Ok(r)) => Ok((l, r)),
            (_, Err(e)) | (Err(e), _) => Err(e),
        }
    })
}

fn connect_right(
    cfg: &RingConfig,
    store: &dyn Store,
    right: usize,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let addr_bytes = store
        .get(&addr_key(&cfg.job_id, cfg.generation, right), remaining)
        .map_err(|e| CommError::Bootstrap(format!("address of rank {right}: {e}")))?;
    let addr: SocketAddr = String::from_utf8_lossy(&addr_bytes)
        .parse()
        .map_err(|e| CommError::Bootstrap(format!("address of rank {right}: {e}")))?;
    let mut wait = Duration::from_millis(5);
    loop {
        let left_time = deadline.saturating_duration_since(Instant::now());
        if left_time.is_zero() {
            return Err(CommError::Bootstrap(format!(
                "could not connect to rank {right} at {addr} within {:?}",
                cfg.bootstrap_timeout
            )));
        }
        match TcpStream::connect_timeout(&addr, left_time.min(Duration::from_secs(5))) {
            Ok(mut s) => {
                tune(&s, cfg);
                let _ = s.set_read_timeout(Some(left_time.max(Duration::from_millis(1))));
                s.write_all(&hello(cfg))
                    .map_err(|e| CommError::Bootstrap(format!("hello to rank {right}: {e}")))?;
                return match read_reply(&mut s) {
                    Ok(None) => {
                        let _ = s.set_read_timeout(None);
                        Ok(s)
                    }
                    Ok(Some(why)) => Err(CommError::Refused {
                        peer: right,
                        detail: why,
                    }),
                    Err(e) => Err(CommError::Bootstrap(format!(
                        "no answer from rank {right} at {addr}: {e}"
                    ))),
                };
            }
            Err(_) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(200));
            }
        }
    }
}

fn accept_left(
    cfg: &RingConfig,
    listener: &TcpListener,
    left: usize,
    deadline: Instant,
    gave_up: &std::sync::atomic::AtomicBool,
) -> Result<TcpStream, CommError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::Bootstrap(e.to_string()))?;
    loop {
        match listener.accept() {
            Ok((mut s, peer)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let refusal = match read_hello(&mut s) {
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
                        reply(&mut s, None);
                        let _ = s.set_read_timeout(None);
                        tune(&s, cfg);
                        return Ok(s);
                    }
                    Some(why) => {
                        reply(&mut s, Some(&why));
                        // Keep waiting for the right peer.
                        let _ = peer;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
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
            }
            Err(e) => return Err(CommError::Bootstrap(format!("accept: {e}"))),
        }
    }
}
