//! A subscriber's reply goes back into the trigger's broker, one TTL hop spent, and is tried
//! again while the broker cannot take it.

use std::time::Duration;

use wasmesh_core::{AttributesReader, Event, ExtensionValue};

use crate::log::LogError;
use crate::metrics;
use crate::passthrough::Passthrough;
use crate::sink::Reply;

use super::{Envelope, Mesh, PublishError, TTL_EXTENSION, TriggerSpecRuntime};

impl Mesh {
    /// A reply goes back into the trigger's broker with the event's TTL, one hop spent there.
    /// On a worker thread (`blocking`) it is appended with a blocking call.
    /// A broker that cannot take the reply yet (full, or its store cannot write) gets it again
    /// after the trigger's backoff, up to its retry count; the caller acknowledges the event
    /// that caused the reply only after this, and only when this returns true (false: wasmesh
    /// is stopping and the reply could not go in, so the event stays owed for the next start).
    pub(super) async fn reply(&self, t: &TriggerSpecRuntime, reply: Reply, env: &Envelope) -> bool {
        let (reply, headers) = Self::reply_of(reply, env);
        self.publish_reply(t, reply, headers, 0, env.acker.as_deref())
            .await
    }

    /// A reply to `env`'s event as it goes back into the broker: with the envelope's TTL, and
    /// the response's pass-through headers, or the event's when the response has none (a
    /// Function's reply: its `x-request-id` and trace headers continue).
    pub(super) fn reply_of(reply: Reply, env: &Envelope) -> (Event, Passthrough) {
        let mut event = *reply.event;
        event.set_extension(TTL_EXTENSION, ExtensionValue::Integer(i64::from(env.ttl)));
        let headers = if reply.headers.is_empty() {
            env.headers.clone()
        } else {
            reply.headers
        };
        (event, headers)
    }

    /// Publishes `reply`, `tries` having been made before; true once the reply is settled (see
    /// [`reply`](Self::reply)). Over JetStream the event that caused it is reported in progress
    /// while the reply waits, so that it does not come again.
    pub(super) async fn publish_reply(
        &self,
        t: &TriggerSpecRuntime,
        reply: Event,
        headers: Passthrough,
        mut tries: u32,
        acker: Option<&crate::nats::AckHandle>,
    ) -> bool {
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
            match self.after_reply(t, &reply, result, tries) {
                AfterReply::Settled => return true,
                AfterReply::Unsettled => return false,
                AfterReply::Again => tries += 1,
            }
        }
    }

    /// Counts or logs what became of one attempt to publish a reply.
    pub(super) fn after_reply(
        &self,
        t: &TriggerSpecRuntime,
        reply: &Event,
        result: Result<(), PublishError>,
        tries: u32,
    ) -> AfterReply {
        let id = reply.id().to_string();
        match result {
            Ok(()) => {
                metrics::add(&t.stats.replies, 1);
                tracing::debug!(trigger = %t.name, reply = %id, "reply published");
                AfterReply::Settled
            }
            Err(PublishError::TtlExhausted) => {
                tracing::info!(trigger = %t.name, reply = %id, "reply dropped: TTL exhausted (a reply loop ends here)");
                AfterReply::Settled
            }
            // The brokers are gone because wasmesh is stopping, not because they were removed.
            Err(PublishError::UnknownBroker(_)) if self.is_stopping() => {
                tracing::info!(trigger = %t.name, reply = %id, "stopping: the reply is not published, and the event that caused it is left unacknowledged (the durable log or JetStream delivers it again; with --store memory it is lost)");
                AfterReply::Unsettled
            }
            Err(
                e
                @ (PublishError::Full(_) | PublishError::Log(LogError::Full(_) | LogError::Io(_))),
            ) if tries < t.policy.retry => {
                tracing::info!(trigger = %t.name, reply = %id, retry = tries + 1, error = %e, "the broker cannot take the reply yet; trying it again");
                AfterReply::Again
            }
            Err(e) => {
                tracing::error!(trigger = %t.name, reply = %id, error = %e, tries = tries + 1, "reply lost");
                AfterReply::Settled
            }
        }
    }
}

/// What follows one attempt to publish a reply.
pub(super) enum AfterReply {
    /// Published, or lost for good: the event that caused it may be acknowledged.
    Settled,
    /// The broker cannot take it yet: publish it again after the backoff.
    Again,
    /// wasmesh is stopping: leave the event that caused it unacknowledged (the store keeps it
    /// for the next start, or another replica).
    Unsettled,
}
