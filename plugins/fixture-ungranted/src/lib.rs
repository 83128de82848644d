//! Test fixture: opens a TCP connection, so the component imports `wasi:sockets`, which wasmesh
//! does not grant. The host must refuse to load it.

wit_bindgen::generate!({ world: "subscriber", path: "../../wit" });

use wasmesh::plugin::types::{Disposition, Event};

struct Ungranted;

impl exports::wasmesh::plugin::handler::Guest for Ungranted {
    fn handle(_: Event) -> Disposition {
        match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => Disposition::Ack,
            Err(e) => Disposition::Reject(e.to_string()),
        }
    }
}

export!(Ungranted);
