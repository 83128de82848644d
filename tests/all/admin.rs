//! Live operations through the admin API of the real `wasmesh serve`: uploads, hot swaps under
//! load, automatic rollback, refused uploads and tokens, concurrent applies, `--watch`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Serve, ce_headers, request, try_request, wait_for};

const BROKER: &str = "apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: default
  namespace: default
";

/// A Function `sub` running `module`, and a trigger `all` delivering every event to it.
fn subscribed(module: &str, extra_spec: &str) -> String {
    format!(
        "{BROKER}---
apiVersion: wasmesh.dev/v1alpha1
kind: Function
metadata:
  name: sub
  namespace: default
spec:
  module: {module}
  config:
    tag: new
{extra_spec}---
{}",
        trigger_to_sub("all")
    )
}

/// A trigger `name` on the default broker delivering every event to the Function `sub`.
fn trigger_to_sub(name: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: {name}
  namespace: default
spec:
  broker: default
  subscriber:
    ref:
      apiVersion: wasmesh.dev/v1alpha1
      kind: Function
      name: sub
"
    )
}

/// A directory with `subscribed("builtin:event-display")`, for a server restarted on it.
fn subscribed_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("f.yaml"),
        subscribed("builtin:event-display", ""),
    )
    .expect("yaml");
    dir
}

fn function_json(module: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut spec = serde_json::json!({ "module": module, "config": { "tag": "new" } });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "wasmesh.dev/v1alpha1",
        "kind": "Function",
        "metadata": { "name": "sub", "namespace": "default" },
        "spec": spec,
    }))
    .expect("json")
}

fn upload(serve: &Serve, path: &str) -> String {
    let bytes = std::fs::read(path).expect("plugin built");
    let r = serve.admin("POST", "/v1/modules", &bytes);
    assert_eq!(r.status, 201, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    v["digest"].as_str().expect("digest").to_string()
}

fn json(r: &crate::harness::Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {}", r.text()))
}

/// Which version printed each event: event-display's `  id: X` or fixture-tag's `tag=.. id=X`.
fn handled(stdout: &str) -> HashMap<String, Vec<&'static str>> {
    let mut seen: HashMap<String, Vec<&'static str>> = HashMap::new();
    for line in stdout.lines() {
        if let Some(id) = line.strip_prefix("  id: ") {
            seen.entry(id.trim().to_string())
                .or_default()
                .push("display");
        } else if let Some(rest) = line.strip_prefix("tag=")
            && let Some(id) = rest.split(" id=").nth(1)
        {
            seen.entry(id.trim().to_string()).or_default().push("tag");
        }
    }
    seen
}

/// Sends `s-<n>` events from `producers` threads until `stop`; `next` numbers them in the order
/// their requests start. Returns the ids answered 202.
fn load(
    addr: std::net::SocketAddr,
    producers: usize,
    pause: Duration,
    next: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
    (0..producers)
        .map(|_| {
            let (next, stop) = (Arc::clone(next), Arc::clone(stop));
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let id = format!("s-{n}");
                    let status = try_request(
                        addr,
                        "POST",
                        "/default/default",
                        &ce_headers(&id, "t"),
                        b"{}",
                    );
                    assert_eq!(status, Ok(Some(202)), "event {id}");
                    acked.push(n);
                    std::thread::sleep(pause);
                }
                acked
            })
        })
        .collect()
}

/// `bytes` with a custom section appended: the same component, another digest.
fn variant(bytes: &[u8], tag: &str) -> Vec<u8> {
    let name = b"wasmesh-test";
    let payload_len = 1 + name.len() + tag.len();
    let mut out = bytes.to_vec();
    out.push(0);
    out.push(u8::try_from(payload_len).expect("short"));
    out.push(u8::try_from(name.len()).expect("short"));
    out.extend_from_slice(name);
    out.extend_from_slice(tag.as_bytes());
    out
}

