//! Where jobs and agents may write, end to end with the real binaries (issue 16, items 3–4):
//! one agent per work dir, workers in their generation directory, `output_dir` and `workdir:`
//! inside the allowed roots, checkpoint manifests that name only files of their directory, and
//! at most 1024 slots per agent.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use ringmaster_tests::{Cluster, alive, bin, wait_until};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Acceptance: a second agent on a locked work dir exits 2 naming the holder and kills nothing;
/// once the holder is SIGKILLed (the kernel drops its lock), a successor starts at once.
#[test]
fn a_second_agent_on_a_work_dir_in_use_exits_2_and_kills_nothing() {
    let mut c = Cluster::start(None, "10s");
    let first = c.start_agent("w0", 1, &[]);
    c.wait_joined(&["w0"]);
    let pidfile = c.path("worker.pid");
    let job = c.submit(
        "sleep.yaml",
        &format!(
            "name: sleeper\ncommand: [sh, -c, 'echo $$ > {}; exec sleep 300']\n",
            pidfile.display()
        ),
    );
    c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    let worker: u32 = wait_until(Duration::from_secs(10), "the worker's pid", || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });

    let second = c.start_agent("w0", 1, &[]);
    assert_eq!(c.agents[second].wait_exit(Duration::from_secs(20)), Some(2));
    let log = c.agents[second].log_text();
    let work = c.path("work-w0").canonicalize().unwrap();
    let want = format!(
        "work dir {} locked by pid {}",
        work.display(),
        c.agents[first].pid()
    );
    assert!(log.contains(&want), "{log:?} lacks {want:?}");
    assert!(!log.contains("killing"), "{log}");
    assert!(alive(worker), "the first agent's worker was killed");
    assert_eq!(c.status(&job)["state"], "RUNNING");

    // A SIGKILLed holder does not block its successor (its worker dies with it: PDEATHSIG).
    c.agents[first].signal(Signal::SIGKILL);
    c.agents[first].wait_exit(Duration::from_secs(5));
    wait_until(
        Duration::from_secs(10),
        "the worker to die with its agent",
        || (!alive(worker)).then_some(()),
    );
    let third = c.start_agent("w0", 1, &[]);
    wait_until(
        Duration::from_secs(20),
        "the successor to hold the lock",
        || {
            let text = std::fs::read_to_string(work.join("agent.lock")).ok()?;
            (text.trim() == c.agents[third].pid().to_string()).then_some(())
        },
    );
    assert_eq!(c.agents[third].wait_exit(Duration::from_millis(300)), None);
}

