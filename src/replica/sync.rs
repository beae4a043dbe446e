//! Sync: catch up, push the outbox in order with its own mutation ids, apply
//! the answers, catch up again. A resync (Pull from 0) when the checkpoint
//! cannot be resumed from.
//!
//! Every step reads the store and commits under the replica's write lock,
//! and calls the server without it, so local writes go on during a sync. A
//! crash anywhere leaves either the state before a commit or after it: a
//! push whose answer was not recorded is sent again with the same ids and
//! answered `DUPLICATE` (applied by the earlier attempt) or `CONFLICT`.

use std::collections::{BTreeMap, HashSet};

use futures_util::StreamExt;
use serde_json::Value;

use super::{
    LocalReplica, ReplicaError, Resolution, Resolver,
    events::{Acknowledgement, ReplicaEvent, ResolvedBy},
    store::{BaseDoc, ConflictRecord, Entry, LocalOp, Plan, Store, StoredCheckpoint, doc_key},
    view,
};
use crate::{
    client::{
        Body, Checkpoint, Document, Mutation, Op, PendingPush, PullOptions, PullPage, PushResult,
    },
    pb,
};

/// Most writes per push (the server's `--max-batch` is 1000 by default).
const MAX_BATCH: usize = 256;

/// Most body bytes per push (a write bigger than this goes alone): well
/// under the server's request limit (`--max-request-bytes`, 16 MiB by
/// default), and small enough that the answer, which echoes each
/// document, keeps every body within the server's answer limit
/// (`--max-message-bytes`, 4 MiB), so later writes can move onto the
/// versions it shows.
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// What one [`LocalReplica::sync`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncReport {
    /// Writes sent (a resolved write sent again counts again).
    pub pushed: usize,
    /// Writes the server acknowledged (applied, merged, resolved, or
    /// applied by an earlier attempt) and that left the outbox.
    pub acknowledged: usize,
    /// Conflicts parked for [`LocalReplica::resolve`].
    pub parked: usize,
    /// Conflicts settled by a resolver (keep-server, keep-local, a merge
    /// callback).
    pub resolved: usize,
    /// Documents received by pulls.
    pub pulled: usize,
    /// True when the base was rebuilt from a Pull from 0.
    pub resynced: bool,
    /// The checkpoint the view is caught up to.
    pub checkpoint: Checkpoint,
    /// Writes left in the outbox: only those held by parked conflicts.
    pub remaining: usize,
}

impl LocalReplica {
    /// Catches up with the server, pushes the outbox (resolving conflicts
    /// as the collections' resolvers say), and catches up again: on
    /// success the outbox holds only writes held by parked conflicts and
    /// the view is caught up to at least the server's head at the start.
    /// On failure (the server unreachable, a bad answer) the outbox and the
    /// base stay as the last commit left them; call again.
    pub async fn sync(&self) -> Result<SyncReport, ReplicaError> {
        let _one = self.inner.sync.lock().await;
        let mut report = SyncReport::default();
        self.catch_up(&mut report).await?;
        self.push_outbox(&mut report).await?;
        self.catch_up(&mut report).await?;
        report.checkpoint = Checkpoint::from(&self.inner.store.checkpoint()?);
        report.remaining = self.inner.store.outbox_len();
        Ok(report)
    }

    // -----------------------------------------------------------------
    // Push
    // -----------------------------------------------------------------

    pub(super) async fn push_outbox(&self, report: &mut SyncReport) -> Result<(), ReplicaError> {
        loop {
            let batch = {
                let _w = self.lock();
                next_batch(&self.inner.store, MAX_BATCH, MAX_BATCH_BYTES)?
            };
            if batch.is_empty() {
                return Ok(());
            }
            let request = pb::PushRequest {
                client_id: self.client_id().to_owned(),
                mutations: batch
                    .iter()
                    .enumerate()
                    .map(|(i, (m, e))| to_mutation(e).to_pb(*m, i))
                    .collect::<Result<_, _>>()?,
                atomic: false,
            };
            // Our ids, ours only: a resend is exactly-once whatever
            // happened to earlier attempts.
            let answer = self
                .inner
                .client
                .resend(&PendingPush::from_request(request))
                .await?;
            report.pushed += batch.len();
            let _w = self.lock();
            if !self.apply_answer(&batch, &answer, report)? {
                // Another store answered: its outcomes are recorded, and
                // the next catch-up resyncs before anything more is sent
                // (a write resent against a base from the old store would
                // only conflict again).
                return Ok(());
            }
        }
    }

