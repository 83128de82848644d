//! The ApiServerSource through the real `wasmesh serve` and kube-rs's real client, against the
//! fake API server of `fake_apiserver.rs`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_apiserver::FakeApiServer;
use crate::harness::{Capture, Serve, repo, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// The seed's busybox `Event` object, as the API server stores it.
fn seed_object() -> Value {
    let text = std::fs::read_to_string(repo("tests/data/seed-event.json")).expect("seed");
    let v: Value = serde_json::from_str(&text).expect("json");
    v["data"].clone()
}

/// event-display's output without what changes from run to run.
fn normalized(text: &str) -> String {
    text.lines()
        .filter(|l| {
            !(l.starts_with("  id: ")
                || l.starts_with("  time: ")
                || l.starts_with("  source: ")
                || l.starts_with("  knativearrivaltime: "))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn the_seeds_hello_world_runs_end_to_end() {
    let fake = FakeApiServer::start(506_087);
    let dir = tempfile::tempdir().expect("tempdir");
    for f in [
        "serviceaccount.yaml",
        "k8s-events.yaml",
        "trigger.yaml",
        "namespace.yaml",
        "event-display.yaml",
    ] {
        std::fs::copy(repo("manifests/hello").join(f), dir.path().join(f)).expect("copy");
    }
    let kubeconfig = fake.kubeconfig(dir.path());
    let serve = Serve::start_at(
        dir.path(),
        &["--kubeconfig", kubeconfig.to_str().expect("utf-8")],
    );
    serve.wait_log("ApiServerSource/default/testevents: Ready");
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    // `kubectl run busybox`: the kubelet's "Started" Event appears.
    fake.add("events", seed_object(), true);
    wait_for("event-display's output", WAIT, || {
        serve.stdout().contains("    \"type\": \"Normal\"\n  }\n")
    });
    let golden =
        std::fs::read_to_string(repo("tests/golden/seed-event.display.txt")).expect("golden");
    let out = serve.stdout();
    assert_eq!(
        normalized(&out),
        normalized(&golden),
        "event-display prints the seed's event:\n{out}"
    );
    assert!(
        out.contains(&format!("  source: http://{}\n", fake.addr)),
        "source is the API server URL"
    );
}

pub(crate) fn pod(name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": {"app": app}},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

pub(crate) fn pods_yaml(sub: &Capture) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: pods, namespace: default}}\nspec:\n  subscriber: {{uri: '{}'}}\n---\n\
         apiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata: {{name: pods, namespace: default}}\n\
         spec:\n  mode: Reference\n  resources:\n  - apiVersion: v1\n    kind: Pod\n    selector:\n      matchLabels: {{app: demo}}\n  sink:\n    ref: {{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}\n",
        sub.url("/pods")
    )
}

/// (type, name) of everything delivered so far.
pub(crate) fn seen(sub: &Capture) -> Vec<(String, String)> {
    sub.on("/pods")
        .iter()
        .filter_map(|c| {
            Some((
                c.headers["ce-type"].clone(),
                c.headers.get("ce-name")?.clone(),
            ))
        })
        .collect()
}

/// Adds a sentinel pod and waits for its event. Events of one re-list are published in any
/// order and delivered concurrently, so callers also wait for the count they expect.
fn sentinel(fake: &FakeApiServer, sub: &Capture, name: &str) {
    fake.add("pods", pod(name, "demo"), false);
    wait_for(&format!("sentinel {name}"), WAIT, || {
        seen(sub)
            .iter()
            .any(|(t, n)| t == "dev.knative.apiserver.ref.add" && n == name)
    });
}

/// The events delivered after the first `from`, sorted, once there are `n` of them.
fn settled(sub: &Capture, from: usize, n: usize) -> Vec<(String, String)> {
    wait_for(&format!("{n} events after {from}"), WAIT, || {
        seen(sub).len() >= from + n
    });
    let mut v = seen(sub)[from..].to_vec();
    v.sort();
    v
}

/// A directory with `yaml` as its declarations and a kubeconfig for `fake`.
struct Setup {
    dir: tempfile::TempDir,
    kubeconfig: String,
}

impl Setup {
    fn new(fake: &FakeApiServer, yaml: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.yaml"), yaml).expect("yaml");
        let kubeconfig = fake.kubeconfig(dir.path());
        let kubeconfig = kubeconfig.to_str().expect("utf-8").to_string();
        Setup { dir, kubeconfig }
    }

    /// `wasmesh serve` of the directory against the fake API server (again after a stop).
    fn serve(&self) -> Serve {
        self.serve_with(&[])
    }

    /// The same, with more flags.
    fn serve_with(&self, extra: &[&str]) -> Serve {
        let mut flags = vec!["--kubeconfig", self.kubeconfig.as_str()];
        flags.extend_from_slice(extra);
        Serve::start_at(self.dir.path(), &flags)
    }
}

#[test]
fn restarts_relists_and_dropped_watches_lose_and_repeat_nothing() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(100);
    fake.add("pods", pod("p1", "demo"), false);
    fake.add("pods", pod("p2", "demo"), false);
    fake.add("pods", pod("p3", "other"), false);
    let setup = Setup::new(&fake, &pods_yaml(&sub));

    // A brand-new source emits nothing for what exists, then follows changes.
    let serve = setup.serve();
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    sentinel(&fake, &sub, "s1");
    assert_eq!(
        seen(&sub),
        [(
            "dev.knative.apiserver.ref.add".to_string(),
            "s1".to_string()
        )]
    );
    let c = &sub.on("/pods")[0];
    assert_eq!(
        c.headers["ce-subject"],
        "/apis/v1/namespaces/default/pods/s1"
    );
    assert_eq!(c.headers["ce-kind"], "Pod");
    let data: Value = serde_json::from_slice(&c.body).expect("json");
    assert_eq!(
        data,
        json!({"apiVersion": "v1", "kind": "Pod", "name": "s1", "namespace": "default"})
    );

    // Stopped; objects added, changed and deleted; started: exactly those changes.
    serve.stop();
    fake.modify("pods", "p1", |p| {
        p["spec"]["containers"][0]["image"] = json!("busybox:2")
    });
    fake.delete("pods", "p2");
    fake.add("pods", pod("p4", "demo"), false);
    fake.modify("pods", "p3", |p| {
        p["spec"]["containers"][0]["image"] = json!("x")
    });
    let serve = setup.serve();
    sentinel(&fake, &sub, "s2");
    assert_eq!(
        settled(&sub, 1, 4),
        [
            (
                "dev.knative.apiserver.ref.add".to_string(),
                "p4".to_string()
            ),
            (
                "dev.knative.apiserver.ref.add".to_string(),
                "s2".to_string()
            ),
            (
                "dev.knative.apiserver.ref.delete".to_string(),
                "p2".to_string()
            ),
            (
                "dev.knative.apiserver.ref.update".to_string(),
                "p1".to_string()
            ),
        ]
    );

    // 410 Gone in the middle of a stream: a re-list, and only the real change is emitted.
    let before = seen(&sub).len();
    fake.compact();
    fake.modify("pods", "p4", |p| {
        p["spec"]["containers"][0]["image"] = json!("busybox:3")
    });
    sentinel(&fake, &sub, "s3");
    assert_eq!(
        settled(&sub, before, 2),
        [
            (
                "dev.knative.apiserver.ref.add".to_string(),
                "s3".to_string()
            ),
            (
                "dev.knative.apiserver.ref.update".to_string(),
                "p4".to_string()
            ),
        ]
    );

    // A dropped watch resumes from its resourceVersion: no duplicate, no gap.
    let before = seen(&sub).len();
    fake.drop_watches();
    fake.delete("pods", "s1");
    sentinel(&fake, &sub, "s4");
    assert_eq!(
        settled(&sub, before, 2),
        [
            (
                "dev.knative.apiserver.ref.add".to_string(),
                "s4".to_string()
            ),
            (
                "dev.knative.apiserver.ref.delete".to_string(),
                "s1".to_string()
            ),
        ]
    );
    // Nothing more came in the meantime (no duplicate of anything above).
    sentinel(&fake, &sub, "s5");
    assert_eq!(seen(&sub).len(), before + 3);
    drop(serve);
}

#[test]
fn a_burst_of_changes_is_batched_and_each_emitted_once() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    let setup = Setup::new(&fake, &pods_yaml(&sub));
    let serve = setup.serve();
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    sentinel(&fake, &sub, "s0");
    // More changes at once than one batch takes (256), adds, updates and deletes mixed.
    let names: Vec<String> = (0..700).map(|i| format!("b{i:03}")).collect();
    for n in &names {
        fake.add("pods", pod(n, "demo"), false);
    }
    for n in &names[..300] {
        fake.modify("pods", n, |p| {
            p["spec"]["containers"][0]["image"] = json!("busybox:2")
        });
    }
    for n in &names[600..] {
        fake.delete("pods", n);
    }
    let mut want: Vec<(String, String)> = Vec::new();
    for (ty, range) in [("add", 0..700), ("update", 0..300), ("delete", 600..700)] {
        for n in &names[range] {
            want.push((format!("dev.knative.apiserver.ref.{ty}"), n.clone()));
        }
    }
    want.sort();
    assert_eq!(settled(&sub, 1, want.len()), want, "each change once");
    // A restart repeats none of them.
    serve.stop();
    let serve = setup.serve();
    sentinel(&fake, &sub, "s1");
    assert_eq!(seen(&sub).len(), 1 + want.len() + 1);
    drop(serve);
}

