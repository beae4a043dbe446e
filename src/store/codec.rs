//! Encoding of the records kept in [`keys::DOCS`](super::keys::DOCS) and
//! [`keys::HISTORY`](super::keys::HISTORY).
//!
//! Layout: `[format: u8][deleted: u8][version: u64][seq: u64][updated_at µs:
//! u64][updated_by len: u16][updated_by][body]`, numbers big-endian.
//! Collection and id are in the key, so they are not repeated here. The body
//! is an [`EncodedBody`] (format 2), served without re-encoding; records of
//! format 1 hold it as JSON and are still read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    error::StoreError,
    keys::DocKey,
    model::{Body, Document, EncodedBody, Seq, Version},
};

/// The format written.
const FORMAT: u8 = 2;
/// The first format: the body as JSON.
const FORMAT_JSON: u8 = 1;
const HEADER: usize = 1 + 1 + 8 + 8 + 8 + 2;

/// Encodes a document state. Fails only if `updated_by` is longer than the
/// format holds (validation keeps it far shorter).
pub fn encode(doc: &Document) -> Result<Vec<u8>, StoreError> {
    let by_len = u16::try_from(doc.updated_by.len()).map_err(|_| StoreError::KeyTooLong)?;
    let micros = doc
        .updated_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let mut out = Vec::with_capacity(HEADER + doc.updated_by.len() + doc.body.len());
    out.push(FORMAT);
    out.push(u8::from(doc.deleted));
    out.extend_from_slice(&doc.version.0.to_be_bytes());
    out.extend_from_slice(&doc.seq.0.to_be_bytes());
    out.extend_from_slice(&micros.to_be_bytes());
    out.extend_from_slice(&by_len.to_be_bytes());
    out.extend_from_slice(doc.updated_by.as_bytes());
    if !doc.deleted {
        out.extend_from_slice(doc.body.as_bytes());
    }
    Ok(out)
}

/// Decodes a record stored under `key` in `tree`.
pub fn decode(tree: &'static str, key: &DocKey, bytes: &[u8]) -> Result<Document, StoreError> {
    let (collection, id) = key
        .parts()
        .ok_or_else(|| StoreError::corrupt(tree, "bad document key"))?;
    let header = decode_header(tree, bytes)?;
    let rest = &bytes[HEADER..];
    let by_len = usize::from(header.by_len);
    let (by, body) = rest
        .split_at_checked(by_len)
        .ok_or_else(|| StoreError::corrupt(tree, "short record"))?;
    let updated_by = std::str::from_utf8(by)
        .map_err(|_| StoreError::corrupt(tree, "updated_by is not UTF-8"))?;
    let body = if header.deleted || body.is_empty() {
        EncodedBody::default()
    } else if header.format == FORMAT_JSON {
        let json: Body =
            serde_json::from_slice(body).map_err(|e| StoreError::corrupt(tree, e.to_string()))?;
        EncodedBody::encode(&json)
    } else {
        EncodedBody::from_stored(body)
    };
    Ok(Document {
        collection: collection.to_owned(),
        id: id.to_owned(),
        version: header.version,
        body,
        deleted: header.deleted,
        seq: header.seq,
        updated_at: UNIX_EPOCH + Duration::from_micros(header.micros),
        updated_by: updated_by.to_owned(),
    })
}

/// The fixed-size part of a record, readable without parsing the body.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Record format.
    format: u8,
    /// Tombstone flag.
    pub deleted: bool,
    /// Version of the state.
    pub version: Version,
    /// Seq of the change.
    pub seq: Seq,
    /// Time of the change, µs since the Unix epoch.
    pub micros: u64,
    /// Length of `updated_by`, which follows the header.
    by_len: u16,
}

impl Header {
    /// Time of the change.
    pub fn updated_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.micros)
    }
}

/// Reads the header of a record.
pub fn decode_header(tree: &'static str, bytes: &[u8]) -> Result<Header, StoreError> {
    let header: &[u8; HEADER] = bytes
        .first_chunk()
        .ok_or_else(|| StoreError::corrupt(tree, "short record"))?;
    if header[0] != FORMAT && header[0] != FORMAT_JSON {
        return Err(StoreError::corrupt(
            tree,
            format!("unknown record format {}", header[0]),
        ));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_be_bytes(b)
    };
    Ok(Header {
        format: header[0],
        deleted: header[1] != 0,
        version: Version(u64_at(2)),
        seq: Seq(u64_at(10)),
        micros: u64_at(18),
        by_len: u16::from_be_bytes([header[26], header[27]]),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trip() {
        let key = DocKey::new("todos", "1").unwrap();
        let doc = Document {
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
        };
        let bytes = encode(&doc).unwrap();
        assert_eq!(decode("docs", &key, &bytes).unwrap(), doc);
        let tomb = Document {
            deleted: true,
            body: EncodedBody::default(),
            ..doc
        };
        assert_eq!(decode("docs", &key, &encode(&tomb).unwrap()).unwrap(), tomb);
    }

    #[test]
    fn format_1_records_with_json_bodies_are_still_read() {
        let key = DocKey::new("todos", "1").unwrap();
        let mut record = vec![FORMAT_JSON, 0];
        for n in [4u64, 11, 1_700_000_000_000_000] {
            record.extend_from_slice(&n.to_be_bytes());
        }
        record.extend_from_slice(&1u16.to_be_bytes());
        record.extend_from_slice(b"c");
        record.extend_from_slice(br#"{"a":[1,"x"]}"#);
        let doc = decode("docs", &key, &record).unwrap();
        assert_eq!((doc.version, doc.seq), (Version(4), Seq(11)));
        assert_eq!(doc.updated_by, "c");
        assert_eq!(
            doc.body,
            EncodedBody::encode(json!({"a": [1, "x"]}).as_object().unwrap())
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let key = DocKey::new("todos", "1").unwrap();
        for bytes in [
            &b""[..],
            b"\x01",
            b"\x03aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            &[1u8; 40],
        ] {
            assert!(decode("docs", &key, bytes).is_err());
        }
    }
}
