//! What the store remembers of each client's mutation ids, so that a retry
//! is told the truth.
//!
//! Mutation ids increase per client. The store keeps, per client, the highest
//! id it has processed (`last`) and the exceptions below it: ids whose
//! mutation was **rejected** (answered CONFLICT) and ids that were **never
//! processed** (skipped over by a later id, or left NOT_APPLIED by a failed
//! atomic batch and then passed). Every other id at or below `last` was
//! applied. So a retry is answered from this alone:
//!
//! | the id is                          | the retry answers                    |
//! |------------------------------------|--------------------------------------|
//! | above `last`, or never processed   | processed now, like any new mutation |
//! | applied (merged, resolved)         | DUPLICATE                            |
//! | rejected                           | CONFLICT again, with the current doc |
//! | at or below `floor`, no exception  | refused: its outcome was forgotten   |
//!
//! Exceptions are kept as ranges, merged when adjacent, at most
//! [`MAX_EXCEPTIONS`] per client. When more are needed the oldest ones are
//! dropped and `floor` rises past them: an id at or below the floor that has
//! no exception may have been rejected, so the store no longer claims to
//! know its outcome rather than guess. The state is written in the same
//! commit as the mutations' effects.
//!
//! Everything here is pure; `push` reads and plans with it, the writer
//! stores it.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{error::StoreError, keys};

/// Most exception ranges kept per client (the bound on what a client's
/// state costs: 17 bytes a range, so at most ~17 KiB per client).
pub const MAX_EXCEPTIONS: usize = 1024;

/// `seen` is refreshed by a push that changes nothing else only when it is
/// older than this, so that pure retries do not cost a write each.
pub const SEEN_GRANULARITY: Duration = Duration::from_secs(60);

/// The format written: 2 adds `at`.
const FORMAT: u8 = 2;
/// `[format][last][seen µs][floor][count: u32]`, then `[at]` in format 2.
const HEADER: usize = 1 + 8 + 8 + 8 + 4;
/// The bytes format 2 adds after the header.
const AT: usize = 8;
/// `[start][end][kind]`.
const RANGE: usize = 8 + 8 + 1;

/// Why an id at or below `last` was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exception {
    /// Answered CONFLICT: a retry is answered CONFLICT again.
    Rejected,
    /// Never processed: it may still be applied.
    Unprocessed,
}

/// An inclusive range of ids sharing one exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
    kind: Exception,
}

/// What a mutation id is, for the client that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdStatus {
    /// Above anything processed, or never processed: process it.
    New,
    /// Applied earlier: answer DUPLICATE.
    Applied,
    /// Rejected earlier: answer CONFLICT again.
    Rejected,
    /// At or below the floor with no exception left: its outcome is not
    /// known any more.
    Forgotten,
}

/// One client's mutation-id state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientState {
    /// Highest id processed (applied or rejected); 0 = none.
    pub last: u64,
    /// Time of the last push seen from the client, µs since the epoch.
    pub seen_micros: u64,
    /// Ids at or below this without an exception have an unknown outcome.
    pub floor: u64,
    /// The head of the commit that wrote this state (0 if written by a
    /// build before replication): a replica catching up is sent the states
    /// written since it last applied.
    pub at: u64,
    /// Sorted, disjoint exception ranges.
    exceptions: Vec<Range>,
}

/// One exception range of a [`ClientState`], as replication carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExceptionRange {
    /// First id.
    pub first: u64,
    /// Last id.
    pub last: u64,
    /// Rejected (true) or never processed (false).
    pub rejected: bool,
}

