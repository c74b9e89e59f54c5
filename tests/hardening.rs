//! Hardening of the listeners, seen from outside the real binary: connection limits and
//! timeouts (idle, slow and silent peers), accept errors that pause instead of spinning, a
//! prompt exit on SIGTERM, malformed protobuf answered INVALID_ARGUMENT and counted, the HTTP
//! API's optional bearer token, and logging that never blocks a decision.
//!
//! New settings are given through their environment variables, so each test also runs
//! (and fails for the right reason) against a build that does not know them yet.

mod common;

const LIMITS: &str = "limits/llm-tiers.yaml";

use common::process::*;

/// The binary on free loopback ports with `env` set (and `args`), optionally under a limit
/// of `fd_limit` open files (`ulimit -n`).
async fn start(env: &[(&str, &str)], fd_limit: Option<u32>, args: &[&str]) -> Server {
    let (rls_port, http_port) = free_ports();
    let mut command = match fd_limit {
        None => command(),
        Some(limit) => {
            let mut command = std::process::Command::new("/bin/sh");
            command
                .current_dir(manifest_dir())
                .env_clear()
                .arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(BIN);
            command
        }
    };
    command
        .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
        .args(["-B", "127.0.0.1", "-P", &http_port.to_string()])
        .args(args)
        .arg(LIMITS)
        .envs(env.iter().copied());
    Server::spawn(command, loopback(rls_port), loopback(http_port)).await
}

/// Items 3 and 4: connection limits and timeouts, accept errors, shutdown.
mod connections {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use tonic::transport::Channel;

    use super::common::code;
    use super::common::process::*;
    use super::start;

    /// The HTTP/2 connection preface and an empty SETTINGS frame.
    const H2_PREFACE_AND_SETTINGS: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

    /// One ShouldRateLimit on a new connection, every step bounded by `patience`.
    async fn try_should(rls: SocketAddr, patience: Duration) -> Result<RateLimitResponse, String> {
        let call = async {
            let channel = Channel::from_shared(format!("http://{rls}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(patience)
                .timeout(patience)
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            RateLimitServiceClient::new(channel)
                .should_rate_limit(llm_tokens("carol", 1))
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(patience, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {patience:?}")))
    }

    /// CPU time (user + system) the process has used, in clock ticks (1/100 s on Linux).
    fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which may hold spaces): state is the first, then
        // utime and stime are the 12th and 13th.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// The share of one core the process used over `window`.
    async fn cpu_share(pid: u32, window: Duration) -> f64 {
        let before = cpu_ticks(pid);
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let ticks = cpu_ticks(pid) - before;
        ticks as f64 / 100.0 / started.elapsed().as_secs_f64()
    }

    /// Reads (and discards) what the server sends until it closes the connection: how long that
    /// took, or `None` when it was still open after `limit`.
    fn closed_within(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buffer = [0u8; 4096];
        loop {
            let left = limit.checked_sub(started.elapsed())?;
            stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match stream.read(&mut buffer) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None;
                }
                Err(_) => return Some(started.elapsed()),
            }
        }
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap()
    }

    // Item 3: idle connections and file descriptors.

    /// An attacker holds more idle connections to the HTTP port than the process has file
    /// descriptors for; gRPC decisions are still served, and the server does not spin.
    #[tokio::test]
    async fn idle_http_connections_cannot_starve_grpc_decisions() {
        let server = start(&[("HTTP_API_MAX_CONNECTIONS", "32")], Some(128), &[]).await;
        let idle: Vec<TcpStream> = (0..150).map(|_| connect(server.http)).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;

        let started = Instant::now();
        let response = try_should(server.rls, Duration::from_secs(3)).await;
        let response = response.unwrap_or_else(|e| {
        panic!(
            "a new gRPC client was not served while {} idle HTTP connections were held: {e}; log:\n{}",
            idle.len(),
            server.log()
        )
    });
        assert_eq!(code(&response), Code::Ok);
        eprintln!("served a new gRPC client in {:?}", started.elapsed());

        let cpu = cpu_share(server.pid(), Duration::from_secs(1)).await;
        eprintln!(
            "CPU while holding the idle connections: {:.0}%",
            cpu * 100.0
        );
        assert!(cpu < 0.1, "the server used {:.0}% of a core", cpu * 100.0);
        drop(idle);
    }

    /// With limits above what the process has descriptors for, accepting fails (EMFILE): the
    /// accept loops pause instead of spinning, and serve again once descriptors free up.
    #[tokio::test]
    async fn accept_errors_pause_instead_of_spinning() {
        let env = [
            ("HTTP_API_MAX_CONNECTIONS", "1000"),
            ("ENVOY_RLS_MAX_CONNECTIONS", "1000"),
            ("HEADER_READ_TIMEOUT_MS", "2000"),
        ];
        let server = start(&env, Some(128), &[]).await;
        let idle: Vec<TcpStream> = (0..150).map(|_| connect(server.http)).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A gRPC client waiting in the backlog while no descriptor is left.
        let waiting = connect(server.rls);
        tokio::time::sleep(Duration::from_millis(100)).await;

        let cpu = cpu_share(server.pid(), Duration::from_millis(1500)).await;
        eprintln!("CPU while accepting fails: {:.0}%", cpu * 100.0);
        assert!(
            cpu < 0.1,
            "the server used {:.0}% of a core while accepting failed; log:\n{}",
            cpu * 100.0,
            server.log()
        );

        // The header-read timeout closes the idle connections (the test keeps its ends open):
        // descriptors free up and decisions are served again.
        let started = Instant::now();
        loop {
            match try_should(server.rls, Duration::from_secs(1)).await {
                Ok(response) => {
                    assert_eq!(code(&response), Code::Ok);
                    break;
                }
                Err(e) => assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "not served again: {e}; log:\n{}",
                    server.log()
                ),
            }
        }
        eprintln!("served again after {:?}", started.elapsed());
        drop((idle, waiting));
    }