#[test]
fn twenty_hot_swaps_under_load_lose_and_double_nothing() {
    let serve = Serve::start(&[("f.yaml", &subscribed("builtin:event-display", ""))], &[]);
    // Two modules (fixture-tag, and fixture-tag with one more custom section), alternated;
    // each version's config tags its lines with its number.
    let tag_bytes = std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built");
    let mut digests = Vec::new();
    for bytes in [tag_bytes.clone(), variant(&tag_bytes, "b")] {
        let r = serve.admin("POST", "/v1/modules", &bytes);
        assert_eq!(r.status, 201, "{}", r.text());
        digests.push(json(&r)["digest"].as_str().expect("digest").to_string());
    }
    assert_ne!(digests[0], digests[1]);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producers = load(serve.addr, 3, Duration::from_millis(2), &next, &stop);
    // Per swap: the number of the first event sent after the swap was answered.
    let mut live_from: Vec<(u64, u32)> = vec![(0, 0)];
    let mut swap_ms = Vec::new();
    wait_for("load on the first version", Duration::from_secs(20), || {
        serve.stdout().matches("  id: s-").count() >= 50
    });
    for k in 1..=20u32 {
        let module = &digests[(k % 2) as usize];
        let body = serde_json::to_vec(&serde_json::json!({
            "apiVersion": "wasmesh.dev/v1alpha1",
            "kind": "Function",
            "metadata": { "name": "sub", "namespace": "default" },
            "spec": { "module": module, "config": { "tag": format!("v{k}") } },
        }))
        .expect("json");
        let t = Instant::now();
        let r = serve.admin("POST", "/v1/apply", &body);
        swap_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            json(&r)["changes"][0]["action"],
            "configured",
            "{}",
            r.text()
        );
        live_from.push((next.load(Ordering::SeqCst), k));
        // The next swap once this version has handled some of the load.
        let mark = format!("tag=v{k} id=");
        wait_for(
            &format!("events on version {k}"),
            Duration::from_secs(20),
            || serve.stdout().matches(&mark).count() >= 20,
        );
    }
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<u64> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    let versions = |stdout: &str| {
        let mut by: HashMap<u64, Vec<u32>> = HashMap::new();
        for line in stdout.lines() {
            let (version, id) = if let Some(id) = line.strip_prefix("  id: s-") {
                (0, id)
            } else if let Some(rest) = line.strip_prefix("tag=v")
                && let Some((v, id)) = rest.split_once(" id=s-")
            {
                (v.parse().expect("version"), id)
            } else {
                continue;
            };
            by.entry(id.trim().parse().expect("seq"))
                .or_default()
                .push(version);
        }
        by
    };
    wait_for(
        "every accepted event handled",
        Duration::from_secs(60),
        || {
            let seen = versions(&serve.stdout());
            acked.iter().all(|n| seen.contains_key(n))
        },
    );
    let seen = versions(&serve.stdout());
    let doubled: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(doubled.is_empty(), "delivered twice: {doubled:?}");
    assert_eq!(seen.len(), acked.len(), "every accepted event, once");
    // Atomic: an event sent after swap k was answered runs on version k or a later one, never
    // an earlier one.
    let mut on_new = 0;
    for n in &acked {
        let live = live_from
            .iter()
            .filter(|(from, _)| from <= n)
            .map(|(_, k)| *k)
            .max()
            .unwrap_or(0);
        let by = seen[n][0];
        assert!(
            by >= live,
            "event s-{n} sent while version {live} was live ran on {by}"
        );
        on_new += usize::from(by == live && live > 0);
    }
    let per_version: std::collections::BTreeSet<u32> = seen.values().map(|v| v[0]).collect();
    assert_eq!(
        per_version.len(),
        21,
        "every version handled events: {per_version:?}"
    );
    println!(
        "hot swap: 20 swaps under load, {} events accepted, each delivered once, none on a version older than the one live when it was sent ({on_new} on exactly that one); apply answered in {:.1}..{:.1} ms",
        acked.len(),
        swap_ms.iter().cloned().fold(f64::MAX, f64::min),
        swap_ms.iter().cloned().fold(0.0, f64::max)
    );
    let revisions = json(&serve.admin("GET", "/v1/functions/default/sub/revisions", b""));
    assert_eq!(revisions["live"], 21, "{revisions}");
    // The ten newest are kept (`old_revisions_and_their_modules_go_past_ten`).
    assert_eq!(revisions["revisions"].as_array().map(Vec::len), Some(10));
}

#[test]
fn a_failing_version_is_rolled_back_by_itself() {
    let dir = subscribed_dir();
    let serve = Serve::start_at(dir.path(), &[]);
    let tag = upload(&serve, wasmesh_plugins::FIXTURE_TAG);
    let trap = upload(&serve, wasmesh_plugins::FIXTURE_TRAP);
    let rollout = serde_json::json!({ "rollout": { "window": 10, "maxFailureRate": 0.2 } });
    let r = serve.admin("POST", "/v1/apply", &function_json(&tag, rollout.clone()));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = serve.admin("POST", "/v1/apply", &function_json(&trap, rollout));
    assert_eq!(r.status, 200, "{}", r.text());
    for n in 0..20 {
        let id = format!("rb-{n}");
        let r = serve.request("POST", "/default/default", &ce_headers(&id, "t"), b"{}");
        assert_eq!(r.status, 202);
    }
    // The trapping version fails its first events; the slot goes back to revision 2, and the
    // failed deliveries' retries land there: nothing is lost.
    wait_for("every event handled", Duration::from_secs(60), || {
        let seen = handled(&serve.stdout());
        (0..20).all(|n| seen.contains_key(&format!("rb-{n}")))
    });
    let seen = handled(&serve.stdout());
    for n in 0..20 {
        assert_eq!(
            seen[&format!("rb-{n}")],
            vec!["tag"],
            "rb-{n} once, by the good version"
        );
    }
    serve.wait_log("rolled back to revision 2");
    // The rollback becomes the declared state: revision 4 runs the good module again, and the
    // status keeps saying why.
    let status = |s: &Serve| json(&s.admin("GET", "/v1/functions/default/sub", b""));
    wait_for("the rollback recorded", Duration::from_secs(20), || {
        status(&serve)["status"]["revision"] == 4
    });
    let check = |f: &serde_json::Value| {
        let cond = &f["status"]["conditions"][0];
        assert_eq!(cond["reason"], "RolledBack", "{f}");
        let message = cond["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("revision 3") && message.contains("rolled back to revision 2"),
            "{message}"
        );
        assert_eq!(f["status"]["digest"], tag.as_str(), "{f}");
        assert_eq!(f["spec"]["module"], tag.as_str(), "{f}");
    };
    check(&status(&serve));
    // A restart does not bring the failed version back.
    serve.stop();
    let serve = Serve::start_at(dir.path(), &[]);
    let f = status(&serve);
    check(&f);
    assert_eq!(f["status"]["revision"], 4, "{f}");
    let r = serve.request("POST", "/default/default", &ce_headers("after", "t"), b"{}");
    assert_eq!(r.status, 202);
    wait_for(
        "the good version after the restart",
        Duration::from_secs(20),
        || handled(&serve.stdout()).get("after") == Some(&vec!["tag"]),
    );
}