impl ClientState {
    /// A state as a primary sent it; fails if its ranges are not sorted and
    /// disjoint or too many.
    pub fn from_parts(
        last: u64,
        floor: u64,
        seen_micros: u64,
        at: u64,
        ranges: impl IntoIterator<Item = ExceptionRange>,
    ) -> Result<Self, &'static str> {
        let mut exceptions: Vec<Range> = Vec::new();
        for r in ranges {
            if r.first > r.last || exceptions.last().is_some_and(|p| p.end >= r.first) {
                return Err("exception ranges out of order");
            }
            if exceptions.len() == MAX_EXCEPTIONS {
                return Err("too many exception ranges");
            }
            exceptions.push(Range {
                start: r.first,
                end: r.last,
                kind: if r.rejected {
                    Exception::Rejected
                } else {
                    Exception::Unprocessed
                },
            });
        }
        Ok(Self {
            last,
            seen_micros,
            floor,
            at,
            exceptions,
        })
    }

    /// The exception ranges, in order.
    pub fn exception_ranges(&self) -> impl Iterator<Item = ExceptionRange> + '_ {
        self.exceptions.iter().map(|r| ExceptionRange {
            first: r.start,
            last: r.end,
            rejected: r.kind == Exception::Rejected,
        })
    }

    /// The status of `id` (not 0).
    pub fn status(&self, id: u64) -> IdStatus {
        match self.exception(id) {
            Some(Exception::Rejected) => IdStatus::Rejected,
            Some(Exception::Unprocessed) => IdStatus::New,
            None if id > self.last => IdStatus::New,
            None if id <= self.floor => IdStatus::Forgotten,
            None => IdStatus::Applied,
        }
    }

    fn exception(&self, id: u64) -> Option<Exception> {
        let i = self.exceptions.partition_point(|r| r.end < id);
        self.exceptions
            .get(i)
            .filter(|r| r.start <= id)
            .map(|r| r.kind)
    }

    /// Records that `id` was processed: applied, or rejected if `rejected`.
    /// Ids skipped between the old `last` and `id` become unprocessed.
    pub fn processed(&mut self, id: u64, rejected: bool) {
        if id > self.last {
            if id - self.last > 1 {
                self.fill_unprocessed(self.last + 1, id - 1);
            }
            self.last = id;
        }
        self.set(id, rejected.then_some(Exception::Rejected));
    }

    /// Records that `id` was rejected by an atomic batch that wrote nothing:
    /// `last` does not move, the other ids of the batch stay unprocessed.
    pub fn rejected_alone(&mut self, id: u64) {
        self.set(id, Some(Exception::Rejected));
    }

    /// Marks `[start, end]` unprocessed where no exception is recorded yet
    /// (an id rejected by a failed atomic batch may lie above `last`).
    fn fill_unprocessed(&mut self, start: u64, end: u64) {
        let mut holes = Vec::new();
        let mut from = start;
        for r in self
            .exceptions
            .iter()
            .filter(|r| r.end >= start && r.start <= end)
        {
            if r.start > from {
                holes.push((from, r.start - 1));
            }
            from = r.end.saturating_add(1);
        }
        if from <= end {
            holes.push((from, end));
        }
        for (start, end) in holes {
            self.exceptions.push(Range {
                start,
                end,
                kind: Exception::Unprocessed,
            });
        }
        self.normalize();
    }

    /// Sets (or clears, with `None`) the exception of one id.
    fn set(&mut self, id: u64, kind: Option<Exception>) {
        if self.exception(id) == kind {
            return;
        }
        let i = self.exceptions.partition_point(|r| r.end < id);
        if let Some(r) = self.exceptions.get(i).copied().filter(|r| r.start <= id) {
            // Split the range around `id`.
            self.exceptions.remove(i);
            if r.start < id {
                self.exceptions.push(Range { end: id - 1, ..r });
            }
            if id < r.end {
                self.exceptions.push(Range { start: id + 1, ..r });
            }
        }
        if let Some(kind) = kind {
            self.exceptions.push(Range {
                start: id,
                end: id,
                kind,
            });
        }
        self.normalize();
    }

    /// Sorts, merges adjacent ranges of one kind, and keeps the newest
    /// [`MAX_EXCEPTIONS`], raising the floor past the ones dropped.
    fn normalize(&mut self) {
        self.exceptions.sort_by_key(|r| r.start);
        let mut merged: Vec<Range> = Vec::with_capacity(self.exceptions.len());
        for r in self.exceptions.drain(..) {
            match merged.last_mut() {
                Some(prev) if prev.kind == r.kind && prev.end.saturating_add(1) == r.start => {
                    prev.end = r.end;
                }
                _ => merged.push(r),
            }
        }
        if merged.len() > MAX_EXCEPTIONS {
            let dropped = merged.len() - MAX_EXCEPTIONS;
            self.floor = self.floor.max(merged[dropped - 1].end);
            merged.drain(..dropped);
        }
        self.exceptions = merged;
    }

    /// Marks the client as seen at `now` if the state is written anyway
    /// (`writing`) or the time it has is older than [`SEEN_GRANULARITY`];
    /// returns whether the latter made it news worth a write.
    pub fn see(&mut self, now: SystemTime, writing: bool) -> bool {
        let now = micros(now);
        let stale = now.saturating_sub(self.seen_micros) >= micros_of(SEEN_GRANULARITY);
        if stale || (writing && now > self.seen_micros) {
            self.seen_micros = now;
        }
        stale
    }

    /// Whether the client was last seen before `cutoff`.
    pub fn unseen_since(&self, cutoff: SystemTime) -> bool {
        self.seen_micros < micros(cutoff)
    }

    /// The length of the stored form.
    pub fn encoded_len(&self) -> usize {
        HEADER + AT + RANGE * self.exceptions.len()
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let count = u32::try_from(self.exceptions.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(FORMAT);
        out.extend_from_slice(&self.last.to_be_bytes());
        out.extend_from_slice(&self.seen_micros.to_be_bytes());
        out.extend_from_slice(&self.floor.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&self.at.to_be_bytes());
        for r in &self.exceptions {
            out.extend_from_slice(&r.start.to_be_bytes());
            out.extend_from_slice(&r.end.to_be_bytes());
            out.push(match r.kind {
                Exception::Rejected => 1,
                Exception::Unprocessed => 2,
            });
        }
        out
    }

    /// Parses the stored form. The first layout's value (8 bytes: `last`
    /// alone) reads as a client with no exceptions, never seen.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |detail: &str| StoreError::corrupt(keys::CLIENTS, detail);
        if let Some(last) = keys::parse_u64(bytes) {
            return Ok(Self {
                last,
                ..Self::default()
            });
        }
        let (header, mut rest) = bytes
            .split_first_chunk::<HEADER>()
            .ok_or_else(|| corrupt("short client state"))?;
        let at = match header[0] {
            1 => 0,
            2 => {
                let (at, tail) = rest
                    .split_first_chunk::<AT>()
                    .ok_or_else(|| corrupt("short client state"))?;
                rest = tail;
                u64::from_be_bytes(*at)
            }
            _ => return Err(corrupt("unknown client state format")),
        };
        let u64_at = |at: usize| keys::parse_u64(&header[at..at + 8]).unwrap_or_default();
        let count = u32::from_be_bytes([header[25], header[26], header[27], header[28]]);
        let mut exceptions = Vec::new();
        for _ in 0..count {
            let (range, tail) = rest
                .split_first_chunk::<RANGE>()
                .ok_or_else(|| corrupt("short client state"))?;
            rest = tail;
            let start = keys::parse_u64(&range[..8]).unwrap_or_default();
            let end = keys::parse_u64(&range[8..16]).unwrap_or_default();
            let kind = match range[16] {
                1 => Exception::Rejected,
                2 => Exception::Unprocessed,
                _ => return Err(corrupt("unknown exception kind")),
            };
            if start > end || exceptions.last().is_some_and(|p: &Range| p.end >= start) {
                return Err(corrupt("exception ranges out of order"));
            }
            exceptions.push(Range { start, end, kind });
        }
        Ok(Self {
            last: u64_at(1),
            seen_micros: u64_at(9),
            floor: u64_at(17),
            at,
            exceptions,
        })
    }
}

