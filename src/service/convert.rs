//! Every conversion between proto and domain types.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use prost_types::{ListValue, Struct, Timestamp, Value as PbValue, value::Kind};
use serde_json::{Number, Value};

use crate::{
    pb,
    store::model::{Body, Document, Outcome, Strategy},
};

/// A proto `Struct` as a JSON object. Fails (naming the path) on a value
/// without a kind or a non-finite number, which JSON cannot hold.
pub fn struct_to_body(s: Struct, path: &str) -> Result<Body, String> {
    s.fields
        .into_iter()
        .map(|(k, v)| {
            let value = value_to_json(v, &format!("{path}.{k}"))?;
            Ok((k, value))
        })
        .collect()
}

fn value_to_json(v: PbValue, path: &str) -> Result<Value, String> {
    Ok(match v.kind {
        None => return Err(format!("{path}: value has no kind")),
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => Value::Number(
            number(n).ok_or_else(|| format!("{path}: number must be finite, got {n}"))?,
        ),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_body(s, path)?),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Largest integer an f64 holds exactly (2^53).
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// A finite f64 as JSON; whole numbers become JSON integers, so `1` stays `1`.
fn number(n: f64) -> Option<Number> {
    if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INT {
        // Exact: n is whole and within ±2^53, so the cast loses nothing.
        #[allow(clippy::cast_possible_truncation)]
        return Some(Number::from(n as i64));
    }
    Number::from_f64(n)
}

/// A JSON object as a proto `Struct`, moving its strings.
pub fn body_into_struct(body: Body) -> Struct {
    Struct {
        fields: body
            .into_iter()
            .map(|(k, v)| (k, json_into_value(v)))
            .collect(),
    }
}

fn json_into_value(v: Value) -> PbValue {
    let kind = match v {
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_into_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(body_into_struct(map)),
        scalar => return json_to_value(&scalar),
    };
    PbValue { kind: Some(kind) }
}

/// A JSON object as a proto `Struct`.
pub fn body_to_struct(body: &Body) -> Struct {
    Struct {
        fields: body
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(body_to_struct(map)),
    };
    PbValue { kind: Some(kind) }
}

/// A domain document as sent on the wire.
pub fn document(doc: &Document) -> pb::Document {
    pb::Document {
        collection: doc.collection.clone(),
        id: doc.id.clone(),
        version: doc.version.0,
        body: (!doc.deleted).then(|| body_to_struct(&doc.body)),
        deleted: doc.deleted,
        seq: doc.seq.0,
        updated_at: Some(timestamp(doc.updated_at)),
        updated_by: doc.updated_by.clone(),
    }
}

/// As [`document`], moving the strings and the body out of an owned document.
pub fn owned_document(doc: Document) -> pb::Document {
    let body = (!doc.deleted).then(|| body_into_struct(doc.body));
    pb::Document {
        collection: doc.collection,
        id: doc.id,
        version: doc.version.0,
        body,
        deleted: doc.deleted,
        seq: doc.seq.0,
        updated_at: Some(timestamp(doc.updated_at)),
        updated_by: doc.updated_by,
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A domain outcome on the wire.
pub fn outcome(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Applied => pb::Outcome::Applied,
        Outcome::Merged => pb::Outcome::Merged,
        Outcome::Resolved => pb::Outcome::Resolved,
        Outcome::Conflict => pb::Outcome::Conflict,
        Outcome::Duplicate => pb::Outcome::Duplicate,
        Outcome::NotApplied => pb::Outcome::NotApplied,
    }
}

/// A wire strategy; `None` for UNSPECIFIED (use the collection default).
pub fn strategy(s: pb::ConflictStrategy) -> Option<Strategy> {
    match s {
        pb::ConflictStrategy::Unspecified => None,
        pb::ConflictStrategy::Reject => Some(Strategy::Reject),
        pb::ConflictStrategy::ServerWins => Some(Strategy::ServerWins),
        pb::ConflictStrategy::ClientWins => Some(Strategy::ClientWins),
    }
}

/// Splits documents (in seq order) into runs whose encoded size fits in
/// `budget` bytes. A document bigger than the budget still goes alone (the
/// configuration guarantees it fits a message). Each run ends with the seq of
/// its last document.
pub fn fit(docs: impl IntoIterator<Item = pb::Document>, budget: usize) -> Vec<Vec<pb::Document>> {
    let mut runs: Vec<Vec<pb::Document>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for doc in docs {
        let len = doc.encoded_len() + 8; // field tag and length prefix
        if !current.is_empty() && size + len > budget {
            runs.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(doc);
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trips_through_json() {
        let body: Body =
            serde_json::from_str(r#"{"a":1.5,"b":[true,null,"x"],"c":{"d":-2}}"#).unwrap();
        let back = struct_to_body(body_to_struct(&body), "put").unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn owned_and_borrowed_conversions_agree() {
        let body: Body =
            serde_json::from_str(r#"{"s":"x","l":[1,"y",{"z":null}],"o":{"b":false}}"#).unwrap();
        assert_eq!(body_into_struct(body.clone()), body_to_struct(&body));
    }

    #[test]
    fn non_finite_numbers_and_empty_values_are_refused_with_their_path() {
        let mut s = Struct::default();
        s.fields.insert(
            "n".into(),
            PbValue {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        assert!(struct_to_body(s, "put").unwrap_err().starts_with("put.n:"));
        let mut s = Struct::default();
        s.fields.insert("k".into(), PbValue { kind: None });
        assert!(struct_to_body(s, "put").unwrap_err().contains("no kind"));
    }

    #[test]
    fn fit_cuts_by_bytes_but_never_drops_a_document() {
        let doc = |seq| pb::Document {
            id: "x".repeat(100),
            seq,
            ..Default::default()
        };
        let runs = fit((1..=10).map(doc), 250);
        assert_eq!(runs.iter().map(Vec::len).sum::<usize>(), 10);
        assert!(runs.iter().all(|r| r.len() == 2));
        assert_eq!(fit([doc(1)], 10).len(), 1);
    }
}
