//! The CLI's JSON forms, hand-written after the proto3 JSON mapping as
//! grpcurl prints it: lowerCamelCase names in proto field order, uint64 as
//! strings, enums by name, timestamps in RFC 3339 (0, 3, 6 or 9 fractional
//! digits), fields at their default value left out. Also the JSON form of
//! a mutation that `push -f` reads.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::{
    client::{Checkpoint, Document, Mutation, MutationResult, Op},
    pb,
    replica::{Conflict, LocalDocument, LocalOp, Pending},
};

/// A JSON object written field by field, in the order given (the proto's
/// field order), leaving out fields at their default value. Each field is
/// kept as its JSON text.
#[derive(Default)]
struct Object(Vec<(&'static str, String)>);

impl Object {
    fn string(mut self, name: &'static str, v: &str) -> Self {
        if !v.is_empty() {
            self.0.push((name, Value::String(v.to_owned()).to_string()));
        }
        self
    }

    /// A uint64: a JSON string, as the mapping says (JSON numbers lose
    /// precision past 2^53 in many parsers).
    fn uint64(mut self, name: &'static str, v: u64) -> Self {
        if v != 0 {
            self.0.push((name, format!("\"{v}\"")));
        }
        self
    }

    fn bool(mut self, name: &'static str, v: bool) -> Self {
        if v {
            self.0.push((name, "true".to_owned()));
        }
        self
    }

    fn value(mut self, name: &'static str, v: Option<Value>) -> Self {
        if let Some(v) = v {
            self.0.push((name, value(&v)));
        }
        self
    }

    fn object(mut self, name: &'static str, v: Option<Object>) -> Self {
        if let Some(v) = v {
            self.0.push((name, v.line()));
        }
        self
    }

    fn objects(mut self, name: &'static str, v: Vec<Object>) -> Self {
        if !v.is_empty() {
            let items: Vec<String> = v.into_iter().map(Object::line).collect();
            self.0.push((name, format!("[{}]", items.join(","))));
        }
        self
    }

    /// One line of JSON.
    fn line(self) -> String {
        let fields: Vec<String> = self
            .0
            .into_iter()
            .map(|(k, v)| format!("{}:{v}", Value::String(k.to_owned())))
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// A JSON value on one line, its numbers as grpcurl prints a
/// `google.protobuf.Value` (a double): a whole number below 1e21 without
/// exponent or fraction (`12345678901234567000` for 1.2345678901234567e19,
/// the shortest digits that read back as the same double, then zeros),
/// anything else as serde_json writes it.
pub fn value(v: &Value) -> String {
    let mut out = String::new();
    write_value(v, &mut out);
    out
}

fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => out.push_str(&number(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_value(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A double as grpcurl (Go's protojson, after JavaScript) writes it.
fn number(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e21 {
        // The shortest round-trip digits, e.g. "1.2345678901234567e19".
        let sci = format!("{f:e}");
        if let Some((mantissa, exp)) = sci.split_once('e')
            && let Ok(exp) = exp.parse::<usize>()
        {
            let (sign, mantissa) = match mantissa.strip_prefix('-') {
                Some(m) => ("-", m),
                None => ("", mantissa),
            };
            let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
            // A whole number: the exponent covers every digit after the
            // first.
            let zeros = (exp + 1).saturating_sub(digits.len());
            return format!("{sign}{digits}{}", "0".repeat(zeros));
        }
    }
    Value::from(f).to_string()
}

/// A document as grpcurl prints `deltasync.v1.Document`, on one line.
pub fn document(d: &Document) -> String {
    document_object(d).line()
}

fn document_object(d: &Document) -> Object {
    Object::default()
        .string("collection", &d.collection)
        .string("id", &d.id)
        .uint64("version", d.version)
        .value("body", d.body.clone().map(Value::Object))
        .bool("deleted", d.deleted)
        .uint64("seq", d.seq)
        .value(
            "updatedAt",
            d.updated_at.map(|t| Value::String(timestamp(t))),
        )
        .string("updatedBy", &d.updated_by)
}

/// A document of a local replica's optimistic view: the document as
/// [`document`] prints it, plus `"pending": true` when unacknowledged writes
/// are folded in.
pub fn local_document(d: &LocalDocument) -> String {
    document_object(&d.document)
        .bool("pending", d.pending)
        .line()
}

/// The JSON of an optional body: the object, or `null`.
fn body_or_null(b: Option<&crate::client::Body>) -> String {
    match b {
        Some(b) => value(&Value::Object(b.clone())),
        None => "null".to_owned(),
    }
}

/// The operation of a local write as `push -f` reads it: `"put": {...}`,
/// `"patch": {...}` or `"delete": {}`.
fn local_op(op: &LocalOp) -> (&'static str, String) {
    match op {
        LocalOp::Put(b) => ("put", body_or_null(Some(b))),
        LocalOp::Patch(b) => ("patch", body_or_null(Some(b))),
        LocalOp::Delete => ("delete", "{}".to_owned()),
    }
}

/// An outbox entry of a local replica: `{"mutationId", "collection", "id",
/// "baseVersion", "put"|"patch"|"delete", "held"}` (`held`: its document
/// has a parked conflict; `baseVersion` left out at 0).
pub fn pending(p: &Pending) -> String {
    let (name, op) = local_op(&p.entry.op);
    let mut o = Object::default()
        .uint64("mutationId", p.mutation_id)
        .string("collection", &p.entry.collection)
        .string("id", &p.entry.id)
        .uint64("baseVersion", p.entry.base_version);
    o.0.push((name, op));
    o.bool("held", p.held).line()
}

/// A parked conflict of a local replica: `{"collection", "id",
/// "mutationId", "base", "local", "server", "serverVersion",
/// "conflictingFields"}`; `base`, `local` and `server` are bodies, `null`
/// for no document (or a delete).
pub fn conflict(c: &Conflict) -> String {
    let mut o = Object::default()
        .string("collection", &c.collection)
        .string("id", &c.id)
        .uint64("mutationId", c.mutation_id);
    let server = c
        .server
        .as_ref()
        .filter(|d| !d.deleted)
        .and_then(|d| d.body.as_ref());
    o.0.push(("base", body_or_null(c.base.as_ref())));
    o.0.push(("local", body_or_null(c.local.as_ref())));
    o.0.push(("server", body_or_null(server)));
    let fields = (!c.conflicting_fields.is_empty()).then(|| {
        Value::Array(
            c.conflicting_fields
                .iter()
                .cloned()
                .map(Value::String)
                .collect(),
        )
    });
    o.uint64("serverVersion", c.server.as_ref().map_or(0, |d| d.version))
        .value("conflictingFields", fields)
        .line()
}

/// A push result as grpcurl prints `deltasync.v1.MutationResult`, plus
/// `appliedByEarlierAttempt: true` on a DUPLICATE that a retry of this
/// same command got (see `MutationResult::applied_by_earlier_attempt`).
pub fn result(r: &MutationResult) -> String {
    let fields = (!r.conflicting_fields.is_empty()).then(|| {
        Value::Array(
            r.conflicting_fields
                .iter()
                .cloned()
                .map(Value::String)
                .collect(),
        )
    });
    Object::default()
        .uint64("mutationId", r.mutation_id)
        .string("outcome", r.outcome.as_str_name())
        .object("document", r.document.as_ref().map(document_object))
        .value("conflictingFields", fields)
        .bool("conflictingFieldsTruncated", r.conflicting_fields_truncated)
        .bool("appliedByEarlierAttempt", r.applied_by_earlier_attempt)
        .line()
}

/// The line `pull --print-checkpoint` ends with: every field of the
/// checkpoint, uint64 as strings (`{"checkpoint":{"seq":"7","storeId":...,
/// "purgeHorizon":"0","epoch":"1"}}`), for `jq -r .checkpoint.seq`.
pub fn checkpoint(c: &Checkpoint) -> String {
    serde_json::json!({
        "checkpoint": {
            "seq": c.seq.to_string(),
            "storeId": c.store_id,
            "purgeHorizon": c.purge_horizon.to_string(),
            "epoch": c.epoch.to_string(),
        }
    })
    .to_string()
}

/// A node's status as grpcurl prints `deltasync.v1.StatusResponse`, with
/// the `endpoint` it was asked at first.
pub fn status(endpoint: &str, s: &pb::StatusResponse) -> String {
    let replicas = s
        .replicas
        .iter()
        .map(|r| {
            Object::default()
                .string("url", &r.url)
                .uint64("acked", r.acked)
                .uint64("lag", r.lag)
                .bool("sync", r.sync)
        })
        .collect();
    Object::default()
        .string("endpoint", endpoint)
        .string("role", role(s))
        .uint64("epoch", s.epoch)
        .string("storeId", &s.store_id)
        .uint64("head", s.head)
        .string("primary", &s.primary)
        .objects("replicas", replicas)
        .bool("deposed", s.deposed)
        .line()
}

/// The role's enum name (`ROLE_PRIMARY`).
pub fn role(s: &pb::StatusResponse) -> &'static str {
    pb::Role::try_from(s.role)
        .unwrap_or(pb::Role::Unspecified)
        .as_str_name()
}

/// A promotion as grpcurl prints `deltasync.v1.PromoteResponse`.
pub fn promoted(p: &pb::PromoteResponse) -> String {
    Object::default()
        .uint64("epoch", p.epoch)
        .uint64("head", p.head)
        .line()
}

/// RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as the mapping of
/// `google.protobuf.Timestamp` writes it.
pub fn timestamp(t: SystemTime) -> String {
    let nanos = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let text = if nanos == 0 {
        humantime::format_rfc3339_seconds(t)
    } else if nanos.is_multiple_of(1_000_000) {
        humantime::format_rfc3339_millis(t)
    } else if nanos.is_multiple_of(1_000) {
        humantime::format_rfc3339_micros(t)
    } else {
        humantime::format_rfc3339_nanos(t)
    };
    text.to_string()
}

/// A mutation from its JSON form, after the proto3 JSON mapping of
/// `deltasync.v1.Mutation` (without `mutationId`: the client assigns ids):
/// `{"collection": "todos", "id": "milk", "put": {...}}`, with exactly one
/// of `put` (an object), `patch` (an object) or `delete` (`{}`), and
/// optionally `baseVersion` (a number or a decimal string) and
/// `onConflict` (`CONFLICT_STRATEGY_REJECT`, `..._SERVER_WINS`,
/// `..._CLIENT_WINS`, or `reject`, `server_wins`, `client_wins`). The
/// proto field names (`base_version`, `on_conflict`) are accepted too, as
/// every proto3 JSON parser does. `what` names the input in errors.
pub fn mutation(v: Value, what: &str) -> Result<Mutation, String> {
    let Value::Object(map) = v else {
        return Err(format!("{what}: a mutation must be a JSON object"));
    };
    let (mut collection, mut id, mut op, mut base, mut strategy) = (None, None, None, None, None);
    for (key, value) in map {
        match key.as_str() {
            "collection" => collection = Some(string(value, what, "collection")?),
            "id" => id = Some(string(value, what, "id")?),
            "put" | "patch" | "delete" if op.is_some() => {
                return Err(format!("{what}: more than one of put, patch and delete"));
            }
            "put" => op = Some(Op::Put(object(value, what, "put")?)),
            "patch" => op = Some(Op::Patch(object(value, what, "patch")?)),
            "delete" => match value {
                Value::Object(m) if m.is_empty() => op = Some(Op::Delete),
                _ => return Err(format!("{what}: delete must be {{}}")),
            },
            "baseVersion" | "base_version" => base = Some(uint64(value, what, &key)?),
            "onConflict" | "on_conflict" => strategy = Some(conflict_strategy(&value, what)?),
            "mutationId" | "mutation_id" => {
                return Err(format!(
                    "{what}: {key} is assigned by the client (per --client-id); leave it out"
                ));
            }
            other => return Err(format!("{what}: unknown field `{other}`")),
        }
    }
    let collection = collection.ok_or_else(|| format!("{what}: collection is missing"))?;
    let id = id.ok_or_else(|| format!("{what}: id is missing"))?;
    let op = op.ok_or_else(|| format!("{what}: one of put, patch or delete is required"))?;
    Ok(Mutation {
        collection,
        id,
        op,
        base_version: base,
        on_conflict: strategy.unwrap_or(pb::ConflictStrategy::Unspecified),
    })
}

/// Every mutation of `text`: a JSON array, or JSON values one after the
/// other (JSON lines).
pub fn mutations(text: &str) -> Result<Vec<Mutation>, String> {
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of mutations: {e}"))?
    } else {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not JSON lines of mutations: {e}"))?
    };
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| mutation(v, &format!("mutation {}", i + 1)))
        .collect()
}

/// A conflict strategy by its enum name, its short name or its number.
pub fn conflict_strategy(v: &Value, what: &str) -> Result<pb::ConflictStrategy, String> {
    let parsed = match v {
        Value::String(s) => pb::ConflictStrategy::from_str_name(s).or_else(|| {
            pb::ConflictStrategy::from_str_name(&format!(
                "CONFLICT_STRATEGY_{}",
                s.to_ascii_uppercase().replace('-', "_")
            ))
        }),
        Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .and_then(|n| pb::ConflictStrategy::try_from(n).ok()),
        _ => None,
    };
    parsed
        .ok_or_else(|| format!("{what}: onConflict {v} is not reject, server_wins or client_wins"))
}

fn string(v: Value, what: &str, field: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(format!("{what}: {field} must be a string, not {other}")),
    }
}

fn object(v: Value, what: &str, field: &str) -> Result<Value, String> {
    match v {
        Value::Object(m) => Ok(Value::Object(m)),
        other => Err(format!(
            "{what}: {field} must be a JSON object, not {other}"
        )),
    }
}

fn uint64(v: Value, what: &str, field: &str) -> Result<u64, String> {
    match &v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("{what}: {field} must be an unsigned integer, not {v}"))
}

/// A JSON object given on the command line.
pub fn body_arg(text: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(Value::Object(m)),
        Ok(other) => Err(format!("the body must be a JSON object, not {other}")),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Map, json};

    use super::*;

    #[test]
    fn documents_print_as_grpcurl_does() {
        let d = Document {
            collection: "todos".into(),
            id: "milk".into(),
            version: 2,
            seq: 7,
            deleted: false,
            body: Some(Map::from_iter([("title".to_owned(), json!("Buy milk"))])),
            updated_at: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 753_977_000)),
            updated_by: String::new(),
        };
        assert_eq!(
            document(&d),
            r#"{"collection":"todos","id":"milk","version":"2","body":{"title":"Buy milk"},"seq":"7","updatedAt":"2023-11-14T22:13:20.753977Z"}"#
        );
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1)),
            "1970-01-01T00:00:01Z"
        );
    }

    #[test]
    fn big_whole_numbers_print_as_grpcurl_does() {
        let v = json!({"a": 1.234_567_890_123_456_7e19, "b": [-9.007_199_254_740_993e15, 1e20, 1e21, 0.5, 3, -2]});
        assert_eq!(
            value(&v),
            r#"{"a":12345678901234567000,"b":[-9007199254740992,100000000000000000000,1e+21,0.5,3,-2]}"#
        );
        let text = format!(
            "{:?}",
            serde_json::from_str::<Value>(&value(&v)).unwrap()["a"].as_f64()
        );
        assert_eq!(
            text, "Some(1.2345678901234567e19)",
            "reads back as the same double"
        );
    }

    #[test]
    fn mutations_read_as_json_lines_or_an_array() {
        let lines = r#"{"collection":"t","id":"a","put":{"x":1},"baseVersion":"3","onConflict":"CONFLICT_STRATEGY_CLIENT_WINS"}
            {"collection":"t","id":"b","delete":{},"base_version":2}"#;
        let ms = mutations(lines).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].base_version, Some(3));
        assert_eq!(ms[0].on_conflict, pb::ConflictStrategy::ClientWins);
        assert_eq!(ms[1].op, Op::Delete);
        let array =
            r#"[{"collection":"t","id":"a","patch":{"x":null},"onConflict":"server_wins"}]"#;
        assert_eq!(
            mutations(array).unwrap()[0].on_conflict,
            pb::ConflictStrategy::ServerWins
        );
        for bad in [
            r#"{"collection":"t","id":"a"}"#,
            r#"{"collection":"t","id":"a","put":{},"delete":{}}"#,
            r#"{"collection":"t","id":"a","put":[1]}"#,
            r#"{"collection":"t","id":"a","put":{},"mutationId":"1"}"#,
            r#"{"collection":"t","id":"a","put":{},"colour":1}"#,
        ] {
            assert!(mutations(bad).is_err(), "{bad}");
        }
    }
}
