//! The coordinator's state, with real binaries: a damaged store is reported and never hidden,
//! `--reset-state` moves it aside without reusing job ids, and a job that fails in a loop
//! backs off and keeps its status small while `ringctl jobs` keeps working.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use ringmaster_tests::{Cluster, Proc, bin, wait_until};
use serde_json::Value;

/// Runs `coordinator` on the cluster's data dir (the cluster's own coordinator stopped) and
/// waits for it to exit; returns the exit code and everything it printed.
fn coordinator_on_data_dir(c: &Cluster, log: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(c.path("data"))
        .arg("--join-token-file")
        .arg(&c.token_file);
    let mut p = Proc::spawn("coordinator on a damaged store", cmd, c.path(log));
    let code = p.wait_exit(Duration::from_secs(30));
    (code, p.log_text())
}

fn stop_coordinator(c: &mut Cluster) {
    let mut p = c.coordinator.take().expect("a coordinator runs");
    p.signal(Signal::SIGTERM);
    assert!(
        p.wait_exit(Duration::from_secs(20)).is_some(),
        "coordinator did not stop"
    );
}

fn damaged_copies(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("data dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("state.redb.damaged-"))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_damaged_store_stops_the_coordinator_and_reset_state_moves_it_aside() {
    // The damage is to redb's file: this test is about the embedded store whatever
    // RINGMASTER_TEST_STORE says.
    let mut c = Cluster::start_with(
        None,
        "10s",
        ringmaster_tests::ClusterOpts {
            store: ringmaster_tests::TestStore::Embedded,
            ..Default::default()
        },
    );
    let first = c.submit("a.yaml", "name: a\ncommand: [sleep, '60']\n");
    assert_eq!(first, "a-1");
    stop_coordinator(&mut c);

    let db = c.path("data/state.redb");
    let good = std::fs::read(&db).expect("state.redb");
    assert!(good.len() > 3 * 4096, "{} bytes", good.len());
    // A byte soup that is no valid header and no valid allocator state.
    let soup = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(151).wrapping_add(7))
            .collect()
    };
    let mut garbled_header = good.clone();
    garbled_header[9..4096].copy_from_slice(&soup(4096 - 9));
    let mut garbled_regions = good.clone();
    garbled_regions[4096..3 * 4096].copy_from_slice(&soup(2 * 4096));
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("empty", Vec::new(), "the file is empty (0 bytes)"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("garbled-header", garbled_header, "garbled"),
        ("garbled-regions", garbled_regions, "is damaged"),
    ];
    let mut last = Vec::new();
    for (what, bytes, damage) in cases {
        std::fs::write(&db, &bytes).expect("damaging state.redb");
        let (code, out) = coordinator_on_data_dir(&c, &format!("coordinator-{what}.log"));
        assert_eq!(code, Some(1), "{what}: exit code; output:\n{out}");
        assert!(
            out.contains(&format!("state store {} is damaged", db.display())),
            "{what}: names the file:\n{out}"
        );
        assert!(out.contains(damage), "{what}: names the damage:\n{out}");
        assert!(out.contains("--reset-state"), "{what}: the way out:\n{out}");
        assert!(!out.contains("panicked"), "{what}: a panic:\n{out}");
        assert_eq!(std::fs::read(&db).unwrap(), bytes, "{what}: file changed");
        assert!(damaged_copies(&c.path("data")).is_empty());
        last = bytes;
    }

    // --reset-state: the damaged file is moved aside, said so, and the state starts empty.
    c.coordinator_args = vec!["--reset-state".into()];
    c.start_coordinator(None);
    let moved = wait_until(Duration::from_secs(20), "the moved-aside file", || {
        let v = damaged_copies(&c.path("data"));
        (v.len() == 1).then(|| v[0].clone())
    });
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        last,
        "the old bytes are kept"
    );
    let name = moved.file_name().unwrap().to_string_lossy().into_owned();
    wait_until(Duration::from_secs(20), "the log to say so", || {
        let log = c.coordinator.as_ref()?.log_text();
        (log.contains("moved the damaged state store aside") && log.contains(&name)).then_some(())
    });
    let gone = c.ringctl(&["status", "a-1"]);
    assert!(!gone.status.success(), "the old job is forgotten");
    // Ids go on above every id handed out on this data dir: new runs never write into the
    // old jobs' log directories on the agents.
    let second = c.submit("b.yaml", "name: a\ncommand: [sleep, '60']\n");
    let n: u64 = second
        .strip_prefix("a-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("id {second}"));
    assert!(n > 1, "job id {second} reuses an old one");

    // The flag on a healthy store keeps it (and says so).
    stop_coordinator(&mut c);
    c.start_coordinator(None);
    assert_eq!(c.status(&second)["id"], second.as_str());
    let log = c.coordinator.as_ref().unwrap().log_text();
    assert!(log.contains("not damaged: kept"), "{log}");
    assert_eq!(damaged_copies(&c.path("data")).len(), 1);
}

