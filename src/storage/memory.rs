//! Counters in this process's memory: a fixed number of shards, each a mutex over a map.
//!
//! One request locks the shards of all its counters (in shard order, so two requests never
//! deadlock), decides, writes and unlocks: no other request can interleave, so N concurrent
//! calls on a limit of L admit exactly L. Expired counters are reclaimed by a periodic sweep
//! off the request path; the number of live counters is bounded by `capacity`, and a request
//! that would need a new counter beyond it fails with [`StorageError::CapacityExhausted`]
//! instead of silently evicting (resetting) a live one.
//!
//! Listing (the admin API) runs on a blocking thread, never on the threads that answer
//! decisions, and holds one shard's lock at a time for at most [`LIST_STEP`] entries; a page
//! looks at most [`LIST_BUDGET`] entries. Its cursor is `<shard>.<position in the shard's
//! iteration order>`, which stays valid while the shard is not changed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::{
    Batch, CounterKey, CounterSnapshot, LimitId, ListError, Page, PageRequest, Storage,
    StorageError, parse_cursor,
};
use crate::algorithm::{CounterState, GroupOutcome, Hold, Holds, SlotState, evaluate_holding};

const SHARDS: usize = 64;
/// Entries a listing looks at under one lock.
const LIST_STEP: usize = 4096;
/// Entries one page looks at, at most (a few milliseconds).
const LIST_BUDGET: usize = 256 * 1024;

type Shard = HashMap<CounterKey, Stored>;

/// A counter's state (none yet when only holds are on it), its holds, and when it may be
/// forgotten (its state is back to its full budget and its last hold has expired).
type Stored = Entry;

pub struct MemoryStorage {
    /// Shared with listings, which run on blocking threads.
    shards: Arc<[Mutex<Shard>]>,
    hasher: RandomState,
    live: AtomicUsize,
    capacity: usize,
    last_full_sweep_ms: AtomicU64,
    /// Where every change is written before it is made (the `disk` storage), if anywhere.
    journal: Option<Arc<dyn Journal>>,
}

/// A counter's entry as a journal sees it: its state (none when only holds are on it), when it
/// may be forgotten, and its holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub state: Option<CounterState>,
    pub expires_at_ms: u64,
    pub holds: Vec<Hold>,
}

/// Receives the changes of each decision before they are made, under the locks of the
/// counters they touch (so the changes of one counter arrive in the order they happen). An
/// error leaves the decision undone: nothing is changed and the call fails.
pub trait Journal: Send + Sync + 'static {
    /// The new entries of one decision (`None`: the counter is gone).
    fn record(&self, changes: &[(&CounterKey, Option<&Entry>)]) -> Result<(), String>;
    /// Counters dropped off the request path (expired, or of limits no longer loaded).
    fn forget(&self, keys: &[CounterKey]);
}