    /// Idle, slow and silent peers are closed by the header-read timeout (HTTP/1), the
    /// handshake timeout and the HTTP/2 keepalive (gRPC).
    #[tokio::test]
    async fn idle_slow_and_silent_connections_are_closed() {
        let env = [
            ("HEADER_READ_TIMEOUT_MS", "500"),
            ("HTTP2_KEEPALIVE_INTERVAL_MS", "300"),
            ("HTTP2_KEEPALIVE_TIMEOUT_MS", "300"),
        ];
        let server = start(&env, None, &[]).await;
        let limit = Duration::from_secs(3);

        let mut cases: Vec<(&str, TcpStream)> = Vec::new();
        cases.push(("HTTP: connected, silent", connect(server.http)));

        let mut kept_alive = connect(server.http);
        kept_alive
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ratekeeper\r\n\r\n")
            .unwrap();
        let mut answer = [0u8; 12];
        kept_alive.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        cases.push(("HTTP: idle after an answered request", kept_alive));

        let slow = connect(server.http);
        let mut writer = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            // One byte every 100 ms, never finishing the headers.
            for byte in b"GET /status HTTP/1.1\r\nHost: ratekeeper\r\nX-Slow: "
                .iter()
                .cycle()
            {
                if writer.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        cases.push(("HTTP: headers sent one byte every 100 ms", slow));

        cases.push(("gRPC: connected, silent", connect(server.rls)));

        let mut stalled = connect(server.rls);
        stalled.write_all(H2_PREFACE_AND_SETTINGS).unwrap();
        cases.push(("gRPC: HTTP/2 preface, then never answers a PING", stalled));

        let checks: Vec<_> = cases
            .into_iter()
            .map(|(name, stream)| {
                (
                    name,
                    std::thread::spawn(move || closed_within(stream, limit)),
                )
            })
            .collect();
        let mut open = Vec::new();
        for (name, check) in checks {
            match check.join().unwrap() {
                Some(after) => eprintln!("{name}: closed after {after:?}"),
                None => open.push(name),
            }
        }
        assert!(
            open.is_empty(),
            "still open after {limit:?}: {open:?}; log:\n{}",
            server.log()
        );
        // And the server still serves.
        let response = try_should(server.rls, Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(code(&response), Code::Ok);
    }

    /// The connection limit holds: past it, a client waits; once a slot frees up it is served.
    #[tokio::test]
    async fn the_connection_limit_holds_and_frees_up() {
        let env = [("HTTP_API_MAX_CONNECTIONS", "2")];
        let server = start(&env, None, &[]).await;
        let first = connect(server.http);
        let second = connect(server.http);
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut third = connect(server.http);
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ratekeeper\r\nConnection: close\r\n\r\n")
            .unwrap();
        third
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut answer = Vec::new();
        let waited = third.read_to_end(&mut answer);
        assert!(
            waited.is_err() && answer.is_empty(),
            "a third connection was served past a limit of 2: {:?}",
            String::from_utf8_lossy(&answer)
        );

        drop(first);
        third
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        third.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(second);
    }

    // Item 4: shutdown.

    /// SIGTERM with nothing in flight exits within a second, whatever idle, half-sent and stalled
    /// connections are open (and the default timeouts are long).
    #[tokio::test]
    async fn sigterm_exits_within_a_second_despite_idle_and_half_open_connections() {
        let mut server = start(&[], None, &[]).await;
        let mut client = server.grpc().await;
        let response = client
            .should_rate_limit(llm_tokens("dave", 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&response), Code::Ok);

        let idle_http = connect(server.http);
        let mut half_sent = connect(server.http);
        half_sent
            .write_all(b"GET /status HTTP/1.1\r\nHost: ratekeeper\r\n")
            .unwrap();
        let silent_grpc = connect(server.rls);
        let mut stalled_h2 = connect(server.rls);
        stalled_h2.write_all(H2_PREFACE_AND_SETTINGS).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;

        let started = Instant::now();
        let status = server.terminate().await;
        let took = started.elapsed();
        eprintln!("exited {took:?} after SIGTERM");
        assert_eq!(status.code(), Some(0), "{status}; log:\n{}", server.log());
        // 0.2 s on an idle machine; the bound leaves room for a busy one (the tests of this
        // file run in parallel) and still tells it from the 10 s shutdown timeout of before.
        assert!(
            took < Duration::from_secs(3),
            "exit took {took:?}; log:\n{}",
            server.log()
        );
        drop((client, idle_http, half_sent, silent_grpc, stalled_h2));
    }

    /// A request in flight when SIGTERM arrives (its body still arriving) is answered, and the
    /// process exits right after.
    #[tokio::test]
    async fn sigterm_lets_a_request_in_flight_finish() {
        let mut server = start(&[], None, &[]).await;
        let body =
            br#"{"namespace":"llm_tokens","values":{"generic_key":"llm","user":"erin"},"delta":1}"#;
        let mut call = connect(server.http);
        write!(
            call,
            "POST /check HTTP/1.1\r\nHost: ratekeeper\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        call.write_all(&body[..10]).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;

        let pid = server.pid().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            server.exited().is_none(),
            "exited with a request in flight; log:\n{}",
            server.log()
        );
        call.write_all(&body[10..]).unwrap();
        call.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut answer = Vec::new();
        let _ = call.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer}");

        let started = Instant::now();
        let status = loop {
            if let Some(status) = server.exited() {
                break status;
            }
            // Well below the 10 s shutdown timeout; generous for a busy machine.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no exit after the last answer; log:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status.code(), Some(0), "{status}; log:\n{}", server.log());
    }
    #[test]
    fn help_shows_the_connection_flags() {
        let output = command().arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        for word in [
            "--rls-max-connections",
            "ENVOY_RLS_MAX_CONNECTIONS",
            "--http-max-connections",
            "HTTP_API_MAX_CONNECTIONS",
            "--header-read-timeout",
            "HEADER_READ_TIMEOUT_MS",
            "--http2-keepalive-interval",
            "HTTP2_KEEPALIVE_INTERVAL_MS",
            "--http2-keepalive-timeout",
            "HTTP2_KEEPALIVE_TIMEOUT_MS",
        ] {
            assert!(help.contains(word), "--help lacks {word}:\n{help}");
        }
    }
}

/// Item 14: a malformed protobuf body.
mod malformed {
    use std::time::Duration;

    use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use tonic::transport::Channel;

    use super::common::code;
    use super::common::process::*;
    use super::start;

    fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines)
            .unwrap()
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    async fn invalid_calls(server: &Server, rpc: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", server.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sample(
            &text,
            "ratekeeper_rpc_calls",
            &[("rpc", rpc), ("outcome", "invalid")],
        )
    }

