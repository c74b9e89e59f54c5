//! The mock OpenAI-compatible upstream, examples/mock_llm.py, as a child process on a loopback
//! port it picks itself.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use super::child::ChildProcess;
use super::process::{loopback, manifest_dir};
use super::{get_json, http_client};

/// How long the mock gets to start listening.
const STARTUP: Duration = Duration::from_secs(30);

pub struct MockLlm {
    process: ChildProcess,
    pub addr: SocketAddr,
}

impl MockLlm {
    pub async fn start() -> MockLlm {
        let mut command = Command::new("python3");
        command
            .current_dir(manifest_dir())
            .args(["examples/mock_llm.py", "0"]);
        let mut process = ChildProcess::spawn("mock_llm.py", command, "python3 must be on PATH.");
        // It prints `mock_llm listening on 127.0.0.1:<port>` once it listens.
        let port = process
            .wait_for("listen", STARTUP, async |log| {
                log.lines()
                    .find_map(|l| l.strip_prefix("mock_llm listening on 127.0.0.1:"))
                    .map(|port| port.trim().parse::<u16>().unwrap())
            })
            .await;
        MockLlm {
            process,
            addr: loopback(port),
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// How many requests reached the upstream.
    pub async fn requests(&self) -> u64 {
        let stats = get_json(&http_client(), &format!("http://{}/stats", self.addr)).await;
        stats["requests"].as_u64().unwrap()
    }
}
