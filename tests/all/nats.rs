//! Past one machine: the broker over NATS JetStream (a real `nats-server`, started here on a
//! free loopback port with a temporary store), several `wasmesh serve` replicas sharing the
//! work: the broker tests again on this backend, a replica killed under load, NATS restarted
//! mid-stream, a hot swap through one replica reaching all, a ping source failing over, ordered
//! triggers (keys in parallel, each in order, across a failover), and consumers and streams
//! following changed triggers and limits.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{
    Capture, HoldingSubscriber, NatsServer, ORDERED, Serve, apply_slow_trigger,
    broker_with_triggers, ce_headers, function_subscriber, in_order_and_complete, send_keyed,
    slow_trigger, try_request, wait_for,
};

fn store(n: &NatsServer) -> Vec<String> {
    vec!["--store".into(), n.url()]
}

fn with<R>(n: &NatsServer, f: impl FnOnce(&[&str]) -> R) -> R {
    let s = store(n);
    let flags: Vec<&str> = s.iter().map(String::as_str).collect();
    f(&flags)
}

#[test]
fn broker_tests_pass_on_jetstream_too() {
    // Each on a NATS server of its own: streams and consumers outlive a `wasmesh serve`.
    let fresh = |f: fn(&[&str])| with(&NatsServer::start(), f);
    fresh(crate::broker::triggers_route_by_filter_dialect_on);
    fresh(crate::broker::http_subscriber_replies_go_back_into_the_broker_on);
    fresh(crate::broker::a_reply_loop_is_stopped_by_the_ttl_on);
    fresh(crate::broker::retried_outcomes_then_dead_letter_with_error_extensions_on);
    fresh(crate::broker::wasm_functions_subscribe_filter_reply_and_reject_on);
    fresh(crate::broker::http_binding_conformance_cases_reach_the_subscriber_unchanged_on);
    // A stream at its size limit (--log-max-bytes) answers 429, and loses nothing accepted.
    full_store_answers_429(&NatsServer::start().url());
}

/// A broker's stream at its size limit (2,000 bytes) answers 429 and loses nothing accepted.
fn full_store_answers_429(url: &str) {
    crate::broker::a_full_store_answers_429(&[
        "--store",
        url,
        "--log-max-bytes",
        "2000",
        "--concurrency",
        "1",
    ]);
}

/// `replicas` servers of the same files, over `n`, each with its own data directory.
fn replicas(n: &NatsServer, files: &tempfile::TempDir, count: usize) -> Vec<Serve> {
    (0..count)
        .map(|i| {
            let data = files.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&data).expect("dir");
            let url = n.url();
            Serve::start_replica(files.path(), &data, &["--store", &url])
        })
        .collect()
}

/// Sends events round-robin to `addrs` from a few threads until `stop`; returns the ids
/// answered 202 (a replica that is down just gets skipped).
fn load(
    addrs: Vec<SocketAddr>,
    stop: &Arc<AtomicBool>,
    prefix: &'static str,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..3)
        .map(|p| {
            let (addrs, stop) = (addrs.clone(), Arc::clone(stop));
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{prefix}-{p}-{n}");
                    let addr = addrs[n % addrs.len()];
                    n += 1;
                    if let Ok(Some(202)) = try_request(
                        addr,
                        "POST",
                        "/default/default",
                        &ce_headers(&id, "t"),
                        b"{}",
                    ) {
                        acked.push(id);
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                acked
            })
        })
        .collect()
}

fn delivered(sub: &Capture) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in sub.on("/all") {
        *counts.entry(c.headers["ce-id"].clone()).or_default() += 1;
    }
    counts
}

fn files_with(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("b.yaml"), yaml).expect("yaml");
    dir
}

/// Every acknowledged id reached the subscriber; prints the counts.
fn check_nothing_lost(what: &str, sub: &Capture, acked: &[String]) {
    wait_for(
        "every acknowledged event delivered",
        Duration::from_secs(90),
        || {
            let got = delivered(sub);
            acked.iter().all(|id| got.contains_key(id))
        },
    );
    let got = delivered(sub);
    let duplicated: usize = got.values().map(|n| n - 1).sum();
    println!(
        "{what}: acknowledged {}, delivered {} distinct ({} deliveries), duplicated {duplicated}",
        acked.len(),
        got.len(),
        got.values().sum::<usize>()
    );
    assert!(
        acked.len() > 100,
        "too little load to tell: {}",
        acked.len()
    );
}

