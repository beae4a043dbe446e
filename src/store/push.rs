//! The conflict-checked push: planning a group commit.
//!
//! [`apply_group`] works out what a whole group of pushes does, in order,
//! against the committed state (the trees and the index, which only the
//! writer changes) and returns it as a plan: the new log records, the
//! clients' last mutation ids, the new head and every caller's results.
//! Nothing is written here; the writer commits the plan (see `writer`), and
//! every side effect (updating the index, notifying subscribers, answering
//! callers) happens after that.
//!
//! A change is one insert: the new state's record at its seq, pointing at
//! the record it supersedes, which stays as the delta log's entry.

use std::{collections::HashMap, time::SystemTime};

use super::{
    Trees,
    clients::{ClientState, ClientWrite, IdStatus},
    codec,
    conflict::{self, BaseCheck, Decision, NewState},
    error::StoreError,
    index::{DocMap, Entry, Index},
    keys::{self, DocKey},
    model::{
        Body, Document, EncodedBody, Mutation, MutationResult, Op, Outcome, PushBatch, PushOutcome,
        Seq, Version,
    },
    pull,
};

/// What one group commit is to write and answer.
#[derive(Debug)]
pub struct GroupCommit {
    /// One outcome per batch, in the order given: a batch refused whole
    /// (nothing of it planned) has its error here.
    pub outcomes: Vec<Result<PushOutcome, StoreError>>,
    /// Every new document state, in seq order, for the feed.
    pub changes: Vec<Document>,
    /// The encoded records of `changes`: seqs `prev_head + 1 ..= head`.
    pub records: Vec<Vec<u8>>,
    /// Clients whose mutation-id state changed, with the new state.
    pub clients: HashMap<String, ClientWrite>,
    /// The index entries the group changed, for the index once committed.
    pub index: DocMap<Entry>,
    /// Head seq before the group.
    pub prev_head: Seq,
    /// Head seq after the group.
    pub head: Seq,
    /// On a replica: its client progress after the group, written with it.
    pub clients_progress: Option<super::replica::ClientsProgress>,
}

/// The rules a plan is held to besides the documents themselves.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body a document may be stored with (encoded bytes).
    pub max_body_bytes: usize,
    /// The purge horizon: every version a purged document ever had is at
    /// most this (a version never exceeds its record's seq), so a document
    /// the index does not know starts above it and no version is reused.
    pub purge_horizon: Seq,
}

impl Limits {
    /// The version of a document whose index entry is `current`: one the
    /// index does not know is deleted at the purge horizon.
    fn version_of(self, current: Option<Entry>) -> Version {
        current.map_or(Version(self.purge_horizon.0), |e| e.version)
    }
}

/// The state a group is planned against: what is committed, overlaid with
/// what the group (and the batch in progress) has planned so far.
struct View<'a> {
    /// Committed records and client ids.
    trees: &'a Trees,
    /// The published index.
    index: &'a Index,
    /// Entries committed but not yet published (durable).
    unpublished: &'a DocMap<Entry>,
    /// The plan so far.
    group: GroupCommit,
    /// Entries written by the batch in progress.
    batch: DocMap<Entry>,
}

impl View<'_> {
    /// Where a document's current state is.
    fn entry(&self, key: &DocKey) -> Option<Entry> {
        self.batch
            .get(key)
            .or_else(|| self.group.index.get(key))
            .or_else(|| self.unpublished.get(key))
            .copied()
            .or_else(|| self.index.get(key.as_bytes()))
    }

    /// The record at `seq`: planned in this group, or committed.
    fn record(&self, seq: Seq) -> Result<Option<sled::IVec>, StoreError> {
        match seq.0.checked_sub(self.group.prev_head.0 + 1) {
            Some(i) => Ok(usize::try_from(i)
                .ok()
                .and_then(|i| self.group.records.get(i))
                .map(|r| sled::IVec::from(r.as_slice()))),
            None => Ok(self.trees.log.get(keys::seq_key(seq))?),
        }
    }

    /// A client's mutation-id state, counting earlier batches of the group.
    fn client(&self, client: &str) -> Result<ClientState, StoreError> {
        if let Some(write) = self.group.clients.get(client) {
            return Ok(write.state.clone());
        }
        match self.trees.clients.get(client.as_bytes())? {
            Some(bytes) => ClientState::decode(&bytes),
            None => Ok(ClientState::default()),
        }
    }

    /// Takes back what the batch in progress planned.
    fn rollback(&mut self, head: Seq, changes: usize) {
        self.group.changes.truncate(changes);
        self.group.records.truncate(changes);
        self.group.head = head;
        self.batch.clear();
    }
}

