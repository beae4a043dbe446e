//! The conflict-checked push transaction.
//!
//! [`apply_group`] runs inside one sled transaction for a whole group commit.
//! It is a pure function of its inputs, the transactional view and the
//! index (which only the writer changes, after the commit), because sled may
//! run it more than once; every side effect (updating the index, notifying
//! subscribers, answering callers) happens after it returns.
//!
//! A change is one insert: the new state's record at its seq, pointing at
//! the record it supersedes, which stays as the delta log's entry.

use std::{collections::HashMap, time::SystemTime};

use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{
    codec,
    conflict::{self, BaseCheck, Decision, NewState},
    error::StoreError,
    index::{Entry, Index},
    keys::{self, DocKey},
    model::{
        Body, Document, EncodedBody, Mutation, MutationResult, Op, Outcome, PushBatch, PushOutcome,
        Seq, Version,
    },
};

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// The transactional view of every tree a push touches.
pub struct Tx<'a> {
    /// The log of changes.
    pub log: &'a TransactionalTree,
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
    /// The index entries the group changed, for the index once committed.
    pub index: HashMap<DocKey, Entry>,
    /// Head seq before the group.
    pub prev_head: Seq,
    /// Head seq after the group.
    pub head: Seq,
}

/// Where documents stand while a group is applied: the index as committed,
/// overlaid with what the group (and the batch in progress) wrote.
struct View<'a> {
    /// The committed index.
    index: &'a Index,
    /// Entries written by earlier batches of the group.
    group: HashMap<DocKey, Entry>,
    /// Entries written by the batch in progress.
    batch: HashMap<DocKey, Entry>,
}

impl View<'_> {
    fn get(&self, key: &DocKey) -> Option<Entry> {
        self.batch
            .get(key)
            .or_else(|| self.group.get(key))
            .copied()
            .or_else(|| self.index.get(key.as_bytes()))
    }
}

/// Applies every batch of a group, in order, in one transaction.
pub fn apply_group(
    tx: &Tx<'_>,
    index: &Index,
    batches: &[&PushBatch],
    now: SystemTime,
) -> TxResult<GroupCommit> {
    let prev_head = read_head(tx)?;
    let mut head = prev_head;
    let mut changes = Vec::new();
    let mut view = View {
        index,
        group: HashMap::new(),
        batch: HashMap::new(),
    };
    let mut applied = Vec::with_capacity(batches.len());
    for batch in batches {
        applied.push(apply_batch(
            tx,
            &mut view,
            batch,
            now,
            &mut head,
            &mut changes,
        )?);
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
        index: view.group,
        prev_head,
        head,
    })
}

/// Applies one batch: its results and the client's last applied mutation id.
/// Each write goes to the log at once, so later mutations (and base lookups)
/// of the same batch see it; an atomic batch with a conflict takes its
/// writes back and leaves `head` as it was.
fn apply_batch(
    tx: &Tx<'_>,
    view: &mut View<'_>,
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
    let first_change = changes.len();
    view.batch.clear();
    let mut results = Vec::with_capacity(batch.mutations.len());
    let mut any_conflict = false;

    for m in &batch.mutations {
        let key = DocKey::new(&m.collection, &m.id).map_err(ConflictableTransactionError::Abort)?;
        let current = view.get(&key);
        if m.mutation_id != 0 && m.mutation_id <= stored_last {
            let document = read_current(tx, current)?;
            results.push(result(
                m.mutation_id,
                Outcome::Duplicate,
                document,
                Vec::new(),
            ));
            continue;
        }
        let decision = decide(tx, current, m)?;
        if m.mutation_id != 0 {
            last = m.mutation_id;
        }
        any_conflict |= decision.outcome == Outcome::Conflict;
        let document = match decision.write {
            Some(state) => {
                head.0 += 1;
                let doc = write(tx, &key, current, state, *head, now, &batch.client_id)?;
                view.batch.insert(
                    key,
                    Entry {
                        seq: doc.seq,
                        version: doc.version,
                        deleted: doc.deleted,
                    },
                );
                changes.push(doc.clone());
                Some(doc)
            }
            None => read_current(tx, current)?,
        };
        results.push(result(
            m.mutation_id,
            decision.outcome,
            document,
            decision.conflicting_fields,
        ));
    }

    if batch.atomic && any_conflict {
        for doc in changes.drain(first_change..) {
            tx.log.remove(&keys::seq_key(doc.seq))?;
        }
        view.batch.clear();
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
                r.document = read_current(tx, view.get(&key))?;
            }
        }
        return Ok((results, stored_last));
    }

    view.group.extend(view.batch.drain());
    if last > stored_last {
        tx.clients
            .insert(batch.client_id.as_bytes(), &last.to_be_bytes())?;
    }
    Ok((results, last))
}

