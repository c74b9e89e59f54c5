//! Token buckets: `max_value` tokens of capacity, refilled either continuously (`max_value`
//! per `seconds`) or in steps (`refill_tokens` every `seconds`, as ASM does). A new bucket
//! starts full. A charge for usage that already happened may drive the bucket below zero
//! (debt); admission resumes once refills have repaid it.
//!
//! Exact integer arithmetic: the level is kept in units of 1/`scale` token. Continuous refill
//! uses `scale` = the period in ms and adds `max` units every millisecond; stepped refill uses
//! `scale` = 1 and adds `refill_tokens` every period. Refill time advances by whole steps from
//! the last refill, so it never drifts.

use super::{MAX_COUNT, admits, div_ceil, div_floor};

/// A bucket's level (may be negative: debt) and when it was last refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    pub units: i64,
    pub refilled_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Capacity, in units.
    capacity: u64,
    /// Units per token.
    scale: u64,
    /// Units added per step.
    quantum: u64,
    /// Length of a step, in ms.
    step_ms: u64,
}

impl TokenBucket {
    /// Refilled continuously at `max` tokens per `period_ms`.
    pub fn continuous(max: u64, period_ms: u64) -> Self {
        let period_ms = period_ms.max(1);
        Self {
            capacity: max.saturating_mul(period_ms).min(MAX_COUNT),
            scale: period_ms,
            quantum: max,
            step_ms: 1,
        }
    }

    /// Refilled with `tokens` every `period_ms`.
    pub fn stepped(max: u64, tokens: u64, period_ms: u64) -> Self {
        Self {
            capacity: max.min(MAX_COUNT),
            scale: 1,
            quantum: tokens,
            step_ms: period_ms.max(1),
        }
    }

    /// The parameters as the Redis script takes them: capacity, scale, quantum, step.
    pub fn parameters(&self) -> [u64; 4] {
        [self.capacity, self.scale, self.quantum, self.step_ms]
    }

    /// The bucket at `now`. A bucket that refills have made full again is the same as a new
    /// one (its refill steps start over at the next charge), whether or not a storage has
    /// forgotten it yet.
    pub fn current(&self, stored: Option<BucketState>, now_ms: u64) -> BucketState {
        let full = BucketState {
            units: self.capacity as i64,
            refilled_at_ms: now_ms,
        };
        let Some(state) = stored else {
            return full;
        };
        let steps = now_ms.saturating_sub(state.refilled_at_ms) / self.step_ms;
        let added = steps
            .saturating_mul(self.quantum)
            .min(MAX_COUNT.saturating_mul(2));
        let units = i128::from(state.units) + i128::from(added);
        if units >= i128::from(self.capacity) {
            return full;
        }
        BucketState {
            units: units as i64,
            refilled_at_ms: state.refilled_at_ms + steps * self.step_ms,
        }
    }

    /// Units used (capacity minus level), the measure the admission rule compares.
    fn used(&self, state: BucketState) -> u64 {
        (i128::from(self.capacity) - i128::from(state.units)).clamp(0, i128::from(u64::MAX)) as u64
    }

    pub fn admits(&self, state: BucketState, now_ms: u64, cost: u64) -> bool {
        self.admits_holding(state, now_ms, 0, cost)
    }

    /// Admission with `held` tokens on hold (reservations): `tokens - held >= cost`.
    pub fn admits_holding(&self, state: BucketState, _now_ms: u64, held: u64, cost: u64) -> bool {
        admits(
            self.used(state),
            held.saturating_mul(self.scale),
            cost.saturating_mul(self.scale),
            self.capacity,
        )
    }

    /// Capacity in whole tokens.
    pub fn max_tokens(&self) -> u64 {
        div_floor(self.capacity, self.scale)
    }

    /// Takes `cost` tokens, into debt if need be. The debt is bounded so that what is owed
    /// (capacity − level) never exceeds [`MAX_COUNT`] units.
    pub fn charge(&self, state: BucketState, cost: u64) -> BucketState {
        let units = i128::from(state.units) - i128::from(cost) * i128::from(self.scale);
        BucketState {
            units: units.max(self.lowest()) as i64,
            ..state
        }
    }

    /// Returns `amount` tokens previously taken: the bucket refills, never above its capacity.
    pub fn refund(&self, state: BucketState, amount: u64) -> BucketState {
        let units = i128::from(state.units) + i128::from(amount) * i128::from(self.scale);
        BucketState {
            units: units.min(i128::from(self.capacity)) as i64,
            ..state
        }
    }

    fn lowest(&self) -> i128 {
        i128::from(self.capacity) - i128::from(MAX_COUNT)
    }

    pub fn is_over(&self, state: BucketState, _now_ms: u64) -> bool {
        state.units < 0
    }

    /// Whole tokens owed.
    pub fn beyond(&self, state: BucketState) -> u64 {
        div_floor((-state.units).max(0) as u64, self.scale)
    }

