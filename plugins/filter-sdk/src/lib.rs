//! A wasmesh trigger filter in a few lines:
//!
//! ```ignore
//! use wasmesh_filter::{Filter, IncomingEvent};
//!
//! struct OnlyPods;
//!
//! impl Filter for OnlyPods {
//!     fn matches(event: &IncomingEvent) -> bool {
//!         event.subject().is_some_and(|s| s.starts_with("pods/"))
//!     }
//! }
//!
//! wasmesh_filter::export_filter!(OnlyPods);
//! ```
//!
//! The bindings of the `filter` world of `wit/plugin.wit`, generated once here, with the names a
//! filter uses at the crate's root (see `wasmesh-subscriber` for the other world).


wit_bindgen::generate!({
    world: "filter",
    path: "../../wit",
    pub_export_macro: true,
    export_macro_name: "export_filter",
    default_bindings_module: "wasmesh_filter",
});

/// What a filter implements: `matches`, called once per event its trigger's native filters let
/// through; the event's attributes are read lazily and its data only if asked for.
pub use exports::wasmesh::plugin::matcher::Guest as Filter;
/// The host's configuration (`spec.config` of the Function) and its log.
pub use wasmesh::plugin::{config, log};
pub use wasmesh::plugin::event_view::IncomingEvent;
pub use wasmesh::plugin::types::*;
