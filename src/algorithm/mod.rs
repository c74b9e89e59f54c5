//! Rate-limit arithmetic as pure functions of (state, now, cost, limit). Every storage runs the
//! same code: it loads the states one request touches, calls [`evaluate`], and stores the
//! states it marks as changed, all in one atomic step.

pub mod fixed_window;
pub mod sliding_window;
pub mod token_bucket;

use smallvec::SmallVec;

pub use fixed_window::{FixedWindow, WindowState};
pub use sliding_window::{SlidingState, SlidingWindow};
pub use token_bucket::{BucketState, TokenBucket};

/// A limit's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    FixedWindow(FixedWindow),
    TokenBucket(TokenBucket),
    SlidingWindow(SlidingWindow),
}

/// A counter's stored state; its kind matches its limit's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterState {
    Window(WindowState),
    Bucket(BucketState),
    Sliding(SlidingState),
}

/// Runs `$body` with the algorithm and the state of the same kind; `$otherwise` when they
/// differ (which [`Algorithm::current`] never produces).
macro_rules! with_state {
    ($algorithm:expr, $state:expr, |$a:ident, $s:ident| $body:expr, $otherwise:expr) => {
        match ($algorithm, $state) {
            (Algorithm::FixedWindow($a), CounterState::Window($s)) => $body,
            (Algorithm::TokenBucket($a), CounterState::Bucket($s)) => $body,
            (Algorithm::SlidingWindow($a), CounterState::Sliding($s)) => $body,
            _ => $otherwise,
        }
    };
}

impl Algorithm {
    /// The algorithm's number in the Redis script's arguments (decide.lua's `FIXED_WINDOW`,
    /// `TOKEN_BUCKET`, `SLIDING_WINDOW`; a test compares them).
    pub const fn wire(&self) -> u8 {
        match self {
            Algorithm::FixedWindow(_) => 0,
            Algorithm::TokenBucket(_) => 1,
            Algorithm::SlidingWindow(_) => 2,
        }
    }

    /// The state in force at `now` (refreshed: expired windows, refills); a missing state, or
    /// one of another kind, reads as new.
    pub fn current(&self, stored: Option<CounterState>, now_ms: u64) -> CounterState {
        match *self {
            Algorithm::FixedWindow(a) => CounterState::Window(a.current(
                stored.and_then(|s| match s {
                    CounterState::Window(w) => Some(w),
                    _ => None,
                }),
                now_ms,
            )),
            Algorithm::TokenBucket(a) => CounterState::Bucket(a.current(
                stored.and_then(|s| match s {
                    CounterState::Bucket(b) => Some(b),
                    _ => None,
                }),
                now_ms,
            )),
            Algorithm::SlidingWindow(a) => CounterState::Sliding(a.current(
                stored.and_then(|s| match s {
                    CounterState::Sliding(w) => Some(w),
                    _ => None,
                }),
                now_ms,
            )),
        }
    }

    pub fn admits(&self, state: CounterState, now_ms: u64, cost: u64) -> bool {
        with_state!(*self, state, |a, s| a.admits(s, now_ms, cost), false)
    }

    pub fn charge(&self, state: CounterState, cost: u64) -> CounterState {
        with_state!(*self, state, |a, s| a.charge(s, cost).into(), state)
    }

    pub fn refund(&self, state: CounterState, amount: u64) -> CounterState {
        with_state!(*self, state, |a, s| a.refund(s, amount).into(), state)
    }

    /// Usage past the limit (after a charge).
    pub fn is_over(&self, state: CounterState, now_ms: u64) -> bool {
        with_state!(*self, state, |a, s| a.is_over(s, now_ms), true)
    }

    /// Whole tokens beyond the limit.
    pub fn beyond(&self, state: CounterState) -> u64 {
        with_state!(*self, state, |a, s| a.beyond(s), 0)
    }

    pub fn remaining(&self, state: CounterState, now_ms: u64) -> u64 {
        with_state!(*self, state, |a, s| a.remaining(s, now_ms), 0)
    }

    /// Time until the counter is back to its full budget.
    pub fn reset_in_ms(&self, state: CounterState, now_ms: u64) -> u64 {
        with_state!(*self, state, |a, s| a.reset_in_ms(s, now_ms), 0)
    }

    /// Time until `cost` would be admitted; `None` if it never would.
    pub fn retry_after_ms(&self, state: CounterState, now_ms: u64, cost: u64) -> Option<u64> {
        with_state!(*self, state, |a, s| a.retry_after_ms(s, now_ms, cost), None)
    }

