//! The control path: declared resources in, running parts out. Start-up builds everything from
//! nothing; each object gets a status (`Ready`, or not ready with a reason and a message, as
//! Knative's conditions say it), and an object that cannot run never stops the others.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use wasmesh_broker::{BrokerKey, DeliveryPolicy, Mesh, Sink, TriggerSpecRuntime};
use wasmesh_core::filter::Filter;
use wasmesh_core::resources::{
    BrokerSpec, DeliverySpec, Destination, FunctionSpec, IsolationSpec, Object, Resource,
};
use wasmesh_core::yaml::Located;
use wasmesh_core::{Event, event};
use wasmesh_runtime::{Function, FunctionSettings, Isolation, Limits, PluginEngine, PluginKind};
use wasmesh_sources::Emit;
use wasmesh_sources::apiserver::{ApiServerSource, MemorySeen, Seen, SeenStore};
use wasmesh_sources::ping::PingSource;

/// The label that gives a namespace its `default` broker (the seed's injection label).
pub const INJECTION_LABEL: &str = "knative-eventing-injection";

/// The state of one declared object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `Kind/namespace/name`.
    pub id: String,
    /// Where it was declared (`file:line`).
    pub declared_at: String,
    pub ready: bool,
    /// A CamelCase reason, Knative style (`BrokerDoesNotExist`, `ModuleInvalid`, ...).
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ready {
            write!(f, "{}: Ready", self.id)
        } else {
            write!(
                f,
                "{}: not ready ({}): {} [{}]",
                self.id, self.reason, self.message, self.declared_at
            )
        }
    }
}

/// Modules built into the binary, by name (`builtin:<name>`).
pub type Builtins = BTreeMap<String, &'static [u8]>;

/// What `start` brought up.
pub struct Running {
    /// The data plane.
    pub mesh: Arc<Mesh>,
    /// One status per declared object, in declaration order.
    pub statuses: Vec<Status>,
    stop: watch::Sender<bool>,
    sources: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the sources: each finishes the event it is handling (emitted and recorded), up to
    /// `grace`.
    pub async fn stop_sources(&mut self, grace: std::time::Duration) {
        let _ = self.stop.send(true);
        let all = futures_all(std::mem::take(&mut self.sources));
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "sources still busy after {} ms; stopping anyway",
                grace.as_millis()
            );
        }
    }
}

async fn futures_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

struct Builder<'a> {
    engine: &'a PluginEngine,
    builtins: &'a Builtins,
    mesh: Arc<Mesh>,
    functions: HashMap<(String, String), Arc<Function>>,
    brokers: HashMap<BrokerKey, BrokerSpec>,
    statuses: Vec<Status>,
    sources: Vec<tokio::task::JoinHandle<()>>,
}

/// Brings up everything declared: functions, brokers, triggers, sources. `kubeconfig` points
/// ApiServerSources at a cluster (otherwise `KUBECONFIG`, `~/.kube/config` or the in-cluster
/// service account, as kubectl finds them).
pub async fn start(
    engine: &PluginEngine,
    builtins: &Builtins,
    mesh: Arc<Mesh>,
    resources: &[Located],
    kubeconfig: Option<&Path>,
) -> Running {
    let mut b = Builder {
        engine,
        builtins,
        mesh: Arc::clone(&mesh),
        functions: HashMap::new(),
        brokers: HashMap::new(),
        statuses: Vec::new(),
        sources: Vec::new(),
    };
    let (stop, stop_rx) = watch::channel(false);
    // Functions and brokers first: triggers and sources refer to them.
    for loc in resources {
        match &loc.resource {
            Resource::Function(f) => {
                let result = b.function(loc, f);
                b.status(loc, result);
            }
            Resource::Broker(o) => {
                let key = BrokerKey::new(o.metadata.namespace(), &o.metadata.name);
                b.brokers.insert(key.clone(), o.spec.clone());
                mesh.add_broker(key);
                b.status(loc, Ok(()));
            }
            Resource::Namespace(ns) => {
                if ns.metadata.labels.get(INJECTION_LABEL).map(String::as_str) == Some("enabled") {
                    let key = BrokerKey::new(&ns.metadata.name, "default");
                    b.brokers.entry(key.clone()).or_default();
                    mesh.add_broker(key);
                }
                b.status(loc, Ok(()));
            }
            _ => {}
        }
    }
    for loc in resources {
        match &loc.resource {
            Resource::Trigger(t) => {
                let result = b.trigger(t);
                b.status(loc, result);
            }
            Resource::PingSource(p) => {
                let result = b.ping(p, stop_rx.clone());
                b.status(loc, result);
            }
            Resource::ApiServerSource(a) => {
                let result = b.apiserver(a, stop_rx.clone(), kubeconfig).await;
                b.status(loc, result);
            }
            Resource::Ignored { kind, name, why } => {
                tracing::info!("{kind}/{name}: accepted and ignored ({why})");
            }
            _ => {}
        }
    }
    mesh.collect_garbage();
    let mut statuses = b.statuses;
    statuses.sort_by_key(|s| {
        resources
            .iter()
            .position(|l| l.resource.id() == s.id)
            .unwrap_or(usize::MAX)
    });
    Running {
        mesh,
        statuses,
        stop,
        sources: b.sources,
    }
}

