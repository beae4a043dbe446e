//! Snapshot backup and restore.
//!
//! `save` copies a whole store through the replication stream, as a new
//! replica would: it opens `ReplicationService.Follow` with an empty store,
//! receives the primary's identity (store_id, epoch history, purge
//! horizon), every record its log retains (superseded ones too), the
//! client mutation-id states, and then live commits until its copy is
//! consistent: a commit boundary at or past the point where the client
//! states were read. That boundary is the snapshot's checkpoint. The
//! primary keeps serving writes meanwhile; while the stream is open it
//! holds tombstone purges back, as it does for any replica.
//!
//! The messages go, as they came, into one file ([`file`](mod@file)) ending with the
//! checkpoint and a SHA-256. `restore` checks the whole file first, then
//! replays it into a new store through [`Applier`], the code a replica
//! applies its primary's stream with, in a temporary directory next to the
//! target that is renamed into place only once complete: a damaged file
//! leaves nothing behind.

pub mod file;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use futures_util::{Stream, StreamExt};

use crate::{
    pb::{self, follow_request::Request as Ask, follow_response::Response as Reply},
    replication::apply::{Applier, Failure, Landing},
    store::{self, Store, StoreError},
};
use file::{FileError, FrameReader, FrameWriter};

/// The name a snapshot stream shows in the primary's Status.
pub const FOLLOWER_NAME: &str = "snapshot";
/// Most commits queued for the writer during a restore.
const MAX_IN_FLIGHT: usize = 256;

/// Why a save or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The stream from the server failed.
    #[error("the server: {0}")]
    Stream(#[from] tonic::Status),
    /// The server said something a snapshot cannot hold.
    #[error("the server's stream: {0}")]
    Protocol(String),
    /// The file is not a whole, intact snapshot.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The target data directory is in the way.
    #[error("{0}")]
    Target(String),
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The new store failed.
    #[error("the new store: {0}")]
    Store(String),
}

impl SnapshotError {
    fn file(path: &Path, e: FileError) -> Self {
        match e {
            FileError::Io(source) => Self::Io {
                path: path.to_owned(),
                source,
            },
            FileError::Corrupt(reason) => Self::Corrupt {
                path: path.to_owned(),
                reason,
            },
        }
    }
}

impl From<Failure> for SnapshotError {
    fn from(e: Failure) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<StoreError> for SnapshotError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The store it is a copy of.
    pub store_id: String,
    /// The seq it was copied at: every change up to here, none after.
    pub checkpoint: u64,
    /// The primary's epoch.
    pub epoch: u64,
    /// The file's size.
    pub bytes: u64,
}

/// How far a save is (for a progress bar).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The head copied so far.
    pub head: u64,
    /// The primary's head when the save began.
    pub target: u64,
    /// Bytes written so far.
    pub bytes: u64,
}

/// The first (and only) message a save sends on `Follow`: an empty store
/// that wants everything.
pub fn follow_start() -> pb::FollowRequest {
    pb::FollowRequest {
        request: Some(Ask::Start(pb::FollowStart {
            url: FOLLOWER_NAME.into(),
            ..Default::default()
        })),
    }
}

/// Writes the snapshot `responses` (a `Follow` stream opened with
/// [`follow_start`]) carry into a new file at `path`, through a temporary
/// file renamed into place once complete and durable.
pub async fn save<S>(
    responses: S,
    path: &Path,
    mut progress: impl FnMut(Progress),
) -> Result<Summary, SnapshotError>
where
    S: Stream<Item = Result<pb::FollowResponse, tonic::Status>> + Unpin,
{
    if path.exists() {
        return Err(exists(path));
    }
    // A name of its own: two saves never share (or delete) a partial file.
    let partial = sibling(path, &format!("partial-{}", unique()));
    let io = |path: &Path, source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let mut out = FrameWriter::create(&partial).map_err(|e| SnapshotError::file(&partial, e))?;
    let result = copy(responses, &mut out, &partial, &mut progress).await;
    let result = result.and_then(|(hello, checkpoint)| {
        out.finish(checkpoint)
            .map_err(|e| SnapshotError::file(&partial, e))?;
        // A link, not a rename: it fails, instead of replacing, if a file
        // appeared at `path` meanwhile.
        std::fs::hard_link(&partial, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists(path)
            } else {
                io(path, e)
            }
        })?;
        sync_parent(path).map_err(|e| io(path, e))?;
        let bytes = std::fs::metadata(path).map_err(|e| io(path, e))?.len();
        Ok(Summary {
            store_id: hello.store_id,
            checkpoint,
            epoch: hello.epoch,
            bytes,
        })
    });
    if let Err(e) = std::fs::remove_file(&partial) {
        tracing::warn!(path = %partial.display(), cause = %e, "cannot remove the partial snapshot");
    }
    result
}

