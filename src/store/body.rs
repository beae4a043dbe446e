//! Document bodies in their encoded form.
//!
//! A body is kept, stored and served as the protobuf encoding of a
//! `google.protobuf.Struct`. `build.rs` maps every `Struct` field of the
//! contract to [`EncodedBody`], so a document read from the store goes to the
//! wire as the bytes it was stored as: Pull, Get and Subscribe never parse or
//! re-encode a body. Clients see no difference; the bytes on the wire are a
//! `Struct` as before.
//!
//! The JSON form ([`Body`]) is built only where a rule needs the fields:
//! validating a client's body, applying a patch and the three-way check.

use std::fmt;

use prost::{
    Message,
    bytes::{Buf, BufMut, Bytes},
    encoding::{DecodeContext, WireType},
};
use prost_types::{ListValue, Struct, Value as PbValue, value::Kind};
use serde_json::{Number, Value};

use super::model::Body;

/// `google.protobuf.Struct`'s only field: `map<string, Value> fields = 1`.
const FIELDS_TAG: u32 = 1;

/// The protobuf encoding of a `google.protobuf.Struct`; empty for `{}` (and
/// for a tombstone). Cheap to clone.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncodedBody(Bytes);

impl EncodedBody {
    /// The canonical encoding of a JSON object (fields in key order).
    pub fn encode(body: &Body) -> Self {
        Self::from_struct(&body_to_struct(body))
    }

    /// The encoding of a proto `Struct`, as is.
    pub fn from_struct(s: &Struct) -> Self {
        Self(s.encode_to_vec().into())
    }

    /// Wraps bytes received as they are (a replicated record's body).
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self(bytes)
    }

    /// The encoded bytes, shared (no copy).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Wraps bytes read from a record, copying them.
    pub fn from_stored(bytes: &[u8]) -> Self {
        Self(Bytes::copy_from_slice(bytes))
    }

    /// The JSON object. Fails, naming the path under `path`, on bytes that are
    /// not a `Struct`, a value without a kind, or a non-finite number (which
    /// JSON cannot hold).
    pub fn to_json(&self, path: &str) -> Result<Body, String> {
        let s = Struct::decode(self.0.as_ref())
            .map_err(|e| format!("{path}: not a google.protobuf.Struct: {e}"))?;
        struct_to_body(s, path)
    }

    /// True if these bytes are exactly `encode` of the object they decode
    /// to (see `store::canonical`): then they can be stored as they are.
    pub fn is_canonical(&self) -> bool {
        super::canonical::is_canonical(&self.0)
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for `{}`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for EncodedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_json("body") {
            Ok(body) => write!(f, "EncodedBody({})", Value::Object(body)),
            Err(_) => write!(f, "EncodedBody({} undecodable bytes)", self.0.len()),
        }
    }
}

/// The wire form: the bytes themselves. Decoding keeps the `fields` entries
/// verbatim (unknown fields are dropped); whether each entry is a valid
/// `Value` is checked by [`EncodedBody::to_json`], where the error can name
/// the mutation.
impl Message for EncodedBody {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag != FIELDS_TAG || wire_type != WireType::LengthDelimited {
            return prost::encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut entry = Bytes::new();
        prost::encoding::bytes::merge(wire_type, &mut entry, buf, ctx)?;
        // Reuses the allocation: nothing else holds these bytes yet.
        let mut out = Vec::from(std::mem::take(&mut self.0));
        prost::encoding::encode_key(FIELDS_TAG, WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(entry.len() as u64, &mut out);
        out.extend_from_slice(&entry);
        self.0 = out.into();
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A proto `Struct` as a JSON object; see [`EncodedBody::to_json`].
fn struct_to_body(s: Struct, path: &str) -> Result<Body, String> {
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

/// A JSON object as a proto `Struct`.
fn body_to_struct(body: &Body) -> Struct {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Body {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn json_round_trips_through_the_encoding() {
        let body = json(r#"{"a":1.5,"b":[true,null,"x"],"c":{"d":-2}}"#);
        assert_eq!(EncodedBody::encode(&body).to_json("put").unwrap(), body);
        assert!(EncodedBody::encode(&Body::new()).is_empty());
    }

    #[test]
    fn the_wire_form_is_a_struct() {
        let body = json(r#"{"s":"x","l":[1,"y",{"z":null}],"o":{"b":false}}"#);
        let encoded = EncodedBody::encode(&body);
        // What a client sends as a Struct decodes to the same bytes, and what
        // we send decodes as a Struct.
        let wire = body_to_struct(&body).encode_to_vec();
        assert_eq!(
            <EncodedBody as Message>::decode(wire.as_slice()).unwrap(),
            encoded
        );
        assert_eq!(
            Struct::decode(encoded.encode_to_vec().as_slice()).unwrap(),
            body_to_struct(&body)
        );
    }

    #[test]
    fn unknown_fields_are_dropped_and_garbage_is_refused() {
        let mut wire = EncodedBody::encode(&json(r#"{"k":1}"#)).as_bytes().to_vec();
        prost::encoding::encode_key(7, WireType::Varint, &mut wire);
        prost::encoding::encode_varint(5, &mut wire);
        let decoded = <EncodedBody as Message>::decode(wire.as_slice()).unwrap();
        assert_eq!(decoded, EncodedBody::encode(&json(r#"{"k":1}"#)));
        // A length prefix running past the end.
        assert!(<EncodedBody as Message>::decode(&[0x0a, 0x05, 0x01][..]).is_err());
        // Well-framed entries whose contents are not a Value.
        let bad = EncodedBody(Bytes::from_static(&[0x0a, 0x02, 0xff, 0xff]));
        assert!(bad.to_json("put").unwrap_err().starts_with("put:"));
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
        let err = EncodedBody::from_struct(&s).to_json("put").unwrap_err();
        assert!(err.starts_with("put.n:"), "{err}");
        let mut s = Struct::default();
        s.fields.insert("k".into(), PbValue { kind: None });
        let err = EncodedBody::from_struct(&s).to_json("put").unwrap_err();
        assert!(err.contains("no kind"), "{err}");
    }
}
