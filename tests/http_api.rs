//! Limitador's HTTP API, black box: a server in this process on a free loopback port, a clock the
//! test drives, and a real HTTP client.

mod common;

use common::{Options, TestServer};
use ratekeeper::request::RequestBounds;
use reqwest::StatusCode;
use serde_json::{Value, json};

const LIMITS: &str = r#"
- name: free
  namespace: llm/llm-route
  max_value: 50
  seconds: 60
  conditions:
    - 'descriptors[0]["tokenlimit.free__065bb34d"] == "1"'
  variables:
    - 'descriptors[0]["auth.identity.userid"]'
- name: gold
  namespace: llm/llm-route
  max_value: 200
  seconds: 60
  conditions:
    - 'descriptors[0]["tokenlimit.gold__bf2c6eed"] == "1"'
  variables:
    - 'descriptors[0]["auth.identity.userid"]'
- name: per-key
  id: api-per-key
  namespace: plain
  max_value: 5
  seconds: 10
  conditions:
    - "descriptors[0].kind == 'api'"
  variables:
    - descriptors[0].user
- name: per-user
  namespace: shared
  max_value: 10
  seconds: 60
  variables:
    - descriptors[0].user
- name: total
  namespace: shared
  max_value: 12
  seconds: 60
"#;

const KUADRANT_NS: &str = "llm/llm-route";
const USER_VAR: &str = r#"descriptors[0]["auth.identity.userid"]"#;

/// The one descriptor the Kuadrant wasm-shim sends for the `free` limit, as HTTP `values`.
fn free_user(user: &str) -> Value {
    json!({"tokenlimit.free__065bb34d": "1", "auth.identity.userid": user})
}

fn body(namespace: &str, values: Value, delta: u64) -> Value {
    json!({"namespace": namespace, "values": values, "delta": delta})
}

fn with_headers(namespace: &str, values: Value, delta: u64) -> Value {
    json!({
        "namespace": namespace,
        "values": values,
        "delta": delta,
        "response_headers": "DraftVersion03",
    })
}

struct Http<'a> {
    server: &'a TestServer,
    client: reqwest::Client,
}

impl<'a> Http<'a> {
    fn new(server: &'a TestServer) -> Self {
        Self {
            server,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.http_base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: {status} with a non-JSON body {text:?}: {e}"));
        (status, value)
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post_raw(path, body.to_string()).await
    }

    async fn post_raw(&self, path: &str, body: String) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs and returns the status and the body parsed as JSON.
    async fn call(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self.post(path, body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("POST {path} {body}: {status} with a non-JSON body {text:?}: {e}")
        });
        (status, value)
    }

    /// The live counters of a namespace (percent-encoding its '/').
    async fn counters(&self, namespace: &str) -> Vec<Value> {
        let (status, value) = self
            .get(&format!("/counters/{}", namespace.replace('/', "%2F")))
            .await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value.as_array().cloned().unwrap_or_else(|| {
            panic!("GET /counters/{namespace} is not a list: {value}");
        })
    }

    /// What is left on the counter whose first variable resolved to `value`; `None` when it
    /// has no live counter.
    async fn remaining(&self, namespace: &str, value: &str) -> Option<u64> {
        let counters = self.counters(namespace).await;
        let matching: Vec<&Value> = counters
            .iter()
            .filter(|c| {
                c["set_variables"]
                    .as_object()
                    .is_some_and(|vars| vars.values().any(|v| v == value))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "several counters for {value}: {counters:?}"
        );
        matching.first().map(|c| c["remaining"].as_u64().unwrap())
    }
}

fn header<'r>(response: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("a header that is not ASCII"))
}

fn rate_limit_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("x-ratelimit") || k == "retry-after")
        .collect()
}

// ---------------------------------------------------------------------------------------------
// GET /status

