//! envoyproxy/ratelimit's configuration tests, in our words: its example configurations load
//! and match as it specifies (through a real gRPC client), its broken ones are refused with
//! an error that names the file, the domain, the descriptor and the field; and the real
//! binary runs from its Deployment's environment (RUNTIME_ROOT layout, REDIS_URL as
//! host:port, GRPC_PORT/PORT, response headers) and hot-reloads its directory.

mod common;

use std::path::Path;
use std::time::Duration;

use common::process::{self, PATIENCE, Server, command, free_ports, loopback};
use common::*;
use ratekeeper::limits::{RatelimitSettings, load_path};
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, rate_limit::Unit,
};

/// envoyproxy/ratelimit's basic example, in its shape: nested keys, defaults and specific
/// values, a value without limit, units from second to day, unlimited, names.
const BASIC: &str = r#"
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - key: subkey1
        rate_limit: {unit: second, requests_per_unit: 5}
      - key: subkey1
        value: subvalue1
        rate_limit: {unit: second, requests_per_unit: 10}
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: key2
    value: value2
    rate_limit: {unit: minute, requests_per_unit: 30}
  - key: key2
    value: value3
  - key: key3
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: key4
    rate_limit: {name: key4_rate_limit, unit: day, requests_per_unit: 1}
  - key: key5
    value: value5
    rate_limit: {unit: day, requests_per_unit: 15}
    descriptors:
      - key: subkey5
        value: subvalue5
        rate_limit: {unit: day, requests_per_unit: 25}
  - key: key6
    rate_limit: {unlimited: true}
  - key: key7
    detailed_metric: true
    rate_limit: {unit: week, requests_per_unit: 70}
  - key: key8
    value_to_metric: true
    rate_limit: {unit: month, requests_per_unit: 80}
  - key: key9
    rate_limit: {unit: YEAR, requests_per_unit: 90}
"#;