/// Workers start in their generation directory, or in the job's `workdir:` when it is inside
/// the allowed roots; a `workdir:` or `output_dir` outside them (or a system directory) starts
/// nothing: refused at submit where the coordinator can tell, else the job ends FAILED with the
/// agent's message naming the field, the path and the roots.
#[test]
fn workers_start_in_their_directory_and_writes_stay_inside_the_allowed_roots() {
    let mut c = Cluster::start(None, "10s");
    c.start_agent("w0", 1, &[]);
    c.wait_joined(&["w0"]);
    let work = c.path("work-w0").canonicalize().unwrap();
    let out = c.path("pwd.txt");

    let job = c.submit(
        "pwd.yaml",
        &format!("name: pwd\ncommand: [sh, -c, 'pwd > {}']\n", out.display()),
    );
    c.wait_state(&job, &["SUCCEEDED"], Duration::from_secs(30));
    let pwd = std::fs::read_to_string(&out).unwrap();
    assert_eq!(pwd.trim(), work.join(&job).join("gen-0").to_str().unwrap());

    let wd = c.path("wd");
    std::fs::create_dir_all(&wd).unwrap();
    let job = c.submit(
        "wd.yaml",
        &format!(
            "name: wd\nworkdir: {}\ncommand: [sh, -c, 'pwd > {}']\n",
            wd.display(),
            out.display()
        ),
    );
    c.wait_state(&job, &["SUCCEEDED"], Duration::from_secs(30));
    let pwd = std::fs::read_to_string(&out).unwrap();
    assert_eq!(pwd.trim(), wd.canonicalize().unwrap().to_str().unwrap());

    // Refused at submit: a system directory, a relative workdir.
    for (file, spec, want) in [
        (
            "etc.yaml",
            "name: etc\ntrain: {stage: sft, output_dir: /etc/x}\n",
            "`output_dir: /etc/x` is a system directory",
        ),
        (
            "rel.yaml",
            "name: rel\nworkdir: some/dir\ncommand: [pwd]\n",
            "`workdir: some/dir`: must be an absolute path",
        ),
    ] {
        let p = c.path(file);
        std::fs::write(&p, spec).unwrap();
        let res = c.ringctl(&["submit", p.to_str().unwrap()]);
        assert_eq!(res.status.code(), Some(2), "{}", text(&res));
        assert!(text(&res).contains(want), "{}", text(&res));
    }
    let jobs = c.ringctl(&["jobs", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");

    // Outside the agent's roots: only the agent can tell; the job fails without starting.
    let elsewhere = tempfile::Builder::new()
        .prefix("ringmaster-elsewhere-")
        .tempdir()
        .unwrap();
    let outside = elsewhere.path().join("run");
    let job = c.submit(
        "outside.yaml",
        &format!(
            "name: outside\ntrain: {{stage: sft, output_dir: {}}}\n",
            outside.display()
        ),
    );
    let st = c.wait_state(&job, &["FAILED", "SUCCEEDED"], Duration::from_secs(30));
    assert_eq!(st["state"], "FAILED", "{st:#}");
    let msg = st["failure"]["message"].as_str().unwrap_or_default();
    let root = c.dir.path().canonicalize().unwrap();
    assert!(
        msg.contains(&format!("output_dir: {}", outside.display()))
            && msg.contains("outside the allowed roots")
            && msg.contains(root.to_str().unwrap()),
        "{st:#}"
    );
    assert!(!outside.exists(), "nothing was written there");
    assert!(!work.join(&job).join("gen-0/train.yaml").exists());

    let job = c.submit(
        "wd-out.yaml",
        &format!(
            "name: wdout\nworkdir: {}\ncommand: [pwd]\n",
            elsewhere.path().display()
        ),
    );
    let st = c.wait_state(&job, &["FAILED", "SUCCEEDED"], Duration::from_secs(30));
    let msg = st["failure"]["message"].as_str().unwrap_or_default();
    assert!(
        st["state"] == "FAILED" && msg.contains("workdir") && msg.contains("outside"),
        "{st:#}"
    );
}

/// A checkpoint whose manifest names `../../x` as a shard: `trainer export` and a resume both
/// refuse it naming the manifest and the entry, and a resume point outside `output_dir`
/// (what a forged checkpoint report would hand the next generation) is refused too.
#[test]
fn manifest_entries_and_resume_points_outside_their_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ckpt = out.join("checkpoint-2");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(dir.path().join("x"), b"not a shard").unwrap();
    let manifest = serde_json::json!({
        "format": 1, "step": 2, "world": 1, "shard_group": 1, "plan": "ddp", "stage": 0,
        "global_batch": 16, "seed": 0, "trainable": "full", "adam_step": 2, "scaler": null,
        "units": [],
        "shards": [{"shard": 0, "file": "../../x", "sha256": "00", "bytes": 11}],
    });
    std::fs::write(ckpt.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(ckpt.join("COMMITTED"), "2\n").unwrap();
    let want = format!(
        "{}: shard 0 entry `file: ../../x` is not a plain file name",
        ckpt.join("manifest.json").display()
    );

    let exported = dir.path().join("exported");
    let res = Command::new(bin("trainer"))
        .arg("export")
        .arg(&ckpt)
        .arg("--out")
        .arg(&exported)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2), "{}", text(&res));
    assert!(text(&res).contains(&want), "{}", text(&res));

    let ex = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let config = |extra: &str| {
        let p = dir.path().join("t.yaml");
        std::fs::write(
            &p,
            format!(
                "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\n\
                 finetuning_type: full\ndataset: addition_train\ndataset_dir: {d}\n\
                 template: default\ncutoff_len: 64\noutput_dir: {o}\n\
                 per_device_train_batch_size: 16\nmax_steps: 4\nmax_samples: 256\n{extra}",
                m = ex.join("model").display(),
                d = ex.join("data").display(),
                o = out.display(),
            ),
        )
        .unwrap();
        p
    };
    let trainer = |cfg: &std::path::Path, resume_env: Option<&std::path::Path>| {
        let mut cmd = Command::new(bin("trainer"));
        cmd.arg(cfg)
            .env_remove("RANK")
            .env_remove("RINGMASTER_COORDINATOR")
            .env_remove("RINGMASTER_RESUME_FROM");
        if let Some(p) = resume_env {
            cmd.env("RINGMASTER_RESUME_FROM", p);
        }
        cmd.output().unwrap()
    };
    let res = trainer(
        &config(&format!("resume_from_checkpoint: {}\n", ckpt.display())),
        None,
    );
    assert!(!res.status.success(), "{}", text(&res));
    assert!(text(&res).contains(&want), "{}", text(&res));

    // The same checkpoint copied outside output_dir, handed over as the resume point.
    let foreign = dir.path().join("foreign/checkpoint-2");
    std::fs::create_dir_all(&foreign).unwrap();
    for f in ["manifest.json", "COMMITTED"] {
        std::fs::copy(ckpt.join(f), foreign.join(f)).unwrap();
    }
    let res = trainer(&config(""), Some(&foreign));
    assert!(!res.status.success(), "{}", text(&res));
    assert!(
        text(&res).contains(&format!("RINGMASTER_RESUME_FROM={} ", foreign.display()))
            && text(&res).contains("is not a checkpoint inside output_dir"),
        "{}",
        text(&res)
    );
}

