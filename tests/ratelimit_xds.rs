//! envoyproxy/ratelimit's xDS config source (`CONFIG_TYPE=GRPC_XDS_SOTW`): the real binary
//! subscribes to a small ADS server this test runs (a tonic server on a free port), which
//! pushes configs and sees the ACKs and NACKs; the limits are checked with ShouldRateLimit.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use common::process::{PATIENCE, Server, command, free_ports, loopback};
use common::*;
use prost::Message;
use ratekeeper::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ratekeeper::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::ratelimit::config::ratelimit::v3::{
    RateLimitConfig, RateLimitDescriptor, RateLimitPolicy, RateLimitUnit,
};
use ratekeeper::xds::TYPE_URL;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type Responses = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// One stream ratekeeper opened: what it sends, the way to push to it, and its headers.
struct Opened {
    requests: Streaming<DiscoveryRequest>,
    push: Responses,
    headers: tonic::metadata::MetadataMap,
}

/// The ADS server: hands every stream opened to the test.
struct Ads {
    opened: mpsc::UnboundedSender<Opened>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let headers = request.metadata().clone();
        let (push, responses) = mpsc::channel(4);
        let opened = Opened {
            requests: request.into_inner(),
            push,
            headers,
        };
        self.opened
            .send(opened)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}

/// The ADS server running on `addr` until `stop` fires.
struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn serve_ads(addr: SocketAddr, opened: mpsc::UnboundedSender<Opened>) -> Running {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(16).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Ads { opened }))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    Running { stop, done }
}

async fn within<T>(what: &str, server: &Server, future: impl Future<Output = Option<T>>) -> T {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(Some(value)) => value,
        Ok(None) => panic!("{what}: ended; log:\n{}", server.log()),
        Err(_) => panic!("{what}: timed out; log:\n{}", server.log()),
    }
}

async fn next_request(opened: &mut Opened, server: &Server) -> DiscoveryRequest {
    let message = within("a DiscoveryRequest", server, async {
        opened.requests.message().await.ok().flatten()
    });
    message.await
}

/// A config of domain `api`: `user` limited to `per_minute` (unit `unit`).
fn config(version: &str, unit: RateLimitUnit, per_minute: u32) -> DiscoveryResponse {
    let config = RateLimitConfig {
        name: "api-config".into(),
        domain: "api".into(),
        descriptors: vec![RateLimitDescriptor {
            key: "user".into(),
            rate_limit: Some(RateLimitPolicy {
                unit: unit as i32,
                requests_per_unit: per_minute,
                ..RateLimitPolicy::default()
            }),
            ..RateLimitDescriptor::default()
        }],
    };
    DiscoveryResponse {
        version_info: version.into(),
        resources: vec![prost_types::Any {
            type_url: TYPE_URL.into(),
            value: config.encode_to_vec(),
        }],
        type_url: TYPE_URL.into(),
        nonce: format!("nonce-{version}"),
        ..DiscoveryResponse::default()
    }
}

