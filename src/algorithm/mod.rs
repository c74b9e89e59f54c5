//! Rate-limit arithmetic as pure functions of (state, now, cost, limit). Every storage runs the
//! same code: it loads the states one request touches, calls [`evaluate`], and stores the
//! states it marks as changed, all in one atomic step.

pub mod calendar;
pub mod concurrency;
pub mod fixed_window;
pub mod sliding_window;
pub mod token_bucket;

use smallvec::SmallVec;

pub use calendar::{Calendar, Period};
pub use concurrency::{Concurrency, SlotState};
pub use fixed_window::{FixedWindow, WindowState};
pub use sliding_window::{SlidingState, SlidingWindow};
pub use token_bucket::{BucketState, TokenBucket};

/// A limit's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    FixedWindow(FixedWindow),
    TokenBucket(TokenBucket),
    SlidingWindow(SlidingWindow),
    /// In-flight requests: slots, which are holds of one unit (see [`concurrency`]).
    Concurrency(Concurrency),
}

/// A counter's stored state; its kind matches its limit's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterState {
    Window(WindowState),
    Bucket(BucketState),
    Sliding(SlidingState),
    /// Never stored: a view of a concurrency counter's slots ([`Algorithm::with_holds`]).
    Slots(SlotState),
}

/// Runs `$body` with the algorithm and the state of the same kind; `$otherwise` when they
/// differ (which [`Algorithm::current`] never produces).
macro_rules! with_state {
    ($algorithm:expr, $state:expr, |$a:ident, $s:ident| $body:expr, $otherwise:expr) => {
        match ($algorithm, $state) {
            (Algorithm::FixedWindow($a), CounterState::Window($s)) => $body,
            (Algorithm::TokenBucket($a), CounterState::Bucket($s)) => $body,
            (Algorithm::SlidingWindow($a), CounterState::Sliding($s)) => $body,
            (Algorithm::Concurrency($a), CounterState::Slots($s)) => $body,
            _ => $otherwise,
        }
    };
}

impl Algorithm {
    /// The algorithm's number in the Redis script's arguments (decide.lua's `FIXED_WINDOW`,
    /// `TOKEN_BUCKET`, `SLIDING_WINDOW`, `CONCURRENCY`; a test compares them).
    pub const fn wire(&self) -> u8 {
        match self {
            Algorithm::FixedWindow(_) => 0,
            Algorithm::TokenBucket(_) => 1,
            Algorithm::SlidingWindow(_) => 2,
            Algorithm::Concurrency(_) => 3,
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
            Algorithm::Concurrency(a) => CounterState::Slots(a.current(
                stored.and_then(|s| match s {
                    CounterState::Slots(w) => Some(w),
                    _ => None,
                }),
                now_ms,
            )),
        }
    }

    /// The state with what the holds say: a concurrency counter's view of its slots (its
    /// holds); any other state as it is.
    pub fn with_holds(&self, state: CounterState, holds: &Holds) -> CounterState {
        match self {
            Algorithm::Concurrency(a) => {
                CounterState::Slots(a.slots(holds.list.iter().map(|h| h.expires_at_ms)))
            }
            _ => state,
        }
    }

    /// How long a slot lives at most, for concurrency limits.
    pub fn slot_lifetime_ms(&self) -> Option<u64> {
        match self {
            Algorithm::Concurrency(a) => Some(a.lifetime_ms),
            _ => None,
        }
    }

    /// The hold a reservation of `amount` places on a counter of this limit: one slot on a
    /// concurrency counter, whatever the amount; else [`hold_amount`].
    pub fn hold_for(&self, amount: u64, fraction: f64) -> u64 {
        match self {
            Algorithm::Concurrency(_) => 1,
            _ => hold_amount(amount, self.max_tokens(), fraction),
        }
    }

    pub fn admits(&self, state: CounterState, now_ms: u64, cost: u64) -> bool {
        self.admits_holding(state, now_ms, 0, cost)
    }

