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
    /// A read task panicked; the cause is logged.
    #[error("read failed")]
    ReadFailed,
    /// The store is shutting down and takes no more writes.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn corrupt(tree: &'static str, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            tree,
            detail: detail.into(),
        }
    }
}
