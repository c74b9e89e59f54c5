//! TLS on the listeners (`--tls-cert`, `--tls-key`, `--tls-client-ca`): the server
//! configurations each listener hands new connections, and the task that rebuilds them when
//! the files change.
//!
//! - The gRPC listener offers ALPN `h2` and, with a client CA, requires a client certificate
//!   signed by it (mTLS): a client without one, or with another, is refused at the handshake.
//! - The HTTP listener offers `http/1.1` and never asks for a client certificate (Kubernetes
//!   probes have none; the bearer token protects the API).
//! - The files are read again every [`RELOAD_EVERY`] and compared by content, so a rename, a
//!   rewrite or Kubernetes' symlink flip of a mounted secret are all seen. A changed set that
//!   loads becomes the configuration of new connections; connections already open keep the one
//!   they started with. A set that does not load (a half-written file, a key that does not
//!   match the certificate) is logged and the previous one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::watch;

/// How often the certificate, key and client CA files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The files TLS is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of that certificate.
    pub key: PathBuf,
    /// PEM certificates of the CA(s) gRPC clients' certificates must be signed by; `None`: no
    /// client certificate asked for.
    pub client_ca: Option<PathBuf>,
}

/// TLS as loaded from [`TlsFiles`]: the configurations new connections get, one per listener,
/// which [`watch_files`] replaces when the files change.
pub struct Tls {
    files: TlsFiles,
    /// What the configurations in use were built from.
    loaded: Contents,
    pub(super) grpc: Arc<ArcSwap<ServerConfig>>,
    pub(super) http: Arc<ArcSwap<ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads and checks the files: an error names the flag, the file and what is wrong.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let contents = Contents::read(&files)?;
        let (grpc, http) = contents.configs(&files)?;
        Ok(Self {
            files,
            loaded: contents,
            grpc: Arc::new(ArcSwap::from_pointee(grpc)),
            http: Arc::new(ArcSwap::from_pointee(http)),
        })
    }

    /// Whether gRPC clients must present a certificate (mTLS).
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// Checks the files every [`RELOAD_EVERY`] until `stopped`, and swaps in new configurations
/// when their content changed and loads; otherwise logs why (once per content seen) and keeps
/// the current ones.
pub(super) async fn watch_files(tls: Arc<Tls>, mut stopped: watch::Receiver<bool>) {
    let files = tls.files.clone();
    let mut last = Some(tls.loaded.clone());
    let mut every = tokio::time::interval(RELOAD_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.wait_for(|&stop| stop) => return,
        }
        let contents = match read_blocking(files.clone()).await {
            Ok(contents) => contents,
            Err(error) => {
                if last.is_some() {
                    tracing::warn!(%error, "TLS files unreadable: keeping the certificate in use");
                }
                last = None;
                continue;
            }
        };
        if last.as_ref() == Some(&contents) {
            continue;
        }
        match contents.configs(&files) {
            Ok((grpc, http)) => {
                tls.grpc.store(Arc::new(grpc));
                tls.http.store(Arc::new(http));
                tracing::info!(cert = %files.cert.display(), "TLS certificate (re)loaded: new connections use it");
            }
            Err(error) => {
                tracing::warn!(%error, "new TLS files do not load: keeping the certificate in use")
            }
        }
        last = Some(contents);
    }
}

async fn read_blocking(files: TlsFiles) -> Result<Contents, String> {
    tokio::task::spawn_blocking(move || Contents::read(&files))
        .await
        .map_err(|e| e.to_string())?
}

/// The bytes of the files, as last read.
#[derive(Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Result<Self, String> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        Ok(Self {
            cert: read("--tls-cert", &files.cert)?,
            key: read("--tls-key", &files.key)?,
            client_ca: match &files.client_ca {
                Some(path) => Some(read("--tls-client-ca", path)?),
                None => None,
            },
        })
    }

    /// The gRPC and the HTTP listener's configurations.
    fn configs(&self, files: &TlsFiles) -> Result<(ServerConfig, ServerConfig), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(&self.cert, "--tls-cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            format!(
                "--tls-key {}: no PEM private key in it ({e})",
                files.key.display()
            )
        })?;
        let mismatch = |e: rustls::Error| {
            let problem = match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the key is not the certificate's".to_string()
                }
                other => other.to_string(),
            };
            format!(
                "--tls-cert {} and --tls-key {}: {problem}",
                files.cert.display(),
                files.key.display()
            )
        };

        let builder = config_builder(&provider)?;
        let grpc = match (&self.client_ca, &files.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for certificate in certificates(pem, "--tls-client-ca", path)? {
                    roots
                        .add(certificate)
                        .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut grpc = grpc
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        grpc.alpn_protocols = vec![b"h2".to_vec()];

        let mut http = config_builder(&provider)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(mismatch)?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((grpc, http))
    }
}

/// A configuration builder on `provider` with TLS 1.3 and 1.2 (Envoy's upstream connections
/// default to at most TLS 1.2).
fn config_builder(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, String> {
    ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))
}

/// The PEM certificates in `pem` (at least one), read from `path` for `flag`.
fn certificates(
    pem: &[u8],
    flag: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certificates)
}
