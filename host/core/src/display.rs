//! Knative's event-display text for a host-side event: the same work the Wasm event-display
//! does, for the native baselines of the benchmarks and for tests that compare the two.

use cloudevents::{AttributesReader, Event};

/// Renders the event as Knative's event-display prints it.
pub fn render(event: &Event) -> String {
    let data = crate::event::data_bytes(event);
    let source = event.source().to_string();
    let schema = event.dataschema().map(|u| u.to_string());
    let spec = event.specversion().to_string();
    wasmesh_display::render(&wasmesh_display::DisplayEvent {
        specversion: &spec,
        ty: event.ty(),
        source: &source,
        subject: event.subject(),
        id: event.id(),
        time: event
            .time()
            .map(|t| (t.timestamp(), t.timestamp_subsec_nanos())),
        dataschema: schema.as_deref(),
        datacontenttype: event.datacontenttype(),
        extensions: event
            .iter_extensions()
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
        data: data.as_deref(),
    })
}
