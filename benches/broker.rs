//! Broker throughput and latency, in one run, with a load generator in this file (keep-alive
//! HTTP/1.1, several connections):
//! (a) the ceiling: a bare hyper server answering 202 with no work;
//! (b) POST -> ingress -> native filter -> the Wasm event-display (output to a sink);
//! (c) the same with event-display as a native HTTP service on loopback, as a Knative user
//!     deploys it;
//! then (b) paced at half the ceiling's rate, for its POST-to-display latency; then ingress with
//! the durable log against in-memory ingress, single events and batches, with 8, 32 and 64
//! producers.
//!
//! `cargo bench -p wasmesh --bench broker`; figures go to docs/BENCHMARKS.md.
//! `WASMESH_BENCH_ONLY=ingress` runs the durable-against-in-memory part alone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use wasmesh_broker::log::SyncStats;
use wasmesh_broker::{
    BrokerKey, DeliveryPolicy, FunctionOutput, IngressConfig, Mesh, MeshConfig, Sink,
    TriggerSpecRuntime,
};
use wasmesh_core::filter::Filter;
use wasmesh_runtime::{EngineConfig, FunctionSettings, PluginEngine, PluginKind};

const CONNECTIONS: usize = 8;
const RUN: Duration = Duration::from_secs(4);