/// A save refused because its file exists.
fn exists(path: &Path) -> SnapshotError {
    SnapshotError::Target(format!(
        "{} exists: a snapshot is never written over a file",
        path.display()
    ))
}

/// A name no other save or restore uses at the same time.
fn unique() -> String {
    let mut bytes = [0u8; 8];
    // An id from the process alone is still unique among this process's
    // saves and restores, which run one at a time per path.
    let _ = getrandom::fill(&mut bytes);
    format!("{}-{:016x}", std::process::id(), u64::from_be_bytes(bytes))
}

/// Copies messages until the copy is consistent; returns the hello and the
/// checkpoint.
async fn copy<S>(
    mut responses: S,
    out: &mut FrameWriter,
    partial: &Path,
    progress: &mut impl FnMut(Progress),
) -> Result<(pb::FollowHello, u64), SnapshotError>
where
    S: Stream<Item = Result<pb::FollowResponse, tonic::Status>> + Unpin,
{
    let ended = || SnapshotError::Protocol("the stream ended before the copy was complete".into());
    let first = responses.next().await.ok_or_else(ended)??;
    let Some(Reply::Hello(hello)) = &first.response else {
        return Err(SnapshotError::Protocol(
            "it did not start with a hello".into(),
        ));
    };
    let hello = hello.clone();
    let write = |out: &mut FrameWriter, m: &pb::FollowResponse| {
        out.frame(m).map_err(|e| SnapshotError::file(partial, e))
    };
    write(out, &first)?;
    // The head after the last whole commit, and where the client states
    // are consistent with the documents (known once they have all come).
    let mut head = 0;
    let mut consistent_at = None;
    let mut in_commit = false;
    loop {
        if !in_commit && consistent_at.is_some_and(|at| head >= at) {
            return Ok((hello, head));
        }
        let message = responses.next().await.ok_or_else(ended)??;
        match &message.response {
            Some(Reply::Commit(commit)) => {
                // Read back from the log (a catch-up, also after the
                // stream fell behind the live feed): it carries no client
                // states, so a new client snapshot is needed after it.
                if commit.from_log {
                    consistent_at = None;
                }
                in_commit = commit.continued;
                if !in_commit {
                    head = commit.head;
                }
            }
            Some(Reply::Clients(clients)) if clients.complete => {
                consistent_at = Some(clients.consistent_at);
            }
            Some(Reply::Clients(_) | Reply::Progress(_)) => {}
            Some(Reply::Hello(_)) | None => {
                return Err(SnapshotError::Protocol("an unexpected message".into()));
            }
        }
        write(out, &message)?;
        progress(Progress {
            head,
            target: hello.head,
            bytes: out.bytes(),
        });
    }
}