#[tokio::test]
async fn status_reports_start_and_configuration() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let (status, value) = http.get("/status").await;
    assert_eq!(status, StatusCode::OK);

    // Limitador's four fields (others may be added beside them).
    let object = value.as_object().expect("/status is a JSON object");
    for field in [
        "started_at",
        "config_applied_at",
        "config_version",
        "config_err_since",
    ] {
        assert!(object.contains_key(field), "/status lacks {field}: {value}");
    }

    // Limitador's UTC timestamp with nanoseconds, its time zone said (RFC 3339, `Z`).
    let parse = |field: &str| {
        let text = value[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is not a string: {value}"));
        assert!(
            text.ends_with('Z'),
            "{field} = {text:?} carries no time zone"
        );
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{field} = {text:?} is not an RFC 3339 timestamp: {e}"))
            .naive_utc()
    };
    let started_at = parse("started_at");
    let applied_at = parse("config_applied_at");
    assert!(
        applied_at >= started_at,
        "config applied ({applied_at}) before the server started ({started_at})"
    );
    assert!(started_at <= chrono::Utc::now().naive_utc());
    assert_eq!(value["config_version"], json!(0), "{value}");
    assert_eq!(value["config_err_since"], json!(0), "{value}");

    // Serving requests does not touch the configuration status.
    http.call("/check_and_report", &body("plain", json!({}), 1))
        .await;
    let (_, again) = http.get("/status").await;
    assert_eq!(again, value);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GET /limits/{ns}

#[tokio::test]
async fn limits_of_a_plain_namespace() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let (status, value) = http.get("/limits/plain").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        value,
        json!([{
            "id": "api-per-key",
            "namespace": "plain",
            "max_value": 5,
            "seconds": 10,
            "name": "per-key",
            "conditions": ["descriptors[0].kind == 'api'"],
            "variables": ["descriptors[0].user"],
        }])
    );

    let (_, shared) = http.get("/limits/shared").await;
    let names: Vec<&str> = shared
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["per-user", "total"], "{shared}");
    assert_eq!(shared[1]["conditions"], json!([]));
    assert_eq!(shared[1]["variables"], json!([]));
    assert_eq!(shared[1]["id"], Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn limits_of_a_namespace_with_a_slash_raw_and_percent_encoded() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let (status, raw) = http.get("/limits/llm/llm-route").await;
    assert_eq!(status, StatusCode::OK);
    let (status, encoded) = http.get("/limits/llm%2Fllm-route").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(raw, encoded);
    // Lowercase hex is the same escape.
    let (_, lower) = http.get("/limits/llm%2fllm-route").await;
    assert_eq!(raw, lower);

    assert_eq!(
        raw,
        json!([
            {
                "id": null,
                "namespace": "llm/llm-route",
                "max_value": 50,
                "seconds": 60,
                "name": "free",
                "conditions": [r#"descriptors[0]["tokenlimit.free__065bb34d"] == "1""#],
                "variables": [USER_VAR],
            },
            {
                "id": null,
                "namespace": "llm/llm-route",
                "max_value": 200,
                "seconds": 60,
                "name": "gold",
                "conditions": [r#"descriptors[0]["tokenlimit.gold__bf2c6eed"] == "1""#],
                "variables": [USER_VAR],
            },
        ])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn limits_of_an_unknown_namespace_are_an_empty_list() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    for path in [
        "/limits/nobody",
        // A prefix or an extension of a namespace with '/' is another namespace.
        "/limits/llm",
        "/limits/llm/llm-route/extra",
        "/limits/llm%2Fllm-route%2Fextra",
    ] {
        let (status, value) = http.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(value, json!([]), "{path}");
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// POST /check, /report, /check_and_report

#[tokio::test]
async fn check_is_read_only() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);

    // A check on a fresh counter admits and creates nothing.
    let (status, value) = http
        .call("/check", &body(KUADRANT_NS, free_user("alice"), 10))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value, Value::Null);
    assert!(http.counters(KUADRANT_NS).await.is_empty());

    let (status, _) = http
        .call(
            "/check_and_report",
            &body(KUADRANT_NS, free_user("alice"), 45),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(5));

    // As many checks as we like: the counter does not move.
    for _ in 0..3 {
        let (status, value) = http
            .call("/check", &body(KUADRANT_NS, free_user("alice"), 5))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(value, Value::Null);
    }
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(5));

    // A delta that does not fit is refused, and still charges nothing.
    let (status, value) = http
        .call("/check", &body(KUADRANT_NS, free_user("alice"), 6))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(value, Value::Null);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(5));

    // Nothing left: 429, and it stays at 0 (not wrapped, not reset).
    http.call(
        "/check_and_report",
        &body(KUADRANT_NS, free_user("alice"), 5),
    )
    .await;
    let (status, _) = http
        .call("/check", &body(KUADRANT_NS, free_user("alice"), 1))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(0));

    // Another user's budget is untouched.
    let (status, _) = http
        .call("/check", &body(KUADRANT_NS, free_user("bob"), 50))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining(KUADRANT_NS, "bob").await, None);
    server.shutdown().await;
}