fn micros(t: SystemTime) -> u64 {
    micros_of(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn micros_of(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What readers must be told instead of the clients tree while a commit
/// that changed a client's state is written but not yet durable: the
/// client's last durable `last`. Entries exist only for clients with such
/// commits in flight, so memory does not grow with the number of clients.
///
/// The writer adds an entry ([`Unflushed::begin`]) *before* it writes the
/// state and takes it back once the commit is published
/// ([`Unflushed::published`]); a reader reads the tree *first*, then this
/// ([`Unflushed::durable_last`]). So a reader that read a state not yet
/// durable always finds the entry still there.
#[derive(Clone, Default)]
pub struct Unflushed(Arc<RwLock<HashMap<String, (u64, usize)>>>);

impl Unflushed {
    /// Notes a commit about to write `client`'s state. `stored_last` is
    /// what the tree held when the commit was planned: durable, unless a
    /// commit of the client is already in flight (whose entry then holds the
    /// durable value).
    pub fn begin(&self, client: &str, stored_last: u64) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(client.to_owned())
            .and_modify(|(_, commits)| *commits += 1)
            .or_insert((stored_last, 1));
    }

    /// A commit that wrote `client`'s state, `last`, is now durable (or was
    /// never written: then `last` is `None` and the durable value stays).
    pub fn published(&self, client: &str, last: Option<u64>) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(client) {
            if let Some(last) = last {
                entry.0 = last;
            }
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(client);
            }
        }
    }

    /// The durable `last` of `client`, if a commit of it is in flight.
    pub fn durable_last(&self, client: &str) -> Option<u64> {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        map.get(client).map(|(last, _)| *last)
    }
}