#[test]
fn a_replica_killed_under_load_loses_nothing() {
    let n = NatsServer::start();
    let sub = Capture::ok();
    // A short delivery timeout: a dead replica's unacknowledged events come back after 2x it.
    let files = files_with(&broker_with_triggers(&[(
        "all",
        "  delivery:\n    timeout: PT2S\n",
        &sub.url("/all"),
    )]));
    let mut rs = replicas(&n, &files, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let producers = load(rs.iter().map(|r| r.addr).collect(), &stop, "k");
    wait_for("load", Duration::from_secs(30), || {
        delivered(&sub).len() > 200
    });
    rs.remove(0).kill();
    // The load goes on to the two others for a while.
    let after_kill = delivered(&sub).len();
    wait_for("load after the kill", Duration::from_secs(30), || {
        delivered(&sub).len() > after_kill + 200
    });
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    check_nothing_lost("replica killed", &sub, &acked);
}

#[test]
fn nats_restarted_mid_stream_loses_nothing() {
    let mut n = NatsServer::start();
    let sub = Capture::ok();
    let files = files_with(&broker_with_triggers(&[("all", "", &sub.url("/all"))]));
    let rs = replicas(&n, &files, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let producers = load(rs.iter().map(|r| r.addr).collect(), &stop, "r");
    wait_for("load", Duration::from_secs(30), || {
        delivered(&sub).len() > 200
    });
    n.restart(Duration::from_millis(500));
    let before = delivered(&sub).len();
    wait_for("load after the restart", Duration::from_secs(60), || {
        delivered(&sub).len() > before + 200
    });
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    check_nothing_lost("NATS restarted", &sub, &acked);
}

#[test]
fn a_swap_through_one_replica_is_live_on_all() {
    let n = NatsServer::start();
    let yaml = function_subscriber("builtin:event-display", "new");
    let files = files_with(&yaml);
    let rs = replicas(&n, &files, 3);
    let bytes = std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built");
    let asked = Instant::now();
    let digest = rs[0].swap_sub(&bytes, serde_json::json!({"tag": "new"}));
    let mut live_after = BTreeMap::new();
    wait_for(
        "the new revision on every replica",
        Duration::from_secs(20),
        || {
            for (i, r) in rs.iter().enumerate() {
                if !live_after.contains_key(&i) && r.sub_runs(&digest) {
                    live_after.insert(i, asked.elapsed());
                }
            }
            live_after.len() == rs.len()
        },
    );
    // How fast is `--bench nats`'s to measure; here, that it arrives everywhere.
    println!("swap through replica 0: live on all 3 replicas after {live_after:?}");
    // Every replica delivers on the new version now: events go to whichever pulls them.
    for i in 0..30 {
        let r = &rs[i % rs.len()];
        let id = format!("sw-{i}");
        assert_eq!(
            r.request("POST", "/default/default", &ce_headers(&id, "t"), b"{}")
                .status,
            202
        );
    }
    wait_for("all 30 on the new version", Duration::from_secs(30), || {
        let all: String = rs.iter().map(|r| r.stdout()).collect();
        (0..30).all(|i| all.contains(&format!("tag=new id=sw-{i}\n")))
    });
    let all: String = rs.iter().map(|r| r.stdout()).collect();
    assert!(!all.contains("id: sw-"), "no event on the old version");
}

/// Replica `i` of `files` over `n`, removing modules that nothing names after `grace`.
fn pruning_replica(n: &NatsServer, files: &tempfile::TempDir, i: usize, grace: &str) -> Serve {
    let data = files.path().join(format!("replica-{i}"));
    std::fs::create_dir_all(&data).expect("dir");
    let url = n.url();
    Serve::start_replica(
        files.path(),
        &data,
        &["--store", &url, "--module-grace", grace],
    )
}

/// Uploads `bytes` through `serve`'s admin API without applying them; returns the digest.
fn upload(serve: &Serve, bytes: &[u8]) -> String {
    let r = serve.admin("POST", "/v1/modules", bytes);
    assert_eq!(r.status, 201, "{}", r.text());
    serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")["digest"]
        .as_str()
        .expect("digest")
        .to_string()
}

/// Applies Function `default/<name>` of `module` through `serve`; returns the status and text.
fn apply_function(serve: &Serve, name: &str, module: &str) -> (u16, String) {
    let f = serde_json::json!({
        "apiVersion": "wasmesh.dev/v1alpha1", "kind": "Function",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"module": module},
    });
    let r = serve.admin("POST", "/v1/apply", f.to_string().as_bytes());
    (r.status, r.text())
}

/// A module that nothing names any more leaves the replicas' shared store (`--module-grace`,
/// 0s here), so that one replica cannot fetch it from there, until it is uploaded again; one a
/// revision names stays, and a replica started later runs it.
#[test]
fn a_module_nothing_names_leaves_the_shared_store() {
    let n = NatsServer::start();
    let files = files_with(&function_subscriber("builtin:event-display", "new"));
    let (first, second) = (
        pruning_replica(&n, &files, 0, "0s"),
        pruning_replica(&n, &files, 1, "0s"),
    );
    let tag = std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built");
    let named = first.swap_sub(&tag, serde_json::json!({"tag": "new"}));
    wait_for("the new revision on both", Duration::from_secs(20), || {
        first.sub_runs(&named) && second.sub_runs(&named)
    });
    let filter = std::fs::read(wasmesh_plugins::TYPE_FILTER).expect("built");
    let unnamed = upload(&first, &filter);
    // Any build prunes.
    let (status, text) = apply_function(&first, "other", "builtin:event-display");
    assert_eq!(status, 200, "{text}");
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    first.wait_log(&format!(
        "removed a shared module that nothing names any more module={}",
        hex(&unnamed)
    ));
    assert!(
        !first.stderr().contains(&format!("module={}", hex(&named))),
        "the named module stays: {}",
        first.stderr()
    );
    // The second replica never had the upload: the shared store no longer has it either.
    let (status, text) = apply_function(&second, "late", &unnamed);
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("no uploaded module"), "{text}");
    // A replica that starts now fetches the named module from the shared store.
    let third = pruning_replica(&n, &files, 2, "0s");
    wait_for(
        "the named revision on a new replica",
        Duration::from_secs(20),
        || third.sub_runs(&named),
    );
    // Uploaded again, it is shared again: the second replica now finds it.
    upload(&first, &filter);
    let (status, text) = apply_function(&second, "late", &unnamed);
    assert_eq!(status, 200, "{text}");
    for r in [&first, &second, &third] {
        let err = r.stderr();
        assert!(!err.contains("cannot prune"), "{err}");
    }
}

