//! Test fixture: logs without end on every event.

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

use wasmesh::plugin::types::Level;

struct LogSpam;

impl exports::wasmesh::plugin::handler::Guest for LogSpam {
    fn handle(_: wasmesh::plugin::types::Event) -> wasmesh::plugin::types::Disposition {
        let mut n: u64 = 0;
        loop {
            n += 1;
            wasmesh::plugin::log::log(Level::Info, &format!("spam line {n}"));
        }
    }
}

export!(LogSpam);
