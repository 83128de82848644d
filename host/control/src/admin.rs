//! The admin API: its own listener (TLS when a certificate is given), bearer-token
//! authentication, module uploads, apply and delete, list and get with status, revisions,
//! `rollout undo`, function logs and metrics. Every change goes through the [`Controller`].
//!
//! ```text
//! GET    /healthz                                   (no token)
//! GET    /metrics                                   the data plane's counters (Prometheus text)
//! POST   /v1/modules[?world=filter|subscriber]      body: the .wasm -> {digest, world, bytes}
//! POST   /v1/apply                                  body: YAML or JSON documents
//! POST   /v1/delete                                 body: YAML or JSON documents
//! GET    /v1/{kind}                                 brokers|triggers|functions|sources|...
//! GET    /v1/{kind}/{namespace}/{name}
//! DELETE /v1/{kind}/{namespace}/{name}
//! GET    /v1/functions/{namespace}/{name}/revisions
//! POST   /v1/functions/{namespace}/{name}/undo[?to=N]
//! GET    /v1/functions/{namespace}/{name}/logs[?follow=true]
//! ```

use std::convert::Infallible;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::rustls;
use tokio_stream::StreamExt as _;
use wasmesh_broker::listen::{
    Acceptor, BodyError, DEFAULT_READ_TIMEOUT, http1_builder, read_limited, refuse,
};
use wasmesh_broker::output::{LogBook, LogEntry};
use wasmesh_core::yaml::{Located, parse_documents};

use crate::reconcile::{ApplyError, Change, Controller};

type Body = BoxBody<Bytes, Infallible>;
/// A request answered early (boxed: a response is large).
type Refused = Box<Response<Body>>;

/// How the admin API runs.
#[derive(Clone)]
pub struct AdminConfig {
    pub token: String,
    /// Largest module upload (413 above it).
    pub max_module_bytes: usize,
    /// Largest YAML or JSON request.
    pub max_body_bytes: usize,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where functions' output is kept, for `logs`.
    pub book: Option<Arc<LogBook>>,
}

/// The admin token: the one given, else the one in `<data-dir>/admin-token`, else a new one
/// written there with mode 0600. Returns the token and the file it is in (if any).
pub fn admin_token(
    given: Option<String>,
    data_dir: &Path,
) -> Result<(String, Option<PathBuf>), String> {
    if let Some(t) = given {
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err("the admin token must be at least 16 characters".into());
        }
        return Ok((t, None));
    }
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), Some(path))),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness for a token: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(token.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((token, Some(path)))
}

/// A TLS server configuration from PEM files.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect())
        .map_err(|e| format!("--admin-tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--admin-tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--admin-tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the admin certificate and key do not fit: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves the admin API on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    controller: Arc<Controller>,
    config: AdminConfig,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let config = Arc::new(config);
    let mut listener = Acceptor::new(listener, "admin API");
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (controller, config, acceptor, stopped) = (
            Arc::clone(&controller),
            Arc::clone(&config),
            acceptor.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (controller, config) = (Arc::clone(&controller), Arc::clone(&config));
                let stopped = stopped.clone();
                async move { Ok::<_, Infallible>(handle(req, &controller, &config, stopped).await) }
            });
            let builder = http1_builder(DEFAULT_READ_TIMEOUT);
            let result = match acceptor {
                // A client that never finishes its handshake does not hold the connection.
                Some(acceptor) => {
                    match timeout(DEFAULT_READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "admin TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("admin TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(value).unwrap_or_default();
    text.push(b'\n');
    full(status, "application/json", text)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// Constant-time comparison, so that the answer's timing does not leak the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request<Incoming>, token: &str) -> Result<(), Refused> {
    let unauthorized = |msg: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, msg);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"wasmesh\""),
        );
        Box::new(r)
    };
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "no bearer token: send `Authorization: Bearer <token>` (the token is in the data directory's admin-token file unless --admin-token was given)",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same(given.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("the bearer token is not valid"))
    }
}

/// The body, at most `limit` bytes (a longer one is drained, then refused with 413, so that a
/// client still sending it reads why).
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refused> {
    let (parts, body) = req.into_parts();
    read_limited(&parts.headers, body, limit)
        .await
        .map_err(|e| {
            let status = match e {
                BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::Read(_) => StatusCode::BAD_REQUEST,
            };
            Box::new(error(status, e.to_string()))
        })
}