/// When each event was sent, and when its display finished.
#[derive(Default)]
struct Recorder {
    sent: Mutex<HashMap<u64, Instant>>,
    e2e: Mutex<Vec<Duration>>,
    done: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Recorder {
    fn displayed(&self, text: &[u8]) {
        let now = Instant::now();
        let text = String::from_utf8_lossy(text);
        let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("  id: ev-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        if let Some(t0) = self.sent.lock().expect("lock").remove(&id) {
            self.e2e.lock().expect("lock").push(now - t0);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().expect("lock") = Some(now);
    }
}

fn seed_body() -> Bytes {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/seed-event.json"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("seed")).expect("json");
    Bytes::from(serde_json::to_vec(&v["data"]).expect("data"))
}

async fn bare_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .status(202)
                            .body(Full::new(Bytes::new()))
                            .expect("response"),
                    )
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A native event-display behind HTTP, as a Knative Service would be.
async fn native_display_server(rec: Arc<Recorder>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let rec = Arc::clone(&rec);
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let rec = Arc::clone(&rec);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Ok(events) = wasmesh_broker::codec::decode(&parts.headers, body) {
                            for e in events {
                                let text = wasmesh_core::display::render(&e);
                                rec.displayed(text.as_bytes());
                            }
                        }
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(202)
                                .body(Full::new(Bytes::new()))
                                .expect("response"),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn broker(subscriber: Sink, rec: Arc<Recorder>) -> (SocketAddr, Arc<Mesh>) {
    broker_with(subscriber, rec, None).await
}

async fn broker_with(
    subscriber: Sink,
    rec: Arc<Recorder>,
    log: Option<Arc<wasmesh_broker::log::DurableLog>>,
) -> (SocketAddr, Arc<Mesh>) {
    let mesh = Mesh::new(MeshConfig {
        queue_capacity: 4096,
        concurrency: 16,
        output: FunctionOutput {
            prefix: false,
            sink: Some(Arc::new(move |_, bytes| rec.displayed(bytes))),
            book: None,
        },
        log,
        nats: None,
        ..MeshConfig::default()
    });
    let key = BrokerKey::new("default", "default");
    mesh.add_broker(key.clone());
    let filters: Vec<wasmesh_core::filter::FilterSpec> =
        serde_yaml_ng::from_str("[{prefix: {type: dev.knative.}}]").expect("filter");
    mesh.add_trigger(TriggerSpecRuntime {
        namespace: "default".into(),
        name: "display".into(),
        broker: key,
        filter: Filter::for_trigger(None, &filters),
        wasm_filter: None,
        subscriber,
        policy: DeliveryPolicy::default(),
        stats: Default::default(),
    })
    .expect("trigger");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    std::mem::forget(_tx);
    tokio::spawn(wasmesh_broker::serve(
        l,
        Arc::clone(&mesh),
        IngressConfig::default(),
        rx,
    ));
    (addr, mesh)
}

/// Delivery alone, without HTTP ingress or a load generator: `n` events published in-process,
/// timed until the last is displayed. Returns events/s.
async fn dispatch_only(mesh: &Mesh, rec: &Recorder, n: u64) -> f64 {
    let body = seed_body();
    let key = BrokerKey::new("default", "default");
    let start = Instant::now();
    for i in 0..n {
        let event = <wasmesh_core::EventBuilderV10 as wasmesh_core::EventBuilder>::new()
            .id(format!("ev-{}", 1_000_000_000 + i))
            .source("https://10.39.240.1:443")
            .ty("dev.knative.apiserver.resource.add")
            .data("application/json", body.to_vec());
        let event = wasmesh_core::EventBuilder::build(event).expect("event");
        loop {
            match mesh.publish(&key, vec![event.clone()]).await {
                Ok(()) => break,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }
    drain(rec, n, start).await
}

struct Load {
    accepted: u64,
    throttled: u64,
    post_latencies: Vec<Duration>,
    elapsed: Duration,
}

/// `CONNECTIONS` keep-alive connections, each sending one request after the other for `RUN`;
/// with `pace`, each connection sends at most one request per `pace`.
async fn load(
    addr: SocketAddr,
    path: &str,
    rec: Option<Arc<Recorder>>,
    pace: Option<Duration>,
) -> Load {
    load_batches(addr, path, rec, pace, 1, CONNECTIONS).await
}

/// With `batch` > 1, each request carries that many events in batch mode.
async fn load_batches(
    addr: SocketAddr,
    path: &str,
    rec: Option<Arc<Recorder>>,
    pace: Option<Duration>,
    batch: usize,
    connections: usize,
) -> Load {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let body = seed_body();
    let data_text = Arc::new(String::from_utf8(body.to_vec()).expect("utf-8"));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let body = body.clone();
        let data_text = Arc::clone(&data_text);
        let path = path.to_string();
        let rec = rec.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let (mut ok, mut throttled, mut lat) = (0u64, 0u64, Vec::new());
            let mut next_at = Instant::now();
            while start.elapsed() < RUN {
                if let Some(p) = pace {
                    tokio::time::sleep_until(next_at.into()).await;
                    next_at += p;
                }
                let n = NEXT.fetch_add(batch as u64, Ordering::Relaxed);
                let req = if batch > 1 {
                    // Written as text around the data (as cheap for the load generator as the
                    // single events it clones), each event with its own id.
                    let mut text = String::with_capacity(batch * (data_text.len() + 200));
                    for i in 0..batch as u64 {
                        text.push(if i == 0 { '[' } else { ',' });
                        text.push_str(&format!(
                            r#"{{"specversion":"1.0","id":"ev-{}","source":"https://10.39.240.1:443","type":"dev.knative.apiserver.resource.add","datacontenttype":"application/json","data":{data_text}}}"#,
                            n + i
                        ));
                    }
                    text.push(']');
                    hyper::Request::post(format!("http://{addr}{path}"))
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(Full::new(Bytes::from(text)))
                        .expect("request")
                } else {
                    hyper::Request::post(format!("http://{addr}{path}"))
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("ev-{n}"))
                    .header("ce-source", "https://10.39.240.1:443")
                    .header("ce-type", "dev.knative.apiserver.resource.add")
                    .header(
                        "ce-subject",
                        "/apis/v1/namespaces/default/events/busybox.159d7608e3a3572c",
                    )
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request")
                };
                let t0 = Instant::now();
                if let Some(r) = &rec {
                    r.sent.lock().expect("lock").insert(n, t0);
                }
                let resp = sender.send_request(req).await.expect("response");
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                lat.push(t0.elapsed());
                match status {
                    202 => ok += batch as u64,
                    429 => {
                        throttled += 1;
                        if let Some(r) = &rec {
                            r.sent.lock().expect("lock").remove(&n);
                        }
                        // As a client heeding Retry-After would, scaled to a 4 s run: a refused
                        // request sent again at once only takes CPU from the deliveries.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, throttled, lat)
        }));
    }
    let mut out = Load {
        accepted: 0,
        throttled: 0,
        post_latencies: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (ok, th, lat) = t.await.expect("connection task");
        out.accepted += ok;
        out.throttled += th;
        out.post_latencies.extend(lat);
    }
    out.elapsed = start.elapsed();
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Waits for every accepted event to be displayed; returns events/s end to end.
async fn drain(rec: &Recorder, accepted: u64, start: Instant) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec.done.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = rec.done.load(Ordering::Relaxed);
    let last = rec.last.lock().expect("lock").unwrap_or_else(Instant::now);
    done as f64 / (last - start).as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let engine = PluginEngine::new(EngineConfig::default()).expect("engine");
        let display = wasmesh_runtime::load_function(
            &engine,
            "event-display",
            &std::fs::read(wasmesh_plugins::EVENT_DISPLAY).expect("built"),
            Some(PluginKind::Subscriber),
            FunctionSettings { max_idle: 16, ..Default::default() },
        )
        .expect("loads");
        let digest = display.plugin().digest().to_string();
        let display = wasmesh_broker::FunctionSlot::new(
            "event-display",
            wasmesh_broker::Version::new(Arc::new(display), 1, digest),
        );
        if std::env::var("WASMESH_BENCH_ONLY").as_deref() == Ok("ingress") {
            print_ingress(&ingress_runs(&display).await);
            return;
        }

        let ceiling_addr = bare_server().await;
        let mut a = load(ceiling_addr, "/", None, None).await;
        let ceiling = a.accepted as f64 / a.elapsed.as_secs_f64();

        let rec_b = Arc::new(Recorder::default());
        let (b_addr, b_mesh) = broker(Sink::Function(Arc::clone(&display)), Arc::clone(&rec_b)).await;
        let start = Instant::now();
        let mut b = load(b_addr, "/default/default", Some(Arc::clone(&rec_b)), None).await;
        let b_rate = drain(&rec_b, b.accepted, start).await;

        let rec_c = Arc::new(Recorder::default());
        let native = native_display_server(Arc::clone(&rec_c)).await;
        let uri: http::Uri = format!("http://{native}/").parse().expect("uri");
        let (c_addr, c_mesh) = broker(Sink::Http(uri, None), Arc::clone(&rec_c)).await;
        let start = Instant::now();
        let mut c = load(c_addr, "/default/default", Some(Arc::clone(&rec_c)), None).await;
        let c_rate = drain(&rec_c, c.accepted, start).await;

        // (b) at half the ceiling's rate: POST-to-display latency.
        let rec_p = Arc::new(Recorder::default());
        let (p_addr, _) = broker(Sink::Function(Arc::clone(&display)), Arc::clone(&rec_p)).await;
        let pace = Duration::from_secs_f64(CONNECTIONS as f64 / (ceiling / 2.0));
        let start = Instant::now();
        let p = load(p_addr, "/default/default", Some(Arc::clone(&rec_p)), Some(pace)).await;
        let p_rate = drain(&rec_p, p.accepted, start).await;
        let mut e2e = rec_p.e2e.lock().expect("lock").clone();

        let n = 50_000;
        let rec_b2 = Arc::new(Recorder::default());
        let (_, b2) = broker(Sink::Function(Arc::clone(&display)), Arc::clone(&rec_b2)).await;
        let b_dispatch = dispatch_only(&b2, &rec_b2, n).await;
        let rec_c2 = Arc::new(Recorder::default());
        let native2 = native_display_server(Arc::clone(&rec_c2)).await;
        let (_, c2) = broker(Sink::Http(format!("http://{native2}/").parse().expect("uri"), None), Arc::clone(&rec_c2)).await;
        let c_dispatch = dispatch_only(&c2, &rec_c2, n).await;
        drop((b_mesh, c_mesh));

        println!("broker benchmark: {CONNECTIONS} keep-alive connections, {} s per run, 1 KiB JSON events", RUN.as_secs());
        println!("(a) ceiling, bare hyper 202:        {ceiling:>9.0} req/s   POST p50 {:>7.0?} p99 {:>7.0?}", pct(&mut a.post_latencies, 0.5), pct(&mut a.post_latencies, 0.99));
        println!("(b) ingress -> filter -> Wasm e-d:  {b_rate:>9.0} ev/s    POST p50 {:>7.0?} p99 {:>7.0?}  (429s: {})", pct(&mut b.post_latencies, 0.5), pct(&mut b.post_latencies, 0.99), b.throttled);
        println!("(c) ingress -> filter -> HTTP e-d:  {c_rate:>9.0} ev/s    POST p50 {:>7.0?} p99 {:>7.0?}  (429s: {})", pct(&mut c.post_latencies, 0.5), pct(&mut c.post_latencies, 0.99), c.throttled);
        println!("(b) paced at {:.0} ev/s (half the ceiling): achieved {p_rate:.0} ev/s, POST-to-display p50 {:?} p99 {:?}", ceiling / 2.0, pct(&mut e2e, 0.5), pct(&mut e2e, 0.99));
        let ingress = ingress_runs(&display).await;
        println!("delivery only (in-process publish, {n} events): Wasm e-d {b_dispatch:.0} ev/s, HTTP e-d {c_dispatch:.0} ev/s");
        println!("ratios: (b)/(a) = {:.2}   (b)/(c) = {:.2}   delivery only Wasm/HTTP = {:.2}", b_rate / ceiling, b_rate / c_rate, b_dispatch / c_dispatch);
        print_ingress(&ingress);
    });
}

