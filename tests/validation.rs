//! Bad input: a clear INVALID_ARGUMENT naming the mutation and field, and
//! nothing written, ever.

mod common;

use common::*;
use deltasync::{
    pb::{self, GetRequest, PullRequest, PushRequest, SubscribeRequest},
    store::model::EncodedBody,
};
use prost_types::{Struct, Value, value::Kind};
use serde_json::json;
use tonic::Code;

/// Pushes `bad` after a valid mutation and checks the whole request fails
/// with INVALID_ARGUMENT mentioning `needle`, leaving the store untouched.
async fn refused(c: &mut Client, client_id: &str, bad: Vec<pb::Mutation>, needle: &str) {
    let mut mutations = vec![put("todos", "valid-first", json!({"ok": true}))];
    mutations.extend(bad);
    let err = c
        .push(PushRequest {
            client_id: client_id.into(),
            mutations,
            atomic: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
    assert!(
        err.message().contains(needle),
        "message {:?} should contain {needle:?}",
        err.message()
    );
    assert!(
        get(c, "todos", "valid-first").await.is_none(),
        "nothing written for {needle}"
    );
}

/// Rule: each malformed mutation fails the whole batch before any write.
#[tokio::test]
async fn every_invalid_mutation_is_refused_whole() {
    let s = TestServer::start_with(|c| {
        c.max_body_bytes = 1024;
        c.max_batch = 10;
    })
    .await;
    let mut c = s.client.clone();
    let j = || json!({});
    refused(
        &mut c,
        "",
        vec![put("", "x", j())],
        "mutations[1].collection",
    )
    .await;
    refused(
        &mut c,
        "",
        vec![put("has space", "x", j())],
        "mutations[1].collection",
    )
    .await;
    refused(
        &mut c,
        "",
        vec![put(&"c".repeat(129), "x", j())],
        "mutations[1].collection",
    )
    .await;
    refused(&mut c, "", vec![put("todos", "", j())], "mutations[1].id").await;
    refused(
        &mut c,
        "",
        vec![put("todos", &"i".repeat(257), j())],
        "mutations[1].id",
    )
    .await;
    refused(
        &mut c,
        "",
        vec![put("todos", "bell\u{7}", j())],
        "mutations[1].id",
    )
    .await;
    let no_op = pb::Mutation {
        collection: "todos".into(),
        id: "x".into(),
        ..Default::default()
    };
    refused(&mut c, "", vec![no_op], "mutations[1].op").await;
    refused(
        &mut c,
        "",
        vec![put("todos", "x", json!({"big": "b".repeat(2000)}))],
        "mutations[1].put",
    )
    .await;
    refused(
        &mut c,
        "",
        vec![patch("todos", "x", json!({"big": "b".repeat(2000)}))],
        "mutations[1].patch",
    )
    .await;
    refused(
        &mut c,
        "",
        (0..10).map(|i| put("todos", &i.to_string(), j())).collect(),
        "batch limit",
    )
    .await;
    refused(
        &mut c,
        "app",
        vec![put("todos", "a", j()).id(5), put("todos", "b", j()).id(5)],
        "mutations[2].mutation_id",
    )
    .await;
    refused(&mut c, "", vec![put("todos", "a", j()).id(1)], "client_id").await;
    refused(
        &mut c,
        "",
        vec![put("todos", "a", j()).on_conflict_raw(42)],
        "mutations[1].on_conflict",
    )
    .await;

    let mut nan = Struct::default();
    nan.fields.insert(
        "n".into(),
        Value {
            kind: Some(Kind::NumberValue(f64::INFINITY)),
        },
    );
    let m = pb::Mutation {
        collection: "todos".into(),
        id: "x".into(),
        op: Some(pb::mutation::Op::Put(EncodedBody::from_struct(&nan))),
        ..Default::default()
    };
    refused(&mut c, "", vec![m], "mutations[1].put.n").await;

    // A well-framed Struct entry whose contents are not a map entry: the
    // server keeps bodies in their wire form, so it must still check them.
    let garbage = <EncodedBody as prost::Message>::decode(&[0x0a, 0x02, 0xff, 0xff][..])
        .expect("framing is valid");
    let m = pb::Mutation {
        collection: "todos".into(),
        id: "x".into(),
        op: Some(pb::mutation::Op::Patch(garbage)),
        ..Default::default()
    };
    refused(&mut c, "", vec![m], "mutations[1].patch").await;

    let err = c
        .push(PushRequest {
            client_id: "bad\nid".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The store is still empty: nothing was half-applied.
    let page = pull_page(&mut c, 0).await;
    assert_eq!((page.documents.len(), page.checkpoint), (0, 0));
}

/// Rule: bad names in reads are INVALID_ARGUMENT too.
#[tokio::test]
async fn invalid_reads_are_refused() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    let err = c
        .get(GetRequest {
            collection: "".into(),
            ids: vec!["x".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get(GetRequest {
            collection: "todos".into(),
            ids: vec!["".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("ids[0]"));
    let err = c
        .pull(PullRequest {
            collections: vec!["a b".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .subscribe(SubscribeRequest {
            collections: vec!["".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Rule: Get returns current documents, tombstones included, in the order
/// asked, omitting unknown ids.
#[tokio::test]
async fn get_returns_known_documents_in_order() {
    let s = TestServer::start().await;
    let mut c = s.client.clone();
    push(
        &mut c,
        "",
        vec![
            put("todos", "a", json!({"n": 1})),
            put("todos", "b", json!({"n": 2})),
            delete("todos", "b"),
        ],
    )
    .await;
    let req = GetRequest {
        collection: "todos".into(),
        ids: vec!["b".into(), "zzz".into(), "a".into()],
        ..Default::default()
    };
    let docs = c.get(req).await.unwrap().into_inner().documents;
    let got: Vec<_> = docs
        .iter()
        .map(|d| (d.id.as_str(), d.version, d.deleted))
        .collect();
    assert_eq!(got, vec![("b", 2, true), ("a", 1, false)]);
}

trait RawStrategy {
    fn on_conflict_raw(self, v: i32) -> Self;
}

impl RawStrategy for pb::Mutation {
    fn on_conflict_raw(mut self, v: i32) -> Self {
        self.on_conflict = v;
        self
    }
}

/// Rule: Get has no pages, so a response that would exceed the message cap
/// is refused whole with RESOURCE_EXHAUSTED rather than failing in transport.
#[tokio::test]
async fn oversized_get_is_refused_clearly() {
    let s = TestServer::start_with(|c| {
        c.max_message_bytes = 64 * 1024;
        // Every result of a full batch must fit a message: 1024 bytes each.
        c.max_batch = c.max_batch.min(50);
        c.max_body_bytes = 40 * 1024;
    })
    .await;
    let mut c = s.client.clone();
    let big = "g".repeat(30 * 1024);
    push(
        &mut c,
        "",
        (0..3)
            .map(|i| put("blobs", &i.to_string(), json!({"d": big})))
            .collect(),
    )
    .await;
    let one = c
        .get(GetRequest {
            collection: "blobs".into(),
            ids: vec!["0".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.documents.len(), 1);
    let ids = (0..3).map(|i| i.to_string()).collect();
    let err = c
        .get(GetRequest {
            collection: "blobs".into(),
            ids,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("ask for fewer ids"),
        "{}",
        err.message()
    );
}
