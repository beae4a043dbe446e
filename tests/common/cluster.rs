//! Helpers for tests that run several real `deltasync` processes (see
//! [`super::process`]): a primary and its replicas, each on a store of its
//! own. They start nodes, compare what clients read of them, check the
//! ErrorInfo of a refusal, and hold a replication stream at a chosen byte
//! with a [`Gate`].
//!
//! Nothing here sleeps to wait for a server: every wait is a bounded poll
//! ([`Patience`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use deltasync::pb::{self, PullRequest, replication_service_client::ReplicationServiceClient};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{AbortHandle, JoinHandle},
    time::Instant,
};
use tonic::{Code, Status, transport::Channel};
use tonic_types::{ErrorInfo, StatusExt};

use super::{
    last_mutation_id,
    process::{Logs, Process},
    push,
};

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

/// A primary whose replication messages are small (about 60 KiB of
/// records): a few documents of [`BIG`] bytes make a commit (or a
/// catch-up) span several messages, so a [`Gate`] can stop a stream inside
/// one. `--max-batch` must shrink with the message cap (every result
/// skeleton must fit an answer).
pub const SMALL_MESSAGES: [&str; 6] = [
    "--max-message-bytes",
    "65536",
    "--max-batch",
    "50",
    "--max-body-bytes",
    "8192",
];

/// Body size (one string field, see [`big`]) of the documents that fill
/// [`SMALL_MESSAGES`].
pub const BIG: usize = 4000;

/// Short retention, so a test sees tombstones purged and history pruned:
/// superseded versions and tombstones go after 1 s, rounds every 100 ms.
pub const SHORT_RETENTION: [&str; 8] = [
    "--history-retention",
    "1s",
    "--tombstone-retention",
    "1s",
    "--history-max-versions",
    "1",
    "--compaction-interval",
    "100ms",
];

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// The longest a test waits for anything a node does in the background.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A bounded poll for multi-process tests, which may not sleep a fixed time
/// to wait for a node: each `tick` waits 20 ms, and panics naming what was
/// awaited once [`PATIENCE`] has gone by.
pub struct Patience {
    /// What the test waits for, for the panic message.
    what: String,
    /// When it gives up.
    deadline: Instant,
}

impl Patience {
    /// Starts waiting for `what` (named in the panic if it never comes).
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            deadline: Instant::now() + PATIENCE,
        }
    }

    /// Waits 20 ms before the next poll; panics once the time is up.
    pub async fn tick(&self) {
        assert!(
            Instant::now() < self.deadline,
            "{}: not reached in {PATIENCE:?}",
            self.what
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `done` holds, polling as [`Patience`] does: the short form
/// of a `while !done { wait.tick() }` loop.
pub async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let wait = Patience::new(what);
    while !done().await {
        wait.tick().await;
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A temporary directory and the store path inside it. It outlives the
/// processes started on it, so a node restarted (or killed and started
/// again, as a replica or a primary) finds its store.
pub struct DataDir {
    /// Removed when the test is done with it.
    _dir: tempfile::TempDir,
    /// The store inside it, what `--data-dir` is given.
    path: PathBuf,
}

impl DataDir {
    /// A new, empty temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store");
        Self { _dir: dir, path }
    }
}

impl AsRef<Path> for DataDir {
    /// The store path, so a `&DataDir` is passed where a node wants one.
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Starts the binary on `data` with `args` (log discarded): a primary, or
/// any node whose log the test does not read.
pub fn start(data: impl AsRef<Path>, args: &[&str]) -> Process {
    Process::start(data.as_ref(), args, |_| {})
}

/// Starts a replica of `primary_url` on `data`, with `extra` flags (log
/// discarded).
pub fn start_replica(data: impl AsRef<Path>, primary_url: &str, extra: &[&str]) -> Process {
    start(data, &replica_args(primary_url, extra))
}

/// Starts a replica as [`start_replica`] does, keeping its whole log, for a
/// test that waits for what its follower logs (which may come before the
/// server serves).
pub fn start_replica_logged(
    data: impl AsRef<Path>,
    primary_url: &str,
    extra: &[&str],
) -> (Process, Logs) {
    Process::start_logged_from_launch(data.as_ref(), &replica_args(primary_url, extra))
}

/// The flags of a replica of `primary_url`, with `extra` added.
fn replica_args<'a>(primary_url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--replicate-from", primary_url];
    args.extend_from_slice(extra);
    args
}

/// A ReplicationService client of `p`, to talk to it as a follower would.
pub async fn replication(p: &Process) -> ReplicationServiceClient<Channel> {
    ReplicationServiceClient::connect(p.url())
        .await
        .expect("connect")
}

/// Promotes `p` (a replica), returning the refusal for a test that expects
/// one.
pub async fn promote(p: &Process) -> Result<pb::PromoteResponse, Status> {
    p.admin()
        .await
        .promote(pb::PromoteRequest {})
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// The ErrorInfo detail of `status`, which must have one: what tells a
/// client why it was refused.
pub fn error_info(status: &Status) -> ErrorInfo {
    status
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("{status:?} has no ErrorInfo detail"))
}

/// Asserts `status` is `code` with ErrorInfo `reason` (domain deltasync),
/// and returns the ErrorInfo for its metadata.
pub fn assert_reason(status: &Status, code: Code, reason: &str) -> ErrorInfo {
    assert_eq!(status.code(), code, "{status:?}");
    let info = error_info(status);
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        (reason, "deltasync"),
        "{status:?}"
    );
    info
}

// ---------------------------------------------------------------------------
// Reading and writing
// ---------------------------------------------------------------------------

/// Everything a client can read of a node's store, to compare nodes.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    /// The store's identity, as every page reported it.
    pub store_id: String,
    /// Every document, from a Pull from 0 paged to the end.
    pub documents: Vec<pb::Document>,
    /// The checkpoint of the last page.
    pub checkpoint: u64,
    /// The purge horizon of the last page.
    pub purge_horizon: u64,
    /// `last_mutation_id` per client id, from Pull with `client_id`.
    pub last_ids: BTreeMap<String, u64>,
}

