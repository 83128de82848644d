//! Where a delivery goes: a Wasm Function, an HTTP URI, or a broker in this process; and what
//! came back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wasmesh_core::Event;
use wasmesh_runtime::{CallErrorKind, Disposition};

use crate::codec;
use crate::delivery::{AskedDelay, is_retryable_status};
use crate::mesh::BrokerKey;
use crate::passthrough::Passthrough;
use crate::slot::FunctionSlot;

/// A resolved destination.
#[derive(Clone)]
pub enum Sink {
    /// A Wasm subscriber, called in this process (its live version).
    Function(Arc<FunctionSlot>),
    /// An HTTP endpoint, sent binary-mode CloudEvents; with its own client when the destination
    /// names CA certificates of its own (`CACerts`).
    Http(http::Uri, Option<Arc<HttpClient>>),
    /// A broker of this process (a Broker `ref` as sink).
    Broker(BrokerKey),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Sink {
    /// How `knativeerrordest` and logs name it.
    pub fn describe(&self) -> String {
        match self {
            Sink::Function(func) => format!("function:{}", func.name()),
            Sink::Http(uri, _) => uri.to_string(),
            Sink::Broker(key) => format!("broker:{}/{}", key.namespace, key.name),
        }
    }
}

/// What one delivery attempt came to.
#[derive(Debug)]
pub enum Outcome {
    /// Delivered; maybe with a reply.
    Delivered(Option<Reply>),
    /// Failed in a way Knative retries (transport error, 5xx, 404, 408, 409, 429; a Wasm trap
    /// or deadline; a Wasm `retry`).
    Retry(Failure),
    /// Failed for good (other 4xx, a Wasm `reject`): straight to the dead-letter sink.
    Fail(Failure),
}

/// An event a subscriber answered with, and the headers that pass through with it: an HTTP
/// subscriber's response's, as Knative's dispatcher passes them on (empty from a Function: the
/// reply then takes those of the event it answers).
#[derive(Debug)]
pub struct Reply {
    pub event: Box<Event>,
    pub headers: Passthrough,
}

/// Details of a failed attempt, carried into the dead-letter event.
#[derive(Debug, Clone, Default)]
pub struct Failure {
    /// The status code, when there was a response.
    pub code: Option<u16>,
    /// The response body or the error message.
    pub data: Bytes,
    /// A delay the subscriber asked for (Wasm `retry(after)`, HTTP `Retry-After`).
    pub retry_after: Option<AskedDelay>,
}

impl Failure {
    pub(crate) fn message(code: Option<u16>, text: impl Into<String>) -> Self {
        Failure {
            code,
            data: Bytes::from(text.into()),
            retry_after: None,
        }
    }
}

/// The HTTP client shared by every HTTP sink (keep-alive connection pools), for `http` and
/// `https` URIs.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the shared client. `https` sinks are checked against the system's CA certificates
/// (`SSL_CERT_FILE` / `SSL_CERT_DIR` name others); without any, only `http` sinks work and the
/// reason is logged.
pub fn http_client() -> HttpClient {
    let roots = system_roots().unwrap_or_else(|why| {
        tracing::warn!(
            "no CA certificates found{why}; deliveries to https sinks will fail (set SSL_CERT_FILE to a PEM file of CA certificates)"
        );
        rustls::RootCertStore::empty()
    });
    client_trusting(roots)
}

/// A client for a destination with CA certificates of its own (`CACerts`, PEM): those and the
/// system's are trusted. Errors say what is wrong with the PEM.
pub fn http_client_with(ca_certs: &str) -> Result<HttpClient, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = system_roots().unwrap_or_else(|_| rustls::RootCertStore::empty());
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(ca_certs.as_bytes()) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate is not usable: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into());
    }
    Ok(client_trusting(roots))
}

