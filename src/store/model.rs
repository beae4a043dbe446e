//! Domain types of the store. No proto types here: conversions live in
//! `service::convert`. A document's body travels as an [`EncodedBody`], the
//! opaque stored form (see `store::body`); rules that read fields work on
//! the JSON [`Body`].

use std::{fmt, time::SystemTime};

pub use super::body::EncodedBody;

/// A JSON object: the body of a document.
pub type Body = serde_json::Map<String, serde_json::Value>;

/// Position in the global, gap-free commit sequence. Checkpoint `N` means
/// "every change with seq <= N".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub u64);

/// Per-document version: 1 on create, +1 on every accepted change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A document at one version, as stored and as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Collection the document belongs to.
    pub collection: String,
    /// Identifier within the collection.
    pub id: String,
    /// Version of this state.
    pub version: Version,
    /// The body, encoded; empty for a tombstone.
    pub body: EncodedBody,
    /// True for a tombstone.
    pub deleted: bool,
    /// Seq of the change that produced this state.
    pub seq: Seq,
    /// Server time of that change.
    pub updated_at: SystemTime,
    /// `client_id` of the push that made the change ("" if anonymous).
    pub updated_by: String,
}

/// A put's new body: its canonical encoding, and its fields for the
/// conflict rules, built only when a rule reads them.
#[derive(Debug, Clone)]
pub struct PutBody {
    /// The canonical encoding, made (or proven, see `store::canonical`) when
    /// the request is validated, not on the single writer; stored as is
    /// when the put applies unchanged.
    encoded: EncodedBody,
    /// The fields, decoded from `encoded` on first use: a put on a current
    /// base never reads them.
    fields: std::sync::OnceLock<Body>,
}

impl PutBody {
    /// A body whose bytes [`EncodedBody::is_canonical`] accepted: stored as
    /// received, decoded only if a rule reads its fields.
    pub fn canonical(encoded: EncodedBody) -> Self {
        debug_assert!(encoded.is_canonical());
        Self {
            encoded,
            fields: std::sync::OnceLock::new(),
        }
    }

    /// The canonical encoding.
    pub fn encoded(&self) -> &EncodedBody {
        &self.encoded
    }

    /// The fields, for the conflict rules.
    pub fn fields(&self) -> &Body {
        // Canonical bytes decode: the walk checked everything `to_json` does.
        self.fields
            .get_or_init(|| self.encoded.to_json("put").unwrap_or_default())
    }
}

impl From<Body> for PutBody {
    fn from(fields: Body) -> Self {
        Self {
            encoded: EncodedBody::encode(&fields),
            fields: fields.into(),
        }
    }
}

/// Equal when stored the same: the encoding is canonical.
impl PartialEq for PutBody {
    fn eq(&self, other: &Self) -> bool {
        self.encoded == other.encoded
    }
}

/// What a mutation does to its document.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replace the body.
    Put(PutBody),
    /// Merge top-level fields; a `null` value removes the field.
    Patch(Body),
    /// Make the document a tombstone.
    Delete,
}

/// How an overlapping conflict is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Write nothing and report the conflict.
    #[default]
    Reject,
    /// Apply only the client's non-overlapping changes.
    ServerWins,
    /// Apply all of the client's changes.
    ClientWins,
}

/// One validated mutation, with its conflict strategy already resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// Client-chosen id; 0 = untracked.
    pub mutation_id: u64,
    /// Collection of the document.
    pub collection: String,
    /// Id of the document.
    pub id: String,
    /// Version the client last saw; `None` = unconditional.
    pub base_version: Option<Version>,
    /// The change.
    pub op: Op,
    /// How to settle an overlapping conflict.
    pub strategy: Strategy,
}

/// A validated batch from one client.
#[derive(Debug, Clone, PartialEq)]
pub struct PushBatch {
    /// Client identity for deduplication ("" = anonymous).
    pub client_id: String,
    /// Recorded as the changes' `updated_by`: the client id, or the
    /// authenticated principal.
    pub updated_by: String,
    /// Mutations in request order.
    pub mutations: Vec<Mutation>,
    /// All or nothing.
    pub atomic: bool,
}

/// What happened to one mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written as asked.
    Applied,
    /// Stale base, disjoint changes: applied on top of the current document.
    Merged,
    /// Overlap settled by SERVER_WINS or CLIENT_WINS.
    Resolved,
    /// Nothing written; the caller must reconcile.
    Conflict,
    /// Already applied earlier; nothing written again.
    Duplicate,
    /// Not written because its atomic batch had a conflict.
    NotApplied,
}

/// The result of one mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct MutationResult {
    /// The mutation's id.
    pub mutation_id: u64,
    /// What happened.
    pub outcome: Outcome,
    /// The document after the mutation, or the server's current one.
    pub document: Option<Document>,
    /// Fields changed by both sides, sorted.
    pub conflicting_fields: Vec<String>,
}

/// The result of a whole push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushOutcome {
    /// One result per mutation, in request order.
    pub results: Vec<MutationResult>,
    /// Highest applied mutation id of the client.
    pub last_mutation_id: u64,
    /// Head seq after the commit.
    pub checkpoint: Seq,
}

/// One page of a pull.
#[derive(Debug, Clone, PartialEq)]
pub struct PullPage {
    /// Changed documents in seq order.
    pub documents: Vec<Document>,
    /// Seq of the last change examined.
    pub checkpoint: Seq,
    /// Whether changes remain after `checkpoint`.
    pub has_more: bool,
    /// The purge horizon the page is consistent with.
    pub horizon: Seq,
}
