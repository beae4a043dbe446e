//! Background sync: one task per [`SyncHandle`] that catches up and pushes
//! the outbox, then follows the server with Subscribe from the stored
//! checkpoint, pushing again whenever a local write (or a resolution)
//! arrives. Any failure (the server away, a stream broken, a bad answer)
//! sends it back to the start after a backoff; a checkpoint the server
//! cannot resume from goes through the same resync as [`LocalReplica::sync`].
//!
//! The follower applies changes under the replica's write lock, as a pull
//! does, and pushes under its sync lock, so a [`LocalReplica::sync`] called
//! meanwhile interleaves safely with it.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{LocalReplica, ReplicaError, SyncReport};
use crate::client::{Checkpoint, PullPage, WatchEvent, WatchOptions};

/// First wait after a failure; doubled (with jitter) up to
/// [`BackgroundOptions::max_backoff`].
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a background sync retries.
#[derive(Debug, Clone)]
pub struct BackgroundOptions {
    /// Wait after the first failure.
    pub min_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for BackgroundOptions {
    fn default() -> Self {
        Self {
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// Where a background sync is, as [`SyncHandle::status`] shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncStatus {
    /// Catching up and pushing the outbox.
    Syncing,
    /// Caught up once; following the server's changes live.
    Following {
        /// The checkpoint the base is caught up to.
        checkpoint: Checkpoint,
    },
    /// The last attempt failed; the next starts after a backoff.
    Retrying {
        /// Why it failed (for a bad answer from the server, the problem).
        error: String,
        /// Failures in a row.
        failures: u32,
    },
    /// Shut down.
    Stopped,
}

/// A running background sync: stop it with [`SyncHandle::shutdown`] (or by
/// dropping the handle).
#[derive(Debug)]
pub struct SyncHandle {
    /// Cancels the task.
    shutdown: CancellationToken,
    /// The task, awaited by `shutdown`.
    task: Option<JoinHandle<()>>,
    /// Its status.
    status: watch::Receiver<SyncStatus>,
}

impl SyncHandle {
    /// The background sync's status, updated as it goes.
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.status.clone()
    }

    /// Stops the task and waits for it. A push under way is dropped: its
    /// writes stay in the outbox and go out again with the same ids.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Why following stopped.
enum Stop {
    /// Shut down.
    Shutdown,
    /// A failure: back off, then start again.
    Failed(ReplicaError),
    /// The stream ended or asked for a resync: start again at once.
    Restart,
}

impl LocalReplica {
    /// Syncs in the background until the handle is shut down (or dropped):
    /// catches up and pushes the outbox, then follows the server with
    /// Subscribe from the stored checkpoint and pushes each local write as
    /// it is made, reconnecting with backoff (and the client library's
    /// failover across endpoints). Changes show in [`LocalReplica::events`].
    /// Must be called within a Tokio runtime.
    pub fn start_sync(&self, options: BackgroundOptions) -> SyncHandle {
        let shutdown = CancellationToken::new();
        let (tx, status) = watch::channel(SyncStatus::Syncing);
        let task = tokio::spawn(self.clone().run_background(options, shutdown.clone(), tx));
        SyncHandle {
            shutdown,
            task: Some(task),
            status,
        }
    }

    async fn run_background(
        self,
        options: BackgroundOptions,
        shutdown: CancellationToken,
        status: watch::Sender<SyncStatus>,
    ) {
        let mut failures: u32 = 0;
        loop {
            status.send_replace(SyncStatus::Syncing);
            let stop = tokio::select! {
                () = shutdown.cancelled() => Stop::Shutdown,
                stop = self.sync_then_follow(&status) => stop,
            };
            match stop {
                Stop::Shutdown => break,
                Stop::Restart => {
                    // The next pass's sync resyncs if it must; the shortest
                    // backoff keeps a server that keeps ending the stream
                    // (or keeps asking for a resync the sync does not
                    // find) from spinning this loop.
                    failures = 0;
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(options.min_backoff) => {}
                    }
                }
                Stop::Failed(e) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(&options, failures);
                    tracing::warn!(cause = %e, failures, ?wait, "local replica: background sync failed; retrying");
                    status.send_replace(SyncStatus::Retrying {
                        error: e.to_string(),
                        failures,
                    });
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        status.send_replace(SyncStatus::Stopped);
    }

    /// One pass: a sync, then following until something breaks.
    async fn sync_then_follow(&self, status: &watch::Sender<SyncStatus>) -> Stop {
        if let Err(e) = self.sync().await {
            return Stop::Failed(e);
        }
        let since = match self.inner.store.checkpoint() {
            Ok(c) => Checkpoint::from(&c),
            Err(e) => return Stop::Failed(e),
        };
        status.send_replace(SyncStatus::Following {
            checkpoint: since.clone(),
        });
        let mut watch = self.inner.client.watch(WatchOptions {
            since,
            collections: self.inner.config.collections.keys().cloned().collect(),
        });
        loop {
            tokio::select! {
                () = self.inner.wrote.notified() => {
                    if let Err(e) = self.push_pending().await {
                        return Stop::Failed(e);
                    }
                }
                event = watch.next() => {
                    let applied = match event {
                        None => return Stop::Restart,
                        Some(Err(e)) => return Stop::Failed(e.into()),
                        Some(Ok(WatchEvent::ResyncNeeded { reason, message })) => {
                            tracing::warn!(?reason, %message, "local replica: the checkpoint cannot be resumed from; resyncing");
                            return Stop::Restart;
                        }
                        Some(Ok(WatchEvent::Changes { documents, checkpoint })) => {
                            self.apply_followed(documents, checkpoint)
                        }
                        Some(Ok(WatchEvent::Progress { checkpoint, .. })) => {
                            self.apply_followed(Vec::new(), checkpoint)
                        }
                    };
                    match applied {
                        Ok(checkpoint) => {
                            status.send_replace(SyncStatus::Following { checkpoint });
                        }
                        Err(e) => return Stop::Failed(e),
                    }
                }
            }
        }
    }

    /// Pushes the outbox (one push at a time with [`LocalReplica::sync`]).
    async fn push_pending(&self) -> Result<(), ReplicaError> {
        let _one = self.inner.sync.lock().await;
        self.push_outbox(&mut SyncReport::default()).await
    }

    /// Applies a followed batch: what the base has already (a concurrent
    /// sync may be ahead) is skipped, the rest is checked as a pull page
    /// is. Returns the checkpoint the base is caught up to.
    fn apply_followed(
        &self,
        documents: Vec<crate::client::Document>,
        checkpoint: Checkpoint,
    ) -> Result<Checkpoint, ReplicaError> {
        let _w = self.lock();
        let stored = self.inner.store.checkpoint()?;
        if checkpoint.seq <= stored.seq && checkpoint.store_id == stored.store_id {
            return Ok(Checkpoint::from(&stored));
        }
        let page = PullPage {
            documents: documents
                .into_iter()
                .filter(|d| d.seq > stored.seq)
                .collect(),
            checkpoint,
            has_more: false,
            page: 0,
            documents_so_far: 0,
        };
        self.check_page(&stored, &page)?;
        self.apply_changes(&page.documents, &page.checkpoint)?;
        Ok(page.checkpoint)
    }
}

/// The wait after `failures` failures in a row: doubling from the minimum,
/// capped, with up to a quarter more of jitter.
fn backoff(options: &BackgroundOptions, failures: u32) -> Duration {
    crate::client::backoff(options.min_backoff, options.max_backoff, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = BackgroundOptions {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let within = |d: Duration, lo: u64| {
            d >= Duration::from_millis(lo) && d <= Duration::from_millis(lo + lo / 4)
        };
        assert!(within(backoff(&o, 1), 100));
        assert!(within(backoff(&o, 2), 200));
        assert!(within(backoff(&o, 3), 400));
        assert!(within(backoff(&o, 9), 500));
        assert!(within(backoff(&o, u32::MAX), 500));
    }
}