    /// The admission rule with holds: `usage + held + cost <= max` (a bucket: `tokens - held
    /// >= cost`).
    pub fn admits_holding(&self, state: CounterState, now_ms: u64, held: u64, cost: u64) -> bool {
        with_state!(
            *self,
            state,
            |a, s| a.admits_holding(s, now_ms, held, cost),
            false
        )
    }

    /// The most a counter of this limit holds, in tokens (`max_value`).
    pub fn max_tokens(&self) -> u64 {
        match self {
            Algorithm::FixedWindow(a) => a.max,
            Algorithm::TokenBucket(a) => a.max_tokens(),
            Algorithm::SlidingWindow(a) => a.max,
            Algorithm::Concurrency(a) => a.max,
        }
    }

    /// The end of the window in force, for fixed windows (a hold on one ends with it).
    pub fn window_end_ms(&self, state: CounterState) -> Option<u64> {
        match state {
            CounterState::Window(w) => Some(w.expires_at_ms),
            _ => None,
        }
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

impl From<SlotState> for CounterState {
    fn from(s: SlotState) -> Self {
        CounterState::Slots(s)
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
    /// Kuadrant's Reserve: all or nothing, admitted when every counter admits the cost (at
    /// least 1) on top of its usage and holds; then each counter gets the hold the batch's
    /// [`HoldRequest`] names for it (none for a cost of 0). Nothing is charged.
    Reserve,
    /// Kuadrant's Commit: the counters that hold the batch's reservation id are charged the
    /// cost (usage that happened, never refused) and their holds released; when none holds it
    /// (an empty, unknown, expired or settled id), every counter is charged, as a report. A
    /// cost of 0 charges nothing. The group is "admitted" when a hold was released.
    Commit,
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
            Policy::Reserve => 4,
            Policy::Commit => 5,
        }
    }
}

/// Most holds one counter carries (live ones; expired holds are purged first). At the bound a
/// reservation is refused as "exhausted", not as over the limit.
pub const MAX_HOLDS: usize = 1000;

/// A reservation's hold on one counter: `amount` tokens that count against the limit until
/// `expires_at_ms` (or until a commit releases them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: Box<str>,
    pub amount: u64,
    pub expires_at_ms: u64,
}

/// The holds on one counter, and whether this call changed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    pub list: Vec<Hold>,
    pub changed: bool,
}

impl Holds {
    pub fn new(list: Vec<Hold>) -> Self {
        Self {
            list,
            changed: false,
        }
    }

    /// Tokens held.
    pub fn held(&self) -> u64 {
        self.list
            .iter()
            .fold(0u64, |sum, h| sum.saturating_add(h.amount))
    }

    /// Drops the holds that have expired at `now`: how many, and how many tokens they held.
    pub fn purge(&mut self, now_ms: u64) -> (u64, u64) {
        let (mut count, mut tokens) = (0u64, 0u64);
        self.list.retain(|h| {
            let live = h.expires_at_ms > now_ms;
            if !live {
                count += 1;
                tokens = tokens.saturating_add(h.amount);
            }
            live
        });
        if count > 0 {
            self.changed = true;
        }
        (count, tokens)
    }

    /// Removes the hold of `id`, giving its amount.
    fn take(&mut self, id: &str) -> Option<u64> {
        let at = self
            .list
            .iter()
            .position(|h| !id.is_empty() && *h.id == *id)?;
        self.changed = true;
        Some(self.list.swap_remove(at).amount)
    }

    fn contains(&self, id: &str) -> bool {
        !id.is_empty() && self.list.iter().any(|h| *h.id == *id)
    }

