//! TLS over real gRPC: the main port behind `--tls-cert`/`--tls-key`,
//! mTLS with `--tls-client-ca`, principals known by a verified client
//! certificate (SAN URI, SAN DNS name or CN) in the auth file, certificates
//! rotated without a restart, the plaintext `--health-listen` port, and a
//! replica following an `https://` primary with a client certificate.
//!
//! Every certificate is made here with rcgen: a CA, server certificates for
//! `localhost` and 127.0.0.1, client certificates, a second unrelated CA and
//! an expired certificate. In-process servers where possible; real
//! processes for what only a process's log tells (a reload that failed) and
//! for replication. Nothing sleeps to wait: every wait is a bounded poll.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use common::{
    Client, MutationExt,
    auth::{
        Grants, HANG, RELOAD, bearer, free_loopback_addr, health_status, logged,
        principal_known_by, pull_all, push_request, read_until_doc, reflected_services, refused,
        until, until_upstream_denied,
    },
    cluster::{DataDir, Patience, start, start_replica, start_replica_logged},
    process::Process,
    put,
};
use deltasync::{
    Config,
    pb::{
        self, FollowRequest, FollowStart, GetRequest, Outcome, PromoteRequest, PullRequest,
        StatusRequest, admin_service_client::AdminServiceClient, follow_request, follow_response,
        replication_service_client::ReplicationServiceClient,
        sync_service_client::SyncServiceClient,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore},
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::health_check_response::ServingStatus;

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A certificate authority that issues server and client certificates.
struct Ca {
    /// Signs what it issues.
    issuer: Issuer<'static, KeyPair>,
    /// Its self-signed certificate (PEM), what a peer trusts.
    pem: String,
}

/// An issued certificate and its key.
struct Leaf {
    /// The certificate (PEM).
    cert: String,
    /// Its private key (PEM).
    key: String,
    /// The certificate (DER), to tell which one a server presented.
    der: CertificateDer<'static>,
}

/// A subject whose only attribute is the common name `cn`.
fn subject(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

/// A SAN URI, e.g. a SPIFFE id.
fn uri(name: &str) -> SanType {
    SanType::URI(name.try_into().expect("an IA5 URI"))
}

/// A SAN DNS name.
fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("an IA5 DNS name"))
}