type Problem = (&'static str, String);

impl Builder<'_> {
    fn status(&mut self, loc: &Located, result: Result<(), Problem>) {
        let (ready, reason, message) = match result {
            Ok(()) => (true, String::new(), String::new()),
            Err((reason, message)) => (false, reason.to_string(), message),
        };
        self.statuses.push(Status {
            id: loc.resource.id(),
            declared_at: format!("{}:{}", loc.file, loc.line),
            ready,
            reason,
            message,
        });
    }

    fn function(&mut self, loc: &Located, f: &Object<FunctionSpec>) -> Result<(), Problem> {
        let name = &f.metadata.name;
        let module = &f.spec.module;
        let bytes: Vec<u8> = if let Some(builtin) = module.strip_prefix("builtin:") {
            self.builtins
                .get(builtin)
                .map(|b| b.to_vec())
                .ok_or_else(|| {
                    (
                        "ModuleNotFound",
                        format!(
                            "spec.module: no builtin module `{builtin}` (builtins: {})",
                            self.builtins.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?
        } else if module.starts_with("sha256:") {
            return Err(("ModuleNotFound", "spec.module: uploaded modules (sha256:...) need the admin API, which this version does not have yet".into()));
        } else {
            let base = Path::new(&loc.file).parent().unwrap_or(Path::new("."));
            let path = base.join(module);
            std::fs::read(&path).map_err(|e| {
                (
                    "ModuleNotFound",
                    format!("spec.module: cannot read {}: {e}", path.display()),
                )
            })?
        };
        let limits = f.spec.limits.clone().unwrap_or_default();
        let defaults = Limits::default();
        let settings = FunctionSettings {
            config: f.spec.config.clone(),
            limits: Limits {
                memory_bytes: limits.memory.map_or(defaults.memory_bytes, |m| m.bytes()),
                timeout: limits.timeout.map_or(defaults.timeout, |t| t.get()),
            },
            isolation: match f.spec.isolation.unwrap_or_default() {
                IsolationSpec::Warm => Isolation::Warm,
                IsolationSpec::Fresh => Isolation::Fresh,
            },
            max_idle: 16,
        };
        let id = format!("{}/{name}", f.metadata.namespace());
        let func = wasmesh_runtime::load_function(self.engine, &id, &bytes, None, settings)
            .map_err(|e| ("ModuleInvalid", e.to_string()))?;
        self.functions.insert(
            (f.metadata.namespace().to_string(), name.clone()),
            Arc::new(func),
        );
        Ok(())
    }

    fn lookup_function(
        &self,
        ns: &str,
        name: &str,
        kind: PluginKind,
    ) -> Result<Arc<Function>, Problem> {
        let f = self
            .functions
            .get(&(ns.to_string(), name.to_string()))
            .ok_or_else(|| {
                (
                    "FunctionDoesNotExist",
                    format!("Function {ns}/{name} does not exist or is not ready"),
                )
            })?;
        if f.plugin().kind() != kind {
            return Err((
                "WrongWorld",
                format!(
                    "Function {ns}/{name} implements world `{}`, but a `{kind}` is needed",
                    f.plugin().kind()
                ),
            ));
        }
        Ok(Arc::clone(f))
    }

    fn sink(&self, ns: &str, dest: &Destination, field: &str) -> Result<Sink, Problem> {
        if let Some(uri) = &dest.uri {
            let parsed: http::Uri = uri
                .parse()
                .map_err(|e| ("InvalidSink", format!("{field}.uri `{uri}`: {e}")))?;
            if parsed.scheme_str() != Some("http") {
                return Err((
                    "InvalidSink",
                    format!("{field}.uri `{uri}`: only http is supported in this version"),
                ));
            }
            return Ok(Sink::Http(parsed));
        }
        let Some(r) = &dest.reference else {
            return Err(("InvalidSink", format!("{field}: no ref or uri")));
        };
        let ref_ns = r.namespace.as_deref().unwrap_or(ns);
        let group = r.api_version.split('/').next().unwrap_or("");
        match (group, r.kind.as_str()) {
            ("wasmesh.dev", "Function") | ("serving.knative.dev", "Service") => self
                .lookup_function(ref_ns, &r.name, PluginKind::Subscriber)
                .map(Sink::Function),
            ("eventing.knative.dev", "Broker") => {
                let key = BrokerKey::new(ref_ns, &r.name);
                if self.mesh.has_broker(&key) {
                    Ok(Sink::Broker(key))
                } else {
                    Err((
                        "BrokerDoesNotExist",
                        format!("{field}: Broker {key} does not exist"),
                    ))
                }
            }
            (_, kind) => Err((
                "InvalidSink",
                format!(
                    "{field}.ref: kind {kind} ({}) is not a sink wasmesh can run; use a Function, a Knative Service (resolved to the Function of the same name), a Broker or a uri",
                    r.api_version
                ),
            )),
        }
    }

    fn policy(&self, ns: &str, spec: Option<&DeliverySpec>) -> Result<DeliveryPolicy, Problem> {
        let Some(spec) = spec else {
            return Ok(DeliveryPolicy::default());
        };
        let dls = match &spec.dead_letter_sink {
            Some(d) => Some(self.sink(ns, d, "spec.delivery.deadLetterSink")?),
            None => None,
        };
        Ok(DeliveryPolicy::from_spec(spec, dls))
    }

    fn trigger(&mut self, t: &Object<wasmesh_core::resources::TriggerSpec>) -> Result<(), Problem> {
        let ns = t.metadata.namespace();
        let key = BrokerKey::new(ns, &t.spec.broker);
        let Some(broker) = self.brokers.get(&key) else {
            return Err(("BrokerDoesNotExist", format!("Broker {key} does not exist")));
        };
        let subscriber = self.sink(ns, &t.spec.subscriber, "spec.subscriber")?;
        let wasm_filter = match &t.spec.wasm_filter {
            Some(name) => Some(self.lookup_function(ns, name, PluginKind::Filter)?),
            None => None,
        };
        let policy = self.policy(ns, t.spec.delivery.as_ref().or(broker.delivery.as_ref()))?;
        let filter = Filter::for_trigger(
            t.spec.filter.as_ref().map(|f| &f.attributes),
            &t.spec.filters,
        );
        self.mesh
            .add_trigger(TriggerSpecRuntime {
                namespace: ns.to_string(),
                name: t.metadata.name.clone(),
                broker: key,
                filter,
                wasm_filter,
                subscriber,
                policy,
            })
            .map_err(|e| ("BrokerDoesNotExist", e.to_string()))
    }

    fn ping(
        &mut self,
        p: &Object<wasmesh_core::resources::PingSourceSpec>,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Problem> {
        let source = PingSource::new(&p.metadata, &p.spec).map_err(|e| ("InvalidSpec", e))?;
        let sink = self.sink(p.metadata.namespace(), &p.spec.sink, "spec.sink")?;
        let emit: Arc<dyn Emit> = Arc::new(SinkEmit {
            mesh: Arc::clone(&self.mesh),
            sink,
            namespace: p.metadata.namespace().to_string(),
        });
        self.sources.push(tokio::spawn(source.run(emit, stop)));
        Ok(())
    }
}

impl Builder<'_> {
    async fn apiserver(
        &mut self,
        a: &Object<wasmesh_core::resources::ApiServerSourceSpec>,
        stop: watch::Receiver<bool>,
        kubeconfig: Option<&Path>,
    ) -> Result<(), Problem> {
        let sink = self.sink(a.metadata.namespace(), &a.spec.sink, "spec.sink")?;
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| ("NoCluster", format!("--kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| ("NoCluster", format!("--kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| {
                (
                    "NoCluster",
                    format!(
                        "no Kubernetes API server to watch (set KUBECONFIG or --kubeconfig, or run \
                         in a cluster): {e}"
                    ),
                )
            })?,
        };
        let api_server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let client = kube::Client::try_from(config).map_err(|e| {
            (
                "NoCluster",
                format!("cannot build a Kubernetes client: {e}"),
            )
        })?;
        let seen: Arc<dyn SeenStore> = match self.mesh.log() {
            Some(log) => Arc::new(LogSeen(log)),
            None => Arc::new(MemorySeen::default()),
        };
        let emit: Arc<dyn Emit> = Arc::new(SinkEmit {
            mesh: Arc::clone(&self.mesh),
            sink,
            namespace: a.metadata.namespace().to_string(),
        });
        let source = ApiServerSource::new(&a.metadata, &a.spec);
        self.sources.push(tokio::spawn(
            source.run(client, api_server, emit, seen, stop),
        ));
        Ok(())
    }
}

/// The durable log's memory of what sources saw, for the ApiServerSource.
struct LogSeen(Arc<wasmesh_broker::log::DurableLog>);

impl SeenStore for LogSeen {
    fn object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String> {
        self.0.seen_object(source, uid)
    }

    fn load(&self, source: &str) -> Result<Option<HashMap<String, Seen>>, String> {
        Ok(self.0.seen_load(source)?.map(|m| {
            m.into_iter()
                .map(|(uid, (resource_version, object))| {
                    (
                        uid,
                        Seen {
                            resource_version,
                            object,
                        },
                    )
                })
                .collect()
        }))
    }

    fn update(&self, source: &str, changes: Vec<(String, Option<Seen>)>) -> Result<(), String> {
        self.0.seen_update(
            source,
            changes
                .into_iter()
                .map(|(uid, s)| (uid, s.map(|s| (s.resource_version, s.object))))
                .collect(),
        )
    }
}

/// A source's sink: a broker in this process (no HTTP hop), a Function, or an HTTP endpoint.
struct SinkEmit {
    mesh: Arc<Mesh>,
    sink: Sink,
    namespace: String,
}

#[async_trait::async_trait]
impl Emit for SinkEmit {
    async fn emit(&self, ev: Event) -> Result<(), String> {
        event::validate(&ev).map_err(|e| e.to_string())?;
        self.mesh.send_to(&self.sink, &self.namespace, ev).await
    }
}
