//! The HTTP interface of Alibaba ASM's token rate limit service, so its Wasm plugin can call
//! ratekeeper unchanged:
//!
//! - `GET /ratelimit?ratelimit_keys=["k1","k2"]` → 200 `{"allow": bool, "description": "..."}`
//!   (a read-only check: allowed while every key's budget has at least one token left);
//! - `POST /update_ratelimit_record` with `{"ratelimit_keys": [...], "prompt_tokens": n,
//!   "completion_tokens": n, "total_tokens": n}` → 200: charges `total_tokens` (or, when it is
//!   absent or 0, prompt + completion) to every key, even past the limit (debt).
//!
//! Each key is one descriptor `{key: <the key>}` in the namespace `--asm-namespace`, judged on
//! its own. Its limits come from ASM's own `RATE_LIMIT_CONFIG` (turned into limits by
//! [`crate::limits::parse_rate_limit_config`], first matching rule wins) or from the limits
//! file, where limits pick keys with CEL, e.g. `descriptors[0].key.matches('regular-user.*')`,
//! and every limit whose conditions match applies (all must have room).

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, bad_request, storage_error};
use crate::algorithm::MAX_COUNT;
use crate::call::{Call, Verdict};
use crate::limiter::Decision;
use crate::request::{Descriptor, Request};

#[derive(Deserialize)]
pub(super) struct CheckQuery {
    ratelimit_keys: String,
}

pub(super) async fn check(
    State(state): State<AppState>,
    Query(query): Query<CheckQuery>,
) -> Response {
    let keys: Vec<String> = match serde_json::from_str(&query.ratelimit_keys) {
        Ok(keys) => keys,
        Err(e) => {
            return bad_request(format!(
                "`ratelimit_keys` must be a JSON list of strings: {e}"
            ));
        }
    };
    let request = request(&state, &keys, 1);
    if let Err(reason) = request.check_bounds(&state.bounds) {
        return bad_request(reason);
    }
    let decision = match state.limiter.decide(&request, Call::CheckRateLimit).await {
        Ok(decision) => decision,
        Err(e) => return storage_error(&e),
    };
    let limited = limited_key(&keys, &decision);
    let allow = limited.is_none();
    let description = limited.unwrap_or_else(|| "allowed".to_string());
    Json(json!({"allow": allow, "description": description})).into_response()
}

#[derive(Deserialize)]
pub(super) struct UsageRecord {
    ratelimit_keys: Vec<String>,
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
}

pub(super) async fn update(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let record: UsageRecord = match serde_json::from_slice(&body) {
        Ok(record) => record,
        Err(e) => return bad_request(format!("invalid request body: {e}")),
    };
    let tokens = match record.total_tokens {
        0 => record
            .prompt_tokens
            .saturating_add(record.completion_tokens),
        total => total,
    };
    if tokens == 0 || record.ratelimit_keys.is_empty() {
        return Json(json!({"charged": 0})).into_response();
    }
    let request = request(&state, &record.ratelimit_keys, tokens);
    if let Err(reason) = request.check_bounds(&state.bounds) {
        return bad_request(reason);
    }
    match state.limiter.decide(&request, Call::Report).await {
        Ok(decision) => Json(json!({"charged": charged(&decision)})).into_response(),
        Err(e) => storage_error(&e),
    }
}

/// The tokens really charged, over every key listed (a key listed twice is charged twice; a
/// key no limit applies to, nothing), saturating as counters do.
fn charged(decision: &Decision) -> u64 {
    let per_key = decision
        .statuses
        .iter()
        .filter_map(|status| status.limit.as_ref());
    per_key
        .fold(0u64, |sum, limit| sum.saturating_add(limit.outcome.charged))
        .min(MAX_COUNT)
}

/// One descriptor per key, each carrying its own cost.
fn request(state: &AppState, keys: &[String], cost: u64) -> Request {
    Request {
        namespace: state.asm_namespace.clone(),
        descriptors: keys
            .iter()
            .map(|key| Descriptor {
                entries: vec![("key".to_string(), key.clone())],
                hits: Some(cost),
                refund: false,
                limit: None,
            })
            .collect(),
        hits: 0,
    }
}

/// "rate limited: key "k" (limit regular-user: 0 of 200 tokens left, full again in 120 s)".
fn limited_key(keys: &[String], decision: &Decision) -> Option<String> {
    let (key, status) = keys
        .iter()
        .zip(&decision.statuses)
        .find(|(_, status)| status.verdict == Verdict::Refused)?;
    let detail = status.limit.as_ref().map(|l| {
        format!(
            " (limit {}: {} of {} tokens left, full again in {} s)",
            l.limit.name.as_deref().unwrap_or("unnamed"),
            l.outcome.remaining,
            l.limit.max_value,
            l.outcome.reset_in_ms.div_ceil(1000)
        )
    });
    Some(format!(
        "rate limited: key {key:?}{}",
        detail.unwrap_or_default()
    ))
}