/// Runs the version check and, for a stale base, the three-way field check.
/// The current record is read only when a rule reads its fields.
fn decide(tx: &Tx<'_>, current: Option<Entry>, m: &Mutation) -> TxResult<Decision> {
    let version = current.map_or(Version(0), |e| e.version);
    let live = current.filter(|e| !e.deleted);
    let check = conflict::check_base(m.base_version, version, live.is_none());
    let needs_fields = matches!(m.op, Op::Patch(_)) || matches!(check, BaseCheck::Stale(_));
    let live_body = match live {
        Some(e) if needs_fields => Some(read_body(tx, e.seq)?),
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
            let base_body = match current {
                Some(e) => read_base(tx, e, base)?,
                None => None,
            };
            conflict::three_way(base_body.as_ref(), live_body.as_ref(), &m.op, m.strategy)
        }
    })
}

/// The log record at `seq`, which the index says is there.
fn read_record(tx: &Tx<'_>, seq: Seq) -> TxResult<sled::IVec> {
    tx.log.get(keys::seq_key(seq))?.ok_or_else(|| {
        ConflictableTransactionError::Abort(StoreError::corrupt(
            keys::LOG,
            format!("indexed record {seq} is missing"),
        ))
    })
}

/// The document state an index entry points at.
fn read_current(tx: &Tx<'_>, current: Option<Entry>) -> TxResult<Option<Document>> {
    let Some(entry) = current else {
        return Ok(None);
    };
    let bytes = read_record(tx, entry.seq)?;
    codec::decode(entry.seq, &bytes)
        .map(Some)
        .map_err(ConflictableTransactionError::Abort)
}

/// The fields of the body stored at `seq`.
fn read_body(tx: &Tx<'_>, seq: Seq) -> TxResult<Body> {
    let bytes = read_record(tx, seq)?;
    let doc = codec::decode(seq, &bytes).map_err(ConflictableTransactionError::Abort)?;
    decode_body(&doc)
}

/// A stored body's fields; undecodable bytes mean a corrupt record.
fn decode_body(doc: &Document) -> TxResult<Body> {
    doc.body.to_json("body").map_err(|e| {
        ConflictableTransactionError::Abort(StoreError::corrupt(
            keys::LOG,
            format!("{}/{} at {}: {e}", doc.collection, doc.id, doc.seq),
        ))
    })
}

/// The body at version `base` of the document whose current state is
/// `current`, found by following the delta log's chain back from it:
/// version 0 is the empty object, a tombstone is empty too, and a pruned
/// version is unknown (`None`).
fn read_base(tx: &Tx<'_>, current: Entry, base: Version) -> TxResult<Option<Body>> {
    if base.0 == 0 {
        return Ok(Some(Body::new()));
    }
    let mut seq = current.seq;
    loop {
        let Some(bytes) = tx.log.get(keys::seq_key(seq))? else {
            return Ok(None);
        };
        let record = codec::Record::parse(&bytes).map_err(ConflictableTransactionError::Abort)?;
        if record.version == base {
            let doc = record
                .to_document(seq)
                .map_err(ConflictableTransactionError::Abort)?;
            return decode_body(&doc).map(Some);
        }
        // Versions only go down along the chain; 0 ends it.
        if record.version < base || record.prev.0 == 0 || record.prev >= seq {
            return Ok(None);
        }
        seq = record.prev;
    }
}

