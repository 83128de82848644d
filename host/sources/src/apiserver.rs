//! ApiServerSource: watches Kubernetes objects with kube-rs and emits Knative's events.
//!
//! Better than Knative on one point: it keeps what it last saw of each object (uid and
//! resourceVersion, through a [`SeenStore`], durable in the broker's store), so that after a
//! re-list (`410 Gone`, a dropped watch) or a restart it emits add, update and delete for exactly
//! the differences. A brand-new source emits nothing for what already exists, as Knative does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use wasmesh_core::filter::Filter;
use wasmesh_core::resources::{
    ApiServerMode, ApiServerSourceSpec, LabelSelector, ObjectMeta, SelectorOperator,
};
use wasmesh_core::{Event, EventBuilder, EventBuilderV10};

use crate::{Emit, EmitError};

/// What a source last saw of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub resource_version: String,
    /// The object as last seen (JSON), for a delete found on a re-list in Resource mode.
    pub object: Vec<u8>,
}

/// Durable memory of what each source has seen, keyed by source and object uid.
pub trait SeenStore: Send + Sync {
    /// Everything seen by `source`; `None` when the source has never finished a listing.
    fn load(&self, source: &str) -> Result<Option<HashMap<String, Seen>>, String>;
    /// Records changes (`None` removes), and marks the source as having listed.
    fn update(&self, source: &str, changes: Vec<(String, Option<Seen>)>) -> Result<(), String>;
    /// The object last seen with this uid (JSON), for a delete found on a re-list.
    fn object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String>;
}

/// A SeenStore in memory (for `--store memory`): correct within a run, forgotten on restart.
#[derive(Default)]
pub struct MemorySeen(std::sync::Mutex<HashMap<String, HashMap<String, Seen>>>);

impl SeenStore for MemorySeen {
    fn object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String> {
        let all = self.0.lock().map_err(|e| e.to_string())?;
        Ok(all
            .get(source)
            .and_then(|m| m.get(uid))
            .map(|s| s.object.clone()))
    }

    fn load(&self, source: &str) -> Result<Option<HashMap<String, Seen>>, String> {
        Ok(self
            .0
            .lock()
            .map_err(|e| e.to_string())?
            .get(source)
            .cloned())
    }

    fn update(&self, source: &str, changes: Vec<(String, Option<Seen>)>) -> Result<(), String> {
        let mut all = self.0.lock().map_err(|e| e.to_string())?;
        let map = all.entry(source.to_string()).or_default();
        for (uid, seen) in changes {
            match seen {
                Some(s) => map.insert(uid, s),
                None => map.remove(&uid),
            };
        }
        Ok(())
    }
}

/// Where a watch's results go: the sink, and the memory of what was seen.
#[derive(Clone, Copy)]
struct Outputs<'a> {
    emit: &'a Arc<dyn Emit>,
    store: &'a Arc<dyn SeenStore>,
}

/// One ApiServerSource, ready to run.
#[derive(Clone)]
pub struct ApiServerSource {
    namespace: String,
    name: String,
    spec: ApiServerSourceSpec,
    /// `spec.filters`, compiled: events that fail them are not sent.
    filter: Filter,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Add,
    Update,
    Delete,
}

impl Change {
    fn word(self) -> &'static str {
        match self {
            Change::Add => "add",
            Change::Update => "update",
            Change::Delete => "delete",
        }
    }
}