impl MemoryStorage {
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            live: AtomicUsize::new(0),
            capacity,
            last_full_sweep_ms: AtomicU64::new(0),
            journal: None,
        }
    }

    /// A storage whose every change is first written to `journal`, starting from `entries`
    /// (what the journal held, as it was: the sweep reclaims the expired ones; at most
    /// `capacity` are taken).
    pub fn with_journal(
        capacity: usize,
        journal: Arc<dyn Journal>,
        entries: impl IntoIterator<Item = (CounterKey, Entry)>,
    ) -> Self {
        let mut storage = Self::new(capacity);
        for (key, entry) in entries {
            if storage.len() >= capacity {
                break;
            }
            let shard = storage.shard_of(&key);
            if storage.shards[shard].lock().insert(key, entry).is_none() {
                storage.live.fetch_add(1, Ordering::Relaxed);
            }
        }
        storage.journal = Some(journal);
        storage
    }

    /// Live counters held (expired ones count until the sweep reclaims them).
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard_of(&self, key: &CounterKey) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Decides `batch` under the locks of its shards. `Err(NotApplied::NoRoom)` when it would need new
    /// counters beyond the capacity; then nothing was written.
    fn try_apply(&self, batch: &Batch, now_ms: u64) -> Result<Vec<GroupOutcome>, NotApplied> {
        // Requests touch a few counters: their bookkeeping stays on the stack.
        let shard_ids: SmallVec<[usize; 4]> = batch
            .counters
            .iter()
            .map(|c| self.shard_of(&c.key))
            .collect();
        let mut order = shard_ids.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: SmallVec<[MutexGuard<'_, Shard>; 4]> =
            order.iter().map(|&i| self.shards[i].lock()).collect();
        let guard_of =
            |counter: usize| order.binary_search(&shard_ids[counter]).unwrap_or_default();

        let stored: SmallVec<[Option<&Stored>; 4]> = batch
            .counters
            .iter()
            .enumerate()
            .map(|(i, c)| guards[guard_of(i)].get(&c.key))
            .collect();
        let mut states: SmallVec<[Option<CounterState>; 4]> =
            stored.iter().map(|s| s.and_then(|s| s.state)).collect();
        let mut holds: SmallVec<[Holds; 4]> = stored
            .iter()
            .map(|s| Holds::new(s.map(|s| s.holds.clone()).unwrap_or_default()))
            .collect();
        // Which counters exist already (their entries are updated in place, without a new key).
        let present: SmallVec<[bool; 4]> = stored.iter().map(Option::is_some).collect();
        drop(stored);
        let limits: SmallVec<[_; 4]> = batch.counters.iter().map(|c| c.algorithm).collect();
        let mut dirty: SmallVec<[bool; 4]> = smallvec::smallvec![false; batch.counters.len()];
        let outcomes = evaluate_holding(
            &limits,
            &mut states,
            &mut holds,
            &mut dirty,
            &batch.groups,
            batch.hold.as_ref(),
            now_ms,
        );

        let new_counters = (0..batch.counters.len())
            .filter(|&i| (dirty[i] || !holds[i].list.is_empty()) && !present[i])
            .count();
        if new_counters > 0 {
            // Reserve the room first, so concurrent requests on other shards cannot overshoot.
            let before = self.live.fetch_add(new_counters, Ordering::Relaxed);
            if before + new_counters > self.capacity {
                self.live.fetch_sub(new_counters, Ordering::Relaxed);
                return Err(NotApplied::NoRoom);
            }
        }
        // The new entries (None: the counter goes), journaled before any is made.
        let mut changes: SmallVec<[(usize, Option<Stored>); 4]> = SmallVec::new();
        for (i, counter) in batch.counters.iter().enumerate() {
            if !dirty[i] && !holds[i].changed {
                continue;
            }
            // The state as stored (unchanged unless dirty), with the holds as they are now.
            let state = if dirty[i] {
                states[i]
            } else {
                guards[guard_of(i)].get(&counter.key).and_then(|s| s.state)
            };
            let holds = std::mem::take(&mut holds[i].list);
            let state_expires = state.map_or(0, |s| counter.algorithm.expires_at_ms(s, now_ms));
            let last_hold = holds.iter().map(|h| h.expires_at_ms).max().unwrap_or(0);
            let stored = Stored {
                state,
                expires_at_ms: state_expires.max(last_hold),
                holds,
            };
            // Only holds were there, and none is left: the counter goes.
            let gone = stored.state.is_none() && stored.holds.is_empty();
            changes.push((i, (!gone).then_some(stored)));
        }
        if let Some(journal) = &self.journal
            && !changes.is_empty()
        {
            let records: SmallVec<[_; 4]> = changes
                .iter()
                .map(|(i, stored)| (&batch.counters[*i].key, stored.as_ref()))
                .collect();
            if let Err(reason) = journal.record(&records) {
                self.live.fetch_sub(new_counters, Ordering::Relaxed);
                return Err(NotApplied::Journal(reason));
            }
        }
        for (i, stored) in changes {
            let key = &batch.counters[i].key;
            let shard = &mut guards[guard_of(i)];
            match stored {
                None => {
                    if shard.remove(key).is_some() {
                        self.live.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Some(stored) => match shard.get_mut(key) {
                    Some(slot) => *slot = stored,
                    None => {
                        shard.insert(key.clone(), stored);
                    }
                },
            }
        }
        Ok(outcomes)
    }

    fn apply_now(&self, batch: &Batch, now_ms: u64) -> Result<Vec<GroupOutcome>, StorageError> {
        match self.try_apply(batch, now_ms) {
            Ok(outcomes) => return Ok(outcomes),
            Err(NotApplied::Journal(reason)) => return Err(StorageError::Unavailable(reason)),
            Err(NotApplied::NoRoom) => {}
        }
        // Full: sweep expired counters (at most once a second, so a flood of new keys at
        // capacity cannot make every request scan everything), then try once more.
        let last = self.last_full_sweep_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 1_000
            && self
                .last_full_sweep_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.reclaim_expired(now_ms);
        }
        self.try_apply(batch, now_ms).map_err(|e| match e {
            NotApplied::NoRoom => StorageError::CapacityExhausted {
                capacity: self.capacity,
            },
            NotApplied::Journal(reason) => StorageError::Unavailable(reason),
        })
    }
}

impl MemoryStorage {
    /// Drops the counters `gone` selects, shard by shard, and tells the journal.
    fn drop_where(&self, gone: impl Fn(&CounterKey, &Stored) -> bool) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.len();
            let mut dropped = Vec::new();
            shard.retain(|key, stored| {
                let drop = gone(key, stored);
                if drop && self.journal.is_some() {
                    dropped.push(key.clone());
                }
                !drop
            });
            self.live.fetch_sub(before - shard.len(), Ordering::Relaxed);
            if let Some(journal) = &self.journal
                && !dropped.is_empty()
            {
                journal.forget(&dropped);
            }
        }
    }
}