    /// Records a push's answer: acknowledged writes leave the outbox and
    /// move the later writes of their document onto the version they
    /// produced; conflicts go to their resolver. Returns whether the answer
    /// came from the store the base is from.
    fn apply_answer(
        &self,
        batch: &[(u64, Entry)],
        answer: &PushResult,
        report: &mut SyncReport,
    ) -> Result<bool, ReplicaError> {
        let store = &self.inner.store;
        if answer.results.len() != batch.len() {
            return Err(ReplicaError::BadAnswer(format!(
                "{} results for {} mutations",
                answer.results.len(),
                batch.len()
            )));
        }
        let stored = store.checkpoint()?;
        // An answer from another store is recorded (its outcomes are true
        // there) but its documents do not go into this base: the next
        // pull resyncs.
        let same_store =
            stored.store_id.is_empty() || stored.store_id == answer.checkpoint.store_id;
        let mut plan = Plan::default();
        let mut next_id = store.next_id()?;
        let first_id = next_id;
        let mut events = Vec::new();
        let mut refreshed = Vec::new();
        for ((m, entry), result) in batch.iter().zip(&answer.results) {
            if result.mutation_id != *m {
                return Err(ReplicaError::BadAnswer(format!(
                    "result for mutation {} in the place of {m}",
                    result.mutation_id
                )));
            }
            let (c, id) = (&entry.collection, &entry.id);
            let mut server = store.base(c, id)?;
            if let Some(doc) = result.document.as_ref().filter(|_| same_store)
                && let Some(fresh) = newer(server.as_ref(), doc)?
            {
                plan.put_base(c, id, &fresh);
                server = Some(fresh);
                refreshed.push(doc.clone());
            }
            match result.outcome {
                pb::Outcome::Applied
                | pb::Outcome::Merged
                | pb::Outcome::Resolved
                | pb::Outcome::Duplicate => {
                    plan.remove_entry(*m, entry);
                    report.acknowledged += 1;
                    events.push(ReplicaEvent::Acknowledged {
                        mutation_id: *m,
                        collection: c.clone(),
                        id: id.clone(),
                        acknowledgement: match result.outcome {
                            pb::Outcome::Applied => Acknowledgement::Applied,
                            pb::Outcome::Merged => Acknowledgement::Merged,
                            pb::Outcome::Resolved => Acknowledgement::Resolved,
                            _ => Acknowledgement::Duplicate,
                        },
                        version: result.document.as_ref().map_or(0, |d| d.version),
                    });
                    // Later writes of the document were made on top of
                    // this one: they move to the version the answer shows,
                    // unless they change a field someone else changed there
                    // (merged in, or since: a DUPLICATE shows the current
                    // document), which they never saw. Those keep their
                    // base, so the server's field check reports the
                    // conflict instead of overwriting it.
                    // An answer over the server's size limit carries the
                    // version without the body; an APPLIED write produced
                    // exactly its own change on its ancestor.
                    if let Some(d) = &result.document
                        && let Some(produced) = produced_body(d, result.outcome, entry)
                    {
                        let foreign = view::foreign_fields(
                            entry.ancestor.as_ref(),
                            &entry.op,
                            produced.as_ref(),
                        );
                        for (later, mut e) in store.doc_entries(c, id)? {
                            if later > *m && !view::touches(&e.op, foreign.as_ref()) {
                                e.base_version = d.version;
                                e.ancestor.clone_from(&produced);
                                plan.put_entry(later, &e);
                            }
                        }
                    }
                }
                pb::Outcome::Conflict => {
                    let record = ConflictRecord {
                        mutation_id: *m,
                        server_version: result.document.as_ref().map_or(0, |d| d.version),
                        conflicting_fields: result.conflicting_fields.clone(),
                    };
                    match self.auto_resolution(entry.resolver, c, id, &record, server.as_ref())? {
                        Some((resolution, by)) => {
                            tracing::info!(
                                collection = %c, id = %id, mutation_id = m, ?resolution,
                                "conflict resolved by the collection's resolver"
                            );
                            let (resent_as, renumbered) = plan_resolution(
                                store,
                                &mut plan,
                                &mut next_id,
                                (*m, entry),
                                &resolution,
                                server.as_ref(),
                            )?;
                            report.resolved += 1;
                            events.push(ReplicaEvent::Resolved {
                                mutation_id: *m,
                                collection: c.clone(),
                                id: id.clone(),
                                resolution,
                                by,
                                resent_as,
                                renumbered,
                            });
                        }
                        None => {
                            plan.put_conflict(c, id, &record);
                            report.parked += 1;
                            events.push(ReplicaEvent::Parked {
                                mutation_id: *m,
                                collection: c.clone(),
                                id: id.clone(),
                                conflicting_fields: record.conflicting_fields.clone(),
                            });
                        }
                    }
                }
                other => {
                    return Err(ReplicaError::BadAnswer(format!(
                        "mutation {m} answered {} in a non-atomic push",
                        other.as_str_name()
                    )));
                }
            }
        }
        if next_id != first_id {
            plan.set_next_id(next_id);
        }
        store.commit(&plan)?;
        if !refreshed.is_empty() {
            events.insert(
                0,
                ReplicaEvent::ServerChanges {
                    documents: refreshed,
                    checkpoint: None,
                },
            );
        }
        self.inner.events.send(events);
        Ok(same_store)
    }

