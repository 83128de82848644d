//! The one reconcile path. Start-up, `serve --watch` and the admin API all hand the controller
//! the objects they want; it diffs them against what runs, builds the new parts first (a module
//! that does not load refuses the whole change, and nothing running is touched), then swaps
//! them in: a changed Function's slot to its new version, a changed Trigger's spec in place,
//! a changed source restarted. Each object ends with a status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use wasmesh_broker::{BrokerKey, FunctionSlot, Mesh, RolloutPolicy, Sink, Version};
use wasmesh_core::resources::{BrokerSpec, FunctionSpec, Object, Resource};
use wasmesh_core::yaml::Located;
use wasmesh_runtime::{PluginEngine, PluginKind};

use crate::shared::Shared;
use crate::store::{ModuleStore, Overlay, Revision, trim_history};
use crate::{Builtins, Status};

mod resolve;
mod sources;
mod status;

use resolve::{resolve_sink, resolve_trigger, settings};
use sources::stop_source;
use status::{kind_name, kinds_of, ordered_statuses, status_of, view};

/// The file name objects applied through the admin API carry in statuses and errors.
pub const API_FILE: &str = "admin-api";

/// How long an uploaded module no revision names is kept: the apply that names it follows the
/// upload (`wasmesh push` does both), and this is long enough for a person doing it by hand.
const UNNAMED_MODULE_GRACE: Duration = Duration::from_secs(3600);

/// Why a change was refused; nothing running changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The request itself is wrong (YAML, an unknown object, a path module over the API).
    #[error("{0}")]
    Invalid(String),
    /// A part could not be built (a module that does not load).
    #[error("{id}: {message}")]
    Build { id: String, message: String },
    /// The data directory could not record the change.
    #[error("cannot record the change: {0}")]
    Storage(String),
}

/// What a change did to one object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub id: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: &'static str,
}

/// Where the controller keeps things.
#[derive(Clone, Default)]
pub struct ControlConfig {
    /// Uploaded modules, the admin API's changes and revisions live here; `None` keeps them in
    /// memory only.
    pub data_dir: Option<PathBuf>,
    /// For ApiServerSources (otherwise KUBECONFIG, ~/.kube/config or in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Replicas over NATS: the admin API's changes, modules, source leases and source state
    /// live there instead of the data directory.
    pub shared: Option<Arc<Shared>>,
    /// Where clients reach ingress (`http://127.0.0.1:8080`): each Broker's
    /// `status.address.url` is it and the Broker's path.
    pub ingress_url: Option<String>,
    /// How long a stored module that nothing names is kept (an upload waits that long for the
    /// apply that names it); `None`: an hour.
    pub module_grace: Option<Duration>,
}

struct FunctionRun {
    fingerprint: String,
    slot: Arc<FunctionSlot>,
    kind: PluginKind,
}

struct SourceRun {
    fingerprint: String,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    files: Vec<Located>,
    overlay: Overlay,
    /// The shared overlay's revision this replica runs (replicas over NATS).
    overlay_revision: u64,
    desired: Vec<Located>,
    functions: BTreeMap<String, FunctionRun>,
    brokers: BTreeMap<BrokerKey, BrokerSpec>,
    triggers: BTreeSet<(String, String)>,
    sources: BTreeMap<String, SourceRun>,
    statuses: BTreeMap<String, Status>,
}

