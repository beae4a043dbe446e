//! Local replicas syncing in the background ([`LocalReplica::start_sync`])
//! against a real `deltasync` process, and the events stream
//! ([`LocalReplica::events`]): local writes, server changes, conflicts
//! parked and resolved, resyncs; a receiver that lags is told so.

mod common;

use std::time::Duration;

use common::{
    cluster::{DataDir, wait_for},
    process::Process,
};
use deltasync::{
    client::{Client, ClientBuilder, RetryPolicy},
    replica::{
        Acknowledgement, BackgroundOptions, Events, LocalReplica, ReplicaEvent, ReplicaOptions,
        Resolution, ResolvedBy, Resolver, SyncStatus,
    },
};
use serde_json::{Value, json};

fn quick(b: ClientBuilder) -> ClientBuilder {
    b.retry(RetryPolicy {
        max_elapsed: Duration::from_millis(300),
        ..RetryPolicy::default()
    })
    .connect_timeout(Duration::from_millis(300))
}

fn init(dir: &std::path::Path, url: &str) -> LocalReplica {
    let options = ReplicaOptions::new([url])
        .collection("todos", Resolver::KeepLocal)
        .collection("notes", Resolver::Manual);
    LocalReplica::init(dir, options, quick).expect("init")
}

/// Short backoff, so a reconnect is quick.
fn fast() -> BackgroundOptions {
    BackgroundOptions {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    }
}

/// Waits (bounded) for the first event `matches` accepts, skipping others;
/// fails on a lag.
async fn next_matching(
    events: &mut Events,
    what: &str,
    mut matches: impl FnMut(&ReplicaEvent) -> bool,
) -> ReplicaEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Some(Ok(e)) if matches(&e) => return e,
                Some(Ok(_)) => {}
                Some(Err(lagged)) => panic!("{what}: {lagged}"),
                None => panic!("{what}: the events ended"),
            }
        }
    };
    tokio::time::timeout(common::cluster::PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: no such event"))
}

fn changes_of(e: &ReplicaEvent, id: &str) -> bool {
    matches!(e, ReplicaEvent::ServerChanges { documents, checkpoint: Some(_) }
        if documents.iter().any(|d| d.id == id))
}

async fn server_title(client: &Client, collection: &str, id: &str) -> Option<Value> {
    let doc = client.get(collection, [id]).await.ok()?.pop()?;
    doc.body.and_then(|b| b.get("title").cloned())
}