fn query(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

async fn handle(
    req: Request<Incoming>,
    c: &Controller,
    config: &AdminConfig,
    stopped: watch::Receiver<bool>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return full(StatusCode::OK, "text/plain", "ok\n");
    }
    // Refusals that do not read the body drain it first (`refuse`): an upload sent with a
    // wrong token gets its 401, not a reset connection.
    if let Err(r) = authorized(&req, &config.token) {
        return refuse(req, *r).await;
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, parts.as_slice()) {
        (Method::GET, ["metrics"]) => full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            c.mesh().metrics_text(),
        ),
        (Method::POST, ["v1", "modules"]) => upload(req, c, config).await,
        (Method::POST, ["v1", "apply"]) => match documents(req, config).await {
            Ok(docs) => respond(c, c.apply(docs).await).await,
            Err(r) => *r,
        },
        (Method::POST, ["v1", "delete"]) => match documents(req, config).await {
            Ok(docs) => {
                let ids = docs.iter().map(|l| l.resource.id()).collect();
                respond(c, c.delete(ids).await).await
            }
            Err(r) => *r,
        },
        (Method::GET, ["v1", kind]) => match c.list(kind).await {
            Ok(items) => json(StatusCode::OK, &serde_json::json!({ "items": items })),
            Err(e) => error(StatusCode::NOT_FOUND, e),
        },
        (Method::GET, ["v1", kind, ns, name]) => match c.get(kind, ns, name).await {
            Ok(Some(v)) => json(StatusCode::OK, &v),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                format!("{kind} {ns}/{name} not found"),
            ),
            Err(e) => error(StatusCode::NOT_FOUND, e),
        },
        (Method::DELETE, ["v1", kind, ns, name]) => match c.get(kind, ns, name).await {
            Ok(Some(v)) => {
                let k = v["kind"].as_str().unwrap_or_default();
                respond(c, c.delete(vec![format!("{k}/{ns}/{name}")]).await).await
            }
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                format!("{kind} {ns}/{name} not found"),
            ),
            Err(e) => error(StatusCode::NOT_FOUND, e),
        },
        (Method::GET, ["v1", "functions", ns, name, "revisions"]) => {
            match c.revisions(ns, name).await {
                Some((revisions, live)) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "revisions": revisions, "live": live }),
                ),
                None => error(
                    StatusCode::NOT_FOUND,
                    format!("Function {ns}/{name} not found"),
                ),
            }
        }
        (Method::POST, ["v1", "functions", ns, name, "undo"]) => {
            if !c.has_function(ns, name).await {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("Function {ns}/{name} not found"),
                );
            }
            let to = match query(&req, "to").map(|v| v.parse::<u32>()) {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => {
                    return error(StatusCode::BAD_REQUEST, "`to` must be a revision number");
                }
            };
            respond(c, c.undo(ns, name, to).await).await
        }
        (Method::GET, ["v1", "functions", ns, name, "logs"]) => {
            if !c.has_function(ns, name).await {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("Function {ns}/{name} not found"),
                );
            }
            let follow = query(&req, "follow").is_some_and(|v| v == "true" || v == "1");
            logs(config, &format!("{ns}/{name}"), follow.then_some(stopped))
        }
        // A path the API has, asked with another method.
        (
            _,
            ["v1", _] | ["v1", _, _, _] | ["v1", "functions", _, _, "revisions" | "undo" | "logs"],
        ) => {
            let e = error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} {path} is not an admin API call", req.method()),
            );
            refuse(req, e).await
        }
        _ => {
            refuse(
                req,
                error(StatusCode::NOT_FOUND, format!("no such path: {path}")),
            )
            .await
        }
    }
}

async fn upload(req: Request<Incoming>, c: &Controller, config: &AdminConfig) -> Response<Body> {
    let expected = match query(&req, "world").as_deref() {
        None => None,
        Some("filter") => Some(wasmesh_runtime::PluginKind::Filter),
        Some("subscriber") => Some(wasmesh_runtime::PluginKind::Subscriber),
        Some(other) => {
            let e = error(
                StatusCode::BAD_REQUEST,
                format!("world `{other}`: use filter or subscriber"),
            );
            return refuse(req, e).await;
        }
    };
    let bytes = match read_body(req, config.max_module_bytes).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(store) = c.modules() else {
        return error(StatusCode::CONFLICT, "uploads need a data directory");
    };
    let engine = c.engine().clone();
    let checked = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || engine.load("upload", &bytes)).await
    };
    let plugin = match checked {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if let Some(expected) = expected
        && plugin.kind() != expected
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the module implements world `{}`, not `{expected}`",
                plugin.kind()
            ),
        );
    }
    let stored = store.put(&bytes);
    if let Ok(hex) = &stored
        && let Err(e) = c.share_module(hex, &bytes).await
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    match stored {
        Ok(hex) => json(
            StatusCode::CREATED,
            &serde_json::json!({
                "digest": format!("sha256:{hex}"),
                "world": plugin.kind().world(),
                "bytes": bytes.len(),
            }),
        ),
        Err(e) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("cannot store the module: {e}"),
        ),
    }
}

