//! Stopping the real binary with a signal.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Rule: a SIGTERM that comes while the server is still opening its store
/// (a pod deleted as it starts) stops it cleanly, exit status 0, instead of
/// killing it by the signal's default action. Five times, since the window
/// is short.
#[test]
fn a_sigterm_while_the_store_opens_stops_the_server_cleanly() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_deltasync"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--data-dir",
            ])
            .arg(dir.path().join("store"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        // The first line the server writes once its port is bound, before
        // it opens the store.
        loop {
            let line = lines
                .next()
                .expect("the server logs that it is bound")
                .expect("log line");
            if line.contains("bound; opening the store") {
                break;
            }
        }
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        // Drain the log so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: still running 10 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: the server must stop cleanly, not die of the signal ({status})"
        );
    }
}