#[test]
fn a_batch_larger_than_a_trigger_queue_still_gets_through() {
    // In memory, each trigger queues at most 50 events: a batch of 256 never fits whole, and is
    // sent in smaller pieces instead of being refused forever.
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    let setup = Setup::new(&fake, &pods_yaml(&sub));
    let serve = setup.serve_with(&["--store", "memory", "--queue", "50"]);
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    sentinel(&fake, &sub, "s0");
    let mut want: Vec<(String, String)> = (0..300)
        .map(|i| {
            let name = format!("q{i:03}");
            fake.add("pods", pod(&name, "demo"), false);
            ("dev.knative.apiserver.ref.add".to_string(), name)
        })
        .collect();
    want.sort();
    assert_eq!(settled(&sub, 1, want.len()), want);
    sentinel(&fake, &sub, "s1");
    assert_eq!(seen(&sub).len(), 1 + want.len() + 1, "each once");
    drop(serve);
}

#[test]
fn a_403_is_reported_retried_and_survived() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    fake.forbid(true);
    let setup = Setup::new(&fake, &pods_yaml(&sub));
    let serve = setup.serve();
    serve.wait_log("403 Forbidden: RBAC refused `list` on pods");
    // The host keeps serving meanwhile.
    let r = crate::harness::request(
        serve.addr,
        "POST",
        "/default/default",
        &crate::harness::ce_headers("x", "t"),
        b"{}",
    );
    assert_eq!(r.status, 202);
    fake.forbid(false);
    wait_for(
        "the watch after RBAC is fixed",
        Duration::from_secs(60),
        || fake.watchers() >= 1,
    );
    sentinel(&fake, &sub, "ok");
    drop(serve);
}

