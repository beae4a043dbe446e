//! Replication: a primary and replicas that hold copies of its store.
//!
//! A replica follows its primary over `ReplicationService.Follow`
//! ([`follower`] on the replica, [`source`] on the primary) and applies each
//! commit through the store's own writer, index and feed, so everything
//! downstream (Pull, Get, Subscribe) works on a replica as on the primary.
//! Writes sent to a replica are forwarded to the primary ([`forward`]).
//! [`Node`] holds what the services need to know about the node's place in
//! the cluster: its role, the replicas following it (and their acks, for
//! `--sync-replicas`), and how far a replica is behind. [`admin`] serves
//! `AdminService` (Status, Promote); [`convert`] holds the pb ↔ domain
//! conversions of the stream.
//!
//! Epochs fence a deposed primary: every store has an epoch history
//! (`store::replica::Epochs`); a promotion starts a new epoch, and a
//! primary that meets a follower with a higher epoch stops taking writes.

pub mod admin;
pub mod apply;
pub mod convert;
pub mod follower;
pub mod forward;
pub mod source;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

use tonic::transport::Channel;

use crate::{
    config::Config,
    error::Error,
    pb::{self, sync_service_client::SyncServiceClient},
    shutdown::CancellationToken,
    store::{Admin, Store, model::Seq},
};

/// What a node does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes writes and streams them to replicas.
    Primary,
    /// Follows a primary, serves reads, forwards writes.
    Replica,
    /// Was a primary until it met a higher epoch: serves reads, refuses
    /// writes (NOT_PRIMARY) until restarted as a replica.
    Deposed,
}

/// The cluster settings of a node, from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// The primary to follow (a replica's `--replicate-from`).
    pub primary: Option<String>,
    /// How others reach this node.
    pub advertise_url: String,
    /// Replicas that must acknowledge a push before it is answered.
    pub sync_replicas: usize,
    /// How long a push waits for them.
    pub sync_timeout: Duration,
    /// Forward pushes sent to a replica (or refuse them).
    pub forward_writes: bool,
    /// Longest wait of a read for a checkpoint this node has not reached.
    pub replica_wait: Duration,
    /// Largest lag (in seqs) at which a replica still reports ready.
    pub max_replica_lag: u64,
    /// Discard a divergent suffix when rejoining (instead of refusing).
    pub discard_divergent: bool,
    /// Largest message the stream carries (as the server's sync messages).
    pub max_message_bytes: usize,
    /// The token this node presents to its primary.
    pub upstream_token_file: Option<std::path::PathBuf>,
    /// The CA it trusts for its primary's certificate.
    pub upstream_ca: Option<std::path::PathBuf>,
    /// The client certificate and key it presents to its primary.
    pub upstream_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Settings {
    /// The TLS configuration for connections to the primary, read from the
    /// files now (so a rotated client certificate is used at the next
    /// connection); `None` for a plaintext primary without TLS flags.
    pub fn upstream_tls(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity};
        let https = self
            .primary
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
        if !https && self.upstream_ca.is_none() && self.upstream_identity.is_none() {
            return Ok(None);
        }
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
        };
        let mut tls = ClientTlsConfig::new();
        match &self.upstream_ca {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read("--upstream-ca", ca)?)),
            None => {
                return Err(
                    "an https:// primary needs --upstream-ca (the CA of its certificate)".into(),
                );
            }
        }
        if let Some((cert, key)) = &self.upstream_identity {
            tls = tls.identity(TlsIdentity::from_pem(
                read("--upstream-cert", cert)?,
                read("--upstream-key", key)?,
            ));
        }
        Ok(Some(tls))
    }
}

impl Settings {
    /// The cluster settings of a configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            primary: config.primary_url().map(str::to_owned),
            advertise_url: config
                .advertise_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", config.listen)),
            sync_replicas: config.sync_replicas,
            sync_timeout: config.sync_timeout,
            forward_writes: config.forward_writes,
            replica_wait: config.replica_wait,
            max_replica_lag: config.max_replica_lag,
            discard_divergent: config.discard_divergent,
            max_message_bytes: config.max_message_bytes,
            upstream_token_file: config.upstream_token_file.clone(),
            upstream_ca: config.upstream_ca.clone(),
            upstream_identity: config
                .upstream_cert
                .clone()
                .zip(config.upstream_key.clone()),
        }
    }
}

