//! The admin API client the kubectl-style commands share: where the server is, the token, and
//! one request over HTTP or HTTPS, with messages that say what to do when it fails.
//!
//! The server and token come from `--server` / `--token`, else `WASMESH_SERVER` /
//! `WASMESH_TOKEN`, else `~/.wasmesh/config` (written by `wasmesh login`), else
//! `http://127.0.0.1:8081` and the token `wasmesh serve` generated in `./.wasmesh/admin-token`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls;

/// Options every admin command takes.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ServerArgs {
    /// The admin API's URL (default: ~/.wasmesh/config, else http://127.0.0.1:8081).
    #[arg(long, env = "WASMESH_SERVER", global = true)]
    server: Option<String>,
    /// The admin API's bearer token (default: ~/.wasmesh/config, else ./.wasmesh/admin-token).
    #[arg(long, env = "WASMESH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// A PEM CA certificate to trust for an https server (default: the system's CAs, or
    /// SSL_CERT_FILE).
    #[arg(long, value_name = "FILE", global = true)]
    certificate_authority: Option<PathBuf>,
}

/// `~/.wasmesh/config`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<PathBuf>,
}

pub(crate) fn config_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".wasmesh").join("config"))
}

fn read_config() -> anyhow::Result<Config> {
    let Some(path) = config_path() else {
        return Ok(Config::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{} is not a valid wasmesh config", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// A connection to the admin API.
pub(crate) struct Client {
    url: http::Uri,
    token: String,
    tls: Option<tokio_rustls::TlsConnector>,
    runtime: tokio::runtime::Runtime,
}

/// The JSON error body of the admin API.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

impl Client {
    pub(crate) fn new(args: &ServerArgs) -> anyhow::Result<Self> {
        let config = read_config()?;
        let server = args
            .server
            .clone()
            .or(config.server)
            .unwrap_or_else(|| "http://127.0.0.1:8081".into());
        let url: http::Uri = server
            .parse()
            .with_context(|| format!("--server `{server}` is not a URL"))?;
        let token = match args.token.clone().or(config.token) {
            Some(t) => t,
            None => std::fs::read_to_string(".wasmesh/admin-token")
                .map(|t| t.trim().to_string())
                .map_err(|_| {
                    anyhow!(
                        "no admin token: pass --token, set WASMESH_TOKEN, run `wasmesh login`, or run this where `wasmesh serve` keeps .wasmesh/admin-token"
                    )
                })?,
        };
        let tls = match url.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let ca = args
                    .certificate_authority
                    .clone()
                    .or(config.certificate_authority);
                Some(tls_connector(ca.as_deref())?)
            }
            _ => bail!("--server `{server}`: use an http:// or https:// URL"),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            url,
            token,
            tls,
            runtime,
        })
    }

    /// One request; returns the status and body, or an error that says what to do.
    pub(crate) fn call(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.runtime.block_on(async {
            let resp = self.send(method, path, content_type, body).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok((status, body))
        })
    }

    /// Like [`call`](Self::call), and turns every non-2xx answer into an error.
    pub(crate) fn ok(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.call(method, path, content_type, body)?;
        if !status.is_success() {
            bail!("{}", self.explain(status, &body));
        }
        serde_json::from_slice(&body).context("the admin API answered something that is not JSON")
    }

    /// What a failed answer means.
    pub(crate) fn explain(&self, status: StatusCode, body: &[u8]) -> String {
        let text = error_text(body);
        match status {
            StatusCode::UNAUTHORIZED => format!(
                "the admin API at {} refused the token ({status}): {text}\nset --token, WASMESH_TOKEN or `token:` in ~/.wasmesh/config (`wasmesh login`)",
                self.url
            ),
            _ => format!("{status}: {text}"),
        }
    }

    /// Streams a response body to `out` as it arrives (for `logs -f`).
    pub(crate) fn stream(&self, path: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            let resp = self
                .send(Method::GET, path, "text/plain", Vec::new())
                .await?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body.collect().await?.to_bytes();
                bail!("{}", self.explain(status, &bytes));
            }
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    anyhow!(
                        "the admin API at {} cut the answer short: {e} (did the server stop?)",
                        self.url
                    )
                })?;
                if let Ok(data) = frame.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            Ok(())
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let authority = self
            .url
            .authority()
            .ok_or_else(|| anyhow!("--server `{}` has no host", self.url))?
            .clone();
        let port = authority
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let down = |e: &dyn std::fmt::Display| {
            anyhow!(
                "cannot reach the admin API at {}: {e}\nis `wasmesh serve` running there? (--server, or `server:` in ~/.wasmesh/config)",
                self.url
            )
        };
        let tcp = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| down(&e))?;
        let base = self.url.path().trim_end_matches('/');
        let req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(http::header::HOST, authority.as_str())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))?;
        let resp = match &self.tls {
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from(authority.host().to_string())
                    .map_err(|e| anyhow!("server name `{}`: {e}", authority.host()))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| anyhow!("TLS with {} failed: {e}", self.url))?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                sender.send_request(req).await
            }
            None => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                sender.send_request(req).await
            }
        };
        resp.map_err(|e| down(&e))
    }
}

/// Trusts `ca` alone when given (`--certificate-authority`), else the system's CA
/// certificates (including `SSL_CERT_FILE` / `SSL_CERT_DIR` when set).
fn tls_connector(ca: Option<&Path>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("--certificate-authority {}", ca.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("--certificate-authority {}", ca.display()))?)
                    .context("a CA certificate is not usable")?;
            }
        }
        None => {
            roots = wasmesh_broker::sink::system_roots().map_err(|why| {
                anyhow!(
                    "no system CA certificates to check the server with{why}: pass --certificate-authority FILE (its CA in PEM)"
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
