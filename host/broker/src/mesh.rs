//! The running data plane: brokers, their triggers, and the path of an event from `publish` to
//! each matching trigger's queue and on to its subscriber.
//!
//! The queue behind [`Mesh::publish`] is the seam the durable log replaces: today a bounded
//! in-memory channel per trigger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use chrono::{SecondsFormat, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use wasmesh_core::filter::Filter;
use wasmesh_core::{AttributesReader, Event, ExtensionValue};

use crate::delivery::DeliveryPolicy;
use crate::log::{Append, DurableLog, LogError};
use crate::metrics::{self, BrokerStats, IngressStats, TriggerStats};
use crate::nats::NatsStore;
use crate::output::FunctionOutput;
use crate::passthrough::Passthrough;
use crate::sink::{self, Failure, HttpClient, Outcome, Reply, Sink};
use crate::slot::FunctionSlot;

/// A broker's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrokerKey {
    pub namespace: String,
    pub name: String,
}

impl BrokerKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for BrokerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The TTL a broker gives an event that has none (Knative's default).
pub const DEFAULT_TTL: i32 = 255;
const TTL_EXTENSION: &str = "knativebrokerttl";

/// An event in a trigger's queue, with the TTL it carries (stripped from the event itself so
/// that subscribers never see it; put back on a reply).
#[derive(Debug, Clone)]
pub struct Envelope {
    pub event: Arc<Event>,
    pub ttl: i32,
    /// The request headers that go with it to HTTP subscribers.
    pub headers: Passthrough,
    /// Its place in the durable log and the id of the trigger that owes it (none in memory
    /// mode): what acknowledges it when the delivery is finished.
    pub seq: Option<(u64, u64)>,
    /// Attempts already made (before a restart, or earlier deliveries from JetStream).
    pub attempts: u32,
    /// JetStream mode: what acknowledges or NAKs the message.
    pub acker: Option<Arc<crate::nats::AckHandle>>,
}

impl Envelope {
    /// Pulled for an ordered trigger under a lease this replica has lost since: not started
    /// here, and left unacknowledged, so that the next holder delivers it in its turn.
    fn abandoned(&self) -> bool {
        self.acker.as_ref().is_some_and(|a| !a.lease_held())
    }

    /// Its delivery starts (JetStream: no longer kept waiting by the feeder).
    fn start(&self) {
        if let Some(a) = &self.acker {
            a.start();
        }
    }
}

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Events each trigger may hold before ingress answers 429.
    pub queue_capacity: usize,
    /// Deliveries in flight per trigger.
    pub concurrency: usize,
    /// How function output is printed.
    pub output: FunctionOutput,
    /// The durable log; `None` keeps events in memory only (lost on a crash).
    pub log: Option<Arc<DurableLog>>,
    /// NATS JetStream in place of the embedded log (several replicas share the work).
    pub nats: Option<Arc<NatsStore>>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            concurrency: 16,
            output: FunctionOutput::default(),
            log: None,
            nats: None,
        }
    }
}

/// A trigger as it runs.
pub struct TriggerSpecRuntime {
    pub namespace: String,
    pub name: String,
    pub broker: BrokerKey,
    pub filter: Filter,
    pub wasm_filter: Option<Arc<FunctionSlot>>,
    pub subscriber: Sink,
    pub policy: DeliveryPolicy,
    /// Its counters; the mesh puts the trigger's own in place when it is applied.
    pub stats: Arc<TriggerStats>,
}

/// A trigger's spec as its workers read it: replaced in place, atomically, when the trigger
/// changes in a way its workers can follow (filters, subscriber, delivery policy).
type SpecCell = Arc<ArcSwap<TriggerSpecRuntime>>;

/// What a trigger's workers are built from; a change of shape builds new workers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    lanes: usize,
    ordered_by: Option<String>,
    per_queue: usize,
    wasm: bool,
}

struct TriggerRuntime {
    spec: SpecCell,
    /// Memory mode: the queues ingress fills. Durable mode: a feeder fills them from the log.
    /// One queue, or for ordered delivery one lane per unit of concurrency.
    lanes: Lanes,
    log_id: Option<u64>,
    shape: Shape,
    /// Durable mode: the feeder, and the last log position it queued.
    feeder: Mutex<Option<Feeder>>,
    /// Ends (`recv` gives `None`) once every worker of this trigger has ended.
    workers_alive: Mutex<Option<mpsc::Receiver<()>>>,
    /// Deliveries its workers finished (a gate tells busy old workers from stuck ones).
    finished: Arc<AtomicU64>,
}

impl TriggerRuntime {
    /// Events waiting in its queues.
    fn queued(&self) -> u64 {
        let queues = self.lanes.queues.iter();
        queues
            .map(|q| (q.max_capacity() - q.capacity()) as u64)
            .sum()
    }
}

/// Held shut until the workers of the trigger a new one replaces have ended: for ordered
/// delivery, so that no event of a key starts before the old workers are done with theirs.
type Gate = Option<tokio::sync::watch::Receiver<bool>>;

/// How long new workers wait at a gate for old ones that finish nothing meanwhile.
const GATE_LIMIT: Duration = Duration::from_secs(60);

async fn wait_for_gate(gate: Gate) {
    if let Some(mut g) = gate {
        // A gate whose opener is gone is open.
        let _ = g.wait_for(|open| *open).await;
    }
}

/// What a trigger's workers start with: the spec they read, the gate they wait at, and a token
/// they hold while they run (see `TriggerRuntime::workers_alive`).
struct Worker {
    cell: SpecCell,
    gate: Gate,
    alive: mpsc::Sender<()>,
    finished: Arc<AtomicU64>,
}

/// What a trigger that was removed or rebuilt leaves to the one that takes its name next: its
/// old workers may still deliver events they took, so the successor continues in the log after
/// them and, for ordered delivery, waits for them at a gate.
struct Retired {
    /// The last log position the old feeder queued.
    fed: u64,
    ordered: bool,
    /// Ends once every old worker has ended.
    alive: Option<mpsc::Receiver<()>>,
    finished: Arc<AtomicU64>,
}

impl Retired {
    /// Stops `trigger`'s feeder and takes what its successor needs.
    async fn from(trigger: &TriggerRuntime) -> Retired {
        let fed = Mesh::retire(trigger).await;
        Retired {
            fed,
            ordered: trigger.shape.ordered_by.is_some(),
            alive: trigger
                .workers_alive
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
            finished: Arc::clone(&trigger.finished),
        }
    }

    /// Whether some old worker still runs.
    fn busy(&mut self) -> bool {
        self.alive
            .as_mut()
            .is_some_and(|a| !matches!(a.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)))
    }

    /// Opens `open` once the old workers have ended, or once they finish nothing for
    /// `GATE_LIMIT` (a subscriber that never answers, no timeout: it must not hold the new
    /// workers back for good).
    fn open_when_done(self, open: tokio::sync::watch::Sender<bool>, name: String) {
        let Retired {
            alive, finished, ..
        } = self;
        tokio::spawn(async move {
            if let Some(mut alive) = alive {
                let mut seen = finished.load(Ordering::Acquire);
                loop {
                    match tokio::time::timeout(GATE_LIMIT, alive.recv()).await {
                        Ok(Some(())) => {}
                        Ok(None) => break,
                        Err(_) => {
                            let now = finished.load(Ordering::Acquire);
                            if now == seen {
                                tracing::warn!(
                                    trigger = %name,
                                    "the old workers of this ordered trigger finished nothing in {} s: the new ones start now, and an event an old one still holds may arrive after a later one of its key",
                                    GATE_LIMIT.as_secs()
                                );
                                break;
                            }
                            seen = now;
                        }
                    }
                }
            }
            let _ = open.send(true);
        });
    }
}

/// The trigger a new one takes the place of.
enum Predecessor {
    /// Still routed: it is retired once the new one is routed.
    Running(Arc<TriggerRuntime>),
    /// Removed before.
    Removed(Retired),
}