/// An upload pushed again after a while waits its whole grace again before it is pruned
/// (`--module-grace 4s`, pushed again after 5 s, a build right after): another replica still
/// finds it in the shared store.
#[test]
fn a_module_pushed_again_waits_its_grace_again() {
    let n = NatsServer::start();
    let files = files_with(&function_subscriber("builtin:event-display", "new"));
    let (first, second) = (
        pruning_replica(&n, &files, 0, "4s"),
        pruning_replica(&n, &files, 1, "4s"),
    );
    let filter = std::fs::read(wasmesh_plugins::TYPE_FILTER).expect("built");
    let digest = upload(&first, &filter);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(upload(&first, &filter), digest);
    let (status, text) = apply_function(&first, "other", "builtin:event-display");
    assert_eq!(status, 200, "{text}");
    let (status, text) = apply_function(&second, "late", &digest);
    assert_eq!(status, 200, "{text}");
    assert!(
        !first.stderr().contains("removed a shared module"),
        "{}",
        first.stderr()
    );
}

/// The replicas' watch of the shared control state outlives a NATS restart: a change made
/// through one replica afterwards is live on the other.
#[test]
fn a_change_after_nats_restarted_still_reaches_every_replica() {
    let mut n = NatsServer::start();
    let yaml = function_subscriber("builtin:event-display", "new");
    let files = files_with(&yaml);
    let rs = replicas(&n, &files, 2);
    n.restart(Duration::from_secs(3));
    let bytes = std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built");
    // The first replica may need a moment to reconnect before it takes the change.
    let mut digest = String::new();
    wait_for(
        "the swap accepted after the restart",
        Duration::from_secs(30),
        || match rs[0].try_swap_sub(&bytes, serde_json::json!({"tag": "new"})) {
            Ok(d) => {
                digest = d;
                true
            }
            Err(_) => false,
        },
    );
    wait_for(
        "the new revision on the other replica",
        Duration::from_secs(30),
        || rs[1].sub_runs(&digest),
    );
}

