//! Get: current documents by id.

use std::time::Duration;

use prost::Message;

use super::{SyncApi, convert, validate};
use crate::{
    auth::{Identity, Permission},
    error::Error,
    pb,
};

/// Handles one Get.
/// `wait` bounds how long it waits for this node to reach `min_checkpoint`.
pub async fn handle(
    api: &SyncApi,
    req: pb::GetRequest,
    wait: Duration,
    identity: &Identity,
) -> Result<pb::GetResponse, Error> {
    validate::collection("collection", &req.collection)?;
    identity.require(Permission::Read, &req.collection, "collection")?;
    if req.ids.len() > api.settings.max_batch {
        return Err(Error::invalid(
            "ids",
            format!(
                "{} ids exceed the limit of {}",
                req.ids.len(),
                api.settings.max_batch
            ),
        ));
    }
    for (i, id) in req.ids.iter().enumerate() {
        validate::id(format_args!("ids[{i}]"), id)?;
    }
    api.await_min_checkpoint(req.min_checkpoint, wait).await?;
    let docs = api.store.get(req.collection, req.ids).await?;
    let documents: Vec<pb::Document> = docs.into_iter().map(convert::owned_document).collect();
    // Get has no pages: a response over the cap is refused whole, clearly.
    let size: usize = documents.iter().map(|d| d.encoded_len() + 8).sum();
    if size > api.settings.message_budget {
        return Err(Error::ResourceExhausted(format!(
            "the {} documents found are {size} bytes encoded, over the {} bytes a response may carry; ask for fewer ids",
            documents.len(),
            api.settings.message_budget
        )));
    }
    Ok(pb::GetResponse { documents })
}