    /// Takes a slot of a concurrency counter for an admission at `now_ms`, ending `lifetime_ms`
    /// later: a hold of one unit, with an id of its own. `false` (nothing taken) when the
    /// counter carries [`MAX_HOLDS`] already.
    fn take_slot(&mut self, now_ms: u64, lifetime_ms: u64) -> bool {
        if self.list.len() >= MAX_HOLDS {
            return false;
        }
        let id = concurrency::slot_id(now_ms, self.list.iter().map(|h| &*h.id));
        self.list.push(Hold {
            id: id.into(),
            amount: 1,
            expires_at_ms: now_ms.saturating_add(lifetime_ms),
        });
        self.changed = true;
        true
    }

    /// Frees the oldest slot an admission took (the one that ends first; a reservation's slot
    /// is its Commit's to free): whether there was one.
    fn free_oldest_slot(&mut self) -> bool {
        let oldest = (self.list.iter().enumerate())
            .filter(|(_, h)| h.id.starts_with(concurrency::SLOT_ID_PREFIX))
            .min_by_key(|(_, h)| h.expires_at_ms)
            .map(|(at, _)| at);
        let Some(at) = oldest else {
            return false;
        };
        self.list.swap_remove(at);
        self.changed = true;
        true
    }

    /// When the last hold expires (0: none).
    pub fn last_expiry_ms(&self) -> u64 {
        self.list.iter().map(|h| h.expires_at_ms).max().unwrap_or(0)
    }
}

/// What a Reserve or Commit asks of the holds of a batch's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldRequest {
    /// The reservation id.
    pub id: String,
    /// Reserve: when the holds expire at the latest (a fixed window's end may come first).
    pub expires_at_ms: u64,
    /// Reserve: the hold to place on each counter of the batch, by index (0: none).
    pub amounts: Vec<u64>,
}

/// The hold a reservation of `amount` places on a counter of a limit of `max` tokens: capped at
/// `max × fraction`, rounded down, and at least 1 when anything is reserved.
pub fn hold_amount(amount: u64, max: u64, fraction: f64) -> u64 {
    if amount == 0 {
        return 0;
    }
    let cap = (max as f64 * fraction.clamp(0.0, 1.0)).floor() as u64;
    amount.min(cap.max(1))
}

/// What a call did to a counter's holds (for the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldChange {
    /// Tokens this call put on hold.
    pub placed: u64,
    /// Tokens of the hold this call's commit released.
    pub released: u64,
    /// Holds found expired and purged (reported once per counter and call), and their tokens.
    pub expired_holds: u64,
    pub expired: u64,
}

/// A group of counters decided together, by index into the request's counter list.
#[derive(Debug, Clone)]
pub struct Group {
    pub policy: Policy,
    pub cost: u64,
    pub counters: Vec<usize>,
    /// Each counter's own cost, by position in `counters`, when a limit weighs the call
    /// (`cost:`); empty when every counter costs `cost`.
    pub costs: Vec<u64>,
}

impl Group {
    /// The cost of the counter at `position` in `counters`.
    pub fn cost_at(&self, position: usize) -> u64 {
        self.costs.get(position).copied().unwrap_or(self.cost)
    }
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
    /// What happened to the counter's holds.
    pub holds: HoldChange,
}

/// A group's answer: admitted unless some counter refused it, plus one outcome per counter
/// in the order of `Group::counters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    pub admitted: bool,
    pub counters: Vec<CounterOutcome>,
    /// A reservation found a counter at [`MAX_HOLDS`]: nothing was held.
    pub holds_full: bool,
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
    let mut holds = vec![Holds::default(); limits.len()];
    evaluate_holding(limits, states, &mut holds, dirty, groups, None, now_ms)
}

/// [`evaluate`] with each counter's holds: expired holds are purged first (each counter
/// reports them in its first outcome), every admission counts the holds, and Reserve and
/// Commit groups place and release them as `request` says. Changed holds are flagged in
/// [`Holds::changed`].
pub fn evaluate_holding(
    limits: &[Algorithm],
    states: &mut [Option<CounterState>],
    holds: &mut [Holds],
    dirty: &mut [bool],
    groups: &[Group],
    request: Option<&HoldRequest>,
    now_ms: u64,
) -> Vec<GroupOutcome> {
    // Expired holds, to report once per counter.
    let mut expired: SmallVec<[Option<(u64, u64)>; 4]> =
        holds.iter_mut().map(|h| Some(h.purge(now_ms))).collect();
    let mut context = Holding {
        holds,
        expired: &mut expired,
        request,
    };
    groups
        .iter()
        .map(|group| evaluate_group(limits, states, dirty, &mut context, group, now_ms))
        .collect()
}