#[test]
fn refused_uploads_and_tokens_change_nothing() {
    let serve = Serve::start(
        &[("f.yaml", &subscribed("builtin:event-display", ""))],
        &["--max-module-bytes", "200000"],
    );
    let modules = || {
        std::fs::read_dir(serve_data(&serve).join("modules"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = modules();
    // A core module, not a component.
    let core = b"\0asm\x01\0\0\0";
    let r = serve.admin("POST", "/v1/modules", core);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("core WebAssembly module"), "{}", r.text());
    // Not Wasm at all.
    let r = serve.admin("POST", "/v1/modules", b"#!/bin/sh\necho hi\n");
    assert_eq!(r.status, 422, "{}", r.text());
    // A component importing an interface wasmesh does not grant.
    let bytes = std::fs::read(wasmesh_plugins::FIXTURE_UNGRANTED).expect("built");
    let r = serve.admin("POST", "/v1/modules", &bytes);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("wasi:"), "names the import: {}", r.text());
    // A filter where a subscriber is asked for.
    let bytes = std::fs::read(wasmesh_plugins::TYPE_FILTER).expect("built");
    let r = serve.admin("POST", "/v1/modules?world=subscriber", &bytes);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("`filter`, not `subscriber`"),
        "{}",
        r.text()
    );
    // Over the size limit.
    let big = vec![0u8; 300_000];
    let r = serve.admin("POST", "/v1/modules", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    // Far over it, more than the connection buffers: the client, still sending, reads the 413
    // (the rest of the body is read and dropped first, not cut off by a reset connection). So
    // does `wasmesh push`, which said it could not reach the server.
    let huge = vec![0u8; 16 << 20];
    for _ in 0..3 {
        let r = serve.admin("POST", "/v1/modules", &huge);
        assert_eq!(r.status, 413, "{}", r.text());
    }
    let cli = Cli::login(&serve);
    let file = cli.home.path().join("huge.wasm");
    std::fs::write(&file, &huge).expect("write");
    for _ in 0..3 {
        let (ok, _, stderr) = cli.run(&["push", "function", "sub", &file.to_string_lossy()]);
        assert!(!ok);
        assert!(
            stderr.contains("413") && stderr.contains("over the limit of 200000 bytes"),
            "{stderr}"
        );
    }
    // A filter swapped in for a subscriber Function: refused, the live version stays.
    let filter = upload(&serve, wasmesh_plugins::TYPE_FILTER);
    let r = serve.admin(
        "POST",
        "/v1/apply",
        &function_json(&filter, serde_json::json!({})),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("world `filter`"), "{}", r.text());
    // A digest nobody uploaded.
    let r = serve.admin(
        "POST",
        "/v1/apply",
        &function_json(
            &format!("sha256:{}", "ab".repeat(32)),
            serde_json::json!({}),
        ),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("no uploaded module"), "{}", r.text());
    // No token, a wrong token: 401, nothing applied.
    let admin = serve.admin.expect("admin");
    let body = function_json("builtin:type-filter", serde_json::json!({}));
    let r = request(admin, "POST", "/v1/apply", &[], &body);
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    let r = request(
        admin,
        "POST",
        "/v1/modules",
        &[("authorization", "Bearer not-the-token-at-all")],
        &std::fs::read(wasmesh_plugins::FIXTURE_TAG).expect("built"),
    );
    assert_eq!(r.status, 401);
    // A large upload with a wrong token gets its 401 too.
    let r = request(
        admin,
        "POST",
        "/v1/modules",
        &[("authorization", "Bearer not-the-token-at-all")],
        &huge,
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        modules(),
        before + 1,
        "only the type-filter upload was stored"
    );
    let revisions = json(&serve.admin("GET", "/v1/functions/default/sub/revisions", b""));
    assert_eq!(revisions["live"], 1, "{revisions}");
    assert_eq!(revisions["revisions"].as_array().map(Vec::len), Some(1));
    // Paths the API does not have are 404; its paths asked with another method, 405.
    for (method, path, code) in [
        ("GET", "/v1/triggers/default/all/extra", 404),
        ("GET", "/v1/triggers/default", 404),
        ("POST", "/v1/functions/default/nope/undo", 404),
        ("PUT", "/v1/apply", 405),
        ("DELETE", "/v1/functions/default/sub/revisions", 405),
    ] {
        let r = serve.admin(method, path, b"");
        assert_eq!(r.status, code, "{method} {path}: {}", r.text());
    }
    let r = serve.request("POST", "/default/default", &ce_headers("still", "t"), b"{}");
    assert_eq!(r.status, 202);
    wait_for(
        "the old version still serves",
        Duration::from_secs(20),
        || handled(&serve.stdout()).get("still") == Some(&vec!["display"]),
    );
    // The token file is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(serve_data(&serve).join("admin-token"))
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

fn serve_data(serve: &Serve) -> std::path::PathBuf {
    serve.data_dir().to_path_buf()
}

#[test]
fn concurrent_applies_all_land() {
    let serve = Arc::new(Serve::start(
        &[("f.yaml", &subscribed("builtin:event-display", ""))],
        &[],
    ));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let serve = Arc::clone(&serve);
            std::thread::spawn(move || {
                let trigger = serde_json::json!({
                    "apiVersion": "eventing.knative.dev/v1",
                    "kind": "Trigger",
                    "metadata": { "name": format!("t{i}"), "namespace": "default" },
                    "spec": {
                        "broker": "default",
                        "filter": { "attributes": { "type": format!("type.{i}") } },
                        "subscriber": { "ref": {
                            "apiVersion": "wasmesh.dev/v1alpha1", "kind": "Function", "name": "sub"
                        } }
                    }
                });
                let r = serve.admin("POST", "/v1/apply", trigger.to_string().as_bytes());
                assert_eq!(r.status, 200, "{}", r.text());
            })
        })
        .collect();
    for t in threads {
        t.join().expect("apply");
    }
    let list = json(&serve.admin("GET", "/v1/triggers", b""));
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 9, "{list}");
    assert!(
        items
            .iter()
            .all(|t| t["status"]["conditions"][0]["status"] == "True"),
        "{list}"
    );
    for i in 0..8 {
        let id = format!("c{i}");
        let r = serve.request(
            "POST",
            "/default/default",
            &ce_headers(&id, &format!("type.{i}")),
            b"{}",
        );
        assert_eq!(r.status, 202);
    }
    // Each event matches `all` and its own trigger: two deliveries each.
    wait_for("two deliveries per event", Duration::from_secs(20), || {
        let seen = handled(&serve.stdout());
        (0..8).all(|i| seen.get(&format!("c{i}")).map(Vec::len) == Some(2))
    });
}

