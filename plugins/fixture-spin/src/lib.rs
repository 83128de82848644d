//! Test fixture: loops forever on every event.

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

struct Spin;

impl exports::wasmesh::plugin::handler::Guest for Spin {
    fn handle(_: wasmesh::plugin::types::Event) -> wasmesh::plugin::types::Disposition {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export!(Spin);
