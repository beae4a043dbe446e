//! Command-line and environment configuration.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::store::{Durability, model::Strategy};

/// Default listen address: loopback, so a newcomer's first run is not exposed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default store directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./data/deltasync";
/// Page size of a Pull with `limit = 0`.
pub const DEFAULT_PULL_LIMIT: u32 = 1000;
/// sled's own default page cache (`sled::Config::cache_capacity`), 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// Room for a document's metadata and the message framing next to its body.
pub const MESSAGE_OVERHEAD_BYTES: usize = 4096;
/// Most a Push result takes without its body and conflicting fields: the
/// mutation id, the outcome and a document's metadata at the longest names
/// validation allows (collection 128, id and client id 256 bytes each).
pub const RESULT_SKELETON_BYTES: usize = 1024;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// What the binary does besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Bearer tokens for the auth file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The client subcommands (`get`, `put`, `pull`, `watch`, `status`...).
    #[command(flatten)]
    Client(Box<crate::cli::Command>),
}

/// `deltasync token ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Prints a new random token (256 bits) on its first line and the
    /// `sha256:` hash that goes in the auth file on its second.
    New,
}

/// deltasync: versioned JSON documents in sled, kept in sync over gRPC.
#[derive(Debug, Clone, Parser)]
// Server flags go before no subcommand: `deltasync --listen ... get` is
// refused, and a subcommand's own flags (`--endpoints`) come after it.
#[command(
    name = "deltasync",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "DELTASYNC_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Directory of the sled store (created if missing).
    #[arg(long, env = "DELTASYNC_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Default conflict strategy per collection, e.g.
    /// `todos=client_wins,default=reject`. Strategies: reject, server_wins,
    /// client_wins. A mutation's own `on_conflict` overrides it.
    #[arg(long, env = "DELTASYNC_CONFLICT_STRATEGY", default_value = "default=reject", value_parser = ConflictPolicy::parse)]
    pub conflict_strategy: ConflictPolicy,

    /// When a Push is acknowledged: `fsync` (after its commit is on disk) or
    /// `buffered` (before; up to one --flush-interval of acknowledged writes
    /// may be lost on a crash or power loss).
    #[arg(long, env = "DELTASYNC_DURABILITY", value_enum, default_value_t = Durability::Fsync)]
    pub durability: Durability,

    /// How often sled flushes in the background (what `buffered` may lose).
    #[arg(long, env = "DELTASYNC_FLUSH_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Interval of Progress messages on an idle Subscribe stream.
    #[arg(long, env = "DELTASYNC_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// Most mutations in one Push.
    #[arg(long, env = "DELTASYNC_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Largest body of one mutation, protobuf-encoded, in bytes.
    #[arg(long, env = "DELTASYNC_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Largest gRPC message the server sends, in bytes (gRPC clients
    /// receive at most 4 MiB by default). Pull pages and Subscribe batches
    /// are cut to fit; a body must fit alone (see --max-body-bytes).
    #[arg(long, env = "DELTASYNC_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// Largest request the server accepts, in bytes (a Push batch).
    #[arg(long, env = "DELTASYNC_MAX_REQUEST_BYTES", default_value_t = 16 << 20)]
    pub max_request_bytes: usize,

    /// Largest page a Pull may ask for.
    #[arg(long, env = "DELTASYNC_PULL_MAX_LIMIT", default_value_t = 10_000)]
    pub pull_max_limit: u32,

    /// Delta-log entries superseded longer ago than this are pruned; a stale
    /// push whose base was pruned counts every field as changed by the server.
    #[arg(long, env = "DELTASYNC_HISTORY_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub history_retention: Duration,

    /// Most delta-log versions kept per document.
    #[arg(long, env = "DELTASYNC_HISTORY_MAX_VERSIONS", default_value_t = 100)]
    pub history_max_versions: usize,

    /// Tombstones older than this are purged (must be >= --history-retention).
    /// Checkpoints below the newest purged tombstone's seq then get
    /// OUT_OF_RANGE: the client must resync from 0.
    #[arg(long, env = "DELTASYNC_TOMBSTONE_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub tombstone_retention: Duration,

    /// Clients that have not pushed for this long are forgotten, with what
    /// the server remembers of their mutation ids (must be >=
    /// --history-retention and >= 10m). A retry arriving later than this is taken as a
    /// new mutation and may be applied a second time.
    #[arg(long, env = "DELTASYNC_CLIENT_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub client_retention: Duration,

    /// How often retention runs.
    #[arg(long, env = "DELTASYNC_COMPACTION_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub compaction_interval: Duration,

    /// Most keys one compaction batch deletes (bounds how long it holds the writer).
    #[arg(long, env = "DELTASYNC_COMPACTION_BATCH", default_value_t = 1000)]
    pub compaction_batch: usize,

    /// Most open Subscribe streams in total; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DELTASYNC_MAX_SUBSCRIBERS", default_value_t = 20_000)]
    pub max_subscribers: usize,

    /// Most calls in progress at once, over all connections; more are
    /// answered RESOURCE_EXHAUSTED with a retry delay (health checks are
    /// always answered). A Subscribe counts until its stream has started.
    #[arg(
        long,
        env = "DELTASYNC_MAX_CONCURRENT_REQUESTS",
        default_value_t = 4096
    )]
    pub max_concurrent_requests: usize,

    /// Most concurrent streams (calls) on one HTTP/2 connection.
    #[arg(
        long,
        env = "DELTASYNC_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1024
    )]
    pub max_streams_per_connection: u32,

    /// Commits kept in the shared live ring; a subscriber further behind
    /// catches up from the log instead.
    #[arg(long, env = "DELTASYNC_FEED_CAPACITY", default_value_t = 1024)]
    pub feed_capacity: usize,

    /// Most document bytes the shared live ring holds (bodies plus
    /// metadata, as sent); past it the oldest commits' documents are
    /// dropped and a subscriber still behind them reads them from the log.
    #[arg(long, env = "DELTASYNC_FEED_MAX_BYTES", default_value_t = 64 << 20)]
    pub feed_max_bytes: usize,

    /// HTTP/2 keepalive ping interval: detects dead peers and keeps proxies
    /// from cutting idle streams.
    #[arg(long, env = "DELTASYNC_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "DELTASYNC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// A command instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "DELTASYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Makes this node a replica of the primary at this URL, e.g.
    /// `http://deltasync-0.deltasync:50051`: it copies the primary's store,
    /// serves reads and forwards writes. Without it the node is a primary.
    #[arg(long, env = "DELTASYNC_REPLICATE_FROM")]
    pub replicate_from: Option<String>,

    /// This node's name among its peers: a StatefulSet pod's name, from the
    /// downward API. A node whose --replicate-from URL names itself (the
    /// URL's host is this name, or starts with this name and a dot) is the
    /// primary and follows no one, so every pod of a StatefulSet takes the
    /// same flags and the one the URL points at leads.
    #[arg(long, env = "DELTASYNC_POD_NAME")]
    pub pod_name: Option<String>,

    /// How other nodes and clients reach this node (reported in
    /// AdminService.Status and in NOT_PRIMARY errors).
    #[arg(long, env = "DELTASYNC_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// On a primary (or a replica once promoted): a Push is answered only
    /// once its commit is durable here and acknowledged as durable by this
    /// many replicas.
    #[arg(long, env = "DELTASYNC_SYNC_REPLICAS", default_value_t = 0)]
    pub sync_replicas: usize,

    /// How long a Push waits for --sync-replicas acknowledgements before it
    /// is answered UNAVAILABLE (committed here, to be retried with the same
    /// mutation ids).
    #[arg(long, env = "DELTASYNC_SYNC_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sync_timeout: Duration,

    /// On a replica: forward a Push to the primary (true) or refuse it
    /// with FAILED_PRECONDITION, reason NOT_PRIMARY (false).
    #[arg(long, env = "DELTASYNC_FORWARD_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    pub forward_writes: bool,

    /// How long a read waits for this node to reach the checkpoint it asks
    /// for (`min_checkpoint`, or a `since` above a replica's head) when the
    /// call has no shorter deadline.
    #[arg(long, env = "DELTASYNC_REPLICA_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub replica_wait: Duration,

    /// A replica further behind its primary's head (as last heard) than
    /// this many seqs reports `deltasync.v1.SyncService` NOT_SERVING.
    #[arg(long, env = "DELTASYNC_MAX_REPLICA_LAG", default_value_t = 1000)]
    pub max_replica_lag: u64,

    /// On a replica that was a primary: discard the commits it holds that
    /// the new primary never had (each dropped document is logged), instead
    /// of refusing to follow.
    #[arg(long, env = "DELTASYNC_DISCARD_DIVERGENT")]
    pub discard_divergent: bool,

    /// Serve TLS on the main port with this certificate chain (PEM);
    /// reloaded within a second of a change, or on SIGHUP, without
    /// dropping open connections.
    #[arg(long, env = "DELTASYNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DELTASYNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// mTLS: clients must present a certificate signed by this CA (PEM);
    /// others are refused at the handshake.
    #[arg(long, env = "DELTASYNC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// The CA (PEM) this node trusts for its primary's certificate, when it
    /// follows it (or forwards to it) over `https://`.
    #[arg(long, env = "DELTASYNC_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// The client certificate (PEM) this node presents to its primary
    /// (mTLS).
    #[arg(long, env = "DELTASYNC_UPSTREAM_CERT", requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,

    /// The private key of --upstream-cert (PEM).
    #[arg(long, env = "DELTASYNC_UPSTREAM_KEY", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,

    /// Also serve `grpc.health.v1` alone, plaintext and without auth, on
    /// this address (for the kubelet's gRPC probes when the main port
    /// needs credentials).
    #[arg(long, env = "DELTASYNC_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (plain HTTP,
    /// no auth: bind it where only the scraper reaches). Off by default.
    #[arg(long, env = "DELTASYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Label pushed-mutation metrics with their collection. Off by
    /// default: collections are named by clients, so each new one adds
    /// series to every scrape.
    #[arg(long, env = "DELTASYNC_METRICS_COLLECTION_LABELS")]
    pub metrics_collection_labels: bool,

    /// The principals, their token hashes and grants (TOML; see the
    /// README). Without it the server is open to anyone who reaches it.
    /// Reloaded within a second of a change, or on SIGHUP.
    #[arg(long, env = "DELTASYNC_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// A file holding the bearer token this node presents to its primary
    /// when it follows it (surrounding whitespace ignored; read at every
    /// connection, so it can be rotated).
    #[arg(long, env = "DELTASYNC_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,

    /// sled's page cache, in bytes (sled's default: 1 GiB). Size the
    /// memory limit for this plus the document index (about 150 bytes per
    /// document) and --feed-max-bytes.
    #[arg(long, env = "DELTASYNC_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub cache_bytes: u64,

    /// How long shutdown waits for open calls before it stops anyway.
    #[arg(long, env = "DELTASYNC_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

