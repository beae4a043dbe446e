//! Write forwarding: a Push sent to a replica goes to its primary as it
//! came (the primary validates it), and is answered once this replica has
//! applied the answer's checkpoint, so the client reads its own write here
//! without asking. Safe to retry: mutation ids make Push idempotent.

use tonic::{Request, transport::Channel};

use super::Node;
use crate::{
    error::Error,
    pb::{self, sync_service_client::SyncServiceClient},
    store::model::Seq,
};

/// A lazily connected client of the primary's `SyncService`.
pub fn client(
    url: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    max_message_bytes: usize,
) -> Result<SyncServiceClient<Channel>, String> {
    let mut endpoint = Channel::from_shared(url.to_owned())
        .map_err(|e| format!("--replicate-from {url}: {e}"))?
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("--replicate-from {url}: {e}"))?;
    }
    let channel = endpoint.connect_lazy();
    Ok(SyncServiceClient::new(channel).max_decoding_message_size(max_message_bytes))
}

/// Sends `request` to the primary and waits until this node has applied
/// the answer's checkpoint (at most `wait`). The primary's answer is the
/// truth about the push either way: if this node is not there in time, it
/// is still given (a failure here would make a client retry a committed
/// push), and the client reads its write with `min_checkpoint`.
pub async fn push(
    node: &Node,
    mut primary: SyncServiceClient<Channel>,
    request: Request<pb::PushRequest>,
    wait: std::time::Duration,
) -> Result<pb::PushResponse, Error> {
    let (metadata, _, message) = request.into_parts();
    let mut forwarded = Request::new(message);
    // Credentials and the caller's deadline go along.
    *forwarded.metadata_mut() = metadata;
    let response = primary
        .push(forwarded)
        .await
        .map_err(|status| Error::Forwarded(from_primary(status)))?
        .into_inner();
    if let Err(e) = node.wait_applied(Seq(response.checkpoint), wait).await {
        tracing::warn!(cause = %e, "answering a forwarded push before this replica applied it");
    }
    Ok(response)
}

/// The primary's answer as the caller gets it. A call that broke in
/// transport (the primary died or the connection dropped mid-call) has an
/// unknown outcome: UNAVAILABLE, which clients retry with the same
/// mutation ids, not the UNKNOWN or INTERNAL the transport reports.
fn from_primary(status: tonic::Status) -> tonic::Status {
    let broken = std::error::Error::source(&status).is_some();
    if broken && status.code() != tonic::Code::Unavailable {
        return tonic::Status::unavailable(format!(
            "the primary did not answer the forwarded push ({}); its outcome is unknown: \
             retry it with the same mutation ids",
            status.message()
        ));
    }
    status
}
