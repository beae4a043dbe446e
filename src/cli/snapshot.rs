//! `deltasync snapshot save|restore`: [`crate::snapshot`] on the command
//! line. A save reads the primary's replication stream (the caller needs
//! the `replicate` permission), with a progress bar on a terminal.

use std::{
    io::{self, IsTerminal, Write},
    time::Duration,
};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use super::{Failure, SnapshotRestoreArgs, SnapshotSaveArgs};
use crate::{
    client::Client,
    snapshot::{self, Progress, SnapshotError, Summary},
};

/// `snapshot save FILE`: copies the store `client` reaches to a file.
pub async fn save(client: &Client, args: &SnapshotSaveArgs) -> Result<(), Failure> {
    let requests = futures_util::stream::iter([snapshot::follow_start()]);
    let responses = client.follow(requests).await?;
    let bar = io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {percent:>3}% seq {pos}/{len} {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let shown = |p: Progress| {
        if let Some(bar) = &bar {
            bar.set_length(p.target.max(p.head));
            bar.set_position(p.head);
            bar.set_message(format!("{} written", HumanBytes(p.bytes)));
        }
    };
    let summary = snapshot::save(responses, &args.file, shown)
        .await
        .map_err(failure)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report("saved", &args.file.display().to_string(), &summary)
}

/// `snapshot restore FILE --data-dir DIR`: creates a data directory from a
/// snapshot (no server involved).
pub async fn restore(args: &SnapshotRestoreArgs) -> Result<(), Failure> {
    let summary = snapshot::restore(&args.file, &args.data_dir)
        .await
        .map_err(failure)?;
    report("restored", &args.data_dir.display().to_string(), &summary)
}

/// One line on stdout: what the snapshot holds, as JSON for scripts (a
/// closed stdout is not a panic: see [`Failure`]'s broken pipe).
fn report(what: &str, place: &str, s: &Summary) -> Result<(), Failure> {
    let line = serde_json::json!({
        what: place,
        "storeId": s.store_id,
        "checkpoint": s.checkpoint.to_string(),
        "epoch": s.epoch.to_string(),
        "bytes": s.bytes.to_string(),
    });
    writeln!(io::stdout().lock(), "{line}")?;
    Ok(())
}

/// A snapshot failure, on one line.
fn failure(e: SnapshotError) -> Failure {
    Failure::new(format!("snapshot: {e}"))
}
