//! The `deltasync` subcommands: a thin user of [`crate::client`], as
//! etcdctl is of etcd's client. Without a subcommand the binary serves.
//!
//! ```text
//! deltasync get COLLECTION ID...
//! deltasync put COLLECTION ID JSON [--base-version N] [--on-conflict reject|server_wins|client_wins]
//! deltasync patch COLLECTION ID JSON [--base-version N] [--on-conflict ...]
//! deltasync delete COLLECTION ID [--base-version N]
//! deltasync push -f FILE|- [--atomic]        (a JSON array or JSON lines of mutations)
//! deltasync pull [--since N] [--collection C]... [--print-checkpoint]
//! deltasync watch [--since N] [--collection C]... [--count N [--print-checkpoint]]
//! deltasync status
//! deltasync promote
//! deltasync snapshot save FILE | snapshot restore FILE --data-dir DIR
//! deltasync token new
//! deltasync local init|put|patch|delete|get|list|sync|pending|conflicts|resolve --dir DIR ...
//! ```
//!
//! Every client subcommand takes `--endpoints` (comma-separated,
//! `DELTASYNC_ENDPOINTS`), `--cacert`, `--cert`, `--key`, `--token-file`
//! (or `DELTASYNC_TOKEN`), `--client-id`, `--timeout`, `--dial-timeout`
//! and `-w json|table`.
//!
//! Exit codes: 0 success; 1 failure (a one-line reason on stderr); 2 bad
//! usage; [`EXIT_CONFLICT`] (3) a mutation was not written because of a
//! conflict (its result is still printed); [`EXIT_RESYNC`] (4) the
//! checkpoint cannot be resumed from (discard local state, resync from 0).
//! A closed stdout (`deltasync pull | head -1`) ends a command quietly
//! with 0, as etcdctl does.

mod commands;
pub mod json;
pub mod local;
pub mod output;
pub mod snapshot;

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    client::{Client, ClientBuilder, ClientError},
    pb,
};
use output::Format;

/// Exit code of a push, put, patch or delete of which a mutation answered
/// CONFLICT (or NOT_APPLIED in an atomic batch): nothing of it was written.
pub const EXIT_CONFLICT: u8 = 3;
/// Exit code of a pull or watch whose checkpoint cannot be resumed from.
pub const EXIT_RESYNC: u8 = 4;

/// The client subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Prints the current state of documents by id (unknown ids print
    /// nothing).
    Get(GetArgs),
    /// Replaces a document's body.
    Put(WriteArgs),
    /// Merges top-level fields into a document's body (null removes one).
    Patch(WriteArgs),
    /// Deletes a document (it becomes a tombstone).
    Delete(DeleteArgs),
    /// Pushes a batch of mutations read from a file (`-` for stdin): a JSON
    /// array or JSON lines of `{"collection", "id", "put"|"patch"|"delete",
    /// "baseVersion", "onConflict"}`.
    Push(PushArgs),
    /// Prints every document changed after a checkpoint, paging to the end.
    Pull(PullArgs),
    /// Prints changes as they commit, from a checkpoint; resumes on its own
    /// across disconnects, restarts and failover.
    Watch(WatchArgs),
    /// Prints each endpoint's role, epoch, head, and replicas with their
    /// lag.
    Status(StatusArgs),
    /// Promotes the (first) endpoint, a replica, to primary.
    Promote(StatusArgs),
    /// Copies a whole store to a file, and back into a data directory.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// An offline-first local replica of chosen collections (its own
    /// store in --dir, synced on demand): init, put, patch, delete, get,
    /// list, sync, pending, conflicts, resolve.
    #[command(subcommand)]
    Local(local::LocalCommand),
}

/// `deltasync snapshot ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Saves the store the endpoints serve to FILE.
    Save(SnapshotSaveArgs),
    /// Restores FILE into an empty data directory (no server needed).
    Restore(SnapshotRestoreArgs),
}

/// How to reach the servers, and how to print: every client subcommand
/// has these.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Server URLs, comma-separated, tried in order (failover).
    #[arg(
        long,
        env = "DELTASYNC_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoints: Vec<String>,

    #[command(flatten)]
    pub security: SecurityArgs,

    /// The client id mutation ids are counted under (default: a random
    /// one per run).
    #[arg(long, env = "DELTASYNC_CLIENT_ID")]
    pub client_id: Option<String>,

    /// Deadline of each call attempt.
    #[arg(long, env = "DELTASYNC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// How long connecting to an endpoint may take.
    #[arg(long, env = "DELTASYNC_DIAL_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,

    /// Output format (default: table on a terminal, else json).
    #[arg(short = 'w', long = "write-out", value_enum)]
    pub write_out: Option<Format>,
}

/// TLS and the bearer token: every command that talks to a server has
/// these (`deltasync local sync` too).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// The CA (PEM) that signed the servers' certificates (https://
    /// endpoints).
    #[arg(long, env = "DELTASYNC_CACERT")]
    pub cacert: Option<PathBuf>,

    /// A client certificate (PEM) for mTLS.
    #[arg(long, env = "DELTASYNC_CERT", requires = "key")]
    pub cert: Option<PathBuf>,

    /// The private key (PEM) of --cert.
    #[arg(long, env = "DELTASYNC_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// A file holding the bearer token (surrounding whitespace ignored).
    #[arg(long, env = "DELTASYNC_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The bearer token itself (prefer the environment or --token-file:
    /// a command line is visible to other users).
    #[arg(long, env = "DELTASYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl SecurityArgs {
    /// Reads the files these flags name, and returns what sets the TLS
    /// and token they give on a client builder.
    pub fn load(&self) -> Result<impl FnOnce(ClientBuilder) -> ClientBuilder + use<>, Failure> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Failure::new(format!("cannot read {}: {e}", p.display())))
        };
        let tls = if self.cacert.is_some() || self.cert.is_some() {
            let ca = self.cacert.as_ref().map(read).transpose()?;
            let identity = match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            };
            Some((ca, identity))
        } else {
            None
        };
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => Some(
                String::from_utf8(read(path)?)
                    .map_err(|_| Failure::new("the token file is not UTF-8"))?,
            ),
            (None, token) => token.clone(),
        };
        Ok(move |mut builder: ClientBuilder| {
            if let Some((ca, identity)) = tls {
                builder = builder.tls_pem(ca, identity);
            }
            if let Some(token) = token {
                builder = builder.token(token.trim());
            }
            builder
        })
    }
}