#[test]
fn the_ping_source_fails_over_without_a_gap_or_a_double() {
    let n = NatsServer::start();
    let sub = Capture::ok();
    let yaml = format!(
        "{}---
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {{name: tick, namespace: default}}
spec:
  schedule: '* * * * * *'
  sink: {{ref: {{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}}}
",
        broker_with_triggers(&[("all", "", &sub.url("/all"))])
    );
    let files = files_with(&yaml);
    let mut rs = replicas(&n, &files, 2);
    let ticks = || -> Vec<String> {
        sub.on("/all")
            .iter()
            .map(|c| c.headers["ce-time"].clone())
            .collect()
    };
    wait_for("three ticks", Duration::from_secs(30), || {
        ticks().len() >= 3
    });
    let holder = rs
        .iter()
        .position(|r| r.stderr().contains("holds the lease"))
        .expect("one replica holds the lease");
    assert!(
        !rs[1 - holder].stderr().contains("holds the lease"),
        "only one replica runs the source"
    );
    rs.remove(holder).kill();
    let before = ticks().len();
    // The lease expires (6 s), the other replica takes over and emits the ticks it missed.
    wait_for(
        "ticks from the other replica",
        Duration::from_secs(40),
        || ticks().len() >= before + 10,
    );
    assert!(rs[0].stderr().contains("holds the lease"));
    let mut times: Vec<chrono::DateTime<chrono::Utc>> = ticks()
        .iter()
        .map(|t| t.parse().expect("ce-time"))
        .collect();
    let total = times.len();
    times.sort();
    times.dedup();
    assert_eq!(times.len(), total, "a tick was delivered twice");
    for pair in times.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            1,
            "a gap between {} and {}",
            pair[0],
            pair[1]
        );
    }
    println!(
        "ping failover: {} ticks from {} to {}, none missing, none twice",
        times.len(),
        times[0],
        times[times.len() - 1]
    );
}

#[test]
fn the_apiserver_source_fails_over_without_losing_or_repeating_a_change() {
    use crate::apiserver::{pod, pods_yaml, seen};
    let n = NatsServer::start();
    let fake = crate::fake_apiserver::FakeApiServer::start(7_000);
    let sub = Capture::ok();
    let files = files_with(&pods_yaml(&sub));
    let kubeconfig = fake.kubeconfig(files.path());
    let kc = kubeconfig.to_str().expect("utf-8").to_string();
    let url = n.url();
    let mut rs: Vec<Serve> = (0..2)
        .map(|i| {
            let data = files.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&data).expect("dir");
            Serve::start_replica(files.path(), &data, &["--store", &url, "--kubeconfig", &kc])
        })
        .collect();
    wait_for("the watch", Duration::from_secs(30), || {
        fake.watchers() >= 1
    });
    fake.add("pods", pod("a", "demo"), false);
    let count = |t: &str, name: &str| {
        seen(&sub)
            .iter()
            .filter(|(ty, n)| ty == t && n == name)
            .count()
    };
    wait_for("add a", Duration::from_secs(30), || {
        count("dev.knative.apiserver.ref.add", "a") == 1
    });
    let holder = rs
        .iter()
        .position(|r| r.stderr().contains("holds the lease"))
        .expect("a replica holds the lease");
    rs.remove(holder).kill();
    // Changes while no replica watches: the next holder finds them from what the last one
    // recorded in NATS.
    fake.add("pods", pod("b", "demo"), false);
    fake.modify("pods", "a", |p| {
        p["metadata"]["annotations"] = serde_json::json!({"changed": "yes"})
    });
    wait_for(
        "the other replica's changes",
        Duration::from_secs(40),
        || {
            count("dev.knative.apiserver.ref.add", "b") == 1
                && count("dev.knative.apiserver.ref.update", "a") == 1
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count("dev.knative.apiserver.ref.add", "a"),
        1,
        "a's add not repeated"
    );
    assert_eq!(count("dev.knative.apiserver.ref.add", "b"), 1);
    assert_eq!(count("dev.knative.apiserver.ref.update", "a"), 1);
    println!("apiserver failover: {:?}", seen(&sub));
}