fn limit_of(r: &ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse) -> u32 {
    r.statuses
        .first()
        .and_then(|s| s.current_limit.as_ref())
        .map_or(0, |l| l.requests_per_unit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_configs_are_applied_bad_ones_nacked_and_the_stream_reopened() {
    let ads_addr = loopback(free_port());
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let ads = serve_ads(ads_addr, opened_tx.clone()).await;

    let (grpc, http) = free_ports();
    let mut ratekeeper = command();
    ratekeeper
        .env("CONFIG_TYPE", "GRPC_XDS_SOTW")
        .env("CONFIG_GRPC_XDS_SERVER_URL", ads_addr.to_string())
        .env("CONFIG_GRPC_XDS_NODE_ID", "rl-node")
        .env("CONFIG_GRPC_XDS_NODE_METADATA", "zone=a,tier=gold")
        .env("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS", "x-tenant:t1")
        .env("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL", "100ms")
        .env("XDS_CLIENT_BACKOFF_MAX_INTERVAL", "400ms")
        .env("GRPC_PORT", grpc.to_string())
        .env("PORT", http.to_string())
        .env("ENVOY_RLS_HOST", "127.0.0.1")
        .env("HTTP_API_HOST", "127.0.0.1")
        .env("LOG_LEVEL", "debug");
    let server = Server::spawn(ratekeeper, loopback(grpc), loopback(http)).await;
    let user = |name: &str| request("api", vec![descriptor(&[("user", name)])], 0);

    // The subscription: node, metadata, type, headers.
    let mut stream = within("a stream", &server, opened_rx.recv()).await;
    assert_eq!(
        stream.headers.get("x-tenant").and_then(|v| v.to_str().ok()),
        Some("t1")
    );
    let subscribe = next_request(&mut stream, &server).await;
    assert_eq!(subscribe.type_url, TYPE_URL);
    assert_eq!(subscribe.version_info, "");
    let node = subscribe.node.unwrap();
    assert_eq!(node.id, "rl-node");
    let metadata = node.metadata.unwrap();
    let zone = metadata.fields.get("zone").and_then(|v| v.kind.clone());
    assert_eq!(
        zone,
        Some(prost_types::value::Kind::StringValue("a".into()))
    );
    assert_eq!(metadata.fields.len(), 2);
    // No limits before the first version.
    assert_eq!(code(&server.should(user("a")).await), Code::Ok);

    // Version 1: applied and ACKed.
    stream
        .push
        .send(Ok(config("1", RateLimitUnit::Minute, 2)))
        .await
        .unwrap();
    let ack = next_request(&mut stream, &server).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("1", "nonce-1")
    );
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    let r = server.should(user("a")).await;
    assert_eq!((code(&r), limit_of(&r)), (Code::Ok, 2));
    server.should(user("a")).await;
    assert_eq!(code(&server.should(user("a")).await), Code::OverLimit);

    // Version 2 has no unit: NACKed with the reason, version 1 stays in force.
    stream
        .push
        .send(Ok(config("2", RateLimitUnit::Unknown, 9)))
        .await
        .unwrap();
    let nack = next_request(&mut stream, &server).await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("1", "nonce-2")
    );
    let detail = nack.error_detail.expect("a NACK carries error_detail");
    assert!(
        detail.message.contains("api-config") && detail.message.contains("unit"),
        "{}",
        detail.message
    );
    let r = server.should(user("b")).await;
    assert_eq!((code(&r), limit_of(&r)), (Code::Ok, 2));
    assert_eq!(code(&server.should(user("a")).await), Code::OverLimit);

    // Version 3: applied.
    stream
        .push
        .send(Ok(config("3", RateLimitUnit::Hour, 5)))
        .await
        .unwrap();
    let ack = next_request(&mut stream, &server).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("3", "nonce-3")
    );
    assert!(ack.error_detail.is_none());
    let r = server.should(user("c")).await;
    assert_eq!((code(&r), limit_of(&r)), (Code::Ok, 5));

    // The ADS server restarts: ratekeeper reconnects (backing off while it is down), says
    // which version it has, and takes the next push. The limits stay meanwhile.
    drop(stream);
    let _ = ads.stop.send(());
    within("the ADS server to stop", &server, async {
        ads.done.await.ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = server.should(user("d")).await;
    assert_eq!(limit_of(&r), 5);
    let _ads = serve_ads(ads_addr, opened_tx).await;
    let mut stream = within("a new stream", &server, opened_rx.recv()).await;
    let subscribe = next_request(&mut stream, &server).await;
    assert_eq!(subscribe.version_info, "3");
    assert_eq!(subscribe.response_nonce, "");
    stream
        .push
        .send(Ok(config("4", RateLimitUnit::Second, 7)))
        .await
        .unwrap();
    let ack = next_request(&mut stream, &server).await;
    assert_eq!(ack.version_info, "4");
    let r = server.should(user("e")).await;
    assert_eq!((code(&r), limit_of(&r)), (Code::Ok, 7));
    let log = server.log();
    assert!(log.contains("NOT reloaded"), "{log}");
}

/// A limits file alongside the xDS source is refused at start; RUNTIME_ROOT is ignored.
#[test]
fn a_limits_file_with_the_xds_source_is_refused() {
    let output = command()
        .env("CONFIG_TYPE", "GRPC_XDS_SOTW")
        .env("LIMITS_FILE", "limits/llm-tiers.yaml")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("GRPC_XDS_SOTW") && stderr.contains("no limits file"),
        "{stderr}"
    );
}
