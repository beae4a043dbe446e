//! The `deltasync` subcommands: the real binary against real servers, its
//! JSON output parsed, its exit codes checked.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Output, Stdio},
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use common::{
    HOUR, TestServer,
    cluster::{DataDir, start, start_replica, wait_for},
    eventually, get,
    process::Process,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_deltasync");

/// The binary with `args`, talking to `endpoints`, JSON output.
fn command(endpoints: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .args(["-w", "json"])
        .env("DELTASYNC_ENDPOINTS", endpoints)
        .env("DELTASYNC_DIAL_TIMEOUT", "1s");
    c
}

/// Runs the binary to its end (off the runtime's threads, so an
/// in-process server keeps serving).
async fn run(endpoints: &str, args: &[&str]) -> Output {
    let mut c = command(endpoints, args);
    tokio::task::spawn_blocking(move || c.output().expect("the binary runs"))
        .await
        .expect("runs")
}

/// Runs a subcommand that talks to no server (`snapshot restore`).
async fn run_offline(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    tokio::task::spawn_blocking(move || c.output().expect("the binary runs"))
        .await
        .expect("runs")
}

/// Every stdout line as JSON.
fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn url(s: &TestServer) -> String {
    format!("http://{}", s.addr)
}

/// Rule: put, get, patch and delete print one JSON object per result or
/// document in the proto3 JSON mapping (uint64 as strings, enum names,
/// lowerCamelCase, RFC 3339 times) and exit 0; server variables in the
/// environment do not get in a subcommand's way, and server flags before a
/// subcommand are refused (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn writes_and_reads_print_proto_json() {
    let s = TestServer::start().await;
    let u = url(&s);
    let out = run(&u, &["put", "todos", "milk", r#"{"title":"Buy milk"}"#]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let r = &lines(&out)[0];
    assert_eq!(r["outcome"], "OUTCOME_APPLIED");
    assert_eq!(r["mutationId"], "1");
    assert_eq!(r["document"]["version"], "1");
    assert_eq!(r["document"]["body"], json!({"title": "Buy milk"}));
    let at = r["document"]["updatedAt"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(at).is_ok(), "{at}");

    let out = run(
        &u,
        &[
            "patch",
            "todos",
            "milk",
            r#"{"done":true}"#,
            "--base-version",
            "1",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["document"]["version"], "2");

    let mut c = command(&u, &["get", "todos", "milk", "nothing"]);
    c.env("DELTASYNC_LISTEN", "0.0.0.0:1")
        .env("DELTASYNC_DATA_DIR", "/nonexistent")
        .env("DELTASYNC_REPLICATE_FROM", "http://elsewhere:1");
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let docs = lines(&out);
    assert_eq!(docs.len(), 1, "an unknown id prints nothing");
    assert_eq!(
        (&docs[0]["seq"], &docs[0]["body"]),
        (&json!("2"), &json!({"title": "Buy milk", "done": true}))
    );

    let out = run(&u, &["delete", "todos", "milk"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc = &lines(&out)[0]["document"];
    assert_eq!((&doc["deleted"], doc.get("body")), (&json!(true), None));

    let out = run(&u, &["--listen", "127.0.0.1:1", "get", "todos", "milk"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// Rule: a mutation that conflicts exits 3 (its result printed), and every
/// failure exits 1 with a one-line reason on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn conflicts_exit_3_and_failures_exit_1() {
    let s = TestServer::start().await;
    let u = url(&s);
    assert!(run(&u, &["put", "todos", "a", "{}"]).await.status.success());
    let out = run(
        &u,
        &["put", "todos", "a", r#"{"x":1}"#, "--base-version", "7"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["outcome"], "OUTCOME_CONFLICT");

    for (args, says) in [
        (vec!["put", "todos", "a", "[1]"], "JSON object"),
        (vec!["get", "bad collection!", "a"], "INVALID_ARGUMENT"),
    ] {
        let out = run(&u, &args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
    }
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = run(&dead, &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("UNAVAILABLE"), "{}", stderr(&out));
}

/// Rule: `push -f -` reads JSON lines of mutations from stdin, and `pull`
/// pages to the end, printing each document once, filtered by
/// collection and from a checkpoint.
#[tokio::test(flavor = "multi_thread")]
async fn push_from_stdin_and_pull_to_the_end() {
    let s = TestServer::start().await;
    let u = url(&s);
    let mut input = String::new();
    for i in 0..25 {
        let collection = if i % 5 == 0 { "notes" } else { "todos" };
        input.push_str(&format!(
            "{{\"collection\":\"{collection}\",\"id\":\"d{i}\",\"put\":{{\"i\":{i}}},\"baseVersion\":\"0\"}}\n"
        ));
    }
    let mut c = command(&u, &["push", "-f", "-"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let results = lines(&out);
    assert_eq!(results.len(), 25);
    assert!(results.iter().all(|r| r["outcome"] == "OUTCOME_APPLIED"));

    let out = run(&u, &["pull", "--page-size", "4"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let seqs: Vec<String> = lines(&out)
        .iter()
        .map(|d| d["seq"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seqs, (1..=25).map(|s| s.to_string()).collect::<Vec<_>>());

    let out = run(&u, &["pull", "--since", "10", "--collection", "notes"]).await;
    let ids: Vec<Value> = lines(&out).iter().map(|d| d["id"].clone()).collect();
    assert_eq!(ids, [json!("d10"), json!("d15"), json!("d20")]);
}

/// Rule: `watch` keeps printing across a server killed and restarted on
/// the same data directory and port: every seq once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn watch_survives_a_restart() {
    let data = DataDir::new();
    let server = start(&data, &[]);
    let addr = server.addr.clone();
    let u = server.url();
    let mut watch = command(&u, &["watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut next_seq = async || {
        let line = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a line within 30 s")
            .expect("watch still running");
        let doc: Value = serde_json::from_str(&line).unwrap();
        doc["seq"].as_str().unwrap().parse::<u64>().unwrap()
    };

    let mut seen = Vec::new();
    for i in 0..3 {
        let out = run(&u, &["put", "docs", &format!("a{i}"), "{}"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for _ in 0..3 {
        seen.push(next_seq().await);
    }
    server.kill_9();
    let server = Process::start_at(&addr, data.as_ref(), &[], |_| {});
    for i in 0..3 {
        let out = run(&u, &["put", "docs", &format!("b{i}"), "{}"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for _ in 0..3 {
        seen.push(next_seq().await);
    }
    assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    assert!(
        watch.try_wait().unwrap().is_none(),
        "watch is still running"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    drop(server);
}

/// Rule: `watch` from a checkpoint below the purge horizon exits 4 with a
/// one-line "resync needed" reason.
#[tokio::test(flavor = "multi_thread")]
async fn watch_exits_4_when_a_resync_is_needed() {
    let ahead = Arc::new(AtomicU64::new(0));
    let s = TestServer::start_with_clock(&ahead, |_| {}).await;
    let u = url(&s);
    for args in [
        ["put", "todos", "gone", "{}"],
        ["put", "todos", "kept", "{}"],
    ] {
        assert!(run(&u, &args).await.status.success());
    }
    assert!(run(&u, &["delete", "todos", "gone"]).await.status.success());
    ahead.store(2 * HOUR + 60, Ordering::Relaxed);
    eventually(|| {
        let mut c = s.client.clone();
        async move { get(&mut c, "todos", "gone").await.is_none() }
    })
    .await;
    let out = run(&u, &["watch", "--since", "1"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("resync needed"), "{err}");
}

/// Rule: `status` prints each endpoint's role, epoch, head and (on the
/// primary) its replicas; `promote` makes the replica a primary at the
/// next epoch, and is refused (exit 1) on a primary.
#[tokio::test(flavor = "multi_thread")]
async fn status_and_promote_on_a_cluster() {
    let (dp, dr) = (DataDir::new(), DataDir::new());
    let primary = start(&dp, &[]);
    let replica = start_replica(&dr, &primary.url(), &[]);
    let both = format!("{},{}", primary.url(), replica.url());
    assert!(
        run(&both, &["put", "docs", "a", "{}"])
            .await
            .status
            .success()
    );
    wait_for("the replica catches up", async || {
        replica.status().await.head == 1 && !primary.status().await.replicas.is_empty()
    })
    .await;

    let out = run(&both, &["status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let nodes = lines(&out);
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (&nodes[0]["role"], &nodes[0]["epoch"], &nodes[0]["head"]),
        (&json!("ROLE_PRIMARY"), &json!("1"), &json!("1"))
    );
    assert_eq!(nodes[0]["replicas"][0]["acked"], "1");
    assert_eq!(nodes[1]["role"], "ROLE_REPLICA");
    assert_eq!(nodes[1]["primary"], json!(primary.url()));
    assert_eq!(nodes[0]["storeId"], nodes[1]["storeId"]);

    let out = run(&primary.url(), &["promote"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    primary.kill_9();
    let out = run(&replica.url(), &["promote"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0], json!({"epoch": "2", "head": "1"}));
    let out = run(&replica.url(), &["status"]).await;
    assert_eq!(lines(&out)[0]["role"], "ROLE_PRIMARY");
}

/// Rule: `snapshot save` copies a server while a writer goes on, and
/// `snapshot restore` makes a data dir whose server answers a Pull from 0
/// exactly as the source's documents stood at the snapshot's checkpoint
/// (the writer only creates documents, so that state is the source's
/// documents up to that seq); a damaged file exits 1 with one line and
/// leaves no data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_under_writes_then_restore() {
    let data = DataDir::new();
    let source = start(&data, &[]);
    let u = format!("http://{}", source.addr);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (mut c, stop, written) = (source.client().await, stop.clone(), written.clone());
        tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let m = common::put("notes", &format!("n{i}"), json!({"i": i}));
                common::push(&mut c, "writer", vec![m]).await;
                written.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    wait_for("writes before the save", async || {
        written.load(Ordering::SeqCst) >= 20
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    let file_arg = file.to_str().unwrap();
    let out = run(&u, &["snapshot", "save", file_arg]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = &lines(&out)[0];
    let checkpoint: u64 = saved["checkpoint"].as_str().unwrap().parse().unwrap();
    let after = written.load(Ordering::SeqCst);
    wait_for("writes after the save", async || {
        written.load(Ordering::SeqCst) >= after + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();

    let target = dir.path().join("restored");
    let target_arg = target.to_str().unwrap();
    let out = run_offline(&["snapshot", "restore", file_arg, "--data-dir", target_arg]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["checkpoint"], saved["checkpoint"]);
    let copy = start(&target, &[]);
    let copy_url = format!("http://{}", copy.addr);

    let pulled = |out: Output| {
        assert!(out.status.success(), "{}", stderr(&out));
        lines(&out)
    };
    let expected: Vec<Value> = pulled(run(&u, &["pull"]).await)
        .into_iter()
        .filter(|d| d["seq"].as_str().unwrap().parse::<u64>().unwrap() <= checkpoint)
        .collect();
    let restored = pulled(run(&copy_url, &["pull"]).await);
    assert!(expected.len() >= 20);
    assert_eq!(
        restored, expected,
        "the copy is the source at the checkpoint"
    );
    assert_eq!(
        pulled(run(&copy_url, &["status"]).await)[0]["storeId"],
        saved["storeId"]
    );

    // A damaged file: exit 1, one line, no data dir.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - 7);
    let damaged = dir.path().join("damaged.snap");
    std::fs::write(&damaged, bytes).unwrap();
    let other = dir.path().join("other");
    let out = run_offline(&[
        "snapshot",
        "restore",
        damaged.to_str().unwrap(),
        "--data-dir",
        other.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert!(!other.exists());
}

/// Rule: a closed stdout (`deltasync pull | head -1`) ends a command with
/// exit 0 and nothing on stderr, never an error line or a panic; so does
/// `snapshot save`'s report line (the file is saved).
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stdout_exits_0_quietly() {
    let s = TestServer::start().await;
    let u = url(&s);
    for i in 0..5 {
        assert!(
            run(&u, &["put", "docs", &format!("d{i}"), "{}"])
                .await
                .status
                .success()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.snap");
    for args in [
        vec!["pull"],
        vec!["get", "docs", "d1", "d2"],
        vec!["snapshot", "save", file.to_str().unwrap()],
    ] {
        let mut c = command(&u, &args);
        let out = tokio::task::spawn_blocking(move || {
            let mut child = c
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The reader is gone before anything is written.
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }
    assert!(file.exists(), "the snapshot was saved");
}

/// Rule: a whole number past 2^53 in a body (a protobuf double) prints as
/// grpcurl prints it, without exponent: 12345678901234567890 is stored as
/// the double 1.2345678901234567e19 and prints `12345678901234567000`.
#[tokio::test(flavor = "multi_thread")]
async fn big_numbers_print_without_exponent() {
    let s = TestServer::start().await;
    let u = url(&s);
    let out = run(
        &u,
        &["put", "n", "a", r#"{"big":12345678901234567890,"small":3}"#],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&u, &["get", "n", "a"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(r#""body":{"big":12345678901234567000,"small":3}"#),
        "{text}"
    );
}

/// Rule: `pull --print-checkpoint` ends with one line
/// `{"checkpoint": {"seq", "storeId", "purgeHorizon", "epoch"}}`, and a
/// pull `--since` that seq prints only what came after; `watch --count N
/// --print-checkpoint` ends with the checkpoint of the last document it
/// printed.
#[tokio::test(flavor = "multi_thread")]
async fn pull_and_watch_print_the_checkpoint_to_resume_from() {
    let s = TestServer::start().await;
    let u = url(&s);
    for i in 0..3 {
        assert!(
            run(&u, &["put", "docs", &format!("d{i}"), "{}"])
                .await
                .status
                .success()
        );
    }
    let out = run(&u, &["pull", "--print-checkpoint"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let all = lines(&out);
    assert_eq!(all.len(), 4);
    let checkpoint = &all[3]["checkpoint"];
    assert_eq!(checkpoint["seq"], "3");
    assert_eq!(checkpoint["epoch"], "1");
    assert!(!checkpoint["storeId"].as_str().unwrap().is_empty());
    assert!(
        run(&u, &["put", "docs", "later", "{}"])
            .await
            .status
            .success()
    );
    let out = run(&u, &["pull", "--since", "3", "--print-checkpoint"]).await;
    let after = lines(&out);
    assert_eq!(after[0]["id"], "later");
    assert_eq!(after[1]["checkpoint"]["seq"], "4");

    let out = run(&u, &["watch", "--count", "2", "--print-checkpoint"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let watched = lines(&out);
    assert_eq!(watched.len(), 3);
    assert_eq!(watched[2]["checkpoint"]["seq"], "2");
}

/// Rule: `--on-conflict` settles an overlapping stale write as asked
/// (client_wins: RESOLVED with this body, exit 0; reject: CONFLICT naming
/// the field, exit 3); `delete --base-version` deletes only at that
/// version.
#[tokio::test(flavor = "multi_thread")]
async fn on_conflict_and_delete_with_a_base_version() {
    let s = TestServer::start().await;
    let u = url(&s);
    assert!(
        run(&u, &["put", "t", "a", r#"{"x":1}"#])
            .await
            .status
            .success()
    );
    assert!(
        run(&u, &["patch", "t", "a", r#"{"x":2}"#])
            .await
            .status
            .success()
    );
    let stale = |strategy: &'static str| {
        let u = u.clone();
        async move {
            run(
                &u,
                &[
                    "patch",
                    "t",
                    "a",
                    r#"{"x":3}"#,
                    "--base-version",
                    "1",
                    "--on-conflict",
                    strategy,
                ],
            )
            .await
        }
    };
    let out = stale("reject").await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let r = &lines(&out)[0];
    assert_eq!(r["outcome"], "OUTCOME_CONFLICT");
    assert_eq!(r["conflictingFields"], json!(["x"]));
    let out = stale("client_wins").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let r = &lines(&out)[0];
    assert_eq!(r["outcome"], "OUTCOME_RESOLVED");
    assert_eq!(r["document"]["body"], json!({"x": 3}));
    let version = r["document"]["version"].as_str().unwrap().to_owned();

    let out = run(&u, &["delete", "t", "a", "--base-version", "1"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["outcome"], "OUTCOME_CONFLICT");
    let out = run(&u, &["delete", "t", "a", "--base-version", &version]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["document"]["deleted"], true);
}

/// Rule: `push -f FILE` reads a JSON array of mutations; `-w table` prints
/// human-readable rows under a header (exit 0) for writes, reads and
/// status.
#[tokio::test(flavor = "multi_thread")]
async fn push_a_json_array_file_and_table_output() {
    let s = TestServer::start().await;
    let u = url(&s);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("batch.json");
    std::fs::write(
        &file,
        r#"[{"collection":"t","id":"a","put":{"x":1}},
            {"collection":"t","id":"b","put":{"y":2},"baseVersion":"0"},
            {"collection":"t","id":"a","patch":{"z":3}}]"#,
    )
    .unwrap();
    let out = run(&u, &["push", "-f", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let results = lines(&out);
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r["outcome"] == "OUTCOME_APPLIED"),
        "{results:?}"
    );
    assert_eq!(results[2]["document"]["body"], json!({"x": 1, "z": 3}));

    for (args, header) in [
        (vec!["put", "t", "c", r#"{"w":1}"#], "OUTCOME"),
        (vec!["get", "t", "a", "b"], "COLLECTION"),
        (vec!["pull"], "COLLECTION"),
        (vec!["status"], "primary"),
    ] {
        let mut c = Command::new(BIN);
        c.args(&args)
            .args(["-w", "table"])
            .env("DELTASYNC_ENDPOINTS", &u);
        let out = tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(header), "{args:?}: {text}");
        assert!(serde_json::from_str::<Value>(text.lines().next().unwrap()).is_err());
    }
}
