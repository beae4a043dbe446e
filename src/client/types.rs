//! What the client takes and gives: mutations, documents with JSON bodies,
//! checkpoints and results, and their conversions from and to the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::error::ClientError;
use crate::{pb, store::model::EncodedBody};

/// A JSON object: a document's body.
pub type Body = Map<String, Value>;

/// A position to resume reading from: a seq with what the server asks to
/// get back with it (see `PullRequest`): the store it came from, the purge
/// horizon and the epoch it is consistent with. `Checkpoint::default()` is
/// "from the beginning".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every change with seq <= this has been read.
    pub seq: u64,
    /// The store it belongs to (empty: unknown, not checked).
    pub store_id: String,
    /// The purge horizon it is consistent with (0: unknown).
    pub purge_horizon: u64,
    /// The epoch its seq was committed in (0: unknown, not checked).
    pub epoch: u64,
}

impl Checkpoint {
    /// A bare seq, e.g. from a command line: nothing else is checked, and
    /// a seq below the purge horizon is refused as compacted.
    pub fn at(seq: u64) -> Self {
        Self {
            seq,
            ..Self::default()
        }
    }
}

/// The change a mutation makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replace the body with this JSON object.
    Put(Value),
    /// Merge these top-level fields; a field set to null is removed.
    Patch(Value),
    /// Make the document a tombstone.
    Delete,
}

/// One change to one document, before the client gives it a mutation id.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// Collection of the document.
    pub collection: String,
    /// Id of the document.
    pub id: String,
    /// The change.
    pub op: Op,
    /// The version the caller last saw (`None`: unconditional, last writer
    /// wins; `Some(0)`: the document must not exist).
    pub base_version: Option<u64>,
    /// How an overlapping conflict is settled (`Unspecified`: the
    /// collection's default).
    pub on_conflict: pb::ConflictStrategy,
}

impl Mutation {
    fn new(collection: impl Into<String>, id: impl Into<String>, op: Op) -> Self {
        Self {
            collection: collection.into(),
            id: id.into(),
            op,
            base_version: None,
            on_conflict: pb::ConflictStrategy::Unspecified,
        }
    }

    /// Replace the body (`body` must be a JSON object).
    pub fn put(collection: impl Into<String>, id: impl Into<String>, body: Value) -> Self {
        Self::new(collection, id, Op::Put(body))
    }

    /// Merge top-level fields into the body (`body` must be a JSON object).
    pub fn patch(collection: impl Into<String>, id: impl Into<String>, body: Value) -> Self {
        Self::new(collection, id, Op::Patch(body))
    }

    /// Delete the document.
    pub fn delete(collection: impl Into<String>, id: impl Into<String>) -> Self {
        Self::new(collection, id, Op::Delete)
    }

    /// Applies only against this version (see `Mutation.base_version`).
    #[must_use]
    pub fn base_version(mut self, version: u64) -> Self {
        self.base_version = Some(version);
        self
    }

    /// Settles an overlapping conflict this way.
    #[must_use]
    pub fn on_conflict(mut self, strategy: pb::ConflictStrategy) -> Self {
        self.on_conflict = strategy;
        self
    }

    /// The wire form with `mutation_id`; `index` names it in errors.
    pub(crate) fn to_pb(
        &self,
        mutation_id: u64,
        index: usize,
    ) -> Result<pb::Mutation, ClientError> {
        let body = |v: &Value| match v {
            Value::Object(map) => Ok(EncodedBody::encode(map)),
            other => Err(ClientError::Input(format!(
                "mutations[{index}]: the body must be a JSON object, not {other}"
            ))),
        };
        let op = match &self.op {
            Op::Put(v) => pb::mutation::Op::Put(body(v)?),
            Op::Patch(v) => pb::mutation::Op::Patch(body(v)?),
            Op::Delete => pb::mutation::Op::Delete(()),
        };
        Ok(pb::Mutation {
            mutation_id,
            collection: self.collection.clone(),
            id: self.id.clone(),
            base_version: self.base_version,
            op: Some(op),
            on_conflict: self.on_conflict.into(),
        })
    }
}

/// A document at one version, with its body as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Its collection.
    pub collection: String,
    /// Its id.
    pub id: String,
    /// Its version (+1 per accepted change).
    pub version: u64,
    /// Seq of its latest change.
    pub seq: u64,
    /// True for a tombstone.
    pub deleted: bool,
    /// The JSON object; `None` for a tombstone, or in a push result whose
    /// body did not fit the answer (read it with `get`).
    pub body: Option<Body>,
    /// Server time of its latest change.
    pub updated_at: Option<SystemTime>,
    /// Client id of the push that made its latest change (empty:
    /// anonymous; with auth, the principal's name).
    pub updated_by: String,
}

impl TryFrom<pb::Document> for Document {
    type Error = ClientError;

