//! Real `redis-server` processes for tests, on free loopback ports: owned ones (killed on drop,
//! restartable on the same port) and, per test binary, one shared standalone server and one
//! shared 3-master cluster (a watchdog stops them when the test process exits).

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::child::ChildProcess;

pub use super::free_port;

/// A redis-server this test owns.
pub struct RedisProcess {
    pub port: u16,
    process: Option<ChildProcess>,
    dir: tempfile::TempDir,
    cluster: bool,
}

impl RedisProcess {
    pub fn start() -> Self {
        Self::start_on(free_port(), false)
    }

    /// Starts on a port chosen earlier (e.g. one a server was told about before Redis was up).
    pub fn start_on_port(port: u16) -> Self {
        Self::start_on(port, false)
    }

    fn start_on(port: u16, cluster: bool) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut process = Self {
            port,
            process: None,
            dir,
            cluster,
        };
        process.restart();
        process
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        let process = self.process.insert(ChildProcess::spawn(
            "redis-server",
            command,
            "redis-server must be installed.",
        ));
        let port = self.port;
        wait_until(Duration::from_secs(10), || {
            // An early exit (e.g. the port is taken) fails at once, with redis-server's log.
            process.assert_running();
            cli(port, &["PING"]).is_some_and(|out| out.trim() == "PONG")
        });
    }

    /// Kills the server (dropping the process kills and reaps it).
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT): it then works through what it was sent.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server runs").to_string();
        let sent = Command::new("kill").args([signal, &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid}");
    }

    fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }
}

/// A 3-master cluster made with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<_> = (0..3)
            .map(|_| RedisProcess::start_on(free_port(), true))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(created.success(), "redis-cli --cluster create failed");
        wait_until(Duration::from_secs(20), || {
            nodes.iter().all(|n| {
                cli(n.port, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))
            })
        });
        Self { nodes }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

struct Shared<T>(T);

/// The shared standalone server's URL (started on first use).
pub fn shared_url() -> String {
    static SHARED: OnceLock<Shared<RedisProcess>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let process = RedisProcess::start();
        watch_over(process.pid());
        Shared(process)
    });
    shared.0.url()
}

/// The shared cluster's URL (started on first use).
pub fn shared_cluster_url() -> String {
    static SHARED: OnceLock<Shared<RedisCluster>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let cluster = RedisCluster::start();
        for node in &cluster.nodes {
            watch_over(node.pid());
        }
        Shared(cluster)
    });
    shared.0.url()
}

/// Statics are never dropped: a small watchdog kills `pid` once this test process is gone.
fn watch_over(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    let me = std::process::id();
    let script =
        format!("while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill {pid} 2>/dev/null");
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Runs redis-cli against a local port; its output, if it ran.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "not ready within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
