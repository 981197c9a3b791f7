//! A key-value store on PyTorch's c10d TCPStore wire protocol: a blocking client
//! ([`TcpStoreClient`]) and a blocking server ([`TcpStoreServer`]), std::net and threads.
//!
//! Why torch's protocol: under `torchrun` / `accelerate launch` the port MASTER_ADDR:MASTER_PORT
//! is torch's own TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`) and the trainer must be its
//! client; with no torch launcher Ringmaster serves the store, and torch processes
//! (`init_process_group("env://")`) may connect to it.
//!
//! # Sources
//!
//! Read (not copied) from PyTorch: the torch 2.15.0 wheel (git `d0f2af8b66b2`), headers
//! `torch/csrc/distributed/c10d/store/TCPStoreBackend.hpp` (query codes, magic),
//! `Utils.hpp` (`SizeType = uint64_t`, raw host-order integers), `TCPStore.hpp` (`keyPrefix_ =
//! "/"`), and its Python `torch/distributed/rendezvous.py` and `distributed_c10d.py`; the
//! pytorch/pytorch sources `torch/csrc/distributed/c10d/store/TCPStoreBackend.cpp` (commit
//! `16c9a182`), `store/TCPStoreLibUvBackend.cpp` (`3ed60b01`), `TCPStore.cpp` (the client with
//! VALIDATE, PING, queues, LIST_KEYS, BARRIER) and `PrefixStore.cpp`. The interop tests
//! (`tests/tcpstore_torch.rs`) run both directions against a real torch.
//!
//! # Wire format
//!
//! Integers are fixed-width little-endian (torch sends them raw in host order; every platform
//! it runs on is little-endian). A *string* is a u64 length then that many bytes (keys and
//! values alike; no terminator, any bytes). A request is one query byte then its arguments;
//! requests on one connection are answered in order; some have no answer.
//!
//! | code | query        | arguments                         | answer                              |
//! |------|--------------|-----------------------------------|-------------------------------------|
//! | 0    | VALIDATE     | u32 magic `0x3C85F7CE`            | none (must be the first request)    |
//! | 1    | SET          | key, value                        | none                                |
//! | 2    | COMPARE_SET  | key, expected, desired            | string: the value now held (*)      |
//! | 3    | GET          | key                               | string (empty if absent, as libuv)  |
//! | 4    | ADD          | key, i64 delta                    | i64 new value (stored as decimal)   |
//! | 5    | CHECK        | u64 n, n keys                     | u8: 0 READY, 1 NOT_READY            |
//! | 6    | WAIT         | u64 n, n keys                     | u8 0 STOP_WAITING once all are set  |
//! | 7    | GETNUMKEYS   |                                   | i64                                 |
//! | 8    | DELETE_KEY   | key                               | i64 keys deleted (0 or 1)           |
//! | 9    | APPEND       | key, bytes                        | none                                |
//! | 10   | MULTI_GET    | u64 n, n keys                     | n strings                           |
//! | 11   | MULTI_SET    | u64 n, n × (key, value)           | none                                |
//! | 12   | CANCEL_WAIT  |                                   | u8 1 WAIT_CANCELED                  |
//! | 13   | PING         | u32 nonce                         | u32 the same nonce                  |
//! | 14   | QUEUE_PUSH   | key, value                        | none                                |
//! | 15   | QUEUE_POP    | key                               | i64 length before; if > 0, string   |
//! | 16   | QUEUE_LEN    | key                               | i64                                 |
//! | 17   | LIST_KEYS    |                                   | i64 n, n strings                    |
//! | 18   | BARRIER      | key, i64 world size               | u8 0 STOP_WAITING once world arrive |
//!
//! (*) COMPARE_SET: if the key holds `expected`, or is absent and `expected` is empty, it is
//! set to `desired`; the answer is the value then held, except that for an absent key and a
//! non-empty `expected` nothing is set and the answer is `expected` (torch's quirk, kept).
//!
//! WAIT counts the keys absent at the time (a key set, then deleted, counted once); every
//! SET, ADD, APPEND, MULTI_SET or COMPARE_SET that stores an awaited key counts it, a
//! QUEUE_PUSH counts it for one waiter. The waiting client sends nothing but CANCEL_WAIT; if
//! the keys arrive just before the cancel it reads STOP_WAITING then WAIT_CANCELED. BARRIER
//! increments the decimal counter at the key; the last arrival wakes the earlier ones.
//! CHECK and WAIT count a key as present when it has a value or a non-empty queue.
//!
//! The client sends every key as torch's `TCPStore` does: `"/"` + key, and with a
//! [`TcpStoreOptions::prefix`] `"/"` + prefix + `"/"` + key (`PrefixStore` joins
//! `prefix + "/" + key`, then the TCPStore adds `"/"`). What torch processes use: `init_process_group`
//! wraps the store in `PrefixStore("default_pg", …)` (wire keys `/default_pg/…`); torch ≤ 2.3
//! under an elastic agent wrapped the agent store in `PrefixStore("/worker/attempt_{N}", …)`
//! (`//worker/attempt_N/…`); torch 2.15 no longer does. The server stores the wire keys as
//! they come.
//!
//! Where torch's two servers differ, this one follows the libuv one (torch's default since
//! 2.4): GET of an absent key answers an empty string (the legacy server hangs up), queues
//! exist (the legacy server hangs up on them), COMPARE_SET wakes waiters. A non-integer value
//! under ADD or BARRIER, or an overflowing sum, closes the connection (torch's `stoll` throws
//! and closes it too).
//!
//! # Bounds
//!
//! The server is a network service; a request over a bound closes that connection (no reply,
//! nothing logged, other connections unaffected): [`MAX_KEY_LEN`], [`MAX_VALUE_LEN`] (also
//! the size an APPEND may grow a value to), [`MAX_KEYS_PER_REQUEST`], [`MAX_TOTAL_BYTES`]
//! (keys and values held), [`MAX_CONNECTIONS`] (a connection over it is closed at once),
//! [`VALIDATE_TIMEOUT`] (to send the first request).
//! [`StoreLimits`] changes them. (torch's libuv server allows 8 KiB keys, 8 MiB values,
//! 128 Ki keys per request.) Validated connections have no read timeout: a client may wait for
//! keys as long as it likes, and one that stops halfway through a request holds up only its own
//! connection's thread.

