//! The client's one error type, and how a `Status` is read: its ErrorInfo
//! reason, its retry delay, and whether retrying it is safe.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Why a client call failed. The server's `Status` is kept whole, so its
/// code, message and `google.rpc.ErrorInfo` stay available.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client was configured wrongly (a bad endpoint URL, TLS files).
    #[error("client configuration: {0}")]
    Config(String),
    /// What the caller asked is not valid before it is sent (e.g. a body
    /// that is not a JSON object).
    #[error("invalid input: {0}")]
    Input(String),
    /// The server's answer could not be read (a body that is not JSON).
    #[error("cannot decode the server's answer: {0}")]
    Decode(String),
    /// The checkpoint cannot be resumed from: discard local state and
    /// resync from 0 (`OUT_OF_RANGE`, or `FAILED_PRECONDITION` naming
    /// another store).
    #[error("resync needed ({reason:?}): {}", .status.message())]
    ResyncNeeded {
        /// Why.
        reason: ResyncReason,
        /// The server's status.
        status: Box<Status>,
    },
    /// The server (or the transport) answered with this status, after any
    /// retries the client makes.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Box<Status>),
}

impl ClientError {
    /// The gRPC status behind the error, if there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(s) | Self::ResyncNeeded { status: s, .. } => Some(s),
            _ => None,
        }
    }

    /// The gRPC code behind the error, if there is one.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The `google.rpc.ErrorInfo` reason (e.g. `NOT_PRIMARY`,
    /// `CHECKPOINT_COMPACTED`, `REPLICA_BEHIND`), if the status has one.
    pub fn reason(&self) -> Option<String> {
        self.status().and_then(reason)
    }

    /// True when the caller must discard local state and resync from 0.
    pub fn is_resync_needed(&self) -> bool {
        matches!(self, Self::ResyncNeeded { .. })
    }
}

impl From<Status> for ClientError {
    /// A status that means "resync" becomes [`ClientError::ResyncNeeded`].
    fn from(status: Status) -> Self {
        match resync_reason(&status) {
            Some(reason) => Self::ResyncNeeded {
                reason,
                status: Box::new(status),
            },
            None => Self::Status(Box::new(status)),
        }
    }
}

/// Why a checkpoint cannot be resumed from (see sync.proto: OUT_OF_RANGE
/// always means "discard local state and resync from 0").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// Tombstones were purged past the checkpoint (`CHECKPOINT_COMPACTED`).
    Compacted,
    /// The checkpoint came from a primary replaced before it was replicated
    /// (`CHECKPOINT_DIVERGED`).
    Diverged,
    /// The checkpoint belongs to another store (`STORE_MISMATCH`).
    StoreChanged,
    /// Any other `OUT_OF_RANGE`, e.g. a checkpoint beyond anything the
    /// store acknowledged.
    OutOfRange,
}

/// The ErrorInfo reason of `status`, if it has one.
pub(crate) fn reason(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
}

/// The ErrorInfo metadata value `key` of `status`.
pub(crate) fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get(key).cloned())
}

/// Whether `status` asks the caller to resync, and why.
pub(crate) fn resync_reason(status: &Status) -> Option<ResyncReason> {
    let reason = reason(status);
    match (status.code(), reason.as_deref()) {
        (Code::OutOfRange, Some("CHECKPOINT_COMPACTED")) => Some(ResyncReason::Compacted),
        (Code::OutOfRange, Some("CHECKPOINT_DIVERGED")) => Some(ResyncReason::Diverged),
        (Code::OutOfRange, _) => Some(ResyncReason::OutOfRange),
        (Code::FailedPrecondition, Some("STORE_MISMATCH")) => Some(ResyncReason::StoreChanged),
        _ => None,
    }
}

/// What the client does after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Give up: the status is the answer.
    Fail,
    /// Try the next endpoint (after a backoff once every endpoint failed).
    Failover,
    /// Go to the primary at this URL (`NOT_PRIMARY`).
    Redirect(String),
    /// Retry after the server's `RetryInfo` delay.
    RetryAfter(Duration),
}

