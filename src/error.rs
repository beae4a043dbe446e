//! The service-boundary error and its one mapping to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

/// How long a caller refused for too many open streams waits before
/// trying again.
pub const STREAMS_FULL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a call failed. A CONFLICT is a result, never an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's checkpoint belongs to another store.
    #[error("checkpoint belongs to another store (this is store {current}); resync from 0")]
    WrongStore {
        /// This store's id.
        current: String,
    },
    /// The caller's checkpoint is past this store's head.
    #[error(
        "checkpoint {since} is ahead of this store's head {head}; discard local state and resync from 0"
    )]
    CheckpointAhead {
        /// The caller's checkpoint.
        since: u64,
        /// This store's head.
        head: u64,
    },
    /// The checkpoint came from a primary replaced before it was
    /// replicated: this node's history gives its seq to another epoch.
    #[error(
        "checkpoint {since} was given out in epoch {epoch}, but here seq {since} belongs to epoch {ours}: \
         it came from a primary that was replaced before that change was replicated; discard local state and resync from 0"
    )]
    CheckpointDiverged {
        /// The caller's checkpoint.
        since: u64,
        /// The epoch the caller says it came from.
        epoch: u64,
        /// The epoch this node's history gives it.
        ours: u64,
    },
    /// The caller spent its rate limit.
    #[error(
        "rate limit: at most {rate} {what} a second for this principal; retry after {retry_after:?}"
    )]
    RateLimited {
        /// What is limited.
        what: &'static str,
        /// The limit.
        rate: u64,
        /// When enough will be available.
        retry_after: std::time::Duration,
    },
    /// The caller may not do this; the message names the field.
    #[error("{0}")]
    PermissionDenied(String),
    /// Too many subscribers, or a similar limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Too many streams open (the server's or a principal's cap): retried
    /// after a delay (RetryInfo), as a stream ends soon enough.
    #[error("{0}")]
    StreamsFull(String),
    /// A primary asked to wait for a `min_checkpoint` it never wrote: the
    /// writes the caller read its own of are not in this store (lost in a
    /// failover or a restore); waiting would never end.
    #[error(
        "min_checkpoint {wanted} is ahead of this primary's head {head}: the writes it names are not in this store \
         (lost in a failover or a restore); drop it and resync"
    )]
    MinCheckpointAhead {
        /// The caller's min_checkpoint.
        wanted: u64,
        /// This primary's head.
        head: u64,
    },
    /// This node has not applied the checkpoint a read asks for, within
    /// the wait allowed.
    #[error(
        "this node has applied up to {applied}, not yet {wanted}; retry, or read from the primary"
    )]
    ReplicaBehind {
        /// The node's head.
        applied: u64,
        /// The checkpoint asked for.
        wanted: u64,
    },
    /// Writes go to the primary (empty if unknown: this node was deposed).
    #[error("this node is not the primary{}", if primary.is_empty() { "; it was deposed by a newer epoch".to_owned() } else { format!("; send writes to {primary}") })]
    NotPrimary {
        /// The primary's URL, if known.
        primary: String,
    },
    /// A push committed on the primary but not yet on enough replicas.
    #[error(
        "the push is committed on the primary (checkpoint {checkpoint}) but only {acked} of the {wanted} replicas \
         required acknowledged it in time; retry it with the same mutation ids (they answer DUPLICATE once replicated)"
    )]
    NotReplicated {
        /// The push's checkpoint.
        checkpoint: u64,
        /// Replicas that acknowledged it.
        acked: usize,
        /// --sync-replicas.
        wanted: usize,
    },
    /// The request cannot be served in this node's state; the message says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A follower's store is another store.
    #[error(
        "the replica's store is {replica}, this primary's is {primary}; a replica only follows its own store"
    )]
    StoreMismatch {
        /// The replica's store id.
        replica: String,
        /// This store's id.
        primary: String,
    },
    /// A follower holds commits this primary never had.
    #[error(
        "the replica holds seqs {first}..={last} that this primary never had (they were committed by a deposed primary); \
         restart it with --discard-divergent to drop them"
    )]
    Diverged {
        /// First divergent seq.
        first: u64,
        /// Last.
        last: u64,
    },
    /// The primary answered a forwarded call with this status.
    #[error("{}", .0.message())]
    Forwarded(Status),
    /// The store failed underneath.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// A bad-input error naming the field, e.g. `mutations[2].collection`.
    pub fn invalid(field: impl std::fmt::Display, problem: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {problem}"))
    }
}

