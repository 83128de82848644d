//! Test fixture: allocates without bound on every event.

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

struct MemHog;

impl exports::wasmesh::plugin::handler::Guest for MemHog {
    fn handle(_: wasmesh::plugin::types::Event) -> wasmesh::plugin::types::Disposition {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
        }
    }
}

export!(MemHog);
