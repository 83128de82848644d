//! Hot swap under a steady load, with the real `wasmesh serve` (release build, embedded durable
//! store): the time from each swap request (upload done, apply sent) to the first event handled
//! by the new version, and the delivered rate around each swap against the steady rate.
//!
//! `cargo bench -p wasmesh --bench swap`; figures go to docs/BENCHMARKS.md.

#[allow(dead_code)]
#[path = "../tests/all/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{KeepAlive, Serve};

const SWAPS: u32 = 10;
const PRODUCERS: u64 = 4;

/// Producers at `rate` events/s in total, paced, until `stop`.
fn steady_load(
    addr: SocketAddr,
    rate: f64,
    stop: &Arc<AtomicBool>,
    next: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..PRODUCERS)
        .map(|_| {
            let (stop, next) = (Arc::clone(stop), Arc::clone(next));
            std::thread::spawn(move || {
                let mut p = KeepAlive::new(addr);
                let gap = Duration::from_secs_f64(PRODUCERS as f64 / rate);
                let start = Instant::now();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = start + gap * u32::try_from(sent).unwrap_or(u32::MAX);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    assert!(p.post(&format!("s-{n}")), "event refused");
                    sent += 1;
                }
                sent
            })
        })
        .collect()
}

/// Polls the server's output every millisecond: (time, lines so far) samples, and when each
/// version's first line appeared.
struct Watcher {
    samples: Mutex<Vec<(Instant, u64)>>,
    first: Mutex<Vec<Option<Instant>>>,
}