/// At most 1024 slots per agent: the agent's flag, and a raw Join that no agent would send.
#[test]
fn more_than_1024_slots_are_refused_by_the_agent_and_the_coordinator() {
    let mut c = Cluster::start(None, "10s");
    let i = c.start_agent("big", 1025, &[]);
    assert_eq!(c.agents[i].wait_exit(Duration::from_secs(20)), Some(2));
    let log = c.agents[i].log_text();
    assert!(
        log.contains("--slots 1025 is above the limit of 1024 slots per agent"),
        "{log}"
    );

    let token = std::fs::read_to_string(&c.token_file).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        use ringmaster_proto as pb;
        // The cluster's own TLS settings and agent certificate, and the join token.
        let pki = c.pki.clone().expect("the cluster runs TLS");
        let tls = ringmaster_auth::ClientTls {
            ca: Some(pki.join("ca.pem")),
            domain: None,
            identity: Some((pki.join("agent-agent.pem"), pki.join("agent-agent-key.pem"))),
        };
        let ch = ringmaster_auth::client::connect(&c.addr, &tls, Duration::from_secs(5))
            .await
            .unwrap();
        let mut client = pb::agent_service_client::AgentServiceClient::with_interceptor(
            ch,
            ringmaster_auth::Bearer::new(Some(token.trim())).unwrap(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Join(pb::Join {
                name: "big".into(),
                slots: 1025,
                version: pb::PROTOCOL_VERSION.into(),
                token: token.trim().into(),
                incarnation: "raw".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let r = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let status = match r {
            Err(s) => s,
            Ok(resp) => resp
                .into_inner()
                .message()
                .await
                .expect_err("a Join with 1025 slots must be refused"),
        };
        drop(tx);
        status
    });
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("announces 1025 slots, above the limit of 1024 slots per agent"),
        "{status:?}"
    );
    let nodes = c.nodes();
    assert!(
        !nodes
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["name"] == "big")),
        "{nodes:#}"
    );
}
