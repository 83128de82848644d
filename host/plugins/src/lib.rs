//! Paths of the Wasm components built from `plugins/` by this crate's build script.
//!
//! Tests, benchmarks and the hello-world manifests use these instead of building by hand.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