    /// When the stored state may be forgotten: once it is back to its full budget, no state
    /// means the same.
    pub fn expires_at_ms(&self, state: CounterState, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.reset_in_ms(state, now_ms))
    }
}

impl From<WindowState> for CounterState {
    fn from(s: WindowState) -> Self {
        CounterState::Window(s)
    }
}

impl From<BucketState> for CounterState {
    fn from(s: BucketState) -> Self {
        CounterState::Bucket(s)
    }
}

impl From<SlidingState> for CounterState {
    fn from(s: SlidingState) -> Self {
        CounterState::Sliding(s)
    }
}

pub(crate) fn div_floor(a: u64, b: u64) -> u64 {
    a / b.max(1)
}

pub(crate) fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

/// The largest count a counter holds: 2^53 - 1, the largest integer every storage represents
/// exactly (Redis scripts compute in doubles). Charges saturate here; `max_value` may not exceed it.
pub const MAX_COUNT: u64 = (1 << 53) - 1;

/// The admission rule, in one place: may `cost` more be admitted on a counter that has `used`
/// (and, once reservations exist, `reserved`) out of `max`? A sum that overflows is beyond any
/// limit, so no cost a client can send wraps around into an admission.
pub fn admits(used: u64, reserved: u64, cost: u64, max: u64) -> bool {
    used.checked_add(reserved)
        .and_then(|total| total.checked_add(cost))
        .is_some_and(|total| total <= max)
}

/// What one group of counters does with its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Limitador's check-and-update: if every counter admits the cost, charge all of them;
    /// otherwise charge none.
    AllOrNothing,
    /// Read-only: would the cost (at least 1) be admitted now? Nothing is charged.
    CheckOnly,
    /// Usage that already happened: always charged; over when usage after it exceeds the limit.
    Charge,
    /// A charge taken back (Envoy's `is_negative_hits`): usage goes down (never below zero, a
    /// bucket never above its capacity). Never refuses, never creates a counter.
    Refund,
}

impl Policy {
    /// The policy's number in the Redis script's arguments (decide.lua's `ALL_OR_NOTHING`,
    /// `CHECK_ONLY`, `CHARGE`, `REFUND`; a test compares them).
    pub const fn wire(self) -> u8 {
        match self {
            Policy::AllOrNothing => 0,
            Policy::CheckOnly => 1,
            Policy::Charge => 2,
            Policy::Refund => 3,
        }
    }
}

/// A group of counters decided together, by index into the request's counter list.
#[derive(Debug, Clone)]
pub struct Group {
    pub policy: Policy,
    pub cost: u64,
    pub counters: Vec<usize>,
}

/// One counter's answer within a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterOutcome {
    /// This counter alone refuses the call (or, for a charge, is past its limit).
    pub over: bool,
    /// What is left after this call's cost was applied (for a check: what is left now).
    pub remaining: u64,
    /// Milliseconds until the counter's window resets.
    pub reset_in_ms: u64,
    /// Milliseconds until this call's cost would be admitted; `None` if it never would.
    pub retry_after_ms: Option<u64>,
    /// What this call added to the counter (0 when nothing was charged).
    pub charged: u64,
    /// The part of `charged` that went beyond the limit (a charge for usage that already
    /// happened can push a counter past its limit).
    pub overshoot: u64,
}

/// A group's answer: admitted unless some counter refused it, plus one outcome per counter
/// in the order of `Group::counters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    pub admitted: bool,
    pub counters: Vec<CounterOutcome>,
}

/// Decides `groups` in order over `states` (one per counter, `None` when the storage has
/// none). Changed states are written back into `states` and flagged in `dirty`, so a later
/// group that shares a counter sees the earlier group's charge.
pub fn evaluate(
    limits: &[Algorithm],
    states: &mut [Option<CounterState>],
    dirty: &mut [bool],
    groups: &[Group],
    now_ms: u64,
) -> Vec<GroupOutcome> {
    groups
        .iter()
        .map(|group| evaluate_group(limits, states, dirty, group, now_ms))
        .collect()
}

