//! One function per subcommand: build the client, call it, print.

use std::{
    io::{self, IsTerminal, Read},
    time::Duration,
};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    ClientArgs, Command, DeleteArgs, EXIT_CONFLICT, EXIT_RESYNC, Failure, GetArgs, PullArgs,
    PushArgs, SnapshotCommand, StatusArgs, WatchArgs, WriteArgs, json, snapshot,
};
use crate::client::{Checkpoint, Mutation, MutationResult, PullOptions, WatchEvent, WatchOptions};

/// Runs `command`.
pub async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Get(args) => get(args).await,
        Command::Put(args) => write(args, false).await,
        Command::Patch(args) => write(args, true).await,
        Command::Delete(args) => delete(args).await,
        Command::Push(args) => push(args).await,
        Command::Pull(args) => pull(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Status(args) => status(args).await,
        Command::Promote(args) => promote(args).await,
        Command::Snapshot(SnapshotCommand::Save(args)) => {
            let client = args.client.client()?;
            snapshot::save(&client, &args).await
        }
        Command::Snapshot(SnapshotCommand::Restore(args)) => snapshot::restore(&args).await,
        Command::Local(command) => super::local::run(command).await,
    }
}

async fn get(args: GetArgs) -> Result<(), Failure> {
    let client = args.client.client()?;
    let mut printer = args.client.printer();
    for d in client.get(&args.collection, args.ids).await? {
        printer.document(&d)?;
    }
    Ok(())
}

async fn write(args: WriteArgs, patch: bool) -> Result<(), Failure> {
    let body = json::body_arg(&args.json).map_err(Failure::new)?;
    let mut m = if patch {
        Mutation::patch(&args.collection, &args.id, body)
    } else {
        Mutation::put(&args.collection, &args.id, body)
    };
    if let Some(v) = args.base_version {
        m = m.base_version(v);
    }
    if let Some(s) = args.on_conflict {
        m = m.on_conflict(s.into());
    }
    push_and_print(&args.client, vec![m], false).await
}

async fn delete(args: DeleteArgs) -> Result<(), Failure> {
    let mut m = Mutation::delete(&args.collection, &args.id);
    if let Some(v) = args.base_version {
        m = m.base_version(v);
    }
    push_and_print(&args.client, vec![m], false).await
}

async fn push(args: PushArgs) -> Result<(), Failure> {
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| Failure::new(format!("cannot read {}: {e}", args.file.display())))?
    };
    let mutations = json::mutations(&text).map_err(Failure::new)?;
    push_batches(&args.client, mutations, args.atomic, args.batch_size).await
}

/// Pushes one request of `mutations`; see [`push_batches`].
async fn push_and_print(
    args: &ClientArgs,
    mutations: Vec<Mutation>,
    atomic: bool,
) -> Result<(), Failure> {
    push_batches(args, mutations, atomic, 1000).await
}

/// Pushes `mutations` (in requests of at most `batch_size` when not
/// atomic), prints every result, and fails with [`EXIT_CONFLICT`] if any
/// was not written because of a conflict.
async fn push_batches(
    args: &ClientArgs,
    mutations: Vec<Mutation>,
    atomic: bool,
    batch_size: usize,
) -> Result<(), Failure> {
    let client = args.client()?;
    let mut printer = args.printer();
    let total = mutations.len();
    let mut results: Vec<MutationResult> = Vec::with_capacity(total);
    let batches: Vec<Vec<Mutation>> = if atomic {
        vec![mutations]
    } else {
        mutations
            .chunks(batch_size.max(1))
            .map(<[Mutation]>::to_vec)
            .collect()
    };
    for batch in batches {
        let answer = if atomic {
            client.push_atomic(batch).await?
        } else {
            client.push(batch).await?
        };
        for r in &answer.results {
            printer.result(r)?;
        }
        results.extend(answer.results);
    }
    let conflicts = results.iter().filter(|r| r.is_conflict()).count();
    if conflicts > 0 {
        return Err(Failure {
            code: EXIT_CONFLICT,
            reason: format!("{conflicts} of {total} mutations not written: conflict"),
        });
    }
    Ok(())
}

