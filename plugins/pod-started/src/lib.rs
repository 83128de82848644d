//! Turns a Kubernetes `Event` object saying a Pod's container started into a smaller event,
//! `com.example.pod.started`, returned as the reply. Every other event is acknowledged.

use wasmesh_subscriber::log::log;
use wasmesh_subscriber::{Attributes, Disposition, Event, Level, Subscriber, config};

struct PodStarted;

impl Subscriber for PodStarted {
    fn handle(event: Event) -> Disposition {
        let Some(data) = event.data.as_deref() else {
            return Disposition::Ack;
        };
        let object: serde_json::Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => return Disposition::Reject(format!("data is not JSON: {e}")),
        };
        let involved = &object["involvedObject"];
        if object["reason"] != "Started" || involved["kind"] != "Pod" {
            return Disposition::Ack;
        }
        let (Some(pod), namespace) = (involved["name"].as_str(), involved["namespace"].as_str())
        else {
            return Disposition::Reject("involvedObject has no name".into());
        };
        let namespace = namespace.unwrap_or("default");
        log(Level::Info, &format!("pod {namespace}/{pod} started"));
        let body = serde_json::json!({ "pod": pod, "namespace": namespace });
        let ty = config::get("type")
            .unwrap_or_else(|| "com.example.pod.started".into());
        Disposition::Reply(Event {
            attributes: Attributes {
                id: format!("{}-started", event.attributes.id),
                source: format!("/apis/v1/namespaces/{namespace}/pods/{pod}"),
                specversion: "1.0".into(),
                type_: ty,
                datacontenttype: Some("application/json".into()),
                dataschema: None,
                subject: Some(pod.into()),
                time: event.attributes.time,
                extensions: Vec::new(),
            },
            data: Some(body.to_string().into_bytes()),
        })
    }
}

wasmesh_subscriber::export_subscriber!(PodStarted);
