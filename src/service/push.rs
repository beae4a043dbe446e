//! Push: validate the whole batch, then hand it to the group-commit writer.

use prost::Message;

use super::{SyncApi, convert, validate};
use crate::{
    auth::{Identity, Meter, Permission},
    error::Error,
    pb,
    store::{
        StoreError,
        model::{
            Body, EncodedBody, Mutation, MutationResult, Op, PushBatch, PushOutcome, PutBody,
            Version,
        },
    },
};

/// Handles one Push.
/// `identity` is the caller: its client ids are its own (see
/// [`Identity::client_key`]).
pub async fn handle(
    api: &SyncApi,
    req: pb::PushRequest,
    identity: &Identity,
    deadline: Option<std::time::Instant>,
) -> Result<pb::PushResponse, Error> {
    // Counted from before its commit until answered (see
    // `Node::push_started`); refused once shutdown began.
    let Some(_pushing) = api.node.push_started() else {
        return Err(StoreError::Closed.into());
    };
    let batch = decode(api, req, identity)?;
    let mutations = u64::try_from(batch.mutations.len()).unwrap_or(u64::MAX);
    identity.charge(Meter::Mutations, mutations)?;
    let count = batch.mutations.len();
    let outcome = api.store.push_by(batch, deadline).await?;
    tracing::debug!(mutations = count, checkpoint = %outcome.checkpoint, "push committed");
    // --sync-replicas: answered once enough replicas hold it.
    api.node.await_replicated(outcome.checkpoint).await?;
    let mut response = answer(&outcome, &api.store.store_id(), api.settings.message_budget);
    response.checkpoint_epoch = api.epoch_of(response.checkpoint);
    Ok(response)
}

/// Fails whole, naming the first mutation the caller may not write.
pub fn authorize(req: &pb::PushRequest, identity: &Identity) -> Result<(), Error> {
    for (i, m) in req.mutations.iter().enumerate() {
        identity.require(
            Permission::Write,
            &m.collection,
            format_args!("mutations[{i}]"),
        )?;
    }
    Ok(())
}

/// The answer to a committed push, within `budget` bytes encoded, counting
/// everything. Every result keeps its id, outcome and document metadata
/// (the configuration guarantees those fit: see `RESULT_SKELETON_BYTES`);
/// in request order, each result then gets its conflicting fields and its
/// body while they fit. A cut list is flagged; a missing body is told by
/// `body` being absent on a document that is not `deleted`.
fn answer(outcome: &PushOutcome, store_id: &str, budget: usize) -> pb::PushResponse {
    // Almost always everything fits: then one size check instead of three
    // per result.
    let whole = pb::PushResponse {
        results: outcome.results.iter().map(whole).collect(),
        last_mutation_id: outcome.last_mutation_id,
        checkpoint: outcome.checkpoint.0,
        store_id: store_id.to_owned(),
        checkpoint_epoch: 0,
    };
    if whole.encoded_len() <= budget {
        return whole;
    }
    let mut response = pb::PushResponse {
        results: outcome.results.iter().map(skeleton).collect(),
        last_mutation_id: outcome.last_mutation_id,
        checkpoint: outcome.checkpoint.0,
        store_id: store_id.to_owned(),
        checkpoint_epoch: 0,
    };
    let mut room = budget.saturating_sub(response.encoded_len());
    for (full, result) in outcome.results.iter().zip(&mut response.results) {
        let before = framed(result);
        // Fields first: a body can be fetched with Get, an overlap cannot.
        let mut cost = 0;
        for field in &full.conflicting_fields {
            let len = field.len();
            let next = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
            if cost + next > room {
                break;
            }
            cost += next;
            result.conflicting_fields.push(field.clone());
        }
        result.conflicting_fields_truncated =
            result.conflicting_fields.len() < full.conflicting_fields.len();
        // The result's own length prefix may have grown: give back fields
        // until the exact size fits.
        while framed(result).saturating_sub(before) > room {
            result.conflicting_fields.pop();
            result.conflicting_fields_truncated = true;
        }
        room -= framed(result).saturating_sub(before);
        let before = framed(result);
        if let (Some(doc), Some(full_doc)) = (&mut result.document, &full.document)
            && !full_doc.deleted
        {
            doc.body = Some(full_doc.body.clone());
            let after = framed(result);
            if after.saturating_sub(before) <= room {
                room -= after.saturating_sub(before);
            } else if let Some(doc) = &mut result.document {
                doc.body = None;
            }
        }
    }
    debug_assert!(response.encoded_len() <= budget);
    response
}

