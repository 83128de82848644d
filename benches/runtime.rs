//! Per-event cost of the plugin runtime, for a 1 KiB JSON event (the seed's busybox Event), in
//! one run so that the figures compare: the floor (`Store::new` with an empty WASI context), a
//! Wasm attribute filter on a warm and on a fresh instance, event-display on a warm instance, and
//! the same two jobs done natively.
//!
//! `cargo bench -p wasmesh --bench runtime`; figures go to docs/BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmesh_core::{AttributesReader, Event};
use wasmesh_runtime::{
    EngineConfig, Function, FunctionSettings, Isolation, Limits, PluginEngine, PluginKind,
};

fn seed_event() -> Arc<Event> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/seed-event.json"
    );
    let bytes = std::fs::read(path).expect("seed event");
    Arc::new(wasmesh_core::event::parse_json(&bytes).expect("valid"))
}

fn function(engine: &PluginEngine, path: &str, kind: PluginKind, isolation: Isolation) -> Function {
    let bytes = std::fs::read(path).expect("built plugin");
    let settings = FunctionSettings {
        config: [("prefix".to_string(), "dev.knative.".to_string())].into(),
        limits: Limits::default(),
        isolation,
        max_idle: 1,
    };
    wasmesh_runtime::load_function(engine, "bench", &bytes, Some(kind), settings).expect("loads")
}

fn runtime(c: &mut Criterion) {
    let engine = PluginEngine::new(EngineConfig::default()).expect("engine");
    let event = seed_event();
    let mut g = c.benchmark_group("per-event");

    g.bench_function("a_store_new_floor", |b| {
        b.iter(|| engine.empty_store_roundtrip())
    });

    let warm = function(
        &engine,
        wasmesh_plugins::TYPE_FILTER,
        PluginKind::Filter,
        Isolation::Warm,
    );
    g.bench_function("b_wasm_filter_warm", |b| {
        b.iter(|| assert!(warm.matches(black_box(&event)).expect("runs").value))
    });

    let fresh = function(
        &engine,
        wasmesh_plugins::TYPE_FILTER,
        PluginKind::Filter,
        Isolation::Fresh,
    );
    g.bench_function("c_wasm_filter_fresh", |b| {
        b.iter(|| assert!(fresh.matches(black_box(&event)).expect("runs").value))
    });

    let display = function(
        &engine,
        wasmesh_plugins::EVENT_DISPLAY,
        PluginKind::Subscriber,
        Isolation::Warm,
    );
    g.bench_function("d_wasm_event_display_warm", |b| {
        b.iter(|| {
            let called = display.handle(black_box(&event)).expect("runs");
            black_box(called.output.stdout.len())
        })
    });

    g.bench_function("e1_native_filter", |b| {
        b.iter(|| assert!(black_box(&event).ty().starts_with("dev.knative.")))
    });
    let mut sink = std::io::sink();
    g.bench_function("e2_native_event_display", |b| {
        b.iter(|| {
            let text = wasmesh_core::display::render(black_box(&event));
            std::io::Write::write_all(&mut sink, text.as_bytes()).expect("sink");
        })
    });
    g.finish();
}

criterion_group!(benches, runtime);
criterion_main!(benches);