impl Config {
    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 {
            return Err("--max-batch must be at least 1".into());
        }
        if self.pull_max_limit == 0 {
            return Err("--pull-max-limit must be at least 1".into());
        }
        if self.tombstone_retention < self.history_retention {
            return Err(format!(
                "--tombstone-retention ({}) must be at least --history-retention ({})",
                humantime::format_duration(self.tombstone_retention),
                humantime::format_duration(self.history_retention)
            ));
        }
        let min_clients = crate::store::clients::SEEN_GRANULARITY * 10;
        if self.client_retention < self.history_retention || self.client_retention < min_clients {
            return Err(format!(
                "--client-retention ({}) must be at least --history-retention ({}) and {} \
                 (a client's last push is recorded to the minute)",
                humantime::format_duration(self.client_retention),
                humantime::format_duration(self.history_retention),
                humantime::format_duration(min_clients)
            ));
        }
        let skeletons = self.max_batch.saturating_mul(RESULT_SKELETON_BYTES);
        if skeletons.saturating_add(MESSAGE_OVERHEAD_BYTES) > self.max_message_bytes {
            return Err(format!(
                "--max-batch ({}) results of up to {RESULT_SKELETON_BYTES} bytes each (without bodies) must fit in \
                 --max-message-bytes ({}), so that every Push can be answered",
                self.max_batch, self.max_message_bytes
            ));
        }
        if self.max_concurrent_requests == 0 {
            return Err("--max-concurrent-requests must be at least 1".into());
        }
        if self.history_max_versions == 0 || self.compaction_batch == 0 || self.feed_capacity == 0 {
            return Err(
                "--history-max-versions, --compaction-batch and --feed-capacity must be at least 1"
                    .into(),
            );
        }
        if self.compaction_interval.is_zero()
            || self.keepalive_interval.is_zero()
            || self.keepalive_timeout.is_zero()
        {
            return Err("--compaction-interval, --keepalive-interval and --keepalive-timeout must be positive".into());
        }
        if let Some(url) = &self.replicate_from {
            url.parse::<tonic::transport::Uri>()
                .ok()
                .filter(|u| u.scheme().is_some() && u.host().is_some())
                .ok_or_else(|| {
                    format!("--replicate-from `{url}` is not a URL like http://host:port")
                })?;
        }
        if let Some(name) = &self.pod_name {
            let label = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
            if name.is_empty() || name.len() > 253 || !name.chars().all(label) {
                return Err(format!(
                    "--pod-name `{name}` is not a pod name (lowercase letters, digits and -)"
                ));
            }
        }
        if self.sync_timeout.is_zero() || self.replica_wait.is_zero() {
            return Err("--sync-timeout and --replica-wait must be positive".into());
        }
        if self.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be positive".into());
        }
        if self.max_body_bytes.saturating_add(MESSAGE_OVERHEAD_BYTES) > self.max_request_bytes {
            return Err(format!(
                "--max-body-bytes ({}) plus {MESSAGE_OVERHEAD_BYTES} bytes of overhead must fit in --max-request-bytes ({}), \
                 so that a push of the largest body is accepted",
                self.max_body_bytes, self.max_request_bytes
            ));
        }
        if self.max_body_bytes.saturating_add(MESSAGE_OVERHEAD_BYTES) > self.max_message_bytes {
            return Err(format!(
                "--max-body-bytes ({}) plus {MESSAGE_OVERHEAD_BYTES} bytes of overhead must fit in --max-message-bytes ({}), \
                 so that every stored document can be served",
                self.max_body_bytes, self.max_message_bytes
            ));
        }
        Ok(())
    }

    /// The primary this node follows: --replicate-from, unless that URL
    /// names this node itself (see --pod-name), which makes it the primary.
    pub fn primary_url(&self) -> Option<&str> {
        let url = self.replicate_from.as_deref()?;
        match &self.pod_name {
            Some(pod) if names_pod(url, pod) => None,
            _ => Some(url),
        }
    }

    /// What retention keeps.
    pub fn retention(&self) -> crate::store::compaction::Retention {
        crate::store::compaction::Retention {
            history: self.history_retention,
            max_versions: self.history_max_versions,
            tombstones: self.tombstone_retention,
            clients: self.client_retention,
            batch: self.compaction_batch,
        }
    }

    /// A configuration with every default, for tests and embedding.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Self::parse_from(["deltasync"]);
        config.data_dir = data_dir.into();
        config
    }
}