/// Plans every batch of a group, in order. `unpublished` holds the index
/// entries of commits written but not yet durable.
pub fn apply_group(
    trees: &Trees,
    index: &Index,
    unpublished: &DocMap<Entry>,
    batches: &[&PushBatch],
    now: SystemTime,
    limits: Limits,
) -> Result<GroupCommit, StoreError> {
    let prev_head = Seq(pull::read_u64(&trees.meta, keys::META, keys::META_HEAD)?);
    let mut view = View {
        trees,
        index,
        unpublished,
        group: GroupCommit {
            outcomes: Vec::with_capacity(batches.len()),
            changes: Vec::new(),
            records: Vec::new(),
            clients: HashMap::new(),
            index: DocMap::default(),
            prev_head,
            head: prev_head,
            clients_progress: None,
        },
        batch: DocMap::default(),
    };
    let mut planned = Vec::with_capacity(batches.len());
    for batch in batches {
        planned.push(apply_batch(&mut view, batch, now, limits)?);
    }
    let mut group = view.group;
    // Every push of the group reports the head once the group committed.
    let head = group.head;
    group.outcomes = planned
        .into_iter()
        .map(|p| {
            p.map(|(results, last_mutation_id)| PushOutcome {
                results,
                last_mutation_id,
                checkpoint: head,
            })
        })
        .collect();
    // Replication sends a catching-up replica the states written since it
    // last applied: each says which commit wrote it; and whole commits.
    for write in group.clients.values_mut() {
        write.state.at = head.0;
    }
    if let Some(last) = group.records.last_mut() {
        codec::mark_commit_end(last);
    }
    Ok(group)
}

/// Plans one batch: its results and the client's highest processed
/// mutation id, or the reason it is refused whole (then nothing of it is
/// planned). Later mutations (and base lookups) of the batch see its earlier
/// writes; an atomic batch with a conflict takes its writes back.
fn apply_batch(
    view: &mut View<'_>,
    batch: &PushBatch,
    now: SystemTime,
    limits: Limits,
) -> Result<Result<(Vec<MutationResult>, u64), StoreError>, StoreError> {
    let client = Some(batch.client_id.as_str()).filter(|c| !c.is_empty());
    let stored = match client {
        Some(client) => view.client(client)?,
        None => ClientState::default(),
    };
    let mut state = stored.clone();
    let start_head = view.group.head;
    let first_change = view.group.changes.len();
    view.batch.clear();
    let mut results = Vec::with_capacity(batch.mutations.len());
    let mut rejected = Vec::new();

    for (i, m) in batch.mutations.iter().enumerate() {
        let key = DocKey::new(&m.collection, &m.id)?;
        let current = view.entry(&key);
        let status = match m.mutation_id {
            0 => IdStatus::New,
            id => state.status(id),
        };
        let decision = match status {
            IdStatus::New => decide(view, current, m, limits)?,
            IdStatus::Applied => Decision {
                outcome: Outcome::Duplicate,
                write: None,
                conflicting_fields: Vec::new(),
            },
            // Rejected before: rejected again, with the overlap as it is now.
            IdStatus::Rejected => Decision {
                outcome: Outcome::Conflict,
                write: None,
                ..decide(view, current, m, limits)?
            },
            IdStatus::Forgotten => {
                view.rollback(start_head, first_change);
                return Ok(Err(StoreError::OutcomeForgotten {
                    mutation: i,
                    mutation_id: m.mutation_id,
                }));
            }
        };
        let conflict = decision.outcome == Outcome::Conflict;
        if m.mutation_id != 0 && status != IdStatus::Applied {
            state.processed(m.mutation_id, conflict);
            if conflict {
                rejected.push(m.mutation_id);
            }
        }
        let document = match decision.write {
            Some(new) => {
                let body = match new {
                    NewState::Live(body) => Some(EncodedBody::encode(&body)),
                    NewState::Put(body) => Some(body),
                    NewState::Tombstone => None,
                };
                let size = body.as_ref().map_or(0, EncodedBody::len);
                if size > limits.max_body_bytes {
                    view.rollback(start_head, first_change);
                    return Ok(Err(StoreError::BodyTooLarge {
                        mutation: i,
                        size,
                        limit: limits.max_body_bytes,
                    }));
                }
                let doc = write(view, &key, current, body, now, &batch.updated_by, limits)?;
                view.batch.insert(
                    key,
                    Entry {
                        seq: doc.seq,
                        version: doc.version,
                        deleted: doc.deleted,
                    },
                );
                Some(doc)
            }
            None => read_current(view, current)?,
        };
        results.push(MutationResult {
            mutation_id: m.mutation_id,
            outcome: decision.outcome,
            document,
            conflicting_fields: decision.conflicting_fields,
        });
    }

    if batch.atomic && has_conflict(&results) {
        view.rollback(start_head, first_change);
        for (r, m) in results.iter_mut().zip(&batch.mutations) {
            if !matches!(r.outcome, Outcome::Conflict | Outcome::Duplicate) {
                r.outcome = Outcome::NotApplied;
                r.conflicting_fields.clear();
            }
            // Report what is really stored, not the discarded plan.
            let key = DocKey::new(&m.collection, &m.id)?;
            r.document = read_current(view, view.entry(&key))?;
        }
        // Only the rejected ids are consumed; the rest stay unprocessed.
        state = stored.clone();
        for id in rejected {
            state.rejected_alone(id);
        }
    } else {
        let written = std::mem::take(&mut view.batch);
        view.group.index.extend(written);
    }
    if let Some(client) = client {
        // A client that only ever sent untracked mutations has nothing to
        // remember.
        let changed = state != stored;
        let seen = state.see(now, changed);
        if changed || (seen && stored != ClientState::default()) {
            // The tree's value: from the group's first write of the client,
            // or what this batch read from the tree.
            let stored_last = view
                .group
                .clients
                .get(client)
                .map_or(stored.last, |w| w.stored_last);
            let write = ClientWrite {
                stored_last,
                state: state.clone(),
            };
            view.group.clients.insert(client.to_owned(), write);
        }
    }
    Ok(Ok((results, state.last)))
}