/// What to do after `status`. `idempotent`: resending the request cannot
/// apply anything twice (reads, and pushes whose mutation ids are all set),
/// so an attempt whose outcome is unknown (a deadline, a connection lost
/// mid-call) may be repeated. A pure function, unit-tested below.
pub(crate) fn next(status: &Status, idempotent: bool) -> Next {
    match status.code() {
        Code::FailedPrecondition if reason(status).as_deref() == Some("NOT_PRIMARY") => {
            match metadata(status, "primary") {
                Some(primary) if !primary.is_empty() => Next::Redirect(primary),
                // Deposed: another endpoint may be the new primary.
                _ => Next::Failover,
            }
        }
        // Connection refused or reset before the call was sent, a server
        // shutting down, a replica behind: another node may answer. A
        // sync-replicas timeout is UNAVAILABLE too, and safe to resend with
        // the same ids.
        Code::Unavailable => Next::Failover,
        Code::ResourceExhausted => match status.get_error_details().retry_info() {
            Some(info) => Next::RetryAfter(info.retry_delay.unwrap_or_default()),
            None => Next::Fail,
        },
        Code::DeadlineExceeded if idempotent => Next::Failover,
        // The connection broke mid-call (the status came from the
        // transport, not from a server): the outcome is unknown.
        Code::Unknown | Code::Internal | Code::Cancelled
            if idempotent && from_transport(status) =>
        {
            Next::Failover
        }
        _ => Next::Fail,
    }
}

/// True for a status made by the client's transport (a broken connection)
/// rather than sent by a server: tonic keeps the transport error as its
/// source.
fn from_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// The canonical name of a code (`UNAVAILABLE`), as grpcurl and the gRPC
/// docs print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    fn with_info(code: Code, reason: &str, meta: &[(&str, &str)]) -> Status {
        Status::with_error_details(
            code,
            "x",
            ErrorDetails::with_error_info(
                reason,
                "deltasync",
                meta.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
        )
    }

    #[test]
    fn only_safe_failures_are_retried() {
        assert_eq!(next(&Status::unavailable("down"), false), Next::Failover);
        assert_eq!(next(&Status::invalid_argument("bad"), true), Next::Fail);
        assert_eq!(next(&Status::internal("storage"), true), Next::Fail);
        assert_eq!(
            next(&Status::deadline_exceeded("slow"), true),
            Next::Failover
        );
        assert_eq!(next(&Status::deadline_exceeded("slow"), false), Next::Fail);
        assert_eq!(next(&Status::resource_exhausted("full"), true), Next::Fail);
        let limited = Status::with_error_details(
            Code::ResourceExhausted,
            "rate",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(250))),
        );
        assert_eq!(
            next(&limited, false),
            Next::RetryAfter(Duration::from_millis(250))
        );
    }

    #[test]
    fn not_primary_goes_to_the_named_primary() {
        let s = with_info(
            Code::FailedPrecondition,
            "NOT_PRIMARY",
            &[("primary", "http://p:1")],
        );
        assert_eq!(next(&s, true), Next::Redirect("http://p:1".into()));
        let deposed = with_info(Code::FailedPrecondition, "NOT_PRIMARY", &[("primary", "")]);
        assert_eq!(next(&deposed, true), Next::Failover);
        assert_eq!(
            next(&Status::failed_precondition("too big"), true),
            Next::Fail
        );
    }

    #[test]
    fn out_of_range_means_resync() {
        let s = with_info(Code::OutOfRange, "CHECKPOINT_COMPACTED", &[]);
        assert!(ClientError::from(s).is_resync_needed());
        let e = ClientError::from(Status::out_of_range("ahead"));
        assert!(matches!(
            e,
            ClientError::ResyncNeeded {
                reason: ResyncReason::OutOfRange,
                ..
            }
        ));
        assert!(!ClientError::from(Status::unavailable("x")).is_resync_needed());
    }
}
