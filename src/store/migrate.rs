//! Opening stores written by an earlier layout.
//!
//! Layout 1 kept current documents (doc key → record), a change index
//! (seq → doc key) and the delta log (doc key ++ version → record) in three
//! trees, so a change cost up to four tree writes and a pull a lookup per
//! document. Layout 2 keeps one log keyed by seq (see `codec`). Upgrading
//! rewrites every record once; it is safe to interrupt, because the schema
//! version changes only after the whole log is written and flushed, and an
//! interrupted upgrade starts again from an empty log. Layout 3 changed
//! only the clients' mutation-id states (see `clients`), rewritten in place.

use std::time::{Instant, SystemTime};

use super::{
    SCHEMA_VERSION, SCHEMA_VERSION_REDO, Trees, clients, codec,
    error::StoreError,
    keys::{self, DocKey},
    model::{Body, Document, EncodedBody, Seq, Version},
};

/// Records written per batch while upgrading.
const BATCH: usize = 10_000;

/// Brings the store in `db` to [`SCHEMA_VERSION`], marking a new store and
/// refusing layouts this build does not know.
pub fn upgrade(db: &sled::Db, trees: &Trees, now: SystemTime) -> Result<(), StoreError> {
    loop {
        match trees.meta.get(keys::META_SCHEMA)? {
            None => {
                trees
                    .meta
                    .insert(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => match keys::parse_u64(&v) {
                // A redo record may be pending: replayed by `redo::recover`.
                Some(SCHEMA_VERSION | SCHEMA_VERSION_REDO) => break,
                Some(1) => from_v1(db, trees)?,
                Some(2) => from_v2(db, trees, now)?,
                Some(3) => from_v3(db, trees)?,
                Some(found) => {
                    return Err(StoreError::Schema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                None => return Err(StoreError::corrupt(keys::META, "bad schema version")),
            },
        }
    }
    // Left behind if the process stopped between the upgrade and this.
    for name in [keys::V1_DOCS, keys::V1_CHANGES, keys::V1_HISTORY] {
        if db.tree_names().iter().any(|n| n == name.as_bytes()) {
            db.drop_tree(name)?;
        }
    }
    Ok(())
}

/// Layout 4 writes records that mark the end of their commit and client
/// states that say which commit wrote them (for replication); it reads
/// layout 3's as they are, so nothing is rewritten. A build of layout 3
/// would misread the new ones, so the schema changes.
fn from_v3(db: &sled::Db, trees: &Trees) -> Result<(), StoreError> {
    trees
        .meta
        .insert(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
    db.flush()?;
    tracing::info!("upgraded the store from layout 3");
    Ok(())
}

/// Layout 3 keeps, per client, the exceptions below its highest mutation id
/// and when it was last seen (see `clients`); layout 2 kept the id alone. A
/// build of layout 2 would misread the new states, so the schema changes.
fn from_v2(db: &sled::Db, trees: &Trees, now: SystemTime) -> Result<(), StoreError> {
    let upgraded = clients::upgrade(&trees.clients, now)?;
    db.flush()?;
    trees
        .meta
        .insert(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
    db.flush()?;
    tracing::info!(clients = upgraded, "upgraded the store from layout 2");
    Ok(())
}

/// Rewrites layout 1's documents and delta log as one log, chaining each
/// document's versions.
fn from_v1(db: &sled::Db, trees: &Trees) -> Result<(), StoreError> {
    let started = Instant::now();
    tracing::info!("upgrading the store from layout 1");
    trees.log.clear()?;
    let docs = db.open_tree(keys::V1_DOCS)?;
    let history = db.open_tree(keys::V1_HISTORY)?;
    let mut batch = sled::Batch::default();
    let mut pending = 0;
    let mut records = 0u64;
    for entry in docs.iter() {
        let (key, value) = entry?;
        let key = DocKey::from_stored(&key);
        let mut prev: Option<(Version, Seq)> = None;
        // Delta-log keys sort by version within a document; doc keys are
        // prefix-free, so this prefix holds only this document's versions.
        let versions = history
            .scan_prefix(key.as_bytes())
            .values()
            .map(|v| v.map(|v| (keys::V1_HISTORY, v)));
        for read in versions.chain([Ok((keys::V1_DOCS, value))]) {
            let (tree, bytes) = read?;
            let doc = decode(tree, &key, &bytes)?;
            // A pruned gap breaks the chain, as it did in the delta log.
            let link = match prev {
                Some((v, seq)) if v.0 + 1 == doc.version.0 => seq,
                _ => Seq(0),
            };
            batch.insert(&keys::seq_key(doc.seq), codec::encode(&doc, &key, link)?);
            prev = Some((doc.version, doc.seq));
            pending += 1;
            records += 1;
            if pending == BATCH {
                trees.log.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
    }
    trees.log.apply_batch(batch)?;
    db.flush()?;
    trees.meta.insert(keys::META_SCHEMA, &2u64.to_be_bytes())?;
    db.flush()?;
    tracing::info!(
        records,
        elapsed_ms = started.elapsed().as_millis(),
        "store upgraded to layout 2"
    );
    Ok(())
}

/// Layout 1's record: `[format: u8][deleted: u8][version: u64][seq: u64]
/// [updated_at µs: u64][updated_by len: u16][updated_by][body]`, the body as
/// JSON (format 1) or an encoded Struct (format 2).
fn decode(tree: &'static str, key: &DocKey, bytes: &[u8]) -> Result<Document, StoreError> {
    const HEADER: usize = 1 + 1 + 8 + 8 + 8 + 2;
    let corrupt = |detail: String| StoreError::corrupt(tree, detail);
    let (collection, id) = key
        .parts()
        .ok_or_else(|| corrupt("bad document key".into()))?;
    let (header, rest) = bytes
        .split_first_chunk::<HEADER>()
        .ok_or_else(|| corrupt("short record".into()))?;
    let format = header[0];
    if format != 1 && format != 2 {
        return Err(corrupt(format!("unknown record format {format}")));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let deleted = header[1] != 0;
    let by_len = usize::from(u16::from_be_bytes([header[26], header[27]]));
    let (by, body) = rest
        .split_at_checked(by_len)
        .ok_or_else(|| corrupt("short record".into()))?;
    let updated_by =
        std::str::from_utf8(by).map_err(|_| corrupt("updated_by is not UTF-8".into()))?;
    let body = if deleted || body.is_empty() {
        EncodedBody::default()
    } else if format == 1 {
        let json: Body = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
        EncodedBody::encode(&json)
    } else {
        EncodedBody::from_stored(body)
    };
    Ok(Document {
        collection: collection.to_owned(),
        id: id.to_owned(),
        version: Version(u64_at(2)),
        body,
        deleted,
        seq: Seq(u64_at(10)),
        updated_at: std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64_at(18)),
        updated_by: updated_by.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{
        CollectionFilter, Options, PageLimit, Store,
        model::{Mutation, Op, Outcome},
        testing,
    };

    /// A layout-1 record (format 2 bodies are Struct bytes, format 1 JSON).
    fn v1_record(format: u8, version: u64, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut record = vec![format, u8::from(body.is_empty())];
        for n in [version, seq, 1_700_000_000_000_000 + seq] {
            record.extend_from_slice(&n.to_be_bytes());
        }
        record.extend_from_slice(&1u16.to_be_bytes());
        record.extend_from_slice(b"c");
        record.extend_from_slice(body);
        record
    }

    fn struct_bytes(value: serde_json::Value) -> Vec<u8> {
        EncodedBody::encode(value.as_object().unwrap())
            .as_bytes()
            .to_vec()
    }

    /// Writes what layout 1 would have left after: a {t:x, n:1} (seq 1),
    /// c deleted (seq 2), a patched to {t:y, n:1} (seq 3; version 1 in the
    /// delta log, JSON), b created with a JSON body (seq 4).
    fn write_v1_store(dir: &std::path::Path) {
        let db = sled::open(dir).unwrap();
        let tree = |name: &str| db.open_tree(name).unwrap();
        let (meta, docs, changes, history) = (
            tree(keys::META),
            tree(keys::V1_DOCS),
            tree(keys::V1_CHANGES),
            tree(keys::V1_HISTORY),
        );
        meta.insert(keys::META_SCHEMA, &1u64.to_be_bytes()).unwrap();
        meta.insert(keys::META_STORE_ID, "old-store").unwrap();
        meta.insert(keys::META_HEAD, &4u64.to_be_bytes()).unwrap();
        // Layouts 1 and 2 kept a client's last mutation id alone.
        tree(keys::CLIENTS)
            .insert("phone", &7u64.to_be_bytes())
            .unwrap();
        let key = |id: &str| DocKey::new("todos", id).unwrap();
        let a1 = v1_record(1, 1, 1, br#"{"t":"x","n":1}"#);
        history
            .insert([key("a").as_bytes(), &1u64.to_be_bytes()].concat(), a1)
            .unwrap();
        let a2 = v1_record(2, 2, 3, &struct_bytes(json!({"t": "y", "n": 1})));
        docs.insert(key("a").as_bytes(), a2).unwrap();
        docs.insert(key("c").as_bytes(), v1_record(2, 1, 2, b""))
            .unwrap();
        let b1 = v1_record(1, 1, 4, br#"{"a":[1,"x"]}"#);
        docs.insert(key("b").as_bytes(), b1).unwrap();
        for (seq, id) in [(2u64, "c"), (3, "a"), (4, "b")] {
            changes
                .insert(seq.to_be_bytes(), key(id).as_bytes())
                .unwrap();
        }
        db.flush().unwrap();
    }

    /// Rule: a store written by layout 1 opens as layout 3 with the same
    /// documents, seqs, versions, identity and clients' mutation ids, its
    /// delta log still usable as a merge base, and the old trees gone;
    /// opening it again changes nothing.
    #[tokio::test]
    async fn layout_1_stores_are_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        write_v1_store(dir.path());
        let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
        assert_eq!((&*store.store_id(), store.head()), ("old-store", Seq(4)));
        assert_eq!(store.last_mutation_id("phone").unwrap(), 7);
        let retry = crate::store::model::PushBatch {
            client_id: "phone".into(),
            updated_by: "phone".into(),
            ..testing::batch(vec![Mutation {
                mutation_id: 7,
                ..testing::mutation("z", Op::Delete)
            }])
        };
        let retried = store.push(retry).await.unwrap();
        assert_eq!(retried.results[0].outcome, Outcome::Duplicate);
        let page = store
            .pull(
                Seq(0),
                Seq(0),
                CollectionFilter::default(),
                PageLimit {
                    docs: 10,
                    bytes: usize::MAX,
                },
            )
            .await
            .unwrap();
        let seen: Vec<_> = page
            .documents
            .iter()
            .map(|d| (d.id.as_str(), d.version.0, d.seq.0, d.deleted))
            .collect();
        assert_eq!(
            seen,
            [("c", 1, 2, true), ("a", 2, 3, false), ("b", 1, 4, false)]
        );
        assert_eq!(
            page.documents[2].body.to_json("b").unwrap(),
            *json!({"a": [1, "x"]}).as_object().unwrap()
        );
        // Base 1 of `a` is found through the chain: the server changed only
        // `t`, so a change of `n` merges (an unknown base would conflict).
        let patch = Mutation {
            collection: "todos".into(),
            base_version: Some(Version(1)),
            ..testing::mutation("a", Op::Patch(json!({"n": 2}).as_object().unwrap().clone()))
        };
        let batch = testing::batch(vec![patch]);
        let result = store.push(batch).await.unwrap().results.remove(0);
        assert_eq!(result.outcome, Outcome::Merged);
        let doc = result.document.unwrap();
        assert_eq!((doc.version, doc.seq), (Version(3), Seq(5)));
        assert_eq!(
            doc.body.to_json("a").unwrap(),
            *json!({"t": "y", "n": 2}).as_object().unwrap()
        );
        store.close().await;
        drop(store);

        let db = testing::reopen(|| sled::open(dir.path()));
        let schema = db.open_tree(keys::META).unwrap().get(keys::META_SCHEMA);
        assert_eq!(
            keys::parse_u64(&schema.unwrap().unwrap()),
            Some(SCHEMA_VERSION)
        );
        let client = db.open_tree(keys::CLIENTS).unwrap().get("phone").unwrap();
        let state = clients::ClientState::decode(&client.unwrap()).unwrap();
        assert!(
            state.last == 7 && state.seen_micros > 0,
            "upgraded: {state:?}"
        );
        let names: Vec<_> = db.tree_names();
        for old in [keys::V1_DOCS, keys::V1_CHANGES, keys::V1_HISTORY] {
            assert!(!names.iter().any(|n| n == old.as_bytes()), "{old} left");
        }
        drop(db);
        let store = testing::reopen(|| Store::open(dir.path(), Options::default()));
        assert_eq!(store.head(), Seq(5));
        let got = store.get("todos".into(), vec!["a".into()]).await.unwrap();
        assert_eq!(got[0].version, Version(3));
        store.close().await;
    }

    /// Rule: a layout this build does not know is refused, not rewritten.
    #[test]
    fn unknown_layouts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree(keys::META).unwrap();
            meta.insert(keys::META_SCHEMA, &9u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let refused = testing::reopen(|| match Store::open(dir.path(), Options::default()) {
            Ok(_) => panic!("opened a store of layout 9"),
            Err(StoreError::Schema { found, supported }) => Ok((found, supported)),
            Err(e) => Err(e),
        });
        assert_eq!(refused, (9, SCHEMA_VERSION));
    }
}
