//! The whole end-to-end stack, for one scenario: client → Envoy → mock LLM upstream, with Envoy
//! asking a real ratekeeper binary before each request and charging the response's
//! `usage.total_tokens` after it. Every process runs on loopback ports chosen at run time and is
//! killed when the stack is dropped; every wait is bounded.
//!
//! Envoy's charge is fire-and-forget after the response, so the tests poll ratekeeper's
//! `GET /counters/<namespace>` until it landed instead of sleeping.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::envoy::{Envoy, require_envoy};
use super::process::Server;
use super::upstream::MockLlm;
use super::{get_json, http_client};

/// How long a fire-and-forget charge gets to reach ratekeeper.
const CHARGE_PATIENCE: Duration = Duration::from_secs(10);

/// One scenario: the Envoy config template, the limits file ratekeeper runs with and their
/// namespace (the Envoy config's rate limit domain), and ratekeeper's other options.
pub struct Scenario {
    pub envoy_config: &'static str,
    pub limits: &'static str,
    pub namespace: &'static str,
    pub options: &'static [&'static str],
}

pub struct Stack {
    pub scenario: &'static Scenario,
    pub ratekeeper: Server,
    pub mock: MockLlm,
    pub envoy: Envoy,
    pub client: reqwest::Client,
}

/// One answer from Envoy.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?.to_str().unwrap();
        assert!(values.next().is_none(), "{name} appears twice: {self:?}");
        Some(first)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }
}

/// A chat completion request: the headers that name the user, the token count the mock should
/// report, and the JSON body.
pub struct Chat {
    headers: Vec<(&'static str, String)>,
    tokens: u64,
    usage: bool,
    body: Value,
}

impl Chat {
    /// A plain chat sent with `headers`.
    pub fn new(headers: Vec<(&'static str, String)>, tokens: u64) -> Chat {
        Chat {
            headers,
            tokens,
            usage: true,
            body: json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}),
        }
    }

    /// Without the headers named `name`.
    pub fn without(mut self, name: &str) -> Chat {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    /// With one more header (a name already there is then sent twice).
    pub fn with(mut self, name: &'static str, value: &str) -> Chat {
        self.headers.push((name, value.to_string()));
        self
    }

    /// `"stream": true`, with or without `stream_options.include_usage`.
    pub fn streaming(mut self, include_usage: bool) -> Chat {
        self.body["stream"] = json!(true);
        if include_usage {
            self.body["stream_options"] = json!({"include_usage": true});
        }
        self
    }

    /// With `"max_tokens": tokens` in the body (what the refunds scenario estimates by).
    pub fn max_tokens(mut self, tokens: u64) -> Chat {
        self.body["max_tokens"] = json!(tokens);
        self
    }

    /// With `"model": model` in the body.
    pub fn model(mut self, model: &str) -> Chat {
        self.body["model"] = json!(model);
        self
    }

    /// The upstream answers after `ms` milliseconds: a generation in flight.
    pub fn taking_ms(self, ms: u64) -> Chat {
        self.with("x-mock-delay-ms", &ms.to_string())
    }

    /// The upstream answers without `usage`.
    pub fn without_usage(mut self) -> Chat {
        self.usage = false;
        self
    }
}

impl Stack {
    pub async fn start(scenario: &'static Scenario) -> Stack {
        // Before anything else, so a missing Envoy is the first and clearest failure.
        require_envoy();
        let args: Vec<&str> = scenario
            .options
            .iter()
            .copied()
            .chain([scenario.limits])
            .collect();
        let ratekeeper = Server::start_on_loopback(&args).await;
        let mock = MockLlm::start().await;
        let envoy = Envoy::start(
            scenario.envoy_config,
            mock.addr.port(),
            ratekeeper.rls.port(),
        )
        .await;
        Stack {
            scenario,
            ratekeeper,
            mock,
            envoy,
            client: http_client(),
        }
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- ratekeeper log:\n{}\n--- mock_llm log:\n{}\n--- envoy log:\n{}",
            self.ratekeeper.log(),
            self.mock.log(),
            self.envoy.log()
        )
    }

    pub async fn send(&self, chat: Chat) -> Reply {
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
    pub async fn expect(&self, chat: Chat, status: u16) -> Reply {
        let reply = self.send(chat).await;
        assert_eq!(reply.status, status, "{reply:#?}\n{}", self.logs());
        reply
    }

    /// ratekeeper's live counter of `user` in the scenario's namespace: (limit name, remaining).
    pub async fn counter(&self, user: &str) -> Option<(String, u64)> {
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

    /// `reply` is an answer that passed, with `left` of the bucket `limit` (its
    /// x-ratelimit-limit) before this request's charge, and no Retry-After.
    pub fn assert_served(&self, reply: &Reply, round: u64, limit: &str, left: u64) {
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

    /// Waits (bounded) until `user`'s counter under `limit` shows `remaining`: Envoy's charge
    /// after the response landed.
    pub async fn wait_for_remaining(&self, user: &str, limit: &str, remaining: u64) {
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
