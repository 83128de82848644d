//! `wasmesh serve -f PATH... [--listen ADDR] [--data-dir DIR] [--watch]`: runs what the files
//! declare, with the admin API on its own listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use std::sync::Arc;
use wasmesh_broker::log::{DurableLog, LogConfig};

use wasmesh_broker::nats::{NatsConfig, NatsStore};
use wasmesh_broker::output::LogBook;
use wasmesh_broker::{FunctionOutput, IngressConfig, Mesh, MeshConfig};
use wasmesh_control::{ControlConfig, Controller, admin};
use wasmesh_core::yaml::{Located, YamlErrors};
use wasmesh_runtime::{EngineConfig, PluginEngine};

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// YAML files or directories of them (every *.yaml and *.yml inside, in name order), `-`
    /// for standard input.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Where ingress listens (port 0 picks a free one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The URL clients reach ingress at, for each Broker's `status.address.url` (e.g. a
    /// Kubernetes Service's); default `http://` and the address ingress listens on.
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Where wasmesh keeps its state: the event log (`--store embedded`), uploaded modules, the
    /// admin API's changes and token, compiled components.
    #[arg(long, default_value = ".wasmesh")]
    data_dir: PathBuf,
    /// Largest accepted request body, in bytes (413 above it).
    #[arg(long, default_value_t = 4 << 20)]
    max_body: usize,
    /// How long a client may take to send a request's header, and then its body (408 after
    /// it), as Go's `http.Server.ReadTimeout`; a connection idle this long is closed, so idle
    /// clients cannot use up the file descriptors.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    read_timeout: Duration,
    /// Events each trigger may queue before ingress answers 429.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Deliveries in flight per trigger.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The per-request timeout of HTTP deliveries (to subscribers and dead-letter sinks) whose
    /// trigger and broker set no `delivery.timeout`; a timed-out request is retried like a
    /// failed one.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    delivery_timeout: Duration,
    /// Prefix each line a function prints with `[namespace/name] `.
    #[arg(long)]
    prefix_output: bool,
    /// Where events are kept: `embedded` (a durable log in the data directory: 202 only once an
    /// event is on disk), `memory` (faster, lost on a crash), or `nats://HOST:PORT` (NATS
    /// JetStream: several replicas share the work and the control state).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// With `--store nats://`: a NATS credentials (.creds) file.
    #[arg(long, value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// With `--store nats://`: a PEM CA certificate to trust (TLS is then required).
    #[arg(long, value_name = "FILE")]
    nats_ca: Option<PathBuf>,
    /// With `--store nats://`: copies JetStream keeps of each stream and bucket (3 on a
    /// three-node NATS cluster).
    #[arg(long, default_value_t = 1)]
    nats_replicas: usize,
    /// Most events the log holds before ingress answers 429.
    #[arg(long, default_value_t = 1_000_000)]
    log_capacity: u64,
    /// Most bytes of events the log holds before ingress answers 429.
    #[arg(long, default_value_t = 1 << 30)]
    log_max_bytes: u64,
    /// The kubeconfig for ApiServerSources (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Events older than this are dropped from the log even if undelivered (e.g. 7d, 12h, 30m).
    #[arg(long, default_value = "7d", value_parser = parse_age)]
    retention: Duration,
    /// On SIGTERM or Ctrl-C, how long queued and in-flight deliveries may take to finish (with
    /// `--store memory`, what is still queued after it is lost; the other stores keep it).
    #[arg(long, default_value = "5s", value_parser = parse_age)]
    shutdown_grace: Duration,
    /// How long an uploaded or rebuilt module that nothing names any more (no Function, no
    /// kept revision) stays stored, counted from its last upload or build, before it is
    /// removed from the data directory and, over NATS, from the replicas' shared store. An
    /// upload waits that long for the apply that names it.
    #[arg(long, default_value = "1h", value_parser = parse_age)]
    module_grace: Duration,
    /// Apply changes to the files while running; a change that does not parse or build is
    /// reported and leaves the running state as it was.
    #[arg(long)]
    watch: bool,
    /// Where the admin API listens (`off` for none). Default 127.0.0.1:8081, or a free port
    /// when that one is taken (another server on this machine); the address is printed.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Where to serve the data plane's counters (`GET /metrics`, Prometheus text) without a
    /// token, for a scraper (the admin API serves them too, with its token). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// The admin API's bearer token (default: generated into <data-dir>/admin-token, mode 0600).
    #[arg(long, env = "WASMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A PEM certificate (chain) for the admin API: it then speaks HTTPS only.
    #[arg(long, value_name = "FILE", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// The PEM private key of --admin-tls-cert.
    #[arg(long, value_name = "FILE", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Largest module the admin API accepts, in bytes (413 above it).
    #[arg(long, default_value_t = 32 << 20)]
    max_module_bytes: usize,
}