#[test]
fn apply_and_delete_survive_a_restart() {
    let dir = subscribed_dir();
    let serve = Serve::start_at(dir.path(), &[]);
    let tag = upload(&serve, wasmesh_plugins::FIXTURE_TAG);
    let r = serve.admin(
        "POST",
        "/v1/apply",
        &function_json(&tag, serde_json::json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = serve.admin("DELETE", "/v1/triggers/default/all", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["changes"][0]["action"], "deleted", "{}", r.text());
    let r = serve.admin("DELETE", "/v1/triggers/default/all", b"");
    assert_eq!(r.status, 404, "{}", r.text());
    serve.stop();
    let serve = Serve::start_at(dir.path(), &[]);
    let f = json(&serve.admin("GET", "/v1/functions/default/sub", b""));
    assert_eq!(f["spec"]["module"], tag.as_str(), "{f}");
    let triggers = json(&serve.admin("GET", "/v1/triggers", b""));
    assert_eq!(
        triggers["items"].as_array().map(Vec::len),
        Some(0),
        "{triggers}"
    );
    // Re-applying the trigger brings it back, on the uploaded version.
    let trigger = serde_json::json!({
        "apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
        "metadata": { "name": "all", "namespace": "default" },
        "spec": { "broker": "default", "subscriber": { "ref": {
            "apiVersion": "wasmesh.dev/v1alpha1", "kind": "Function", "name": "sub" } } }
    });
    let r = serve.admin("POST", "/v1/apply", trigger.to_string().as_bytes());
    assert_eq!(json(&r)["changes"][0]["action"], "created", "{}", r.text());
    serve.request("POST", "/default/default", &ce_headers("back", "t"), b"{}");
    wait_for(
        "the uploaded version serves",
        Duration::from_secs(20),
        || handled(&serve.stdout()).get("back") == Some(&vec!["tag"]),
    );
}

#[test]
fn a_trigger_whose_subscriber_is_missing_is_not_ready_and_says_so() {
    let serve = Serve::start(&[("b.yaml", BROKER)], &[]);
    let yaml = "apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: lonely
spec:
  broker: default
  subscriber:
    ref:
      apiVersion: wasmesh.dev/v1alpha1
      kind: Function
      name: nowhere
";
    let r = serve.admin("POST", "/v1/apply", yaml.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let t = json(&serve.admin("GET", "/v1/triggers/default/lonely", b""));
    let cond = &t["status"]["conditions"][0];
    assert_eq!(cond["status"], "False", "{t}");
    assert_eq!(cond["reason"], "FunctionDoesNotExist", "{t}");
    // A YAML error names the line and field; nothing is applied.
    let r = serve.admin(
        "POST",
        "/v1/apply",
        b"apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: x\nspec:\n  brokr: default\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("request:"), "{}", r.text());
    assert!(r.text().contains("brokr"), "{}", r.text());
    // A path module over the API is refused with what to do instead.
    let r = serve.admin(
        "POST",
        "/v1/apply",
        &function_json("./event-display.wasm", serde_json::json!({})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("wasmesh push"), "{}", r.text());
}

#[test]
fn watch_applies_file_edits_and_keeps_running_through_a_broken_one() {
    let serve = Serve::start(
        &[("f.yaml", &subscribed("builtin:event-display", ""))],
        &["--watch"],
    );
    let file = serve.files_dir().join("f.yaml");
    let send = |id: &str| {
        let r = serve.request("POST", "/default/default", &ce_headers(id, "t"), b"{}");
        assert_eq!(r.status, 202);
    };
    send("w1");
    wait_for("w1", Duration::from_secs(20), || {
        handled(&serve.stdout()).contains_key("w1")
    });
    // Broken YAML: reported with the file and line; the running state stays.
    std::fs::write(
        &file,
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: [\n",
    )
    .expect("write");
    serve.wait_log("--watch: the files have errors; the running state is unchanged");
    assert!(serve.stderr().contains("f.yaml:"), "{}", serve.stderr());
    send("w2");
    wait_for("w2 still delivered", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("w2") == Some(&vec!["display"])
    });
    // A good edit: the Function moves to fixture-tag, its module a path beside the file.
    let tag_path = serve.files_dir().join("tag.wasm");
    std::fs::copy(wasmesh_plugins::FIXTURE_TAG, &tag_path).expect("copy");
    std::fs::write(&file, subscribed("tag.wasm", "")).expect("write");
    serve.wait_log("--watch: Function/default/sub configured");
    send("w3");
    wait_for("w3 on the new version", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("w3") == Some(&vec!["tag"])
    });
    // A module that does not load: refused, the running version stays.
    std::fs::write(&tag_path, b"not wasm").expect("write");
    std::fs::write(&file, subscribed("tag.wasm", "  isolation: fresh\n")).expect("write");
    serve.wait_log("the running state is unchanged");
    send("w4");
    wait_for("w4 on the running version", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("w4") == Some(&vec!["tag"])
    });
}

/// `--watch` also looks at the module files the Functions name by path: a module rebuilt in
/// place (`cargo build` of a plugin, outside the watched directory) goes live and is said to,
/// and a broken build leaves the running version.
#[test]
fn watch_takes_a_module_rebuilt_in_place() {
    let modules = tempfile::tempdir().expect("modules");
    let module = modules.path().join("sub.wasm");
    std::fs::copy(wasmesh_plugins::EVENT_DISPLAY, &module).expect("copy");
    let yaml = subscribed(module.to_str().expect("utf-8"), "");
    let serve = Serve::start(&[("f.yaml", &yaml)], &["--watch"]);
    let send = |id: &str| {
        let r = serve.request("POST", "/default/default", &ce_headers(id, "t"), b"{}");
        assert_eq!(r.status, 202);
    };
    send("m1");
    wait_for("m1 displayed", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("m1") == Some(&vec!["display"])
    });
    std::fs::copy(wasmesh_plugins::FIXTURE_TAG, &module).expect("rebuild");
    serve.wait_log("--watch: Function/default/sub configured");
    send("m2");
    wait_for("m2 on the rebuilt module", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("m2") == Some(&vec!["tag"])
    });
    std::fs::write(&module, b"half a build").expect("break");
    serve.wait_log("not a WebAssembly file");
    send("m3");
    wait_for("m3 on the running version", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("m3") == Some(&vec!["tag"])
    });
}

