//! The service-boundary error and its one mapping to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

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
    /// Too many subscribers, or a similar limit.
    #[error("{0}")]
    ResourceExhausted(String),
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

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(msg) => Status::invalid_argument(msg),
            e @ Error::WrongStore { .. } => Status::failed_precondition(e.to_string()),
            e @ Error::CheckpointAhead { .. } => Status::out_of_range(e.to_string()),
            Error::ResourceExhausted(msg) => Status::resource_exhausted(msg),
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
