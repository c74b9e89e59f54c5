//! Alibaba ASM's LLM token rate limiting tutorial, unchanged: its Wasm plug-in's calls
//! (`GET /ratelimit`, `POST /update_ratelimit_record`) with its keys (`regular-user`,
//! `subscriber`, the raw `user-type` header) and its table (regular-user.*: 200 tokens, +50
//! every 30 s; subscriber.*: 1000, +100 every 60 s), from ASM's own `RATE_LIMIT_CONFIG` and from
//! the shipped limits file, in this process (time driven by the test) and through the binary.

mod common;

use std::time::Duration;

use common::process::{Server, command, free_ports, loopback};
use common::redis::{RedisProcess, cli};
use common::*;

fn shipped(name: &str) -> String {
    let path = format!("{}/limits/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).unwrap()
}

/// The tutorial's rules as ASM's deployment sets them: `RATE_LIMIT_CONFIG`.
fn rate_limit_config() -> String {
    shipped("asm-rate-limit-config.json")
}

/// The Wasm plug-in's side of the ASM HTTP API.
struct Plugin {
    http: reqwest::Client,
    base: String,
}

impl Plugin {
    fn new(base: String) -> Self {
        Self {
            http: reqwest::Client::new(),
            base,
        }
    }

    /// `GET /ratelimit?ratelimit_keys=["<key>"]`: allowed?
    async fn allowed(&self, key: &str) -> bool {
        let keys = serde_json::json!([key]).to_string();
        let r = self
            .http
            .get(format!("{}/ratelimit", self.base))
            .query(&[("ratelimit_keys", keys)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answer: serde_json::Value = r.json().await.unwrap();
        let allow = answer["allow"].as_bool().unwrap();
        if !allow {
            let description = answer["description"].as_str().unwrap();
            assert!(description.contains(key), "{description}");
        }
        allow
    }

    /// `POST /update_ratelimit_record` with the usage of one LLM response.
    async fn record(&self, key: &str, total_tokens: u64) {
        let body = serde_json::json!({"ratelimit_keys": [key],
            "prompt_tokens": total_tokens / 4, "completion_tokens": total_tokens - total_tokens / 4,
            "total_tokens": total_tokens});
        let r = self
            .http
            .post(format!("{}/update_ratelimit_record", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    /// Records `tokens` for `key` `times` times, and whether `key` was allowed after each.
    async fn spend(&self, key: &str, tokens: u64, times: usize) -> Vec<bool> {
        let mut allowed = Vec::new();
        for _ in 0..times {
            self.record(key, tokens).await;
            allowed.push(self.allowed(key).await);
        }
        allowed
    }
}

/// The tutorial's traffic, at one instant: regular-user is refused once 200 tokens are spent,
/// subscriber only once 1,000 are; each key has its own bucket; the first matching rule wins;
/// a key no rule matches is never limited.
async fn tutorial_traffic(asm: &Plugin) {
    assert!(asm.allowed("regular-user").await);
    assert!(asm.allowed("subscriber").await);
    // The traffic: five responses of 100 tokens.
    assert_eq!(
        asm.spend("regular-user", 100, 5).await,
        [true, false, false, false, false]
    );
    let mut subscriber = vec![true; 9];
    subscriber.push(false);
    assert_eq!(asm.spend("subscriber", 100, 10).await, subscriber);
    // Unanchored regexes, one bucket per distinct key.
    assert_eq!(asm.spend("x-regular-user-1", 100, 2).await, [true, false]);
    // Matched by both regexes: the first rule (regular-user.*, 200 tokens) wins.
    assert_eq!(
        asm.spend("subscriber-regular-user", 100, 2).await,
        [true, false]
    );
    // No rule matches: allowed, whatever it spends.
    assert_eq!(asm.spend("guest", 1_000_000, 2).await, [true, true]);
}

/// After [`tutorial_traffic`] at the start: refills of 50 every 30 s and 100 every 60 s.
async fn tutorial_refills(asm: &Plugin, clock: &ratekeeper::clock::ManualClock) {
    // subscriber: 0 left; +100 at 60 s, not before.
    clock.advance_ms(59_999);
    assert!(!asm.allowed("subscriber").await);
    clock.advance_ms(1);
    assert_eq!(asm.spend("subscriber", 99, 1).await, [true]);
    assert_eq!(asm.spend("subscriber", 1, 1).await, [false]);
    // regular-user: 200 - 500 = 300 of debt, repaid by six refills of 50 (180 s); the seventh
    // (210 s) gives exactly 50.
    clock.advance_ms(119_999);
    assert!(!asm.allowed("regular-user").await);
    clock.advance_ms(1);
    assert!(!asm.allowed("regular-user").await, "0 left at 180 s");
    clock.advance_ms(30_000);
    assert_eq!(asm.spend("regular-user", 49, 1).await, [true]);
    assert_eq!(asm.spend("regular-user", 1, 1).await, [false]);
}

enum Rules {
    /// `RATE_LIMIT_CONFIG`, beside a limits file with nothing in the namespace `asm`.
    RateLimitConfig,
    /// limits/asm-user-types.yaml.
    ShippedFile,
}

async fn tutorial(backend: Backend, rules: Rules) {
    let server = match rules {
        Rules::RateLimitConfig => {
            let options = Options {
                backend,
                asm_rate_limit_config: Some(rate_limit_config()),
                ..Options::default()
            };
            TestServer::start_with(&shipped("llm-tiers.yaml"), options).await
        }
        Rules::ShippedFile => TestServer::on(backend, &shipped("asm-user-types.yaml")).await,
    };
    let asm = Plugin::new(server.http_base.clone());
    tutorial_traffic(&asm).await;
    tutorial_refills(&asm, &server.clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_from_rate_limit_config_in_memory() {
    tutorial(Backend::Memory, Rules::RateLimitConfig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_from_rate_limit_config_in_redis() {
    tutorial(Backend::Redis, Rules::RateLimitConfig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_from_the_shipped_file_in_memory() {
    tutorial(Backend::Memory, Rules::ShippedFile).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_from_the_shipped_file_in_redis() {
    tutorial(Backend::Redis, Rules::ShippedFile).await;
}

/// ASM's deployment, as the tutorial writes it: only environment variables
/// (`RATE_LIMIT_CONFIG`, no limits file) and the ports.
#[tokio::test]
async fn tutorial_through_the_binary_configured_as_asm_is() {
    let (rls_port, http_port) = free_ports();
    let mut asm = command();
    asm.env("RATE_LIMIT_CONFIG", rate_limit_config())
        .env("ENVOY_RLS_HOST", "127.0.0.1")
        .env("ENVOY_RLS_PORT", rls_port.to_string())
        .env("HTTP_API_HOST", "127.0.0.1")
        .env("HTTP_API_PORT", http_port.to_string());
    let server = Server::spawn(asm, loopback(rls_port), loopback(http_port)).await;
    tutorial_traffic(&Plugin::new(format!("http://{}", server.http))).await;
}

/// ASM's Redis variables (REDIS_ADDRESS, REDIS_PASSWORD, REDIS_DB_INDEX) put the buckets in
/// that Redis database, shared by every replica.
#[tokio::test]
async fn asm_redis_variables_share_the_buckets_between_replicas() {
    let redis = RedisProcess::start();
    let password = "MyP@ss:w/rd";
    cli(redis.port, &["CONFIG", "SET", "requirepass", password]).unwrap();
    let replica = || async {
        let (rls_port, http_port) = free_ports();
        let mut asm = command();
        asm.env("RATE_LIMIT_CONFIG", rate_limit_config())
            .env("REDIS_ADDRESS", format!("127.0.0.1:{}", redis.port))
            .env("REDIS_PASSWORD", password)
            .env("REDIS_DB_INDEX", "3")
            .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
            .args(["-B", "127.0.0.1", "-P", &http_port.to_string()]);
        Server::spawn(asm, loopback(rls_port), loopback(http_port)).await
    };
    let (a, b) = (replica().await, replica().await);
    let (a, b) = (
        Plugin::new(format!("http://{}", a.http)),
        Plugin::new(format!("http://{}", b.http)),
    );
    a.record("regular-user", 150).await;
    assert!(b.allowed("regular-user").await);
    b.record("regular-user", 50).await;
    assert!(
        !a.allowed("regular-user").await,
        "200 spent over two replicas"
    );
    let keys = cli(
        redis.port,
        &["--no-auth-warning", "-a", password, "-n", "3", "DBSIZE"],
    )
    .unwrap();
    assert_ne!(keys.trim(), "0", "nothing in database 3");
}

/// A reload of the limits file keeps ASM's rules (and their buckets); a file that would add
/// limits to their namespace is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_keeps_the_rate_limit_config_rules() {
    let options = Options {
        asm_rate_limit_config: Some(rate_limit_config()),
        ..Options::default()
    };
    let server = TestServer::start_with(&shipped("llm-tiers.yaml"), options).await;
    let asm = Plugin::new(server.http_base.clone());
    assert_eq!(asm.spend("regular-user", 150, 1).await, [true]);

    let replace = |content: String| {
        let path = server.limits_path().to_path_buf();
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, content).unwrap();
        std::fs::rename(&temp, &path).unwrap();
    };
    replace("- {namespace: other, max_value: 5, seconds: 60}\n".to_string());
    wait_for(&server, "config_version", 1).await;
    assert_eq!(server.limiter.limits().namespace("other").len(), 1);
    // The rule is in force and its bucket kept: 50 of 200 left.
    assert_eq!(asm.spend("regular-user", 49, 1).await, [true]);
    assert_eq!(asm.spend("regular-user", 1, 1).await, [false]);
    assert!(asm.allowed("subscriber").await);

    replace(shipped("asm-user-types.yaml"));
    wait_for(&server, "config_err_since", 1).await;
    assert_eq!(server.status.config_version(), 1);
    assert_eq!(server.limiter.limits().namespace("other").len(), 1);
    assert!(!asm.allowed("regular-user").await);
}

/// Polls /status until `field` is `value` (bounded).
async fn wait_for(server: &TestServer, field: &str, value: u64) {
    let url = format!("{}/status", server.http_base);
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = get_json(&reqwest::Client::new(), &url).await;
        if status[field] == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{field} never reached {value}: {status}");
}

/// The shipped file's ASM limits and the shipped `RATE_LIMIT_CONFIG` are the same rules: for
/// every key, the same one limit (or none) applies, with the same bucket.
#[test]
fn the_shipped_file_and_rate_limit_config_agree() {
    use ratekeeper::limits::{Input, KeyValues, Limit, parse_limits, parse_rate_limit_config};
    use ratekeeper::request::Descriptor;

    let file = parse_limits("asm-user-types.yaml", &shipped("asm-user-types.yaml")).unwrap();
    let file: Vec<Limit> = file.into_iter().filter(|l| l.namespace == "asm").collect();
    let json = parse_rate_limit_config(&rate_limit_config(), "asm").unwrap();
    let applying = |limits: &[Limit], key: &str| {
        let descriptors = [Descriptor::of(&[("key", key)])];
        let input = Input::new(&descriptors);
        let mut values = KeyValues::new();
        let mut found = Vec::new();
        for limit in limits {
            if limit.applies(&input, &mut values) == Ok(true) {
                found.push((limit.max_value, limit.seconds, limit.kind, values.join("|")));
            }
        }
        found
    };
    for key in [
        "regular-user",
        "subscriber",
        "x-regular-user-1",
        "subscriber-regular-user",
        "regular-user-subscriber",
        "premium-subscriber",
        "guest",
        "",
    ] {
        let from_file = applying(&file, key);
        assert_eq!(from_file, applying(&json, key), "{key:?}");
        assert!(from_file.len() <= 1, "{key:?}: {from_file:?}");
    }
    assert_eq!(applying(&file, "subscriber-regular-user")[0].0, 200);
}