/// `get COLLECTION ID...`.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// The collection.
    pub collection: String,
    /// Document ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `put|patch COLLECTION ID JSON`.
#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// A JSON object.
    pub json: String,
    /// Write only if the document is at this version (0: only if it does
    /// not exist); an older one is checked field by field.
    #[arg(long)]
    pub base_version: Option<u64>,
    /// How an overlapping conflict is settled (default: the collection's).
    #[arg(long, value_enum)]
    pub on_conflict: Option<Strategy>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `delete COLLECTION ID`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// Delete only if the document is at this version.
    #[arg(long)]
    pub base_version: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `push -f FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The mutations: a JSON array or JSON lines; `-` reads stdin.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// All or nothing: if one mutation conflicts, none is written.
    #[arg(long)]
    pub atomic: bool,
    /// Most mutations per request (the server's --max-batch, 1000 by
    /// default); a longer file is sent in several requests, in order.
    /// Not with --atomic, which sends one.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// Only changes after this checkpoint (a seq).
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Only this collection (repeat for several).
    #[arg(long = "collection")]
    pub collections: Vec<String>,
    /// Documents per page (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub page_size: u32,
    /// After the documents, print the checkpoint reached on one more line
    /// (`{"checkpoint": {"seq", "storeId", "purgeHorizon", "epoch"}}` in
    /// JSON): the next pull resumes with `--since` its seq.
    #[arg(long)]
    pub print_checkpoint: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Only changes after this checkpoint (a seq).
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Only this collection (repeat for several).
    #[arg(long = "collection")]
    pub collections: Vec<String>,
    /// Exit 0 after printing this many documents (default: never).
    #[arg(long)]
    pub count: Option<u64>,
    /// With --count: after the documents, print the checkpoint they reach
    /// on one more line (as `pull --print-checkpoint` does), to resume
    /// from with `--since`.
    #[arg(long)]
    pub print_checkpoint: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `status`, `promote`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `snapshot save FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotSaveArgs {
    /// Where to write the snapshot.
    pub file: PathBuf,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `snapshot restore FILE --data-dir DIR`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotRestoreArgs {
    /// The snapshot to restore.
    pub file: PathBuf,
    /// The data directory to restore into.
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// A conflict strategy on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Strategy {
    /// Write nothing; answer CONFLICT.
    Reject,
    /// Keep the server's overlapping fields.
    ServerWins,
    /// Apply every field of this mutation.
    ClientWins,
}

impl From<Strategy> for pb::ConflictStrategy {
    fn from(s: Strategy) -> Self {
        match s {
            Strategy::Reject => Self::Reject,
            Strategy::ServerWins => Self::ServerWins,
            Strategy::ClientWins => Self::ClientWins,
        }
    }
}

/// Why a command failed: a one-line reason and an exit code.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What went wrong, on one line.
    pub reason: String,
}

impl Failure {
    /// A failure with exit code 1.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            code: 1,
            reason: reason.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = if e.is_resync_needed() { EXIT_RESYNC } else { 1 };
        let reason = match (e.status(), e.reason()) {
            (Some(s), Some(reason)) => format!(
                "{} ({reason}): {}",
                crate::client::code_name(s.code()),
                s.message()
            ),
            _ => e.to_string(),
        };
        Self { code, reason }
    }
}

impl From<std::io::Error> for Failure {
    /// An output error; a closed stdout (`deltasync pull | head -1`) is
    /// the reader saying it has enough: exit 0, quietly.
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Self {
                code: 0,
                reason: String::new(),
            };
        }
        Self::new(format!("writing the output: {e}"))
    }
}

/// Runs a client subcommand; the exit code, with the reason of a failure
/// on one line of stderr.
pub async fn run(command: Command) -> ExitCode {
    match commands::run(command).await {
        Ok(()) => ExitCode::SUCCESS,
        // A broken pipe on stdout: the reader has what it wanted.
        Err(f) if f.code == 0 => ExitCode::SUCCESS,
        Err(f) => {
            let reason = f.reason.replace(['\n', '\r'], " ");
            // Not eprintln!: a closed stderr is no reason to panic.
            let _ = writeln!(std::io::stderr().lock(), "deltasync: {reason}");
            ExitCode::from(f.code)
        }
    }
}

impl ClientArgs {
    /// The client these flags describe.
    pub fn client(&self) -> Result<Client, Failure> {
        let builder = Client::builder(self.endpoints.iter().map(|e| e.trim().to_owned()))
            .timeout(Some(self.timeout))
            .connect_timeout(self.dial_timeout);
        let mut builder = self.security.load()?(builder);
        if let Some(id) = &self.client_id {
            builder = builder.client_id(id);
        }
        Ok(builder.build()?)
    }

    /// The printer of the chosen format.
    pub fn printer(&self) -> Box<dyn output::Printer> {
        Format::or_default(self.write_out).printer()
    }
}
