//! Whether a received body is already in its canonical encoding, checked
//! by walking its bytes without building anything.
//!
//! A put's body is stored as [`EncodedBody::encode`] of its JSON form:
//! fields in key order, each value as prost writes it. Building the JSON
//! form and encoding it again costs a few allocations per field, and most
//! clients (prost, and any protobuf library that writes a `Struct` from a
//! sorted map) already send exactly those bytes. For them the walk below
//! proves it, and the request's bytes are stored as they came; the JSON form
//! is built later only if a rule reads the fields. Anything else (unsorted
//! or repeated keys, non-minimal varints, unknown fields, `-0`, a non-finite
//! number, a value without a kind, bad UTF-8, nesting deeper than prost
//! decodes) is not canonical, and takes the full path, which normalises it
//! or refuses it with a precise error as before.
//!
//! [`EncodedBody::encode`]: super::body::EncodedBody::encode

/// How deep messages may nest (counting every `Struct`, map entry, `Value`
/// and `ListValue`): prost's own decoding limit, so nothing accepted here
/// is refused when decoded.
const MAX_DEPTH: u32 = 100;

/// True if `bytes`, the encoding of a `google.protobuf.Struct`, is exactly
/// the canonical encoding of the JSON object it decodes to.
pub fn is_canonical(bytes: &[u8]) -> bool {
    fields(bytes, MAX_DEPTH).is_some()
}

/// A `Struct`'s map entries: keys strictly ascending (so none repeats), each
/// entry the key (omitted when empty, as prost omits defaults) then the value.
fn fields(mut buf: &[u8], depth: u32) -> Option<()> {
    let depth = depth.checked_sub(1)?;
    let mut previous: Option<&[u8]> = None;
    while !buf.is_empty() {
        let mut entry = delimited(&mut buf, 0x0a)?;
        let key = if entry.first() == Some(&0x0a) {
            let key = delimited(&mut entry, 0x0a)?;
            if key.is_empty() {
                return None;
            }
            key
        } else {
            &[][..]
        };
        if previous.is_some_and(|p| p >= key) {
            return None;
        }
        std::str::from_utf8(key).ok()?;
        previous = Some(key);
        let value = delimited(&mut entry, 0x12)?;
        if !entry.is_empty() {
            return None;
        }
        // The entry is a message level of its own to prost.
        self::value(value, depth.checked_sub(1)?)?;
    }
    Some(())
}

/// A `google.protobuf.Value`: exactly one kind, canonically written.
fn value(mut buf: &[u8], depth: u32) -> Option<()> {
    let depth = depth.checked_sub(1)?;
    let (&tag, rest) = buf.split_first()?;
    buf = rest;
    let rest = match tag {
        // null_value: the enum's only value, 0.
        0x08 => buf.strip_prefix(&[0])?,
        // number_value: finite, and not -0 (which JSON makes 0).
        0x11 => {
            let (bits, rest) = buf.split_first_chunk::<8>()?;
            let n = f64::from_le_bytes(*bits);
            if !n.is_finite() || (n == 0.0 && n.is_sign_negative()) {
                return None;
            }
            rest
        }
        // string_value.
        0x1a => {
            let mut rest = buf;
            std::str::from_utf8(length_prefixed(&mut rest)?).ok()?;
            rest
        }
        // bool_value: 0 or 1.
        0x20 => match buf.split_first()? {
            (0 | 1, rest) => rest,
            _ => return None,
        },
        // struct_value.
        0x2a => {
            let mut rest = buf;
            fields(length_prefixed(&mut rest)?, depth)?;
            rest
        }
        // list_value: `repeated Value values = 1`.
        0x32 => {
            let mut rest = buf;
            let mut list = length_prefixed(&mut rest)?;
            let depth = depth.checked_sub(1)?;
            while !list.is_empty() {
                self::value(delimited(&mut list, 0x0a)?, depth)?;
            }
            rest
        }
        _ => return None,
    };
    rest.is_empty().then_some(())
}

