//! A wasmesh subscriber in a few lines:
//!
//! ```ignore
//! use wasmesh_subscriber::{Disposition, Event, Subscriber};
//!
//! struct Hello;
//!
//! impl Subscriber for Hello {
//!     fn handle(event: Event) -> Disposition {
//!         println!("got {}", event.attributes.id);
//!         Disposition::Ack
//!     }
//! }
//!
//! wasmesh_subscriber::export_subscriber!(Hello);
//! ```
//!
//! The bindings of the `subscriber` world of `wit/plugin.wit`, generated once here (so a plugin
//! needs neither the WIT files nor wit-bindgen's macro), with the names a plugin uses at the
//! crate's root. The `filter` world has a crate of its own, `wasmesh-filter`: one crate per
//! world keeps a plugin's component to the world it implements.


wit_bindgen::generate!({
    world: "subscriber",
    path: "../../wit",
    pub_export_macro: true,
    export_macro_name: "export_subscriber",
    default_bindings_module: "wasmesh_subscriber",
});

/// What a subscriber implements: `handle`, called once per event.
pub use exports::wasmesh::plugin::handler::Guest as Subscriber;
/// The host's configuration (`spec.config` of the Function) and its log.
pub use wasmesh::plugin::{config, log};
pub use wasmesh::plugin::types::*;
