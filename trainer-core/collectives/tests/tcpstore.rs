//! The TCPStore client against the TCPStore server (and against peers that are not stores).
//! Every test is bounded: timeouts of at most a few seconds, sleeps of at most ~0.5 s.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringmaster_collectives::tcpstore::{MAX_KEY_LEN, MAX_KEYS_PER_REQUEST, MAX_VALUE_LEN};
use ringmaster_collectives::{
    CommError, Store, StoreLimits, TcpStoreClient, TcpStoreOptions, TcpStoreServer,
};

const SECOND: Duration = Duration::from_secs(1);

/// Polls `f` until it holds, failing after 5 s with `what`.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + 5 * SECOND;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn opts() -> TcpStoreOptions {
    TcpStoreOptions::default()
        .with_connect_timeout(2 * SECOND)
        .with_timeout(5 * SECOND)
}

fn server() -> TcpStoreServer {
    TcpStoreServer::bind("127.0.0.1:0").unwrap()
}

fn client(s: &TcpStoreServer) -> TcpStoreClient {
    TcpStoreClient::connect(&s.local_addr().to_string(), opts()).unwrap()
}

/// A port nothing listens on (just freed).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A raw connection that has sent VALIDATE.
fn raw(s: &TcpStoreServer) -> TcpStream {
    let mut c = TcpStream::connect(s.local_addr()).unwrap();
    let mut f = vec![0u8];
    f.extend_from_slice(&0x3C85_F7CEu32.to_le_bytes());
    c.write_all(&f).unwrap();
    c
}

fn string(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

/// Whether the server closed `c` within `within` (EOF or reset), rather than staying silent.
fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn every_operation() {
    let s = server();
    let c = client(&s);
    c.set("a", b"1").unwrap();
    assert_eq!(c.get("a", SECOND).unwrap(), b"1");
    c.set("a", b"").unwrap();
    assert_eq!(c.get("a", SECOND).unwrap(), b"", "empty values exist");

    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -7).unwrap(), -2);
    assert_eq!(
        c.get("n", SECOND).unwrap(),
        b"-2",
        "counters are decimal text"
    );

    // compare_set: match, mismatch, absent + empty expected, absent + non-empty expected.
    c.set("cs", b"old").unwrap();
    assert_eq!(c.compare_set("cs", b"old", b"new").unwrap(), b"new");
    assert_eq!(c.compare_set("cs", b"old", b"newer").unwrap(), b"new");
    assert_eq!(c.compare_set("fresh", b"", b"v").unwrap(), b"v");
    assert_eq!(c.get("fresh", SECOND).unwrap(), b"v");
    assert_eq!(c.compare_set("absent", b"e", b"d").unwrap(), b"e");
    assert!(
        !c.check(&["absent"]).unwrap(),
        "nothing set for a missing key"
    );

    assert!(c.check(&["a", "n", "cs"]).unwrap());
    assert!(!c.check(&["a", "zz"]).unwrap());
    assert!(c.check(&[]).unwrap());
    c.wait(&["a", "n"], SECOND).unwrap();

    assert!(c.delete("a").unwrap());
    assert!(!c.delete("a").unwrap());
    assert!(!c.check(&["a"]).unwrap());

    c.append("log", b"ab").unwrap();
    c.append("log", b"cd").unwrap();
    assert_eq!(c.get("log", SECOND).unwrap(), b"abcd");

    c.multi_set(&[("m1", b"x"), ("m2", b"yy")]).unwrap();
    assert_eq!(
        c.multi_get(&["m1", "m2", "n"], SECOND).unwrap(),
        vec![b"x".to_vec(), b"yy".to_vec(), b"-2".to_vec()]
    );

    let mut keys = c.list_keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["cs", "fresh", "log", "m1", "m2", "n"]);
    assert_eq!(c.num_keys().unwrap(), 6);

    assert_eq!(c.queue_len("q").unwrap(), 0);
    assert_eq!(c.queue_pop("q").unwrap(), None);
    c.queue_push("q", b"first").unwrap();
    c.queue_push("q", b"second").unwrap();
    assert_eq!(c.queue_len("q").unwrap(), 2);
    assert!(
        c.check(&["q"]).unwrap(),
        "a non-empty queue counts as present"
    );
    assert_eq!(c.queue_pop("q").unwrap().unwrap(), b"first");
    assert_eq!(c.queue_pop("q").unwrap().unwrap(), b"second");
    assert_eq!(c.queue_pop("q").unwrap(), None);
    assert_eq!(c.num_keys().unwrap(), 6, "queues are not keys");

    c.barrier("solo", 1, SECOND).unwrap();

    // Prefixes: joined as torch's PrefixStore joins them, then "/" as TCPStore adds.
    let p = TcpStoreClient::connect(
        &s.local_addr().to_string(),
        opts().with_prefix("default_pg"),
    )
    .unwrap();
    p.set("k", b"pv").unwrap();
    assert_eq!(c.get("default_pg/k", SECOND).unwrap(), b"pv");
    assert!(!p.check(&["n"]).unwrap(), "a prefix scopes keys");
    assert_eq!(p.list_keys().unwrap(), ["k"]);
}

