//! The one `bindgen!` of the host: Rust types and traits for `wit/plugin.wit`.
//!
//! It binds the `host` world, which imports everything a plugin may import and exports both the
//! filter's `matcher` and the subscriber's `handler`; a plugin exports one of the two, and
//! [`crate::validate`] finds which.

wasmtime::component::bindgen!({
    world: "host",
    path: "../../wit",
});

pub(crate) use exports::wasmesh::plugin::{handler, matcher};
pub(crate) use wasmesh::plugin::types;
