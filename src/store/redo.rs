//! The redo record: how a group commit's client states become atomic with
//! its commit mark without a sled transaction.
//!
//! A group that records clients' mutation ids (or, on a replica, the
//! clients' progress) must make them durable exactly when its head is: a
//! state without its commit would answer a retry `DUPLICATE` for a write
//! that is not there, and a commit without its states would apply a retry
//! twice. A sled transaction gives that, but every transaction seals and
//! writes sled's log buffer twice (`PageCache::pin_log`), whether or not
//! anyone flushes. So the writer instead writes, with plain inserts, in
//! this order: the records, this redo record (the group's head and every
//! state it writes, whole), the head, then the states themselves. sled
//! recovers a prefix of its log, so at open ([`recover`]):
//!
//! - redo head == recovered head: the group committed (or, writing only
//!   states, its redo record *is* its mark); its states may be cut short,
//!   so they are written again from the record (they are whole values:
//!   writing them twice is harmless);
//! - anything else: the record is from a commit that did not complete
//!   (its head is ahead) or from one whose states are all on disk (a later
//!   head was recovered, and it was written after them).
//!
//! The record is removed then, and before anything else changes the
//! clients' states or their progress (forgetting clients, discarding a
//! divergent suffix, a promotion), so an old record is never replayed over
//! them. A group whose record would exceed [`MAX_BYTES`] uses a sled
//! transaction instead, which removes the record too.
//!
//! While a record may be pending the store's schema reads
//! [`SCHEMA_VERSION_REDO`] ([`begin`]), so a build from before the record
//! refuses the store instead of opening it after a crash without the
//! replay; a clean stop removes the record and writes [`SCHEMA_VERSION`]
//! back ([`finish`]), so rolling back to such a build still works after a
//! clean stop.
//!
//! The prefix is what sled recovers after a *process* crash: everything
//! handed to the kernel is read back in log order, and recovery's first
//! pass cuts the log at the first torn message of its unstable tail. After
//! a power loss it rests on sled's `sync_file_range`, as every commit mark
//! here does.

use super::{SCHEMA_VERSION, SCHEMA_VERSION_REDO, error::StoreError, keys, model::Seq};

/// Tag of the stored form's first (and only) layout.
const FORMAT: u8 = 1;

/// Largest redo record written: sled keeps bigger values in files of their
/// own, which it does not sync, so a group whose record would be bigger
/// (a replica applying many commits' client states at once) writes its
/// states and head in a sled transaction instead.
pub const MAX_BYTES: usize = 64 * 1024;

/// A group's client states and progress, with the head they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redo {
    /// The group's head (unchanged for a group that only records states).
    pub head: Seq,
    /// The clients' progress the group writes (a replica), stored form.
    pub progress: Option<[u8; 16]>,
    /// Client id → its new state, stored form.
    pub states: Vec<(String, Vec<u8>)>,
}

impl Redo {
    /// The stored form: `[FORMAT][head][has progress][progress?][count]`
    /// then per state `[id length][id][state length][state]`, all
    /// big-endian u32 lengths; `None` if a length does not fit.
    pub fn encode(
        head: Seq,
        progress: Option<[u8; 16]>,
        states: &[(&String, Vec<u8>)],
    ) -> Option<Vec<u8>> {
        let size: usize = states.iter().map(|(c, s)| 8 + c.len() + s.len()).sum();
        let mut out = Vec::with_capacity(1 + 8 + 1 + 16 + 4 + size);
        out.push(FORMAT);
        out.extend_from_slice(&head.0.to_be_bytes());
        match progress {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p);
            }
            None => out.push(0),
        }
        push_len(&mut out, states.len())?;
        for (client, state) in states {
            push_len(&mut out, client.len())?;
            out.extend_from_slice(client.as_bytes());
            push_len(&mut out, state.len())?;
            out.extend_from_slice(state);
        }
        Some(out)
    }

    /// Parses the stored form.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::corrupt(keys::META, "bad redo record");
        let mut r = Reader(bytes);
        if r.take(1).ok_or_else(corrupt)? != [FORMAT] {
            return Err(corrupt());
        }
        let head = keys::parse_u64(r.take(8).ok_or_else(corrupt)?).ok_or_else(corrupt)?;
        let progress = match r.take(1).ok_or_else(corrupt)? {
            [0] => None,
            [1] => {
                Some(<[u8; 16]>::try_from(r.take(16).ok_or_else(corrupt)?).map_err(|_| corrupt())?)
            }
            _ => return Err(corrupt()),
        };
        let count = r.len().ok_or_else(corrupt)?;
        let mut states = Vec::new();
        for _ in 0..count {
            let client = r.len().and_then(|n| r.take(n)).ok_or_else(corrupt)?;
            let client = String::from_utf8(client.to_vec()).map_err(|_| corrupt())?;
            let state = r.len().and_then(|n| r.take(n)).ok_or_else(corrupt)?;
            states.push((client, state.to_vec()));
        }
        if !r.0.is_empty() {
            return Err(corrupt());
        }
        Ok(Self {
            head: Seq(head),
            progress,
            states,
        })
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) -> Option<()> {
    out.extend_from_slice(&u32::try_from(len).ok()?.to_be_bytes());
    Some(())
}

