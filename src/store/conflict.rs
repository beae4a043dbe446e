//! The pure field-level conflict check (after Graphback's DataSync).
//!
//! Nothing here touches storage: push planning reads the current
//! document and the base body from the delta log, then asks [`decide`] what to
//! write. That keeps every rule unit-testable without a server.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::model::{Body, EncodedBody, Op, Outcome, Strategy, Version};

/// What the store should make of the document.
#[derive(Debug, Clone, PartialEq)]
pub enum NewState {
    /// A live document with this body.
    Live(Body),
    /// A live document whose body is the put's, unchanged and already encoded.
    Put(EncodedBody),
    /// A tombstone.
    Tombstone,
}

/// The verdict on one mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What to report.
    pub outcome: Outcome,
    /// What to write; `None` writes nothing.
    pub write: Option<NewState>,
    /// Fields changed by both sides, sorted.
    pub conflicting_fields: Vec<String>,
}

/// How a mutation's `base_version` relates to the current document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseCheck {
    /// No base, or the base is current: apply as asked.
    Current,
    /// The base is newer than the document: the client saw another history.
    Ahead,
    /// The base is older: a three-way check against this version is needed.
    Stale(Version),
}

/// Compares `base_version` with the document's version. Base 0 ("must not
/// exist") also matches a tombstone, whatever its version.
pub fn check_base(base: Option<Version>, current: Version, deleted: bool) -> BaseCheck {
    match base {
        None => BaseCheck::Current,
        Some(b) if b == current || (b.0 == 0 && deleted) => BaseCheck::Current,
        Some(b) if b > current => BaseCheck::Ahead,
        Some(b) => BaseCheck::Stale(b),
    }
}

/// Applies a mutation whose base is current (or absent): always written,
/// except a delete of a document that is not live, which is a no-op.
pub fn apply_direct(current: Option<&Body>, op: &Op) -> Decision {
    let write = match (op, current) {
        (Op::Put(put), _) => Some(NewState::Put(put.encoded.clone())),
        (Op::Patch(patch), _) => {
            let mut body = current.cloned().unwrap_or_default();
            apply_patch(&mut body, patch);
            Some(NewState::Live(body))
        }
        (Op::Delete, Some(_)) => Some(NewState::Tombstone),
        (Op::Delete, None) => None,
    };
    Decision {
        outcome: Outcome::Applied,
        write,
        conflicting_fields: Vec::new(),
    }
}

/// Merges a patch: a `null` value removes the field.
pub fn apply_patch(body: &mut Body, patch: &Body) {
    for (key, value) in patch {
        if value.is_null() {
            body.remove(key);
        } else {
            body.insert(key.clone(), value.clone());
        }
    }
}

/// The client's field changes relative to its base: field → new value, or
/// `None` to remove it.
type FieldChanges = BTreeMap<String, Option<Value>>;