    /// A body that is not the method's message: a `bytes` field 1 with invalid UTF-8 where the
    /// request has its string field 1 (`domain`).
    async fn send_malformed(server: &Server, path: &'static str) -> tonic::Status {
        let channel = Channel::from_shared(format!("http://{}", server.rls))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<Vec<u8>, Vec<u8>>::default();
        grpc.unary(
            tonic::Request::new(vec![0xff, 0xfe, 0xfd]),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .expect_err("a malformed body was answered OK")
    }

    #[tokio::test]
    async fn malformed_protobuf_is_invalid_argument_and_counted() {
        let server = start(&[("MAX_MESSAGE_BYTES", "2000")], None, &[]).await;
        for (path, rpc) in [
            (
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                "ShouldRateLimit",
            ),
            (
                "/kuadrant.service.ratelimit.v1.RateLimitService/CheckRateLimit",
                "CheckRateLimit",
            ),
            (
                "/kuadrant.service.ratelimit.v1.RateLimitService/Report",
                "Report",
            ),
        ] {
            let before = invalid_calls(&server, rpc).await;
            let status = send_malformed(&server, path).await;
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{path}: {status}"
            );
            let after = invalid_calls(&server, rpc).await;
            assert_eq!(
                after - before,
                1.0,
                "{rpc} invalid calls: {before} -> {after}"
            );
        }

        // An oversized message is refused before decoding too: RESOURCE_EXHAUSTED, also counted.
        let before = invalid_calls(&server, "ShouldRateLimit").await;
        let long = "u".repeat(3000);
        let status = server
            .grpc()
            .await
            .should_rate_limit(llm_tokens(&long, 1))
            .await
            .expect_err("an oversized message was answered OK");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        let after = invalid_calls(&server, "ShouldRateLimit").await;
        assert_eq!(after - before, 1.0, "oversized: {before} -> {after}");

        // Still serving.
        let response = server.should(llm_tokens("frank", 1)).await;
        assert_eq!(code(&response), Code::Ok);
    }
}