#[tokio::test]
async fn report_always_counts_even_past_the_limit() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);

    let (status, value) = http
        .call("/report", &body(KUADRANT_NS, free_user("alice"), 30))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value, Value::Null);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(20));

    // Past the limit: still 200, still counted.
    let (status, value) = http
        .call("/report", &body(KUADRANT_NS, free_user("alice"), 30))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value, Value::Null);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(0));
    let (status, _) = http
        .call("/report", &body(KUADRANT_NS, free_user("alice"), 7))
        .await;
    assert_eq!(status, StatusCode::OK);

    // And what it counted refuses what comes next.
    let (status, _) = http
        .call("/check", &body(KUADRANT_NS, free_user("alice"), 1))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = http
        .call(
            "/check_and_report",
            &body(KUADRANT_NS, free_user("alice"), 1),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    // A report against no limit at all is fine too.
    let (status, value) = http
        .call("/report", &body("nobody", json!({"a": "b"}), 3))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn check_and_report_is_all_or_nothing() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let call = |delta| body(KUADRANT_NS, free_user("alice"), delta);

    let (status, value) = http.call("/check_and_report", &call(30)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value, Value::Null);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(20));

    // 25 does not fit in the 20 left: refused, and the refused call charges nothing.
    let (status, value) = http.call("/check_and_report", &call(25)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(value, Value::Null);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(20));

    // Exactly what is left fits.
    let (status, _) = http.call("/check_and_report", &call(20)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(0));
    let (status, _) = http.call("/check_and_report", &call(1)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(0));
    server.shutdown().await;
}

#[tokio::test]
async fn check_and_report_charges_no_limit_when_one_refuses() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let user = |name: &str| json!({"user": name});

    // alice: per-user 10 - 8 = 2 left; total 12 - 8 = 4 left.
    let (status, _) = http
        .call("/check_and_report", &body("shared", user("alice"), 8))
        .await;
    assert_eq!(status, StatusCode::OK);

    // bob's 5 fits his own limit but not the total: refused, and his counter is not charged.
    let (status, _) = http
        .call("/check_and_report", &body("shared", user("bob"), 5))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let counters = http.counters("shared").await;
    let mut seen: Vec<(Option<&str>, u64)> = counters
        .iter()
        .map(|c| {
            (
                c["set_variables"]["descriptors[0].user"].as_str(),
                c["remaining"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, [(None, 4), (Some("alice"), 2)], "{counters:?}");

    // 4 fits both.
    let (status, _) = http
        .call("/check_and_report", &body("shared", user("bob"), 4))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining("shared", "bob").await, Some(6));
    server.shutdown().await;
}

#[tokio::test]
async fn values_are_the_first_descriptor_and_conditions_select_limits() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    // `kind` is not 'api': the limit does not apply, however much is asked.
    let (status, _) = http
        .call(
            "/check_and_report",
            &body("plain", json!({"kind": "web", "user": "u"}), 1000),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // A variable the values lack: the limit does not apply either.
    let (status, _) = http
        .call(
            "/check_and_report",
            &body("plain", json!({"kind": "api"}), 1000),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(http.counters("plain").await.is_empty());

    let (status, _) = http
        .call(
            "/check_and_report",
            &body("plain", json!({"kind": "api", "user": "u"}), 6),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = http
        .call(
            "/check_and_report",
            &body("plain", json!({"kind": "api", "user": "u"}), 5),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining("plain", "u").await, Some(0));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// response_headers: DraftVersion03

#[tokio::test]
async fn draft03_headers_on_admitted_and_refused_calls() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);

    let response = http
        .post(
            "/check_and_report",
            &with_headers(KUADRANT_NS, free_user("alice"), 20),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "x-ratelimit-limit"),
        Some(r#"50, 50;w=60;name="free""#)
    );
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("30"));
    assert_eq!(header(&response, "x-ratelimit-reset"), Some("60"));
    assert_eq!(header(&response, "retry-after"), None);

    // 15 s later, 40 more does not fit: 429 with what is left and when it resets.
    server.clock.advance_ms(15_000);
    let response = http
        .post(
            "/check_and_report",
            &with_headers(KUADRANT_NS, free_user("alice"), 40),
        )
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&response, "x-ratelimit-limit"),
        Some(r#"50, 50;w=60;name="free""#)
    );
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("30"));
    assert_eq!(header(&response, "x-ratelimit-reset"), Some("45"));
    assert_eq!(header(&response, "retry-after"), Some("45"));

    // A read-only check reports what is left now, and Retry-After when refused.
    let response = http
        .post("/check", &with_headers(KUADRANT_NS, free_user("alice"), 1))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("30"));
    assert_eq!(header(&response, "retry-after"), None);
    http.call("/report", &body(KUADRANT_NS, free_user("alice"), 30))
        .await;
    server.clock.advance_ms(500);
    let response = http
        .post("/check", &with_headers(KUADRANT_NS, free_user("alice"), 1))
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("0"));
    // 44.5 s left: Reset rounds down, Retry-After rounds up.
    assert_eq!(header(&response, "x-ratelimit-reset"), Some("44"));
    assert_eq!(header(&response, "retry-after"), Some("45"));
    server.shutdown().await;
}

