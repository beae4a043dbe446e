//! Local replicas in tests: the `deltasync local` command line run as a
//! real process, and views compared with the server's.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
};

use deltasync::{
    client::{Client, PullOptions},
    replica::LocalReplica,
};
use futures_util::StreamExt;
use serde_json::{Map, Value};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_deltasync");

/// `deltasync local ARGS --dir DIR`, started with its output piped.
pub fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("local")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs")
}

/// `deltasync local ARGS --dir DIR`, run to its end.
pub async fn run(dir: &Path, args: &[&str]) -> Output {
    let child = spawn(dir, args);
    tokio::task::spawn_blocking(move || child.wait_with_output().expect("the binary runs"))
        .await
        .expect("join")
}

/// Its standard output, one JSON value per line.
pub fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// Its output after a success (exit 0), which it asserts.
pub fn ok(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    lines(out)
}

/// A failure: exit 1 and a one-line reason, returned.
pub fn failed(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reason = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(reason.lines().count(), 1, "{reason}");
    reason
}

/// A document as (id, version, deleted, body, pending).
pub type ViewRow = (String, u64, bool, Option<Map<String, Value>>, bool);

/// A collection of a replica's optimistic view.
pub fn view(r: &LocalReplica, collection: &str) -> Vec<ViewRow> {
    r.list(collection)
        .unwrap()
        .into_iter()
        .map(|d| {
            let doc = d.document;
            (doc.id, doc.version, doc.deleted, doc.body, d.pending)
        })
        .collect()
}

/// The server's Pull from 0 of a collection, in the same form (never
/// pending), sorted by id.
pub async fn server_view(url: &str, collection: &str) -> Vec<ViewRow> {
    let client = Client::connect([url]).unwrap();
    let mut pages = client.pull_all(PullOptions {
        collections: vec![collection.to_owned()],
        ..Default::default()
    });
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        for d in page.unwrap().documents {
            out.push((d.id, d.version, d.deleted, d.body, false));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The seed of a randomized test: `DELTASYNC_TEST_SEED`, else the clock
/// (each run tries a new history; a failure prints its seed to replay).
pub fn seed() -> u64 {
    std::env::var("DELTASYNC_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                .try_into()
                .unwrap_or(7)
        })
}
