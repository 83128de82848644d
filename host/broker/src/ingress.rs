//! Broker ingress over HTTP (hyper 1): Knative's paths, methods and status codes, plus 413 for
//! oversized bodies and 429 when a trigger's queue is full.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::codec;
use crate::listen::{
    Acceptor, BodyError, DEFAULT_READ_TIMEOUT, http1_builder, read_limited, refuse,
};
use crate::log::LogError;
use crate::mesh::{BrokerKey, Mesh, PublishError};
use crate::passthrough::Passthrough;

/// Settings of the ingress listener.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Bodies above this size are refused with 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's header, and then its body (408 after
    /// it); a connection idle this long is closed.
    pub read_timeout: Duration,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

type Body = Full<Bytes>;

/// Serves ingress on `listener` until `stop` turns true. From then on, requests on connections
/// still open are answered 503 (send again, elsewhere or later) rather than taken while the
/// brokers are being stopped.
pub async fn serve(
    listener: TcpListener,
    mesh: Arc<Mesh>,
    config: IngressConfig,
    mut stop: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    let mut acceptor = Acceptor::new(listener, "ingress");
    loop {
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let mesh = Arc::clone(&mesh);
        let config = Arc::clone(&config);
        let read_timeout = config.read_timeout;
        let stopped = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let mesh = Arc::clone(&mesh);
                let config = Arc::clone(&config);
                let stopping = *stopped.borrow();
                async move {
                    let response = handle(req, &mesh, &config, stopping).await;
                    mesh.ingress_stats().count(response.status().as_u16());
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(e) = http1_builder(read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
}

/// The broker a path names, `/<namespace>/<broker>`, or the answer to a path that names none.
/// Go's server (Knative's) routes on the decoded path: `/default/def%61ult` is broker
/// default/default.
fn route(path: &str) -> Result<BrokerKey, (StatusCode, &'static str)> {
    let Ok(path) = percent_encoding::percent_decode_str(path).decode_utf8() else {
        return Err((
            StatusCode::BAD_REQUEST,
            "the path is not valid UTF-8 once percent-decoded",
        ));
    };
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        return Err((
            StatusCode::NOT_FOUND,
            "no broker here: POST to /<namespace>/<broker>",
        ));
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if segments.len() != 2 || segments.iter().any(|s| s.is_empty()) {
        return Err((
            StatusCode::BAD_REQUEST,
            "the path must be /<namespace>/<broker>",
        ));
    }
    Ok(BrokerKey::new(segments[0], segments[1]))
}

async fn handle(
    req: Request<Incoming>,
    mesh: &Mesh,
    config: &IngressConfig,
    stopping: bool,
) -> Response<Body> {
    // Every refusal below drains the body first (`refuse`): a client still sending it reads the
    // answer instead of a reset connection.
    let key = match route(req.uri().path()) {
        Ok(key) => key,
        Err((status, why)) => return refuse(req, error(status, why)).await,
    };
    match *req.method() {
        Method::POST => {}
        Method::OPTIONS => {
            return response(StatusCode::OK)
                .header("WebHook-Allowed-Origin", "*")
                .header("WebHook-Allowed-Rate", "*")
                .header(header::ALLOW, "POST, OPTIONS")
                .body(Body::default())
                .unwrap_or_default();
        }
        _ => {
            let e = response(StatusCode::METHOD_NOT_ALLOWED)
                .header(header::ALLOW, "POST, OPTIONS")
                .body(Body::default())
                .unwrap_or_default();
            return refuse(req, e).await;
        }
    }
    if stopping {
        // The brokers are going away: not "does not exist", but "not here, not now".
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "wasmesh is shutting down; send again (to another replica, or once it is back)",
        );
        let headers = r.headers_mut();
        headers.insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        headers.insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return r;
    }
    if !mesh.has_broker(&key) {
        let e = error(
            StatusCode::NOT_FOUND,
            &format!("broker {key} does not exist"),
        );
        return refuse(req, e).await;
    }
    let (parts, body) = req.into_parts();
    let reading = read_limited(&parts.headers, body, config.max_body_bytes);
    let body = match tokio::time::timeout(config.read_timeout, reading).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyError::TooLarge(limit))) => {
            let e = format!("the body is larger than {limit} bytes");
            return error(StatusCode::PAYLOAD_TOO_LARGE, &e);
        }
        Ok(Err(e @ BodyError::Read(_))) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not arrive within {} s (serve --read-timeout)",
                    config.read_timeout.as_secs_f64()
                ),
            );
            // What was not read of the body would be taken for the next request.
            r.headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            return r;
        }
    };
    let mut events = match codec::decode(&parts.headers, body) {
        Ok(events) => events,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    for (name, value) in &parts.headers {
        let name = name.as_str();
        if (name == "traceparent" || name == "tracestate")
            && let Ok(v) = value.to_str()
        {
            for ev in &mut events {
                if ev.extension(name).is_none() {
                    ev.set_extension(name, v.to_string());
                }
            }
        }
    }
    let passthrough = Passthrough::from_request(&parts.headers);
    match mesh.publish_with(&key, events, passthrough).await {
        Ok(()) => response(StatusCode::ACCEPTED)
            .body(Body::default())
            .unwrap_or_default(),
        Err(PublishError::UnknownBroker(_)) => error(
            StatusCode::NOT_FOUND,
            &format!("broker {key} does not exist"),
        ),
        Err(e @ PublishError::TtlExhausted) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ (PublishError::Full(_) | PublishError::Log(LogError::Full(_)))) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            r
        }
        Err(e @ (PublishError::Log(LogError::TooLarge(_)) | PublishError::TooLarge(_))) => {
            error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string())
        }
        Err(e @ PublishError::Log(LogError::Io(_) | LogError::Open(_))) => {
            tracing::error!(broker = %key, error = %e, "event refused: the log cannot write");
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
            r
        }
    }
}

fn response(status: StatusCode) -> http::response::Builder {
    Response::builder().status(status)
}

/// An error response with a JSON body naming the problem.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    response(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Serves the data plane's counters (`GET /metrics`, Prometheus text) on a listener of their
/// own, without a token, as exporters usually are (`serve --metrics-listen`), until `stop`.
pub async fn serve_metrics(
    listener: TcpListener,
    mesh: Arc<Mesh>,
    mut stop: watch::Receiver<bool>,
) {
    let mut acceptor = Acceptor::new(listener, "metrics");
    loop {
        let (stream, _) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = stop.changed() => break,
        };
        let mesh = Arc::clone(&mesh);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let mesh = Arc::clone(&mesh);
                async move {
                    let response = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => response(StatusCode::OK)
                            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                            .body(Body::new(Bytes::from(mesh.metrics_text())))
                            .unwrap_or_default(),
                        (_, "/metrics") => response(StatusCode::METHOD_NOT_ALLOWED)
                            .header(header::ALLOW, "GET")
                            .body(Body::default())
                            .unwrap_or_default(),
                        _ => error(StatusCode::NOT_FOUND, "only GET /metrics here"),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1_builder(DEFAULT_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
