//! Hardening of the listeners, seen from outside the real binary: connection limits and
//! timeouts (idle, slow and silent peers), accept errors that pause instead of spinning, a
//! prompt exit on SIGTERM, malformed protobuf answered INVALID_ARGUMENT and counted, the HTTP
//! API's optional bearer token, and logging that never blocks a decision.
//!
//! New settings are given through their environment variables, so each test also runs
//! (and fails for the right reason) against a build that does not know them yet.

mod common;

const LIMITS: &str = "limits/llm-tiers.yaml";

/// Item 5: the log writer.
mod logging {
    use std::net::{SocketAddr, TcpStream};
    use std::process::{Child, Stdio};
    use std::time::{Duration, Instant};

    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use tonic::transport::Channel;

    use super::LIMITS;
    use super::common::process::*;

    /// A server whose stderr is a pipe nobody reads: once the pipe is full, a synchronous log
    /// writer blocks whatever logs.
    struct Unread {
        child: Child,
        rls: SocketAddr,
        http: SocketAddr,
    }

    impl Drop for Unread {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn a_stalled_log_reader_never_blocks_decisions() {
        let (rls_port, http_port) = free_ports();
        let child = command()
            .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
            .args(["-B", "127.0.0.1", "-P", &http_port.to_string()])
            .arg(LIMITS)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let server = Unread {
            child,
            rls: loopback(rls_port),
            http: loopback(http_port),
        };
        let started = Instant::now();
        while TcpStream::connect(server.http).is_err() || TcpStream::connect(server.rls).is_err() {
            assert!(started.elapsed() < PATIENCE, "not listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Debug logging writes several lines per call: 64 KiB of pipe fill up within a few
        // hundred calls.
        let channel = Channel::from_shared(format!("http://{}", server.rls))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = RateLimitServiceClient::new(channel);
        for i in 0..1000 {
            let call = client.should_rate_limit(llm_tokens(&format!("user{}", i % 10), 1));
            let answered = tokio::time::timeout(Duration::from_secs(2), call).await;
            assert!(
                matches!(answered, Ok(Ok(_))),
                "call {i} was not answered within 2 s: {answered:?}"
            );
        }
        let _ = server.http;
    }
}