fn limit_of(r: &RateLimitResponse) -> Option<(u32, i32, String)> {
    let l = r.statuses[0].current_limit.as_ref()?;
    Some((l.requests_per_unit, l.unit, l.name.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_basic_configuration_matches_as_envoyproxy_ratelimit_specifies() {
    let server = TestServer::start(BASIC).await;
    let ask = async |entries: &[(&str, &str)]| {
        let r = server
            .should(request("test-domain", vec![descriptor(entries)], 0))
            .await;
        limit_of(&r)
    };
    let unit = |u: Unit| u as i32;
    assert_eq!(
        ask(&[("key1", "value1")]).await,
        None,
        "no limit at that level"
    );
    assert_eq!(
        ask(&[("key1", "value1"), ("subkey1", "x")]).await,
        Some((5, unit(Unit::Second), String::new()))
    );
    assert_eq!(
        ask(&[("key1", "value1"), ("subkey1", "subvalue1")]).await,
        Some((10, unit(Unit::Second), String::new()))
    );
    assert_eq!(ask(&[("key1", "value2"), ("subkey1", "x")]).await, None);
    assert_eq!(ask(&[("key2", "x")]).await.map(|l| l.0), Some(20));
    assert_eq!(ask(&[("key2", "value2")]).await.map(|l| l.0), Some(30));
    assert_eq!(
        ask(&[("key2", "value3")]).await,
        None,
        "a value without limit"
    );
    assert_eq!(ask(&[("key2", "x"), ("extra", "y")]).await, None);
    assert_eq!(
        ask(&[("key3", "x")]).await.map(|l| l.1),
        Some(unit(Unit::Hour))
    );
    assert_eq!(
        ask(&[("key4", "x")]).await,
        Some((1, unit(Unit::Day), "key4_rate_limit".to_string()))
    );
    assert_eq!(ask(&[("key5", "value5")]).await.map(|l| l.0), Some(15));
    assert_eq!(
        ask(&[("key5", "value5"), ("subkey5", "subvalue5")])
            .await
            .map(|l| l.0),
        Some(25)
    );
    assert_eq!(ask(&[("key5", "value5"), ("subkey5", "other")]).await, None);
    assert_eq!(ask(&[("key6", "x")]).await, None, "unlimited");
    assert_eq!(
        ask(&[("key7", "x")]).await.map(|l| l.1),
        Some(unit(Unit::Week))
    );
    assert_eq!(
        ask(&[("key8", "x")]).await.map(|l| l.1),
        Some(unit(Unit::Month))
    );
    assert_eq!(
        ask(&[("key9", "x")]).await.map(|l| l.1),
        Some(unit(Unit::Year))
    );
    // An unknown domain: no limit.
    let r = server
        .should(request(
            "other-domain",
            vec![descriptor(&[("key2", "x")])],
            0,
        ))
        .await;
    assert_eq!((code(&r), limit_of(&r)), (Code::Ok, None));
    // Several descriptors: one status each, in order.
    let r = server
        .should(request(
            "test-domain",
            vec![descriptor(&[("key3", "a")]), descriptor(&[("key4", "b")])],
            0,
        ))
        .await;
    assert_eq!(r.statuses.len(), 2);
    assert_eq!(
        r.statuses[1]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        1
    );
}

/// The problems loading `files` (name, content) from a directory report.
fn problems(files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = if files.len() == 1 {
        dir.path().join(files[0].0)
    } else {
        dir.path().to_path_buf()
    };
    match load_path(&path, RatelimitSettings::default()) {
        Ok(_) => panic!("{files:?} loaded"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} is not in:\n{text}");
    }
}

#[test]
fn broken_configurations_are_refused_naming_file_domain_descriptor_and_field() {
    let one = |text: &str| problems(&[("config.yaml", text)]);
    // A unit that does not exist.
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    value: v\n    rate_limit: {unit: days, requests_per_unit: 5}",
        ),
        &[
            "config.yaml",
            "domain \"d\"",
            "descriptor k_v",
            "rate_limit.unit",
            "\"days\"",
        ],
    );
    // Not YAML at all.
    assert_contains(
        &one("domain: d\ndescriptors: [\n"),
        &["config.yaml", "not valid YAML"],
    );
    // An empty domain, an empty key.
    assert_contains(
        &one("domain: ''\ndescriptors: []"),
        &["`domain` must not be empty"],
    );
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: ''\n    rate_limit: {unit: second, requests_per_unit: 1}",
        ),
        &["descriptors[0]", "`key` must not be empty"],
    );
    // The same key and value twice at one level.
    assert_contains(
        &one("domain: d\ndescriptors:\n  - {key: a, value: b}\n  - {key: a, value: b}"),
        &["descriptor a_b", "duplicate"],
    );
    // Misspelled fields, at the descriptor and in rate_limit.
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    ratelimit: {unit: second, requests_per_unit: 1}",
        ),
        &["descriptor k", "unknown field `ratelimit`"],
    );
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    value: v\n    rate_limit: {unit: day, requestsperunit: 5}",
        ),
        &[
            "descriptor k_v",
            "unknown field `rate_limit.requestsperunit`",
            "missing field `rate_limit.requests_per_unit`",
        ],
    );
    // Descriptors that are not mappings; a key that is not a text.
    assert_contains(
        &one("domain: d\ndescriptors:\n  - a\n  - b"),
        &["descriptors[0]", "descriptors[1]", "expected a mapping"],
    );
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, 5: x}",
        ),
        &["not a text"],
    );
    // replaces: an entry without name, or naming itself.
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {name: self, replaces: [{name: }], unit: second, requests_per_unit: 5}",
        ),
        &["rate_limit.replaces", "without `name`"],
    );
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {name: self, replaces: [{name: self}], unit: second, requests_per_unit: 5}",
        ),
        &["rate_limit.replaces", "cannot replace itself"],
    );
    // unlimited with a unit; share_threshold without a wildcard.
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: foo\n    rate_limit: {unlimited: true, unit: day, requests_per_unit: 25}",
        ),
        &["descriptor foo", "rate_limit.unit", "unlimited"],
    );
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: files\n    value: exact\n    share_threshold: true\n    rate_limit: {unit: minute, requests_per_unit: 1}",
        ),
        &["descriptor files_exact", "share_threshold", "wildcard"],
    );
    // Nested paths are named in full.
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: a\n    value: b\n    descriptors:\n      - key: c\n        rate_limit: {unit: fortnight, requests_per_unit: 1}",
        ),
        &["descriptor a_b.c", "fortnight"],
    );
    // Our extensions are checked as strictly.
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 5, algorithm: leaky}",
        ),
        &["rate_limit.algorithm", "leaky"],
    );
    assert_contains(
        &one(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 5, refill_tokens: 2}",
        ),
        &["rate_limit.refill_tokens", "token_bucket"],
    );
    // Two files, one domain: both named (and with the other format too).
    let env =
        "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, requests_per_unit: 1}}";
    assert_contains(
        &problems(&[("a.yaml", env), ("b.yaml", env)]),
        &["a.yaml", "b.yaml", "domain \"d\"", "MERGE_DOMAIN_CONFIG"],
    );
    assert_contains(
        &problems(&[
            ("a.yaml", env),
            ("b.yaml", "- {namespace: d, max_value: 1, seconds: 1}"),
        ]),
        &["a.yaml", "b.yaml", "domain \"d\""],
    );
}