#[test]
fn the_store_trait() {
    let s = server();
    let c = client(&s);
    let st: &dyn Store = &c;
    st.set("a/b", b"1").unwrap();
    assert_eq!(st.get("a/b", Duration::ZERO).unwrap(), b"1");
    let err = st.get("missing", Duration::from_millis(20)).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn get_waits_for_a_later_set_without_blocking_others() {
    let s = server();
    let waiter = client(&s);
    let setter = client(&s);
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        (waiter.get("late", 5 * SECOND), start.elapsed())
    });
    wait_until("the getter to wait", || s.num_waiting() == 1);
    // The waiting connection holds up no one else.
    let start = Instant::now();
    for i in 0..20 {
        setter.set(&format!("other{i}"), b"x").unwrap();
        assert_eq!(setter.add("count", 1).unwrap(), i + 1);
    }
    assert!(start.elapsed() < 3 * SECOND, "{:?}", start.elapsed());
    setter.set("late", b"here").unwrap();
    let (got, waited) = t.join().unwrap();
    // It returned the value set after the others' calls: it was waiting through them.
    assert_eq!(got.unwrap(), b"here");
    assert!(waited < 3 * SECOND, "{waited:?}");
}

#[test]
fn wait_counts_keys_set_by_any_write() {
    let s = server();
    let w = client(&s);
    let c = client(&s);
    c.set("already", b"1").unwrap();
    let t = std::thread::spawn(move || {
        w.wait(&["already", "by_add", "by_append", "by_cs"], 5 * SECOND)
    });
    wait_until("the waiter to wait", || s.num_waiting() == 1);
    c.add("by_add", 1).unwrap();
    c.append("by_append", b"x").unwrap();
    c.compare_set("by_cs", b"", b"y").unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn get_timeout_names_key_and_leaves_the_connection_usable() {
    let s = server();
    let c = client(&s);
    let start = Instant::now();
    let err = c.get("never", Duration::from_millis(150)).unwrap_err();
    let took = start.elapsed();
    let msg = err.to_string();
    assert!(msg.contains("'never'") && msg.contains("150ms"), "{msg}");
    assert!(msg.contains(&s.local_addr().to_string()), "{msg}");
    assert!(
        took >= Duration::from_millis(150) && took < 3 * SECOND,
        "{took:?}"
    );
    // Same connection (CANCEL_WAIT, not a reconnect): the server still sees one.
    c.set("after", b"ok").unwrap();
    assert_eq!(c.get("after", SECOND).unwrap(), b"ok");
    assert_eq!(s.num_connections(), 1);
    // A cancelled wait must not fire later: set the key, then another op reads its own reply.
    c.set("never", b"now").unwrap();
    assert_eq!(c.add("x", 2).unwrap(), 2);
    assert_eq!(c.get("never", SECOND).unwrap(), b"now");
    let err = c.wait(&["p", "q"], Duration::from_millis(50)).unwrap_err();
    assert!(err.to_string().contains("\"p\", \"q\""), "{err}");
}

#[test]
fn cancel_after_the_keys_arrived_reads_stop_then_canceled() {
    let s = server();
    let mut r = raw(&s);
    let mut f = vec![6u8]; // WAIT
    f.extend_from_slice(&1u64.to_le_bytes());
    f.extend_from_slice(&string(b"/k")); // the client sends "/" + key, as torch's does
    r.write_all(&f).unwrap();
    wait_until("the raw WAIT to register", || s.num_waiting() == 1);
    let setter = client(&s);
    setter.set("k", b"v").unwrap();
    // SET has no reply: a CHECK on the same connection is answered only after the SET was
    // applied, so the CANCEL_WAIT below cannot overtake it.
    assert!(setter.check(&["k"]).unwrap());
    r.write_all(&[12u8]).unwrap(); // CANCEL_WAIT
    let mut b = [0u8; 2];
    r.set_read_timeout(Some(2 * SECOND)).unwrap();
    r.read_exact(&mut b).unwrap();
    assert_eq!(b, [0, 1], "STOP_WAITING, then WAIT_CANCELED");
}

#[test]
fn concurrent_adds_are_exact() {
    let s = server();
    let addr = s.local_addr().to_string();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c = TcpStoreClient::connect(&addr, opts()).unwrap();
                for _ in 0..100 {
                    c.add("total", 1).unwrap();
                }
            })
        })
        .collect();
    // One client shared by threads too.
    let shared = Arc::new(client(&s));
    let more: Vec<_> = (0..4)
        .map(|_| {
            let c = Arc::clone(&shared);
            std::thread::spawn(move || {
                for _ in 0..50 {
                    c.add("total", 2).unwrap();
                }
            })
        })
        .collect();
    for t in threads.into_iter().chain(more) {
        t.join().unwrap();
    }
    assert_eq!(shared.add("total", 0).unwrap(), 16 * 100 + 4 * 50 * 2);
}

