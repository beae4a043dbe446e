//! The `store` workload: sled alone, no server, written the way deltasync's
//! writer writes it (one thread, groups of documents, one flush per group),
//! to show how much of a push's cost is the storage engine's floor.

use std::{path::Path, time::Instant};

use sled::{Transactional, transaction::ConflictableTransactionError};

use crate::target::Error;

/// How the documents are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// deltasync's layout 1: per document a lookup, the record and a
    /// change-index entry, in one transaction over five trees per group.
    V1,
    /// deltasync's layout 2: per group one batch of records keyed by seq,
    /// then the client's mutation id and the head in a small transaction.
    Log,
}

/// Writes `docs` new documents of `body` bytes in groups of `group`;
/// returns documents per second.
pub fn run(dir: &Path, layout: Layout, docs: u64, group: u64, body: usize) -> Result<f64, Error> {
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(Some(500))
        .open()?;
    let record = vec![b'x'; body];
    let key = |i: u64| format!("bench/p{}-{}-{}", i % 16, i / 1600, (i / 16) % 100).into_bytes();
    let [docs_t, changes, history, clients, meta, all] =
        ["docs", "changes", "history", "clients", "meta", "all"].map(|name| db.open_tree(name));
    let (docs_t, changes, history, clients, meta, all) =
        (docs_t?, changes?, history?, clients?, meta?, all?);
    let started = Instant::now();
    let mut start = 0;
    while start < docs {
        let end = (start + group).min(docs);
        match layout {
            Layout::V1 => {
                (&docs_t, &changes, &history, &clients, &meta)
                    .transaction(|(d, c, _history, cl, m)| {
                        for i in start..end {
                            let k = key(i);
                            d.get(&k)?;
                            c.insert(&(i + 1).to_be_bytes(), k.clone())?;
                            d.insert(k, record.clone())?;
                        }
                        cl.insert(b"client", &end.to_be_bytes())?;
                        m.insert(b"head", &end.to_be_bytes())?;
                        Ok::<_, ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| format!("transaction failed: {e:?}"))?;
            }
            Layout::Log => {
                let mut batch = sled::Batch::default();
                for i in start..end {
                    let mut value = key(i);
                    value.extend_from_slice(&record);
                    batch.insert(&(i + 1).to_be_bytes()[..], value);
                }
                all.apply_batch(batch)?;
                (&clients, &meta)
                    .transaction(|(cl, m)| {
                        cl.insert(b"client", &end.to_be_bytes())?;
                        m.insert(b"head", &end.to_be_bytes())?;
                        Ok::<_, ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| format!("transaction failed: {e:?}"))?;
            }
        }
        db.flush()?;
        start = end;
    }
    Ok(docs as f64 / started.elapsed().as_secs_f64())
}
