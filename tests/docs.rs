//! The documentation stays true: the README's HTTP walkthrough is run command by command on a
//! fresh server and must print what it shows (`UPDATE_DOCS=1 cargo test --test docs` writes
//! what it printed instead), and every link between README.md and docs/ leads to a file and a
//! heading that exist.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use common::process::{Server, manifest_dir};
use common::transcript::{Transcript, same_within};

/// Runs a shell command from the repository's root with `env` set: its stdout (it must
/// succeed).
fn sh(command: &str, env: &[(&str, &str)]) -> String {
    let output = Command::new("sh")
        .args(["-c", command])
        .current_dir(manifest_dir())
        .envs(env.iter().copied())
        .output()
        .expect("sh runs");
    assert!(
        output.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a README shell command against `server` (its `localhost:8080` is the server's HTTP
/// address): stdout, without `\r` and without `date:` headers (they change every second).
fn run_http(command: &str, server: &Server) -> String {
    let command = command.replace("localhost:8080", &server.http.to_string());
    sh(&command, &[])
        .replace('\r', "")
        .lines()
        .filter(|line| !line.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_readme_http_walkthrough_prints_what_it_shows() {
    let transcript = Transcript::read("README.md", "## Walkthrough (HTTP API)", "curl");
    assert!(transcript.steps.len() >= 7, "{}", transcript.steps.len());
    let server = Server::start_on_loopback(&["limits/llm-tiers.yaml"]).await;
    transcript.check(
        |command| run_http(command, &server),
        |shown, printed| {
            same_within(
                shown,
                printed,
                // Whole seconds until a reset move while the walkthrough runs.
                &[
                    r"x-ratelimit-reset: (\d+)",
                    r"retry-after: (\d+)",
                    r#""expires_in_seconds":(\d+)"#,
                ],
                2.0,
                &[r"\d{4}-\d\d-\d\dT[0-9:.]+Z"],
            )
        },
    );
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> HashSet<String> {
    let mut fenced = false;
    let mut found = HashSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            found.insert(anchor(line.trim_start_matches('#')));
        }
    }
    found
}

/// The relative link targets of a Markdown file: `[text](target)`, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (at, _) in line.match_indices("](") {
            let rest = &line[at + 2..];
            if let Some(end) = rest.find(')') {
                let target = &rest[..end];
                if !target.contains("://") && !target.starts_with("mailto:") {
                    found.push(target.to_string());
                }
            }
        }
    }
    found
}

#[test]
fn links_between_the_documents_lead_somewhere() {
    let root = manifest_dir();
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    assert!(files.len() > 5, "docs/ holds the reference pages");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let dir = file.parent().unwrap_or(Path::new("."));
        for link in links(&text) {
            checked += 1;
            let (path, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", file.display()));
                continue;
            }
            if !fragment.is_empty() {
                let text = std::fs::read_to_string(&target).unwrap_or_default();
                if !anchors(&text).contains(fragment) {
                    broken.push(format!("{}: {link}: no such heading", file.display()));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The README's Envoy walkthroughs: `examples/run-*.sh` print what the README shows (the
/// lines naming the build and the ports aside).
#[test]
fn the_readme_envoy_walkthroughs_print_what_they_show() {
    let transcript = Transcript::read("README.md", "## End to end with Envoy", "examples/run-");
    assert_eq!(transcript.steps.len(), 2);
    transcript.check(
        |command| {
            sh(command, &[("RATEKEEPER", env!("CARGO_BIN_EXE_ratekeeper"))])
                .lines()
                .skip_while(|line| line.starts_with("== starting") || line.is_empty())
                .collect::<Vec<_>>()
                .join("\n")
        },
        |shown, printed| same_within(shown, printed, &[r"retry-after: (\d+)"], 10.0, &[]),
    );
}

/// docs/limits.md: what `--validate` says about a broken file (stderr and stdout together).
#[test]
fn the_validate_example_prints_what_it_shows() {
    let transcript = Transcript::read("docs/limits.md", "## Limits file", "ratekeeper --validate");
    let bin = Path::new(env!("CARGO_BIN_EXE_ratekeeper"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    transcript.check(
        |command| {
            let output = Command::new("sh")
                .args(["-c", &format!("({command}) 2>&1")])
                .env("PATH", &path)
                .output()
                .expect("sh runs");
            assert!(!output.status.success(), "a broken file fails validation");
            String::from_utf8_lossy(&output.stdout).into_owned()
        },
        |shown, printed| shown == printed,
    );
}