/// An ordered trigger over JetStream, with two replicas taking events: one replica at a time
/// delivers it, several keys at once, each key's events one at a time and in order.
#[test]
fn ordered_triggers_deliver_keys_in_parallel_and_each_in_order_across_replicas() {
    let n = NatsServer::start();
    let sub = HoldingSubscriber::start(Duration::from_millis(100));
    let files = files_with(&slow_trigger(&sub, ORDERED));
    let replicas = replicas(&n, &files, 2);
    let keys = ["k0", "k1", "k2", "k3"];
    send_keyed(&[&replicas[0], &replicas[1]], "o", &keys, 5);
    wait_for("20 deliveries", Duration::from_secs(30), || {
        sub.done.load(Ordering::SeqCst) >= 20
    });
    for key in keys {
        assert_eq!(
            sub.sequence("o", key),
            vec![0, 1, 2, 3, 4],
            "{key} in order"
        );
    }
    assert_eq!(
        sub.most_of_a_key.load(Ordering::SeqCst),
        1,
        "one event of a key at a time"
    );
    assert!(
        sub.most.load(Ordering::SeqCst) >= 2,
        "keys in parallel: at most {} in flight",
        sub.most.load(Ordering::SeqCst)
    );
    let holders = replicas
        .iter()
        .filter(|r| r.stderr().contains("holds the lease: this ordered trigger"))
        .count();
    assert_eq!(holders, 1, "one replica delivers the ordered trigger");
}

/// An ordered trigger rebuilt under load (its concurrency changed): the old workers leave what
/// they had not started to JetStream, and the new ones take it up first, in order, each event
/// once. (Six keys in four lanes: one lane holds two keys' events, 3.6 s of work, longer than
/// the 2 s after which JetStream gives what was not acknowledged to the new workers.)
#[test]
fn an_ordered_trigger_rebuilt_under_load_keeps_order_and_repeats_nothing() {
    let n = NatsServer::start();
    let url = n.url();
    let sub = crate::harness::ordered_trigger_rebuilt_under_load(
        Duration::from_millis(300),
        &["--store", &url],
    );
    let arrived = sub.arrived.lock().expect("lock").clone();
    let distinct: std::collections::HashSet<&String> = arrived.iter().map(|(_, id)| id).collect();
    assert_eq!(
        distinct.len(),
        arrived.len(),
        "each event once: {arrived:?}"
    );
}

/// The replica delivering an ordered trigger is killed under load: the other takes over after
/// the lease expires, the events the dead one held come again first, and every key stays in
/// order (an event may come twice, never after a later one of its key); nothing accepted is lost.
#[test]
fn an_ordered_trigger_fails_over_in_order_and_loses_nothing() {
    let n = NatsServer::start();
    let sub = HoldingSubscriber::start(Duration::from_millis(20));
    // A 5 s timeout: JetStream delivers what the dead replica held again only after 10 s, later
    // than the lease (6 s) passes to the other replica, which must wait for those first.
    let files = files_with(&slow_trigger(&sub, &ORDERED.replace("PT1S", "PT5S")));
    let mut replicas = replicas(&n, &files, 2);
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    send_keyed(&[&replicas[0], &replicas[1]], "f", &keys, 10);
    wait_for("deliveries under way", Duration::from_secs(30), || {
        sub.done.load(Ordering::SeqCst) >= 10
    });
    let holder = replicas
        .iter()
        .position(|r| r.stderr().contains("holds the lease: this ordered trigger"))
        .expect("a replica holds the lease");
    replicas.remove(holder).kill();
    let survivor = &replicas[0];
    send_keyed(&[survivor], "g", &keys, 10);
    in_order_and_complete(&sub, &keys, 10);
    assert!(
        survivor
            .stderr()
            .contains("holds the lease: this ordered trigger")
    );
}

/// The replica holding an ordered trigger's lease is paused (SIGSTOP: a stopped VM, a starved
/// process) for longer than the lease lives; the other takes the lease over and delivers what
/// was left, and then the paused one resumes with events it had pulled still queued. By its
/// clock the lease is gone, so it starts none of them: no key goes back.
#[test]
fn a_paused_lease_holder_that_resumes_starts_nothing_more() {
    let n = NatsServer::start();
    let sub = HoldingSubscriber::start(Duration::from_millis(20));
    let files = files_with(&slow_trigger(&sub, &ORDERED.replace("PT1S", "PT5S")));
    let replicas = replicas(&n, &files, 2);
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    send_keyed(&[&replicas[0], &replicas[1]], "f", &keys, 10);
    wait_for("deliveries under way", Duration::from_secs(30), || {
        sub.done.load(Ordering::SeqCst) >= 6
    });
    let holder = replicas
        .iter()
        .position(|r| r.stderr().contains("holds the lease: this ordered trigger"))
        .expect("a replica holds the lease");
    let other = &replicas[1 - holder];
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &replicas[holder].pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    // The lease runs out (6 s), the other replica takes it, waits for what the paused one held
    // to come back (5 s), and delivers it.
    wait_for(
        "the other replica delivering",
        Duration::from_secs(60),
        || {
            other
                .stderr()
                .contains("holds the lease: this ordered trigger")
        },
    );
    let before = sub.done.load(Ordering::SeqCst);
    wait_for(
        "deliveries from the other replica",
        Duration::from_secs(30),
        || sub.done.load(Ordering::SeqCst) >= before + 6,
    );
    signal("-CONT");
    send_keyed(&[other], "g", &keys, 10);
    in_order_and_complete(&sub, &keys, 10);
}