    pub fn remaining(&self, state: BucketState, _now_ms: u64) -> u64 {
        div_floor(state.units.max(0) as u64, self.scale)
    }

    /// Time until the level reaches `target` units; 0 if it is there.
    fn time_to(&self, state: BucketState, target: u64, now_ms: u64) -> u64 {
        let deficit = i128::from(target) - i128::from(state.units);
        if deficit <= 0 {
            return 0;
        }
        let steps = div_ceil(deficit as u64, self.quantum.max(1));
        if steps > MAX_COUNT / self.step_ms {
            return MAX_COUNT;
        }
        let since_refill = now_ms.saturating_sub(state.refilled_at_ms);
        (steps * self.step_ms).saturating_sub(since_refill)
    }

    /// Time until the bucket is full again (debt included).
    pub fn reset_in_ms(&self, state: BucketState, now_ms: u64) -> u64 {
        self.time_to(state, self.capacity, now_ms)
    }

    pub fn retry_after_ms(&self, state: BucketState, now_ms: u64, cost: u64) -> Option<u64> {
        let needed = cost.checked_mul(self.scale)?;
        (needed <= self.capacity).then(|| self.time_to(state, needed, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_bucket_starts_full() {
        let bucket = TokenBucket::stepped(200, 50, 30_000);
        let state = bucket.current(None, 1_000);
        assert_eq!(bucket.remaining(state, 0), 200);
        assert!(bucket.admits(state, 0, 200));
        assert!(!bucket.admits(state, 0, 201));
        assert_eq!(bucket.reset_in_ms(state, 1_000), 0);
    }

    #[test]
    fn stepped_refill_does_not_drift() {
        let bucket = TokenBucket::stepped(200, 50, 30_000);
        let empty = bucket.charge(bucket.current(None, 0), 200);
        // 29.999 s: nothing yet; 30 s: one step; 95 s: three steps, and the next at 120 s.
        assert_eq!(bucket.remaining(bucket.current(Some(empty), 29_999), 0), 0);
        assert_eq!(bucket.remaining(bucket.current(Some(empty), 30_000), 0), 50);
        let later = bucket.current(Some(empty), 95_000);
        // Full again at 120 s: from then on it is a new bucket.
        assert_eq!(
            bucket.current(Some(empty), 130_000),
            bucket.current(None, 130_000)
        );
        assert_eq!(bucket.remaining(later, 0), 150);
        assert_eq!(later.refilled_at_ms, 90_000);
        assert_eq!(bucket.reset_in_ms(later, 95_000), 25_000);
        // Reading it often changes nothing.
        let mut state = empty;
        for t in (0..=95_000).step_by(7) {
            state = bucket.current(Some(state), t);
        }
        assert_eq!(state, later);
    }

    #[test]
    fn continuous_refill_is_exact() {
        // 60 tokens a minute: one token per second, in 1/60000-token units.
        let bucket = TokenBucket::continuous(60, 60_000);
        let state = bucket.charge(bucket.current(None, 0), 60);
        assert_eq!(bucket.remaining(bucket.current(Some(state), 999), 0), 0);
        assert_eq!(bucket.remaining(bucket.current(Some(state), 1_000), 0), 1);
        assert_eq!(bucket.retry_after_ms(state, 0, 3), Some(3_000));
        assert_eq!(bucket.reset_in_ms(state, 0), 60_000);
    }

    #[test]
    fn debt_delays_admission_until_repaid() {
        let bucket = TokenBucket::stepped(200, 50, 30_000);
        let state = bucket.charge(bucket.current(None, 0), 290);
        assert!(bucket.is_over(state, 0));
        assert_eq!(bucket.beyond(state), 90);
        assert_eq!(bucket.remaining(state, 0), 0);
        // -90 + 50 = -40 after one step; +10 after two.
        assert!(!bucket.admits(bucket.current(Some(state), 30_000), 0, 1));
        assert!(bucket.admits(bucket.current(Some(state), 60_000), 0, 10));
        assert_eq!(bucket.retry_after_ms(state, 0, 1), Some(60_000));
        assert_eq!(
            bucket.reset_in_ms(state, 0),
            180_000,
            "290 owed at 50 per step"
        );
        assert_eq!(bucket.retry_after_ms(state, 0, 201), None);
    }

    #[test]
    fn huge_charges_saturate() {
        let bucket = TokenBucket::continuous(10, 1_000);
        let state = bucket.charge(bucket.current(None, 0), u64::MAX);
        assert_eq!(
            state.units,
            10_000 - MAX_COUNT as i64,
            "owes at most MAX_COUNT units"
        );
        assert_eq!(bucket.reset_in_ms(state, 0), MAX_COUNT.div_ceil(10));
        assert!(!bucket.admits(state, 0, u64::MAX));
    }
}