fn client_trusting(roots: rustls::RootCertStore) -> HttpClient {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// The system's CA certificates (or those `SSL_CERT_FILE` / `SSL_CERT_DIR` name); without any,
/// why (`": ..."`, or empty).
pub fn system_roots() -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added > 0 {
        return Ok(roots);
    }
    Err(found
        .errors
        .first()
        .map(|e| format!(": {e}"))
        .unwrap_or_default())
}

/// Redirects followed before a delivery counts as failed (Go's client's limit).
const MAX_REDIRECTS: usize = 10;

/// Where a 307 or 308 response sends the request again (its `Location`, relative to `from`);
/// `None` for any other response, or a `Location` that is not an http(s) URL.
fn redirect(from: &http::Uri, status: StatusCode, headers: &HeaderMap) -> Option<http::Uri> {
    if status != StatusCode::TEMPORARY_REDIRECT && status != StatusCode::PERMANENT_REDIRECT {
        return None;
    }
    let location = headers.get(http::header::LOCATION)?.to_str().ok()?;
    let next = url::Url::parse(&from.to_string())
        .ok()?
        .join(location)
        .ok()?;
    if next.scheme() != "http" && next.scheme() != "https" {
        return None;
    }
    next.as_str().parse().ok()
}

/// The most of a response body kept for a reply or for `knativeerrordata`.
const MAX_RESPONSE: usize = 4 << 20;

/// How an event goes to an HTTP sink.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions<'a> {
    /// The namespace of the trigger or source sending (`Kn-Namespace`).
    pub namespace: &'a str,
    /// The per-request timeout.
    pub timeout: Option<Duration>,
    /// Structured mode (`delivery.format: json`) instead of binary.
    pub structured: bool,
    /// A trigger's subscriber: the request says `Prefer: reply` (Knative's data plane: brokers
    /// must) and the response is read by the reply rules. Otherwise (a dead-letter sink, a
    /// source's sink) any 2xx is success and its body is ignored, as Knative's dispatcher does.
    pub replies: bool,
}

/// Sends one event to an HTTP subscriber (binary mode unless `structured`), with its
/// pass-through headers, and applies Knative's reply rules.
pub async fn send_http(
    client: &HttpClient,
    uri: &http::Uri,
    event: &Event,
    passthrough: &Passthrough,
    options: SendOptions<'_>,
) -> Outcome {
    let SendOptions {
        namespace,
        timeout,
        structured,
        replies,
    } = options;
    // The request's headers and body, built again for each redirect (rare) rather than copied
    // for each delivery.
    let request = |target: &http::Uri| {
        let mut headers = HeaderMap::new();
        passthrough.add_to(&mut headers);
        let body = if structured {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/cloudevents+json"),
            );
            codec::encode_structured(event)
        } else {
            codec::encode_binary(event, &mut headers)
        };
        for trace in ["traceparent", "tracestate"] {
            if let Some(v) = event.extension(trace) {
                headers.insert(trace, codec::encode_value(&v.to_string()));
            }
        }
        if let Ok(ns) = HeaderValue::from_str(namespace) {
            headers.insert("kn-namespace", ns);
        }
        if replies {
            headers.insert(
                http::header::HeaderName::from_static("prefer"),
                HeaderValue::from_static("reply"),
            );
        }
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(target.clone())
            .body(Full::new(body))
            .map_err(|e| format!("bad request: {e}"))?;
        req.headers_mut().extend(headers);
        Ok::<_, String>(req)
    };
    let call = async {
        let mut target = uri.clone();
        let mut redirects = 0;
        loop {
            let resp = client
                .request(request(&target)?)
                .await
                .map_err(|e| format!("{e}"))?;
            // 307 and 308 keep the method and the body: followed, as Go's client (Knative's)
            // follows them, up to its 10. (Go turns a POST into a bodiless GET on 301, 302 and
            // 303, which loses the event: those stay failures.)
            if let Some(next) = redirect(&target, resp.status(), resp.headers()) {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(format!("stopped after {MAX_REDIRECTS} redirects"));
                }
                target = next;
                continue;
            }
            let (parts, body) = resp.into_parts();
            let bytes = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?
                .to_bytes();
            return Ok::<_, String>((parts, bytes));
        }
    };
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, call).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} ms", t.as_millis())),
        },
        None => call.await,
    };
    let (parts, body) = match result {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(Failure::message(None, e)),
    };
    let code = parts.status.as_u16();
    if parts.status.is_success() {
        if parts.status == StatusCode::ACCEPTED || !replies {
            return Outcome::Delivered(None);
        }
        if codec::carries_event(&parts.headers) {
            return match codec::decode(&parts.headers, body.clone()) {
                Ok(mut events) if events.len() == 1 => {
                    Outcome::Delivered(events.pop().map(|e| Reply {
                        event: Box::new(e),
                        headers: Passthrough::from_request(&parts.headers),
                    }))
                }
                Ok(_) => Outcome::Retry(Failure::message(Some(502), "a reply must be one event")),
                Err(e) => {
                    Outcome::Retry(Failure::message(Some(502), format!("invalid reply: {e}")))
                }
            };
        }
        if body.is_empty() {
            return Outcome::Delivered(None);
        }
        return Outcome::Retry(Failure {
            code: Some(502),
            data: body,
            retry_after: None,
        });
    }
    let retry_after = crate::delivery::retry_after(
        code,
        parts
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
    );
    let failure = Failure {
        code: Some(code),
        data: body,
        retry_after,
    };
    if is_retryable_status(code) {
        Outcome::Retry(failure)
    } else {
        Outcome::Fail(failure)
    }
}

