//! Applying a primary's `Follow` messages to a store: the part of a replica
//! that does not care where the messages come from. The follower feeds it
//! from the live stream; a snapshot restore (`crate::snapshot`) feeds it
//! from a file, so a restored store is built by exactly the code that
//! builds a replica.

use tokio::sync::oneshot;

use super::convert;
use crate::{
    pb::{self, follow_response::Response as Reply},
    store::{
        Admin, Store, StoreError,
        model::Seq,
        replica::{CommitKind, ReplicatedCommit},
    },
};

/// Why applying (or following) stopped.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Worth retrying (network, restart, a primary not ready).
    #[error("{0}")]
    Transient(String),
    /// Following cannot go on without an operator (another store, a
    /// divergent history); the node keeps serving reads.
    #[error("{0}")]
    Refused(String),
    /// This node holds seqs from this one on that the primary never had.
    #[error("{1}")]
    Diverged(Seq, String),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::StoreMismatch { .. } => Self::Refused(e.to_string()),
            e => Self::Transient(format!("local store: {e}")),
        }
    }
}

/// A commit queued for the writer: resolves to the head once written.
pub type Landing = oneshot::Receiver<Result<Seq, StoreError>>;

/// Applies one stream of a primary's messages, after its hello.
pub struct Applier {
    /// The store written to.
    store: Store,
    /// The primary's epoch (a client snapshot is applied in it).
    epoch: u64,
    /// The head the next whole commit must start from.
    expected: Seq,
    /// The parts of a commit received so far (`continued`).
    partial: Option<ReplicatedCommit>,
}

impl Applier {
    /// Checks the primary's hello against `store`, and takes its identity,
    /// epoch history and purge horizon; the stream resumes after the
    /// store's written head.
    pub async fn admit(store: &Store, hello: &pb::FollowHello) -> Result<Self, Failure> {
        if !store.is_blank()? && *store.store_id() != *hello.store_id {
            return Err(Failure::Refused(format!(
                "this store is {}, the primary's is {}; a replica only follows its own store \
                 (start it from an empty data directory to copy the primary's)",
                store.store_id(),
                hello.store_id
            )));
        }
        let seen = store.seen_epoch()?;
        if hello.epoch < seen {
            return Err(Failure::Transient(format!(
                "the primary is at epoch {}, older than this replica's {seen}: it was deposed; \
                 point --replicate-from at the current primary",
                hello.epoch
            )));
        }
        let theirs = convert::epochs_from(&hello.epochs).map_err(Failure::Transient)?;
        let ours = store.epochs();
        if let Some((first, last)) = theirs.divergence(&ours, store.written()) {
            return Err(Failure::Diverged(
                first,
                format!(
                    "this node holds seqs {first}..={last} that the primary never had (its epoch history \
                     and the primary's part at seq {first}); restart with --discard-divergent to drop them"
                ),
            ));
        }
        if *store.store_id() != *hello.store_id {
            tracing::info!(store_id = %hello.store_id, "a new replica takes its primary's store id");
        }
        store
            .admin(Admin::AdoptStoreId(hello.store_id.clone()))
            .await?;
        store
            .admin(Admin::SetEpochs(theirs, hello.epoch.max(seen)))
            .await?;
        store
            .admin(Admin::RaiseHorizon(Seq(hello.purge_horizon)))
            .await?;
        Ok(Self {
            store: store.clone(),
            epoch: hello.epoch,
            expected: store.written(),
            partial: None,
        })
    }

    /// Applies one message after the hello: a whole commit (or client
    /// snapshot) is queued for the writer and its landing returned; a part
    /// of a commit is kept until its last part arrives.
    pub async fn apply(&mut self, message: Reply) -> Result<Option<Landing>, Failure> {
        let store = &self.store;
        match message {
            Reply::Commit(part) => {
                self.raise_horizon(part.purge_horizon).await?;
                let continued = part.continued;
                let part = convert::commit_from(part).map_err(Failure::Transient)?;
                // A commit's parts share its range (live), or each goes on
                // from the last (catching up from the log).
                let commit = match self.partial.take() {
                    Some(mut commit) => {
                        let follows =
                            part.prev_head == commit.prev_head || part.prev_head == commit.head;
                        if !follows || part.head < commit.head {
                            return Err(Failure::Transient("a commit's parts disagree".into()));
                        }
                        commit.head = part.head;
                        commit.records.extend(part.records);
                        commit.clients.extend(part.clients);
                        commit
                    }
                    None => part,
                };
                if continued {
                    self.partial = Some(commit);
                    return Ok(None);
                }
                if commit.prev_head != self.expected {
                    return Err(Failure::Transient(format!(
                        "commit ({}, {}] does not follow {}",
                        commit.prev_head, commit.head, self.expected
                    )));
                }
                self.expected = commit.head;
                Ok(Some(store.replicate(commit).await?))
            }
            Reply::Clients(snapshot) => {
                let clients = snapshot
                    .clients
                    .into_iter()
                    .map(convert::client_from)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(Failure::Transient)?;
                let commit = ReplicatedCommit {
                    prev_head: self.expected,
                    head: self.expected,
                    epoch: self.epoch,
                    records: Vec::new(),
                    clients,
                    kind: CommitKind::Snapshot(snapshot.complete.then_some(snapshot.consistent_at)),
                };
                Ok(Some(store.replicate(commit).await?))
            }
            Reply::Progress(progress) => {
                self.raise_horizon(progress.purge_horizon).await?;
                Ok(None)
            }
            Reply::Hello(_) => Err(Failure::Transient(
                "unexpected message from the primary".into(),
            )),
        }
    }

    /// Takes a purge horizon the primary raised.
    async fn raise_horizon(&self, horizon: u64) -> Result<(), Failure> {
        if horizon > self.store.purge_horizon().0 {
            self.store.admin(Admin::RaiseHorizon(Seq(horizon))).await?;
        }
        Ok(())
    }
}