struct Holding<'a> {
    holds: &'a mut [Holds],
    expired: &'a mut [Option<(u64, u64)>],
    request: Option<&'a HoldRequest>,
}

impl Holding<'_> {
    /// The expired holds of counter `i`, the first time it is asked.
    fn expired(&mut self, i: usize) -> (u64, u64) {
        self.expired[i].take().unwrap_or_default()
    }

    fn id(&self) -> &str {
        self.request.map_or("", |r| r.id.as_str())
    }
}

fn evaluate_group(
    limits: &[Algorithm],
    states: &mut [Option<CounterState>],
    dirty: &mut [bool],
    holding: &mut Holding<'_>,
    group: &Group,
    now_ms: u64,
) -> GroupOutcome {
    let views: SmallVec<[CounterState; 4]> = group
        .counters
        .iter()
        .map(|&i| limits[i].with_holds(limits[i].current(states[i], now_ms), &holding.holds[i]))
        .collect();
    if group.policy == Policy::Refund {
        return refund_group(limits, states, dirty, holding, group, views, now_ms);
    }
    let check_cost = |position: usize| match group.policy {
        Policy::CheckOnly | Policy::Reserve => group.cost_at(position).max(1),
        _ => group.cost_at(position),
    };
    let refusals: SmallVec<[bool; 4]> = group
        .counters
        .iter()
        .zip(&views)
        .enumerate()
        .map(|(position, (&i, view))| {
            let held = holding.holds[i].held();
            !limits[i].admits_holding(*view, now_ms, held, check_cost(position))
        })
        .collect();
    let admitted = !refusals.iter().any(|&r| r);
    let id = holding.id().to_string();
    // A Reserve that would hold on a counter at the bound holds nothing.
    let request = holding.request;
    let amount_of = |i: usize| request.map_or(0, |r| r.amounts.get(i).copied().unwrap_or(0));
    let holds_full = group.policy == Policy::Reserve
        && admitted
        && group
            .counters
            .iter()
            .any(|&i| amount_of(i) > 0 && holding.holds[i].list.len() >= MAX_HOLDS);
    // On a concurrency counter, what would charge takes a slot instead (a commit only frees).
    let takes_slot = match group.policy {
        Policy::AllOrNothing => admitted,
        Policy::Charge => true,
        _ => false,
    };
    // A Commit charges the counters that hold its id, or, when none does, every counter.
    let committed = group.policy == Policy::Commit
        && group
            .counters
            .iter()
            .any(|&i| holding.holds[i].contains(&id));

    let counters = group
        .counters
        .iter()
        .zip(views)
        .zip(refusals)
        .enumerate()
        .map(|(position, ((&i, view), refused))| {
            let limit = &limits[i];
            let (cost, check_cost) = (group.cost_at(position), check_cost(position));
            let (expired_holds, expired) = holding.expired(i);
            let mut change = HoldChange {
                expired_holds,
                expired,
                ..HoldChange::default()
            };
            // A concurrency counter has no usage to charge: slots are its holds.
            let slot_lifetime = limit.slot_lifetime_ms();
            let mut charge = match group.policy {
                Policy::AllOrNothing => admitted,
                Policy::CheckOnly | Policy::Refund | Policy::Reserve => false,
                Policy::Charge => true,
                Policy::Commit => {
                    let held = if committed {
                        holding.holds[i].take(&id)
                    } else {
                        None
                    };
                    change.released = held.unwrap_or(0);
                    cost > 0 && (!committed || held.is_some())
                }
            };
            if slot_lifetime.is_some() {
                charge = false;
            }
            if group.policy == Policy::Reserve && admitted && !holds_full {
                let amount = amount_of(i);
                if amount > 0 {
                    let request_end = request.map_or(now_ms, |r| r.expires_at_ms);
                    // A fixed window's hold ends with the window; a slot after its lifetime.
                    let cap = match slot_lifetime {
                        Some(lifetime) => Some(now_ms.saturating_add(lifetime)),
                        None => limit.window_end_ms(view),
                    };
                    let holds = &mut holding.holds[i];
                    // (An id reserved again replaces its hold.)
                    holds.take(&id);
                    holds.list.push(Hold {
                        id: id.as_str().into(),
                        amount,
                        expires_at_ms: request_end.min(cap.unwrap_or(u64::MAX)),
                    });
                    holds.changed = true;
                    change.placed = amount;
                }
            }
            let held = holding.holds[i].held();
            // (What the retry sees: the holds as they are now.)
            let before_charge = limit.with_holds(view, &holding.holds[i]);
            let after = if charge {
                let after = limit.charge(view, cost);
                states[i] = Some(after);
                dirty[i] = true;
                after
            } else {
                if let Some(lifetime) = slot_lifetime
                    && takes_slot
                    && holding.holds[i].take_slot(now_ms, lifetime)
                {
                    change.placed = 1;
                }
                limit.with_holds(view, &holding.holds[i])
            };
            let (over, retry_after_ms) = match group.policy {
                // The usage happened: over when past the limit; retry when one more fits.
                Policy::Charge | Policy::Commit => {
                    // (A charge that found no room for its slot is past the limit too.)
                    let unplaced = takes_slot && slot_lifetime.is_some() && change.placed == 0;
                    let over = limit.is_over(after, now_ms) || unplaced;
                    let retry = if over {
                        limit.retry_after_ms(after, now_ms, 1)
                    } else {
                        Some(0)
                    };
                    (over, retry)
                }
                _ => (
                    refused,
                    retry_holding(limit, before_charge, now_ms, held, check_cost),
                ),
            };
            CounterOutcome {
                over,
                remaining: limit
                    .remaining(after, now_ms)
                    .saturating_sub(holding.holds[i].held()),
                reset_in_ms: limit.reset_in_ms(after, now_ms),
                retry_after_ms,
                charged: if charge { cost.min(MAX_COUNT) } else { 0 },
                overshoot: limit.beyond(after).saturating_sub(limit.beyond(view)),
                holds: change,
            }
        })
        .collect();
    let admitted = match group.policy {
        Policy::Commit => committed,
        Policy::Reserve => admitted && !holds_full,
        _ => admitted,
    };
    GroupOutcome {
        admitted,
        counters,
        holds_full,
    }
}

