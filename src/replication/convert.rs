//! Conversions between the replication stream's messages and the store's
//! types. What comes from the wire is checked here (a malformed message is
//! an error, never a panic); a commit's place in the sequence is checked by
//! the store when it applies it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    pb,
    store::{
        clients::{ClientState, ExceptionRange},
        model::{Document, EncodedBody, Seq, Version},
        replica::{CommitKind, EpochStart, Epochs, ReplicatedCommit},
    },
};

/// A record for the stream.
pub fn record(doc: &Document) -> pb::ReplicatedRecord {
    pb::ReplicatedRecord {
        seq: doc.seq.0,
        collection: doc.collection.clone(),
        id: doc.id.clone(),
        version: doc.version.0,
        deleted: doc.deleted,
        updated_at_micros: micros(doc.updated_at),
        updated_by: doc.updated_by.clone(),
        body: doc.body.to_bytes(),
    }
}

/// A client state for the stream.
pub fn client(client_id: &str, state: &ClientState) -> pb::ReplicatedClient {
    pb::ReplicatedClient {
        client_id: client_id.to_owned(),
        last_mutation_id: state.last,
        floor: state.floor,
        seen_micros: state.seen_micros,
        exceptions: state
            .exception_ranges()
            .map(|r| pb::MutationIdRange {
                first: r.first,
                last: r.last,
                kind: if r.rejected {
                    pb::MutationIdException::Rejected
                } else {
                    pb::MutationIdException::Unprocessed
                }
                .into(),
            })
            .collect(),
    }
}

/// The epoch history for the stream.
pub fn epochs(epochs: &Epochs) -> Vec<pb::EpochStart> {
    epochs
        .starts()
        .iter()
        .map(|e| pb::EpochStart {
            epoch: e.epoch,
            first_seq: e.first_seq.0,
            id: e.id,
        })
        .collect()
}

/// An epoch history from the stream.
pub fn epochs_from(starts: &[pb::EpochStart]) -> Result<Epochs, String> {
    Epochs::from_starts(
        starts
            .iter()
            .map(|e| EpochStart {
                epoch: e.epoch,
                first_seq: Seq(e.first_seq),
                id: e.id,
            })
            .collect(),
    )
    .map_err(str::to_owned)
}

/// A client state from the stream.
pub fn client_from(c: pb::ReplicatedClient) -> Result<(String, ClientState), String> {
    let ranges = c
        .exceptions
        .iter()
        .map(|r| {
            let rejected = match pb::MutationIdException::try_from(r.kind) {
                Ok(pb::MutationIdException::Rejected) => true,
                Ok(pb::MutationIdException::Unprocessed) => false,
                _ => return Err(format!("client {}: unknown exception kind", c.client_id)),
            };
            Ok(ExceptionRange {
                first: r.first,
                last: r.last,
                rejected,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let state = ClientState::from_parts(c.last_mutation_id, c.floor, c.seen_micros, 0, ranges)
        .map_err(|e| format!("client {}: {e}", c.client_id))?;
    Ok((c.client_id, state))
}

/// A commit from the stream.
pub fn commit_from(c: pb::ReplicatedCommit) -> Result<ReplicatedCommit, String> {
    let records = c
        .records
        .into_iter()
        .map(|r| Document {
            collection: r.collection,
            id: r.id,
            version: Version(r.version),
            body: if r.deleted {
                EncodedBody::default()
            } else {
                EncodedBody::from_bytes(r.body)
            },
            deleted: r.deleted,
            seq: Seq(r.seq),
            updated_at: UNIX_EPOCH + Duration::from_micros(r.updated_at_micros),
            updated_by: r.updated_by,
        })
        .collect();
    let clients = c
        .clients
        .into_iter()
        .map(client_from)
        .collect::<Result<_, _>>()?;
    Ok(ReplicatedCommit {
        prev_head: Seq(c.prev_head),
        head: Seq(c.head),
        epoch: c.epoch,
        records,
        clients,
        kind: if c.from_log {
            CommitKind::FromLog
        } else {
            CommitKind::Live
        },
    })
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