/// The three-way check for a stale base.
///
/// - `base`: the body at the client's base version (`None` if it is no longer
///   in the delta log: then every field counts as changed by the server);
/// - `current`: the live body, or `None` for a tombstone (a deleted current
///   counts as all fields changed by the server).
pub fn three_way(
    base: Option<&Body>,
    current: Option<&Body>,
    op: &Op,
    strategy: Strategy,
) -> Decision {
    let client = match op {
        Op::Delete => return stale_delete(base, current, strategy),
        Op::Put(put) => put_changes(base, current, &put.fields),
        Op::Patch(patch) => patch_changes(base, patch),
    };
    // A field the client sets to exactly what the server already has is no
    // change at all: convergent edits are not conflicts.
    let client: FieldChanges = client
        .into_iter()
        .filter(|(key, value)| current.and_then(|c| c.get(key)) != value.as_ref())
        .collect();
    let server_changed = |key: &str| match (base, current) {
        (Some(base), Some(current)) => base.get(key) != current.get(key),
        _ => true,
    };
    let overlap: Vec<String> = client
        .keys()
        .filter(|k| server_changed(k))
        .cloned()
        .collect();
    if overlap.is_empty() {
        return Decision {
            outcome: Outcome::Merged,
            write: fields_onto(current, &client),
            conflicting_fields: overlap,
        };
    }
    match strategy {
        Strategy::Reject => Decision {
            outcome: Outcome::Conflict,
            write: None,
            conflicting_fields: overlap,
        },
        Strategy::ServerWins => {
            let overlapping: BTreeSet<&String> = overlap.iter().collect();
            let rest: FieldChanges = client
                .into_iter()
                .filter(|(k, _)| !overlapping.contains(k))
                .collect();
            // A deleted document stays deleted: every field overlaps.
            let write = if current.is_some() {
                fields_onto(current, &rest)
            } else {
                None
            };
            Decision {
                outcome: Outcome::Resolved,
                write,
                conflicting_fields: overlap,
            }
        }
        Strategy::ClientWins => {
            // Resurrecting a tombstone starts from the body the client saw.
            let onto = current.or(base);
            let mut body = onto.cloned().unwrap_or_default();
            apply_fields(&mut body, &client);
            Decision {
                outcome: Outcome::Resolved,
                write: Some(NewState::Live(body)),
                conflicting_fields: overlap,
            }
        }
    }
}

/// A stale delete: it changes every field, so it conflicts with any field the
/// server changed since the base. It is indivisible: SERVER_WINS drops it.
fn stale_delete(base: Option<&Body>, current: Option<&Body>, strategy: Strategy) -> Decision {
    let Some(current) = current else {
        // Already deleted: what the client wanted holds.
        return Decision {
            outcome: Outcome::Merged,
            write: None,
            conflicting_fields: Vec::new(),
        };
    };
    let overlap: Vec<String> = match base {
        Some(base) => base
            .keys()
            .chain(current.keys())
            .filter(|k| base.get(*k) != current.get(*k))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .cloned()
            .collect(),
        None => current.keys().cloned().collect(),
    };
    // With an unknown base even an empty document counts as changed.
    let conflicting = base.is_none() || !overlap.is_empty();
    let (outcome, write) = match (conflicting, strategy) {
        (false, _) => (Outcome::Merged, Some(NewState::Tombstone)),
        (true, Strategy::Reject) => (Outcome::Conflict, None),
        (true, Strategy::ServerWins) => (Outcome::Resolved, None),
        (true, Strategy::ClientWins) => (Outcome::Resolved, Some(NewState::Tombstone)),
    };
    Decision {
        outcome,
        write,
        conflicting_fields: overlap,
    }
}

/// A put changes every field that differs from its base, removed ones too.
/// With an unknown base, every field it sets or drops relative to the
/// current body.
fn put_changes(base: Option<&Body>, current: Option<&Body>, body: &Body) -> FieldChanges {
    let reference = base.or(current);
    let keys: BTreeSet<&String> = body
        .keys()
        .chain(reference.into_iter().flat_map(|r| r.keys()))
        .collect();
    keys.into_iter()
        .filter(|k| base.is_none() || base.and_then(|b| b.get(*k)) != body.get(*k))
        .map(|k| (k.clone(), body.get(k).cloned()))
        .collect()
}

/// A patch changes the keys it sets to a new value relative to its base.
fn patch_changes(base: Option<&Body>, patch: &Body) -> FieldChanges {
    patch
        .iter()
        .map(|(k, v)| (k.clone(), (!v.is_null()).then(|| v.clone())))
        .filter(|(k, v)| base.is_none() || base.and_then(|b| b.get(k)) != v.as_ref())
        .collect()
}

/// The client's remaining changes applied on top of the current body; no
/// write if nothing remains.
fn fields_onto(current: Option<&Body>, changes: &FieldChanges) -> Option<NewState> {
    if changes.is_empty() {
        return None;
    }
    let mut body = current.cloned().unwrap_or_default();
    apply_fields(&mut body, changes);
    Some(NewState::Live(body))
}

