//! Test fixture: replies with an event that is not a valid CloudEvent (empty id and source,
//! unknown spec version, an extension name with capitals).

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

use wasmesh::plugin::types::{Attributes, Disposition, Event, Extension, ExtensionValue};

struct BadReply;

impl exports::wasmesh::plugin::handler::Guest for BadReply {
    fn handle(_: Event) -> Disposition {
        Disposition::Reply(Event {
            attributes: Attributes {
                id: String::new(),
                source: String::new(),
                specversion: "0.1".into(),
                type_: "com.example.bad".into(),
                datacontenttype: None,
                dataschema: None,
                subject: None,
                time: None,
                extensions: vec![Extension {
                    name: "Not-Valid".into(),
                    value: ExtensionValue::String("x".into()),
                }],
            },
            data: None,
        })
    }
}

export!(BadReply);