#[tokio::test]
async fn draft03_lists_every_limit_most_restrictive_first() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let response = http
        .post(
            "/check_and_report",
            &with_headers("shared", json!({"user": "alice"}), 8),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // per-user has 2 left, total 4.
    assert_eq!(
        header(&response, "x-ratelimit-limit"),
        Some(r#"10, 10;w=60;name="per-user", 12;w=60;name="total""#)
    );
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("2"));

    // bob: per-user 10 left, total 4 left: the total now leads.
    let response = http
        .post("/check", &with_headers("shared", json!({"user": "bob"}), 1))
        .await;
    assert_eq!(
        header(&response, "x-ratelimit-limit"),
        Some(r#"12, 12;w=60;name="total", 10;w=60;name="per-user""#)
    );
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("4"));
    server.shutdown().await;
}

#[tokio::test]
async fn no_rate_limit_headers_unless_asked_or_when_no_limit_applies() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    for request in [
        body(KUADRANT_NS, free_user("alice"), 1),
        json!({"namespace": KUADRANT_NS, "values": free_user("alice"), "delta": 1,
               "response_headers": null}),
        // Asked, but no limit applies.
        with_headers("nobody", json!({"a": "b"}), 1),
    ] {
        for path in ["/check", "/check_and_report"] {
            let response = http.post(path, &request).await;
            assert_eq!(response.status(), StatusCode::OK, "{path} {request}");
            assert_eq!(
                rate_limit_headers(&response),
                Vec::<String>::new(),
                "{path} {request}"
            );
        }
    }
    // Refused without asking: still no headers.
    http.call("/report", &body(KUADRANT_NS, free_user("alice"), 100))
        .await;
    let response = http
        .post(
            "/check_and_report",
            &body(KUADRANT_NS, free_user("alice"), 1),
        )
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(rate_limit_headers(&response), Vec::<String>::new());
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GET /counters/{ns}

