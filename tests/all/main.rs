//! wasmesh's integration tests: one binary, a module per area. Everything here is real: Wasm
//! components built from `plugins/`, the real `wasmesh` binary.

mod admin;
mod apiserver;
mod broker;
mod cesql;
mod cli_run;
mod durable;
mod fake_apiserver;
mod harness;
mod listeners;
mod manifests;
mod nats;
mod robustness;
mod runtime;
mod support;
mod yaml;