    /// The resolution a conflict gets without asking anyone: the
    /// resolver's, or the merge callback's; `None` parks it.
    fn auto_resolution(
        &self,
        resolver: Resolver,
        collection: &str,
        id: &str,
        record: &ConflictRecord,
        server: Option<&BaseDoc>,
    ) -> Result<Option<(Resolution, ResolvedBy)>, ReplicaError> {
        Ok(match resolver {
            Resolver::KeepServer => Some((Resolution::KeepServer, ResolvedBy::Resolver)),
            Resolver::KeepLocal => Some((Resolution::KeepLocal, ResolvedBy::Resolver)),
            Resolver::Manual => {
                let merge = self
                    .inner
                    .merge
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(collection)
                    .cloned();
                match merge {
                    None => None,
                    Some(merge) => {
                        let conflict =
                            self.conflict_view(collection.into(), id.into(), record, server)?;
                        merge(&conflict).map(|r| match r {
                            Resolution::Merged(b) => {
                                // As the server will store it.
                                let b = view::normalize(&b).unwrap_or(b);
                                (Resolution::Merged(b), ResolvedBy::Merge)
                            }
                            other => (other, ResolvedBy::Merge),
                        })
                    }
                }
            }
        })
    }

    // -----------------------------------------------------------------
    // Pull
    // -----------------------------------------------------------------

    /// Pulls from the stored checkpoint to the end; resyncs from 0 when
    /// the server says the checkpoint cannot be resumed from.
    async fn catch_up(&self, report: &mut SyncReport) -> Result<(), ReplicaError> {
        match self.pull_from_checkpoint(report).await {
            Err(ReplicaError::Client(e)) if e.is_resync_needed() => {
                tracing::warn!(cause = %e, "the checkpoint cannot be resumed from: rebuilding the base from a pull from 0 (the outbox is kept)");
                self.resync(report).await
            }
            other => other,
        }
    }

    fn pull_options(&self, since: Checkpoint) -> PullOptions {
        PullOptions {
            since,
            collections: self.inner.config.collections.keys().cloned().collect(),
            page_size: 0,
        }
    }

    async fn pull_from_checkpoint(&self, report: &mut SyncReport) -> Result<(), ReplicaError> {
        let since = self.inner.store.checkpoint()?;
        let mut pages = self
            .inner
            .client
            .pull_all(self.pull_options(Checkpoint::from(&since)));
        // Each page is checked against the checkpoint it follows, not the
        // stored one: a background follower may have moved that on
        // meanwhile (then the page's documents are only applied where
        // newer, and the checkpoint only moves forward).
        let mut from = since;
        while let Some(page) = pages.next().await {
            let page = page?;
            let _w = self.lock();
            self.check_page(&from, &page)?;
            self.apply_changes(&page.documents, &page.checkpoint)?;
            from = StoredCheckpoint::from(&page.checkpoint);
            report.pulled += page.documents.len();
        }
        Ok(())
    }

    /// Puts the documents newer than the base's into it and moves the
    /// checkpoint (forward only: a concurrent sync may be ahead), in one
    /// commit; then tells the events. The caller holds the write lock and
    /// checked the page.
    pub(super) fn apply_changes(
        &self,
        documents: &[Document],
        checkpoint: &Checkpoint,
    ) -> Result<(), ReplicaError> {
        let store = &self.inner.store;
        let mut plan = Plan::default();
        let mut changed = Vec::new();
        for doc in documents {
            if let Some(fresh) = newer(store.base(&doc.collection, &doc.id)?.as_ref(), doc)? {
                plan.put_base(&doc.collection, &doc.id, &fresh);
                changed.push(doc.clone());
            }
        }
        let stored = store.checkpoint()?;
        if checkpoint.seq >= stored.seq {
            plan.set_checkpoint(&StoredCheckpoint::from(checkpoint));
        }
        store.commit(&plan)?;
        if !changed.is_empty() {
            self.inner.events.send([ReplicaEvent::ServerChanges {
                documents: changed,
                checkpoint: Some(checkpoint.clone()),
            }]);
        }
        Ok(())
    }

