//! The harness of the security tests (`tests/auth.rs`, `tests/tls.rs`,
//! `tests/limits.rs`): auth files written and replaced as an operator does,
//! servers reading them, requests carrying an `authorization` header,
//! refusals checked by code, Pulls of everything, health and reflection
//! asked without a credential, Subscribe streams read up to a document, and
//! bounded polls on a condition or a process's log. Each test binary uses a
//! different part of it (`dead_code` is allowed for all of `common`).
//!
//! Nothing here sleeps a fixed time to wait: every wait is a bounded poll.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use deltasync::{
    auth::token::hash_string,
    pb::{self, PullRequest, PushRequest, subscribe_response::Event},
};
use tokio::time::Instant;
use tonic::{Code, Request, Status, Streaming, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use super::{Client, TestServer, cluster::Patience, process::Logs};

/// Guards against a hung connection, call or stream; never reached when
/// the rule holds.
pub const HANG: Duration = Duration::from_secs(10);

/// How long a changed auth file or certificate may take to be in force
/// (the server checks them every second).
pub const RELOAD: Duration = Duration::from_secs(5);

/// The grants of a principal: one per `(collections, permissions)`.
pub type Grants<'a> = &'a [(&'a [&'a str], &'a [&'a str])];

/// Read and write on `notes`.
pub const NOTES: Grants<'static> = &[(&["notes"], &["write"])];

// ---------------------------------------------------------------------------
// Auth files
// ---------------------------------------------------------------------------

/// One `[[principal]]` of an auth file: `name`, the hash of `token`, one
/// grant per `(collections, permissions)`, and `limits` as the lines of its
/// `[principal.limits]` table (none: no table).
pub fn principal(name: &str, token: &str, grants: Grants<'_>, limits: &[&str]) -> String {
    let tokens = format!("tokens = [{:?}]", hash_string(token));
    principal_known_by(name, &tokens, grants, limits)
}

/// One `[[principal]]` of an auth file: `name`, the line `credentials`
/// that tells how a caller is known (`tokens = [...]` or
/// `certificates = [...]`), one grant per `(collections, permissions)`, and
/// `limits` as the lines of its `[principal.limits]` table (none: no
/// table).
pub fn principal_known_by(
    name: &str,
    credentials: &str,
    grants: Grants<'_>,
    limits: &[&str],
) -> String {
    let mut text = format!("[[principal]]\nname = {name:?}\n{credentials}\n");
    for (collections, permissions) in grants {
        text += &format!(
            "  [[principal.grant]]\n  collections = {collections:?}\n  permissions = {permissions:?}\n"
        );
    }
    if !limits.is_empty() {
        text += "  [principal.limits]\n";
        for line in limits {
            text += &format!("  {line}\n");
        }
    }
    text
}

/// An auth file in a temporary directory, replaced as an operator (or
/// Kubernetes) does: written aside, then renamed over.
pub struct AuthFile {
    /// Holds the file (and its replacements) until the test ends.
    dir: tempfile::TempDir,
    /// The file the server is given.
    pub path: PathBuf,
}

impl AuthFile {
    /// A new file holding `text`.
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("auth.toml");
        std::fs::write(&path, text).expect("write auth file");
        Self { dir, path }
    }

    /// Replaces the file's contents at once (a rename), so the server never
    /// reads half a file.
    pub fn replace(&self, text: &str) {
        let aside = self.dir.path().join("auth.toml.new");
        std::fs::write(&aside, text).expect("write auth file");
        std::fs::rename(&aside, &self.path).expect("rename auth file");
    }

    /// The file's path as a command-line argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

// ---------------------------------------------------------------------------
// Servers, connections and requests
// ---------------------------------------------------------------------------

/// An in-process server reading `auth`.
pub async fn server_with(auth: &AuthFile) -> TestServer {
    let path = auth.path.clone();
    TestServer::start_with(move |c| c.auth_file = Some(path)).await
}

/// A plaintext connection to `addr` that every kind of client can share.
pub async fn channel(addr: impl std::fmt::Display) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// A loopback address with a port free a moment ago: `--health-listen`
/// binds the address it is given, and does not tell a port 0 chose.
pub fn free_loopback_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("local addr")
}

/// Asks health for `service` on `channel`, without a credential.
pub async fn health_status(channel: Channel, service: &str) -> i32 {
    let check = HealthCheckRequest {
        service: service.into(),
    };
    HealthClient::new(channel)
        .check(check)
        .await
        .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
        .into_inner()
        .status
}

