//! A typed async client of deltasync, for services that would rather not
//! drive the generated stubs themselves.
//!
//! ```no_run
//! # async fn example() -> Result<(), deltasync::client::ClientError> {
//! use deltasync::client::{Client, Mutation};
//! use serde_json::json;
//!
//! let client = Client::builder(["http://127.0.0.1:50051", "http://127.0.0.1:50052"])
//!     .client_id("billing-worker-1")
//!     .build()?;
//! let result = client.put("todos", "milk", json!({"title": "Buy milk"})).await?;
//! let docs = client.get("todos", ["milk"]).await?; // sees the put
//! # Ok(()) }
//! ```
//!
//! What it does for you:
//! - **Endpoints and failover.** Calls stick to the endpoint that answered
//!   last and move to the next on `UNAVAILABLE` or a connection failure. A
//!   push answered `NOT_PRIMARY` (a replica started with
//!   `--forward-writes=false`) goes to the primary the replica names, and
//!   later pushes go there directly until it fails.
//! - **Exactly-once pushes.** Every mutation gets a mutation id, increasing
//!   per client id (given, or a random UUID). On first use of a client id
//!   the client asks the server where that id stands (Pull's
//!   `last_mutation_id`), so a restarted process with the same client id
//!   does not reuse ids. A failed push is resent as the **same** request
//!   (same ids) on `UNAVAILABLE`, a connection lost mid-call,
//!   `DEADLINE_EXCEEDED` and `RESOURCE_EXHAUSTED` with a `RetryInfo`
//!   (after its delay), with backoff; never on `INVALID_ARGUMENT` or any
//!   other answer. The server answers a resent id that was applied with
//!   `DUPLICATE`; the client reports that as what it was:
//!   [`MutationResult::applied_by_earlier_attempt`] (this call applied it,
//!   once, and lost the first answer).
//! - **Read-your-writes.** Reads (`get`, `pull_all`, `watch`) pass the
//!   highest checkpoint this client's pushes were given as
//!   `min_checkpoint`, so they see its writes on any node (on by default;
//!   [`ClientBuilder::read_your_writes`]).
//! - **Watches that survive.** [`Client::watch`] resumes Subscribe from
//!   the last checkpoint it delivered (with its store id, purge horizon and
//!   epoch) across disconnects, restarts and failover: no gap, no
//!   duplicate. A checkpoint that cannot be resumed from is an event,
//!   [`WatchEvent::ResyncNeeded`], not an error string.
//! - TLS (CA, client certificate), a bearer token, per-call deadlines
//!   (`grpc-timeout`) and a connect timeout.
//!
//! What it does not do: it keeps no local copy of documents, and a process
//! that learns its client id's position from a replica behind the primary
//! may reuse ids that replica has not seen yet (they would answer
//! `DUPLICATE` on the first attempt); list the primary first, or give each
//! process its own client id.

mod error;
mod transport;
mod types;
mod watch;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tonic::{
    Request, Streaming,
    transport::{Certificate, ClientTlsConfig, Identity},
};

use self::transport::{Auth, Svc, Target, Transport};
pub use self::{
    error::{ClientError, ResyncReason, code_name},
    transport::RetryPolicy,
    types::{
        Body, Checkpoint, Document, Mutation, MutationResult, Op, PullOptions, PullPage,
        PushResult, WatchOptions,
    },
    watch::{Watch, WatchEvent},
};
use crate::pb::{
    self, admin_service_client::AdminServiceClient,
    replication_service_client::ReplicationServiceClient, sync_service_client::SyncServiceClient,
};

/// Largest message the client accepts (the server sends at most its
/// `--max-message-bytes`, 4 MiB by default).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A deltasync client: cheap to clone (clones share connections, the
/// mutation-id counter and the read-your-writes checkpoint).
#[derive(Clone)]
pub struct Client {
    /// Shared by every clone.
    inner: Arc<Inner>,
}

