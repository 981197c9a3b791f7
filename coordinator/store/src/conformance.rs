//! One behavioural test suite, run against every [`StateStore`] backend
//! (each backend's tests call these functions on a fresh store).

use std::sync::Arc;

use crate::{Fence, Op, Precondition, StateStore, StoreError, Version, Versioned};

fn keys(list: &[(String, Versioned)]) -> Vec<&str> {
    list.iter().map(|(k, _)| k.as_str()).collect()
}

fn expect_conflict(
    result: Result<impl std::fmt::Debug, StoreError>,
    key: &str,
    expected: Precondition,
    current: Option<Version>,
) {
    match result {
        Err(StoreError::Conflict {
            key: k,
            expected: e,
            current: c,
        }) => {
            assert_eq!(k, key);
            assert_eq!(e, expected);
            assert_eq!(c, current);
        }
        other => panic!("expected a conflict on {key:?}, got {other:?}"),
    }
}

/// get / put / list (prefix, ordering) / delete.
pub(crate) fn basic(store: &dyn StateStore) {
    assert_eq!(store.get("missing").unwrap(), None);
    assert!(store.list("").unwrap().is_empty());

    // Insert out of order; list returns them sorted by key.
    let mut written = Vec::new();
    for key in ["jobs/b", "jobs/a", "nodes/x", "jobs/c/1", "jobs", "jobsx"] {
        let v = store.put(key, key.as_bytes(), Precondition::Any).unwrap();
        assert!(v > 0);
        written.push((key, v));
    }
    for (key, v) in &written {
        assert_eq!(
            store.get(key).unwrap(),
            Some(Versioned {
                value: key.as_bytes().to_vec(),
                version: *v
            })
        );
    }

    let jobs = store.list("jobs/").unwrap();
    assert_eq!(keys(&jobs), ["jobs/a", "jobs/b", "jobs/c/1"]);
    assert_eq!(jobs[0].1.value, b"jobs/a");
    assert_eq!(jobs[1].1.version, written[0].1);
    assert_eq!(
        keys(&store.list("jobs").unwrap()),
        ["jobs", "jobs/a", "jobs/b", "jobs/c/1", "jobsx"]
    );
    assert_eq!(
        keys(&store.list("").unwrap()),
        ["jobs", "jobs/a", "jobs/b", "jobs/c/1", "jobsx", "nodes/x"]
    );
    assert!(store.list("zzz").unwrap().is_empty());
    assert!(store.list("jobs/d").unwrap().is_empty());

    // Overwrite with Any.
    let v = store.put("jobs/a", b"new", Precondition::Any).unwrap();
    let got = store.get("jobs/a").unwrap().unwrap();
    assert_eq!(got.value, b"new");
    assert_eq!(got.version, v);

    // Binary and empty values round-trip.
    store
        .put("bin", &[0, 255, 0, 1, 2], Precondition::Any)
        .unwrap();
    assert_eq!(store.get("bin").unwrap().unwrap().value, [0, 255, 0, 1, 2]);
    store.put("empty", b"", Precondition::Any).unwrap();
    assert_eq!(store.get("empty").unwrap().unwrap().value, b"");

    // Delete.
    assert!(store.delete("jobs/b", Precondition::Any).unwrap());
    assert_eq!(store.get("jobs/b").unwrap(), None);
    assert!(!store.delete("jobs/b", Precondition::Any).unwrap());
    assert!(!store.delete("never", Precondition::Absent).unwrap());
    assert_eq!(keys(&store.list("jobs/").unwrap()), ["jobs/a", "jobs/c/1"]);

    // Empty keys are rejected.
    assert!(matches!(
        store.put("", b"x", Precondition::Any),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(store.get(""), Err(StoreError::Invalid(_))));
}

/// Absent / Version preconditions on put and delete.
pub(crate) fn preconditions(store: &dyn StateStore) {
    let v1 = store.put("k", b"one", Precondition::Absent).unwrap();

    // Absent on an existing key: conflict reporting the current version.
    let r = store.put("k", b"two", Precondition::Absent);
    expect_conflict(r, "k", Precondition::Absent, Some(v1));
    assert!(
        store
            .put("k", b"two", Precondition::Absent)
            .unwrap_err()
            .is_conflict()
    );
    assert_eq!(store.get("k").unwrap().unwrap().value, b"one");

    // Matching version succeeds and yields a newer version.
    let v2 = store.put("k", b"two", Precondition::Version(v1)).unwrap();
    assert!(v2 > v1);

    // Stale version: conflict, current version reported, nothing written.
    let r = store.put("k", b"stale", Precondition::Version(v1));
    expect_conflict(r, "k", Precondition::Version(v1), Some(v2));
    assert_eq!(
        store.get("k").unwrap(),
        Some(Versioned {
            value: b"two".to_vec(),
            version: v2
        })
    );

    // Version precondition on an absent key.
    let r = store.put("nope", b"x", Precondition::Version(v2));
    expect_conflict(r, "nope", Precondition::Version(v2), None);
    assert_eq!(store.get("nope").unwrap(), None);
    let r = store.put("nope", b"x", Precondition::Version(0));
    expect_conflict(r, "nope", Precondition::Version(0), None);

    // Deletes honour preconditions too.
    let r = store.delete("k", Precondition::Version(v1));
    expect_conflict(r, "k", Precondition::Version(v1), Some(v2));
    let r = store.delete("k", Precondition::Absent);
    expect_conflict(r, "k", Precondition::Absent, Some(v2));
    assert!(store.get("k").unwrap().is_some());
    let r = store.delete("nope", Precondition::Version(v2));
    expect_conflict(r, "nope", Precondition::Version(v2), None);
    assert!(store.delete("k", Precondition::Version(v2)).unwrap());
    assert_eq!(store.get("k").unwrap(), None);

    // After delete, Absent succeeds again, with a version never used before.
    let v3 = store.put("k", b"three", Precondition::Absent).unwrap();
    assert!(v3 > v2);
}

/// Atomic multi-op commits.
pub(crate) fn commit(store: &dyn StateStore) {
    let va = store.put("a", b"a0", Precondition::Any).unwrap();
    let vb = store.put("b", b"b0", Precondition::Any).unwrap();

    // One failing precondition (the last op) → nothing applied.
    let r = store.commit(vec![
        Op::put("a", b"a1".to_vec(), Precondition::Version(va)),
        Op::delete("b", Precondition::Any),
        Op::put("c", b"c1".to_vec(), Precondition::Absent),
        Op::put("d", b"d1".to_vec(), Precondition::Version(vb)), // d is absent
    ]);
    expect_conflict(r, "d", Precondition::Version(vb), None);
    assert_eq!(
        store.get("a").unwrap(),
        Some(Versioned {
            value: b"a0".to_vec(),
            version: va
        })
    );
    assert_eq!(
        store.get("b").unwrap(),
        Some(Versioned {
            value: b"b0".to_vec(),
            version: vb
        })
    );
    assert_eq!(store.get("c").unwrap(), None);
    assert_eq!(store.get("d").unwrap(), None);

    // A failing first op → nothing applied either.
    let r = store.commit(vec![
        Op::put("b", b"b1".to_vec(), Precondition::Absent),
        Op::put("c", b"c1".to_vec(), Precondition::Absent),
    ]);
    expect_conflict(r, "b", Precondition::Absent, Some(vb));
    assert_eq!(store.get("c").unwrap(), None);

    // All preconditions hold → everything applied, puts share one new version.
    let versions = store
        .commit(vec![
            Op::put("a", b"a1".to_vec(), Precondition::Version(va)),
            Op::delete("b", Precondition::Version(vb)),
            Op::put("c", b"c1".to_vec(), Precondition::Absent),
            Op::delete("never", Precondition::Any),
        ])
        .unwrap();
    assert_eq!(versions.len(), 4);
    assert_eq!(versions[1], 0);
    assert_eq!(versions[3], 0);
    assert!(versions[0] > vb);
    assert_eq!(versions[0], versions[2]);
    let got_a = store.get("a").unwrap().unwrap();
    assert_eq!(
        (got_a.value.as_slice(), got_a.version),
        (&b"a1"[..], versions[0])
    );
    assert_eq!(store.get("b").unwrap(), None);
    let got_c = store.get("c").unwrap().unwrap();
    assert_eq!(
        (got_c.value.as_slice(), got_c.version),
        (&b"c1"[..], versions[0])
    );

    // Empty commit is a no-op.
    assert!(store.commit(Vec::new()).unwrap().is_empty());

    // The same key twice in one commit is rejected, nothing applied.
    let r = store.commit(vec![
        Op::put("e", b"1".to_vec(), Precondition::Any),
        Op::put("e", b"2".to_vec(), Precondition::Any),
    ]);
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    assert_eq!(store.get("e").unwrap(), None);

    // An empty key anywhere is rejected, nothing applied.
    let r = store.commit(vec![
        Op::put("e", b"1".to_vec(), Precondition::Any),
        Op::delete("", Precondition::Any),
    ]);
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    assert_eq!(store.get("e").unwrap(), None);
}

/// Every write gets a version greater than all earlier ones.
pub(crate) fn versions_increase(store: &dyn StateStore) {
    let mut last = 0;
    for i in 0..20u32 {
        let key = format!("k{}", i % 3);
        let v = store
            .put(&key, &i.to_be_bytes(), Precondition::Any)
            .unwrap();
        assert!(v > last, "version {v} after {last}");
        last = v;
        assert_eq!(store.get(&key).unwrap().unwrap().version, v);
    }
    // Deletes do not roll the counter back.
    assert!(store.delete("k0", Precondition::Any).unwrap());
    let v = store.put("k0", b"again", Precondition::Absent).unwrap();
    assert!(v > last);
    last = v;
    let vs = store
        .commit(vec![Op::put("k1", b"x".to_vec(), Precondition::Any)])
        .unwrap();
    assert!(vs[0] > last);
    // Failed writes do not change the stored version.
    let before = store.get("k1").unwrap().unwrap().version;
    assert!(
        store
            .put("k1", b"y", Precondition::Absent)
            .unwrap_err()
            .is_conflict()
    );
    assert_eq!(store.get("k1").unwrap().unwrap().version, before);
}

/// Concurrent compare-and-swap increments from several threads lose no
/// update: every successful CAS is counted exactly once.
pub(crate) fn concurrent_cas<S: StateStore>(store: Arc<S>) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 15;
    store
        .put("counter", &0u64.to_be_bytes(), Precondition::Absent)
        .unwrap();
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut conflicts = 0u64;
                for _ in 0..PER_THREAD {
                    loop {
                        let cur = store.get("counter").unwrap().unwrap();
                        let n = u64::from_be_bytes(cur.value.as_slice().try_into().unwrap());
                        match store.put(
                            "counter",
                            &(n + 1).to_be_bytes(),
                            Precondition::Version(cur.version),
                        ) {
                            Ok(v) => {
                                assert!(v > cur.version);
                                break;
                            }
                            Err(e) if e.is_conflict() => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let end = store.get("counter").unwrap().unwrap();
    assert_eq!(
        u64::from_be_bytes(end.value.as_slice().try_into().unwrap()),
        THREADS * PER_THREAD
    );
}

/// Values up to 1 MiB round-trip unchanged (etcd's default request limit is 1.5 MiB).
pub(crate) fn large_values(store: &dyn StateStore) {
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + i / 251) as u8).collect();
    let v = store.put("big", &big, Precondition::Absent).unwrap();
    let got = store.get("big").unwrap().unwrap();
    assert_eq!(got.version, v);
    assert!(got.value == big, "a 1 MiB value changed on the way");
    let listed = store.list("bi").unwrap();
    assert_eq!(keys(&listed), ["big"]);
    assert!(listed[0].1.value == big);
}

/// Listings longer than any page size come back whole and in order.
pub(crate) fn long_listings(store: &dyn StateStore) {
    let n = 300;
    for chunk in (0..n).collect::<Vec<u32>>().chunks(50) {
        let ops = chunk
            .iter()
            .map(|i| {
                Op::put(
                    format!("many/{i:04}"),
                    i.to_be_bytes().to_vec(),
                    Precondition::Absent,
                )
            })
            .collect();
        store.commit(ops).unwrap();
    }
    store.put("many0", b"outside", Precondition::Any).unwrap();
    let all = store.list("many/").unwrap();
    assert_eq!(all.len(), n as usize);
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(k, &format!("many/{i:04}"));
        assert_eq!(v.value, (i as u32).to_be_bytes());
    }
}

