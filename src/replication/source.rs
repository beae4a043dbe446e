//! The primary's side of `ReplicationService.Follow`: a feed consumer like
//! a subscriber, that sends every record (superseded ones too) and the
//! clients' states, with acks flowing back.
//!
//! A stream first catches up from the log (what retention kept), then sends
//! a snapshot of the client states written since the replica's position,
//! then follows the feed's ring commit by commit. The ring is subscribed
//! before the head is read, so the switch loses and repeats nothing; a
//! stream the ring overtakes catches up again from where it is.

use std::{collections::VecDeque, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use prost::Message;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tonic::{Request, Response, Status, Streaming};

use super::{FollowerGuard, Node, Role, convert};
use crate::{
    auth::{Identity, Permission},
    config::MESSAGE_OVERHEAD_BYTES,
    error::Error,
    pb::{
        self, follow_request::Request as FollowRequestKind, follow_response::Response as Reply,
        replication_service_server::ReplicationService,
    },
    shutdown::CancellationToken,
    store::{StoreError, feed::Commit, model::Seq, replica::Epochs},
};

/// How often an idle stream tells the replica the primary's head.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The response stream of one follower.
pub type FollowStream = Pin<Box<dyn Stream<Item = Result<pb::FollowResponse, Status>> + Send>>;

/// The `ReplicationService`.
#[derive(Clone)]
pub struct ReplicationApi {
    /// The node and its store.
    node: Node,
    /// Ends streams on shutdown.
    shutdown: CancellationToken,
}

impl ReplicationApi {
    /// The service of `node`.
    pub fn new(node: Node, shutdown: CancellationToken) -> Self {
        Self { node, shutdown }
    }
}

#[tonic::async_trait]
impl ReplicationService for ReplicationApi {
    type FollowStream = FollowStream;

    async fn follow(
        &self,
        request: Request<Streaming<pb::FollowRequest>>,
    ) -> Result<Response<FollowStream>, Status> {
        // A copy of the whole store, client ids included.
        let identity = Identity::of(&request);
        identity.require_store(Permission::Replicate)?;
        let mut requests = request.into_inner();
        let start = match requests.message().await? {
            Some(pb::FollowRequest {
                request: Some(FollowRequestKind::Start(start)),
            }) => start,
            _ => {
                return Err(Error::InvalidArgument(
                    "the first message of Follow must be `start`".into(),
                )
                .into());
            }
        };
        // Registered first: from now on it holds back tombstone purges
        // above what it acknowledged (see `Node::follower`). What it
        // acknowledges counts, not what it says it applied (in `buffered`
        // mode that may not be durable yet).
        let guard = Arc::new(self.node.follower(start.url.clone(), 0));
        let (epochs, horizon) = admit(&self.node, &start).await?;
        tracing::info!(replica = %start.url, applied = start.applied, "replica following");
        let (tx, rx) = mpsc::channel(16);
        let stream = Source {
            node: self.node.clone(),
            guard: guard.clone(),
            tx,
            epochs,
            sent: Seq(start.applied),
            clients_since: Seq(start.clients_since),
            budget: self
                .node
                .settings()
                .max_message_bytes
                .saturating_sub(MESSAGE_OVERHEAD_BYTES),
            shutdown: self.shutdown.clone(),
            horizon,
            reloads: identity.reloads(),
            identity,
        };
        tokio::spawn(read_acks(requests, guard));
        tokio::spawn(stream.run());
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        ))))
    }
}

