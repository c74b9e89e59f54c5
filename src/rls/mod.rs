//! gRPC adapters: Envoy's `ShouldRateLimit` and Kuadrant's `CheckRateLimit`/`Report`. They
//! translate requests into [`Limiter`] calls and decisions into responses, nothing else.

pub mod headers;
pub mod refusal;

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prost_types::Duration;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::call::{Call, Code, Verdict};
use crate::limiter::{Decision, Limiter};
use crate::metrics::{self, Outcome};
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    self as response, DescriptorStatus, RateLimit,
};
use crate::proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse, rate_limit_service_server,
};
use crate::proto::kuadrant::service::ratelimit::v1 as kuadrant;
use crate::request::RequestBounds;
use crate::request::{Descriptor, LimitOverride, Request};
use crate::storage::StorageError;
use crate::telemetry::{RpcSpan, Tracer};
use crate::throttle::{LOG_EVERY, Throttle};
use headers::RateLimitHeaders;
use refusal::OverLimitResponse;

/// Lines a client can cause on every call, at most one per interval ([`Throttle`]).
static MALFORMED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(LOG_EVERY));
static STORAGE_FAILED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(LOG_EVERY));

/// Serves both rate limit services over one limiter.
#[derive(Clone)]
pub struct RateLimitServer {
    limiter: Arc<Limiter>,
    answers: Answers,
    bounds: RequestBounds,
    /// `--tracing-endpoint`: a span per call; `None`, no tracing work at all.
    tracer: Option<Tracer>,
}

/// What answers carry besides the decision: rate limit headers (`--rate-limit-headers`) and
/// the body of a refusal (`--over-limit-response`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Answers {
    pub headers: RateLimitHeaders,
    pub over_limit: OverLimitResponse,
}

impl RateLimitServer {
    pub fn new(limiter: Arc<Limiter>, answers: Answers, bounds: RequestBounds) -> Self {
        Self {
            limiter,
            answers,
            bounds,
            tracer: None,
        }
    }

