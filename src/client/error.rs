//! The client's one error type, and how a `Status` is read: its ErrorInfo
//! reason, its retry delay, and whether retrying it is safe.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::pb;

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
    /// A push the client gave up on without an answer it could take (its
    /// retry budget ran out on `UNAVAILABLE`, deadlines, broken connections
    /// or rate limits): it may or may not have been applied. `push` holds
    /// its mutations **with the ids they were sent with**; resend it with
    /// [`Client::resend`](super::Client::resend) (now or later, from this
    /// client or a new one with the same client id) and each mutation is
    /// applied exactly once: `DUPLICATE` if an earlier attempt applied it.
    #[error("push not acknowledged ({} mutations, resend with the same ids): {source}", .push.len())]
    Unacknowledged {
        /// The push, ready to resend.
        push: Box<PendingPush>,
        /// Why the last attempt failed.
        source: Box<ClientError>,
    },
}

/// A push sent (or about to be sent) with its mutation ids, that the client
/// got no answer to: see [`ClientError::Unacknowledged`]. Resending it with
/// [`Client::resend`](super::Client::resend) sends the same request, the
/// same ids, so nothing is applied twice.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingPush {
    /// The request as sent: client id, mutations with their ids, atomic.
    pub(crate) request: pb::PushRequest,
    /// True when an attempt may have reached a writer (a deadline, a
    /// connection lost after sending, an `UNAVAILABLE` that was not a
    /// connect failure): a `DUPLICATE` on a resend then means that attempt
    /// applied it.
    pub(crate) maybe_applied: bool,
}

impl PendingPush {
    /// A push to resend from its wire form (e.g. one kept across a restart:
    /// [`PendingPush::request`] encoded with prost). Taken as possibly
    /// applied.
    pub fn from_request(request: pb::PushRequest) -> Self {
        Self {
            request,
            maybe_applied: true,
        }
    }

    /// The request as sent (client id, mutations with their ids).
    pub fn request(&self) -> &pb::PushRequest {
        &self.request
    }

    /// The client id its ids are counted under.
    pub fn client_id(&self) -> &str {
        &self.request.client_id
    }

    /// The mutation ids, in order.
    pub fn mutation_ids(&self) -> Vec<u64> {
        self.request
            .mutations
            .iter()
            .map(|m| m.mutation_id)
            .collect()
    }

    /// Number of mutations.
    pub fn len(&self) -> usize {
        self.request.mutations.len()
    }

    /// True for a push without mutations.
    pub fn is_empty(&self) -> bool {
        self.request.mutations.is_empty()
    }

    /// True when an attempt may have reached a writer, so the push may
    /// have been applied already (false: every attempt failed before the
    /// request left, e.g. connection refused).
    pub fn maybe_applied(&self) -> bool {
        self.maybe_applied
    }
}

impl ClientError {
    /// The gRPC status behind the error, if there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(s) | Self::ResyncNeeded { status: s, .. } => Some(s),
            Self::Unacknowledged { source, .. } => source.status(),
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

    /// The push to resend with the same ids, when a push was given up on
    /// without an answer ([`ClientError::Unacknowledged`]).
    pub fn unacknowledged_push(&self) -> Option<&PendingPush> {
        match self {
            Self::Unacknowledged { push, .. } => Some(push),
            _ => None,
        }
    }