impl Ca {
    /// A new CA named `cn`, with a key of its own.
    fn new(cn: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// The parameters of a leaf named `cn` (the only attribute of its
    /// subject) with `sans`, for `usage`.
    fn params(cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(cn);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params
    }

    /// Signs `params` for a new key.
    fn issue(&self, params: &CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, named `cn`.
    fn server(&self, cn: &str) -> Leaf {
        let sans = vec![dns("localhost"), SanType::IpAddress([127, 0, 0, 1].into())];
        self.issue(&Self::params(cn, sans, ExtendedKeyUsagePurpose::ServerAuth))
    }

    /// A client certificate named `cn` with `sans`.
    fn client(&self, cn: &str, sans: Vec<SanType>) -> Leaf {
        self.issue(&Self::params(cn, sans, ExtendedKeyUsagePurpose::ClientAuth))
    }

    /// A client certificate named `cn` that expired long ago.
    fn expired_client(&self, cn: &str) -> Leaf {
        let mut params = Self::params(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.issue(&params)
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// A temporary directory of PEM files and auth files, each written as an
/// operator (or Kubernetes) does: aside, then renamed over, so the server
/// never reads half a file.
struct Files {
    /// Holds the files until the test ends.
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Writes `name` (replacing it at once if it exists) and returns its
    /// path.
    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let aside = self.dir.path().join(format!("{name}.new"));
        std::fs::write(&aside, contents).expect("write file");
        std::fs::rename(&aside, &path).expect("rename file");
        path
    }

    /// Writes `leaf` as `<name>.pem` and `<name>.key`: (cert, key).
    fn leaf(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.pem"), &leaf.cert),
            self.write(&format!("{name}.key"), &leaf.key),
        )
    }
}

/// A path as a command-line argument.
fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// One `[[principal]]` of an auth file known by the certificate identities
/// `certificates`, with one grant per `(collections, permissions)`.
fn principal(name: &str, certificates: &[&str], grants: Grants<'_>) -> String {
    let certificates = format!("certificates = {certificates:?}");
    principal_known_by(name, &certificates, grants, &[])
}

// ---------------------------------------------------------------------------
// Servers and clients
// ---------------------------------------------------------------------------

/// An in-process server on `127.0.0.1:0` with a temporary store; unlike
/// `TestServer` it makes no plaintext connection of its own.
struct Server {
    /// Where it listens.
    addr: SocketAddr,
    /// Holds the store.
    _dir: tempfile::TempDir,
    /// Stops it (also when dropped).
    shutdown: Option<oneshot::Sender<()>>,
    /// The server task.
    task: Option<JoinHandle<Result<(), deltasync::ServeError>>>,
}

impl Server {
    /// A server with settings changed by `configure` (TLS files, auth).
    async fn start(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_data_dir(dir.path().join("store"));
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(deltasync::serve(config, listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Whether the server task ended (with its result), e.g. because it
    /// could not start.
    fn ended(&mut self) -> Option<Result<(), deltasync::ServeError>> {
        let task = self.task.as_ref()?;
        if !task.is_finished() {
            return None;
        }
        let task = self.task.take()?;
        Some(
            futures_util::FutureExt::now_or_never(task)
                .expect("finished")
                .expect("server task"),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A server with TLS on its main port (`server`, a certificate for
/// localhost), and mTLS against `client_ca` if given; `configure` sets the
/// rest.
async fn tls_server(
    files: &Files,
    server: &Leaf,
    client_ca: Option<&Ca>,
    configure: impl FnOnce(&mut Config),
) -> Server {
    let (cert, key) = files.leaf("server", server);
    let client_ca = client_ca.map(|ca| files.write("client-ca.pem", &ca.pem));
    Server::start(|c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.tls_client_ca = client_ca;
        configure(c);
    })
    .await
}

/// What a client trusting only `ca` sends: it checks the server's name is
/// `localhost`.
fn trusting(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost")
}

/// As [`trusting`], presenting `leaf` as its client certificate.
fn presenting(ca: &Ca, leaf: &Leaf) -> ClientTlsConfig {
    trusting(ca).identity(Identity::from_pem(&leaf.cert, &leaf.key))
}

/// An endpoint for `https://localhost:<port of addr>` with `tls`.
fn endpoint(addr: SocketAddr, tls: ClientTlsConfig) -> Endpoint {
    Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("url")
        .connect_timeout(HANG)
        .timeout(HANG)
        .tls_config(tls)
        .expect("a TLS configuration tonic takes")
}

/// A connection to `addr` with `tls`, which must succeed.
async fn channel(addr: SocketAddr, tls: ClientTlsConfig) -> Channel {
    endpoint(addr, tls)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("a TLS connection to {addr}: {e:?}"))
}

/// A SyncService client of `addr` over TLS with `tls`.
async fn client(addr: SocketAddr, tls: ClientTlsConfig) -> Client {
    SyncServiceClient::new(channel(addr, tls).await)
}

/// Asserts that a client of `endpoint` gets no answer from the server: the
/// connection fails, or its first call fails in the client's transport (a
/// server refusing a client certificate says so after the client's part of
/// a TLS 1.3 handshake is done, so the client learns it on its first read;
/// a plaintext client reads a TLS alert as a broken HTTP/2 frame). Never an
/// answer, nor a status a service sent. Returns what the client saw.
async fn assert_refused_at_connection(endpoint: Endpoint, what: &str) -> String {
    let outcome = tokio::time::timeout(HANG, async {
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return format!("connect: {e:?}"),
        };
        match SyncServiceClient::new(channel)
            .pull(PullRequest::default())
            .await
        {
            Ok(page) => panic!("{what}: expected a refused connection, got {page:?}"),
            Err(status) => {
                let transport = std::error::Error::source(&status)
                    .is_some_and(|e| e.is::<tonic::transport::Error>());
                assert!(
                    transport,
                    "{what}: a status from the server, not the transport: {status:?}"
                );
                format!("call: {status:?}")
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| panic!("{what}: neither refused nor answered in {HANG:?}"))
}

/// The certificate the server at `addr` presents to a new TLS handshake
/// for `localhost`, by a raw rustls client trusting `roots`; the error if
/// the handshake fails.
async fn presented(addr: SocketAddr, roots: &[&Ca]) -> Result<CertificateDer<'static>, String> {
    let mut store = RootCertStore::empty();
    for ca in roots {
        let der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("CA PEM");
        store.add(der).expect("a CA rustls takes");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.clone().into_owned())
            .ok_or_else(|| "no certificate presented".to_owned())
    };
    tokio::time::timeout(HANG, handshake)
        .await
        .unwrap_or_else(|_| Err(format!("no handshake in {HANG:?}")))
}

/// Pushes one document and returns the response, failing the test on an
/// error.
async fn push_doc(c: &mut Client, collection: &str, id: &str) -> pb::PushResponse {
    let req = push_request("", vec![put(collection, id, json!({"id": id}))]);
    let response = c.push(req).await.expect("push").into_inner();
    assert_eq!(
        response.results[0].outcome,
        Outcome::Applied as i32,
        "{response:?}"
    );
    response
}

/// The document `collection/id`, which must exist.
async fn get_doc(c: &mut Client, collection: &str, id: &str) -> pb::Document {
    common::get(c, collection, id)
        .await
        .unwrap_or_else(|| panic!("{collection}/{id} exists"))
}

/// The port of a process's `host:port` address.
fn port_of(p: &Process) -> u16 {
    p.addr
        .parse::<SocketAddr>()
        .expect("a socket address")
        .port()
}

// ---------------------------------------------------------------------------
// 1. TLS on the main port
// ---------------------------------------------------------------------------

/// Rule: with `--tls-cert`/`--tls-key`, a client trusting the server's CA
/// calls every service over TLS (sync, replication, admin, health,
/// reflection); a plaintext client and a TLS client that does not trust the
/// server's CA get no answer from any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_calls_every_service_and_others_are_refused() {
    let (ca, stranger) = (Ca::new("deltasync test CA"), Ca::new("another CA"));
    let files = Files::new();
    let server = tls_server(&files, &ca.server("deltasync"), None, |_| {}).await;
    let channel = channel(server.addr, trusting(&ca)).await;

    // SyncService: Push, Get, Pull, Subscribe.
    let mut sync = SyncServiceClient::new(channel.clone());
    let checkpoint = push_doc(&mut sync, "docs", "d1").await.checkpoint;
    assert_eq!(get_doc(&mut sync, "docs", "d1").await.version, 1);
    assert_eq!(pull_all(&mut sync, None, &[]).await.len(), 1);
    let mut stream = common::open_stream(&mut sync, 0).await;
    read_until_doc(&mut stream, "docs", "d1").await;

    // ReplicationService: a follower's first message is answered by a
    // hello.
    let start = FollowRequest {
        request: Some(follow_request::Request::Start(FollowStart {
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        })),
    };
    let mut follow = ReplicationServiceClient::new(channel.clone())
        .follow(futures_util::stream::iter([start]))
        .await
        .expect("follow over TLS")
        .into_inner();
    let hello = tokio::time::timeout(HANG, follow.message())
        .await
        .expect("a hello in time")
        .expect("follow ok")
        .expect("a first message");
    let Some(follow_response::Response::Hello(hello)) = hello.response else {
        panic!("not a hello: {hello:?}");
    };
    assert_eq!(hello.head, checkpoint);
    drop(follow);

    // AdminService: Status, and Promote (refused by the handler: this node
    // is the primary, so the call got through).
    let mut admin = AdminServiceClient::new(channel.clone());
    let status = admin
        .status(StatusRequest {})
        .await
        .expect("status over TLS")
        .into_inner();
    assert_eq!(status.head, checkpoint);
    refused(
        admin.promote(PromoteRequest {}).await,
        Code::FailedPrecondition,
        "Promote on a primary",
    );

    // Health and reflection.
    let health = health_status(channel.clone(), "deltasync.v1.SyncService").await;
    assert_eq!(health, ServingStatus::Serving as i32);
    let names = reflected_services(channel, "reflection over TLS").await;
    assert!(names.contains("deltasync.v1.SyncService"), "{names:?}");

    // A plaintext client, and a TLS client trusting another CA.
    let plaintext = Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect_timeout(HANG)
        .timeout(HANG);
    assert_refused_at_connection(plaintext, "a plaintext client").await;
    let seen = assert_refused_at_connection(
        endpoint(server.addr, trusting(&stranger)),
        "a client that does not trust the server's CA",
    )
    .await;
    assert!(seen.starts_with("connect"), "the handshake fails: {seen}");

    // Those refusals cost the server nothing: it still serves.
    let mut sync = client(server.addr, trusting(&ca)).await;
    push_doc(&mut sync, "docs", "d2").await;
}

// ---------------------------------------------------------------------------
// 2. mTLS
// ---------------------------------------------------------------------------

/// Rule: with `--tls-client-ca`, a client is refused at the handshake
/// unless it presents a valid certificate that CA signed: none, one from
/// another CA, and an expired one from the right CA are refused; a valid
/// one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_only_valid_certificates_of_the_client_ca() {
    let (ca, stranger) = (Ca::new("deltasync test CA"), Ca::new("another CA"));
    let files = Files::new();
    let server = tls_server(&files, &ca.server("deltasync"), Some(&ca), |_| {}).await;

    let alien = stranger.client("alien", vec![uri("spiffe://example.org/orders")]);
    let expired = ca.expired_client("expired");
    for (tls, what) in [
        (trusting(&ca), "a client without a certificate"),
        (
            presenting(&ca, &alien),
            "a client certificate from another CA",
        ),
        (presenting(&ca, &expired), "an expired client certificate"),
    ] {
        assert_refused_at_connection(endpoint(server.addr, tls), what).await;
    }

    let valid = ca.client("orders", vec![uri("spiffe://example.org/orders")]);
    let mut c = client(server.addr, presenting(&ca, &valid)).await;
    push_doc(&mut c, "docs", "d1").await;
    assert_eq!(pull_all(&mut c, None, &[]).await.len(), 1);
}

// ---------------------------------------------------------------------------
// 3. Principals by client certificate
// ---------------------------------------------------------------------------

/// Rule: with an auth file, a call with a verified client certificate and
/// no bearer token is the principal the file names by one of the
/// certificate's identities (a SAN URI, a SAN DNS name, or the CN): its
/// pushes record its name as `updated_by`, and its grants apply
/// (PERMISSION_DENIED outside them). A certificate the file does not name
/// is UNAUTHENTICATED, and so is a call whose bearer token is not valid,
/// whatever certificate it comes with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_the_principal_the_auth_file_names() {
    let ca = Ca::new("deltasync test CA");
    let files = Files::new();
    let auth = files.write(
        "auth.toml",
        &[
            principal(
                "orders",
                &["spiffe://example.org/orders"],
                &[(&["orders", "orders.*"], &["read", "write"])],
            ),
            principal(
                "billing",
                &["billing-service"],
                &[(&["billing"], &["read", "write"])],
            ),
            principal(
                "inventory",
                &["inventory.internal"],
                &[(&["inventory"], &["write"]), (&["orders.*"], &["read"])],
            ),
        ]
        .concat(),
    );
    let server = tls_server(&files, &ca.server("deltasync"), Some(&ca), |c| {
        c.auth_file = Some(auth);
    })
    .await;

    // Each certificate also carries names the file does not know, so only
    // the one it names can decide.
    let by_uri = ca.client(
        "orders-7f9c",
        vec![
            uri("spiffe://example.org/orders"),
            dns("orders-7f9c.pods.internal"),
        ],
    );
    let by_cn = ca.client("billing-service", Vec::new());
    let by_dns = ca.client(
        "inventory-2b1d",
        vec![dns("inventory.internal"), uri("spiffe://example.org/inv")],
    );
    for (leaf, name, own, foreign) in [
        (&by_uri, "orders", "orders.eu", "billing"),
        (&by_cn, "billing", "billing", "orders"),
        (&by_dns, "inventory", "inventory", "billing"),
    ] {
        let mut c = client(server.addr, presenting(&ca, leaf)).await;
        push_doc(&mut c, own, "d1").await;
        let doc = get_doc(&mut c, own, "d1").await;
        assert_eq!(doc.updated_by, name, "the author of a push by {name}");
        let req = push_request("", vec![put(foreign, "d1", json!({"by": name}))]);
        refused(
            c.push(req).await,
            Code::PermissionDenied,
            &format!("{name} writing {foreign}"),
        );
        let read = GetRequest {
            collection: foreign.into(),
            ids: vec!["d1".into()],
            ..Default::default()
        };
        refused(
            c.get(read).await,
            Code::PermissionDenied,
            &format!("{name} reading {foreign}"),
        );
    }
    // A grant of `read` alone does not let inventory write orders, but lets
    // it read them.
    let mut inventory = client(server.addr, presenting(&ca, &by_dns)).await;
    assert_eq!(
        get_doc(&mut inventory, "orders.eu", "d1").await.updated_by,
        "orders"
    );

    // A certificate the CA signed but the file does not name.
    let stranger = ca.client("stranger", vec![uri("spiffe://example.org/stranger")]);
    let mut c = client(server.addr, presenting(&ca, &stranger)).await;
    let req = push_request("", vec![put("orders", "x", json!({}))]);
    refused(
        c.push(req).await,
        Code::Unauthenticated,
        "a push with an unnamed certificate",
    );
    refused(
        c.pull(PullRequest::default()).await,
        Code::Unauthenticated,
        "a pull with an unnamed certificate",
    );

    // A named certificate does not rescue an invalid bearer token.
    let mut orders = client(server.addr, presenting(&ca, &by_uri)).await;
    refused(
        orders
            .pull(bearer("not-a-token", PullRequest::default()))
            .await,
        Code::Unauthenticated,
        "a named certificate with an invalid token",
    );
    let docs = pull_all(&mut orders, None, &[]).await;
    assert_eq!(docs.len(), 1, "orders reads only orders: {docs:?}");
}

// ---------------------------------------------------------------------------
// 4. Rotation without a restart
// ---------------------------------------------------------------------------

/// Rule: replacing the certificate files (renamed over) takes effect for new
/// handshakes within seconds, without a restart, while connections already
/// open are kept (a Subscribe stream made before goes on receiving). A key
/// replaced before its certificate (a pair that does not match for a
/// moment) is not taken: the old pair stays in force and new handshakes
/// succeed until the matching certificate arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (old, new) = (
        old_ca.server("deltasync old"),
        new_ca.server("deltasync new"),
    );
    let files = Files::new();
    let (cert, key) = files.leaf("server", &old);
    let data = DataDir::new();
    let (server, logs) = Process::start_logged_from_launch(
        data.as_ref(),
        &["--tls-cert", arg(&cert), "--tls-key", arg(&key)],
    );
    let addr: SocketAddr = server.addr.parse().expect("a socket address");
    let both = [&old_ca, &new_ca];

    // Before: the old certificate; a client trusting only the new CA fails.
    assert_eq!(presented(addr, &both).await, Ok(old.der.clone()));
    let seen = assert_refused_at_connection(
        endpoint(addr, trusting(&new_ca)),
        "a client of the new CA before the rotation",
    )
    .await;
    assert!(seen.starts_with("connect"), "the handshake fails: {seen}");
    let mut before = client(addr, trusting(&old_ca)).await;
    push_doc(&mut before, "docs", "d1").await;
    let mut stream = common::open_stream(&mut before, 0).await;
    read_until_doc(&mut stream, "docs", "d1").await;

    // The new key alone: the pair does not match; the server says so and
    // keeps the old pair.
    files.write("server.key", &new.key);
    until("the server tries the new key", RELOAD, async || {
        logged(&logs, "ERROR", "TLS certificate not reloaded")
            + logged(&logs, "INFO", "TLS certificate reloaded")
            > 0
    })
    .await;
    assert_eq!(
        logged(&logs, "INFO", "TLS certificate reloaded"),
        0,
        "a certificate and a key that do not match were taken"
    );
    assert_eq!(
        presented(addr, &both).await,
        Ok(old.der.clone()),
        "new handshakes get the old pair"
    );
    let mut meanwhile = client(addr, trusting(&old_ca)).await;
    push_doc(&mut meanwhile, "docs", "d2").await;
    read_until_doc(&mut stream, "docs", "d2").await;

    // Its certificate: new handshakes get it.
    files.write("server.pem", &new.cert);
    until(
        "new handshakes present the new certificate",
        RELOAD,
        async || presented(addr, &both).await == Ok(new.der.clone()),
    )
    .await;
    let mut after = client(addr, trusting(&new_ca)).await;
    push_doc(&mut after, "docs", "d3").await;
    // The stream opened before the rotation, on a connection made with the
    // old certificate, is still open and still receives.
    read_until_doc(&mut stream, "docs", "d3").await;
    assert_eq!(pull_all(&mut before, None, &[]).await.len(), 3);
    until("the server logs the reload", RELOAD, async || {
        logged(&logs, "INFO", "TLS certificate reloaded") > 0
    })
    .await;
    assert_eq!(logged(&logs, "INFO", "TLS certificate reloaded"), 1);
}

// ---------------------------------------------------------------------------
// 5. Plaintext health port
// ---------------------------------------------------------------------------

/// Rule: with TLS, mTLS and an auth file on the main port,
/// `--health-listen` answers `grpc.health.v1.Health/Check` in plaintext
/// without any credential, and serves nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_answers_in_plaintext_without_credentials() {
    let ca = Ca::new("deltasync test CA");
    let files = Files::new();
    let auth = files.write(
        "auth.toml",
        &principal(
            "orders",
            &["spiffe://example.org/orders"],
            &[(&["*"], &["read"])],
        ),
    );
    let health_addr = free_loopback_addr();
    let mut server = tls_server(&files, &ca.server("deltasync"), Some(&ca), |c| {
        c.auth_file = Some(auth);
        c.health_listen = Some(health_addr);
    })
    .await;

    let plaintext = Endpoint::from_shared(format!("http://{health_addr}"))
        .expect("url")
        .connect_timeout(HANG)
        .timeout(HANG);
    let mut connected = None;
    until("the health port accepts connections", HANG, async || {
        if let Some(ended) = server.ended() {
            panic!("the server stopped: {ended:?}");
        }
        connected = plaintext.connect().await.ok();
        connected.is_some()
    })
    .await;
    let channel = connected.expect("connected");
    for service in ["", "deltasync.v1.SyncService"] {
        let status = health_status(channel.clone(), service).await;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    refused(
        SyncServiceClient::new(channel)
            .pull(PullRequest::default())
            .await,
        Code::Unimplemented,
        "SyncService on the health port",
    );
    // The main port still wants a client certificate.
    assert_refused_at_connection(
        endpoint(server.addr, trusting(&ca)),
        "the main port without a client certificate",
    )
    .await;
}

// ---------------------------------------------------------------------------
// 6. A replica of an https:// primary
// ---------------------------------------------------------------------------

/// Rule: a replica follows an `https://` primary that requires client
/// certificates (`--upstream-ca`, `--upstream-cert`, `--upstream-key`) and
/// converges, catching up and then live, when its certificate's identity
/// has `replicate` on `*`; a replica whose certificate's identity lacks it
/// (reading everything is not enough) does not follow: its head stays 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_an_https_primary_with_its_client_certificate() {
    let ca = Ca::new("deltasync test CA");
    let files = Files::new();
    let (cert, key) = files.leaf("server", &ca.server("primary"));
    let ca_file = files.write("ca.pem", &ca.pem);
    let operator = ca.client("operator", vec![uri("spiffe://example.org/operator")]);
    let (replica_cert, replica_key) = files.leaf(
        "replica",
        &ca.client("replica-0", vec![uri("spiffe://example.org/replica")]),
    );
    let (reader_cert, reader_key) = files.leaf("reader", &ca.client("reader-replica", Vec::new()));
    let auth = files.write(
        "auth.toml",
        &[
            principal(
                "operator",
                &["spiffe://example.org/operator"],
                &[(&["*"], &["read", "write", "replicate", "admin"])],
            ),
            principal(
                "replica",
                &["spiffe://example.org/replica"],
                &[(&["*"], &["replicate"])],
            ),
            principal(
                "reader",
                &["reader-replica"],
                &[(&["*"], &["read"]), (&["docs"], &["replicate"])],
            ),
        ]
        .concat(),
    );

    let dirs = [DataDir::new(), DataDir::new(), DataDir::new()];
    let primary = start(
        &dirs[0],
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--tls-client-ca",
            arg(&ca_file),
            "--auth-file",
            arg(&auth),
        ],
    );
    let url = format!("https://localhost:{}", port_of(&primary));
    let primary_addr: SocketAddr = primary.addr.parse().expect("a socket address");
    let operator_channel = channel(primary_addr, presenting(&ca, &operator)).await;
    let mut p = SyncServiceClient::new(operator_channel.clone());
    let mut admin = AdminServiceClient::new(operator_channel);
    for i in 1..=3u64 {
        let req = push_request(
            "w",
            vec![put("docs", &format!("d{i}"), json!({"i": i})).id(i)],
        );
        p.push(req).await.expect("push as the operator");
    }

    let upstream = |cert: &Path, key: &Path| -> Vec<String> {
        [
            "--upstream-ca",
            arg(&ca_file),
            "--upstream-cert",
            arg(cert),
            "--upstream-key",
            arg(key),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let flags = upstream(&replica_cert, &replica_key);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let replica = start_replica(&dirs[1], &url, &flags);
    converged(&mut admin, &mut p, &replica).await;
    // Live, not only caught up.
    p.push(push_request(
        "w",
        vec![put("docs", "d4", json!({"i": 4})).id(4)],
    ))
    .await
    .expect("push as the operator");
    converged(&mut admin, &mut p, &replica).await;
    let docs = pull_all(&mut replica.client().await, None, &[]).await;
    assert!(docs.iter().all(|d| d.updated_by == "operator"), "{docs:?}");

    let flags = upstream(&reader_cert, &reader_key);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (refused_replica, logs) = start_replica_logged(&dirs[2], &url, &flags);
    until_upstream_denied(&logs).await;
    assert_eq!(logged(&logs, "INFO", "following the primary"), 0);
    assert_eq!(refused_replica.status().await.head, 0);
    let replicas: Vec<_> = admin
        .status(StatusRequest {})
        .await
        .expect("status as the operator")
        .into_inner()
        .replicas
        .into_iter()
        .map(|r| r.url)
        .collect();
    assert_eq!(replicas, [replica.url()], "only the replica with replicate");
}

/// Waits until `replica` has the primary's head (asked of `admin`) and
/// then reads as the primary (read by `p`).
async fn converged(admin: &mut AdminServiceClient<Channel>, p: &mut Client, replica: &Process) {
    let head = admin
        .status(StatusRequest {})
        .await
        .expect("the primary's status")
        .into_inner()
        .head;
    let expected = pull_all(p, None, &[]).await;
    let wait = Patience::new(format!("replica {} reaches head {head}", replica.url()));
    while replica.status().await.head != head {
        wait.tick().await;
    }
    let mut r = replica.client().await;
    let wait = Patience::new(format!("replica {} reads as the primary", replica.url()));
    while pull_all(&mut r, None, &[]).await != expected {
        wait.tick().await;
    }
}