/// A result with everything: its document's body (unless deleted) and all
/// its conflicting fields.
fn whole(r: &MutationResult) -> pb::MutationResult {
    let mut result = skeleton(r);
    result.conflicting_fields.clone_from(&r.conflicting_fields);
    result.conflicting_fields_truncated = false;
    if let (Some(doc), Some(full)) = (&mut result.document, &r.document)
        && !full.deleted
    {
        doc.body = Some(full.body.clone());
    }
    result
}

/// A result with its document's metadata only: no body, no fields (flagged
/// as cut if there are any, until they are added).
fn skeleton(r: &MutationResult) -> pb::MutationResult {
    pb::MutationResult {
        mutation_id: r.mutation_id,
        outcome: convert::outcome(r.outcome).into(),
        document: r.document.as_ref().map(convert::metadata),
        conflicting_fields: Vec::new(),
        conflicting_fields_truncated: !r.conflicting_fields.is_empty(),
    }
}

/// What a result takes inside the response: tag, length prefix, message.
fn framed(result: &pb::MutationResult) -> usize {
    let len = result.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Validates everything before anything is written; the first problem fails
/// the whole request, naming the mutation and field.
fn decode(api: &SyncApi, req: pb::PushRequest, identity: &Identity) -> Result<PushBatch, Error> {
    let settings = &api.settings;
    validate::client_id(&req.client_id)?;
    if req.mutations.len() > settings.max_batch {
        return Err(Error::invalid(
            "mutations",
            format!(
                "{} mutations exceed the batch limit of {}",
                req.mutations.len(),
                settings.max_batch
            ),
        ));
    }
    let mut last_id = 0;
    let mut mutations = Vec::with_capacity(req.mutations.len());
    for (i, m) in req.mutations.into_iter().enumerate() {
        let at = |field: &str| format!("mutations[{i}].{field}");
        // Names built only for an error: this runs for every mutation.
        validate::collection(format_args!("mutations[{i}].collection"), &m.collection)?;
        validate::id(format_args!("mutations[{i}].id"), &m.id)?;
        if m.mutation_id != 0 {
            if req.client_id.is_empty() {
                return Err(Error::invalid(
                    at("mutation_id"),
                    "a tracked mutation_id needs a client_id",
                ));
            }
            if m.mutation_id <= last_id {
                return Err(Error::invalid(
                    at("mutation_id"),
                    format!(
                        "{} is not greater than the previous {last_id}",
                        m.mutation_id
                    ),
                ));
            }
            last_id = m.mutation_id;
        }
        let strategy = pb::ConflictStrategy::try_from(m.on_conflict).map_err(|_| {
            Error::invalid(
                at("on_conflict"),
                format!("unknown strategy {}", m.on_conflict),
            )
        })?;
        let strategy = convert::strategy(strategy)
            .unwrap_or_else(|| settings.policy.for_collection(&m.collection));
        let op = match m.op {
            None => {
                return Err(Error::invalid(
                    at("op"),
                    "one of put, patch or delete is required",
                ));
            }
            Some(pb::mutation::Op::Delete(())) => Op::Delete,
            Some(pb::mutation::Op::Put(body)) => {
                check_size(settings.max_body_bytes, &body, || at("put"))?;
                if body.is_canonical() {
                    // Most clients send exactly what would be stored.
                    Op::Put(PutBody::canonical(body))
                } else {
                    Op::Put(body_of(body, &at("put"))?.into())
                }
            }
            Some(pb::mutation::Op::Patch(body)) => {
                check_size(settings.max_body_bytes, &body, || at("patch"))?;
                Op::Patch(body_of(body, &at("patch"))?)
            }
        };
        mutations.push(Mutation {
            mutation_id: m.mutation_id,
            collection: m.collection,
            id: m.id,
            base_version: m.base_version.map(Version),
            op,
            strategy,
        });
    }
    Ok(PushBatch {
        client_id: identity.client_key(&req.client_id),
        updated_by: identity.author(&req.client_id),
        mutations,
        atomic: req.atomic,
    })
}

/// Refuses a body over `max` bytes encoded; `field` names it (built only
/// for the error).
fn check_size(max: usize, body: &EncodedBody, field: impl Fn() -> String) -> Result<(), Error> {
    let size = body.len();
    if size > max {
        return Err(Error::invalid(
            field(),
            format!("body is {size} bytes encoded; the limit is {max}"),
        ));
    }
    Ok(())
}

/// The fields of a body, or why it is not a valid JSON object.
fn body_of(body: EncodedBody, field: &str) -> Result<Body, Error> {
    body.to_json(field).map_err(Error::InvalidArgument)
}
