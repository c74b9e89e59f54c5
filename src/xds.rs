//! envoyproxy/ratelimit's xDS config source (`CONFIG_TYPE=GRPC_XDS_SOTW`): the limits come
//! from a control plane (Envoy Gateway, Envoy AI Gateway) instead of files.
//!
//! As envoyproxy/ratelimit does: one state-of-the-world stream on the Aggregated Discovery
//! Service (`envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`)
//! subscribing to [`TYPE_URL`] for the configured node. Each response is the whole config: its
//! `RateLimitConfig` resources are turned into envoyproxy/ratelimit's YAML documents and read
//! by the same parser as files (one home for the format's rules), then applied like a hot
//! reload. A valid version is ACKed (its version and nonce); an invalid one is NACKed with
//! the problems in `error_detail`, and the limits in force stay. A lost stream is reopened
//! with a doubling, jittered backoff (reset once the server answers).
//!
//! Until the first version arrives there are no limits (every request is allowed), as for an
//! empty limits file; ASM's `RATE_LIMIT_CONFIG` rules, when set, apply throughout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use prost_types::value::Kind;
use serde_yaml::{Mapping, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::limiter::Limiter;
use crate::limits::{Source, load_source};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use crate::proto::google::rpc::Status;
use crate::proto::ratelimit::config::ratelimit::v3::{
    RateLimitConfig, RateLimitDescriptor, RateLimitPolicy, RateLimitUnit,
};
use crate::reload::apply;
use crate::status::ServerStatus;

/// The resource type ratekeeper subscribes to (go-control-plane's `RateLimitConfigType`).
pub const TYPE_URL: &str = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig";

/// The subscription, as envoyproxy/ratelimit's variables describe it (read by
/// `config::ratelimit_env`, with their defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct XdsSettings {
    /// `CONFIG_GRPC_XDS_SERVER_URL`, as a URL (`http://` added to a bare `host:port`).
    pub server_url: String,
    /// `CONFIG_GRPC_XDS_NODE_ID` (default `default`).
    pub node_id: String,
    /// `CONFIG_GRPC_XDS_NODE_METADATA`: `key=value` pairs separated by commas.
    pub node_metadata: Vec<(String, String)>,
    /// `CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS`: `name:value` pairs separated by commas,
    /// sent with the stream.
    pub headers: Vec<(String, String)>,
    /// `XDS_CLIENT_BACKOFF_INITIAL_INTERVAL` and `XDS_CLIENT_BACKOFF_MAX_INTERVAL` (10s, 60s).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES` (unset: gRPC's 4 MiB).
    pub max_message: Option<usize>,
}

/// How long connecting to the server may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// gRPC's `INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Subscribes until `stop` turns true, applying every valid version pushed to `limiter`.
pub async fn subscribe(
    settings: XdsSettings,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = Client {
        node: node(&settings),
        settings,
        limiter,
        status,
        acked_version: String::new(),
    };
    let mut backoff = client.settings.backoff_initial;
    loop {
        let answered = tokio::select! {
            _ = stop.changed() => return,
            answered = client.stream() => answered,
        };
        if answered {
            backoff = client.settings.backoff_initial;
        }
        let pause = jittered(backoff);
        tracing::info!(
            server = client.settings.server_url,
            ?pause,
            "reconnecting to the xDS server"
        );
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(client.settings.backoff_max);
    }
}

/// Between half of `backoff` and all of it, so many clients do not reconnect together.
fn jittered(backoff: Duration) -> Duration {
    let fraction = getrandom::u32().map_or(0.5, |r| f64::from(r) / f64::from(u32::MAX));
    backoff.mul_f64(0.5 + fraction / 2.0)
}

fn node(settings: &XdsSettings) -> Node {
    let fields = settings
        .node_metadata
        .iter()
        .map(|(key, value)| {
            let value = prost_types::Value {
                kind: Some(Kind::StringValue(value.clone())),
            };
            (key.clone(), value)
        })
        .collect();
    Node {
        id: settings.node_id.clone(),
        metadata: Some(prost_types::Struct { fields }),
        user_agent_name: "ratekeeper".into(),
        ..Node::default()
    }
}

