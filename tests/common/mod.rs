//! A real deltasync server on an ephemeral port with a temporary store.
//!
//! The listener is bound before the server task starts, so clients can
//! connect at once: no sleeps.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod auth;
pub mod cluster;
pub mod local;
pub mod process;

use std::{net::SocketAddr, sync::Arc};

use deltasync::{
    Config,
    pb::{self, sync_service_client::SyncServiceClient},
    store,
    store::model::EncodedBody,
};
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub type Client = SyncServiceClient<Channel>;

/// An hour, in the seconds an offset clock is moved by.
pub const HOUR: u64 = 3600;

/// Waits (bounded) until `done` holds: for what a background task (such as
/// compaction, every 20 ms in `start_with_clock`) makes true.
pub async fn eventually<F: std::future::Future<Output = bool>>(mut done: impl FnMut() -> F) {
    for _ in 0..500 {
        if done().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

pub struct TestServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// A connected client.
    pub client: Client,
    /// The configuration it runs with (data dir included).
    pub config: Config,
    /// Keeps the temporary store alive across restarts.
    dir: Arc<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), deltasync::ServeError>>>,
}

impl TestServer {
    /// A server with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with settings changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = Config::for_data_dir(dir.path().join("store"));
        configure(&mut config);
        Self::launch(config, dir, store::Options::default()).await
    }

    /// A server with store options (e.g. a clock) of the test's choosing.
    pub async fn start_with_options(
        configure: impl FnOnce(&mut Config),
        options: store::Options,
    ) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = Config::for_data_dir(dir.path().join("store"));
        configure(&mut config);
        Self::launch(config, dir, options).await
    }

    /// A server whose clock runs `ahead` seconds in the future (tests move
    /// it to make data old), with retention short enough to be crossed that
    /// way (history 1 h, tombstones 2 h) and compaction every 20 ms.
    pub async fn start_with_clock(
        ahead: &Arc<std::sync::atomic::AtomicU64>,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let options = store::Options {
            clock: store::offset_clock(ahead.clone()),
            ..Default::default()
        };
        Self::start_with_options(
            |c| {
                c.history_retention = std::time::Duration::from_secs(HOUR);
                c.tombstone_retention = std::time::Duration::from_secs(2 * HOUR);
                c.compaction_interval = std::time::Duration::from_millis(20);
                configure(c);
            },
            options,
        )
        .await
    }

    /// A server with a new, empty store at `addr` (the address of one
    /// stopped before): to its clients, the same server with another store.
    pub async fn start_at(addr: SocketAddr) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let config = Config::for_data_dir(dir.path().join("store"));
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the same address");
        Self::launch_on(listener, config, dir, store::Options::default()).await
    }

    async fn launch(config: Config, dir: Arc<tempfile::TempDir>, options: store::Options) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::launch_on(listener, config, dir, options).await
    }

    async fn launch_on(
        listener: TcpListener,
        config: Config,
        dir: Arc<tempfile::TempDir>,
        options: store::Options,
    ) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(deltasync::serve_with(
            config.clone(),
            options,
            listener,
            async {
                let _ = rx.await;
            },
        ));
        let client = connect(addr).await;
        Self {
            addr,
            client,
            config,
            dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Another client on its own connection.
    pub async fn connect(&self) -> Client {
        connect(self.addr).await
    }

    /// A client whose HTTP/2 receive window is only 16 KiB, so the server
    /// must stop sending to it early: a deliberately slow reader.
    pub async fn connect_small_window(&self) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .initial_stream_window_size(Some(16 * 1024))
            .initial_connection_window_size(Some(16 * 1024))
            .connect()
            .await
            .expect("connect");
        SyncServiceClient::new(channel)
    }

    /// Shuts the server down gracefully and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server exits cleanly");
        }
    }

    /// Stops the server and starts a new one on the same store.
    pub async fn restart(mut self) -> Self {
        self.stop().await;
        Self::launch(
            self.config.clone(),
            self.dir.clone(),
            store::Options::default(),
        )
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn connect(addr: SocketAddr) -> Client {
    SyncServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// A body (a proto Struct on the wire) from a JSON object literal.
pub fn body(v: Value) -> EncodedBody {
    match v {
        Value::Object(map) => EncodedBody::encode(&map),
        other => panic!("a body must be a JSON object, got {other}"),
    }
}

/// The JSON form of a document's body (`null` for a tombstone).
pub fn json(doc: &pb::Document) -> Value {
    match &doc.body {
        Some(b) => Value::Object(b.to_json("body").expect("valid body")),
        None => Value::Null,
    }
}

pub fn put(collection: &str, id: &str, v: Value) -> pb::Mutation {
    mutation(collection, id, pb::mutation::Op::Put(body(v)))
}

pub fn patch(collection: &str, id: &str, v: Value) -> pb::Mutation {
    mutation(collection, id, pb::mutation::Op::Patch(body(v)))
}

pub fn delete(collection: &str, id: &str) -> pb::Mutation {
    mutation(collection, id, pb::mutation::Op::Delete(()))
}

fn mutation(collection: &str, id: &str, op: pb::mutation::Op) -> pb::Mutation {
    pb::Mutation {
        collection: collection.into(),
        id: id.into(),
        op: Some(op),
        ..Default::default()
    }
}

/// Builder-style tweaks on a mutation.
pub trait MutationExt {
    fn base(self, version: u64) -> Self;
    fn id(self, mutation_id: u64) -> Self;
    fn on_conflict(self, s: pb::ConflictStrategy) -> Self;
}

impl MutationExt for pb::Mutation {
    fn base(mut self, version: u64) -> Self {
        self.base_version = Some(version);
        self
    }
    fn id(mut self, mutation_id: u64) -> Self {
        self.mutation_id = mutation_id;
        self
    }
    fn on_conflict(mut self, s: pb::ConflictStrategy) -> Self {
        self.on_conflict = s.into();
        self
    }
}

/// Pushes a batch and returns the response, failing the test on an error.
pub async fn push(
    client: &mut Client,
    client_id: &str,
    mutations: Vec<pb::Mutation>,
) -> pb::PushResponse {
    push_req(
        client,
        pb::PushRequest {
            client_id: client_id.into(),
            mutations,
            atomic: false,
        },
    )
    .await
}

pub async fn push_req(client: &mut Client, req: pb::PushRequest) -> pb::PushResponse {
    client.push(req).await.expect("push").into_inner()
}

/// Pushes one mutation and returns its result.
pub async fn push_one(client: &mut Client, client_id: &str, m: pb::Mutation) -> pb::MutationResult {
    let mut resp = push(client, client_id, vec![m]).await;
    assert_eq!(resp.results.len(), 1);
    resp.results.remove(0)
}

/// The current document, if any.
pub async fn get(client: &mut Client, collection: &str, id: &str) -> Option<pb::Document> {
    let req = pb::GetRequest {
        collection: collection.into(),
        ids: vec![id.into()],
        ..Default::default()
    };
    client
        .get(req)
        .await
        .expect("get")
        .into_inner()
        .documents
        .pop()
}

pub fn outcome(r: &pb::MutationResult) -> pb::Outcome {
    pb::Outcome::try_from(r.outcome).expect("known outcome")
}

/// A Subscribe stream from `since` (all collections).
pub async fn open_stream(
    client: &mut Client,
    since: u64,
) -> tonic::Streaming<pb::SubscribeResponse> {
    let req = pb::SubscribeRequest {
        since,
        ..Default::default()
    };
    client.subscribe(req).await.expect("subscribe").into_inner()
}

/// One Pull page from `since` (all collections, default limit).
pub async fn pull_page(client: &mut Client, since: u64) -> pb::PullResponse {
    let req = pb::PullRequest {
        since,
        ..Default::default()
    };
    client.pull(req).await.expect("pull").into_inner()
}

/// The last mutation id the server reports for `client_id`, asked by Pull.
pub async fn last_mutation_id(c: &mut Client, client_id: &str) -> u64 {
    let req = pb::PullRequest {
        client_id: client_id.into(),
        limit: 1,
        ..Default::default()
    };
    c.pull(req)
        .await
        .expect("pull")
        .into_inner()
        .last_mutation_id
}

/// Pushes a request that must fail and returns its status.
pub async fn push_refused(c: &mut Client, req: pb::PushRequest) -> tonic::Status {
    match c.push(req).await {
        Ok(resp) => panic!("the push should fail, got {:?}", resp.get_ref().results),
        Err(status) => status,
    }
}