#[test]
#[ignore = "needs cluster"]
fn the_hello_world_against_a_real_cluster() {
    // With KUBECONFIG pointing at a cluster where the seed's RBAC is applied:
    // `kubectl run busybox --image=busybox --restart=Never -- ls` makes Events that
    // event-display prints.
    assert!(std::env::var_os("KUBECONFIG").is_some(), "set KUBECONFIG");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in [
        "serviceaccount.yaml",
        "k8s-events.yaml",
        "trigger.yaml",
        "namespace.yaml",
        "event-display.yaml",
    ] {
        std::fs::copy(repo("manifests/hello").join(f), dir.path().join(f)).expect("copy");
    }
    let serve = Serve::start_at(dir.path(), &[]);
    serve.wait_log("ApiServerSource/default/testevents: Ready");
    let _ = std::process::Command::new("kubectl")
        .args([
            "run",
            "busybox",
            "--image=busybox",
            "--restart=Never",
            "--",
            "ls",
        ])
        .status();
    wait_for("an apiserver event", Duration::from_secs(120), || {
        serve
            .stdout()
            .contains("type: dev.knative.apiserver.resource.")
    });
    let _ = std::process::Command::new("kubectl")
        .args(["delete", "pod", "busybox"])
        .status();
}

#[test]
fn a_namespace_selector_follows_namespace_labels() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    let ns = |name: &str, team: &str| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": {"team": team}}})
    };
    fake.add("namespaces", ns("team-a", "a"), false);
    fake.add("namespaces", ns("team-b", "b"), false);
    let in_ns = |name: &str, namespace: &str| {
        let mut p = pod(name, "demo");
        p["metadata"]["namespace"] = json!(namespace);
        p
    };
    let yaml = pods_yaml(&sub).replace(
        "  mode: Reference\n",
        "  mode: Reference\n  namespaceSelector:\n    matchLabels: {team: a}\n",
    );
    let setup = Setup::new(&fake, &yaml);
    let serve = setup.serve();
    wait_for("the pod watch", WAIT, || fake.watchers_of("pods") >= 1);
    fake.add("pods", in_ns("b1", "team-b"), false);
    fake.add("pods", in_ns("a1", "team-a"), false);
    wait_for("a1", WAIT, || seen(&sub).iter().any(|(_, n)| n == "a1"));
    // team-b is labelled into the selection: its pods are followed from then on.
    fake.modify("namespaces", "team-b", |n| {
        n["metadata"]["labels"]["team"] = json!("a")
    });
    wait_for("the namespace change to arrive", WAIT, || {
        fake.add(
            "pods",
            in_ns(&format!("probe-{}", seen(&sub).len()), "team-b"),
            false,
        );
        seen(&sub).iter().any(|(_, n)| n.starts_with("probe-"))
    });
    let names: Vec<String> = seen(&sub).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names[0], "a1");
    assert!(
        !names.contains(&"b1".to_string()),
        "team-b was not selected when b1 was added: {names:?}"
    );
    drop(serve);
}