/// What clones of a [`Client`] share.
struct Inner {
    /// Endpoints, channels, credentials, retries.
    transport: Transport,
    /// The client id mutation ids are counted under.
    client_id: String,
    /// The next mutation id; `None` until learned from the server.
    next_id: tokio::sync::Mutex<Option<u64>>,
    /// The highest checkpoint a push of this client was given.
    written: AtomicU64,
    /// Whether reads wait for `written` (`min_checkpoint`).
    read_your_writes: bool,
}

/// Settings of a [`Client`]; [`Client::builder`] makes one.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    /// Endpoint URLs (`http://host:port`, `https://host:port`).
    endpoints: Vec<String>,
    /// TLS for `https://` endpoints.
    tls: Option<ClientTlsConfig>,
    /// Bearer token.
    token: Option<String>,
    /// Client id (default: a random UUID).
    client_id: Option<String>,
    /// Deadline of each unary call attempt.
    timeout: Option<Duration>,
    /// How long connecting may take.
    connect_timeout: Duration,
    /// Retries.
    retry: RetryPolicy,
    /// Reads wait for this client's writes.
    read_your_writes: bool,
}

impl ClientBuilder {
    /// TLS for `https://` endpoints (tonic's config: CA, client identity,
    /// domain name).
    #[must_use]
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// TLS from PEM contents: the CA to trust and, for mTLS, a client
    /// certificate chain and its key.
    #[must_use]
    pub fn tls_pem(mut self, ca: Option<Vec<u8>>, identity: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        self.tls = Some(tls);
        self
    }

    /// Sends `authorization: Bearer <token>` on every call.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The client id mutation ids are counted under. Give the same id to a
    /// process that restarts (it learns where the id stands), never to two
    /// processes at once.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Deadline of each attempt of a unary call, sent as `grpc-timeout`
    /// (default 10 s; `None`: none). Streams have none.
    #[must_use]
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long connecting to an endpoint may take (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How failed attempts are retried.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Whether reads wait for this client's own writes (default true).
    #[must_use]
    pub fn read_your_writes(mut self, on: bool) -> Self {
        self.read_your_writes = on;
        self
    }

    /// The client. Connections are made on first use, so this fails only
    /// on a bad setting (an endpoint that is not a URL, a bad token).
    pub fn build(self) -> Result<Client, ClientError> {
        let auth = Auth::bearer(self.token.as_deref())?;
        let transport = Transport::new(
            self.endpoints,
            self.tls,
            self.connect_timeout,
            auth,
            self.retry,
            self.timeout,
        )?;
        let client_id = self
            .client_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                client_id,
                next_id: tokio::sync::Mutex::new(None),
                written: AtomicU64::new(0),
                read_your_writes: self.read_your_writes,
            }),
        })
    }
}

