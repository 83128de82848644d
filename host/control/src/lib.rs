//! The control path: declared resources in, running parts out, through one reconciler
//! ([`Controller`]) that start-up, `serve --watch` and the admin API ([`admin`]) share. Each
//! object gets a status (`Ready`, or not ready with a reason and a message, as Knative's
//! conditions say it), and an object that cannot run never stops the others.

pub mod admin;
mod reconcile;
pub mod shared;
mod store;

pub use reconcile::{API_FILE, ApplyError, Change, ControlConfig, Controller, module_file};
pub use store::{ModuleStore, Overlay, Revision};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use wasmesh_broker::{Mesh, Sink};
use wasmesh_core::{Event, event};
use wasmesh_sources::apiserver::{Seen, SeenStore};
use wasmesh_sources::{Emit, EmitError};

/// The labels that give a namespace its `default` broker: the seed's, and current Knative's.
pub const INJECTION_LABELS: [&str; 2] = [
    "knative-eventing-injection",
    "eventing.knative.dev/injection",
];

/// The namespace whose `default` Broker this object asks for, as Knative's sugar controller
/// creates one: a Namespace with an injection label `enabled`, or a Trigger of the `default`
/// broker annotated `eventing.knative.dev/injection: enabled`.
pub fn injects_default_broker(resource: &wasmesh_core::resources::Resource) -> Option<&str> {
    use wasmesh_core::resources::Resource;
    match resource {
        Resource::Namespace(ns) => INJECTION_LABELS
            .iter()
            .any(|l| ns.metadata.labels.get(*l).map(String::as_str) == Some("enabled"))
            .then_some(ns.metadata.name.as_str()),
        Resource::Trigger(t) => (t.spec.broker == "default"
            && t.metadata
                .annotations
                .get(wasmesh_core::yaml::TRIGGER_INJECTION)
                .map(String::as_str)
                == Some("enabled"))
        .then(|| t.metadata.namespace()),
        _ => None,
    }
}

/// The state of one declared object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
        if self.ready && self.message.is_empty() {
            write!(f, "{}: Ready", self.id)
        } else if self.ready {
            write!(f, "{}: Ready ({})", self.id, self.message)
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

/// Stores keep (resourceVersion, object) pairs by uid; the source speaks `Seen`.
fn to_seen(m: HashMap<String, shared::SeenObject>) -> HashMap<String, Seen> {
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
}

fn from_seen(changes: Vec<(String, Option<Seen>)>) -> Vec<(String, Option<shared::SeenObject>)> {
    changes
        .into_iter()
        .map(|(uid, s)| (uid, s.map(|s| (s.resource_version, s.object))))
        .collect()
}

/// The durable log's memory of what sources saw, for the ApiServerSource.
struct LogSeen(Arc<wasmesh_broker::log::DurableLog>);

impl SeenStore for LogSeen {
    fn object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String> {
        self.0.seen_object(source, uid)
    }

    fn load(&self, source: &str) -> Result<Option<HashMap<String, Seen>>, String> {
        Ok(self.0.seen_load(source)?.map(to_seen))
    }

    fn update(&self, source: &str, changes: Vec<(String, Option<Seen>)>) -> Result<(), String> {
        self.0.seen_update(source, from_seen(changes))
    }
}

/// Over NATS: what ApiServerSources saw, in the shared bucket, so that the replica that takes
/// a source over goes on from where the last one was. The source calls these from its task:
/// they wait for NATS in place.
pub(crate) struct SharedSeen(pub(crate) Arc<shared::Shared>);

fn wait_for<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

impl SeenStore for SharedSeen {
    fn object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String> {
        wait_for(self.0.seen_object(source, uid))
    }

    fn load(&self, source: &str) -> Result<Option<HashMap<String, Seen>>, String> {
        Ok(wait_for(self.0.seen_load(source))?.map(to_seen))
    }

    fn update(&self, source: &str, changes: Vec<(String, Option<Seen>)>) -> Result<(), String> {
        wait_for(self.0.seen_update(source, from_seen(changes)))
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
    async fn emit(&self, ev: Event) -> Result<(), EmitError> {
        event::validate(&ev).map_err(|e| EmitError::Never(e.to_string()))?;
        self.mesh
            .send_to(&self.sink, &self.namespace, ev)
            .await
            .map_err(emit_error)
    }

    async fn emit_all(&self, events: Vec<Event>) -> Result<(), EmitError> {
        for ev in &events {
            event::validate(ev).map_err(|e| EmitError::Never(e.to_string()))?;
        }
        match &self.sink {
            // One append, one group commit, for the whole batch.
            Sink::Broker(key) => self
                .mesh
                .publish(key, events)
                .await
                .map_err(|e| emit_error(e.into())),
            _ => {
                for ev in events {
                    self.mesh
                        .send_to(&self.sink, &self.namespace, ev)
                        .await
                        .map_err(emit_error)?;
                }
                Ok(())
            }
        }
    }
}

/// A refusal sending again cannot help is `Never`, any other `Later`.
fn emit_error(e: wasmesh_broker::SendToError) -> EmitError {
    if e.permanent {
        EmitError::Never(e.message)
    } else {
        EmitError::Later(e.message)
    }
}
