//! The store's side of replication: what a primary reads to send and how a
//! replica turns what it receives into a commit.
//!
//! A replica holds a copy of its primary's store: the same seqs, versions,
//! times, records and client states. So it never plans: a replicated commit
//! is taken as it is, checked only for being the next one and well formed,
//! and written by the same writer, as one local commit, through the same
//! index and feed as a push ([`plan`] makes it a [`GroupCommit`]). The
//! `prev` links of its records are the replica's own (its retention may
//! differ from the primary's).
//!
//! Every store also keeps its epoch history ([`Epochs`]): where each epoch
//! began. A node that was primary and is now asked to follow another one
//! tells from it whether it holds commits that were never replicated.

use std::collections::HashMap;

use super::{
    Trees,
    clients::{ClientState, ClientWrite},
    codec,
    error::StoreError,
    index::{DocMap, Entry, Index},
    keys::{self, DocKey},
    model::{Document, Seq},
    push::GroupCommit,
};

/// One commit of the primary, as a replica applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicatedCommit {
    /// The replica's head before it.
    pub prev_head: Seq,
    /// The head after it; seqs in between without a record were removed
    /// by the primary's retention.
    pub head: Seq,
    /// The epoch it was committed in.
    pub epoch: u64,
    /// Its records in seq order, each a document state at its seq.
    pub records: Vec<Document>,
    /// The clients' mutation-id states it wrote.
    pub clients: Vec<(String, ClientState)>,
    /// What it is, for the replica's client states.
    pub kind: CommitKind,
}

/// Where a replicated commit comes from, which says whether the replica's
/// client states are complete after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    /// A live commit, with every client state it wrote.
    Live,
    /// Records read back from the primary's log, without client states
    /// (a snapshot of them follows): the replica's client states are
    /// behind its documents until then.
    FromLog,
    /// Client states of a snapshot; the last part says from which head on
    /// the replica's client states are consistent with its documents.
    Snapshot(Option<u64>),
}

/// How complete a replica's client states are, kept in its meta tree and
/// changed only with the commits that change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientsProgress {
    /// Every client state written by a commit below this seq is here and
    /// current: the next stream asks for the states written from here on.
    pub from: u64,
    /// The client states are consistent with the documents once the head
    /// reaches this (`None`: a snapshot is on its way).
    pub consistent_at: Option<u64>,
}

impl ClientsProgress {
    /// Whether the client states are consistent with documents up to `head`.
    pub fn consistent(&self, head: Seq) -> bool {
        self.consistent_at.is_some_and(|at| head.0 >= at)
    }

    /// After a commit of `kind` ending at `head`.
    fn after(self, kind: CommitKind, head: Seq) -> Self {
        match kind {
            CommitKind::FromLog => Self {
                consistent_at: None,
                ..self
            },
            CommitKind::Snapshot(Some(at)) => Self {
                consistent_at: Some(at),
                ..self
            },
            CommitKind::Snapshot(None) => self,
            CommitKind::Live if self.consistent(head) => Self {
                from: head.0,
                ..self
            },
            CommitKind::Live => self,
        }
    }

    /// The stored form: `[from][consistent_at or u64::MAX]`.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.from.to_be_bytes());
        out[8..].copy_from_slice(&self.consistent_at.unwrap_or(u64::MAX).to_be_bytes());
        out
    }

    /// Reads it from the meta tree. A store that never followed a primary
    /// holds its own clients' states: complete and consistent up to `head`.
    pub fn read(meta: &sled::Tree, head: Seq) -> Result<Self, StoreError> {
        match meta.get(keys::META_CLIENTS_PROGRESS)? {
            None => Ok(Self {
                from: head.0,
                consistent_at: Some(0),
            }),
            Some(bytes) => {
                let from = keys::parse_u64(bytes.get(..8).unwrap_or_default());
                let at = keys::parse_u64(bytes.get(8..).unwrap_or_default());
                match (from, at) {
                    (Some(from), Some(at)) => Ok(Self {
                        from,
                        consistent_at: (at != u64::MAX).then_some(at),
                    }),
                    _ => Err(StoreError::corrupt(keys::META, "bad clients progress")),
                }
            }
        }
    }
}

/// Where an epoch began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: u64,
    /// Its first seq.
    pub first_seq: Seq,
    /// Chosen at random by the promotion that began it (0 for epoch 1), so
    /// two promotions to the same epoch number differ.
    pub id: u64,
}

/// A store's epoch history, oldest first; never empty. A store starts in
/// epoch 1 at seq 1; each promotion starts a new epoch after the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epochs(Vec<EpochStart>);

impl Default for Epochs {
    fn default() -> Self {
        Self(vec![EpochStart {
            epoch: 1,
            first_seq: Seq(1),
            id: 0,
        }])
    }
}

