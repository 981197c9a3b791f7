//! `ringctl certs init DIR`: a CA, the coordinator's certificate, agent client certificates and
//! the tokens of a small cluster, so that the secure setup is one command.
//!
//! Written with rcgen (ECDSA P-256). Private keys and tokens are created with mode 0600 and never
//! overwrite an existing file (a second run refuses, naming it), so a CA cannot be replaced by
//! accident under certificates already handed out.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use ringmaster_auth::Pki;

use crate::cli::{CliError, Exit};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Make DIR/{ca.pem, ca-key.pem, coordinator.pem, coordinator-key.pem, agent-NAME.pem,
    /// agent-NAME-key.pem, join-token, operators, admin-token, viewer-token}.
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write to (created; files already there are never overwritten).
    pub dir: PathBuf,
    /// Names and addresses agents, trainers and ringctl dial the coordinator by (repeatable;
    /// `localhost` and `127.0.0.1` are always included).
    #[arg(long = "host", value_name = "NAME|IP")]
    pub hosts: Vec<String>,
    /// Agents to make client certificates for (mutual TLS; repeatable). Default: one, `agent`.
    #[arg(long = "agent", value_name = "NAME")]
    pub agents: Vec<String>,
    /// Validity of the certificates, in days.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

/// Runs `ringctl certs ...`.
///
/// # Errors
/// Bad names or an existing file (exit 2), or a file that cannot be written (exit 1).
pub fn run(cmd: &CertsCommand) -> Result<Exit, CliError> {
    match cmd {
        CertsCommand::Init(a) => init(a),
    }
}

fn check_name(what: &str, n: &str) -> Result<(), CliError> {
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '*'));
    if ok {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "{what} '{n}': expected a DNS name or an IP address"
        )))
    }
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CliError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::usage(format!(
                    "{} already exists: ringctl certs init never overwrites (choose a new directory)",
                    path.display()
                ))
            } else {
                CliError::failed(format!("{}: {e}", path.display()))
            }
        })?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::failed(format!("{}: {e}", path.display())))
}

