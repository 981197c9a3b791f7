//! Failure recovery end to end: real coordinator, agents, ringctl and trainers on 127.0.0.1.

use std::time::Duration;

use nix::sys::signal::Signal;
use ringmaster_tests::{Cluster, wait_until};

const HOSTFILE: &str = "w0 slots=2\nw1 slots=2\n";

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
}

/// The quickstart's model and data, 30 steps of global batch 64 on 4 ranks, ZeRO-2.
fn training_config(c: &Cluster, name: &str) -> std::path::PathBuf {
    training_config_with(c, name, "")
}

fn training_config_with(c: &Cluster, name: &str, extra: &str) -> std::path::PathBuf {
    let ex = examples();
    let ds = c.path("ds_z2.json");
    std::fs::write(
        &ds,
        r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}"#,
    )
    .unwrap();
    let p = c.path(&format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\nfinetuning_type: full\n\
             dataset: addition_train\ndataset_dir: {d}\ntemplate: default\ncutoff_len: 64\n\
             output_dir: {o}\nper_device_train_batch_size: 16\ngradient_accumulation_steps: 1\n\
             learning_rate: 3.0e-3\nmax_steps: 30\nlogging_steps: 1\nsave_steps: 10\nseed: 3\n\
             deepspeed: {ds}\n{extra}",
            m = ex.join("model").display(),
            d = ex.join("data").display(),
            o = c.path(name).display(),
            ds = ds.display(),
        ),
    )
    .unwrap();
    p
}

/// Every `step → loss` line of `trainer_log.jsonl`, the last occurrence of a step winning (a
/// resumed generation appends the steps it redoes).
fn losses(path: &std::path::Path) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The pid of the trainer of `rank` in generation `generation` of `job`, from /proc.
fn trainer_pid(job: &str, rank: u32, generation: u64) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let has = |kv: String| vars.contains(&kv.as_bytes());
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "trainer")
            && has(format!("RINGMASTER_JOB_ID={job}"))
            && has(format!("RANK={rank}"))
            && has(format!("RINGMASTER_GENERATION={generation}"))
        {
            return Some(pid);
        }
    }
    None
}

/// Issue 6, acceptance 1: run A trains 30 steps uninterrupted; run B (save_steps 10) loses
/// rank 3 to SIGKILL mid-run, restarts as generation 1, resumes from its newest committed
/// checkpoint and finishes; B's loss at every step after the resume point and its final
/// parameters equal A's within 1e-6 relative (same world and plan: the same operations in the
/// same order).
#[test]
fn a_killed_rank_restarts_the_job_and_it_resumes_exactly() {
    let _serial = ringmaster_tests::timing_sensitive();
    let c = Cluster::start(Some(HOSTFILE), "10s");
    let mut c = c;
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let a = training_config(&c, "a");
    let job_a = c.submit("a-job.yaml", &format!("name: a\ntrain: {}\n", a.display()));
    let st = c.wait_state(&job_a, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    let want = losses(&c.path("a/trainer_log.jsonl"));
    assert_eq!(want.len(), 30);

    let b = training_config(&c, "b");
    let job_b = c.submit(
        "b-job.yaml",
        &format!("name: b\nmax_restarts: 1\ntrain: {}\n", b.display()),
    );
    let log_b = c.path("b/trainer_log.jsonl");
    wait_until(Duration::from_secs(600), "B reaches step 13", || {
        (losses(&log_b).len() >= 13).then_some(())
    });
    let pid = wait_until(Duration::from_secs(30), "rank 3's trainer", || {
        trainer_pid(&job_b, 3, 0)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let st = c.wait_state(&job_b, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], 1, "{st:#}");
    assert_eq!(st["failures"][0]["rank"], 3, "{st:#}");
    let rank0 = c.ringctl(&["logs", &job_b, "--rank", "0", "--generation", "1"]);
    let text = String::from_utf8_lossy(&rank0.stdout).into_owned()
        + &String::from_utf8_lossy(&rank0.stderr);
    let resumed: u64 = text
        .lines()
        .find_map(|l| {
            let i = l.find("resumed from ")?;
            let rest = &l[i..];
            let j = rest.find(" at step ")? + " at step ".len();
            rest[j..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("generation 1 did not resume: {text}"));
    assert!(resumed == 10 || resumed == 20, "resumed at {resumed}");
    let got = losses(&log_b);
    assert_eq!(got.len(), 30);
    for step in resumed + 1..=30 {
        let (x, y) = (got[&step], want[&step]);
        assert!((x - y).abs() <= 1e-6 * y.abs(), "step {step}: {x} vs {y}");
    }
    let pa = ringmaster_model::hf::load_dir(&c.path("a")).unwrap().params;
    let pb = ringmaster_model::hf::load_dir(&c.path("b")).unwrap().params;
    for ((spec, x), (_, y)) in pa.iter().zip(pb.iter()) {
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p - q).abs() <= 1e-6 * (1.0 + p.abs()),
                "{}: {p} vs {q}",
                spec.name
            );
        }
    }
}

/// Issue 6, acceptance 3: SIGSTOP one rank. The others fail within the collective timeout
/// (`ddp_timeout: 5`) + 5 s, the generation ends naming the stopped rank as the lagging one,
/// the job restarts, resumes from its checkpoint and completes.
#[test]
fn a_stopped_rank_times_out_the_others_and_is_named_as_lagging() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some(HOSTFILE), "30s");
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = training_config_with(&c, "h", "ddp_timeout: 5\n");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps: 30", "max_steps: 40");
    std::fs::write(&cfg, text).unwrap();
    let job = c.submit(
        "h-job.yaml",
        &format!("name: h\nmax_restarts: 1\ntrain: {}\n", cfg.display()),
    );
    let log = c.path("h/trainer_log.jsonl");
    wait_until(Duration::from_secs(600), "step 12", || {
        (losses(&log).len() >= 12).then_some(())
    });
    let pid = wait_until(Duration::from_secs(30), "rank 2's trainer", || {
        trainer_pid(&job, 2, 0)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let stopped = std::time::Instant::now();
    let failure = wait_until(Duration::from_secs(60), "the generation to end", || {
        let st = c.status(&job);
        let f = st["failures"].get(0).cloned()?;
        Some(f)
    });
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_secs(5 + 5),
        "the others failed {took:?} after the stop (timeout 5 s + 5 s)"
    );
    assert_eq!(failure["lagging_rank"], 2, "{failure:#}");
    assert_ne!(
        failure["rank"], 2,
        "the root cause is a rank that timed out: {failure:#}"
    );
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], 1);
    assert_eq!(losses(&log).len(), 40);
}