/// Events waiting in a trigger's queue longer than the ack wait (one worker, 12 events of
/// 300 ms each, 2 s ack wait) are kept in progress, not delivered a second time by JetStream,
/// also after the trigger was rebuilt while its old worker still empties its queue.
/// A delivery that runs longer than the ack wait (30 s for a trigger without a
/// `delivery.timeout`) is kept in flight by its replica, not delivered again beside it: a
/// subscriber that takes 35 s gets the event once.
#[test]
fn a_delivery_longer_than_the_ack_wait_is_not_repeated() {
    let n = NatsServer::start();
    let sub = HoldingSubscriber::start(Duration::from_secs(35));
    let files = files_with(&slow_trigger(&sub, ""));
    let url = n.url();
    let serve = Serve::start_at(files.path(), &["--store", &url]);
    send_keyed(&[&serve], "long", &["k"], 1);
    // A second copy would come when the ack wait runs out (30 s), before the first ends.
    wait_for("the delivery", Duration::from_secs(60), || {
        sub.done.load(Ordering::SeqCst) >= 1
    });
    assert_eq!(sub.arrived.lock().expect("lock").len(), 1, "delivered once");
}

#[test]
fn events_waiting_longer_than_the_ack_wait_are_delivered_once() {
    let n = NatsServer::start();
    let sub = HoldingSubscriber::start(Duration::from_millis(300));
    let delivery = "  delivery:\n    concurrency: 1\n    timeout: PT1S\n";
    let files = files_with(&slow_trigger(&sub, delivery));
    let url = n.url();
    let serve = Serve::start_at(files.path(), &["--store", &url]);
    send_keyed(&[&serve], "w", &["k"], 12);
    wait_for("the first delivery", Duration::from_secs(20), || {
        !sub.arrived.lock().expect("lock").is_empty()
    });
    apply_slow_trigger(
        &serve,
        &sub,
        &delivery.replace("concurrency: 1", "concurrency: 2"),
    );
    wait_for("12 deliveries", Duration::from_secs(30), || {
        sub.done.load(Ordering::SeqCst) >= 12
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sub.sequence("w", "k"),
        (0..12).collect::<Vec<_>>(),
        "each once"
    );
}

/// JetStream keeps the settings a durable consumer was created with: a trigger whose delivery
/// timeout grew must get the longer acknowledgement wait, or a long delivery is sent twice.
#[test]
fn a_trigger_whose_timeout_changed_updates_its_consumer() {
    let n = NatsServer::start();
    let sub = HoldingSubscriber::start(Duration::from_millis(3000));
    // Timeout 1 s: JetStream would deliver again after 2 s without an acknowledgement.
    let files = files_with(&slow_trigger(&sub, "  delivery:\n    timeout: PT1S\n"));
    let url = n.url();
    let serve = Serve::start_at(files.path(), &["--store", &url]);
    apply_slow_trigger(&serve, &sub, "  delivery:\n    timeout: PT5S\n");
    send_keyed(&[&serve], "t", &["k"], 1);
    wait_for("the delivery done", Duration::from_secs(20), || {
        sub.done.load(Ordering::SeqCst) >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sub.sequence("t", "k"),
        vec![0],
        "delivered once, not again after 2 s"
    );
}

/// JetStream keeps the limits a stream was created with: a restart with `--log-max-bytes`
/// gives the broker's existing stream that limit (and so 429s when it is full).
#[test]
fn a_restart_with_new_log_limits_applies_them_to_the_stream() {
    let n = NatsServer::start();
    let url = n.url();
    let yaml = broker_with_triggers(&[("slow", "", "http://127.0.0.1:9/")]);
    Serve::start(&[("b.yaml", &yaml)], &["--store", &url]).stop();
    full_store_answers_429(&url);
}

/// An ordered trigger rebuilt while one of its events is being retried in place: the old worker
/// stops retrying once its lease is given up (no dead letter, no acknowledgement), and the new
/// workers deliver the event when JetStream gives it again: it succeeds once, before the next
/// event of its key.
#[test]
fn an_event_retried_in_place_is_left_to_the_new_workers_after_a_rebuild() {
    let n = NatsServer::start();
    let first_seen: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let delivered: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (seen, done) = (Arc::clone(&first_seen), Arc::clone(&delivered));
    let (_runtime, addr) =
        crate::harness::loopback_server(move |req: hyper::Request<hyper::body::Incoming>| {
            let id = crate::harness::request_header(&req, "ce-id");
            // `f-k0-0` fails for its first 3 s.
            let failing = id == "f-k0-0"
                && seen
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(Instant::now)
                    .elapsed()
                    < Duration::from_secs(3);
            if !failing {
                done.lock().expect("lock").push(id);
            }
            async move {
                hyper::Response::builder()
                    .status(if failing { 503 } else { 202 })
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("response")
            }
        });
    let trigger = |concurrency: usize| {
        format!(
            "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: all, namespace: default}}\n\
             spec:\n  broker: default\n  subscriber: {{uri: 'http://{addr}/'}}\n  delivery:\n    \
             ordering: ordered\n    partitionKey: subject\n    concurrency: {concurrency}\n    \
             timeout: PT1S\n    retry: 30\n    backoffPolicy: linear\n    backoffDelay: PT0.2S\n"
        )
    };
    let files = files_with(&format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n{}",
        trigger(2)
    ));
    let url = n.url();
    let serve = Serve::start_at(files.path(), &["--store", &url]);
    send_keyed(&[&serve], "f", &["k0"], 2);
    wait_for("the first attempt", Duration::from_secs(20), || {
        first_seen.lock().expect("lock").is_some()
    });
    let r = serve.admin("POST", "/v1/apply", trigger(4).as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for("both events delivered", Duration::from_secs(30), || {
        delivered.lock().expect("lock").len() >= 2
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        *delivered.lock().expect("lock"),
        vec!["f-k0-0".to_string(), "f-k0-1".to_string()],
        "once each, in order"
    );
    assert!(
        !serve.stderr().contains("dead letter"),
        "no dead letter: {}",
        serve.stderr()
    );
}

/// A reply JetStream cannot take yet (the stream at `--log-max-bytes`, held by a slow trigger's
/// events) waits for room past the ack wait of the event that caused it: that event is reported
/// in progress meanwhile, so it does not come again (its subscriber is called once), and the
/// reply arrives once there is room.
#[test]
fn a_reply_waiting_for_room_keeps_its_event_from_coming_again() {
    let n = NatsServer::start();
    let calls = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let c = Arc::clone(&calls);
    // Answers after 1 s with a 900-byte reply.
    let (_replier_rt, replier) =
        crate::harness::loopback_server(move |req: hyper::Request<hyper::body::Incoming>| {
            let id = crate::harness::request_header(&req, "ce-id");
            c.lock().expect("lock").push(id.clone());
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                hyper::Response::builder()
                    .status(200)
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("reply-{id}"))
                    .header("ce-source", "/replier")
                    .header("ce-type", "t.resp")
                    .header("content-type", "text/plain")
                    .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                        b'x';
                        900
                    ])))
                    .expect("response")
            }
        });
    let hold = HoldingSubscriber::start(Duration::from_secs(8));
    let sink = Capture::ok();
    let yaml = broker_with_triggers(&[
        (
            "requests",
            "  filters: [{exact: {type: t.req}}]\n  delivery: {timeout: PT3S, retry: 60, backoffDelay: PT0.2S, backoffPolicy: linear, backoffMax: PT1S}\n",
            &format!("http://{replier}/"),
        ),
        (
            "hold",
            "  filters: [{exact: {type: t.fill}}]\n  delivery: {concurrency: 64}\n",
            &format!("http://{}/", hold.addr),
        ),
        (
            "responses",
            "  filters: [{exact: {type: t.resp}}]\n",
            &sink.url("/resp"),
        ),
    ]);
    let flags = [store(&n), vec!["--log-max-bytes".into(), "2000".into()]].concat();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let serve = Serve::start(&[("b.yaml", &yaml)], &flags);
    let r = serve.request("POST", "/default/default", &ce_headers("r1", "t.req"), b"");
    assert_eq!(r.status, 202, "{}", r.text());
    // While the replier takes its second, the slow trigger's events fill the stream.
    let mut filled = 0;
    for i in 0..100 {
        let r = serve.request(
            "POST",
            "/default/default",
            &ce_headers(&format!("f{i}"), "t.fill"),
            b"",
        );
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 202, "{}", r.text());
        filled += 1;
    }
    assert!(
        (1..100).contains(&filled),
        "the stream filled up after {filled}: {}",
        serve.stderr()
    );
    let got = sink.wait("/resp", 1);
    assert_eq!(got[0].headers["ce-id"], "reply-r1");
    assert!(
        serve.stderr().contains("trying it again"),
        "{}",
        serve.stderr()
    );
    std::thread::sleep(Duration::from_secs(1));
    let calls = calls.lock().expect("lock").clone();
    assert_eq!(calls, ["r1"], "the request came once");
}