struct Feeder {
    stop: tokio::sync::watch::Sender<bool>,
    handle: JoinHandle<()>,
    fed: Arc<AtomicU64>,
}

/// What [`Mesh::apply_trigger`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerChange {
    Created,
    /// Changed in place: the next delivery uses the new spec.
    Updated,
    /// New workers (concurrency, ordering or the kind of subscriber changed); the old ones
    /// finish what they hold.
    Rebuilt,
}

/// A trigger's queues: one shared queue, or lanes chosen by the partition key.
#[derive(Clone)]
struct Lanes {
    queues: Vec<mpsc::Sender<Envelope>>,
    ordered_by: Option<String>,
}

impl Lanes {
    /// The queue an event goes to: for ordered delivery, the same lane for the same key.
    fn for_event(&self, event: &Event) -> &mpsc::Sender<Envelope> {
        let index = match &self.ordered_by {
            Some(attr) if self.queues.len() > 1 => {
                use std::hash::{Hash, Hasher};
                let key = wasmesh_core::filter::attribute_value(event, attr).unwrap_or_default();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut h);
                (h.finish() % self.queues.len() as u64) as usize
            }
            _ => 0,
        };
        &self.queues[index]
    }
}

/// An event and the triggers whose native filters it passed.
type Routed = (Envelope, Vec<Arc<TriggerRuntime>>);

struct BrokerRuntime {
    triggers: Vec<Arc<TriggerRuntime>>,
    stats: Arc<BrokerStats>,
}

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker {0} does not exist")]
    UnknownBroker(BrokerKey),
    #[error("the event's TTL (knativebrokerttl) is exhausted")]
    TtlExhausted,
    #[error("trigger {0} is full; retry later")]
    Full(String),
    /// A request that can never fit (more events for one trigger than its queue holds): 413,
    /// so that the producer sends fewer at a time instead of retrying forever.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl PublishError {
    /// Whether sending the same again can never succeed (too large, TTL spent), as opposed to
    /// a broker that is full, unwritable or not declared yet.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            PublishError::TooLarge(_)
                | PublishError::TtlExhausted
                | PublishError::Log(LogError::TooLarge(_))
        )
    }
}

/// Why [`Mesh::send_to`] did not deliver an event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SendToError {
    pub message: String,
    /// Sending the same again cannot help (a refusal Knative does not retry, more than the
    /// sink takes at all).
    pub permanent: bool,
}

impl From<PublishError> for SendToError {
    fn from(e: PublishError) -> Self {
        SendToError {
            permanent: e.is_permanent(),
            message: e.to_string(),
        }
    }
}

/// The data plane: brokers, triggers, their queues and delivery workers.
pub struct Mesh {
    brokers: RwLock<HashMap<BrokerKey, Arc<BrokerRuntime>>>,
    /// The log ids of the triggers declared now (the log's garbage collection reads it).
    live_log_ids: Arc<Mutex<Vec<u64>>>,
    stopping: tokio::sync::watch::Sender<bool>,
    client: HttpClient,
    config: MeshConfig,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Triggers removed (by namespace and name) whose workers may still run.
    retired: Mutex<HashMap<(String, String), Retired>>,
    /// Each declared trigger's counters, by namespace and name (kept across rebuilds).
    trigger_stats: Mutex<HashMap<(String, String), Arc<TriggerStats>>>,
    ingress: IngressStats,
}

impl Mesh {
    /// An empty mesh.
    pub fn new(config: MeshConfig) -> Arc<Self> {
        Arc::new(Self {
            brokers: RwLock::new(HashMap::new()),
            live_log_ids: Arc::default(),
            stopping: tokio::sync::watch::channel(false).0,
            client: sink::http_client(),
            config,
            workers: Mutex::new(Vec::new()),
            retired: Mutex::new(HashMap::new()),
            trigger_stats: Mutex::new(HashMap::new()),
            ingress: IngressStats::default(),
        })
    }

    /// The durable log, when events are kept on disk.
    pub fn log(&self) -> Option<Arc<DurableLog>> {
        self.config.log.clone()
    }

    /// Adds a broker (no triggers yet); adding an existing one changes nothing.
    pub fn add_broker(&self, key: BrokerKey) {
        let mut brokers = self.brokers.write().unwrap_or_else(PoisonError::into_inner);
        brokers.entry(key).or_insert_with(|| {
            Arc::new(BrokerRuntime {
                triggers: Vec::new(),
                stats: Arc::default(),
            })
        });
    }

    /// The brokers, sorted.
    pub fn brokers(&self) -> Vec<BrokerKey> {
        let brokers = self.brokers.read().unwrap_or_else(PoisonError::into_inner);
        let mut keys: Vec<BrokerKey> = brokers.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// True when the broker exists.
    pub fn has_broker(&self, key: &BrokerKey) -> bool {
        self.brokers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(key)
    }

    fn shape(&self, spec: &TriggerSpecRuntime) -> Shape {
        let concurrency = spec
            .policy
            .concurrency
            .unwrap_or(self.config.concurrency)
            .max(1);
        let ordered_by = spec.policy.ordered_by.clone();
        Shape {
            lanes: if ordered_by.is_some() { concurrency } else { 1 },
            // Ordered lanes have one worker each, so a key's events go one at a time.
            per_queue: if ordered_by.is_some() { 1 } else { concurrency },
            ordered_by,
            wasm: matches!(spec.subscriber, Sink::Function(_)),
        }
    }

    /// Adds a trigger to its (existing) broker and starts its delivery workers.
    pub fn add_trigger(self: &Arc<Self>, mut spec: TriggerSpecRuntime) -> Result<(), PublishError> {
        let key = spec.broker.clone();
        if !self.has_broker(&key) {
            return Err(PublishError::UnknownBroker(key));
        }
        spec.stats = self.stats_of(&spec.namespace, &spec.name);
        let trigger = self.build_trigger(spec, Some(0), None)?;
        self.route(&key, trigger, None);
        Ok(())
    }

    /// Creates or changes a trigger. Deliveries in flight finish on the spec they started
    /// with; none is lost or repeated. A trigger that moves to another broker, or whose
    /// concurrency, ordering or kind of subscriber changes, gets new workers: the old ones
    /// finish the events they hold, and in durable mode the new ones continue in the log after
    /// the last event the old ones took.
    pub async fn apply_trigger(
        self: &Arc<Self>,
        mut spec: TriggerSpecRuntime,
    ) -> Result<TriggerChange, PublishError> {
        let key = spec.broker.clone();
        if !self.has_broker(&key) {
            return Err(PublishError::UnknownBroker(key));
        }
        spec.stats = self.stats_of(&spec.namespace, &spec.name);
        if let Some(nats) = &self.config.nats {
            // The durable consumer exists before the trigger counts as applied: it starts at
            // the events published from now on, and none accepted after this may pass it by.
            nats.consumer(
                &key,
                &spec.name,
                self.config.queue_capacity,
                crate::nats::ack_wait(spec.policy.timeout),
            )
            .await?;
        }
        let existing = self.find_trigger(&spec.namespace, &spec.name);
        if let Some((old_key, old)) = &existing
            && *old_key == key
            && old.shape == self.shape(&spec)
        {
            old.spec.store(Arc::new(spec));
            return Ok(TriggerChange::Updated);
        }
        let Some((old_key, old)) = existing else {
            // Declared again after it was removed: its old workers may still deliver.
            let before = self
                .retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(spec.namespace.clone(), spec.name.clone()))
                .and_then(|mut r| r.busy().then_some(r));
            match before {
                None => {
                    let trigger = self.build_trigger(spec, Some(0), None)?;
                    self.route(&key, trigger, None);
                }
                Some(before) => {
                    self.succeed(spec, &key, None, Predecessor::Removed(before))
                        .await?;
                }
            }
            return Ok(TriggerChange::Created);
        };
        // The new workers take new events at once; in durable mode their feeder starts after
        // the old feeder stopped, past what it queued. Ordered delivery (before or after the
        // change): the new workers start once the old ones have finished what they hold.
        self.succeed(spec, &key, Some(&old_key), Predecessor::Running(old))
            .await?;
        Ok(TriggerChange::Rebuilt)
    }