/// Checks that `start` may follow this node; returns the epoch history and
/// the purge horizon it was checked against. Nothing is changed for a
/// follower of another store.
async fn admit(node: &Node, start: &pb::FollowStart) -> Result<(Arc<Epochs>, Seq), Error> {
    if node.role() != Role::Primary {
        return Err(node.not_primary());
    }
    let store = node.store();
    let store_id = store.store_id();
    if !start.store_id.is_empty() && *start.store_id != *store_id {
        return Err(Error::StoreMismatch {
            replica: start.store_id.clone(),
            primary: store_id.to_string(),
        });
    }
    let epochs = store.epochs();
    if start.epoch > epochs.current() {
        // Another node of this store was promoted past this one: stop
        // taking writes.
        store
            .admin(crate::store::Admin::SeenEpoch(start.epoch))
            .await?;
        node.depose(start.epoch);
        return Err(node.not_primary());
    }
    let theirs = if start.epochs.is_empty() {
        Epochs::default()
    } else {
        convert::epochs_from(&start.epochs).map_err(|e| Error::invalid("start.epochs", e))?
    };
    let head = store.head();
    if let Some((first, last)) = epochs.divergence(&theirs, Seq(start.applied)) {
        return Err(Error::Diverged {
            first: first.0,
            last: last.0,
        });
    }
    if start.applied > head.0 {
        return Err(Error::Diverged {
            first: head.0 + 1,
            last: start.applied,
        });
    }
    let horizon = store.purge_horizon();
    if start.applied > 0 && start.applied < horizon.0 {
        return Err(StoreError::Compacted {
            since: start.applied,
            horizon: horizon.0,
        }
        .into());
    }
    Ok((epochs, horizon))
}

/// Reads the replica's acks until the stream ends.
async fn read_acks(mut requests: Streaming<pb::FollowRequest>, guard: Arc<FollowerGuard>) {
    while let Ok(Some(message)) = requests.message().await {
        match message.request {
            Some(FollowRequestKind::Ack(ack)) => guard.ack(ack.applied),
            // A second start or an empty message: ignored; the replica
            // reconnects if it is confused.
            _ => tracing::debug!("unexpected message on a Follow stream"),
        }
    }
}

/// One follower's stream.
struct Source {
    /// The node and its store.
    node: Node,
    /// The follower's registration (acks, sync status).
    guard: Arc<FollowerGuard>,
    /// Where messages go.
    tx: mpsc::Sender<Result<pb::FollowResponse, Status>>,
    /// The epoch history as of the start.
    epochs: Arc<Epochs>,
    /// Everything up to here was sent.
    sent: Seq,
    /// The next client snapshot holds states written at or after this.
    clients_since: Seq,
    /// Byte budget of one message's records.
    budget: usize,
    /// Server shutdown.
    shutdown: CancellationToken,
    /// The purge horizon when the stream was admitted: a purge above what
    /// the stream has read since then may have hidden a deletion.
    horizon: Seq,
    /// Changes when the auth file is reloaded (`None`: auth is off).
    reloads: Option<tokio::sync::watch::Receiver<u64>>,
    /// The follower's principal: the stream ends if it loses `replicate`.
    identity: Identity,
}

/// Why a stream stops sending.
enum Stop {
    /// The replica went away, or the stream ended with an error sent.
    Done,
    /// The ring overtook the stream: catch up from the log again.
    CatchUp,
}

impl Source {
    async fn run(mut self) {
        let hello = Reply::Hello(pb::FollowHello {
            store_id: self.node.store().store_id().to_string(),
            epoch: self.epochs.current(),
            head: self.node.store().head().0,
            purge_horizon: self.node.store().purge_horizon().0,
            epochs: convert::epochs(&self.epochs),
        });
        if !self.send(hello).await {
            return;
        }
        loop {
            let result = match self.catch_up().await {
                Ok(rx) => self.live(rx).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(Stop::CatchUp) => {
                    self.guard.catching_up();
                    self.clients_since = self.sent;
                }
                Ok(Stop::Done) => return,
                Err(e) => {
                    let _ = self.tx.send(Err(Error::from(e).into())).await;
                    return;
                }
            }
        }
    }

