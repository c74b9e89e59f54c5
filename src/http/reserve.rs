//! Reservations over HTTP (ratekeeper's own, beside Limitador's API): `POST /reserve`
//! `{namespace, values, amount, ttl_seconds?}` → 200 `{"reservation_id"}`, or 429 with the body
//! `/check` answers; `POST /commit` `{namespace, values, reservation_id, actual}` → 200
//! `{"released"}`. `values` become `descriptors[0]`, as for `/check`. 501 when reservations are
//! disabled; 503 when a counter carries the most holds it may.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AppState, bad_request, storage_error, values_request};
use crate::call::Code;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveInfo {
    namespace: String,
    values: HashMap<String, String>,
    amount: u64,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitInfo {
    namespace: String,
    values: HashMap<String, String>,
    #[serde(default)]
    reservation_id: String,
    actual: u64,
}

fn disabled() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "reservations are disabled (--disable-reservations)",
    )
        .into_response()
}

pub(super) async fn reserve(State(state): State<AppState>, body: Bytes) -> Response {
    if !state.limiter.reservations().enabled {
        return disabled();
    }
    let info: ReserveInfo = match serde_json::from_slice(&body) {
        Ok(info) => info,
        Err(e) => return bad_request(format!("invalid request body: {e}")),
    };
    let request = match values_request(&state, info.namespace, info.values, info.amount) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    let ttl = info.ttl_seconds.map(Duration::from_secs);
    let decision = match state.limiter.reserve(&request, ttl).await {
        Ok(decision) => decision,
        Err(e) => return storage_error(&e),
    };
    if decision.holds_full {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "a counter of this request already carries {} holds (the bound per counter); nothing was held",
                crate::algorithm::MAX_HOLDS
            ),
        )
            .into_response();
    }
    match (decision.code(), decision.reservation_id) {
        (Code::Ok, Some(id)) => Json(serde_json::json!({ "reservation_id": id })).into_response(),
        _ => (StatusCode::TOO_MANY_REQUESTS, Json(serde_json::Value::Null)).into_response(),
    }
}

pub(super) async fn commit(State(state): State<AppState>, body: Bytes) -> Response {
    if !state.limiter.reservations().enabled {
        return disabled();
    }
    let info: CommitInfo = match serde_json::from_slice(&body) {
        Ok(info) => info,
        Err(e) => return bad_request(format!("invalid request body: {e}")),
    };
    let request = match values_request(&state, info.namespace, info.values, info.actual) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    match state.limiter.commit(&request, &info.reservation_id).await {
        Ok(decision) => Json(serde_json::json!({ "released": decision.released })).into_response(),
        Err(e) => storage_error(&e),
    }
}