/// Item 15: the HTTP API's optional bearer token.
mod token {
    use std::io::Write;
    use std::time::Duration;

    use super::common::process::*;
    use super::{LIMITS, start};

    const TOKEN: &str = "s3cret-t0ken";

    /// Every protected endpoint with a valid body, so that a request that passes the token check
    /// succeeds.
    const PROTECTED: [(&str, &str, &str); 9] = [
        (
            "POST",
            "/check",
            r#"{"namespace":"llm_tokens","values":{"generic_key":"llm","user":"gina"},"delta":1}"#,
        ),
        (
            "POST",
            "/report",
            r#"{"namespace":"llm_tokens","values":{"generic_key":"llm","user":"gina"},"delta":1}"#,
        ),
        (
            "POST",
            "/check_and_report",
            r#"{"namespace":"llm_tokens","values":{"generic_key":"llm","user":"gina"},"delta":1}"#,
        ),
        ("GET", "/counters/llm_tokens", ""),
        (
            "POST",
            "/explain",
            r#"{"namespace":"llm_tokens","values":{"generic_key":"llm","user":"gina"}}"#,
        ),
        ("GET", "/ui", ""),
        ("GET", "/ui/data", ""),
        ("GET", "/ratelimit?ratelimit_keys=%5B%22k%22%5D", ""),
        (
            "POST",
            "/update_ratelimit_record",
            r#"{"ratelimit_keys":["k"],"total_tokens":1}"#,
        ),
    ];

    const OPEN: [&str; 5] = [
        "/metrics",
        "/status",
        "/healthz",
        "/readyz",
        "/limits/llm_tokens",
    ];

    async fn call(
        server: &Server,
        method: &str,
        path: &str,
        body: &str,
        authorization: Option<&str>,
    ) -> reqwest::Response {
        let client = reqwest::Client::new();
        let url = format!("http://{}{path}", server.http);
        let mut request = match method {
            "POST" => client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string()),
            _ => client.get(&url),
        };
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn assert_token_required(server: &Server, token: &str) {
        let good = format!("Bearer {token}");
        let wrong = format!("Bearer {token}x");
        let basic = format!("Basic {token}");
        for (method, path, body) in PROTECTED {
            for authorization in [None, Some(wrong.as_str()), Some(basic.as_str())] {
                let response = call(server, method, path, body, authorization).await;
                assert_eq!(
                    response.status(),
                    401,
                    "{method} {path} with {authorization:?}"
                );
                let challenge = response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                assert!(
                    challenge.starts_with("Bearer"),
                    "{method} {path}: WWW-Authenticate {challenge:?}"
                );
            }
            let response = call(server, method, path, body, Some(&good)).await;
            assert!(
                response.status().is_success(),
                "{method} {path} with the token: {}",
                response.status()
            );
            // The scheme is case-insensitive.
            let lower = format!("bearer {token}");
            let response = call(server, method, path, body, Some(&lower)).await;
            assert!(response.status().is_success(), "{method} {path}: {lower}");
        }
        for path in OPEN {
            let response = call(server, "GET", path, "", None).await;
            assert!(
                response.status().is_success(),
                "GET {path} without a token: {}",
                response.status()
            );
        }
    }

