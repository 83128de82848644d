//! Events into a broker: arrival time, TTL, the native filters, then the store (in-memory
//! queues, the durable log or JetStream), and what sources send to sinks.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use wasmesh_core::{Event, ExtensionValue};

use crate::log::Append;
use crate::metrics::{self, BrokerStats};
use crate::passthrough::Passthrough;
use crate::sink::{self, Outcome, Sink};

use super::{
    BrokerKey, DEFAULT_TTL, Envelope, Mesh, PublishError, Routed, SendToError, TTL_EXTENSION,
    TriggerRuntime,
};

/// How long a source's send to an HTTP sink may take before it counts as failed (and is tried
/// again by the source): a sink that accepts the connection and never answers would otherwise
/// stop the source for good.
pub const SOURCE_SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl Mesh {
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
                    timeout: Some(SOURCE_SEND_TIMEOUT),
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
}

fn parse_ttl(v: &ExtensionValue) -> Option<i32> {
    match v {
        ExtensionValue::Integer(i) => i32::try_from(*i).ok(),
        ExtensionValue::String(s) => s.trim().parse().ok(),
        ExtensionValue::Boolean(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use wasmesh_core::EventBuilder as _;
    use wasmesh_core::EventBuilderV10;

    use super::*;
    use crate::MeshConfig;

    /// A sink that accepts connections and never answers: a source's send gives up after
    /// `SOURCE_SEND_TIMEOUT` (paused time: no real wait) and may be tried again.
    #[tokio::test(start_paused = true)]
    async fn a_source_send_to_a_sink_that_never_answers_fails_and_can_be_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let mesh = Mesh::new(MeshConfig::default());
        let uri: http::Uri = format!("http://{addr}/").parse().expect("uri");
        let event = EventBuilderV10::new()
            .id("1")
            .source("/ping")
            .ty("t")
            .build()
            .expect("event");
        let sent = tokio::time::timeout(
            SOURCE_SEND_TIMEOUT * 4,
            mesh.send_to(&Sink::Http(uri, None), "default", event),
        )
        .await
        .expect("the send ends instead of waiting for good");
        let e = sent.expect_err("nothing answered");
        assert!(!e.permanent, "a time-out is worth another try: {e}");
        assert!(e.message.contains("timed out"), "{e}");
    }
}