/// The request's objects: YAML documents, or JSON (one object, or a list of them).
async fn documents(req: Request<Incoming>, config: &AdminConfig) -> Result<Vec<Located>, Refused> {
    let bytes = read_body(req, config.max_body_bytes).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, "the body is not UTF-8")))?;
    let text = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| serde_json::to_string(i).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n"),
        Ok(serde_json::Value::Object(map)) if map.get("items").is_some_and(|i| i.is_array()) => map
            ["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| serde_json::to_string(i).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            })
            .unwrap_or_default(),
        _ => text.to_string(),
    };
    let docs = parse_documents("request", &text)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.to_string())))?;
    if docs.is_empty() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "the request holds no object",
        )));
    }
    Ok(docs)
}

async fn respond(c: &Controller, result: Result<Vec<Change>, ApplyError>) -> Response<Body> {
    match result {
        Ok(changes) => {
            let statuses = c.statuses().await;
            let touched: Vec<_> = statuses
                .iter()
                .filter(|s| changes.iter().any(|ch| ch.id == s.id))
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({ "changes": changes, "statuses": touched }),
            )
        }
        Err(e @ ApplyError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ ApplyError::Build { .. }) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e @ ApplyError::Storage(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn render(entry: &LogEntry) -> String {
    entry
        .text
        .lines()
        .map(|l| match entry.stream {
            "stdout" => format!("{l}\n"),
            stream => format!("[{stream}] {l}\n"),
        })
        .collect()
}

/// A Function's recent output; with `follow` (the server's stop signal), what it prints from
/// then on too, until the server stops: the body then ends as a whole, so that `logs -f` ends
/// as `kubectl logs -f` does when its pod goes.
fn logs(
    config: &AdminConfig,
    function: &str,
    follow: Option<watch::Receiver<bool>>,
) -> Response<Body> {
    let Some(book) = &config.book else {
        return error(StatusCode::NOT_FOUND, "this server keeps no function logs");
    };
    // Subscribe before reading the past, so that no line falls between the two.
    let feed = follow.map(|stop| (book.follow(), stop));
    let past: String = book.recent(function).iter().map(render).collect();
    let Some((feed, mut stop)) = feed else {
        return full(StatusCode::OK, "text/plain; charset=utf-8", past);
    };
    let name = function.to_string();
    let live = tokio_stream::wrappers::BroadcastStream::new(feed).filter_map(move |l| match l {
        Ok(entry) if *entry.function == *name => Some(Ok(Frame::data(Bytes::from(render(&entry))))),
        Ok(_) => None,
        // This follower fell behind the functions' output: say so rather than skip in silence.
        Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
            Some(Ok(Frame::data(Bytes::from(format!(
                "[wasmesh: {n} lines of output (of all functions) went by too fast to follow \
                 here; `wasmesh logs` without -f shows the recent ones]\n"
            )))))
        }
    });
    let live = futures_util::StreamExt::take_until(live, async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    });
    let first = tokio_stream::once(Ok(Frame::data(Bytes::from(past))));
    let body = StreamBody::new(first.chain(live));
    let mut r = Response::new(BodyExt::boxed(body));
    if let Ok(v) = "text/plain; charset=utf-8".parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmesh_broker::output::FunctionOutput;

    /// A follower that fell behind the functions' output is told how many lines it missed,
    /// and the stream ends when the server stops.
    #[tokio::test]
    async fn a_lagging_follower_is_told_and_the_stream_ends_at_the_stop() {
        let book = LogBook::new(10);
        let config = AdminConfig {
            token: "t".repeat(16),
            max_module_bytes: 1,
            max_body_bytes: 1,
            tls: None,
            book: Some(Arc::clone(&book)),
        };
        let (stop, stopped) = watch::channel(false);
        let response = logs(&config, "ns/f", Some(stopped));
        // More lines than the feed holds, before the follower reads any.
        let output = FunctionOutput {
            prefix: false,
            sink: Some(Arc::new(|_: &str, _: &[u8]| {})),
            book: Some(book),
        };
        for i in 0..1500 {
            let call = wasmesh_runtime::CallOutput {
                stdout: format!("line {i}\n").into_bytes(),
                ..Default::default()
            };
            output.write("ns/f", &call);
        }
        let mut body = response.into_body();
        let mut text = String::new();
        let told = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !text.contains("went by too fast") {
                let frame = body.frame().await.expect("a frame").expect("no error");
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
        })
        .await;
        assert!(told.is_ok(), "no word of the lines missed: {text}");
        assert!(
            text.contains("lines of output (of all functions) went by too fast"),
            "{text}"
        );
        // The stop ends the stream (the lines still buffered go with it).
        stop.send_replace(true);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while body.frame().await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "the stream ended at the stop");
    }
}
