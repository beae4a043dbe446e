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
}

/// Where an epoch began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: u64,
    /// Its first seq.
    pub first_seq: Seq,
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
        });
        Self(next)
    }

    /// The seqs a node holds that this history does not share: the node's
    /// newest epoch is `epoch` and it holds seqs up to `applied`; if a later
    /// epoch of this history began at or below `applied`, the node's seqs
    /// from there on were committed by a primary this history replaced.
    pub fn divergence(&self, epoch: u64, applied: Seq) -> Option<(Seq, Seq)> {
        let next = self.0.iter().find(|e| e.epoch > epoch)?;
        (applied >= next.first_seq).then_some((next.first_seq, applied))
    }

    /// The stored form: `[epoch][first seq]` per entry, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        self.0
            .iter()
            .flat_map(|e| {
                e.epoch
                    .to_be_bytes()
                    .into_iter()
                    .chain(e.first_seq.0.to_be_bytes())
            })
            .collect()
    }

    /// Parses the stored form.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |detail| StoreError::corrupt(keys::META, detail);
        let (entries, rest) = bytes.as_chunks::<16>();
        if !rest.is_empty() {
            return Err(corrupt("short epoch history"));
        }
        let starts = entries
            .iter()
            .map(|e| EpochStart {
                epoch: keys::parse_u64(&e[..8]).unwrap_or_default(),
                first_seq: Seq(keys::parse_u64(&e[8..]).unwrap_or_default()),
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
pub fn plan(
    trees: &Trees,
    index: &Index,
    overlay: &DocMap<Entry>,
    head: Seq,
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
    };
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
pub fn clients_between(
    trees: &Trees,
    since: Seq,
    upto: Seq,
) -> Result<Vec<(String, ClientState)>, StoreError> {
    let mut out = Vec::new();
    for entry in trees.clients.iter() {
        let (key, value) = entry?;
        let state = ClientState::decode(&value)?;
        if state.at >= since.0 && state.at <= upto.0 {
            let client = String::from_utf8(key.to_vec())
                .map_err(|_| StoreError::corrupt(keys::CLIENTS, "client id is not UTF-8"))?;
            out.push((client, state));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_is_the_suffix_a_later_epoch_replaced() {
        let history = Epochs::default().promoted(Seq(10), 1);
        assert_eq!(history.current(), 2);
        assert_eq!(history.epoch_of(Seq(10)), 1);
        assert_eq!(history.epoch_of(Seq(11)), 2);
        // The old primary (epoch 1) went on to seq 14 alone.
        assert_eq!(history.divergence(1, Seq(14)), Some((Seq(11), Seq(14))));
        // It stopped at 10: nothing to discard.
        assert_eq!(history.divergence(1, Seq(10)), None);
        // A replica that followed epoch 2 shares everything.
        assert_eq!(history.divergence(2, Seq(30)), None);
        assert_eq!(Epochs::decode(&history.encode()).unwrap(), history);
        assert!(Epochs::decode(&[1, 2, 3]).is_err());
        let backwards = vec![
            EpochStart {
                epoch: 2,
                first_seq: Seq(1),
            },
            EpochStart {
                epoch: 1,
                first_seq: Seq(5),
            },
        ];
        assert!(Epochs::from_starts(backwards).is_err());
    }

    #[test]
    fn a_promotion_goes_above_every_epoch_seen() {
        let history = Epochs::default();
        assert_eq!(history.promoted(Seq(0), 7).current(), 8);
    }
}
