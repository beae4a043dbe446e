//! The pure conflict check (`store::conflict`) on arbitrary bodies: a base,
//! the current document (live or a tombstone) and a client's put, patch or
//! delete, under every strategy.
//!
//! Holds, besides "nothing panics": conflicting fields come sorted, once
//! each; REJECT writes nothing on a conflict; without overlap every
//! strategy gives the same answer; CLIENT_WINS ends with every field the
//! client changed as the client has it; SERVER_WINS keeps the current value
//! of every conflicting field and takes the client's for the others; no
//! strategy touches a field the client did not change.

#![no_main]

use deltasync::store::{
    conflict::{BaseCheck, Decision, NewState, apply_direct, apply_patch, check_base, three_way},
    model::{Body, Op, Outcome, Strategy, Version},
};
use deltasync_fuzz::body;
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(input) = Input::new(&mut u) {
        input.check();
    }
});

struct Input {
    base: Option<Body>,
    current: Option<Body>,
    op: Op,
    versions: (Option<u64>, u64, bool),
}

impl Input {
    fn new(u: &mut Unstructured) -> Result<Self> {
        let base = if u.ratio(7, 8)? {
            Some(body(u, 2)?)
        } else {
            None
        };
        // The server's change: usually a patch of the base, so the rest
        // of the fields agree with it.
        let current = match u.int_in_range(0..=3)? {
            0 => None,
            1 => Some(body(u, 2)?),
            _ => {
                let mut current = base.clone().unwrap_or_default();
                apply_patch(&mut current, &body(u, 2)?);
                Some(current)
            }
        };
        let op = match u.int_in_range(0..=2)? {
            0 => Op::Delete,
            1 => Op::Put(body(u, 2)?.into()),
            _ => Op::Patch(body(u, 2)?),
        };
        let versions = (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
        Ok(Self {
            base,
            current,
            op,
            versions,
        })
    }

    fn check(&self) {
        let (base_version, version, deleted) = self.versions;
        match check_base(base_version.map(Version), Version(version), deleted) {
            BaseCheck::Current => assert!(
                base_version.is_none_or(|b| b == version || (b == 0 && deleted)),
                "{:?}",
                self.versions
            ),
            BaseCheck::Ahead => assert!(base_version.is_some_and(|b| b > version)),
            BaseCheck::Stale(b) => assert!(b.0 < version && base_version == Some(b.0)),
        }
        self.check_direct();
        let (base, current) = (self.base.as_ref(), self.current.as_ref());
        let decisions = [Strategy::Reject, Strategy::ServerWins, Strategy::ClientWins]
            .map(|strategy| (strategy, three_way(base, current, &self.op, strategy)));
        for (strategy, d) in &decisions {
            assert!(
                d.conflicting_fields.windows(2).all(|w| w[0] < w[1]),
                "unsorted: {d:?}"
            );
            let allowed = match strategy {
                Strategy::Reject => [Outcome::Merged, Outcome::Conflict],
                _ => [Outcome::Merged, Outcome::Resolved],
            };
            assert!(allowed.contains(&d.outcome), "{strategy:?}: {d:?}");
            if d.outcome == Outcome::Conflict {
                assert_eq!(d.write, None);
            }
            if matches!(self.op, Op::Delete) {
                self.check_delete(*strategy, d);
            } else {
                self.check_fields(*strategy, d);
            }
        }
        // Without overlap, the strategy does not matter.
        if decisions[0].1.outcome == Outcome::Merged {
            assert_eq!(decisions[0].1, decisions[1].1);
            assert_eq!(decisions[0].1, decisions[2].1);
        }
    }

    fn check_direct(&self) {
        let current = self.current.as_ref();
        let d = apply_direct(current, &self.op);
        assert_eq!(d.outcome, Outcome::Applied);
        assert!(d.conflicting_fields.is_empty());
        match (&self.op, d.write) {
            (Op::Put(put), Some(NewState::Put(encoded))) => assert_eq!(&encoded, put.encoded()),
            (Op::Patch(patch), Some(NewState::Live(body))) => {
                for (k, v) in patch {
                    assert_eq!(body.get(k), (!v.is_null()).then_some(v));
                }
                let before = current.cloned().unwrap_or_default();
                for k in before.keys().chain(body.keys()) {
                    if !patch.contains_key(k) {
                        assert_eq!(body.get(k), before.get(k));
                    }
                }
            }
            (Op::Delete, Some(NewState::Tombstone)) => assert!(current.is_some()),
            (Op::Delete, None) => assert!(current.is_none()),
            (op, write) => panic!("{op:?} wrote {write:?}"),
        }
    }

    fn check_delete(&self, strategy: Strategy, d: &Decision) {
        match (&d.write, d.outcome) {
            (None, Outcome::Merged) => assert!(self.current.is_none()),
            (Some(NewState::Tombstone), Outcome::Merged) => {
                assert!(self.current.is_some() && d.conflicting_fields.is_empty());
            }
            (Some(NewState::Tombstone), Outcome::Resolved) => {
                assert_eq!(strategy, Strategy::ClientWins);
            }
            (None, Outcome::Conflict | Outcome::Resolved) => {
                assert_ne!(strategy, Strategy::ClientWins);
            }
            (write, outcome) => panic!("a delete wrote {write:?} as {outcome:?}"),
        }
    }

    /// The fields a put or patch changes relative to the base, each with
    /// the value it wants (`None`: removed), worked out here on its own.
    fn client_changes(&self) -> Vec<(String, Option<Value>)> {
        let base = self.base.as_ref();
        let wanted: Vec<(String, Option<Value>)> = match &self.op {
            Op::Patch(patch) => patch
                .iter()
                .map(|(k, v)| (k.clone(), (!v.is_null()).then(|| v.clone())))
                .collect(),
            Op::Put(put) => {
                let reference = base.or(self.current.as_ref());
                let mut keys: Vec<&String> = put.fields().keys().collect();
                keys.extend(reference.into_iter().flat_map(|r| r.keys()));
                keys.sort();
                keys.dedup();
                keys.into_iter()
                    .map(|k| (k.clone(), put.fields().get(k).cloned()))
                    .collect()
            }
            Op::Delete => Vec::new(),
        };
        wanted
            .into_iter()
            .filter(|(k, v)| base.is_none_or(|b| b.get(k) != v.as_ref()))
            .collect()
    }

    fn check_fields(&self, strategy: Strategy, d: &Decision) {
        let current = self.current.as_ref();
        let result = match &d.write {
            Some(NewState::Live(body)) => Some(body),
            None => current,
            Some(other) => panic!("a put or patch wrote {other:?}"),
        };
        let changes = self.client_changes();
        let conflicting = |k: &str| d.conflicting_fields.iter().any(|c| c == k);
        for (k, wanted) in &changes {
            let got = result.and_then(|r| r.get(k));
            let expected = match (strategy, d.outcome) {
                (Strategy::ClientWins, _) | (_, Outcome::Merged) => wanted.as_ref(),
                (Strategy::ServerWins, _) if conflicting(k) => current.and_then(|c| c.get(k)),
                (Strategy::ServerWins, _) => wanted.as_ref(),
                (Strategy::Reject, _) => current.and_then(|c| c.get(k)),
            };
            assert_eq!(got, expected, "{strategy:?} field {k}: {d:?}");
        }
        for k in &d.conflicting_fields {
            assert!(changes.iter().any(|(c, _)| c == k), "{k} is no change");
        }
        // Every other field is as it was (a tombstone brought back by
        // CLIENT_WINS starts from the base).
        let before = current.or(self.base.as_ref().filter(|_| result.is_some()));
        let keys = result
            .into_iter()
            .chain(before)
            .flat_map(|b| b.keys().cloned());
        for k in keys {
            if !changes.iter().any(|(c, _)| *c == k) {
                assert_eq!(
                    result.and_then(|r| r.get(&k)),
                    before.and_then(|b| b.get(&k)),
                    "{strategy:?} touched {k}"
                );
            }
        }
    }
}