/// One replica following this primary.
#[derive(Debug, Clone)]
struct Follower {
    /// Its advertise URL.
    url: String,
    /// The highest seq it acknowledged as durable.
    acked: u64,
    /// Once it has acknowledged this seq its client states are consistent
    /// with its documents (`None` while the stream is still catching up).
    consistent_at: Option<u64>,
}

impl Follower {
    /// Whether its acks count toward `--sync-replicas`.
    fn sync(&self) -> bool {
        self.consistent_at.is_some_and(|at| self.acked >= at)
    }
}

/// A replica's view of its primary.
#[derive(Debug, Default)]
struct Upstream {
    /// The primary's head as last heard (`None` before the first hello).
    primary_head: Option<u64>,
    /// When the primary was last heard from (for metrics).
    heard_at: Option<std::time::Instant>,
}

/// A cheap `Clone` handle to the node's cluster state.
#[derive(Clone)]
pub struct Node {
    /// Everything the clones share.
    shared: Arc<Shared>,
}

struct Shared {
    /// The node's store.
    store: Store,
    /// Cluster settings.
    settings: Settings,
    /// The role; watched by the follower (which stops on promotion) and by
    /// Follow streams (which end when the node is deposed).
    role: watch::Sender<Role>,
    /// Replicas following this node, by stream.
    followers: Mutex<HashMap<u64, Follower>>,
    /// Ids for `followers`.
    next_follower: AtomicU64,
    /// Woken when a follower acknowledges.
    acked: Notify,
    /// On a replica: where the primary is.
    upstream: Mutex<Upstream>,
    /// Whether this node should receive reads (`deltasync.v1.SyncService`
    /// readiness): false on a replica too far behind.
    ready: watch::Sender<bool>,
    /// On a replica: the follower, stopped on promotion.
    follower: Mutex<Option<follower::Handle>>,
    /// On a replica: the primary's SyncService, for forwarded pushes.
    primary: Option<SyncServiceClient<Channel>>,
    /// One promotion at a time.
    promoting: tokio::sync::Mutex<()>,
    /// Server shutdown, which also stops the follower.
    shutdown: CancellationToken,
    /// Pushes being handled: at shutdown a primary's Follow streams outlive
    /// them, so the acks `--sync-replicas` waits for can still arrive.
    pushes: watch::Sender<Pushes>,
}

