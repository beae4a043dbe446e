//! Pull: one page of changes after a checkpoint.

use std::time::Duration;

use prost::Message;

use super::{SyncApi, convert, validate};
use crate::{
    auth::Identity,
    config::DEFAULT_PULL_LIMIT,
    error::Error,
    pb,
    store::{PageLimit, model::Seq},
};

/// Handles one Pull.
/// `wait` bounds how long it waits for this node to reach `since` or
/// `min_checkpoint`.
pub async fn handle(
    api: &SyncApi,
    req: pb::PullRequest,
    wait: Duration,
    identity: &Identity,
) -> Result<pb::PullResponse, Error> {
    validate::collections(&req.collections)?;
    validate::client_id(&req.client_id)?;
    let filter = identity.scope(req.collections)?;
    api.await_min_checkpoint(req.min_checkpoint, wait).await?;
    let from = super::Checkpoint {
        store_id: &req.store_id,
        since: req.since,
        seen: req.purge_horizon,
        epoch: req.checkpoint_epoch,
    };
    api.check_checkpoint(from, wait).await?;
    let limit = match req.limit {
        0 => DEFAULT_PULL_LIMIT,
        n => n,
    }
    .min(api.settings.pull_max_limit);
    let limit = PageLimit {
        docs: usize::try_from(limit).unwrap_or(usize::MAX),
        bytes: api.settings.message_budget,
    };
    let page = api
        .store
        .pull(Seq(req.since), Seq(req.purge_horizon), filter, limit)
        .await?;
    // Keep the response under the message cap: cut after the last document
    // that fits, and resume from its seq.
    let mut runs = convert::fit(
        page.documents.into_iter().map(convert::owned_document),
        api.settings.message_budget,
    )
    .into_iter();
    let documents = runs.next().unwrap_or_default();
    let (checkpoint, has_more) = match (runs.next(), documents.last()) {
        (Some(_), Some(last)) => (last.seq, true),
        _ => (page.checkpoint.0, page.has_more),
    };
    let last_mutation_id = match req.client_id.as_str() {
        "" => 0,
        client => api.store.last_mutation_id(&identity.client_key(client))?,
    };
    let response = pb::PullResponse {
        documents,
        checkpoint,
        has_more,
        last_mutation_id,
        store_id: api.store.store_id().to_string(),
        purge_horizon: page.horizon.0,
        checkpoint_epoch: api.epoch_of(checkpoint),
    };
    let size = response.encoded_len();
    match response.documents.first() {
        Some(doc) if size > api.settings.max_message_bytes => {
            Err(super::unservable(doc, size, api.settings.max_message_bytes))
        }
        _ => Ok(response),
    }
}
