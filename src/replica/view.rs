//! The optimistic view: the base with the pending writes replayed on it, as
//! the server would apply them when their base is current (`put` replaces,
//! `patch` merges top-level fields with null removing one, `delete` makes a
//! tombstone; the server's own [`apply_patch`] does the merging). Pure
//! functions, no storage.

use std::collections::BTreeSet;

use super::store::{BaseDoc, LocalOp};
use crate::{client::Body, store::conflict::apply_patch, store::model::EncodedBody};

/// A body after `op`: `None` is no live document (missing or tombstone).
pub fn apply(body: Option<Body>, op: &LocalOp) -> Option<Body> {
    match op {
        LocalOp::Put(put) => Some(put.clone()),
        LocalOp::Patch(patch) => {
            // A patch of a missing or deleted document creates it.
            let mut body = body.unwrap_or_default();
            apply_patch(&mut body, patch);
            Some(body)
        }
        LocalOp::Delete => None,
    }
}

/// The live body a document shows once `ops` are replayed on its base.
pub fn replay<'a>(
    base: Option<&BaseDoc>,
    ops: impl IntoIterator<Item = &'a LocalOp>,
) -> Option<Body> {
    ops.into_iter()
        .fold(base.and_then(BaseDoc::live_body).cloned(), |body, op| {
            apply(body, op)
        })
}

/// The fields someone else changed: where `produced` (the document the
/// server answered for my write) differs from my write applied to its
/// ancestor. `None`: every field (one side deleted the document, the other
/// did not).
pub fn foreign_fields(
    ancestor: Option<&Body>,
    op: &LocalOp,
    produced: Option<&Body>,
) -> Option<BTreeSet<String>> {
    let expected = apply(ancestor.cloned(), op);
    match (expected.as_ref(), produced) {
        (None, None) => Some(BTreeSet::new()),
        (Some(mine), Some(theirs)) => Some(
            mine.keys()
                .chain(theirs.keys())
                .filter(|k| mine.get(*k) != theirs.get(*k))
                .cloned()
                .collect(),
        ),
        _ => None,
    }
}

/// Whether `op` changes any of `fields` (`None`: every field). A put and a
/// delete change every field; a patch, its own.
pub fn touches(op: &LocalOp, fields: Option<&BTreeSet<String>>) -> bool {
    match (fields, op) {
        (None, _) => true,
        (Some(f), LocalOp::Patch(p)) => p.keys().any(|k| f.contains(k)),
        (Some(f), LocalOp::Put(_) | LocalOp::Delete) => !f.is_empty(),
    }
}

/// A body as the server will store it: through its wire encoding (a
/// `google.protobuf.Struct`), so numbers are doubles (`1.0` reads back as
/// `1`) and the view shows what the server will.
pub fn normalize(body: &Body) -> Result<Body, String> {
    EncodedBody::encode(body).to_json("body")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn body(v: Value) -> Body {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn base(v: Option<Value>) -> BaseDoc {
        BaseDoc {
            version: 3,
            seq: 9,
            deleted: v.is_none(),
            body: v.map(body),
            updated_at: None,
            updated_by: String::new(),
        }
    }

    #[test]
    fn patch_merges_top_level_fields_and_null_removes_one() {
        let b = base(Some(json!({"a": 1, "b": {"x": 1}, "c": 3})));
        let ops = [LocalOp::Patch(body(
            json!({"a": null, "b": {"y": 2}, "d": 4}),
        ))];
        // Top level only: "b" is replaced, not merged.
        assert_eq!(
            replay(Some(&b), &ops),
            Some(body(json!({"b": {"y": 2}, "c": 3, "d": 4})))
        );
    }

    #[test]
    fn put_replaces_delete_removes_and_a_patch_revives() {
        let b = base(Some(json!({"a": 1})));
        let put = LocalOp::Put(body(json!({"z": true})));
        assert_eq!(replay(Some(&b), [&put]), Some(body(json!({"z": true}))));
        assert_eq!(replay(Some(&b), [&put, &LocalOp::Delete]), None);
        // A patch after a delete (or on a tombstone, or on nothing) starts
        // from an empty body, as the server does.
        let patch = LocalOp::Patch(body(json!({"n": 1, "gone": null})));
        assert_eq!(
            replay(Some(&b), [&LocalOp::Delete, &patch]),
            Some(body(json!({"n": 1})))
        );
        assert_eq!(
            replay(Some(&base(None)), [&patch]),
            Some(body(json!({"n": 1})))
        );
        assert_eq!(replay(None, [&patch]), Some(body(json!({"n": 1}))));
        // Nothing pending: the base as it is.
        assert_eq!(replay(Some(&b), []), Some(body(json!({"a": 1}))));
        assert_eq!(replay(Some(&base(None)), []), None);
    }

    #[test]
    fn writes_replay_in_order() {
        let ops = [
            LocalOp::Put(body(json!({"t": "a", "n": 1}))),
            LocalOp::Patch(body(json!({"t": "b"}))),
            LocalOp::Patch(body(json!({"n": null}))),
        ];
        assert_eq!(replay(None, &ops), Some(body(json!({"t": "b"}))));
        let mut reversed = ops.clone();
        reversed.reverse();
        assert_eq!(
            replay(None, &reversed),
            Some(body(json!({"t": "a", "n": 1})))
        );
    }

    #[test]
    fn foreign_fields_are_what_my_write_alone_does_not_explain() {
        let ancestor = body(json!({"t": "a", "done": false}));
        let mine = LocalOp::Patch(body(json!({"t": "b"})));
        let set = |ks: &[&str]| Some(ks.iter().map(|k| (*k).to_owned()).collect::<BTreeSet<_>>());
        // Applied as asked: nobody else.
        let applied = body(json!({"t": "b", "done": false}));
        assert_eq!(
            foreign_fields(Some(&ancestor), &mine, Some(&applied)),
            set(&[])
        );
        // Merged with someone's "done" (and a new field).
        let merged = body(json!({"t": "b", "done": true, "x": 1}));
        let foreign = foreign_fields(Some(&ancestor), &mine, Some(&merged));
        assert_eq!(foreign, set(&["done", "x"]));
        assert!(touches(
            &LocalOp::Patch(body(json!({"done": 1}))),
            foreign.as_ref()
        ));
        assert!(!touches(
            &LocalOp::Patch(body(json!({"t": "c"}))),
            foreign.as_ref()
        ));
        assert!(touches(
            &LocalOp::Put(body(json!({"t": "c"}))),
            foreign.as_ref()
        ));
        assert!(touches(&LocalOp::Delete, foreign.as_ref()));
        assert!(!touches(&LocalOp::Delete, set(&[]).as_ref()));
        // Deleted by someone else, or revived: every field.
        assert_eq!(foreign_fields(Some(&ancestor), &mine, None), None);
        assert_eq!(
            foreign_fields(Some(&ancestor), &LocalOp::Delete, Some(&applied)),
            None
        );
        assert_eq!(foreign_fields(None, &LocalOp::Delete, None), set(&[]));
        assert!(touches(&LocalOp::Patch(Body::new()), None));
    }

    #[test]
    fn normalizing_gives_what_the_server_stores() {
        let b = normalize(&body(
            json!({"n": 1.0, "big": 1e300, "s": "x", "l": [1, null]}),
        ))
        .unwrap();
        assert_eq!(
            b,
            body(json!({"n": 1, "big": 1e300, "s": "x", "l": [1, null]}))
        );
    }
}