impl Node {
    /// The node of `store`: a replica if settings name a primary, a deposed
    /// primary if its store has seen a higher epoch than its own, else a
    /// primary.
    pub fn new(
        store: Store,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let role = if settings.primary.is_some() {
            Role::Replica
        } else if store.seen_epoch()? > store.epochs().current() {
            tracing::warn!(
                "this store was deposed by a newer epoch: it serves reads and refuses writes; \
                 restart it as a replica of the current primary"
            );
            Role::Deposed
        } else {
            Role::Primary
        };
        let ready = role != Role::Replica;
        let primary = match &settings.primary {
            Some(url) => {
                let tls = settings.upstream_tls().map_err(Error::FailedPrecondition)?;
                Some(forward::client(url, tls, usize::MAX).map_err(Error::FailedPrecondition)?)
            }
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                settings,
                role: watch::Sender::new(role),
                followers: Mutex::default(),
                next_follower: AtomicU64::new(0),
                acked: Notify::new(),
                upstream: Mutex::default(),
                ready: watch::Sender::new(ready),
                follower: Mutex::default(),
                primary,
                promoting: tokio::sync::Mutex::new(()),
                shutdown,
                pushes: watch::Sender::new(Pushes::default()),
            }),
        })
    }

    /// On a node starting as primary on a store last written as a replica
    /// (restored from a snapshot, or a replica restarted without
    /// `--replicate-from`): begins a new epoch, as a promotion does, so the
    /// old primary's other replicas, which may hold commits this store never
    /// had at the same seqs, are told apart (DIVERGED) instead of following
    /// it silently. Refused while its client states are incomplete (it
    /// stopped while catching up): retries could then apply twice.
    pub async fn take_over(&self) -> Result<(), Error> {
        let store = &self.shared.store;
        if self.role() != Role::Primary || !store.was_replica()? {
            return Ok(());
        }
        self.check_consistent().map_err(|e| {
            Error::FailedPrecondition(format!(
                "cannot start as primary: {e}; start it with --replicate-from until it caught up"
            ))
        })?;
        let head = store.head();
        let epochs = store.epochs().promoted(head, store.seen_epoch()?);
        let epoch = epochs.current();
        store.admin(Admin::Promote(epochs)).await?;
        tracing::warn!(epoch, %head, "this store was a replica's: starting as primary in a new epoch");
        Ok(())
    }

    /// On a replica: starts following the primary.
    pub fn start_following(&self) {
        if self.role() == Role::Replica {
            let handle = follower::spawn(self.clone(), self.shared.shutdown.clone());
            *self
                .shared
                .follower
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(handle);
        }
    }

    /// Where a Push goes on this node: `None` to this store (a primary),
    /// else the primary's client (a replica forwarding writes).
    pub fn write_route(&self) -> Result<Option<SyncServiceClient<Channel>>, Error> {
        match self.role() {
            Role::Primary => Ok(None),
            Role::Replica if self.shared.settings.forward_writes => Ok(self.shared.primary.clone()),
            Role::Replica | Role::Deposed => Err(self.not_primary()),
        }
    }

    /// Makes this replica a primary: it stops following, takes epoch = the
    /// highest epoch seen + 1 from the next seq on, and takes writes.
    /// Refused on a primary, and on a replica whose client states are not
    /// yet consistent with its documents (a retry could then be applied
    /// twice).
    pub async fn promote(&self) -> Result<(u64, Seq), Error> {
        let _one = self.shared.promoting.lock().await;
        match self.role() {
            Role::Replica => {}
            Role::Primary => {
                return Err(Error::FailedPrecondition(
                    "this node is already the primary".into(),
                ));
            }
            Role::Deposed => {
                return Err(Error::FailedPrecondition(
                    "this node was deposed by a newer epoch; restart it as a replica of the current primary".into(),
                ));
            }
        }
        self.check_consistent()?;
        let follower = self
            .shared
            .follower
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(follower) = follower {
            follower.stop().await;
        }
        let store = &self.shared.store;
        // Every commit the follower queued is applied and durable first;
        // then the check holds for good (nothing changes the store now).
        store.admin(Admin::Flush).await?;
        if let Err(e) = self.check_consistent() {
            self.start_following();
            return Err(e);
        }
        let head = store.head();
        let epochs = store.epochs().promoted(head, store.seen_epoch()?);
        let epoch = epochs.current();
        store.admin(Admin::Promote(epochs)).await?;
        self.become_primary();
        tracing::warn!(epoch, %head, "promoted to primary");
        Ok((epoch, head))
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Cluster settings.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The current role.
    pub fn role(&self) -> Role {
        *self.shared.role.borrow()
    }

    /// Follows role changes.
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.shared.role.subscribe()
    }

    /// Follows readiness (a replica is not ready while too far behind).
    pub fn watch_ready(&self) -> watch::Receiver<bool> {
        self.shared.ready.subscribe()
    }

    /// The error a write gets on a node that does not take it.
    pub fn not_primary(&self) -> Error {
        let primary = match self.role() {
            Role::Replica => self.shared.settings.primary.clone().unwrap_or_default(),
            Role::Primary | Role::Deposed => String::new(),
        };
        Error::NotPrimary { primary }
    }

    /// Becomes a primary (after promotion).
    fn become_primary(&self) {
        self.shared.role.send_replace(Role::Primary);
        self.shared.ready.send_replace(true);
    }

    /// Stops taking writes: a follower showed a higher epoch.
    pub fn depose(&self, epoch: u64) {
        let was = self.shared.role.send_replace(Role::Deposed);
        if was == Role::Primary {
            tracing::error!(
                epoch,
                "a replica has seen a newer epoch: another node was promoted; this node takes no more writes"
            );
        }
    }

    /// Waits until this node has applied (durably) every change up to
    /// `wanted`, at most `wait`. A primary does not wait for a seq it never
    /// wrote: nothing would bring it.
    pub async fn wait_applied(&self, wanted: Seq, wait: Duration) -> Result<(), Error> {
        let feed = self.shared.store.feed();
        if feed.head() >= wanted {
            return Ok(());
        }
        let role = self.role();
        // A primary never gets what it did not write: the caller's writes
        // were lost (a failover or a restore), so waiting cannot help.
        if role == Role::Primary && wanted > feed.written() {
            return Err(Error::MinCheckpointAhead {
                wanted: wanted.0,
                head: feed.head().0,
            });
        }
        let deposed = role == Role::Deposed;
        if !(deposed && wanted > feed.written()) && feed.wait_published(wanted, wait).await {
            return Ok(());
        }
        Err(Error::ReplicaBehind {
            applied: feed.head().0,
            wanted: wanted.0,
        })
    }

    /// Registers a follower at `acked`; it is gone when the guard drops.
    pub fn follower(&self, url: String, acked: u64) -> FollowerGuard {
        let id = self.shared.next_follower.fetch_add(1, Ordering::Relaxed);
        self.followers().insert(
            id,
            Follower {
                url,
                acked,
                consistent_at: None,
            },
        );
        self.hold_purges();
        FollowerGuard {
            node: self.clone(),
            id,
        }
    }

    /// Tombstones above what some follower acknowledged are not purged
    /// while it follows: it would never see those deletions.
    fn hold_purges(&self) {
        let floor = self.followers().values().map(|f| f.acked).min();
        self.shared.store.hold_purges_above(floor.map(Seq));
    }

    fn followers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Follower>> {
        self.shared
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn upstream(&self) -> std::sync::MutexGuard<'_, Upstream> {
        self.shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a push as being handled until the guard is dropped; `None`
    /// once shutdown began (the push is refused before it commits: its
    /// replicas' streams may be ending).
    pub fn push_started(&self) -> Option<PushGuard> {
        let mut admitted = false;
        self.shared.pushes.send_modify(|p| {
            if !p.closed {
                p.in_flight += 1;
                admitted = true;
            }
        });
        admitted.then(|| PushGuard { node: self.clone() })
    }

    /// For shutdown: admits no more pushes, and resolves once those being
    /// handled were answered (pushes that wait for replica acks get them
    /// before the Follow streams end).
    pub async fn close_pushes(&self) {
        self.shared.pushes.send_modify(|p| p.closed = true);
        let mut pushes = self.shared.pushes.subscribe();
        let _ = pushes.wait_for(|p| p.in_flight == 0).await;
    }

    /// Waits until `--sync-replicas` replicas have acknowledged `checkpoint`
    /// as durable, at most `--sync-timeout`.
    pub async fn await_replicated(&self, checkpoint: Seq) -> Result<(), Error> {
        let wanted = self.shared.settings.sync_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.shared.settings.sync_timeout;
        loop {
            let notified = self.shared.acked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let acked = self
                .followers()
                .values()
                .filter(|f| f.sync() && f.acked >= checkpoint.0)
                .count();
            if acked >= wanted {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::NotReplicated {
                    checkpoint: checkpoint.0,
                    acked,
                    wanted,
                });
            }
        }
    }

    /// The replicas following this node, for Status.
    pub fn replica_statuses(&self) -> Vec<pb::ReplicaStatus> {
        let head = self.shared.store.head().0;
        let mut statuses: Vec<_> = self
            .followers()
            .values()
            .map(|f| pb::ReplicaStatus {
                url: f.url.clone(),
                acked: f.acked,
                lag: head.saturating_sub(f.acked),
                sync: f.sync(),
            })
            .collect();
        statuses.sort_by(|a, b| a.url.cmp(&b.url));
        statuses
    }

    /// What a scrape of `/metrics` reports: the store's sample, plus the
    /// followers (on a primary) or the primary's head as last heard (on a
    /// replica).
    pub fn metrics_sample(&self) -> crate::metrics::Sample {
        let mut sample = self.shared.store.metrics_sample();
        sample.followers = self
            .followers()
            .values()
            .map(|f| (f.url.clone(), f.acked))
            .collect();
        if self.role() == Role::Replica {
            let upstream = self.upstream();
            sample.primary_head = Some(upstream.primary_head.unwrap_or(sample.head));
            sample.primary_heard_ago = upstream.heard_at.map(|t| t.elapsed());
        }
        sample
    }

    /// On a replica: the primary's head as last heard.
    pub fn heard_primary_head(&self, head: u64) {
        let mut upstream = self.upstream();
        upstream.primary_head = Some(upstream.primary_head.unwrap_or(0).max(head));
        upstream.heard_at = Some(std::time::Instant::now());
        drop(upstream);
        self.refresh_ready();
    }

    /// Fails unless this replica's client states are consistent with its
    /// documents (kept in the store with the commits, so it holds across
    /// restarts): promoting it otherwise could apply a retry twice.
    fn check_consistent(&self) -> Result<(), Error> {
        let store = &self.shared.store;
        let progress = store.clients_progress()?;
        if progress.consistent(store.written()) {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "this replica is still catching up (head {}; its client mutation-id states are consistent {}); \
             promote another replica or wait until it caught up",
            store.head(),
            progress.consistent_at.map_or_else(
                || "once a snapshot from the primary arrives".to_owned(),
                |at| format!("from seq {at}")
            )
        )))
    }

    /// On a replica: re-evaluates readiness after applying or hearing.
    pub fn refresh_ready(&self) {
        if self.role() != Role::Replica {
            return;
        }
        let head = self.shared.store.head().0;
        let lag = self
            .upstream()
            .primary_head
            .map(|primary| primary.saturating_sub(head));
        let ready = lag.is_some_and(|lag| lag <= self.shared.settings.max_replica_lag);
        self.shared.ready.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
    }
}

