//! The broker over NATS JetStream with 1, 2 and 3 replicas against the embedded store on one
//! node, in one run: the real release `wasmesh serve`, a real `nats-server -js` on loopback,
//! eight keep-alive producers spread over the replicas, 4 s per case. Ingress counts events
//! answered 202 (durable in each case: fsync'ed by wasmesh, or acknowledged by JetStream, which
//! syncs its file store on its own schedule); deliveries to a Wasm Function run meanwhile. With
//! 3 replicas, a module swap applied through one replica: how long until each has it live.
//!
//! `cargo bench -p wasmesh --bench nats`; figures go to docs/BENCHMARKS.md.

#[allow(dead_code)]
#[path = "../tests/all/harness.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{HoldingSubscriber, KeepAlive, NatsServer, Serve};

const PRODUCERS: usize = 8;
const RUN: Duration = Duration::from_secs(4);

/// Events/s accepted and the p50/p99 of a POST, over `RUN`.
fn measure(replicas: &[Serve], label: &str) -> (f64, Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let addr = replicas[p % replicas.len()].addr;
            let (stop, next, latencies) =
                (Arc::clone(&stop), Arc::clone(&next), Arc::clone(&latencies));
            let label = label.to_string();
            std::thread::spawn(move || {
                let mut c = KeepAlive::new(addr);
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{label}-{}", next.fetch_add(1, Ordering::Relaxed));
                    let t = Instant::now();
                    assert!(c.post(&id), "event refused");
                    mine.push(t.elapsed());
                }
                latencies.lock().expect("lock").extend(mine);
            })
        })
        .collect();
    // Warm up, then count.
    std::thread::sleep(Duration::from_millis(500));
    let start_count = next.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(RUN);
    let count = next.load(Ordering::Relaxed) - start_count;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("producer");
    }
    let mut l = latencies.lock().expect("lock").clone();
    l.sort();
    (rate, l[l.len() / 2], l[l.len() * 99 / 100])
}

fn main() {
    let module = std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built");
    let setup = || {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("f.yaml"),
            harness::function_subscriber("tag.wasm", "b"),
        )
        .expect("yaml");
        std::fs::write(dir.path().join("tag.wasm"), &module).expect("module");
        dir
    };
    println!(
        "{:<34} {:>12} {:>10} {:>10}",
        "case", "events/s", "POST p50", "POST p99"
    );
    let mut results = Vec::new();
    {
        let dir = setup();
        let serve = Serve::start_at(dir.path(), &[]);
        let r = measure(std::slice::from_ref(&serve), "embedded");
        println!(
            "{:<34} {:>12.0} {:>10.2?} {:>10.2?}",
            "embedded store, 1 node", r.0, r.1, r.2
        );
        results.push(r.0);
    }
    for count in 1..=3 {
        let nats = NatsServer::start();
        let dir = setup();
        let replicas: Vec<Serve> = (0..count)
            .map(|i| {
                let data = dir.path().join(format!("replica-{i}"));
                std::fs::create_dir_all(&data).expect("dir");
                Serve::start_replica(dir.path(), &data, &["--store", &nats.url()])
            })
            .collect();
        let r = measure(&replicas, &format!("nats{count}"));
        println!(
            "{:<34} {:>12.0} {:>10.2?} {:>10.2?}",
            format!("JetStream, {count} replica(s)"),
            r.0,
            r.1,
            r.2
        );
        results.push(r.0);
        if count == 3 {
            swap_through_one_replica(&replicas);
        }
    }
    println!(
        "JetStream with 1 replica / embedded: {:.2} (bar: at least 0.40)",
        results[1] / results[0]
    );
    ordered_delivery();
}

/// Deliveries/s of an ordered trigger over JetStream (8 keys, concurrency 8) against an
/// unordered one, to an HTTP subscriber that takes `HOLD` for each event.
fn ordered_delivery() {
    const HOLD: Duration = Duration::from_millis(5);
    const KEYS: usize = 8;
    const EVENTS: usize = 800;
    for delivery in [
        "  delivery:\n    ordering: ordered\n    partitionKey: subject\n    concurrency: 8\n",
        "  delivery:\n    concurrency: 8\n",
    ] {
        let nats = NatsServer::start();
        let sub = HoldingSubscriber::start(HOLD);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("b.yaml"),
            harness::broker_with_triggers(&[("all", delivery, &format!("http://{}/", sub.addr))]),
        )
        .expect("yaml");
        let serve = Serve::start_at(dir.path(), &["--store", &nats.url()]);
        let mut producer = KeepAlive::new(serve.addr);
        let started = Instant::now();
        for i in 0..EVENTS {
            assert!(
                producer.post_subject(&format!("e-{i}"), &format!("key-{}", i % KEYS)),
                "event refused"
            );
        }
        while sub.done.load(Ordering::SeqCst) < EVENTS {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "deliveries stalled"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
        println!(
            "{} trigger over JetStream, {KEYS} keys, subscriber taking {HOLD:?}: {rate:.0} deliveries/s, at most {} in flight{}",
            if delivery.contains("ordered") {
                "ordered  "
            } else {
                "unordered"
            },
            sub.most.load(Ordering::SeqCst),
            if delivery.contains("ordered") {
                format!(
                    " (one in flight would allow at most {:.0}/s)",
                    1.0 / HOLD.as_secs_f64()
                )
            } else {
                String::new()
            }
        );
    }
}

/// A new module uploaded and applied through replica 0: the time from the upload until each
/// replica reports it live (its admin API polled every millisecond).
fn swap_through_one_replica(replicas: &[Serve]) {
    let bytes = std::fs::read(wasmesh_plugins::EVENT_DISPLAY).expect("built");
    let asked = Instant::now();
    let digest = replicas[0].swap_sub(&bytes, serde_json::json!({}));
    let mut live_after: Vec<Option<Duration>> = vec![None; replicas.len()];
    while live_after.iter().any(Option::is_none) {
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "the new version is not live on every replica after 30 s"
        );
        for (i, r) in replicas.iter().enumerate() {
            if live_after[i].is_none() && r.sub_runs(&digest) {
                live_after[i] = Some(asked.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let live_after: Vec<Duration> = live_after.into_iter().flatten().collect();
    println!(
        "swap through replica 0, live on each of 3 replicas after {live_after:.1?}; slowest {:.1?} (bar: 1 s)",
        live_after.iter().max().copied().unwrap_or_default()
    );
}