type Problem = (&'static str, String);

/// A Function's version ready to go live.
struct Built {
    key: String,
    function: wasmesh_runtime::Function,
    hex: String,
    module: String,
    fingerprint: String,
    rollout: Option<RolloutPolicy>,
}

/// Desired state in, running parts out.
pub struct Controller {
    engine: PluginEngine,
    builtins: Builtins,
    mesh: Arc<Mesh>,
    config: ControlConfig,
    modules: Option<ModuleStore>,
    state: Mutex<State>,
}

fn function_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn problem_err(id: &str, (_, message): Problem) -> ApplyError {
    ApplyError::Build {
        id: id.to_string(),
        message,
    }
}

impl Controller {
    /// A controller with nothing running yet; it reads what the admin API left in the data
    /// directory.
    pub fn new(
        engine: PluginEngine,
        builtins: Builtins,
        mesh: Arc<Mesh>,
        config: ControlConfig,
    ) -> Result<Arc<Self>, String> {
        let overlay = match &config.data_dir {
            Some(d) => Overlay::load(d)?,
            None => Overlay::default(),
        };
        let modules = config.data_dir.as_deref().map(ModuleStore::new);
        Ok(Arc::new(Self {
            engine,
            builtins,
            mesh,
            config,
            modules,
            state: Mutex::new(State {
                overlay,
                ..State::default()
            }),
        }))
    }

    /// The data plane.
    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    /// The module store (with a data directory).
    pub fn modules(&self) -> Option<&ModuleStore> {
        self.modules.as_ref()
    }

    /// Keeps an uploaded module where every replica finds it (over NATS).
    pub async fn share_module(&self, hex: &str, bytes: &[u8]) -> Result<(), String> {
        match &self.config.shared {
            Some(shared) => {
                let grace = self.config.module_grace.unwrap_or(UNNAMED_MODULE_GRACE);
                shared.put_module(hex, bytes, Some(grace / 2)).await
            }
            None => Ok(()),
        }
    }

    /// The engine that validates uploads.
    pub fn engine(&self) -> &PluginEngine {
        &self.engine
    }

    /// Start-up: brings up what the files (and earlier API changes) declare. An object that
    /// cannot run gets a not-ready status and never stops the others.
    pub async fn start(&self, files: Vec<Located>) -> Vec<Status> {
        let mut st = self.state.lock().await;
        st.files = files;
        if let Some(shared) = &self.config.shared {
            match shared.load_overlay().await {
                Ok((overlay, revision)) => {
                    st.overlay = overlay;
                    st.overlay_revision = revision;
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
        let desired = merge(&st.files, &st.overlay);
        let desired = match desired {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("the admin API's saved changes cannot be read back: {e}");
                st.files.clone()
            }
        };
        // Lenient: never fails.
        let _ = self.reconcile(&mut st, desired, false).await;
        self.mesh.collect_garbage();
        ordered_statuses(&st)
    }

    /// `serve --watch`: the files changed. A change that does not build leaves everything
    /// running as it was.
    pub async fn set_files(&self, files: Vec<Located>) -> Result<Vec<Change>, ApplyError> {
        let mut st = self.state.lock().await;
        let desired = merge(&files, &st.overlay).map_err(ApplyError::Invalid)?;
        let changes = self.reconcile(&mut st, desired, true).await?;
        st.files = files;
        Ok(changes)
    }

    /// The admin API: applies objects (as `kubectl apply` does: created or configured).
    pub async fn apply(&self, objects: Vec<Located>) -> Result<Vec<Change>, ApplyError> {
        let mut st = self.state.lock().await;
        let mut overlay = st.overlay.clone();
        for loc in &objects {
            if let Resource::Function(f) = &loc.resource
                && !(f.spec.module.starts_with("sha256:") || f.spec.module.starts_with("builtin:"))
            {
                return Err(ApplyError::Invalid(format!(
                    "{}: spec.module `{}`: over the admin API a module is `sha256:<digest>` of an uploaded module or `builtin:<name>` (upload with `wasmesh push function NAME FILE.wasm`; `wasmesh apply -f` uploads path modules for you)",
                    loc.resource.id(),
                    f.spec.module
                )));
            }
            let Some(json) = loc.resource.to_json() else {
                continue;
            };
            let id = loc.resource.id();
            overlay.deleted.retain(|d| *d != id);
            overlay.applied.insert(id, json);
        }
        let asked: Vec<String> = objects.iter().map(|l| l.resource.id()).collect();
        let changes = self.commit(&mut st, overlay).await?;
        Ok(only_asked(changes, &asked))
    }

    /// The admin API: deletes objects by `Kind/namespace/name`.
    pub async fn delete(&self, ids: Vec<String>) -> Result<Vec<Change>, ApplyError> {
        let mut st = self.state.lock().await;
        let mut overlay = st.overlay.clone();
        for id in &ids {
            if !st.desired.iter().any(|l| l.resource.id() == *id) {
                return Err(ApplyError::Invalid(format!("{id} does not exist")));
            }
            overlay.applied.remove(id);
            if !overlay.deleted.contains(id) {
                overlay.deleted.push(id.clone());
            }
        }
        let deleted_triggers: Vec<(BrokerKey, String)> = st
            .desired
            .iter()
            .filter(|l| ids.contains(&l.resource.id()))
            .filter_map(|l| match &l.resource {
                Resource::Trigger(t) => Some((
                    BrokerKey::new(t.metadata.namespace(), &t.spec.broker),
                    t.metadata.name.clone(),
                )),
                _ => None,
            })
            .collect();
        let changes = self.commit(&mut st, overlay).await?;
        self.mesh.collect_garbage();
        // Deleted for good: what the store still keeps for them goes too (JetStream keeps an
        // event until every trigger's consumer has acknowledged it).
        for (broker, trigger) in deleted_triggers {
            self.mesh.forget_trigger(&broker, &trigger).await;
        }
        Ok(only_asked(changes, &ids))
    }

    /// `rollout undo`: makes an earlier revision of a Function live again, as a new revision.
    /// Without `to`, the revision before the latest one.
    pub async fn undo(
        &self,
        namespace: &str,
        name: &str,
        to: Option<u32>,
    ) -> Result<Vec<Change>, ApplyError> {
        let mut st = self.state.lock().await;
        let id = format!("Function/{namespace}/{name}");
        let Some(loc) = st.desired.iter().find(|l| l.resource.id() == id).cloned() else {
            return Err(ApplyError::Invalid(format!("{id} does not exist")));
        };
        let Resource::Function(mut f) = loc.resource else {
            return Err(ApplyError::Invalid(format!("{id} is not a Function")));
        };
        let history = st.overlay.history.get(&id).cloned().unwrap_or_default();
        let target = match to {
            Some(n) => history.iter().find(|r| r.revision == n),
            None => history.iter().rev().nth(1),
        };
        let Some(target) = target else {
            return Err(ApplyError::Invalid(match to {
                Some(n) => format!("{id} has no revision {n}"),
                None => format!("{id} has no earlier revision to go back to"),
            }));
        };
        f.spec.module = target.digest.clone();
        let mut overlay = st.overlay.clone();
        overlay.deleted.retain(|d| *d != id);
        if let Some(json) = Resource::Function(f).to_json() {
            overlay.applied.insert(id.clone(), json);
        }
        let changes = self.commit(&mut st, overlay).await?;
        Ok(only_asked(changes, &[id]))
    }

    async fn commit(&self, st: &mut State, overlay: Overlay) -> Result<Vec<Change>, ApplyError> {
        let mut overlay = overlay;
        // Over NATS another replica may have changed the state since: then take its state,
        // put this change on top, and go again.
        for _ in 0..8 {
            let base = st.overlay.clone();
            let desired = merge(&st.files, &overlay).map_err(ApplyError::Invalid)?;
            let before = std::mem::replace(&mut st.overlay, overlay.clone());
            let changes = match self.reconcile(st, desired, true).await {
                Ok(c) => c,
                Err(e) => {
                    st.overlay = before;
                    return Err(e);
                }
            };
            let Some(shared) = &self.config.shared else {
                if let Some(dir) = &self.config.data_dir
                    && let Err(e) = st.overlay.save(dir)
                {
                    tracing::error!(error = %e, "cannot save the admin API's changes");
                    return Err(ApplyError::Storage(e.to_string()));
                }
                return Ok(changes);
            };
            match shared
                .save_overlay(&st.overlay, st.overlay_revision)
                .await
                .map_err(ApplyError::Storage)?
            {
                Ok(revision) => {
                    st.overlay_revision = revision;
                    return Ok(changes);
                }
                Err(_conflict) => {
                    let (latest, revision) =
                        shared.load_overlay().await.map_err(ApplyError::Storage)?;
                    overlay = rebase(&base, &st.overlay, latest);
                    st.overlay_revision = revision;
                }
            }
        }
        Err(ApplyError::Storage(
            "the shared control state kept changing under this change; try again".into(),
        ))
    }

    /// Makes automatic rollbacks stick: a Function whose new version failed its rollout runs
    /// the version before it, and this turns that into the declared state (an automatic
    /// `rollout undo`, with the failed revision marked), so that a restart or another replica
    /// does not bring the failed version back. Looks twice a second until `stop`.
    pub fn keep_rollbacks(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => return,
                }
                let mut st = this.state.lock().await;
                let rolled: Vec<(String, String, String)> = st
                    .functions
                    .iter()
                    .filter_map(|(key, run)| {
                        let note = run.slot.note().filter(|n| n.contains("rolled back"))?;
                        let id = format!("Function/{key}");
                        let declared = st.overlay.history.get(&id)?.last()?.digest.clone();
                        let live = run.slot.live().digest.clone();
                        (declared != live).then_some((id, live, note))
                    })
                    .collect();
                for (id, live, note) in rolled {
                    let Some(loc) = st.desired.iter().find(|l| l.resource.id() == id).cloned()
                    else {
                        continue;
                    };
                    let Resource::Function(mut f) = loc.resource else {
                        continue;
                    };
                    f.spec.module = live;
                    let mut overlay = st.overlay.clone();
                    if let Some(last) = overlay.history.get_mut(&id).and_then(|h| h.last_mut()) {
                        last.rolled_back = Some(note);
                    }
                    overlay.deleted.retain(|d| *d != id);
                    if let Some(json) = Resource::Function(f).to_json() {
                        overlay.applied.insert(id.clone(), json);
                    }
                    match this.commit(&mut st, overlay).await {
                        Ok(_) => {
                            tracing::info!(function = %id, "the automatic rollback is now the declared state")
                        }
                        Err(e) => {
                            tracing::error!(function = %id, error = %e, "cannot record the automatic rollback")
                        }
                    }
                }
            }
        });
    }

    /// Over NATS: runs what other replicas apply, as they apply it, until `stop`.
    pub fn follow_shared(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(shared) = self.config.shared.clone() else {
            return;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // Waits a second before trying again after a failure; false once stopped.
            let pause = |mut stop: watch::Receiver<bool>| async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => true,
                    _ = stop.changed() => false,
                }
            };
            loop {
                let mut watch = match shared.watch_overlay().await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch the shared control state; trying again in 1 s");
                        if !pause(stop.clone()).await {
                            return;
                        }
                        continue;
                    }
                };
                // A change saved before the watch started: look once now (and again after a
                // failed read, without waiting for the next change).
                let mut look = true;
                loop {
                    let revision = if std::mem::take(&mut look) {
                        Some(u64::MAX)
                    } else {
                        tokio::select! {
                            r = crate::shared::next_revision(&mut watch) => r,
                            _ = stop.changed() => return,
                        }
                    };
                    let Some(revision) = revision else {
                        tracing::warn!(
                            "the watch of the shared control state ended; watching again in 1 s"
                        );
                        if !pause(stop.clone()).await {
                            return;
                        }
                        break;
                    };
                    let mut st = this.state.lock().await;
                    if revision <= st.overlay_revision {
                        continue;
                    }
                    let (overlay, revision) = match shared.load_overlay().await {
                        Ok(o) => o,
                        Err(e) => {
                            drop(st);
                            tracing::error!("{e}; trying again in 1 s");
                            if !pause(stop.clone()).await {
                                return;
                            }
                            look = true;
                            continue;
                        }
                    };
                    if revision <= st.overlay_revision {
                        continue;
                    }
                    st.overlay = overlay;
                    st.overlay_revision = revision;
                    match merge(&st.files, &st.overlay) {
                        Ok(desired) => {
                            // Another replica validated it: what cannot run here becomes a status.
                            let _ = this.reconcile(&mut st, desired, false).await;
                            tracing::info!(revision, "applied a change made on another replica");
                        }
                        Err(e) => tracing::error!("the shared control state cannot be read: {e}"),
                    }
                }
            }
        });
    }

    /// Every object's status, in declaration order.
    pub async fn statuses(&self) -> Vec<Status> {
        ordered_statuses(&*self.state.lock().await)
    }

    /// The objects of one kind (`brokers`, `triggers`, `functions`, `sources`), each as JSON
    /// with a Knative-style `status`.
    pub async fn list(&self, kind: &str) -> Result<Vec<serde_json::Value>, String> {
        self.find(kind, |_| true).await
    }

    async fn find(
        &self,
        kind: &str,
        pick: impl Fn(&Located) -> bool,
    ) -> Result<Vec<serde_json::Value>, String> {
        let kinds = kinds_of(kind)?;
        let st = self.state.lock().await;
        Ok(st
            .desired
            .iter()
            .filter(|l| kinds.contains(&kind_name(&l.resource)) && pick(l))
            .filter_map(|l| view(&st, &self.mesh, self.config.ingress_url.as_deref(), l))
            .collect())
    }

    /// One object, with its status (and a Function's revisions).
    pub async fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, String> {
        let suffix = format!("/{namespace}/{name}");
        let found = self
            .find(kind, |l| l.resource.id().ends_with(&suffix))
            .await?;
        Ok(found.into_iter().next())
    }

    /// A Function's revisions, oldest first, and the live one.
    pub async fn revisions(&self, namespace: &str, name: &str) -> Option<(Vec<Revision>, u32)> {
        let st = self.state.lock().await;
        let run = st.functions.get(&function_key(namespace, name))?;
        let id = format!("Function/{namespace}/{name}");
        Some((
            st.overlay.history.get(&id).cloned().unwrap_or_default(),
            run.slot.live().revision,
        ))
    }

    /// True when the Function exists.
    pub async fn has_function(&self, namespace: &str, name: &str) -> bool {
        self.state
            .lock()
            .await
            .functions
            .contains_key(&function_key(namespace, name))
    }

    async fn reconcile(
        &self,
        st: &mut State,
        desired: Vec<Located>,
        strict: bool,
    ) -> Result<Vec<Change>, ApplyError> {
        let desired = with_injected_brokers(desired);
        let mut problems: BTreeMap<String, Problem> = BTreeMap::new();
        // 1. Build: every new or changed Function version, before anything changes.
        let mut built = Vec::new();
        for loc in &desired {
            let Resource::Function(f) = &loc.resource else {
                continue;
            };
            let id = loc.resource.id();
            match self.build_function(st, loc, f).await {
                Ok(Some(b)) => built.push(b),
                Ok(None) => {}
                Err(p) if strict => return Err(problem_err(&id, p)),
                Err(p) => {
                    problems.insert(id, p);
                }
            }
        }
        let old_desired = std::mem::take(&mut st.desired);
        // 2. Swap, dependencies first: functions, brokers, triggers, sources.
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        // Functions whose module changed under a spec that did not (a file rebuilt in place).
        let mut new_modules = BTreeSet::new();
        let any_built = !built.is_empty();
        for b in built {
            let id = format!("Function/{}", b.key);
            let history = st.overlay.history.entry(id).or_default();
            let digest = format!("sha256:{}", b.hex);
            // The newest revision already names this module (a restart, or a change another
            // replica made and recorded): it is that revision, not a new one.
            let revision = match history.last() {
                Some(last) if last.digest == digest => last.revision,
                last => {
                    let revision = last.map_or(1, |r| r.revision + 1);
                    history.push(Revision {
                        revision,
                        digest: digest.clone(),
                        module: b.module,
                        created: now.clone(),
                        rolled_back: None,
                    });
                    trim_history(history);
                    revision
                }
            };
            let kind = b.function.plugin().kind();
            let version = Version::new(Arc::new(b.function), revision, digest);
            match st.functions.get_mut(&b.key) {
                Some(run) => {
                    new_modules.insert(format!("Function/{}", b.key));
                    run.slot.swap(version, b.rollout);
                    run.fingerprint = b.fingerprint;
                    tracing::info!(function = %b.key, revision, "new version live");
                }
                None => {
                    let slot = FunctionSlot::new(&b.key, version);
                    st.functions.insert(
                        b.key,
                        FunctionRun {
                            fingerprint: b.fingerprint,
                            slot,
                            kind,
                        },
                    );
                }
            }
        }
        let wanted_functions: BTreeSet<String> = desired
            .iter()
            .filter_map(|l| match &l.resource {
                Resource::Function(f) => {
                    Some(function_key(f.metadata.namespace(), &f.metadata.name))
                }
                _ => None,
            })
            .collect();
        st.functions.retain(|k, _| wanted_functions.contains(k));
        // A module that no kept revision, spec or running version names any more goes: each
        // build of a plugin rebuilt under --watch is a new module (12-18 MB for JavaScript or
        // Python), kept until then.
        if any_built && let Some(store) = &self.modules {
            let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
            let mut keep = st.overlay.module_digests();
            keep.extend(desired.iter().filter_map(|l| match &l.resource {
                Resource::Function(f) if f.spec.module.starts_with("sha256:") => {
                    Some(hex(&f.spec.module))
                }
                _ => None,
            }));
            keep.extend(
                st.functions
                    .values()
                    .map(|run| hex(&run.slot.live().digest)),
            );
            let grace = self.config.module_grace.unwrap_or(UNNAMED_MODULE_GRACE);
            for gone in store.prune(&keep, grace) {
                tracing::info!(module = %gone, "removed a stored module that nothing names any more");
            }
            if let Some(shared) = &self.config.shared {
                match shared.prune_modules(&keep, grace).await {
                    Ok(removed) => {
                        for gone in removed {
                            tracing::info!(module = %gone, "removed a shared module that nothing names any more");
                        }
                    }
                    Err(e) => tracing::warn!("cannot prune the shared modules: {e}"),
                }
            }
        }

        let mut brokers: BTreeMap<BrokerKey, BrokerSpec> = BTreeMap::new();
        for loc in &desired {
            match &loc.resource {
                Resource::Broker(o) => {
                    brokers.insert(
                        BrokerKey::new(o.metadata.namespace(), &o.metadata.name),
                        o.spec.clone(),
                    );
                }
                other => {
                    if let Some(ns) = crate::injects_default_broker(other) {
                        brokers.entry(BrokerKey::new(ns, "default")).or_default();
                    }
                }
            }
        }
        for key in st.brokers.keys() {
            if !brokers.contains_key(key) {
                self.mesh.remove_broker(key).await;
            }
        }
        for key in brokers.keys() {
            self.mesh.add_broker(key.clone());
        }
        st.brokers = brokers;

        let mut wanted_triggers = BTreeSet::new();
        for loc in &desired {
            let Resource::Trigger(t) = &loc.resource else {
                continue;
            };
            let key = (t.metadata.namespace().to_string(), t.metadata.name.clone());
            wanted_triggers.insert(key.clone());
            let result = match resolve_trigger(st, &self.mesh, t) {
                Ok(spec) => self
                    .mesh
                    .apply_trigger(spec)
                    .await
                    .map(|_| ())
                    .map_err(|e| ("BrokerDoesNotExist", e.to_string())),
                Err(p) => Err(p),
            };
            match result {
                Ok(()) => {
                    st.triggers.insert(key);
                }
                Err(p) => {
                    if st.triggers.remove(&key) {
                        self.mesh.remove_trigger(&key.0, &key.1).await;
                    }
                    problems.insert(loc.resource.id(), p);
                }
            }
        }
        let gone: Vec<_> = st
            .triggers
            .iter()
            .filter(|k| !wanted_triggers.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.mesh.remove_trigger(&ns, &name).await;
            st.triggers.remove(&(ns, name));
        }

        let mut wanted_sources = BTreeSet::new();
        for loc in &desired {
            let (ns, sink_dest) = match &loc.resource {
                Resource::PingSource(p) => (p.metadata.namespace(), &p.spec.sink),
                Resource::ApiServerSource(a) => (a.metadata.namespace(), &a.spec.sink),
                _ => continue,
            };
            let id = loc.resource.id();
            wanted_sources.insert(id.clone());
            let sink = match resolve_sink(st, &self.mesh, ns, sink_dest, "spec.sink") {
                Ok(s) => s,
                Err(p) => {
                    if let Some(old) = st.sources.remove(&id) {
                        stop_source(old).await;
                    }
                    problems.insert(id, p);
                    continue;
                }
            };
            let fingerprint = format!(
                "{}|{}|{:p}",
                loc.resource.to_json().unwrap_or_default(),
                sink.describe(),
                match &sink {
                    Sink::Function(s) => Arc::as_ptr(s).cast::<()>(),
                    _ => std::ptr::null(),
                }
            );
            if st
                .sources
                .get(&id)
                .is_some_and(|s| s.fingerprint == fingerprint)
            {
                continue;
            }
            if let Some(old) = st.sources.remove(&id) {
                stop_source(old).await;
            }
            match self.start_source(&loc.resource, sink).await {
                Ok((stop, handle)) => {
                    st.sources.insert(
                        id,
                        SourceRun {
                            fingerprint,
                            stop,
                            handle,
                        },
                    );
                }
                Err(p) => {
                    problems.insert(id, p);
                }
            }
        }
        let gone: Vec<String> = st
            .sources
            .keys()
            .filter(|k| !wanted_sources.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(old) = st.sources.remove(&id) {
                stop_source(old).await;
            }
        }

        // 3. Statuses and what changed.
        st.statuses.clear();
        for loc in &desired {
            if let Resource::Ignored { kind, name, why } = &loc.resource {
                if !old_desired.iter().any(|l| l.resource == loc.resource) {
                    tracing::info!("{kind}/{name}: accepted and ignored ({why})");
                }
                continue;
            }
            let id = loc.resource.id();
            let result = match problems.remove(&id) {
                Some(p) => Err(p),
                None => Ok(()),
            };
            st.statuses.insert(id.clone(), status_of(st, loc, result));
        }
        let mut changes = Vec::new();
        for loc in &desired {
            if matches!(loc.resource, Resource::Ignored { .. }) {
                continue;
            }
            let id = loc.resource.id();
            let action = match old_desired.iter().find(|l| l.resource.id() == id) {
                None => "created",
                Some(old) if old.resource == loc.resource && !new_modules.contains(&id) => {
                    "unchanged"
                }
                Some(_) => "configured",
            };
            changes.push(Change { id, action });
        }
        for old in &old_desired {
            let id = old.resource.id();
            if !matches!(old.resource, Resource::Ignored { .. })
                && !desired.iter().any(|l| l.resource.id() == id)
            {
                changes.push(Change {
                    id,
                    action: "deleted",
                });
            }
        }
        st.desired = desired;
        Ok(changes)
    }

    /// Loads a Function's module when it is new or changed (`None`: unchanged).
    async fn build_function(
        &self,
        st: &State,
        loc: &Located,
        f: &Object<FunctionSpec>,
    ) -> Result<Option<Built>, Problem> {
        let key = function_key(f.metadata.namespace(), &f.metadata.name);
        let bytes = self.module_bytes(loc, f).await?;
        let hex = wasmesh_runtime::digest(&bytes);
        let mut rest = f.spec.clone();
        rest.module = String::new();
        let fingerprint = format!("{hex}|{}", serde_json::to_string(&rest).unwrap_or_default());
        let existing = st.functions.get(&key);
        if existing.is_some_and(|r| r.fingerprint == fingerprint) {
            return Ok(None);
        }
        let settings = settings(&f.spec);
        let engine = self.engine.clone();
        let name = key.clone();
        let function = tokio::task::spawn_blocking(move || {
            let loaded = wasmesh_runtime::load_function(&engine, &name, &bytes, None, settings);
            (loaded, bytes)
        })
        .await
        .map_err(|e| ("ModuleInvalid", format!("loading aborted: {e}")))?;
        let (function, bytes) = function;
        let function = function.map_err(|e| ("ModuleInvalid", e.to_string()))?;
        if let Some(run) = existing
            && run.kind != function.plugin().kind()
        {
            return Err((
                "WrongWorld",
                format!(
                    "spec.module: the new module implements world `{}`, but this Function runs `{}`; triggers use it as such (delete and re-create it to change its world)",
                    function.plugin().kind(),
                    run.kind
                ),
            ));
        }
        if let Some(store) = &self.modules {
            // Every version is kept by digest, so that `rollout undo` can go back to it.
            store
                .put(&bytes)
                .map_err(|e| ("ModuleNotStored", format!("cannot store the module: {e}")))?;
        }
        if let Some(shared) = &self.config.shared {
            shared
                .put_module(&hex, &bytes, None)
                .await
                .map_err(|e| ("ModuleNotStored", e))?;
        }
        Ok(Some(Built {
            key,
            function,
            hex,
            module: f.spec.module.clone(),
            fingerprint,
            rollout: f.spec.rollout.map(|r| RolloutPolicy {
                window: r.window,
                max_failure_rate: r.max_failure_rate,
            }),
        }))
    }

    async fn module_bytes(
        &self,
        loc: &Located,
        f: &Object<FunctionSpec>,
    ) -> Result<Vec<u8>, Problem> {
        let module = &f.spec.module;
        if let Some(builtin) = module.strip_prefix("builtin:") {
            return self
                .builtins
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
                });
        }
        if module.starts_with("sha256:") {
            let Some(store) = &self.modules else {
                return Err((
                    "ModuleNotFound",
                    "spec.module: uploaded modules need a data directory".into(),
                ));
            };
            let local = store.get(module);
            if local.is_err()
                && let Some(shared) = &self.config.shared
            {
                // Uploaded through another replica: fetch it by digest, keep it here too.
                let hex = module.trim_start_matches("sha256:");
                if let Some(bytes) = shared.get_module(hex).await {
                    let _ = store.put(&bytes);
                    return Ok(bytes);
                }
            }
            return local.map_err(|e| ("ModuleNotFound", format!("spec.module: {e}")));
        }
        let path = module_file(loc).unwrap_or_else(|| Path::new(module).to_path_buf());
        std::fs::read(&path).map_err(|e| {
            (
                "ModuleNotFound",
                format!("spec.module: cannot read {}: {e}", path.display()),
            )
        })
    }
}

