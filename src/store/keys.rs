//! The only place raw key bytes are built and parsed.
//!
//! Numbers are big-endian so that sled's byte order is numeric order. A
//! document key is self-delimiting (`[coll len: u8][coll][id len: u16][id]`),
//! so a delta-log key (`doc key ++ version`) never shares a prefix with
//! another document's.
//!
//! Layout 1 (read only by `migrate`) kept current documents, a change index
//! and the delta log in trees of their own; their names and key shapes are
//! at the end.

use super::{
    error::StoreError,
    model::{Seq, Version},
};

/// The log: seq → record of the change (see `codec`). A record stays as
/// the delta log's entry of its version once a newer one supersedes it, until
/// retention prunes it.
pub const LOG: &str = "log";
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
/// Meta key: the epoch history (see `replica::Epochs`).
pub const META_EPOCHS: &[u8] = b"epochs";
/// Meta key: the highest epoch this store has seen. Above the history's
/// newest, this node was deposed: it takes no writes as a primary.
pub const META_SEEN_EPOCH: &[u8] = b"seen_epoch";
/// Meta key: on a replica, how complete its client states are (see
/// `replica::ClientsProgress`); absent on a store that never followed one.
pub const META_CLIENTS_PROGRESS: &[u8] = b"clients_progress";
/// Meta key: the last group commit's client states and progress, written
/// just before its head and replayed at open (see `redo`); absent after a
/// clean stop.
pub const META_REDO: &[u8] = b"redo";
/// Meta key: the on-disk layout version.
pub const META_SCHEMA: &[u8] = b"schema_version";

/// A document's key: in its log records and the in-memory index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DocKey(Box<[u8]>);

/// Lets the index be searched by the key bytes inside a record.
impl std::borrow::Borrow<[u8]> for DocKey {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

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
        Ok(Self(key.into()))
    }

    /// Wraps bytes read from the store.
    pub fn from_stored(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The collection and id, or `None` if the bytes are not a document key.
    pub fn parts(&self) -> Option<(&str, &str)> {
        parse_doc_key(&self.0)
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

/// The collection of a document key, without decoding the id.
pub fn collection_of(bytes: &[u8]) -> Option<&[u8]> {
    let (&coll_len, rest) = bytes.split_first()?;
    rest.get(..usize::from(coll_len))
}

/// The [`LOG`] key of a seq.
pub fn seq_key(seq: Seq) -> [u8; 8] {
    seq.0.to_be_bytes()
}

/// A big-endian u64, as stored in [`LOG`] keys, [`CLIENTS`] and [`META`].
pub fn parse_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Layout 1's tree of current documents: doc key → record.
pub const V1_DOCS: &str = "docs";
/// Layout 1's change index: seq → doc key.
pub const V1_CHANGES: &str = "changes";
/// Layout 1's delta log: doc key ++ version → record.
pub const V1_HISTORY: &str = "history";

/// Splits a layout-1 delta-log key into the document key and the version.
pub fn split_v1_history_key(bytes: &[u8]) -> Option<(&[u8], Version)> {
    let (doc, version) = bytes.split_last_chunk::<8>()?;
    parse_doc_key(doc)?;
    Some((doc, Version(u64::from_be_bytes(*version))))
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
        assert!(!ab.as_bytes().starts_with(a.as_bytes()));
        assert!(parse_doc_key(b"\x05todo").is_none());
    }

    #[test]
    fn v1_history_keys_split_back() {
        let key = DocKey::new("c", "id").unwrap();
        let h = [key.as_bytes(), &7u64.to_be_bytes()].concat();
        assert_eq!(split_v1_history_key(&h), Some((key.as_bytes(), Version(7))));
        assert!(split_v1_history_key(b"short").is_none());
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