/// `--watch` reports what changed in the objects' conditions: a trigger that is not ready is
/// said once, not again at each unrelated edit, and said again when it becomes ready.
#[test]
fn watch_reports_a_condition_once_and_when_it_changes() {
    let trigger = trigger_to_sub("all");
    let serve = Serve::start(&[("b.yaml", BROKER), ("t.yaml", &trigger)], &["--watch"]);
    serve.wait_log("Trigger/default/all: not ready");
    let other = BROKER.replace("name: default", "name: other");
    std::fs::write(serve.files_dir().join("o.yaml"), &other).expect("write");
    serve.wait_log("--watch: Broker/default/other created");
    // The Function the trigger names (`subscribed` declares the same trigger after it).
    let with_function = subscribed("builtin:event-display", "");
    let function = with_function
        .rsplit_once("---\n")
        .map_or(with_function.as_str(), |(before, _)| before);
    std::fs::write(serve.files_dir().join("b.yaml"), function).expect("write");
    serve.wait_log("--watch: Function/default/sub created");
    serve.wait_log("--watch: Trigger/default/all: Ready");
    let err = serve.stderr();
    assert_eq!(
        err.matches("--watch: Trigger/default/all: not ready")
            .count(),
        0,
        "the unrelated edit did not repeat it: {err}"
    );
}

/// A self-signed certificate for localhost and 127.0.0.1: `<name>.pem` and `<name>-key.pem`.
pub(crate) fn self_signed(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (.ci/setup installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    (cert, key)
}

#[test]
fn the_admin_api_speaks_tls_when_given_a_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "cert");
    let serve = Serve::start(
        &[("f.yaml", &subscribed("builtin:event-display", ""))],
        &[
            "--admin-tls-cert",
            cert.to_str().expect("utf-8"),
            "--admin-tls-key",
            key.to_str().expect("utf-8"),
        ],
    );
    assert!(
        serve.stderr().contains("admin API listening on https://"),
        "{}",
        serve.stderr()
    );
    let admin = serve.admin.expect("admin");
    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"));
        c.args(args)
            .arg("--server")
            .arg(format!("https://127.0.0.1:{}", admin.port()))
            .arg("--token")
            .arg(serve.admin_token())
            .env("HOME", dir.path());
        c
    };
    let run = |args: &[&str]| {
        cli(args)
            .arg("--certificate-authority")
            .arg(&cert)
            .output()
            .expect("wasmesh")
    };
    // Without --certificate-authority the system's CAs decide: here the certificate is one
    // of them (SSL_CERT_FILE), then it is not.
    let trusted = cli(&["get", "functions"])
        .env("SSL_CERT_FILE", &cert)
        .output()
        .expect("wasmesh");
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    // Another certificate for the same names, not the server's.
    let (other, _) = self_signed(dir.path(), "other");
    let untrusted = cli(&["get", "functions"])
        .env("SSL_CERT_FILE", &other)
        .output()
        .expect("wasmesh");
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success());
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let out = run(&["get", "functions", "-o", "wide"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sub") && stdout.contains("subscriber"),
        "{stdout}"
    );
    // Plain HTTP to the TLS listener gets no answer.
    assert_ne!(
        try_request(admin, "GET", "/v1/functions", &[], b""),
        Ok(Some(200))
    );
}

/// `wasmesh` CLI commands against a server, as a user runs them.
pub(crate) struct Cli {
    home: tempfile::TempDir,
}

impl Cli {
    pub(crate) fn login(serve: &Serve) -> Cli {
        let home = tempfile::tempdir().expect("home");
        let cli = Cli { home };
        let out = cli.run(&[
            "login",
            "--server",
            &format!("http://{}", serve.admin.expect("admin")),
            "--token",
            &serve.admin_token(),
        ]);
        assert!(out.0, "{}", out.2);
        cli
    }

    /// Starts `wasmesh logs function NAME -f`; what it prints gathers in the string.
    fn follow_logs(&self, name: &str) -> (std::process::Child, Arc<Mutex<String>>) {
        let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
            .args(["logs", "function", name, "-f"])
            .env("HOME", self.home.path())
            .env_remove("WASMESH_TOKEN")
            .env_remove("WASMESH_SERVER")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("logs -f");
        let got = Arc::new(Mutex::new(String::new()));
        crate::harness::gather(follow.stdout.take().expect("stdout"), Arc::clone(&got));
        (follow, got)
    }

