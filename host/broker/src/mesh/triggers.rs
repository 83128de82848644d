//! Triggers created, changed, rebuilt and removed while events flow: a change the workers can
//! follow is swapped in place; otherwise new workers continue after the old ones, none of the
//! events lost or delivered twice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::sink::Sink;

use super::{
    BrokerKey, BrokerRuntime, Gate, Lanes, Mesh, PublishError, SpecCell, TriggerRuntime,
    TriggerSpecRuntime, Worker,
};

/// What a trigger's workers are built from; a change of shape builds new workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    lanes: usize,
    ordered_by: Option<String>,
    per_queue: usize,
    wasm: bool,
}

/// How long new workers wait at a gate for old ones that finish nothing meanwhile.
const GATE_LIMIT: Duration = Duration::from_secs(60);

/// What a trigger that was removed or rebuilt leaves to the one that takes its name next: its
/// old workers may still deliver events they took, so the successor continues in the log after
/// them and, for ordered delivery, waits for them at a gate.
pub(super) struct Retired {
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
pub(super) enum Predecessor {
    /// Still routed: it is retired once the new one is routed.
    Running(Arc<TriggerRuntime>),
    /// Removed before.
    Removed(Retired),
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

impl Mesh {
    pub(super) fn shape(&self, spec: &TriggerSpecRuntime) -> Shape {
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
    pub(super) async fn succeed(
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

    /// A trigger no longer routed: no longer live for the log's garbage collection; its feeder
    /// stops, and what a trigger declared again under its name needs is kept while its workers
    /// may still run.
    pub(super) async fn set_aside(&self, trigger: &TriggerRuntime) {
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

    pub(super) fn find_trigger(
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
}