fn token() -> String {
    let b: [u8; 32] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn rc(e: rcgen::Error) -> CliError {
    CliError::failed(format!("making a certificate: {e}"))
}

fn init(a: &InitArgs) -> Result<Exit, CliError> {
    if a.days == 0 || a.days > 3650 {
        return Err(CliError::usage(format!(
            "--days must be in 1..=3650, got {}",
            a.days
        )));
    }
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    for h in &a.hosts {
        check_name("--host", h)?;
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    let agents: Vec<String> = if a.agents.is_empty() {
        vec!["agent".into()]
    } else {
        a.agents.clone()
    };
    for n in &agents {
        if !crate::spec::is_safe_name(n) {
            return Err(CliError::usage(format!(
                "--agent '{n}': use 1-63 characters of A-Z a-z 0-9 . _ -"
            )));
        }
    }
    // Everything is checked before anything is written.
    let pki = Pki::new(&a.dir);
    let mut files = vec![
        pki.ca(),
        pki.ca_key(),
        pki.coordinator_cert(),
        pki.coordinator_key(),
        pki.join_token(),
        pki.operators(),
        pki.admin_token(),
        pki.viewer_token(),
    ];
    for n in &agents {
        files.push(pki.agent_cert(n));
        files.push(pki.agent_key(n));
    }
    for f in &files {
        if f.exists() {
            return Err(CliError::usage(format!(
                "{} already exists: ringctl certs init never overwrites (choose a new directory)",
                f.display()
            )));
        }
    }
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| CliError::failed(format!("{}: {e}", a.dir.display())))?;

    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(i64::from(a.days));

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own, so that a certificate of another cluster's CA is told apart by name
    // (UnknownIssuer), not only by its signature.
    let ca_id: u32 = rand::random();
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("Ringmaster cluster CA {ca_id:08x}"),
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(rc)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |sans: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(sans).map_err(rc)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.not_before = not_before;
        p.not_after = not_after;
        let key = KeyPair::generate().map_err(rc)?;
        let cert = p.signed_by(&key, &issuer).map_err(rc)?;
        Ok::<_, CliError>((cert.pem(), key.serialize_pem()))
    };
    let (coord_pem, coord_key) = leaf(
        hosts.clone(),
        "ringmaster-coordinator",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;

    write_new(&pki.ca(), ca_cert.pem().as_bytes(), 0o644)?;
    write_new(&pki.ca_key(), ca_key_pem.as_bytes(), 0o600)?;
    write_new(&pki.coordinator_cert(), coord_pem.as_bytes(), 0o644)?;
    write_new(&pki.coordinator_key(), coord_key.as_bytes(), 0o600)?;
    for n in &agents {
        let (pem, key) = leaf(
            vec![n.clone()],
            &format!("ringmaster-agent {n}"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        write_new(&pki.agent_cert(n), pem.as_bytes(), 0o644)?;
        write_new(&pki.agent_key(n), key.as_bytes(), 0o600)?;
    }
    let join = token();
    let admin = token();
    let viewer = token();
    write_new(&pki.join_token(), format!("{join}\n").as_bytes(), 0o600)?;
    write_new(&pki.admin_token(), format!("{admin}\n").as_bytes(), 0o600)?;
    write_new(&pki.viewer_token(), format!("{viewer}\n").as_bytes(), 0o600)?;
    write_new(
        &pki.operators(),
        format!(
            "# ROLE NAME TOKEN — the coordinator's --operator-token-file\nadmin admin {admin}\nviewer viewer {viewer}\n"
        )
        .as_bytes(),
        0o600,
    )?;
    let dir = a.dir.display();
    println!(
        "wrote a CA, certificates and tokens to {dir} (names: {})",
        hosts.join(", ")
    );
    println!();
    println!(
        "coordinator --join-token-file {dir}/join-token --operator-token-file {dir}/operators \\"
    );
    println!(
        "    --tls-cert {dir}/coordinator.pem --tls-key {dir}/coordinator-key.pem --tls-client-ca {dir}/ca.pem"
    );
    println!(
        "agent --join COORDINATOR:29500 --join-token-file {dir}/join-token --tls-ca {dir}/ca.pem \\"
    );
    println!(
        "    --tls-cert {dir}/agent-{0}.pem --tls-key {dir}/agent-{0}-key.pem",
        agents[0]
    );
    println!(
        "ringctl --coordinator COORDINATOR:29500 --token-file {dir}/admin-token --tls-ca {dir}/ca.pem jobs"
    );
    println!();
    println!(
        "Copy ca.pem to every machine; keep *-key.pem and the tokens readable only by their users."
    );
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_usable_set_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("pki");
        let args = InitArgs {
            dir: d.clone(),
            hosts: vec!["coord.example".into(), "10.0.0.1".into()],
            agents: vec!["w0".into(), "w1".into()],
            days: 30,
        };
        assert_eq!(init(&args).unwrap(), Exit::Ok);
        for f in [
            "ca.pem",
            "coordinator.pem",
            "agent-w0.pem",
            "agent-w1-key.pem",
            "operators",
        ] {
            assert!(d.join(f).is_file(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt;
        for f in [
            "ca-key.pem",
            "coordinator-key.pem",
            "join-token",
            "admin-token",
        ] {
            let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        // The files are what the coordinator and clients load.
        let ops = ringmaster_auth::credentials::read_operator_tokens(&d.join("operators")).unwrap();
        assert_eq!(ops.len(), 2);
        ringmaster_auth::credentials::read_token_file(&d.join("join-token")).unwrap();
        Pki::new(&d).server_tls().load().unwrap();
        // A second run refuses and changes nothing.
        let before = std::fs::read(d.join("ca.pem")).unwrap();
        let e = init(&args).unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
        assert!(e.message.contains("already exists"), "{}", e.message);
        assert_eq!(std::fs::read(d.join("ca.pem")).unwrap(), before);
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = InitArgs {
            dir: dir.path().join("x"),
            hosts: vec!["bad host".into()],
            agents: vec![],
            days: 30,
        };
        assert_eq!(init(&args).unwrap_err().exit, Exit::Usage);
        args.hosts.clear();
        args.agents = vec!["../x".into()];
        assert_eq!(init(&args).unwrap_err().exit, Exit::Usage);
        assert!(!dir.path().join("x").exists());
    }
}
