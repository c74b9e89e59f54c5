//! Fixed windows, Limitador's algorithm: a window opens at the first charge and lasts the
//! limit's period; at its end the counter starts again from zero. A calendar window
//! (`calendar:`) ends instead at the end of the calendar period it opened in, and an aligned
//! window (envoyproxy/ratelimit's) is the multiple of the period since the Unix epoch that
//! holds the first charge: a per-minute window resets at the top of the minute.

use super::calendar::Calendar;
use super::{MAX_COUNT, admits};

/// A stored window: what has been used, and when the window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    pub used: u64,
    pub expires_at_ms: u64,
}

/// A limit of `max` per `period_ms`, or per calendar period when `calendar` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedWindow {
    pub max: u64,
    pub period_ms: u64,
    pub calendar: Option<Calendar>,
    /// Windows are aligned to the clock (multiples of the period since the epoch).
    pub aligned: bool,
}

impl FixedWindow {
    pub fn new(max: u64, period_ms: u64) -> Self {
        Self {
            max,
            period_ms,
            calendar: None,
            aligned: false,
        }
    }

    /// `max` per calendar period (`period_ms` is its nominal length, for display only).
    pub fn calendar(max: u64, calendar: Calendar) -> Self {
        Self {
            calendar: Some(calendar),
            ..Self::new(max, calendar.period.nominal_seconds() * 1000)
        }
    }

    /// A window aligned to the clock, as envoyproxy/ratelimit's.
    pub fn aligned(max: u64, period_ms: u64) -> Self {
        Self {
            aligned: true,
            ..Self::new(max, period_ms)
        }
    }

    /// How long a window opened at `now` lasts: the period, the rest of the calendar period
    /// in force, or the rest of the aligned period (what the Redis script is given as the
    /// window's length).
    pub fn length_from_ms(&self, now_ms: u64) -> u64 {
        match self.calendar {
            Some(calendar) => calendar.period_end_ms(now_ms).saturating_sub(now_ms),
            None if self.aligned => {
                let period = self.period_ms.max(1);
                period - now_ms % period
            }
            None => self.period_ms,
        }
    }

    /// The window in force at `now`: a missing or expired window reads as a fresh, empty one
    /// that starts now (it is only stored once something is charged to it).
    pub fn current(&self, stored: Option<WindowState>, now_ms: u64) -> WindowState {
        match stored {
            Some(window) if window.expires_at_ms > now_ms => window,
            _ => WindowState {
                used: 0,
                expires_at_ms: now_ms.saturating_add(self.length_from_ms(now_ms)),
            },
        }
    }

    pub fn admits(&self, window: WindowState, now_ms: u64, cost: u64) -> bool {
        self.admits_holding(window, now_ms, 0, cost)
    }

    /// Admission with `held` tokens on hold (reservations).
    pub fn admits_holding(&self, window: WindowState, _now_ms: u64, held: u64, cost: u64) -> bool {
        admits(window.used, held, cost, self.max)
    }

    pub fn charge(&self, window: WindowState, cost: u64) -> WindowState {
        WindowState {
            used: window.used.saturating_add(cost).min(MAX_COUNT),
            ..window
        }
    }

    /// Returns `amount` previously charged: usage goes down, never below zero.
    pub fn refund(&self, window: WindowState, amount: u64) -> WindowState {
        WindowState {
            used: window.used.saturating_sub(amount),
            ..window
        }
    }

    pub fn is_over(&self, window: WindowState, _now_ms: u64) -> bool {
        window.used > self.max
    }

    pub fn beyond(&self, window: WindowState) -> u64 {
        window.used.saturating_sub(self.max)
    }

    pub fn remaining(&self, window: WindowState, _now_ms: u64) -> u64 {
        self.max.saturating_sub(window.used)
    }

    pub fn reset_in_ms(&self, window: WindowState, now_ms: u64) -> u64 {
        window.expires_at_ms.saturating_sub(now_ms)
    }

    /// Milliseconds until `cost` would be admitted: 0 if it is now, the rest of the window if
    /// it fits in a fresh one, `None` if it never fits.
    pub fn retry_after_ms(&self, window: WindowState, now_ms: u64, cost: u64) -> Option<u64> {
        if self.admits(window, now_ms, cost) {
            Some(0)
        } else if cost <= self.max {
            Some(self.reset_in_ms(window, now_ms))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_at_first_charge_and_resets_after_its_period() {
        let limit = FixedWindow::new(3, 1_000);
        let t0 = 5_000;
        let w = limit.charge(limit.current(None, t0), 2);
        assert_eq!(w.expires_at_ms, 6_000);
        assert_eq!(limit.remaining(w, t0), 1);

        let later = limit.current(Some(w), 5_999);
        assert_eq!(later.used, 2, "still the same window 1 ms before its end");
        assert_eq!(limit.reset_in_ms(later, 5_999), 1);

        let next = limit.current(Some(w), 6_000);
        assert_eq!(next.used, 0, "the window ends at exactly its period");
        assert_eq!(next.expires_at_ms, 7_000);
    }

    #[test]
    fn an_aligned_window_ends_at_the_next_multiple_of_its_period() {
        let limit = FixedWindow::aligned(3, 60_000);
        let w = limit.charge(limit.current(None, 125_000), 1);
        assert_eq!(w.expires_at_ms, 180_000, "the top of the next minute");
        assert_eq!(limit.reset_in_ms(w, 125_000), 55_000);
        assert_eq!(limit.current(Some(w), 179_999).used, 1);
        let next = limit.current(Some(w), 180_000);
        assert_eq!((next.used, next.expires_at_ms), (0, 240_000));
    }

    #[test]
    fn retry_after_is_the_rest_of_the_window() {
        let limit = FixedWindow::new(3, 1_000);
        let w = limit.charge(limit.current(None, 0), 3);
        assert_eq!(limit.retry_after_ms(w, 250, 1), Some(750));
        assert_eq!(limit.retry_after_ms(w, 250, 4), None);
        assert_eq!(limit.retry_after_ms(limit.current(None, 0), 0, 3), Some(0));
    }

    #[test]
    fn a_calendar_window_ends_at_its_period_end_and_the_next_one_opens_there() {
        use crate::algorithm::calendar::{Period, zone};
        let month = Calendar::new(Period::Month, zone("UTC").unwrap());
        let limit = FixedWindow::calendar(100, month);
        let jan_31 = 1_769_817_600_000; // 2026-01-31T00:00:00Z
        let feb_1 = jan_31 + 86_400_000;
        let w = limit.charge(limit.current(None, jan_31 + 5), 60);
        assert_eq!(w.expires_at_ms, feb_1);
        assert_eq!(limit.reset_in_ms(w, feb_1 - 1), 1, "exact to the boundary");
        assert_eq!(limit.current(Some(w), feb_1 - 1).used, 60);
        let next = limit.current(Some(w), feb_1);
        assert_eq!(next.used, 0, "a new month");
        assert_eq!(next.expires_at_ms, feb_1 + 28 * 86_400_000, "February 2026");
        assert_eq!(limit.length_from_ms(jan_31), 86_400_000);
    }
}