/// The file a Function's module is read from, when `spec.module` is a path (relative to the
/// file that declares it), not a digest or a builtin.
pub fn module_file(loc: &Located) -> Option<std::path::PathBuf> {
    let Resource::Function(f) = &loc.resource else {
        return None;
    };
    let module = &f.spec.module;
    if module.starts_with("sha256:") || module.starts_with("builtin:") {
        return None;
    }
    let base = Path::new(&loc.file).parent().unwrap_or(Path::new("."));
    Some(base.join(module))
}

/// `ours` changed `base`; `latest` is what another replica saved since: `latest` with our
/// change on top.
fn rebase(base: &Overlay, ours: &Overlay, mut latest: Overlay) -> Overlay {
    for (id, json) in &ours.applied {
        if base.applied.get(id) != Some(json) {
            latest.applied.insert(id.clone(), json.clone());
        }
    }
    for id in base.applied.keys() {
        if !ours.applied.contains_key(id) {
            latest.applied.remove(id);
        }
    }
    for id in &ours.deleted {
        if !base.deleted.contains(id) && !latest.deleted.contains(id) {
            latest.deleted.push(id.clone());
        }
    }
    for id in &base.deleted {
        if !ours.deleted.contains(id) {
            latest.deleted.retain(|d| d != id);
        }
    }
    for (id, revs) in &ours.history {
        let before = base.history.get(id);
        if before == Some(revs) {
            continue;
        }
        let mine = latest.history.entry(id.clone()).or_default();
        for r in revs {
            let same = |m: &Revision| m.digest == r.digest && m.revision == r.revision;
            if let Some(m) = mine.iter_mut().find(|m| same(m)) {
                // A note ours added to a revision both have (an automatic rollback).
                if r.rolled_back.is_some() {
                    m.rolled_back.clone_from(&r.rolled_back);
                }
            } else if !before.is_some_and(|b| b.iter().any(same)) {
                // Ours alone: a revision made here, after those of `latest`.
                let next = mine.last().map_or(1, |m| m.revision + 1);
                mine.push(Revision {
                    revision: next.max(r.revision),
                    ..r.clone()
                });
            }
            // In `base` but not in `latest`: dropped there as too old; it stays dropped.
        }
        trim_history(mine);
    }
    latest
}

