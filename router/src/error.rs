//! Answers stoke gives itself instead of forwarding: each says where the
//! problem came from, whether retrying could help, and which HTTP status
//! and JSON body it becomes.

use std::time::Duration;

/// Who is at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we cannot serve.
    Client,
    /// No upstream could take the request (capacity, health, wake).
    Upstream,
    /// Something in stoke itself.
    Internal,
}

/// A request stoke answers itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct Reject {
    /// HTTP status.
    pub status: u16,
    /// Stable machine-readable code (`no_route`, `no_capacity`, …).
    pub code: &'static str,
    /// Human-readable explanation naming what was wrong.
    pub message: String,
    /// Who is at fault.
    pub origin: Origin,
    /// When to try again, if retrying can help.
    pub retry_after: Option<Duration>,
}

impl Reject {
    /// A client error.
    pub fn client(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Reject { status, code, message: message.into(), origin: Origin::Client, retry_after: None }
    }

    /// Capacity is short: 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: Duration) -> Self {
        Reject { status: 503, code, message: message.into(), origin: Origin::Upstream, retry_after: Some(retry_after) }
    }

    /// The upstream failed: 502.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Reject {
            status: 502,
            code: "upstream_error",
            message: message.into(),
            origin: Origin::Upstream,
            retry_after: None,
        }
    }

    /// A 200 the edge answers itself with this JSON body (carried on the
    /// refusal path, which writes JSON answers).
    pub fn answer(json: String) -> Self {
        Reject { status: 200, code: "answer", message: json, origin: Origin::Internal, retry_after: None }
    }

    /// The client went away before an answer: nothing is sent (logged as
    /// 499, as nginx does).
    pub fn client_gone() -> Self {
        Reject {
            status: 499,
            code: "client_gone",
            message: "the client went away".into(),
            origin: Origin::Client,
            retry_after: None,
        }
    }

    /// Whether the client is gone (no answer can be written).
    pub fn is_client_gone(&self) -> bool {
        self.code == "client_gone"
    }

    /// Whether a client may retry the same request later.
    pub fn retryable(&self) -> bool {
        self.retry_after.is_some() || self.origin == Origin::Upstream
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// The JSON body, in the shape OpenAI clients parse:
    /// `{"error":{"message":…,"type":…,"code":…}}`.
    pub fn body(&self) -> String {
        if self.code == "answer" {
            return self.message.clone();
        }
        let kind = match self.origin {
            Origin::Client => "invalid_request_error",
            Origin::Upstream => "service_unavailable",
            Origin::Internal => "internal_error",
        };
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind,
                "code": self.code,
            }
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped_json() {
        let r = Reject::client(404, "no_route", "no route for host \"x\" and path \"/\"");
        let v: serde_json::Value = serde_json::from_str(&r.body()).expect("json");
        assert_eq!(v["error"]["code"], "no_route");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("\"x\"")));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = Reject::unavailable("no_capacity", "busy", Duration::from_millis(1200));
        assert_eq!(r.retry_after_secs(), Some(2));
        let r = Reject::unavailable("no_capacity", "busy", Duration::from_millis(1));
        assert_eq!(r.retry_after_secs(), Some(1));
        assert!(r.retryable());
        assert!(!Reject::client(400, "bad", "x").retryable());
    }
}