/// True if `url`'s host is `pod`, or a DNS name whose first label is `pod`
/// (`http://db-0.db-headless.ns.svc:50051` names `db-0`).
fn names_pod(url: &str, pod: &str) -> bool {
    url.parse::<tonic::transport::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_ascii_lowercase))
        .is_some_and(|host| host.split('.').next() == Some(pod))
}

/// Default conflict strategies: per collection, else a global default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConflictPolicy {
    /// Strategy for collections not named.
    default: Strategy,
    /// Per-collection strategies.
    collections: HashMap<String, Strategy>,
}

impl ConflictPolicy {
    /// Parses `name=strategy,...`; the name `default` sets the fallback.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut policy = Self::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, strategy) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not collection=strategy"))?;
            let strategy = match strategy
                .trim()
                .to_ascii_lowercase()
                .replace('-', "_")
                .as_str()
            {
                "reject" => Strategy::Reject,
                "server_wins" => Strategy::ServerWins,
                "client_wins" => Strategy::ClientWins,
                other => {
                    return Err(format!(
                        "unknown strategy `{other}` (reject, server_wins, client_wins)"
                    ));
                }
            };
            match name.trim() {
                "default" => policy.default = strategy,
                collection => {
                    policy.collections.insert(collection.to_owned(), strategy);
                }
            }
        }
        Ok(policy)
    }

    /// The strategy for `collection` when a mutation does not name one.
    pub fn for_collection(&self, collection: &str) -> Strategy {
        self.collections
            .get(collection)
            .copied()
            .unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses_defaults_and_overrides() {
        let p = ConflictPolicy::parse("todos=client_wins, default=server-wins").unwrap();
        assert_eq!(p.for_collection("todos"), Strategy::ClientWins);
        assert_eq!(p.for_collection("notes"), Strategy::ServerWins);
        assert_eq!(
            ConflictPolicy::parse("").unwrap().for_collection("x"),
            Strategy::Reject
        );
        assert!(ConflictPolicy::parse("todos").is_err());
        assert!(ConflictPolicy::parse("todos=maybe").is_err());
    }

    #[test]
    fn the_pod_the_url_names_is_the_primary() {
        let url = "http://db-0.db-headless.ns.svc.cluster.local:50051";
        let node = |pod: Option<&str>| {
            let mut c = Config::for_data_dir("x");
            c.replicate_from = Some(url.into());
            c.pod_name = pod.map(Into::into);
            assert_eq!(c.validate(), Ok(()));
            c.primary_url().map(str::to_owned)
        };
        assert_eq!(node(Some("db-0")), None);
        assert_eq!(node(Some("db-1")).as_deref(), Some(url));
        assert_eq!(node(Some("db-10")).as_deref(), Some(url));
        // A name that only starts like the primary's is another pod.
        assert_eq!(node(Some("db")).as_deref(), Some(url));
        // Without --pod-name the flag means what it always did.
        assert_eq!(node(None).as_deref(), Some(url));
        // A host given as a bare pod name, or an https URL, works the same.
        let mut c = Config::for_data_dir("x");
        c.replicate_from = Some("https://db-0:50051".into());
        c.pod_name = Some("db-0".into());
        assert_eq!(c.primary_url(), None);
        // No --replicate-from: a primary, whatever the name.
        c.replicate_from = None;
        assert_eq!(c.primary_url(), None);
    }

    #[test]
    fn pod_name_must_be_a_pod_name() {
        let mut c = Config::for_data_dir("x");
        for bad in ["", "Db-0", "db_0", "db 0"] {
            c.pod_name = Some(bad.into());
            assert!(c.validate().unwrap_err().contains("--pod-name"), "{bad}");
        }
        let c = Config::try_parse_from([
            "deltasync",
            "--pod-name",
            "db-2",
            "--cache-bytes",
            "1048576",
        ])
        .unwrap();
        assert_eq!(
            (c.pod_name.as_deref(), c.cache_bytes),
            (Some("db-2"), 1 << 20)
        );
        assert_eq!(Config::for_data_dir("x").cache_bytes, DEFAULT_CACHE_BYTES);
    }

    #[test]
    fn tombstones_must_outlive_history() {
        let mut c = Config::for_data_dir("x");
        c.tombstone_retention = Duration::from_secs(60);
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("--tombstone-retention (1m) must be at least --history-retention (7days)"),
            "{err}"
        );
    }

    #[test]
    fn defaults_are_valid_and_body_must_fit_a_message() {
        let mut c = Config::for_data_dir("x");
        assert_eq!(c.validate(), Ok(()));
        c.max_body_bytes = c.max_message_bytes;
        assert!(c.validate().unwrap_err().contains("--max-message-bytes"));
        let mut c = Config::for_data_dir("x");
        c.max_request_bytes = c.max_body_bytes;
        assert!(c.validate().unwrap_err().contains("--max-request-bytes"));
    }
}