/// A stream at `--log-max-bytes` refuses new events (429) and never makes room by dropping
/// events it accepted and still owes. (nats-server before 2.10.5 miscounts a message's size when
/// checking that limit, nats-io/nats-server#4771, and drops the oldest message instead of
/// refusing the new one: Debian's 2.9 does; wasmesh then keeps the limit itself.)
#[test]
fn a_full_stream_refuses_new_events_and_drops_none_it_accepted() {
    let n = NatsServer::start();
    // Refuses every event for its first 3 s (each is retried after 0.5 s), then takes them.
    let started = Instant::now();
    let arrived = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&arrived);
    let (_runtime, addr) =
        crate::harness::loopback_server(move |req: hyper::Request<hyper::body::Incoming>| {
            let id = crate::harness::request_header(&req, "ce-id");
            let refuse = started.elapsed() < Duration::from_secs(3);
            if !refuse {
                seen.lock().expect("lock").push(id);
            }
            async move {
                hyper::Response::builder()
                    .status(if refuse { 503 } else { 202 })
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("response")
            }
        });
    let yaml = broker_with_triggers(&[(
        "later",
        "  delivery: {retry: 30, backoffDelay: PT0.5S, backoffPolicy: linear, backoffMax: PT0.5S}\n",
        &format!("http://{addr}/"),
    )]);
    let flags = [
        store(&n),
        ["--log-max-bytes", "2000"].map(String::from).to_vec(),
    ]
    .concat();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let serve = Serve::start(&[("b.yaml", &yaml)], &flags);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        // Events of one size (this one made 2.9 drop old events on every publish).
        let id = format!("m2000-{i}");
        let h = [
            ("ce-specversion", "1.0"),
            ("ce-id", id.as_str()),
            ("ce-source", "/x"),
            ("ce-type", "t"),
        ];
        let r = serve.request("POST", "/default/default", &h, b"");
        match r.status {
            202 => accepted.push(id),
            429 => refused += 1,
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert!(
        refused > 0,
        "a full stream refuses ({} accepted)",
        accepted.len()
    );
    wait_for(
        "every accepted event delivered",
        Duration::from_secs(30),
        || {
            let arrived = arrived.lock().expect("lock");
            accepted.iter().all(|id| arrived.contains(id))
        },
    );
    // An event larger than the stream holds even empty: 413, not 429 forever.
    let mut h = ce_headers("too-big", "t");
    h.push(("content-type", "text/plain"));
    let r = serve.request("POST", "/default/default", &h, &[b'a'; 3000]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("--log-max-bytes"), "{}", r.text());
}