struct IngressRun {
    batch: usize,
    connections: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// With the durable log: its group commit over the run.
    syncs: Option<SyncStats>,
}

/// Durable ingress (fsync, group commit) against in-memory ingress, singles and batches.
async fn ingress_runs(display: &Arc<wasmesh_broker::FunctionSlot>) -> Vec<IngressRun> {
    let mut ingress = Vec::new();
    for (batch, connections) in [(1usize, CONNECTIONS), (10, CONNECTIONS), (1, 32), (1, 64)] {
        for durable in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = durable.then(|| {
                wasmesh_broker::log::DurableLog::open(dir.path(), Default::default()).expect("log")
            });
            let rec = Arc::new(Recorder::default());
            let (addr, _mesh) = broker_with(
                Sink::Function(Arc::clone(display)),
                Arc::clone(&rec),
                log.clone(),
            )
            .await;
            let before = log.as_ref().map(|l| l.sync_stats());
            let mut l =
                load_batches(addr, "/default/default", None, None, batch, connections).await;
            let syncs = log.as_ref().zip(before).map(|(log, before)| {
                let after = log.sync_stats();
                SyncStats {
                    groups: after.groups - before.groups,
                    events: after.events - before.events,
                    syncing: after.syncing - before.syncing,
                }
            });
            ingress.push(IngressRun {
                batch,
                connections,
                rate: l.accepted as f64 / l.elapsed.as_secs_f64(),
                p50: pct(&mut l.post_latencies, 0.5),
                p99: pct(&mut l.post_latencies, 0.99),
                syncs,
            });
            let _ = drain(&rec, l.accepted, Instant::now()).await;
        }
    }
    ingress
}

