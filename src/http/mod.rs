//! Limitador's HTTP API: `/status`, `/limits/{ns}`, `/counters/{ns}`, `/check`, `/report`,
//! `/check_and_report` and `/metrics`, with the same JSON bodies and status codes; `/explain`
//! (why a request gets its answer) and `/ui` (a live page); plus the
//! probes `/healthz` (liveness) and `/readyz` (readiness: the storage can be reached). Namespaces may contain `/`
//! (Kuadrant's `<route ns>/<route name>`), either as is or percent-encoded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::call::{Call, Code, Verdict};
use crate::limiter::Limiter;
use crate::limits::{Limit, LimitView};
use crate::request::RequestBounds;
use crate::request::{Descriptor, Request};
use crate::rls::headers;
use crate::status::ServerStatus;
use crate::storage::{CounterSnapshot, ListError, PageRequest, StorageError};
use crate::throttle::{LOG_EVERY, Throttle};

mod asm;
mod auth;
mod explain;
mod reserve;
mod ui;

pub use auth::HttpToken;

/// Lines a client can cause on every call, at most one per interval ([`Throttle`]).
static MALFORMED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(LOG_EVERY));
static STORAGE_FAILED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(LOG_EVERY));

#[derive(Clone)]
struct AppState {
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    bounds: RequestBounds,
    /// The namespace of the ASM-compatible endpoints.
    asm_namespace: String,
}

/// The HTTP API. With a `token`, every route but [`auth::OPEN`] requires it.
pub fn router(
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    bounds: RequestBounds,
    asm_namespace: String,
    token: Option<HttpToken>,
) -> Router {
    let state = AppState {
        limiter,
        status,
        bounds,
        asm_namespace,
    };
    Router::new()
        .route("/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(get_ready))
        .route("/limits/{*namespace}", get(get_limits))
        .route("/counters/{*namespace}", get(get_counters))
        .route("/check", post(check))
        .route("/report", post(report))
        .route("/check_and_report", post(check_and_report))
        .route("/explain", post(explain::explain))
        .route("/ui", get(ui::page))
        .route("/ui/data", get(ui::data))
        .route("/reserve", post(reserve::reserve))
        .route("/commit", post(reserve::commit))
        .route("/ratelimit", get(asm::check))
        .route("/update_ratelimit_record", post(asm::update))
        // Routes go above: this protects every one of them not listed in `auth::OPEN`.
        .route_layer(middleware::from_fn_with_state(token, auth::require_token))
        .layer(DefaultBodyLimit::max(bounds.max_message_bytes))
        .with_state(state)
}

async fn get_status(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.status.to_json())
}

