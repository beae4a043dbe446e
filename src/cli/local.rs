//! `deltasync local ...`: a local replica ([`crate::replica`]) from the
//! shell. Every command takes `--dir DIR` and prints JSON lines; a failure
//! is exit 1 with a one-line reason (2: bad usage). One process at a time
//! has a directory open: a command waits up to `--lock-timeout` (10 s) for
//! another (a `sync`) to let go.
//!
//! ```text
//! deltasync local init --dir DIR --endpoints URL[,URL...] --collection C... [--on-conflict keep-server|keep-local|manual]
//! deltasync local put|patch --dir DIR C ID JSON     deltasync local delete --dir DIR C ID
//! deltasync local get --dir DIR C ID                deltasync local list --dir DIR C [--deleted]
//! deltasync local sync --dir DIR [--timeout DUR] [--cacert F] [--cert F --key F] [--token-file F]
//! deltasync local pending --dir DIR                 deltasync local conflicts --dir DIR
//! deltasync local resolve --dir DIR C ID (--keep server|local | --body JSON)
//! ```

use std::{io::Write, path::PathBuf, time::Duration};

use super::{Failure, SecurityArgs, json};
use crate::{
    client::{ClientBuilder, RetryPolicy},
    replica::{LocalReplica, ReplicaError, ReplicaOptions, Resolution, Resolver},
};

/// `deltasync local ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LocalCommand {
    /// Creates a local replica in --dir (a new client id is generated and
    /// kept there).
    Init(InitArgs),
    /// Replaces a document's body, in the outbox (durable) when it returns.
    Put(WriteArgs),
    /// Merges top-level fields into a document (null removes one), in the
    /// outbox when it returns.
    Patch(WriteArgs),
    /// Deletes a document, in the outbox when it returns.
    Delete(DocArgs),
    /// Prints a document of the optimistic view (nothing if unknown).
    Get(DocArgs),
    /// Prints the documents of a collection in the optimistic view.
    List(ListArgs),
    /// Pushes the outbox and catches up with the server; exits 0 once the
    /// outbox holds only parked conflicts and the view is caught up.
    Sync(SyncArgs),
    /// Prints the outbox, in order.
    Pending(DirArgs),
    /// Prints the parked conflicts with both sides.
    Conflicts(DirArgs),
    /// Resolves a parked conflict.
    Resolve(ResolveArgs),
}

/// The replica's directory: every local command has it.
#[derive(Debug, Clone, clap::Args)]
pub struct DirArgs {
    /// The local replica's directory.
    #[arg(long, env = "DELTASYNC_LOCAL_DIR")]
    pub dir: PathBuf,
    /// How long to wait while another process (a `local sync`) has the
    /// directory open, before giving up.
    #[arg(long, env = "DELTASYNC_LOCAL_LOCK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,
}

/// `local init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Server URLs, comma-separated, tried in order (failover).
    #[arg(
        long,
        env = "DELTASYNC_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub endpoints: Vec<String>,
    /// A collection to replicate (repeat for several).
    #[arg(long = "collection", required = true)]
    pub collections: Vec<String>,
    /// How conflicts are settled: keep the server's state, keep mine
    /// (sent again), or park them for `resolve`.
    #[arg(long, value_enum, default_value = "manual")]
    pub on_conflict: Resolver,
}

/// `local put|patch C ID JSON`.
#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// A JSON object.
    pub json: String,
}

/// `local delete|get C ID`.
#[derive(Debug, Clone, clap::Args)]
pub struct DocArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
}

/// `local list C`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The collection.
    pub collection: String,
    /// Print tombstones too.
    #[arg(long)]
    pub deleted: bool,
}

/// `local sync`.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// TLS and the bearer token, as for the other client commands.
    #[command(flatten)]
    pub security: SecurityArgs,
    /// How long the sync may take, retries included.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `local resolve C ID`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResolveArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// Keep the server's state (drop my write) or mine (send it again).
    #[arg(
        long,
        value_enum,
        required_unless_present = "body",
        conflicts_with = "body"
    )]
    pub keep: Option<Side>,
    /// Send this body (a JSON object) as a put instead.
    #[arg(long)]
    pub body: Option<String>,
}

/// A side of a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// The server's.
    Server,
    /// Mine.
    Local,
}

impl From<ReplicaError> for Failure {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::Client(e) => e.into(),
            other => Failure::new(other.to_string()),
        }
    }
}