/// Reads a [`Snapshot`] of `p` in pages of 50, passing back each page's
/// checkpoint and purge horizon.
pub async fn snapshot(p: &Process, clients: &[String]) -> Snapshot {
    let mut c = p.client().await;
    let (mut since, mut seen) = (0, 0);
    let mut documents = Vec::new();
    let mut store_id: Option<String> = None;
    loop {
        let page = c
            .pull(PullRequest {
                since,
                purge_horizon: seen,
                limit: 50,
                ..Default::default()
            })
            .await
            .expect("pull")
            .into_inner();
        let id = store_id.get_or_insert_with(|| page.store_id.clone());
        assert_eq!(*id, page.store_id, "pages of one pass name one store");
        documents.extend(page.documents);
        (since, seen) = (page.checkpoint, page.purge_horizon);
        if !page.has_more {
            break;
        }
    }
    let mut last_ids = BTreeMap::new();
    for client in clients {
        last_ids.insert(client.clone(), last_mutation_id(&mut c, client).await);
    }
    Snapshot {
        store_id: store_id.unwrap_or_default(),
        documents,
        checkpoint: since,
        purge_horizon: seen,
        last_ids,
    }
}

/// Every document of `p`, from a Pull from 0 paged to the end (as
/// [`snapshot`] reads it), to compare the documents of two nodes.
pub async fn pull_all(p: &Process) -> Vec<pb::Document> {
    snapshot(p, &[]).await.documents
}

/// Waits until every replica's Status.head is the primary's, then until
/// each returns the primary's snapshot (client states may land in a commit
/// that moves no head), and returns it.
pub async fn converged(primary: &Process, replicas: &[&Process], clients: &[String]) -> Snapshot {
    let head = primary.status().await.head;
    for r in replicas {
        let wait = Patience::new(format!("replica {} reaches head {head}", r.url()));
        while r.status().await.head != head {
            wait.tick().await;
        }
    }
    let expected = snapshot(primary, clients).await;
    assert_eq!(expected.checkpoint, head);
    for r in replicas {
        let wait = Patience::new(format!("replica {} reads as the primary", r.url()));
        loop {
            let got = snapshot(r, clients).await;
            if got == expected {
                break;
            }
            if Instant::now() + Duration::from_millis(40) >= wait.deadline {
                assert_eq!(got, expected, "replica {} differs", r.url());
            }
            wait.tick().await;
        }
    }
    expected
}

/// A body of about `size` bytes, to fill replication messages.
pub fn big(n: u64, size: usize) -> Value {
    json!({"n": n, "pad": "x".repeat(size)})
}

/// Pushes `mutations` through `p` (non-atomic, anonymous): the checkpoint.
pub async fn write(p: &Process, mutations: Vec<pb::Mutation>) -> u64 {
    let mut c = p.client().await;
    push(&mut c, "", mutations).await.checkpoint
}

// ---------------------------------------------------------------------------
// A gate between a replica and its primary
// ---------------------------------------------------------------------------

/// When a connection through a [`Gate`] reaches the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    /// As soon as the replica connects, whatever the allowance: the primary
    /// opens the replica's stream (and lists it in Status) while nothing of
    /// its answer passes. For a replica held before the hello.
    AtOnce,
    /// Only once the allowance is above 0: a connection accepted at 0 waits
    /// at the gate, and the primary starts that stream (and reads the head
    /// its catch-up goes to) only when the allowance is raised. For a
    /// replica that must catch up on what is written meanwhile.
    WhenAllowed,
}

