//! deltasync: a gRPC service that keeps versioned JSON documents in an
//! embedded sled store and keeps other services in sync with them.
//!
//! - **Push** applies batches of mutations with per-document optimistic
//!   concurrency and field-level conflict detection against a delta log,
//!   deduplicating retries by client id + mutation id.
//! - **Pull** catches up from a checkpoint, page by page.
//! - **Subscribe** follows changes live from a checkpoint, with no gap and no
//!   duplicate.
//!
//! # Layout
//! Data flows one way: handler → store → feed → stream.
//! - [`config`]: flags and `DELTASYNC_*` environment variables.
//! - [`server`]: `serve()`, which wires the gRPC services, health and
//!   reflection, drains on shutdown and closes the store.
//! - [`service`]: one file per RPC; `service::convert` holds every proto ↔
//!   domain conversion.
//! - [`store`]: the typed sled store: a log of records keyed by seq
//!   (`store::codec`; a superseded record is the delta log's entry of its
//!   version), the in-memory document index (`store::index`), bodies kept in
//!   their `google.protobuf.Struct` encoding (`store::body`, served without
//!   re-encoding), the pure conflict check, push planning, the group-commit
//!   writer (atomic through its commit mark and `store::redo`), reads (with read-ahead for paged pulls), the subscriber feed
//!   (one broadcast ring, catch-up from the log), retention
//!   (`store::compaction`) and upgrades from earlier layouts
//!   (`store::migrate`).
//! - [`replication`]: primary and replicas: the `ReplicationService.Follow`
//!   stream (`replication::source` on the primary, `replication::follower`
//!   on a replica, which applies commits through the store's writer), write
//!   forwarding, `AdminService` (Status, Promote), epochs and fencing;
//!   `store::replica` is the store's side (applying replicated commits,
//!   the epoch history).
//!   `replication::apply` applies a primary's messages to a store, for the
//!   follower and for a snapshot restore alike.
//! - [`snapshot`]: backup and restore: a consistent copy of the whole store
//!   read through the replication stream into one checksummed file
//!   (`snapshot::file`), and a new data dir built from it.
//! - [`auth`], [`tls`]: who calls (bearer tokens or client certificates,
//!   decided once in an interceptor), per-collection permissions, limits
//!   and the overload guard; the reloadable TLS acceptor.
//! - [`metrics`]: every metric exported, declared in one file; the RPC
//!   layer (`metrics::layer`, go-grpc-prometheus names) and the
//!   `--metrics-listen` page (`metrics::http`).
//! - [`error`]: the service-boundary error and its one mapping to `Status`.
//! - [`client`]: the typed async client library (failover, exactly-once
//!   retries of pushes, read-your-writes, a watch that resumes across
//!   restarts, TLS and tokens) over the generated stubs.
//! - [`replica`]: offline-first local replicas over [`client`]: a sled
//!   store of their own (`replica::store`: base documents, checkpoint, a
//!   durable outbox keyed by mutation id, parked conflicts), the optimistic
//!   view (`replica::view`, pure: the base with the outbox replayed), and
//!   sync (push in order with the replica's own ids, answers applied and
//!   later writes rebased, conflicts to per-collection resolvers, catch-up
//!   by Pull, resync from 0).
//! - [`cli`]: the `deltasync` subcommands (`get`, `put`, `pull`, `watch`,
//!   `status`, ...), a thin user of [`client`] modelled on etcdctl, with
//!   one printer per output format; serving stays the default;
//!   `cli::local` is `deltasync local ...` over [`replica`].
//! - [`telemetry`], [`shutdown`]: logging and signals.
//! - [`pb`]: generated code.
//!
//! The benchmark binary `deltasync-bench` (`src/bin/deltasync-bench/`, built
//! with `--features bench`) drives deltasync or etcd with the same workloads.

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod error;
pub mod metrics;
pub mod pb;
pub mod replica;
pub mod replication;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use config::Config;
pub use server::{ServeError, serve, serve_with};