    /// True when a read found that this client's own writes are gone (the
    /// primary holds less than they reached: failover to a replica that had
    /// not replicated them, a restore from an older snapshot).
    pub(crate) fn writes_lost(&self) -> bool {
        matches!(
            self,
            Self::ResyncNeeded {
                reason: ResyncReason::WritesLost,
                ..
            }
        )
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
    /// The primary holds less than the `min_checkpoint` asked for
    /// (`MIN_CHECKPOINT_AHEAD`): writes this client made (and waited to
    /// read) are gone, lost in a failover or a restore from an older
    /// snapshot. The client drops its read-your-writes floor to what the
    /// store holds; local state built on the lost writes must be rebuilt.
    WritesLost,
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
        (Code::OutOfRange, Some("MIN_CHECKPOINT_AHEAD")) => Some(ResyncReason::WritesLost),
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

/// True when connecting failed (refused, unreachable, the connect timeout,
/// a TLS handshake): the request never left the client. tonic keeps its
/// `ConnectError` in the status's source chain.
pub(crate) fn connect_failure(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// True when a failed attempt may nevertheless have reached a writer and
/// been applied: a deadline, a connection lost after the request was sent,
/// an `UNAVAILABLE` that is not a connect failure (a server shutting down
/// mid-call, a push committed on the primary but not on enough replicas).
/// Not after a refused connection, `NOT_PRIMARY`, a rate limit or any other
/// answer that says nothing was done. A pure function, unit-tested below.
pub(crate) fn outcome_unknown(status: &Status) -> bool {
    match status.code() {
        Code::DeadlineExceeded => true,
        Code::Unavailable => !connect_failure(status),
        Code::Unknown | Code::Internal | Code::Cancelled => from_transport(status),
        _ => false,
    }
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

    /// A status as tonic makes it when connecting fails.
    fn refused() -> Status {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        Status::from_error(Box::new(tonic::ConnectError(Box::new(io))))
    }

    #[test]
    fn an_outcome_is_unknown_only_if_the_request_may_have_reached_a_writer() {
        // Nothing left the client, or the server said it did nothing.
        assert_eq!(refused().code(), Code::Unavailable);
        assert!(connect_failure(&refused()));
        assert!(!outcome_unknown(&refused()));
        let redirect = with_info(
            Code::FailedPrecondition,
            "NOT_PRIMARY",
            &[("primary", "http://p:1")],
        );
        assert!(!outcome_unknown(&redirect));
        assert!(!outcome_unknown(&Status::resource_exhausted("full")));
        assert!(!outcome_unknown(&Status::invalid_argument("bad")));
        assert!(
            !outcome_unknown(&Status::internal("storage")),
            "a server's answer"
        );
        // The request may have been applied.
        assert!(outcome_unknown(&Status::deadline_exceeded("slow")));
        assert!(outcome_unknown(&Status::unavailable("shutting down")));
        let not_replicated = Status::unavailable(
            "the push is committed on the primary (checkpoint 7) but only 0 of the 1 replicas \
             required acknowledged it in time; retry it with the same mutation ids",
        );
        assert!(outcome_unknown(&not_replicated));
        let broken = Status::from_error(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(outcome_unknown(&broken));
    }

    #[test]
    fn min_checkpoint_ahead_means_writes_lost() {
        let s = with_info(
            Code::OutOfRange,
            "MIN_CHECKPOINT_AHEAD",
            &[("head", "4"), ("wanted", "10")],
        );
        assert_eq!(resync_reason(&s), Some(ResyncReason::WritesLost));
        assert_eq!(metadata(&s, "head").as_deref(), Some("4"));
        let e = ClientError::from(s);
        assert!(e.is_resync_needed() && e.writes_lost(), "{e}");
        assert!(!ClientError::from(Status::out_of_range("ahead")).writes_lost());
        // A replica behind is retried elsewhere, not a resync.
        let behind = with_info(Code::Unavailable, "REPLICA_BEHIND", &[]);
        assert!(!ClientError::from(behind).is_resync_needed());
    }

    #[test]
    fn an_unacknowledged_push_says_what_its_cause_says() {
        let push = PendingPush {
            request: pb::PushRequest {
                client_id: "c".into(),
                mutations: vec![pb::Mutation {
                    mutation_id: 7,
                    ..Default::default()
                }],
                atomic: false,
            },
            maybe_applied: true,
        };
        let e = ClientError::Unacknowledged {
            push: Box::new(push.clone()),
            source: Box::new(Status::unavailable("down").into()),
        };
        assert_eq!(e.code(), Some(Code::Unavailable));
        assert_eq!(e.unacknowledged_push(), Some(&push));
        assert_eq!(push.mutation_ids(), [7]);
        assert!(e.to_string().contains("UNAVAILABLE: down"), "{e}");
    }
}
