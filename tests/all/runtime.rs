//! The plugin runtime: golden output, containment of hostile plugins, lazy data, bad modules,
//! warm and fresh instances, the on-disk cache.

use wasmesh_core::{AttributesReader, AttributesWriter};
use wasmesh_plugins as plugins;
use wasmesh_runtime::{
    CallErrorKind, Disposition, EngineConfig, Isolation, Limits, LoadError, LogLevel, PluginEngine,
    PluginKind,
};

use crate::support::{engine, filter, function, root, seed_event, subscriber, tight};

#[test]
fn event_display_prints_the_seed_event_as_knative_does() {
    let engine = engine();
    let f = subscriber(&engine, plugins::EVENT_DISPLAY);
    let called = f
        .handle(&seed_event())
        .expect("event-display handles the event");
    assert!(matches!(called.value, Disposition::Ack));
    let golden = std::fs::read_to_string(root().join("tests/golden/seed-event.display.txt"))
        .expect("golden file");
    assert_eq!(String::from_utf8_lossy(&called.output.stdout), golden);
    // The golden file itself is what sdk-go prints: spot-check its Knative-specific shape.
    assert!(golden.starts_with("☁️  cloudevents.Event\nContext Attributes,\n  specversion: 1.0\n"));
    assert!(golden.contains("  time: 2019-05-10T23:27:06.695575294Z\n"));
    assert!(golden.contains("Extensions,\n  apiversion: v1\n  kind: Event\n"));
    assert!(golden.contains("Data,\n  {\n    \"apiVersion\": \"v1\",\n    \"count\": 1,\n"));
}

#[test]
fn hostile_plugins_are_contained_and_named() {
    let engine = engine();
    let display = subscriber(&engine, plugins::EVENT_DISPLAY);
    let event = seed_event();
    let cases = [
        (
            plugins::FIXTURE_TRAP,
            "fixture-trap: trap: unreachable executed",
        ),
        (
            plugins::FIXTURE_SPIN,
            "fixture-spin: deadline of 100 ms exceeded",
        ),
        (
            plugins::FIXTURE_MEMHOG,
            "fixture-memhog: memory limit of 16 MiB exceeded",
        ),
        (
            plugins::FIXTURE_LOGSPAM,
            "fixture-logspam: deadline of 100 ms exceeded",
        ),
    ];
    for (path, expected) in cases {
        let hostile = function(
            &engine,
            path,
            PluginKind::Subscriber,
            &[],
            tight(),
            Isolation::Warm,
        );
        for _ in 0..2 {
            let err = hostile.handle(&event).expect_err("the fixture must fail");
            assert_eq!(err.to_string(), expected);
            assert_eq!(
                hostile.idle_instances(),
                0,
                "a failed instance is never reused"
            );
            // The host keeps serving other events.
            let ok = display.handle(&event).expect("event-display still works");
            assert!(matches!(ok.value, Disposition::Ack));
        }
    }
}

#[test]
fn log_spam_is_capped_and_panics_are_explained() {
    let engine = engine();
    let spam = function(
        &engine,
        plugins::FIXTURE_LOGSPAM,
        PluginKind::Subscriber,
        &[],
        tight(),
        Isolation::Warm,
    );
    let err = spam.handle(&seed_event()).expect_err("deadline");
    let logged: usize = err.output.logs.iter().map(|r| r.message.len()).sum();
    assert!(logged <= 1 << 20, "log kept within 1 MiB, got {logged}");
    assert!(
        err.output
            .logs
            .first()
            .is_some_and(|r| r.message == "spam line 1")
    );
}

#[test]
fn malformed_reply_is_an_error_naming_the_problem() {
    let engine = engine();
    let f = subscriber(&engine, plugins::FIXTURE_BAD_REPLY);
    let err = f.handle(&seed_event()).expect_err("malformed reply");
    assert!(matches!(err.kind, CallErrorKind::MalformedReply(_)));
    assert_eq!(
        err.to_string(),
        "fixture-bad-reply: malformed reply: specversion `0.1` is not supported (use 1.0 or 0.3)"
    );
}

