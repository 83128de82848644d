//! The kubectl- and kn-style commands that talk to a running `wasmesh serve` through its admin
//! API: apply, delete, get, describe, push, rollout, logs, login.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use http::Method;

use super::client::{Client, Config, ServerArgs, config_path};

#[derive(clap::Args)]
pub(crate) struct ApplyArgs {
    /// YAML files or directories of them, `-` for standard input. A Function whose module is a
    /// path is uploaded first (a path relative to the file; to the current directory for `-`).
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Output {
    Yaml,
    Json,
    Wide,
}

#[derive(clap::Args)]
pub(crate) struct GetArgs {
    /// brokers, triggers, functions, sources (pingsources, apiserversources), namespaces.
    kind: String,
    /// One object's name.
    name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short = 'o', long, value_enum)]
    output: Option<Output>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub(crate) struct DescribeArgs {
    kind: String,
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub(crate) struct PushArgs {
    /// `function`.
    kind: String,
    name: String,
    /// The .wasm component.
    file: PathBuf,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub(crate) struct RolloutArgs {
    /// `history` or `undo`.
    action: String,
    /// `function`.
    kind: String,
    name: String,
    /// With `undo`: the revision to go back to (default: the one before the latest).
    #[arg(long)]
    to_revision: Option<u32>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub(crate) struct LogsArgs {
    /// `function`.
    kind: String,
    name: String,
    /// Keep printing new lines.
    #[arg(short = 'f', long)]
    follow: bool,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub(crate) struct LoginArgs {
    /// The admin API's URL.
    #[arg(long)]
    server: String,
    /// The token; or --token-file.
    #[arg(long, required_unless_present = "token_file")]
    token: Option<String>,
    /// A file holding the token (e.g. the server's <data-dir>/admin-token).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for an https server.
    #[arg(long, value_name = "FILE")]
    certificate_authority: Option<PathBuf>,
}

fn function_only(kind: &str) -> anyhow::Result<()> {
    match kind {
        "function" | "functions" | "fn" => Ok(()),
        other => bail!("`{other}`: only `function` has revisions, pushes and logs"),
    }
}

/// Reads every YAML file of the paths (directories: their *.yaml and *.yml, in name order),
/// checks each locally (errors name the file and line), and returns each file's objects as
/// JSON with the file they came from.
fn read_objects(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, serde_json::Value)>> {
    if let Err(errors) = super::serve::load(paths)? {
        bail!("{errors}");
    }
    let mut out = Vec::new();
    for f in super::serve::yaml_files(paths)? {
        let text = super::serve::read_declarations(&f)?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc)
                .with_context(|| format!("{}", f.display()))?;
            if value.is_null() {
                continue;
            }
            let json: serde_json::Value = serde_json::to_value(&value)
                .with_context(|| format!("{}: not expressible as JSON", f.display()))?;
            // A List (`kubectl get -o yaml`) is its items, as `serve -f` reads it.
            match json {
                serde_json::Value::Object(mut list)
                    if list.get("kind").and_then(|k| k.as_str()) == Some("List")
                        && list.get("apiVersion").and_then(|v| v.as_str()) == Some("v1") =>
                {
                    if let Some(serde_json::Value::Array(items)) = list.remove("items") {
                        out.extend(items.into_iter().map(|item| (f.clone(), item)));
                    }
                }
                json => out.push((f.clone(), json)),
            }
        }
    }
    Ok(out)
}

use serde::Deserialize as _;

/// Uploads a module; returns its `sha256:` digest.
fn upload(client: &Client, path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = client
        .ok(Method::POST, "/v1/modules", "application/wasm", bytes)
        .with_context(|| format!("uploading {}", path.display()))?;
    Ok(v["digest"].as_str().unwrap_or_default().to_string())
}

fn print_changes(v: &serde_json::Value) -> bool {
    let mut all_ready = true;
    for c in v["changes"].as_array().into_iter().flatten() {
        println!(
            "{} {}",
            c["id"].as_str().unwrap_or_default(),
            c["action"].as_str().unwrap_or_default()
        );
    }
    for s in v["statuses"].as_array().into_iter().flatten() {
        if s["ready"] == serde_json::Value::Bool(false) {
            all_ready = false;
            eprintln!(
                "warning: {} is not ready ({}): {}",
                s["id"].as_str().unwrap_or_default(),
                s["reason"].as_str().unwrap_or_default(),
                s["message"].as_str().unwrap_or_default()
            );
        }
    }
    all_ready
}

pub(crate) fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let objects = read_objects(&args.files)?;
    let client = Client::new(&args.server)?;
    let mut docs = Vec::new();
    for (file, mut obj) in objects {
        if obj["kind"] == "Function"
            && let Some(module) = obj["spec"]["module"].as_str()
            && !module.starts_with("sha256:")
            && !module.starts_with("builtin:")
        {
            let base = file.parent().unwrap_or(Path::new("."));
            let digest = upload(&client, &base.join(module))?;
            obj["spec"]["module"] = digest.into();
        }
        docs.push(obj);
    }
    let body = serde_json::to_vec(&docs)?;
    let v = client.ok(Method::POST, "/v1/apply", "application/json", body)?;
    print_changes(&v);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn delete(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let docs: Vec<serde_json::Value> = read_objects(&args.files)?
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    let client = Client::new(&args.server)?;
    let v = client.ok(
        Method::POST,
        "/v1/delete",
        "application/json",
        serde_json::to_vec(&docs)?,
    )?;
    print_changes(&v);
    Ok(ExitCode::SUCCESS)
}

fn ready(item: &serde_json::Value) -> (&str, &str, &str) {
    let c = &item["status"]["conditions"][0];
    (
        c["status"].as_str().unwrap_or("Unknown"),
        c["reason"].as_str().unwrap_or(""),
        c["message"].as_str().unwrap_or(""),
    )
}

fn short(digest: &str) -> String {
    digest.chars().take(19).collect()
}

fn table(kind: &str, items: &[serde_json::Value], wide: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let k = kind.to_ascii_lowercase();
    let mut header = vec!["NAMESPACE", "NAME", "READY", "REASON"];
    let extra: Vec<&str> = match k.trim_end_matches('s') {
        "trigger" => vec![
            "BROKER",
            "SUBSCRIBER",
            "DELIVERED",
            "DEAD-LETTERED",
            "DROPPED",
        ],
        "function" | "fn" => vec!["REVISION", "WORLD", "DIGEST"],
        "broker" => vec!["PATH"],
        "source" | "pingsource" | "apiserversource" => vec!["KIND", "SINK"],
        _ => vec![],
    };
    let broker = k.trim_end_matches('s') == "broker";
    if broker {
        header.insert(2, "URL");
    }
    if wide {
        header.extend(extra.iter().copied());
        header.push("MESSAGE");
    }
    rows.push(header.iter().map(|s| s.to_string()).collect());
    for i in items {
        let (status, reason, message) = ready(i);
        let mut row = vec![
            i["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            i["metadata"]["name"].as_str().unwrap_or("").to_string(),
            status.to_string(),
            reason.to_string(),
        ];
        if broker {
            // As `kubectl get brokers` shows a Broker's address.
            let url = i["status"]["address"]["url"].as_str().unwrap_or("");
            row.insert(2, url.to_string());
        }
        if wide {
            let sink = |d: &serde_json::Value| {
                d["uri"].as_str().map(str::to_string).unwrap_or_else(|| {
                    format!(
                        "{}/{}",
                        d["ref"]["kind"].as_str().unwrap_or(""),
                        d["ref"]["name"].as_str().unwrap_or("")
                    )
                })
            };
            for col in &extra {
                row.push(match *col {
                    "BROKER" => i["spec"]["broker"].as_str().unwrap_or("").to_string(),
                    "SUBSCRIBER" => sink(&i["spec"]["subscriber"]),
                    "REVISION" => i["status"]["revision"].to_string(),
                    "WORLD" => i["status"]["world"].as_str().unwrap_or("").to_string(),
                    "DIGEST" => short(i["status"]["digest"].as_str().unwrap_or("")),
                    "PATH" => i["status"]["address"]["path"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    "KIND" => i["kind"].as_str().unwrap_or("").to_string(),
                    "SINK" => sink(&i["spec"]["sink"]),
                    "DELIVERED" => i["status"]["deliveries"]["delivered"].to_string(),
                    "DEAD-LETTERED" => i["status"]["deliveries"]["deadLettered"].to_string(),
                    "DROPPED" => i["status"]["deliveries"]["dropped"].to_string(),
                    _ => String::new(),
                });
            }
            row.push(message.to_string());
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| format!("{v:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let items: Vec<serde_json::Value> = match &args.name {
        Some(name) => vec![client.ok(
            Method::GET,
            &format!("/v1/{}/{}/{name}", args.kind, args.namespace),
            "application/json",
            Vec::new(),
        )?],
        None => {
            let v = client.ok(
                Method::GET,
                &format!("/v1/{}", args.kind),
                "application/json",
                Vec::new(),
            )?;
            v["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|i| {
                    args.all_namespaces
                        || i["metadata"]["namespace"].as_str().unwrap_or("default")
                            == args.namespace
                })
                .collect()
        }
    };
    match args.output {
        Some(Output::Json) => {
            let v = if args.name.is_some() {
                items.into_iter().next().unwrap_or_default()
            } else {
                serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items })
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Some(Output::Yaml) => {
            let v = if args.name.is_some() {
                items.into_iter().next().unwrap_or_default()
            } else {
                serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items })
            };
            print!("{}", serde_yaml_ng::to_string(&v)?);
        }
        Some(Output::Wide) => print!("{}", table(&args.kind, &items, true)),
        None if items.is_empty() => eprintln!("No {} found in {}.", args.kind, args.namespace),
        None => print!("{}", table(&args.kind, &items, false)),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn describe(args: DescribeArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let mut v = client.ok(
        Method::GET,
        &format!("/v1/{}/{}/{}", args.kind, args.namespace, args.name),
        "application/json",
        Vec::new(),
    )?;
    let status = v["status"].take();
    let wrapped = serde_json::json!({ "status": status });
    let (ready, reason, message) = ready(&wrapped);
    println!("Name:         {}", args.name);
    println!("Namespace:    {}", args.namespace);
    println!("Kind:         {}", v["kind"].as_str().unwrap_or(""));
    println!("API Version:  {}", v["apiVersion"].as_str().unwrap_or(""));
    println!(
        "Declared at:  {}",
        status["declaredAt"].as_str().unwrap_or("")
    );
    if let Some(url) = status["address"]["url"].as_str() {
        println!("Address:      {url}");
    }
    println!("Spec:");
    for line in serde_yaml_ng::to_string(&v["spec"])?.lines() {
        println!("  {line}");
    }
    println!("Conditions:");
    println!("  Type    Status  Reason  Message");
    println!("  Ready   {ready:<6}  {reason}  {message}");
    if let Some(d) = status["deliveries"].as_object() {
        println!("Deliveries (since this server started):");
        for (key, label) in [
            ("delivered", "Delivered"),
            ("deadLettered", "Dead-lettered"),
            ("dropped", "Dropped"),
            ("filtered", "Filtered out"),
            ("retries", "Retries"),
            ("replies", "Replies"),
            ("queued", "Queued now"),
        ] {
            println!(
                "  {:<14} {}",
                format!("{label}:"),
                d.get(key).unwrap_or(&0.into())
            );
        }
    }
    if let Some(revs) = status["revisions"].as_array() {
        println!("Revisions (live: {}):", status["revision"]);
        for r in revs {
            println!(
                "  {:>3}  {}  {}  {}",
                r["revision"],
                r["created"].as_str().unwrap_or(""),
                r["digest"].as_str().unwrap_or(""),
                r["module"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    function_only(&args.kind)?;
    let client = Client::new(&args.server)?;
    let digest = upload(&client, &args.file)?;
    let path = format!("/v1/functions/{}/{}", args.namespace, args.name);
    let (status, body) = client.call(Method::GET, &path, "application/json", Vec::new())?;
    let mut object = if status.is_success() {
        let mut v: serde_json::Value = serde_json::from_slice(&body)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        v
    } else if status == http::StatusCode::NOT_FOUND {
        serde_json::json!({
            "apiVersion": "wasmesh.dev/v1alpha1",
            "kind": "Function",
            "metadata": { "name": args.name, "namespace": args.namespace },
            "spec": {},
        })
    } else {
        bail!("{}", client.explain(status, &body));
    };
    object["spec"]["module"] = digest.clone().into();
    let v = client.ok(
        Method::POST,
        "/v1/apply",
        "application/json",
        serde_json::to_vec(&object)?,
    )?;
    print_changes(&v);
    println!("Function/{}/{} runs {digest}", args.namespace, args.name);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn rollout(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    function_only(&args.kind)?;
    let client = Client::new(&args.server)?;
    let base = format!("/v1/functions/{}/{}", args.namespace, args.name);
    match args.action.as_str() {
        "history" => {
            let v = client.ok(
                Method::GET,
                &format!("{base}/revisions"),
                "application/json",
                Vec::new(),
            )?;
            println!(
                "REVISION  LIVE  CREATED               DIGEST                                                                   MODULE"
            );
            for r in v["revisions"].as_array().into_iter().flatten() {
                let live = if r["revision"] == v["live"] { "*" } else { "" };
                println!(
                    "{:<8}  {:<4}  {:<20}  {:<71}  {}",
                    r["revision"].to_string(),
                    live,
                    r["created"].as_str().unwrap_or(""),
                    r["digest"].as_str().unwrap_or(""),
                    r["module"].as_str().unwrap_or("")
                );
            }
        }
        "undo" => {
            let path = match args.to_revision {
                Some(n) => format!("{base}/undo?to={n}"),
                None => format!("{base}/undo"),
            };
            let v = client.ok(Method::POST, &path, "application/json", Vec::new())?;
            print_changes(&v);
            let id = format!("Function/{}/{}", args.namespace, args.name);
            for s in v["statuses"].as_array().into_iter().flatten() {
                if s["id"] == id.as_str() {
                    println!("{}", s["message"].as_str().unwrap_or(""));
                }
            }
        }
        other => bail!("rollout `{other}`: use `history` or `undo`"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    function_only(&args.kind)?;
    let client = Client::new(&args.server)?;
    let path = format!(
        "/v1/functions/{}/{}/logs{}",
        args.namespace,
        args.name,
        if args.follow { "?follow=true" } else { "" }
    );
    client.stream(&path, &mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("give --token or --token-file"),
    };
    let config = Config {
        server: Some(args.server),
        token: Some(token),
        certificate_authority: args
            .certificate_authority
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
    };
    let path = config_path().context("HOME is not set")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write as _;
    let text = serde_yaml_ng::to_string(&config)?;
    options
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}