fn apply_fields(body: &mut Body, changes: &FieldChanges) {
    for (key, value) in changes {
        match value {
            Some(v) => body.insert(key.clone(), v.clone()),
            None => body.remove(key),
        };
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> Body {
        match v {
            Value::Object(map) => map,
            _ => panic!("test bodies are objects"),
        }
    }

    fn live(v: Value) -> Option<NewState> {
        Some(NewState::Live(body(v)))
    }

    #[test]
    fn base_zero_matches_missing_and_tombstone_only() {
        assert_eq!(
            check_base(Some(Version(0)), Version(0), false),
            BaseCheck::Current
        );
        assert_eq!(
            check_base(Some(Version(0)), Version(3), true),
            BaseCheck::Current
        );
        assert_eq!(
            check_base(Some(Version(0)), Version(3), false),
            BaseCheck::Stale(Version(0))
        );
        assert_eq!(
            check_base(Some(Version(4)), Version(3), false),
            BaseCheck::Ahead
        );
        assert_eq!(check_base(None, Version(3), false), BaseCheck::Current);
    }

    #[test]
    fn a_direct_put_writes_its_body_as_encoded() {
        let put: crate::store::model::PutBody = body(json!({"a": 1})).into();
        let d = apply_direct(Some(&body(json!({"b": 2}))), &Op::Put(put.clone()));
        assert_eq!(d.outcome, Outcome::Applied);
        assert_eq!(d.write, Some(NewState::Put(put.encoded)));
    }

    #[test]
    fn disjoint_put_merges_onto_current() {
        let base = body(json!({"title": "a", "description": "d"}));
        let current = body(json!({"title": "a", "description": "D2"}));
        let put = Op::Put(body(json!({"title": "T2", "description": "d"})).into());
        let d = three_way(Some(&base), Some(&current), &put, Strategy::Reject);
        assert_eq!(d.outcome, Outcome::Merged);
        assert_eq!(d.write, live(json!({"title": "T2", "description": "D2"})));
    }

    #[test]
    fn put_removing_a_field_counts_as_a_change_to_it() {
        let base = body(json!({"a": 1, "b": 2}));
        let current = body(json!({"a": 1, "b": 3}));
        let put = Op::Put(body(json!({"a": 1})).into());
        let d = three_way(Some(&base), Some(&current), &put, Strategy::Reject);
        assert_eq!(
            (d.outcome, d.conflicting_fields),
            (Outcome::Conflict, vec!["b".to_string()])
        );
    }

    #[test]
    fn overlap_under_each_strategy() {
        let base = body(json!({"title": "a", "n": 1}));
        let current = body(json!({"title": "server", "n": 1}));
        let patch = Op::Patch(body(json!({"title": "client", "n": 2})));
        let reject = three_way(Some(&base), Some(&current), &patch, Strategy::Reject);
        assert_eq!(reject.outcome, Outcome::Conflict);
        assert_eq!(reject.write, None);
        assert_eq!(reject.conflicting_fields, vec!["title"]);
        let server = three_way(Some(&base), Some(&current), &patch, Strategy::ServerWins);
        assert_eq!(server.outcome, Outcome::Resolved);
        assert_eq!(server.write, live(json!({"title": "server", "n": 2})));
        let client = three_way(Some(&base), Some(&current), &patch, Strategy::ClientWins);
        assert_eq!(client.write, live(json!({"title": "client", "n": 2})));
    }

    #[test]
    fn server_wins_with_nothing_left_writes_nothing() {
        let base = body(json!({"title": "a"}));
        let current = body(json!({"title": "server"}));
        let patch = Op::Patch(body(json!({"title": "client"})));
        let d = three_way(Some(&base), Some(&current), &patch, Strategy::ServerWins);
        assert_eq!((d.outcome, d.write), (Outcome::Resolved, None));
    }

    #[test]
    fn convergent_edits_do_not_conflict() {
        let base = body(json!({"title": "a"}));
        let current = body(json!({"title": "same"}));
        let patch = Op::Patch(body(json!({"title": "same"})));
        let d = three_way(Some(&base), Some(&current), &patch, Strategy::Reject);
        assert_eq!((d.outcome, d.write), (Outcome::Merged, None));
    }

    #[test]
    fn patch_null_removes_and_unchanged_keys_are_not_changes() {
        let base = body(json!({"a": 1, "b": 2, "c": 3}));
        let current = body(json!({"a": 9, "b": 2, "c": 3}));
        // "a" is set to its base value: not a change, so no overlap with the server's "a".
        let patch = Op::Patch(body(json!({"a": 1, "b": null})));
        let d = three_way(Some(&base), Some(&current), &patch, Strategy::Reject);
        assert_eq!(d.outcome, Outcome::Merged);
        assert_eq!(d.write, live(json!({"a": 9, "c": 3})));
    }

    #[test]
    fn pruned_base_counts_every_field_as_changed_by_server() {
        let current = body(json!({"title": "x", "other": 1}));
        let patch = Op::Patch(body(json!({"fresh": true})));
        let d = three_way(None, Some(&current), &patch, Strategy::Reject);
        assert_eq!(
            (d.outcome, d.conflicting_fields),
            (Outcome::Conflict, vec!["fresh".to_string()])
        );
    }

    #[test]
    fn update_against_deleted_document() {
        let base = body(json!({"title": "a", "keep": 1}));
        let patch = Op::Patch(body(json!({"title": "b"})));
        let reject = three_way(Some(&base), None, &patch, Strategy::Reject);
        assert_eq!(
            (reject.outcome, reject.conflicting_fields),
            (Outcome::Conflict, vec!["title".to_string()])
        );
        let server = three_way(Some(&base), None, &patch, Strategy::ServerWins);
        assert_eq!((server.outcome, server.write), (Outcome::Resolved, None));
        let client = three_way(Some(&base), None, &patch, Strategy::ClientWins);
        assert_eq!(client.outcome, Outcome::Resolved);
        assert_eq!(client.write, live(json!({"title": "b", "keep": 1})));
    }

    #[test]
    fn stale_delete_against_update() {
        let base = body(json!({"title": "a"}));
        let current = body(json!({"title": "b"}));
        let d = three_way(Some(&base), Some(&current), &Op::Delete, Strategy::Reject);
        assert_eq!(
            (d.outcome, d.conflicting_fields),
            (Outcome::Conflict, vec!["title".to_string()])
        );
        let d = three_way(
            Some(&base),
            Some(&current),
            &Op::Delete,
            Strategy::ServerWins,
        );
        assert_eq!((d.outcome, d.write), (Outcome::Resolved, None));
        let d = three_way(
            Some(&base),
            Some(&current),
            &Op::Delete,
            Strategy::ClientWins,
        );
        assert_eq!(
            (d.outcome, d.write),
            (Outcome::Resolved, Some(NewState::Tombstone))
        );
        // Nothing changed on the server since the base: the delete merges.
        let d = three_way(Some(&base), Some(&base), &Op::Delete, Strategy::Reject);
        assert_eq!(
            (d.outcome, d.write),
            (Outcome::Merged, Some(NewState::Tombstone))
        );
    }

    #[test]
    fn direct_ops() {
        let current = body(json!({"a": 1}));
        let d = apply_direct(Some(&current), &Op::Patch(body(json!({"b": 2, "a": null}))));
        assert_eq!(d.write, live(json!({"b": 2})));
        assert_eq!(apply_direct(None, &Op::Delete).write, None);
        assert_eq!(
            apply_direct(Some(&current), &Op::Delete).write,
            Some(NewState::Tombstone)
        );
    }
}
