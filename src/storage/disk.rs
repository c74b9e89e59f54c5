//! Counters that survive a restart on one node (`disk PATH`, Limitador's storage name): the
//! memory storage decides, exactly as in memory, and every change is first written to an
//! embedded log-structured store ([fjall](https://docs.rs/fjall)) under the locks of the
//! counters it touches. A change is in the store's journal, handed to the operating system,
//! before the call is answered, so killing the process (even `kill -9`) loses no answered
//! charge; the journal is synced to the disk every 100 ms, so a power loss may lose the last
//! 100 ms. A change the store refuses is not made and the call fails (`UNAVAILABLE`).
//!
//! At start the store's entries are loaded into memory as they were (so a restart changes no
//! answer); the memory storage's periodic sweep then deletes expired counters from the store
//! as from memory. The entry
//! format below is pinned by tests/golden.rs: changing it orphans the stored counters.

use std::fs::{File, TryLockError};
use std::path::Path;
use std::sync::Arc;

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle};

use super::memory::{Entry, Journal, MemoryStorage};
use super::{CounterKey, LimitId};
use crate::algorithm::{BucketState, CounterState, Hold, SlidingState, WindowState};
use crate::throttle::Throttle;

/// The first byte of every stored entry.
const FORMAT: u8 = 1;
/// How often the journal is synced to the disk (what a power loss may lose).
const FSYNC_MS: u16 = 100;

/// The fjall keyspace behind the `disk` storage.
pub struct DiskJournal {
    /// Held while the store is open: one process per directory.
    _lock: File,
    keyspace: Keyspace,
    counters: PartitionHandle,
    forget_failed: Throttle,
}

/// Opens (or creates) the store at `path` and returns a memory storage holding what it had,
/// writing every change to it from now on. `capacity` bounds live counters as in memory.
pub fn open_disk(path: &Path, capacity: usize) -> Result<MemoryStorage, String> {
    let lock = lock(path)?;
    let keyspace = Config::new(path)
        .fsync_ms(Some(FSYNC_MS))
        .open()
        .map_err(|e| format!("cannot open the disk storage at {}: {e}", path.display()))?;
    let counters = keyspace
        .open_partition("counters", PartitionCreateOptions::default())
        .map_err(|e| format!("cannot open the disk storage at {}: {e}", path.display()))?;
    let mut live = Vec::new();
    // Entries of a format this version cannot read (none is ever written): dropped.
    let mut dead = Vec::new();
    let mut unreadable = 0usize;
    for item in counters.iter() {
        let (key, value) =
            item.map_err(|e| format!("cannot read the disk storage at {}: {e}", path.display()))?;
        match (decode_key(&key), decode_entry(&value)) {
            (Some(key), Some(entry)) => live.push((key, entry)),
            _ => {
                unreadable += 1;
                dead.push(key);
            }
        }
    }
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            path = %path.display(),
            "disk storage: entries of an unknown format were dropped"
        );
    }
    if !dead.is_empty() {
        let mut batch = keyspace.batch();
        for key in dead {
            batch.remove(&counters, key);
        }
        batch
            .commit()
            .map_err(|e| format!("cannot write the disk storage at {}: {e}", path.display()))?;
    }
    tracing::info!(path = %path.display(), counters = live.len(), "counters on disk");
    let journal = Arc::new(DiskJournal {
        _lock: lock,
        keyspace,
        counters,
        forget_failed: Throttle::new(std::time::Duration::from_secs(10)),
    });
    Ok(MemoryStorage::with_journal(capacity, journal, live))
}

/// Locks `path` for this process (creating the directory): two processes writing one store
/// would each overwrite the other's counters.
fn lock(path: &Path) -> Result<File, String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!("cannot open the disk storage at {}: {e}", path.display())
    };
    std::fs::create_dir_all(path).map_err(|e| cannot(&e))?;
    let file = File::create(path.join("ratekeeper.lock")).map_err(|e| cannot(&e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(cannot(&"another process is using it")),
        Err(TryLockError::Error(e)) => Err(cannot(&e)),
    }
}

impl Journal for DiskJournal {
    fn record(&self, changes: &[(&CounterKey, Option<&Entry>)]) -> Result<(), String> {
        let mut batch = self.keyspace.batch();
        for (key, entry) in changes {
            match entry {
                Some(entry) => batch.insert(&self.counters, encode_key(key), encode_entry(entry)),
                None => batch.remove(&self.counters, encode_key(key)),
            }
        }
        batch
            .commit()
            .map_err(|e| format!("the disk storage refused a write: {e}"))
    }

    fn forget(&self, keys: &[CounterKey]) {
        let mut batch = self.keyspace.batch();
        for key in keys {
            batch.remove(&self.counters, encode_key(key));
        }
        // A counter that could not be deleted is deleted at the next start (it has expired).
        if let Err(error) = batch.commit()
            && let Some(skipped) = self.forget_failed.admit()
        {
            tracing::warn!(%error, skipped, "disk storage: cannot delete expired counters");
        }
    }
}

