//! Issue 16's acceptance for credentials and TLS, with real binaries on loopback: every RPC
//! refuses a caller without the right credential and nothing starts; viewers cannot change
//! anything; worker credentials open only their own generation; forged checkpoint reports are
//! ignored; TLS keeps the token off the wire and agents refuse a coordinator they cannot verify.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringmaster_auth::{AuthChannel, Bearer, ClientTls};
use ringmaster_proto as pb;
use ringmaster_tests::{Cluster, ClusterOpts, Proc, bin, certs_init, wait_until};
use tonic::Code;

const ADMIN: &str = "admin-token-0123456789abcdef";
const VIEWER: &str = "viewer-token-0123456789abcdef";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A raw gRPC channel to the cluster's coordinator (its CA when it runs TLS), with `token` (if
/// any) on every call.
async fn channel(c: &Cluster, token: Option<&str>) -> AuthChannel {
    let tls = ClientTls {
        ca: c.pki.as_ref().map(|p| p.join("ca.pem")),
        ..Default::default()
    };
    let ch = ringmaster_auth::client::connect(&c.addr, &tls, Duration::from_secs(5))
        .await
        .unwrap();
    tonic::service::interceptor::InterceptedService::new(ch, Bearer::new(token).unwrap())
}

fn jobs(ch: &AuthChannel) -> pb::job_service_client::JobServiceClient<AuthChannel> {
    pb::job_service_client::JobServiceClient::new(ch.clone())
}

fn rdzv(ch: &AuthChannel) -> pb::rendezvous_service_client::RendezvousServiceClient<AuthChannel> {
    pb::rendezvous_service_client::RendezvousServiceClient::new(ch.clone())
}

fn scope(job: &str, generation: u64) -> Option<pb::Scope> {
    Some(pb::Scope {
        job_id: job.into(),
        generation,
    })
}