    /// Sends `message`; false if the replica is gone or the server is
    /// shutting down (a stalled replica does not hold the drain up).
    async fn send(&self, message: Reply) -> bool {
        let message = pb::FollowResponse {
            response: Some(message),
        };
        tokio::select! {
            sent = self.tx.send(Ok(message)) => sent.is_ok(),
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Fails if tombstones above `from` were purged while the stream read
    /// the log from there: the replica would never see those deletions.
    fn check_purges(&self, from: Seq) -> Result<(), StoreError> {
        let horizon = self.node.store().purge_horizon();
        if horizon > from && horizon > self.horizon {
            return Err(StoreError::Compacted {
                since: from.0,
                horizon: horizon.0,
            });
        }
        Ok(())
    }

    /// Sends what the log retains up to the head, then the client
    /// snapshot; returns the ring cursor to go on from.
    async fn catch_up(
        &mut self,
    ) -> Result<tokio::sync::broadcast::Receiver<Arc<Commit>>, StoreError> {
        let store = self.node.store().clone();
        let rx = store.feed().subscribe();
        let upto = store.head();
        // Runs of records within the budget; a run that stops inside a
        // commit is `continued`, so the replica applies whole commits.
        while self.sent < upto {
            // A replica whose credential was revoked gets no more of the
            // copy (its stream ends as a live one does).
            if self
                .reloads
                .as_ref()
                .is_some_and(|r| r.has_changed().unwrap_or(false))
            {
                if let Some(r) = &mut self.reloads {
                    r.borrow_and_update();
                }
                if !self.identity.is_current() {
                    let _ = self
                        .tx
                        .send(Err(Status::unauthenticated(
                            "the replication credential was revoked or its grants changed",
                        )))
                        .await;
                    return Err(StoreError::Closed);
                }
            }
            let run = store.read_records(self.sent, upto, self.budget).await?;
            self.check_purges(self.sent)?;
            let reached = run.reached;
            let commit = pb::ReplicatedCommit {
                prev_head: self.sent.0,
                head: reached.0,
                epoch: self.epochs.epoch_of(reached),
                records: run.docs.iter().map(convert::record).collect(),
                clients: Vec::new(),
                primary_head: store.head().0,
                continued: !run.commit_end,
                from_log: true,
                purge_horizon: store.purge_horizon().0,
            };
            if !self.send(Reply::Commit(commit)).await {
                return Err(StoreError::Closed);
            }
            self.sent = reached;
        }
        let read = store.clients_between(self.clients_since, upto).await?;
        // Everything in the clients tree now was written by a commit up to
        // here (the written head, or a commit whose states were stored
        // before it was announced written): once the replica has applied
        // it, its states are consistent. A state of a commit past `upto` is
        // not sent here; that commit brings it.
        let consistent_at = store.feed().written().max(read.latest).0;
        let states = read.states;
        let mut clients: Vec<pb::ReplicatedClient> = Vec::new();
        let mut size = 0;
        for (client, state) in &states {
            let c = convert::client(client, state);
            let len = c.encoded_len() + 8;
            if !clients.is_empty() && size + len > self.budget {
                let part = pb::ClientSnapshot {
                    clients: std::mem::take(&mut clients),
                    complete: false,
                    consistent_at: 0,
                };
                if !self.send(Reply::Clients(part)).await {
                    return Err(StoreError::Closed);
                }
                size = 0;
            }
            size += len;
            clients.push(c);
        }
        let last = pb::ClientSnapshot {
            clients,
            complete: true,
            consistent_at,
        };
        if !self.send(Reply::Clients(last)).await {
            return Err(StoreError::Closed);
        }
        self.guard.consistent_at(consistent_at);
        Ok(rx)
    }

    /// Follows the ring until the replica leaves, the node stops being the
    /// primary, the server shuts down or the ring overtakes the stream.
    async fn live(
        &mut self,
        mut rx: tokio::sync::broadcast::Receiver<Arc<Commit>>,
    ) -> Result<Stop, StoreError> {
        let mut role = self.node.watch_role();
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    let _ = self.tx.send(Err(Status::unavailable(
                        "the primary is shutting down; reconnect and resume",
                    ))).await;
                    return Ok(Stop::Done);
                }
                Ok(()) = async { role.wait_for(|r| *r != Role::Primary).await.map(|_| ()) } => {
                    let _ = self.tx.send(Err(self.node.not_primary().into())).await;
                    return Ok(Stop::Done);
                }
                () = self.tx.closed() => return Ok(Stop::Done),
                Some(()) = crate::auth::reloaded(&mut self.reloads) => {
                    if !self.identity.is_current() {
                        let _ = self.tx.send(Err(Status::unauthenticated(
                            "the replication credential was revoked or its grants changed",
                        ))).await;
                        return Ok(Stop::Done);
                    }
                }
                received = rx.recv() => match received {
                    Ok(commit) => {
                        if !self.forward(&commit).await? {
                            return Ok(Stop::CatchUp);
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::info!(missed, sent = %self.sent, "a replica fell behind the live ring; catching it up from the log");
                        return Ok(Stop::CatchUp);
                    }
                    Err(RecvError::Closed) => return Err(StoreError::Closed),
                },
                _ = progress.tick() => {
                    let store = self.node.store();
                    let message = Reply::Progress(pb::PrimaryProgress {
                        head: store.head().0,
                        purge_horizon: store.purge_horizon().0,
                        epoch: self.epochs.current(),
                    });
                    if !self.send(message).await {
                        return Ok(Stop::Done);
                    }
                }
            }
        }
    }