#[tokio::test]
async fn counters_show_usage_and_the_window_resets_after_its_seconds() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    assert!(http.counters(KUADRANT_NS).await.is_empty());

    http.call(
        "/check_and_report",
        &body(KUADRANT_NS, free_user("alice"), 20),
    )
    .await;
    server.clock.advance_ms(10_000);
    http.call("/report", &body(KUADRANT_NS, free_user("bob"), 5))
        .await;

    let (status, raw) = http.get("/counters/llm/llm-route").await;
    assert_eq!(status, StatusCode::OK);
    let (_, encoded) = http.get("/counters/llm%2Fllm-route").await;
    assert_eq!(raw, encoded);

    let (_, limits) = http.get("/limits/llm%2Fllm-route").await;
    let free_limit = &limits[0];
    assert_eq!(free_limit["name"], "free");
    let mut counters = raw.as_array().unwrap().clone();
    counters.sort_by_key(|c| c["remaining"].as_u64());
    assert_eq!(
        Value::Array(counters),
        json!([
            {
                "limit": free_limit,
                "set_variables": {USER_VAR: "alice"},
                "remaining": 30,
                "held": 0,
                "expires_in_seconds": 50,
            },
            {
                "limit": free_limit,
                "set_variables": {USER_VAR: "bob"},
                "remaining": 45,
                "held": 0,
                "expires_in_seconds": 60,
            },
        ])
    );

    // 1 ms before alice's window ends it is still there.
    server.clock.advance_ms(49_999);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(30));
    // At 60 s after her first hit it has reset; bob's (opened 10 s later) has not.
    server.clock.advance_ms(1);
    let counters = http.counters(KUADRANT_NS).await;
    assert_eq!(counters.len(), 1, "{counters:?}");
    assert_eq!(counters[0]["set_variables"], json!({USER_VAR: "bob"}));
    assert_eq!(counters[0]["expires_in_seconds"], json!(10));

    // alice has her whole budget again, in a fresh window.
    let (status, _) = http
        .call(
            "/check_and_report",
            &body(KUADRANT_NS, free_user("alice"), 50),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(0));

    // And bob's ends at its own time.
    server.clock.advance_ms(10_000);
    assert_eq!(http.remaining(KUADRANT_NS, "bob").await, None);
    server.shutdown().await;
}

