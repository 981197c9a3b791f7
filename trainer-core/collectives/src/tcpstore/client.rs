//! [`TcpStoreClient`]: a blocking client of a c10d TCPStore (torch's or [`super::TcpStoreServer`]).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::wire::{
    CHECK_NOT_READY, CHECK_READY, Frame, FrameError, STOP_WAITING, VALIDATION_MAGIC, WAIT_CANCELED,
    query, read_bytes, read_i64, read_u8,
};
use super::{MAX_KEY_LEN, MAX_KEYS_PER_REQUEST, MAX_TOTAL_BYTES, MAX_VALUE_LEN};
use crate::CommError;
use crate::store::Store;

/// First pause between connection attempts; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// The longest a connected peer gets to answer the PING of the handshake.
const PING_TIMEOUT_MAX: Duration = Duration::from_secs(10);
/// The longest one TCP connect may take before it is retried.
const CONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(5);

/// How a [`TcpStoreClient`] connects and how long it waits.
#[derive(Debug, Clone)]
pub struct TcpStoreOptions {
    /// How long [`TcpStoreClient::connect`] (and a reconnection after a lost connection) keeps
    /// trying while nothing answers, with pauses of 50 ms doubling to 1 s.
    pub connect_timeout: Duration,
    /// How long a reply may take (every operation but the waiting in `get`/`wait`, which take
    /// their own timeout); also bounds the PING of the handshake (at most 10 s).
    pub timeout: Duration,
    /// A prefix joined to every key as torch's `PrefixStore` joins it: `"{prefix}/{key}"`.
    /// Nested prefix stores `PrefixStore(a, PrefixStore(b, store))` are the prefix `"b/a"`.
    pub prefix: Option<String>,
}

impl Default for TcpStoreOptions {
    /// torch's defaults: 300 s for both timeouts, no prefix.
    fn default() -> Self {
        TcpStoreOptions {
            connect_timeout: Duration::from_secs(300),
            timeout: Duration::from_secs(300),
            prefix: None,
        }
    }
}

impl TcpStoreOptions {
    /// Sets [`TcpStoreOptions::connect_timeout`].
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets [`TcpStoreOptions::timeout`].
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets [`TcpStoreOptions::prefix`].
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }
}

/// A blocking client of a c10d TCPStore. Keys are sent as torch's `TCPStore` sends them: `"/"`,
/// then the prefix and `"/"` if any, then the key; so `set("k")` here and `store.set("k")` in a
/// torch process (with the same `PrefixStore`) name the same entry.
///
/// One connection, behind a mutex: calls from several threads take turns, and a waiting `get`
/// holds the others up (as in torch). After an I/O error or a reply that breaks the protocol
/// the connection is dropped and the next call reconnects.
#[derive(Debug)]
pub struct TcpStoreClient {
    addr: String,
    opts: TcpStoreOptions,
    conn: Mutex<Option<TcpStream>>,
}

/// Why one operation failed.
enum OpError {
    /// The connection is unusable (I/O error, no reply in time, protocol broken).
    Lost(String),
    /// The awaited keys did not appear in time; the wait was cancelled and the connection is
    /// fine.
    WaitTimeout,
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        OpError::Lost(match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no reply in time".into(),
            io::ErrorKind::UnexpectedEof => "connection closed by the store".into(),
            _ => e.to_string(),
        })
    }
}

impl From<FrameError> for OpError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => e.into(),
            other => OpError::Lost(format!("bad reply: {other}")),
        }
    }
}

/// Why one connection attempt failed.
enum Attempt {
    /// Worth another try (refused, reset, closed during the handshake).
    Retry(String),
    /// Not (fixed by) waiting: a peer that is not a TCPStore, a malformed address.
    Fatal(CommError),
}

impl TcpStoreClient {
    /// Connects to the store at `addr` (`"host:port"`), retrying until
    /// `opts.connect_timeout`, then VALIDATEs and PINGs it.
    ///
    /// # Errors
    /// Nothing accepted the connection in time (the error names the address and how long it
    /// tried); the peer is not a TCPStore (no or a wrong answer to the PING); `addr` is
    /// malformed.
    pub fn connect(addr: &str, opts: TcpStoreOptions) -> Result<TcpStoreClient, CommError> {
        let stream = open(addr, &opts)?;
        Ok(TcpStoreClient {
            addr: addr.to_owned(),
            opts,
            conn: Mutex::new(Some(stream)),
        })
    }

