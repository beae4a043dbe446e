//! The conflict-checked push transaction.
//!
//! [`apply_group`] runs inside one sled transaction for a whole group commit.
//! It is a pure function of its inputs and the transactional view, because
//! sled may run it more than once; every side effect (notifying subscribers,
//! answering callers) happens after it returns.

use std::{collections::HashMap, time::SystemTime};

use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{
    codec,
    conflict::{self, BaseCheck, Decision, NewState},
    error::StoreError,
    keys::{self, DocKey},
    model::{
        Body, Document, EncodedBody, Mutation, MutationResult, Op, Outcome, PushBatch, PushOutcome,
        Seq, Version,
    },
};

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// The transactional view of every tree a push touches.
pub struct Tx<'a> {
    /// Current documents.
    pub docs: &'a TransactionalTree,
    /// The change index.
    pub changes: &'a TransactionalTree,
    /// The delta log.
    pub history: &'a TransactionalTree,
    /// Per-client last mutation ids.
    pub clients: &'a TransactionalTree,
    /// Metadata (head seq).
    pub meta: &'a TransactionalTree,
}

/// What one group commit produced.
#[derive(Debug)]
pub struct GroupCommit {
    /// One outcome per batch, in the order given.
    pub outcomes: Vec<PushOutcome>,
    /// Every new document state, in seq order, for the feed.
    pub changes: Vec<Document>,
    /// Head seq before the group.
    pub prev_head: Seq,
    /// Head seq after the group.
    pub head: Seq,
}

/// Applies every batch of a group, in order, in one transaction.
pub fn apply_group(tx: &Tx<'_>, batches: &[&PushBatch], now: SystemTime) -> TxResult<GroupCommit> {
    let prev_head = read_head(tx)?;
    let mut head = prev_head;
    let mut changes = Vec::new();
    let mut applied = Vec::with_capacity(batches.len());
    for batch in batches {
        applied.push(apply_batch(tx, batch, now, &mut head, &mut changes)?);
    }
    if head != prev_head {
        tx.meta.insert(keys::META_HEAD, &head.0.to_be_bytes())?;
    }
    // Every push of the group reports the head once the group committed.
    let outcomes = applied
        .into_iter()
        .map(|(results, last_mutation_id)| PushOutcome {
            results,
            last_mutation_id,
            checkpoint: head,
        })
        .collect();
    Ok(GroupCommit {
        outcomes,
        changes,
        prev_head,
        head,
    })
}

/// A document's state as read (or as planned earlier in the same batch),
/// with the encoded record so the delta log can keep it without re-encoding.
#[derive(Clone)]
struct Stored {
    /// The decoded state.
    doc: Document,
    /// Its encoded record, as stored.
    record: Vec<u8>,
}

/// A write planned by one mutation, applied only once its batch may commit.
struct Planned {
    /// The document written.
    key: DocKey,
    /// Its state before: moved to the delta log, its index entry removed.
    prev: Option<Stored>,
    /// Its new state.
    next: Stored,
}

/// Applies one batch: its results and the client's last applied mutation id.
/// An atomic batch with a conflict writes nothing and leaves `head` as it was.
fn apply_batch(
    tx: &Tx<'_>,
    batch: &PushBatch,
    now: SystemTime,
    head: &mut Seq,
    changes: &mut Vec<Document>,
) -> TxResult<(Vec<MutationResult>, u64)> {
    let stored_last = match batch.client_id.as_str() {
        "" => 0,
        client => read_u64(tx.clients, keys::CLIENTS, client.as_bytes())?,
    };
    let mut last = stored_last;
    let start_head = *head;
    // Writes planned earlier in this batch (document → its latest plan), so
    // later mutations of the same document see them.
    let mut overlay: HashMap<DocKey, usize> = HashMap::with_capacity(batch.mutations.len());
    let mut planned: Vec<Planned> = Vec::with_capacity(batch.mutations.len());
    let mut results = Vec::with_capacity(batch.mutations.len());
    let mut any_conflict = false;

    for m in &batch.mutations {
        let key = DocKey::new(&m.collection, &m.id).map_err(ConflictableTransactionError::Abort)?;
        let current = match overlay.get(&key) {
            Some(&i) => Some(planned[i].next.clone()),
            None => read_doc(tx, &key)?,
        };
        if m.mutation_id != 0 && m.mutation_id <= stored_last {
            results.push(result(
                m.mutation_id,
                Outcome::Duplicate,
                current.map(|s| s.doc),
                Vec::new(),
            ));
            continue;
        }
        let decision = decide(tx, &key, current.as_ref().map(|s| &s.doc), m)?;
        if m.mutation_id != 0 {
            last = m.mutation_id;
        }
        any_conflict |= decision.outcome == Outcome::Conflict;
        let document = match decision.write {
            Some(state) => {
                head.0 += 1;
                let next = next_state(&key, current.as_ref(), state, *head, now, &batch.client_id)?;
                overlay.insert(key.clone(), planned.len());
                let doc = next.doc.clone();
                planned.push(Planned {
                    key,
                    prev: current,
                    next,
                });
                Some(doc)
            }
            None => current.map(|s| s.doc),
        };
        results.push(result(
            m.mutation_id,
            decision.outcome,
            document,
            decision.conflicting_fields,
        ));
    }

    if batch.atomic && any_conflict {
        *head = start_head;
        for r in &mut results {
            if r.outcome != Outcome::Conflict {
                r.outcome = Outcome::NotApplied;
                r.conflicting_fields.clear();
            }
        }
        // Report what is really stored, not the discarded plan.
        for (r, m) in results.iter_mut().zip(&batch.mutations) {
            if r.outcome == Outcome::NotApplied {
                let key = DocKey::new(&m.collection, &m.id)
                    .map_err(ConflictableTransactionError::Abort)?;
                r.document = read_doc(tx, &key)?.map(|s| s.doc);
            }
        }
        return Ok((results, stored_last));
    }

    for p in planned {
        if let Some(prev) = p.prev {
            tx.changes.remove(&keys::seq_key(prev.doc.seq))?;
            tx.history
                .insert(p.key.history(prev.doc.version), prev.record)?;
        }
        tx.changes
            .insert(&keys::seq_key(p.next.doc.seq), p.key.as_bytes())?;
        tx.docs.insert(p.key.as_bytes(), p.next.record)?;
        changes.push(p.next.doc);
    }
    if last > stored_last {
        tx.clients
            .insert(batch.client_id.as_bytes(), &last.to_be_bytes())?;
    }
    Ok((results, last))
}

