//! The real binary, black box: its command line and environment (Limitador's), `--validate`,
//! serving gRPC and HTTP on the addresses it is given, and a clean exit on SIGTERM.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::process::*;
use common::{code, header};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

/// Runs the binary to completion (for commands that exit on their own, e.g. `--help`).
fn run(args: &[&str]) -> Output {
    let mut command = command();
    command.args(args);
    run_command(command, args)
}

/// Runs `command` to completion, bounded; `args` describe it in failures.
fn run_command(mut command: std::process::Command, args: &[&str]) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a command that should exit at once must not hang the test suite.
    let deadline = Instant::now() + PATIENCE;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "ratekeeper {args:?} did not exit within {PATIENCE:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn limits_file() -> PathBuf {
    manifest_dir().join("limits/llm-tiers.yaml")
}

// ---------------------------------------------------------------------------------------------
// --help, --version

#[test]
fn help_mentions_every_flag() {
    let output = run(&["--help"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let help = stdout(&output);
    for (short, long) in [
        (Some("-b"), "--rls-ip"),
        (Some("-p"), "--rls-port"),
        (Some("-B"), "--http-ip"),
        (Some("-P"), "--http-port"),
        (Some("-l"), "--limit-name-in-labels"),
        (Some("-H"), "--rate-limit-headers"),
        (None, "--validate"),
        (None, "--structured-logs"),
        (None, "--max-descriptors"),
        (None, "--max-descriptor-entries"),
        (None, "--max-entry-bytes"),
        (None, "--max-message-bytes"),
    ] {
        assert!(help.contains(long), "--help lacks {long}:\n{help}");
        if let Some(short) = short {
            assert!(
                help.contains(&format!("{short}, {long}")),
                "--help lacks {short}, {long}:\n{help}"
            );
        }
    }
    assert!(help.contains("-v"), "--help lacks -v:\n{help}");
    for word in [
        "LIMITS_FILE",
        "ENVOY_RLS_HOST",
        "ENVOY_RLS_PORT",
        "HTTP_API_HOST",
        "HTTP_API_PORT",
        "RATE_LIMIT_HEADERS",
        "DRAFT_VERSION_03",
        "memory",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }

    let output = run(&["memory", "--help"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let help = stdout(&output);
    assert!(
        help.contains("-c, --cache"),
        "memory --help lacks -c, --cache:\n{help}"
    );
}

#[test]
fn version_names_the_program() {
    let output = run(&["--version"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("ratekeeper ") && text.contains(env!("CARGO_PKG_VERSION")),
        "{text}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let cases: [(&[&str], &str); 4] = [
        // No limits file at all.
        (&[], "LIMITS_FILE"),
        // A header mode Limitador does not have.
        (
            &["-H", "DRAFT_VERSION_99", "limits/llm-tiers.yaml"],
            "DRAFT_VERSION_99",
        ),
        // An address that is not one.
        (&["-b", "not-an-ip", "limits/llm-tiers.yaml"], "not-an-ip"),
        // A limits file that does not exist: it is named.
        (
            &["--validate", "limits/no-such-file.yaml"],
            "no-such-file.yaml",
        ),
    ];
    for (args, named) in cases {
        let output = run(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&output).contains(named),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

/// A port that is taken: the error names the listener and its address.
#[test]
fn cannot_listen_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (flags, named) in [
        (["-p", port.as_str(), "-P", "0"], "gRPC on 127.0.0.1:"),
        (["-p", "0", "-P", port.as_str()], "HTTP on 127.0.0.1:"),
    ] {
        let output = run(&[
            "-b",
            "127.0.0.1",
            "-B",
            "127.0.0.1",
            flags[0],
            flags[1],
            flags[2],
            flags[3],
            "limits/llm-tiers.yaml",
        ]);
        let err = stderr(&output);
        assert!(!output.status.success(), "{err}");
        assert_eq!(
            err.matches(&format!("cannot listen: {named}{port}"))
                .count(),
            1,
            "said once: {flags:?}: {err}"
        );
    }
    // With logging switched off the reason still reaches stderr, once.
    let mut quiet = command();
    quiet.env("RUST_LOG", "off");
    let args = [
        "-b",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "limits/llm-tiers.yaml",
    ];
    quiet.args(args);
    let output = run_command(quiet, &args);
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert_eq!(
        err.matches("cannot listen: gRPC on 127.0.0.1:").count(),
        1,
        "{err}"
    );
}

/// A bad `RATE_LIMIT_CONFIG` (ASM's rules) stops the server at start, naming the rule and
/// the field; so does a limits file that also has limits in the ASM namespace.
#[test]
fn bad_rate_limit_config_is_refused_naming_the_rule_and_field() {
    let rule = |regex: &str, max_tokens: &str| {
        format!(
            r#"{{"rate_limit_key_regex": {regex:?}, "max_tokens": {max_tokens}, "tokens_per_fill": 50, "fill_interval_second": 30, "redis_expired_seconds": 300}}"#
        )
    };
    let good = rule("regular-user.*", "200");
    let cases: [(String, &[&str], &[&str]); 6] = [
        ("not json".into(), &[], &["RATE_LIMIT_CONFIG", "not valid JSON"]),
        (
            format!("[{good}, {}]", rule("(subscriber", "1000")),
            &[],
            &["rule #2", "index 1", "rate_limit_key_regex", "invalid regex"],
        ),
        (
            format!("[{}, {good}]", rule("subscriber.*", "0")),
            &[],
            &["rule #1", "index 0", "max_tokens"],
        ),
        (
            format!("[{}]", rule("subscriber.*", "-5")),
            &[],
            &["rule #1", "max_tokens"],
        ),
        (
            r#"[{"rate_limit_key_regex": "a", "max_tokens": 1, "tokens_per_fill": 1, "fill_interval_second": 1}]"#.into(),
            &[],
            &["rule #1", "redis_expired_seconds"],
        ),
        // Good rules, but the file has limits in their namespace too: both sources are named.
        (
            format!("[{good}]"),
            &["limits/asm-user-types.yaml"],
            &["\"asm\"", "limits/asm-user-types.yaml", "RATE_LIMIT_CONFIG"],
        ),
    ];
    for (config, file, mentions) in cases {
        let mut child = command();
        child
            .env("RATE_LIMIT_CONFIG", &config)
            .args(["-b", "127.0.0.1", "-p", "0", "-B", "127.0.0.1", "-P", "0"])
            .args(file);
        let output = run_command(child, file);
        assert!(!output.status.success(), "{config}: the server started");
        let err = stderr(&output);
        for mention in mentions {
            assert!(
                err.contains(mention),
                "{config}: stderr lacks {mention:?}:\n{err}"
            );
        }
    }
    // The good rules alone start (and `--validate` shows them as limits).
    let mut validate = command();
    validate
        .env("RATE_LIMIT_CONFIG", format!("[{good}]"))
        .arg("--validate");
    let output = run_command(validate, &["--validate"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("name: regular-user.*"),
        "{}",
        stdout(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// --validate

#[test]
fn validate_prints_the_limits_as_yaml() {
    let output = run(&["--validate", "limits/llm-tiers.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: serde_yaml::Value = serde_yaml::from_str(&stdout(&output))
        .unwrap_or_else(|e| panic!("not YAML ({e}):\n{}", stdout(&output)));
    let limits = printed.as_sequence().expect("a list of limits");
    let summary: Vec<(String, String, u64, u64)> = limits
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["namespace"].as_str().unwrap().to_string(),
                l["max_value"].as_u64().unwrap(),
                l["seconds"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("free", "llm/llm-route", 50, 60),
        ("gold", "llm/llm-route", 200, 60),
        ("llm-free", "llm_tokens", 50, 60),
        ("llm-gold", "llm_tokens", 200, 60),
    ]
    .map(|(n, ns, m, s)| (n.to_string(), ns.to_string(), m, s));
    assert_eq!(summary, expected);
    assert_eq!(
        limits[0]["conditions"][0].as_str(),
        Some(r#"descriptors[0]["tokenlimit.free__065bb34d"] == "1""#)
    );
    assert_eq!(
        limits[0]["variables"][0].as_str(),
        Some(r#"descriptors[0]["auth.identity.userid"]"#)
    );

    // What it prints is itself a valid limits file that loads to the same limits.
    let dir = tempfile::tempdir().unwrap();
    let reprinted = dir.path().join("reprinted.yaml");
    std::fs::write(&reprinted, &output.stdout).unwrap();
    let again = run(&["--validate", reprinted.to_str().unwrap()]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), stdout(&output));

    // It ends with a summary line, on stderr (stdout stays YAML).
    assert_eq!(
        stderr(&output).lines().last(),
        Some("OK: 4 limits in 2 namespaces"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn validate_summarises_a_single_limit_and_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.yaml");
    std::fs::write(&one, "- {namespace: a, max_value: 1, seconds: 1}\n").unwrap();
    let output = run(&["--validate", one.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stderr(&output).lines().last(),
        Some("OK: 1 limit in 1 namespace")
    );

    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "- {namespace: a, max_value: -5, seconds: 0}\n- {namespace: b, max_value: 1}\n",
    )
    .unwrap();
    let output = run(&["--validate", broken.to_str().unwrap()]);
    assert!(!output.status.success());
    assert_eq!(
        stderr(&output).lines().last(),
        Some("FAILED: 3 problems"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn validate_names_file_entry_and_field_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "missing-max-value.yaml",
            "- {name: ok, namespace: a, max_value: 1, seconds: 1}\n\
             - {name: gold, namespace: a, seconds: 60}\n",
            ["entry #2", "gold", "max_value"],
        ),
        (
            "unknown-field.yaml",
            "- name: free\n  namespace: a\n  max_value: 1\n  seconds: 1\n  max_vale: 3\n",
            ["entry #1", "free", "max_vale"],
        ),
        (
            // A wrong type names the field and the value.
            "wrong-type.yaml",
            "- {name: neg, namespace: a, max_value: -5, seconds: 1}\n",
            [
                "entry #1",
                "neg",
                "field `max_value`: expected a whole number >= 0, found -5",
            ],
        ),
        (
            // Every problem of one entry, not only the first.
            "many-problems.yaml",
            "- {name: many, namespace: a, max_value: ten, seconds: 0, foo: 1}\n",
            [
                "unknown field `foo`",
                "field `max_value`: expected a whole number >= 0, found \"ten\"",
                "field `seconds` must be at least 1, found 0",
            ],
        ),
        (
            "bad-cel.yaml",
            "- name: ok\n  namespace: a\n  max_value: 1\n  seconds: 1\n\
             - name: broken\n  namespace: a\n  max_value: 1\n  seconds: 2\n  \
             conditions: ['descriptors[0].x == \"1\"', 'descriptors[0][']\n",
            ["entry #2", "broken", "conditions[1]"],
        ),
    ];
    for (name, text, mentions) in cases {
        let path = dir.path().join(name);
        File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = run(&["--validate", path.to_str().unwrap()]);
        let err = stderr(&output);
        assert!(
            !output.status.success(),
            "{name}: --validate succeeded:\n{}",
            stdout(&output)
        );
        assert!(
            err.contains(name),
            "{name}: stderr does not name the file:\n{err}"
        );
        for mention in mentions {
            assert!(
                err.contains(mention),
                "{name}: stderr lacks {mention:?}:\n{err}"
            );
        }
        assert!(
            stdout(&output).trim().is_empty(),
            "{name}: a broken file printed limits:\n{}",
            stdout(&output)
        );

        // Without --validate a broken file does not start a server either.
        let output = run(&[
            "-b",
            "127.0.0.1",
            "-p",
            "0",
            "-B",
            "127.0.0.1",
            "-P",
            "0",
            path.to_str().unwrap(),
        ]);
        assert!(!output.status.success(), "{name}: the server started");
        assert!(stderr(&output).contains(name), "{}", stderr(&output));
    }
}

// ---------------------------------------------------------------------------------------------
// Serving

#[tokio::test]
async fn limitador_style_invocation_serves_http_and_grpc() {
    let server =
        Server::start_on_loopback(&["limits/llm-tiers.yaml", "memory", "-c", "1000"]).await;

    let status = server.status().await;
    for field in [
        "started_at",
        "config_applied_at",
        "config_version",
        "config_err_since",
    ] {
        assert!(
            status.get(field).is_some(),
            "/status lacks {field}: {status}"
        );
    }
    assert_eq!(status["config_version"], 0);

    let response = server.should(llm_tokens("alice", 30)).await;
    assert_eq!(code(&response), Code::Ok);
    assert_eq!(response.statuses.len(), 1);
    assert_eq!(response.statuses[0].limit_remaining, 20);
    let limit = response.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(limit.name, "llm-free");
    assert_eq!(limit.requests_per_unit, 50);
    // No -H: no headers.
    assert!(response.response_headers_to_add.is_empty(), "{response:?}");

    let response = server.should(llm_tokens("alice", 21)).await;
    assert_eq!(code(&response), Code::OverLimit);
    assert_eq!(response.statuses[0].limit_remaining, 20);
    // The HTTP API sees the same counters as gRPC.
    let url = format!("http://{}/counters/llm_tokens", server.http);
    let counters = common::get_json(&reqwest::Client::new(), &url).await;
    assert_eq!(counters[0]["remaining"], 20, "{counters}");
    assert_eq!(counters[0]["set_variables"]["descriptors[0].user"], "alice");
}

#[tokio::test]
async fn configured_only_through_the_environment() {
    let (rls_port, http_port) = free_ports();
    let mut command = command();
    command
        .env("LIMITS_FILE", limits_file())
        .env("ENVOY_RLS_HOST", "127.0.0.1")
        .env("ENVOY_RLS_PORT", rls_port.to_string())
        .env("HTTP_API_HOST", "127.0.0.1")
        .env("HTTP_API_PORT", http_port.to_string())
        .env("RATE_LIMIT_HEADERS", "DRAFT_VERSION_03");
    let server = Server::spawn(command, loopback(rls_port), loopback(http_port)).await;
    assert_eq!(server.status().await["config_version"], 0);

    let response = server.should(llm_tokens("bob", 10)).await;
    assert_eq!(code(&response), Code::Ok);
    assert_eq!(
        header(&response, "X-RateLimit-Limit"),
        Some(r#"50, 50;w=60;name="llm-free""#),
        "{response:?}"
    );
    assert_eq!(header(&response, "X-RateLimit-Remaining"), Some("40"));
    let reset: u64 = header(&response, "X-RateLimit-Reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset <= 60, "reset {reset}");
    assert_eq!(header(&response, "Retry-After"), None);

    let response = server.should(llm_tokens("bob", 41)).await;
    assert_eq!(code(&response), Code::OverLimit);
    assert_eq!(header(&response, "X-RateLimit-Remaining"), Some("40"));
    let retry: u64 = header(&response, "Retry-After")
        .unwrap_or_else(|| panic!("no Retry-After on OVER_LIMIT: {response:?}"))
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
}

#[tokio::test]
async fn the_command_line_wins_over_the_environment() {
    let (rls_port, http_port) = free_ports();
    let mut command = command();
    command
        // The environment points at a broken file and other ports; the flags win.
        .env("LIMITS_FILE", "/nonexistent/limits.yaml")
        .env("ENVOY_RLS_HOST", "127.0.0.1")
        .env("ENVOY_RLS_PORT", "1")
        .env("HTTP_API_HOST", "127.0.0.1")
        .env("HTTP_API_PORT", "1")
        .env("RATE_LIMIT_HEADERS", "DRAFT_VERSION_03")
        .args([
            "-p",
            &rls_port.to_string(),
            "-P",
            &http_port.to_string(),
            "-H",
            "NONE",
        ])
        .arg(limits_file());
    let server = Server::spawn(command, loopback(rls_port), loopback(http_port)).await;
    let response = server.should(llm_tokens("carol", 1)).await;
    assert_eq!(code(&response), Code::Ok);
    assert!(response.response_headers_to_add.is_empty(), "{response:?}");
}

#[tokio::test]
async fn memory_cache_bounds_the_live_counters() {
    let server = Server::start_on_loopback(&["limits/llm-tiers.yaml", "memory", "-c", "1"]).await;
    assert_eq!(code(&server.should(llm_tokens("first", 1)).await), Code::Ok);
    // The only slot is taken by a live counter: a second user cannot get one (never an
    // eviction that would reset the first).
    let error = server
        .try_should(llm_tokens("second", 1))
        .await
        .expect_err("a second counter fit in a cache of 1");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");
    let response = server.should(llm_tokens("first", 1)).await;
    assert_eq!(response.statuses[0].limit_remaining, 48);
}

#[tokio::test]
async fn sigterm_exits_cleanly() {
    let mut server = Server::start_on_loopback(&["limits/llm-tiers.yaml"]).await;
    // Serving, with a live gRPC connection open.
    let mut client = server.grpc().await;
    let response = client
        .should_rate_limit(llm_tokens("dave", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&response), Code::Ok);

    let status = server.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}; log:\n{}",
        server.log()
    );
    drop(client);
}

/// A peer that stops talking mid-conversation (a half-sent HTTP request; an HTTP/2 connection
/// that never answers the server's GOAWAY/PING) would hold a graceful shutdown forever:
/// `--shutdown-timeout` bounds it, and the exit is still clean.
#[tokio::test]
async fn sigterm_exits_after_the_shutdown_timeout_despite_stalled_clients() {
    let mut server =
        Server::start_on_loopback(&["--shutdown-timeout", "1", "limits/llm-tiers.yaml"]).await;

    let mut http = std::net::TcpStream::connect(server.http).unwrap();
    http.write_all(b"GET /status HTTP/1.1\r\nHost: ratekeeper\r\n")
        .unwrap();
    let mut grpc = std::net::TcpStream::connect(server.rls).unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame; then silence.
    grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();

    let status = server.terminate().await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{}", server.log());
    drop((http, grpc));
}

/// limitador-operator's command line, as kuadrant-operator's `Limitador` resource makes it
/// (`metricLabelsDefault: descriptors[1]`, `tracing: {endpoint: ""}`): ratekeeper starts and
/// serves (the labels themselves are tests/metric_labels.rs's).
#[tokio::test]
async fn limitador_operators_command_line_starts_and_serves() {
    let (rls_port, http_port) = free_ports();
    let mut command = command();
    command
        .args(["-b", "127.0.0.1", "-B", "127.0.0.1"])
        .args([
            "--rate-limit-headers",
            "DRAFT_VERSION_03",
            "--limit-name-in-labels",
        ])
        .args(["--tracing-endpoint", "", "-v"])
        .args(["--http-port", &http_port.to_string()])
        .args(["--rls-port", &rls_port.to_string()])
        .args(["--metric-labels-default", "descriptors[1]"])
        .args([limits_file().to_str().unwrap(), "memory"]);
    let server = Server::spawn(command, loopback(rls_port), loopback(http_port)).await;
    assert_eq!(code(&server.should(llm_tokens("zoe", 10)).await), Code::Ok);
    let log = server.log();
    assert!(
        !log.contains("--tracing-endpoint is accepted"),
        "an empty endpoint is no tracing at all: {log}"
    );
}