/// An event larger than the NATS server takes (its max_payload, 1 MiB by default, under
/// `--max-body`) is refused for good, 413 naming the limit, not 503 as if the store were down.
#[test]
fn an_event_larger_than_nats_takes_is_refused_with_413() {
    let n = NatsServer::start();
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[("all", "", &sub.url("/all"))]);
    let serve = Serve::start(
        &[("b.yaml", &yaml)],
        &store(&n).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut h = ce_headers("big", "t");
    h.push(("content-type", "text/plain"));
    let r = serve.request("POST", "/default/default", &h, &vec![b'a'; 1_500_000]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("max_payload"), "{}", r.text());
    let r = serve.request("POST", "/default/default", &ce_headers("small", "t"), b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(sub.wait("/all", 1)[0].headers["ce-id"], "small");
}

/// `--store` naming an address where no NATS server answers: the start fails saying so, not
/// only with the time-out of the first JetStream request (the client connects in the
/// background, so that is the first thing to fail).
#[test]
fn a_store_where_no_nats_answers_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("b.yaml"), broker_with_triggers(&[])).expect("yaml");
    let url = format!("nats://127.0.0.1:{port}");
    let err = crate::harness::serve_refused(dir.path(), &["--store", &url]);
    assert!(
        err.contains("no NATS server could be reached there"),
        "{err}"
    );
}