/// Prometheus text exposition of every metric (see `crate::metrics`).
async fn get_metrics() -> Response {
    match crate::metrics::install() {
        Ok(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// Ready while the storage can be reached.
async fn get_ready(State(state): State<AppState>) -> Response {
    match state.status.not_ready_because() {
        None => "ready".into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

async fn get_limits(State(state): State<AppState>, Path(namespace): Path<String>) -> Response {
    let limits = state.limiter.limits();
    let views: Vec<LimitView<'_>> = limits
        .namespace(&namespace)
        .iter()
        .map(|l| l.view())
        .collect();
    Json(views).into_response()
}

#[derive(Serialize)]
struct CounterView<'a> {
    limit: LimitView<'a>,
    set_variables: BTreeMap<&'a str, &'a str>,
    remaining: u64,
    /// Tokens held by reservations now (already subtracted from `remaining`).
    held: u64,
    expires_in_seconds: u64,
}

impl<'a> CounterView<'a> {
    /// A counter as of `now` (refills and expiry applied), as `/counters` shows it.
    fn of(limit: &'a Limit, counter: &'a CounterSnapshot, now: u64) -> Self {
        let state = limit.algorithm.current(Some(counter.state), now);
        CounterView {
            limit: limit.view(),
            set_variables: limit
                .variables
                .iter()
                .map(|v| v.source())
                .zip(counter.key.values())
                .collect(),
            remaining: limit
                .algorithm
                .remaining(state, now)
                .saturating_sub(counter.held),
            held: counter.held,
            expires_in_seconds: limit.algorithm.reset_in_ms(state, now) / 1000,
        }
    }
}

/// One page of a namespace's counters: `?limit=` (default 1000, at most 10,000) and
/// `?cursor=`; the body is the JSON list Limitador answers, and when there is more, the
/// `Link` (`rel="next"`) and `X-Next-Cursor` headers tell where to go on.
async fn get_counters(
    State(state): State<AppState>,
    Path(namespace): Path<String>,
    uri: Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let params = match query {
        Ok(Query(params)) => params,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    let mut limit = None;
    let mut cursor = None;
    for (name, value) in &params {
        let slot = match name.as_str() {
            "limit" => &mut limit,
            "cursor" => &mut cursor,
            other => {
                return bad_request(format!(
                    "unknown query parameter `{other}` (expected `limit` and `cursor`)"
                ));
            }
        };
        if slot.replace(value.as_str()).is_some() {
            return bad_request(format!("query parameter `{name}` given more than once"));
        }
    }
    let limit = match limit.map(str::parse::<usize>) {
        None => PageRequest::DEFAULT_LIMIT,
        Some(Ok(n)) if (1..=PageRequest::MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return bad_request(format!(
                "query parameter `limit` must be a whole number from 1 to {}",
                PageRequest::MAX_LIMIT
            ));
        }
    };
    let page = match state
        .limiter
        .counters(&namespace, PageRequest { cursor, limit })
        .await
    {
        Ok(page) => page,
        Err(ListError::InvalidCursor(reason)) => {
            return bad_request(format!("query parameter `cursor`: {reason}"));
        }
        Err(ListError::Storage(e)) => return storage_error(&e),
    };
    let now = state.limiter.now_ms();
    let views: Vec<CounterView<'_>> = page
        .items
        .iter()
        .map(|(limit, counter)| CounterView::of(limit, counter, now))
        .collect();
    let mut response = Json(views).into_response();
    if let Some(next) = page.next {
        let link = format!("<{}?limit={limit}&cursor={next}>; rel=\"next\"", uri.path());
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::try_from(link) {
            headers.insert(header::LINK, value);
        }
        if let Ok(value) = HeaderValue::try_from(next) {
            headers.insert(HeaderName::from_static("x-next-cursor"), value);
        }
    }
    response
}

/// The body of `/check`, `/report` and `/check_and_report`: `values` become `descriptors[0]`.
#[derive(Deserialize)]
struct CheckAndReportInfo {
    namespace: String,
    values: HashMap<String, String>,
    delta: u64,
    #[serde(default)]
    response_headers: Option<String>,
}

/// The request of an HTTP body's `values` (one descriptor) and cost, checked as every HTTP
/// call checks it: a namespace, and the request bounds.
fn values_request(
    state: &AppState,
    namespace: String,
    values: HashMap<String, String>,
    hits: u64,
) -> Result<Request, String> {
    let request = Request {
        namespace,
        descriptors: vec![Descriptor {
            entries: values.into_iter().collect(),
            hits: None,
            refund: false,
            limit: None,
        }],
        hits,
    };
    if request.namespace.is_empty() {
        return Err("field `namespace` must not be empty".to_string());
    }
    request.check_bounds(&state.bounds)?;
    Ok(request)
}

async fn check(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    decide(&state, &headers, &body, Call::CheckRateLimit).await
}

async fn report(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    decide(&state, &headers, &body, Call::Report).await
}

async fn check_and_report(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    decide(&state, &headers, &body, Call::ShouldRateLimit).await
}

async fn decide(state: &AppState, headers: &HeaderMap, body: &[u8], call: Call) -> Response {
    let info: CheckAndReportInfo = match serde_json::from_slice(body) {
        Ok(info) => info,
        Err(e) => return bad_request(format!("invalid request body: {e}")),
    };
    // As on gRPC, a request-level cost of 0 counts as 1.
    let request = match values_request(state, info.namespace, info.values, info.delta) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    let decision = match state.limiter.decide(&request, call).await {
        Ok(decision) => decision,
        Err(e) => return storage_error(&e),
    };
    if decision.verdict != Verdict::Admitted {
        // As over gRPC (`crate::rls`): at debug, the metrics count every refusal.
        let limit = decision.limiting().and_then(|l| l.limit.name.as_deref());
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::debug!(
            rpc = call.name(),
            http = true,
            request_id,
            namespace = request.namespace,
            limit = limit.unwrap_or(""),
            verdict = ?decision.verdict,
            "over the limit"
        );
    }
    let over = decision.code() == Code::OverLimit;
    let mut response = if over {
        (StatusCode::TOO_MANY_REQUESTS, Json(serde_json::Value::Null)).into_response()
    } else {
        Json(serde_json::Value::Null).into_response()
    };
    if call.has_headers() && info.response_headers.as_deref() == Some("DraftVersion03") {
        for (name, value) in headers::draft03(&decision, over) {
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name),
                HeaderValue::try_from(value.as_str()),
            ) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    response
}

/// Limitador answers 500 when its storage fails; a full counter store is 503 (retry later).
fn storage_error(error: &StorageError) -> Response {
    if let Some(skipped) = STORAGE_FAILED.admit() {
        tracing::warn!(%error, skipped, "storage refused an HTTP call (similar lines are throttled)");
    }
    let status = match error {
        StorageError::CapacityExhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
        StorageError::Unavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, error.to_string()).into_response()
}

fn bad_request(reason: String) -> Response {
    if let Some(skipped) = MALFORMED.admit() {
        tracing::info!(%reason, skipped, "rejected a malformed HTTP request (similar lines are throttled)");
    }
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason,
    )
        .into_response()
}