/// A cursor over the stored form.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        let bytes = <[u8; 4]>::try_from(self.take(4)?).ok()?;
        usize::try_from(u32::from_be_bytes(bytes)).ok()
    }
}

/// At open: writes the states of the group whose redo record matches the
/// recovered `head` again, then removes the record. Returns `None` without
/// a record, else whether it was replayed.
pub fn recover(trees: &super::Trees, head: Seq) -> Result<Option<bool>, StoreError> {
    let Some(bytes) = trees.meta.get(keys::META_REDO)? else {
        return Ok(None);
    };
    let redo = Redo::decode(&bytes)?;
    let replay = redo.head == head;
    if replay {
        for (client, state) in &redo.states {
            trees.clients.insert(client.as_bytes(), state.as_slice())?;
        }
        if let Some(progress) = redo.progress {
            trees.meta.insert(keys::META_CLIENTS_PROGRESS, &progress)?;
        }
    }
    trees.meta.remove(keys::META_REDO)?;
    Ok(Some(replay))
}

/// Removes the redo record, before something other than a group commit
/// changes the clients' states or progress.
pub fn clear(meta: &sled::Tree) -> Result<(), StoreError> {
    meta.remove(keys::META_REDO)?;
    Ok(())
}

/// Marks the store as possibly holding a redo record, before the first one
/// a process writes: a build from before the record refuses the store
/// rather than open it after a crash without replaying it.
pub fn begin(meta: &sled::Tree) -> Result<(), StoreError> {
    meta.insert(keys::META_SCHEMA, &SCHEMA_VERSION_REDO.to_be_bytes())?;
    Ok(())
}

/// At a clean stop, once every state is written: removes the record and
/// marks the store as the plain layout again (in that order, so a crash
/// between the two leaves a marked store without a record, which is fine).
pub fn finish(meta: &sled::Tree) -> Result<(), StoreError> {
    clear(meta)?;
    meta.insert(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_round_trips_and_refuses_damage() {
        let a = "client-a".to_string();
        let b = "b".to_string();
        let states = vec![(&a, vec![1, 2, 3]), (&b, vec![])];
        let bytes = Redo::encode(Seq(42), Some([7; 16]), &states).unwrap();
        let redo = Redo::decode(&bytes).unwrap();
        assert_eq!(redo.head, Seq(42));
        assert_eq!(redo.progress, Some([7; 16]));
        assert_eq!(
            redo.states,
            vec![(a.clone(), vec![1, 2, 3]), (b.clone(), vec![])]
        );
        let none = Redo::encode(Seq(1), None, &[]).unwrap();
        assert_eq!(Redo::decode(&none).unwrap().states, vec![]);
        // Every truncation, and a byte too many, is refused.
        for cut in 0..bytes.len() {
            assert!(Redo::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Redo::decode(&long).is_err());
        let mut format = bytes;
        format[0] = 9;
        assert!(Redo::decode(&format).is_err());
    }
}
