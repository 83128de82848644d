//! The Wasm runtime of wasmesh: one wasmtime engine with the pooling allocator and one epoch
//! ticker, components compiled once and cached by digest (in memory and on disk), warm instance
//! pools with per-call deadlines and memory caps, and the imports plugins are granted.
//!
//! ```text
//! PluginEngine::load(bytes) -> Plugin (compiled, validated, InstancePre)
//! Function::new(plugin, settings) -> Function (config, limits, warm instances)
//! Function::matches(event) / Function::handle(event) -> Called<T> | CallError
//! ```

mod bindings;
mod cache;
mod convert;
mod engine;
mod error;
mod function;
mod host;
mod limits;
mod validate;

pub use cache::digest;
pub use convert::ReplyError;
pub use engine::{EngineConfig, Plugin, PluginEngine};
pub use error::{CallError, CallErrorKind, LoadError};
pub use function::{Called, Disposition, Function, FunctionSettings, load_function};
pub use host::{CallOutput, LogLevel, LogRecord};
pub use limits::{Isolation, Limits, human_bytes, human_duration};
pub use validate::PluginKind;
