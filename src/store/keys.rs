//! The only place raw key bytes are built and parsed.
//!
//! Numbers are big-endian so that sled's byte order is numeric order. A
//! document key is self-delimiting (`[coll len: u8][coll][id len: u16][id]`),
//! so a delta-log key (`doc key ++ version`) never shares a prefix with
//! another document's.

use super::{
    error::StoreError,
    model::{Seq, Version},
};

/// Tree of current documents: doc key → document record.
pub const DOCS: &str = "docs";
/// The change index: seq → doc key, one entry per document (its latest change).
pub const CHANGES: &str = "changes";
/// The delta log: doc key ++ version → record of the document at that
/// version (written when the version is superseded).
pub const HISTORY: &str = "history";
/// Per-client idempotency: client id → highest applied mutation id.
pub const CLIENTS: &str = "clients";
/// Store metadata: the `META_*` keys.
pub const META: &str = "meta";

/// Meta key: the store's UUID, made when the store is created.
pub const META_STORE_ID: &[u8] = b"store_id";
/// Meta key: the highest committed seq.
pub const META_HEAD: &[u8] = b"head_seq";
/// Meta key: the highest seq any purged tombstone had. Checkpoints below it
/// (other than 0) can no longer be served without a silent gap.
pub const META_PURGE_HORIZON: &[u8] = b"purge_horizon";
/// Meta key: the on-disk layout version.
pub const META_SCHEMA: &[u8] = b"schema_version";

/// A document's key in [`DOCS`], [`HISTORY`] and the values of [`CHANGES`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DocKey(Vec<u8>);

impl DocKey {
    /// Builds the key; fails only for names longer than the key format holds
    /// (validation keeps them far shorter).
    pub fn new(collection: &str, id: &str) -> Result<Self, StoreError> {
        let coll_len = u8::try_from(collection.len()).map_err(|_| StoreError::KeyTooLong)?;
        let id_len = u16::try_from(id.len()).map_err(|_| StoreError::KeyTooLong)?;
        let mut key = Vec::with_capacity(3 + collection.len() + id.len());
        key.push(coll_len);
        key.extend_from_slice(collection.as_bytes());
        key.extend_from_slice(&id_len.to_be_bytes());
        key.extend_from_slice(id.as_bytes());
        Ok(Self(key))
    }

    /// Wraps bytes read from the store.
    pub fn from_stored(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The collection and id, or `None` if the bytes are not a document key.
    pub fn parts(&self) -> Option<(&str, &str)> {
        parse_doc_key(&self.0)
    }

    /// The delta-log key of this document at `version`.
    pub fn history(&self, version: Version) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.0.len() + 8);
        key.extend_from_slice(&self.0);
        key.extend_from_slice(&version.0.to_be_bytes());
        key
    }
}

/// Splits a document key into collection and id.
pub fn parse_doc_key(bytes: &[u8]) -> Option<(&str, &str)> {
    let (&coll_len, rest) = bytes.split_first()?;
    let (collection, rest) = rest.split_at_checked(usize::from(coll_len))?;
    let (id_len, id) = rest.split_first_chunk::<2>()?;
    if id.len() != usize::from(u16::from_be_bytes(*id_len)) {
        return None;
    }
    Some((
        std::str::from_utf8(collection).ok()?,
        std::str::from_utf8(id).ok()?,
    ))
}

/// The prefix shared by every delta-log key of a document.
pub fn history_prefix(key: &DocKey) -> &[u8] {
    key.as_bytes()
}

/// Splits a delta-log key into the document key and the version.
pub fn split_history_key(bytes: &[u8]) -> Option<(&[u8], Version)> {
    let (doc, version) = bytes.split_last_chunk::<8>()?;
    parse_doc_key(doc)?;
    Some((doc, Version(u64::from_be_bytes(*version))))
}

/// The collection of a document key, without decoding the id.
pub fn collection_of(bytes: &[u8]) -> Option<&[u8]> {
    let (&coll_len, rest) = bytes.split_first()?;
    rest.get(..usize::from(coll_len))
}

/// The [`CHANGES`] key of a seq.
pub fn seq_key(seq: Seq) -> [u8; 8] {
    seq.0.to_be_bytes()
}

/// A big-endian u64, as stored in [`CHANGES`] keys, [`CLIENTS`] and [`META`].
pub fn parse_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_key_round_trips_and_is_prefix_free() {
        let a = DocKey::new("todos", "a").unwrap();
        let ab = DocKey::new("todos", "ab").unwrap();
        assert_eq!(a.parts(), Some(("todos", "a")));
        assert_eq!(collection_of(a.as_bytes()), Some(&b"todos"[..]));
        assert!(
            !ab.history(Version(1))
                .starts_with(&a.history(Version(1))[..a.as_bytes().len() + 1])
        );
        assert!(parse_doc_key(b"\x05todo").is_none());
    }

    #[test]
    fn history_keys_split_back() {
        let key = DocKey::new("c", "id").unwrap();
        let h = key.history(Version(7));
        assert_eq!(split_history_key(&h), Some((key.as_bytes(), Version(7))));
        assert!(h.starts_with(history_prefix(&key)));
        assert!(split_history_key(b"short").is_none());
    }

    #[test]
    fn seq_keys_sort_numerically() {
        assert!(seq_key(Seq(255)) < seq_key(Seq(256)));
        assert_eq!(parse_u64(&seq_key(Seq(42))), Some(42));
    }

    #[test]
    fn oversized_names_are_refused_not_truncated() {
        assert!(matches!(
            DocKey::new(&"c".repeat(256), "x"),
            Err(StoreError::KeyTooLong)
        ));
    }
}
