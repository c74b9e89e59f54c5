//! OpenTelemetry traces (`--tracing-endpoint`, Limitador's flag): one span per gRPC call with
//! its namespace, hits, decision and the limit that refused, and a child span for the storage
//! call, exported over OTLP/gRPC. The parent is the caller's W3C `traceparent` metadata, so the
//! spans join the gateway's trace.
//!
//! ratekeeper builds and batches its spans itself (no OpenTelemetry SDK): a call hands its
//! finished spans to a bounded queue ([`QUEUE`] spans; when full, spans are dropped and counted
//! in `ratekeeper_trace_spans_dropped`), and one task exports them in batches of at most
//! [`BATCH`] spans, at least every [`FLUSH_EVERY`]. Without `--tracing-endpoint` nothing here
//! runs: the adapters hold no tracer and skip every step.
//!
//! Sampling is the OpenTelemetry default (parent-based, always on): a call whose `traceparent`
//! says "not sampled" gets no span; every other call gets one.

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::call::Call;
use crate::limiter::Decision;
use crate::throttle::{LOG_EVERY, Throttle};

/// Spans waiting to be exported; beyond, new spans are dropped.
pub const QUEUE: usize = 4096;
/// Most spans in one export.
pub const BATCH: usize = 512;
/// Longest a finished span waits before its batch is exported.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Longest one export may take before its batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The name of the storage call's child span.
pub const STORAGE_SPAN: &str = "storage";

static EXPORT_FAILED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(LOG_EVERY));
static DROPPED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(LOG_EVERY));

/// Where finished spans go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tracer {
    spans: mpsc::Sender<Span>,
}

impl Tracer {
    /// A tracer exporting to `endpoint` (`http://host:port`, or `host:port`), and the task that
    /// exports, spawned on the current runtime. The connection is made when spans are first
    /// exported (and re-made after failures), so a collector that is down does not stop the
    /// start.
    pub fn start(endpoint: &str) -> Result<Tracer, String> {
        let url = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        if !url.starts_with("http://") {
            return Err(format!(
                "--tracing-endpoint {endpoint:?}: only http:// (plain OTLP/gRPC) is supported"
            ));
        }
        let channel = Endpoint::from_shared(url)
            .map_err(|e| format!("--tracing-endpoint {endpoint:?}: {e}"))?
            .connect_timeout(EXPORT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (spans, queue) = mpsc::channel(QUEUE);
        tokio::spawn(export(TraceServiceClient::new(channel), queue));
        Ok(Tracer { spans })
    }

    /// Starts the span of one `call`, child of the caller's `traceparent` if it has a valid
    /// one; `None` when the caller's trace is not sampled.
    pub fn rpc(&self, call: Call, metadata: &MetadataMap) -> Option<RpcSpan> {
        let parent = metadata
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .and_then(TraceParent::parse);
        if parent.as_ref().is_some_and(|p| !p.sampled) {
            return None;
        }
        let mut ids = [0u8; 24];
        getrandom::fill(&mut ids).ok()?;
        let (trace_id, span_id) = match &parent {
            Some(parent) => (parent.trace_id, ids[16..].try_into().ok()?),
            None => (ids[..16].try_into().ok()?, ids[16..].try_into().ok()?),
        };
        Some(RpcSpan {
            call,
            trace_id,
            span_id,
            parent_id: parent.map(|p| p.span_id),
            wall: SystemTime::now(),
            started: Instant::now(),
            attributes: Vec::new(),
            storage: None,
            error: None,
        })
    }

    /// Queues a finished span (and its storage child); dropped when the queue is full.
    pub fn finish(&self, span: RpcSpan) {
        for span in span.into_spans() {
            if self.spans.try_send(span).is_err() {
                metrics::counter!("ratekeeper_trace_spans_dropped").increment(1);
                if let Some(skipped) = DROPPED.admit() {
                    tracing::warn!(
                        skipped,
                        "trace spans dropped: the export queue is full (the collector is slow or \
                         down; similar lines are throttled)"
                    );
                }
            }
        }
    }
}

/// A call's span while the call runs.
pub struct RpcSpan {
    call: Call,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_id: Option<[u8; 8]>,
    /// When it started, on the wall clock (what OTLP carries) and on the monotonic one.
    wall: SystemTime,
    started: Instant,
    attributes: Vec<KeyValue>,
    /// The storage call: when it started and how long it took.
    storage: Option<(Instant, Duration)>,
    error: Option<String>,
}

impl RpcSpan {
    /// Records the request's namespace and hits.
    pub fn request(&mut self, namespace: &str, hits: u64) {
        self.attributes.push(text("ratelimit.namespace", namespace));
        self.attributes.push(int("ratelimit.hits_addend", hits));
    }