    /// Builds and routes a trigger that takes the place of `before`, whose workers may still
    /// deliver: the new feeder continues after the old one, and for ordered delivery (before or
    /// after) the new workers wait at a gate until the old ones are done.
    async fn succeed(
        self: &Arc<Self>,
        spec: TriggerSpecRuntime,
        key: &BrokerKey,
        replacing: Option<&BrokerKey>,
        before: Predecessor,
    ) -> Result<(), PublishError> {
        let ordered = spec.policy.ordered_by.is_some()
            || match &before {
                Predecessor::Running(old) => old.shape.ordered_by.is_some(),
                Predecessor::Removed(r) => r.ordered,
            };
        let name = format!("{}/{}", spec.namespace, spec.name);
        let (open, gate) = if ordered {
            let (open, gate) = tokio::sync::watch::channel(false);
            (Some(open), Some(gate))
        } else {
            (None, None)
        };
        let trigger = self.build_trigger(spec, None, gate)?;
        self.route(key, Arc::clone(&trigger), replacing);
        let before = match before {
            // Its queues close once it is dropped (here, as nothing routes to it any more);
            // its workers then end after the events they hold.
            Predecessor::Running(old) => Retired::from(&old).await,
            Predecessor::Removed(r) => r,
        };
        self.start_feeder(&trigger, before.fed);
        if let Some(open) = open {
            before.open_when_done(open, name);
        }
        Ok(())
    }

