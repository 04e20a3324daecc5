//! The plain HTTP endpoints a GET can ask for: the chat page, health and
//! metrics. No I/O: a resource in, the response out.

use crate::handshake::Resource;
use crate::http::{Response, Status};

/// The chat page, served at `/`.
const PAGE: &[u8] = include_bytes!("web/index.html");

/// The answer to a GET of `resource`; `metrics` renders the Prometheus text
/// (only called for `/metrics`).
pub fn respond(resource: Resource, metrics: impl FnOnce() -> String) -> Response {
    match resource {
        Resource::Health => Response::text(Status::Ok, "ok"),
        Resource::Page => {
            Response::with_body(Status::Ok, "text/html; charset=utf-8", PAGE.to_vec())
        }
        Resource::Metrics => Response::with_body(
            Status::Ok,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics().into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_resource_has_its_answer() {
        let text =
            |r: Resource| String::from_utf8(respond(r, || "m 1\n".into()).to_bytes()).unwrap();
        assert!(text(Resource::Health).ends_with("\r\n\r\nok\n"));
        assert!(text(Resource::Page).contains("text/html"));
        let metrics = text(Resource::Metrics);
        assert!(metrics.contains("version=0.0.4") && metrics.ends_with("m 1\n"));
        let mut called = false;
        respond(Resource::Health, || {
            called = true;
            String::new()
        });
        assert!(!called, "metrics are rendered only for /metrics");
    }
}
