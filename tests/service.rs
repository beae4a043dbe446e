//! The service as operators see it: restarts keep state, health answers.

mod common;

use common::*;
use deltasync::pb::Outcome;
use serde_json::json;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Rule: a restart keeps documents, the seq, the store id and client
/// mutation ids (so retries after a restart are still DUPLICATE).
#[tokio::test]
async fn restart_keeps_data_seq_and_client_ids() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let before = push(
        &mut c,
        "app",
        vec![
            put("todos", "a", json!({"n": 1})).id(1),
            put("todos", "b", json!({})).id(2),
        ],
    )
    .await;
    push(
        &mut c,
        "app",
        vec![patch("todos", "a", json!({"n": 2})).id(3)],
    )
    .await;

    let s = s.restart().await;
    let mut c = s.client.clone();
    let retry = push(
        &mut c,
        "app",
        vec![patch("todos", "a", json!({"n": 2})).id(3)],
    )
    .await;
    assert_eq!(outcome(&retry.results[0]), Outcome::Duplicate);
    assert_eq!(
        (retry.store_id.as_str(), retry.last_mutation_id),
        (before.store_id.as_str(), 3)
    );
    let next = push(&mut c, "app", vec![put("todos", "c", json!({})).id(4)]).await;
    assert_eq!(next.checkpoint, 4, "the seq continues without a gap");
    let a = get(&mut c, "todos", "a").await.unwrap();
    assert_eq!((a.version, json(&a)), (2, json!({"n": 2})));
    // The delta log survived too: a stale base still merges.
    let merged = push_one(
        &mut c,
        "",
        patch("todos", "a", json!({"other": true})).base(1),
    )
    .await;
    assert_eq!(outcome(&merged), Outcome::Merged);
    let page = pull_page(&mut c, 0).await;
    assert_eq!(page.documents.len(), 3);
}

/// Rule: grpc.health.v1 reports the sync service (and the server) SERVING.
#[tokio::test]
async fn health_reports_serving() {
    let s = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "deltasync.v1.SyncService"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
}
