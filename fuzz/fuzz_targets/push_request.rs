//! Bytes as a `PushRequest`, then validated and decoded with the pieces
//! the Push handler uses (`service::push::decode` is private). The bytes
//! are read one of three ways, by their first byte: as the request itself,
//! as one body on the wire (a `Struct`), or as a recipe for a well-formed
//! request (bodies with odd values: no kind, NaN) that is encoded, maybe
//! damaged, and decoded again, so the checks behind the framing are reached.
//!
//! The handler stops at the first problem; this goes on through every
//! check of every mutation, so a bad name does not hide the body.
//!
//! Holds: nothing panics; every refusal is INVALID_ARGUMENT; a body the
//! server accepts reads back the same after it is encoded for storage.

#![no_main]

use deltasync::{
    error::Error,
    pb,
    service::{convert, validate},
    store::model::{Body, EncodedBody, PutBody},
};
use deltasync_fuzz::{corrupt, pb_struct};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use prost::Message;

/// A body limit well above what libFuzzer's inputs reach, so bodies get
/// as far as `to_json`.
const MAX_BODY_BYTES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let bytes = match how % 3 {
        0 => rest.to_vec(),
        1 => {
            if let Ok(body) = EncodedBody::decode(rest) {
                let _ = accepted(body, "put").map(PutBody::from);
            }
            return;
        }
        _ => {
            let mut u = Unstructured::new(rest);
            match request(&mut u).and_then(|req| corrupt(req.encode_to_vec(), &mut u)) {
                Ok(bytes) => bytes,
                Err(_) => return,
            }
        }
    };
    if let Ok(req) = pb::PushRequest::decode(bytes.as_slice()) {
        check(req);
    }
});

/// A request as a client may build one: names mostly valid, any ids and
/// strategies, and bodies with every kind of value.
fn request(u: &mut Unstructured) -> Result<pb::PushRequest> {
    let mut mutations = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let op = match u.int_in_range(0..=3)? {
            0 => None,
            1 => Some(pb::mutation::Op::Delete(())),
            2 => Some(pb::mutation::Op::Put(EncodedBody::from_struct(&pb_struct(
                u, 3,
            )?))),
            _ => Some(pb::mutation::Op::Patch(EncodedBody::from_struct(
                &pb_struct(u, 3)?,
            ))),
        };
        mutations.push(pb::Mutation {
            mutation_id: u.int_in_range(0..=3)?,
            collection: name(u, "todos")?,
            id: name(u, "1")?,
            base_version: u.arbitrary()?,
            on_conflict: u.int_in_range(-1..=4)?,
            op,
        });
    }
    Ok(pb::PushRequest {
        client_id: name(u, "client")?,
        mutations,
        atomic: u.arbitrary()?,
    })
}

/// `valid`, or now and then any string.
fn name(u: &mut Unstructured, valid: &str) -> Result<String> {
    if u.ratio(1, 8)? {
        u.arbitrary()
    } else {
        Ok(valid.to_owned())
    }
}

/// Each check the handler makes, with every refusal told as
/// INVALID_ARGUMENT.
fn check(req: pb::PushRequest) {
    refused(validate::client_id(&req.client_id));
    let mut last_id = 0;
    for (i, m) in req.mutations.into_iter().enumerate() {
        let at = |field: &str| format!("mutations[{i}].{field}");
        refused(validate::collection(at("collection"), &m.collection));
        refused(validate::id(at("id"), &m.id));
        if m.mutation_id != 0 {
            if req.client_id.is_empty() || m.mutation_id <= last_id {
                refused::<()>(Err(Error::invalid(at("mutation_id"), "out of order")));
            }
            last_id = m.mutation_id;
        }
        if let Ok(strategy) = pb::ConflictStrategy::try_from(m.on_conflict) {
            let _ = convert::strategy(strategy);
        }
        match m.op {
            None | Some(pb::mutation::Op::Delete(())) => {}
            Some(pb::mutation::Op::Put(body)) => {
                let _ = refused(accepted(body, &at("put")).map(PutBody::from));
            }
            Some(pb::mutation::Op::Patch(body)) => {
                let _ = refused(accepted(body, &at("patch")));
            }
        }
    }
}

/// A refusal is INVALID_ARGUMENT.
fn refused<T>(result: Result<T, Error>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            None
        }
    }
}

/// The handler's `body_of`: the size limit, then the fields. What it
/// accepts reads back the same once stored in the canonical encoding.
fn accepted(body: EncodedBody, field: &str) -> Result<Body, Error> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Error::invalid(field, "body too large"));
    }
    // The Debug form decodes the body too.
    let _ = format!("{body:?}");
    let fields = body.to_json(field).map_err(Error::InvalidArgument)?;
    let stored = EncodedBody::from_stored(EncodedBody::encode(&fields).as_bytes());
    let read = stored.to_json("stored").expect("a stored body decodes");
    assert_eq!(read, fields, "a body changed on its way through the store");
    Ok(fields)
}