    /// Refuses a page that cannot follow `since`: another store, a
    /// checkpoint or a document seq going backwards, a collection not asked
    /// for.
    pub(super) fn check_page(
        &self,
        since: &StoredCheckpoint,
        page: &PullPage,
    ) -> Result<(), ReplicaError> {
        let bad = |what: String| Err(ReplicaError::BadAnswer(what));
        if !since.store_id.is_empty() && page.checkpoint.store_id != since.store_id {
            return bad(format!(
                "a page of store {} for a checkpoint of store {}",
                page.checkpoint.store_id, since.store_id
            ));
        }
        if page.checkpoint.seq < since.seq {
            return bad(format!(
                "the checkpoint went back from {} to {}",
                since.seq, page.checkpoint.seq
            ));
        }
        for d in &page.documents {
            if d.seq <= since.seq || d.seq > page.checkpoint.seq {
                return bad(format!(
                    "{}/{} at seq {} in a page from {} to {}",
                    d.collection, d.id, d.seq, since.seq, page.checkpoint.seq
                ));
            }
            if !self.inner.config.collections.contains_key(&d.collection) {
                return bad(format!(
                    "a document of collection `{}`, not asked for",
                    d.collection
                ));
            }
        }
        Ok(())
    }

    /// Rebuilds the base from a Pull from 0, in one commit with its
    /// checkpoint; the outbox and parked conflicts stay (their writes are
    /// then checked by the server against what it holds).
    async fn resync(&self, report: &mut SyncReport) -> Result<(), ReplicaError> {
        let mut pages = self
            .inner
            .client
            .pull_all(self.pull_options(Checkpoint::default()));
        let mut docs: BTreeMap<(String, String), BaseDoc> = BTreeMap::new();
        let mut checkpoint = StoredCheckpoint::default();
        while let Some(page) = pages.next().await {
            let page = page?;
            self.check_page(&checkpoint, &page)?;
            for d in &page.documents {
                docs.insert(
                    (d.collection.clone(), d.id.clone()),
                    BaseDoc::from_document(d),
                );
            }
            checkpoint = StoredCheckpoint::from(&page.checkpoint);
            report.pulled += page.documents.len();
        }
        let _w = self.lock();
        let store = &self.inner.store;
        // A background follower may have brought the base past this pull,
        // in the same store, meanwhile: what it brought stays, and so does
        // its checkpoint.
        let stored = store.checkpoint()?;
        let ahead = stored.store_id == checkpoint.store_id && stored.seq > checkpoint.seq;
        let newer_in_base = |c: &str, id: &str, seq: u64| -> Result<bool, ReplicaError> {
            Ok(ahead && store.base(c, id)?.is_some_and(|b| b.seq > seq))
        };
        let mut plan = Plan::default();
        for (c, id) in store.base_keys()? {
            if !docs.contains_key(&(c.clone(), id.clone()))
                && !newer_in_base(&c, &id, checkpoint.seq)?
            {
                plan.remove_base(&c, &id);
            }
        }
        for ((c, id), d) in &docs {
            if !newer_in_base(c, id, d.seq)? {
                plan.put_base(c, id, d);
            }
        }
        let reached = if ahead { stored } else { checkpoint };
        plan.set_checkpoint(&reached);
        store.commit(&plan)?;
        report.resynced = true;
        self.inner.events.send([ReplicaEvent::Resynced {
            checkpoint: Checkpoint::from(&reached),
        }]);
        Ok(())
    }
}

/// The next push: outbox entries in order, skipping documents with a parked
/// conflict, at most one per document (a later write of a document waits
/// for the earlier one's answer, which gives its base), stopping at the
/// first document met twice so ids go out in increasing order.
fn next_batch(
    store: &Store,
    max: usize,
    max_bytes: usize,
) -> Result<Vec<(u64, Entry)>, ReplicaError> {
    let parked: HashSet<Vec<u8>> = store
        .conflicts()?
        .into_iter()
        .map(|((c, id), _)| doc_key(&c, &id))
        .collect();
    let mut docs = HashSet::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for item in store.outbox_iter() {
        let (m, e) = item?;
        let key = doc_key(&e.collection, &e.id);
        if parked.contains(&key) {
            continue;
        }
        let size = e.encoded_len();
        if !batch.is_empty() && bytes + size > max_bytes {
            break;
        }
        if !docs.insert(key) {
            break;
        }
        bytes += size;
        batch.push((m, e));
        if batch.len() == max {
            break;
        }
    }
    Ok(batch)
}

