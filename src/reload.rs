//! Hot reload of the limits file, without a restart.
//!
//! The file's directory is watched (so in-place writes, `sed -i`, `mv` of a temp file and
//! Kubernetes ConfigMap symlink swaps are all seen), SIGHUP forces a reload, and the file is
//! also polled as a fallback. Events are debounced until the directory is quiet, then the file
//! is read, and only new content is considered.
//!
//! When is new content applied? Content that arrived by a rename (`mv`, `sed -i`, an editor's
//! save, a ConfigMap swap) is complete, and is applied at once. Content written in place may
//! be half-written: it is applied only once it has stayed the same for [`SETTLE`] (a writer
//! that pauses longer than that mid-file should write a temp file and rename it). SIGHUP
//! applies what is there at once. Whatever the path, new content must validate before it
//! replaces the limits in force (limits that do not come from the file, ASM's
//! `RATE_LIMIT_CONFIG` rules, are kept, and the file may not define their namespace); an empty file is taken for a write in progress or an accident
//! and never applied (write `[]` to remove every limit). Counters of limits that did not
//! change are kept (a counter belongs to the limit's identity, not to the file); counters of
//! limits no longer loaded are freed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::limiter::Limiter;
use crate::limits::{FixedLimits, LimitSet, RatelimitSettings, Source, load_source, read_source};
use crate::metrics;
use crate::status::ServerStatus;

/// How long the directory must be quiet before the file is read.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Fallback poll, for file systems where events are not delivered.
const POLL_EVERY: Duration = Duration::from_secs(5);
/// How long content written in place must stay unchanged before it is applied.
pub const SETTLE: Duration = Duration::from_secs(2);

/// What made the reloader look at the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP: apply what is there now.
    Forced,
    /// The new content arrived by a rename: it is complete.
    Renamed,
    /// The file may have been written in place (or a poll): apply once settled.
    Changed,
}

/// Watches `path` until `stop` turns true, applying every valid new version to `limiter`.
pub async fn watch_limits(
    path: PathBuf,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let (events, mut event_rx) = mpsc::unbounded_channel::<Seen>();
    // A limits directory (envoyproxy/ratelimit's layout) is watched itself, recursively: any
    // change in it counts as a write in place.
    let is_directory = path.is_dir();
    let file_name = (!is_directory)
        .then(|| path.file_name().map(|name| name.to_os_string()))
        .flatten();
    let directory = match path.parent() {
        _ if is_directory => path.clone(),
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mode = if is_directory {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events.send(Seen::of(event, file_name.as_deref()));
    })
    .and_then(|mut watcher| {
        watcher.watch(&directory, mode)?;
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
        settling: None,
        path,
        limiter,
        status,
    };

    loop {
        let settled = reloader.settling.map(|(_, since)| since + SETTLE);
        let trigger = tokio::select! {
            _ = stop.changed() => return,
            Some(first) = event_rx.recv() => {
                // Debounce: wait until no event came for DEBOUNCE. A rename counts only if the
                // file was not also written in place.
                let mut seen = first;
                while let Ok(Some(next)) = tokio::time::timeout(DEBOUNCE, event_rx.recv()).await {
                    seen = seen.max(next);
                }
                match seen {
                    Seen::Renamed => Trigger::Renamed,
                    Seen::Other | Seen::Written => Trigger::Changed,
                }
            }
            _ = poll.tick() => Trigger::Changed,
            Some(()) = hangup.recv() => Trigger::Forced,
            _ = sleep_until(settled), if settled.is_some() => Trigger::Changed,
        };
        reloader.reload(trigger).await;
    }
}

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What a directory event says about the limits file; the worst of a debounced batch counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    /// Nothing about its content (a file created, removed or closed, another file written).
    Other,
    /// A rename in the directory: complete content replaced it (`mv`, `sed -i`, a ConfigMap
    /// swap of `..data`).
    Renamed,
    /// The file itself was written in place: its content may be half-written.
    Written,
}