/// `message` with an `authorization` header of exactly `header`, or none.
pub fn call<T>(header: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = header {
        let value = value.parse().expect("an ASCII header value");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// `message` carrying `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    call(Some(&format!("Bearer {token}")), message)
}

/// `message` carrying `authorization: Bearer <token>`, or no credential
/// without a `token`.
pub fn as_caller<T>(token: Option<&str>, message: T) -> Request<T> {
    match token {
        Some(token) => bearer(token, message),
        None => Request::new(message),
    }
}

/// The status a call that must fail failed with, checked to be `code`.
pub fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) -> Status {
    match result {
        Ok(answer) => panic!("{what}: expected {code:?}, got {answer:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            status
        }
    }
}

/// A Push of `mutations` by `client_id`, not atomic.
pub fn push_request(client_id: &str, mutations: Vec<pb::Mutation>) -> PushRequest {
    PushRequest {
        client_id: client_id.into(),
        mutations,
        atomic: false,
    }
}

/// Everything a Pull from 0 of `collections` (none: all the caller may
/// read) returns, page by page, as `token` (none: without a credential).
pub async fn pull_all(
    c: &mut Client,
    token: Option<&str>,
    collections: &[&str],
) -> Vec<pb::Document> {
    let mut documents = Vec::new();
    let mut since = 0;
    loop {
        let req = PullRequest {
            since,
            collections: collections.iter().map(|s| s.to_string()).collect(),
            limit: 50,
            ..Default::default()
        };
        let page = c
            .pull(as_caller(token, req))
            .await
            .unwrap_or_else(|s| panic!("pull as {token:?}: {s:?}"))
            .into_inner();
        documents.extend(page.documents);
        since = page.checkpoint;
        if !page.has_more {
            return documents;
        }
    }
}

/// The names of the services the server reflection at `channel` lists,
/// asked without a credential; `what` names the call in a failure.
pub async fn reflected_services(channel: Channel, what: &str) -> HashSet<String> {
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures_util::stream::iter([list]))
        .await
        .expect(what)
        .into_inner();
    let answer = tokio::time::timeout(HANG, answers.message())
        .await
        .expect("a reflection answer in time")
        .expect("reflection ok")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

// ---------------------------------------------------------------------------
// Subscribe streams
// ---------------------------------------------------------------------------

/// The next event of a Subscribe stream, which must come within [`HANG`].
pub async fn next_event(stream: &mut Streaming<pb::SubscribeResponse>) -> Event {
    tokio::time::timeout(HANG, stream.message())
        .await
        .expect("an event in time")
        .expect("stream ok")
        .expect("stream open")
        .event
        .expect("event set")
}

/// Reads `stream` until a document `collection/id` arrives; returns every
/// document seen up to it.
pub async fn read_until_doc(
    stream: &mut Streaming<pb::SubscribeResponse>,
    collection: &str,
    id: &str,
) -> Vec<pb::Document> {
    let mut seen = Vec::new();
    loop {
        if let Event::Changes(batch) = next_event(stream).await {
            let found = batch
                .documents
                .iter()
                .any(|d| d.collection == collection && d.id == id);
            seen.extend(batch.documents);
            if found {
                return seen;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Waits
// ---------------------------------------------------------------------------

/// Polls `done` every 20 ms until it holds; panics naming `what` after
/// `bound`.
pub async fn until(what: &str, bound: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many log entries at `level` have a message containing `text`.
pub fn logged(logs: &Logs, level: &str, text: &str) -> usize {
    logs.lock()
        .expect("logs")
        .iter()
        .filter(|e| e["level"] == level && e["message"].as_str().is_some_and(|m| m.contains(text)))
        .count()
}

/// Waits (as [`Patience`] does) until a replica's `logs` tell that the
/// primary refused its replication stream with PERMISSION_DENIED.
pub async fn until_upstream_denied(logs: &Logs) {
    // The follower logs each new cause of a failed stream once.
    let refusals = || {
        logs.lock()
            .expect("logs")
            .iter()
            .filter(|e| {
                e["message"] == "replication stream ended; reconnecting"
                    && e["cause"]
                        .as_str()
                        .is_some_and(|c| c.contains("PermissionDenied"))
            })
            .count()
    };
    let wait = Patience::new("the replica logs the primary's PERMISSION_DENIED");
    while refusals() == 0 {
        wait.tick().await;
    }
}