struct Client {
    settings: XdsSettings,
    node: Node,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    /// The version last applied, sent again on a new stream (so the server knows what is in
    /// force).
    acked_version: String,
}

impl Client {
    /// One stream, until it ends; whether the server answered on it.
    async fn stream(&mut self) -> bool {
        let server = self.settings.server_url.clone();
        let endpoint = match Endpoint::from_shared(server.clone()) {
            Ok(endpoint) => endpoint.connect_timeout(CONNECT_TIMEOUT),
            Err(e) => {
                tracing::error!(server, error = %e, "bad xDS server address");
                return false;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => {
                tracing::warn!(server, error = %e, "cannot connect to the xDS server");
                return false;
            }
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        if let Some(size) = self.settings.max_message {
            client = client.max_decoding_message_size(size);
        }
        let (requests, pending) = mpsc::channel(4);
        let mut request = tonic::Request::new(ReceiverStream::new(pending));
        for (name, value) in &self.settings.headers {
            match (
                name.to_ascii_lowercase()
                    .parse::<tonic::metadata::MetadataKey<_>>(),
                value.parse(),
            ) {
                (Ok(name), Ok(value)) => {
                    request.metadata_mut().insert(name, value);
                }
                _ => tracing::warn!(name, "xDS header not sent: not a valid header"),
            }
        }
        // The subscription: nothing to acknowledge yet on this stream.
        if requests
            .send(self.request(String::new(), None))
            .await
            .is_err()
        {
            return false;
        }
        let mut responses = match client.stream_aggregated_resources(request).await {
            Ok(responses) => responses.into_inner(),
            Err(e) => {
                tracing::warn!(server, error = %e, "the xDS server refused the stream");
                return false;
            }
        };
        tracing::info!(server, node = self.node.id, "subscribed to the xDS server");
        let mut answered = false;
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    tracing::warn!(server, "the xDS server closed the stream");
                    return answered;
                }
                Err(e) => {
                    tracing::warn!(server, error = %e, "the xDS stream failed");
                    return answered;
                }
            };
            answered = true;
            let reply = self.receive(response).await;
            if requests.send(reply).await.is_err() {
                return answered;
            }
        }
    }

    /// Applies one response; the ACK or NACK to send.
    async fn receive(&mut self, response: DiscoveryResponse) -> DiscoveryRequest {
        let origin = format!("xDS version {:?}", response.version_info);
        let in_force = self.limiter.limits();
        let limits = read_response(&response).and_then(|source| {
            load_source(&source, in_force.ratelimit_settings())
                .map_err(|e| e.to_string())
                .and_then(|limits| limits.with_fixed(&origin, in_force.fixed().cloned()))
        });
        drop(in_force);
        match apply(&self.limiter, &self.status, &origin, limits).await {
            Ok(()) => {
                self.acked_version = response.version_info;
                self.request(response.nonce, None)
            }
            Err(reason) => {
                let error = Status {
                    code: INVALID_ARGUMENT,
                    message: reason,
                };
                self.request(response.nonce, Some(error))
            }
        }
    }

    fn request(&self, nonce: String, error: Option<Status>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: self.acked_version.clone(),
            node: Some(self.node.clone()),
            resource_names: Vec::new(),
            type_url: TYPE_URL.into(),
            response_nonce: nonce,
            error_detail: error,
        }
    }
}

