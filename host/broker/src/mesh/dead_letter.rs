//! A delivery that failed for good goes to the dead-letter sink with Knative's error
//! extensions, or is counted as dropped when there is none.

use std::sync::Arc;

use base64::Engine as _;
use wasmesh_core::filter::Filter;
use wasmesh_core::{AttributesReader, Event, ExtensionValue};

use crate::metrics;
use crate::passthrough::Passthrough;
use crate::sink::{Failure, Reply, Sink};

use super::{Envelope, Mesh, TriggerSpecRuntime, retry_loop};

impl Mesh {
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

    /// After the last retry: the event, with Knative's error extensions, to the dead-letter
    /// sink. True when the event is settled (dead-lettered, or dropped for good); false while
    /// wasmesh stops, when the event would be dropped: it stays owed for the next start, as
    /// the failure may be the stop's own (a broker of this process that is gone).
    pub(super) async fn dead_letter(
        &self,
        t: &TriggerSpecRuntime,
        env: &Envelope,
        dest: &Sink,
        failure: Failure,
    ) -> bool {
        let event = &env.event;
        let Some(dls) = &t.policy.dead_letter else {
            if self.kept_for_next_start(t, event) {
                return false;
            }
            metrics::add(&t.stats.dropped, 1);
            tracing::error!(
                trigger = %t.name, event = %event.id(), destination = %dest.describe(),
                code = ?failure.code, "delivery failed and no dead-letter sink is set: event dropped"
            );
            return true;
        };
        let mut dead = (**event).clone();
        dead.set_extension("knativeerrordest", dest.describe());
        // No response at all (refused, timed out, a redirect loop; a Function that asked to
        // retry) is 500, as Knative's dispatcher reports it: the extension is always there.
        let code = failure.code.unwrap_or(500);
        dead.set_extension("knativeerrorcode", ExtensionValue::Integer(i64::from(code)));
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
                tracing::info!(trigger = %t.name, event = %event.id(), sink = %dls.describe(), "dead-lettered");
                true
            }
            Err(_) if self.kept_for_next_start(t, event) => false,
            Err(f) => {
                metrics::add(&t.stats.dropped, 1);
                tracing::error!(
                trigger = %t.name, event = %event.id(), sink = %dls.describe(), code = ?f.code,
                "the dead-letter sink failed too: event dropped"
                );
                true
            }
        }
    }

    /// While wasmesh stops, an event that would be dropped is left unacknowledged instead (said
    /// in the log): the durable log or JetStream delivers it again at the next start.
    fn kept_for_next_start(&self, t: &TriggerSpecRuntime, event: &Event) -> bool {
        if !self.is_stopping() {
            return false;
        }
        tracing::info!(trigger = %t.name, event = %event.id(), "stopping: a failed delivery is not dropped but left unacknowledged (the durable log or JetStream delivers it again; with --store memory it is lost)");
        true
    }
}