/// Fenced commits land while the fence key lives with its creation revision, and are refused
/// (nothing written, preconditions or not) once it is deleted or created anew.
pub(crate) fn fencing(store: &dyn StateStore) {
    let created = store.put("leader/a", b"me", Precondition::Absent).unwrap();
    let fence = Fence {
        key: "leader/a".into(),
        created,
    };
    let vs = store
        .commit_fenced(
            &fence,
            vec![Op::put("jobs/1", b"x".to_vec(), Precondition::Absent)],
        )
        .unwrap();
    assert!(vs[0] > created);
    // Preconditions still apply under a fence.
    let r = store.commit_fenced(
        &fence,
        vec![Op::put("jobs/1", b"y".to_vec(), Precondition::Absent)],
    );
    expect_conflict(r, "jobs/1", Precondition::Absent, Some(vs[0]));
    // Rewriting the fence key keeps its creation revision: the fence holds.
    store
        .put("leader/a", b"me again", Precondition::Any)
        .unwrap();
    store
        .commit_fenced(
            &fence,
            vec![Op::put("jobs/2", b"x".to_vec(), Precondition::Any)],
        )
        .unwrap();

    let gone = |r: Result<Vec<Version>, StoreError>| match r {
        Err(StoreError::Fenced { key, created: c }) => {
            assert_eq!(key, "leader/a");
            assert_eq!(c, created);
        }
        other => panic!("expected a fenced write, got {other:?}"),
    };
    assert!(store.delete("leader/a", Precondition::Any).unwrap());
    gone(store.commit_fenced(
        &fence,
        vec![Op::put("jobs/3", b"x".to_vec(), Precondition::Any)],
    ));
    gone(store.commit_fenced(&fence, vec![Op::delete("jobs/1", Precondition::Any)]));
    assert_eq!(store.get("jobs/3").unwrap(), None);
    assert!(store.get("jobs/1").unwrap().is_some());
    // A new leader's key under the same name is another leadership.
    let again = store
        .put("leader/a", b"other", Precondition::Absent)
        .unwrap();
    assert_ne!(again, created);
    gone(store.commit_fenced(
        &fence,
        vec![Op::put("jobs/3", b"x".to_vec(), Precondition::Any)],
    ));
    assert_eq!(store.get("jobs/3").unwrap(), None);
    let fresh = Fence {
        key: "leader/a".into(),
        created: again,
    };
    store
        .commit_fenced(
            &fresh,
            vec![Op::put("jobs/3", b"x".to_vec(), Precondition::Any)],
        )
        .unwrap();
}