/// The resources of a response as envoyproxy/ratelimit documents, one file each (named by
/// the resource), for the files' parser.
fn read_response(response: &DiscoveryResponse) -> Result<Source, String> {
    if !response.type_url.is_empty() && response.type_url != TYPE_URL {
        return Err(format!(
            "unexpected resource type {:?}, expected {TYPE_URL}",
            response.type_url
        ));
    }
    let mut files = Vec::new();
    for (index, resource) in response.resources.iter().enumerate() {
        if resource.type_url != TYPE_URL {
            return Err(format!(
                "resource {index}: unexpected type {:?}, expected {TYPE_URL}",
                resource.type_url
            ));
        }
        let config = RateLimitConfig::decode(resource.value.as_slice())
            .map_err(|e| format!("resource {index}: not a RateLimitConfig: {e}"))?;
        let name = if config.name.is_empty() {
            format!("resource {index}")
        } else {
            format!("resource {:?}", config.name)
        };
        let text = serde_yaml::to_string(&document(&config))
            .map_err(|e| format!("{name}: cannot be read: {e}"))?;
        files.push((PathBuf::from(name), text.into_bytes()));
    }
    Ok(Source {
        path: PathBuf::from("xDS"),
        directory: true,
        files,
    })
}

/// A `RateLimitConfig` as the YAML document envoyproxy/ratelimit would read (fields at their
/// protobuf default are left out, as an absent YAML field).
fn document(config: &RateLimitConfig) -> Value {
    let mut mapping = Mapping::new();
    mapping.insert("domain".into(), config.domain.clone().into());
    mapping.insert("descriptors".into(), descriptors(&config.descriptors));
    Value::Mapping(mapping)
}

fn descriptors(list: &[RateLimitDescriptor]) -> Value {
    Value::Sequence(list.iter().map(descriptor).collect())
}

fn descriptor(d: &RateLimitDescriptor) -> Value {
    let mut m = Mapping::new();
    m.insert("key".into(), d.key.clone().into());
    if !d.value.is_empty() {
        m.insert("value".into(), d.value.clone().into());
    }
    if let Some(policy) = &d.rate_limit {
        m.insert("rate_limit".into(), rate_limit(policy));
    }
    if !d.descriptors.is_empty() {
        m.insert("descriptors".into(), descriptors(&d.descriptors));
    }
    for (field, set) in [
        ("shadow_mode", d.shadow_mode),
        ("quota_mode", d.quota_mode),
        ("detailed_metric", d.detailed_metric),
    ] {
        if set {
            m.insert(field.into(), true.into());
        }
    }
    if let Some(metadata) = &d.metadata {
        m.insert("metadata".into(), structure(metadata));
    }
    Value::Mapping(m)
}

fn rate_limit(p: &RateLimitPolicy) -> Value {
    let mut m = Mapping::new();
    let unit = RateLimitUnit::try_from(p.unit).ok();
    // Unlimited: a unit or count given alongside is reported by the parser.
    let unit_given = unit != Some(RateLimitUnit::Unknown);
    if !p.unlimited || unit_given {
        let name = unit.map_or_else(
            || format!("unit number {}", p.unit),
            |u| unit_name(u).into(),
        );
        m.insert("unit".into(), name.into());
    }
    if !p.unlimited || p.requests_per_unit != 0 {
        m.insert("requests_per_unit".into(), p.requests_per_unit.into());
    }
    if p.unlimited {
        m.insert("unlimited".into(), true.into());
    }
    if !p.name.is_empty() {
        m.insert("name".into(), p.name.clone().into());
    }
    if !p.replaces.is_empty() {
        let replaces = p
            .replaces
            .iter()
            .map(|r| {
                let mut entry = Mapping::new();
                entry.insert("name".into(), r.name.clone().into());
                Value::Mapping(entry)
            })
            .collect();
        m.insert("replaces".into(), Value::Sequence(replaces));
    }
    Value::Mapping(m)
}

/// The unit as the YAML format writes it (`UNKNOWN` passes through, for the parser to refuse).
fn unit_name(unit: RateLimitUnit) -> &'static str {
    match unit {
        RateLimitUnit::Unknown => "unknown",
        RateLimitUnit::Second => "second",
        RateLimitUnit::Minute => "minute",
        RateLimitUnit::Hour => "hour",
        RateLimitUnit::Day => "day",
        RateLimitUnit::Week => "week",
        RateLimitUnit::Month => "month",
        RateLimitUnit::Year => "year",
    }
}