/// Writes the new state of `key` to the log at `seq` and returns it.
fn write(
    tx: &Tx<'_>,
    key: &DocKey,
    current: Option<Entry>,
    state: NewState,
    seq: Seq,
    now: SystemTime,
    client_id: &str,
) -> TxResult<Document> {
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
        version: Version(current.map_or(0, |e| e.version.0) + 1),
        body,
        deleted,
        seq,
        updated_at: now,
        updated_by: client_id.to_owned(),
    };
    let prev = current.map_or(Seq(0), |e| e.seq);
    let record = codec::encode(&doc, key, prev).map_err(ConflictableTransactionError::Abort)?;
    tx.log.insert(&keys::seq_key(seq), record)?;
    Ok(doc)
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sled::Transactional;

    use super::*;
    use crate::store::{codec::Record, model::Strategy};

    fn fields(v: serde_json::Value) -> Body {
        v.as_object().unwrap().clone()
    }

    fn mutation(id: &str, base: Option<u64>, op: Op) -> Mutation {
        Mutation {
            mutation_id: 0,
            collection: "c".into(),
            id: id.into(),
            base_version: base.map(Version),
            op,
            strategy: Strategy::Reject,
        }
    }

    fn batch(atomic: bool, mutations: Vec<Mutation>) -> PushBatch {
        PushBatch {
            client_id: String::new(),
            mutations,
            atomic,
        }
    }

    /// Applies one group to a fresh store, as the writer does.
    fn apply(batches: &[PushBatch]) -> (GroupCommit, sled::Tree) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let [log, clients, meta] = ["log", "clients", "meta"].map(|n| db.open_tree(n).unwrap());
        let index = Index::default();
        let batches: Vec<&PushBatch> = batches.iter().collect();
        let group = (&log, &clients, &meta)
            .transaction(|(log, clients, meta)| {
                let tx = Tx { log, clients, meta };
                apply_group(&tx, &index, &batches, SystemTime::now())
            })
            .unwrap();
        (group, log)
    }

    fn outcomes(outcome: &PushOutcome) -> Vec<Outcome> {
        outcome.results.iter().map(|r| r.outcome).collect()
    }

    /// Rule: batches of one group see the writes of the batches before them;
    /// an atomic batch with a conflict leaves no record in the log and uses
    /// no seq, so the next write takes the next seq, chained to the last (the
    /// batch plans more writes than follow it, so an overwrite would not hide
    /// a leftover).
    #[test]
    fn a_group_sees_its_own_writes_and_drops_a_failed_atomic_batch() {
        let put = |v| Op::Put(fields(v).into());
        let (group, log) = apply(&[
            batch(false, vec![mutation("x", None, put(json!({"a": 1})))]),
            batch(
                true,
                vec![
                    mutation("y", None, put(json!({"b": 1}))),
                    mutation("w", None, put(json!({"b": 2}))),
                    mutation("x", Some(5), Op::Delete),
                ],
            ),
            batch(
                false,
                vec![mutation("x", Some(1), Op::Patch(fields(json!({"a": 2}))))],
            ),
        ]);
        assert_eq!(outcomes(&group.outcomes[0]), [Outcome::Applied]);
        assert_eq!(
            outcomes(&group.outcomes[1]),
            [Outcome::NotApplied, Outcome::NotApplied, Outcome::Conflict]
        );
        assert_eq!(group.outcomes[1].results[0].document, None);
        assert_eq!(outcomes(&group.outcomes[2]), [Outcome::Applied]);
        assert_eq!(group.head, Seq(2));
        let seqs: Vec<u64> = log
            .iter()
            .keys()
            .map(|k| keys::parse_u64(&k.unwrap()).unwrap())
            .collect();
        assert_eq!(seqs, [1, 2], "the atomic batch's plan is not in the log");
        let second = log.get(keys::seq_key(Seq(2))).unwrap().unwrap();
        let record = Record::parse(&second).unwrap();
        assert_eq!((record.version, record.prev), (Version(2), Seq(1)));
        let x = DocKey::new("c", "x").unwrap();
        assert_eq!(group.index[&x].seq, Seq(2));
        assert!(!group.index.contains_key(&DocKey::new("c", "y").unwrap()));
    }

    /// Rule: a base version written earlier in the same batch is found
    /// through the chain: only `a` changed since base 1, so a change of `k`
    /// merges (an unknown base would count `k` as changed and conflict).
    #[test]
    fn a_base_written_earlier_in_the_batch_is_found() {
        let put = |v| Op::Put(fields(v).into());
        let (group, _) = apply(&[batch(
            false,
            vec![
                mutation("z", None, put(json!({"a": 1, "k": 1}))),
                mutation("z", Some(1), put(json!({"a": 2, "k": 1}))),
                mutation("z", Some(1), Op::Patch(fields(json!({"k": 9})))),
            ],
        )]);
        let results = &group.outcomes[0].results;
        assert_eq!(
            outcomes(&group.outcomes[0]),
            [Outcome::Applied, Outcome::Applied, Outcome::Merged]
        );
        let doc = results[2].document.as_ref().unwrap();
        assert_eq!(
            doc.body.to_json("z").unwrap(),
            fields(json!({"a": 2, "k": 9}))
        );
        assert_eq!((doc.version, doc.seq), (Version(3), Seq(3)));
    }
}
