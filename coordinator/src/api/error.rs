//! Errors in the OpenAI shape, `{"error":{"message","type","param","code"}}`, with the status code a client of the
//! OpenAI API expects for each cause.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use shardline_node::generate::GenerateError;

use crate::routing::RouteError;
use crate::session::SessionError;

/// An error answered to an HTTP client.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error `type`: `invalid_request_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the request field at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::invalid(message) }
    }

    /// 400: prompt plus `max_tokens` do not fit the model's context.
    pub fn context_exceeded(prompt: usize, max_tokens: usize, context: usize) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid_param(
                "max_tokens",
                format!(
                    "this model's maximum context length is {context} tokens; the prompt has {prompt} tokens and \
                     {max_tokens} new tokens were requested"
                ),
            )
        }
    }

    /// 408: the request body did not arrive within the body timeout.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", format!("the request body took over {limit:?}"))
    }

    /// 404: no served model has this name or id.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("the model `{model}` does not exist"))
        }
    }

    /// 404 for a path the API does not have.
    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no route for {path}"))
    }

    /// 429 with `Retry-After`: every node able to serve some layer has a full queue.
    pub fn busy(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after_secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 503: the swarm cannot route the model now (missing layers, or no node at all).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { code: Some("model_unavailable"), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message) }
    }

    /// 502: a stage failed and failover did not save the request.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", message)
    }

    /// 500: anything else.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Maps a failed generation: the request's own fault → 400, else as [`ApiError::from_session`].
    pub fn from_generation(e: &GenerateError<SessionError>, retry_after_secs: u64) -> Self {
        match e {
            GenerateError::EmptyPrompt => Self::invalid_param("prompt", e.to_string()),
            GenerateError::Step(s) => Self::from_session(s, retry_after_secs),
        }
    }

    /// Maps a session failure by its fault (`blame.rs`): missing layers → 503, no capacity (full queues, a stage
    /// out of slots or KV cache) → 429, a size the request asked for that no session can hold → 400, a step the
    /// coordinator itself asked wrongly → 500, failed stages → 502.
    pub fn from_session(e: &SessionError, retry_after_secs: u64) -> Self {
        match e {
            SessionError::Route(RouteError::Uncovered { .. } | RouteError::UnknownModel { .. }) => {
                Self::unavailable(e.to_string())
            }
            SessionError::Request(_) => Self::invalid_param("max_tokens", e.to_string()),
            SessionError::SamplingChanged | SessionError::TopChanged { .. } => Self::internal(e.to_string()),
            _ if is_busy(e) => Self::busy(e.to_string(), retry_after_secs),
            _ => Self::upstream(e.to_string()),
        }
    }

    /// The JSON body, as also sent in an SSE `error` event once a stream has started.
    pub fn body_json(&self) -> String {
        let body = Body {
            error: Detail { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from(r#"{"error":{"message":"unserialisable"}}"#))
    }
}

/// Full queues on the coordinator's side, or a stage out of sessions or KV cache (also as the last cause of a
/// failover that found nothing free).
fn is_busy(e: &SessionError) -> bool {
    matches!(crate::blame::classify(e), crate::blame::Fault::Capacity(_))
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.kind, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, [(header::CONTENT_TYPE, "application/json")], self.body_json()).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use libp2p::PeerId;
    use shardline_proto::LayerRange;
    use shardline_proto::wire::ErrorCode;

    use crate::queue::QueueError;

    use super::*;

    #[test]
    fn session_errors_get_the_openai_status() {
        let uncovered = SessionError::Route(RouteError::Uncovered {
            model_id: "ab".repeat(32),
            model: "SmolLM2-135M-Instruct.Q4_1".into(),
            n_layers: 30,
            found: vec![LayerRange::new(0, 10), LayerRange::new(20, 30)],
            missing: vec![LayerRange::new(10, 20)],
        });
        let e = ApiError::from_session(&uncovered, 1);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            e.message.contains("found 0..10, 20..30; missing 10..20 of SmolLM2-135M-Instruct.Q4_1"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("abab"), "the hex id is for machines: {}", e.message);
        let busy = SessionError::Busy {
            peer: PeerId::random(),
            source: QueueError::Busy { in_flight: 1, waiting: 0, max_waiting: 0 },
        };
        let e = ApiError::from_session(&busy, 3);
        assert_eq!((e.status, e.retry_after), (StatusCode::TOO_MANY_REQUESTS, Some(3)));
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        let kv_full = SessionError::Stage { peer: PeerId::random(), code: ErrorCode::Busy, message: "kv".into() };
        let e = ApiError::from_session(&SessionError::Exhausted(3, Box::new(kv_full)), 1);
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let e = ApiError::from_session(&SessionError::Protocol("x".into()), 1);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn generation_errors_keep_their_type_to_the_status() {
        // The loop hands back the session's own error: a busy node is still 429 with Retry-After, not a message.
        let busy = SessionError::Busy {
            peer: PeerId::random(),
            source: QueueError::Busy { in_flight: 2, waiting: 0, max_waiting: 0 },
        };
        let e = ApiError::from_generation(&GenerateError::Step(busy), 2);
        assert_eq!(
            (e.status, e.retry_after, e.code),
            (StatusCode::TOO_MANY_REQUESTS, Some(2), Some("rate_limit_exceeded"))
        );
        let e = ApiError::from_generation(&GenerateError::EmptyPrompt, 1);
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("prompt")));
        let e = ApiError::from_generation(&GenerateError::Step(SessionError::TopChanged { asked: 5, opened: 2 }), 1);
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn body_has_the_openai_shape() {
        let v: serde_json::Value = serde_json::from_str(&ApiError::unknown_model("gpt-9").body_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }
}
