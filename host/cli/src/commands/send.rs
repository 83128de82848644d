//! `wasmesh send --to URL --type T --source S [--data JSON|@file] [--mode binary|structured]
//! [--ext k=v]...`: sends one CloudEvent, like `kn event send`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmesh_core::{EventBuilder, EventBuilderV10};

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Mode {
    Binary,
    Structured,
}

#[derive(clap::Args)]
pub(crate) struct SendArgs {
    /// Where to send: a broker URL, e.g. http://127.0.0.1:8080/default/default.
    #[arg(long)]
    to: String,
    /// The event type.
    #[arg(long = "type")]
    ty: String,
    /// The event source.
    #[arg(long)]
    source: String,
    /// The event id (a fresh UUID by default).
    #[arg(long)]
    id: Option<String>,
    /// The subject.
    #[arg(long)]
    subject: Option<String>,
    /// The data: inline JSON, or @FILE to read it from a file.
    #[arg(long)]
    data: Option<String>,
    /// Content type of the data.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Content mode of the request.
    #[arg(long, value_enum, default_value_t = Mode::Binary)]
    mode: Mode,
    /// An extension attribute (repeatable).
    #[arg(long = "ext", value_name = "NAME=VALUE", value_parser = crate::commands::parse_key_value)]
    extensions: Vec<(String, String)>,
}

pub(crate) fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let mut b = EventBuilderV10::new()
        .id(args
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()))
        .source(args.source.clone())
        .ty(args.ty.clone())
        .time(chrono::Utc::now());
    if let Some(s) = &args.subject {
        b = b.subject(s.clone());
    }
    for (k, v) in &args.extensions {
        if let Some(why) = wasmesh_core::event::extension_name_problem(k) {
            bail!("--ext {k}: extension name `{k}` {why}");
        }
        b = b.extension(k, v.clone());
    }
    if let Some(data) = &args.data {
        let bytes = match data.strip_prefix('@') {
            Some(path) => {
                std::fs::read(PathBuf::from(path)).with_context(|| format!("cannot read {path}"))?
            }
            None => data.clone().into_bytes(),
        };
        if wasmesh_core::event::is_json_media_type(&args.content_type) {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .context("--data is not valid JSON (set --content-type for other data)")?;
        }
        b = b.data(args.content_type.clone(), bytes);
    }
    let event = b
        .build()
        .map_err(|e| anyhow::anyhow!("invalid event: {e}"))?;
    let uri: http::Uri = args
        .to
        .parse()
        .with_context(|| format!("--to `{}` is not a URL", args.to))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        bail!("--to `{}`: use an http:// or https:// URL", args.to);
    }
    let mut req = http::Request::post(uri.clone());
    let body = match args.mode {
        Mode::Binary => {
            let mut headers = http::HeaderMap::new();
            let body = wasmesh_broker::codec::encode_binary(&event, &mut headers);
            if let Some(h) = req.headers_mut() {
                h.extend(headers);
            }
            body
        }
        Mode::Structured => {
            req = req.header(http::header::CONTENT_TYPE, "application/cloudevents+json");
            wasmesh_broker::codec::encode_structured(&event)
        }
    };
    let req = req.body(Full::new(body))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = runtime.block_on(async {
        let client = wasmesh_broker::sink::http_client();
        let resp = client.request(req).await.map_err(|e| {
            anyhow::anyhow!("cannot reach {uri}: {e} (is `wasmesh serve` running there?)")
        })?;
        let status = resp.status();
        let body: Bytes = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    })?;
    if status.is_success() {
        eprintln!(
            "{status}: event {} sent",
            wasmesh_core::AttributesReader::id(&event)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{status}: {}", String::from_utf8_lossy(&body));
        Ok(ExitCode::FAILURE)
    }
}
