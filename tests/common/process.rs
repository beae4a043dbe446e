//! The real `deltasync` binary as a child process on `127.0.0.1:0`, for
//! tests that `kill -9` it. Its address is read from its own JSON log, which
//! is drained to the end (so the server never blocks on a full pipe); each
//! entry, from launch on, is handed to the test.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use serde_json::Value;

use super::Client;

/// A running server process; SIGKILLed and reaped when dropped.
pub struct Process {
    /// The server process.
    child: Child,
    /// Where it listens.
    pub addr: String,
}

impl Process {
    /// Starts the binary on `data_dir` with `args` added, and returns once
    /// it serves. `on_log` sees every log entry from launch on (those before
    /// the server serves on this thread, the rest on a thread of its own):
    /// a replica's follower may log (e.g. a refusal) before it serves.
    pub fn start(
        data_dir: &Path,
        args: &[&str],
        on_log: impl FnMut(&Value) + Send + 'static,
    ) -> Self {
        Self::start_at("127.0.0.1:0", data_dir, args, on_log)
    }

    /// As [`Process::start`], listening on `listen`: a test restarts a
    /// killed server on the port its clients know.
    pub fn start_at(
        listen: &str,
        data_dir: &Path,
        args: &[&str],
        mut on_log: impl FnMut(&Value) + Send + 'static,
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_deltasync"))
            .args(["--listen", listen, "--log-format", "json", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("server logs its address before exiting")
                .expect("log line");
            let entry: Value = serde_json::from_str(&line).unwrap_or_default();
            on_log(&entry);
            if entry["message"] == "serving gRPC" {
                break entry["addr"].as_str().expect("addr field").to_owned();
            }
        };
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                on_log(&serde_json::from_str(&line).unwrap_or_default());
            }
        });
        Self { child, addr }
    }

    /// A client on a connection of its own.
    pub async fn client(&self) -> Client {
        deltasync::pb::sync_service_client::SyncServiceClient::connect(format!(
            "http://{}",
            self.addr
        ))
        .await
        .expect("connect")
    }

    /// The URL other nodes reach it at.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An AdminService client.
    pub async fn admin(
        &self,
    ) -> deltasync::pb::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
        deltasync::pb::admin_service_client::AdminServiceClient::connect(self.url())
            .await
            .expect("connect")
    }

    /// The node's AdminService.Status.
    pub async fn status(&self) -> deltasync::pb::StatusResponse {
        self.admin()
            .await
            .status(deltasync::pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    /// Stops the server as Kubernetes or systemd do (SIGTERM), and waits
    /// (at most `bound`) for it to exit; returns how it exited.
    pub fn terminate(mut self, bound: std::time::Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM sent");
        let deadline = std::time::Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server still runs {bound:?} after SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Kills the server with SIGKILL and reaps it (see Drop).
    pub fn kill_9(self) {
        drop(self);
    }
}

/// Every log entry of a process, for tests that look for one.
pub type Logs = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

impl Process {
    /// Starts the binary as [`Process::start`] does, keeping every log
    /// entry, those logged before the server serves included, for a test
    /// that looks for one.
    pub fn start_logged_from_launch(data_dir: &Path, args: &[&str]) -> (Self, Logs) {
        let logs = Logs::default();
        let kept = logs.clone();
        let process = Self::start(data_dir, args, move |entry| {
            kept.lock().expect("logs").push(entry.clone());
        });
        (process, logs)
    }
}

impl Drop for Process {
    /// SIGKILL (what `Child::kill` sends on Unix), also when a test panics.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
