//! OpenTelemetry tracing (`--tracing-endpoint`) end to end: the real binary exports to an OTLP
//! receiver this test runs (a tonic TraceService from the `opentelemetry-proto` definitions),
//! and the spans it receives are checked: names, attributes, parent ids from the caller's W3C
//! `traceparent`, the storage child span, and no span for a trace the caller does not sample.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::*;
use common::{code, descriptor, request};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::telemetry::STORAGE_SPAN;

const LIMITS: &str = r#"
- {name: per-user, namespace: traced, max_value: 1, seconds: 60, variables: ["descriptors[0].user"]}
"#;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE_ID: &str = "11111111111111111111111111111111";
const RPC_SPAN: &str = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// An OTLP trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|a| a.key == "service.name")
                    .and_then(|a| a.value.clone())
            });
            assert_eq!(
                service.and_then(|v| v.value),
                Some(Value::StringValue("ratekeeper".into()))
            );
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    /// The spans received once `count` of them are (at most 10 s).
    async fn wait_for(&self, count: usize, server: &Server) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if spans.len() >= count {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} spans received; log:\n{}",
                spans.len(),
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

fn text(value: &str) -> Option<Value> {
    Some(Value::StringValue(value.to_string()))
}

/// ShouldRateLimit for `user`, with `traceparent` as metadata when given.
async fn call(server: &Server, user: &str, traceparent: Option<String>) -> Code {
    let mut call = tonic::Request::new(request("traced", vec![descriptor(&[("user", user)])], 1));
    if let Some(traceparent) = traceparent {
        call.metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
    }
    code(&server.try_should(call).await.unwrap())
}

#[tokio::test]
async fn each_call_is_a_span_of_the_callers_trace_with_a_storage_child() {
    let (receiver, collector) = Receiver::start().await;
    let mut limits = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut limits, LIMITS.as_bytes()).unwrap();
    let endpoint = format!("http://{collector}");
    let server = Server::start_on_loopback(&[
        "--tracing-endpoint",
        &endpoint,
        limits.path().to_str().unwrap(),
    ])
    .await;

    let traceparent = Some(format!("00-{TRACE_ID}-{PARENT_ID}-01"));
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert_eq!(call(&server, "ann", traceparent.clone()).await, Code::Ok);
    let unsampled = Some(format!("00-{UNSAMPLED_TRACE_ID}-{PARENT_ID}-00"));
    assert_eq!(call(&server, "bob", unsampled).await, Code::Ok);
    assert_eq!(call(&server, "ann", traceparent).await, Code::OverLimit);
    assert_eq!(call(&server, "cid", None).await, Code::Ok);

    // Three calls traced, each with its storage child.
    let spans = receiver.wait_for(6, &server).await;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) != UNSAMPLED_TRACE_ID),
        "a trace the caller does not sample gets no span"
    );
    let rpcs: Vec<&Span> = spans.iter().filter(|s| s.name == RPC_SPAN).collect();
    assert_eq!(rpcs.len(), 3, "{spans:#?}");
    let (admitted, refused, root) = (rpcs[0], rpcs[1], rpcs[2]);

    for span in [admitted, refused] {
        assert_eq!(hex(&span.trace_id), TRACE_ID);
        assert_eq!(hex(&span.parent_span_id), PARENT_ID);
        assert_eq!(attribute(span, "ratelimit.namespace"), text("traced"));
        assert_eq!(attribute(span, "rpc.system"), text("grpc"));
        assert_eq!(attribute(span, "rpc.method"), text("ShouldRateLimit"));
        assert_eq!(
            attribute(span, "ratelimit.hits_addend"),
            Some(Value::IntValue(1))
        );
        assert!(span.start_time_unix_nano >= before);
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    }
    assert_ne!(admitted.span_id, refused.span_id);
    assert_eq!(attribute(admitted, "ratelimit.decision"), text("ok"));
    assert_eq!(
        attribute(admitted, "ratelimit.limited"),
        Some(Value::BoolValue(false))
    );
    assert_eq!(attribute(admitted, "ratelimit.limit_name"), None);
    assert_eq!(attribute(refused, "ratelimit.decision"), text("over_limit"));
    assert_eq!(
        attribute(refused, "ratelimit.limited"),
        Some(Value::BoolValue(true))
    );
    assert_eq!(attribute(refused, "ratelimit.limit_name"), text("per-user"));

    assert!(
        root.parent_span_id.is_empty(),
        "no traceparent: a root span"
    );
    assert_ne!(hex(&root.trace_id), TRACE_ID);
    assert_eq!(root.trace_id.len(), 16);

    for rpc in [admitted, refused, root] {
        let children: Vec<&Span> = (spans.iter())
            .filter(|s| s.parent_span_id == rpc.span_id)
            .collect();
        assert_eq!(children.len(), 1, "{spans:#?}");
        let storage = children[0];
        assert_eq!(storage.name, STORAGE_SPAN);
        assert_eq!(storage.trace_id, rpc.trace_id);
        assert!(storage.start_time_unix_nano >= rpc.start_time_unix_nano);
        assert!(storage.end_time_unix_nano <= rpc.end_time_unix_nano);
        assert!(storage.end_time_unix_nano >= storage.start_time_unix_nano);
    }
}

#[tokio::test]
async fn a_collector_that_is_down_costs_no_call() {
    // Nothing listens on this port: exports fail, calls are answered all the same.
    let port = common::free_port();
    let mut limits = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut limits, LIMITS.as_bytes()).unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let server = Server::start_on_loopback(&[
        "--tracing-endpoint",
        &endpoint,
        limits.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(call(&server, "ann", None).await, Code::Ok);
    assert_eq!(call(&server, "ann", None).await, Code::OverLimit);
    let log = server
        .log_when(|log| log.contains("trace export failed"))
        .await;
    assert!(log.contains("trace export failed"), "{log}");
}