    /// Removes a trigger: no new event goes to it; its workers finish what they hold. In
    /// durable mode what the log still owes it is dropped by the next garbage collection.
    pub async fn remove_trigger(&self, namespace: &str, name: &str) -> bool {
        let Some((key, old)) = self.find_trigger(namespace, name) else {
            return false;
        };
        {
            let mut brokers = self.brokers.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(b) = brokers.get(&key) {
                let triggers = b
                    .triggers
                    .iter()
                    .filter(|t| !Arc::ptr_eq(t, &old))
                    .cloned()
                    .collect();
                let stats = Arc::clone(&b.stats);
                brokers.insert(key, Arc::new(BrokerRuntime { triggers, stats }));
            }
        }
        self.set_aside(&old).await;
        self.trigger_stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(namespace.to_string(), name.to_string()));
        true
    }

    /// A trigger's counters (new ones for a trigger not seen before).
    fn stats_of(&self, namespace: &str, name: &str) -> Arc<TriggerStats> {
        let mut all = self
            .trigger_stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            all.entry((namespace.to_string(), name.to_string()))
                .or_default(),
        )
    }

    /// A declared trigger's counters now.
    pub fn trigger_counts(&self, namespace: &str, name: &str) -> Option<metrics::TriggerCounts> {
        let (_, t) = self.find_trigger(namespace, name)?;
        Some(t.spec.load().stats.counts(t.queued()))
    }

    /// Where ingress counts its answers.
    pub fn ingress_stats(&self) -> &IngressStats {
        &self.ingress
    }

    /// The counters of the data plane in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        let brokers: Vec<(BrokerKey, Arc<BrokerRuntime>)> = {
            let brokers = self.brokers.read().unwrap_or_else(PoisonError::into_inner);
            let mut all: Vec<_> = brokers
                .iter()
                .map(|(k, b)| (k.clone(), Arc::clone(b)))
                .collect();
            all.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
            all
        };
        let mut e = metrics::Exposition::default();
        e.ingress(&self.ingress);
        let rows: Vec<_> = brokers
            .iter()
            .map(|(k, b)| (k.namespace.clone(), k.name.clone(), &*b.stats))
            .collect();
        e.brokers(&rows);
        let specs: Vec<_> = brokers
            .iter()
            .flat_map(|(k, b)| {
                b.triggers
                    .iter()
                    .map(move |t| (k.name.clone(), t.spec.load_full(), t.queued()))
            })
            .collect();
        let mut rows: Vec<_> = specs
            .iter()
            .map(|(broker, spec, queued)| {
                (
                    spec.namespace.clone(),
                    spec.name.clone(),
                    broker.clone(),
                    &*spec.stats,
                    *queued,
                )
            })
            .collect();
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        e.triggers(&rows);
        if let Some(log) = &self.config.log {
            let (events, bytes) = log.held();
            let syncs = log.sync_stats();
            e.log(events, bytes, syncs.groups, syncs.events);
        }
        e.finish()
    }

    /// A trigger no longer routed: no longer live for the log's garbage collection; its feeder
    /// stops, and what a trigger declared again under its name needs is kept while its workers
    /// may still run.
    async fn set_aside(&self, trigger: &TriggerRuntime) {
        if let Some(id) = trigger.log_id {
            self.live_log_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|i| *i != id);
        }
        let retired = Retired::from(trigger).await;
        let name = {
            let spec = trigger.spec.load();
            (spec.namespace.clone(), spec.name.clone())
        };
        let mut all = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|_, r| r.busy());
        all.insert(name, retired);
    }

    /// A trigger deleted for good: over JetStream its durable consumer is deleted, so that the
    /// stream no longer keeps events for it. (The embedded log's garbage collection does the
    /// same for triggers that are no longer declared.)
    pub async fn forget_trigger(&self, broker: &BrokerKey, name: &str) {
        if let Some(nats) = &self.config.nats
            && let Err(e) = nats.delete_consumer(broker, name).await
        {
            tracing::warn!(trigger = name, error = %e, "cannot delete the JetStream consumer");
        }
    }

    /// Removes a broker and its triggers.
    pub async fn remove_broker(&self, key: &BrokerKey) -> bool {
        let Some(b) = self
            .brokers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
        else {
            return false;
        };
        for t in &b.triggers {
            self.set_aside(t).await;
        }
        true
    }

    /// The triggers of a broker by name, with the subscriber each delivers to now.
    pub fn triggers(&self) -> Vec<(BrokerKey, String, String)> {
        let brokers = self.brokers.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = brokers
            .iter()
            .flat_map(|(k, b)| {
                b.triggers.iter().map(|t| {
                    let spec = t.spec.load();
                    (
                        k.clone(),
                        format!("{}/{}", spec.namespace, spec.name),
                        spec.subscriber.describe(),
                    )
                })
            })
            .collect();
        out.sort();
        out
    }

    fn find_trigger(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(BrokerKey, Arc<TriggerRuntime>)> {
        let brokers = self.brokers.read().unwrap_or_else(PoisonError::into_inner);
        brokers.iter().find_map(|(k, b)| {
            b.triggers
                .iter()
                .find(|t| {
                    let spec = t.spec.load();
                    spec.namespace == namespace && spec.name == name
                })
                .map(|t| (k.clone(), Arc::clone(t)))
        })
    }

    /// Puts `trigger` in `key`'s routing, in place of the trigger of the same name (in
    /// `replacing`, when it moves).
    fn route(&self, key: &BrokerKey, trigger: Arc<TriggerRuntime>, replacing: Option<&BrokerKey>) {
        let (ns, name) = {
            let spec = trigger.spec.load();
            (spec.namespace.clone(), spec.name.clone())
        };
        let same = |t: &Arc<TriggerRuntime>| {
            let spec = t.spec.load();
            spec.namespace == ns && spec.name == name
        };
        let mut brokers = self.brokers.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old_key) = replacing
            && old_key != key
            && let Some(b) = brokers.get(old_key)
        {
            let triggers = b.triggers.iter().filter(|t| !same(t)).cloned().collect();
            let stats = Arc::clone(&b.stats);
            brokers.insert(old_key.clone(), Arc::new(BrokerRuntime { triggers, stats }));
        }
        if let Some(b) = brokers.get(key) {
            let mut triggers: Vec<_> = b.triggers.iter().filter(|t| !same(t)).cloned().collect();
            triggers.push(trigger);
            let stats = Arc::clone(&b.stats);
            brokers.insert(key.clone(), Arc::new(BrokerRuntime { triggers, stats }));
        }
    }

    /// Stops a trigger's feeder; returns the last log position it queued. Its queue closes
    /// once nothing routes to it, and its workers end after the events they hold.
    async fn retire(trigger: &TriggerRuntime) -> u64 {
        let feeder = trigger
            .feeder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(f) = feeder else { return 0 };
        let _ = f.stop.send(true);
        let _ = f.handle.await;
        f.fed.load(Ordering::Acquire)
    }

    /// Builds a trigger's queues and workers; in durable mode with `feed_after`, its feeder
    /// too (reading the log after that position).
    fn build_trigger(
        self: &Arc<Self>,
        spec: TriggerSpecRuntime,
        feed_after: Option<u64>,
        gate: Gate,
    ) -> Result<Arc<TriggerRuntime>, PublishError> {
        let shape = self.shape(&spec);
        let capacity = (self.config.queue_capacity / shape.lanes).max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shape.lanes).map(|_| mpsc::channel(capacity)).unzip();
        let lanes = Lanes {
            queues: senders,
            ordered_by: shape.ordered_by.clone(),
        };
        let log_id = match &self.config.log {
            Some(log) => Some(log.trigger_id(&format!("{}/{}", spec.namespace, spec.name))?),
            None => None,
        };
        let cell: SpecCell = Arc::new(ArcSwap::from_pointee(spec));
        let (alive, workers_alive) = mpsc::channel::<()>(1);
        let finished = Arc::new(AtomicU64::new(0));
        let trigger = Arc::new(TriggerRuntime {
            spec: Arc::clone(&cell),
            lanes,
            log_id,
            shape: shape.clone(),
            feeder: Mutex::new(None),
            workers_alive: Mutex::new(Some(workers_alive)),
            finished: Arc::clone(&finished),
        });
        if let Some(id) = log_id {
            let mut live = self
                .live_log_ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !live.contains(&id) {
                live.push(id);
            }
        }
        if let Some(after) = feed_after {
            self.start_feeder(&trigger, after);
        }
        // The workers hold the spec, not the sender: dropping the trigger closes the queue.
        let mut handles = Vec::new();
        for rx in receivers {
            let worker = Worker {
                cell: Arc::clone(&cell),
                gate: gate.clone(),
                alive: alive.clone(),
                finished: Arc::clone(&finished),
            };
            if shape.wasm {
                handles.extend(self.start_wasm_workers(worker, rx, shape.per_queue));
            } else {
                let mesh = Arc::clone(self);
                let per_queue = shape.per_queue;
                handles.push(tokio::spawn(async move {
                    mesh.run_trigger(worker, rx, per_queue).await
                }));
            }
        }
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(handles);
        Ok(trigger)
    }

    fn start_feeder(&self, trigger: &TriggerRuntime, after: u64) {
        if let Some(nats) = &self.config.nats {
            self.start_nats_feeder(nats, trigger);
            return;
        }
        let (Some(log), Some(id)) = (&self.config.log, trigger.log_id) else {
            return;
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let fed = Arc::new(AtomicU64::new(after));
        let handle = tokio::spawn(feed(
            Arc::clone(log),
            id,
            trigger.lanes.clone(),
            Arc::clone(&fed),
            self.stopping.subscribe(),
            stop_rx,
        ));
        *trigger
            .feeder
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Feeder { stop, handle, fed });
    }

    /// JetStream mode: reads the trigger's durable consumer into its queues. Events its native
    /// filter refuses are acknowledged at once.
    fn start_nats_feeder(&self, nats: &Arc<NatsStore>, trigger: &TriggerRuntime) {
        let (stop, retire) = tokio::sync::watch::channel(false);
        let nats = Arc::clone(nats);
        let cell = Arc::clone(&trigger.spec);
        let lanes = trigger.lanes.clone();
        let stopping = self.stopping.subscribe();
        let capacity = self.config.queue_capacity;
        let handle = tokio::spawn(async move {
            let spec = cell.load_full();
            let ordered = spec.policy.ordered_by.is_some();
            let ack_wait = crate::nats::ack_wait(spec.policy.timeout);
            let consumer = loop {
                match nats
                    .consumer(&spec.broker, &spec.name, capacity, ack_wait)
                    .await
                {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(trigger = %spec.name, error = %e, "no JetStream consumer yet; retrying in 1 s");
                        let mut r = retire.clone();
                        let mut s = stopping.clone();
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = r.changed() => return,
                            _ = s.changed() => return,
                        }
                    }
                }
            };
            let take = move |p: crate::nats::Pulled| {
                let passes = cell.load().filter.matches(&p.event);
                let queue = lanes.for_event(&p.event).clone();
                async move {
                    if !passes {
                        let _ = p.acker.ack().await;
                        return true;
                    }
                    let env = Envelope {
                        event: Arc::new(p.event),
                        ttl: p.ttl,
                        headers: p.headers,
                        seq: None,
                        attempts: p.delivered_before,
                        acker: Some(p.acker),
                    };
                    queue.send(env).await.is_ok()
                }
            };
            if ordered {
                // One replica at a time, its lanes keeping the order of each key.
                let id = format!("trigger/{}/{}", spec.namespace, spec.name);
                crate::nats::pull_exclusive(&nats, &id, consumer, ack_wait, stopping, retire, take)
                    .await;
            } else {
                crate::nats::pull(consumer, ack_wait, stopping, retire, None, take).await;
            }
        });
        *trigger
            .feeder
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Feeder {
            stop,
            handle,
            fed: Arc::new(AtomicU64::new(0)),
        });
    }

    /// Sets `knativearrivaltime`, applies the TTL rules and finds, for each event, the triggers
    /// whose native filters it passes.
    fn prepare(
        &self,
        key: &BrokerKey,
        events: Vec<Event>,
        headers: Passthrough,
    ) -> Result<(Vec<Routed>, Arc<BrokerStats>), PublishError> {
        let broker = {
            let brokers = self.brokers.read().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                brokers
                    .get(key)
                    .ok_or_else(|| PublishError::UnknownBroker(key.clone()))?,
            )
        };
        let arrival = Utc::now().to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut prepared = Vec::with_capacity(events.len());
        for mut event in events {
            let ttl = match event.remove_extension(TTL_EXTENSION) {
                None => DEFAULT_TTL,
                Some(v) => match parse_ttl(&v) {
                    Some(t) => t - 1,
                    None => DEFAULT_TTL,
                },
            };
            if ttl <= 0 {
                return Err(PublishError::TtlExhausted);
            }
            event.set_extension("knativearrivaltime", arrival.clone());
            let matching: Vec<Arc<TriggerRuntime>> = broker
                .triggers
                .iter()
                .filter(|t| t.spec.load().filter.matches(&event))
                .cloned()
                .collect();
            prepared.push((
                Envelope {
                    event: Arc::new(event),
                    ttl,
                    headers: headers.clone(),
                    seq: None,
                    attempts: 0,
                    acker: None,
                },
                matching,
            ));
        }
        Ok((prepared, Arc::clone(&broker.stats)))
    }

    /// Counts, once `result` says they were accepted, the events of `prepared` (all, and those
    /// no trigger matched).
    fn count_accepted(
        stats: &BrokerStats,
        (all, unmatched): (u64, u64),
        result: Result<(), PublishError>,
    ) -> Result<(), PublishError> {
        if result.is_ok() {
            metrics::add(&stats.accepted, all);
            metrics::add(&stats.unmatched, unmatched);
        }
        result
    }

    fn sizes(prepared: &[Routed]) -> (u64, u64) {
        let unmatched = prepared.iter().filter(|(_, t)| t.is_empty()).count();
        (prepared.len() as u64, unmatched as u64)
    }

    /// Memory mode: queues each event for its triggers, all or nothing: when any matching
    /// trigger is full, nothing is queued and the caller gets [`PublishError::Full`].
    fn enqueue(prepared: Vec<Routed>) -> Result<(), PublishError> {
        let mut permits = Vec::new();
        for (env, triggers) in &prepared {
            for trigger in triggers {
                let lane = trigger.lanes.for_event(&env.event);
                match lane.try_reserve() {
                    Ok(permit) => permits.push((permit, env.clone())),
                    Err(_) => {
                        let spec = trigger.spec.load();
                        let name = format!("{}/{}", spec.namespace, spec.name);
                        // A batch with more events for this queue than it ever holds.
                        let wanted = prepared
                            .iter()
                            .filter(|(e, ts)| {
                                ts.iter().any(|t| Arc::ptr_eq(t, trigger))
                                    && trigger.lanes.for_event(&e.event).same_channel(lane)
                            })
                            .count();
                        if wanted > lane.max_capacity() {
                            return Err(PublishError::TooLarge(format!(
                                "the request has {wanted} events for trigger {name}, whose queue \
                                 holds {} (--queue); send at most that many at a time",
                                lane.max_capacity()
                            )));
                        }
                        return Err(PublishError::Full(name));
                    }
                }
            }
        }
        for (permit, env) in permits {
            permit.send(env);
        }
        Ok(())
    }

    fn appends(prepared: Vec<Routed>) -> Vec<Append> {
        prepared
            .into_iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(env, triggers)| Append {
                event: env.event,
                ttl: env.ttl,
                headers: env.headers,
                triggers: triggers.iter().filter_map(|t| t.log_id).collect(),
            })
            .collect()
    }

    /// Accepts events into a broker. With the durable log this resolves once the events are on
    /// disk (202 means safe); in memory mode, once they are queued.
    pub async fn publish(&self, key: &BrokerKey, events: Vec<Event>) -> Result<(), PublishError> {
        self.publish_with(key, events, Passthrough::default()).await
    }

    /// [`publish`](Self::publish) with the request headers that pass through to subscribers.
    pub async fn publish_with(
        &self,
        key: &BrokerKey,
        events: Vec<Event>,
        headers: Passthrough,
    ) -> Result<(), PublishError> {
        let (prepared, stats) = self.prepare(key, events, headers)?;
        let sizes = Self::sizes(&prepared);
        let result = if let Some(nats) = &self.config.nats {
            // Events no trigger wants are not kept; each replica has the same triggers.
            let events: Vec<_> = prepared
                .into_iter()
                .filter(|(_, t)| !t.is_empty())
                .map(|(env, _)| (env.event, env.ttl, env.headers))
                .collect();
            if events.is_empty() {
                Ok(())
            } else {
                nats.publish(key, events).await.map_err(PublishError::from)
            }
        } else {
            match &self.config.log {
                Some(log) => Ok(log.append(Self::appends(prepared)).await?),
                None => Self::enqueue(prepared),
            }
        };
        Self::count_accepted(&stats, sizes, result)
    }

    /// Same as [`publish`](Self::publish), for threads that are not Tokio workers.
    pub fn publish_blocking(
        &self,
        key: &BrokerKey,
        events: Vec<Event>,
        headers: Passthrough,
    ) -> Result<(), PublishError> {
        if self.config.nats.is_some() {
            return tokio::runtime::Handle::current()
                .block_on(self.publish_with(key, events, headers));
        }
        let (prepared, stats) = self.prepare(key, events, headers)?;
        let sizes = Self::sizes(&prepared);
        let result = match &self.config.log {
            Some(log) => Ok(log.append_blocking(Self::appends(prepared))?),
            None => Self::enqueue(prepared),
        };
        Self::count_accepted(&stats, sizes, result)
    }

    /// Drops what the log still owes to triggers that are no longer declared, and events past
    /// the log's maximum age, in the background. Call once every trigger is added.
    pub fn collect_garbage(&self) {
        let Some(log) = self.config.log.clone() else {
            return;
        };
        let live = Arc::clone(&self.live_log_ids);
        tokio::spawn(async move {
            match log.collect_garbage(&live).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    dropped = n,
                    "dropped deliveries owed to triggers that are gone or past the log's maximum age"
                ),
                Err(e) => tracing::error!(error = %e, "log garbage collection failed"),
            }
        });
    }

    /// Sends one event from a source to a sink, once: into a broker of this process (no HTTP
    /// hop), to a Function, or to an HTTP endpoint. The source decides about retries.
    pub async fn send_to(
        &self,
        sink: &Sink,
        namespace: &str,
        event: Event,
    ) -> Result<(), SendToError> {
        let outcome = match sink {
            Sink::Broker(key) => {
                return self
                    .publish(key, vec![event])
                    .await
                    .map_err(SendToError::from);
            }
            Sink::Function(f) => {
                sink::send_function(f, Arc::new(event), &self.config.output, None).await
            }
            Sink::Http(uri, own) => {
                let client = own.as_deref().unwrap_or(&self.client);
                let options = sink::SendOptions {
                    namespace,
                    timeout: None,
                    structured: false,
                    replies: false,
                };
                let none = Passthrough::default();
                sink::send_http(client, uri, &event, &none, options).await
            }
        };
        let (f, permanent) = match outcome {
            Outcome::Delivered(_) => return Ok(()),
            Outcome::Retry(f) => (f, false),
            Outcome::Fail(f) => (f, true),
        };
        Err(SendToError {
            message: format!(
                "{} answered {}: {}",
                sink.describe(),
                f.code.map_or("no response".to_string(), |c| c.to_string()),
                String::from_utf8_lossy(&f.data)
            ),
            permanent,
        })
    }

    /// Stops taking events and waits (up to `grace`) for queued and in-flight deliveries.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stopping.send(true);
        self.brokers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let workers: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        let all = futures_join(workers);
        if tokio::time::timeout(grace, all).await.is_err() {
            if self.config.log.is_none() && self.config.nats.is_none() {
                tracing::error!(
                    "shutdown: deliveries still in flight after {} ms; with --store memory, the \
                     events still queued are lost",
                    grace.as_millis()
                );
            } else {
                tracing::warn!(
                    "shutdown: deliveries still in flight after {} ms; the store keeps them for \
                     the next start",
                    grace.as_millis()
                );
            }
        }
    }

    /// A trigger whose subscriber is a Wasm Function is served by OS threads (as many as the
    /// machine has cores, at most its concurrency): each takes the next event and runs the Wasm
    /// filter and the subscriber on the spot, publishing a reply from there. Only a failed
    /// attempt goes to an async task for its backoff, retries and dead letter. Under load a
    /// thread finds the next event waiting, so the hot path has no task spawn and no hand-off.
    fn start_wasm_workers(
        self: &Arc<Self>,
        worker: Worker,
        rx: mpsc::Receiver<Envelope>,
        concurrency: usize,
    ) -> Vec<JoinHandle<()>> {
        let Worker {
            cell,
            gate,
            alive,
            finished,
        } = worker;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = concurrency.clamp(1, cores);
        let rx = Arc::new(Mutex::new(rx));
        // Events whose first attempt failed wait for their retries on tasks; at most
        // `concurrency` at once, as an HTTP subscriber's do (beyond that the threads wait, the
        // queue fills and producers get 429: memory stays bounded).
        let retrying = Arc::new(Semaphore::new(concurrency.max(1)));
        let runtime = tokio::runtime::Handle::current();
        let mut handles = Vec::new();
        for i in 0..threads {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let mesh = Arc::clone(self);
            let cell = Arc::clone(&cell);
            let rx = Arc::clone(&rx);
            let runtime = runtime.clone();
            let (gate, alive, finished) = (gate.clone(), alive.clone(), Arc::clone(&finished));
            let retrying = Arc::clone(&retrying);
            let trigger_name = cell.load().name.clone();
            let name = format!("wasm-{trigger_name}-{i}");
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                let _alive = alive;
                runtime.block_on(wait_for_gate(gate));
                let _enter = runtime.enter();
                loop {
                    let next = rx
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .blocking_recv();
                    let Some(env) = next else { break };
                    mesh.deliver_on_thread(&cell.load_full(), env, &runtime, &retrying);
                    finished.fetch_add(1, Ordering::Release);
                }
                drop(done_tx);
            });
            match spawned {
                Ok(_) => handles.push(tokio::spawn(async move {
                    let _ = done_rx.await;
                })),
                Err(e) => {
                    tracing::error!(trigger = %trigger_name, error = %e, "cannot start a Wasm worker thread")
                }
            }
        }
        handles
    }

    /// The first attempt of a Wasm delivery, synchronously on a worker thread.
    fn deliver_on_thread(
        self: &Arc<Self>,
        t: &Arc<TriggerSpecRuntime>,
        env: Envelope,
        runtime: &tokio::runtime::Handle,
        retrying: &Arc<Semaphore>,
    ) {
        // The rest of a delivery, on a task once this thread has a slot for it.
        let later = |work: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let slot = runtime.block_on(Arc::clone(retrying).acquire_owned()).ok();
            runtime.spawn(async move {
                work.await;
                drop(slot);
            });
        };
        if env.abandoned() {
            return;
        }
        env.start();
        if let Some(wf) = &t.wasm_filter {
            match wf.matches(&env.event).1 {
                Ok(called) => {
                    self.config.output.write(wf.name(), &called.output);
                    if !called.value {
                        metrics::add(&t.stats.filtered, 1);
                        self.done(&env);
                        return;
                    }
                }
                Err(e) => {
                    self.config.output.write(wf.name(), &e.output);
                    tracing::warn!(trigger = %t.name, error = %e, "wasm filter failed");
                    let failure = Failure::message(Some(500), e.to_string());
                    let (mesh, t, wf) = (Arc::clone(self), Arc::clone(t), Arc::clone(wf));
                    later(Box::pin(async move {
                        mesh.dead_letter(&t, &env, &Sink::Function(wf), failure)
                            .await;
                        mesh.done(&env);
                    }));
                    return;
                }
            }
        }
        let first = match &t.subscriber {
            Sink::Function(f) => {
                sink::call_function(f, &env.event, &self.config.output, t.policy.timeout)
            }
            // The trigger changed to another kind of subscriber while this event was queued.
            _ => {
                let (mesh, t) = (Arc::clone(self), Arc::clone(t));
                later(Box::pin(async move {
                    mesh.finish_delivery(&t, env, None).await
                }));
                return;
            }
        };
        match first {
            Outcome::Delivered(Some(reply)) => {
                metrics::add(&t.stats.delivered, 1);
                let (reply, headers) = Self::reply_of(reply, &env);
                let result = self.publish_blocking(&t.broker, vec![reply.clone()], headers.clone());
                if !Self::again(t, &reply, result, 0) {
                    self.done(&env);
                    return;
                }
                // The broker is full: the reply is published again after a backoff, off this
                // thread (for an ordered trigger, its lane waits), and the event acknowledged then.
                let ordered = t.policy.ordered_by.is_some();
                let (mesh, t) = (Arc::clone(self), Arc::clone(t));
                let retry = async move {
                    mesh.publish_reply(&t, reply, headers, 1, env.acker.as_deref())
                        .await;
                    mesh.done(&env);
                };
                if ordered {
                    runtime.block_on(retry);
                } else {
                    later(Box::pin(retry));
                }
            }
            Outcome::Delivered(None) => {
                metrics::add(&t.stats.delivered, 1);
                self.done(&env);
            }
            failed if t.policy.ordered_by.is_some() => {
                // Ordered: the lane waits for this event's retries before the next event.
                runtime.block_on(self.finish_delivery(t, env, Some(failed)));
            }
            failed => {
                let (mesh, t) = (Arc::clone(self), Arc::clone(t));
                later(Box::pin(async move {
                    mesh.finish_delivery(&t, env, Some(failed)).await
                }));
            }
        }
    }

    async fn run_trigger(
        self: Arc<Self>,
        worker: Worker,
        mut rx: mpsc::Receiver<Envelope>,
        concurrency: usize,
    ) {
        let Worker {
            cell,
            gate,
            alive: _alive,
            finished,
        } = worker;
        wait_for_gate(gate).await;
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut inflight = tokio::task::JoinSet::new();
        while let Some(env) = rx.recv().await {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                break;
            };
            let mesh = Arc::clone(&self);
            let trigger = cell.load_full();
            let finished = Arc::clone(&finished);
            inflight.spawn(async move {
                mesh.deliver(&trigger, env).await;
                finished.fetch_add(1, Ordering::Release);
                drop(permit);
            });
            while inflight.try_join_next().is_some() {}
        }
        while inflight.join_next().await.is_some() {}
    }

    /// One event to one trigger: the Wasm filter, then the subscriber with retries, then the
    /// reply or the dead letter.
    async fn deliver(&self, t: &TriggerSpecRuntime, env: Envelope) {
        if env.abandoned() {
            return;
        }
        env.start();
        if let Some(wf) = &t.wasm_filter {
            let f = Arc::clone(wf);
            let ev = Arc::clone(&env.event);
            match tokio::task::spawn_blocking(move || f.matches(&ev).1).await {
                Ok(Ok(called)) => {
                    self.config.output.write(wf.name(), &called.output);
                    if !called.value {
                        metrics::add(&t.stats.filtered, 1);
                        self.done(&env);
                        return;
                    }
                }
                Ok(Err(e)) => {
                    self.config.output.write(wf.name(), &e.output);
                    tracing::warn!(trigger = %t.name, error = %e, "wasm filter failed");
                    let failure = Failure::message(Some(500), e.to_string());
                    self.dead_letter(t, &env, &Sink::Function(Arc::clone(wf)), failure)
                        .await;
                    self.done(&env);
                    return;
                }
                // Shutting down: the event stays owed (durable mode) for the next start.
                Err(e) if e.is_cancelled() => return,
                // A panic in the host while filtering: a failure like any other, not an event
                // left neither acknowledged nor dead-lettered.
                Err(e) => {
                    tracing::error!(trigger = %t.name, error = %e, "wasm filter aborted");
                    let failure = Failure::message(Some(500), format!("wasm filter aborted: {e}"));
                    self.dead_letter(t, &env, &Sink::Function(Arc::clone(wf)), failure)
                        .await;
                    self.done(&env);
                    return;
                }
            }
        }
        self.finish_delivery(t, env, None).await;
    }

    /// The subscriber with retries (continuing after `first` when the first attempt was made
    /// elsewhere), then the reply or the dead letter.
    async fn finish_delivery(&self, t: &TriggerSpecRuntime, env: Envelope, first: Option<Outcome>) {
        if let Some(acker) = env.acker.clone()
            && t.policy.ordered_by.is_none()
        {
            return self.finish_jetstream(t, env, first, acker).await;
        }
        let mut first = first;
        let event = &env.event;
        let log = self.config.log.clone().zip(env.seq);
        let acker = env.acker.clone();
        let record = |attempts: u32| {
            let log = log.clone();
            let acker = acker.clone();
            metrics::add(&t.stats.retried, 1);
            async move {
                if let Some((log, (id, seq))) = log {
                    log.attempted(id, seq, attempts).await;
                }
                // JetStream, ordered: the message stays in flight while its retries run here
                // (as long as this replica holds the trigger's lease).
                if let Some(a) = acker.filter(|a| a.lease_held()) {
                    let _ = a.ack_with(async_nats::jetstream::AckKind::Progress).await;
                }
            }
        };
        let env_ref = &env;
        let result = retry_loop(&t.policy, &t.name, env.attempts, record, || {
            let ready = first.take();
            async move {
                match ready {
                    Some(outcome) => outcome,
                    // JetStream, ordered: the lease went to another replica, which delivers
                    // this event again in its turn; no more attempts here.
                    None if env_ref.abandoned() => {
                        Outcome::Fail(Failure::message(None, "the trigger's lease was lost"))
                    }
                    None => {
                        self.send_once(t, &t.subscriber, event, &env_ref.headers, true)
                            .await
                    }
                }
            }
        })
        .await;
        if result.is_ok() {
            metrics::add(&t.stats.delivered, 1);
        }
        match result {
            Ok(Some(reply)) => self.reply(t, reply, &env).await,
            Ok(None) => {}
            // Neither dead-lettered nor acknowledged: the next holder has it.
            Err(_) if env.abandoned() => return,
            Err(failure) => self.dead_letter(t, &env, &t.subscriber, failure).await,
        }
        self.done(&env);
    }

    /// JetStream, unordered: one attempt here; a retryable failure is NAKed with the trigger's
    /// backoff, and JetStream delivers the event again later, to this replica or another. Past
    /// the retry limit, or for a failure that is not retried, the dead-letter sink.
    async fn finish_jetstream(
        &self,
        t: &TriggerSpecRuntime,
        env: Envelope,
        first: Option<Outcome>,
        acker: Arc<crate::nats::AckHandle>,
    ) {
        let outcome = match first {
            Some(o) => o,
            None => {
                self.send_once(t, &t.subscriber, &env.event, &env.headers, true)
                    .await
            }
        };
        match outcome {
            Outcome::Delivered(reply) => {
                metrics::add(&t.stats.delivered, 1);
                if let Some(reply) = reply {
                    self.reply(t, reply, &env).await;
                }
            }
            Outcome::Retry(f) if env.attempts < t.policy.retry => {
                metrics::add(&t.stats.retried, 1);
                let wait = t.policy.wait(f.retry_after, env.attempts + 1);
                tracing::info!(
                    trigger = %t.name, retry = env.attempts + 1, wait_ms = wait.as_millis() as u64,
                    code = ?f.code, "retrying (JetStream NAK)"
                );
                if let Err(e) = acker
                    .ack_with(async_nats::jetstream::AckKind::Nak(Some(wait)))
                    .await
                {
                    tracing::warn!(error = %e, "JetStream NAK failed; the event comes again after the ack wait");
                }
                return;
            }
            Outcome::Retry(f) | Outcome::Fail(f) => {
                self.dead_letter(t, &env, &t.subscriber, f).await
            }
        }
        self.done(&env);
    }

    /// The delivery is finished (delivered, filtered out, or dead-lettered): the log no longer
    /// owes it.
    fn done(&self, env: &Envelope) {
        if let (Some((id, seq)), Some(log)) = (env.seq, &self.config.log) {
            log.ack(id, seq);
        }
        if let Some(acker) = &env.acker {
            let acker = Arc::clone(acker);
            tokio::spawn(async move {
                if let Err(e) = acker.ack().await {
                    tracing::warn!(error = %e, "JetStream ack failed; the event will come again");
                }
            });
        }
    }

    /// To a dead-letter sink: with the trigger's retries, its answer's body ignored.
    async fn send_with_retries(
        &self,
        t: &TriggerSpecRuntime,
        sink: &Sink,
        event: &Arc<Event>,
        headers: &Passthrough,
    ) -> Result<Option<Reply>, Failure> {
        retry_loop(
            &t.policy,
            &t.name,
            0,
            |_| async {},
            || self.send_once(t, sink, event, headers, false),
        )
        .await
    }

    /// One attempt; `replies` for the trigger's subscriber (see [`sink::SendOptions`]).
    async fn send_once(
        &self,
        t: &TriggerSpecRuntime,
        sink: &Sink,
        event: &Arc<Event>,
        headers: &Passthrough,
        replies: bool,
    ) -> Outcome {
        match sink {
            Sink::Function(f) => {
                sink::send_function(f, Arc::clone(event), &self.config.output, t.policy.timeout)
                    .await
            }
            Sink::Http(uri, own) => {
                let client = own.as_deref().unwrap_or(&self.client);
                let options = sink::SendOptions {
                    namespace: &t.namespace,
                    timeout: t.policy.timeout,
                    structured: t.policy.structured,
                    replies,
                };
                sink::send_http(client, uri, event, headers, options).await
            }
            Sink::Broker(key) => match self
                .publish_with(key, vec![(**event).clone()], headers.clone())
                .await
            {
                Ok(()) => Outcome::Delivered(None),
                Err(PublishError::Full(why)) => Outcome::Retry(Failure::message(Some(429), why)),
                Err(PublishError::Log(e @ LogError::Full(_))) => {
                    Outcome::Retry(Failure::message(Some(429), e.to_string()))
                }
                Err(e @ (PublishError::Log(LogError::TooLarge(_)) | PublishError::TooLarge(_))) => {
                    Outcome::Fail(Failure::message(Some(413), e.to_string()))
                }
                Err(PublishError::Log(e)) => {
                    Outcome::Retry(Failure::message(Some(503), e.to_string()))
                }
                Err(e) => Outcome::Fail(Failure::message(Some(400), e.to_string())),
            },
        }
    }

    /// A reply goes back into the trigger's broker with the event's TTL, one hop spent there.
    /// On a worker thread (`blocking`) it is appended with a blocking call.
    /// A broker that cannot take the reply yet (full, or its store cannot write) gets it again
    /// after the trigger's backoff, up to its retry count; the caller acknowledges the event
    /// that caused the reply only after this.
    async fn reply(&self, t: &TriggerSpecRuntime, reply: Reply, env: &Envelope) {
        let (reply, headers) = Self::reply_of(reply, env);
        self.publish_reply(t, reply, headers, 0, env.acker.as_deref())
            .await;
    }

    /// A reply to `env`'s event as it goes back into the broker: with the envelope's TTL, and
    /// the response's pass-through headers, or the event's when the response has none (a
    /// Function's reply: its `x-request-id` and trace headers continue).
    fn reply_of(reply: Reply, env: &Envelope) -> (Event, Passthrough) {
        let mut event = *reply.event;
        event.set_extension(TTL_EXTENSION, ExtensionValue::Integer(i64::from(env.ttl)));
        let headers = if reply.headers.is_empty() {
            env.headers.clone()
        } else {
            reply.headers
        };
        (event, headers)
    }

    /// Publishes `reply`, `tries` having been made before. Over JetStream the event that caused
    /// it is reported in progress while the reply waits, so that it does not come again.
    async fn publish_reply(
        &self,
        t: &TriggerSpecRuntime,
        reply: Event,
        headers: Passthrough,
        mut tries: u32,
        acker: Option<&crate::nats::AckHandle>,
    ) {
        loop {
            if tries > 0 {
                let until = tokio::time::Instant::now() + t.policy.backoff(tries);
                loop {
                    if let Some(a) = acker.filter(|a| a.lease_held()) {
                        let _ = a.ack_with(async_nats::jetstream::AckKind::Progress).await;
                    }
                    let now = tokio::time::Instant::now();
                    if now >= until {
                        break;
                    }
                    // Ack waits are 2 s at least.
                    tokio::time::sleep((until - now).min(Duration::from_secs(1))).await;
                }
            }
            let result = self
                .publish_with(&t.broker, vec![reply.clone()], headers.clone())
                .await;
            if !Self::again(t, &reply, result, tries) {
                return;
            }
            tries += 1;
        }
    }

    /// Counts or logs what became of a reply; true when it should be published again.
    fn again(
        t: &TriggerSpecRuntime,
        reply: &Event,
        result: Result<(), PublishError>,
        tries: u32,
    ) -> bool {
        let id = reply.id().to_string();
        match result {
            Ok(()) => {
                metrics::add(&t.stats.replies, 1);
                tracing::debug!(trigger = %t.name, reply = %id, "reply published");
                false
            }
            Err(PublishError::TtlExhausted) => {
                tracing::info!(trigger = %t.name, reply = %id, "reply dropped: TTL exhausted (a reply loop ends here)");
                false
            }
            Err(
                e
                @ (PublishError::Full(_) | PublishError::Log(LogError::Full(_) | LogError::Io(_))),
            ) if tries < t.policy.retry => {
                tracing::info!(trigger = %t.name, reply = %id, retry = tries + 1, error = %e, "the broker cannot take the reply yet; trying it again");
                true
            }
            Err(e) => {
                tracing::error!(trigger = %t.name, reply = %id, error = %e, tries = tries + 1, "reply lost");
                false
            }
        }
    }

    /// After the last retry: the event, with Knative's error extensions, to the dead-letter sink.
    async fn dead_letter(
        &self,
        t: &TriggerSpecRuntime,
        env: &Envelope,
        dest: &Sink,
        failure: Failure,
    ) {
        let event = &env.event;
        let Some(dls) = &t.policy.dead_letter else {
            metrics::add(&t.stats.dropped, 1);
            tracing::error!(
                trigger = %t.name, event = %event.id(), destination = %dest.describe(),
                code = ?failure.code, "delivery failed and no dead-letter sink is set: event dropped"
            );
            return;
        };
        let mut dead = (**event).clone();
        dead.set_extension("knativeerrordest", dest.describe());
        if let Some(code) = failure.code {
            dead.set_extension("knativeerrorcode", ExtensionValue::Integer(i64::from(code)));
        }
        if !failure.data.is_empty() {
            let mut data = base64::engine::general_purpose::STANDARD.encode(&failure.data);
            data.truncate(1024);
            dead.set_extension("knativeerrordata", data);
        }
        let dead = Arc::new(dead);
        let mut policy_less = TriggerSpecRuntime {
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            broker: t.broker.clone(),
            filter: Filter::True,
            wasm_filter: None,
            subscriber: dls.clone(),
            policy: t.policy.clone(),
            // Its retries count as the dead-letter sink's, not the trigger's.
            stats: Arc::default(),
        };
        policy_less.policy.dead_letter = None;
        match self
            .send_with_retries(&policy_less, dls, &dead, &env.headers)
            .await
        {
            Ok(_) => {
                metrics::add(&t.stats.dead_lettered, 1);
                tracing::info!(trigger = %t.name, event = %event.id(), sink = %dls.describe(), "dead-lettered")
            }
            Err(f) => {
                metrics::add(&t.stats.dropped, 1);
                tracing::error!(
                trigger = %t.name, event = %event.id(), sink = %dls.describe(), code = ?f.code,
                "the dead-letter sink failed too: event dropped"
                )
            }
        }
    }
}

