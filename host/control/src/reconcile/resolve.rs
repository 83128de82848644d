//! From declared objects to what runs: a Trigger's broker, subscriber, Wasm filter and delivery
//! policy resolved against the Functions and Brokers declared now; a Function's settings.

use std::sync::Arc;

use wasmesh_broker::{BrokerKey, DeliveryPolicy, FunctionSlot, Mesh, Sink, TriggerSpecRuntime};
use wasmesh_core::filter::Filter;
use wasmesh_core::resources::{
    DeliverySpec, Destination, FunctionSpec, IsolationSpec, Object, TriggerSpec,
};
use wasmesh_runtime::{FunctionSettings, Isolation, Limits, PluginKind};

use super::{Problem, State, function_key};

pub(super) fn settings(spec: &FunctionSpec) -> FunctionSettings {
    let limits = spec.limits.clone().unwrap_or_default();
    let defaults = Limits::default();
    FunctionSettings {
        config: spec.config.clone(),
        limits: Limits {
            memory_bytes: limits.memory.map_or(defaults.memory_bytes, |m| m.bytes()),
            timeout: limits.timeout.map_or(defaults.timeout, |t| t.get()),
        },
        isolation: match spec.isolation.unwrap_or_default() {
            IsolationSpec::Warm => Isolation::Warm,
            IsolationSpec::Fresh => Isolation::Fresh,
        },
        max_idle: 16,
    }
}

fn lookup_function(
    st: &State,
    ns: &str,
    name: &str,
    kind: PluginKind,
) -> Result<Arc<FunctionSlot>, Problem> {
    let run = st.functions.get(&function_key(ns, name)).ok_or_else(|| {
        (
            "FunctionDoesNotExist",
            format!("Function {ns}/{name} does not exist or is not ready"),
        )
    })?;
    if run.kind != kind {
        return Err((
            "WrongWorld",
            format!(
                "Function {ns}/{name} implements world `{}`, but a `{kind}` is needed",
                run.kind
            ),
        ));
    }
    Ok(Arc::clone(&run.slot))
}

pub(super) fn resolve_sink(
    st: &State,
    mesh: &Mesh,
    ns: &str,
    dest: &Destination,
    field: &str,
) -> Result<Sink, Problem> {
    if let Some(uri) = &dest.uri {
        let parsed: http::Uri = uri
            .parse()
            .map_err(|e| ("InvalidSink", format!("{field}.uri `{uri}`: {e}")))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err((
                "InvalidSink",
                format!("{field}.uri `{uri}`: use an absolute http:// or https:// URI"),
            ));
        }
        let own = match &dest.ca_certs {
            Some(pem) if parsed.scheme_str() == Some("https") => {
                let client = wasmesh_broker::sink::http_client_with(pem)
                    .map_err(|e| ("InvalidSink", format!("{field}.CACerts: {e}")))?;
                Some(Arc::new(client))
            }
            _ => None,
        };
        return Ok(Sink::Http(parsed, own));
    }
    let Some(r) = &dest.reference else {
        return Err(("InvalidSink", format!("{field}: no ref or uri")));
    };
    let ref_ns = r.namespace.as_deref().unwrap_or(ns);
    let group = r.api_version.split('/').next().unwrap_or("");
    match (group, r.kind.as_str()) {
        ("wasmesh.dev", "Function") | ("serving.knative.dev" | "v1", "Service") => {
            lookup_function(st, ref_ns, &r.name, PluginKind::Subscriber).map(Sink::Function)
        }
        ("eventing.knative.dev", "Broker") => {
            let key = BrokerKey::new(ref_ns, &r.name);
            if mesh.has_broker(&key) {
                Ok(Sink::Broker(key))
            } else {
                Err((
                    "BrokerDoesNotExist",
                    format!("{field}: Broker {key} does not exist"),
                ))
            }
        }
        (_, kind) => Err((
            "InvalidSink",
            format!(
                "{field}.ref: kind {kind} ({}) is not a sink wasmesh can run; use a Function, a Service (Knative or Kubernetes: resolved to the Function of the same name), a Broker or a uri",
                r.api_version
            ),
        )),
    }
}

fn resolve_policy(
    st: &State,
    mesh: &Mesh,
    ns: &str,
    spec: Option<&DeliverySpec>,
) -> Result<DeliveryPolicy, Problem> {
    let Some(spec) = spec else {
        return Ok(DeliveryPolicy::default());
    };
    let dls = match &spec.dead_letter_sink {
        Some(d) => Some(resolve_sink(
            st,
            mesh,
            ns,
            d,
            "spec.delivery.deadLetterSink",
        )?),
        None => None,
    };
    Ok(DeliveryPolicy::from_spec(spec, dls))
}

pub(super) fn resolve_trigger(
    st: &State,
    mesh: &Mesh,
    t: &Object<TriggerSpec>,
) -> Result<TriggerSpecRuntime, Problem> {
    let ns = t.metadata.namespace();
    let key = BrokerKey::new(ns, &t.spec.broker);
    let Some(broker) = st.brokers.get(&key) else {
        return Err(("BrokerDoesNotExist", format!("Broker {key} does not exist")));
    };
    let subscriber = resolve_sink(st, mesh, ns, &t.spec.subscriber, "spec.subscriber")?;
    let wasm_filter = match &t.spec.wasm_filter {
        Some(name) => Some(lookup_function(st, ns, name, PluginKind::Filter)?),
        None => None,
    };
    let policy = resolve_policy(
        st,
        mesh,
        ns,
        t.spec.delivery.as_ref().or(broker.delivery.as_ref()),
    )?;
    let filter = Filter::for_trigger(
        t.spec.filter.as_ref().map(|f| &f.attributes),
        &t.spec.filters,
    );
    Ok(TriggerSpecRuntime {
        namespace: ns.to_string(),
        name: t.metadata.name.clone(),
        broker: key,
        filter,
        wasm_filter,
        subscriber,
        policy,
        stats: Default::default(),
    })
}
