//! Output formats: one enum, one printer each, writing to stdout.

use std::io::{self, IsTerminal, Write};

use super::json;
use crate::{
    client::{Checkpoint, Document, MutationResult},
    pb,
};

/// How results are written (`-w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line per document or result (proto3 JSON
    /// mapping, as grpcurl prints it), ready for `jq`.
    Json,
    /// Human-readable lines.
    Table,
}

impl Format {
    /// The format asked for, else `table` on a terminal and `json` in a
    /// pipe.
    pub fn or_default(asked: Option<Self>) -> Self {
        asked.unwrap_or(if io::stdout().is_terminal() {
            Self::Table
        } else {
            Self::Json
        })
    }

    /// The printer of this format.
    pub fn printer(self) -> Box<dyn Printer> {
        match self {
            Self::Json => Box::new(JsonPrinter),
            Self::Table => Box::new(TablePrinter::default()),
        }
    }
}

/// Writes what a command produces.
pub trait Printer {
    /// A document (get, pull, watch).
    fn document(&mut self, d: &Document) -> io::Result<()>;
    /// A push result (put, patch, delete, push).
    fn result(&mut self, r: &MutationResult) -> io::Result<()>;
    /// A node's status.
    fn status(&mut self, endpoint: &str, s: &pb::StatusResponse) -> io::Result<()>;
    /// A promotion.
    fn promoted(&mut self, endpoint: &str, p: &pb::PromoteResponse) -> io::Result<()>;
    /// Where a pull or watch got to (`--print-checkpoint`).
    fn checkpoint(&mut self, c: &Checkpoint) -> io::Result<()>;
}

/// `-w json`.
struct JsonPrinter;

impl Printer for JsonPrinter {
    fn document(&mut self, d: &Document) -> io::Result<()> {
        writeln!(io::stdout().lock(), "{}", json::document(d))
    }

    fn result(&mut self, r: &MutationResult) -> io::Result<()> {
        writeln!(io::stdout().lock(), "{}", json::result(r))
    }

    fn status(&mut self, endpoint: &str, s: &pb::StatusResponse) -> io::Result<()> {
        writeln!(io::stdout().lock(), "{}", json::status(endpoint, s))
    }

    fn promoted(&mut self, _endpoint: &str, p: &pb::PromoteResponse) -> io::Result<()> {
        writeln!(io::stdout().lock(), "{}", json::promoted(p))
    }

    fn checkpoint(&mut self, c: &Checkpoint) -> io::Result<()> {
        writeln!(io::stdout().lock(), "{}", json::checkpoint(c))
    }
}

/// `-w table`: a header before the first row of each kind, then one line
/// per row (rows are written as they come, so a watch is not buffered).
#[derive(Default)]
struct TablePrinter {
    /// Whether the documents' header was written.
    documents_header: bool,
    /// Whether the results' header was written.
    results_header: bool,
}

impl TablePrinter {
    fn doc_columns(d: &Document) -> String {
        let body = match (&d.body, d.deleted) {
            (_, true) => "(deleted)".to_owned(),
            (Some(b), false) => json::value(&serde_json::Value::Object(b.clone())),
            (None, false) => "(body not sent: use get)".to_owned(),
        };
        let at = d.updated_at.map(json::timestamp).unwrap_or_default();
        format!(
            "{:<16} {:<24} {:>7} {:>8}  {:<27} {:<12} {body}",
            d.collection, d.id, d.version, d.seq, at, d.updated_by
        )
    }
}

impl Printer for TablePrinter {
    fn document(&mut self, d: &Document) -> io::Result<()> {
        let mut out = io::stdout().lock();
        if !std::mem::replace(&mut self.documents_header, true) {
            writeln!(
                out,
                "{:<16} {:<24} {:>7} {:>8}  {:<27} {:<12} BODY",
                "COLLECTION", "ID", "VERSION", "SEQ", "UPDATED AT", "UPDATED BY"
            )?;
        }
        writeln!(out, "{}", Self::doc_columns(d))
    }

    fn result(&mut self, r: &MutationResult) -> io::Result<()> {
        let mut out = io::stdout().lock();
        if !std::mem::replace(&mut self.results_header, true) {
            writeln!(
                out,
                "{:<8} {:<20} {:<16} {:<24} {:>7} {:>8}  NOTE",
                "MUTATION", "OUTCOME", "COLLECTION", "ID", "VERSION", "SEQ"
            )?;
        }
        let outcome = r
            .outcome
            .as_str_name()
            .trim_start_matches("OUTCOME_")
            .to_owned();
        let mut note = Vec::new();
        if r.applied_by_earlier_attempt {
            note.push("applied by an earlier attempt of this command".to_owned());
        }
        if !r.conflicting_fields.is_empty() {
            let more = if r.conflicting_fields_truncated {
                ", ..."
            } else {
                ""
            };
            note.push(format!(
                "conflicting fields: {}{more}",
                r.conflicting_fields.join(", ")
            ));
        }
        let (collection, id, version, seq) =
            r.document.as_ref().map_or_else(Default::default, |d| {
                (d.collection.as_str(), d.id.as_str(), d.version, d.seq)
            });
        writeln!(
            out,
            "{:<8} {:<20} {:<16} {:<24} {:>7} {:>8}  {}",
            r.mutation_id,
            outcome,
            collection,
            id,
            version,
            seq,
            note.join("; ")
        )
    }

    fn status(&mut self, endpoint: &str, s: &pb::StatusResponse) -> io::Result<()> {
        let mut out = io::stdout().lock();
        let role = json::role(s).trim_start_matches("ROLE_").to_lowercase();
        let deposed = if s.deposed { " (deposed)" } else { "" };
        writeln!(
            out,
            "{endpoint}: {role}{deposed}, epoch {}, head {}, store {}",
            s.epoch, s.head, s.store_id
        )?;
        if !s.primary.is_empty() {
            writeln!(out, "  primary: {}", s.primary)?;
        }
        for r in &s.replicas {
            let sync = if r.sync { "sync" } else { "catching up" };
            writeln!(
                out,
                "  replica {}: acked {}, lag {}, {sync}",
                r.url, r.acked, r.lag
            )?;
        }
        Ok(())
    }

    fn promoted(&mut self, endpoint: &str, p: &pb::PromoteResponse) -> io::Result<()> {
        writeln!(
            io::stdout().lock(),
            "{endpoint} is now the primary: epoch {}, head {}",
            p.epoch,
            p.head
        )
    }

    fn checkpoint(&mut self, c: &Checkpoint) -> io::Result<()> {
        writeln!(
            io::stdout().lock(),
            "checkpoint {} (store {}, purge horizon {}, epoch {})",
            c.seq,
            c.store_id,
            c.purge_horizon,
            c.epoch
        )
    }
}
