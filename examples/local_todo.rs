//! The todo story with two offline-first local replicas
//! (`deltasync::replica`): A and B sync; A goes offline and both change
//! the same todo (B its `done`, A its `done` differently and its `title`);
//! B syncs; A comes back: its `done` conflicts and is merged by hand;
//! both sync again and converge.
//!
//! ```sh
//! cargo run --release &                      # a server on 127.0.0.1:50051
//! cargo run --example local_todo             # or DELTASYNC_ENDPOINTS=http://a:50051,http://b:50051
//! ```
//!
//! The replicas live in temporary directories, removed at the end. The
//! todo's id is new on every run, so runs against one server do not meet.

use std::{error::Error, path::Path};

use deltasync::replica::{
    Conflict, LocalReplica, ReplicaOptions, Resolution, Resolver, SyncReport,
};
use serde_json::{Map, Value, json};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let endpoints = std::env::var("DELTASYNC_ENDPOINTS")
        .unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());
    let endpoints: Vec<&str> = endpoints.split(',').collect();
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let id = format!("milk-{}", uuid::Uuid::new_v4().simple());
    let (a, _) = story(&endpoints, dir_a.path(), dir_b.path(), &id).await?;
    let final_body = a.get("todos", &id)?.and_then(|d| d.document.body);
    println!("done: both replicas hold {}", show(final_body.as_ref()));
    Ok(())
}

/// Plays the story in `dir_a` and `dir_b` (new replicas of `endpoints`)
/// on the todo `id`, printing each step; returns replicas A and B, synced.
pub async fn story(
    endpoints: &[&str],
    dir_a: &Path,
    dir_b: &Path,
    id: &str,
) -> Result<(LocalReplica, LocalReplica), Box<dyn Error>> {
    let options =
        ReplicaOptions::new(endpoints.iter().copied()).collection("todos", Resolver::Manual);
    let a = LocalReplica::init(dir_a, options.clone(), |b| b)?;
    let b = LocalReplica::init(dir_b, options, |b| b)?;
    let todo = |r: &LocalReplica| -> Result<String, Box<dyn Error>> {
        Ok(match r.get("todos", id)? {
            Some(d) => format!(
                "{} (version {}{})",
                show(d.document.body.as_ref()),
                d.document.version,
                if d.pending { ", pending" } else { "" }
            ),
            None => "nothing".to_owned(),
        })
    };

    println!("1. A writes todos/{id} and both replicas sync");
    a.put("todos", id, json!({"title": "Buy milk", "done": false}))?;
    println!("   A: {}", report(&a.sync().await?));
    println!("   B: {}", report(&b.sync().await?));
    println!("   A sees {}; B sees {}", todo(&a)?, todo(&b)?);

    println!("2. A goes offline (it does not sync); both write");
    b.patch("todos", id, json!({"done": true}))?;
    a.patch(
        "todos",
        id,
        json!({"done": "tomorrow", "title": "Buy oat milk"}),
    )?;
    println!("   A sees {}; B sees {}", todo(&a)?, todo(&b)?);

    println!("3. B syncs");
    println!("   B: {}", report(&b.sync().await?));

    println!("4. A comes back and syncs: its `done` conflicts with B's");
    println!("   A: {}", report(&a.sync().await?));
    for conflict in a.conflicts()? {
        println!(
            "   conflict on {:?}: base {}, mine {}, theirs {}",
            conflict.conflicting_fields,
            show(conflict.base.as_ref()),
            show(conflict.local.as_ref()),
            show(conflict.server.as_ref().and_then(|d| d.body.as_ref())),
        );
        let merged = merge_by_hand(&conflict);
        println!("   resolved by hand: {}", show(Some(&merged)));
        a.resolve(
            &conflict.collection,
            &conflict.id,
            Resolution::Merged(merged),
        )?;
    }

    println!("5. Both sync again");
    println!("   A: {}", report(&a.sync().await?));
    println!("   B: {}", report(&b.sync().await?));
    println!("   A sees {}; B sees {}", todo(&a)?, todo(&b)?);
    Ok((a, b))
}

/// The merge a person would make: theirs, with every field only I changed
/// taken from mine; of the fields both changed, `done` is true if either
/// side finished it, else mine.
fn merge_by_hand(c: &Conflict) -> Map<String, Value> {
    let empty = Map::new();
    let base = c.base.as_ref().unwrap_or(&empty);
    let mine = c.local.as_ref().unwrap_or(&empty);
    let mut merged = c
        .server
        .as_ref()
        .and_then(|d| d.body.clone())
        .unwrap_or_default();
    for (field, value) in mine {
        if base.get(field) == Some(value) {
            continue; // not changed by me
        }
        let finished = field == "done" && merged.get(field) == Some(&Value::Bool(true));
        if !finished {
            merged.insert(field.clone(), value.clone());
        }
    }
    merged
}

fn report(r: &SyncReport) -> String {
    format!(
        "pushed {}, acknowledged {}, parked {}, pulled {}, left {}",
        r.pushed, r.acknowledged, r.parked, r.pulled, r.remaining
    )
}

fn show(body: Option<&Map<String, Value>>) -> String {
    body.map_or_else(
        || "none".to_owned(),
        |b| Value::Object(b.clone()).to_string(),
    )
}