/// Creates the store in `data_dir` (which must not exist or be empty) from
/// the snapshot at `path`.
pub async fn restore(path: &Path, data_dir: &Path) -> Result<Summary, SnapshotError> {
    let file = path.to_owned();
    let (trailer, hello) = tokio::task::spawn_blocking(move || file::verify(&file))
        .await
        .map_err(|e| SnapshotError::Store(format!("the check of the file stopped: {e}")))?
        .map_err(|e| SnapshotError::file(path, e))?;
    let io = |path: &Path, source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let empty = match std::fs::read_dir(data_dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(io(data_dir, e)),
    };
    if !empty {
        return Err(SnapshotError::Target(format!(
            "{} is not empty: a snapshot is restored into a new data directory \
             (e.g. a directory below it, given to the server as --data-dir)",
            data_dir.display()
        )));
    }
    // Built next to the target under a name of its own, then renamed into
    // place whole: a failure leaves nothing, and two restores never share.
    let building = sibling(data_dir, &format!("restoring-{}", unique()));
    let result = replay(path, &building, trailer.checkpoint).await;
    let result = result.and_then(|()| {
        // An empty target directory makes way for the new one.
        if data_dir.exists() {
            std::fs::remove_dir(data_dir).map_err(|e| {
                SnapshotError::Target(format!(
                    "cannot replace the empty directory {} ({e}; a mount point cannot be): \
                     restore into a new directory below it and give that to the server as --data-dir",
                    data_dir.display()
                ))
            })?;
        }
        std::fs::rename(&building, data_dir).map_err(|e| io(data_dir, e))?;
        sync_parent(data_dir).map_err(|e| io(data_dir, e))
    });
    if let Err(e) = result {
        if building.exists()
            && let Err(cause) = std::fs::remove_dir_all(&building)
        {
            tracing::warn!(path = %building.display(), %cause, "cannot remove the half-built store");
        }
        return Err(e);
    }
    Ok(Summary {
        store_id: hello.store_id,
        checkpoint: trailer.checkpoint,
        epoch: hello.epoch,
        bytes: std::fs::metadata(path).map_err(|e| io(path, e))?.len(),
    })
}

/// Applies the snapshot's messages to a new store in `dir`. Commits are
/// written without an fsync each: closing the store flushes them all once.
async fn replay(path: &Path, dir: &Path, checkpoint: u64) -> Result<(), SnapshotError> {
    let options = store::Options {
        durability: store::Durability::Buffered,
        ..Default::default()
    };
    let store = Store::open(dir, options)?;
    let result = apply_all(&store, path, checkpoint).await;
    store.close().await;
    result
}

async fn apply_all(store: &Store, path: &Path, checkpoint: u64) -> Result<(), SnapshotError> {
    let corrupt = |e| SnapshotError::file(path, e);
    let mut frames = FrameReader::open(path).map_err(corrupt)?;
    let Some(pb::FollowResponse {
        response: Some(Reply::Hello(hello)),
    }) = frames.next_frame().map_err(corrupt)?
    else {
        return Err(corrupt(FileError::Corrupt(
            "it does not start with a hello".into(),
        )));
    };
    let mut applier = Applier::admit(store, &hello).await?;
    let mut in_flight: VecDeque<Landing> = VecDeque::new();
    while let Some(frame) = frames.next_frame().map_err(corrupt)? {
        let message = frame
            .response
            .ok_or_else(|| corrupt(FileError::Corrupt("an empty message".into())))?;
        let landing = applier.apply(message).await.map_err(|e| match e {
            Failure::Transient(reason) => corrupt(FileError::Corrupt(reason)),
            e => e.into(),
        })?;
        in_flight.extend(landing);
        while in_flight.len() > MAX_IN_FLIGHT {
            if let Some(landing) = in_flight.pop_front() {
                land(landing).await?;
            }
        }
    }
    for landing in in_flight {
        land(landing).await?;
    }
    // The file was checked whole before; this pass read it again.
    frames.trailer().map_err(corrupt)?;
    let written = store.written();
    if written.0 != checkpoint {
        return Err(corrupt(FileError::Corrupt(format!(
            "its commits end at {written}, its trailer says {checkpoint}"
        ))));
    }
    if !store.clients_progress()?.consistent(written) {
        return Err(corrupt(FileError::Corrupt(
            "its client mutation-id states are incomplete at its checkpoint".into(),
        )));
    }
    Ok(())
}

/// Waits until a queued commit is written.
async fn land(landing: Landing) -> Result<(), SnapshotError> {
    match landing.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(SnapshotError::Store("the store closed".into())),
    }
}

/// `path` with `.{suffix}` added to its file name: a temporary next to it,
/// on the same file system, so a rename moves it into place.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}
