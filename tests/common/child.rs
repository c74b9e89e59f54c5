//! The one wrapper for every child process the tests start (ratekeeper, redis-server, Envoy,
//! the mock LLM upstream): stdout and stderr go to a log file that failure messages show, and
//! the process is killed (and reaped) when the wrapper is dropped, so a failing test leaves no
//! process behind. The log file has no name (it is gone with its last handle), so even the
//! shared servers that live as long as the test binary leave no file behind.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct ChildProcess {
    name: String,
    child: Child,
    log: File,
}

impl ChildProcess {
    /// Spawns `command` with no stdin and its stdout and stderr in a new log file; panics,
    /// with `hint`, when it cannot be started.
    pub fn spawn(name: &str, mut command: Command, hint: &str) -> ChildProcess {
        let shown = format!("{command:?}");
        let spawned = tempfile::tempfile().and_then(|log| {
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log.try_clone()?))
                .spawn()?;
            Ok((child, log))
        });
        let (child, log) =
            spawned.unwrap_or_else(|e| panic!("cannot start {name} ({shown}): {e}. {hint}"));
        ChildProcess {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Everything the process wrote so far. Read at offsets (`read_at`), never by seeking: the
    /// process writes through the same open file, at its offset.
    pub fn log(&self) -> String {
        let mut bytes = Vec::new();
        let mut buffer = [0; 8192];
        while let Ok(n @ 1..) = self.log.read_at(&mut buffer, bytes.len() as u64) {
            bytes.extend_from_slice(&buffer[..n]);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// Polls `ready` (given the log so far) until it gives a value, while the process runs,
    /// for at most `patience`; panics (with the log) if the process exits or the time runs
    /// out. `what` completes "<name> did not ... within".
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        patience: Duration,
        mut ready: impl AsyncFnMut(String) -> Option<T>,
    ) -> T {
        self.poll(what, patience, async |process| {
            process.assert_running();
            ready(process.log()).await
        })
        .await
    }

    /// Sends SIGTERM and waits (bounded by `patience`) for the process to exit. Async, so that
    /// clients on this runtime keep answering a graceful-shutdown handshake meanwhile.
    pub async fn terminate(&mut self, patience: Duration) -> ExitStatus {
        let pid = self.pid().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success(), "kill -TERM {pid} failed: {kill}");
        self.poll("exit after SIGTERM", patience, async |process| {
            process.exited()
        })
        .await
    }

    /// Polls `ready` every 20 ms until it gives a value, for at most `patience`.
    async fn poll<T>(
        &mut self,
        what: &str,
        patience: Duration,
        mut ready: impl AsyncFnMut(&mut ChildProcess) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(value) = ready(self).await {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not {what} within {patience:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