#[test]
fn barrier_from_add_and_get() {
    const N: i64 = 8;
    let s = server();
    let addr = s.local_addr().to_string();
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c = TcpStoreClient::connect(&addr, opts()).unwrap();
                for round in 0..3 {
                    if c.add(&format!("arrived/{round}"), 1).unwrap() == N {
                        c.set(&format!("go/{round}"), b"1").unwrap();
                    }
                    c.get(&format!("go/{round}"), 5 * SECOND).unwrap();
                }
                // torch's BARRIER query too.
                c.barrier("b", N, 5 * SECOND).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let c = client(&s);
    assert_eq!(c.get("b", SECOND).unwrap(), N.to_string().as_bytes());
    let err = c.barrier("b2", 2, Duration::from_millis(50)).unwrap_err();
    assert!(err.to_string().contains("'b2'"), "{err}");
}

#[test]
fn server_gone_mid_wait_is_an_error_not_a_hang() {
    let s = server();
    let c = client(&s);
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        (c.get("never", 30 * SECOND), start.elapsed())
    });
    wait_until("the getter to wait", || s.num_waiting() == 1);
    let start = Instant::now();
    s.shutdown();
    assert!(
        start.elapsed() < 3 * SECOND,
        "shutdown took {:?}",
        start.elapsed()
    );
    let (got, waited) = t.join().unwrap();
    let msg = got.unwrap_err().to_string();
    assert!(msg.contains("connection closed by the store"), "{msg}");
    assert!(waited < 2 * SECOND, "{waited:?}");
}

#[test]
fn a_silent_peer_is_not_a_store() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (done, until_done) = std::sync::mpsc::channel::<()>();
    let hold = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        // Silent, and open until the client has given up.
        let _ = until_done.recv_timeout(10 * SECOND);
        drop(c);
    });
    let start = Instant::now();
    let err = TcpStoreClient::connect(&addr, opts().with_timeout(Duration::from_millis(300)))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "{addr} is not a PyTorch/Ringmaster TCPStore (no answer to PING within 300ms)"
        )),
        "{msg}"
    );
    assert!(start.elapsed() < 3 * SECOND, "{:?}", start.elapsed());
    done.send(()).unwrap();
    hold.join().unwrap();
}