#[test]
fn pod_started_replies_with_a_smaller_event_and_logs() {
    let engine = engine();
    let f = subscriber(&engine, plugins::POD_STARTED);
    let called = f.handle(&seed_event()).expect("handled");
    let Disposition::Reply(reply) = called.value else {
        panic!("expected a reply, got {:?}", called.value);
    };
    assert_eq!(reply.ty(), "com.example.pod.started");
    assert_eq!(reply.subject(), Some("busybox"));
    let data = wasmesh_core::event::data_bytes(&reply).expect("data");
    let json: serde_json::Value = serde_json::from_slice(&data).expect("json");
    assert_eq!(json["pod"], "busybox");
    assert_eq!(called.output.logs.len(), 1);
    assert_eq!(called.output.logs[0].level, LogLevel::Info);
    assert_eq!(called.output.logs[0].message, "pod default/busybox started");
}

#[test]
fn a_filter_reading_attributes_never_receives_the_data() {
    let engine = engine();
    let event = seed_event();
    let attrs_only = filter(&engine, plugins::TYPE_FILTER, &[("prefix", "dev.knative.")]);
    let called = attrs_only.matches(&event).expect("filter runs");
    assert!(called.value);
    assert_eq!(called.output.data_bytes_read, 0);

    let reads_data = filter(
        &engine,
        plugins::TYPE_FILTER,
        &[
            ("prefix", "dev.knative."),
            ("data-contains", "Started container"),
        ],
    );
    let called = reads_data.matches(&event).expect("filter runs");
    assert!(called.value);
    let len = wasmesh_core::event::data_bytes(&event).expect("data").len();
    assert_eq!(called.output.data_bytes_read, len);

    let other_prefix = filter(&engine, plugins::TYPE_FILTER, &[("prefix", "com.example.")]);
    assert!(!other_prefix.matches(&event).expect("filter runs").value);
    let by_extension = filter(
        &engine,
        plugins::TYPE_FILTER,
        &[("attribute", "kind"), ("prefix", "Ev")],
    );
    assert!(by_extension.matches(&event).expect("filter runs").value);
}

#[test]
fn warm_instances_are_reused_and_fresh_ones_are_not() {
    let engine = engine();
    let event = seed_event();
    let warm = filter(&engine, plugins::TYPE_FILTER, &[]);
    for _ in 0..3 {
        assert!(warm.matches(&event).expect("runs").value);
        assert_eq!(warm.idle_instances(), 1, "one instance serves every event");
    }
    let fresh = function(
        &engine,
        plugins::TYPE_FILTER,
        PluginKind::Filter,
        &[],
        Limits::default(),
        Isolation::Fresh,
    );
    assert!(fresh.matches(&event).expect("runs").value);
    assert_eq!(fresh.idle_instances(), 0);
}