/// Runs a local command.
pub async fn run(command: LocalCommand) -> Result<(), Failure> {
    match command {
        LocalCommand::Init(args) => init(args),
        LocalCommand::Put(args) => {
            let body = json::body_arg(&args.json).map_err(Failure::new)?;
            let d = open(&args.dir)?.put(&args.collection, &args.id, body)?;
            print(json::local_document(&d))
        }
        LocalCommand::Patch(args) => {
            let body = json::body_arg(&args.json).map_err(Failure::new)?;
            let d = open(&args.dir)?.patch(&args.collection, &args.id, body)?;
            print(json::local_document(&d))
        }
        LocalCommand::Delete(args) => {
            let d = open(&args.dir)?.delete(&args.collection, &args.id)?;
            print(json::local_document(&d))
        }
        LocalCommand::Get(args) => match open(&args.dir)?.get(&args.collection, &args.id)? {
            Some(d) => print(json::local_document(&d)),
            None => Ok(()),
        },
        LocalCommand::List(args) => {
            for d in open(&args.dir)?.list(&args.collection)? {
                if args.deleted || !d.document.deleted {
                    print(json::local_document(&d))?;
                }
            }
            Ok(())
        }
        LocalCommand::Sync(args) => sync(args).await,
        LocalCommand::Pending(args) => {
            for p in open(&args)?.pending()? {
                print(json::pending(&p))?;
            }
            Ok(())
        }
        LocalCommand::Conflicts(args) => {
            for c in open(&args)?.conflicts()? {
                print(json::conflict(&c))?;
            }
            Ok(())
        }
        LocalCommand::Resolve(args) => {
            let resolution = match (args.keep, &args.body) {
                (Some(Side::Server), _) => Resolution::KeepServer,
                (Some(Side::Local), _) => Resolution::KeepLocal,
                (None, Some(text)) => match json::body_arg(text).map_err(Failure::new)? {
                    serde_json::Value::Object(b) => Resolution::Merged(b),
                    _ => return Err(Failure::new("the body must be a JSON object")),
                },
                (None, None) => return Err(Failure::new("give --keep or --body")),
            };
            let d = open(&args.dir)?.resolve(&args.collection, &args.id, resolution)?;
            print(json::local_document(&d))
        }
    }
}

fn open(dir: &DirArgs) -> Result<LocalReplica, Failure> {
    open_waiting(dir, |b| b)
}

/// Opens the replica, waiting up to `--lock-timeout` for another process
/// to let go of it.
fn open_waiting(
    dir: &DirArgs,
    configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
) -> Result<LocalReplica, Failure> {
    LocalReplica::open_waiting(&dir.dir, configure, dir.lock_timeout).map_err(|e| match e {
        ReplicaError::Locked(_) => Failure::new(format!(
            "{e}: still busy after --lock-timeout {}",
            humantime::format_duration(dir.lock_timeout)
        )),
        other => other.into(),
    })
}

fn print(line: String) -> Result<(), Failure> {
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

fn init(args: InitArgs) -> Result<(), Failure> {
    let options = args.collections.iter().fold(
        ReplicaOptions::new(args.endpoints.iter().map(|e| e.trim().to_owned())),
        |o, c| o.collection(c, args.on_conflict),
    );
    let replica = LocalReplica::init(&args.dir.dir, options, |b| b)?;
    print(serde_json::json!({"clientId": replica.client_id(), "dir": args.dir.dir}).to_string())
}

async fn sync(args: SyncArgs) -> Result<(), Failure> {
    let timeout = args.timeout;
    let secure = args.security.load()?;
    // Retries end before the deadline, so an unreachable server is
    // reported as such rather than as a timeout.
    let replica = open_waiting(&args.dir, |b| {
        secure(b)
            .retry(RetryPolicy {
                max_elapsed: timeout * 3 / 4,
                ..RetryPolicy::default()
            })
            .timeout(Some(timeout.min(Duration::from_secs(10))))
            .connect_timeout(timeout.min(Duration::from_secs(3)))
    })?;
    let report = tokio::time::timeout(timeout, replica.sync())
        .await
        .map_err(|_| Failure::new(format!("sync did not finish within {timeout:?}")))??;
    let unsent = replica.pending()?.iter().filter(|p| !p.held).count();
    print(
        serde_json::json!({"sync": {
            "pushed": report.pushed,
            "acknowledged": report.acknowledged,
            "resolved": report.resolved,
            "parked": report.parked,
            "pulled": report.pulled,
            "resynced": report.resynced,
            "checkpoint": report.checkpoint.seq.to_string(),
            "pending": report.remaining,
        }})
        .to_string(),
    )?;
    if unsent > 0 {
        return Err(Failure::new(format!(
            "{unsent} writes are still pending (not held by a conflict)"
        )));
    }
    Ok(())
}
