//! `POST /explain`: for a namespace and descriptor values (the body of `/check`, `delta`
//! optional, default 1), which limits apply and which do not (the condition that is false,
//! the key that is missing, the expression that failed), the counters the applying ones name
//! (usage, remaining, reset) and what `/check` would answer. Read-only; protected by the token.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, bad_request, values_request};
use crate::call::Code;
use crate::limiter::{Explanation, LimitExplanation};

#[derive(Deserialize)]
struct ExplainInfo {
    namespace: String,
    values: HashMap<String, String>,
    #[serde(default = "one")]
    delta: u64,
}

fn one() -> u64 {
    1
}

pub(super) async fn explain(State(state): State<AppState>, body: Bytes) -> Response {
    let info: ExplainInfo = match serde_json::from_slice(&body) {
        Ok(info) => info,
        Err(e) => return bad_request(format!("invalid request body: {e}")),
    };
    let values: BTreeMap<String, String> = info
        .values
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let request = match values_request(&state, info.namespace, info.values, info.delta) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    let explanation = state.limiter.explain(&request).await;
    let mut body = to_json(&explanation);
    body["namespace"] = json!(request.namespace);
    body["values"] = json!(values);
    body["delta"] = json!(request.hits.max(1));
    (StatusCode::OK, Json(body)).into_response()
}

fn to_json(explanation: &Explanation) -> Value {
    let limits: Vec<Value> = explanation.limits.iter().map(limit_json).collect();
    let mut body = json!({
        "namespace_has_limits": explanation.namespace_has_limits,
        "limits": limits,
    });
    match &explanation.decision {
        Ok(decision) => {
            let over = decision.code() == Code::OverLimit;
            let limited_by = decision.limiting().map(|l| l.limit.view());
            body["decision"] = json!({
                "code": if over { "OVER_LIMIT" } else { "OK" },
                "check_status": if over { 429 } else { 200 },
                "limited_by": limited_by,
                "retry_after_ms": decision.retry_after_ms(),
            });
            body["storage_error"] = Value::Null;
        }
        Err(error) => {
            body["decision"] = Value::Null;
            body["storage_error"] = json!(error.to_string());
        }
    }
    if !explanation.namespace_has_limits {
        body["note"] = json!(
            "this namespace has no limits: every call to it is allowed (is the namespace, \
             Envoy's `domain`, spelled as in the limits file?)"
        );
    }
    body
}

fn limit_json(explained: &LimitExplanation) -> Value {
    let limit = &explained.limit;
    match &explained.applies {
        Ok(values) => {
            let set_variables: BTreeMap<&str, &str> = limit
                .variables
                .iter()
                .map(|v| v.source())
                .zip(values.iter().map(String::as_str))
                .collect();
            let counter = explained.counter.map(|outcome| {
                json!({
                    "usage": limit.max_value.saturating_sub(outcome.remaining),
                    "remaining": outcome.remaining,
                    "reset_in_ms": outcome.reset_in_ms,
                    "admits_delta": !outcome.over,
                    "retry_after_ms": outcome.retry_after_ms,
                })
            });
            json!({
                "limit": limit.view(),
                "applies": true,
                "set_variables": set_variables,
                "counter": counter,
            })
        }
        Err(why) => json!({
            "limit": limit.view(),
            "applies": false,
            "reason": {
                "kind": why.kind,
                "role": why.role,
                "expression": why.expression,
                "message": why.message,
            },
        }),
    }
}
