//! In-flight (concurrency) limits: at most `max` requests of one counter run at once. Each
//! running request holds a slot — a hold of one unit on the counter (see [`super::Holds`]) —
//! from its admission until it is released (a Commit, an Envoy refund) or, at the latest, until
//! `lifetime_ms` after it was taken, so a client that vanished never locks a key for good.
//!
//! A concurrency counter stores no state of its own: its slots are its holds. Its
//! [`SlotState`] is a view of them, made by [`super::Algorithm::with_holds`] whenever the
//! arithmetic needs it: how many slots are taken, when the oldest ends, and when one is free.

use super::admits;

/// Prefix of the ids of the slots an admission takes (a reservation's slot carries the
/// reservation's id, hex digits, so the two never meet). Refunds free only these.
pub const SLOT_ID_PREFIX: char = '~';

/// A limit of `max` slots, each living at most `lifetime_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    pub max: u64,
    pub lifetime_ms: u64,
}

/// The slots of a counter at one moment, as read from its holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotState {
    /// Slots taken (live holds).
    pub taken: u64,
    /// When the oldest slot ends (0: none taken).
    pub oldest_ends_ms: u64,
    /// From when one more slot is free: 0 when one is free now, `u64::MAX` when never (a
    /// limit of 0 slots).
    pub free_at_ms: u64,
}

impl Concurrency {
    pub fn new(max: u64, lifetime_ms: u64) -> Self {
        Self { max, lifetime_ms }
    }

    /// The view of slots ending at `ends` (any order).
    pub fn slots(&self, ends: impl IntoIterator<Item = u64>) -> SlotState {
        let mut ends: Vec<u64> = ends.into_iter().collect();
        ends.sort_unstable();
        let taken = ends.len() as u64;
        // One more fits once `taken - max + 1` slots have ended.
        let free_at_ms = if self.max == 0 {
            u64::MAX
        } else if taken < self.max {
            0
        } else {
            let nth = usize::try_from(taken - self.max).unwrap_or(usize::MAX);
            ends.get(nth).copied().unwrap_or(u64::MAX)
        };
        SlotState {
            taken,
            oldest_ends_ms: ends.first().copied().unwrap_or(0),
            free_at_ms,
        }
    }

    /// The stored state is nothing: the view comes from the holds.
    pub fn current(&self, stored: Option<SlotState>, _now_ms: u64) -> SlotState {
        stored.unwrap_or_default()
    }

    pub fn admits(&self, state: SlotState, now_ms: u64, cost: u64) -> bool {
        self.admits_holding(state, now_ms, state.taken, cost)
    }

    /// One slot, whatever the cost: `held` (the slots taken) + 1 <= max.
    pub fn admits_holding(&self, _state: SlotState, _now_ms: u64, held: u64, _cost: u64) -> bool {
        admits(0, held, 1, self.max)
    }

    /// Slots are taken through the holds, never through the state.
    pub fn charge(&self, state: SlotState, _cost: u64) -> SlotState {
        state
    }

    /// Slots are freed through the holds, never through the state.
    pub fn refund(&self, state: SlotState, _amount: u64) -> SlotState {
        state
    }

    /// More slots taken than the limit (a charge that took one anyway).
    pub fn is_over(&self, state: SlotState, _now_ms: u64) -> bool {
        state.taken > self.max
    }

    pub fn beyond(&self, state: SlotState) -> u64 {
        state.taken.saturating_sub(self.max)
    }

    /// Every slot: the caller subtracts the taken ones, which are holds.
    pub fn remaining(&self, _state: SlotState, _now_ms: u64) -> u64 {
        self.max
    }

    /// Until the oldest slot ends (0: none is taken).
    pub fn reset_in_ms(&self, state: SlotState, now_ms: u64) -> u64 {
        state.oldest_ends_ms.saturating_sub(now_ms)
    }

    /// Until one slot is free, whatever the cost; `None` for a limit of 0 slots.
    pub fn retry_after_ms(&self, state: SlotState, now_ms: u64, _cost: u64) -> Option<u64> {
        (self.max > 0).then(|| state.free_at_ms.saturating_sub(now_ms))
    }
}

/// An id for a slot taken at `now_ms` that no hold of `taken` has: `~<now_ms>.<n>`, with the
/// smallest such `n` (decide.lua makes the same ids).
pub fn slot_id<'a>(now_ms: u64, taken: impl Iterator<Item = &'a str> + Clone) -> String {
    (0u64..)
        .map(|n| format!("{SLOT_ID_PREFIX}{now_ms}.{n}"))
        .find(|id| !taken.clone().any(|t| t == id))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_free_once_enough_slots_have_ended() {
        let limit = Concurrency::new(2, 10_000);
        let none = limit.slots([]);
        assert_eq!(none, SlotState::default());
        assert!(limit.admits(none, 0, 500), "one slot, whatever the cost");
        let two = limit.slots([9_000, 4_000]);
        assert_eq!(
            (two.taken, two.oldest_ends_ms, two.free_at_ms),
            (2, 4_000, 4_000)
        );
        assert!(!limit.admits(two, 0, 1));
        assert_eq!(limit.retry_after_ms(two, 1_000, 1), Some(3_000));
        assert_eq!(limit.reset_in_ms(two, 1_000), 3_000);
        // Four taken (charges past the limit): three must end before one is free.
        let four = limit.slots([7_000, 3_000, 5_000, 8_000]);
        assert_eq!(four.free_at_ms, 7_000);
        assert!(limit.is_over(four, 0));
        assert_eq!(limit.beyond(four), 2);
        let zero = Concurrency::new(0, 1_000);
        assert_eq!(zero.retry_after_ms(zero.slots([]), 0, 1), None);
    }

    #[test]
    fn slot_ids_are_unique_on_their_counter() {
        assert_eq!(slot_id(5, [].iter().copied()), "~5.0");
        let taken = ["~5.0", "~5.1", "abc"];
        assert_eq!(slot_id(5, taken.iter().copied()), "~5.2");
        assert_eq!(slot_id(6, taken.iter().copied()), "~6.0");
    }
}
