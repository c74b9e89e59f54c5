//! Limitador's custom metric labels (`-L/--custom-metric-labels FILE`,
//! `--metric-labels-default CEL`) on a live server: the labels appear on `authorized_calls`,
//! `authorized_hits` and `limited_calls` as scraped from /metrics, each label's values are
//! bounded, and a bad labels file stops the start with a clear error.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::process::*;
use common::{code, descriptor, request};
use ratekeeper::metrics::MAX_VALUES_PER_LABEL;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

const LIMITS: &str = r#"
- {name: per-user, namespace: ml, max_value: 1, seconds: 60, variables: ["descriptors[0].user"]}
"#;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// The value of the series of `metric` whose labels are exactly `labels`.
async fn series(server: &Server, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = common::get_text(&format!("http://{}/metrics", server.http)).await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    scrape
        .samples
        .iter()
        .find(|s| {
            let got: BTreeMap<String, String> = (s.labels.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            s.metric == metric && got == wanted
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// ShouldRateLimit on `ml` for `user` (descriptor 0), with `extra` as descriptor 1.
async fn call(server: &Server, user: &str, extra: &[(&str, &str)]) -> Code {
    let mut descriptors = vec![descriptor(&[("user", user)])];
    if !extra.is_empty() {
        descriptors.push(descriptor(extra));
    }
    code(&server.should(request("ml", descriptors, 1)).await)
}

#[tokio::test]
async fn the_files_labels_and_the_default_map_label_the_call_metrics() {
    let limits = file(LIMITS);
    let labels = file("user: descriptors[0].user\n");
    let server = Server::start_on_loopback(&[
        "-l",
        "-L",
        labels.path().to_str().unwrap(),
        "--metric-labels-default",
        "descriptors[1]",
        limits.path().to_str().unwrap(),
    ])
    .await;

    assert_eq!(call(&server, "alice", &[("tier", "gold")]).await, Code::Ok);
    assert_eq!(
        call(&server, "alice", &[("tier", "gold")]).await,
        Code::OverLimit
    );
    // No descriptor 1: the default map gives nothing, the file's label is there.
    assert_eq!(call(&server, "bob", &[]).await, Code::Ok);

    let ns = ("limitador_namespace", "ml");
    let alice_gold = [ns, ("tier", "gold"), ("user", "alice")];
    assert_eq!(
        series(&server, "authorized_calls", &alice_gold).await,
        Some(1.0)
    );
    assert_eq!(
        series(&server, "authorized_hits", &alice_gold).await,
        Some(1.0)
    );
    let refused = [
        ns,
        ("limit_name", "per-user"),
        ("tier", "gold"),
        ("user", "alice"),
    ];
    assert_eq!(series(&server, "limited_calls", &refused).await, Some(1.0));
    let bob = [ns, ("user", "bob")];
    assert_eq!(series(&server, "authorized_calls", &bob).await, Some(1.0));
    assert_eq!(
        series(&server, "authorized_calls", &[ns])
            .await
            .unwrap_or(0.0),
        0.0,
        "every call carried a label, so none is counted without"
    );
}

#[tokio::test]
async fn each_label_takes_a_bounded_number_of_values() {
    let limits = file(LIMITS);
    let labels = file("user: descriptors[0].user\n");
    let labels_path = labels.path().to_str().unwrap();
    let server =
        Server::start_on_loopback(&["-L", labels_path, limits.path().to_str().unwrap()]).await;
    for i in 0..MAX_VALUES_PER_LABEL {
        assert_eq!(call(&server, &format!("u{i}"), &[]).await, Code::Ok);
    }
    assert_eq!(call(&server, "late-1", &[]).await, Code::Ok);
    assert_eq!(call(&server, "late-2", &[]).await, Code::Ok);

    let ns = ("limitador_namespace", "ml");
    assert_eq!(
        series(&server, "authorized_calls", &[ns, ("user", "u0")]).await,
        Some(1.0)
    );
    let last = format!("u{}", MAX_VALUES_PER_LABEL - 1);
    assert_eq!(
        series(&server, "authorized_calls", &[ns, ("user", &last)]).await,
        Some(1.0)
    );
    assert_eq!(
        series(&server, "authorized_calls", &[ns, ("user", "other")]).await,
        Some(2.0),
        "values past the bound share `other`"
    );
    assert_eq!(
        series(&server, "authorized_calls", &[ns, ("user", "late-1")]).await,
        None
    );
}

#[tokio::test]
async fn a_bad_labels_file_or_expression_stops_the_start_with_a_clear_error() {
    let limits = file(LIMITS);
    let limits_path = limits.path().to_str().unwrap().to_string();
    let bad_name = file("\"user-id\": descriptors[0].user\n");
    let bad_cel = file("user: \"descriptors[0].\"\n");
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec!["-L".into(), bad_name.path().to_str().unwrap().into()],
            "`user-id` is not a Prometheus label name",
        ),
        (
            vec!["-L".into(), bad_cel.path().to_str().unwrap().into()],
            "label `user`: invalid CEL",
        ),
        (
            vec!["-L".into(), "/nonexistent/labels.yaml".into()],
            "cannot read the metric labels file /nonexistent/labels.yaml",
        ),
        (
            vec!["--metric-labels-default".into(), "descriptors[".into()],
            "--metric-labels-default: invalid CEL",
        ),
    ];
    for (args, expected) in cases {
        let (rls, http) = free_ports();
        let mut child = command()
            .args(["-b", "127.0.0.1", "-p", &rls.to_string()])
            .args(["-B", "127.0.0.1", "-P", &http.to_string()])
            .args(&args)
            .arg(&limits_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: a server that starts anyway is killed, and the test fails.
        let deadline = Instant::now() + PATIENCE;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_changed_labels_file_is_applied_and_a_broken_one_is_not() {
    let limits = file(LIMITS);
    let labels = file("user: descriptors[0].user\n");
    let labels_path = labels.path().to_str().unwrap();
    let server =
        Server::start_on_loopback(&["-L", labels_path, limits.path().to_str().unwrap()]).await;
    let ns = ("limitador_namespace", "ml");

    std::fs::write(labels.path(), "who: descriptors[0].user\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    loop {
        i += 1;
        let user = format!("a{i}");
        assert_eq!(call(&server, &user, &[]).await, Code::Ok);
        if series(&server, "authorized_calls", &[ns, ("who", &user)]).await == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reloaded: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    std::fs::write(labels.path(), "\"bad-name\": descriptors[0].user\n").unwrap();
    let log = server
        .log_when(|log| log.contains("could not be applied"))
        .await;
    assert!(
        log.contains("metric labels file could not be applied"),
        "{log}"
    );
    assert_eq!(call(&server, "after", &[]).await, Code::Ok);
    assert_eq!(
        series(&server, "authorized_calls", &[ns, ("who", "after")]).await,
        Some(1.0),
        "the labels in force are kept"
    );
}
