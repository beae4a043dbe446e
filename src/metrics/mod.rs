//! Every metric the server exports, declared in this one file: a reader
//! sees the whole `/metrics` page here. [`layer`] counts RPCs (RED, with
//! go-grpc-prometheus names); [`http`] serves the page (`--metrics-listen`).
//!
//! Crate: `prometheus-client` (the official Rust client), because its
//! [`Registry`] is a value: each server owns one, handed around as the
//! cheap `Clone` [`Metrics`] handle, so two servers in one process (as in
//! the tests) never mix their counters; it adds five small crates and no
//! HTTP or TLS stack (the page is served with the hyper tonic already has).
//!
//! Labels never carry a document id or a client id. A `collection` label
//! appears only with `--metrics-collection-labels`, and only on
//! `deltasync_push_mutations_total`: with it that family is registered with
//! the labels `{collection, outcome, strategy}`, without it with
//! `{outcome, strategy}` (the label set is fixed for the life of a process).
//! Collections are chosen by clients, so the flag trades bounded
//! cardinality for the per-collection view.
//!
//! The hot path only increments atomics (a histogram takes the crate's
//! short lock): label sets are resolved once, at startup or on first use,
//! and kept. Store-wide gauges (head, documents, size on disk, followers)
//! are sampled when `/metrics` is scraped, never on a write.

pub mod http;
pub mod layer;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::store::model::{Outcome, Strategy};

pub use self::layer::RpcLayer;

/// Buckets (seconds) of RPC handling time, as go-grpc-prometheus and
/// client_golang's defaults.
const RPC_SECONDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets (seconds) of an fsync: from a fast NVMe's 100 µs to a
/// struggling disk's seconds.
const FSYNC_SECONDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];
/// Buckets of a count (group-commit size, seqs behind): powers of 4.
const COUNTS: [f64; 10] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0,
];
/// Buckets (seconds) of a compaction round.
const ROUND_SECONDS: [f64; 9] = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0];

/// Why a call was refused before (or instead of) being served: a small
/// fixed set, the `reason` label of `deltasync_refused_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No valid credential (UNAUTHENTICATED).
    Unauthenticated,
    /// A grant is missing (PERMISSION_DENIED).
    PermissionDenied,
    /// The principal's `requests_per_second` is spent.
    RateLimitedRequests,
    /// The principal's `mutations_per_second` is spent.
    RateLimitedMutations,
    /// The principal's `max_subscriptions` are open.
    PrincipalStreams,
    /// `--max-subscribers` streams are open.
    MaxSubscribers,
    /// `--max-concurrent-requests` calls are in progress.
    Overloaded,
}

impl Refusal {
    /// Every reason, in the order of [`Refusal::label`]'s table.
    const ALL: [Self; 7] = [
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::RateLimitedRequests,
        Self::RateLimitedMutations,
        Self::PrincipalStreams,
        Self::MaxSubscribers,
        Self::Overloaded,
    ];

    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::RateLimitedRequests => "rate_limited_requests",
            Self::RateLimitedMutations => "rate_limited_mutations",
            Self::PrincipalStreams => "principal_streams",
            Self::MaxSubscribers => "max_subscribers",
            Self::Overloaded => "overloaded",
        }
    }
}

/// The `outcome` label of a mutation.
fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::Merged => "merged",
        Outcome::Resolved => "resolved",
        Outcome::Conflict => "conflict",
        Outcome::Duplicate => "duplicate",
        Outcome::NotApplied => "not_applied",
    }
}

/// Every outcome, in the order of the pre-resolved counters.
const OUTCOMES: [Outcome; 6] = [
    Outcome::Applied,
    Outcome::Merged,
    Outcome::Resolved,
    Outcome::Conflict,
    Outcome::Duplicate,
    Outcome::NotApplied,
];

/// The `strategy` label of a mutation.
fn strategy_label(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Reject => "reject",
        Strategy::ServerWins => "server_wins",
        Strategy::ClientWins => "client_wins",
    }
}

/// Every strategy, in the order of the pre-resolved counters.
const STRATEGIES: [Strategy; 3] = [Strategy::Reject, Strategy::ServerWins, Strategy::ClientWins];