/// Runs the version check and, for a stale base, the three-way field check.
/// The current body is decoded only when a rule reads its fields.
fn decide(
    tx: &Tx<'_>,
    key: &DocKey,
    current: Option<&Document>,
    m: &Mutation,
) -> TxResult<Decision> {
    let version = current.map_or(Version(0), |d| d.version);
    let deleted = current.is_none_or(|d| d.deleted);
    let live = current.filter(|d| !d.deleted);
    let check = conflict::check_base(m.base_version, version, deleted);
    let needs_fields = matches!(m.op, Op::Patch(_)) || matches!(check, BaseCheck::Stale(_));
    let live_body = match live {
        Some(d) if needs_fields => Some(decode_body(keys::DOCS, key, &d.body)?),
        // A put or delete on a current base only asks whether it is live.
        Some(_) => Some(Body::new()),
        None => None,
    };
    Ok(match check {
        BaseCheck::Current => conflict::apply_direct(live_body.as_ref(), &m.op),
        BaseCheck::Ahead => Decision {
            outcome: Outcome::Conflict,
            write: None,
            conflicting_fields: Vec::new(),
        },
        BaseCheck::Stale(base) => {
            let base_body = read_base(tx, key, base)?;
            conflict::three_way(base_body.as_ref(), live_body.as_ref(), &m.op, m.strategy)
        }
    })
}

/// A stored body's fields; undecodable bytes mean a corrupt record.
fn decode_body(tree: &'static str, key: &DocKey, body: &EncodedBody) -> TxResult<Body> {
    body.to_json("body").map_err(|e| {
        let doc = key
            .parts()
            .map(|(c, i)| format!("{c}/{i}"))
            .unwrap_or_default();
        ConflictableTransactionError::Abort(StoreError::corrupt(tree, format!("{doc}: {e}")))
    })
}

/// The body at `version` from the delta log: version 0 is the empty object,
/// a tombstone is empty too, and a pruned version is unknown (`None`).
fn read_base(tx: &Tx<'_>, key: &DocKey, version: Version) -> TxResult<Option<Body>> {
    if version.0 == 0 {
        return Ok(Some(Body::new()));
    }
    match tx.history.get(key.history(version))? {
        Some(bytes) => {
            let doc = codec::decode(keys::HISTORY, key, &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            Ok(Some(decode_body(keys::HISTORY, key, &doc.body)?))
        }
        None => Ok(None),
    }
}

fn next_state(
    key: &DocKey,
    current: Option<&Stored>,
    state: NewState,
    seq: Seq,
    now: SystemTime,
    client_id: &str,
) -> TxResult<Stored> {
    let (collection, id) = key
        .parts()
        .ok_or(ConflictableTransactionError::Abort(StoreError::KeyTooLong))?;
    let (deleted, body) = match state {
        NewState::Live(body) => (false, EncodedBody::encode(&body)),
        NewState::Put(body) => (false, body),
        NewState::Tombstone => (true, EncodedBody::default()),
    };
    let doc = Document {
        collection: collection.to_owned(),
        id: id.to_owned(),
        version: Version(current.map_or(0, |s| s.doc.version.0) + 1),
        body,
        deleted,
        seq,
        updated_at: now,
        updated_by: client_id.to_owned(),
    };
    let record = codec::encode(&doc).map_err(ConflictableTransactionError::Abort)?;
    Ok(Stored { doc, record })
}

fn read_doc(tx: &Tx<'_>, key: &DocKey) -> TxResult<Option<Stored>> {
    match tx.docs.get(key.as_bytes())? {
        Some(bytes) => {
            let doc = codec::decode(keys::DOCS, key, &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            Ok(Some(Stored {
                doc,
                record: bytes.to_vec(),
            }))
        }
        None => Ok(None),
    }
}

fn read_head(tx: &Tx<'_>) -> TxResult<Seq> {
    read_u64(tx.meta, keys::META, keys::META_HEAD).map(Seq)
}

fn read_u64(tree: &TransactionalTree, name: &'static str, key: &[u8]) -> TxResult<u64> {
    match tree.get(key)? {
        Some(bytes) => keys::parse_u64(&bytes).ok_or_else(|| {
            ConflictableTransactionError::Abort(StoreError::corrupt(name, "expected a u64"))
        }),
        None => Ok(0),
    }
}

fn result(
    mutation_id: u64,
    outcome: Outcome,
    document: Option<Document>,
    conflicting_fields: Vec<String>,
) -> MutationResult {
    MutationResult {
        mutation_id,
        outcome,
        document,
        conflicting_fields,
    }
}
