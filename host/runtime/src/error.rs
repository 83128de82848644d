//! Errors of loading and calling plugins. Each names the plugin and the cause.

use crate::host::CallOutput;

/// Why a component cannot be used as a plugin. Not retryable: the bytes must change.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{name}: cannot read {path}: {error}")]
    Read {
        name: String,
        path: String,
        error: std::io::Error,
    },
    #[error("{name}: not a WebAssembly file (it does not start with the `\\0asm` magic bytes)")]
    NotWasm { name: String },
    #[error(
        "{name}: is a core WebAssembly module, not a component; build it with \
         `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { name: String },
    #[error("{name}: is not a valid WebAssembly component: {reason}")]
    Invalid { name: String, reason: String },
    #[error(
        "{name}: implements neither world `filter` (export `wasmesh:plugin/matcher@0.1.0`) nor \
         world `subscriber` (export `wasmesh:plugin/handler@0.1.0`); its exports: [{exports}]"
    )]
    NoWorld { name: String, exports: String },
    #[error("{name}: implements world `{found}`, but a `{expected}` is needed here")]
    WrongWorld {
        name: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error(
        "{name}: imports `{import}`, which wasmesh does not grant; plugins may import \
         wasmesh:plugin/log, wasmesh:plugin/config and wasmesh:plugin/event-view, plus the \
         wasi:cli, wasi:io, wasi:clocks and wasi:random interfaces that Rust's std needs"
    )]
    Ungranted { name: String, import: String },
    #[error("{name}: cannot be linked: {reason}")]
    Link { name: String, reason: String },
}

/// What went wrong in one call.
#[derive(Debug, thiserror::Error)]
pub enum CallErrorKind {
    /// The guest trapped (a Rust panic ends in `unreachable`).
    #[error("trap: {0}")]
    Trap(String),
    /// The call ran past its wall-time deadline and was interrupted.
    #[error("deadline of {} exceeded", crate::limits::human_duration(*.0))]
    Deadline(std::time::Duration),
    /// The guest tried to grow its memory past the limit.
    #[error("memory limit of {} exceeded", crate::limits::human_bytes(*.0))]
    Memory(usize),
    /// A fresh instance could not be created (for example the instance pool is exhausted).
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    /// The plugin replied with something that is not a valid CloudEvent.
    #[error(transparent)]
    MalformedReply(#[from] crate::convert::ReplyError),
}

/// A failed call: which function, why, and what it wrote before failing.
#[derive(Debug, thiserror::Error)]
#[error("{function}: {kind}")]
pub struct CallError {
    /// The function's name.
    pub function: String,
    /// The cause.
    pub kind: CallErrorKind,
    /// What the call wrote before it failed (a panic message is in `stderr`).
    pub output: Box<CallOutput>,
}