#[test]
fn a_peer_talking_garbage_is_not_a_store() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (done, until_done) = std::sync::mpsc::channel::<()>();
    let talk = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        // Open until the client has read the garbage and given up.
        let _ = until_done.recv_timeout(10 * SECOND);
    });
    let err = TcpStoreClient::connect(&addr, opts()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "{addr} is not a PyTorch/Ringmaster TCPStore (PING answered"
        )),
        "{msg}"
    );
    done.send(()).unwrap();
    talk.join().unwrap();
}

#[test]
fn nothing_listening_names_address_and_time() {
    let addr = format!("127.0.0.1:{}", free_port());
    let start = Instant::now();
    let err = TcpStoreClient::connect(
        &addr,
        opts().with_connect_timeout(Duration::from_millis(400)),
    )
    .unwrap_err();
    let took = start.elapsed();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("no TCPStore answered at {addr}: tried for")),
        "{msg}"
    );
    assert!(msg.contains("attempts"), "{msg}");
    assert!(
        took >= Duration::from_millis(400) && took < 2 * SECOND,
        "{took:?}"
    );

    let err = TcpStoreClient::connect("no-port-here", opts()).unwrap_err();
    assert!(matches!(err, CommError::InvalidArgument(_)), "{err}");
}

#[test]
fn connect_retries_until_the_server_starts() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let starter = std::thread::spawn(move || {
        // The delay is the point: the client must retry until a server is there.
        std::thread::sleep(Duration::from_millis(300));
        TcpStoreServer::bind(("127.0.0.1", port)).unwrap()
    });
    let start = Instant::now();
    let c = TcpStoreClient::connect(&addr, opts().with_connect_timeout(5 * SECOND)).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(250));
    c.set("up", b"1").unwrap();
    assert_eq!(c.get("up", SECOND).unwrap(), b"1");
    drop(starter.join().unwrap());
}

#[test]
fn reconnects_after_a_lost_connection() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let s = TcpStoreServer::bind(("127.0.0.1", port)).unwrap();
    let c = TcpStoreClient::connect(&addr, opts()).unwrap();
    c.set("a", b"1").unwrap();
    drop(s);
    assert!(c.add("a", 1).is_err());
    let _s = TcpStoreServer::bind(("127.0.0.1", port)).unwrap();
    c.set("b", b"2").unwrap();
    assert_eq!(c.get("b", SECOND).unwrap(), b"2");
}

#[test]
fn oversize_requests_close_only_their_connection() {
    let s = server();
    let good = client(&s);
    good.set("keep", b"1").unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("key", {
            let mut f = vec![1u8];
            f.extend_from_slice(&(MAX_KEY_LEN as u64 + 1).to_le_bytes());
            f
        }),
        ("value", {
            let mut f = vec![1u8];
            f.extend_from_slice(&string(b"k"));
            f.extend_from_slice(&(MAX_VALUE_LEN as u64 + 1).to_le_bytes());
            f
        }),
        ("keys per request", {
            let mut f = vec![6u8];
            f.extend_from_slice(&(MAX_KEYS_PER_REQUEST as u64 + 1).to_le_bytes());
            f
        }),
        ("unknown query", vec![99u8]),
        ("validate twice", {
            let mut f = vec![0u8];
            f.extend_from_slice(&0x3C85_F7CEu32.to_le_bytes());
            f
        }),
    ];
    for (what, frame) in cases {
        let mut r = raw(&s);
        r.write_all(&frame).unwrap();
        assert!(closed_within(&mut r, 2 * SECOND), "{what}: not closed");
        assert!(good.add("keep", 1).unwrap() > 0, "{what}");
    }
    // Wrong magic, and no VALIDATE first.
    for first in [[0u8, 1, 2, 3, 4], [13u8, 1, 0, 0, 0]] {
        let mut r = TcpStream::connect(s.local_addr()).unwrap();
        r.write_all(&first).unwrap();
        assert!(closed_within(&mut r, 2 * SECOND), "{first:?}: not closed");
    }
    assert_eq!(good.get("keep", SECOND).unwrap(), b"6");

    // The client refuses what the server would refuse, without a round trip.
    let long = "k".repeat(MAX_KEY_LEN);
    assert!(matches!(
        good.set(&long, b"x"),
        Err(CommError::InvalidArgument(_))
    ));
    let big = vec![0u8; MAX_VALUE_LEN + 1];
    assert!(matches!(
        good.set("big", &big),
        Err(CommError::InvalidArgument(_))
    ));
}