/// The changes to report for a request: what it named, and whatever else changed with it.
fn only_asked(changes: Vec<Change>, asked: &[String]) -> Vec<Change> {
    changes
        .into_iter()
        .filter(|c| c.action != "unchanged" || asked.contains(&c.id))
        .collect()
}

/// The files' objects, with the admin API's changes on top (an applied object replaces the
/// file's of the same id; a deleted one is left out).
fn merge(files: &[Located], overlay: &Overlay) -> Result<Vec<Located>, String> {
    let mut out: Vec<Located> = files
        .iter()
        .filter(|l| {
            let id = l.resource.id();
            !overlay.deleted.contains(&id) && !overlay.applied.contains_key(&id)
        })
        .cloned()
        .collect();
    for json in overlay.applied.values() {
        let text = serde_json::to_string(json).map_err(|e| e.to_string())?;
        let docs =
            wasmesh_core::yaml::parse_documents(API_FILE, &text).map_err(|e| e.to_string())?;
        out.extend(docs);
    }
    Ok(out)
}

/// A Namespace labelled for injection, or a Trigger annotated for it, gets its namespace's
/// `default` Broker, as an object of its own (as Knative creates one), unless one is declared.
fn with_injected_brokers(mut desired: Vec<Located>) -> Vec<Located> {
    let mut injected = Vec::new();
    for loc in &desired {
        let Some(ns) = crate::injects_default_broker(&loc.resource) else {
            continue;
        };
        let id = format!("Broker/{ns}/default");
        if desired
            .iter()
            .chain(&injected)
            .any(|l| l.resource.id() == id)
        {
            continue;
        }
        injected.push(Located {
            file: loc.file.clone(),
            line: loc.line,
            resource: Resource::Broker(Object {
                api_version: "eventing.knative.dev/v1".into(),
                kind: "Broker".into(),
                metadata: wasmesh_core::resources::ObjectMeta {
                    name: "default".into(),
                    namespace: Some(ns.to_string()),
                    ..Default::default()
                },
                spec: BrokerSpec::default(),
                status: None,
            }),
        });
    }
    desired.extend(injected);
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(revision: u32, digest: &str) -> Revision {
        Revision {
            revision,
            digest: digest.into(),
            module: digest.into(),
            created: String::new(),
            rolled_back: None,
        }
    }

    fn history(revs: Vec<Revision>) -> Overlay {
        let mut o = Overlay::default();
        o.history.insert("Function/default/f".into(), revs);
        o
    }

    /// Another replica made two revisions since `base`, and dropped the oldest past ten; ours
    /// made one. The rebase adds ours after theirs, and brings back none of those dropped.
    #[test]
    fn rebasing_histories_adds_our_revisions_and_not_the_dropped_ones() {
        let base: Vec<Revision> = (1..=10).map(|n| rev(n, &format!("d{n}"))).collect();
        let mut ours = base.clone();
        ours.push(rev(11, "ours"));
        trim_history(&mut ours);
        let mut theirs = base.clone();
        theirs.push(rev(11, "a"));
        theirs.push(rev(12, "b"));
        trim_history(&mut theirs);
        let merged = rebase(&history(base), &history(ours), history(theirs));
        let got: Vec<(u32, String)> = merged.history["Function/default/f"]
            .iter()
            .map(|r| (r.revision, r.digest.clone()))
            .collect();
        let mut want: Vec<(u32, String)> = (4..=10).map(|n| (n, format!("d{n}"))).collect();
        want.extend([(11, "a".into()), (12, "b".into()), (13, "ours".into())]);
        assert_eq!(got, want);
    }

    /// A note ours added to a revision both have (an automatic rollback) is kept.
    #[test]
    fn rebasing_histories_keeps_a_rollback_note() {
        let base = vec![rev(1, "a"), rev(2, "b")];
        let mut ours = base.clone();
        ours[1].rolled_back = Some("rolled back: failures".into());
        ours.push(rev(3, "a"));
        let mut theirs = base.clone();
        theirs.push(rev(3, "c"));
        let merged = rebase(&history(base), &history(ours), history(theirs));
        let h = &merged.history["Function/default/f"];
        assert_eq!(h[1].rolled_back.as_deref(), Some("rolled back: failures"));
        let digests: Vec<&str> = h.iter().map(|r| r.digest.as_str()).collect();
        assert_eq!(digests, ["a", "b", "c", "a"]);
        assert_eq!(h[3].revision, 4);
    }
}