fn evaluate_group(
    limits: &[Algorithm],
    states: &mut [Option<CounterState>],
    dirty: &mut [bool],
    group: &Group,
    now_ms: u64,
) -> GroupOutcome {
    let views: SmallVec<[CounterState; 4]> = group
        .counters
        .iter()
        .map(|&i| limits[i].current(states[i], now_ms))
        .collect();
    if group.policy == Policy::Refund {
        return refund_group(limits, states, dirty, group, views, now_ms);
    }
    let check_cost = match group.policy {
        Policy::CheckOnly => group.cost.max(1),
        _ => group.cost,
    };
    let refusals: SmallVec<[bool; 4]> = group
        .counters
        .iter()
        .zip(&views)
        .map(|(&i, view)| !limits[i].admits(*view, now_ms, check_cost))
        .collect();
    let admitted = !refusals.iter().any(|&r| r);

    let counters = group
        .counters
        .iter()
        .zip(views)
        .zip(refusals)
        .map(|((&i, view), refused)| {
            let limit = &limits[i];
            let charge = match group.policy {
                Policy::AllOrNothing => admitted,
                Policy::CheckOnly | Policy::Refund => false,
                Policy::Charge => true,
            };
            let after = if charge {
                let after = limit.charge(view, group.cost);
                states[i] = Some(after);
                dirty[i] = true;
                after
            } else {
                view
            };
            let (over, retry_after_ms) = match group.policy {
                // The usage happened: over when past the limit; retry when one more fits.
                Policy::Charge => {
                    let over = limit.is_over(after, now_ms);
                    let retry = if over {
                        limit.retry_after_ms(after, now_ms, 1)
                    } else {
                        Some(0)
                    };
                    (over, retry)
                }
                _ => (refused, limit.retry_after_ms(view, now_ms, check_cost)),
            };
            CounterOutcome {
                over,
                remaining: limit.remaining(after, now_ms),
                reset_in_ms: limit.reset_in_ms(after, now_ms),
                retry_after_ms,
                charged: if charge { group.cost.min(MAX_COUNT) } else { 0 },
                overshoot: limit.beyond(after).saturating_sub(limit.beyond(view)),
            }
        })
        .collect();
    GroupOutcome { admitted, counters }
}