/// The payload of a length-delimited field with key byte `key`.
fn delimited<'a>(buf: &mut &'a [u8], key: u8) -> Option<&'a [u8]> {
    *buf = buf.strip_prefix(&[key])?;
    length_prefixed(buf)
}

/// A minimal varint length, then that many bytes.
fn length_prefixed<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut len: u64 = 0;
    let mut used = 0;
    loop {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        len |= u64::from(b & 0x7f).checked_shl(7 * used)?;
        used += 1;
        if b & 0x80 == 0 {
            // A longer encoding than needed (trailing zero groups) is not
            // what prost writes.
            if used > 1 && b == 0 {
                return None;
            }
            break;
        }
        if used >= 10 {
            return None;
        }
    }
    let len = usize::try_from(len).ok()?;
    if len > buf.len() {
        return None;
    }
    let (payload, rest) = buf.split_at(len);
    *buf = rest;
    Some(payload)
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::{ListValue, Struct, Value, value::Kind};

    use super::*;
    use crate::store::{body::EncodedBody, model::Body};

    fn json(s: &str) -> Body {
        serde_json::from_str(s).unwrap()
    }

    /// Rule: what `EncodedBody::encode` writes is canonical.
    #[test]
    fn the_canonical_encoding_is_recognised() {
        for doc in [
            r#"{}"#,
            r#"{"v":"x"}"#,
            r#"{"":1,"a":null,"b":[true,false,null,"s",1.5,-2,{}],"c":{"d":{"e":[]}},"z":0}"#,
            r#"{"big":1e300,"neg":-0.5,"ü":"ß"}"#,
        ] {
            let encoded = EncodedBody::encode(&json(doc));
            assert!(is_canonical(encoded.as_bytes()), "{doc}");
        }
    }

    fn kind(k: Kind) -> Value {
        Value { kind: Some(k) }
    }

    /// Rule: bytes that would be stored differently, or refused, are not
    /// canonical, so they take the full path.
    #[test]
    fn anything_else_is_not() {
        let one = |k: Kind| {
            let mut s = Struct::default();
            s.fields.insert("k".into(), kind(k));
            s.encode_to_vec()
        };
        assert!(is_canonical(&one(Kind::NumberValue(0.0))));
        assert!(!is_canonical(&one(Kind::NumberValue(-0.0))));
        assert!(!is_canonical(&one(Kind::NumberValue(f64::NAN))));
        assert!(!is_canonical(&one(Kind::NumberValue(f64::INFINITY))));
        assert!(!is_canonical(&one(Kind::NullValue(3))));
        let mut s = Struct::default();
        s.fields.insert("k".into(), Value { kind: None });
        assert!(!is_canonical(&s.encode_to_vec()));
        // Keys out of order, and a repeated key.
        let b = one(Kind::BoolValue(true));
        let a = {
            let mut s = Struct::default();
            s.fields.insert("a".into(), kind(Kind::BoolValue(true)));
            s.encode_to_vec()
        };
        assert!(is_canonical(&[a.clone(), b.clone()].concat()));
        assert!(!is_canonical(&[b.clone(), a].concat()));
        assert!(!is_canonical(&[b.clone(), b.clone()].concat()));
        // A trailing unknown field inside the value, a truncated body,
        // a non-minimal length, bad UTF-8.
        let mut extra = b.clone();
        extra[1] += 2;
        extra[6] += 2;
        extra.extend_from_slice(&[0x38, 0x01]);
        assert!(!is_canonical(&extra));
        assert!(!is_canonical(&b[..b.len() - 1]));
        assert!(!is_canonical(&[0x0a, 0x80, 0x00]));
        assert!(!is_canonical(&[0x0a, 0x05, 0x0a, 0x01, 0xff, 0x12, 0x00]));
        // Deeper than prost decodes.
        let mut deep = kind(Kind::NullValue(0));
        for _ in 0..MAX_DEPTH {
            deep = kind(Kind::ListValue(ListValue { values: vec![deep] }));
        }
        assert!(!is_canonical(&one(deep.kind.unwrap())));
    }
}