/// A status with a `google.rpc.ErrorInfo` (domain `deltasync`).
fn detailed<const N: usize>(
    code: Code,
    error: &Error,
    reason: &str,
    metadata: [(&str, String); N],
) -> Status {
    Status::with_error_details(
        code,
        error.to_string(),
        ErrorDetails::with_error_info(
            reason,
            "deltasync",
            metadata.map(|(k, v)| (k.to_owned(), v)),
        ),
    )
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(msg) => Status::invalid_argument(msg),
            Error::WrongStore { ref current } => {
                let current = current.clone();
                detailed(
                    Code::FailedPrecondition,
                    &error,
                    "STORE_MISMATCH",
                    [("store_id", current)],
                )
            }
            e @ Error::CheckpointAhead { .. } => Status::out_of_range(e.to_string()),
            e @ Error::CheckpointDiverged { since, epoch, ours } => detailed(
                Code::OutOfRange,
                &e,
                "CHECKPOINT_DIVERGED",
                [
                    ("checkpoint", since.to_string()),
                    ("checkpoint_epoch", epoch.to_string()),
                    ("epoch", ours.to_string()),
                ],
            ),
            Error::ResourceExhausted(msg) => Status::resource_exhausted(msg),
            Error::PermissionDenied(msg) => Status::permission_denied(msg),
            e @ Error::RateLimited { retry_after, .. } => Status::with_error_details(
                Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::StreamsFull(msg) => Status::with_error_details(
                Code::ResourceExhausted,
                msg,
                ErrorDetails::with_retry_info(Some(STREAMS_FULL_RETRY)),
            ),
            e @ Error::MinCheckpointAhead { wanted, head } => detailed(
                Code::OutOfRange,
                &e,
                "MIN_CHECKPOINT_AHEAD",
                [("wanted", wanted.to_string()), ("head", head.to_string())],
            ),
            e @ Error::ReplicaBehind { applied, wanted } => detailed(
                Code::Unavailable,
                &e,
                "REPLICA_BEHIND",
                [
                    ("applied", applied.to_string()),
                    ("wanted", wanted.to_string()),
                ],
            ),
            Error::NotPrimary { ref primary } => {
                let primary = primary.clone();
                detailed(
                    Code::FailedPrecondition,
                    &error,
                    "NOT_PRIMARY",
                    [("primary", primary)],
                )
            }
            e @ Error::NotReplicated { .. } => Status::unavailable(e.to_string()),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            e @ Error::StoreMismatch { .. } => {
                detailed(Code::FailedPrecondition, &e, "STORE_MISMATCH", [])
            }
            e @ Error::Diverged { first, last } => detailed(
                Code::FailedPrecondition,
                &e,
                "DIVERGED",
                [("first", first.to_string()), ("last", last.to_string())],
            ),
            Error::Forwarded(status) => status,
            Error::Store(e @ StoreError::Replication(_)) => {
                tracing::error!(cause = %e, "replication failure");
                Status::internal("replication failure")
            }
            Error::Store(StoreError::Compacted { since, horizon }) => Status::with_error_details(
                Code::OutOfRange,
                format!(
                    "checkpoint {since} is older than the purge horizon {horizon}: deletions it never saw were purged; \
                     discard local state and resync from 0"
                ),
                ErrorDetails::with_error_info(
                    "CHECKPOINT_COMPACTED",
                    "deltasync",
                    [
                        ("purge_horizon".to_owned(), horizon.to_string()),
                        ("checkpoint".to_owned(), since.to_string()),
                    ],
                ),
            ),
            Error::Store(e @ StoreError::DeadlineExceeded) => {
                Status::deadline_exceeded(e.to_string())
            }
            Error::Store(StoreError::Closed) => {
                Status::unavailable("server is shutting down; retry")
            }
            Error::Store(StoreError::OutcomeUnknown) => Status::unavailable(
                "a storage failure left this push's outcome unknown; retry it with the same mutation ids (they are answered with the truth) on another replica or after a restart",
            ),
            Error::Store(StoreError::NotYetDurable(since)) => Status::unavailable(format!(
                "checkpoint {since} was acknowledged but is not durable yet; retry"
            )),
            Error::Store(StoreError::Stopped) => Status::unavailable(
                "this server stopped taking writes after a storage failure; retry on another replica or after it restarts",
            ),
            Error::Store(
                e @ (StoreError::BodyTooLarge { .. } | StoreError::OutcomeForgotten { .. }),
            ) => Status::failed_precondition(e.to_string()),
            Error::Store(e) => {
                tracing::error!(cause = %e, "storage failure");
                Status::internal("internal storage error")
            }
        }
    }
}