/// A refund: each counter that exists gets `group.cost` back; a counter the storage does not
/// hold (or whose state has run out) is left alone, so a refund never creates one.
fn refund_group(
    limits: &[Algorithm],
    states: &mut [Option<CounterState>],
    dirty: &mut [bool],
    group: &Group,
    views: SmallVec<[CounterState; 4]>,
    now_ms: u64,
) -> GroupOutcome {
    let counters = group
        .counters
        .iter()
        .zip(views)
        .map(|(&i, view)| {
            let limit = &limits[i];
            let after = match states[i] {
                Some(_) => limit.refund(view, group.cost),
                None => view,
            };
            if after != view {
                states[i] = Some(after);
                dirty[i] = true;
            }
            CounterOutcome {
                over: false,
                remaining: limit.remaining(after, now_ms),
                reset_in_ms: limit.reset_in_ms(after, now_ms),
                retry_after_ms: Some(0),
                charged: 0,
                overshoot: 0,
            }
        })
        .collect();
    GroupOutcome {
        admitted: true,
        counters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

    fn window(max: u64) -> Algorithm {
        Algorithm::FixedWindow(FixedWindow::new(max, MINUTE))
    }

    fn used(state: Option<CounterState>) -> Option<u64> {
        match state {
            Some(CounterState::Window(w)) => Some(w.used),
            _ => None,
        }
    }

    fn one(policy: Policy, cost: u64) -> Vec<Group> {
        vec![Group {
            policy,
            cost,
            counters: vec![0],
        }]
    }

    #[test]
    fn admission_rule_never_wraps_around() {
        assert!(admits(0, 0, 10, 10));
        assert!(!admits(1, 0, 10, 10));
        assert!(!admits(u64::MAX, 0, u64::MAX, u64::MAX));
        assert!(!admits(u64::MAX - 1, 0, 5, u64::MAX));
        assert!(admits(u64::MAX - 5, 0, 5, u64::MAX));
        assert!(!admits(1, u64::MAX, 1, 10));
    }

    #[test]
    fn all_or_nothing_charges_every_counter_or_none() {
        let limits = [window(5), window(2)];
        let mut states = [None, None];
        let mut dirty = [false, false];
        let groups = vec![Group {
            policy: Policy::AllOrNothing,
            cost: 2,
            counters: vec![0, 1],
        }];
        let first = evaluate(&limits, &mut states, &mut dirty, &groups, 0);
        assert!(first[0].admitted);
        assert_eq!(first[0].counters[0].remaining, 3);
        assert_eq!(first[0].counters[1].remaining, 0);

        let mut dirty = [false, false];
        let second = evaluate(&limits, &mut states, &mut dirty, &groups, 1);
        assert!(!second[0].admitted);
        assert!(!second[0].counters[0].over, "the 5-limit alone would admit");
        assert!(second[0].counters[1].over);
        assert_eq!(dirty, [false, false], "a refused call charges nothing");
        assert_eq!(used(states[0]), Some(2));
    }

    #[test]
    fn check_only_treats_zero_as_one_and_never_writes() {
        let limits = [window(1)];
        let mut states = [None];
        let mut dirty = [false];
        let out = evaluate(
            &limits,
            &mut states,
            &mut dirty,
            &one(Policy::CheckOnly, 0),
            0,
        );
        assert!(out[0].admitted);
        assert_eq!(out[0].counters[0].remaining, 1);
        assert_eq!(out[0].counters[0].reset_in_ms, MINUTE);
        assert_eq!(states[0], None);

        states[0] = Some(CounterState::Window(WindowState {
            used: 1,
            expires_at_ms: MINUTE,
        }));
        let out = evaluate(
            &limits,
            &mut states,
            &mut dirty,
            &one(Policy::CheckOnly, 0),
            10,
        );
        assert!(!out[0].admitted, "nothing left: a pure check is over");
        assert_eq!(out[0].counters[0].retry_after_ms, Some(MINUTE - 10));
        assert_eq!(dirty, [false]);
    }

    #[test]
    fn charge_always_counts_and_is_over_only_past_the_limit() {
        let limits = [window(50)];
        let mut states = [None];
        let mut dirty = [false];
        let out = evaluate(
            &limits,
            &mut states,
            &mut dirty,
            &one(Policy::Charge, 50),
            0,
        );
        assert!(out[0].admitted, "exactly at the limit is not over");
        let out = evaluate(
            &limits,
            &mut states,
            &mut dirty,
            &one(Policy::Charge, 30),
            5,
        );
        assert!(!out[0].admitted);
        assert_eq!(used(states[0]), Some(80), "a charge is never lost");
        assert_eq!(out[0].counters[0].remaining, 0);
        assert_eq!(out[0].counters[0].retry_after_ms, Some(MINUTE - 5));
    }

    #[test]
    fn a_cost_larger_than_the_limit_is_never_admitted() {
        let limits = [window(10)];
        let mut states = [None];
        let mut dirty = [false];
        let out = evaluate(
            &limits,
            &mut states,
            &mut dirty,
            &one(Policy::AllOrNothing, 11),
            0,
        );
        assert!(!out[0].admitted);
        assert_eq!(out[0].counters[0].retry_after_ms, None);
    }

    #[test]
    fn a_refund_gives_back_never_below_zero_and_never_creates_a_counter() {
        let limits = [window(10)];
        let mut states = [None];
        let mut dirty = [false];
        let out = evaluate(&limits, &mut states, &mut dirty, &one(Policy::Refund, 5), 0);
        assert!(out[0].admitted);
        assert_eq!((states[0], dirty[0]), (None, false), "no counter made");

        evaluate(&limits, &mut states, &mut dirty, &one(Policy::Charge, 8), 0);
        let mut dirty = [false];
        let out = evaluate(&limits, &mut states, &mut dirty, &one(Policy::Refund, 5), 1);
        assert_eq!(used(states[0]), Some(3));
        assert_eq!(out[0].counters[0].remaining, 7);
        assert_eq!(out[0].counters[0].charged, 0);
        evaluate(
            &limits,
            &mut states,
            &mut dirty,
            &one(Policy::Refund, 50),
            2,
        );
        assert_eq!(used(states[0]), Some(0), "floored at zero");
    }

    #[test]
    fn later_groups_see_earlier_charges() {
        let limits = [window(10)];
        let mut states = [None];
        let mut dirty = [false];
        let groups = vec![
            Group {
                policy: Policy::Charge,
                cost: 10,
                counters: vec![0],
            },
            Group {
                policy: Policy::CheckOnly,
                cost: 0,
                counters: vec![0],
            },
        ];
        let out = evaluate(&limits, &mut states, &mut dirty, &groups, 0);
        assert!(out[0].admitted);
        assert!(!out[1].admitted);
    }
}