/// Labels of `deltasync_push_mutations_total` without collections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    /// What happened to the mutation.
    outcome: &'static str,
    /// The strategy in effect for it.
    strategy: &'static str,
}

/// Labels of `deltasync_push_mutations_total` with
/// `--metrics-collection-labels`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CollectionPushLabels {
    /// The mutation's collection.
    collection: String,
    /// What happened to the mutation.
    outcome: &'static str,
    /// The strategy in effect for it.
    strategy: &'static str,
}

/// Labels of the per-replica series on a primary.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    /// The replica's advertised URL: bounded by the followers connected.
    replica: String,
}

/// Labels of `deltasync_refused_calls_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// One of [`Refusal`].
    reason: &'static str,
}

/// Push mutations, counted by the writer once committed.
enum PushCounters {
    /// Pre-resolved per outcome × strategy: an index and an atomic add.
    Fixed([[Counter; 3]; 6]),
    /// With collections: looked up once per distinct label set per group.
    ByCollection(Family<CollectionPushLabels, Counter>),
}

/// What a scrape samples from the store and the node.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// The published head.
    pub head: u64,
    /// Documents in the index, tombstones included.
    pub documents: u64,
    /// Tombstones among them.
    pub tombstones: u64,
    /// sled's size on disk.
    pub bytes_on_disk: u64,
    /// The purge horizon.
    pub purge_horizon: u64,
    /// On a primary: each follower's advertised URL and acknowledged seq.
    pub followers: Vec<(String, u64)>,
    /// On a replica: the primary's head as last heard.
    pub primary_head: Option<u64>,
    /// On a replica: how long ago the primary was last heard (`None`:
    /// never, since this process started).
    pub primary_heard_ago: Option<std::time::Duration>,
}

/// A cheap `Clone` handle to one server's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Everything the clones share.
    shared: Arc<Shared>,
}

/// The registry and handles to every metric in it.
struct Shared {
    /// What `/metrics` encodes.
    registry: Registry,
    /// RPCs started, handled and their duration, by method (see [`layer`]).
    rpc: layer::RpcFamilies,
    /// `deltasync_push_mutations_total`.
    push_mutations: PushCounters,
    /// `deltasync_group_commit_mutations`.
    group_commit_mutations: Histogram,
    /// `deltasync_fsync_seconds`.
    fsync_seconds: Histogram,
    /// `deltasync_head_seq`.
    head_seq: Gauge,
    /// `deltasync_documents`.
    documents: Gauge,
    /// `deltasync_tombstones`.
    tombstones: Gauge,
    /// `deltasync_store_size_bytes`.
    store_bytes: Gauge,
    /// `deltasync_subscribers`.
    subscribers: Gauge,
    /// `deltasync_subscriber_lag_seqs`.
    subscriber_lag: Histogram,
    /// `deltasync_subscriber_log_fallbacks_total`.
    subscriber_fallbacks: Counter,
    /// `deltasync_replica_lag_seqs{replica}` (on a primary).
    replica_lag: Family<ReplicaLabels, Gauge>,
    /// `deltasync_replica_acked_seq{replica}` (on a primary).
    replica_acked: Family<ReplicaLabels, Gauge>,
    /// `deltasync_replication_applied_seq` (on a replica).
    replication_applied: Gauge,
    /// `deltasync_replication_lag_seqs` (on a replica).
    replication_lag: Gauge,
    /// `deltasync_replicas_connected` (on a primary): a replica that
    /// disconnects leaves the per-replica series, so alert on this count.
    replicas_connected: Gauge,
    /// `deltasync_replication_last_heard_seconds` (on a replica): grows
    /// while the primary is unreachable (the lag gauge then stays frozen).
    replication_last_heard: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `deltasync_compaction_rounds_total`.
    compaction_rounds: Counter,
    /// `deltasync_compaction_records_pruned_total`.
    compaction_pruned: Counter,
    /// `deltasync_compaction_tombstones_purged_total`.
    compaction_purged: Counter,
    /// `deltasync_compaction_clients_forgotten_total`.
    compaction_forgotten: Counter,
    /// `deltasync_compaction_round_seconds`.
    compaction_seconds: Histogram,
    /// `deltasync_purge_horizon_seq`.
    purge_horizon: Gauge,
    /// `deltasync_refused_calls_total{reason}`, pre-resolved per reason.
    refused: [Counter; 7],
    /// One scrape at a time: a scrape clears and refills the per-replica
    /// series.
    scraping: Mutex<()>,
}

