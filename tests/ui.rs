//! `GET /ui` in a real headless browser (Debian's `chromium`): the page, served by a real
//! server process after known traffic, shows the namespaces, the limits with their refusals,
//! and the counters with the most usage with their usage, refreshes itself, and shows what
//! clients sent as text, never as HTML. A screenshot is left in the target directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::*;

const INSTALL_CHROMIUM: &str = "apt-get install chromium";

async fn post(server: &Server, path: &str, body: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{}{path}", server.http))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Runs headless chromium on `url` with `args` (bounded by `timeout`), its profile in `dir`.
fn chromium(dir: &Path, url: &str, args: &[&str]) -> String {
    let output = Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            // Containers often have a small /dev/shm.
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(["--hide-scrollbars", "--virtual-time-budget=5000"])
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("cannot run chromium ({e}); {INSTALL_CHROMIUM}"));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "chromium failed ({}; {INSTALL_CHROMIUM}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_ui_shows_namespaces_limits_refusals_and_the_fullest_counters() {
    let server = Server::start_on_loopback(&["limits/llm-tiers.yaml"]).await;
    let llm = |user: &str, tier: &str, delta: u64| {
        format!(
            r#"{{"namespace":"llm_tokens","values":{{"generic_key":"llm","user":{},"tier":"{tier}"}},"delta":{delta}}}"#,
            serde_json::to_string(user).unwrap()
        )
    };
    assert_eq!(
        post(&server, "/report", &llm("alice", "gold", 120)).await,
        200
    );
    assert_eq!(
        post(&server, "/check_and_report", &llm("bob", "free", 30)).await,
        200
    );
    for _ in 0..2 {
        assert_eq!(
            post(&server, "/check_and_report", &llm("bob", "free", 30)).await,
            429
        );
    }
    let hostile = "<img src=x id=injected onerror=alert(1)>";
    assert_eq!(
        post(&server, "/report", &llm(hostile, "free", 5)).await,
        200
    );

    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}/ui", server.http);
    let page = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let url = url.clone();
        move || chromium(&dir, &url, &["--dump-dom"])
    })
    .await
    .unwrap();

    let shows = |needle: &str| {
        assert!(
            page.contains(needle),
            "the page lacks {needle}:\n{page}\nserver log:\n{}",
            server.log()
        );
        page.find(needle).unwrap_or_default()
    };
    shows(r#"<section data-namespace="llm/llm-route">"#);
    shows(r#"<section data-namespace="llm_tokens">"#);
    shows(r#"<tr class="limit" data-limit="llm-free" data-refusals="2">"#);
    shows(r#"<tr class="limit" data-limit="llm-gold" data-refusals="0">"#);
    // The counters, the most used first, with their usage bars.
    let alice = shows(
        r#"<tr class="counter" data-limit="llm-gold" data-variables="alice" data-usage="120" data-max="200">"#,
    );
    let bob = shows(
        r#"<tr class="counter" data-limit="llm-free" data-variables="bob" data-usage="30" data-max="50">"#,
    );
    let eve = shows(r#"data-usage="5" data-max="50""#);
    assert!(alice < bob && bob < eve, "not the most used first:\n{page}");
    shows(r#"title="120 of 200""#);
    shows("<span>120 / 200</span>");
    // What clients sent is text: escaped, no element made of it.
    shows("&lt;img src=x id=injected onerror=alert(1)&gt;");
    assert!(
        !page.contains("<img"),
        "a client's value became HTML:\n{page}"
    );
    // It refreshed itself (every 2 s; the browser's virtual time ran 5 s), without an error.
    let refreshes: u32 = page
        .split(r#"data-refreshes=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refresh count:\n{page}"));
    assert!(refreshes >= 2, "refreshed {refreshes} times:\n{page}");
    shows(r#"<span id="error"></span>"#);

    // A screenshot, for people.
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui.png");
    let _ = std::fs::remove_file(&screenshot);
    tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let argument = format!("--screenshot={}", screenshot.display());
        move || chromium(&dir, &url, &["--window-size=1280,900", &argument])
    })
    .await
    .unwrap();
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "no screenshot at {}", screenshot.display());
    eprintln!("screenshot: {}", screenshot.display());
}

#[tokio::test]
async fn the_page_loads_nothing_from_elsewhere() {
    let server = Server::start_on_loopback(&["limits/llm-tiers.yaml"]).await;
    let response = reqwest::get(format!("http://{}/ui", server.http))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let csp = response
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = response.text().await.unwrap();
    for external in ["http://", "https://", "src=\"", "href=\"", "@import"] {
        assert!(!html.contains(external), "the page refers to {external}");
    }
}