/// A counter's key in the store: its limit's identity (8 bytes, big-endian) and its encoded
/// variable values.
pub fn encode_key(key: &CounterKey) -> Vec<u8> {
    let mut bytes = key.limit.to_be_bytes().to_vec();
    bytes.extend_from_slice(key.encoded().as_bytes());
    bytes
}

pub fn decode_key(bytes: &[u8]) -> Option<CounterKey> {
    let limit = LimitId::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    CounterKey::from_encoded(limit, std::str::from_utf8(bytes.get(8..)?).ok()?)
}

/// A counter's entry in the store: the format byte, the state (a tag, then its numbers as
/// 8-byte little-endian integers), the entry's expiry and its holds (count, then each hold's
/// id length, id, amount and expiry).
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut bytes = vec![FORMAT];
    let numbers: &[u64] = match entry.state {
        // Slots are a view of the holds (concurrency counters store no state of their own).
        None | Some(CounterState::Slots(_)) => {
            bytes.push(0);
            &[]
        }
        Some(CounterState::Window(s)) => {
            bytes.push(1);
            &[s.used, s.expires_at_ms]
        }
        Some(CounterState::Bucket(s)) => {
            bytes.push(2);
            &[s.units as u64, s.refilled_at_ms]
        }
        Some(CounterState::Sliding(s)) => {
            bytes.push(3);
            &[s.start_ms, s.current, s.previous]
        }
    };
    for n in numbers {
        bytes.extend_from_slice(&n.to_le_bytes());
    }
    bytes.extend_from_slice(&entry.expires_at_ms.to_le_bytes());
    bytes.extend_from_slice(&(entry.holds.len() as u32).to_le_bytes());
    for hold in &entry.holds {
        // Reservation ids are 32 hex digits; anything longer is cut (it cannot be committed).
        let id = &hold.id.as_bytes()[..hold.id.len().min(u16::MAX as usize)];
        bytes.extend_from_slice(&(id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(id);
        bytes.extend_from_slice(&hold.amount.to_le_bytes());
        bytes.extend_from_slice(&hold.expires_at_ms.to_le_bytes());
    }
    bytes
}

/// The entry `bytes` holds; `None` for anything [`encode_entry`] does not write.
pub fn decode_entry(bytes: &[u8]) -> Option<Entry> {
    let mut reader = Reader(bytes);
    if reader.take(1)? != [FORMAT] {
        return None;
    }
    let state = match reader.take(1)?[0] {
        0 => None,
        1 => Some(CounterState::Window(WindowState {
            used: reader.u64()?,
            expires_at_ms: reader.u64()?,
        })),
        2 => Some(CounterState::Bucket(BucketState {
            units: reader.u64()? as i64,
            refilled_at_ms: reader.u64()?,
        })),
        3 => Some(CounterState::Sliding(SlidingState {
            start_ms: reader.u64()?,
            current: reader.u64()?,
            previous: reader.u64()?,
        })),
        _ => return None,
    };
    let expires_at_ms = reader.u64()?;
    let count = u32::from_le_bytes(reader.take(4)?.try_into().ok()?);
    let mut holds = Vec::new();
    for _ in 0..count {
        let len = u16::from_le_bytes(reader.take(2)?.try_into().ok()?);
        let id = std::str::from_utf8(reader.take(len as usize)?).ok()?;
        holds.push(Hold {
            id: id.into(),
            amount: reader.u64()?,
            expires_at_ms: reader.u64()?,
        });
    }
    reader.0.is_empty().then_some(Entry {
        state,
        expires_at_ms,
        holds,
    })
}

/// Reads `bytes` front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_keys_read_back_and_garbage_does_not() {
        let entries = [
            Entry {
                state: None,
                expires_at_ms: 9,
                holds: vec![Hold {
                    id: "ab".into(),
                    amount: 3,
                    expires_at_ms: 9,
                }],
            },
            Entry {
                state: Some(CounterState::Bucket(BucketState {
                    units: -40,
                    refilled_at_ms: 7,
                })),
                expires_at_ms: 70,
                holds: vec![],
            },
            Entry {
                state: Some(CounterState::Sliding(SlidingState {
                    start_ms: 1,
                    current: 2,
                    previous: 3,
                })),
                expires_at_ms: 4,
                holds: vec![],
            },
        ];
        for entry in entries {
            let bytes = encode_entry(&entry);
            assert_eq!(decode_entry(&bytes), Some(entry));
            assert_eq!(decode_entry(&bytes[..bytes.len() - 1]), None, "cut short");
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode_entry(&longer), None, "trailing bytes");
        }
        assert_eq!(decode_entry(&[2, 0, 0]), None, "another format");
        let key = CounterKey::new(42, ["alice", "gold"]);
        assert_eq!(decode_key(&encode_key(&key)), Some(key));
        assert_eq!(decode_key(&[0, 1]), None);
    }
}
