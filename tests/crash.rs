//! Crash safety: `kill -9` the real server binary mid-load, restart it on the
//! same store, and check that nothing acknowledged was lost and nothing is
//! applied twice.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use deltasync::pb::{Outcome, PullRequest, PushRequest};
use serde_json::json;

const CLIENTS: u64 = 4;
const ROUNDS: usize = 3;
const ACKS_BEFORE_KILL: usize = 300;

/// Client `c`'s mutation `id`: create its own document (base version 0).
fn create(c: u64, id: u64) -> PushRequest {
    PushRequest {
        client_id: format!("client-{c}"),
        mutations: vec![
            put("crash", &format!("c{c}-m{id}"), json!({"c": c, "id": id}))
                .base(0)
                .id(id),
        ],
        atomic: false,
    }
}

/// An acknowledged write: document id → (version, seq).
type Acked = Arc<Mutex<HashMap<String, (u64, u64)>>>;

/// Rule: every acknowledged push survives `kill -9` with its acknowledged
/// version and seq; the seq has no gap after recovery; retrying the
/// unacknowledged mutation ids gives APPLIED or DUPLICATE, never a double
/// apply. Repeated over several kills in one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_pushes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let acked: Acked = Arc::default();
    let mut next_id: HashMap<u64, u64> = (0..CLIENTS).map(|c| (c, 1)).collect();

    for round in 0..ROUNDS {
        let server = process::Process::start(&data, &[], |_| {});
        let before = acked.lock().unwrap().len();
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let mut client = server.client().await;
            let (acked, first) = (acked.clone(), next_id[&c]);
            tasks.push(tokio::spawn(async move {
                let mut id = first;
                loop {
                    match client.push(create(c, id)).await {
                        Ok(resp) => {
                            let doc = resp
                                .into_inner()
                                .results
                                .remove(0)
                                .document
                                .expect("document");
                            acked
                                .lock()
                                .unwrap()
                                .insert(doc.id.clone(), (doc.version, doc.seq));
                            id += 1;
                        }
                        // The server died: `id` may or may not have been applied.
                        Err(_) => return id,
                    }
                }
            }));
        }
        // Kill once enough has been acknowledged in this round, mid-load.
        tokio::time::timeout(Duration::from_secs(60), async {
            while acked.lock().unwrap().len() < before + ACKS_BEFORE_KILL {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the load makes progress");
        server.kill_9();
        let mut in_flight = HashMap::new();
        for (c, t) in tasks.into_iter().enumerate() {
            in_flight.insert(c as u64, t.await.unwrap());
        }

        let server = process::Process::start(&data, &[], |_| {});
        let mut client = server.client().await;
        // Every acknowledged write is there, exactly as acknowledged.
        let acked_now = acked.lock().unwrap().clone();
        let mut docs = HashMap::new();
        let mut since = 0;
        loop {
            let page = client
                .pull(PullRequest {
                    since,
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for d in page.documents {
                assert_eq!(d.version, 1, "round {round}: {} applied twice", d.id);
                assert!(docs.insert(d.id.clone(), d.seq).is_none());
            }
            since = page.checkpoint;
            if !page.has_more {
                break;
            }
        }
        for (id, (version, seq)) in &acked_now {
            assert_eq!(
                (1, docs.get(id)),
                (*version, Some(seq)),
                "round {round}: acknowledged {id} lost or changed"
            );
        }
        // Each write made one change, so the seqs are exactly 1..=head.
        let head = client
            .push(PushRequest::default())
            .await
            .unwrap()
            .into_inner()
            .checkpoint;
        let mut seqs: Vec<u64> = docs.values().copied().collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=head).collect::<Vec<_>>(),
            "round {round}: the seq has a gap or a hole"
        );

        // Retrying the unacknowledged ids never applies anything twice.
        for (c, id) in in_flight {
            let result = client
                .push(create(c, id))
                .await
                .unwrap()
                .into_inner()
                .results
                .remove(0);
            let outcome = outcome(&result);
            assert!(
                matches!(outcome, Outcome::Applied | Outcome::Duplicate),
                "round {round}: retry gave {outcome:?}"
            );
            let doc = result.document.expect("document");
            assert_eq!(doc.version, 1, "round {round}: retry applied twice");
            acked.lock().unwrap().insert(doc.id, (doc.version, doc.seq));
            next_id.insert(c, id + 1);
        }
        server.kill_9();
    }
    assert!(acked.lock().unwrap().len() >= ROUNDS * ACKS_BEFORE_KILL);
}