    /// The address it connects to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sets `key` (overwrites).
    ///
    /// # Errors
    /// Key or value over the bounds ([`MAX_KEY_LEN`], [`MAX_VALUE_LEN`]); the store cannot be
    /// reached.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let k = self.wire_key(key)?;
        check_value(value)?;
        self.op("set", |s| {
            send(s, Frame::query(query::SET).bytes(&k).bytes(value))?;
            Ok(())
        })
    }

    /// Waits up to `timeout` for `key`, then reads it (WAIT then GET, as torch's client does).
    ///
    /// # Errors
    /// The key did not appear in time (the error names it and the timeout); the store cannot be
    /// reached.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        let k = self.wire_key(key)?;
        self.op_waiting("get", &[key], timeout, |s| {
            wait(s, std::slice::from_ref(&k), timeout)?;
            send(s, Frame::query(query::GET).bytes(&k))?;
            Ok(read_bytes(s, "value length", MAX_TOTAL_BYTES)?)
        })
    }

    /// Waits up to `timeout` until every key of `keys` is set.
    ///
    /// # Errors
    /// Not all appeared in time (the error names them and the timeout); the store cannot be
    /// reached.
    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), CommError> {
        let ks = self.wire_keys(keys)?;
        self.op_waiting("wait", keys, timeout, |s| wait(s, &ks, timeout))
    }

    /// Adds `delta` to the integer at `key` (absent counts as 0; stored as decimal text, as
    /// torch does) and returns the new value.
    ///
    /// # Errors
    /// The store cannot be reached, or closed the connection (the value there is not an integer,
    /// or the sum overflows).
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, CommError> {
        let k = self.wire_key(key)?;
        self.op("add", |s| {
            send(s, Frame::query(query::ADD).bytes(&k).i64(delta))?;
            Ok(read_i64(s)?)
        })
    }

    /// Sets `key` to `desired` if it holds `expected`, or if it is absent and `expected` is
    /// empty; returns the value then held. torch's quirk: when the key is absent and `expected`
    /// is not empty, nothing is set and the answer is `expected`.
    ///
    /// # Errors
    /// Bounds as for [`TcpStoreClient::set`]; the store cannot be reached.
    pub fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, CommError> {
        let k = self.wire_key(key)?;
        check_value(expected)?;
        check_value(desired)?;
        self.op("compare_set", |s| {
            let mut f = Frame::query(query::COMPARE_SET);
            send(s, f.bytes(&k).bytes(expected).bytes(desired))?;
            Ok(read_bytes(s, "value length", MAX_TOTAL_BYTES)?)
        })
    }

    /// Whether every key of `keys` is set (no waiting).
    ///
    /// # Errors
    /// The store cannot be reached.
    pub fn check(&self, keys: &[&str]) -> Result<bool, CommError> {
        let ks = self.wire_keys(keys)?;
        self.op("check", |s| {
            let mut f = Frame::query(query::CHECK);
            f.u64(ks.len() as u64);
            for k in &ks {
                f.bytes(k);
            }
            send(s, &f)?;
            match read_u8(s)? {
                CHECK_READY => Ok(true),
                CHECK_NOT_READY => Ok(false),
                b => Err(OpError::Lost(format!("bad reply {b} to CHECK"))),
            }
        })
    }

    /// Deletes `key`; whether it existed.
    ///
    /// # Errors
    /// The store cannot be reached.
    pub fn delete(&self, key: &str) -> Result<bool, CommError> {
        let k = self.wire_key(key)?;
        self.op("delete", |s| {
            send(s, Frame::query(query::DELETE_KEY).bytes(&k))?;
            Ok(read_i64(s)? == 1)
        })
    }

    /// Keys in the whole store (every prefix, and torch's own keys).
    ///
    /// # Errors
    /// The store cannot be reached.
    pub fn num_keys(&self) -> Result<i64, CommError> {
        self.op("num_keys", |s| {
            send(s, &Frame::query(query::GETNUMKEYS))?;
            Ok(read_i64(s)?)
        })
    }

    /// Appends `value` to `key` (creates it if absent).
    ///
    /// # Errors
    /// Bounds as for [`TcpStoreClient::set`]; the store cannot be reached.
    pub fn append(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let k = self.wire_key(key)?;
        check_value(value)?;
        self.op("append", |s| {
            send(s, Frame::query(query::APPEND).bytes(&k).bytes(value))?;
            Ok(())
        })
    }

    /// Waits up to `timeout` for all `keys`, then reads them in one request.
    ///
    /// # Errors
    /// Not all appeared in time; the store cannot be reached.
    pub fn multi_get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>, CommError> {
        let ks = self.wire_keys(keys)?;
        self.op_waiting("multi_get", keys, timeout, |s| {
            wait(s, &ks, timeout)?;
            let mut f = Frame::query(query::MULTI_GET);
            f.u64(ks.len() as u64);
            for k in &ks {
                f.bytes(k);
            }
            send(s, &f)?;
            (0..ks.len())
                .map(|_| Ok(read_bytes(s, "value length", MAX_TOTAL_BYTES)?))
                .collect()
        })
    }

    /// Sets several keys in one request.
    ///
    /// # Errors
    /// Over the bounds (keys, values, [`MAX_KEYS_PER_REQUEST`]); the store cannot be reached.
    pub fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), CommError> {
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
        let ks = self.wire_keys(&keys)?;
        let mut f = Frame::query(query::MULTI_SET);
        f.u64(ks.len() as u64);
        for (k, (_, v)) in ks.iter().zip(pairs) {
            check_value(v)?;
            f.bytes(k).bytes(v);
        }
        self.op("multi_set", |s| {
            send(s, &f)?;
            Ok(())
        })
    }

    /// The keys under this client's prefix (without it), in no particular order. Keys that do
    /// not start with `"/"` (not written through a torch-style client) are left out.
    ///
    /// # Errors
    /// The store cannot be reached (or is torch's legacy server of an older release, which
    /// lacks LIST_KEYS and hangs up).
    pub fn list_keys(&self) -> Result<Vec<String>, CommError> {
        let head = self.wire_key("")?;
        self.op("list_keys", |s| {
            send(s, &Frame::query(query::LIST_KEYS))?;
            let n = read_i64(s)?;
            let mut out = Vec::new();
            for _ in 0..n.max(0) {
                let k = read_bytes(s, "key length", MAX_TOTAL_BYTES)?;
                if let Some(rest) = k.strip_prefix(&head[..]) {
                    out.push(String::from_utf8_lossy(rest).into_owned());
                }
            }
            Ok(out)
        })
    }

    /// Pushes `value` to the queue `key`.
    ///
    /// # Errors
    /// Bounds as for [`TcpStoreClient::set`]; the store cannot be reached (torch's legacy
    /// server has no queues and hangs up).
    pub fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let k = self.wire_key(key)?;
        check_value(value)?;
        self.op("queue_push", |s| {
            send(s, Frame::query(query::QUEUE_PUSH).bytes(&k).bytes(value))?;
            Ok(())
        })
    }

    /// Pops the oldest item of the queue `key`: `None` if it is empty.
    ///
    /// # Errors
    /// The store cannot be reached.
    pub fn queue_pop(&self, key: &str) -> Result<Option<Vec<u8>>, CommError> {
        let k = self.wire_key(key)?;
        self.op("queue_pop", |s| {
            send(s, Frame::query(query::QUEUE_POP).bytes(&k))?;
            if read_i64(s)? <= 0 {
                return Ok(None);
            }
            Ok(Some(read_bytes(s, "value length", MAX_TOTAL_BYTES)?))
        })
    }

    /// Items in the queue `key`.
    ///
    /// # Errors
    /// The store cannot be reached.
    pub fn queue_len(&self, key: &str) -> Result<i64, CommError> {
        let k = self.wire_key(key)?;
        self.op("queue_len", |s| {
            send(s, Frame::query(query::QUEUE_LEN).bytes(&k))?;
            Ok(read_i64(s)?)
        })
    }

    /// torch's `Store.barrier`: counts this caller in at `key` and waits up to `timeout` until
    /// `world_size` callers have.
    ///
    /// # Errors
    /// Not all arrived in time (the error names the key); the store cannot be reached.
    pub fn barrier(&self, key: &str, world_size: i64, timeout: Duration) -> Result<(), CommError> {
        let k = self.wire_key(key)?;
        self.op_waiting("barrier", &[key], timeout, |s| {
            send(s, Frame::query(query::BARRIER).bytes(&k).i64(world_size))?;
            await_stop(s, timeout)
        })
    }

    /// The key as sent: `"/"`, the prefix and `"/"` if any, the key.
    fn wire_key(&self, key: &str) -> Result<Vec<u8>, CommError> {
        let mut k = String::with_capacity(1 + key.len());
        k.push('/');
        if let Some(p) = &self.opts.prefix {
            k.push_str(p);
            k.push('/');
        }
        k.push_str(key);
        if k.len() > MAX_KEY_LEN {
            return Err(CommError::InvalidArgument(format!(
                "TCPStore key '{}…' is {} bytes, over the limit of {MAX_KEY_LEN}",
                key.chars().take(40).collect::<String>(),
                k.len()
            )));
        }
        Ok(k.into_bytes())
    }

    fn wire_keys(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, CommError> {
        if keys.len() > MAX_KEYS_PER_REQUEST {
            return Err(CommError::InvalidArgument(format!(
                "{} TCPStore keys in one request, over the limit of {MAX_KEYS_PER_REQUEST}",
                keys.len()
            )));
        }
        keys.iter().map(|k| self.wire_key(k)).collect()
    }

    fn lock(&self) -> MutexGuard<'_, Option<TcpStream>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the connection (reconnecting first if an earlier call lost it).
    fn op<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut TcpStream) -> Result<T, OpError>,
    ) -> Result<T, CommError> {
        self.op_waiting(name, &[], Duration::ZERO, f)
    }

    fn op_waiting<T>(
        &self,
        name: &str,
        keys: &[&str],
        timeout: Duration,
        f: impl FnOnce(&mut TcpStream) -> Result<T, OpError>,
    ) -> Result<T, CommError> {
        let mut guard = self.lock();
        let stream = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(open(&self.addr, &self.opts)?),
        };
        match f(stream) {
            Ok(v) => Ok(v),
            Err(OpError::WaitTimeout) => Err(CommError::Store(match keys {
                [k] => format!(
                    "key '{k}' not set within {timeout:?} (TCPStore at {})",
                    self.addr
                ),
                ks => format!(
                    "keys {ks:?} not all set within {timeout:?} (TCPStore at {})",
                    self.addr
                ),
            })),
            Err(OpError::Lost(why)) => {
                *guard = None;
                Err(CommError::Store(format!(
                    "TCPStore at {}: {name} failed: {why}",
                    self.addr
                )))
            }
        }
    }
}

