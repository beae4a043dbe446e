//! `deltasync snapshot save|restore`: not implemented yet (another change
//! fills this file in; `Client::follow` is its way to the replication
//! stream).

use super::{Failure, SnapshotRestoreArgs, SnapshotSaveArgs};
use crate::client::Client;

/// `snapshot save FILE`: copies the store `client` reaches to a file.
pub async fn save(_client: &Client, _args: &SnapshotSaveArgs) -> Result<(), Failure> {
    Err(Failure::new("snapshot save: not implemented yet"))
}

/// `snapshot restore FILE --data-dir DIR`: writes a snapshot into a data
/// directory.
pub async fn restore(_args: &SnapshotRestoreArgs) -> Result<(), Failure> {
    Err(Failure::new("snapshot restore: not implemented yet"))
}
