//! Generators the fuzz targets share: they read libFuzzer's bytes as a
//! recipe for well-formed input (a JSON body, a `Struct`), so the targets
//! reach the code behind a decoder, not only its first length check; and a
//! corrupter that damages well-formed bytes the way a bad disk would.

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use prost_types::{ListValue, Struct, Value as PbValue, value::Kind};
use serde_json::{Number, Value};

use deltasync::store::model::Body;

/// Field names are mostly from a small set, so that two bodies touch the
/// same fields often.
const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];

/// A field name: one of [`KEYS`], or now and then any string.
pub fn key(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 8)? {
        u.arbitrary()
    } else {
        Ok(u.choose(&KEYS)?.to_string())
    }
}

/// A JSON object of up to four fields, nested up to `depth` more levels.
pub fn body(u: &mut Unstructured, depth: u8) -> Result<Body> {
    let len = u.int_in_range(0..=4)?;
    let mut body = Body::new();
    for _ in 0..len {
        body.insert(key(u)?, value(u, depth)?);
    }
    Ok(body)
}

/// A JSON value from a small domain (so two sides often agree), with a
/// few arbitrary numbers and strings.
pub fn value(u: &mut Unstructured, depth: u8) -> Result<Value> {
    let kinds = if depth == 0 { 4 } else { 6 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.int_in_range(0..=3)?),
        3 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        4 => Value::String(if u.ratio(1, 4)? {
            u.arbitrary()?
        } else {
            u.choose(&["", "x", "y"])?.to_string()
        }),
        5 => {
            let len = u.int_in_range(0..=2)?;
            Value::Array(
                (0..len)
                    .map(|_| value(u, depth - 1))
                    .collect::<Result<_>>()?,
            )
        }
        _ => Value::Object(body(u, depth - 1)?),
    })
}

/// A `google.protobuf.Struct` as a client may send one: besides what JSON
/// holds, values without a kind, unknown null enums and non-finite numbers.
pub fn pb_struct(u: &mut Unstructured, depth: u8) -> Result<Struct> {
    let len = u.int_in_range(0..=4)?;
    let mut fields = BTreeMap::new();
    for _ in 0..len {
        fields.insert(key(u)?, pb_value(u, depth)?);
    }
    Ok(Struct { fields })
}

fn pb_value(u: &mut Unstructured, depth: u8) -> Result<PbValue> {
    let kinds = if depth == 0 { 6 } else { 8 };
    let kind = match u.int_in_range(0..=kinds)? {
        0 => None,
        1 => Some(Kind::NullValue(u.int_in_range(-1..=1)?)),
        2 => Some(Kind::BoolValue(u.arbitrary()?)),
        3 => Some(Kind::NumberValue(f64::from(u.int_in_range(-3..=3)?))),
        4 => Some(Kind::NumberValue(*u.choose(&[
            f64::NAN,
            f64::INFINITY,
            -0.0,
            0.5,
            9_007_199_254_740_993.0,
        ])?)),
        5 => Some(Kind::NumberValue(u.arbitrary()?)),
        6 => Some(Kind::StringValue(u.arbitrary()?)),
        7 => Some(Kind::StructValue(pb_struct(u, depth - 1)?)),
        _ => Some(Kind::ListValue(ListValue {
            values: (0..u.int_in_range(0..=3)?)
                .map(|_| pb_value(u, depth - 1))
                .collect::<Result<_>>()?,
        })),
    };
    Ok(PbValue { kind })
}

/// Damages well-formed bytes: up to three flipped, dropped or inserted
/// bytes, or a cut; usually none, so the intact form is checked too.
pub fn corrupt(mut bytes: Vec<u8>, u: &mut Unstructured) -> Result<Vec<u8>> {
    for _ in 0..u.int_in_range(0..=3)? {
        if bytes.is_empty() {
            break;
        }
        let at = u.choose_index(bytes.len())?;
        match u.int_in_range(0..=3)? {
            0 => bytes[at] ^= u.int_in_range(1..=255)?,
            1 => drop(bytes.remove(at)),
            2 => bytes.insert(at, u.arbitrary()?),
            _ => bytes.truncate(at),
        }
    }
    Ok(bytes)
}