#[tokio::test]
async fn counters_of_a_limit_without_variables_and_of_unknown_namespaces() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    http.call(
        "/check_and_report",
        &body("shared", json!({"user": "u"}), 3),
    )
    .await;
    let counters = http.counters("shared").await;
    let total = counters
        .iter()
        .find(|c| c["limit"]["name"] == "total")
        .unwrap_or_else(|| panic!("no counter for `total`: {counters:?}"));
    assert_eq!(total["set_variables"], json!({}));
    assert_eq!(total["remaining"], json!(9));
    assert_eq!(total["expires_in_seconds"], json!(60));

    for path in ["/counters/nobody", "/counters/llm", "/counters/shared%2Fx"] {
        let (status, value) = http.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(value, json!([]), "{path}");
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Bad requests

#[tokio::test]
async fn malformed_bodies_are_400_with_a_reason_and_change_nothing() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let values = free_user("alice").to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed JSON", "{not json".to_string(), ""),
        (
            "truncated JSON",
            format!(r#"{{"namespace": "{KUADRANT_NS}""#),
            "",
        ),
        ("empty body", String::new(), ""),
        ("not an object", "[1, 2]".to_string(), ""),
        (
            "missing delta",
            format!(r#"{{"namespace": "{KUADRANT_NS}", "values": {values}}}"#),
            "delta",
        ),
        (
            "missing values",
            format!(r#"{{"namespace": "{KUADRANT_NS}", "delta": 1}}"#),
            "values",
        ),
        (
            "missing namespace",
            format!(r#"{{"values": {values}, "delta": 1}}"#),
            "namespace",
        ),
        (
            "delta as a string",
            format!(r#"{{"namespace": "{KUADRANT_NS}", "values": {values}, "delta": "5"}}"#),
            "invalid type",
        ),
        (
            "negative delta",
            format!(r#"{{"namespace": "{KUADRANT_NS}", "values": {values}, "delta": -5}}"#),
            "",
        ),
        (
            "a value that is not a string",
            format!(
                r#"{{"namespace": "{KUADRANT_NS}", "values": {{"tokenlimit.free__065bb34d": 1, "auth.identity.userid": "alice"}}, "delta": 1}}"#
            ),
            "invalid type",
        ),
        (
            "values as a list",
            format!(r#"{{"namespace": "{KUADRANT_NS}", "values": ["alice"], "delta": 1}}"#),
            "invalid type",
        ),
        (
            "namespace as a number",
            format!(r#"{{"namespace": 7, "values": {values}, "delta": 1}}"#),
            "invalid type",
        ),
    ];
    for path in ["/check", "/report", "/check_and_report"] {
        for (what, request, mentions) in &cases {
            let response = http.post_raw(path, request.clone()).await;
            let status = response.status();
            let reason = response.text().await.unwrap();
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{what} on {path}: {request}"
            );
            assert!(
                !reason.trim().is_empty(),
                "{what} on {path}: no reason given"
            );
            assert!(
                reason.contains(mentions),
                "{what} on {path}: the reason {reason:?} does not mention {mentions:?}"
            );
        }
    }
    assert!(http.counters(KUADRANT_NS).await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_body_over_max_message_bytes_is_413() {
    let options = Options {
        bounds: RequestBounds {
            max_message_bytes: 256,
            ..RequestBounds::default()
        },
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    let http = Http::new(&server);

    let small = body(KUADRANT_NS, free_user("alice"), 1).to_string();
    assert!(small.len() <= 256);
    let response = http.post_raw("/check_and_report", small).await;
    assert_eq!(response.status(), StatusCode::OK);

    let big = body(
        KUADRANT_NS,
        json!({
            "tokenlimit.free__065bb34d": "1",
            "auth.identity.userid": "alice",
            "padding": "x".repeat(300),
        }),
        1,
    )
    .to_string();
    for path in ["/check", "/report", "/check_and_report"] {
        let response = http.post_raw(path, big.clone()).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
    // The refused calls charged nothing.
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(49));
    server.shutdown().await;
}

#[tokio::test]
async fn too_many_or_too_long_values_are_400() {
    let options = Options {
        bounds: RequestBounds {
            max_descriptor_entries: 3,
            max_entry_bytes: 16,
            ..RequestBounds::default()
        },
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    let http = Http::new(&server);

    let three = json!({"kind": "api", "user": "u", "x": "y"});
    let four = json!({"kind": "api", "user": "u", "x": "y", "z": "w"});
    for path in ["/check", "/report", "/check_and_report"] {
        let response = http.post(path, &body("plain", four.clone(), 1)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let reason = response.text().await.unwrap();
        assert!(
            reason.contains("4 entries") && reason.contains('3'),
            "{path}: {reason:?}"
        );

        let long = json!({"kind": "api", "user": "u".repeat(17)});
        let response = http.post(path, &body("plain", long, 1)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let reason = response.text().await.unwrap();
        assert!(
            reason.contains("17 bytes") && reason.contains("16"),
            "{path}: {reason:?}"
        );
    }
    assert!(http.counters("plain").await.is_empty());

    // At the bounds exactly: fine.
    let (status, _) = http
        .call("/check_and_report", &body("plain", three, 1))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = http
        .call(
            "/check_and_report",
            &body("plain", json!({"kind": "api", "user": "u".repeat(16)}), 1),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining("plain", "u").await, Some(4));
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_methods_and_paths() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    let client = reqwest::Client::new();
    for path in ["/check", "/report", "/check_and_report"] {
        let response = client.get(http.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
    let response = client
        .post(http.url("/limits/plain"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let response = client.get(http.url("/nothing")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn an_empty_namespace_is_400() {
    let server = TestServer::start(LIMITS).await;
    let http = Http::new(&server);
    for path in ["/check", "/report", "/check_and_report"] {
        let response = http.post(path, &body("", json!({"user": "u"}), 1)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let reason = response.text().await.unwrap();
        assert!(reason.contains("namespace"), "{path}: {reason:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_counter_store_is_503_and_keeps_live_counters() {
    let options = Options {
        capacity: 1,
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    let http = Http::new(&server);
    let (status, _) = http
        .call(
            "/check_and_report",
            &body(KUADRANT_NS, free_user("alice"), 10),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // bob would need a second counter: refused as "retry later", alice's is not evicted.
    for path in ["/report", "/check_and_report"] {
        let response = http
            .post(path, &body(KUADRANT_NS, free_user("bob"), 1))
            .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(!response.text().await.unwrap().is_empty(), "{path}");
    }
    // A read-only check needs no counter.
    let (status, _) = http
        .call("/check", &body(KUADRANT_NS, free_user("bob"), 1))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining(KUADRANT_NS, "alice").await, Some(40));
    assert_eq!(http.remaining(KUADRANT_NS, "bob").await, None);

    // Once alice's window has ended its slot is reclaimed for bob.
    server.clock.advance_ms(60_000);
    let (status, _) = http
        .call("/check_and_report", &body(KUADRANT_NS, free_user("bob"), 1))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(http.remaining(KUADRANT_NS, "bob").await, Some(49));
    server.shutdown().await;
}

#[tokio::test]
async fn asm_update_answers_what_was_really_charged() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/limits/asm-user-types.yaml"
    ))
    .unwrap();
    let server = TestServer::start(&yaml).await;
    let update = |body: serde_json::Value| {
        let url = format!("{}/update_ratelimit_record", server.http_base);
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    // One key listed three times is charged three times.
    let key = "regular-user";
    let r =
        update(serde_json::json!({"ratelimit_keys": [key, key, key], "total_tokens": 10})).await;
    assert_eq!(r["charged"], 30);
    // A sum past what a counter holds is charged (and answered) as the counters saturate.
    let r = update(serde_json::json!({"ratelimit_keys": ["subscriber"],
        "prompt_tokens": u64::MAX, "completion_tokens": 5}))
    .await;
    assert_eq!(r["charged"], 9_007_199_254_740_991u64);
    // A key no limit applies to is charged nothing.
    let r = update(serde_json::json!({"ratelimit_keys": ["nobody"], "total_tokens": 10})).await;
    assert_eq!(r["charged"], 0);
}

// ---------------------------------------------------------------------------------------------
// POST /explain

const EXPLAINED: &str = r#"
- name: free
  namespace: explain
  max_value: 50
  seconds: 60
  conditions: ["descriptors[0].tier == 'free'"]
  variables: ["descriptors[0].user"]
- name: gold
  namespace: explain
  max_value: 200
  seconds: 60
  conditions: ["descriptors[0].tier == 'gold'"]
  variables: ["descriptors[0].user"]
- name: per-model
  namespace: explain
  max_value: 1000
  seconds: 60
  variables: ["descriptors[0].model"]
- name: typed
  namespace: explain
  max_value: 5
  seconds: 60
  conditions: ["descriptors[0].tier > 3"]
- name: everyone
  namespace: explain
  max_value: 60
  seconds: 60
"#;

/// The explanation of one limit, by name.
fn explained<'v>(body: &'v Value, name: &str) -> &'v Value {
    body["limits"]
        .as_array()
        .and_then(|limits| limits.iter().find(|l| l["limit"]["name"] == name))
        .unwrap_or_else(|| panic!("no limit {name} in {body:#}"))
}

#[tokio::test]
async fn explain_says_which_limits_apply_and_why_the_others_do_not() {
    let server = TestServer::start(EXPLAINED).await;
    let http = Http::new(&server);
    let alice = json!({"tier": "free", "user": "alice"});
    let (status, _) = http
        .call("/report", &body("explain", alice.clone(), 45))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.clock.advance_ms(10_000);

    let ask = json!({"namespace": "explain", "values": alice});
    let (status, body) = http.call("/explain", &ask).await;
    assert_eq!(status, StatusCode::OK, "{body:#}");
    assert_eq!(body["namespace_has_limits"], true);
    assert_eq!(body["delta"], 1, "delta defaults to 1");
    let names: Vec<&str> = body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["limit"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["free", "gold", "per-model", "typed", "everyone"]);

    // The limits that apply, with the counter each names and its usage.
    let free = explained(&body, "free");
    assert_eq!(free["applies"], true, "{free:#}");
    assert_eq!(
        free["set_variables"],
        json!({"descriptors[0].user": "alice"})
    );
    assert_eq!(free["counter"]["usage"], 45);
    assert_eq!(free["counter"]["remaining"], 5);
    assert_eq!(free["counter"]["reset_in_ms"], 50_000);
    assert_eq!(free["counter"]["admits_delta"], true);
    let everyone = explained(&body, "everyone");
    assert_eq!(everyone["applies"], true);
    assert_eq!(everyone["counter"]["remaining"], 15);

    // And why the others do not.
    let gold = explained(&body, "gold");
    assert_eq!(gold["applies"], false);
    assert_eq!(gold["reason"]["kind"], "condition_false");
    assert_eq!(gold["reason"]["role"], "condition");
    assert_eq!(
        gold["reason"]["expression"],
        "descriptors[0].tier == 'gold'"
    );
    assert!(gold.get("counter").is_none(), "{gold:#}");
    let per_model = explained(&body, "per-model");
    assert_eq!(per_model["reason"]["kind"], "missing", "{per_model:#}");
    assert_eq!(per_model["reason"]["role"], "variable");
    assert_eq!(per_model["reason"]["expression"], "descriptors[0].model");
    let typed = explained(&body, "typed");
    assert_eq!(typed["reason"]["kind"], "failed", "{typed:#}");
    assert!(
        typed["reason"]["message"]
            .as_str()
            .unwrap()
            .starts_with("condition `descriptors[0].tier > 3` failed"),
        "{typed:#}"
    );

    assert_eq!(body["decision"]["code"], "OK");
    assert_eq!(body["decision"]["check_status"], 200);
    assert_eq!(body["decision"]["limited_by"], Value::Null);

    // With a cost that does not fit, the check would refuse, and says which limit refuses.
    let ask =
        json!({"namespace": "explain", "values": {"tier": "free", "user": "alice"}, "delta": 6});
    let (status, body) = http.call("/explain", &ask).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["decision"]["code"], "OVER_LIMIT", "{body:#}");
    assert_eq!(body["decision"]["check_status"], 429);
    assert_eq!(body["decision"]["limited_by"]["name"], "free");
    assert_eq!(body["decision"]["retry_after_ms"], 50_000);
    assert_eq!(explained(&body, "free")["counter"]["admits_delta"], false);
    assert_eq!(
        explained(&body, "everyone")["counter"]["admits_delta"],
        true
    );
    // /check agrees.
    let check = body_of_check(&http, 6).await;
    assert_eq!(check, StatusCode::TOO_MANY_REQUESTS);

    // Explaining changed nothing: no charge, no counter for a user never seen.
    assert_eq!(http.remaining("explain", "alice").await, Some(5));
    let bob = json!({"namespace": "explain", "values": {"tier": "free", "user": "bob"}});
    let (_, body) = http.call("/explain", &bob).await;
    assert_eq!(explained(&body, "free")["counter"]["usage"], 0);
    assert_eq!(explained(&body, "free")["counter"]["remaining"], 50);
    assert_eq!(http.remaining("explain", "bob").await, None);
    server.shutdown().await;
}

async fn body_of_check(http: &Http<'_>, delta: u64) -> StatusCode {
    let values = json!({"tier": "free", "user": "alice"});
    http.post("/check", &body("explain", values, delta))
        .await
        .status()
}

#[tokio::test]
async fn explain_of_a_namespace_without_limits_says_so() {
    let server = TestServer::start(EXPLAINED).await;
    let http = Http::new(&server);
    let ask = json!({"namespace": "explian", "values": {"user": "alice"}, "delta": 3});
    let (status, body) = http.call("/explain", &ask).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["namespace_has_limits"], false);
    assert_eq!(body["limits"], json!([]));
    assert_eq!(body["decision"]["code"], "OK");
    assert!(
        body["note"].as_str().unwrap().contains("no limits"),
        "{body:#}"
    );
    // Malformed bodies are refused like /check's.
    for bad in [
        json!({"namespace": "", "values": {}}),
        json!({"values": {}}),
        json!({"namespace": "explain", "values": {"user": 7}}),
    ] {
        let response = http.post("/explain", &bad).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    server.shutdown().await;
}