fn watch(serve: Arc<Serve>, stop: Arc<AtomicBool>) -> Arc<Watcher> {
    let w = Arc::new(Watcher {
        samples: Mutex::new(Vec::new()),
        first: Mutex::new(vec![None; SWAPS as usize + 1]),
    });
    let w2 = Arc::clone(&w);
    std::thread::spawn(move || {
        let (mut offset, mut lines, mut partial) = (0usize, 0u64, String::new());
        while !stop.load(Ordering::Relaxed) {
            let new = serve.stdout_from(offset);
            offset += new.len();
            partial.push_str(&new);
            let now = Instant::now();
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                lines += 1;
                if let Some(v) = line
                    .strip_prefix("tag=v")
                    .and_then(|r| r.split_once(' '))
                    .and_then(|(v, _)| v.parse::<usize>().ok())
                {
                    let mut first = w2.first.lock().expect("lock");
                    if v < first.len() && first[v].is_none() {
                        first[v] = Some(now);
                    }
                }
            }
            w2.samples.lock().expect("lock").push((now, lines));
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    w
}

impl Watcher {
    /// Lines delivered per second between `from` and `to`.
    fn rate(&self, from: Instant, to: Instant) -> f64 {
        let s = self.samples.lock().expect("lock");
        let at = |t: Instant| {
            s.iter()
                .rev()
                .find(|(when, _)| *when <= t)
                .map_or(0, |(_, n)| *n)
        };
        (at(to) - at(from)) as f64 / (to - from).as_secs_f64()
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("f.yaml"),
        harness::function_subscriber("tag.wasm", "v0"),
    )
    .expect("yaml");
    let tag = std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built");
    std::fs::write(dir.path().join("tag.wasm"), &tag).expect("module");
    let serve = Arc::new(Serve::start_at(dir.path(), &[]));
    // Each swap uploads a module never seen before: fixture-tag with one more custom section
    // naming the swap, so that the upload compiles it afresh.
    let variant = |k: u32| {
        let payload = format!("swap-{k:03}");
        let mut v = tag.clone();
        v.extend_from_slice(&[0, 1 + 1 + payload.len() as u8, 1, b'x']);
        v.extend_from_slice(payload.as_bytes());
        v
    };

    // The saturated rate first, then a steady load at 60% of it.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(Arc::clone(&serve), Arc::clone(&stop));
    let next = Arc::new(AtomicU64::new(0));
    let flood_stop = Arc::new(AtomicBool::new(false));
    let flood = steady_load(serve.addr, 1e9, &flood_stop, &next);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let saturated = watcher.rate(t0, Instant::now());
    flood_stop.store(true, Ordering::Relaxed);
    for p in flood {
        p.join().expect("producer");
    }
    std::thread::sleep(Duration::from_secs(2));

    let rate = saturated * 0.6;
    let load_stop = Arc::new(AtomicBool::new(false));
    let producers = steady_load(serve.addr, rate, &load_stop, &next);
    std::thread::sleep(Duration::from_millis(500));
    let s0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let steady = watcher.rate(s0, Instant::now());

    let mut live_ms = Vec::new();
    let mut upload_live_ms = Vec::new();
    let mut dips = Vec::new();
    for k in 1..=SWAPS {
        let bytes = variant(k);
        let uploading = Instant::now();
        let r = serve.admin("POST", "/v1/modules", &bytes);
        assert_eq!(r.status, 201, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        let digest = v["digest"].as_str().expect("digest").to_string();
        let body = serde_json::to_vec(&serde_json::json!({
            "apiVersion": "wasmesh.dev/v1alpha1",
            "kind": "Function",
            "metadata": { "name": "sub", "namespace": "default" },
            "spec": { "module": digest, "config": { "tag": format!("v{k}") } },
        }))
        .expect("json");
        let asked = Instant::now();
        let r = serve.admin("POST", "/v1/apply", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        std::thread::sleep(Duration::from_millis(500));
        let first = watcher.first.lock().expect("lock")[k as usize];
        let first = first.expect("the new version handled events");
        live_ms.push((first - asked).as_secs_f64() * 1e3);
        upload_live_ms.push((first - uploading).as_secs_f64() * 1e3);
        // The delivered rate over the 100 ms after the apply, and the lowest rate of any
        // 100 ms window from the start of the upload (it compiles the module) to 250 ms after
        // the apply.
        let mut lowest = f64::MAX;
        let mut from = uploading;
        while from + Duration::from_millis(100) <= asked + Duration::from_millis(250) {
            lowest = lowest.min(watcher.rate(from, from + Duration::from_millis(100)) / steady);
            from += Duration::from_millis(10);
        }
        dips.push((
            watcher.rate(asked, asked + Duration::from_millis(100)) / steady,
            lowest,
            watcher.rate(uploading, asked + Duration::from_millis(250)) / steady,
        ));
    }
    load_stop.store(true, Ordering::Relaxed);
    let sent: u64 = producers
        .into_iter()
        .map(|p| p.join().expect("producer"))
        .sum();
    stop.store(true, Ordering::Relaxed);

    live_ms.sort_by(f64::total_cmp);
    upload_live_ms.sort_by(f64::total_cmp);
    let worst100 = dips.iter().map(|d| d.0).fold(f64::MAX, f64::min);
    let lowest = dips.iter().map(|d| d.1).fold(f64::MAX, f64::min);
    let whole = dips.iter().map(|d| d.2).fold(f64::MAX, f64::min);
    let mean100 = dips.iter().map(|d| d.0).sum::<f64>() / dips.len() as f64;
    println!(
        "saturated delivery: {saturated:.0} events/s; steady load offered {rate:.0} events/s, delivered {steady:.0} events/s ({sent} sent during the swaps)"
    );
    println!(
        "swap request -> first event on the new version ({SWAPS} swaps): min {:.1} ms, median {:.1} ms, max {:.1} ms",
        live_ms[0],
        live_ms[live_ms.len() / 2],
        live_ms[live_ms.len() - 1]
    );
    println!(
        "upload of a new module (validated, compiled, stored) + apply -> first event on it: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        upload_live_ms[0],
        upload_live_ms[upload_live_ms.len() / 2],
        upload_live_ms[upload_live_ms.len() - 1]
    );
    println!(
        "delivered rate / steady rate: 100 ms after the apply: worst {worst100:.2}, mean {mean100:.2}; lowest 100 ms window from the upload's start to 250 ms after the apply: {lowest:.2}; that whole span: worst {whole:.2}"
    );
}