impl Store for TcpStoreClient {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        TcpStoreClient::set(self, key, value)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        TcpStoreClient::get(self, key, timeout)
    }
}

fn check_value(v: &[u8]) -> Result<(), CommError> {
    if v.len() > MAX_VALUE_LEN {
        return Err(CommError::InvalidArgument(format!(
            "TCPStore value of {} bytes, over the limit of {MAX_VALUE_LEN}",
            v.len()
        )));
    }
    Ok(())
}

fn send(s: &mut TcpStream, f: &Frame) -> io::Result<()> {
    s.write_all(&f.0)
}

/// WAIT for `keys` up to `timeout`; on timeout CANCEL_WAIT, as torch's client does, so the
/// connection stays usable.
fn wait(s: &mut TcpStream, keys: &[Vec<u8>], timeout: Duration) -> Result<(), OpError> {
    let mut f = Frame::query(query::WAIT);
    f.u64(keys.len() as u64);
    for k in keys {
        f.bytes(k);
    }
    send(s, &f)?;
    await_stop(s, timeout)
}

/// Reads the STOP_WAITING of a WAIT or BARRIER, or cancels it after `timeout`.
fn await_stop(s: &mut TcpStream, timeout: Duration) -> Result<(), OpError> {
    if readable_within(s, timeout)? {
        return match read_u8(s)? {
            STOP_WAITING => Ok(()),
            b => Err(OpError::Lost(format!("bad reply {b} to WAIT"))),
        };
    }
    send(s, &Frame::query(query::CANCEL_WAIT))?;
    match read_u8(s)? {
        WAIT_CANCELED => Err(OpError::WaitTimeout),
        // The wait ended before the cancel arrived (the keys were there, the answer was on its
        // way): a success, unlike in torch's client; the cancel's answer follows.
        STOP_WAITING => match read_u8(s)? {
            WAIT_CANCELED => Ok(()),
            b => Err(OpError::Lost(format!("bad reply {b} to CANCEL_WAIT"))),
        },
        b => Err(OpError::Lost(format!("bad reply {b} to CANCEL_WAIT"))),
    }
}

