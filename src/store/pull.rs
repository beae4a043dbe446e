//! Reads over the log: Pull pages and subscriber catch-up are one scan of
//! it, keeping the records that are still their document's current state.

use std::{collections::HashSet, sync::Arc};

use super::{
    Trees, codec,
    codec::Record,
    error::StoreError,
    index::{self, Index},
    keys::{self, DocKey},
    model::{Document, PullPage, Seq},
};

/// Which collections a reader wants (`None`: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectionFilter(Option<Arc<Collections>>);

/// Collections by name and by prefix.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collections {
    /// These names.
    exact: HashSet<Vec<u8>>,
    /// Every name starting with one of these.
    prefixes: Vec<Vec<u8>>,
}

impl CollectionFilter {
    /// A filter for these collections (empty = all).
    pub fn new<I: IntoIterator<Item = String>>(collections: I) -> Self {
        let exact: HashSet<Vec<u8>> = collections.into_iter().map(String::into_bytes).collect();
        Self((!exact.is_empty()).then(|| {
            Arc::new(Collections {
                exact,
                prefixes: Vec::new(),
            })
        }))
    }

    /// Exactly these names and every name with one of these prefixes
    /// (both empty: nothing).
    pub fn patterns(
        exact: impl IntoIterator<Item = String>,
        prefixes: impl IntoIterator<Item = String>,
    ) -> Self {
        Self(Some(Arc::new(Collections {
            exact: exact.into_iter().map(String::into_bytes).collect(),
            prefixes: prefixes.into_iter().map(String::into_bytes).collect(),
        })))
    }

    /// Whether a document of `collection` passes.
    pub fn matches(&self, collection: &[u8]) -> bool {
        self.0.as_ref().is_none_or(|c| {
            c.exact.contains(collection) || c.prefixes.iter().any(|p| collection.starts_with(p))
        })
    }
}

/// Most log records one page examines, matching or not: a filter that
/// matches little never turns one read into a scan of the whole log. The
/// page then ends early with an advanced checkpoint and `has_more`.
pub const MAX_EXAMINED: usize = 20_000;

/// How much one page may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    /// Most documents.
    pub docs: usize,
    /// Most bytes, estimated as sent (one document always fits, so a page
    /// is never empty for want of room).
    pub bytes: usize,
}

/// Reads documents changed in `(since, upto]`, in seq order, within `limit`,
/// each at its latest state, examining at most [`MAX_EXAMINED`] records.
///
/// The checkpoint is the seq of the last change examined; when every change
/// up to `upto` has been examined it is `upto` itself, so filtered readers and
/// readers of documents that changed again meanwhile still move forward. A
/// record that is no longer its document's current state (superseded, even
/// by a change past `upto`) is skipped here: the newer one comes later.
pub fn read_changes(
    trees: &Trees,
    index: &Index,
    since: Seq,
    upto: Seq,
    filter: &CollectionFilter,
    limit: PageLimit,
) -> Result<PullPage, StoreError> {
    let mut documents = Vec::with_capacity(limit.docs.min(1024));
    let mut bytes = 0;
    let mut checkpoint = since;
    if since >= upto {
        return Ok(PullPage {
            documents,
            checkpoint: since.max(upto),
            has_more: false,
            horizon: Seq(0),
        });
    }
    let range = keys::seq_key(Seq(since.0 + 1))..=keys::seq_key(upto);
    for (examined, entry) in trees.log.range(range).enumerate() {
        let (seq, value) = entry?;
        let seq = index::parse_seq(&seq)?;
        if documents.len() >= limit.docs || examined >= MAX_EXAMINED {
            return Ok(PullPage {
                documents,
                checkpoint,
                has_more: true,
                horizon: Seq(0),
            });
        }
        let examined = checkpoint;
        checkpoint = seq;
        let record = Record::parse(&value)?;
        let collection = keys::collection_of(record.key())
            .ok_or_else(|| StoreError::corrupt(keys::LOG, "bad document key"))?;
        if !filter.matches(collection) || !index.is_current(seq) {
            continue;
        }
        let doc = record.to_document(seq)?;
        let size = wire_size(&doc);
        if !documents.is_empty() && bytes + size > limit.bytes {
            // This one starts the next page.
            return Ok(PullPage {
                documents,
                checkpoint: examined,
                has_more: true,
                horizon: Seq(0),
            });
        }
        bytes += size;
        documents.push(doc);
    }
    Ok(PullPage {
        documents,
        checkpoint: upto,
        has_more: false,
        horizon: Seq(0),
    })
}

/// About what `doc` takes in a response: its variable parts plus room for
/// the fixed fields, tags and length prefixes.
pub fn wire_size(doc: &Document) -> usize {
    doc.body.len() + doc.collection.len() + doc.id.len() + doc.updated_by.len() + 64
}

/// Current documents by id, in the order asked; unknown ids are omitted.
pub fn get(
    trees: &Trees,
    index: &Index,
    collection: &str,
    ids: &[String],
) -> Result<Vec<Document>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let key = DocKey::new(collection, id)?;
        let Some(entry) = index.get(key.as_bytes()) else {
            continue;
        };
        // A purge racing this read may remove the record after the lookup.
        if let Some(bytes) = trees.log.get(keys::seq_key(entry.seq))? {
            out.push(codec::decode(entry.seq, &bytes)?);
        }
    }
    Ok(out)
}

/// A big-endian u64 value of `tree` (named for errors), 0 if absent.
pub fn read_u64(tree: &sled::Tree, name: &'static str, key: &[u8]) -> Result<u64, StoreError> {
    match tree.get(key)? {
        Some(bytes) => {
            keys::parse_u64(&bytes).ok_or_else(|| StoreError::corrupt(name, "expected a u64"))
        }
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{Options, Store, model::Op, testing};

    /// Rule: the store stops a page at its byte limit (a page of big
    /// documents does not read `limit` documents to send a few), never
    /// returns an empty page for want of room, and resumes without a gap.
    #[tokio::test]
    async fn pages_stop_at_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let fields = json!({"data": "x".repeat(1000)})
            .as_object()
            .unwrap()
            .clone();
        let mutations = (0..5)
            .map(|i| testing::mutation(&i.to_string(), Op::Put(fields.clone().into())))
            .collect();
        store.push(testing::batch(mutations)).await.unwrap();
        let (trees, index) = (&store.shared.trees, &store.shared.index);
        let all = CollectionFilter::default();
        let read = |since, bytes| {
            let limit = PageLimit { docs: 100, bytes };
            let page = read_changes(trees, index, Seq(since), Seq(5), &all, limit).unwrap();
            let seqs: Vec<u64> = page.documents.iter().map(|d| d.seq.0).collect();
            (seqs, page.checkpoint.0, page.has_more)
        };
        assert_eq!(read(0, 2500), (vec![1, 2], 2, true));
        assert_eq!(read(2, 2500), (vec![3, 4], 4, true));
        assert_eq!(read(4, 2500), (vec![5], 5, false));
        assert_eq!(read(0, 10), (vec![1], 1, true), "one always fits");
        assert_eq!(read(0, usize::MAX).0.len(), 5);
        store.close().await;
    }
}
