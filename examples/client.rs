//! A tour of `deltasync::client`: put, a conditional patch, a conflict, a
//! batch, reads, a pull to the end and a short watch.
//!
//! ```sh
//! cargo run --release &                      # a server on 127.0.0.1:50051
//! cargo run --example client                 # or DELTASYNC_ENDPOINTS=http://a:50051,http://b:50051
//! ```

use std::time::Duration;

use deltasync::{
    client::{Client, ClientError, Mutation, PullOptions, WatchEvent, WatchOptions},
    pb::ConflictStrategy,
};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let endpoints = std::env::var("DELTASYNC_ENDPOINTS")
        .unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());
    let mut builder = Client::builder(endpoints.split(','))
        .client_id(format!("example-{}", std::process::id()))
        .timeout(Some(Duration::from_secs(5)));
    if let Ok(token) = std::env::var("DELTASYNC_TOKEN") {
        builder = builder.token(token);
    }
    let client = builder.build()?;

    // A put, then a patch against the version it made.
    let created = client
        .put("todos", "milk", json!({"title": "Buy milk", "done": false}))
        .await?;
    let version = created.document.as_ref().map_or(0, |d| d.version);
    println!("put: {:?} at version {version}", created.outcome);
    let patched = client
        .push_one(Mutation::patch("todos", "milk", json!({"done": true})).base_version(version))
        .await?;
    println!("patch: {:?}", patched.outcome);

    // The same base again touches `done` too: an overlap, rejected.
    let stale = client
        .push_one(
            Mutation::patch("todos", "milk", json!({"done": "later"}))
                .base_version(version)
                .on_conflict(ConflictStrategy::Reject),
        )
        .await?;
    println!(
        "stale patch: {:?}, conflicting fields {:?}",
        stale.outcome, stale.conflicting_fields
    );

    // A batch, all or nothing.
    let batch = client
        .push_atomic([
            Mutation::put("todos", "bread", json!({"title": "Bread"})),
            Mutation::put("todos", "eggs", json!({"title": "Eggs"})),
        ])
        .await?;
    println!(
        "batch: checkpoint {}, conflicts: {}",
        batch.checkpoint.seq,
        batch.has_conflict()
    );

    // Reads see this client's writes, on any node.
    for doc in client.get("todos", ["milk", "bread"]).await? {
        println!(
            "get: {}/{} v{} {:?}",
            doc.collection, doc.id, doc.version, doc.body
        );
    }
    let pages: Vec<_> = client
        .pull_all(PullOptions::default())
        .try_collect()
        .await?;
    let last = pages
        .last()
        .map(|p| p.checkpoint.clone())
        .unwrap_or_default();
    println!(
        "pull: {} documents in {} pages, checkpoint {}",
        last_count(&pages),
        pages.len(),
        last.seq
    );

    // A watch from that checkpoint: it resumes by itself after a restart.
    let mut watch = client.watch(WatchOptions {
        since: last,
        ..Default::default()
    });
    client.delete("todos", "eggs").await?;
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            event = watch.next() => match event {
                Some(Ok(WatchEvent::Changes { documents, checkpoint })) => {
                    for d in documents {
                        println!("watch: {}/{} deleted={} (checkpoint {})", d.collection, d.id, d.deleted, checkpoint.seq);
                    }
                    break;
                }
                Some(Ok(WatchEvent::Progress { .. })) => {}
                Some(Ok(WatchEvent::ResyncNeeded { reason, message })) => {
                    println!("resync needed ({reason:?}): {message}");
                    break;
                }
                Some(Err(e)) => return Err(e),
                None => break,
            },
        }
    }
    Ok(())
}

fn last_count(pages: &[deltasync::client::PullPage]) -> u64 {
    pages.last().map_or(0, |p| p.documents_so_far)
}
