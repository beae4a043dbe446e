//! Encoding of the records kept in the log (`keys::LOG`),
//! one per change, keyed by its seq.
//!
//! Layout: `[format: u8][flags: u8][version: u64][prev seq: u64][updated_at
//! µs: u64][updated_by len: u16][key len: u16][updated_by][doc key][body]`,
//! numbers big-endian. The seq is the record's key, so it is not repeated.
//! `prev` is the seq of the document's previous version (0 for none): the
//! delta log is the chain of a document's records. The body is an
//! [`EncodedBody`], served without re-encoding. Layout 1's records (formats
//! 1 and 2) are read only by `migrate`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    error::StoreError,
    keys::{self, DocKey},
    model::{Document, EncodedBody, Seq, Version},
};

/// The format written: 4 adds the commit-end flag.
const FORMAT: u8 = 4;
/// Format 3: the same, with `flags` holding the tombstone flag alone and
/// no commit boundaries (every record reads as ending its commit).
const FORMAT_3: u8 = 3;
/// `flags`: a tombstone.
const DELETED: u8 = 1;
/// `flags`: the last record of its commit, so a replica catching up from
/// the log applies whole commits.
const COMMIT_END: u8 = 2;
const HEADER: usize = 1 + 1 + 8 + 8 + 8 + 2 + 2;

/// Encodes a document state whose previous version is at `prev`. Fails only
/// if `updated_by` is longer than the format holds (validation keeps it far
/// shorter).
pub fn encode(doc: &Document, key: &DocKey, prev: Seq) -> Result<Vec<u8>, StoreError> {
    let by_len = u16::try_from(doc.updated_by.len()).map_err(|_| StoreError::KeyTooLong)?;
    let key_len = u16::try_from(key.as_bytes().len()).map_err(|_| StoreError::KeyTooLong)?;
    let micros = micros_of(doc.updated_at);
    let body = if doc.deleted {
        &[][..]
    } else {
        doc.body.as_bytes()
    };
    let mut out =
        Vec::with_capacity(HEADER + doc.updated_by.len() + key.as_bytes().len() + body.len());
    out.push(FORMAT);
    out.push(if doc.deleted { DELETED } else { 0 });
    out.extend_from_slice(&doc.version.0.to_be_bytes());
    out.extend_from_slice(&prev.0.to_be_bytes());
    out.extend_from_slice(&micros.to_be_bytes());
    out.extend_from_slice(&by_len.to_be_bytes());
    out.extend_from_slice(&key_len.to_be_bytes());
    out.extend_from_slice(doc.updated_by.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Marks an encoded record as the last of its commit.
pub fn mark_commit_end(record: &mut [u8]) {
    if let Some(flags) = record.get_mut(1) {
        *flags |= COMMIT_END;
    }
}

/// A time as stored: µs since the Unix epoch (0 before it).
fn micros_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// `time` at the precision records keep, so a time acknowledged to a
/// client is the time every later read returns.
pub fn stored_time(time: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros_of(time))
}

/// A parsed view of a stored record; nothing is copied until
/// [`Record::to_document`].
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Tombstone flag.
    pub deleted: bool,
    /// Whether it is the last record of its commit (always, for format 3).
    pub commit_end: bool,
    /// Version of the state.
    pub version: Version,
    /// Seq of the document's previous version (0 for none).
    pub prev: Seq,
    /// Time of the change, µs since the Unix epoch.
    micros: u64,
    /// `client_id` of the change.
    updated_by: &'a [u8],
    /// The document key.
    key: &'a [u8],
    /// The encoded body (empty for a tombstone).
    body: &'a [u8],
}