#[test]
fn the_owner_filter_and_ce_overrides() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    let yaml = pods_yaml(&sub).replace(
        "  mode: Reference\n",
        "  mode: Reference\n  owner: {apiVersion: apps/v1, kind: ReplicaSet}\n  ceOverrides:\n    extensions: {team: blue}\n",
    );
    let setup = Setup::new(&fake, &yaml);
    let serve = setup.serve();
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    let owned_by = |name: &str, kind: &str, controller: bool| {
        let mut p = pod(name, "demo");
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": if kind == "ReplicaSet" { "apps/v1" } else { "batch/v1" },
            "kind": kind, "name": "owner", "uid": "o-1", "controller": controller}]);
        p
    };
    fake.add("pods", owned_by("job-pod", "Job", true), false);
    fake.add(
        "pods",
        owned_by("not-controller", "ReplicaSet", false),
        false,
    );
    fake.add("pods", pod("orphan", "demo"), false);
    fake.add("pods", owned_by("rs-pod", "ReplicaSet", true), false);
    wait_for("rs-pod", WAIT, || {
        seen(&sub).iter().any(|(_, n)| n == "rs-pod")
    });
    let names: Vec<String> = seen(&sub).into_iter().map(|(_, n)| n).collect();
    assert_eq!(
        names,
        ["rs-pod"],
        "only objects whose controller matches the owner"
    );
    assert_eq!(
        sub.on("/pods")[0].headers["ce-team"],
        "blue",
        "ceOverrides extensions are set"
    );
    drop(serve);
}

