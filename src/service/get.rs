//! Get: current documents by id.

use super::{SyncApi, convert, validate};
use crate::{error::Error, pb};

/// Handles one Get.
pub async fn handle(api: &SyncApi, req: pb::GetRequest) -> Result<pb::GetResponse, Error> {
    validate::collection("collection", &req.collection)?;
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
    let docs = api.store.get(req.collection, req.ids).await?;
    Ok(pb::GetResponse {
        documents: docs.into_iter().map(convert::owned_document).collect(),
    })
}