impl Epochs {
    /// A history as a primary sent it: epochs and first seqs increasing.
    pub fn from_starts(starts: Vec<EpochStart>) -> Result<Self, &'static str> {
        if starts.is_empty() {
            return Err("empty epoch history");
        }
        if starts
            .windows(2)
            .any(|w| w[0].epoch >= w[1].epoch || w[0].first_seq > w[1].first_seq)
        {
            return Err("epoch history out of order");
        }
        Ok(Self(starts))
    }

    /// The entries, oldest first.
    pub fn starts(&self) -> &[EpochStart] {
        &self.0
    }

    /// The current (newest) epoch.
    pub fn current(&self) -> u64 {
        self.0.last().map_or(1, |e| e.epoch)
    }

    /// The epoch `seq` was committed in.
    pub fn epoch_of(&self, seq: Seq) -> u64 {
        self.0
            .iter()
            .rev()
            .find(|e| e.first_seq <= seq)
            .or(self.0.first())
            .map_or(1, |e| e.epoch)
    }

    /// The history after promoting a node at `head` that has seen epochs up
    /// to `seen`: a new epoch above both, starting at `head + 1`.
    pub fn promoted(&self, head: Seq, seen: u64) -> Self {
        let mut next = self.0.clone();
        next.push(EpochStart {
            epoch: self.current().max(seen) + 1,
            first_seq: Seq(head.0 + 1),
            id: uuid::Uuid::new_v4().as_u64_pair().0,
        });
        Self(next)
    }

    /// The seqs a node with history `theirs` holding seqs up to `applied`
    /// has that this history does not share: from the first seq where the
    /// two histories disagree (an epoch one of them began that the other
    /// does not have) to `applied`; none if that is above `applied`.
    pub fn divergence(&self, theirs: &Epochs, applied: Seq) -> Option<(Seq, Seq)> {
        let shared = self
            .0
            .iter()
            .zip(&theirs.0)
            .take_while(|(a, b)| a == b)
            .count();
        let first = match (self.0.get(shared), theirs.0.get(shared)) {
            (None, None) => return None,
            (Some(e), None) | (None, Some(e)) => e.first_seq,
            (Some(a), Some(b)) => a.first_seq.min(b.first_seq),
        };
        (applied >= first).then_some((first, applied))
    }

    /// The stored form: `[epoch][first seq][id]` per entry, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        self.0
            .iter()
            .flat_map(|e| {
                e.epoch
                    .to_be_bytes()
                    .into_iter()
                    .chain(e.first_seq.0.to_be_bytes())
                    .chain(e.id.to_be_bytes())
            })
            .collect()
    }

    /// Parses the stored form.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |detail| StoreError::corrupt(keys::META, detail);
        let (entries, rest) = bytes.as_chunks::<24>();
        if !rest.is_empty() {
            return Err(corrupt("short epoch history"));
        }
        let starts = entries
            .iter()
            .map(|e| EpochStart {
                epoch: keys::parse_u64(&e[..8]).unwrap_or_default(),
                first_seq: Seq(keys::parse_u64(&e[8..16]).unwrap_or_default()),
                id: keys::parse_u64(&e[16..]).unwrap_or_default(),
            })
            .collect();
        Self::from_starts(starts).map_err(corrupt)
    }

    /// Reads the history from the meta tree (the initial one if none).
    pub fn read(meta: &sled::Tree) -> Result<Self, StoreError> {
        match meta.get(keys::META_EPOCHS)? {
            Some(bytes) => Self::decode(&bytes),
            None => Ok(Self::default()),
        }
    }
}

/// Makes replicated commits (consecutive, starting at the replica's head)
/// one group commit, checking that they are the next ones and well formed.
/// `overlay` holds index entries written but not yet published.
/// `progress` is the replica's client progress before them; the group
/// carries it after them.
pub fn plan(
    trees: &Trees,
    index: &Index,
    overlay: &DocMap<Entry>,
    head: Seq,
    progress: ClientsProgress,
    commits: Vec<ReplicatedCommit>,
) -> Result<GroupCommit, StoreError> {
    let mut group = GroupCommit {
        outcomes: Vec::new(),
        changes: Vec::new(),
        records: Vec::new(),
        clients: HashMap::new(),
        index: DocMap::default(),
        prev_head: head,
        head,
        clients_progress: Some(progress),
    };
    let mut progress = progress;
    for commit in commits {
        if commit.prev_head != group.head || commit.head < commit.prev_head {
            return Err(StoreError::Replication(format!(
                "commit ({}, {}] does not follow the replica's head {}",
                commit.prev_head, commit.head, group.head
            )));
        }
        for doc in commit.records {
            if doc.seq <= group.head || doc.seq > commit.head {
                return Err(StoreError::Replication(format!(
                    "record at seq {} outside its commit ({}, {}] or out of order",
                    doc.seq, commit.prev_head, commit.head
                )));
            }
            let key = DocKey::new(&doc.collection, &doc.id)?;
            let current = group
                .index
                .get(&key)
                .or_else(|| overlay.get(&key))
                .copied()
                .or_else(|| index.get(key.as_bytes()));
            let prev = current.map_or(Seq(0), |e| e.seq);
            group.records.push(codec::encode(&doc, &key, prev)?);
            group.index.insert(
                key,
                Entry {
                    seq: doc.seq,
                    version: doc.version,
                    deleted: doc.deleted,
                },
            );
            group.head = doc.seq;
            group.changes.push(doc);
        }
        if commit.head > commit.prev_head
            && let Some(last) = group.records.last_mut()
        {
            codec::mark_commit_end(last);
        }
        group.head = commit.head;
        progress = progress.after(commit.kind, commit.head);
        for (client, mut state) in commit.clients {
            let stored_last = match group.clients.get(&client) {
                Some(write) => write.stored_last,
                None => match trees.clients.get(client.as_bytes())? {
                    Some(bytes) => ClientState::decode(&bytes)?.last,
                    None => 0,
                },
            };
            state.at = commit.head.0;
            group
                .clients
                .insert(client, ClientWrite { stored_last, state });
        }
    }
    group.clients_progress = Some(progress);
    Ok(group)
}

