//! What `/status` reports: when the server started and which limits configuration it runs.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{SecondsFormat, Utc};
use parking_lot::Mutex;

pub struct ServerStatus {
    started_at: String,
    config: Mutex<ConfigStatus>,
    /// The storage answered its last health check.
    storage_reachable: AtomicBool,
    /// Why the storage may drop live counters on its own (Redis evicting keys), if it may.
    storage_evicts: Mutex<Option<String>>,
    /// `--refuse-evicting-storage`: not ready while the storage may evict counters.
    refuse_evicting: bool,
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
