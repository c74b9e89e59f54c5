//! Log lines that a client can cause on every call (a refused call, a CEL expression that
//! fails on a client's value, a storage error while Redis is down) are throttled: at most one
//! line per interval, saying how many were left out. The metrics are the record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a throttled line may be written.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one event through per interval and counts the others.
pub struct Throttle {
    every: Duration,
    started: Instant,
    /// Milliseconds since `started` from which the next line may be written.
    next_ms: AtomicU64,
    /// Events left out since the last line written.
    skipped: AtomicU64,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            started: Instant::now(),
            next_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were left out since the
    /// last line; `None` when it is left out.
    pub fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if now < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(every),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert_eq!(throttle.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit(), None);
        }
        let open = Throttle::new(Duration::ZERO);
        assert_eq!(open.admit(), Some(0));
        assert_eq!(open.admit(), Some(0));
    }
}