/// Hands one event to a Wasm subscriber on the blocking pool (Wasm calls never run on Tokio's
/// workers: WASI output blocks) and maps its disposition onto delivery outcomes.
pub async fn send_function(
    func: &Arc<FunctionSlot>,
    event: Arc<Event>,
    output: &crate::output::FunctionOutput,
    timeout: Option<Duration>,
) -> Outcome {
    let f = Arc::clone(func);
    let out = output.clone();
    match tokio::task::spawn_blocking(move || call_function(&f, &event, &out, timeout)).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Retry(Failure::message(Some(500), format!("call aborted: {e}"))),
    }
}

/// Calls a Wasm subscriber on this thread (never a Tokio worker) and maps its disposition onto
/// delivery outcomes; its output is written on the way. `timeout` (a trigger's
/// `delivery.timeout`) cuts the call's deadline when it is shorter than the Function's.
pub fn call_function(
    func: &FunctionSlot,
    event: &Event,
    output: &crate::output::FunctionOutput,
    timeout: Option<Duration>,
) -> Outcome {
    let (_version, result) = func.handle_within(event, timeout);
    match result {
        Ok(called) => {
            output.write(func.name(), &called.output);
            match called.value {
                Disposition::Ack => Outcome::Delivered(None),
                Disposition::Reply(ev) => Outcome::Delivered(Some(Reply {
                    event: ev,
                    headers: Passthrough::default(),
                })),
                Disposition::Retry(after) => Outcome::Retry(Failure {
                    code: None,
                    data: Bytes::from_static(b"the function asked to retry"),
                    retry_after: after
                        .map(|ms| AskedDelay::Exact(Duration::from_millis(u64::from(ms)))),
                }),
                Disposition::Reject(reason) => Outcome::Fail(Failure::message(Some(422), reason)),
            }
        }
        Err(e) => {
            output.write(func.name(), &e.output);
            let code = match e.kind {
                CallErrorKind::Deadline(_) => 504,
                CallErrorKind::MalformedReply(_) => 502,
                _ => 500,
            };
            tracing::warn!(function = %func.name(), error = %e, "function call failed");
            Outcome::Retry(Failure::message(Some(code), e.to_string()))
        }
    }
}
