//! `GET /ui`: a page served from the binary (no external assets) that shows the namespaces,
//! their limits with the refusals of the last minutes, and the counters with the most usage,
//! refreshed every 2 s from `GET /ui/data` (JSON). Both are protected by the token.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AppState, CounterView};
use crate::status::RECENT_MINUTES;
use crate::storage::PageRequest;

const PAGE: &str = include_str!("ui.html");

/// How many counters of a namespace are read (its first page, as `/counters` lists them) to
/// find those with the most usage, and how many of those are shown.
const COUNTERS_READ: usize = 1000;
const COUNTERS_SHOWN: usize = 10;
/// How many namespaces get their counters read on each refresh.
const NAMESPACES_WITH_COUNTERS: usize = 50;

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but this page's own inline script and style, and fetches to this server.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// Every namespace with its limits (and their refusals per minute, the oldest first) and the
/// counters with the most usage among the first [`COUNTERS_READ`] of the namespace.
pub(super) async fn data(State(state): State<AppState>) -> Response {
    let limits = state.limiter.limits();
    let refusals = state.status.refusals().snapshot();
    let mut namespaces: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for limit in limits.iter() {
        let per_minute = refusals.get(&limit.key).copied().unwrap_or_default();
        namespaces.entry(&limit.namespace).or_default().push(json!({
            "limit": limit.view(),
            "refusals_per_minute": per_minute,
            "refusals": per_minute.iter().sum::<u64>(),
        }));
    }
    let now = state.limiter.now_ms();
    let mut shown = Vec::with_capacity(namespaces.len());
    for (i, (namespace, limits)) in namespaces.into_iter().enumerate() {
        let mut entry = json!({"namespace": namespace, "limits": limits});
        if i >= NAMESPACES_WITH_COUNTERS {
            entry["counters_error"] = json!(format!(
                "counters are shown for the first {NAMESPACES_WITH_COUNTERS} namespaces; see /counters/{{namespace}}"
            ));
            shown.push(entry);
            continue;
        }
        let page = PageRequest {
            cursor: None,
            limit: COUNTERS_READ,
        };
        match state.limiter.counters(namespace, page).await {
            Ok(page) => {
                let mut counters: Vec<(u64, Value)> = page
                    .items
                    .iter()
                    .map(|(limit, counter)| {
                        let view = CounterView::of(limit, counter, now);
                        let usage = limit.max_value.saturating_sub(view.remaining);
                        let value = json!({
                            "limit": limit.name.as_deref().unwrap_or(""),
                            "max_value": limit.max_value,
                            "usage": usage,
                            "set_variables": view.set_variables,
                            "remaining": view.remaining,
                            "expires_in_seconds": view.expires_in_seconds,
                        });
                        (usage, value)
                    })
                    .collect();
                counters.sort_by_key(|c| std::cmp::Reverse(c.0));
                let counters: Vec<Value> = counters
                    .into_iter()
                    .take(COUNTERS_SHOWN)
                    .map(|(_, v)| v)
                    .collect();
                entry["counters"] = json!(counters);
                entry["more_counters"] = json!(page.next.is_some());
            }
            Err(error) => entry["counters_error"] = json!(error.to_string()),
        }
        shown.push(entry);
    }
    Json(json!({
        "namespaces": shown,
        "minutes": RECENT_MINUTES,
        "config_version": state.status.config_version(),
    }))
    .into_response()
}