    #[tokio::test]
    async fn the_http_token_protects_what_changes_or_reveals_counters() {
        let server = start(&[("HTTP_AUTH_TOKEN", TOKEN)], None, &[]).await;
        assert_token_required(&server, TOKEN).await;
    }

    #[tokio::test]
    async fn the_http_token_can_come_from_a_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "{TOKEN}").unwrap();
        let path = file.path().to_str().unwrap().to_string();
        let server = start(&[("HTTP_AUTH_TOKEN_FILE", &path)], None, &[]).await;
        assert_token_required(&server, TOKEN).await;
    }

    #[tokio::test]
    async fn without_a_token_every_endpoint_stays_open() {
        let server = start(&[], None, &[]).await;
        for (method, path, body) in PROTECTED {
            let response = call(&server, method, path, body, None).await;
            assert!(response.status().is_success(), "{method} {path}");
        }
        assert!(
            !server.log().contains("without a token"),
            "warned on loopback:\n{}",
            server.log()
        );
    }

    /// Binding the HTTP API beyond loopback without a token is allowed (Limitador's default) but
    /// warned about at start.
    #[tokio::test]
    async fn an_http_api_beyond_loopback_without_a_token_is_warned_about() {
        let (rls_port, http_port) = free_ports();
        let mut command = command();
        command
            .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
            .args(["-B", "0.0.0.0", "-P", &http_port.to_string()])
            .arg(LIMITS);
        let server = Server::spawn(command, loopback(rls_port), loopback(http_port)).await;
        let warned = |log: &str| log.contains("WARN") && log.contains("without a token");
        let log = server.log_when(warned).await;
        assert!(warned(&log), "no warning:\n{log}");
    }

    /// Runs the binary with `env`, expecting it to refuse to start: its exit status and stderr
    /// (bounded: killed after `PATIENCE`).
    fn refused_start(env: &[(&str, &str)]) -> String {
        let (rls_port, http_port) = free_ports();
        let mut child = command()
            .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
            .args(["-B", "127.0.0.1", "-P", &http_port.to_string()])
            .arg(LIMITS)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > PATIENCE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("started with {env:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().unwrap();
        assert!(!output.status.success(), "{env:?}: {}", output.status);
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    #[test]
    fn a_token_that_cannot_be_used_stops_the_start() {
        let missing = refused_start(&[("HTTP_AUTH_TOKEN_FILE", "/nonexistent/token")]);
        assert!(missing.contains("/nonexistent/token"), "{missing}");

        let empty = tempfile::NamedTempFile::new().unwrap();
        let path = empty.path().to_str().unwrap();
        let stderr = refused_start(&[("HTTP_AUTH_TOKEN_FILE", path)]);
        assert!(stderr.contains("empty"), "{stderr}");

        let stderr = refused_start(&[("HTTP_AUTH_TOKEN", "two words")]);
        assert!(stderr.contains("token"), "{stderr}");
        assert!(
            !stderr.contains("two words"),
            "the token was printed: {stderr}"
        );
    }

    #[test]
    fn help_shows_the_token_flags() {
        let output = command().arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        for word in [
            "--http-auth-token",
            "HTTP_AUTH_TOKEN",
            "--http-auth-token-file",
            "HTTP_AUTH_TOKEN_FILE",
        ] {
            assert!(help.contains(word), "--help lacks {word}:\n{help}");
        }
        // A token given through the environment is never printed.
        let output = command()
            .arg("--help")
            .env("HTTP_AUTH_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&output.stdout).contains(TOKEN));
    }
}

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
