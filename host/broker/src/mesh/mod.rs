//! The running data plane: brokers, their triggers, and the path of an event through them.
//!
//! One file a step: [`publish`](Mesh::publish) (`publish.rs`) stamps an event, applies the TTL
//! rules and the triggers' native filters, and puts it where events wait: a bounded in-memory
//! queue per trigger, the durable log (`log/`) or JetStream (`nats.rs`), the seam between
//! ingress and delivery. `feed.rs` reads the log or JetStream into each trigger's queue;
//! `dispatch.rs` runs a trigger's workers (Wasm filter, subscriber, retries); `reply.rs` and
//! `dead_letter.rs` take what a delivery ends with. `triggers.rs` creates, changes and removes
//! triggers while events flow.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wasmesh_core::Event;
use wasmesh_core::filter::Filter;

use crate::delivery::DeliveryPolicy;
use crate::log::{DurableLog, LogError};
use crate::metrics::{self, BrokerStats, IngressStats, TriggerStats};
use crate::nats::NatsStore;
use crate::output::FunctionOutput;
use crate::passthrough::Passthrough;
use crate::sink::{self, HttpClient, Sink};
use crate::slot::FunctionSlot;

mod dead_letter;
mod dispatch;
mod feed;
mod publish;
mod reply;
mod triggers;

pub(crate) use dispatch::retry_loop;
use feed::Feeder;
pub use publish::SOURCE_SEND_TIMEOUT;
pub use triggers::TriggerChange;
use triggers::{Retired, Shape};

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
    /// The per-request timeout of an HTTP delivery (to a subscriber or a dead-letter sink)
    /// whose trigger and broker set no `delivery.timeout`: a subscriber that never answers
    /// must not hold a delivery slot for ever.
    pub http_timeout: Duration,
}

/// The default of [`MeshConfig::http_timeout`]: ten minutes, the default request timeout of
/// Knative's Kafka broker.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            concurrency: 16,
            output: FunctionOutput::default(),
            log: None,
            nats: None,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
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

    /// Whether [`shutdown`](Self::shutdown) has begun: the brokers are gone because wasmesh
    /// stops, and what cannot be finished is left for the next start.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Stops taking events and waits (up to `grace`) for queued and in-flight deliveries.
    pub async fn shutdown(&self, grace: Duration) {
        // `send_replace`: the flag must read true even when nothing subscribes to it.
        self.stopping.send_replace(true);
        // What waits in the memory queues now, and how much is finished so far: at the end of
        // the grace, what was queued and not finished since is what memory loses.
        let (queued, finished_before, stats) = {
            let brokers = self.brokers.read().unwrap_or_else(PoisonError::into_inner);
            let triggers: Vec<_> = brokers.values().flat_map(|b| b.triggers.iter()).collect();
            let queued: u64 = triggers.iter().map(|t| t.queued()).sum();
            let stats: Vec<_> = triggers
                .iter()
                .map(|t| t.spec.load().stats.clone())
                .collect();
            (queued, finished(&stats), stats)
        };
        self.brokers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let workers: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        let all = futures_join(workers);
        if tokio::time::timeout(grace, all).await.is_err() {
            if self.config.log.is_none() && self.config.nats.is_none() {
                let lost = queued.saturating_sub(finished(&stats).saturating_sub(finished_before));
                tracing::error!(
                    lost_at_least = lost,
                    "shutdown: deliveries still in flight after {} ms; with --store memory, the \
                     events still queued are lost: at least {lost}",
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
}

/// Deliveries the triggers with these counters have finished (delivered, dead-lettered,
/// dropped or filtered out).
fn finished(stats: &[Arc<TriggerStats>]) -> u64 {
    stats
        .iter()
        .map(|s| {
            let c = s.counts(0);
            c.delivered + c.dead_lettered + c.dropped + c.filtered
        })
        .sum()
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}
