//! What a refusal says to an LLM client (`--over-limit-response`): with `openai`, an
//! `OVER_LIMIT` answer carries the body and headers an OpenAI API sends with its 429, so the
//! OpenAI SDKs back off by themselves (`retry-after-ms`, `retry-after`) and users read why.
//! Envoy turns `raw_body` into the 429's body and adds the headers.

use std::str::FromStr;

use crate::limiter::Decision;

/// The body of an `OVER_LIMIT` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverLimitResponse {
    /// None (Envoy answers with its own or its configured body).
    #[default]
    None,
    /// OpenAI's error object, with `retry-after` and `retry-after-ms`.
    OpenAi,
}

impl FromStr for OverLimitResponse {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(Self::None),
            "openai" => Ok(Self::OpenAi),
            other => Err(format!(
                "unknown over-limit response {other:?} (none or openai)"
            )),
        }
    }
}

/// OpenAI's 429 for a refused decision: the JSON body and the headers to add.
pub fn openai(decision: &Decision) -> (Vec<u8>, Vec<(&'static str, String)>) {
    let retry_ms = decision.retry_after_ms();
    let message = match decision.limiting() {
        Some(status) => {
            let limit = &status.limit;
            let name = limit.name.as_deref().unwrap_or("unnamed");
            let when = match retry_ms {
                Some(ms) => format!("try again in {}", seconds(ms)),
                None => "this request is larger than the whole limit".to_string(),
            };
            format!(
                "Rate limit reached for {name} in {}: {} of {} left, resets in {}; {when}.",
                limit.namespace,
                status.outcome.remaining,
                limit.max_value,
                seconds(status.outcome.reset_in_ms),
            )
        }
        None => "Rate limit reached.".to_string(),
    };
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "rate_limit_exceeded",
            "code": "rate_limit_exceeded",
            "param": null,
        }
    });
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(ms) = retry_ms {
        headers.push(("retry-after", ms.div_ceil(1000).to_string()));
        headers.push(("retry-after-ms", ms.to_string()));
    }
    (body.to_string().into_bytes(), headers)
}

/// "1.5 s", "60 s": milliseconds as seconds, to the tenth.
fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
    }
}