/// The body an acknowledged write left on the server (`Some(None)`: no live
/// document), when the answer tells: its document, or, for an APPLIED
/// write whose body the server left out of an answer over its size limit,
/// the write's own change on its ancestor. `None` when it cannot be known.
fn produced_body(d: &Document, outcome: pb::Outcome, entry: &Entry) -> Option<Option<Body>> {
    if d.deleted {
        Some(None)
    } else if d.body.is_some() {
        Some(d.body.clone())
    } else if outcome == pb::Outcome::Applied {
        Some(view::apply(entry.ancestor.clone(), &entry.op))
    } else {
        None
    }
}

/// The wire form of an entry: always based (conditional) and REJECT, so
/// every conflict comes back to the replica's resolver.
fn to_mutation(e: &Entry) -> Mutation {
    let op = match &e.op {
        LocalOp::Put(b) => Op::Put(Value::Object(b.clone())),
        LocalOp::Patch(b) => Op::Patch(Value::Object(b.clone())),
        LocalOp::Delete => Op::Delete,
    };
    Mutation {
        collection: e.collection.clone(),
        id: e.id.clone(),
        op,
        base_version: Some(e.base_version),
        on_conflict: pb::ConflictStrategy::Reject,
    }
}

/// The base form of `doc` if it is newer than `current` (a higher seq);
/// `None` when it is not, or when it lacks its body (an answer cut to the
/// message cap: the next pull brings it). A newer seq with an older version
/// is a bad answer.
fn newer(current: Option<&BaseDoc>, doc: &Document) -> Result<Option<BaseDoc>, ReplicaError> {
    if !doc.deleted && doc.body.is_none() {
        return Ok(None);
    }
    match current {
        Some(c) if doc.seq <= c.seq => Ok(None),
        Some(c) if doc.version < c.version => Err(ReplicaError::BadAnswer(format!(
            "{}/{} went back from version {} to {} (seq {} to {})",
            doc.collection, doc.id, c.version, doc.version, c.seq, doc.seq
        ))),
        _ => Ok(Some(BaseDoc::from_document(doc))),
    }
}

/// What a resolution did to mutation ids: the id the resolved write goes
/// out under (if any), and the later writes' (old, new) ids.
pub(super) type Renumbering = (Option<u64>, Vec<(u64, u64)>);

/// Plans a conflict's resolution: the conflicting write `(m, entry)` leaves
/// the outbox (and its conflict record, if parked); keep-local or a merge
/// puts a write against `server`'s version at the end under a new id; the
/// document's later writes (held: never sent) follow it under new ids, so
/// ids still go out in increasing order. Returns the id the resolved
/// write goes out under (if any) and the later writes' (old, new) ids.
pub(super) fn plan_resolution(
    store: &Store,
    plan: &mut Plan,
    next_id: &mut u64,
    (m, entry): (u64, &Entry),
    resolution: &Resolution,
    server: Option<&BaseDoc>,
) -> Result<Renumbering, ReplicaError> {
    let (c, id) = (&entry.collection, &entry.id);
    plan.remove_entry(m, entry);
    plan.remove_conflict(c, id);
    let mut take_id = || {
        let id = *next_id;
        *next_id = super::next(id)?;
        Ok::<u64, ReplicaError>(id)
    };
    let against_server = |op: LocalOp| Entry {
        op,
        base_version: server.map_or(0, |s| s.version),
        ancestor: server.and_then(BaseDoc::live_body).cloned(),
        ..entry.clone()
    };
    let resent_as = match resolution {
        Resolution::KeepServer => None,
        Resolution::KeepLocal => {
            let new = take_id()?;
            plan.put_entry(new, &against_server(entry.op.clone()));
            Some(new)
        }
        Resolution::Merged(body) => {
            let new = take_id()?;
            plan.put_entry(new, &against_server(LocalOp::Put(body.clone())));
            Some(new)
        }
    };
    let mut renumbered = Vec::new();
    for (later, e) in store.doc_entries(c, id)? {
        if later > m {
            let new = take_id()?;
            plan.remove_entry(later, &e);
            plan.put_entry(new, &e);
            renumbered.push((later, new));
        }
    }
    Ok((resent_as, renumbered))
}
