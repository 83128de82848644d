//! Shared helpers: the seed's event, an engine, functions built from the real plugins.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmesh_core::Event;
use wasmesh_runtime::{
    EngineConfig, Function, FunctionSettings, Isolation, Limits, PluginEngine, PluginKind,
};

/// The repository's root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The seed's busybox `Event` object as an ApiServerSource CloudEvent (about 1 KiB of JSON).
pub(crate) fn seed_event() -> Arc<Event> {
    let bytes = std::fs::read(root().join("tests/data/seed-event.json")).expect("seed event");
    Arc::new(wasmesh_core::event::parse_json(&bytes).expect("valid seed event"))
}

pub(crate) fn engine() -> PluginEngine {
    PluginEngine::new(EngineConfig::default()).expect("engine")
}

/// Limits small enough for the hostile fixtures to hit quickly.
pub(crate) fn tight() -> Limits {
    Limits {
        memory_bytes: 16 << 20,
        timeout: Duration::from_millis(100),
    }
}

pub(crate) fn function(
    engine: &PluginEngine,
    path: &str,
    kind: PluginKind,
    config: &[(&str, &str)],
    limits: Limits,
    isolation: Isolation,
) -> Function {
    let name = Path::new(path)
        .file_stem()
        .expect("file name")
        .to_string_lossy()
        .replace('_', "-");
    let bytes = std::fs::read(path).expect("plugin built by wasmesh-plugins");
    wasmesh_runtime::load_function(
        engine,
        &name,
        &bytes,
        Some(kind),
        FunctionSettings {
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            limits,
            isolation,
            max_idle: 4,
        },
    )
    .expect("plugin loads")
}

/// A subscriber with default limits and warm instances.
pub(crate) fn subscriber(engine: &PluginEngine, path: &str) -> Function {
    function(
        engine,
        path,
        PluginKind::Subscriber,
        &[],
        Limits::default(),
        Isolation::Warm,
    )
}

/// A filter with the given configuration, default limits and warm instances.
pub(crate) fn filter(engine: &PluginEngine, path: &str, config: &[(&str, &str)]) -> Function {
    function(
        engine,
        path,
        PluginKind::Filter,
        config,
        Limits::default(),
        Isolation::Warm,
    )
}