impl Default for Metrics {
    /// Metrics without collection labels.
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    /// A fresh registry with every metric; `collection_labels` as
    /// `--metrics-collection-labels`.
    pub fn new(collection_labels: bool) -> Self {
        let mut r = Registry::default();
        let rpc = layer::RpcFamilies::register(&mut r);

        let push_mutations = if collection_labels {
            let family = Family::<CollectionPushLabels, Counter>::default();
            r.register(
                "deltasync_push_mutations",
                "Pushed mutations committed, by outcome, effective conflict strategy and collection",
                family.clone(),
            );
            PushCounters::ByCollection(family)
        } else {
            let family = Family::<PushLabels, Counter>::default();
            r.register(
                "deltasync_push_mutations",
                "Pushed mutations committed, by outcome and effective conflict strategy",
                family.clone(),
            );
            PushCounters::Fixed(OUTCOMES.map(|o| {
                STRATEGIES.map(|s| {
                    family.get_or_create_owned(&PushLabels {
                        outcome: outcome_label(o),
                        strategy: strategy_label(s),
                    })
                })
            }))
        };
        let histogram = |r: &mut Registry, name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::new(buckets.iter().copied());
            r.register(name, help, h.clone());
            h
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let group_commit_mutations = histogram(
            &mut r,
            "deltasync_group_commit_mutations",
            "Mutations (or replicated records) written by one group commit",
            &COUNTS,
        );
        let fsync_seconds = histogram(
            &mut r,
            "deltasync_fsync_seconds",
            "Time of one flush of the store to disk (group commit or background flusher)",
            &FSYNC_SECONDS,
        );
        let head_seq = gauge(
            &mut r,
            "deltasync_head_seq",
            "The store's published head seq",
        );
        let documents = gauge(
            &mut r,
            "deltasync_documents",
            "Documents in the store, tombstones included",
        );
        let tombstones = gauge(&mut r, "deltasync_tombstones", "Tombstones in the store");
        let store_bytes = gauge(
            &mut r,
            "deltasync_store_size_bytes",
            "The store's size on disk, as sled reports it (sampled on scrape)",
        );
        let subscribers = gauge(&mut r, "deltasync_subscribers", "Open Subscribe streams");
        let subscriber_lag = histogram(
            &mut r,
            "deltasync_subscriber_lag_seqs",
            "How far behind the head a subscriber is, in seqs, each time it is handed changes",
            &COUNTS,
        );
        let subscriber_fallbacks = counter(
            &mut r,
            "deltasync_subscriber_log_fallbacks",
            "Subscribers overtaken by the live ring, who caught up from the log",
        );
        let replica_lag = Family::<ReplicaLabels, Gauge>::default();
        r.register(
            "deltasync_replica_lag_seqs",
            "On a primary: seqs between the head and what each connected replica acknowledged",
            replica_lag.clone(),
        );
        let replica_acked = Family::<ReplicaLabels, Gauge>::default();
        r.register(
            "deltasync_replica_acked_seq",
            "On a primary: the seq each connected replica acknowledged",
            replica_acked.clone(),
        );
        let replication_applied = gauge(
            &mut r,
            "deltasync_replication_applied_seq",
            "On a replica: the seq applied from the primary",
        );
        let replication_lag = gauge(
            &mut r,
            "deltasync_replication_lag_seqs",
            "On a replica: seqs behind the primary's head as last heard",
        );
        let replicas_connected = gauge(
            &mut r,
            "deltasync_replicas_connected",
            "On a primary: replicas following it now (snapshot saves not counted)",
        );
        let replication_last_heard = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        r.register(
            "deltasync_replication_last_heard_seconds",
            "On a replica: seconds since the primary was last heard (a commit or its idle progress, every second)",
            replication_last_heard.clone(),
        );
        let compaction_rounds = counter(
            &mut r,
            "deltasync_compaction_rounds",
            "Compaction rounds finished",
        );
        let compaction_pruned = counter(
            &mut r,
            "deltasync_compaction_records_pruned",
            "Superseded delta-log records pruned by compaction",
        );
        let compaction_purged = counter(
            &mut r,
            "deltasync_compaction_tombstones_purged",
            "Expired tombstones purged by compaction",
        );
        let compaction_forgotten = counter(
            &mut r,
            "deltasync_compaction_clients_forgotten",
            "Clients unseen past --client-retention, forgotten by compaction",
        );
        let compaction_seconds = histogram(
            &mut r,
            "deltasync_compaction_round_seconds",
            "Wall time of one compaction round",
            &ROUND_SECONDS,
        );
        let purge_horizon = gauge(
            &mut r,
            "deltasync_purge_horizon_seq",
            "Seq up to which tombstones may have been purged: a checkpoint below it must resync",
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        r.register(
            "deltasync_refused_calls",
            "Calls refused (or rate limited) before being served, by reason",
            refusals.clone(),
        );
        let refused = Refusal::ALL.map(|reason| {
            refusals.get_or_create_owned(&RefusalLabels {
                reason: reason.label(),
            })
        });
        Self {
            shared: Arc::new(Shared {
                registry: r,
                rpc,
                push_mutations,
                group_commit_mutations,
                fsync_seconds,
                head_seq,
                documents,
                tombstones,
                store_bytes,
                subscribers,
                subscriber_lag,
                subscriber_fallbacks,
                replica_lag,
                replica_acked,
                replication_applied,
                replication_lag,
                replicas_connected,
                replication_last_heard,
                compaction_rounds,
                compaction_pruned,
                compaction_purged,
                compaction_forgotten,
                compaction_seconds,
                purge_horizon,
                refused,
                scraping: Mutex::new(()),
            }),
        }
    }

    /// The tower layer counting every RPC.
    pub fn rpc_layer(&self) -> RpcLayer {
        RpcLayer::new(self.shared.rpc.clone())
    }

    /// Counts one push's committed mutations, each as `(collection,
    /// outcome, strategy)`.
    pub fn push_mutations<'a>(
        &self,
        mutations: impl IntoIterator<Item = (&'a str, Outcome, Strategy)>,
    ) {
        match &self.shared.push_mutations {
            PushCounters::Fixed(counters) => {
                for (_, outcome, strategy) in mutations {
                    counters[outcome_index(outcome)][strategy_index(strategy)].inc();
                }
            }
            PushCounters::ByCollection(family) => {
                // Counted per distinct label set, so a batch allocates a
                // key per collection, not per mutation.
                let mut seen: Vec<(&str, Outcome, Strategy, u64)> = Vec::new();
                for (collection, outcome, strategy) in mutations {
                    match seen
                        .iter_mut()
                        .find(|s| s.0 == collection && s.1 == outcome && s.2 == strategy)
                    {
                        Some(s) => s.3 += 1,
                        None => seen.push((collection, outcome, strategy, 1)),
                    }
                }
                for (collection, outcome, strategy, n) in seen {
                    family
                        .get_or_create(&CollectionPushLabels {
                            collection: collection.to_owned(),
                            outcome: outcome_label(outcome),
                            strategy: strategy_label(strategy),
                        })
                        .inc_by(n);
                }
            }
        }
    }

    /// One group commit of `mutations` mutations (or replicated records).
    pub fn group_commit(&self, mutations: usize) {
        self.shared.group_commit_mutations.observe(count(mutations));
    }

    /// One flush of the store, which took `took`.
    pub fn fsync(&self, took: Duration) {
        self.shared.fsync_seconds.observe(took.as_secs_f64());
    }

    /// A Subscribe stream opened; it counts as open until the guard drops.
    pub fn subscriber(&self) -> SubscriberGuard {
        self.shared.subscribers.inc();
        SubscriberGuard {
            metrics: self.clone(),
        }
    }

    /// A subscriber handed changes up to `checkpoint` while the head is
    /// `head`.
    pub fn subscriber_lag(&self, head: u64, checkpoint: u64) {
        self.shared
            .subscriber_lag
            .observe(count_u64(head.saturating_sub(checkpoint)));
    }

    /// A subscriber was overtaken by the ring and reads the log instead.
    pub fn subscriber_fallback(&self) {
        self.shared.subscriber_fallbacks.inc();
    }

    /// One compaction round.
    pub fn compaction_round(&self, pruned: usize, purged: usize, forgotten: usize, took: Duration) {
        let s = &self.shared;
        s.compaction_rounds.inc();
        s.compaction_pruned
            .inc_by(u64::try_from(pruned).unwrap_or(u64::MAX));
        s.compaction_purged
            .inc_by(u64::try_from(purged).unwrap_or(u64::MAX));
        s.compaction_forgotten
            .inc_by(u64::try_from(forgotten).unwrap_or(u64::MAX));
        s.compaction_seconds.observe(took.as_secs_f64());
    }

    /// A call refused for `reason`.
    pub fn refused(&self, reason: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.shared.refused[i].inc();
    }

    /// The page `/metrics` serves (Prometheus text format 0.0.4), after
    /// setting the sampled gauges from `sample`.
    pub fn encode(&self, sample: &Sample) -> String {
        let s = &self.shared;
        let _one = s.scraping.lock().unwrap_or_else(PoisonError::into_inner);
        s.head_seq.set(gauge_value(sample.head));
        s.documents.set(gauge_value(sample.documents));
        s.tombstones.set(gauge_value(sample.tombstones));
        s.store_bytes.set(gauge_value(sample.bytes_on_disk));
        s.purge_horizon.set(gauge_value(sample.purge_horizon));
        // Followers that left are gone from the page with their series.
        s.replica_lag.clear();
        s.replica_acked.clear();
        // Two streams of one replica (a reconnect): the one behind counts.
        // A snapshot save reads the stream too; it is not a replica.
        let mut replicas: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (url, acked) in &sample.followers {
            if url == crate::snapshot::FOLLOWER_NAME {
                continue;
            }
            let entry = replicas.entry(url.as_str()).or_insert(*acked);
            *entry = (*entry).min(*acked);
        }
        s.replicas_connected.set(gauge_value(
            u64::try_from(replicas.len()).unwrap_or(u64::MAX),
        ));
        for (url, acked) in replicas {
            let labels = ReplicaLabels {
                replica: url.to_owned(),
            };
            s.replica_lag
                .get_or_create(&labels)
                .set(gauge_value(sample.head.saturating_sub(acked)));
            s.replica_acked
                .get_or_create(&labels)
                .set(gauge_value(acked));
        }
        if let Some(ago) = sample.primary_heard_ago {
            s.replication_last_heard.set(ago.as_secs_f64());
        }
        s.replication_applied
            .set(gauge_value(sample.primary_head.map_or(0, |_| sample.head)));
        s.replication_lag.set(gauge_value(
            sample
                .primary_head
                .map_or(0, |p| p.saturating_sub(sample.head)),
        ));
        let mut page = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut page, &s.registry)
        {
            tracing::error!(cause = %e, "encoding metrics failed");
        }
        page
    }
}

/// One open Subscribe stream, counted in `deltasync_subscribers` until
/// dropped.
pub struct SubscriberGuard {
    /// The metrics it counts in.
    metrics: Metrics,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.metrics.shared.subscribers.dec();
    }
}

fn outcome_index(outcome: Outcome) -> usize {
    OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0)
}

fn strategy_index(strategy: Strategy) -> usize {
    STRATEGIES.iter().position(|s| *s == strategy).unwrap_or(0)
}

/// A gauge's value (an `i64`) from a count, saturating.
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A histogram observation from a count (exact below 2^53, which counts
/// here never reach).
fn count(v: usize) -> f64 {
    count_u64(u64::try_from(v).unwrap_or(u64::MAX))
}

/// As [`count`].
#[allow(clippy::cast_precision_loss)]
fn count_u64(v: u64) -> f64 {
    v as f64
}
