//! Hot reload of the limits file, without a restart.
//!
//! The file's directory is watched (so in-place writes, `sed -i`, `mv` of a temp file and
//! Kubernetes ConfigMap symlink swaps are all seen), SIGHUP forces a reload, and the file is
//! also polled as a fallback. Events are debounced until the directory is quiet, then the file
//! is read, and only new content is considered. It must validate before it replaces the limits
//! in force; an empty file is taken for a write in progress or an accident and never applied
//! (write `[]` to remove every limit). Counters of limits that did not change are kept: a
//! counter belongs to the limit's identity, not to the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::limiter::Limiter;
use crate::limits::LimitSet;
use crate::limits::{digest, load_bytes};
use crate::metrics;
use crate::status::ServerStatus;

/// How long the directory must be quiet before the file is read.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Fallback poll, for file systems where events are not delivered.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// Watches `path` until `stop` turns true, applying every valid new version to `limiter`.
pub async fn watch_limits(
    path: PathBuf,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let (events, mut event_rx) = mpsc::unbounded_channel::<()>();
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        let _ = events.send(());
    })
    .and_then(|mut watcher| {
        watcher.watch(&directory, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    let _watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(directory = %directory.display(), error = %e,
                "cannot watch the limits directory; relying on polling and SIGHUP");
            None
        }
    };
    let mut hangup = hangup_signal();
    let mut poll = tokio::time::interval(POLL_EVERY);
    let mut reloader = Reloader {
        // The version in force, as main loaded it: a change made since is seen on the first
        // poll (the interval's first tick is immediate), not mistaken for what is in force.
        last_seen: limiter.limits().content_digest(),
        path,
        limiter,
        status,
    };

    loop {
        let forced = tokio::select! {
            _ = stop.changed() => return,
            Some(()) = event_rx.recv() => {
                // Debounce: wait until no event came for DEBOUNCE.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, event_rx.recv()).await {}
                false
            }
            _ = poll.tick() => false,
            Some(()) = hangup.recv() => true,
        };
        reloader.reload(forced);
    }
}

struct Reloader {
    path: PathBuf,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    /// Digest of the content last considered (applied or refused), so one bad version is
    /// reported once, not on every event.
    last_seen: Option<u64>,
}

impl Reloader {
    fn reload(&mut self, forced: bool) {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Mid-swap (a symlink or rename in progress) or removed: keep what we have.
                tracing::debug!(file = %self.path.display(), error = %e, "limits file not readable now");
                return;
            }
        };
        let seen = digest(&bytes);
        if !forced && self.last_seen == Some(seen) {
            return;
        }
        self.last_seen = Some(seen);
        match validate(&self.path, &bytes) {
            Ok(limits) => {
                let count = limits.len();
                self.limiter.replace_limits(limits);
                self.status.config_applied();
                let version = self.status.config_version();
                metrics::limits_reload(true);
                metrics::limits_applied(version, count);
                tracing::info!(file = %self.path.display(), limits = count, version, "limits reloaded");
            }
            Err(reason) => {
                self.status.config_failed();
                metrics::limits_reload(false);
                tracing::error!(file = %self.path.display(), "limits NOT reloaded, the previous ones stay in force: {reason}");
            }
        }
    }
}

fn validate(path: &Path, bytes: &[u8]) -> Result<LimitSet, String> {
    if std::str::from_utf8(bytes).is_ok_and(|text| text.trim().is_empty()) {
        return Err("the file is empty (write `[]` to remove every limit)".to_string());
    }
    load_bytes(path, bytes).map_err(|e| e.to_string())
}

/// SIGHUP as a stream of (); never yields where there are no such signals.
fn hangup_signal() -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}
