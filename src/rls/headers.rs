//! Rate limit response headers, formatted as Limitador formats DRAFT_VERSION_03:
//! `X-RateLimit-Limit: 10, 10;w=60;name="free", 100;w=3600`, `X-RateLimit-Remaining: 4`,
//! `X-RateLimit-Reset: 42` (whole seconds, rounded down), describing the most restrictive limit
//! first; plus `Retry-After` (whole seconds, rounded up) when the call was refused.

use std::str::FromStr;

use crate::limiter::Decision;

/// Which rate limit headers answers carry (`--rate-limit-headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateLimitHeaders {
    #[default]
    None,
    DraftVersion03,
    /// envoyproxy/ratelimit's `LIMIT_RESPONSE_HEADERS_ENABLED`: RateLimit-Limit, -Remaining
    /// and -Reset of the descriptor closest to its limit ([`envoy_ratelimit`]).
    EnvoyRatelimit,
}

impl FromStr for RateLimitHeaders {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "NONE" => Ok(Self::None),
            "DRAFT_VERSION_03" => Ok(Self::DraftVersion03),
            other => Err(format!(
                "unknown rate limit headers {other:?} (NONE or DRAFT_VERSION_03)"
            )),
        }
    }
}

pub const LIMIT: &str = "X-RateLimit-Limit";
pub const REMAINING: &str = "X-RateLimit-Remaining";
pub const RESET: &str = "X-RateLimit-Reset";
pub const RETRY_AFTER: &str = "Retry-After";

/// The headers for a decision; none when no limit applied.
pub fn draft03(decision: &Decision, over_limit: bool) -> Vec<(&'static str, String)> {
    let Some(first) = decision.limits.first() else {
        return Vec::new();
    };
    let mut limit = first.limit.max_value.to_string();
    for status in &decision.limits {
        limit.push_str(&format!(
            ", {};w={}",
            status.limit.max_value, status.limit.seconds
        ));
        if let Some(name) = &status.limit.name {
            limit.push_str(&format!(";name=\"{}\"", name.replace('"', "'")));
        }
    }
    let mut headers = vec![
        (LIMIT, limit),
        (REMAINING, first.outcome.remaining.to_string()),
        (RESET, (first.outcome.reset_in_ms / 1000).to_string()),
    ];
    if over_limit && let Some(ms) = decision.retry_after_ms() {
        headers.push((RETRY_AFTER, ms.div_ceil(1000).to_string()));
    }
    headers
}

pub const ENVOY_LIMIT: &str = "RateLimit-Limit";
pub const ENVOY_REMAINING: &str = "RateLimit-Remaining";
pub const ENVOY_RESET: &str = "RateLimit-Reset";

/// envoyproxy/ratelimit's headers: of the descriptor that refused the call, else of the one
/// with the least remaining; the limit, what remains, and the whole seconds until the window
/// resets (rounded up). None when no limit applied.
pub fn envoy_ratelimit(decision: &Decision) -> Vec<(&'static str, String)> {
    let with_limit = decision.statuses.iter().filter_map(|s| {
        let limit = s.limit.as_ref()?;
        Some((s.verdict != crate::call::Verdict::Admitted, limit))
    });
    let chosen = with_limit.min_by_key(|(over, limit)| (!over, limit.outcome.remaining));
    let Some((_, status)) = chosen else {
        return Vec::new();
    };
    vec![
        (ENVOY_LIMIT, status.limit.max_value.to_string()),
        (ENVOY_REMAINING, status.outcome.remaining.to_string()),
        (
            ENVOY_RESET,
            status.outcome.reset_in_ms.div_ceil(1000).to_string(),
        ),
    ]
}