#[test]
fn a_crash_looping_job_backs_off_and_its_status_stays_small() {
    let mut c = Cluster::start(None, "10s");
    c.start_agent("w0", 1, &[]);
    c.wait_joined(&["w0"]);
    let job = c.submit(
        "loop.yaml",
        "name: crashloop\nmax_restarts: 900\nrestart_backoff: {initial: 50ms, max: 200ms}\n\
         command: [sh, -c, 'exit 3']\n",
    );
    let (status, watched) = std::thread::scope(|s| {
        let watcher = s.spawn(|| c.ringctl(&["watch", &job, "--output", "json"]));
        wait_until(Duration::from_secs(120), "30 restarts", || {
            // Listing works throughout, as text and as JSON.
            let text = c.ringctl(&["jobs"]);
            assert!(
                text.status.success(),
                "ringctl jobs: {}",
                String::from_utf8_lossy(&text.stderr)
            );
            let json = c.ringctl(&["jobs", "--output", "json"]);
            assert!(
                json.status.success(),
                "ringctl jobs --output json: {}",
                String::from_utf8_lossy(&json.stderr)
            );
            let list: Value = serde_json::from_slice(&json.stdout).expect("jobs JSON");
            assert_eq!(list[0]["summary"], true, "{list}");
            let st = c.status(&job);
            (st["restart_count"].as_u64()? >= 30).then_some(st)
        });
        let status = c.ringctl(&["status", &job, "--output", "json"]);
        assert!(status.status.success());
        let cancel = c.ringctl(&["cancel", &job]);
        assert!(
            cancel.status.success(),
            "{}",
            String::from_utf8_lossy(&cancel.stderr)
        );
        (status.stdout, watcher.join().expect("watch thread"))
    });

    // The status JSON stays small: the first 5 and the newest 20 failures, and a count.
    assert!(
        status.len() < 1 << 20,
        "status JSON is {} bytes",
        status.len()
    );
    let st: Value = serde_json::from_slice(&status).expect("status JSON");
    let failures = st["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 25, "{st:#}");
    assert_eq!(failures[0]["generation"], 0);
    assert_eq!(failures[0]["exit_code"], 3);
    let omitted = st["failures_omitted"].as_u64().expect("failures_omitted");
    assert!(omitted >= 5, "{st:#}");
    assert_eq!(
        omitted + 25,
        st["restart_count"].as_u64().unwrap(),
        "{st:#}"
    );

    // The backoff, as `watch` saw it: 50 ms after the first failure, doubling to 200 ms.
    let reasons: Vec<String> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["state"] == "RESTARTING")
        .filter_map(|v| v["pending_reason"].as_str().map(str::to_owned))
        .filter(|r| r.contains("backoff"))
        .collect();
    for want in [
        "restarting in 50ms (backoff after 1 failure in a row)",
        "restarting in 100ms (backoff after 2 failures in a row)",
        "restarting in 200ms (backoff after 3 failures in a row)",
        "restarting in 200ms (backoff after 20 failures in a row)",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "watch never showed {want:?}; it showed {reasons:#?}"
        );
    }
}