/// `matchLabels` and `matchExpressions` as a Kubernetes label selector string.
pub fn selector_string(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in &s.match_expressions {
        parts.push(match e.operator {
            SelectorOperator::In => format!("{} in ({})", e.key, e.values.join(",")),
            SelectorOperator::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
            SelectorOperator::Exists => e.key.clone(),
            SelectorOperator::DoesNotExist => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

/// Go's JSON encoding of an unstructured object sorts keys: so does this.
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: BTreeMap<String, serde_json::Value> =
                m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

/// Most watch events taken together into one batch.
const WATCH_BATCH: usize = 256;
/// A batch takes the watch events that come less than this apart...
const BATCH_GAP: Duration = Duration::from_millis(1);
/// ...for at most this long after its first one.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Changes seen in the watch events taken together: their events, and what to record as seen
/// once those are accepted.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    seen: Vec<(String, Option<Seen>)>,
}

impl ApiServerSource {
    /// A source from its declaration.
    pub fn new(meta: &ObjectMeta, spec: &ApiServerSourceSpec) -> Self {
        Self {
            namespace: meta.namespace().to_string(),
            name: meta.name.clone(),
            spec: spec.clone(),
            filter: Filter::for_trigger(None, &spec.filters),
        }
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Watches every declared resource until `stop`; errors are retried with backoff and
    /// logged (a 403 names the verb and resource RBAC refused), never fatal.
    /// `api_server` is the URL of the API server, which Knative puts in `source`.
    pub async fn run(
        self,
        client: Client,
        api_server: String,
        emit: Arc<dyn Emit>,
        seen: Arc<dyn SeenStore>,
        stop: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        // A set: when this future is dropped (a source cancelled), its watches end with it.
        let mut tasks = JoinSet::new();
        for (i, r) in this.spec.resources.iter().enumerate() {
            let this = Arc::clone(&this);
            let client = client.clone();
            let emit = Arc::clone(&emit);
            let seen = Arc::clone(&seen);
            let mut stop = stop.clone();
            let r = r.clone();
            let api_server = api_server.clone();
            tasks.spawn(async move {
                let key = format!("{}#{i}", this.id());
                loop {
                    if *stop.borrow() {
                        return;
                    }
                    let out = Outputs {
                        emit: &emit,
                        store: &seen,
                    };
                    let result = this
                        .watch_resource(&key, &client, &api_server, &r, out, stop.clone())
                        .await;
                    if let Err(e) = result {
                        tracing::warn!(source = %this.id(), error = %e, "ApiServerSource: retrying in 5 s");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn watch_resource(
        &self,
        key: &str,
        client: &Client,
        source: &str,
        r: &wasmesh_core::resources::ApiServerResource,
        out: Outputs<'_>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let Outputs { emit, store } = out;
        let (group, version) = match r.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), r.api_version.clone()),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, &r.kind);
        let (ar, _caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .map_err(|e| {
                describe(
                    &e,
                    "get",
                    &format!("the API group of {} {}", r.api_version, r.kind),
                )
            })?;
        // Namespaces: absent, the source's own; `{}`, all; a selector, those whose labels match,
        // followed as labels change (a namespace watch with the selector: one that stops
        // matching comes as a delete).
        let mut namespaces: Option<Arc<std::sync::RwLock<HashSet<String>>>> = None;
        // The namespace watch lives as long as this one (a retry starts a new one).
        let mut follower = JoinSet::new();
        let api: Api<DynamicObject> = match &self.spec.namespace_selector {
            Some(sel) if sel.match_labels.is_empty() && sel.match_expressions.is_empty() => {
                Api::all_with(client.clone(), &ar)
            }
            Some(sel) => {
                let set = Arc::new(std::sync::RwLock::new(HashSet::new()));
                let ready = follow_namespaces(
                    &mut follower,
                    client.clone(),
                    selector_string(sel),
                    Arc::clone(&set),
                    stop.clone(),
                );
                ready
                    .await
                    .map_err(|e| format!("watching namespaces: {e}"))??;
                namespaces = Some(set);
                Api::all_with(client.clone(), &ar)
            }
            None => Api::namespaced_with(client.clone(), &self.namespace, &ar),
        };
        let in_scope = |o: &DynamicObject| match &namespaces {
            None => self.owned(o),
            Some(set) => {
                self.owned(o)
                    && set
                        .read()
                        .map(|s| s.contains(&o.namespace().unwrap_or_default()))
                        .unwrap_or(false)
            }
        };
        let mut config = watcher::Config::default();
        if let Some(sel) = r.selector.as_ref().or(r.label_selector.as_ref()) {
            let s = selector_string(sel);
            if !s.is_empty() {
                config = config.labels(&s);
            }
        }
        // In memory only uid -> resourceVersion (a few dozen bytes an object); the objects
        // themselves stay in the store until a delete needs one.
        let mut seen: Option<HashMap<String, String>> = store.load(key)?.map(|m| {
            m.into_iter()
                .map(|(uid, s)| (uid, s.resource_version))
                .collect()
        });
        let mut listed: Option<HashSet<String>> = None;
        let mut fresh: HashMap<String, String> = HashMap::new();
        let mut pending: Vec<(String, Option<Seen>)> = Vec::new();
        let stream = watcher::watcher(api, config).default_backoff();
        futures::pin_mut!(stream);
        let mut batch = Batch::default();
        let mut ended = false;
        // A stop is only taken between two batches: what is being handled is emitted and
        // recorded as seen before the source stops, so a graceful stop repeats nothing.
        while !ended {
            let first = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.changed() => return Ok(()),
            };
            let Some(first) = first else { break };
            // The watch events that follow closely are taken together: their changes are
            // emitted as one batch (one append to a broker) and then recorded as seen in one
            // update, instead of a durable write each.
            let mut chunk = vec![first];
            let until = tokio::time::Instant::now() + BATCH_WINDOW;
            while chunk.len() < WATCH_BATCH {
                let next = tokio::time::Instant::now() + BATCH_GAP;
                match tokio::time::timeout_at(next.min(until), stream.next()).await {
                    Ok(Some(ev)) => chunk.push(ev),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            for ev in chunk {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::warn!(source = %self.id(), error = %describe_watch(&e, &ar), "watch error; kube-rs retries with backoff");
                        continue;
                    }
                };
                if !matches!(ev, WatchEvent::Apply(_) | WatchEvent::Delete(_)) {
                    self.flush(emit, store, key, &mut batch).await?;
                }
                match ev {
                    WatchEvent::Init => listed = Some(HashSet::new()),
                    WatchEvent::InitApply(o) => {
                        // Handled one object at a time, so a listing of many objects never sits
                        // in memory: only the uids listed are kept, to find deletes at the end.
                        if !in_scope(&o) {
                            continue;
                        }
                        let uid = o.uid().unwrap_or_default();
                        let rv = o.resource_version().unwrap_or_default();
                        if let Some(l) = listed.as_mut() {
                            l.insert(uid.clone());
                        }
                        match &mut seen {
                            // A brand-new source: remember what exists, emit nothing (Knative).
                            None => {
                                fresh.insert(uid.clone(), rv);
                                pending.push((uid, Some(seen_of(&o))));
                            }
                            Some(known) => {
                                let change = match known.get(&uid) {
                                    None => Some(Change::Add),
                                    Some(known_rv) if *known_rv != rv => Some(Change::Update),
                                    Some(_) => None,
                                };
                                if let Some(c) = change {
                                    self.send(emit, &ar, source, c, &o).await?;
                                    known.insert(uid.clone(), rv);
                                    pending.push((uid, Some(seen_of(&o))));
                                }
                            }
                        }
                        if pending.len() >= 512 {
                            store.update(key, std::mem::take(&mut pending))?;
                        }
                    }
                    WatchEvent::InitDone => {
                        let listed = listed.take().unwrap_or_default();
                        match &mut seen {
                            None => seen = Some(std::mem::take(&mut fresh)),
                            Some(known) => {
                                let gone: Vec<String> = known
                                    .keys()
                                    .filter(|u| !listed.contains(*u))
                                    .cloned()
                                    .collect();
                                for uid in gone {
                                    if let Some(bytes) = store.object(key, &uid)?
                                        && let Ok(o) =
                                            serde_json::from_slice::<DynamicObject>(&bytes)
                                    {
                                        self.send(emit, &ar, source, Change::Delete, &o).await?;
                                    }
                                    known.remove(&uid);
                                    pending.push((uid, None));
                                }
                            }
                        }
                        // Also marks the source as having listed once, even when nothing changed.
                        store.update(key, std::mem::take(&mut pending))?;
                    }
                    WatchEvent::Apply(o) => {
                        if !in_scope(&o) {
                            continue;
                        }
                        let known = seen.get_or_insert_with(HashMap::new);
                        let uid = o.uid().unwrap_or_default();
                        let rv = o.resource_version().unwrap_or_default();
                        let change = match known.get(&uid) {
                            None => Change::Add,
                            Some(known_rv) if *known_rv != rv => Change::Update,
                            Some(_) => continue,
                        };
                        batch.events.push(self.event(&ar, source, change, &o)?);
                        let s = seen_of(&o);
                        known.insert(uid.clone(), s.resource_version.clone());
                        batch.seen.push((uid, Some(s)));
                    }
                    WatchEvent::Delete(o) => {
                        if !in_scope(&o) {
                            continue;
                        }
                        let uid = o.uid().unwrap_or_default();
                        batch
                            .events
                            .push(self.event(&ar, source, Change::Delete, &o)?);
                        if let Some(known) = seen.as_mut() {
                            known.remove(&uid);
                        }
                        batch.seen.push((uid, None));
                    }
                }
            }
            self.flush(emit, store, key, &mut batch).await?;
        }
        Err("the watch stream ended".into())
    }

    /// Emits the batched changes (retrying until the sink takes them), then records them as
    /// seen: a crash in between repeats them at the next start, never loses them.
    async fn flush(
        &self,
        emit: &Arc<dyn Emit>,
        store: &Arc<dyn SeenStore>,
        key: &str,
        batch: &mut Batch,
    ) -> Result<(), String> {
        if !batch.events.is_empty() {
            self.deliver(emit, std::mem::take(&mut batch.events)).await;
        }
        if !batch.seen.is_empty() {
            store.update(key, std::mem::take(&mut batch.seen))?;
        }
        Ok(())
    }

    /// The `owner` filter: only objects whose controller ownerReference matches.
    fn owned(&self, o: &DynamicObject) -> bool {
        let Some(owner) = &self.spec.owner else {
            return true;
        };
        o.owner_references().iter().any(|r| {
            r.controller == Some(true)
                && owner
                    .api_version
                    .as_ref()
                    .is_none_or(|v| *v == r.api_version)
                && owner.kind.as_ref().is_none_or(|k| *k == r.kind)
        })
    }

    async fn send(
        &self,
        emit: &Arc<dyn Emit>,
        ar: &ApiResource,
        source: &str,
        change: Change,
        o: &DynamicObject,
    ) -> Result<(), String> {
        let event = self.event(ar, source, change, o)?;
        self.deliver(emit, vec![event]).await;
        Ok(())
    }

    /// Hands events to the sink, in order. The sink's own retries come first; a refusal here is
    /// retried until it goes through, so that nothing is lost (the watch waits meanwhile). Each
    /// refusal also halves how many events go at once, so that a batch larger than the room a
    /// sink can ever have (a trigger queue smaller than the batch) still gets through.
    async fn deliver(&self, emit: &Arc<dyn Emit>, mut events: Vec<Event>) {
        events.retain(|e| self.filter.matches(e));
        let mut wait = Duration::from_millis(50);
        let mut size = events.len().max(1);
        let mut at = 0;
        while at < events.len() {
            let end = (at + size).min(events.len());
            match emit.emit_all(events[at..end].to_vec()).await {
                Ok(()) => {
                    at = end;
                    wait = Duration::from_millis(50);
                }
                // One event the sink will never take (more than it holds at all): sending it
                // again would hold every change after it forever. Dropped and said, as
                // Knative drops what its retries cannot send.
                Err(EmitError::Never(e)) if end - at == 1 => {
                    tracing::error!(source = %self.id(), error = %e, subject = ?wasmesh_core::AttributesReader::subject(&events[at]), "event refused for good by the sink: dropped");
                    at = end;
                }
                // A batch that holds such an event: smaller batches, at once.
                Err(EmitError::Never(_)) => size = (size / 2).max(1),
                Err(EmitError::Later(e)) => {
                    tracing::warn!(source = %self.id(), error = %e, events = end - at, "events refused by the sink; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                    size = (size / 2).max(1);
                }
            }
        }
    }

    fn event(
        &self,
        ar: &ApiResource,
        source: &str,
        change: Change,
        o: &DynamicObject,
    ) -> Result<Event, String> {
        let name = o.name_any();
        let ns = o.namespace().unwrap_or_default();
        let api_version = ar.api_version.clone();
        let subject = if ns.is_empty() {
            format!("/apis/{api_version}/{}/{name}", ar.plural)
        } else {
            format!("/apis/{api_version}/namespaces/{ns}/{}/{name}", ar.plural)
        };
        let (ty, data) = match self.spec.mode {
            ApiServerMode::Resource => (
                format!("dev.knative.apiserver.resource.{}", change.word()),
                sorted(serde_json::to_value(o).map_err(|e| e.to_string())?),
            ),
            ApiServerMode::Reference => (
                format!("dev.knative.apiserver.ref.{}", change.word()),
                serde_json::json!({ "apiVersion": api_version, "kind": ar.kind, "name": name, "namespace": ns }),
            ),
        };
        let mut b = EventBuilderV10::new()
            .id(uuid::Uuid::new_v4().to_string())
            .source(source.to_string())
            .ty(ty)
            .subject(subject)
            .time(chrono::Utc::now())
            .extension("kind", ar.kind.clone())
            .extension("apiversion", api_version)
            .extension("name", name)
            .extension("namespace", ns);
        for (k, v) in self
            .spec
            .ce_overrides
            .iter()
            .flat_map(|o| o.extensions.iter())
        {
            b = b.extension(k.as_str(), v.clone());
        }
        let bytes = serde_json::to_vec(&data).map_err(|e| e.to_string())?;
        b.data("application/json", bytes)
            .build()
            .map_err(|e| e.to_string())
    }
}

/// Keeps `set` equal to the names of the namespaces matching `selector`, until `stop`, on a task
/// of `tasks`. The returned future resolves once the first listing is in (or fails).
fn follow_namespaces(
    tasks: &mut JoinSet<()>,
    client: Client,
    selector: String,
    set: Arc<std::sync::RwLock<HashSet<String>>>,
    mut stop: watch::Receiver<bool>,
) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tasks.spawn(async move {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
        let stream =
            watcher::watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
        futures::pin_mut!(stream);
        let mut ready = Some(ready_tx);
        let mut listing: HashSet<String> = HashSet::new();
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.changed() => return,
            };
            let Some(ev) = ev else { return };
            match ev {
                Ok(WatchEvent::Init) => listing.clear(),
                Ok(WatchEvent::InitApply(ns)) => {
                    listing.insert(ns.name_any());
                }
                Ok(WatchEvent::InitDone) => {
                    if let Ok(mut s) = set.write() {
                        *s = std::mem::take(&mut listing);
                    }
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                Ok(WatchEvent::Apply(ns)) => {
                    if let Ok(mut s) = set.write() {
                        s.insert(ns.name_any());
                    }
                }
                Ok(WatchEvent::Delete(ns)) => {
                    if let Ok(mut s) = set.write() {
                        s.remove(&ns.name_any());
                    }
                }
                Err(e) => {
                    let msg = match &e {
                        watcher::Error::InitialListFailed(k)
                        | watcher::Error::WatchStartFailed(k) => describe(k, "list", "namespaces"),
                        other => other.to_string(),
                    };
                    tracing::warn!(error = %msg, "namespace watch error; retrying with backoff");
                }
            }
        }
    });
    ready_rx
}

fn seen_of(o: &DynamicObject) -> Seen {
    Seen {
        resource_version: o.resource_version().unwrap_or_default(),
        object: serde_json::to_vec(o).unwrap_or_default(),
    }
}

fn describe(e: &kube::Error, verb: &str, what: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "403 Forbidden: RBAC refused `{verb}` on {what}: {}",
            s.message
        ),
        kube::Error::Api(s) if s.code == 401 => format!(
            "401 Unauthorized: the credentials were refused: {}",
            s.message
        ),
        other => format!("{other}"),
    }
}

fn describe_watch(e: &watcher::Error, ar: &ApiResource) -> String {
    match e {
        watcher::Error::InitialListFailed(k) => describe(k, "list", &ar.plural),
        watcher::Error::WatchStartFailed(k) => describe(k, "watch", &ar.plural),
        other => other.to_string(),
    }
}
