//! `deltasync local` against a server that wants TLS and a bearer token:
//! `local sync --cacert --token-file`, as the other client commands take
//! them.

mod common;

use common::{
    auth::principal,
    cluster::DataDir,
    local::{failed, ok, run},
    process::Process,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA and a server certificate for `localhost` it signed: (CA PEM,
/// certificate PEM, key PEM).
fn certificates() -> (String, String, String) {
    let mut ca = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "local-test-ca");
    ca.distinguished_name = name;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

/// Rule: `deltasync local sync` reaches a server over TLS with `--cacert`
/// and authenticates with `--token-file`; without the CA, or without the
/// token, it fails with a one-line reason and keeps the outbox.
#[tokio::test(flavor = "multi_thread")]
async fn local_sync_takes_tls_and_token_flags() {
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = files.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (ca, cert, key) = certificates();
    let (ca, cert, key) = (
        write("ca.pem", &ca),
        write("cert.pem", &cert),
        write("key.pem", &key),
    );
    let auth = write(
        "auth.toml",
        &principal("edge", "s3cret", &[(&["todos"], &["write"])], &[]),
    );
    let token = write("token", "s3cret\n");
    let data = DataDir::new();
    let server = Process::start(
        data.as_ref(),
        &["--tls-cert", &cert, "--tls-key", &key, "--auth-file", &auth],
        |_| {},
    );
    let port = server.addr.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://localhost:{port}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("replica");
    ok(&run(&d, &["init", "--endpoints", &url, "--collection", "todos"]).await);
    ok(&run(&d, &["put", "todos", "milk", r#"{"title": "Buy milk"}"#]).await);

    let no_ca = run(&d, &["sync", "--timeout", "2s", "--token-file", &token]).await;
    failed(&no_ca);
    let no_token = run(&d, &["sync", "--timeout", "2s", "--cacert", &ca]).await;
    let reason = failed(&no_token);
    assert!(reason.contains("UNAUTHENTICATED"), "{reason}");
    assert_eq!(
        ok(&run(&d, &["pending"]).await).len(),
        1,
        "the outbox is kept"
    );

    let synced = ok(&run(
        &d,
        &[
            "sync",
            "--timeout",
            "10s",
            "--cacert",
            &ca,
            "--token-file",
            &token,
        ],
    )
    .await);
    assert_eq!(synced[0]["sync"]["acknowledged"], 1, "{synced:?}");
    assert!(ok(&run(&d, &["pending"]).await).is_empty());
}