    /// Traces every call through `tracer`.
    pub fn traced_by(mut self, tracer: Option<Tracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// The span of a call, when tracing is on and the caller's trace is sampled.
    fn span(&self, call: Call, metadata: &MetadataMap) -> Option<RpcSpan> {
        self.tracer.as_ref().and_then(|t| t.rpc(call, metadata))
    }

    /// Ends a call's span with how the call was answered.
    fn finish<T>(&self, span: Option<RpcSpan>, outcome: Outcome, result: &Result<T, Status>) {
        if let (Some(tracer), Some(mut span)) = (&self.tracer, span) {
            span.answered(outcome.name(), result.as_ref().err());
            tracer.finish(span);
        }
    }

    async fn handle(
        &self,
        request: tonic::Request<RateLimitRequest>,
        call: Call,
    ) -> Result<tonic::Response<RateLimitResponse>, Status> {
        let started = Instant::now();
        let (metadata, _, message) = request.into_parts();
        let mut span = self.span(call, &metadata);
        let result = self.decide(message, call, &metadata, &mut span).await;
        let outcome = outcome_of(&result, |response| response.overall_code);
        metrics::rpc(call, outcome, started.elapsed());
        self.finish(span, outcome, &result);
        result.map(tonic::Response::new)
    }

    async fn decide(
        &self,
        request: RateLimitRequest,
        call: Call,
        metadata: &MetadataMap,
        span: &mut Option<RpcSpan>,
    ) -> Result<RateLimitResponse, Status> {
        let rpc = call.name();
        // Only the lines logged for this call carry it (no per-call span to pay for), and it
        // is read only when a line is logged.
        let request_id = || {
            metadata
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let request = to_request(request, &self.bounds).inspect_err(|status| {
            if let Some(skipped) = MALFORMED.admit() {
                let reason = status.message();
                tracing::info!(
                    rpc,
                    request_id = request_id(),
                    reason,
                    skipped,
                    "rejected a malformed request (similar lines are throttled)"
                );
            }
        })?;
        if let Some(span) = span {
            // (0 means 1, as the request says.)
            span.request(&request.namespace, request.hits.max(1));
        }
        let decision = self.limiter.decide(&request, call).await.map_err(|error| {
            if let Some(skipped) = STORAGE_FAILED.admit() {
                tracing::warn!(rpc, request_id = request_id(), %error, skipped,
                    "storage refused a decision (similar lines are throttled)");
            }
            storage_status(&error)
        })?;
        if let Some(span) = span {
            span.decided(&decision);
        }
        if decision.verdict != Verdict::Admitted {
            // Refusals are what a rate limiter is for: the metrics count them, and a line per
            // refusal would be the heaviest traffic of all at the default level.
            let limit = decision.limiting().and_then(|l| l.limit.name.as_deref());
            tracing::debug!(
                rpc,
                request_id = request_id(),
                namespace = request.namespace,
                limit = limit.unwrap_or(""),
                verdict = ?decision.verdict,
                "over the limit"
            );
        }
        Ok(to_response(&decision, self.answers))
    }
}

impl RateLimitServer {
    async fn reserve_now(
        &self,
        message: kuadrant::ReserveRequest,
        span: &mut Option<RpcSpan>,
    ) -> Result<kuadrant::ReserveResponse, Status> {
        // A negative ttl is no ttl of its own, like an absent or zero one.
        let ttl = message.ttl.and_then(|ttl| {
            let seconds = u64::try_from(ttl.seconds).ok()?;
            let nanos = u32::try_from(ttl.nanos).ok()?;
            Some(std::time::Duration::new(seconds, nanos.min(999_999_999)))
        });
        let request =
            self.reservation_request(message.domain, message.descriptors, message.amount, span)?;
        let decision = (self.limiter.reserve(&request, ttl).await)
            .map_err(|error| self.storage_refused(Call::Reserve, &error))?;
        if let Some(span) = span {
            span.decided(&decision);
        }
        if decision.holds_full {
            return Err(Status::resource_exhausted(format!(
                "a counter of this request already carries {} holds (the bound per counter); nothing was held",
                crate::algorithm::MAX_HOLDS
            )));
        }
        Ok(kuadrant::ReserveResponse {
            code: response_code(decision.code()) as i32,
            reservation_id: decision.reservation_id.unwrap_or_default(),
        })
    }

    async fn commit_now(
        &self,
        message: kuadrant::CommitRequest,
        span: &mut Option<RpcSpan>,
    ) -> Result<kuadrant::CommitResponse, Status> {
        let request = self.reservation_request(
            message.domain,
            message.descriptors,
            message.actual_amount,
            span,
        )?;
        let decision = (self.limiter.commit(&request, &message.reservation_id).await)
            .map_err(|error| self.storage_refused(Call::Commit, &error))?;
        if let Some(span) = span {
            span.decided(&decision);
        }
        Ok(kuadrant::CommitResponse {
            reservation_released: decision.released,
        })
    }

    /// A Reserve's or Commit's request (its amount taken as it is), unless reservations are
    /// disabled.
    fn reservation_request(
        &self,
        domain: String,
        descriptors: Vec<RateLimitDescriptor>,
        amount: u64,
        span: &mut Option<RpcSpan>,
    ) -> Result<Request, Status> {
        if !self.limiter.reservations().enabled {
            return Err(Status::unimplemented(
                "reservations are disabled (--disable-reservations)",
            ));
        }
        let request = RateLimitRequest {
            domain,
            descriptors,
            hits_addend: 0,
        };
        let request = to_request(request, &self.bounds)?;
        if let Some(span) = span {
            span.request(&request.namespace, amount);
        }
        Ok(Request {
            hits: amount,
            ..request
        })
    }

    fn storage_refused(&self, call: Call, error: &StorageError) -> Status {
        if let Some(skipped) = STORAGE_FAILED.admit() {
            tracing::warn!(rpc = call.name(), %error, skipped,
                "storage refused a decision (similar lines are throttled)");
        }
        storage_status(error)
    }
}

#[tonic::async_trait]
impl rate_limit_service_server::RateLimitService for RateLimitServer {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, Status> {
        self.handle(request, Call::ShouldRateLimit).await
    }
}

#[tonic::async_trait]
impl kuadrant::rate_limit_service_server::RateLimitService for RateLimitServer {
    async fn check_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, Status> {
        self.handle(request, Call::CheckRateLimit).await
    }

    async fn report(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, Status> {
        self.handle(request, Call::Report).await
    }

    async fn reserve(
        &self,
        request: tonic::Request<kuadrant::ReserveRequest>,
    ) -> Result<tonic::Response<kuadrant::ReserveResponse>, Status> {
        let started = Instant::now();
        let (metadata, _, message) = request.into_parts();
        let mut span = self.span(Call::Reserve, &metadata);
        let result = self.reserve_now(message, &mut span).await;
        let outcome = outcome_of(&result, |response| response.code);
        metrics::rpc(Call::Reserve, outcome, started.elapsed());
        self.finish(span, outcome, &result);
        result.map(tonic::Response::new)
    }

    async fn commit(
        &self,
        request: tonic::Request<kuadrant::CommitRequest>,
    ) -> Result<tonic::Response<kuadrant::CommitResponse>, Status> {
        let started = Instant::now();
        let (metadata, _, message) = request.into_parts();
        let mut span = self.span(Call::Commit, &metadata);
        let result = self.commit_now(message, &mut span).await;
        // A commit is always answered OK (a report when its hold is gone).
        let outcome = outcome_of(&result, |_| response::Code::Ok as i32);
        metrics::rpc(Call::Commit, outcome, started.elapsed());
        self.finish(span, outcome, &result);
        result.map(tonic::Response::new)
    }
}

/// How an answered call counts in `ratekeeper_rpc_calls`: by the wire code `code` reads from
/// its answer, or by its error.
fn outcome_of<T>(result: &Result<T, Status>, code: impl Fn(&T) -> i32) -> Outcome {
    match result {
        Ok(answer) => match response::Code::try_from(code(answer)) {
            Ok(response::Code::Ok) => Outcome::Ok,
            Ok(response::Code::OverLimit) => Outcome::OverLimit,
            _ => Outcome::Unknown,
        },
        Err(status) if status.code() == tonic::Code::InvalidArgument => Outcome::Invalid,
        Err(_) => Outcome::Error,
    }
}

/// The gRPC status for a storage failure: Envoy's `failure_mode_deny` decides what happens.
fn storage_status(error: &StorageError) -> Status {
    match error {
        StorageError::CapacityExhausted { .. } => Status::resource_exhausted(error.to_string()),
        StorageError::Unavailable(_) => Status::unavailable(error.to_string()),
    }
}

/// Converts a request and checks it against the bounds.
fn to_request(request: RateLimitRequest, bounds: &RequestBounds) -> Result<Request, Status> {
    let request = Request {
        namespace: request.domain,
        descriptors: request
            .descriptors
            .into_iter()
            .map(|d| Descriptor {
                entries: d.entries.into_iter().map(|e| (e.key, e.value)).collect(),
                hits: d.hits_addend,
                refund: d.is_negative_hits,
                limit: d.limit.and_then(|l| {
                    let seconds = unit_seconds(l.unit)?;
                    Some(LimitOverride {
                        max_value: u64::from(l.requests_per_unit),
                        seconds,
                    })
                }),
            })
            .collect(),
        hits: u64::from(request.hits_addend),
    };
    request
        .check_bounds(bounds)
        .map_err(Status::invalid_argument)?;
    Ok(request)
}

pub fn to_response(decision: &Decision, answers: Answers) -> RateLimitResponse {
    let overall_code = decision.code();
    let statuses = decision
        .statuses
        .iter()
        .map(|status| {
            let mut out = DescriptorStatus {
                code: response_code(decision.code_of(status)) as i32,
                ..Default::default()
            };
            if let Some(limit) = &status.limit {
                out.current_limit = Some(RateLimit {
                    name: limit.limit.name.clone().unwrap_or_default(),
                    requests_per_unit: saturate_u32(limit.limit.max_value),
                    unit: unit_of(&limit.limit) as i32,
                });
                out.limit_remaining = saturate_u32(limit.outcome.remaining);
                out.duration_until_reset = Some(duration(limit.outcome.reset_in_ms));
            }
            if status.unlimited {
                out.limit_remaining = u32::MAX;
            }
            out
        })
        .collect();
    let over_limit = overall_code == Code::OverLimit;
    let mut added = match answers.headers {
        RateLimitHeaders::DraftVersion03 if decision.call.has_headers() => {
            headers::draft03(decision, over_limit)
        }
        RateLimitHeaders::EnvoyRatelimit if decision.call.has_headers() => {
            headers::envoy_ratelimit(decision)
        }
        _ => Vec::new(),
    };
    let raw_body = match answers.over_limit {
        OverLimitResponse::OpenAi if over_limit => {
            let (body, refusal_headers) = refusal::openai(decision);
            for (name, value) in refusal_headers {
                // Retry-After once, whichever option asked for it first.
                if !added.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    added.push((name, value));
                }
            }
            body
        }
        _ => Vec::new(),
    };
    let response_headers_to_add = added
        .into_iter()
        .map(|(key, value)| HeaderValue {
            key: key.to_string(),
            value,
        })
        .collect();
    RateLimitResponse {
        overall_code: response_code(overall_code) as i32,
        statuses,
        response_headers_to_add,
        raw_body,
        dynamic_metadata: decision.dynamic_metadata.as_ref().map(to_struct),
        ..Default::default()
    }
}

/// The wire code of what the client is told.
fn response_code(code: Code) -> response::Code {
    match code {
        Code::Ok => response::Code::Ok,
        Code::OverLimit => response::Code::OverLimit,
        Code::Unknown => response::Code::Unknown,
    }
}

/// Envoy's unit for a window, when the window is exactly one unit (a calendar quota's period
/// is its unit; a month of seconds is 30 days and a year 365, as in envoyproxy/ratelimit);
/// UNKNOWN otherwise (Envoy then leaves `w=` out of the headers it builds).
fn unit_of(limit: &crate::limits::Limit) -> response::rate_limit::Unit {
    use crate::algorithm::Period;
    use response::rate_limit::Unit;
    match limit.calendar().map(|c| c.period) {
        Some(Period::Day) => return Unit::Day,
        Some(Period::Week) => return Unit::Week,
        Some(Period::Month) => return Unit::Month,
        None => {}
    }
    match limit.seconds {
        1 => Unit::Second,
        60 => Unit::Minute,
        3_600 => Unit::Hour,
        86_400 => Unit::Day,
        604_800 => Unit::Week,
        2_592_000 => Unit::Month,
        31_536_000 => Unit::Year,
        _ => Unit::Unknown,
    }
}

/// The length of a unit Envoy sends in a descriptor's own limit; `None` for UNKNOWN.
fn unit_seconds(unit: i32) -> Option<u64> {
    use response::rate_limit::Unit;
    let seconds = match Unit::try_from(unit).ok()? {
        Unit::Unknown => return None,
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3_600,
        Unit::Day => 86_400,
        Unit::Week => 604_800,
        Unit::Month => 2_592_000,
        Unit::Year => 31_536_000,
    };
    Some(seconds)
}

/// JSON as a protobuf `Struct` (numbers as doubles, as protobuf has them).
fn to_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    fn value(json: &serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match json {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                values: items.iter().map(value).collect(),
            }),
            serde_json::Value::Object(map) => Kind::StructValue(to_struct(map)),
        };
        prost_types::Value { kind: Some(kind) }
    }
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

fn saturate_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn duration(ms: u64) -> Duration {
    Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}
