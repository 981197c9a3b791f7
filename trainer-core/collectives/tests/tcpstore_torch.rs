//! Interop with a real PyTorch (tests/torch_tcpstore.py): our client against torch's TCPStore
//! server (both backends), torch's client against our server, and `init_process_group` with
//! gloo through our server as the agent store. Runs only when `RINGMASTER_TEST_TORCH_PYTHON`
//! names a Python with torch installed; otherwise each test says so and passes.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use ringmaster_collectives::{TcpStoreClient, TcpStoreOptions, TcpStoreServer};

const SECOND: Duration = Duration::from_secs(1);
/// torch imports take seconds on a loaded machine.
const CHILD_STARTUP: Duration = Duration::from_secs(90);

fn python() -> Option<String> {
    match std::env::var("RINGMASTER_TEST_TORCH_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            // Straight to stderr, past the test harness's capture, so that a skip is visible.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: set RINGMASTER_TEST_TORCH_PYTHON to a Python with torch to run the \
                 torch interop tests"
            );
            None
        }
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/torch_tcpstore.py")
}

/// A Python child, killed and reaped on every path; its stdout lines arrive on `lines`.
struct Py {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
}

impl Py {
    fn start(python: &str, args: &[&str], env: &[(&str, String)]) -> Py {
        let mut cmd = Command::new(python);
        cmd.arg(script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start python");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Py {
            stdin: child.stdin.take(),
            child,
            lines,
            name: args.join(" "),
        }
    }

    /// The next line starting with `prefix` (others are echoed), within `within`.
    fn expect(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => eprintln!("[{}] {l}", self.name),
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "python '{}': no line '{prefix}…' within {within:?} (exit: {status:?})",
                        self.name
                    );
                }
            }
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to python");
        stdin.flush().expect("flush python stdin");
    }

    /// Waits up to `within` for a successful exit.
    fn finish(mut self, within: Duration) {
        self.stdin = None;
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait python") {
                assert!(status.success(), "python '{}' failed: {status}", self.name);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "python '{}' did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn opts() -> TcpStoreOptions {
    TcpStoreOptions::default()
        .with_connect_timeout(10 * SECOND)
        .with_timeout(10 * SECOND)
}

/// Our client against torch's server.
fn client_against_torch_server(python: &str, libuv: bool) {
    let mut py = Py::start(python, &["serve", if libuv { "1" } else { "0" }], &[]);
    let line = py.expect("PORT ", CHILD_STARTUP);
    let words: Vec<&str> = line.split_whitespace().collect();
    let port: u16 = words[1].parse().expect("port");
    assert_eq!(words[3], if libuv { "True" } else { "False" }, "{line}");
    let addr = format!("127.0.0.1:{port}");
    let c = TcpStoreClient::connect(&addr, opts()).unwrap();

    assert_eq!(c.get("from_py", SECOND).unwrap(), b"hello from torch");
    c.set("rust_set", b"from rust").unwrap();
    assert_eq!(c.get("rust_set", SECOND).unwrap(), b"from rust");
    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -2).unwrap(), 3);
    assert_eq!(c.get("n", SECOND).unwrap(), b"3");
    assert!(c.check(&["rust_set", "n"]).unwrap());
    assert!(!c.check(&["rust_set", "zz"]).unwrap());
    assert_eq!(c.compare_set("n", b"3", b"3").unwrap(), b"3");
    assert_eq!(c.compare_set("cs", b"", b"v").unwrap(), b"v");
    assert_eq!(c.compare_set("cs", b"v", b"w").unwrap(), b"w");
    assert_eq!(c.compare_set("cs", b"v", b"x").unwrap(), b"w");
    assert_eq!(c.compare_set("absent", b"e", b"d").unwrap(), b"e");
    c.set("doomed", b"1").unwrap();
    assert!(c.delete("doomed").unwrap());
    assert!(!c.delete("doomed").unwrap());
    c.append("log", b"ab").unwrap();
    c.append("log", b"cd").unwrap();
    c.multi_set(&[("m1", b"x"), ("m2", b"yy")]).unwrap();
    assert_eq!(
        c.multi_get(&["m1", "m2", "log"], SECOND).unwrap(),
        vec![b"x".to_vec(), b"yy".to_vec(), b"abcd".to_vec()]
    );
    // A timed-out get: torch's server answers CANCEL_WAIT; the connection stays usable.
    let err = c.get("never", Duration::from_millis(150)).unwrap_err();
    assert!(err.to_string().contains("'never'"), "{err}");
    assert_eq!(c.add("n", 0).unwrap(), 3);
    // A wait ended by another client's set.
    let c2 = TcpStoreClient::connect(&addr, opts()).unwrap();
    let t = std::thread::spawn(move || c2.get("late", 10 * SECOND));
    // torch's server cannot be asked whether the getter waits yet; the result is the same
    // either way, the pause only makes the waiting path the likely one.
    std::thread::sleep(Duration::from_millis(200));
    c.set("late", b"now").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"now");

    let keys = c.list_keys().unwrap();
    assert!(keys.iter().any(|k| k == "rust_set"), "{keys:?}");
    assert_eq!(c.num_keys().unwrap(), keys.len() as i64, "{keys:?}");
    if libuv {
        c.queue_push("q", b"one").unwrap();
        assert_eq!(c.queue_len("q").unwrap(), 1);
        assert_eq!(c.queue_pop("q").unwrap().unwrap(), b"one");
        assert_eq!(c.queue_pop("q").unwrap(), None);
    }
    c.barrier("bar", 1, SECOND).unwrap();

    let p = TcpStoreClient::connect(&addr, opts().with_prefix("pre")).unwrap();
    p.set("pk", b"pv").unwrap();
    let nested = TcpStoreClient::connect(&addr, opts().with_prefix("a/b")).unwrap();
    nested.set("nested", b"yes").unwrap();
    py.send_line("check");
    py.expect("CHECKED", 30 * SECOND);
    py.finish(30 * SECOND);
}