/// A run of the log's records, as a primary sends them.
#[derive(Debug)]
pub struct Records {
    /// The records, superseded ones included, in seq order.
    pub docs: Vec<Document>,
    /// Every seq up to here was read.
    pub reached: Seq,
    /// Whether `reached` ends a commit (the last record read ends one, or
    /// the read reached its end, which the caller chose at a commit's end).
    pub commit_end: bool,
}

/// Reads the log's records in `(after, upto]` until about `max_bytes` of
/// them (at least one).
pub fn read_records(
    trees: &Trees,
    after: Seq,
    upto: Seq,
    max_bytes: usize,
) -> Result<Records, StoreError> {
    let mut docs = Vec::new();
    let mut bytes = 0;
    let mut commit_end = true;
    let range = keys::seq_key(Seq(after.0 + 1))..=keys::seq_key(upto);
    for entry in trees.log.range(range) {
        let (key, value) = entry?;
        let seq = super::index::parse_seq(&key)?;
        if !docs.is_empty() && bytes + value.len() > max_bytes {
            return Ok(Records {
                docs,
                reached: Seq(seq.0 - 1),
                commit_end,
            });
        }
        bytes += value.len();
        let record = codec::Record::parse(&value)?;
        commit_end = record.commit_end;
        docs.push(record.to_document(seq)?);
    }
    Ok(Records {
        docs,
        reached: upto,
        commit_end: true,
    })
}

/// The clients' states written at or after seq `since` and at or before
/// `upto` (later ones are in commits past `upto`, which carry them).
pub fn clients_between(trees: &Trees, since: Seq, upto: Seq) -> Result<ClientsBetween, StoreError> {
    let mut out = ClientsBetween::default();
    for entry in trees.clients.iter() {
        let (key, value) = entry?;
        let state = ClientState::decode(&value)?;
        out.latest = out.latest.max(Seq(state.at));
        if state.at >= since.0 && state.at <= upto.0 {
            let client = String::from_utf8(key.to_vec())
                .map_err(|_| StoreError::corrupt(keys::CLIENTS, "client id is not UTF-8"))?;
            out.states.push((client, state));
        }
    }
    Ok(out)
}

/// What [`clients_between`] read.
#[derive(Debug, Default)]
pub struct ClientsBetween {
    /// The states written in the range.
    pub states: Vec<(String, ClientState)>,
    /// The latest commit any state in the tree was written by (in or after
    /// the range): the writer stores client states before it announces
    /// their commit as written, so this may be past the written head.
    pub latest: Seq,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule: a node's seqs from the first one where its epoch history and
    /// the primary's disagree are divergent; two promotions to the same
    /// epoch number disagree.
    #[test]
    fn divergence_is_the_suffix_a_later_epoch_replaced() {
        let old = Epochs::default();
        let history = old.promoted(Seq(10), 1);
        assert_eq!(history.current(), 2);
        assert_eq!(history.epoch_of(Seq(10)), 1);
        assert_eq!(history.epoch_of(Seq(11)), 2);
        // The old primary (epoch 1) went on to seq 14 alone.
        assert_eq!(history.divergence(&old, Seq(14)), Some((Seq(11), Seq(14))));
        // It stopped at 10: nothing to discard.
        assert_eq!(history.divergence(&old, Seq(10)), None);
        // A replica that followed epoch 2 shares everything.
        assert_eq!(history.divergence(&history, Seq(30)), None);
        // Another replica promoted to epoch 2 at the same head.
        let twin = old.promoted(Seq(10), 1);
        assert_eq!(twin.current(), 2);
        assert_eq!(history.divergence(&twin, Seq(12)), Some((Seq(11), Seq(12))));
        assert_eq!(history.divergence(&twin, Seq(10)), None);
        assert_eq!(Epochs::decode(&history.encode()).unwrap(), history);
        assert!(Epochs::decode(&[1, 2, 3]).is_err());
        let start = |epoch, seq| EpochStart {
            epoch,
            first_seq: Seq(seq),
            id: 0,
        };
        assert!(Epochs::from_starts(vec![start(2, 1), start(1, 5)]).is_err());
    }

    #[test]
    fn a_promotion_goes_above_every_epoch_seen() {
        let history = Epochs::default();
        assert_eq!(history.promoted(Seq(0), 7).current(), 8);
    }
}
