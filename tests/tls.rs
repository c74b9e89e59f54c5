//! TLS and mTLS on the listeners (`--tls-cert`, `--tls-key`, `--tls-client-ca`), through the
//! real binary, with certificates each test makes with the `openssl` command: TLS clients are
//! served on both listeners, plaintext and uncertified clients are refused, and rotated files
//! are picked up by new connections while open ones keep working.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::ChildProcess;
use common::process::{PATIENCE, command, free_ports, llm_tokens, loopback};
use hyper_util::rt::TokioIo;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

/// How long a rotation may take to reach new connections (the files are read every 2 s).
const ROTATION_PATIENCE: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------------
// Certificates, made with `openssl`.

/// A directory of keys and certificates.
struct Pki {
    dir: tempfile::TempDir,
}

/// A certificate and its key, as PEM files.
#[derive(Clone)]
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed CA named `name`.
    fn ca(&self, name: &str) -> Pair {
        let pair = self.pair_paths(name);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path_str(&pair.key),
            "-out",
            path_str(&pair.cert),
        ]);
        pair
    }

    /// A certificate for `localhost`/127.0.0.1 with common name `name` and serial `serial`,
    /// signed by `ca`, for a server (`serverAuth`) or a client (`clientAuth`).
    fn leaf(&self, ca: &Pair, name: &str, serial: u32, usage: &str) -> Pair {
        let pair = self.pair_paths(name);
        let csr = self.path(&format!("{name}.csr"));
        let extensions = self.path(&format!("{name}.ext"));
        std::fs::write(
            &extensions,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
            ),
        )
        .unwrap();
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            path_str(&pair.key),
            "-out",
            path_str(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr),
            "-CA",
            path_str(&ca.cert),
            "-CAkey",
            path_str(&ca.key),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "2",
            "-extfile",
            path_str(&extensions),
            "-out",
            path_str(&pair.cert),
        ]);
        pair
    }

    fn server(&self, ca: &Pair, name: &str, serial: u32) -> Pair {
        self.leaf(ca, name, serial, "serverAuth")
    }

    fn client(&self, ca: &Pair, name: &str, serial: u32) -> Pair {
        self.leaf(ca, name, serial, "clientAuth")
    }

    fn pair_paths(&self, name: &str) -> Pair {
        Pair {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .env("OPENSSL_CONF", "/dev/null")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}); .ci/run installs it (apt-get install openssl)")
        });
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn der_of(cert: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(cert).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The server.

struct Server {
    process: ChildProcess,
    rls: SocketAddr,
    http: SocketAddr,
}

impl Server {
    /// The binary on free loopback ports with the llm-tiers limits and `args`; waits until it
    /// says it listens.
    async fn start(args: &[&str]) -> Server {
        let (rls_port, http_port) = free_ports();
        let mut command = command();
        command
            .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
            .args(["-B", "127.0.0.1", "-P", &http_port.to_string()])
            .args(args)
            .arg("limits/llm-tiers.yaml");
        let mut process = ChildProcess::spawn("ratekeeper", command, "");
        process
            .wait_for("listen", PATIENCE, async |log| {
                log.contains("listening").then_some(())
            })
            .await;
        Server {
            process,
            rls: loopback(rls_port),
            http: loopback(http_port),
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A client configuration that trusts `ca`, presents `identity` if any, and offers `alpn`.
fn client_config(ca: &Pair, identity: Option<&Pair>, alpn: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(der_of(&ca.cert)).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match identity {
        Some(pair) => builder
            .with_client_auth_cert(
                vec![der_of(&pair.cert)],
                PrivateKeyDer::from_pem_file(&pair.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A gRPC client over TLS, with the number of connections it made and the server certificate
/// its last connection was shown.
struct GrpcClient {
    client: RateLimitServiceClient<Channel>,
    connections: Arc<AtomicUsize>,
    served: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

async fn grpc_client(addr: SocketAddr, config: Arc<ClientConfig>) -> GrpcClient {
    let connections = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(Mutex::new(None));
    let connector = {
        let (connections, served) = (connections.clone(), served.clone());
        tower::service_fn(move |_: http::Uri| {
            let (config, connections, served) =
                (config.clone(), connections.clone(), served.clone());
            async move {
                let stream = tls_connect(addr, config).await?;
                let (_, session) = stream.get_ref();
                assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
                let leaf = session.peer_certificates().and_then(|c| c.first()).cloned();
                *served.lock().unwrap() = leaf;
                connections.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })
    };
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connector);
    GrpcClient {
        client: RateLimitServiceClient::new(channel),
        connections,
        served,
    }
}

impl GrpcClient {
    async fn should(&self) -> Result<Code, tonic::Status> {
        let response = self
            .client
            .clone()
            .should_rate_limit(llm_tokens("alice", 1))
            .await?;
        Ok(response.into_inner().overall_code())
    }

    fn served(&self) -> Option<CertificateDer<'static>> {
        self.served.lock().unwrap().clone()
    }
}

/// `GET path` over TLS on a new connection: the status line and the body.
async fn https_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
) -> std::io::Result<String> {
    let mut stream = tls_connect(addr, config).await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Why the server refuses a TLS client configured with `config`: the handshake's error, or
/// (TLS 1.3, where the client's handshake ends before the server has checked its certificate)
/// the error of the first read. Panics if the server answers.
async fn refusal(addr: SocketAddr, config: Arc<ClientConfig>) -> String {
    let mut stream = match tls_connect(addr, config).await {
        Ok(stream) => stream,
        Err(e) => return e.to_string(),
    };
    // The HTTP/2 preface and an empty SETTINGS frame: a served client gets SETTINGS back.
    let hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    if let Err(e) = stream.write_all(hello).await {
        return e.to_string();
    }
    let mut buffer = [0; 64];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(0)) => "closed".to_string(),
        Ok(Ok(n)) => panic!("the server answered: {:?}", &buffer[..n]),
        Err(_) => panic!("neither refused nor answered within 5 s"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn both_listeners_serve_tls_and_refuse_plaintext() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server_pair = pki.server(&ca, "ratekeeper", 1);
    let server = Server::start(&[
        "--tls-cert",
        path_str(&server_pair.cert),
        "--tls-key",
        path_str(&server_pair.key),
        "--header-read-timeout",
        "4000",
    ])
    .await;

    // A peer that connects and says nothing holds its own connection slot, not the accept
    // loop: the next client is served at once, not after the handshake timeout.
    let mut silent = TcpStream::connect(server.rls).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let grpc = grpc_client(server.rls, client_config(&ca, None, b"h2")).await;
    assert_eq!(grpc.should().await.unwrap(), Code::Ok, "{}", server.log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(grpc.served(), Some(der_of(&server_pair.cert)));

    let status = https_get(
        server.http,
        client_config(&ca, None, b"http/1.1"),
        "/status",
    )
    .await
    .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // Plaintext on either listener is refused.
    let plain = common::grpc_channel(server.rls).await;
    if let Ok(channel) = plain {
        let refused = RateLimitServiceClient::new(channel)
            .should_rate_limit(llm_tokens("alice", 1))
            .await;
        assert!(refused.is_err(), "{refused:?}");
    }
    let plain_http = common::http_client()
        .get(format!("http://{}/status", server.http))
        .send()
        .await;
    assert!(plain_http.is_err(), "{plain_http:?}");

    // The silent peer is dropped after the handshake timeout.
    let mut byte = [0; 1];
    let closed = tokio::time::timeout(Duration::from_secs(8), silent.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent peer was kept: {closed:?}"
    );

    // SIGTERM with an idle TLS connection open and a handshake waiting: out at once (a
    // fraction of a second; 3 s leaves room for a busy machine), not after the 4 s handshake
    // timeout.
    assert_eq!(grpc.should().await.unwrap(), Code::Ok);
    let _waiting = TcpStream::connect(server.rls).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut server = server;
    let started = Instant::now();
    let status = server.process.terminate(PATIENCE).await;
    assert!(status.success(), "{status}: {}", server.log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "SIGTERM took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn mtls_serves_only_clients_with_a_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let clients_ca = pki.ca("clients-ca");
    let other_ca = pki.ca("other-ca");
    let server_pair = pki.server(&ca, "ratekeeper", 1);
    let good = pki.client(&clients_ca, "envoy", 2);
    let untrusted = pki.client(&other_ca, "intruder", 3);
    let server = Server::start(&[
        "--tls-cert",
        path_str(&server_pair.cert),
        "--tls-key",
        path_str(&server_pair.key),
        "--tls-client-ca",
        path_str(&clients_ca.cert),
    ])
    .await;

    let without = refusal(server.rls, client_config(&ca, None, b"h2")).await;
    assert!(without.contains("CertificateRequired"), "{without}");
    let refused = refusal(server.rls, client_config(&ca, Some(&untrusted), b"h2")).await;
    assert!(refused.contains("UnknownCA"), "{refused}");

    let grpc = grpc_client(server.rls, client_config(&ca, Some(&good), b"h2")).await;
    assert_eq!(grpc.should().await.unwrap(), Code::Ok, "{}", server.log());

    // The HTTP listener asks no client certificate (Kubernetes probes have none).
    let status = https_get(
        server.http,
        client_config(&ca, None, b"http/1.1"),
        "/status",
    )
    .await
    .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

/// A Kubernetes secret volume: the files are symlinks through `..data`, which is flipped
/// atomically to a new directory on each update.
struct SecretVolume {
    dir: PathBuf,
    generation: usize,
}

impl SecretVolume {
    fn new(dir: PathBuf, files: &[(&str, &Path)]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut volume = Self { dir, generation: 0 };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.dir.join(name)).unwrap();
        }
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `files` into a new directory and flips `..data` to it.
    fn update(&mut self, files: &[(&str, &Path)]) {
        self.generation += 1;
        let generation = format!("..{}", self.generation);
        std::fs::create_dir(self.dir.join(&generation)).unwrap();
        for (name, source) in files {
            std::fs::copy(source, self.dir.join(&generation).join(name)).unwrap();
        }
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &staged).unwrap();
        std::fs::rename(&staged, self.dir.join("..data")).unwrap();
    }
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_and_open_ones_keep_working() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let first = pki.server(&ca, "ratekeeper-1", 1);
    let second = pki.server(&ca, "ratekeeper-2", 2);
    let mut volume = SecretVolume::new(
        pki.path("secret"),
        &[("tls.crt", &first.cert), ("tls.key", &first.key)],
    );
    let server = Server::start(&[
        "--tls-cert",
        path_str(&volume.path("tls.crt")),
        "--tls-key",
        path_str(&volume.path("tls.key")),
    ])
    .await;
    let config = client_config(&ca, None, b"h2");

    let open = grpc_client(server.rls, config.clone()).await;
    assert_eq!(open.should().await.unwrap(), Code::Ok, "{}", server.log());
    assert_eq!(open.served(), Some(der_of(&first.cert)));

    // A broken pair (the new certificate with the old key) is refused and the old one kept.
    volume.update(&[("tls.crt", &second.cert), ("tls.key", &first.key)]);
    let deadline = Instant::now() + ROTATION_PATIENCE;
    while !server.log().contains("do not load") {
        assert!(
            Instant::now() < deadline,
            "the broken pair was not noticed: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let meanwhile = grpc_client(server.rls, config.clone()).await;
    assert_eq!(meanwhile.should().await.unwrap(), Code::Ok);
    assert_eq!(meanwhile.served(), Some(der_of(&first.cert)));

    // The complete new pair reaches new connections within a few seconds.
    volume.update(&[("tls.crt", &second.cert), ("tls.key", &second.key)]);
    let deadline = Instant::now() + ROTATION_PATIENCE;
    loop {
        let fresh = grpc_client(server.rls, config.clone()).await;
        assert_eq!(fresh.should().await.unwrap(), Code::Ok, "{}", server.log());
        if fresh.served() == Some(der_of(&second.cert)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = https_get(
        server.http,
        client_config(&ca, None, b"http/1.1"),
        "/status",
    )
    .await
    .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // The connection opened before the rotation still works, on the same connection.
    assert_eq!(open.should().await.unwrap(), Code::Ok, "{}", server.log());
    assert_eq!(open.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_rotated_client_ca_is_used_for_new_handshakes() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let old_ca = pki.ca("old-clients-ca");
    let new_ca = pki.ca("new-clients-ca");
    let server_pair = pki.server(&ca, "ratekeeper", 1);
    let old_client = pki.client(&old_ca, "envoy-old", 2);
    let new_client = pki.client(&new_ca, "envoy-new", 3);
    let client_ca = pki.path("client-ca.pem");
    std::fs::copy(&old_ca.cert, &client_ca).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        path_str(&server_pair.cert),
        "--tls-key",
        path_str(&server_pair.key),
        "--tls-client-ca",
        path_str(&client_ca),
    ])
    .await;
    let old_config = client_config(&ca, Some(&old_client), b"h2");
    let open = grpc_client(server.rls, old_config.clone()).await;
    assert_eq!(open.should().await.unwrap(), Code::Ok, "{}", server.log());
    let refused = refusal(server.rls, client_config(&ca, Some(&new_client), b"h2")).await;
    assert!(refused.contains("UnknownCA"), "{refused}");

    // Rewritten in place (through a rename, as editors and `kubectl cp` do).
    let staged = pki.path("client-ca.pem.new");
    std::fs::copy(&new_ca.cert, &staged).unwrap();
    std::fs::rename(&staged, &client_ca).unwrap();
    let deadline = Instant::now() + ROTATION_PATIENCE;
    let new_config = client_config(&ca, Some(&new_client), b"h2");
    loop {
        let fresh = grpc_client(server.rls, new_config.clone()).await;
        if fresh.should().await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new client CA was not used: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = refusal(server.rls, old_config).await;
    assert!(refused.contains("UnknownCA"), "{refused}");
    // The connection made under the old CA is not cut.
    assert_eq!(open.should().await.unwrap(), Code::Ok, "{}", server.log());
    assert_eq!(open.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn incomplete_or_mismatched_tls_files_stop_the_start_with_a_clear_error() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let one = pki.server(&ca, "one", 1);
    let two = pki.server(&ca, "two", 2);
    let run = async |args: &[&str]| {
        let mut command = command();
        command
            .args(["-b", "127.0.0.1", "-p", "0", "-B", "127.0.0.1", "-P", "0"])
            .args(args)
            .arg("limits/llm-tiers.yaml");
        let mut process = ChildProcess::spawn("ratekeeper", command, "");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = process.exited() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{args:?} started: {}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success(), "{args:?}: {status}");
        process.log()
    };
    let alone = run(&["--tls-cert", path_str(&one.cert)]).await;
    assert!(alone.contains("--tls-key"), "{alone}");
    let alone = run(&["--tls-key", path_str(&one.key)]).await;
    assert!(alone.contains("--tls-cert"), "{alone}");
    let ca_alone = run(&["--tls-client-ca", path_str(&ca.cert)]).await;
    assert!(ca_alone.contains("--tls-cert"), "{ca_alone}");
    let mismatched = run(&[
        "--tls-cert",
        path_str(&one.cert),
        "--tls-key",
        path_str(&two.key),
    ])
    .await;
    assert!(mismatched.contains("--tls-key"), "{mismatched}");
    let missing = run(&[
        "--tls-cert",
        path_str(&pki.path("absent.crt")),
        "--tls-key",
        path_str(&one.key),
    ])
    .await;
    assert!(missing.contains("absent.crt"), "{missing}");
    let not_a_ca = run(&[
        "--tls-cert",
        path_str(&one.cert),
        "--tls-key",
        path_str(&one.key),
        "--tls-client-ca",
        path_str(&one.key),
    ])
    .await;
    assert!(not_a_ca.contains("--tls-client-ca"), "{not_a_ca}");
}

/// examples/envoy/tiers.yaml with its `ratekeeper` cluster over TLS, trusting `ca` and
/// presenting `client` (mTLS) if given: the cluster config of docs/security.md. Written to `dir`.
fn envoy_config_over_tls(dir: &Path, ca: &Pair, client: Option<&Pair>, name: &str) -> PathBuf {
    let cluster = "    load_assignment: {cluster_name: ratekeeper,";
    let template =
        std::fs::read_to_string(common::process::manifest_dir().join("examples/envoy/tiers.yaml"))
            .unwrap();
    let line = template
        .lines()
        .find(|line| line.starts_with(cluster))
        .expect("the ratekeeper cluster of examples/envoy/tiers.yaml");
    let mut tls = format!(
        "{line}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: {}}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: localhost}}
",
        ca.cert.display()
    );
    if let Some(client) = client {
        tls.push_str(&format!(
            "          tls_certificates:
          - certificate_chain: {{filename: {}}}
            private_key: {{filename: {}}}
",
            client.cert.display(),
            client.key.display()
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, template.replacen(line, tls.trim_end(), 1)).unwrap();
    path
}

/// `POST /v1/chat/completions` through Envoy as alice (free tier, 50 tokens a minute), the mock
/// answering with `tokens` of usage: the status and `x-ratelimit-remaining`.
async fn alice_chats(envoy: &common::envoy::Envoy, tokens: u64) -> (u16, Option<String>) {
    let response = common::http_client()
        .post(format!("http://{}/v1/chat/completions", envoy.listener))
        .header("authorization", "APIKEY iamafreeuser")
        .header("x-mock-total-tokens", tokens.to_string())
        .json(
            &serde_json::json!({"model": "mock", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("request through Envoy failed: {e}\n{}", envoy.log()));
    let remaining = response
        .headers()
        .get("x-ratelimit-remaining")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (response.status().as_u16(), remaining)
}

#[tokio::test]
async fn a_real_envoy_asks_over_mtls_and_is_refused_without_its_client_certificate() {
    common::envoy::require_envoy();
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let clients_ca = pki.ca("clients-ca");
    let server_pair = pki.server(&ca, "ratekeeper", 1);
    let envoy_pair = pki.client(&clients_ca, "envoy", 2);
    let server = Server::start(&[
        "--tls-cert",
        path_str(&server_pair.cert),
        "--tls-key",
        path_str(&server_pair.key),
        "--tls-client-ca",
        path_str(&clients_ca.cert),
    ])
    .await;
    let mock = common::upstream::MockLlm::start().await;
    let with_cert = envoy_config_over_tls(pki.dir.path(), &ca, Some(&envoy_pair), "mtls.yaml");
    let envoy =
        common::envoy::Envoy::start(path_str(&with_cert), mock.addr.port(), server.rls.port())
            .await;

    // Served: the check's statuses come back (Envoy builds x-ratelimit-* from them), the usage
    // charge spends alice's 50 tokens, and she is refused next.
    let (status, remaining) = alice_chats(&envoy, 60).await;
    assert_eq!(status, 200, "{}\n{}", envoy.log(), server.log());
    assert_eq!(remaining.as_deref(), Some("50"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alice_chats(&envoy, 1).await.0 != 429 {
        assert!(Instant::now() < deadline, "never refused: {}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(envoy.stat("cluster.ratekeeper.ssl.handshake").await >= 1);

    // Without its client certificate, the handshake fails and Envoy's failure_mode_deny answers
    // 500: nothing reaches the services.
    let without = envoy_config_over_tls(pki.dir.path(), &ca, None, "tls-only.yaml");
    let uncertified =
        common::envoy::Envoy::start(path_str(&without), mock.addr.port(), server.rls.port()).await;
    let (status, _) = alice_chats(&uncertified, 1).await;
    assert_eq!(status, 500, "{}", uncertified.log());
    assert_eq!(
        uncertified.stat("cluster.ratekeeper.ssl.handshake").await,
        0
    );
}
