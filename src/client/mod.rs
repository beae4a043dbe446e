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
//!   it was given, the client asks the server where that id stands (Pull's
//!   `last_mutation_id`), so a restarted process with the same client id
//!   does not reuse ids (a random UUID has no history: no question asked).
//!   A failed push is resent as the **same** request (same ids) on
//!   `UNAVAILABLE`, a connection lost mid-call, `DEADLINE_EXCEEDED` and
//!   `RESOURCE_EXHAUSTED` with a `RetryInfo` (after its delay), with
//!   backoff, for [`RetryPolicy::max_elapsed`] (30 s by default, however
//!   many endpoints); never on `INVALID_ARGUMENT` or any other answer. The
//!   server answers a resent id that was applied with `DUPLICATE`; the
//!   client reports that as what it was:
//!   [`MutationResult::applied_by_earlier_attempt`] (this call applied it,
//!   once, and lost the first answer).
//! - **Resending a push the client gave up on.** When the retries run out
//!   without an answer, the push fails with
//!   [`ClientError::Unacknowledged`], which holds the request with its ids
//!   ([`ClientError::unacknowledged_push`]). Resend it later with
//!   [`Client::resend`] (from this client, or a new one with the same
//!   client id): every mutation is applied exactly once, `DUPLICATE` for
//!   those an earlier attempt applied. This is the way out of a primary
//!   run with `--sync-replicas` that answers `UNAVAILABLE` ("the push is
//!   committed on the primary ... retry it with the same mutation ids")
//!   for longer than the retry budget: the push is committed and may
//!   survive or not a failover; the resend settles it.
//!
//!   ```no_run
//!   # async fn example(client: deltasync::client::Client) -> Result<(), deltasync::client::ClientError> {
//!   use deltasync::client::Mutation;
//!   use serde_json::json;
//!
//!   let batch = [Mutation::put("todos", "milk", json!({"title": "Buy milk"}))];
//!   let result = match client.push(batch).await {
//!       Ok(r) => r,
//!       Err(e) => match e.unacknowledged_push() {
//!           // Later (or keep `push.request()` somewhere safe first):
//!           Some(push) => client.resend(push).await?,
//!           None => return Err(e),
//!       },
//!   };
//!   # Ok(()) }
//!   ```
//! - **Read-your-writes.** Reads (`get`, `pull_all`, `watch`) pass the
//!   highest checkpoint this client's pushes were given as
//!   `min_checkpoint`, so they see its writes on any node (on by default;
//!   [`ClientBuilder::read_your_writes`]). If the writes are gone (a
//!   failover to a replica that had not replicated them, a restore from an
//!   older snapshot: the primary answers `OUT_OF_RANGE`
//!   `MIN_CHECKPOINT_AHEAD`), the client drops its floor to what the
//!   primary holds and logs a warning: `get` reads again without it,
//!   `pull_all` fails with [`ClientError::ResyncNeeded`] and a watch ends
//!   with [`WatchEvent::ResyncNeeded`], both with
//!   [`ResyncReason::WritesLost`].
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
pub(crate) use transport::backoff;
mod types;
mod watch;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
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
    error::{ClientError, PendingPush, ResyncReason, code_name},
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
    /// The next mutation id; `None` until learned from the server (1 from
    /// the start for a generated client id, which has no history).
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
        // A client id given may have history on the server (learned on
        // first use); a fresh random one has none: its ids start at 1.
        let (client_id, next_id) = match self.client_id {
            Some(id) => (id, None),
            None => (uuid::Uuid::new_v4().to_string(), Some(1)),
        };
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                client_id,
                next_id: tokio::sync::Mutex::new(next_id),
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
        self.send_push(PendingPush {
            request,
            maybe_applied: false,
        })
        .await
    }

    /// Sends a push that failed before ([`ClientError::Unacknowledged`])
    /// again: the same request, the same mutation ids, so each mutation is
    /// applied once whatever happened to the earlier attempts. A mutation
    /// an earlier attempt applied answers `DUPLICATE` with
    /// [`MutationResult::applied_by_earlier_attempt`] set (when an earlier
    /// attempt may have reached a writer, see
    /// [`PendingPush::maybe_applied`]); the others are applied now. It
    /// fails again the same way (with the push to resend) if the servers
    /// still cannot take it. The push must have been made under this
    /// client's client id.
    pub async fn resend(&self, push: &PendingPush) -> Result<PushResult, ClientError> {
        if push.client_id() != self.inner.client_id {
            return Err(ClientError::Input(format!(
                "resend: the push was made under client id `{}`, this client's is `{}`",
                push.client_id(),
                self.inner.client_id
            )));
        }
        self.send_push(push.clone()).await
    }

    /// Sends `push` (retrying with the same ids); on giving up without an
    /// answer, the error carries it for [`Client::resend`].
    async fn send_push(&self, push: PendingPush) -> Result<PushResult, ClientError> {
        let unknown = AtomicBool::new(push.maybe_applied);
        let request = &push.request;
        // The same request on every attempt: its ids make a resend safe.
        let response = self
            .inner
            .transport
            .call_tracked(Target::Primary, true, &unknown, |svc| {
                let request = self.unary(request.clone());
                async move { Ok(Self::sync(svc).push(request).await?.into_inner()) }
            })
            .await;
        let maybe_applied = unknown.load(Ordering::Relaxed);
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                let retryable = e
                    .status()
                    .is_some_and(|s| error::next(s, true) != error::Next::Fail);
                return Err(if maybe_applied || retryable {
                    ClientError::Unacknowledged {
                        push: Box::new(PendingPush {
                            maybe_applied,
                            ..push
                        }),
                        source: Box::new(e),
                    }
                } else {
                    e
                });
            }
        };
        self.learned(response.last_mutation_id).await;
        self.inner
            .written
            .fetch_max(response.checkpoint, Ordering::Relaxed);
        Ok(PushResult {
            results: response
                .results
                .into_iter()
                .map(|r| MutationResult::from_pb(r, maybe_applied))
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
        let mut request = pb::GetRequest {
            collection: collection.to_owned(),
            ids: ids.into_iter().map(Into::into).collect(),
            min_checkpoint: self.min_checkpoint(),
        };
        let response = match self.get_once(&request).await {
            Err(e) if self.floor_lost(&e, request.min_checkpoint) => {
                // The writes it waited for do not exist any more: read
                // what there is.
                request.min_checkpoint = self.min_checkpoint();
                self.get_once(&request).await?
            }
            other => other?,
        };
        types::documents(response.documents)
    }

    async fn get_once(&self, request: &pb::GetRequest) -> Result<pb::GetResponse, ClientError> {
        self.inner
            .transport
            .call(Target::Any, true, |svc| {
                let request = self.unary(request.clone());
                async move { Ok(Self::sync(svc).get(request).await?.into_inner()) }
            })
            .await
    }

    /// After a read that asked for `floor` failed: when the error says this
    /// client's writes are gone (`MIN_CHECKPOINT_AHEAD`), lowers the
    /// read-your-writes floor to the head the primary reported (unless a
    /// push moved it meanwhile), logs a warning, and returns true.
    fn floor_lost(&self, e: &ClientError, floor: u64) -> bool {
        if !e.writes_lost() {
            return false;
        }
        let head = e
            .status()
            .and_then(|s| error::metadata(s, "head"))
            .and_then(|h| h.parse::<u64>().ok())
            .unwrap_or(0)
            .min(floor);
        let _ =
            self.inner
                .written
                .compare_exchange(floor, head, Ordering::Relaxed, Ordering::Relaxed);
        tracing::warn!(
            wanted = floor,
            head,
            "this client's writes up to checkpoint {floor} are gone (the primary holds \
             {head}: a failover or a restore lost them); reads no longer wait for them"
        );
        true
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
            .inspect_err(|e| {
                self.floor_lost(e, request.min_checkpoint);
            })
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
            .inspect_err(|e| {
                self.floor_lost(e, request.min_checkpoint);
            })
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

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    fn client(id: Option<&str>) -> Client {
        let mut b = Client::builder(["http://127.0.0.1:1"]);
        if let Some(id) = id {
            b = b.client_id(id);
        }
        b.build().unwrap()
    }

    #[tokio::test]
    async fn only_a_given_client_id_is_learned_from_the_server() {
        assert_eq!(*client(None).inner.next_id.lock().await, Some(1));
        assert_eq!(*client(Some("worker")).inner.next_id.lock().await, None);
    }

    #[tokio::test]
    async fn lost_writes_lower_the_read_your_writes_floor() {
        let c = client(None);
        c.inner.written.store(10, Ordering::Relaxed);
        let lost = |head: &str| {
            ClientError::from(Status::with_error_details(
                Code::OutOfRange,
                "ahead",
                ErrorDetails::with_error_info(
                    "MIN_CHECKPOINT_AHEAD",
                    "deltasync",
                    [
                        ("head".to_owned(), head.to_owned()),
                        ("wanted".to_owned(), "10".to_owned()),
                    ],
                ),
            ))
        };
        assert!(!c.floor_lost(&Status::unavailable("x").into(), 10));
        assert_eq!(c.written(), 10);
        assert!(c.floor_lost(&lost("4"), 10));
        assert_eq!(c.written(), 4);
        // A push that moved the floor meanwhile keeps it.
        c.inner.written.store(12, Ordering::Relaxed);
        assert!(c.floor_lost(&lost("3"), 4));
        assert_eq!(c.written(), 12);
        // No head reported: no floor.
        assert!(c.floor_lost(&lost("?"), 12));
        assert_eq!(c.written(), 0);
    }
}
