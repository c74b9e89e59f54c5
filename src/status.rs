//! What `/status` reports: when the server started and which limits configuration it runs;
//! and the refusals per limit over the last minutes that `/ui` shows ([`RecentRefusals`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use parking_lot::Mutex;

use crate::storage::LimitId;

pub struct ServerStatus {
    started_at: String,
    config: Mutex<ConfigStatus>,
    /// The storage answered its last health check.
    storage_reachable: AtomicBool,
    /// Why the storage may drop live counters on its own (Redis evicting keys), if it may.
    storage_evicts: Mutex<Option<String>>,
    /// `--refuse-evicting-storage`: not ready while the storage may evict counters.
    refuse_evicting: bool,
    /// Filled by the metrics observer, read by `/ui`.
    refusals: Arc<RecentRefusals>,
}

struct ConfigStatus {
    applied_at: String,
    /// 0 for the limits loaded at start; +1 on every successful reload.
    version: u64,
    /// Failed reloads since the last successful one.
    errors_since_applied: u64,
}

/// Limitador's timestamp (UTC, nanoseconds) with its time zone said: RFC 3339 with `Z`, e.g.
/// `2026-11-22T08:25:43.667042716Z`.
fn timestamp() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true)
}

impl Default for ServerStatus {
    fn default() -> Self {
        let now = timestamp();
        Self {
            started_at: now.clone(),
            config: Mutex::new(ConfigStatus {
                applied_at: now,
                version: 0,
                errors_since_applied: 0,
            }),
            storage_reachable: AtomicBool::new(true),
            storage_evicts: Mutex::new(None),
            refuse_evicting: false,
            refusals: Arc::new(RecentRefusals::default()),
        }
    }
}

impl ServerStatus {
    pub fn config_applied(&self) {
        let mut config = self.config.lock();
        config.applied_at = timestamp();
        config.version += 1;
        config.errors_since_applied = 0;
    }

    pub fn config_failed(&self) {
        self.config.lock().errors_since_applied += 1;
    }

    pub fn set_storage_reachable(&self, reachable: bool) {
        self.storage_reachable.store(reachable, Ordering::Relaxed);
    }

    /// Not ready while the storage may evict counters (`--refuse-evicting-storage`).
    pub fn refusing_evicting_storage(mut self, refuse: bool) -> Self {
        self.refuse_evicting = refuse;
        self
    }

    /// Whether (and why) the storage may drop live counters on its own.
    pub fn set_storage_evicts(&self, reason: Option<String>) {
        *self.storage_evicts.lock() = reason;
    }

    /// Ready to serve: the storage can be reached (and, when asked, does not evict counters).
    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready_because(&self) -> Option<String> {
        if !self.storage_reachable.load(Ordering::Relaxed) {
            return Some("storage unreachable (or read-only)".to_string());
        }
        let evicts = self.storage_evicts.lock();
        match (&*evicts, self.refuse_evicting) {
            (Some(reason), true) => Some(format!(
                "the storage may evict live counters ({reason}); --refuse-evicting-storage is set"
            )),
            _ => None,
        }
    }

    /// The refusals per limit over the last minutes (for the observer to record into).
    pub fn refusals(&self) -> &Arc<RecentRefusals> {
        &self.refusals
    }

    pub fn config_version(&self) -> u64 {
        self.config.lock().version
    }

    pub fn to_json(&self) -> serde_json::Value {
        let config = self.config.lock();
        serde_json::json!({
            "started_at": self.started_at,
            "config_applied_at": config.applied_at,
            "config_version": config.version,
            "config_err_since": config.errors_since_applied,
            "storage_evicts": self.storage_evicts.lock().clone(),
        })
    }
}

/// How many minutes [`RecentRefusals`] remembers.
pub const RECENT_MINUTES: usize = 10;

/// Refused calls per limit, per minute, over the last [`RECENT_MINUTES`] minutes (minutes
/// since the process started). Keyed by the limits' identities, so clients cannot add keys.
pub struct RecentRefusals {
    started: Instant,
    by_limit: Mutex<HashMap<LimitId, Minutes>>,
}

/// One limit's counts: `counts[m % RECENT_MINUTES]` is minute `m`, for the minutes up to
/// `last` that are less than [`RECENT_MINUTES`] old.
#[derive(Clone, Copy)]
struct Minutes {
    last: u64,
    counts: [u64; RECENT_MINUTES],
}

impl Minutes {
    fn at(&self, minute: u64) -> u64 {
        let kept = minute <= self.last && self.last - minute < RECENT_MINUTES as u64;
        if kept {
            self.counts[(minute % RECENT_MINUTES as u64) as usize]
        } else {
            0
        }
    }
}

impl Default for RecentRefusals {
    fn default() -> Self {
        Self::new()
    }
}

impl RecentRefusals {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            by_limit: Mutex::default(),
        }
    }

    fn minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    /// One call refused by `limit`.
    pub fn record(&self, limit: LimitId) {
        self.record_at(limit, self.minute());
    }

    fn record_at(&self, limit: LimitId, now: u64) {
        let mut by_limit = self.by_limit.lock();
        let minutes = by_limit.entry(limit).or_insert(Minutes {
            last: now,
            counts: [0; RECENT_MINUTES],
        });
        if now > minutes.last {
            let stale = (now - minutes.last).min(RECENT_MINUTES as u64);
            for minute in now + 1 - stale..=now {
                minutes.counts[(minute % RECENT_MINUTES as u64) as usize] = 0;
            }
            minutes.last = now;
        }
        let slot = &mut minutes.counts[(now % RECENT_MINUTES as u64) as usize];
        *slot = slot.saturating_add(1);
    }

    /// Per limit, its refusals in each of the last [`RECENT_MINUTES`] minutes, the oldest
    /// first and the current minute last.
    pub fn snapshot(&self) -> HashMap<LimitId, [u64; RECENT_MINUTES]> {
        self.snapshot_at(self.minute())
    }

    fn snapshot_at(&self, now: u64) -> HashMap<LimitId, [u64; RECENT_MINUTES]> {
        let by_limit = self.by_limit.lock();
        by_limit
            .iter()
            .map(|(&limit, minutes)| {
                let mut counts = [0; RECENT_MINUTES];
                for (i, count) in counts.iter_mut().enumerate() {
                    let back = (RECENT_MINUTES - 1 - i) as u64;
                    if let Some(minute) = now.checked_sub(back) {
                        *count = minutes.at(minute);
                    }
                }
                (limit, counts)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_refusals_keep_the_last_minutes_per_limit() {
        let recent = RecentRefusals::new();
        recent.record_at(7, 0);
        recent.record_at(7, 0);
        recent.record_at(7, 3);
        recent.record_at(8, 3);
        let at3 = recent.snapshot_at(3);
        assert_eq!(at3[&7], [0, 0, 0, 0, 0, 0, 2, 0, 0, 1]);
        assert_eq!(at3[&8], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        // Minute 0 falls out after ten minutes; a later record clears the minutes it skipped.
        assert_eq!(recent.snapshot_at(10)[&7], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        recent.record_at(7, 12);
        assert_eq!(recent.snapshot_at(12)[&7], [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(recent.snapshot_at(13)[&7], [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        recent.record_at(7, 40);
        assert_eq!(recent.snapshot_at(40)[&7], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }
}