/// `spec.filters` (Knative's Subscriptions API filters on the source): events that fail them are
/// not sent, and the source goes on past them.
#[test]
fn the_sources_filters_keep_what_they_match() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    let yaml = pods_yaml(&sub).replace(
        "  mode: Reference\n",
        "  mode: Reference\n  filters:\n    - prefix: {name: keep}\n    - not: {exact: {type: dev.knative.apiserver.ref.update}}\n",
    );
    let setup = Setup::new(&fake, &yaml);
    let serve = setup.serve();
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    fake.add("pods", pod("drop-1", "demo"), false);
    fake.add("pods", pod("keep-1", "demo"), false);
    fake.modify("pods", "keep-1", |p| {
        p["metadata"]["annotations"] = json!({"v": "2"})
    });
    fake.add("pods", pod("drop-2", "demo"), false);
    fake.add("pods", pod("keep-2", "demo"), false);
    wait_for("keep-1 and keep-2", WAIT, || {
        let names: Vec<String> = seen(&sub).into_iter().map(|(_, n)| n).collect();
        names.iter().any(|n| n == "keep-1") && names.iter().any(|n| n == "keep-2")
    });
    let mut names: Vec<String> = seen(&sub).into_iter().map(|(_, n)| n).collect();
    names.sort();
    assert_eq!(
        names,
        ["keep-1", "keep-2"],
        "only the adds of keep-*: {:?}",
        seen(&sub)
    );
    drop(serve);
}

/// An object whose event the broker can never take (larger than `--log-max-bytes`) is dropped
/// with an error naming it, and the changes after it still flow: before, the source sent it
/// again and again and every later change waited behind it.
#[test]
fn an_event_the_sink_never_takes_does_not_hold_the_source() {
    let sub = Capture::ok();
    let fake = FakeApiServer::start(1);
    let yaml = pods_yaml(&sub).replace("  mode: Reference\n", "  mode: Resource\n");
    let setup = Setup::new(&fake, &yaml);
    let serve = setup.serve_with(&["--log-max-bytes", "20000"]);
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    let mut huge = pod("huge", "demo");
    huge["metadata"]["annotations"] = json!({ "blob": "x".repeat(40_000) });
    fake.add("pods", huge, false);
    fake.add("pods", pod("after", "demo"), false);
    wait_for("the change after it", WAIT, || {
        seen(&sub).iter().any(|(_, n)| n == "after")
    });
    assert!(!seen(&sub).iter().any(|(_, n)| n == "huge"));
    assert!(
        serve
            .stderr()
            .contains("event refused for good by the sink: dropped"),
        "{}",
        serve.stderr()
    );
}

/// An ApiServerSource whose sink keeps refusing a batch holds it, and takes a stop only between
/// batches. Replaced (its sink changed through the admin API), it used to run on beside its
/// successor for good, retrying, its watch open; now it is cancelled after 5 s, and its
/// successor sends the change it could not.
#[test]
fn a_replaced_source_stuck_on_a_refusing_sink_is_cancelled() {
    let refusing = Capture::start(|_| (500, Vec::new(), b"down".to_vec()));
    let ok = Capture::ok();
    let fake = FakeApiServer::start(1);
    let source = |uri: &str| {
        format!(
            "apiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata: {{name: pods, namespace: default}}\n\
             spec:\n  mode: Reference\n  resources:\n  - apiVersion: v1\n    kind: Pod\n  sink:\n    uri: '{uri}'\n"
        )
    };
    let setup = Setup::new(&fake, &source(&refusing.url("/down")));
    let serve = setup.serve();
    wait_for("the watch", WAIT, || fake.watchers() >= 1);
    fake.add("pods", pod("p1", "demo"), false);
    refusing.wait("/down", 2);

    let r = serve.admin("POST", "/v1/apply", source(&ok.url("/ok")).as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let names = || -> Vec<String> {
        ok.on("/ok")
            .iter()
            .filter_map(|c| c.headers.get("ce-name").cloned())
            .collect()
    };
    wait_for("the successor sends p1", WAIT, || {
        names().contains(&"p1".to_string())
    });
    serve.wait_log("a replaced source did not stop within 5 s: cancelled");
    wait_for("only the successor's watch open", WAIT, || {
        fake.watchers() == 1
    });
    let refused = refusing.on("/down").len();
    fake.add("pods", pod("p2", "demo"), false);
    wait_for("the successor sends p2", WAIT, || {
        names().contains(&"p2".to_string())
    });
    assert_eq!(
        refusing.on("/down").len(),
        refused,
        "the old source no longer sends"
    );
}