/// Durable mode: reads what the log owes a trigger, oldest first, into the trigger's queue.
/// The queue is bounded, so memory stays bounded however far the log runs ahead.
async fn feed(
    log: Arc<DurableLog>,
    trigger: u64,
    lanes: Lanes,
    fed: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut retire: tokio::sync::watch::Receiver<bool>,
) {
    let notify = log.notifier(trigger);
    let mut after = fed.load(Ordering::Acquire);
    loop {
        let batch = match log.owed(trigger, after, 256) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the event log; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = notify.notified() => continue,
                _ = stop.changed() => return,
                _ = retire.changed() => return,
            }
        }
        for owed in batch {
            after = owed.seq;
            let env = Envelope {
                event: owed.event,
                ttl: owed.ttl,
                headers: owed.headers,
                seq: Some((trigger, owed.seq)),
                attempts: owed.attempts,
                acker: None,
            };
            let queue = lanes.for_event(&env.event).clone();
            tokio::select! {
                sent = queue.send(env) => if sent.is_err() { return },
                _ = stop.changed() => return,
                _ = retire.changed() => return,
            }
            fed.store(after, Ordering::Release);
        }
    }
}

/// Attempts a delivery until it succeeds, fails for good, or the policy's retries are spent;
/// between attempts it waits the subscriber's `retry-after` or the policy's backoff.
/// `already` counts retries made before (a restart); `record` is told each new count.
pub(crate) async fn retry_loop<F, Fut, R, RecFut>(
    policy: &DeliveryPolicy,
    trigger: &str,
    already: u32,
    record: R,
    mut attempt: F,
) -> Result<Option<Reply>, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Outcome>,
    R: Fn(u32) -> RecFut,
    RecFut: std::future::Future<Output = ()>,
{
    let mut retries = already;
    loop {
        let failure = match attempt().await {
            Outcome::Delivered(reply) => return Ok(reply),
            Outcome::Fail(f) => return Err(f),
            Outcome::Retry(f) => f,
        };
        if retries >= policy.retry {
            return Err(failure);
        }
        retries += 1;
        // The count is on disk before the wait: a restart resumes the budget, not a fresh one.
        record(retries).await;
        let wait = policy.wait(failure.retry_after, retries);
        tracing::info!(
            trigger,
            retry = retries,
            wait_ms = wait.as_millis() as u64,
            code = ?failure.code,
            "retrying"
        );
        tokio::time::sleep(wait).await;
    }
}