fn structure(s: &prost_types::Struct) -> Value {
    let mut m = Mapping::new();
    for (key, value) in &s.fields {
        m.insert(key.clone().into(), plain(value));
    }
    Value::Mapping(m)
}

fn plain(value: &prost_types::Value) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => (*n).into(),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => structure(s),
        Some(Kind::ListValue(l)) => Value::Sequence(l.values.iter().map(plain).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RatelimitSettings;
    use crate::proto::ratelimit::config::ratelimit::v3::RateLimitReplace;

    fn resource(config: &RateLimitConfig) -> prost_types::Any {
        prost_types::Any {
            type_url: TYPE_URL.into(),
            value: config.encode_to_vec(),
        }
    }

    fn policy(unit: RateLimitUnit, count: u32) -> Option<RateLimitPolicy> {
        Some(RateLimitPolicy {
            unit: unit as i32,
            requests_per_unit: count,
            ..RateLimitPolicy::default()
        })
    }

    #[test]
    fn a_resource_reads_as_the_same_document_would() {
        let config = RateLimitConfig {
            name: "rl".into(),
            domain: "api".into(),
            descriptors: vec![RateLimitDescriptor {
                key: "user".into(),
                rate_limit: Some(RateLimitPolicy {
                    name: "per-user".into(),
                    replaces: vec![RateLimitReplace {
                        name: "other".into(),
                    }],
                    ..policy(RateLimitUnit::Minute, 5).unwrap_or_default()
                }),
                descriptors: vec![RateLimitDescriptor {
                    key: "model".into(),
                    value: "gpt".into(),
                    rate_limit: Some(RateLimitPolicy {
                        unlimited: true,
                        ..RateLimitPolicy::default()
                    }),
                    ..RateLimitDescriptor::default()
                }],
                ..RateLimitDescriptor::default()
            }],
        };
        let yaml = serde_yaml::to_string(&document(&config)).unwrap();
        let expected = "domain: api\ndescriptors:\n- key: user\n  rate_limit:\n    unit: minute\n    requests_per_unit: 5\n    name: per-user\n    replaces:\n    - name: other\n  descriptors:\n  - key: model\n    value: gpt\n    rate_limit:\n      unlimited: true\n";
        assert_eq!(yaml, expected);
        let response = DiscoveryResponse {
            resources: vec![resource(&config)],
            ..DiscoveryResponse::default()
        };
        let set = load_source(
            &read_response(&response).unwrap(),
            RatelimitSettings::default(),
        )
        .unwrap();
        assert_eq!(set.namespace("api").len(), 1);
    }

    #[test]
    fn bad_resources_are_refused_with_the_reason() {
        let no_unit = RateLimitConfig {
            name: "bad".into(),
            domain: "api".into(),
            descriptors: vec![RateLimitDescriptor {
                key: "user".into(),
                rate_limit: policy(RateLimitUnit::Unknown, 5),
                ..RateLimitDescriptor::default()
            }],
        };
        let response = DiscoveryResponse {
            resources: vec![resource(&no_unit)],
            ..DiscoveryResponse::default()
        };
        let e = load_source(
            &read_response(&response).unwrap(),
            RatelimitSettings::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("\"bad\"") && e.contains("unit"), "{e}");
        let wrong_type = DiscoveryResponse {
            resources: vec![prost_types::Any {
                type_url: "type.googleapis.com/other".into(),
                value: vec![1, 2, 3],
            }],
            ..DiscoveryResponse::default()
        };
        assert!(read_response(&wrong_type).is_err());
        let garbage = DiscoveryResponse {
            resources: vec![prost_types::Any {
                type_url: TYPE_URL.into(),
                value: vec![0xff, 0xff, 0xff],
            }],
            ..DiscoveryResponse::default()
        };
        assert!(read_response(&garbage).is_err());
    }
}