fn has_conflict(results: &[MutationResult]) -> bool {
    results.iter().any(|r| r.outcome == Outcome::Conflict)
}

/// Runs the version check and, for a stale base, the three-way field check.
/// The current record is read only when a rule reads its fields.
fn decide(
    view: &View<'_>,
    current: Option<Entry>,
    m: &Mutation,
    limits: Limits,
) -> Result<Decision, StoreError> {
    let version = limits.version_of(current);
    let live = current.filter(|e| !e.deleted);
    let check = conflict::check_base(m.base_version, version, live.is_none());
    let needs_fields = matches!(m.op, Op::Patch(_)) || matches!(check, BaseCheck::Stale(_));
    let live_body = match live {
        Some(e) if needs_fields => Some(read_body(view, e.seq)?),
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
                Some(e) => read_base(view, e, base)?,
                None => None,
            };
            conflict::three_way(base_body.as_ref(), live_body.as_ref(), &m.op, m.strategy)
        }
    })
}

/// The log record at `seq`, which the index says is there.
fn read_record(view: &View<'_>, seq: Seq) -> Result<sled::IVec, StoreError> {
    view.record(seq)?
        .ok_or_else(|| StoreError::corrupt(keys::LOG, format!("indexed record {seq} is missing")))
}

/// The document state an index entry points at.
fn read_current(view: &View<'_>, current: Option<Entry>) -> Result<Option<Document>, StoreError> {
    let Some(entry) = current else {
        return Ok(None);
    };
    codec::decode(entry.seq, &read_record(view, entry.seq)?).map(Some)
}

/// The fields of the body stored at `seq`.
fn read_body(view: &View<'_>, seq: Seq) -> Result<Body, StoreError> {
    decode_body(&codec::decode(seq, &read_record(view, seq)?)?)
}

/// A stored body's fields; undecodable bytes mean a corrupt record.
fn decode_body(doc: &Document) -> Result<Body, StoreError> {
    doc.body.to_json("body").map_err(|e| {
        StoreError::corrupt(
            keys::LOG,
            format!("{}/{} at {}: {e}", doc.collection, doc.id, doc.seq),
        )
    })
}

