//! Bytes as what the store reads back from sled: a log record, a client's
//! mutation-id state, the epoch history, a stored body or a key. The first
//! byte picks which, and whether the rest is the stored bytes themselves
//! or a recipe for well-formed ones (made with the store's own encoders)
//! that are then damaged a little, as by a bad disk.
//!
//! Holds: each decoder answers `Ok` or `Err`, never panics; every error is
//! a corrupt-store error, which a client sees as INTERNAL; whatever decodes
//! is read back the same once encoded again (a corrupt store never gives a
//! wrong answer by way of a lossy round trip).

#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use deltasync::{
    error::Error,
    store::{
        StoreError,
        clients::ClientState,
        codec::{self, Record},
        index,
        keys::{self, DocKey},
        model::{Document, EncodedBody, Seq, Version},
        replica::{EpochStart, Epochs},
    },
};
use deltasync_fuzz::{corrupt, pb_struct};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};

/// What the bytes are read as.
#[derive(Clone, Copy)]
enum Kind {
    Record,
    ClientState,
    Epochs,
    Body,
    Key,
}

const KINDS: [Kind; 5] = [
    Kind::Record,
    Kind::ClientState,
    Kind::Epochs,
    Kind::Body,
    Kind::Key,
];

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(how) % KINDS.len()];
    let bytes = if how >= 128 {
        let mut u = Unstructured::new(rest);
        match made(kind, &mut u).and_then(|bytes| corrupt(bytes, &mut u)) {
            Ok(bytes) => bytes,
            Err(_) => return,
        }
    } else {
        rest.to_vec()
    };
    match kind {
        Kind::Record => record(&bytes),
        Kind::ClientState => client_state(&bytes),
        Kind::Epochs => epochs(&bytes),
        Kind::Body => body(&bytes),
        Kind::Key => key(&bytes),
    }
});

/// Well-formed stored bytes of `kind`, as the store writes them.
fn made(kind: Kind, u: &mut Unstructured) -> Result<Vec<u8>> {
    Ok(match kind {
        Kind::Record => {
            let deleted = u.arbitrary()?;
            let doc = Document {
                collection: u.arbitrary()?,
                id: u.arbitrary()?,
                version: Version(u.arbitrary()?),
                body: if deleted {
                    EncodedBody::default()
                } else {
                    EncodedBody::from_struct(&pb_struct(u, 3)?)
                },
                deleted,
                seq: Seq(0),
                updated_at: UNIX_EPOCH + Duration::from_micros(u.arbitrary()?),
                updated_by: u.arbitrary()?,
            };
            let Ok(key) = DocKey::new(&doc.collection, &doc.id) else {
                return Ok(Vec::new());
            };
            let mut bytes = codec::encode(&doc, &key, Seq(u.arbitrary()?)).unwrap_or_default();
            if u.arbitrary()? {
                codec::mark_commit_end(&mut bytes);
            }
            bytes
        }
        Kind::ClientState => {
            let mut state = ClientState::default();
            for _ in 0..u.int_in_range(0..=16)? {
                let id = u.int_in_range(1..=40)?;
                match u.int_in_range(0..=2)? {
                    0 => state.processed(id, false),
                    1 => state.processed(id, true),
                    _ => state.rejected_alone(id),
                }
            }
            state.at = u.arbitrary()?;
            state.encode()
        }
        Kind::Epochs => {
            let mut starts = vec![EpochStart {
                epoch: 1,
                first_seq: Seq(1),
                id: 0,
            }];
            for _ in 0..u.int_in_range(0..=3)? {
                let last = starts[starts.len() - 1];
                starts.push(EpochStart {
                    epoch: last.epoch.saturating_add(u.int_in_range(1..=3)?),
                    first_seq: Seq(last.first_seq.0.saturating_add(u.int_in_range(0..=9)?)),
                    id: u.arbitrary()?,
                });
            }
            Epochs::from_starts(starts).map_or_else(|_| Vec::new(), |e| e.encode())
        }
        Kind::Body => EncodedBody::from_struct(&pb_struct(u, 3)?)
            .as_bytes()
            .to_vec(),
        Kind::Key => {
            let key = DocKey::new(&u.arbitrary::<String>()?, &u.arbitrary::<String>()?);
            let mut bytes = key.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
            bytes.extend_from_slice(&u.arbitrary::<u64>()?.to_be_bytes());
            bytes
        }
    })
}

/// A store error met reading stored bytes: the store is corrupt, and the
/// client is told INTERNAL.
fn corrupt_store(e: StoreError) {
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    let status = tonic::Status::from(Error::from(e));
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
}

fn record(data: &[u8]) {
    let record = match Record::parse(data) {
        Ok(record) => record,
        Err(e) => return corrupt_store(e),
    };
    let _ = record.updated_at();
    let doc = match record.to_document(Seq(7)) {
        Ok(doc) => doc,
        Err(e) => return corrupt_store(e),
    };
    let _ = doc.body.to_json("body");
    // Encoded again, it reads back as the same document.
    let key = DocKey::from_stored(record.key());
    let again = codec::encode(&doc, &key, record.prev).expect("what was read fits");
    let reread = codec::decode(Seq(7), &again).expect("what was written reads back");
    assert_eq!(reread, doc);
    assert_eq!(
        Record::parse(&again).map(|r| r.prev).ok(),
        Some(record.prev)
    );
}

fn client_state(data: &[u8]) {
    match ClientState::decode(data) {
        Ok(state) => {
            let again = ClientState::decode(&state.encode()).expect("encoded state decodes");
            assert_eq!(again, state);
        }
        Err(e) => corrupt_store(e),
    }
}

fn epochs(data: &[u8]) {
    match Epochs::decode(data) {
        Ok(epochs) => {
            assert_eq!(epochs.encode(), data);
            let _ = epochs.epoch_of(Seq(u64::MAX));
        }
        Err(e) => corrupt_store(e),
    }
}

/// A stored body that decodes reads back the same once stored again in
/// the canonical encoding.
fn body(data: &[u8]) {
    let stored = EncodedBody::from_stored(data);
    let _ = format!("{stored:?}");
    if let Ok(json) = stored.to_json("body") {
        let canonical = EncodedBody::encode(&json);
        assert_eq!(canonical.to_json("body").as_ref(), Ok(&json));
    }
}

/// A document key, a layout-1 delta-log key (the key and a version) and a
/// log key.
fn key(data: &[u8]) {
    if let Some((collection, id)) = keys::parse_doc_key(data) {
        let again = DocKey::new(collection, id).expect("what was read fits");
        assert_eq!(again.as_bytes(), data);
        assert_eq!(keys::collection_of(data), Some(collection.as_bytes()));
    }
    if let Some((doc, version)) = keys::split_v1_history_key(data) {
        assert_eq!([doc, &version.0.to_be_bytes()].concat(), data);
    }
    if let Err(e) = index::parse_seq(data) {
        corrupt_store(e);
    }
}