async fn pull(args: PullArgs) -> Result<(), Failure> {
    let client = args.client.client()?;
    let mut printer = args.client.printer();
    let bar = progress_bar(&client, args.since).await;
    let mut pages = client.pull_all(PullOptions {
        since: Checkpoint::at(args.since),
        collections: args.collections,
        page_size: args.page_size,
    });
    let mut last = None;
    while let Some(page) = pages.next().await {
        let page = page.inspect_err(|_| {
            if let Some(bar) = &bar {
                bar.abandon();
            }
        })?;
        for d in &page.documents {
            printer.document(d)?;
        }
        if let Some(bar) = &bar {
            bar.set_position(page.checkpoint.seq.saturating_sub(args.since));
            bar.set_message(format!("{} documents", page.documents_so_far));
        }
        last = Some(page);
    }
    if let (Some(bar), Some(page)) = (bar, &last) {
        bar.finish_with_message(format!(
            "{} documents; checkpoint {} (purge horizon {}, epoch {})",
            page.documents_so_far,
            page.checkpoint.seq,
            page.checkpoint.purge_horizon,
            page.checkpoint.epoch
        ));
    }
    if args.print_checkpoint
        && let Some(page) = last
    {
        printer.checkpoint(&page.checkpoint)?;
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal: seqs from `since` to
/// the head (a spinner if the head cannot be read: Status needs the admin
/// permission).
async fn progress_bar(client: &crate::client::Client, since: u64) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let bar = match client.status().await {
        Ok(s) if s.head > since => {
            let bar = ProgressBar::new(s.head - since);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {percent:>3}% seq {pos}/{len} {msg} ({eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        }
        _ => ProgressBar::new_spinner(),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

async fn watch(args: WatchArgs) -> Result<(), Failure> {
    let client = args.client.client()?;
    let mut printer = args.client.printer();
    let mut left = args.count;
    if left == Some(0) {
        return Ok(());
    }
    let mut events = client.watch(WatchOptions {
        since: Checkpoint::at(args.since),
        collections: args.collections,
    });
    while let Some(event) = events.next().await {
        match event? {
            WatchEvent::Changes {
                documents,
                checkpoint,
            } => {
                for (i, d) in documents.iter().enumerate() {
                    printer.document(d)?;
                    if let Some(n) = left.as_mut() {
                        *n -= 1;
                        if *n == 0 {
                            if args.print_checkpoint {
                                // Documents come in seq order: stopping
                                // inside a batch, the last one printed is
                                // as far as this got.
                                let reached = if i + 1 == documents.len() {
                                    checkpoint
                                } else {
                                    Checkpoint {
                                        seq: d.seq,
                                        ..checkpoint
                                    }
                                };
                                printer.checkpoint(&reached)?;
                            }
                            return Ok(());
                        }
                    }
                }
            }
            WatchEvent::Progress { .. } => {}
            WatchEvent::ResyncNeeded { reason, message } => {
                return Err(Failure {
                    code: EXIT_RESYNC,
                    reason: format!("resync needed ({reason:?}): {message}"),
                });
            }
        }
    }
    Err(Failure::new("the watch ended"))
}

async fn status(args: StatusArgs) -> Result<(), Failure> {
    let client = args.client.client()?;
    let mut printer = args.client.printer();
    let mut failed = Vec::new();
    for endpoint in client.endpoints() {
        match client.endpoint_status(endpoint).await {
            Ok(s) => printer.status(endpoint, &s)?,
            Err(e) => failed.push(format!("{endpoint}: {}", Failure::from(e).reason)),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(failed.join("; ")))
    }
}

async fn promote(args: StatusArgs) -> Result<(), Failure> {
    let client = args.client.client()?;
    let mut printer = args.client.printer();
    let promoted = client.promote().await?;
    printer.promoted(&client.endpoints()[0], &promoted)?;
    Ok(())
}