/// The p50 of writing 4 KiB into a file filled in advance and `fdatasync`ing it, as the
/// write-ahead log does for each group, in a directory of the same disk.
fn sync_p50() -> Duration {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = std::fs::File::create(dir.path().join("sync-probe")).expect("file");
    f.write_all(&vec![0u8; 1 << 20]).expect("fill");
    f.sync_all().expect("sync");
    let mut times: Vec<Duration> = (0..256u64)
        .map(|i| {
            let t = Instant::now();
            f.seek(SeekFrom::Start(i * 4096)).expect("seek");
            f.write_all(&[1u8; 4096]).expect("write");
            f.sync_data().expect("fdatasync");
            t.elapsed()
        })
        .collect();
    pct(&mut times, 0.5)
}

fn print_ingress(ingress: &[IngressRun]) {
    for r in ingress {
        let store = if r.syncs.is_some() {
            "durable (fsync)"
        } else {
            "in memory      "
        };
        println!(
            "ingress {store}, {:>2} event(s) a request, {:>2} connections: {:>9.0} ev/s accepted   POST p50 {:>7.0?} p99 {:>7.0?}",
            r.batch, r.connections, r.rate, r.p50, r.p99
        );
        if let Some(s) = r.syncs {
            println!(
                "    group commit: {} fdatasyncs, {:.1} events each, {:.0?} each on average, {:.0}% of the run spent in them",
                s.groups,
                s.events as f64 / s.groups.max(1) as f64,
                s.syncing / u32::try_from(s.groups.max(1)).unwrap_or(u32::MAX),
                100.0 * s.syncing.as_secs_f64() / RUN.as_secs_f64()
            );
        }
    }
    for pair in ingress.chunks(2) {
        println!(
            "durable/in-memory ingress, {} a request, {} connections: {:.2}",
            pair[0].batch,
            pair[0].connections,
            pair[1].rate / pair[0].rate
        );
    }
    println!(
        "fdatasync of 4 KiB alone in a file on the same disk, this process otherwise idle: p50 {:.0?}",
        sync_p50()
    );
    let best = |durable: bool| {
        ingress
            .iter()
            .filter(|r| r.batch == 1 && r.syncs.is_some() == durable)
            .map(|r| r.rate)
            .fold(0.0, f64::max)
    };
    println!(
        "durable/in-memory ingress throughput, the best single-event rate of each: {:.0} / {:.0} = {:.2}",
        best(true),
        best(false),
        best(true) / best(false)
    );
}