    fn try_from(d: pb::Document) -> Result<Self, ClientError> {
        let body = match (&d.body, d.deleted) {
            (Some(b), false) => Some(b.to_json("body").map_err(ClientError::Decode)?),
            _ => None,
        };
        let updated_at = d.updated_at.and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let nanos = u32::try_from(t.nanos).ok()?;
            UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
        });
        Ok(Self {
            collection: d.collection,
            id: d.id,
            version: d.version,
            seq: d.seq,
            deleted: d.deleted,
            body,
            updated_at,
            updated_by: d.updated_by,
        })
    }
}

/// Converts every document of a page or batch.
pub(crate) fn documents(docs: Vec<pb::Document>) -> Result<Vec<Document>, ClientError> {
    docs.into_iter().map(Document::try_from).collect()
}

/// What happened to one mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct MutationResult {
    /// The id the client gave it.
    pub mutation_id: u64,
    /// The server's outcome (see `Outcome` in sync.proto).
    pub outcome: pb::Outcome,
    /// The document after it (or the current one when nothing was
    /// written); `None` if the document does not exist.
    pub document: Option<Document>,
    /// On CONFLICT and RESOLVED: the top-level fields both sides changed.
    pub conflicting_fields: Vec<String>,
    /// True when `conflicting_fields` was cut short by the message cap.
    pub conflicting_fields_truncated: bool,
    /// True when `outcome` is DUPLICATE and an earlier attempt of this
    /// push (in this call, or before a [`Client::resend`](super::Client::resend))
    /// may have reached a writer: its outcome was unknown (a deadline, a
    /// connection lost after sending, an `UNAVAILABLE` that was not a
    /// connect failure, a `--sync-replicas` timeout). The mutation **was
    /// applied**, once, by that attempt (applied, merged or resolved: the
    /// server does not say which); `document` is the current state. False
    /// when every earlier attempt failed before reaching a writer
    /// (connection refused, `NOT_PRIMARY`): a DUPLICATE then means the id
    /// was used before, not that this push was applied.
    pub applied_by_earlier_attempt: bool,
}

impl MutationResult {
    /// True when the mutation changed (or had changed, see
    /// [`MutationResult::applied_by_earlier_attempt`]) the document as
    /// asked or merged.
    pub fn is_applied(&self) -> bool {
        matches!(
            self.outcome,
            pb::Outcome::Applied | pb::Outcome::Merged | pb::Outcome::Resolved
        ) || self.applied_by_earlier_attempt
    }

    /// True for CONFLICT and NOT_APPLIED: nothing was written.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self.outcome,
            pb::Outcome::Conflict | pb::Outcome::NotApplied
        )
    }

    /// `maybe_applied`: an earlier attempt of this push may have reached a
    /// writer.
    pub(crate) fn from_pb(r: pb::MutationResult, maybe_applied: bool) -> Result<Self, ClientError> {
        let outcome = pb::Outcome::try_from(r.outcome).unwrap_or(pb::Outcome::Unspecified);
        Ok(Self {
            mutation_id: r.mutation_id,
            outcome,
            document: r.document.map(Document::try_from).transpose()?,
            conflicting_fields: r.conflicting_fields,
            conflicting_fields_truncated: r.conflicting_fields_truncated,
            applied_by_earlier_attempt: maybe_applied && outcome == pb::Outcome::Duplicate,
        })
    }
}

/// The answer to a push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushResult {
    /// One result per mutation, in order.
    pub results: Vec<MutationResult>,
    /// The store's head once the push committed: reads from this client
    /// wait for it (read-your-writes).
    pub checkpoint: Checkpoint,
    /// The highest mutation id the server processed for this client id.
    pub last_mutation_id: u64,
}

impl PushResult {
    /// True when any mutation was not written because of a conflict.
    pub fn has_conflict(&self) -> bool {
        self.results.iter().any(MutationResult::is_conflict)
    }
}

/// One page of a pull.
#[derive(Debug, Clone, PartialEq)]
pub struct PullPage {
    /// Changed documents in seq order, each once at its latest state.
    pub documents: Vec<Document>,
    /// Where the next page starts (and where to resume later).
    pub checkpoint: Checkpoint,
    /// True if changes may remain after `checkpoint`.
    pub has_more: bool,
    /// The page's number, from 1: progress for a caller that shows it.
    pub page: u64,
    /// Documents in this page and the pages before it.
    pub documents_so_far: u64,
}

/// What a pull reads.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Where to start (default: from the beginning).
    pub since: Checkpoint,
    /// Only these collections (empty: all the caller may read).
    pub collections: Vec<String>,
    /// Documents per page (0: the server's default).
    pub page_size: u32,
}

/// What a watch follows.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Where to start (default: from the beginning: the backlog first).
    pub since: Checkpoint,
    /// Only these collections (empty: all the caller may read).
    pub collections: Vec<String>,
}