/// Where the admin API listens unless told.
const DEFAULT_ADMIN: &str = "127.0.0.1:8081";

fn parse_age(s: &str) -> Result<Duration, String> {
    let (num, mult) = match s.chars().last() {
        Some('d') => (&s[..s.len() - 1], 86_400),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('s') => (&s[..s.len() - 1], 1),
        _ => return Err(format!("`{s}`: use a number and d, h, m or s (e.g. 7d)")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .map(Duration::from_secs)
        .filter(|d| *d <= wasmesh_core::duration::LONGEST)
        .ok_or_else(|| format!("`{s}`: use a number and d, h, m or s (e.g. 7d), at most 292 years"))
}

/// A duration as [`parse_age`] reads it, longer than zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_age(s)?;
    if d.is_zero() {
        return Err(format!("`{s}`: must be longer than zero"));
    }
    Ok(d)
}

/// The YAML files the paths name: files as given, directories' *.yaml and *.yml in name order.
pub(crate) fn yaml_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// Reads every declaration file; all errors of all files are reported together.
pub(crate) fn load(paths: &[PathBuf]) -> anyhow::Result<Result<Vec<Located>, YamlErrors>> {
    let mut files = yaml_files(paths)?;
    // A file named twice (`-f a.yaml -f a.yaml`, a file and its directory) is read once.
    let mut read = std::collections::HashSet::new();
    files.retain(|f| read.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let text = read_declarations(&f)?;
        match wasmesh_core::yaml::parse_documents(&display(&f), &text) {
            Ok(docs) => all.extend(docs),
            Err(YamlErrors(e)) => errors.extend(e),
        }
    }
    Ok(if errors.is_empty() {
        Ok(last_declarations(all))
    } else {
        Err(YamlErrors(errors))
    })
}

/// An object declared more than once keeps its last declaration, as `kubectl apply` of the same
/// files would leave it, and a warning names both places.
fn last_declarations(all: Vec<Located>) -> Vec<Located> {
    let mut last: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, l) in all.iter().enumerate() {
        if matches!(
            l.resource,
            wasmesh_core::resources::Resource::Ignored { .. }
        ) {
            continue;
        }
        if let Some(before) = last.insert(l.resource.id(), i) {
            let b = &all[before];
            tracing::warn!(
                "{} is declared twice ({}:{} and {}:{}); the last declaration counts",
                l.resource.id(),
                b.file,
                b.line,
                l.file,
                l.line
            );
        }
    }
    all.into_iter()
        .enumerate()
        .filter(|(i, l)| {
            matches!(
                l.resource,
                wasmesh_core::resources::Resource::Ignored { .. }
            ) || last.get(&l.resource.id()) == Some(i)
        })
        .map(|(_, l)| l)
        .collect()
}

fn display(p: &Path) -> String {
    if p == Path::new("-") {
        return "<stdin>".into();
    }
    p.display().to_string()
}

