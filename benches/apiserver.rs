//! ApiServerSource at scale, with the real `wasmesh serve` and the fake API server of the
//! tests: memory per watched object with 10,000 objects listed, and events/s from a watch
//! stream of 10,000 changes through the broker to an HTTP subscriber.
//!
//! `cargo bench -p wasmesh --bench apiserver`; figures go to docs/BENCHMARKS.md.

#[allow(dead_code)]
#[path = "../tests/all/fake_apiserver.rs"]
mod fake_apiserver;
#[allow(dead_code)]
#[path = "../tests/all/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use harness::{Capture, Serve, wait_for};
use serde_json::json;

const OBJECTS: usize = 10_000;

fn pod(n: usize) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("pod-{n:05}"), "namespace": "default", "uid": format!("00000000-0000-0000-0000-{n:012}"),
                        "labels": {"app": "demo"}},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn yaml(sub: &Capture) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: pods, namespace: default}}\nspec:\n  subscriber: {{uri: '{}'}}\n---\n\
         apiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata: {{name: pods, namespace: default}}\n\
         spec:\n  mode: Reference\n  resources:\n  - {{apiVersion: v1, kind: Pod}}\n  sink:\n    ref: {{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}\n",
        sub.url("/pods")
    )
}

/// Starts serve against `fake` with `objects` pods already there; returns it once watching.
fn serve_with(fake: &FakeApiServer, sub: &Capture, dir: &std::path::Path) -> Serve {
    std::fs::write(dir.join("b.yaml"), yaml(sub)).expect("yaml");
    let kubeconfig = fake.kubeconfig(dir);
    let serve = Serve::start_at(dir, &["--kubeconfig", kubeconfig.to_str().expect("utf-8")]);
    wait_for("the watch", Duration::from_secs(120), || {
        fake.watchers() >= 1
    });
    // Let the process settle after the listing.
    std::thread::sleep(Duration::from_millis(500));
    serve
}

fn main() {
    // Baseline: the same serve watching no objects.
    let sub = Capture::ok();
    let empty = FakeApiServer::start(1);
    let dir0 = tempfile::tempdir().expect("tempdir");
    let serve0 = serve_with(&empty, &sub, dir0.path());
    let base = rss_kib(serve0.pid());
    drop(serve0);

    let fake = FakeApiServer::start(1);
    for n in 0..OBJECTS {
        fake.add("pods", pod(n), false);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = serve_with(&fake, &sub, dir.path());
    let listed = rss_kib(serve.pid());
    let per_object = (listed.saturating_sub(base)) as f64 * 1024.0 / OBJECTS as f64;

    let start = Instant::now();
    for n in OBJECTS..2 * OBJECTS {
        fake.add("pods", pod(n), false);
    }
    wait_for("every event delivered", Duration::from_secs(300), || {
        sub.on("/pods").len() >= OBJECTS
    });
    let rate = OBJECTS as f64 / start.elapsed().as_secs_f64();
    let watching = rss_kib(serve.pid());

    println!(
        "apiserver benchmark: {OBJECTS} Pods, Reference mode, durable broker, HTTP subscriber on loopback"
    );
    println!(
        "RSS: {base} KiB watching nothing, {listed} KiB with {OBJECTS} objects listed, {watching} KiB after {OBJECTS} more added"
    );
    println!("memory per watched object (listed): {per_object:.0} bytes");
    println!("events/s from the watch stream to the subscriber: {rate:.0}");
}