    /// Sends one commit of the ring, in as many messages as it takes;
    /// false if it does not follow what was sent (catch up instead).
    async fn forward(&mut self, commit: &Commit) -> Result<bool, StoreError> {
        let records_only = commit.prev_head < commit.head;
        if commit.head < self.sent || (commit.head == self.sent && records_only) {
            return Ok(true);
        }
        if commit.prev_head > self.sent {
            return Ok(false);
        }
        let store = self.node.store().clone();
        let docs = match commit.docs() {
            Some(docs) => docs.iter().map(|d| convert::record(d)).collect(),
            None => {
                // Evicted from the ring by its byte bound: the log has them.
                let mut records = Vec::new();
                let mut from = commit.prev_head;
                while from < commit.head {
                    let run = store.read_records(from, commit.head, self.budget).await?;
                    self.check_purges(from)?;
                    records.extend(run.docs.iter().map(convert::record));
                    from = run.reached;
                }
                records
            }
        };
        let mut records: VecDeque<pb::ReplicatedRecord> =
            docs.into_iter().filter(|r| r.seq > self.sent.0).collect();
        let mut clients: VecDeque<pb::ReplicatedClient> = commit
            .clients
            .iter()
            .map(|(c, s)| convert::client(c, s))
            .collect();
        // Cut into messages within the budget; the last one closes the commit.
        loop {
            let mut part = pb::ReplicatedCommit {
                prev_head: self.sent.0,
                head: commit.head.0,
                epoch: commit.epoch,
                records: Vec::new(),
                clients: Vec::new(),
                primary_head: store.head().0,
                continued: false,
                from_log: false,
                purge_horizon: store.purge_horizon().0,
            };
            let mut size = 0;
            while let Some(record) = records.pop_front() {
                let len = record.encoded_len() + 8;
                if size > 0 && size + len > self.budget {
                    records.push_front(record);
                    break;
                }
                size += len;
                part.records.push(record);
            }
            while records.is_empty()
                && let Some(client) = clients.pop_front()
            {
                let len = client.encoded_len() + 8;
                if size > 0 && size + len > self.budget {
                    clients.push_front(client);
                    break;
                }
                size += len;
                part.clients.push(client);
            }
            part.continued = !records.is_empty() || !clients.is_empty();
            let last = !part.continued;
            if !self.send(Reply::Commit(part)).await {
                return Err(StoreError::Closed);
            }
            if last {
                break;
            }
        }
        self.sent = commit.head;
        Ok(true)
    }
}
