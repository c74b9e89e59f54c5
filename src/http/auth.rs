//! The HTTP API's optional bearer token (`--http-auth-token`). Every route requires it unless
//! listed in [`OPEN`]: the probes, `/metrics`, `/status` and the limits as configured. What
//! changes or reveals counters or identities (`/check`, `/report`, `/check_and_report`,
//! `/counters/{ns}`, ASM's endpoints, `/explain`, and any route added later) needs
//! `Authorization: Bearer <token>`; without it, or with another, the answer is 401 with
//! `WWW-Authenticate: Bearer`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// The routes (as declared in the router) open without a token. Everything else needs it.
pub const OPEN: [&str; 5] = [
    "/metrics",
    "/status",
    "/healthz",
    "/readyz",
    "/limits/{*namespace}",
];

/// The token clients must present. Its `Debug` does not show it.
#[derive(Clone)]
pub struct HttpToken(String);

impl HttpToken {
    /// A token: printable ASCII without spaces (what fits in an `Authorization` header).
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Err("the HTTP API token is empty".to_string());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the HTTP API token must be printable ASCII without spaces or control characters"
                    .to_string(),
            );
        }
        Ok(Self(token.to_string()))
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>` (the scheme in any case),
    /// compared in constant time.
    fn admits(&self, headers: &HeaderMap) -> Presented {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Presented::Nothing;
        };
        let value = value.as_bytes();
        let Some(space) = value.iter().position(|&b| b == b' ') else {
            return Presented::Wrong;
        };
        let (scheme, credentials) = value.split_at(space);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return Presented::Wrong;
        }
        let credentials = credentials.trim_ascii();
        if bool::from(credentials.ct_eq(self.0.as_bytes())) {
            Presented::Valid
        } else {
            Presented::Wrong
        }
    }
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpToken(..)")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Presented {
    Nothing,
    Wrong,
    Valid,
}

/// Middleware (a route layer, so the matched route is known): lets a request through when no
/// token is configured, when its route is [`OPEN`], or when it presents the token.
pub(super) async fn require_token(
    State(token): State<Option<HttpToken>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    let open = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|route| OPEN.contains(&route.as_str()));
    if open {
        return next.run(request).await;
    }
    let challenge = match token.admits(request.headers()) {
        Presented::Valid => return next.run(request).await,
        Presented::Nothing => r#"Bearer realm="ratekeeper""#,
        Presented::Wrong => r#"Bearer realm="ratekeeper", error="invalid_token""#,
    };
    tracing::debug!(
        path = request.uri().path(),
        "refused an HTTP call without a valid token"
    );
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )],
        "this endpoint needs `Authorization: Bearer <token>`\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presented(token: &str, authorization: Option<&[u8]>) -> Presented {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        HttpToken::new(token).unwrap().admits(&headers)
    }

    #[test]
    fn only_the_bearer_token_itself_is_admitted() {
        assert_eq!(presented("t0k", Some(b"Bearer t0k")), Presented::Valid);
        assert_eq!(presented("t0k", Some(b"bEaReR t0k")), Presented::Valid);
        assert_eq!(presented("t0k", Some(b"Bearer   t0k ")), Presented::Valid);
        assert_eq!(presented("t0k", None), Presented::Nothing);
        for wrong in [
            &b"Bearer t0"[..],
            b"Bearer t0kk",
            b"Bearer T0K",
            b"Bearer",
            b"Bearer ",
            b"Basic t0k",
            b"t0k",
            b"Bearer t0k\xff",
        ] {
            assert_eq!(
                presented("t0k", Some(wrong)),
                Presented::Wrong,
                "{}",
                String::from_utf8_lossy(wrong)
            );
        }
    }

    #[test]
    fn tokens_must_fit_in_a_header() {
        assert!(HttpToken::new("").is_err());
        assert!(HttpToken::new("with space").is_err());
        assert!(HttpToken::new("tab\t").is_err());
        assert!(HttpToken::new("é").is_err());
        assert!(HttpToken::new("a-Z_0.9~+/=").is_ok());
        assert_eq!(
            format!("{:?}", HttpToken::new("secret").unwrap()),
            "HttpToken(..)"
        );
    }
}
