//! `wasmesh run`, through the real binary.

use std::process::Command;

use wasmesh_plugins as plugins;

use crate::support::root;

fn wasmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasmesh"))
}

#[test]
fn run_prints_event_display_verbatim_and_the_disposition_on_stderr() {
    let seed = root().join("tests/data/seed-event.json");
    let out = wasmesh()
        .args(["run", plugins::EVENT_DISPLAY, "--event"])
        .arg(&seed)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden = std::fs::read(root().join("tests/golden/seed-event.display.txt")).expect("golden");
    assert_eq!(
        out.stdout, golden,
        "stdout is the plugin's output and nothing else"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "disposition: ack"
    );
}

#[test]
fn run_passes_config_to_a_filter_and_shows_replies_and_logs() {
    let seed = root().join("tests/data/seed-event.json");
    let out = wasmesh()
        .args([
            "run",
            plugins::TYPE_FILTER,
            "--config",
            "prefix=com.example.",
        ])
        .arg("--event")
        .arg(&seed)
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "not matched");
    // The event may be given as its JSON text too.
    let out = wasmesh()
        .args(["run", plugins::TYPE_FILTER, "-c", "prefix=com.example."])
        .args([
            "-e",
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"com.example.a"}"#,
        ])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.trim(), "matched");

    let out = wasmesh()
        .args(["run", plugins::POD_STARTED, "--event"])
        .arg(&seed)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[pod-started] INFO: pod default/busybox started"),
        "{stderr}"
    );
    assert!(stderr.contains("disposition: reply"), "{stderr}");
    assert!(
        stderr.contains("\"type\": \"com.example.pod.started\""),
        "{stderr}"
    );
}

#[test]
fn run_reports_failures_clearly() {
    let seed = root().join("tests/data/seed-event.json");
    let out = wasmesh()
        .args(["run", plugins::FIXTURE_SPIN, "--timeout", "50", "--event"])
        .arg(&seed)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: fixture-spin: deadline of 50 ms exceeded"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad_event = dir.path().join("bad.json");
    std::fs::write(&bad_event, r#"{"specversion":"1.0","id":"1","type":"t"}"#).expect("write");
    let out = wasmesh()
        .args(["run", plugins::EVENT_DISPLAY, "--event"])
        .arg(&bad_event)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.json: not a valid structured CloudEvent"),
        "{stderr}"
    );
    assert!(stderr.contains("source"), "{stderr}");

    let missing = wasmesh()
        .args(["run", "/nonexistent/plugin.wasm", "--event"])
        .arg(&seed)
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/plugin.wasm")
    );
}

/// A `--memory` too large for the host is refused by name, even one whose bytes do not fit a
/// number (it used to wrap around to 1 MiB and run).
#[test]
fn run_refuses_a_memory_limit_past_the_hosts() {
    let seed = root().join("tests/data/seed-event.json");
    let out = wasmesh()
        .args([
            "run",
            plugins::EVENT_DISPLAY,
            "--memory",
            "17592186044417",
            "--event",
        ])
        .arg(&seed)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("above the host's maximum"),
        "{err}"
    );
}

/// The JavaScript example (`plugins/js-hello`) builds with componentize-js and runs: a component
/// from another toolchain, which imports nothing but wasmesh's own interfaces.
#[test]
#[ignore = "needs node, npm and the npm registry"]
fn a_javascript_subscriber_built_with_componentize_js_runs() {
    let dir = root().join("plugins/js-hello");
    for args in [&["ci", "--silent"][..], &["run", "-s", "build"]] {
        let status = Command::new("npm")
            .args(args)
            .current_dir(&dir)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm {args:?}");
    }
    answers_a_ping(&dir.join("hello.wasm"));
}

/// The Python example (`plugins/py-hello`) builds with componentize-py (`--stub-wasi`, so it
/// imports nothing wasmesh does not grant) and runs.
#[test]
#[ignore = "needs python3 with venv and pip, and PyPI"]
fn a_python_subscriber_built_with_componentize_py_runs() {
    let dir = root().join("plugins/py-hello");
    let tmp = tempfile::tempdir().expect("temp dir");
    let venv = tmp.path().join("venv");
    let wasm = tmp.path().join("hello.wasm");
    let run = |cmd: &mut Command| {
        let status = cmd.current_dir(&dir).status().expect("runs");
        assert!(status.success(), "{cmd:?}");
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "-r", "requirements.txt"]));
    run(Command::new(venv.join("bin/componentize-py"))
        .args([
            "-d",
            "../../wit",
            "-w",
            "subscriber",
            "componentize",
            "app",
            "--stub-wasi",
        ])
        .arg("-o")
        .arg(&wasm));
    answers_a_ping(&wasm);
}

/// The examples' behaviour: a log line with the configured greeting, and a pong reply.
fn answers_a_ping(wasm: &std::path::Path) {
    let out = wasmesh()
        .arg("run")
        .arg(wasm)
        .args(["-c", "greeting=hi", "-e"])
        .arg(r#"{"specversion":"1.0","id":"7","source":"/me","type":"com.example.ping","datacontenttype":"application/json","data":{"n":1}}"#)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("] INFO: hi: com.example.ping from /me"),
        "{stderr}"
    );
    assert!(stderr.contains("disposition: reply"), "{stderr}");
    assert!(stderr.contains("\"id\": \"7-pong\""), "{stderr}");
    assert!(
        stderr.contains("\"type\": \"com.example.pong\""),
        "{stderr}"
    );
    assert!(stderr.contains("\"n\": 1"), "{stderr}");
}