impl Seen {
    fn of(event: notify::Result<notify::Event>, file_name: Option<&std::ffi::OsStr>) -> Self {
        use notify::EventKind;
        use notify::event::ModifyKind;
        let Ok(event) = event else {
            return Seen::Written;
        };
        match event.kind {
            EventKind::Modify(ModifyKind::Name(_)) => Seen::Renamed,
            EventKind::Modify(ModifyKind::Metadata(_)) => Seen::Other,
            EventKind::Modify(_)
                if event.paths.iter().any(|path| path.file_name() == file_name) =>
            {
                Seen::Written
            }
            _ => Seen::Other,
        }
    }
}

struct Reloader {
    path: PathBuf,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    /// Digest of the content last considered (applied or refused), so one bad version is
    /// reported once, not on every event.
    last_seen: Option<u64>,
    /// New content written in place, and since when it has been the same.
    settling: Option<(u64, tokio::time::Instant)>,
}

impl Reloader {
    async fn reload(&mut self, trigger: Trigger) {
        let source = match read_source(&self.path) {
            Ok(source) => source,
            Err(e) => {
                // Mid-swap (a symlink or rename in progress) or removed: keep what we have.
                tracing::debug!(file = %self.path.display(), error = %e, "limits file not readable now");
                return;
            }
        };
        let seen = source.digest();
        if trigger != Trigger::Forced && self.last_seen == Some(seen) {
            self.settling = None;
            return;
        }
        if trigger == Trigger::Changed {
            let now = tokio::time::Instant::now();
            match self.settling {
                Some((digest, since)) if digest == seen && now >= since + SETTLE => {}
                Some((digest, _)) if digest == seen => return,
                _ => {
                    tracing::debug!(file = %self.path.display(), "limits file changed; applying it once it has settled");
                    self.settling = Some((seen, now));
                    return;
                }
            }
        }
        self.settling = None;
        self.last_seen = Some(seen);
        let in_force = self.limiter.limits();
        let fixed = in_force.fixed().cloned();
        let origin = self.path.display().to_string();
        let limits = validate(&source, fixed, in_force.ratelimit_settings());
        let _ = apply(&self.limiter, &self.status, &origin, limits).await;
    }
}

/// Puts a new version of the limits in force, or says why it was refused (the limits in force
/// then stay). Counters of limits no longer loaded are freed before it returns. `origin` (a
/// path, the xDS server) names the version's source in the log.
pub async fn apply(
    limiter: &Arc<Limiter>,
    status: &ServerStatus,
    origin: &str,
    limits: Result<LimitSet, String>,
) -> Result<(), String> {
    match limits {
        Ok(limits) => {
            let count = limits.len();
            limiter.replace_limits(limits);
            // Counters of limits no longer loaded must not hold capacity: freed (off the
            // runtime's threads) before the reload is reported done.
            let freeing = limiter.clone();
            let _ = tokio::task::spawn_blocking(move || freeing.forget_unloaded()).await;
            status.config_applied();
            let version = status.config_version();
            metrics::limits_reload(true);
            metrics::limits_applied(version, count);
            tracing::info!(origin, limits = count, version, "limits reloaded");
            Ok(())
        }
        Err(reason) => {
            status.config_failed();
            metrics::limits_reload(false);
            tracing::error!(
                origin,
                "limits NOT reloaded, the previous ones stay in force: {reason}"
            );
            Err(reason)
        }
    }
}

/// The limits of the new content, with the `fixed` ones in force (ASM's rules) kept, read
/// with the envoyproxy/ratelimit settings in force.
fn validate(
    source: &Source,
    fixed: Option<Arc<FixedLimits>>,
    settings: RatelimitSettings,
) -> Result<LimitSet, String> {
    if source.is_empty() {
        return Err(
            "the file is empty, or the directory has no content (write `[]` to remove every limit)"
                .to_string(),
        );
    }
    let limits = load_source(source, settings).map_err(|e| e.to_string())?;
    limits.with_fixed(&source.path.display().to_string(), fixed)
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