impl<'a> Record<'a> {
    /// Parses a record; a short or unknown record is corrupt.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, StoreError> {
        let corrupt = |detail: &str| StoreError::corrupt(keys::LOG, detail);
        let (header, rest) = bytes
            .split_first_chunk::<HEADER>()
            .ok_or_else(|| corrupt("short record"))?;
        if header[0] != FORMAT && header[0] != FORMAT_3 {
            return Err(corrupt(&format!("unknown record format {}", header[0])));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let by_len = usize::from(u16::from_be_bytes([header[26], header[27]]));
        let key_len = usize::from(u16::from_be_bytes([header[28], header[29]]));
        let (updated_by, rest) = rest
            .split_at_checked(by_len)
            .ok_or_else(|| corrupt("short record"))?;
        let (key, body) = rest
            .split_at_checked(key_len)
            .ok_or_else(|| corrupt("short record"))?;
        Ok(Self {
            deleted: header[1] & DELETED != 0,
            commit_end: header[0] == FORMAT_3 || header[1] & COMMIT_END != 0,
            version: Version(u64_at(2)),
            prev: Seq(u64_at(10)),
            micros: u64_at(18),
            updated_by,
            key,
            body,
        })
    }

    /// The document key, as stored.
    pub fn key(&self) -> &'a [u8] {
        self.key
    }

    /// Time of the change.
    pub fn updated_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.micros)
    }

    /// The document this record holds, as the change at `seq`.
    pub fn to_document(&self, seq: Seq) -> Result<Document, StoreError> {
        let (collection, id) = keys::parse_doc_key(self.key)
            .ok_or_else(|| StoreError::corrupt(keys::LOG, "bad document key"))?;
        let updated_by = std::str::from_utf8(self.updated_by)
            .map_err(|_| StoreError::corrupt(keys::LOG, "updated_by is not UTF-8"))?;
        Ok(Document {
            collection: collection.to_owned(),
            id: id.to_owned(),
            version: self.version,
            body: if self.deleted {
                EncodedBody::default()
            } else {
                EncodedBody::from_stored(self.body)
            },
            deleted: self.deleted,
            seq,
            updated_at: self.updated_at(),
            updated_by: updated_by.to_owned(),
        })
    }
}

/// Decodes the record stored at `seq`.
pub fn decode(seq: Seq, bytes: &[u8]) -> Result<Document, StoreError> {
    Record::parse(bytes)?.to_document(seq)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc() -> Document {
        Document {
            collection: "todos".into(),
            id: "1".into(),
            version: Version(3),
            body: EncodedBody::encode(
                json!({"title": "t", "n": [1, 2.5, null]})
                    .as_object()
                    .unwrap(),
            ),
            deleted: false,
            seq: Seq(9),
            updated_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            updated_by: "client-a".into(),
        }
    }

    #[test]
    fn round_trip() {
        let key = DocKey::new("todos", "1").unwrap();
        let doc = doc();
        let bytes = encode(&doc, &key, Seq(4)).unwrap();
        assert_eq!(decode(Seq(9), &bytes).unwrap(), doc);
        let record = Record::parse(&bytes).unwrap();
        assert_eq!((record.prev, record.key()), (Seq(4), key.as_bytes()));
        let tomb = Document {
            deleted: true,
            body: EncodedBody::default(),
            ..doc
        };
        let bytes = encode(&tomb, &key, Seq(0)).unwrap();
        assert_eq!(decode(Seq(9), &bytes).unwrap(), tomb);
    }

    /// Rule: a record says whether it ends its commit; one written before
    /// commit boundaries were kept (format 3) reads as ending its own.
    #[test]
    fn commit_ends_are_kept_and_old_records_end_their_own() {
        let key = DocKey::new("todos", "1").unwrap();
        let mut bytes = encode(&doc(), &key, Seq(0)).unwrap();
        assert!(!Record::parse(&bytes).unwrap().commit_end);
        mark_commit_end(&mut bytes);
        let record = Record::parse(&bytes).unwrap();
        assert!(record.commit_end && !record.deleted);
        assert_eq!(decode(Seq(9), &bytes).unwrap(), doc());
        let mut old = encode(&doc(), &key, Seq(0)).unwrap();
        old[0] = FORMAT_3;
        assert!(Record::parse(&old).unwrap().commit_end);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let key = DocKey::new("todos", "1").unwrap();
        let good = encode(&doc(), &key, Seq(0)).unwrap();
        let mut long_key = good.clone();
        long_key[29] = 200;
        for bytes in [
            &b""[..],
            b"\x03",
            b"\x02aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            &[3u8; 40],
            &good[..HEADER + 3],
            &long_key,
        ] {
            assert!(decode(Seq(1), bytes).is_err());
        }
    }
}