impl Client {
    /// Settings for a client of these endpoints, tried in order.
    pub fn builder<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> ClientBuilder {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            token: None,
            client_id: None,
            timeout: Some(Duration::from_secs(10)),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            read_your_writes: true,
        }
    }

    /// A client of these endpoints with every default.
    pub fn connect<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<Self, ClientError> {
        Self::builder(endpoints).build()
    }

    /// The client id its mutation ids are counted under.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        self.inner.transport.endpoints()
    }

    /// The highest checkpoint this client's pushes were given (what reads
    /// wait for).
    pub fn written(&self) -> u64 {
        self.inner.written.load(Ordering::Relaxed)
    }

    /// `min_checkpoint` for a read.
    fn min_checkpoint(&self) -> u64 {
        if self.inner.read_your_writes {
            self.written()
        } else {
            0
        }
    }

    /// A unary request with the per-call deadline.
    fn unary<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(t) = self.inner.transport.timeout {
            request.set_timeout(t);
        }
        request
    }

    fn sync(svc: Svc) -> SyncServiceClient<Svc> {
        SyncServiceClient::new(svc).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    // -----------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------

    /// Pushes a batch (non-atomic: each mutation stands alone). Conflicts
    /// are results ([`PushResult::has_conflict`]), not errors.
    pub async fn push(
        &self,
        mutations: impl IntoIterator<Item = Mutation>,
    ) -> Result<PushResult, ClientError> {
        self.push_batch(mutations.into_iter().collect(), false)
            .await
    }

    /// Pushes a batch all or nothing: if any mutation conflicts, nothing is
    /// written (the others answer NOT_APPLIED).
    pub async fn push_atomic(
        &self,
        mutations: impl IntoIterator<Item = Mutation>,
    ) -> Result<PushResult, ClientError> {
        self.push_batch(mutations.into_iter().collect(), true).await
    }

    /// Replaces a document's body, unconditionally.
    pub async fn put(
        &self,
        collection: &str,
        id: &str,
        body: serde_json::Value,
    ) -> Result<MutationResult, ClientError> {
        self.push_one(Mutation::put(collection, id, body)).await
    }

    /// Merges top-level fields into a document, unconditionally.
    pub async fn patch(
        &self,
        collection: &str,
        id: &str,
        body: serde_json::Value,
    ) -> Result<MutationResult, ClientError> {
        self.push_one(Mutation::patch(collection, id, body)).await
    }

    /// Deletes a document, unconditionally.
    pub async fn delete(&self, collection: &str, id: &str) -> Result<MutationResult, ClientError> {
        self.push_one(Mutation::delete(collection, id)).await
    }

    /// Pushes one mutation and returns its result.
    pub async fn push_one(&self, mutation: Mutation) -> Result<MutationResult, ClientError> {
        let mut result = self.push_batch(vec![mutation], false).await?;
        result
            .results
            .pop()
            .ok_or_else(|| ClientError::Decode("a push answer without its result".into()))
    }

    async fn push_batch(
        &self,
        mutations: Vec<Mutation>,
        atomic: bool,
    ) -> Result<PushResult, ClientError> {
        let count = u64::try_from(mutations.len()).unwrap_or(u64::MAX);
        let first = self.reserve_ids(count).await?;
        let request = pb::PushRequest {
            client_id: self.inner.client_id.clone(),
            mutations: mutations
                .iter()
                .zip(first..)
                .enumerate()
                .map(|(i, (m, id))| m.to_pb(id, i))
                .collect::<Result<_, _>>()?,
            atomic,
        };
        let attempts = AtomicU32::new(0);
        // The same request on every attempt: its ids make a resend safe.
        let response = self
            .inner
            .transport
            .call(Target::Primary, true, |svc| {
                attempts.fetch_add(1, Ordering::Relaxed);
                let request = self.unary(request.clone());
                async move { Ok(Self::sync(svc).push(request).await?.into_inner()) }
            })
            .await?;
        let retried = attempts.load(Ordering::Relaxed) > 1;
        self.learned(response.last_mutation_id).await;
        self.inner
            .written
            .fetch_max(response.checkpoint, Ordering::Relaxed);
        Ok(PushResult {
            results: response
                .results
                .into_iter()
                .map(|r| MutationResult::from_pb(r, retried))
                .collect::<Result<_, _>>()?,
            checkpoint: Checkpoint {
                seq: response.checkpoint,
                store_id: response.store_id,
                purge_horizon: 0,
                epoch: response.checkpoint_epoch,
            },
            last_mutation_id: response.last_mutation_id,
        })
    }

    /// Takes `count` fresh mutation ids; on first use, learns where this
    /// client id stands on the server (Pull's `last_mutation_id`).
    async fn reserve_ids(&self, count: u64) -> Result<u64, ClientError> {
        let mut next = self.inner.next_id.lock().await;
        let first = match *next {
            Some(id) => id,
            None => self.last_mutation_id().await?.saturating_add(1),
        };
        *next = Some(first.saturating_add(count));
        Ok(first)
    }

    /// Moves the counter past what the server says this client id used.
    async fn learned(&self, last: u64) {
        let mut next = self.inner.next_id.lock().await;
        if let Some(id) = next.as_mut() {
            *id = (*id).max(last.saturating_add(1));
        }
    }

    /// The highest mutation id the server processed for this client id.
    pub async fn last_mutation_id(&self) -> Result<u64, ClientError> {
        let request = pb::PullRequest {
            client_id: self.inner.client_id.clone(),
            limit: 1,
            ..Default::default()
        };
        let page = self
            .inner
            .transport
            .call(Target::Primary, true, |svc| {
                let request = self.unary(request.clone());
                async move { Ok(Self::sync(svc).pull(request).await?.into_inner()) }
            })
            .await?;
        Ok(page.last_mutation_id)
    }

    // -----------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------

    /// The current state of documents by id (tombstones included, unknown
    /// ids left out), after this client's own writes.
    pub async fn get<S: Into<String>>(
        &self,
        collection: &str,
        ids: impl IntoIterator<Item = S>,
    ) -> Result<Vec<Document>, ClientError> {
        let request = pb::GetRequest {
            collection: collection.to_owned(),
            ids: ids.into_iter().map(Into::into).collect(),
            min_checkpoint: self.min_checkpoint(),
        };
        let response = self
            .inner
            .transport
            .call(Target::Any, true, |svc| {
                let request = self.unary(request.clone());
                async move { Ok(Self::sync(svc).get(request).await?.into_inner()) }
            })
            .await?;
        types::documents(response.documents)
    }

    /// One page of changes after `since`.
    pub(crate) async fn pull_page(
        &self,
        since: &Checkpoint,
        collections: &[String],
        page_size: u32,
    ) -> Result<pb::PullResponse, ClientError> {
        let request = pb::PullRequest {
            since: since.seq,
            collections: collections.to_vec(),
            limit: page_size,
            client_id: String::new(),
            store_id: since.store_id.clone(),
            purge_horizon: since.purge_horizon,
            min_checkpoint: self.min_checkpoint(),
            checkpoint_epoch: since.epoch,
        };
        self.inner
            .transport
            .call(Target::Any, true, |svc| {
                let request = self.unary(request.clone());
                async move { Ok(Self::sync(svc).pull(request).await?.into_inner()) }
            })
            .await
    }

    /// Every change after `options.since`, page by page to the end (the
    /// last page has `has_more == false`). Each page carries its
    /// checkpoint (resume from it later) and counts for a progress bar.
    /// A checkpoint that cannot be resumed from ends the stream with
    /// [`ClientError::ResyncNeeded`].
    pub fn pull_all(
        &self,
        options: PullOptions,
    ) -> Pin<Box<dyn Stream<Item = Result<PullPage, ClientError>> + Send>> {
        struct State {
            client: Client,
            options: PullOptions,
            since: Checkpoint,
            page: u64,
            documents: u64,
            done: bool,
        }
        let state = State {
            client: self.clone(),
            since: options.since.clone(),
            options,
            page: 0,
            documents: 0,
            done: false,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let page = st
                .client
                .pull_page(&st.since, &st.options.collections, st.options.page_size)
                .await;
            let page = match page.and_then(|p| Ok((types::documents(p.documents.clone())?, p))) {
                Ok(page) => page,
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            };
            let (documents, p) = page;
            st.page += 1;
            st.documents += u64::try_from(documents.len()).unwrap_or(u64::MAX);
            st.since = Checkpoint {
                seq: p.checkpoint,
                store_id: p.store_id,
                purge_horizon: p.purge_horizon,
                epoch: p.checkpoint_epoch,
            };
            st.done = !p.has_more;
            let page = PullPage {
                documents,
                checkpoint: st.since.clone(),
                has_more: p.has_more,
                page: st.page,
                documents_so_far: st.documents,
            };
            Some((Ok(page), st))
        })
        .boxed()
    }

    /// Follows changes live from `options.since`: the backlog, a
    /// `Progress` with `caught_up`, then changes as they commit. It
    /// survives disconnects, server restarts and failover (see [`Watch`]).
    pub fn watch(&self, options: WatchOptions) -> Watch {
        Watch::new(self.clone(), options)
    }

    // -----------------------------------------------------------------
    // Administration
    // -----------------------------------------------------------------

    /// The Status of the node the client reaches (with failover).
    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.status_at(Target::Any).await
    }

    /// The Status of the node at `endpoint` (no failover: that node's).
    pub async fn endpoint_status(&self, endpoint: &str) -> Result<pb::StatusResponse, ClientError> {
        self.status_at(Target::Node(endpoint.to_owned())).await
    }

    async fn status_at(&self, target: Target) -> Result<pb::StatusResponse, ClientError> {
        self.inner
            .transport
            .call(target, true, |svc| {
                let request = self.unary(pb::StatusRequest {});
                async move {
                    Ok(AdminServiceClient::new(svc)
                        .status(request)
                        .await?
                        .into_inner())
                }
            })
            .await
    }

    /// Promotes the **first** endpoint (a replica) to primary. Never sent
    /// to another node: give the node to promote first.
    pub async fn promote(&self) -> Result<pb::PromoteResponse, ClientError> {
        let node = self.endpoints()[0].clone();
        self.inner
            .transport
            .call(Target::Node(node), false, |svc| {
                let request = self.unary(pb::PromoteRequest {});
                async move {
                    Ok(AdminServiceClient::new(svc)
                        .promote(request)
                        .await?
                        .into_inner())
                }
            })
            .await
    }

    /// Opens `ReplicationService.Follow` on the primary with this client's
    /// endpoints, TLS and token (for tools that copy a whole store, such
    /// as a snapshot; the caller needs the `replicate` permission).
    ///
    /// `requests` must start with a `FollowStart`. Opening fails over as
    /// a push does (next endpoint on `UNAVAILABLE`, the named primary on
    /// `NOT_PRIMARY`): the first message is sent again to each node tried;
    /// the rest of `requests` is read once, by the stream that opened. The
    /// answer is the raw stream: a break after it opened is the caller's to
    /// handle (reopen with a new `FollowStart`).
    pub async fn follow<S>(&self, requests: S) -> Result<Streaming<pb::FollowResponse>, ClientError>
    where
        S: Stream<Item = pb::FollowRequest> + Send + 'static,
    {
        let mut requests = Box::pin(requests);
        let first = requests
            .next()
            .await
            .ok_or_else(|| ClientError::Input("follow: no FollowStart".into()))?;
        let rest = Arc::new(tokio::sync::Mutex::new(requests));
        self.inner
            .transport
            .call(Target::Primary, true, |svc| {
                let rest = rest.clone();
                let tail = futures_util::stream::unfold(rest, |rest| async move {
                    let item = rest.lock().await.next().await;
                    item.map(|m| (m, rest))
                });
                let stream =
                    futures_util::stream::once(std::future::ready(first.clone())).chain(tail);
                async move {
                    ReplicationServiceClient::new(svc)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .follow(Request::new(stream))
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await
    }

    /// Opens a Subscribe stream (used by [`Watch`]).
    async fn subscribe(
        &self,
        request: pb::SubscribeRequest,
    ) -> Result<Streaming<pb::SubscribeResponse>, ClientError> {
        self.inner
            .transport
            .call(Target::Any, true, |svc| {
                let request = Request::new(request.clone());
                async move {
                    Self::sync(svc)
                        .subscribe(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await
    }

    /// Moves calls to the next endpoint.
    fn rotate(&self) {
        self.inner.transport.rotate();
    }

    /// The retry policy (for the watch's own reconnects).
    fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.transport.retry
    }
}
