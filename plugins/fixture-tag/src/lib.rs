//! Test fixture: prints `tag=<config tag> id=<event id>` for each event and acks it. Tests tell
//! which version of a Function handled an event by the line it printed.

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

use wasmesh::plugin::types::{Disposition, Event};

struct Tag;

impl exports::wasmesh::plugin::handler::Guest for Tag {
    fn handle(event: Event) -> Disposition {
        let tag = wasmesh::plugin::config::get("tag").unwrap_or_else(|| "none".into());
        println!("tag={tag} id={}", event.attributes.id);
        Disposition::Ack
    }
}

export!(Tag);