#[test]
fn bad_modules_are_rejected_with_clear_errors() {
    let engine = engine();
    let load = |name: &str, bytes: &[u8]| engine.load(name, bytes).expect_err("must be refused");

    let random: Vec<u8> = (0..256u32).map(|i| (i * 7919 % 251) as u8).collect();
    let err = load("random", &random);
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");
    assert!(err.to_string().contains("not a WebAssembly file"));

    let err = load("core", b"\0asm\x01\0\0\0");
    assert!(matches!(err, LoadError::CoreModule { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("core WebAssembly module, not a component")
    );

    let mut truncated = std::fs::read(plugins::EVENT_DISPLAY).expect("built");
    truncated.truncate(truncated.len() / 2);
    let err = load("truncated", &truncated);
    assert!(matches!(err, LoadError::Invalid { .. }), "{err}");

    let ungranted = std::fs::read(plugins::FIXTURE_UNGRANTED).expect("built");
    let err = load("ungranted", &ungranted);
    assert!(matches!(err, LoadError::Ungranted { .. }), "{err}");
    assert!(err.to_string().contains("imports `wasi:sockets/"), "{err}");

    let display = std::fs::read(plugins::EVENT_DISPLAY).expect("built");
    let err = wasmesh_runtime::load_function(
        &engine,
        "event-display",
        &display,
        Some(PluginKind::Filter),
        Default::default(),
    )
    .expect_err("wrong world");
    assert_eq!(
        err.to_string(),
        "event-display: implements world `subscriber`, but a `filter` is needed here"
    );
}

#[test]
fn compiled_components_are_cached_on_disk_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(plugins::TYPE_FILTER).expect("built");
    let digest = wasmesh_runtime::digest(&bytes);
    {
        let engine = PluginEngine::new(EngineConfig::with_data_dir(dir.path())).expect("engine");
        assert!(!engine.is_cached_on_disk(&digest));
        let plugin = engine.load("type-filter", &bytes).expect("loads");
        assert_eq!(plugin.digest(), digest);
        assert!(engine.is_cached_on_disk(&digest));
    }
    // A new engine (a restart) finds the artifact and the plugin still works.
    let engine = PluginEngine::new(EngineConfig::with_data_dir(dir.path())).expect("engine");
    assert!(engine.is_cached_on_disk(&digest));
    let f = wasmesh_runtime::load_function(
        &engine,
        "type-filter",
        &bytes,
        Some(PluginKind::Filter),
        Default::default(),
    )
    .expect("loads from the cache");
    assert!(f.matches(&seed_event()).expect("runs").value);
    // A corrupt artifact is ignored and the component recompiled.
    let artifacts: Vec<_> = std::fs::read_dir(dir.path().join("components"))
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let artifact = &artifacts[0];
    let good = std::fs::read(artifact).expect("artifact");
    std::fs::write(artifact, b"garbage").expect("corrupt");
    let engine = PluginEngine::new(EngineConfig::with_data_dir(dir.path())).expect("engine");
    assert!(engine.load("type-filter", &bytes).is_ok());
    assert_eq!(std::fs::read(artifact).expect("rewritten"), good);
    // So is one with a single byte flipped in the middle, where wasmtime checks nothing (its
    // machine code): it is never deserialized, and the artifact is written again.
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(artifact, &flipped).expect("flip a byte");
    let engine = PluginEngine::new(EngineConfig::with_data_dir(dir.path())).expect("engine");
    assert!(engine.load("type-filter", &bytes).is_ok());
    assert_eq!(std::fs::read(artifact).expect("rewritten"), good);
}

/// The epoch ticker parks once no call has run for a while (an idle server does not wake a
/// thousand times a second); a call starting after that wakes it, so its deadline still stops
/// a plugin that never returns, on a warm instance and a fresh one.
#[test]
fn deadlines_hold_after_the_epoch_ticker_parked() {
    let engine = engine();
    for isolation in [Isolation::Warm, Isolation::Fresh] {
        let spin = function(
            &engine,
            plugins::FIXTURE_SPIN,
            PluginKind::Subscriber,
            &[],
            tight(),
            isolation,
        );
        // Idle well past the ticker's 100 ticks of 1 ms.
        std::thread::sleep(std::time::Duration::from_millis(400));
        let err = spin.handle(&seed_event()).expect_err("stopped");
        assert_eq!(err.to_string(), "fixture-spin: deadline of 100 ms exceeded");
    }
}

#[test]
fn native_and_wasm_event_display_agree() {
    // The benchmark compares the two; they must do the same work.
    let event = seed_event();
    let engine = engine();
    let f = subscriber(&engine, plugins::EVENT_DISPLAY);
    let wasm = f.handle(&event).expect("handled").output.stdout;
    let native = wasmesh_core::display::render(&event);
    assert_eq!(String::from_utf8_lossy(&wasm), native);
}

/// Data that is not text is written byte for byte, as sdk-go's event-display writes it, not
/// with U+FFFD in place of the bytes that are not UTF-8.
#[test]
fn event_display_writes_binary_data_as_it_is() {
    let mut event = (*seed_event()).clone();
    let raw = [0u8, 1, 0xff, 0xfe, b'A', b'B'];
    event.set_datacontenttype(Some("application/octet-stream"));
    event.set_data_unchecked(wasmesh_core::Data::Binary(raw.to_vec()));
    let engine = engine();
    let f = subscriber(&engine, plugins::EVENT_DISPLAY);
    let out = f.handle(&event).expect("handled").output.stdout;
    let mut expected = b"Data (binary),\n  ".to_vec();
    expected.extend_from_slice(&raw);
    expected.push(b'\n');
    assert!(
        out.ends_with(&expected),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}
