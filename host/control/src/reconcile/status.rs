//! Each object's status (Ready or why not) and the views `wasmesh get` and `describe` show.

use wasmesh_broker::Mesh;
use wasmesh_core::resources::Resource;
use wasmesh_core::yaml::Located;

use crate::Status;

use super::{Problem, State, function_key};

pub(super) fn status_of(st: &State, loc: &Located, result: Result<(), Problem>) -> Status {
    let (mut ready, mut reason, mut message) = match result {
        Ok(()) => (true, String::new(), String::new()),
        Err((reason, message)) => (false, reason.to_string(), message),
    };
    if ready && let Resource::Function(f) = &loc.resource {
        if let Some(run) = st
            .functions
            .get(&function_key(f.metadata.namespace(), &f.metadata.name))
        {
            let live = run.slot.live();
            message = format!("revision {} ({}) is live", live.revision, live.digest);
            let history = st.overlay.history.get(&loc.resource.id());
            // The revision live now was made by an automatic rollback of the one before it.
            let recorded = history.and_then(|h| match h.as_slice() {
                [.., failed, now] if now.revision == live.revision => failed.rolled_back.clone(),
                _ => None,
            });
            if let Some(note) = run.slot.note().or(recorded) {
                if note.contains("rolled back") {
                    reason = "RolledBack".into();
                }
                message = format!("{message}; {note}");
            }
        } else {
            ready = false;
            reason = "ModuleInvalid".into();
        }
    }
    Status {
        id: loc.resource.id(),
        declared_at: format!("{}:{}", loc.file, loc.line),
        ready,
        reason,
        message,
    }
}

pub(super) fn ordered_statuses(st: &State) -> Vec<Status> {
    st.desired
        .iter()
        .filter(|l| st.statuses.contains_key(&l.resource.id()))
        .map(|l| current_status(st, l))
        .collect()
}

pub(super) fn kind_name(r: &Resource) -> &'static str {
    match r {
        Resource::Namespace(_) => "Namespace",
        Resource::Broker(_) => "Broker",
        Resource::Trigger(_) => "Trigger",
        Resource::Function(_) => "Function",
        Resource::PingSource(_) => "PingSource",
        Resource::ApiServerSource(_) => "ApiServerSource",
        Resource::Ignored { .. } => "Ignored",
    }
}

/// The kinds a `get` argument names (`brokers`, `trigger`, `functions`, `sources`, ...).
pub(super) fn kinds_of(kind: &str) -> Result<&'static [&'static str], String> {
    Ok(match kind.to_ascii_lowercase().as_str() {
        "broker" | "brokers" => &["Broker"],
        "trigger" | "triggers" => &["Trigger"],
        "function" | "functions" | "fn" => &["Function"],
        "source" | "sources" => &["PingSource", "ApiServerSource"],
        "pingsource" | "pingsources" => &["PingSource"],
        "apiserversource" | "apiserversources" => &["ApiServerSource"],
        "namespace" | "namespaces" | "ns" => &["Namespace"],
        other => {
            return Err(format!(
                "unknown kind `{other}`: use brokers, triggers, functions, sources, pingsources, apiserversources or namespaces"
            ));
        }
    })
}

/// An object as `get` returns it: as declared, plus a status with Knative's `Ready` condition
/// (and a Broker's address, from `ingress_url`: see [`ControlConfig::ingress_url`]).
pub(super) fn view(
    st: &State,
    mesh: &Mesh,
    ingress_url: Option<&str>,
    loc: &Located,
) -> Option<serde_json::Value> {
    let mut json = loc.resource.to_json()?;
    let id = loc.resource.id();
    st.statuses.get(&id)?;
    let status = current_status(st, loc);
    let mut s = serde_json::json!({
        "conditions": [{
            "type": "Ready",
            "status": if status.ready { "True" } else { "False" },
            "reason": status.reason,
            "message": status.message,
        }],
        "declaredAt": status.declared_at,
    });
    if let Resource::Function(f) = &loc.resource
        && let Some(run) = st
            .functions
            .get(&function_key(f.metadata.namespace(), &f.metadata.name))
    {
        let live = run.slot.live();
        s["world"] = run.kind.world().into();
        s["revision"] = live.revision.into();
        s["digest"] = live.digest.clone().into();
        s["revisions"] = serde_json::to_value(st.overlay.history.get(&id)).unwrap_or_default();
    }
    if let Resource::Trigger(t) = &loc.resource
        && let Some(counts) = mesh.trigger_counts(t.metadata.namespace(), &t.metadata.name)
    {
        s["deliveries"] = serde_json::to_value(counts).unwrap_or_default();
    }
    if let Resource::Broker(o) = &loc.resource {
        let path = format!("/{}/{}", o.metadata.namespace(), o.metadata.name);
        s["address"] = match ingress_url {
            Some(base) => serde_json::json!({"url": format!("{base}{path}"), "path": path}),
            None => serde_json::json!({ "path": path }),
        };
    }
    json["status"] = s;
    Some(json)
}

/// The recorded status; a ready Function's is read from its slot now, since its trial may have
/// ended since.
fn current_status(st: &State, loc: &Located) -> Status {
    let s = st
        .statuses
        .get(&loc.resource.id())
        .cloned()
        .unwrap_or_else(|| status_of(st, loc, Ok(())));
    if s.ready && matches!(loc.resource, Resource::Function(_)) {
        status_of(st, loc, Ok(()))
    } else {
        s
    }
}
