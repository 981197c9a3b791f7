//! [`TcpStoreServer`]: the store itself. One accept thread; one thread per connection, blocked in
//! reads of its own socket, so a slow or half-sent request holds up only its own connection. A
//! request is read whole before the store's lock is taken.
//!
//! WAIT: the connection's thread registers the keys still missing and goes back to reading
//! (the client may send CANCEL_WAIT). The thread whose write sets the last awaited key counts a
//! STOP_WAITING owed to the waiting connection (under the store lock, so the order is decided
//! there) and then sends it without blocking (`MSG_DONTWAIT`); whichever thread writes to that
//! connection next sends owed STOP_WAITINGs first, so a reply never overtakes one. A waiting
//! client whose socket buffer is full is not reading its replies: its connection is closed.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::StoreLimits;
use super::wire::{
    CHECK_NOT_READY, CHECK_READY, Frame, FrameError, STOP_WAITING, VALIDATION_MAGIC, WAIT_CANCELED,
    parse_counter, query, read_bytes, read_count, read_i64, read_u8, read_u32,
};
use crate::CommError;

/// How long a connection's thread may block writing a reply to a client that does not read.
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the accept thread looks at the stop flag when nothing wakes it.
const ACCEPT_POLL_MS: i32 = 100;
const CONN_STACK: usize = 256 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A c10d-compatible TCPStore server. Serves until dropped or [`TcpStoreServer::shutdown`];
/// both close every connection and join every thread.
pub struct TcpStoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    limits: StoreLimits,
    stop: AtomicBool,
    listener: TcpListener,
    state: Mutex<State>,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    live: HashMap<u64, Arc<Conn>>,
    threads: Vec<JoinHandle<()>>,
}

struct Conn {
    id: u64,
    stream: TcpStream,
    /// Held while writing to `stream`.
    write_lock: Mutex<()>,
    /// STOP_WAITING replies decided but not yet sent.
    owed: AtomicU32,
}

impl Conn {
    /// Sends `reply` after any owed STOP_WAITING (blocking, up to [`REPLY_WRITE_TIMEOUT`]).
    fn reply(&self, reply: &[u8]) -> std::io::Result<()> {
        let g = lock(&self.write_lock);
        let owed = self.owed.swap(0, Ordering::SeqCst) as usize;
        let mut s = &self.stream;
        let sent = if owed == 0 {
            s.write_all(reply)
        } else {
            let mut buf = vec![STOP_WAITING; owed];
            buf.extend_from_slice(reply);
            s.write_all(&buf)
        };
        drop(g);
        // One owed while this wrote (a client that sent more after WAIT) found the lock taken.
        if self.owed.load(Ordering::SeqCst) > 0 {
            self.flush_owed();
        }
        sent
    }

    /// Sends owed STOP_WAITINGs without blocking: if another thread is writing to this
    /// connection it sends them when done; if the socket cannot take them, the client is not
    /// reading and the connection is closed.
    fn flush_owed(&self) {
        loop {
            let guard = match self.write_lock.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            let owed = self.owed.swap(0, Ordering::SeqCst) as usize;
            if owed > 0 {
                let buf = vec![STOP_WAITING; owed];
                let sent = socket2::SockRef::from(&self.stream)
                    .send_with_flags(&buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
                if !matches!(sent, Ok(n) if n == owed) {
                    let _ = self.stream.shutdown(Shutdown::Both);
                }
            }
            drop(guard);
            if self.owed.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }
}

/// Why a connection is closed.
enum Close {
    /// The peer hung up, or a read or write failed.
    Io,
    /// The peer broke the protocol or a bound.
    Violation,
}

impl From<std::io::Error> for Close {
    fn from(_: std::io::Error) -> Self {
        Close::Io
    }
}

impl From<FrameError> for Close {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(_) => Close::Io,
            FrameError::TooLarge { .. } => Close::Violation,
        }
    }
}

type Key = Vec<u8>;

#[derive(Default)]
struct State {
    kv: HashMap<Key, Vec<u8>>,
    queues: HashMap<Key, VecDeque<Vec<u8>>>,
    /// Bytes of keys and values held (kv and queues).
    bytes: usize,
    /// Key → connections waiting for it (a connection once per time it named the key).
    waiting: HashMap<Key, Vec<u64>>,
    /// Connection → (keys it still waits for, the connection).
    awaited: HashMap<u64, (usize, Arc<Conn>)>,
}