#[test]
fn total_bytes_and_connections_are_bounded() {
    let limits = StoreLimits {
        max_total_bytes: 1000,
        max_connections: 2,
        ..StoreLimits::default()
    };
    let s = TcpStoreServer::bind_with("127.0.0.1:0", limits).unwrap();
    let addr = s.local_addr().to_string();
    let a = client(&s);
    a.set("big", &[1u8; 600]).unwrap();
    a.set("big", &[2u8; 900]).unwrap(); // replaces: still within
    // SET has no reply: a round trip on `a` makes sure the server counted both before `b`
    // writes (its connection runs on another server thread).
    assert_eq!(a.get("big", SECOND).unwrap(), vec![2u8; 900]);
    let b = client(&s);
    // Over the total: b's connection is closed (its next call reconnects).
    b.set("more", &[3u8; 200]).unwrap();
    assert!(b.add("x", 1).is_err());
    assert!(!a.check(&["more"]).unwrap());

    // Two connections open (a, and b's reconnection on its next call); a third is closed.
    b.set("small", b"1").unwrap();
    // The server counts b's closed connection out when its thread ends, which may be just
    // after b's reconnection is counted in.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.num_connections() != 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.num_connections(), 2);
    let err = TcpStoreClient::connect(
        &addr,
        opts().with_connect_timeout(Duration::from_millis(300)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no TCPStore answered"), "{err}");
    drop(b);
    let c = TcpStoreClient::connect(&addr, opts()).unwrap();
    assert_eq!(c.get("small", SECOND).unwrap(), b"1");
}

#[test]
fn a_connection_that_never_validates_is_closed() {
    let limits = StoreLimits {
        validate_timeout: Duration::from_millis(200),
        ..StoreLimits::default()
    };
    let s = TcpStoreServer::bind_with("127.0.0.1:0", limits).unwrap();
    let mut silent = TcpStream::connect(s.local_addr()).unwrap();
    let mut validated = raw(&s);
    let start = Instant::now();
    assert!(closed_within(&mut silent, 2 * SECOND));
    assert!(start.elapsed() < 3 * SECOND, "{:?}", start.elapsed());
    // Past VALIDATE there is no read timeout (clients wait as long as they like).
    assert!(!closed_within(&mut validated, Duration::from_millis(400)));
}

#[test]
fn a_half_sent_request_wedges_no_one() {
    let s = server();
    let mut r = raw(&s);
    let mut f = vec![1u8];
    f.extend_from_slice(&100u64.to_le_bytes());
    f.extend_from_slice(b"only part of the key");
    r.write_all(&f).unwrap();
    let c = client(&s);
    let start = Instant::now();
    c.set("a", b"1").unwrap();
    assert_eq!(c.get("a", SECOND).unwrap(), b"1");
    let other = client(&s);
    assert_eq!(other.add("n", 1).unwrap(), 1);
    assert!(start.elapsed() < 3 * SECOND);
    // And a shutdown does not wait for it.
    let start = Instant::now();
    drop(s);
    assert!(start.elapsed() < 3 * SECOND, "{:?}", start.elapsed());
    assert!(closed_within(&mut r, SECOND));
}
