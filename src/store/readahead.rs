//! Read-ahead for paged pulls.
//!
//! A catch-up reads pages one after another, each starting where the last
//! one ended, so while a page is encoded, sent and decoded the store would sit
//! idle, and while the store reads, the client waits. After serving a page
//! that has more after it, the store starts reading the next one on the
//! blocking pool; the Pull that asks for it (same checkpoint, filter and
//! limits) takes that read instead of starting its own.
//!
//! A page read ahead is used only if nothing was committed since it was
//! started (the head is the same), so a Pull still reflects every commit
//! acknowledged before it began. Pages read ahead for a head that has moved
//! on are dropped, and so are pages nobody came for within [`TTL`].
//!
//! At most [`SLOTS`] pages wait at a time, each within the page limits (so
//! within one response), which bounds the memory held. When every slot is
//! taken no new read starts: with more clients catching up at once than
//! there are slots, evicting would make them throw away each other's reads
//! and read every page twice.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use super::{
    error::StoreError,
    model::{PullPage, Seq},
    pull::{CollectionFilter, PageLimit},
};

/// Most pages read ahead at once (one per client catching up concurrently).
pub const SLOTS: usize = 16;

/// How long a page read ahead waits for its Pull.
pub const TTL: Duration = Duration::from_secs(10);

/// A read of `(since, upto]` under way or done.
struct Slot {
    /// Checkpoint the page starts after.
    since: Seq,
    /// Head when the read started: the page holds nothing past it.
    upto: Seq,
    /// Collections read.
    filter: CollectionFilter,
    /// Limits the page was read with.
    limit: PageLimit,
    /// The read.
    page: JoinHandle<Result<PullPage, StoreError>>,
    /// When it started.
    started: Instant,
}

/// The pages read ahead, oldest first.
pub struct ReadAhead {
    /// Waiting reads; a lock held only to push or take one.
    slots: Mutex<VecDeque<Slot>>,
    /// How long a read waits for its Pull.
    ttl: Duration,
}

impl Default for ReadAhead {
    fn default() -> Self {
        Self::with_ttl(TTL)
    }
}

impl ReadAhead {
    /// Read-ahead whose pages wait at most `ttl` for their Pull.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            slots: Mutex::new(VecDeque::new()),
            ttl,
        }
    }

    /// The read of the page after `since` as of head `upto`, if one was
    /// started. Drops reads made for an older head: they can't be used.
    pub fn take(
        &self,
        since: Seq,
        upto: Seq,
        filter: &CollectionFilter,
        limit: PageLimit,
    ) -> Option<JoinHandle<Result<PullPage, StoreError>>> {
        let mut slots = self.slots.lock().ok()?;
        slots.retain(|s| s.upto == upto);
        let at = slots
            .iter()
            .position(|s| s.since == since && s.limit == limit && s.filter == *filter)?;
        slots.remove(at).map(|s| s.page)
    }

    /// Starts reading the page after `since` as of head `upto` (with
    /// `start`) if a slot is free, after dropping reads nobody came for.
    pub fn start(
        &self,
        since: Seq,
        upto: Seq,
        filter: CollectionFilter,
        limit: PageLimit,
        start: impl FnOnce() -> JoinHandle<Result<PullPage, StoreError>>,
    ) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        slots.retain(|s| s.started.elapsed() < self.ttl);
        if slots.len() >= SLOTS {
            return;
        }
        slots.push_back(Slot {
            since,
            upto,
            filter,
            limit,
            page: start(),
            started: Instant::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> PageLimit {
        PageLimit {
            docs: 10,
            bytes: 1000,
        }
    }

    fn read(checkpoint: u64) -> JoinHandle<Result<PullPage, StoreError>> {
        tokio::spawn(async move {
            Ok(PullPage {
                documents: Vec::new(),
                checkpoint: Seq(checkpoint),
                has_more: false,
                horizon: Seq(0),
            })
        })
    }

    /// Rule: a page read ahead is served only to the same request (start,
    /// filter, limits) at the same head; one read for an older head is never
    /// served, so a Pull sees every commit made before it.
    #[tokio::test]
    async fn only_an_exact_match_at_the_same_head_is_served() {
        let ahead = ReadAhead::default();
        let all = CollectionFilter::default();
        let todos = CollectionFilter::new(["todos".to_owned()]);
        ahead.start(Seq(5), Seq(9), all.clone(), limit(), || read(7));
        assert!(ahead.take(Seq(4), Seq(9), &all, limit()).is_none());
        assert!(ahead.take(Seq(5), Seq(9), &todos, limit()).is_none());
        let other = PageLimit {
            docs: 11,
            ..limit()
        };
        assert!(ahead.take(Seq(5), Seq(9), &all, other).is_none());
        let page = ahead.take(Seq(5), Seq(9), &all, limit()).expect("kept");
        assert_eq!(page.await.unwrap().unwrap().checkpoint, Seq(7));
        assert!(
            ahead.take(Seq(5), Seq(9), &all, limit()).is_none(),
            "served once"
        );

        ahead.start(Seq(5), Seq(9), all.clone(), limit(), || read(7));
        assert!(
            ahead.take(Seq(5), Seq(10), &all, limit()).is_none(),
            "head moved"
        );
        assert!(
            ahead.take(Seq(5), Seq(9), &all, limit()).is_none(),
            "and it is gone"
        );
    }

    /// Rule: memory is bounded and no read is wasted: once SLOTS reads wait,
    /// no new one starts, and the waiting ones are still served.
    #[tokio::test]
    async fn a_full_set_of_slots_starts_nothing_new() {
        let ahead = ReadAhead::default();
        let all = CollectionFilter::default();
        let mut started = 0;
        for since in 0..=SLOTS as u64 {
            ahead.start(Seq(since), Seq(100), all.clone(), limit(), || {
                started += 1;
                read(since)
            });
        }
        assert_eq!(started, SLOTS);
        assert!(ahead.take(Seq(0), Seq(100), &all, limit()).is_some());
        assert!(
            ahead
                .take(Seq(SLOTS as u64), Seq(100), &all, limit())
                .is_none()
        );
    }

    /// Rule: a page nobody came for is dropped after the TTL, freeing its slot.
    #[tokio::test]
    async fn unclaimed_reads_expire() {
        let ahead = ReadAhead::with_ttl(Duration::ZERO);
        let all = CollectionFilter::default();
        for since in 0..SLOTS as u64 {
            ahead.start(Seq(since), Seq(100), all.clone(), limit(), || read(since));
        }
        let mut started = false;
        ahead.start(Seq(99), Seq(100), all.clone(), limit(), || {
            started = true;
            read(99)
        });
        assert!(started, "expired reads free their slots");
        assert!(ahead.take(Seq(0), Seq(100), &all, limit()).is_none());
    }
}