/// The text of a declaration file; `-` is standard input (as for kubectl's `-f -`), read once
/// however often it is asked for.
pub(crate) fn read_declarations(f: &Path) -> anyhow::Result<String> {
    if f == Path::new("-") {
        static STDIN: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
        return STDIN
            .get_or_init(|| {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map(|_| text)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| anyhow::anyhow!("cannot read standard input: {e}"));
    }
    std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
}

pub(crate) fn builtins() -> wasmesh_control::Builtins {
    wasmesh_plugins::BUILTINS
        .iter()
        .map(|(n, b)| (n.to_string(), *b))
        .collect()
}

pub(crate) fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = &args.advertise_url {
        advertised(url)?;
    }
    // Taken before the files are read, so that `--watch` sees an edit made from then on (and
    // the modules' before the controller reads them).
    let files_seen = fingerprint(&args.files);
    let resources = match load(&args.files)? {
        Ok(r) => r,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    let seen = Watched::new(files_seen, &resources);
    if resources.is_empty() {
        // A wrong directory, or files with another extension: say so rather than sit idle.
        let named: Vec<String> = args.files.iter().map(|p| p.display().to_string()).collect();
        tracing::warn!(
            "nothing is declared in {}: no object in a .yaml or .yml file there (objects can \
             still be applied through the admin API)",
            named.join(", ")
        );
    }
    if args.data_dir.exists() && !args.data_dir.is_dir() {
        anyhow::bail!(
            "--data-dir {}: is a file, not a directory",
            args.data_dir.display()
        );
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmesh")
        .build()?;
    runtime.block_on(run(args, resources, seen))
}

/// `--advertise-url`, checked: an http or https URL with a host, without its trailing `/`.
fn advertised(url: &str) -> anyhow::Result<String> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("--advertise-url `{url}`: not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        anyhow::bail!("--advertise-url `{url}`: an http or https URL with a host is needed");
    }
    Ok(url.trim_end_matches('/').to_string())
}

async fn run(args: ServeArgs, resources: Vec<Located>, seen: Watched) -> anyhow::Result<ExitCode> {
    let engine = PluginEngine::new(EngineConfig::with_data_dir(&args.data_dir))
        .map_err(|e| anyhow::anyhow!("cannot start the Wasm engine: {e:#}"))?;
    let log = match args.store.as_str() {
        "embedded" => Some(
            DurableLog::open(
                &args.data_dir,
                LogConfig {
                    max_events: args.log_capacity,
                    max_bytes: args.log_max_bytes,
                    max_age: args.retention,
                },
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the event log in {}: {e}",
                    args.data_dir.display()
                )
            })?,
        ),
        "memory" => None,
        url if url.starts_with("nats://") || url.starts_with("tls://") => None,
        other => anyhow::bail!("--store `{other}`: use `embedded`, `memory` or nats://HOST:PORT"),
    };
    let nats = if args.store.starts_with("nats://") || args.store.starts_with("tls://") {
        let store = NatsStore::connect(NatsConfig {
            url: args.store.clone(),
            credentials: args.nats_creds.clone(),
            ca: args.nats_ca.clone(),
            max_age: args.retention,
            max_bytes: i64::try_from(args.log_max_bytes).unwrap_or(-1),
            replicas: args.nats_replicas,
        })
        .await
        .map_err(|e| anyhow::anyhow!("--store {}: {e}", args.store))?;
        Some(store)
    } else {
        None
    };
    let shared = match &nats {
        Some(n) => Some(
            wasmesh_control::shared::Shared::open(n, args.nats_replicas)
                .await
                .map_err(|e| {
                    if n.is_connected() {
                        anyhow::anyhow!("--store {}: {e}", args.store)
                    } else {
                        // The client connects in the background: the first request is what
                        // times out when nothing answers at that address.
                        anyhow::anyhow!(
                            "--store {}: no NATS server could be reached there (is nats-server \
                             running, with JetStream on: `nats-server -js`?): {e}",
                            args.store
                        )
                    }
                })?,
        ),
        None => None,
    };
    let book = LogBook::new(1000);
    let mesh = Mesh::new(MeshConfig {
        queue_capacity: args.queue,
        concurrency: args.concurrency,
        output: FunctionOutput {
            prefix: args.prefix_output,
            sink: None,
            book: Some(Arc::clone(&book)),
        },
        log,
        nats: nats.clone(),
        http_timeout: args.delivery_timeout,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let ingress_url = match &args.advertise_url {
        Some(url) => advertised(url)?,
        None => format!("http://{addr}"),
    };
    let controller = Controller::new(
        engine,
        builtins(),
        mesh,
        ControlConfig {
            data_dir: Some(args.data_dir.clone()),
            kubeconfig: args.kubeconfig.clone(),
            shared,
            ingress_url: Some(ingress_url),
            module_grace: Some(args.module_grace),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    for s in controller.start(resources).await {
        if s.ready {
            tracing::info!("{s}");
        } else {
            tracing::warn!("{s}");
        }
    }
    let mesh = Arc::clone(controller.mesh());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    controller.follow_shared(stop_rx.clone());
    controller.keep_rollbacks(stop_rx.clone());
    let mut tasks = Vec::new();
    if args.admin_listen.as_deref() != Some("off") {
        let given = args.admin_listen.as_deref();
        let admin_addr: SocketAddr = given
            .unwrap_or(DEFAULT_ADMIN)
            .parse()
            .with_context(|| format!("--admin-listen `{}`: not an address", given.unwrap_or("")))?;
        let (token, token_file) = admin::admin_token(args.admin_token.clone(), &args.data_dir)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let tls = match (&args.admin_tls_cert, &args.admin_tls_key) {
            (Some(cert), Some(key)) => {
                Some(admin::tls_config(cert, key).map_err(|e| anyhow::anyhow!("{e}"))?)
            }
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let admin_listener = match tokio::net::TcpListener::bind(admin_addr).await {
            Ok(l) => l,
            // The default port is taken (another wasmesh here): any free one rather than
            // refusing to start; the line below says which.
            Err(e) if given.is_none() => {
                tracing::warn!(
                    "the admin API's default {admin_addr} is taken ({e}); using a free port"
                );
                tokio::net::TcpListener::bind("127.0.0.1:0").await?
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot listen on {admin_addr} (--admin-listen)"));
            }
        };
        let bound = admin_listener.local_addr()?;
        match &token_file {
            Some(f) => eprintln!(
                "wasmesh: admin API listening on {scheme}://{bound} (token in {})",
                f.display()
            ),
            None => eprintln!("wasmesh: admin API listening on {scheme}://{bound}"),
        }
        tasks.push(tokio::spawn(admin::serve(
            admin_listener,
            Arc::clone(&controller),
            admin::AdminConfig {
                token,
                max_module_bytes: args.max_module_bytes,
                max_body_bytes: args.max_body,
                tls,
                book: Some(book),
            },
            stop_rx.clone(),
        )));
    }
    if let Some(at) = args.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("cannot listen on {at} (--metrics-listen)"))?;
        eprintln!(
            "wasmesh: metrics at http://{}/metrics",
            metrics_listener.local_addr()?
        );
        tasks.push(tokio::spawn(wasmesh_broker::ingress::serve_metrics(
            metrics_listener,
            Arc::clone(&mesh),
            stop_rx.clone(),
        )));
    }
    // Last: tests and scripts wait for this line, and read the admin address before it.
    eprintln!("wasmesh: ingress listening on http://{addr}");
    for key in mesh.brokers() {
        eprintln!(
            "wasmesh: Broker {key} ready at http://{addr}/{}/{}",
            key.namespace, key.name
        );
    }
    if args.watch {
        tasks.push(tokio::spawn(watch_files(
            args.files.clone(),
            seen,
            Arc::clone(&controller),
            stop_rx.clone(),
        )));
    }
    let server = tokio::spawn(wasmesh_broker::serve(
        listener,
        Arc::clone(&mesh),
        IngressConfig {
            max_body_bytes: args.max_body,
            read_timeout: args.read_timeout,
        },
        stop_rx,
    ));
    shutdown_signal().await;
    eprintln!("wasmesh: shutting down");
    // A second Ctrl-C or SIGTERM does not wait for the drain: what was accepted and not yet
    // delivered stays in the durable store, as after a crash (with --store memory it is lost).
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("wasmesh: stopping now, without waiting for deliveries in flight");
        std::process::exit(130);
    });
    let _ = stop_tx.send(true);
    controller.stop_sources(args.shutdown_grace).await;
    let _ = server.await;
    for t in tasks {
        let _ = t.await;
    }
    mesh.shutdown(args.shutdown_grace).await;
    if let Some(log) = mesh.log() {
        log.checkpoint().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// What the watched paths look like now: every file's path, length and modification time.
type Fingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

/// What `--watch` looks at: the declaration files, and the module files their Functions name
/// by path, so that a module rebuilt in place (`cargo build` of a plugin) goes live.
struct Watched {
    files: Fingerprint,
    modules: Vec<PathBuf>,
    modules_seen: Fingerprint,
}

impl Watched {
    fn new(files: Fingerprint, resources: &[Located]) -> Self {
        let modules: Vec<PathBuf> = resources
            .iter()
            .filter_map(wasmesh_control::module_file)
            .collect();
        let modules_seen = fingerprint(&modules);
        Self {
            files,
            modules,
            modules_seen,
        }
    }
}

/// Only the files that are read count: in a directory, its *.yaml and *.yml (a data directory
/// inside it, whose entries come and go, is not a change of the declarations).
fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    // A path that cannot be listed (gone) counts as itself, missing.
    let files = yaml_files(paths).unwrap_or_else(|_| paths.to_vec());
    let mut out: Fingerprint = files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            (f, len, meta.and_then(|m| m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// The objects that are not ready, by id, as reported.
async fn not_ready(controller: &Controller) -> std::collections::BTreeMap<String, String> {
    controller
        .statuses()
        .await
        .into_iter()
        .filter(|s| !s.ready)
        .map(|s| (s.id.clone(), s.to_string()))
        .collect()
}

/// `--watch`: looks at the files twice a second; on a change, reads them all and hands them to
/// the reconciler. Errors are reported and the running state stays as it was. Of the objects'
/// conditions, what changed is reported: an object that is not ready is said once, not again
/// at every edit, and when it becomes ready.
async fn watch_files(
    paths: Vec<PathBuf>,
    mut last: Watched,
    controller: Arc<Controller>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut reported = not_ready(&controller).await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
        let files = fingerprint(&paths);
        let modules = fingerprint(&last.modules);
        if files == last.files && modules == last.modules_seen {
            continue;
        }
        last.files = files.clone();
        last.modules_seen = modules;
        let resources = match load(&paths) {
            Ok(Ok(r)) => r,
            Ok(Err(errors)) => {
                eprintln!(
                    "wasmesh: --watch: the files have errors; the running state is unchanged:\n{errors}"
                );
                continue;
            }
            Err(e) => {
                eprintln!("wasmesh: --watch: {e:#}; the running state is unchanged");
                continue;
            }
        };
        // The modules the files name now, looked at before the controller reads them.
        last = Watched::new(files, &resources);
        match controller.set_files(resources).await {
            Ok(changes) => {
                for c in changes.iter().filter(|c| c.action != "unchanged") {
                    eprintln!("wasmesh: --watch: {} {}", c.id, c.action);
                }
                let now = not_ready(&controller).await;
                for (id, line) in &now {
                    if reported.get(id) != Some(line) {
                        eprintln!("wasmesh: --watch: {line}");
                    }
                }
                for s in controller.statuses().await {
                    if s.ready && reported.contains_key(&s.id) {
                        eprintln!("wasmesh: --watch: {s}");
                    }
                }
                reported = now;
            }
            Err(e) => eprintln!("wasmesh: --watch: {e}; the running state is unchanged"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
