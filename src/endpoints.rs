//! The plain HTTP endpoints a GET or HEAD can ask for: the chat page, health
//! and metrics. No I/O: a request and the server's state in, the response
//! bytes out.

use crate::handshake::{Outcome, Resource};
use crate::http::{Method, Response, Status};

/// The chat page, served at `/`.
const PAGE: &[u8] = include_bytes!("web/index.html");

/// The Prometheus text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/healthz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Serving, but the outbox log cannot be written: offline messages are
    /// refused (`storage_unavailable`). Still 200: live chat works, and a
    /// load balancer should keep sending clients; the body says why.
    Degraded,
    /// After SIGINT/SIGTERM: 503, so that a load balancer stops sending
    /// clients here.
    ShuttingDown,
}

/// The bytes that answer `method` on `resource`. `metrics` renders the
/// Prometheus text; it is called for `/metrics` alone, HEAD included, since
/// a HEAD must carry the `Content-Length` its GET would have.
pub fn respond(
    resource: Resource,
    method: Method,
    health: Health,
    metrics: impl FnOnce() -> String,
) -> Vec<u8> {
    let response = match resource {
        Resource::Health => match health {
            Health::Ok => Response::text(Status::Ok, "ok"),
            Health::Degraded => Response::text(Status::Ok, "degraded: offline storage unavailable"),
            Health::ShuttingDown => Response::text(Status::ServiceUnavailable, "shutting down"),
        },
        Resource::Page => {
            Response::with_body(Status::Ok, "text/html; charset=utf-8", PAGE.to_vec())
        }
        Resource::Metrics => Response::with_body(Status::Ok, METRICS_TYPE, metrics().into_bytes()),
    };
    match method {
        Method::Get => response.to_bytes(),
        Method::Head => response.head_bytes(),
    }
}

/// What a connection may ask for depends on where it came in: through
/// `--metrics-listen`, only `/metrics` and `/healthz`; through the chat's
/// address, everything but `/metrics` when that is served apart.
pub fn by_entrance(outcome: Outcome, admin: bool, metrics_apart: bool) -> Outcome {
    let allowed = match &outcome {
        Outcome::Partial | Outcome::Reject(_) => true,
        Outcome::Serve { resource, .. } => match resource {
            Resource::Health => true,
            Resource::Metrics => admin || !metrics_apart,
            Resource::Page => !admin,
        },
        Outcome::Upgrade(_) => !admin,
    };
    if allowed {
        outcome
    } else {
        Outcome::Reject(Response::text(Status::NotFound, "not found"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_entrance_may_ask_for() {
        use crate::http::Method;
        let serve = |resource| Outcome::Serve {
            resource,
            method: Method::Get,
        };
        let status = |outcome: Outcome| match outcome {
            Outcome::Reject(r) => r.status.code(),
            _ => 200,
        };
        #[rustfmt::skip]
        let table = [
            // resource,          admin, metrics apart, status
            (Resource::Metrics,   false, false, 200), // as today: all on --listen
            (Resource::Metrics,   false, true,  404),
            (Resource::Metrics,   true,  true,  200),
            (Resource::Health,    false, true,  200),
            (Resource::Health,    true,  true,  200),
            (Resource::Page,      true,  true,  404),
            (Resource::Page,      false, true,  200),
        ];
        for (resource, admin, apart, expected) in table {
            assert_eq!(
                status(by_entrance(serve(resource), admin, apart)),
                expected,
                "{resource:?} admin {admin} apart {apart}"
            );
        }
    }

    const RESOURCES: [Resource; 3] = [Resource::Health, Resource::Page, Resource::Metrics];

    fn text(resource: Resource, method: Method, shutting_down: bool) -> String {
        let health = if shutting_down {
            Health::ShuttingDown
        } else {
            Health::Ok
        };
        String::from_utf8(respond(resource, method, health, || "m 1\n".into()))
            .expect("responses are UTF-8")
    }

    /// The head and the body of a response.
    fn split(response: &str) -> (&str, &str) {
        response
            .split_once("\r\n\r\n")
            .expect("a head ends with an empty line")
    }

    #[test]
    fn each_resource_has_its_answer() {
        assert!(text(Resource::Health, Method::Get, false).ends_with("\r\n\r\nok\n"));
        assert!(text(Resource::Page, Method::Get, false).contains("text/html"));
        let metrics = text(Resource::Metrics, Method::Get, false);
        assert!(metrics.contains("version=0.0.4") && metrics.ends_with("m 1\n"));
    }

    #[test]
    fn head_is_get_without_the_body() {
        for shutting_down in [false, true] {
            for resource in RESOURCES {
                let get = text(resource, Method::Get, shutting_down);
                let head = text(resource, Method::Head, shutting_down);
                let (get_head, body) = split(&get);
                assert!(!body.is_empty(), "{resource:?}");
                assert_eq!(head, format!("{get_head}\r\n\r\n"), "{resource:?}");
                assert!(
                    head.contains(&format!("Content-Length: {}\r\n", body.len())),
                    "{head}"
                );
            }
        }
    }

    #[test]
    fn health_is_503_while_shutting_down() {
        for method in [Method::Get, Method::Head] {
            let health = text(Resource::Health, method, true);
            assert!(health.starts_with("HTTP/1.1 503 "), "{health}");
            assert!(text(Resource::Health, method, false).starts_with("HTTP/1.1 200 "));
        }
        let health = text(Resource::Health, Method::Get, true);
        assert_eq!(split(&health).1, "shutting down\n");
        // The page and the metrics are still served: an operator may want
        // to see what the server is waiting for.
        for resource in [Resource::Page, Resource::Metrics] {
            assert!(text(resource, Method::Get, true).starts_with("HTTP/1.1 200 "));
        }
    }

    #[test]
    fn metrics_are_rendered_only_for_metrics() {
        for resource in RESOURCES {
            for method in [Method::Get, Method::Head] {
                let mut called = false;
                respond(resource, method, Health::Ok, || {
                    called = true;
                    String::new()
                });
                assert_eq!(
                    called,
                    resource == Resource::Metrics,
                    "{resource:?} {method:?}"
                );
            }
        }
    }
}