impl State {
    fn exists(&self, k: &[u8]) -> bool {
        self.kv.contains_key(k) || self.queues.get(k).is_some_and(|q| !q.is_empty())
    }

    /// Stores `v` under `k` and wakes the connections waiting for it, if the total stays
    /// within `max_total`.
    fn put(&mut self, k: Key, v: Vec<u8>, max_total: usize, woken: &mut Vec<Arc<Conn>>) -> bool {
        let ok = self.put_quiet(&k, v, max_total);
        if ok {
            self.wake_all(&k, woken);
        }
        ok
    }

    /// Stores `v` under `k` without waking anyone, if the total stays within `max_total`.
    fn put_quiet(&mut self, k: &[u8], v: Vec<u8>, max_total: usize) -> bool {
        let old = self.kv.get(k).map_or(0, |o| k.len() + o.len());
        let new = self.bytes - old + k.len() + v.len();
        if new > max_total {
            return false;
        }
        self.bytes = new;
        self.kv.insert(k.to_vec(), v);
        true
    }

    fn remove(&mut self, k: &[u8]) -> bool {
        match self.kv.remove(k) {
            Some(v) => {
                self.bytes -= k.len() + v.len();
                true
            }
            None => false,
        }
    }

    /// Counts one arrival of `k` for every connection waiting for it.
    fn wake_all(&mut self, k: &[u8], woken: &mut Vec<Arc<Conn>>) {
        if let Some(ids) = self.waiting.remove(k) {
            for id in ids {
                self.arrived(id, woken);
            }
        }
    }

    /// Counts one arrival of `k` for the first connection waiting for it.
    fn wake_one(&mut self, k: &[u8], woken: &mut Vec<Arc<Conn>>) {
        let Some(ids) = self.waiting.get_mut(k) else {
            return;
        };
        let id = ids.remove(0);
        if ids.is_empty() {
            self.waiting.remove(k);
        }
        self.arrived(id, woken);
    }

    fn arrived(&mut self, id: u64, woken: &mut Vec<Arc<Conn>>) {
        if let Some((left, _)) = self.awaited.get_mut(&id) {
            *left = left.saturating_sub(1);
            if *left == 0
                && let Some((_, conn)) = self.awaited.remove(&id)
            {
                conn.owed.fetch_add(1, Ordering::SeqCst);
                woken.push(conn);
            }
        }
    }

    fn clear_wait(&mut self, id: u64) {
        if self.awaited.remove(&id).is_some() {
            self.waiting.retain(|_, ids| {
                ids.retain(|&i| i != id);
                !ids.is_empty()
            });
        }
    }

    /// Registers `conn` as waiting for `missing` (keys, with repeats as named).
    fn register_wait(&mut self, conn: &Arc<Conn>, missing: Vec<Key>) {
        self.clear_wait(conn.id);
        let n = missing.len();
        for k in missing {
            self.waiting.entry(k).or_default().push(conn.id);
        }
        self.awaited.insert(conn.id, (n, Arc::clone(conn)));
    }
}

impl TcpStoreServer {
    /// Listens on `addr` (`"0.0.0.0:29500"`, `"[::]:0"`, a [`SocketAddr`]; port 0 picks a free
    /// port, see [`TcpStoreServer::local_addr`]) with the default [`StoreLimits`].
    ///
    /// # Errors
    /// The address does not resolve, or cannot be bound (in use, not local).
    pub fn bind(addr: impl ToSocketAddrs) -> Result<TcpStoreServer, CommError> {
        TcpStoreServer::bind_with(addr, StoreLimits::default())
    }

