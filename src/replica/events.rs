//! The stream of local changes: what a local write, the server (a pull, a
//! watch, a push answer) or a resolution did to the replica, sent after the
//! commit that made it durable.
//!
//! It is a [`tokio::sync::broadcast`]: every receiver gets every event sent
//! after it subscribed; one that falls more than the capacity
//! ([`CAPACITY`] unless [`ReplicaOptions::event_capacity`](super::ReplicaOptions::event_capacity) says otherwise) behind
//! is told how many it missed ([`Lagged`]) and goes on from the oldest kept,
//! so a consumer never misses changes without knowing (it re-reads the view
//! then).

use futures_util::Stream;
use tokio::sync::broadcast;

use super::{LocalDocument, Resolution};
use crate::client::{Checkpoint, Document};

/// Events a receiver may fall behind by before it is told it lagged.
pub const CAPACITY: usize = 4096;

/// How the server acknowledged a write (see `Outcome` in sync.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acknowledgement {
    /// Written as asked.
    Applied,
    /// Written on top of someone else's disjoint changes.
    Merged,
    /// Overlapping changes settled by a server-side strategy (the replica
    /// sends REJECT, so only an old outbox entry could get this).
    Resolved,
    /// Already applied by an earlier attempt whose answer was lost:
    /// applied once, not again.
    Duplicate,
}

/// Who settled a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedBy {
    /// The collection's resolver (keep-server, keep-local).
    Resolver,
    /// The collection's merge callback.
    Merge,
    /// [`LocalReplica::resolve`](super::LocalReplica::resolve).
    Hand,
}

/// One change to the replica.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaEvent {
    /// A local write entered the outbox (durable).
    Written {
        /// Its mutation id.
        mutation_id: u64,
        /// The document in the optimistic view after it.
        document: LocalDocument,
    },
    /// The server acknowledged a write: it left the outbox.
    Acknowledged {
        /// The write's mutation id.
        mutation_id: u64,
        /// Collection of the document.
        collection: String,
        /// Id of the document.
        id: String,
        /// How.
        acknowledgement: Acknowledgement,
        /// The document's version in the answer (for a duplicate: its
        /// version now, not the one the earlier attempt produced).
        version: u64,
    },
    /// A write answered CONFLICT was parked for
    /// [`LocalReplica::resolve`](super::LocalReplica::resolve).
    Parked {
        /// The rejected mutation id.
        mutation_id: u64,
        /// Collection of the document.
        collection: String,
        /// Id of the document.
        id: String,
        /// The top-level fields both sides changed.
        conflicting_fields: Vec<String>,
    },
    /// A conflict was settled: the rejected write left the outbox.
    Resolved {
        /// The rejected mutation id.
        mutation_id: u64,
        /// Collection of the document.
        collection: String,
        /// Id of the document.
        id: String,
        /// What was decided.
        resolution: Resolution,
        /// Who decided.
        by: ResolvedBy,
        /// The id the write (kept or merged) goes out under; `None` for
        /// keep-server (dropped).
        resent_as: Option<u64>,
        /// The document's later writes, never sent, moved to new ids
        /// behind it: (old id, new id).
        renumbered: Vec<(u64, u64)>,
    },
    /// Documents the server changed entered the base (the optimistic view
    /// shows them, with pending writes replayed on top).
    ServerChanges {
        /// The documents, as the server sent them.
        documents: Vec<Document>,
        /// The checkpoint the base is caught up to, for changes from a
        /// pull or a watch; `None` for documents from a push answer.
        checkpoint: Option<Checkpoint>,
    },
    /// The base was rebuilt from a Pull from 0 (the outbox kept): re-read
    /// the view.
    Resynced {
        /// The checkpoint of the new base.
        checkpoint: Checkpoint,
    },
}

/// A receiver fell behind and missed this many events: re-read the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event receiver lagged and missed {0} events")]
pub struct Lagged(pub u64);

/// A receiver of [`ReplicaEvent`]s, from
/// [`LocalReplica::events`](super::LocalReplica::events).
#[derive(Debug)]
pub struct Events {
    /// The broadcast receiver.
    rx: broadcast::Receiver<ReplicaEvent>,
}

impl Events {
    pub(super) fn new(rx: broadcast::Receiver<ReplicaEvent>) -> Self {
        Self { rx }
    }

    /// The next event; `Err(Lagged)` once after events were missed; `None`
    /// once every handle of the replica is gone.
    pub async fn recv(&mut self) -> Option<Result<ReplicaEvent, Lagged>> {
        match self.rx.recv().await {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is waiting (as [`Events::recv`], without
    /// waiting).
    pub fn try_recv(&mut self) -> Option<Result<ReplicaEvent, Lagged>> {
        match self.rx.try_recv() {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(_) => None,
        }
    }

    /// The events as a `Stream`.
    pub fn into_stream(self) -> impl Stream<Item = Result<ReplicaEvent, Lagged>> + Send {
        futures_util::stream::unfold(self, |mut events| async move {
            events.recv().await.map(|e| (e, events))
        })
    }
}

/// The sending side, kept by the replica.
#[derive(Debug)]
pub(super) struct Emitter {
    /// The broadcast sender.
    tx: broadcast::Sender<ReplicaEvent>,
}

impl Emitter {
    /// A channel keeping `capacity` events (at least 1).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::Sender::new(capacity.max(1)),
        }
    }

    pub(super) fn subscribe(&self) -> Events {
        Events::new(self.tx.subscribe())
    }

    /// Sends events (after the commit that made them true); nobody
    /// listening is fine.
    pub(super) fn send(&self, events: impl IntoIterator<Item = ReplicaEvent>) {
        for e in events {
            let _ = self.tx.send(e);
        }
    }
}
