//! Push: validate the whole batch, then hand it to the group-commit writer.

use prost::Message;

use super::{SyncApi, convert, validate};
use crate::{
    error::Error,
    pb,
    store::model::{Body, EncodedBody, Mutation, Op, PushBatch, Version},
};

/// Handles one Push.
pub async fn handle(api: &SyncApi, req: pb::PushRequest) -> Result<pb::PushResponse, Error> {
    let batch = decode(api, req)?;
    let count = batch.mutations.len();
    let outcome = api.store.push(batch).await?;
    tracing::debug!(mutations = count, checkpoint = %outcome.checkpoint, "push committed");
    // Bodies echo back while they fit the message cap; past it, documents
    // carry their metadata only (the caller can Get the rest).
    let mut budget = api.settings.message_budget;
    let results = outcome
        .results
        .iter()
        .map(|r| {
            let mut document = r.document.as_ref().map(convert::document);
            if let Some(doc) = &mut document {
                let len = doc.encoded_len();
                if len > budget {
                    doc.body = None;
                    budget = budget.saturating_sub(doc.encoded_len());
                } else {
                    budget -= len;
                }
            }
            pb::MutationResult {
                mutation_id: r.mutation_id,
                outcome: convert::outcome(r.outcome).into(),
                document,
                conflicting_fields: r.conflicting_fields.clone(),
            }
        })
        .collect();
    Ok(pb::PushResponse {
        results,
        last_mutation_id: outcome.last_mutation_id,
        checkpoint: outcome.checkpoint.0,
        store_id: api.store.store_id().to_owned(),
    })
}

/// Validates everything before anything is written; the first problem fails
/// the whole request, naming the mutation and field.
fn decode(api: &SyncApi, req: pb::PushRequest) -> Result<PushBatch, Error> {
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
        validate::collection(at("collection"), &m.collection)?;
        validate::id(at("id"), &m.id)?;
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
                Op::Put(body_of(settings.max_body_bytes, body, &at("put"))?.into())
            }
            Some(pb::mutation::Op::Patch(body)) => {
                Op::Patch(body_of(settings.max_body_bytes, body, &at("patch"))?)
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
        client_id: req.client_id,
        mutations,
        atomic: req.atomic,
    })
}

fn body_of(max: usize, body: EncodedBody, field: &str) -> Result<Body, Error> {
    let size = body.len();
    if size > max {
        return Err(Error::invalid(
            field,
            format!("body is {size} bytes encoded; the limit is {max}"),
        ));
    }
    body.to_json(field).map_err(Error::InvalidArgument)
}