    /// (success, stdout, stderr)
    pub(crate) fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
            .args(args)
            .env("HOME", self.home.path())
            .env_remove("WASMESH_TOKEN")
            .env_remove("WASMESH_SERVER")
            .current_dir(self.home.path())
            .output()
            .expect("wasmesh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A server with the default broker, the CLI logged in to it, and a directory holding
/// event-display as `display.wasm`.
fn serve_and_cli_with_a_module() -> (Serve, Cli, tempfile::TempDir) {
    let serve = Serve::start(&[("b.yaml", BROKER)], &[]);
    let cli = Cli::login(&serve);
    let files = tempfile::tempdir().expect("files");
    std::fs::copy(
        wasmesh_plugins::EVENT_DISPLAY,
        files.path().join("display.wasm"),
    )
    .expect("copy");
    (serve, cli, files)
}

/// `wasmesh apply -f` of a `List` (`kubectl get -o yaml`) applies its items, uploading a
/// Function's module given as a path as it does for a plain file.
#[test]
fn the_cli_applies_a_kubectl_list() {
    let (_serve, cli, files) = serve_and_cli_with_a_module();
    // The Function and the trigger of `subscribed`, as the items of a List.
    let item = |doc: &str| {
        doc.trim_start_matches("---\n")
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{}{l}\n", if i == 0 { "- " } else { "  " }))
            .collect::<String>()
    };
    let with_function = subscribed("display.wasm", "").replace(BROKER, "");
    let function = with_function
        .trim_start_matches("---\n")
        .split("---\n")
        .next()
        .expect("the Function");
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}{}",
        item(function),
        item(&trigger_to_sub("all"))
    );
    std::fs::write(files.path().join("list.yaml"), &list).expect("yaml");
    let dir = files.path().to_str().expect("utf-8");
    let (ok, out, err) = cli.run(&["apply", "-f", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("Function/default/sub created"), "{out}");
    assert!(out.contains("Trigger/default/all created"), "{out}");
    assert!(err.is_empty(), "all ready: {err}");
    let (ok, out, err) = cli.run(&["delete", "-f", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("Trigger/default/all deleted"), "{out}");
    // `-f -`, as `kubectl get ... -o yaml | wasmesh apply -f -`: standard input, the module
    // path relative to the current directory.
    let mut piped = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
        .args(["apply", "-f", "-"])
        .env("HOME", cli.home.path())
        .env_remove("WASMESH_TOKEN")
        .env_remove("WASMESH_SERVER")
        .current_dir(files.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("apply -f -");
    {
        use std::io::Write as _;
        let mut stdin = piped.stdin.take().expect("stdin");
        stdin.write_all(list.as_bytes()).expect("write");
    }
    let out = piped.wait_with_output().expect("apply -f -");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Function/default/sub created"), "{stdout}");
    assert!(stdout.contains("Trigger/default/all created"), "{stdout}");
}

#[test]
fn the_cli_applies_gets_describes_pushes_rolls_back_and_shows_logs() {
    // apply -f: a directory with a Function whose module is a path (uploaded by the CLI).
    let (serve, cli, files) = serve_and_cli_with_a_module();
    std::fs::write(
        files.path().join("app.yaml"),
        subscribed("display.wasm", "")
            .replace(BROKER, "")
            .trim_start_matches("---\n"),
    )
    .expect("yaml");
    let dir = files.path().to_str().expect("utf-8");
    let (ok, out, err) = cli.run(&["apply", "-f", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("Function/default/sub created"), "{out}");
    assert!(out.contains("Trigger/default/all created"), "{out}");
    let (ok, out, _) = cli.run(&["apply", "-f", dir]);
    assert!(
        ok && out.contains("Function/default/sub unchanged"),
        "{out}"
    );
    // get, in every output.
    let (ok, out, err) = cli.run(&["get", "triggers"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("NAME") && out.contains("all") && out.contains("True"),
        "{out}"
    );
    let (_, out, _) = cli.run(&["get", "triggers", "-o", "wide"]);
    assert!(out.contains("Function/sub"), "{out}");
    let (_, out, _) = cli.run(&["get", "functions", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["items"][0]["status"]["world"], "subscriber", "{v}");
    let (_, out, _) = cli.run(&["get", "brokers", "-o", "yaml"]);
    assert!(
        out.contains("kind: Broker") && out.contains("type: Ready"),
        "{out}"
    );
    // A Broker's address, as Knative's `status.address.url`, and as a column of `get brokers`.
    let url = format!("http://{}/default/default", serve.addr);
    assert!(out.contains(&format!("url: {url}")), "{out}");
    // What `get -o yaml` writes (a List, with status) applies again as it is.
    let (_, listed, _) = cli.run(&["get", "triggers", "-o", "yaml"]);
    std::fs::write(cli.home.path().join("listed.yaml"), &listed).expect("write");
    let (ok, out, err) = cli.run(&["apply", "-f", "listed.yaml"]);
    assert!(
        ok && out.contains("Trigger/default/all unchanged"),
        "{out}{err}"
    );
    let (_, out, _) = cli.run(&["get", "brokers"]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAMESPACE", "NAME", "URL", "READY", "REASON"],
        "{out}"
    );
    assert!(out.contains(&url), "{out}");
    let (_, out, _) = cli.run(&["describe", "broker", "default"]);
    assert!(out.contains(&format!("Address:      {url}\n")), "{out}");
    let (ok, _, err) = cli.run(&["get", "widgets"]);
    assert!(!ok && err.contains("unknown kind `widgets`"), "{err}");
    // push a new version, see it serve, roll it back.
    let (ok, out, err) = cli.run(&["push", "function", "sub", wasmesh_plugins::FIXTURE_TAG]);
    assert!(ok, "{err}");
    assert!(out.contains("Function/default/sub configured"), "{out}");
    serve.request("POST", "/default/default", &ce_headers("p1", "t"), b"{}");
    wait_for("p1 on the pushed version", Duration::from_secs(20), || {
        handled(&serve.stdout()).get("p1") == Some(&vec!["tag"])
    });
    let (_, out, _) = cli.run(&["rollout", "history", "function", "sub"]);
    assert_eq!(out.lines().count(), 3, "header and two revisions: {out}");
    let (_, out, _) = cli.run(&["describe", "function", "sub"]);
    assert!(out.contains("Revisions (live: 2)"), "{out}");
    let (ok, out, err) = cli.run(&["rollout", "undo", "function", "sub"]);
    assert!(ok, "{err}");
    assert!(out.contains("revision 3"), "{out}");
    serve.request("POST", "/default/default", &ce_headers("p2", "t"), b"{}");
    wait_for(
        "p2 on the first version again",
        Duration::from_secs(20),
        || handled(&serve.stdout()).get("p2") == Some(&vec!["display"]),
    );
    // logs: what the function printed.
    let (ok, out, err) = cli.run(&["logs", "function", "sub"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("tag=new id=p1") && out.contains("id: p2"),
        "{out}"
    );
    // logs -f streams lines as they come.
    let (mut follow, got) = cli.follow_logs("sub");
    wait_for("the past lines", Duration::from_secs(20), || {
        got.lock().expect("lock").contains("id: p2")
    });
    serve.admin("POST", "/v1/apply", trigger_to_sub("again").as_bytes());
    serve.request(
        "POST",
        "/default/default",
        &ce_headers("live-1", "t"),
        b"{}",
    );
    wait_for("a new line streamed", Duration::from_secs(20), || {
        got.lock().expect("lock").contains("id: live-1")
    });
    let _ = follow.kill();
    let _ = follow.wait();
    // delete -f
    let (ok, out, err) = cli.run(&["delete", "-f", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("Trigger/default/all deleted"), "{out}");
    // A validation error, a bad token, a server that is down: clear messages.
    std::fs::write(files.path().join("bad.yaml"), "kind: Trigger\n").expect("yaml");
    let (ok, _, err) = cli.run(&["apply", "-f", dir]);
    assert!(
        !ok && err.contains("bad.yaml:1:1: apiVersion: missing field"),
        "{err}"
    );
    let (ok, _, err) = cli.run(&["get", "triggers", "--token", "wrong-token-wrong-token"]);
    assert!(!ok && err.contains("refused the token"), "{err}");
    let (ok, _, err) = cli.run(&["get", "triggers", "--server", "http://127.0.0.1:9"]);
    assert!(!ok && err.contains("cannot reach the admin API"), "{err}");
}

/// `logs -f` ends, successfully, when the server stops (the server ends its answer as a whole),
/// as `kubectl logs -f` does when its pod goes. It used to fail on a body cut mid-chunk.
#[test]
fn logs_follow_ends_cleanly_when_the_server_stops() {
    let mut serve = Serve::start_dir(subscribed_dir());
    let cli = Cli::login(&serve);
    let (mut follow, got) = cli.follow_logs("sub");
    // Following: a line printed now reaches it.
    let r = serve.request("POST", "/default/default", &ce_headers("f1", "t"), b"{}");
    assert_eq!(r.status, 202);
    wait_for("the line streamed", Duration::from_secs(20), || {
        got.lock().expect("lock").contains("id: f1")
    });
    serve.signal("TERM");
    assert!(
        serve.exits_within(Duration::from_secs(20)),
        "the server stopped"
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = follow.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "logs -f ended with the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read as _;
    let _ = follow
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(status.success(), "logs -f failed: {err}");
}

#[test]
fn trigger_changes_swap_its_wasm_filter_and_rebuild_its_workers_without_loss() {
    let filter = |prefix: &str| {
        format!(
            "apiVersion: wasmesh.dev/v1alpha1
kind: Function
metadata:
  name: only
  namespace: default
spec:
  module: builtin:type-filter
  config:
    prefix: {prefix}
"
        )
    };
    let trigger = |delivery: &str| {
        trigger_to_sub("all").replace(
            "  broker: default\n",
            "  broker: default\n  wasmFilter: only\n",
        ) + delivery
    };
    let one_at_a_time = "  delivery:\n    concurrency: 1\n";
    let files = format!(
        "{}---\n{}---\n{}",
        subscribed("builtin:event-display", "")
            .split("---\napiVersion: eventing.knative.dev/v1\nkind: Trigger")
            .next()
            .expect("split"),
        filter("a."),
        trigger(one_at_a_time)
    );
    let serve = Serve::start(&[("f.yaml", &files)], &[]);
    let send = |id: &str, ty: &str| {
        let r = serve.request("POST", "/default/default", &ce_headers(id, ty), b"{}");
        assert_eq!(r.status, 202, "{}", r.text());
    };
    // One event at a time, in order: once f1 is displayed, the filter has decided f2 (a filter
    // decides when the event's delivery starts, with the version live then).
    send("f2", "b.x");
    send("f1", "a.x");
    wait_for("f1", Duration::from_secs(20), || {
        handled(&serve.stdout()).contains_key("f1")
    });
    // The filter Function's new version: `b.` passes, `a.` no longer does.
    let r = serve.admin("POST", "/v1/apply", filter("b.").as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    send("f3", "a.x");
    send("f4", "b.x");
    // f4 displayed: f3 was decided before it, by the new version.
    wait_for("f4", Duration::from_secs(20), || {
        handled(&serve.stdout()).contains_key("f4")
    });
    // The trigger's workers rebuilt three times (concurrency, ordering, back to the default) while events flow.
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let (next, stop, addr) = (Arc::clone(&next), Arc::clone(&stop), serve.addr);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("r-{}", next.fetch_add(1, Ordering::SeqCst));
                    let status = try_request(
                        addr,
                        "POST",
                        "/default/default",
                        &ce_headers(&id, "b.y"),
                        b"{}",
                    );
                    assert_eq!(status, Ok(Some(202)));
                    acked.push(id);
                    std::thread::sleep(Duration::from_millis(2));
                }
                acked
            })
        })
        .collect();
    // Each change once the load has moved on by some events.
    let moved_on = || {
        let before = serve.stdout().matches("  id: r-").count();
        wait_for("more deliveries", Duration::from_secs(20), || {
            serve.stdout().matches("  id: r-").count() >= before + 30
        });
    };
    for delivery in [
        "  delivery:\n    concurrency: 2\n",
        "  delivery:\n    concurrency: 4\n    ordering: ordered\n",
        "",
    ] {
        moved_on();
        let r = serve.admin("POST", "/v1/apply", trigger(delivery).as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            json(&r)["changes"][0]["action"],
            "configured",
            "{}",
            r.text()
        );
    }
    moved_on();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    wait_for("every accepted event", Duration::from_secs(60), || {
        let seen = handled(&serve.stdout());
        acked.iter().all(|id| seen.contains_key(id))
    });
    let seen = handled(&serve.stdout());
    for id in &acked {
        assert_eq!(seen[id].len(), 1, "{id} delivered once");
    }
    assert!(seen.contains_key("f1") && seen.contains_key("f4"));
    for id in ["f2", "f3"] {
        assert!(!seen.contains_key(id), "{id} should have been filtered out");
    }
    println!(
        "trigger workers rebuilt three times under load: {} events, each delivered once",
        acked.len()
    );
}

/// `--advertise-url`: the URL a Broker's `status.address.url` starts with, as a Kubernetes
/// Service in front of the replicas would be; anything but an http(s) URL with a host is refused,
/// as are durations that are not ones (or overflow).
#[test]
fn advertise_url_is_each_brokers_address() {
    let base = "http://wasmesh-ingress.wasmesh.svc.cluster.local";
    let serve = Serve::start(
        &[("b.yaml", &crate::harness::broker_with_triggers(&[]))],
        &["--advertise-url", &format!("{base}/")],
    );
    let r = serve.admin("GET", "/v1/brokers/default/default", b"");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        v["status"]["address"]["url"],
        format!("{base}/default/default"),
        "{v}"
    );
    for (flag, bad) in [
        ("--advertise-url", "wasmesh-ingress"),
        ("--advertise-url", "ftp://host/"),
        ("--advertise-url", "http://"),
        ("--retention", "999999999999999999d"),
        ("--shutdown-grace", "soon"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
            .args([
                "serve",
                "-f",
                "/nonexistent.yaml",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--admin-listen", "off", flag, bad])
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag) && !err.contains("panicked"),
            "{flag} {bad}: {err}"
        );
    }
}

/// A Function keeps its ten newest revisions (as a Deployment keeps ten old ReplicaSets), and a
/// stored module that no kept revision names goes once it is an hour old: a plugin pushed or
/// rebuilt again and again does not fill the data directory.
#[test]
fn old_revisions_and_their_modules_go_past_ten() {
    let serve = Serve::start(&[("f.yaml", &subscribed("builtin:event-display", ""))], &[]);
    let cli = Cli::login(&serve);
    let display = std::fs::read(wasmesh_plugins::EVENT_DISPLAY).expect("built");
    let push = |n: u32| {
        let file = cli.home.path().join(format!("display-{n}.wasm"));
        std::fs::write(&file, variant(&display, &format!("v{n}"))).expect("write");
        let (ok, _, err) = cli.run(&["push", "function", "sub", &file.to_string_lossy()]);
        assert!(ok, "push {n}: {err}");
    };
    for n in 2..=12 {
        push(n);
    }
    let revisions = json(&serve.admin("GET", "/v1/functions/default/sub/revisions", b""));
    let numbers: Vec<u64> = revisions["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|r| r["revision"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, (3..=12).collect::<Vec<_>>(), "{revisions}");
    assert_eq!(revisions["live"], 12);
    let (ok, _, err) = cli.run(&["rollout", "undo", "function", "sub", "--to-revision", "2"]);
    assert!(!ok && err.contains("no revision 2"), "{err}");
    // Every stored module is an hour old now: those of revisions 1 and 2 go with the next push.
    let modules = serve_data(&serve).join("modules");
    let stored = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(&modules)
            .expect("modules")
            .flatten()
            .map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .trim_end_matches(".wasm")
                    .to_string()
            })
            .collect()
    };
    assert_eq!(stored().len(), 12, "nothing removed within the hour");
    let hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for entry in std::fs::read_dir(&modules).expect("modules").flatten() {
        let f = std::fs::File::options()
            .write(true)
            .open(entry.path())
            .expect("open");
        f.set_modified(hours_ago).expect("mtime");
    }
    push(13);
    let revisions = json(&serve.admin("GET", "/v1/functions/default/sub/revisions", b""));
    let named: std::collections::BTreeSet<String> = revisions["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|r| {
            r["digest"]
                .as_str()
                .expect("digest")
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    assert_eq!(named.len(), 10);
    assert_eq!(stored(), named, "only the kept revisions' modules are left");
    // The live version still serves, and an undo within the ten still works.
    let r = serve.request("POST", "/default/default", &ce_headers("after", "t"), b"{}");
    assert_eq!(r.status, 202);
    wait_for("the event displayed", Duration::from_secs(20), || {
        serve.stdout().contains("id: after")
    });
    let (ok, _, err) = cli.run(&["rollout", "undo", "function", "sub", "--to-revision", "5"]);
    assert!(ok, "{err}");
}