#[test]
fn merged_domains_and_extensions_load() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "a.yaml",
        "domain: d\ndescriptors:\n  - {key: k1, rate_limit: {unit: second, requests_per_unit: 1}}",
    );
    write(
        "b.yaml",
        "domain: d\ndescriptors:\n  - {key: k2, rate_limit: {unit: minute, requests_per_unit: 10, algorithm: token_bucket, refill_tokens: 5}}",
    );
    let merge = RatelimitSettings {
        merge_domains: true,
        ..RatelimitSettings::default()
    };
    let set = load_path(dir.path(), merge).unwrap();
    assert_eq!(set.namespace("d").len(), 2);
    // The same key in both files is still a duplicate.
    write(
        "c.yaml",
        "domain: d\ndescriptors:\n  - {key: k1, rate_limit: {unit: second, requests_per_unit: 2}}",
    );
    let e = load_path(dir.path(), merge).err().unwrap().to_string();
    assert_contains(&e, &["c.yaml", "duplicate"]);
}

/// The binary, configured the way envoyproxy/ratelimit's Deployment configures it.
fn envoy_deployment(root: &Path, redis: &str) -> (std::process::Command, u16, u16) {
    let (grpc, http) = free_ports();
    let mut command = command();
    command
        .env("RUNTIME_ROOT", root)
        .env("RUNTIME_SUBDIRECTORY", "ratelimit")
        .env("RUNTIME_WATCH_ROOT", "false")
        .env("USE_STATSD", "false")
        .env("LOG_LEVEL", "debug")
        .env("REDIS_SOCKET_TYPE", "tcp")
        .env("REDIS_URL", redis)
        .env("GRPC_PORT", grpc.to_string())
        .env("PORT", http.to_string())
        .env("ENVOY_RLS_HOST", "127.0.0.1")
        .env("HTTP_API_HOST", "127.0.0.1")
        .env("LIMIT_RESPONSE_HEADERS_ENABLED", "true")
        .env("REDIS_KEY_PREFIX", format!("rlcfg{}", std::process::id()));
    (command, grpc, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_deployment_environment_runs_ratekeeper_and_reloads_the_directory() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("ratelimit").join("config");
    std::fs::create_dir_all(&config).unwrap();
    let env_format = |per_minute: u32| {
        format!(
            "domain: api\ndescriptors:\n  - key: user\n    rate_limit: {{unit: minute, requests_per_unit: {per_minute}}}\n"
        )
    };
    std::fs::write(config.join("api.yaml"), env_format(2)).unwrap();
    std::fs::write(
        config.join("limitador.yaml"),
        "- {namespace: other, max_value: 1, seconds: 60}\n",
    )
    .unwrap();
    let redis = redis::shared_url();
    let address = redis.trim_start_matches("redis://").trim_end_matches('/');
    let (command, grpc, http) = envoy_deployment(root.path(), address);
    let server = Server::spawn(command, loopback(grpc), loopback(http)).await;
    let user = |name: &str| request("api", vec![descriptor(&[("user", name)])], 0);

    let r = server.should(user("a")).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(header(&r, "RateLimit-Limit"), Some("2"));
    assert_eq!(header(&r, "RateLimit-Remaining"), Some("1"));
    assert!(header(&r, "RateLimit-Reset").is_some());
    server.should(user("a")).await;
    assert_eq!(code(&server.should(user("a")).await), Code::OverLimit);
    // The Limitador-format file beside it is served too.
    let other = request("other", vec![descriptor(&[("x", "y")])], 0);
    server.should(other.clone()).await;
    assert_eq!(code(&server.should(other).await), Code::OverLimit);

    // A new version of a file in the directory is applied (and counters kept: same limit).
    std::fs::write(config.join("api.yaml"), env_format(5)).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE + Duration::from_secs(5);
    loop {
        let r = server.should(user("b")).await;
        if r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit
            == 5
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reloaded:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = server.should(user("a")).await;
    assert_eq!(
        (code(&r), r.statuses[0].limit_remaining),
        (Code::Ok, 1),
        "a's counter kept its 4 hits"
    );
    // A broken version is refused; the limits in force stay.
    std::fs::write(
        config.join("api.yaml"),
        "domain: api\ndescriptors: [{key: user, rate_limit: {unit: eon}}]",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = server.should(user("c")).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        5
    );
    assert!(server.log().contains("NOT reloaded"), "{}", server.log());
}

#[test]
fn settings_it_cannot_honour_stop_the_start_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("config")).unwrap();
    let (mut command, _, _) = envoy_deployment(root.path(), "127.0.0.1:1");
    command.env_remove("RUNTIME_SUBDIRECTORY");
    command.env("CONFIG_TYPE", "GRPC_XDS_DELTA");
    let output = command.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_contains(&stderr, &["CONFIG_TYPE", "xDS"]);
}