fn parse_ttl(v: &ExtensionValue) -> Option<i32> {
    match v {
        ExtensionValue::Integer(i) => i32::try_from(*i).ok(),
        ExtensionValue::String(s) => s.trim().parse().ok(),
        ExtensionValue::Boolean(_) => None,
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;
    use wasmesh_core::resources::BackoffPolicy;

    /// Retries with paused time: the waits between attempts are exactly the policy's backoff.
    async fn gaps(backoff: BackoffPolicy, retry: u32, succeed_on: usize) -> (Vec<Duration>, bool) {
        let policy = DeliveryPolicy {
            retry,
            backoff,
            delay: Duration::from_millis(100),
            ..Default::default()
        };
        let times = std::sync::Mutex::new(Vec::new());
        let result = retry_loop(
            &policy,
            "t",
            0,
            |_| async {},
            || {
                let n = {
                    let mut t = times.lock().expect("lock");
                    t.push(Instant::now());
                    t.len()
                };
                async move {
                    if n == succeed_on {
                        Outcome::Delivered(None)
                    } else {
                        Outcome::Retry(Failure::message(Some(503), "busy"))
                    }
                }
            },
        )
        .await;
        let t = times.into_inner().expect("lock");
        (t.windows(2).map(|w| w[1] - w[0]).collect(), result.is_ok())
    }

    #[tokio::test(start_paused = true)]
    async fn linear_backoff_between_retries() {
        let (g, ok) = gaps(BackoffPolicy::Linear, 3, 0).await;
        assert!(
            !ok,
            "every attempt failed: the error goes to the dead-letter sink"
        );
        let ms: Vec<u128> = g.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn exponential_backoff_between_retries() {
        let (g, ok) = gaps(BackoffPolicy::Exponential, 3, 3).await;
        assert!(ok, "the third attempt succeeded");
        let ms: Vec<u128> = g.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [200, 400]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_wins_and_fail_stops_at_once() {
        let policy = DeliveryPolicy::default();
        let mut n = 0;
        let start = Instant::now();
        let r = retry_loop(
            &policy,
            "t",
            0,
            |_| async {},
            || {
                n += 1;
                let first = n == 1;
                async move {
                    if first {
                        Outcome::Retry(Failure {
                            retry_after: Some(crate::delivery::AskedDelay::RetryAfter(
                                Duration::from_secs(7),
                            )),
                            ..Default::default()
                        })
                    } else {
                        Outcome::Fail(Failure::message(Some(400), "bad"))
                    }
                }
            },
        )
        .await;
        assert_eq!(n, 2);
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        assert_eq!(r.expect_err("failed").code, Some(400));
    }
}