/// A client's new state as a group commit writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientWrite {
    /// The `last` the clients tree held before the group (see
    /// [`Unflushed::begin`]).
    pub stored_last: u64,
    /// The state to write.
    pub state: ClientState,
}

/// Gives every client stored by an earlier build (no `seen` time) the time
/// of this open, so client retention counts from the upgrade rather than
/// forgetting them all at the first round.
pub fn upgrade(tree: &sled::Tree, now: SystemTime) -> Result<usize, StoreError> {
    let mut upgraded = 0;
    for entry in tree.iter() {
        let (key, value) = entry?;
        if value.len() == 8 {
            let mut state = ClientState::decode(&value)?;
            state.seen_micros = micros(now);
            tree.insert(key, state.encode())?;
            upgraded += 1;
        }
    }
    Ok(upgraded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_rejected_skipped_and_new_ids() {
        let mut s = ClientState::default();
        s.processed(1, false);
        s.processed(2, true);
        s.processed(5, false);
        assert_eq!(s.last, 5);
        assert_eq!(s.status(1), IdStatus::Applied);
        assert_eq!(s.status(2), IdStatus::Rejected);
        assert_eq!(s.status(3), IdStatus::New, "skipped over, never processed");
        assert_eq!(s.status(4), IdStatus::New);
        assert_eq!(s.status(5), IdStatus::Applied);
        assert_eq!(s.status(6), IdStatus::New);
        // A skipped id applied later, and a rejected one that stays so.
        s.processed(3, false);
        s.processed(4, true);
        assert_eq!(s.status(3), IdStatus::Applied);
        assert_eq!(s.status(4), IdStatus::Rejected);
        assert_eq!(s.last, 5);
    }

    #[test]
    fn a_failed_atomic_batch_consumes_only_its_rejected_ids() {
        let mut s = ClientState::default();
        s.processed(4, false);
        // Atomic [5 not applied, 6 conflict]: 6 is rejected, 5 stays new.
        s.rejected_alone(6);
        assert_eq!(s.last, 4);
        assert_eq!(s.status(5), IdStatus::New);
        assert_eq!(s.status(6), IdStatus::Rejected);
        // A later id passes both: 5 is still unprocessed, 6 still rejected.
        s.processed(9, false);
        assert_eq!(s.status(5), IdStatus::New);
        assert_eq!(s.status(6), IdStatus::Rejected);
        assert_eq!(s.status(7), IdStatus::New);
        assert_eq!(s.status(9), IdStatus::Applied);
    }

    #[test]
    fn the_oldest_exceptions_go_first_and_their_ids_are_forgotten() {
        let mut s = ClientState::default();
        // Every other id rejected: one range each.
        for id in 1..=2 * MAX_EXCEPTIONS as u64 + 4 {
            s.processed(id, id % 2 == 1);
        }
        assert_eq!(s.exceptions.len(), MAX_EXCEPTIONS);
        assert!(s.floor > 0);
        assert_eq!(s.status(1), IdStatus::Forgotten, "rejected, then dropped");
        assert_eq!(s.status(2), IdStatus::Forgotten, "applied, below the floor");
        let newest = 2 * MAX_EXCEPTIONS as u64 + 3;
        assert_eq!(s.status(newest), IdStatus::Rejected);
        assert_eq!(s.status(newest + 1), IdStatus::Applied);
    }

    #[test]
    fn adjacent_ranges_merge_and_splits_keep_the_rest() {
        let mut s = ClientState::default();
        s.processed(100, false); // 1..=99 unprocessed: one range
        assert_eq!(s.exceptions.len(), 1);
        s.processed(50, false);
        assert_eq!(s.exceptions.len(), 2);
        assert_eq!(s.status(49), IdStatus::New);
        assert_eq!(s.status(51), IdStatus::New);
        s.processed(50, true);
        assert_eq!(s.status(50), IdStatus::Rejected);
        assert_eq!(s.exceptions.len(), 3);
    }

    #[test]
    fn round_trips_and_reads_the_first_layout() {
        let mut s = ClientState::default();
        s.processed(3, true);
        s.processed(10, false);
        s.see(UNIX_EPOCH + Duration::from_secs(1_000_000), false);
        s.at = 42;
        assert_eq!(ClientState::decode(&s.encode()).unwrap(), s);
        // Format 1: the same without `at`.
        let mut v1 = s.encode();
        v1[0] = 1;
        v1.drain(HEADER..HEADER + AT);
        let read = ClientState::decode(&v1).unwrap();
        assert_eq!(read, ClientState { at: 0, ..s.clone() });
        let parts =
            ClientState::from_parts(s.last, s.floor, s.seen_micros, s.at, s.exception_ranges());
        assert_eq!(
            parts.unwrap(),
            s,
            "what replication carries is the whole state"
        );
        let old = ClientState::decode(&7u64.to_be_bytes()).unwrap();
        assert_eq!((old.last, old.seen_micros), (7, 0));
        for bad in [&[1u8, 2, 3][..], &[9u8; HEADER]] {
            assert!(ClientState::decode(bad).is_err());
        }
        let mut truncated = s.encode();
        truncated.pop();
        assert!(ClientState::decode(&truncated).is_err());
    }

    #[test]
    fn seen_is_refreshed_coarsely() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = ClientState::default();
        assert!(s.see(t0, false));
        assert!(!s.see(t0 + Duration::from_secs(1), false));
        assert_eq!(s.seen_micros, micros(t0), "not news, not written");
        assert!(!s.see(t0 + Duration::from_secs(2), true));
        assert_eq!(
            s.seen_micros,
            micros(t0 + Duration::from_secs(2)),
            "written anyway"
        );
        let later = t0 + SEEN_GRANULARITY * 2;
        assert!(s.see(later, false));
        assert!(!s.unseen_since(later));
        assert!(s.unseen_since(later + Duration::from_secs(1)));
    }
}