/// A TCP relay standing between a replica and its primary. What the
/// replica sends passes freely; what the primary sends passes only up to a
/// byte allowance per connection. A test holds the replication stream at a
/// chosen point (before the hello, in the middle of a commit) by choosing
/// the allowance, and knows the bytes got through from [`Gate::delivered`].
/// Whether a connection held at 0 reaches the primary is its [`Dial`].
pub struct Gate {
    /// Where replicas connect.
    addr: SocketAddr,
    /// Bytes of the primary's that each connection may pass.
    allowance: watch::Sender<u64>,
    /// The connections accepted so far.
    connections: Arc<Mutex<Vec<Relayed>>>,
    /// The accept loop.
    accept: JoinHandle<()>,
}

impl Gate {
    /// A gate to the primary at `upstream` (`host:port`), each connection
    /// passing `allowance` bytes of the primary's and dialling it as
    /// `dial` says.
    pub async fn start(upstream: &str, allowance: u64, dial: Dial) -> Self {
        let upstream: SocketAddr = upstream.parse().expect("primary address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let allowance = watch::Sender::new(allowance);
        let connections: Arc<Mutex<Vec<Relayed>>> = Arc::default();
        let accept = tokio::spawn({
            let (allowance, connections) = (allowance.clone(), connections.clone());
            async move {
                while let Ok((down, _)) = listener.accept().await {
                    let delivered = Arc::new(AtomicU64::new(0));
                    let task = tokio::spawn(relay(
                        down,
                        upstream,
                        dial,
                        allowance.subscribe(),
                        delivered.clone(),
                    ));
                    connections.lock().unwrap().push(Relayed {
                        task: task.abort_handle(),
                        delivered,
                    });
                }
            }
        });
        Self {
            addr,
            allowance,
            connections,
            accept,
        }
    }

    /// The URL a replica is given as its primary.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets each connection pass `bytes` of the primary's in all.
    pub fn allow(&self, bytes: u64) {
        self.allowance.send_replace(bytes);
    }

    /// Lets everything through.
    pub fn open(&self) {
        self.allow(u64::MAX);
    }

    /// Holds the newest connection where it is: nothing more of the
    /// primary's passes.
    pub fn hold(&self) {
        self.allow(self.delivered());
    }

    /// Bytes the newest connection delivered to the replica.
    pub fn delivered(&self) -> u64 {
        self.connections
            .lock()
            .unwrap()
            .last()
            .map_or(0, |c| c.delivered.load(Ordering::SeqCst))
    }

    /// How many connections were accepted.
    pub fn accepted(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Breaks every open connection (the replica sees its stream fail);
    /// connections from now on may pass `allowance` bytes.
    pub fn cut(&self, allowance: u64) {
        self.allow(allowance);
        for c in self.connections.lock().unwrap().iter() {
            c.task.abort();
        }
    }

    /// Waits until the newest connection (after `accepted` earlier ones)
    /// delivered `bytes`.
    pub async fn wait_delivered(&self, accepted: usize, bytes: u64) {
        let wait = Patience::new(format!("the gate delivers {bytes} bytes"));
        while self.accepted() <= accepted || self.delivered() < bytes {
            wait.tick().await;
        }
    }
}

/// One connection through a [`Gate`].
struct Relayed {
    /// Its relay task (aborted to break the connection).
    task: AbortHandle,
    /// Bytes of the primary's it delivered to the replica.
    delivered: Arc<AtomicU64>,
}

impl Drop for Gate {
    /// Stops accepting and breaks every connection, so a replica left
    /// running by a failed test does not hold on to its primary.
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.connections.lock().unwrap().iter() {
            c.task.abort();
        }
    }
}

/// One relayed connection: the replica's bytes go up freely, the primary's
/// come down within the allowance. With [`Dial::WhenAllowed`] it does not
/// connect to the primary while the allowance is 0.
async fn relay(
    down: TcpStream,
    upstream: SocketAddr,
    dial: Dial,
    mut allowance: watch::Receiver<u64>,
    delivered: Arc<AtomicU64>,
) {
    if dial == Dial::WhenAllowed && allowance.wait_for(|a| *a > 0).await.is_err() {
        return;
    }
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut down_read, mut down_write) = down.into_split();
    let (mut up_read, mut up_write) = up.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut down_read, &mut up_write).await;
    };
    let responses = async {
        let mut buf = vec![0; 16 * 1024];
        let mut sent: u64 = 0;
        loop {
            let n = match up_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut at = 0;
            while at < n {
                let Ok(allowed) = allowance.wait_for(|a| *a > sent).await.map(|a| *a) else {
                    return;
                };
                let room = usize::try_from(allowed - sent).unwrap_or(usize::MAX);
                let len = room.min(n - at);
                if down_write.write_all(&buf[at..at + len]).await.is_err() {
                    return;
                }
                at += len;
                sent += u64::try_from(len).expect("small");
                delivered.store(sent, Ordering::SeqCst);
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = responses => {}
    }
}
