//! The pure field-level conflict check (after Graphback's DataSync).
//!
//! Nothing here touches storage: push planning reads the current
//! document and the base body from the delta log, then asks `decide` what to
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
        (Op::Put(put), _) => Some(NewState::Put(put.encoded().clone())),
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
    let changes = match op {
        Op::Delete => return stale_delete(base, current, strategy),
        Op::Put(put) => put_changes(base, current, put.fields()),
        Op::Patch(patch) => patch_changes(base, patch),
    };
    // A field the client sets to exactly what the server already has is no
    // change at all: convergent edits are not conflicts.
    let client: FieldChanges = changes
        .iter()
        .filter(|(key, value)| current.and_then(|c| c.get(*key)) != value.as_ref())
        .map(|(key, value)| (key.clone(), value.clone()))
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
            // Resurrecting a tombstone starts from the body the client saw,
            // so every change applies, even a removal that agrees with the
            // tombstone (on a live body those left out are no-ops).
            let onto = current.or(base);
            let mut body = onto.cloned().unwrap_or_default();
            apply_fields(&mut body, &changes);
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
        assert_eq!(d.write, Some(NewState::Put(put.encoded().clone())));
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

    /// Rule: CLIENT_WINS bringing back a tombstone starts from the base,
    /// and the client's removals of the base's fields still hold there.
    /// (Found by the `conflict` fuzz target: a removal "agreed" with the
    /// tombstone, was dropped, and the base's field came back.)
    #[test]
    fn client_wins_over_a_tombstone_keeps_the_clients_removals() {
        let base = body(json!({"title": "a", "note": "n"}));
        let put = Op::Put(body(json!({"title": "b"})).into());
        let d = three_way(Some(&base), None, &put, Strategy::ClientWins);
        assert_eq!(d.outcome, Outcome::Resolved);
        assert_eq!(d.write, live(json!({"title": "b"})));
        let patch = Op::Patch(body(json!({"title": "b", "note": null})));
        let d = three_way(Some(&base), None, &patch, Strategy::ClientWins);
        assert_eq!(d.write, live(json!({"title": "b"})));
        // The fuzzer's input: a base field whose value is null.
        let base = body(json!({"": 1, "b": null}));
        let put = Op::Put(body(json!({"": null})).into());
        let d = three_way(Some(&base), None, &put, Strategy::ClientWins);
        assert_eq!(d.write, live(json!({"": null})));
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

    /// Properties of the merge over generated bodies. Field names come from
    /// a small set, so the two sides often touch the same fields.
    mod properties {
        use proptest::{prelude::*, strategy::Strategy as Gen};

        use super::*;
        use crate::store::model::Strategy;

        fn key() -> impl Gen<Value = String> {
            prop::sample::select(&["a", "b", "c", "d", "e", "f"][..]).prop_map(String::from)
        }

        fn value() -> impl Gen<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                (0..4i64).prop_map(Value::from),
                prop::sample::select(&["", "x", "y"][..]).prop_map(Value::from),
            ];
            leaf.prop_recursive(2, 8, 3, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    prop::collection::btree_map(key(), inner, 0..3)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn fields(values: impl Gen<Value = Value>) -> impl Gen<Value = Body> {
            prop::collection::btree_map(key(), values, 0..5).prop_map(|m| m.into_iter().collect())
        }

        /// A body; a top-level `null` is a value like any other here.
        fn any_body() -> impl Gen<Value = Body> {
            fields(value())
        }

        /// A patch: a `null` removes its field (one field in three).
        fn patch() -> impl Gen<Value = Body> {
            fields(prop_oneof![1 => Just(Value::Null), 2 => value()])
        }

        fn patched(body: &Body, patch: &Body) -> Body {
            let mut body = body.clone();
            apply_patch(&mut body, patch);
            body
        }

        /// The client's change as a patch or as the put of the body it
        /// makes: a put changes the same fields, removed ones included.
        fn client_op(base: &Body, patch: &Body, as_put: bool) -> Op {
            if as_put {
                Op::Put(patched(base, patch).into())
            } else {
                Op::Patch(patch.clone())
            }
        }

        /// The body after a decision: what it writes, or `current` as is.
        fn merged(d: &Decision, current: &Body) -> Body {
            match &d.write {
                Some(NewState::Live(body)) => body.clone(),
                None => current.clone(),
                Some(other) => panic!("a merge wrote {other:?}"),
            }
        }

        fn any_strategy() -> impl Gen<Value = Strategy> {
            prop_oneof![
                Just(Strategy::Reject),
                Just(Strategy::ServerWins),
                Just(Strategy::ClientWins),
            ]
        }

        /// Every field any of the bodies has, once each.
        fn keys<'a>(bodies: &[&'a Body]) -> BTreeSet<&'a String> {
            bodies.iter().flat_map(|b| b.keys()).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Rule: two patches of disjoint fields give the same body in
            /// either order.
            #[test]
            fn disjoint_patches_commute(base in any_body(), p in patch(), mut q in patch()) {
                q.retain(|k, _| !p.contains_key(k));
                prop_assert_eq!(patched(&patched(&base, &p), &q), patched(&patched(&base, &q), &p));
            }

            /// Rule: a stale change whose fields the server did not touch
            /// merges under every strategy, and the merge is the base with
            /// both changes applied.
            #[test]
            fn disjoint_changes_merge_to_both_applied(
                base in any_body(),
                server in patch(),
                mut client in patch(),
                as_put: bool,
                strategy in any_strategy(),
            ) {
                client.retain(|k, _| !server.contains_key(k));
                let current = patched(&base, &server);
                let op = client_op(&base, &client, as_put);
                let d = three_way(Some(&base), Some(&current), &op, strategy);
                prop_assert_eq!(d.outcome, Outcome::Merged);
                prop_assert!(d.conflicting_fields.is_empty());
                prop_assert_eq!(merged(&d, &current), patched(&current, &client));
            }

            /// Rule: on overlap, SERVER_WINS keeps the current value of every
            /// field the server changed and the client's value of every
            /// field only the client changed; CLIENT_WINS keeps the client's
            /// value of every field the client changed. Fields the client did
            /// not change stay as they are; the conflicting fields are those
            /// both changed to different values.
            #[test]
            fn server_wins_and_client_wins_keep_what_they_promise(
                base in any_body(),
                server in patch(),
                client in patch(),
                as_put: bool,
                client_wins: bool,
            ) {
                let current = patched(&base, &server);
                let wanted = patched(&base, &client);
                let strategy = if client_wins {
                    Strategy::ClientWins
                } else {
                    Strategy::ServerWins
                };
                let op = client_op(&base, &client, as_put);
                let d = three_way(Some(&base), Some(&current), &op, strategy);
                let by_client = |k: &String| base.get(k) != wanted.get(k);
                let by_server = |k: &String| base.get(k) != current.get(k);
                let mut expected = current.clone();
                for k in keys(&[&base, &wanted]).into_iter().filter(|k| by_client(k)) {
                    if client_wins || !by_server(k) {
                        match wanted.get(k) {
                            Some(v) => expected.insert(k.clone(), v.clone()),
                            None => expected.remove(k),
                        };
                    }
                }
                prop_assert_eq!(merged(&d, &current), expected);
                let conflicting: Vec<String> = keys(&[&base, &current, &wanted])
                    .into_iter()
                    .filter(|k| by_client(k) && by_server(k))
                    .filter(|k| current.get(*k) != wanted.get(*k))
                    .cloned()
                    .collect();
                let outcome = if conflicting.is_empty() {
                    Outcome::Merged
                } else {
                    Outcome::Resolved
                };
                prop_assert_eq!(d.outcome, outcome);
                prop_assert_eq!(d.conflicting_fields, conflicting);
            }

            /// Rule: against a tombstone, SERVER_WINS leaves it deleted and
            /// CLIENT_WINS brings back exactly the body the client made from
            /// its base (removals included), if it sets any field.
            #[test]
            fn over_a_tombstone_each_side_keeps_its_own(
                base in any_body(),
                client in patch(),
                as_put: bool,
            ) {
                let wanted = patched(&base, &client);
                let op = client_op(&base, &client, as_put);
                let sets_a_field = wanted.iter().any(|(k, v)| base.get(k) != Some(v));
                let server = three_way(Some(&base), None, &op, Strategy::ServerWins);
                prop_assert_eq!(server.write, None);
                let client_side = three_way(Some(&base), None, &op, Strategy::ClientWins);
                if sets_a_field {
                    prop_assert_eq!(client_side.outcome, Outcome::Resolved);
                    prop_assert_eq!(client_side.write, Some(NewState::Live(wanted)));
                } else {
                    prop_assert_eq!(client_side.outcome, Outcome::Merged);
                    prop_assert_eq!(client_side.write, None);
                }
            }

            /// Rule: a patch followed by its inverse (each field it touches
            /// set back to its old value, or `null` where it was absent)
            /// gives back the body, applied directly as a push does. It holds
            /// for bodies without a top-level `null`: a patch cannot set a
            /// field to `null`, since `null` removes it.
            #[test]
            fn a_patch_and_its_inverse_round_trip(
                body in fields(value().prop_filter("a top-level null", |v| !v.is_null())),
                p in patch(),
            ) {
                let inverse: Body = p
                    .keys()
                    .map(|k| (k.clone(), body.get(k).cloned().unwrap_or(Value::Null)))
                    .collect();
                let forth = apply_direct(Some(&body), &Op::Patch(p)).write;
                let Some(NewState::Live(changed)) = forth else {
                    panic!("a patch wrote {forth:?}");
                };
                let back = apply_direct(Some(&changed), &Op::Patch(inverse)).write;
                prop_assert_eq!(back, Some(NewState::Live(body)));
            }

            /// Rule: the same stale change gives the same answer as a patch
            /// and as the put of the body that patch makes.
            #[test]
            fn a_put_and_the_patch_it_amounts_to_agree(
                base in any_body(),
                server in patch(),
                client in patch(),
                strategy in any_strategy(),
            ) {
                let current = patched(&base, &server);
                let [as_patch, as_put] = [false, true].map(|as_put| {
                    let op = client_op(&base, &client, as_put);
                    three_way(Some(&base), Some(&current), &op, strategy)
                });
                prop_assert_eq!(as_patch, as_put);
            }
        }
    }
}
