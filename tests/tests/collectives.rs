//! Collectives bootstrapped through the coordinator's rendezvous store, started by real agents:
//! `ringctl local` runs `trainer collective --check` on 2 nodes × 2 slots.

use ringmaster_tests::bin;

#[test]
fn ring_bootstraps_through_the_coordinator_and_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("ring.yaml");
    let trainer = bin("trainer");
    std::fs::write(
        &spec,
        format!(
            "name: ring-check\ncommand: [{t}, collective, --check, --op, all-reduce, --bytes, '4,4000012', --iters, '2', --timeout, 60s]\n",
            t = trainer.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin("ringctl"))
        .args([
            "local",
            spec.to_str().unwrap(),
            "--nodes",
            "2",
            "--slots",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for r in 0..4 {
        assert!(
            stderr.contains(&format!("rank {r}/4: ring connected")),
            "{stderr}"
        );
    }
}