/// Rule: a background sync, without any call to `sync`, follows the server
/// (a server write shows in the view and as a `ServerChanges` event) and
/// pushes each local write as it is made (`Written`, then `Acknowledged`);
/// when the server is killed and started again on the same store and
/// address, it reconnects with backoff and goes on following from its
/// checkpoint; shut down, it stops.
#[tokio::test(flavor = "multi_thread")]
async fn a_background_sync_follows_the_server_and_pushes_local_writes() {
    let data = DataDir::new();
    let server = Process::start(data.as_ref(), &[], |_| {});
    let addr = server.addr.clone();
    let direct = Client::connect([server.url()]).unwrap();
    direct
        .put("todos", "before", json!({"title": "before"}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &server.url());
    let mut events = r.events();
    let handle = r.start_sync(fast());
    let mut status = handle.status();
    tokio::time::timeout(
        common::cluster::PATIENCE,
        status.wait_for(|s| matches!(s, SyncStatus::Following { .. })),
    )
    .await
    .expect("following")
    .unwrap();
    assert!(
        r.get("todos", "before").unwrap().is_some(),
        "caught up first"
    );

    // A server write reaches the view by itself.
    direct
        .put("todos", "milk", json!({"title": "Buy milk"}))
        .await
        .unwrap();
    next_matching(&mut events, "the server's write", |e| changes_of(e, "milk")).await;
    let milk = r.get("todos", "milk").unwrap().unwrap();
    assert_eq!(milk.document.body.unwrap()["title"], "Buy milk");
    assert!(!milk.pending);

    // A local write is pushed by itself.
    r.patch("todos", "milk", json!({"done": true})).unwrap();
    let written = next_matching(&mut events, "the local write", |e| {
        matches!(e, ReplicaEvent::Written { .. })
    })
    .await;
    let ReplicaEvent::Written { mutation_id, .. } = written else {
        unreachable!()
    };
    let acked = next_matching(
        &mut events,
        "its acknowledgement",
        |e| matches!(e, ReplicaEvent::Acknowledged { mutation_id: m, .. } if *m == mutation_id),
    )
    .await;
    assert!(matches!(
        acked,
        ReplicaEvent::Acknowledged {
            acknowledgement: Acknowledgement::Applied,
            version: 2,
            ..
        }
    ));
    let doc = direct.get("todos", ["milk"]).await.unwrap().remove(0);
    assert_eq!(doc.body.unwrap()["done"], true);

    // The server is killed and comes back on the same store and address.
    // (The watch reconnects on its own; the push of a write made
    // meanwhile fails, and the sync backs off.)
    server.kill_9();
    r.put(
        "todos",
        "offline",
        json!({"title": "written while the server was away"}),
    )
    .unwrap();
    wait_for("the push fails", async || {
        matches!(*status.borrow_and_update(), SyncStatus::Retrying { .. })
    })
    .await;
    let server = Process::start_at(&addr, data.as_ref(), &[], |_| {});
    let direct = Client::connect([server.url()]).unwrap();
    wait_for("the offline write is pushed", async || {
        server_title(&direct, "todos", "offline").await.is_some()
    })
    .await;
    direct
        .put("todos", "after", json!({"title": "after the restart"}))
        .await
        .unwrap();
    next_matching(&mut events, "a write after the restart", |e| {
        changes_of(e, "after")
    })
    .await;
    assert!(r.pending().unwrap().is_empty());

    handle.shutdown().await;
    assert_eq!(*status.borrow(), SyncStatus::Stopped);
    direct
        .put("todos", "unseen", json!({"title": "after the shutdown"}))
        .await
        .unwrap();
    r.put("todos", "kept", json!({"title": "pending"})).unwrap();
    // Nothing follows or pushes any more: a sync on demand still works.
    assert!(r.get("todos", "unseen").unwrap().is_none());
    assert_eq!(r.pending().unwrap().len(), 1);
    let report = r.sync().await.unwrap();
    assert_eq!(report.acknowledged, 1);
    assert!(r.get("todos", "unseen").unwrap().is_some());
}

/// Rule: every source of change is an event, sent after its commit:
/// a local write (`Written`), the server's changes (`ServerChanges`, from a
/// pull and from a push answer), a conflict parked (`Parked`) and settled
/// by hand (`Resolved` by `Hand`, resent under a new id) or by the
/// collection's resolver (`Resolved` by `Resolver`), and a resync
/// (`Resynced`).
#[tokio::test(flavor = "multi_thread")]
async fn every_source_of_change_is_an_event() {
    let data = DataDir::new();
    let server = Process::start(data.as_ref(), &[], |_| {});
    let direct = Client::connect([server.url()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = init(dir.path(), &server.url());
    let mut events = r.events();

    r.put("notes", "n", json!({"title": "mine"})).unwrap();
    let Some(Ok(ReplicaEvent::Written {
        mutation_id: 1,
        document,
    })) = events.try_recv()
    else {
        panic!("a Written event, at once");
    };
    assert!(document.pending);
    r.sync().await.unwrap();
    let all: Vec<_> = std::iter::from_fn(|| events.try_recv())
        .map(Result::unwrap)
        .collect();
    assert!(
        matches!(
            &all[..],
            [
                ReplicaEvent::ServerChanges {
                    checkpoint: None,
                    ..
                },
                ReplicaEvent::Acknowledged {
                    mutation_id: 1,
                    acknowledgement: Acknowledgement::Applied,
                    ..
                },
                ..
            ]
        ),
        "{all:#?}"
    );

    // Conflicts: one parked (manual), one settled by keep-local.
    r.patch("notes", "n", json!({"title": "mine again"}))
        .unwrap();
    r.put("todos", "t", json!({"title": "mine"})).unwrap();
    direct
        .patch("notes", "n", json!({"title": "theirs"}))
        .await
        .unwrap();
    direct
        .put("todos", "t", json!({"title": "theirs"}))
        .await
        .unwrap();
    // The pull first, then the pushes conflict.
    r.sync().await.unwrap();
    let mut parked = None;
    let mut by_resolver = None;
    let mut pulled = false;
    while let Some(e) = events.try_recv() {
        match e.unwrap() {
            ReplicaEvent::ServerChanges {
                checkpoint: Some(_),
                documents,
            } => pulled |= documents.iter().any(|d| d.id == "n"),
            ReplicaEvent::Parked { mutation_id, .. } => parked = Some(mutation_id),
            ReplicaEvent::Resolved {
                by: ResolvedBy::Resolver,
                resolution: Resolution::KeepLocal,
                resent_as: Some(_),
                ..
            } => by_resolver = Some(()),
            _ => {}
        }
    }
    assert!(pulled, "the server's changes, from the pull");
    let parked = parked.expect("the manual conflict parked");
    assert!(by_resolver.is_some(), "the keep-local conflict settled");
    r.resolve("notes", "n", Resolution::KeepLocal).unwrap();
    let Some(Ok(ReplicaEvent::Resolved {
        mutation_id,
        by: ResolvedBy::Hand,
        resent_as: Some(new),
        ..
    })) = events.try_recv()
    else {
        panic!("a Resolved event by hand");
    };
    assert_eq!(mutation_id, parked);
    assert!(new > parked);

    // A resync: the server's store is replaced (same address).
    let addr = server.addr.clone();
    server.kill_9();
    let other = DataDir::new();
    let _server = Process::start_at(&addr, other.as_ref(), &[], |_| {});
    r.sync().await.unwrap();
    let all: Vec<_> = std::iter::from_fn(|| events.try_recv())
        .map(Result::unwrap)
        .collect();
    assert!(
        all.iter()
            .any(|e| matches!(e, ReplicaEvent::Resynced { .. })),
        "{all:#?}"
    );
}

/// Rule: a receiver that falls more than the capacity (a small one here)
/// behind is told how
/// many events it missed (it never misses them silently), then goes on
/// with the newest.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_receiver_learns_it_lagged() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 16;
    let options = ReplicaOptions {
        event_capacity: capacity,
        ..ReplicaOptions::new(["http://127.0.0.1:9"]).collection("todos", Resolver::Manual)
    };
    let r = LocalReplica::init(dir.path(), options, quick).unwrap();
    let mut slow = r.events();
    let extra = 5;
    for i in 0..capacity + extra {
        r.put("todos", &format!("t{}", i % 10), json!({"i": i}))
            .unwrap();
    }
    let Some(Err(lagged)) = slow.recv().await else {
        panic!("the receiver is told it lagged");
    };
    assert_eq!(lagged.0, u64::try_from(extra).unwrap());
    let Some(Ok(ReplicaEvent::Written { mutation_id, .. })) = slow.recv().await else {
        panic!("then the oldest kept event");
    };
    assert_eq!(mutation_id, u64::try_from(extra + 1).unwrap());
}
