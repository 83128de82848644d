//! The store's events into a trigger's queues: a feeder per trigger reads what the durable log
//! or a JetStream consumer owes it, as fast as its workers take them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::log::DurableLog;
use crate::nats::NatsStore;

use super::{Envelope, Lanes, Mesh, TriggerRuntime};

/// A trigger's feeder: what stops it, and the last log position it queued.
pub(super) struct Feeder {
    stop: tokio::sync::watch::Sender<bool>,
    handle: JoinHandle<()>,
    fed: Arc<AtomicU64>,
}

impl Mesh {
    /// Stops a trigger's feeder; returns the last log position it queued. Its queue closes
    /// once nothing routes to it, and its workers end after the events they hold.
    pub(super) async fn retire(trigger: &TriggerRuntime) -> u64 {
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

    pub(super) fn start_feeder(&self, trigger: &TriggerRuntime, after: u64) {
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
                        p.acker.settle();
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