/// The body at version `base` of the document whose current state is
/// `current`, found by following the delta log's chain back from it:
/// a tombstone is empty, and a pruned version is unknown (`None`). Base 0
/// ("must not exist") against a live document is unknown too: the client
/// saw no document, so the server counts as having changed every field.
fn read_base(view: &View<'_>, current: Entry, base: Version) -> Result<Option<Body>, StoreError> {
    if base.0 == 0 {
        return Ok(None);
    }
    let mut seq = current.seq;
    loop {
        let Some(bytes) = view.record(seq)? else {
            return Ok(None);
        };
        let record = codec::Record::parse(&bytes)?;
        if record.version == base {
            return decode_body(&record.to_document(seq)?).map(Some);
        }
        // Versions only go down along the chain; 0 ends it.
        if record.version < base || record.prev.0 == 0 || record.prev >= seq {
            return Ok(None);
        }
        seq = record.prev;
    }
}

/// Plans the new state of `key` at the next seq (a tombstone when `body`
/// is `None`) and returns it.
fn write(
    view: &mut View<'_>,
    key: &DocKey,
    current: Option<Entry>,
    body: Option<EncodedBody>,
    now: SystemTime,
    client_id: &str,
    limits: Limits,
) -> Result<Document, StoreError> {
    let (collection, id) = key.parts().ok_or(StoreError::KeyTooLong)?;
    let deleted = body.is_none();
    let group = &mut view.group;
    group.head.0 += 1;
    let doc = Document {
        collection: collection.to_owned(),
        id: id.to_owned(),
        version: Version(limits.version_of(current).0 + 1),
        body: body.unwrap_or_default(),
        deleted,
        seq: group.head,
        updated_at: now,
        updated_by: client_id.to_owned(),
    };
    let prev = current.map_or(Seq(0), |e| e.seq);
    group.records.push(codec::encode(&doc, key, prev)?);
    group.changes.push(doc.clone());
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{codec::Record, testing};

    fn fields(v: serde_json::Value) -> Body {
        v.as_object().unwrap().clone()
    }

    fn mutation(id: &str, base: Option<u64>, op: Op) -> Mutation {
        Mutation {
            base_version: base.map(Version),
            ..testing::mutation(id, op)
        }
    }

    fn batch(atomic: bool, mutations: Vec<Mutation>) -> PushBatch {
        PushBatch {
            atomic,
            ..testing::batch(mutations)
        }
    }

    /// Plans one group on an empty store.
    fn apply(batches: &[PushBatch]) -> GroupCommit {
        apply_limited(batches, usize::MAX)
    }

    /// As [`apply`], with a body limit.
    fn apply_limited(batches: &[PushBatch], max_body_bytes: usize) -> GroupCommit {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let [log, clients, meta] = ["log", "clients", "meta"].map(|n| db.open_tree(n).unwrap());
        let trees = Trees { log, clients, meta };
        let batches: Vec<&PushBatch> = batches.iter().collect();
        let limits = Limits {
            max_body_bytes,
            purge_horizon: Seq(0),
        };
        let unpublished = DocMap::default();
        apply_group(
            &trees,
            &Index::default(),
            &unpublished,
            &batches,
            SystemTime::now(),
            limits,
        )
        .unwrap()
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
        let group = apply(&[
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
        let outcome = |i: usize| group.outcomes[i].as_ref().unwrap();
        assert_eq!(outcomes(outcome(0)), [Outcome::Applied]);
        assert_eq!(
            outcomes(outcome(1)),
            [Outcome::NotApplied, Outcome::NotApplied, Outcome::Conflict]
        );
        assert_eq!(outcome(1).results[0].document, None);
        assert_eq!(outcomes(outcome(2)), [Outcome::Applied]);
        assert_eq!(group.head, Seq(2));
        let seqs: Vec<u64> = group.changes.iter().map(|d| d.seq.0).collect();
        assert_eq!(seqs, [1, 2], "the atomic batch's plan is dropped");
        assert_eq!(group.records.len(), 2);
        let record = Record::parse(&group.records[1]).unwrap();
        assert_eq!((record.version, record.prev), (Version(2), Seq(1)));
        let x = DocKey::new("c", "x").unwrap();
        assert_eq!(group.index[&x].seq, Seq(2));
        assert!(!group.index.contains_key(&DocKey::new("c", "y").unwrap()));
    }

    /// Rule: a batch whose patch would store a body over the limit is
    /// refused whole (its earlier writes and its client's ids taken back),
    /// and the other batches of the same group commit are unaffected, with
    /// gap-free seqs.
    #[test]
    fn an_oversized_result_refuses_only_its_own_batch() {
        let put = |v| Op::Put(fields(v).into());
        let tracked = |b: PushBatch| PushBatch {
            client_id: "c1".into(),
            updated_by: "c1".into(),
            ..b
        };
        let group = apply_limited(
            &[
                batch(false, vec![mutation("a", None, put(json!({"n": 1})))]),
                tracked(batch(
                    false,
                    vec![
                        Mutation {
                            mutation_id: 1,
                            ..mutation("b", None, put(json!({"n": 1})))
                        },
                        Mutation {
                            mutation_id: 2,
                            ..mutation("a", None, Op::Patch(fields(json!({"big": "x".repeat(64)}))))
                        },
                    ],
                )),
                batch(false, vec![mutation("c", None, put(json!({"n": 1})))]),
            ],
            48,
        );
        assert!(group.outcomes[0].is_ok());
        assert!(matches!(
            group.outcomes[1],
            Err(StoreError::BodyTooLarge { mutation: 1, .. })
        ));
        assert!(group.outcomes[2].is_ok());
        let written: Vec<(&str, u64)> = group
            .changes
            .iter()
            .map(|d| (d.id.as_str(), d.seq.0))
            .collect();
        assert_eq!(written, [("a", 1), ("c", 2)]);
        assert!(
            group.clients.is_empty(),
            "the refused batch's ids are not consumed"
        );
    }

    /// Rule: batches of one client in one group commit see each other's
    /// mutation-id records: a retry in the same group is answered with the
    /// first batch's truth (DUPLICATE, CONFLICT), an atomic failure consumes
    /// only its rejected id, and its NOT_APPLIED id applies in a later batch.
    #[test]
    fn batches_of_one_client_in_one_group_see_each_others_ids() {
        let put = |v| Op::Put(fields(v).into());
        let tracked = |atomic, ms: Vec<(u64, Mutation)>| PushBatch {
            client_id: "c1".into(),
            updated_by: "c1".into(),
            atomic,
            mutations: ms
                .into_iter()
                .map(|(id, m)| Mutation {
                    mutation_id: id,
                    ..m
                })
                .collect(),
        };
        let first = || {
            vec![
                (1, mutation("x", None, put(json!({"a": 1})))),
                (2, mutation("x", Some(99), Op::Delete)),
            ]
        };
        let group = apply(&[
            tracked(false, first()),
            tracked(false, first()),
            tracked(
                true,
                vec![
                    (3, mutation("y", None, put(json!({"b": 1})))),
                    (4, mutation("x", Some(99), Op::Delete)),
                ],
            ),
            tracked(false, vec![(3, mutation("y", None, put(json!({"b": 1}))))]),
        ]);
        let outcome = |i: usize| outcomes(group.outcomes[i].as_ref().unwrap());
        assert_eq!(outcome(0), [Outcome::Applied, Outcome::Conflict]);
        assert_eq!(outcome(1), [Outcome::Duplicate, Outcome::Conflict]);
        assert_eq!(outcome(2), [Outcome::NotApplied, Outcome::Conflict]);
        assert_eq!(outcome(3), [Outcome::Applied]);
        let state = &group.clients["c1"].state;
        assert_eq!(state.last, 3);
        assert_eq!(state.status(4), IdStatus::Rejected);
        assert_eq!(state.status(2), IdStatus::Rejected);
        assert_eq!(state.status(5), IdStatus::New);
    }

    /// Rule: a base version written earlier in the same batch is found
    /// through the chain: only `a` changed since base 1, so a change of `k`
    /// merges (an unknown base would count `k` as changed and conflict).
    #[test]
    fn a_base_written_earlier_in_the_batch_is_found() {
        let put = |v| Op::Put(fields(v).into());
        let group = apply(&[batch(
            false,
            vec![
                mutation("z", None, put(json!({"a": 1, "k": 1}))),
                mutation("z", Some(1), put(json!({"a": 2, "k": 1}))),
                mutation("z", Some(1), Op::Patch(fields(json!({"k": 9})))),
            ],
        )]);
        let outcome = group.outcomes[0].as_ref().unwrap();
        let results = &outcome.results;
        assert_eq!(
            outcomes(outcome),
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
