//! Errors of the store layer.

/// What can go wrong below the service boundary. None of these reach a
/// client verbatim: the service maps them to a generic `INTERNAL`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption it detected, ...).
    #[error("storage failure: {0}")]
    Storage(#[from] sled::Error),
    /// The caller's checkpoint is older than the purge horizon: tombstones it
    /// never saw are gone, so continuing would silently miss deletions.
    #[error("checkpoint {since} is older than the purge horizon {horizon}")]
    Compacted {
        /// The caller's checkpoint.
        since: u64,
        /// The store's purge horizon.
        horizon: u64,
    },
    /// A stored record did not decode.
    #[error("corrupt record in tree {tree}: {detail}")]
    Corrupt {
        /// Which tree held it.
        tree: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The store on disk has a layout this build does not know.
    #[error("unsupported schema version {found} (this build reads {supported})")]
    Schema {
        /// Version found on disk.
        found: u64,
        /// Version this build reads.
        supported: u64,
    },
    /// A name too long for the key format (validation prevents it).
    #[error("key too long")]
    KeyTooLong,
    /// The group commit failed; the writer logged the cause.
    #[error("commit failed")]
    CommitFailed,
    /// The flush of this push's commit failed: it may or may not be on disk.
    /// A retry with the same mutation ids (after a restart, or on another
    /// node) gets the truth.
    #[error("the flush of this commit failed; its outcome is unknown")]
    OutcomeUnknown,
    /// A checkpoint acknowledged to a pusher did not become durable in time.
    #[error("checkpoint {0} is acknowledged but not yet durable")]
    NotYetDurable(u64),
    /// A flush failed earlier, so the writer takes no more commits until the
    /// store is opened again (what is on disk is unknown).
    #[error("the store stopped taking writes after a failed flush")]
    Stopped,
    /// A mutation would store a body over the limit; its push is refused
    /// whole and nothing of it is written.
    #[error(
        "mutations[{mutation}]: the resulting body would be {size} bytes encoded; the limit is {limit}, so nothing of this push was written"
    )]
    BodyTooLarge {
        /// Index of the mutation in its push.
        mutation: usize,
        /// Encoded size of the body it would produce.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A retried mutation id is older than the outcomes the store keeps for
    /// its client; its push is refused whole.
    #[error(
        "mutations[{mutation}].mutation_id: the outcome of mutation_id {mutation_id} is no longer known \
         (the server keeps a bounded record of each client's unapplied ids); Get the document, reconcile and \
         send the change under a new mutation_id; nothing of this push was written"
    )]
    OutcomeForgotten {
        /// Index of the mutation in its push.
        mutation: usize,
        /// Its mutation id.
        mutation_id: u64,
    },
    /// A replicated commit was refused: not the next one, or malformed.
    #[error("replication: {0}")]
    Replication(String),
    /// The store is a replica's copy of another store, or not empty, so it
    /// cannot adopt the primary's identity.
    #[error("this store is {local}, not the primary's {primary}, and is not empty")]
    StoreMismatch {
        /// This store's id.
        local: String,
        /// The primary's.
        primary: String,
    },
    /// A push's deadline passed before the writer took it up: nothing of it
    /// was committed.
    #[error("the deadline passed before the push was committed; nothing of it was written")]
    DeadlineExceeded,
    /// A read task panicked; the cause is logged.
    #[error("read failed")]
    ReadFailed,
    /// The store is shutting down and takes no more writes.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// The error to tell each of several callers failed by this one: what
    /// they can act on is kept; a storage failure (logged where it
    /// happened) becomes [`StoreError::CommitFailed`].
    pub(crate) fn clone_kind(&self) -> Self {
        match self {
            Self::Replication(m) => Self::Replication(m.clone()),
            Self::OutcomeUnknown => Self::OutcomeUnknown,
            Self::Stopped => Self::Stopped,
            Self::Closed => Self::Closed,
            Self::KeyTooLong => Self::KeyTooLong,
            Self::DeadlineExceeded => Self::DeadlineExceeded,
            _ => Self::CommitFailed,
        }
    }

    pub(crate) fn corrupt(tree: &'static str, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            tree,
            detail: detail.into(),
        }
    }
}