/// The shipped example: a check on the request path, the tokens charged when the response is
/// done, per user and model, in the shape Envoy Gateway generates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_token_budget_example_charges_tokens_per_user_and_model() {
    let yaml =
        std::fs::read_to_string(process::manifest_dir().join("limits/ratelimit-llm-tokens.yaml"))
            .unwrap();
    let server = TestServer::start(&yaml).await;
    let domain = "default/envoy-ai-gateway-basic";
    let rule = "default/usage-rate-limit/rule/0/match/0";
    let entries = |user: &'static str, model: &'static str| {
        [
            (rule, rule),
            ("rule-0-match-0-user", user),
            ("rule-0-match-0-model", model),
        ]
    };
    let ask = async |user, model, hits| {
        let d = descriptor_with_hits(&entries(user, model), hits);
        server.should(request(domain, vec![d], 0)).await
    };
    let r = ask("alice", "gpt-4o-mini", 0).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 1000));
    let r = ask("alice", "gpt-4o-mini", 900).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    ask("alice", "gpt-4o-mini", 300).await;
    assert_eq!(code(&ask("alice", "gpt-4o-mini", 0).await), Code::OverLimit);
    assert_eq!(
        code(&ask("bob", "gpt-4o-mini", 0).await),
        Code::Ok,
        "per user"
    );
    let r = ask("alice", "gpt-4o", 0).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        200
    );
    // The top of the hour starts a new budget.
    server.clock.advance_ms(3_600_000);
    assert_eq!(code(&ask("alice", "gpt-4o-mini", 0).await), Code::Ok);
}
