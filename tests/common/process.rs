//! The real `ratekeeper` binary as a child process: started with an empty environment on
//! free loopback ports, waited for until it listens, and killed when dropped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

use super::child::ChildProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_ratekeeper");
/// How long a server gets to start listening, or to exit after SIGTERM.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary, run from the crate's directory with an empty environment: it sees only what a
/// test sets (every option has an environment variable).
pub fn command() -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(manifest_dir()).env_clear();
    command
}

/// Two distinct free loopback ports.
pub fn free_ports() -> (u16, u16) {
    (super::free_port(), super::free_port())
}

/// A running server process (killed when dropped; its log is shown when something goes wrong).
pub struct Server {
    process: ChildProcess,
    pub rls: SocketAddr,
    pub http: SocketAddr,
}

impl Server {
    /// Spawns `command` that should listen on `rls` (gRPC) and `http`, and waits until both
    /// answer.
    pub async fn spawn(command: Command, rls: SocketAddr, http: SocketAddr) -> Server {
        let mut server = Server {
            process: ChildProcess::spawn("ratekeeper", command, ""),
            rls,
            http,
        };
        server.wait_until_ready().await;
        server
    }

    /// The binary on free loopback ports (`-b`/`-p`/`-B`/`-P` set), with `args` after them.
    pub async fn start_on_loopback(args: &[&str]) -> Server {
        let (rls_port, http_port) = free_ports();
        let mut command = command();
        command
            .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
            .args(["-B", "127.0.0.1", "-P", &http_port.to_string()])
            .args(args);
        Server::spawn(command, loopback(rls_port), loopback(http_port)).await
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The log once `ready` holds for it, or after 5 s: the server writes its log
    /// asynchronously, so a line may land a moment after the call that caused it.
    pub async fn log_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if ready(&log) || std::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    async fn wait_until_ready(&mut self) {
        let client = reqwest::Client::new();
        let url = format!("http://{}/status", self.http);
        let rls = self.rls;
        let what = format!("listen on {} and {rls}", self.http);
        self.process
            .wait_for(&what, PATIENCE, async |_log| {
                let http_up = matches!(
                    client.get(&url).timeout(Duration::from_secs(1)).send().await,
                    Ok(response) if response.status().is_success()
                );
                (http_up && std::net::TcpStream::connect(rls).is_ok()).then_some(())
            })
            .await
    }

    pub async fn grpc(&self) -> RateLimitServiceClient<Channel> {
        let channel = super::grpc_channel(self.rls).await.unwrap_or_else(|e| {
            panic!("cannot connect to {}: {e}; log:\n{}", self.rls, self.log())
        });
        RateLimitServiceClient::new(channel)
    }

    /// One ShouldRateLimit call on a new connection: the answer, or the call's error.
    pub async fn try_should(
        &self,
        request: impl tonic::IntoRequest<RateLimitRequest>,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let response = self.grpc().await.should_rate_limit(request).await?;
        Ok(response.into_inner())
    }

    pub async fn should(&self, request: RateLimitRequest) -> RateLimitResponse {
        self.try_should(request)
            .await
            .unwrap_or_else(|e| panic!("ShouldRateLimit failed: {e}; log:\n{}", self.log()))
    }

    pub async fn status(&self) -> serde_json::Value {
        let url = format!("http://{}/status", self.http);
        super::get_json(&reqwest::Client::new(), &url).await
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.terminate(PATIENCE).await
    }
}

/// A Limitador-path call on `llm_tokens` (limits/llm-tiers.yaml): user `user`, cost `hits`.
pub fn llm_tokens(user: &str, hits: u32) -> RateLimitRequest {
    super::request(
        "llm_tokens",
        vec![super::descriptor(&[("generic_key", "llm"), ("user", user)])],
        hits,
    )
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