/// Every rendezvous method (and a progress report claiming a checkpoint) with `ch`: the codes.
async fn rendezvous_codes(ch: &AuthChannel, job: &str, generation: u64) -> Vec<(String, Code)> {
    let mut r = rdzv(ch);
    let sc = || scope(job, generation);
    let code = |res: Result<(), tonic::Status>| res.err().map(|e| e.code()).unwrap_or(Code::Ok);
    let mut out = vec![
        (
            "Set".into(),
            code(
                r.set(pb::SetRequest {
                    scope: sc(),
                    key: "k".into(),
                    value: b"v".to_vec(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Get".into(),
            code(
                r.get(pb::GetRequest {
                    scope: sc(),
                    key: "k".into(),
                    wait_ms: 0,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Add".into(),
            code(
                r.add(pb::AddRequest {
                    scope: sc(),
                    key: "n".into(),
                    delta: 1,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "CompareAndSet".into(),
            code(
                r.compare_and_set(pb::CompareAndSetRequest {
                    scope: sc(),
                    key: "c".into(),
                    expected: None,
                    desired: b"x".to_vec(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Delete".into(),
            code(
                r.delete(pb::DeleteRequest {
                    scope: sc(),
                    key: "k".into(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Barrier".into(),
            code(
                r.barrier(pb::BarrierRequest {
                    scope: sc(),
                    name: "b".into(),
                    rank: 0,
                    world_size: 1,
                    timeout_ms: 100,
                })
                .await
                .map(drop),
            ),
        ),
    ];
    let report = pb::Progress {
        scope: sc(),
        rank: 0,
        step: 7,
        committed_checkpoint: Some(pb::CheckpointRef {
            step: 7,
            path: "/tmp/forged-checkpoint".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let res = r
        .report_progress(tokio_stream::iter(vec![report]))
        .await
        .map(drop);
    out.push(("ReportProgress".into(), code(res)));
    out
}

/// A job whose single rank writes its environment to `out/env-<generation>` and sleeps.
fn env_job(out: &Path) -> String {
    format!(
        "name: envsleep\ncommand: [sh, -c, 'env > {o}/env-$RINGMASTER_GENERATION; sleep 300']\n",
        o = out.display()
    )
}

fn worker_env(out: &Path, generation: u64) -> std::collections::BTreeMap<String, String> {
    let p = out.join(format!("env-{generation}"));
    wait_until(Duration::from_secs(20), "the worker's environment", || {
        let t = std::fs::read_to_string(&p).ok()?;
        t.contains("RINGMASTER_WORKER_TOKEN=").then_some(())
    });
    ringmaster_tests::parse_env(&std::fs::read_to_string(&p).unwrap())
}

#[test]
fn every_rpc_needs_the_right_credential_and_nothing_starts_without_one() {
    let c0 = tempfile::tempdir().unwrap();
    let ops = c0.path().join("operators");
    std::fs::write(&ops, format!("admin alice {ADMIN}\nviewer bob {VIEWER}\n")).unwrap();
    let mut c = Cluster::start_with(
        Some("w0 slots=1\n"),
        "10s",
        ClusterOpts {
            coordinator_args: vec!["--operator-token-file".into(), ops.display().to_string()],
            ..Default::default()
        },
    );
    let admin_file = c.path("admin-token");
    std::fs::write(&admin_file, ADMIN).unwrap();
    let viewer_file = c.path("viewer-token");
    std::fs::write(&viewer_file, VIEWER).unwrap();
    c.start_agent("w0", 1, &[]);
    let ringctl_as = |token: Option<&Path>, args: &[&str]| {
        let mut cmd = c.ringctl_cmd();
        cmd.env_remove("RINGMASTER_TOKEN_FILE");
        if let Some(t) = token {
            cmd.arg("--token-file").arg(t);
        }
        cmd.args(args).output().unwrap()
    };
    wait_until(Duration::from_secs(30), "w0 to join", || {
        let out = ringctl_as(Some(&admin_file), &["nodes", "--output", "json"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("JOINED")
            .then_some(())
    });

    let out_dir = c.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let marker = out_dir.join("ran");
    let spec = c.path("job.yaml");
    std::fs::write(
        &spec,
        format!("command: [sh, -c, 'touch {}']\n", marker.display()),
    )
    .unwrap();
    let spec = spec.to_str().unwrap();

    // ringctl without a credential, with the join token (not an operator credential once an
    // operator file is configured) and with a viewer token: refused, exit 2, one clear line.
    for (who, token) in [
        ("nobody", None),
        ("join token", Some(c.token_file.as_path())),
        ("viewer", Some(viewer_file.as_path())),
    ] {
        let out = ringctl_as(token, &["submit", spec]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{who}: {err}");
        assert!(
            err.contains("not authenticated") || err.contains("permission denied"),
            "{who}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{who}: {err}");
    }
    // Reads: nothing without a credential, a viewer may.
    let out = ringctl_as(None, &["jobs"]);
    assert_eq!(out.status.code(), Some(2));
    let out = ringctl_as(Some(&viewer_file), &["jobs", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    let rt = rt();
    rt.block_on(async {
        // Raw gRPC, no credential: every JobService method.
        let anon = channel(&c, None).await;
        let mut j = jobs(&anon);
        let submit = pb::SubmitRequest {
            spec_json:
                serde_json::json!({"command": ["sh", "-c", format!("touch {}", marker.display())]})
                    .to_string(),
            files: Default::default(),
        };
        let codes = [
            j.submit(submit.clone()).await.map(drop),
            j.get(pb::GetJobRequest {
                job_id: "job-1".into(),
            })
            .await
            .map(drop),
            j.list(pb::ListJobsRequest {}).await.map(drop),
            j.watch(pb::WatchRequest {
                job_id: "job-1".into(),
            })
            .await
            .map(drop),
            j.cancel(pb::CancelRequest {
                job_id: "job-1".into(),
                grace_ms: 0,
            })
            .await
            .map(drop),
            j.checkpoint(pb::CheckpointRequest {
                job_id: "job-1".into(),
            })
            .await
            .map(drop),
            j.nodes(pb::NodesRequest {}).await.map(drop),
            j.logs(pb::LogsRequest {
                job_id: "job-1".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ];
        for (i, r) in codes.into_iter().enumerate() {
            assert_eq!(
                r.unwrap_err().code(),
                Code::Unauthenticated,
                "JobService call {i}"
            );
        }
        // A wrong token is no better.
        let wrong = channel(&c, Some("wrong-token-0123456789")).await;
        let e = jobs(&wrong).submit(submit.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        // The viewer reads but cannot change anything.
        let viewer = channel(&c, Some(VIEWER)).await;
        jobs(&viewer).list(pb::ListJobsRequest {}).await.unwrap();
        jobs(&viewer).nodes(pb::NodesRequest {}).await.unwrap();
        let e = jobs(&viewer).submit(submit.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    });
    // Nothing of all that made a job (a refused call returns before the loop sees it), so the
    // agent was never asked to start anything: no job directory in its work dir, no worker.
    let out = ringctl_as(Some(&admin_file), &["jobs", "--output", "json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let work = c.path("work-w0");
    let job_dirs: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(job_dirs.is_empty(), "the agent made {job_dirs:?}");
    assert!(!marker.exists(), "a refused submit started a worker");
    let nodes = ringctl_as(Some(&admin_file), &["nodes", "--output", "json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(nodes[0]["running_workers"], 0, "{nodes:#}");

    // The admin submits a job; the viewer cannot cancel it.
    let env_spec = c.path("env.yaml");
    std::fs::write(&env_spec, env_job(&out_dir)).unwrap();
    let out = ringctl_as(
        Some(&admin_file),
        &["submit", env_spec.to_str().unwrap(), "--output", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let env = worker_env(&out_dir, 0);
    let worker_token = env["RINGMASTER_WORKER_TOKEN"].clone();
    assert!(env.contains_key("RINGMASTER_TLS_CA"), "{env:?}");
    let out = ringctl_as(Some(&viewer_file), &["cancel", &id]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let st = ringctl_as(Some(&viewer_file), &["status", &id, "--output", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["state"], "RUNNING");

    rt.block_on(async {
        // The rendezvous store and progress stream: nobody but this generation's workers.
        for (who, token) in [
            ("no credential", None),
            ("join token", Some("s3cret-token-0123456789")),
            ("admin", Some(ADMIN)),
            (
                "forged worker credential",
                Some(&*format!("rmw1.{id}.0.{}", "0".repeat(64))),
            ),
        ] {
            let ch = channel(&c, token).await;
            for (method, code) in rendezvous_codes(&ch, &id, 0).await {
                assert!(
                    matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{who}: {method} answered {code:?}"
                );
            }
        }
        // The worker's own credential opens its generation's store, and only that.
        let ch = channel(&c, Some(&worker_token)).await;
        let mut r = rdzv(&ch);
        r.set(pb::SetRequest {
            scope: scope(&id, 0),
            key: "addr".into(),
            value: b"x".to_vec(),
        })
        .await
        .unwrap();
        for (method, code) in rendezvous_codes(&ch, &id, 1).await {
            assert_eq!(code, Code::PermissionDenied, "generation 1: {method}");
        }
        for (method, code) in rendezvous_codes(&ch, "other-9", 0).await {
            assert_eq!(code, Code::PermissionDenied, "another job: {method}");
        }
        // With its own credential, a worker's report of a checkpoint outside the job's
        // output_dir (a command job has none) is not recorded.
        let codes = rendezvous_codes(&ch, &id, 0).await;
        assert!(codes.iter().all(|(_, c)| *c == Code::Ok), "{codes:?}");
    });
    let st = ringctl_as(Some(&viewer_file), &["status", &id, "--output", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(st["last_checkpoint"].is_null(), "{st:#}");
    let out = ringctl_as(Some(&admin_file), &["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn without_credentials_the_coordinator_serves_only_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let port = ringmaster_tests::free_port();
    let out = std::process::Command::new(bin("coordinator"))
        .args(["--listen", &format!("0.0.0.0:{port}"), "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("credential"),
        "{err}"
    );
    // --insecure accepts the risk, and says so.
    let mut cmd = std::process::Command::new(bin("coordinator"));
    cmd.args([
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--insecure",
        "--data-dir",
    ])
    .arg(dir.path().join("data"));
    let mut p = Proc::spawn("coordinator", cmd, dir.path().join("c.log"));
    wait_until(Duration::from_secs(20), "the insecure coordinator", || {
        p.log_text()
            .contains("no credential configured")
            .then_some(())
    });
    assert_eq!(p.wait_exit(Duration::from_millis(10)), None);
}

/// A TCP relay that records every byte in both directions.
struct Recorder {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
}

fn record(target: String) -> Recorder {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    Recorder { addr, seen }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn tls_keeps_the_token_off_the_wire_and_agents_verify_the_coordinator() {
    let token = b"s3cret-token-0123456789";
    for tls in [false, true] {
        let mut c = Cluster::start_with(
            Some("w0 slots=1\n"),
            "10s",
            ClusterOpts {
                tls,
                ..Default::default()
            },
        );
        let relay = record(c.addr.clone());
        let direct = std::mem::replace(&mut c.addr, relay.addr.clone());
        c.start_agent("w0", 1, &[]);
        c.wait_joined(&["w0"]);
        let out_dir = c.path("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        let id = c.submit("env.yaml", &env_job(&out_dir));
        worker_env(&out_dir, 0);
        let out = c.ringctl(&["cancel", &id]);
        assert!(out.status.success(), "{out:?}");
        let seen = relay.seen.lock().unwrap().clone();
        assert!(seen.len() > 1000, "the relay saw the traffic");
        // The positive control: in plaintext the token is there to read.
        assert_eq!(contains(&seen, token), !tls, "tls={tls}");
        c.addr = direct;
    }

    // An agent refuses a coordinator whose certificate does not chain to its CA: it exits 2
    // naming the reason and starts nothing.
    let mut c = Cluster::start(Some("w0 slots=1\n"), "10s");
    let other = c.path("other-pki");
    certs_init(&other);
    let ca = other.join("ca.pem");
    let i = c.start_agent(
        "w0",
        1,
        &[
            "--tls-ca",
            ca.to_str().unwrap(),
            "--tls-cert",
            other.join("agent-agent.pem").to_str().unwrap(),
            "--tls-key",
            other.join("agent-agent-key.pem").to_str().unwrap(),
        ],
    );
    assert_eq!(c.agents[i].wait_exit(Duration::from_secs(20)), Some(2));
    let log = c.agents[i].log_text();
    assert!(log.contains("does not chain"), "{log}");

    // Mutual TLS: an agent without a client certificate is refused.
    let pki = c.pki.clone().unwrap();
    let i = c.start_agent("w0", 1, &["--tls-ca", pki.join("ca.pem").to_str().unwrap()]);
    assert_eq!(c.agents[i].wait_exit(Duration::from_secs(20)), Some(2));
    let log = c.agents[i].log_text();
    assert!(log.contains("client certificate"), "{log}");

    // ringctl with a CA refuses a plaintext coordinator instead of falling back.
    let plain = Cluster::start_with(
        None,
        "10s",
        ClusterOpts {
            tls: false,
            ..Default::default()
        },
    );
    let out = plain
        .ringctl_cmd()
        .arg("--tls-ca")
        .arg(pki.join("ca.pem"))
        .arg("jobs")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

#[test]
fn workers_run_as_the_worker_user_and_cannot_read_the_agents_secrets() {
    if !nix::unistd::geteuid().is_root() {
        // Switching users needs root; CI runs as root.
        eprintln!("needs root to switch to another user; not run");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start(Some("w0 slots=1\n"), "10s");
    // The worker user may pass through the test directory to its generation directory and
    // write its results, nothing more.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = c.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    c.start_agent("w0", 1, &["--worker-user", "nobody"]);
    c.wait_joined(&["w0"]);
    let pki = c.pki.clone().unwrap();
    let id = c.submit(
        "as-nobody.yaml",
        &format!(
            "command: [sh, -c, 'id -u > {o}/uid; pwd > {o}/cwd; cat {t} {k} > {o}/leak 2> {o}/err; touch here && echo done > {o}/done']\n",
            o = out.display(),
            t = c.token_file.display(),
            k = pki.join("agent-agent-key.pem").display(),
        ),
    );
    wait_until(Duration::from_secs(20), "the worker to finish", || {
        out.join("done").exists().then_some(())
    });
    let uid = std::fs::read_to_string(out.join("uid")).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert_eq!(uid.trim(), nobody.to_string());
    assert_eq!(
        std::fs::read(out.join("leak")).unwrap(),
        b"",
        "the worker read a secret"
    );
    let err = std::fs::read_to_string(out.join("err")).unwrap();
    assert!(err.contains("Permission denied"), "{err}");
    // It ran, and wrote, in its own generation directory.
    let cwd = std::fs::read_to_string(out.join("cwd")).unwrap();
    assert!(cwd.trim().ends_with(&format!("{id}/gen-0")), "{cwd}");
    c.wait_state(&id, &["SUCCEEDED"], Duration::from_secs(20));

    // An agent asked to run workers as root refuses to start.
    let i = c.start_agent("w0", 1, &["--worker-user", "root"]);
    assert_eq!(c.agents[i].wait_exit(Duration::from_secs(20)), Some(2));
    assert!(c.agents[i].log_text().contains("must not run as root"));
}

/// What a reflection request answers with `token`: the service names, or the status.
async fn reflect(
    c: &Cluster,
    token: Option<&str>,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> Result<tonic_reflection::pb::v1::server_reflection_response::MessageResponse, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let mut client = ServerReflectionClient::new(channel(c, token).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let answer = answers.message().await?.expect("one answer");
    Ok(answer.message_response.expect("an answer with a response"))
}

/// gRPC reflection (what `grpcurl list` and `grpcurl describe` use) shows every service and its
/// schema to an operator credential (a viewer's is enough) and nothing to a caller without one.
#[test]
fn grpc_reflection_shows_the_services_to_operators_only() {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let c0 = tempfile::tempdir().unwrap();
    let ops = c0.path().join("operators");
    std::fs::write(&ops, format!("admin alice {ADMIN}\nviewer bob {VIEWER}\n")).unwrap();
    let c = Cluster::start_with(
        None,
        "10s",
        ClusterOpts {
            coordinator_args: vec!["--operator-token-file".into(), ops.display().to_string()],
            ..Default::default()
        },
    );
    rt().block_on(async {
        let list = || MessageRequest::ListServices(String::new());
        let Ok(MessageResponse::ListServicesResponse(l)) = reflect(&c, Some(VIEWER), list()).await
        else {
            panic!("no service list");
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        for want in [
            "ringmaster.v1.AgentService",
            "ringmaster.v1.RendezvousService",
            "ringmaster.v1.JobService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        let describe = MessageRequest::FileContainingSymbol("ringmaster.v1.JobService".into());
        let Ok(MessageResponse::FileDescriptorResponse(f)) =
            reflect(&c, Some(ADMIN), describe).await
        else {
            panic!("no descriptor for JobService");
        };
        assert!(!f.file_descriptor_proto.is_empty());
        let refused = reflect(&c, None, list()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    });
}
