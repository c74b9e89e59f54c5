//! Sliding windows, as a weighted two-window counter: the estimate of usage over the last
//! period is the current window's count plus the previous window's, weighted by how much of
//! the previous window the sliding period still covers. It stops the burst a fixed window
//! allows across its boundary. Windows are laid on a grid that starts at the first charge.
//!
//! Exact integer arithmetic: everything is compared in units of token·ms (count × period).

use super::{MAX_COUNT, admits, div_floor};

/// The current window's start and count, and the previous window's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingState {
    pub start_ms: u64,
    pub current: u64,
    pub previous: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindow {
    pub max: u64,
    pub period_ms: u64,
}

impl SlidingWindow {
    pub fn new(max: u64, period_ms: u64) -> Self {
        Self {
            max,
            period_ms: period_ms.max(1),
        }
    }

    /// The windows at `now`. Once nothing counts any more, the state is the same as a new
    /// one (the grid starts over at the next charge), whether or not a storage has forgotten
    /// it yet.
    pub fn current(&self, stored: Option<SlidingState>, now_ms: u64) -> SlidingState {
        let empty = SlidingState {
            start_ms: now_ms,
            current: 0,
            previous: 0,
        };
        let Some(state) = stored else {
            return empty;
        };
        let windows = now_ms.saturating_sub(state.start_ms) / self.period_ms;
        let moved = match windows {
            0 => state,
            1 => SlidingState {
                start_ms: state.start_ms + self.period_ms,
                current: 0,
                previous: state.current,
            },
            _ => empty,
        };
        if moved.current == 0 && moved.previous == 0 {
            empty
        } else {
            moved
        }
    }

    /// The estimate, in token·ms.
    fn used(&self, state: SlidingState, now_ms: u64) -> u128 {
        let elapsed = now_ms.saturating_sub(state.start_ms).min(self.period_ms);
        u128::from(state.previous) * u128::from(self.period_ms - elapsed)
            + u128::from(state.current) * u128::from(self.period_ms)
    }

    fn limit(&self) -> u128 {
        u128::from(self.max) * u128::from(self.period_ms)
    }

    pub fn admits(&self, state: SlidingState, now_ms: u64, cost: u64) -> bool {
        self.admits_holding(state, now_ms, 0, cost)
    }

    /// Admission with `held` tokens on hold (reservations).
    pub fn admits_holding(&self, state: SlidingState, now_ms: u64, held: u64, cost: u64) -> bool {
        let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        let period = u128::from(self.period_ms);
        admits(
            clamp(self.used(state, now_ms)),
            clamp(u128::from(held) * period),
            clamp(u128::from(cost) * period),
            clamp(self.limit()),
        )
    }

    pub fn charge(&self, state: SlidingState, cost: u64) -> SlidingState {
        SlidingState {
            current: state.current.saturating_add(cost).min(MAX_COUNT),
            ..state
        }
    }

    /// Returns `amount` previously charged: the current window's count goes down, never below
    /// zero (what the previous window counted is history).
    pub fn refund(&self, state: SlidingState, amount: u64) -> SlidingState {
        SlidingState {
            current: state.current.saturating_sub(amount),
            ..state
        }
    }

    pub fn is_over(&self, state: SlidingState, now_ms: u64) -> bool {
        self.used(state, now_ms) > self.limit()
    }

    /// What the current window holds beyond the limit.
    pub fn beyond(&self, state: SlidingState) -> u64 {
        state.current.saturating_sub(self.max)
    }

    pub fn remaining(&self, state: SlidingState, now_ms: u64) -> u64 {
        let left = self.limit().saturating_sub(self.used(state, now_ms));
        u64::try_from(left / u128::from(self.period_ms)).unwrap_or(u64::MAX)
    }

    /// Time until nothing counts any more.
    pub fn reset_in_ms(&self, state: SlidingState, now_ms: u64) -> u64 {
        let until = if state.current > 0 {
            state.start_ms + 2 * self.period_ms
        } else if state.previous > 0 {
            state.start_ms + self.period_ms
        } else {
            now_ms
        };
        until.saturating_sub(now_ms)
    }

    /// The first moment `cost` fits: later in this window as the previous one's weight fades,
    /// or in the next window as this one's does.
    pub fn retry_after_ms(&self, state: SlidingState, now_ms: u64, cost: u64) -> Option<u64> {
        if cost > self.max {
            return None;
        }
        let p = self.period_ms;
        let elapsed = now_ms.saturating_sub(state.start_ms).min(p);
        // Elapsed time (in a window whose earlier window holds `weighted` and which itself holds
        // `held`) from which `cost` fits: previous × (p − e) ≤ (max − cost − held) × p.
        let fits_from = |weighted: u64, held: u64| -> Option<u64> {
            let room = self.max.checked_sub(cost)?.checked_sub(held)?;
            if weighted == 0 {
                return Some(0);
            }
            let allowed = div_floor(room.saturating_mul(p), weighted);
            Some(p.saturating_sub(allowed))
        };
        if let Some(from) = fits_from(state.previous, state.current)
            && from < p
        {
            return Some(from.saturating_sub(elapsed));
        }
        let next = fits_from(state.current, 0)?;
        Some((p - elapsed) + next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_window_fades_linearly() {
        let w = SlidingWindow::new(100, 60_000);
        let s = w.charge(w.current(None, 0), 100);
        assert!(!w.admits(s, 59_999, 1));
        // At 60 s the old window still counts fully; at 90 s half of it does.
        let at_60 = w.current(Some(s), 60_000);
        assert_eq!(w.remaining(at_60, 60_000), 0);
        let at_90 = w.current(Some(s), 90_000);
        assert_eq!(w.remaining(at_90, 90_000), 50);
        assert!(w.admits(at_90, 90_000, 50));
        assert!(!w.admits(at_90, 90_000, 51));
        assert_eq!(w.remaining(w.current(Some(s), 120_000), 120_000), 100);
    }

    #[test]
    fn retry_after_is_the_first_moment_the_cost_fits() {
        let w = SlidingWindow::new(100, 60_000);
        let s = w.charge(w.current(None, 0), 100);
        // 100 used at 0: 40 fit once 40% of the old window has slid out, at 60 + 24 s.
        assert_eq!(w.retry_after_ms(s, 10_000, 40), Some(74_000));
        let at_84 = w.current(Some(s), 84_000);
        assert!(w.admits(at_84, 84_000, 40));
        assert!(!w.admits(w.current(Some(s), 83_999), 83_999, 40));
        assert_eq!(w.retry_after_ms(s, 0, 101), None);
        // In the second window with something of its own.
        let s2 = w.charge(at_84, 40);
        let wait = w.retry_after_ms(s2, 84_000, 30).unwrap();
        let t = 84_000 + wait;
        assert!(w.admits(w.current(Some(s2), t), t, 30), "fits at {t}");
        assert!(
            !w.admits(w.current(Some(s2), t - 1), t - 1, 30),
            "not before {t}"
        );
    }

    #[test]
    fn long_idle_forgets_everything() {
        let w = SlidingWindow::new(10, 1_000);
        let s = w.charge(w.current(None, 0), 10);
        let later = w.current(Some(s), 5_500);
        assert_eq!(later.start_ms, 5_500, "a new grid from the next charge");
        assert_eq!((later.current, later.previous), (0, 0));
        assert_eq!(w.reset_in_ms(s, 500), 1_500);
    }
}