/// A follower's registration; dropping it unregisters the follower.
pub struct FollowerGuard {
    /// The node it is registered with.
    node: Node,
    /// Its id.
    id: u64,
}

impl FollowerGuard {
    /// The follower acknowledged `applied` as durable.
    pub fn ack(&self, applied: u64) {
        if let Some(f) = self.node.followers().get_mut(&self.id) {
            f.acked = f.acked.max(applied);
        }
        self.node.hold_purges();
        self.node.shared.acked.notify_waiters();
    }

    /// The follower's client states are consistent once it acknowledges `at`.
    pub fn consistent_at(&self, at: u64) {
        if let Some(f) = self.node.followers().get_mut(&self.id) {
            f.consistent_at = Some(at);
        }
        self.node.shared.acked.notify_waiters();
    }

    /// Catching up again (the stream fell behind the ring): not in sync.
    pub fn catching_up(&self) {
        if let Some(f) = self.node.followers().get_mut(&self.id) {
            f.consistent_at = None;
        }
    }
}

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        self.node.followers().remove(&self.id);
        self.node.hold_purges();
        self.node.shared.acked.notify_waiters();
    }
}

/// Pushes being handled, and whether more are admitted.
#[derive(Debug, Default)]
struct Pushes {
    /// Being handled now.
    in_flight: usize,
    /// Shutdown began: no more are admitted.
    closed: bool,
}

/// A push being handled (see [`Node::push_started`]).
pub struct PushGuard {
    /// The node counting it.
    node: Node,
}

impl Drop for PushGuard {
    fn drop(&mut self) {
        self.node
            .shared
            .pushes
            .send_modify(|p| p.in_flight = p.in_flight.saturating_sub(1));
    }
}
