//! Every conversion between proto and domain types.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use prost_types::Timestamp;

use crate::{
    pb,
    store::model::{Document, Outcome, Strategy},
};

/// A domain document as sent on the wire.
pub fn document(doc: &Document) -> pb::Document {
    pb::Document {
        body: (!doc.deleted).then(|| doc.body.clone()),
        ..metadata(doc)
    }
}

/// A document's metadata: everything but the body.
pub fn metadata(doc: &Document) -> pb::Document {
    pb::Document {
        collection: doc.collection.clone(),
        id: doc.id.clone(),
        version: doc.version.0,
        body: None,
        deleted: doc.deleted,
        seq: doc.seq.0,
        updated_at: Some(timestamp(doc.updated_at)),
        updated_by: doc.updated_by.clone(),
    }
}

/// As [`document`], moving the strings and the body out of an owned document.
pub fn owned_document(doc: Document) -> pb::Document {
    let body = (!doc.deleted).then_some(doc.body);
    pb::Document {
        collection: doc.collection,
        id: doc.id,
        version: doc.version.0,
        body,
        deleted: doc.deleted,
        seq: doc.seq.0,
        updated_at: Some(timestamp(doc.updated_at)),
        updated_by: doc.updated_by,
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A domain outcome on the wire.
pub fn outcome(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Applied => pb::Outcome::Applied,
        Outcome::Merged => pb::Outcome::Merged,
        Outcome::Resolved => pb::Outcome::Resolved,
        Outcome::Conflict => pb::Outcome::Conflict,
        Outcome::Duplicate => pb::Outcome::Duplicate,
        Outcome::NotApplied => pb::Outcome::NotApplied,
    }
}

/// A wire strategy; `None` for UNSPECIFIED (use the collection default).
pub fn strategy(s: pb::ConflictStrategy) -> Option<Strategy> {
    match s {
        pb::ConflictStrategy::Unspecified => None,
        pb::ConflictStrategy::Reject => Some(Strategy::Reject),
        pb::ConflictStrategy::ServerWins => Some(Strategy::ServerWins),
        pb::ConflictStrategy::ClientWins => Some(Strategy::ClientWins),
    }
}

/// Splits documents (in seq order) into runs whose encoded size fits in
/// `budget` bytes. A document bigger than the budget still goes alone (the
/// configuration guarantees it fits a message). Each run ends with the seq of
/// its last document.
pub fn fit(docs: impl IntoIterator<Item = pb::Document>, budget: usize) -> Vec<Vec<pb::Document>> {
    let mut runs: Vec<Vec<pb::Document>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for doc in docs {
        let len = doc.encoded_len() + 8; // field tag and length prefix
        if !current.is_empty() && size + len > budget {
            runs.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(doc);
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_cuts_by_bytes_but_never_drops_a_document() {
        let doc = |seq| pb::Document {
            id: "x".repeat(100),
            seq,
            ..Default::default()
        };
        let runs = fit((1..=10).map(doc), 250);
        assert_eq!(runs.iter().map(Vec::len).sum::<usize>(), 10);
        assert!(runs.iter().all(|r| r.len() == 2));
        assert_eq!(fit([doc(1)], 10).len(), 1);
    }
}