/// Why a decision changed nothing.
enum NotApplied {
    /// It needs new counters beyond the capacity.
    NoRoom,
    /// The journal could not take its changes.
    Journal(String),
}

/// One page of the live counters of `limits`, from `shard`, `position` on.
fn list(
    shards: &[Mutex<Shard>],
    limits: &[LimitId],
    (mut shard, mut position): (usize, usize),
    limit: usize,
    now_ms: u64,
) -> Page<CounterSnapshot> {
    let mut items = Vec::new();
    let mut budget = LIST_BUDGET;
    while shard < shards.len() {
        if items.len() >= limit || budget == 0 {
            return Page {
                items,
                next: Some(format!("{shard}.{position}")),
            };
        }
        let step = LIST_STEP.min(budget);
        let map = shards[shard].lock();
        let mut at = position;
        for (key, stored) in map.iter().skip(position) {
            if at - position >= step || items.len() >= limit {
                break;
            }
            at += 1;
            if stored.expires_at_ms > now_ms && limits.contains(&key.limit) {
                let live = || stored.holds.iter().filter(|h| h.expires_at_ms > now_ms);
                // Without a state, only holds: listed as slots (the limiter keeps them for
                // concurrency limits, whose counters have only those).
                let slots = || SlotState {
                    taken: live().count() as u64,
                    oldest_ends_ms: live().map(|h| h.expires_at_ms).min().unwrap_or(0),
                    free_at_ms: 0,
                };
                items.push(CounterSnapshot {
                    key: key.clone(),
                    state: stored.state.unwrap_or_else(|| CounterState::Slots(slots())),
                    held: live().fold(0u64, |sum, h| sum.saturating_add(h.amount)),
                });
            }
        }
        let entries = map.len();
        drop(map);
        budget -= at.saturating_sub(position);
        if at >= entries {
            (shard, position) = (shard + 1, 0);
        } else {
            position = at;
        }
    }
    Page { items, next: None }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn apply(
        &self,
        batch: &Batch<'_>,
        now_ms: u64,
    ) -> Result<Vec<GroupOutcome>, StorageError> {
        self.apply_now(batch, now_ms)
    }

    async fn counters(
        &self,
        _namespace: &str,
        limits: &[LimitId],
        page: PageRequest<'_>,
        now_ms: u64,
    ) -> Result<Page<CounterSnapshot>, ListError> {
        let start = match page.cursor {
            None => (0, 0),
            Some(cursor) => {
                let (shard, position) = parse_cursor(cursor)?;
                match (usize::try_from(shard), usize::try_from(position)) {
                    (Ok(shard), Ok(position)) if shard < SHARDS => (shard, position),
                    _ => {
                        return Err(ListError::InvalidCursor(format!(
                            "{cursor:?} is beyond the end of the counters"
                        )));
                    }
                }
            }
        };
        let shards = self.shards.clone();
        let limits = limits.to_vec();
        let limit = page.limit;
        tokio::task::spawn_blocking(move || list(&shards, &limits, start, limit, now_ms))
            .await
            .map_err(|e| ListError::Storage(StorageError::Unavailable(e.to_string())))
    }

    fn live_counters(&self) -> Option<usize> {
        Some(self.len())
    }

    fn forget_unloaded(&self, loaded: &HashSet<LimitId>) {
        self.drop_where(|key, _| !loaded.contains(&key.limit));
    }

    fn reclaim_expired(&self, now_ms: u64) {
        self.drop_where(|_, stored| stored.expires_at_ms <= now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::{Algorithm, FixedWindow, Group, Policy};
    use crate::storage::CounterRequest;
    use std::sync::Arc;

    fn batch(user: &str, max: u64, policy: Policy, cost: u64) -> Batch<'static> {
        Batch {
            namespace: "ns",
            hold: None,
            counters: vec![CounterRequest {
                key: CounterKey::new(1, [user]),
                algorithm: Algorithm::FixedWindow(FixedWindow::new(max, 1_000)),
            }],
            groups: vec![Group {
                policy,
                cost,
                counters: vec![0],
                costs: Vec::new(),
            }],
        }
    }

    fn admitted(storage: &MemoryStorage, b: &Batch, now: u64) -> bool {
        storage.apply_now(b, now).unwrap()[0].admitted
    }

    #[test]
    fn concurrent_calls_admit_exactly_the_limit() {
        let storage = Arc::new(MemoryStorage::new(100));
        let admitted_total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (storage, total) = (storage.clone(), admitted_total.clone());
                std::thread::spawn(move || {
                    let b = batch("u", 1000, Policy::AllOrNothing, 1);
                    for _ in 0..500 {
                        if admitted(&storage, &b, 0) {
                            total.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted_total.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn checks_create_no_counters_and_expired_ones_are_reclaimed() {
        let storage = MemoryStorage::new(100);
        admitted(&storage, &batch("a", 5, Policy::CheckOnly, 1), 0);
        assert_eq!(storage.len(), 0);
        admitted(&storage, &batch("a", 5, Policy::Charge, 1), 0);
        admitted(&storage, &batch("b", 5, Policy::Charge, 1), 500);
        assert_eq!(storage.len(), 2);
        storage.reclaim_expired(1_000);
        assert_eq!(storage.len(), 1, "a's window ended at 1000, b's lives on");
        storage.reclaim_expired(1_500);
        assert!(storage.is_empty());
    }

    #[test]
    fn capacity_refuses_new_counters_but_keeps_live_ones_counting() {
        let storage = MemoryStorage::new(2);
        assert!(admitted(&storage, &batch("a", 5, Policy::Charge, 1), 0));
        assert!(admitted(&storage, &batch("b", 5, Policy::Charge, 1), 0));
        let err = storage
            .apply_now(&batch("c", 5, Policy::Charge, 1), 0)
            .unwrap_err();
        assert_eq!(err, StorageError::CapacityExhausted { capacity: 2 });
        // Existing counters still work, and keep their counts.
        assert!(admitted(
            &storage,
            &batch("a", 5, Policy::AllOrNothing, 3),
            10
        ));
        assert!(!admitted(
            &storage,
            &batch("a", 5, Policy::AllOrNothing, 2),
            10
        ));
        // Once a window expires, its slot is reclaimed on demand.
        assert!(admitted(&storage, &batch("c", 5, Policy::Charge, 1), 1_000));
    }
}