    /// Serves the store of a job whose ranks meet at `master_host:port` (MASTER_ADDR,
    /// MASTER_PORT; port 0 picks a free one): on loopback when `master_host` is a loopback
    /// address or `localhost`, otherwise on every interface, IPv6 and IPv4 (`[::]`, else
    /// `0.0.0.0`), as torch's store does, since MASTER_ADDR may resolve to another local
    /// address (127.0.1.1) or name the machine through NAT.
    ///
    /// # Errors
    /// The port cannot be bound (in use); the error names each address tried.
    pub fn serve_for(master_host: &str, port: u16) -> Result<TcpStoreServer, CommError> {
        let host = master_host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return TcpStoreServer::bind((host, port));
        }
        TcpStoreServer::bind(("::", port)).or_else(|first| {
            TcpStoreServer::bind(("0.0.0.0", port)).map_err(|e| {
                CommError::Store(format!("on [::]:{port}: {first}; on 0.0.0.0:{port}: {e}"))
            })
        })
    }

    /// [`TcpStoreServer::bind`] with other bounds.
    ///
    /// # Errors
    /// The address does not resolve, or cannot be bound (in use, not local).
    pub fn bind_with(
        addr: impl ToSocketAddrs,
        limits: StoreLimits,
    ) -> Result<TcpStoreServer, CommError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| CommError::Store(format!("TCPStore server: bad address: {e}")))?
            .collect();
        let listener = TcpListener::bind(&addrs[..]).map_err(|e| {
            CommError::Store(format!("TCPStore server: cannot listen on {addrs:?}: {e}"))
        })?;
        let local = listener
            .local_addr()
            .and_then(|a| listener.set_nonblocking(true).map(|()| a))
            .map_err(|e| CommError::Store(format!("TCPStore server: {e}")))?;
        let shared = Arc::new(Shared {
            limits,
            stop: AtomicBool::new(false),
            listener,
            state: Mutex::new(State::default()),
            conns: Mutex::new(Conns::default()),
        });
        let s = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("tcpstore-accept".into())
            .spawn(move || accept_loop(&s))
            .map_err(|e| CommError::Store(format!("TCPStore server: spawn: {e}")))?;
        Ok(TcpStoreServer {
            addr: local,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on (with the port picked when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open connections (validated or not).
    pub fn num_connections(&self) -> usize {
        lock(&self.shared.conns).live.len()
    }

    /// Connections waiting for keys right now (a WAIT, or a client's blocking get).
    pub fn num_waiting(&self) -> usize {
        lock(&self.shared.state).awaited.len()
    }

    /// Stops accepting, closes every connection (their clients see the connection drop) and
    /// joins every thread. Dropping the server does the same.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes a poll on Linux; otherwise the accept thread notices within ACCEPT_POLL_MS.
        let _ = socket2::SockRef::from(&self.shared.listener).shutdown(Shutdown::Both);
        let _ = acceptor.join();
        let threads = {
            let mut conns = lock(&self.shared.conns);
            for c in conns.live.values() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>) {
    let fd = shared.listener.as_raw_fd();
    while !shared.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the listener this thread's `shared` keeps open.
        let ready = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if ready <= 0 {
            continue;
        }
        match shared.listener.accept() {
            Ok((stream, _)) => admit(shared, stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // Out of descriptors and the like: let connections close before trying again.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn admit(shared: &Arc<Shared>, stream: TcpStream) {
    let mut conns = lock(&shared.conns);
    conns.threads.retain(|t| !t.is_finished());
    if conns.live.len() >= shared.limits.max_connections
        || stream.set_nonblocking(false).is_err()
        || stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    conns.next_id += 1;
    let conn = Arc::new(Conn {
        id: conns.next_id,
        stream,
        write_lock: Mutex::new(()),
        owed: AtomicU32::new(0),
    });
    let (s, c) = (Arc::clone(shared), Arc::clone(&conn));
    let spawned = std::thread::Builder::new()
        .name("tcpstore-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || serve(&s, &c));
    if let Ok(t) = spawned {
        conns.live.insert(conn.id, conn);
        conns.threads.push(t);
    }
}

fn serve(shared: &Shared, conn: &Arc<Conn>) {
    let _ = session(shared, conn);
    lock(&shared.state).clear_wait(conn.id);
    // Out of the count before the peer sees the close, so that its reconnection fits.
    lock(&shared.conns).live.remove(&conn.id);
    let _ = conn.stream.shutdown(Shutdown::Both);
}

/// Serves one connection until it closes or breaks the protocol.
fn session(shared: &Shared, conn: &Arc<Conn>) -> Result<(), Close> {
    let mut r = BufReader::with_capacity(64 * 1024, &conn.stream);
    let validate_timeout = shared.limits.validate_timeout.max(Duration::from_millis(1));
    conn.stream.set_read_timeout(Some(validate_timeout))?;
    if read_u8(&mut r)? != query::VALIDATE || read_u32(&mut r)? != VALIDATION_MAGIC {
        return Err(Close::Violation);
    }
    conn.stream.set_read_timeout(None)?;
    loop {
        let q = read_u8(&mut r)?;
        request(shared, conn, &mut r, q)?;
    }
}

/// Reads a request's arguments, applies it, replies.
fn request(
    shared: &Shared,
    conn: &Arc<Conn>,
    r: &mut BufReader<&TcpStream>,
    q: u8,
) -> Result<(), Close> {
    let lim = &shared.limits;
    let key = |r: &mut BufReader<&TcpStream>| read_bytes(r, "key length", lim.max_key_len);
    let value = |r: &mut BufReader<&TcpStream>| read_bytes(r, "value length", lim.max_value_len);
    let keys = |r: &mut BufReader<&TcpStream>| -> Result<Vec<Key>, FrameError> {
        let n = read_count(r, "key count", lim.max_keys_per_request)?;
        (0..n).map(|_| key(r)).collect()
    };
    let mut woken = Vec::new();
    let mut out = Frame::reply();
    let outcome = match q {
        query::PING => {
            let nonce = read_u32(r)?;
            out.u32(nonce);
            Ok(())
        }
        query::SET => {
            let (k, v) = (key(r)?, value(r)?);
            let mut st = lock(&shared.state);
            ok_or_violation(st.put(k, v, lim.max_total_bytes, &mut woken))
        }
        query::COMPARE_SET => {
            let (k, expected, desired) = (key(r)?, value(r)?, value(r)?);
            let mut st = lock(&shared.state);
            match st.kv.get(&k) {
                None if expected.is_empty() => {
                    out.bytes(&desired);
                    ok_or_violation(st.put(k, desired, lim.max_total_bytes, &mut woken))
                }
                // torch answers the expected value when the key is missing ("lying", its
                // comment says): a caller comparing the answer with its desired value sees
                // that nothing was set.
                None => {
                    out.bytes(&expected);
                    Ok(())
                }
                Some(cur) if *cur == expected => {
                    out.bytes(&desired);
                    ok_or_violation(st.put(k, desired, lim.max_total_bytes, &mut woken))
                }
                Some(cur) => {
                    out.bytes(cur);
                    Ok(())
                }
            }
        }
        query::GET => {
            let k = key(r)?;
            let st = lock(&shared.state);
            // A missing key reads as empty (the libuv backend; the legacy one hangs up).
            out.bytes(st.kv.get(&k).map_or(&[][..], |v| &v[..]));
            Ok(())
        }
        query::ADD => {
            let (k, delta) = (key(r)?, read_i64(r)?);
            let mut st = lock(&shared.state);
            let old = match st.kv.get(&k) {
                Some(v) => parse_counter(v),
                None => Some(0),
            };
            match old.and_then(|o| o.checked_add(delta)) {
                Some(new) => {
                    out.i64(new);
                    let text = new.to_string().into_bytes();
                    ok_or_violation(st.put(k, text, lim.max_total_bytes, &mut woken))
                }
                None => Err(Close::Violation),
            }
        }
        query::CHECK => {
            let ks = keys(r)?;
            let st = lock(&shared.state);
            let ready = ks.iter().all(|k| st.exists(k));
            out.u8(if ready { CHECK_READY } else { CHECK_NOT_READY });
            Ok(())
        }
        query::WAIT => {
            let ks = keys(r)?;
            let mut st = lock(&shared.state);
            if ks.iter().all(|k| st.exists(k)) {
                out.u8(STOP_WAITING);
            } else {
                // Like torch: only keys absent from the map are awaited (a queue key with
                // items but no value is awaited as well: its next push or set ends the wait).
                let missing = ks.into_iter().filter(|k| !st.kv.contains_key(k)).collect();
                st.register_wait(conn, missing);
            }
            Ok(())
        }
        query::CANCEL_WAIT => {
            lock(&shared.state).clear_wait(conn.id);
            out.u8(WAIT_CANCELED);
            Ok(())
        }
        query::GETNUMKEYS => {
            out.i64(lock(&shared.state).kv.len() as i64);
            Ok(())
        }
        query::DELETE_KEY => {
            let k = key(r)?;
            out.i64(i64::from(lock(&shared.state).remove(&k)));
            Ok(())
        }
        query::APPEND => {
            let (k, more) = (key(r)?, value(r)?);
            let mut st = lock(&shared.state);
            let mut v = st.kv.get(&k).cloned().unwrap_or_default();
            if v.len() + more.len() > lim.max_value_len {
                Err(Close::Violation)
            } else {
                v.extend_from_slice(&more);
                ok_or_violation(st.put(k, v, lim.max_total_bytes, &mut woken))
            }
        }
        query::MULTI_GET => {
            let ks = keys(r)?;
            let st = lock(&shared.state);
            for k in &ks {
                out.bytes(st.kv.get(k).map_or(&[][..], |v| &v[..]));
            }
            Ok(())
        }
        query::MULTI_SET => {
            let n = read_count(r, "key count", lim.max_keys_per_request)?;
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                pairs.push((key(r)?, value(r)?));
            }
            let mut st = lock(&shared.state);
            // Applied in order; one over the total bound closes the connection, the earlier
            // ones stay.
            pairs.into_iter().try_for_each(|(k, v)| {
                ok_or_violation(st.put(k, v, lim.max_total_bytes, &mut woken))
            })
        }
        query::QUEUE_PUSH => {
            let (k, v) = (key(r)?, value(r)?);
            let mut st = lock(&shared.state);
            let add = v.len()
                + if st.queues.contains_key(&k) {
                    0
                } else {
                    k.len()
                };
            if st.bytes + add > lim.max_total_bytes {
                Err(Close::Violation)
            } else {
                st.bytes += add;
                st.queues.entry(k.clone()).or_default().push_back(v);
                st.wake_one(&k, &mut woken);
                Ok(())
            }
        }
        query::QUEUE_POP => {
            let k = key(r)?;
            let mut st = lock(&shared.state);
            let len = st.queues.get(&k).map_or(0, VecDeque::len);
            out.i64(len as i64);
            if let Some(q) = st.queues.get_mut(&k)
                && let Some(v) = q.pop_front()
            {
                let emptied = q.is_empty();
                st.bytes -= v.len();
                if emptied {
                    st.queues.remove(&k);
                    st.bytes -= k.len();
                }
                out.bytes(&v);
            }
            Ok(())
        }
        query::QUEUE_LEN => {
            let k = key(r)?;
            let st = lock(&shared.state);
            out.i64(st.queues.get(&k).map_or(0, VecDeque::len) as i64);
            Ok(())
        }
        query::LIST_KEYS => {
            let st = lock(&shared.state);
            out.i64(st.kv.len() as i64);
            for k in st.kv.keys() {
                out.bytes(k);
            }
            Ok(())
        }
        query::BARRIER => {
            let (k, world) = (key(r)?, read_i64(r)?);
            let mut st = lock(&shared.state);
            let count = match st.kv.get(&k) {
                Some(v) => parse_counter(v).and_then(|c| c.checked_add(1)),
                None => Some(1),
            };
            match count {
                None => Err(Close::Violation),
                Some(count) => {
                    let text = count.to_string().into_bytes();
                    // Like torch, only the last arrival wakes the earlier ones.
                    if !st.put_quiet(&k, text, lim.max_total_bytes) {
                        Err(Close::Violation)
                    } else if count >= world {
                        st.wake_all(&k, &mut woken);
                        out.u8(STOP_WAITING);
                        Ok(())
                    } else {
                        st.register_wait(conn, vec![k]);
                        Ok(())
                    }
                }
            }
        }
        // VALIDATE again, or unknown.
        _ => Err(Close::Violation),
    };
    for c in &woken {
        c.flush_owed();
    }
    outcome?;
    if !out.0.is_empty() {
        conn.reply(&out.0)?;
    }
    Ok(())
}

fn ok_or_violation(ok: bool) -> Result<(), Close> {
    if ok { Ok(()) } else { Err(Close::Violation) }
}