/// Time until `cost` would be admitted on top of `held`: as if the holds stayed; when cost
/// and holds together never fit, the time until the counter is back to its full budget.
fn retry_holding(
    limit: &Algorithm,
    view: CounterState,
    now_ms: u64,
    held: u64,
    cost: u64,
) -> Option<u64> {
    if held == 0 {
        return limit.retry_after_ms(view, now_ms, cost);
    }
    match limit.retry_after_ms(view, now_ms, cost.saturating_add(held)) {
        Some(wait) => Some(wait),
        None => limit
            .retry_after_ms(view, now_ms, cost)
            .map(|_| limit.reset_in_ms(view, now_ms)),
    }
}

/// A refund: each counter that exists gets its cost ([`Group::cost_at`]) back; a counter the
/// storage does not hold (or whose state has run out) is left alone, so a refund never creates
/// one.
fn refund_group(
    limits: &[Algorithm],
    states: &mut [Option<CounterState>],
    dirty: &mut [bool],
    holding: &mut Holding<'_>,
    group: &Group,
    views: SmallVec<[CounterState; 4]>,
    now_ms: u64,
) -> GroupOutcome {
    let counters = group
        .counters
        .iter()
        .zip(views)
        .enumerate()
        .map(|(position, (&i, view))| {
            let limit = &limits[i];
            let (expired_holds, expired) = holding.expired(i);
            let cost = group.cost_at(position);
            // A concurrency counter: a refund (of anything) frees its oldest admission's slot.
            let mut released = 0;
            let after = if limit.slot_lifetime_ms().is_some() {
                if cost > 0 && holding.holds[i].free_oldest_slot() {
                    released = 1;
                }
                limit.with_holds(view, &holding.holds[i])
            } else {
                match states[i] {
                    Some(_) => limit.refund(view, cost),
                    None => view,
                }
            };
            if after != view && limit.slot_lifetime_ms().is_none() {
                states[i] = Some(after);
                dirty[i] = true;
            }
            CounterOutcome {
                over: false,
                remaining: limit
                    .remaining(after, now_ms)
                    .saturating_sub(holding.holds[i].held()),
                reset_in_ms: limit.reset_in_ms(after, now_ms),
                retry_after_ms: Some(0),
                charged: 0,
                overshoot: 0,
                holds: HoldChange {
                    released,
                    expired_holds,
                    expired,
                    ..HoldChange::default()
                },
            }
        })
        .collect();
    GroupOutcome {
        admitted: true,
        counters,
        holds_full: false,
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
            costs: Vec::new(),
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
            costs: Vec::new(),
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

    fn reserve(id: &str, amount: u64, expires_at_ms: u64) -> HoldRequest {
        HoldRequest {
            id: id.into(),
            expires_at_ms,
            amounts: vec![amount],
        }
    }

    fn run(
        limits: &[Algorithm],
        states: &mut [Option<CounterState>],
        holds: &mut [Holds],
        policy: Policy,
        cost: u64,
        request: Option<&HoldRequest>,
        now: u64,
    ) -> GroupOutcome {
        let mut dirty = vec![false; limits.len()];
        let groups = one(policy, cost);
        evaluate_holding(limits, states, holds, &mut dirty, &groups, request, now).remove(0)
    }

    #[test]
    fn holds_count_in_every_admission_until_committed_or_expired() {
        let limits = [window(100)];
        let mut states = [None];
        let mut holds = [Holds::default()];
        let r = reserve("a", 60, 30_000);
        let out = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Reserve,
            60,
            Some(&r),
            0,
        );
        assert!(out.admitted);
        assert_eq!(out.counters[0].holds.placed, 60);
        assert_eq!(out.counters[0].remaining, 40, "remaining subtracts holds");
        assert_eq!(states[0], None, "a hold charges nothing");
        // 40 fit on top of the hold, 41 do not: in a check, a charge-or-nothing, a reserve.
        for policy in [Policy::CheckOnly, Policy::AllOrNothing, Policy::Reserve] {
            let r = reserve("b", 41, 30_000);
            let out = run(&limits, &mut states, &mut holds, policy, 41, Some(&r), 1);
            assert!(!out.admitted, "{policy:?}");
        }
        assert_eq!(holds[0].list.len(), 1, "a refused reserve holds nothing");
        // The commit charges the real usage and releases the hold.
        let c = reserve("a", 0, 0);
        let out = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Commit,
            25,
            Some(&c),
            2,
        );
        assert!(out.admitted, "released");
        assert_eq!(
            (out.counters[0].holds.released, out.counters[0].charged),
            (60, 25)
        );
        assert_eq!(used(states[0]), Some(25));
        assert!(holds[0].list.is_empty());
        // Committed again: nothing held, so it is a report on the counter.
        let out = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Commit,
            5,
            Some(&c),
            3,
        );
        assert!(!out.admitted);
        assert_eq!(used(states[0]), Some(30));
        // A commit of 0 never charges.
        run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Commit,
            0,
            Some(&c),
            4,
        );
        assert_eq!(used(states[0]), Some(30));
        // A hold expires at its time (a fixed window's end comes first if sooner).
        let r = reserve("x", 70, 50_000);
        assert!(
            run(
                &limits,
                &mut states,
                &mut holds,
                Policy::Reserve,
                70,
                Some(&r),
                5
            )
            .admitted
        );
        assert_eq!(holds[0].list[0].expires_at_ms, 50_000);
        let out = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::CheckOnly,
            70,
            None,
            49_999,
        );
        assert!(!out.admitted);
        let out = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::CheckOnly,
            70,
            None,
            50_000,
        );
        assert!(out.admitted);
        assert_eq!(
            (
                out.counters[0].holds.expired_holds,
                out.counters[0].holds.expired
            ),
            (1, 70)
        );
        let r = reserve("y", 10, 90_000);
        run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Reserve,
            10,
            Some(&r),
            50_000,
        );
        assert_eq!(
            holds[0].list[0].expires_at_ms,
            MINUTE + 2,
            "the window (opened by the commit at 2) ends first"
        );
    }

    #[test]
    fn a_counter_holds_at_most_max_holds() {
        let limits = [window(1_000_000)];
        let mut states = [None];
        let mut holds = [Holds::default()];
        for n in 0..MAX_HOLDS {
            let r = reserve(&format!("r{n}"), 1, 10_000);
            assert!(
                run(
                    &limits,
                    &mut states,
                    &mut holds,
                    Policy::Reserve,
                    1,
                    Some(&r),
                    0
                )
                .admitted
            );
        }
        let r = reserve("one-too-many", 1, 10_000);
        let out = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Reserve,
            1,
            Some(&r),
            0,
        );
        assert!(!out.admitted && out.holds_full);
        assert_eq!(holds[0].list.len(), MAX_HOLDS);
        assert_eq!(hold_amount(500, 100, 0.5), 50);
        assert_eq!(hold_amount(5, 1, 0.5), 1, "at least 1");
        assert_eq!(hold_amount(0, 100, 0.5), 0);
    }

    #[test]
    fn a_concurrency_counter_admits_slots_and_frees_them_oldest_first() {
        let limits = [Algorithm::Concurrency(Concurrency::new(2, 10_000))];
        let mut states = [None];
        let mut holds = [Holds::default()];
        // Two admissions take a slot each, whatever their cost.
        let first = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::AllOrNothing,
            50,
            None,
            0,
        );
        assert!(first.admitted);
        let c = first.counters[0];
        assert_eq!((c.remaining, c.reset_in_ms, c.holds.placed), (1, 10_000, 1));
        let second = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::AllOrNothing,
            1,
            None,
            100,
        );
        assert_eq!(
            (second.counters[0].remaining, second.counters[0].reset_in_ms),
            (0, 9_900)
        );
        // Full: refused, nothing taken; a check (cost 0 too) says so without taking.
        let third = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::AllOrNothing,
            1,
            None,
            200,
        );
        assert!(!third.admitted);
        assert_eq!(third.counters[0].retry_after_ms, Some(9_800));
        assert!(
            !run(
                &limits,
                &mut states,
                &mut holds,
                Policy::CheckOnly,
                0,
                None,
                200
            )
            .admitted
        );
        // A refund frees the oldest admission's slot.
        let refund = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Refund,
            1,
            None,
            300,
        );
        assert_eq!(refund.counters[0].holds.released, 1);
        assert_eq!(
            (refund.counters[0].remaining, refund.counters[0].reset_in_ms),
            (1, 9_800)
        );
        // A charge takes one even past the limit, and is over.
        assert!(
            run(
                &limits,
                &mut states,
                &mut holds,
                Policy::AllOrNothing,
                1,
                None,
                400
            )
            .admitted
        );
        let past = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::Charge,
            1,
            None,
            500,
        );
        assert!(!past.admitted && past.counters[0].over);
        assert_eq!(holds[0].list.len(), 3);
        assert_eq!(states[0], None, "slots are holds, never a stored state");
        // Slots end after their lifetime without any release, oldest first.
        let later = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::CheckOnly,
            1,
            None,
            10_100,
        );
        assert!(
            !later.admitted,
            "the slots taken at 400 and 500 are still live"
        );
        assert_eq!(later.counters[0].holds.expired_holds, 1);
        assert_eq!(later.counters[0].retry_after_ms, Some(300));
        let free = run(
            &limits,
            &mut states,
            &mut holds,
            Policy::CheckOnly,
            1,
            None,
            10_400,
        );
        assert!(free.admitted);
        assert_eq!(
            (free.counters[0].remaining, free.counters[0].reset_in_ms),
            (1, 100)
        );
    }

    #[test]
    fn a_reservation_takes_one_slot_that_its_commit_frees() {
        let limits = [
            Algorithm::Concurrency(Concurrency::new(1, 10_000)),
            window(100),
        ];
        let mut states = [None, None];
        let mut holds = [Holds::default(), Holds::default()];
        fn call(
            limits: &[Algorithm],
            states: &mut [Option<CounterState>],
            holds: &mut [Holds],
            (policy, cost): (Policy, u64),
            request: Option<&HoldRequest>,
            now: u64,
        ) -> GroupOutcome {
            let mut dirty = [false, false];
            let groups = [Group {
                policy,
                cost,
                counters: vec![0, 1],
                costs: vec![],
            }];
            evaluate_holding(limits, states, holds, &mut dirty, &groups, request, now).remove(0)
        }
        // A ttl longer than the slot's lifetime: the lifetime ends it.
        let r = HoldRequest {
            id: "a".into(),
            expires_at_ms: 60_000,
            amounts: vec![1, 30],
        };
        assert!(
            call(
                &limits,
                &mut states,
                &mut holds,
                (Policy::Reserve, 30),
                Some(&r),
                0
            )
            .admitted
        );
        assert_eq!(holds[0].list[0].expires_at_ms, 10_000);
        // The slot is taken: another reservation is refused, and holds nothing anywhere.
        let b = HoldRequest {
            id: "b".into(),
            ..r.clone()
        };
        assert!(
            !call(
                &limits,
                &mut states,
                &mut holds,
                (Policy::Reserve, 30),
                Some(&b),
                1
            )
            .admitted
        );
        assert_eq!((holds[0].list.len(), holds[1].list.len()), (1, 1));
        // The commit frees the slot and charges the window only.
        let done = call(
            &limits,
            &mut states,
            &mut holds,
            (Policy::Commit, 20),
            Some(&r),
            2,
        );
        assert!(done.admitted);
        assert!(holds[0].list.is_empty() && states[0].is_none());
        assert_eq!(used(states[1]), Some(20));
        // A commit of an unknown id is a report: no slot is taken by it.
        call(
            &limits,
            &mut states,
            &mut holds,
            (Policy::Commit, 5),
            Some(&b),
            3,
        );
        assert!(holds[0].list.is_empty());
        // Refused by the window: no slot either (all or nothing).
        assert!(
            !call(
                &limits,
                &mut states,
                &mut holds,
                (Policy::AllOrNothing, 80),
                None,
                4
            )
            .admitted
        );
        assert!(holds[0].list.is_empty());
        assert!(
            call(
                &limits,
                &mut states,
                &mut holds,
                (Policy::AllOrNothing, 75),
                None,
                5
            )
            .admitted
        );
        assert_eq!(holds[0].list.len(), 1);
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
                costs: Vec::new(),
            },
            Group {
                policy: Policy::CheckOnly,
                cost: 0,
                counters: vec![0],
                costs: Vec::new(),
            },
        ];
        let out = evaluate(&limits, &mut states, &mut dirty, &groups, 0);
        assert!(out[0].admitted);
        assert!(!out[1].admitted);
    }
}
