//! Test fixture: every event ends in a trap (`unreachable`).

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

struct Trap;

impl exports::wasmesh::plugin::handler::Guest for Trap {
    fn handle(_: wasmesh::plugin::types::Event) -> wasmesh::plugin::types::Disposition {
        core::arch::wasm32::unreachable()
    }
}

export!(Trap);