    /// Records the decision: its verdict, the limit that refused, the storage call.
    pub fn decided(&mut self, decision: &Decision) {
        let limited = decision.refused();
        self.attributes.push(boolean("ratelimit.limited", limited));
        if limited && let Some(limiting) = decision.limiting() {
            let limit = &limiting.limit;
            if let Some(name) = &limit.name {
                self.attributes.push(text("ratelimit.limit_name", name));
            }
            self.attributes
                .push(int("ratelimit.limit_max_value", limit.max_value));
            self.attributes
                .push(int("ratelimit.limit_seconds", limit.seconds));
        }
        self.storage = decision.storage_time.map(|t| (t.started, t.elapsed));
    }

    /// Records how the call was answered: `outcome` as `ratelimit.decision`, and the gRPC
    /// error's message as the span's error status.
    pub fn answered(&mut self, outcome: &str, error: Option<&tonic::Status>) {
        self.attributes.push(text("ratelimit.decision", outcome));
        if let Some(status) = error {
            self.attributes
                .push(int("rpc.grpc.status_code", status.code() as u64));
            self.error = Some(status.message().to_string());
        }
    }

    /// The OTLP spans: the call's, and the storage call's as its child.
    fn into_spans(self) -> Vec<Span> {
        let ended = self.started.elapsed();
        let at = |offset: Duration| unix_nanos(self.wall + offset);
        let (service, method) = self.call.grpc_method();
        let mut attributes = vec![
            text("rpc.system", "grpc"),
            text("rpc.service", service),
            text("rpc.method", method),
        ];
        attributes.extend(self.attributes);
        let status = match self.error {
            Some(message) => Status {
                message,
                code: StatusCode::Error as i32,
            },
            None => Status::default(),
        };
        let mut spans = vec![Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.parent_id.map(|id| id.to_vec()).unwrap_or_default(),
            name: format!("{service}/{method}"),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: at(Duration::ZERO),
            end_time_unix_nano: at(ended),
            attributes,
            status: Some(status),
            ..Span::default()
        }];
        if let Some((started, elapsed)) = self.storage {
            let offset = started.saturating_duration_since(self.started);
            let mut id = [0u8; 8];
            if getrandom::fill(&mut id).is_ok() {
                spans.push(Span {
                    trace_id: self.trace_id.to_vec(),
                    span_id: id.to_vec(),
                    parent_span_id: self.span_id.to_vec(),
                    name: STORAGE_SPAN.to_string(),
                    kind: SpanKind::Internal as i32,
                    start_time_unix_nano: at(offset),
                    end_time_unix_nano: at(offset + elapsed),
                    ..Span::default()
                });
            }
        }
        spans
    }
}

/// A valid W3C `traceparent`: `{version}-{trace id}-{parent id}-{flags}` in lowercase hex
/// (version `ff` and all-zero ids are invalid; later versions may append fields).
#[derive(Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let version = hex::<1>(parts.next()?)?[0];
        let trace_id = hex::<16>(parts.next()?)?;
        let span_id = hex::<8>(parts.next()?)?;
        let flags = hex::<1>(parts.next()?)?[0];
        let rest = parts.next();
        let valid_version = version != 0xff && (version != 0 || rest.is_none());
        let valid_ids = trace_id != [0; 16] && span_id != [0; 8];
        (valid_version && valid_ids).then_some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

/// Exports what the queue receives, in batches, until every [`Tracer`] is gone (then the
/// last batch is exported).
async fn export(mut client: TraceServiceClient<Channel>, mut queue: mpsc::Receiver<Span>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = queue.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let spans = std::mem::take(&mut batch);
        let count = spans.len();
        if let Err(status) = client.export(request(spans)).await
            && let Some(skipped) = EXPORT_FAILED.admit()
        {
            tracing::warn!(
                spans = count,
                error = %status.message(),
                skipped,
                "trace export failed: spans dropped (similar lines are throttled)"
            );
        }
    }
}

fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![text("service.name", "ratekeeper")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "ratekeeper".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..InstrumentationScope::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

fn attribute(key: &str, value: AnyValueKind) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    attribute(key, AnyValueKind::StringValue(value.to_string()))
}

fn int(key: &str, value: u64) -> KeyValue {
    attribute(
        key,
        AnyValueKind::IntValue(i64::try_from(value).unwrap_or(i64::MAX)),
    )
}

fn boolean(key: &str, value: bool) -> KeyValue {
    attribute(key, AnyValueKind::BoolValue(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_w3c_says() {
        let parent =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parent.trace_id[..2], [0x4b, 0xf9]);
        assert_eq!(parent.span_id[7], 0xb7);
        assert!(parent.sampled);
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some(),
            "a later version may add fields"
        );
        for invalid in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(invalid), None, "{invalid:?}");
        }
    }
}