mod client;
mod server;
mod wire;

pub use client::{TcpStoreClient, TcpStoreOptions};
pub use server::TcpStoreServer;

use std::time::Duration;

/// Longest key, in bytes (as sent: with the `"/"` and the prefix).
pub const MAX_KEY_LEN: usize = 4 * 1024;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024 * 1024;
/// Most keys in one CHECK, WAIT, MULTI_GET or MULTI_SET.
pub const MAX_KEYS_PER_REQUEST: usize = 4096;
/// Most bytes of keys and values a server holds.
pub const MAX_TOTAL_BYTES: usize = 1024 * 1024 * 1024;
/// Most open connections to a server.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a new connection has to send its VALIDATE (torch's clients send it at once); a
/// silent one is closed, so idle scanners do not hold connection slots.
pub const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The bounds a [`TcpStoreServer`] enforces; [`Default`] is the `MAX_*` constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_key_len: usize,
    pub max_value_len: usize,
    pub max_keys_per_request: usize,
    pub max_total_bytes: usize,
    pub max_connections: usize,
    pub validate_timeout: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_key_len: MAX_KEY_LEN,
            max_value_len: MAX_VALUE_LEN,
            max_keys_per_request: MAX_KEYS_PER_REQUEST,
            max_total_bytes: MAX_TOTAL_BYTES,
            max_connections: MAX_CONNECTIONS,
            validate_timeout: VALIDATE_TIMEOUT,
        }
    }
}