/// Whether `s` has something to read (or hit EOF) within `timeout`.
fn readable_within(s: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a socket `s` keeps open.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(true);
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// Connects, retrying until `opts.connect_timeout`, and does the handshake.
fn open(addr: &str, opts: &TcpStoreOptions) -> Result<TcpStream, CommError> {
    let start = Instant::now();
    let deadline = start + opts.connect_timeout;
    let mut pause = RETRY_FIRST;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let why = match attempt(addr, opts, deadline) {
            Ok(s) => return Ok(s),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(why)) => why,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(CommError::Store(format!(
                "no TCPStore answered at {addr}: tried for {:.1?} ({attempts} attempts); last \
                 error: {why}",
                now - start
            )));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(RETRY_MAX);
    }
}

fn attempt(addr: &str, opts: &TcpStoreOptions, deadline: Instant) -> Result<TcpStream, Attempt> {
    let addrs: Vec<_> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        // No port, bad syntax: waiting will not help. A name that does not resolve (yet) may.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return Err(Attempt::Fatal(CommError::InvalidArgument(format!(
                "TCPStore address '{addr}': {e}"
            ))));
        }
        Err(e) => return Err(Attempt::Retry(format!("resolving {addr}: {e}"))),
    };
    let mut last = format!("{addr} resolves to no address");
    for sa in addrs {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), CONNECT_ATTEMPT_MAX);
        match TcpStream::connect_timeout(&sa, left) {
            Ok(s) => return handshake(s, addr, opts),
            Err(e) => last = format!("{sa}: {e}"),
        }
    }
    Err(Attempt::Retry(last))
}