#[test]
fn our_client_against_torch_libuv_server() {
    if let Some(py) = python() {
        client_against_torch_server(&py, true);
    }
}

#[test]
fn our_client_against_torch_legacy_server() {
    if let Some(py) = python() {
        client_against_torch_server(&py, false);
    }
}

#[test]
fn torch_client_against_our_server() {
    let Some(python) = python() else { return };
    let s = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().to_string();
    let c = TcpStoreClient::connect(&addr, opts()).unwrap();
    c.set("rust_key", b"hello").unwrap();
    assert_eq!(c.add("counter", 5).unwrap(), 5);
    TcpStoreClient::connect(&addr, opts().with_prefix("pre"))
        .unwrap()
        .set("k", b"prefixed")
        .unwrap();

    let port = s.local_addr().port().to_string();
    let mut py = Py::start(&python, &["client", &port], &[]);
    py.expect("WAITING", CHILD_STARTUP);
    assert_eq!(c.get("counter", SECOND).unwrap(), b"7");
    assert_eq!(c.get("py_key", SECOND).unwrap(), b"swapped");
    assert_eq!(c.get("cs_new", SECOND).unwrap(), b"v");
    assert!(!c.check(&["cs_absent", "doomed"]).unwrap());
    assert_eq!(c.get("pre/from_py", SECOND).unwrap(), b"pv");
    c.set("late", b"set by rust").unwrap();
    py.expect("DONE", 30 * SECOND);
    py.finish(30 * SECOND);
}

#[test]
fn torch_process_group_through_our_server() {
    let Some(python) = python() else { return };
    let s = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().port().to_string();
    let world = 2;
    let mut ranks: Vec<Py> = (0..world)
        .map(|rank| {
            let env = [
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
                ("TORCHELASTIC_USE_AGENT_STORE", "True".to_string()),
                ("GLOO_SOCKET_IFNAME", "lo".to_string()),
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", world.to_string()),
            ];
            Py::start(
                &python,
                &["pg", &rank.to_string(), &world.to_string()],
                &env,
            )
        })
        .collect();
    for (rank, py) in ranks.iter_mut().enumerate() {
        let line = py.expect("PG ", CHILD_STARTUP);
        assert_eq!(line, format!("PG {rank} SUM 3"));
    }
    for py in ranks {
        py.finish(30 * SECOND);
    }
    // torch wrote its keys through PrefixStore("default_pg", …): "/default_pg/…" on the wire.
    let c = TcpStoreClient::connect(&s.local_addr().to_string(), opts()).unwrap();
    let keys = c.list_keys().unwrap();
    assert!(
        keys.iter().any(|k| k.starts_with("default_pg/")),
        "{keys:?}"
    );
}