/// VALIDATE, then PING with a nonce that must come back.
fn handshake(mut s: TcpStream, addr: &str, opts: &TcpStoreOptions) -> Result<TcpStream, Attempt> {
    let retry = |e: io::Error| Attempt::Retry(format!("{addr}: handshake: {e}"));
    let reply_timeout = opts.timeout.max(Duration::from_millis(1));
    s.set_nodelay(true).map_err(retry)?;
    s.set_read_timeout(Some(reply_timeout)).map_err(retry)?;
    s.set_write_timeout(Some(reply_timeout)).map_err(retry)?;
    let nonce = nonce();
    let mut f = Frame::query(query::VALIDATE);
    f.u32(VALIDATION_MAGIC).u8(query::PING).u32(nonce);
    send(&mut s, &f).map_err(retry)?;
    let ping_timeout = opts.timeout.min(PING_TIMEOUT_MAX);
    let not_a_store = |what: String| {
        Attempt::Fatal(CommError::Store(format!(
            "{addr} is not a PyTorch/Ringmaster TCPStore ({what})"
        )))
    };
    if !readable_within(&s, ping_timeout).map_err(retry)? {
        return Err(not_a_store(format!(
            "no answer to PING within {ping_timeout:?}"
        )));
    }
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match s.read(&mut b[got..]) {
            // Closed before answering: a store over its connection limit does that too.
            Ok(0) => return Err(retry(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(not_a_store(format!(
                    "an incomplete answer to PING within {reply_timeout:?}"
                )));
            }
            Err(e) => return Err(retry(e)),
        }
    }
    let answer = u32::from_le_bytes(b);
    if answer != nonce {
        return Err(not_a_store(format!(
            "PING answered {answer:#010x} instead of the nonce {nonce:#010x}"
        )));
    }
    Ok(s)
}

/// A nonce for PING: the process id mixed with the clock.
fn nonce() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id().rotate_left(16) ^ t ^ 0x5bd1_e995
}
